"""Synthetic talking faces: procedural portraits whose mouth follows a speech-like sound, with head rotation at a
chosen speed and occasional blinks, written as ordinary mp4 + audio so that data preparation and training run on
them exactly as on real videos (and so that lip-sync and speed control can be measured on known ground truth).

    python -m emo_core.synthetic OUT_DIR --count 8 --seconds 4 [--workers N]

Every clip is fully determined by its seed. Per-frame ground truth (mouth opening, yaw/pitch/roll, blink) is
returned and written next to the video as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SAMPLE_RATE = 16000


@dataclass
class Identity:
    """What one synthetic person looks like (all colours RGB 0..255, sizes relative to the image)."""

    skin: tuple
    hair: tuple
    iris: tuple
    lips: tuple
    shirt: tuple
    background: tuple
    face_width: float  # half-width of the face ellipse, fraction of the image
    face_height: float
    hair_style: int  # 0 short, 1 long, 2 bald with sides
    eye_spacing: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Identity":
        tone = rng.uniform(0, 1)
        skin = tuple(int(v) for v in np.array([235, 196, 170]) * (1 - 0.55 * tone) + np.array([20, 10, 5]) * tone)
        hair = tuple(int(v) for v in rng.choice([[40, 28, 20], [90, 60, 30], [200, 170, 110], [20, 20, 25],
                                                 [120, 40, 20], [160, 160, 160]]))
        pastel = lambda: tuple(int(v) for v in rng.uniform(60, 200, 3))  # noqa: E731
        return cls(skin=skin, hair=hair, iris=tuple(int(v) for v in rng.uniform(30, 140, 3)),
                   lips=(int(150 + 50 * rng.uniform()), 70, 75), shirt=pastel(), background=pastel(),
                   face_width=float(rng.uniform(0.19, 0.25)), face_height=float(rng.uniform(0.27, 0.32)),
                   hair_style=int(rng.integers(0, 3)), eye_spacing=float(rng.uniform(0.085, 0.11)))


def speech(seconds: float, seed: int, rate: int = SAMPLE_RATE) -> tuple:
    """A speech-like signal (harmonic voice, moving pitch and formants, syllables and pauses) and its amplitude
    envelope. Returns (waveform float32 (n,), envelope float32 (n,) in [0, 1])."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = rng.uniform(100, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 25))
    f1 = 500 + 250 * np.sin(2 * np.pi * rng.uniform(2, 4) * t)
    formant = 0.6 + 0.4 * np.cos(2 * np.pi * f1 / 4000 * 3)
    rate_hz = rng.uniform(3.0, 5.0)  # syllables per second
    syllables = np.clip(np.sin(2 * np.pi * rate_hz * t + rng.uniform(0, 6)) * 1.3, 0, 1) ** 1.5
    pauses = (np.sin(2 * np.pi * rng.uniform(0.2, 0.4) * t + rng.uniform(0, 6)) > -0.6).astype(float)
    envelope = syllables * pauses
    signal = voice * formant * envelope + 0.01 * rng.standard_normal(t.shape)
    peak = max(float(np.abs(signal).max()), 1e-6)
    return (signal / peak * 0.6).astype(np.float32), envelope.astype(np.float32)


def frame_envelope(envelope: np.ndarray, frames: int, fps: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    """The envelope averaged over each video frame's time span -> (frames,) in [0, 1]."""
    edges = (np.arange(frames + 1) / fps * rate).astype(int).clip(0, len(envelope))
    return np.array([envelope[a:b].mean() if b > a else 0.0 for a, b in zip(edges[:-1], edges[1:])], np.float32)


def render(identity: Identity, size: int, mouth: float, yaw: float, pitch: float, roll: float,
           blink: float) -> Image.Image:
    """One frame. mouth and blink in [0, 1]; yaw/pitch/roll in degrees. The eyes, brows, nose and mouth are points
    on the front of the head at the depths of a real face (the nose tip in front of the eyes and mouth), turned
    by yaw and pitch and projected, so a turn moves them by their depth times the sine of the angle, the nose most;
    the face narrows with the yaw; roll tilts the whole head about the neck."""
    scale = 4  # draw large, then downsample: smooth edges
    s = size * scale
    img = Image.new("RGB", (s, s), identity.background)
    d = ImageDraw.Draw(img)
    cx, cy = s / 2, s * 0.46
    fw, fh = identity.face_width * s * math.cos(math.radians(yaw)) ** 0.5, identity.face_height * s
    sy, cyw = math.sin(math.radians(yaw)), math.cos(math.radians(yaw))
    sp, cp = math.sin(math.radians(pitch)), math.cos(math.radians(pitch))
    depth = identity.face_width * s  # of the eyes and mouth in front of the head's vertical axis

    def at(x: float, y: float, z: float) -> tuple:
        # a point of the frontal face, x right and y down from the head centre, z towards the camera (pixels)
        # -> where it is seen: turned by the yaw about the vertical axis, then by the pitch about the horizontal one
        x, z = x * cyw + z * sy, z * cyw - x * sy
        return cx + x, cy + y * cp + z * sp

    d.ellipse([cx - 0.75 * s, cy + 0.28 * s, cx + 0.75 * s, cy + 0.95 * s], fill=identity.shirt)  # shoulders
    d.rectangle([cx - 0.08 * s, cy + 0.2 * s, cx + 0.08 * s, cy + 0.36 * s], fill=identity.skin)  # neck
    head = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    h = ImageDraw.Draw(head)
    if identity.hair_style == 1:  # long hair behind the head
        h.ellipse([cx - fw * 1.25, cy - fh * 1.15, cx + fw * 1.25, cy + fh * 1.2], fill=identity.hair)
    h.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=identity.skin)
    if identity.hair_style in (0, 1):
        h.chord([cx - fw * 1.08, cy - fh * 1.12, cx + fw * 1.08, cy - fh * 0.05], 180, 360, fill=identity.hair)
    else:
        for side in (-1, 1):
            h.ellipse([cx + side * fw * 0.95 - fw * 0.2, cy - fh * 0.5, cx + side * fw * 0.95 + fw * 0.2,
                       cy + fh * 0.1], fill=identity.hair)
    ex = identity.eye_spacing * s
    for side in (-1, 1):
        x, ey = at(side * ex, -fh * 0.12, depth * 0.75)
        rx = fw * cyw  # the eyes narrow as they turn away
        open_ = 0.5 * (1 - blink) + 0.02
        h.ellipse([x - rx * 0.2, ey - fh * 0.09 * open_ * 2, x + rx * 0.2, ey + fh * 0.09 * open_ * 2],
                  fill=(245, 245, 245))
        if blink < 0.8:
            h.ellipse([x - rx * 0.09, ey - fh * 0.07 * open_ * 2, x + rx * 0.09, ey + fh * 0.07 * open_ * 2],
                      fill=identity.iris)
        h.line([at(side * ex - fw * 0.22, -fh * 0.28, depth * 0.8), at(side * ex + fw * 0.2, -fh * 0.30, depth * 0.8)],
               fill=identity.hair, width=max(1, int(0.012 * s)))
    tip, top = at(0, fh * 0.18, depth * 1.2), at(0, fh * -0.04, depth * 0.85)
    h.polygon([top, (tip[0] - fw * 0.12 * cyw, tip[1]), (tip[0] + fw * 0.12 * cyw, tip[1])],
              fill=_shade(identity.skin, 0.85))
    mx, my = at(0, fh * 0.5, depth * 0.85)
    mw, mh = fw * 0.42 * cyw, fh * (0.03 + 0.22 * mouth)
    h.ellipse([mx - mw, my - mh, mx + mw, my + mh], fill=identity.lips)
    if mouth > 0.08:
        h.ellipse([mx - mw * 0.8, my - mh * 0.7, mx + mw * 0.8, my + mh * 0.7], fill=(60, 20, 25))
    head = head.rotate(-roll, resample=Image.BICUBIC, center=(cx, cy + fh * 0.9))  # about the neck
    img.paste(head, (0, 0), head)
    return img.resize((size, size), Image.LANCZOS).filter(ImageFilter.GaussianBlur(0.4))


def _shade(color: tuple, k: float) -> tuple:
    return tuple(int(c * k) for c in color)


@dataclass
class Clip:
    seed: int
    fps: float
    speed: float  # requested head rotation speed, degrees per frame
    mouth: list  # per frame, [0, 1]
    yaw: list
    pitch: list
    roll: list
    blink: list


def make_clip(seed: int, seconds: float = 4.0, fps: float = 25, size: int = 256, speed: float = 1.0):
    """(frames (N, size, size, 3) uint8, waveform (n,), Clip ground truth). The head turns with yaw/pitch/roll
    speed `speed` degrees per frame on average (smooth back-and-forth motion), the mouth opening is the speech
    envelope, blinks come every 2-5 s."""
    rng = np.random.default_rng(seed)
    identity = Identity.sample(rng)
    waveform, envelope = speech(seconds, seed)
    frames = int(round(seconds * fps))
    mouth = np.clip(frame_envelope(envelope, frames, fps) * 1.2, 0, 1)
    # angles: yaw, pitch, roll, one sine each, whose mean absolute rate of change together is `speed` degrees per
    # frame. Every head starts frontal and turns the same way first (phase 0), as a generated video starts from its
    # frontal portrait: from the start of a video the motion is determined by the speed, not a coin toss a small
    # model would average into a still head.
    t = np.arange(frames, dtype=np.float64)
    angles = []
    for amplitude, period in ((1.0, rng.uniform(40, 70)), (0.5, rng.uniform(15, 30)), (0.4, rng.uniform(20, 45))):
        angles.append(amplitude * np.sin(2 * np.pi * t / period))
    yaw, pitch, roll = angles
    rate = np.mean(np.linalg.norm(np.diff(np.stack(angles), axis=1), axis=0)) if frames > 1 else 1.0
    yaw, pitch, roll = (a * speed / max(rate, 1e-9) for a in (yaw, pitch, roll))
    blink = np.zeros(frames)
    next_blink = rng.uniform(1, 3) * fps
    while next_blink < frames - 3:
        k = int(next_blink)
        blink[k:k + 3] = [0.6, 1.0, 0.5][: len(blink[k:k + 3])]
        next_blink += rng.uniform(2, 5) * fps
    images = np.stack([np.asarray(render(identity, size, float(mouth[i]), float(yaw[i]), float(pitch[i]),
                                         float(roll[i]), float(blink[i]))) for i in range(frames)])
    truth = Clip(seed, fps, speed, *(list(map(float, a)) for a in (mouth, yaw, pitch, roll, blink)))
    return images, waveform, truth


def write_clip(path, seed: int, seconds: float = 4.0, fps: float = 25, size: int = 256, speed: float = 1.0) -> Clip:
    """mp4 (H.264 + AAC) at `path` and its ground truth at `path` with suffix .json."""
    import torch

    from .video import VideoWriter

    images, waveform, truth = make_clip(seed, seconds, fps, size, speed)
    with VideoWriter(path, fps, audio=waveform, sample_rate=SAMPLE_RATE, crf=18) as writer:
        writer.write(torch.from_numpy(images).float() / 255)
    Path(path).with_suffix(".json").write_text(json.dumps(asdict(truth)))
    return truth


def _write_one(job: tuple) -> float:
    write_clip(*job)
    return job[-1]  # its speed


def _one_thread():
    import torch

    torch.set_num_threads(1)  # one clip per worker process: the processes share the cores


def main(argv=None):
    from .cli import positive

    p = argparse.ArgumentParser(prog="python -m emo_core.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder")
    p.add_argument("--count", type=positive(), default=8)
    p.add_argument("--seconds", type=positive(float), default=4.0)
    p.add_argument("--fps", type=positive(float), default=25)
    p.add_argument("--size", type=positive(), default=256)
    p.add_argument("--speeds", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="head speeds, cycled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=positive(), default=os.cpu_count() or 1,
                   help="clips written in parallel (default: one per CPU core); the files do not depend on it")
    args = p.parse_args(argv)
    out = Path(args.out)
    jobs = [(out / f"synthetic_{args.seed + i:05d}.mp4", args.seed + i, args.seconds, args.fps, args.size,
             args.speeds[i % len(args.speeds)]) for i in range(args.count)]

    def report(done):
        for i, speed in enumerate(done):
            print(f"[synthetic] {i + 1}/{args.count} speed {speed} deg/frame", flush=True)

    if args.workers == 1 or len(jobs) < 2:
        report(map(_write_one, jobs))
    else:
        with ProcessPoolExecutor(min(args.workers, len(jobs)), initializer=_one_thread) as pool:
            report(pool.map(_write_one, jobs))


if __name__ == "__main__":
    main()
