"""Evaluation on synthetic identities and held-out audio, measured from the pixels of the generated videos.

    python -m emo_core eval-synthetic --checkpoint FILE [--audio FILE ...] [--seed N]

Prints one JSON line:

* lipsync_corr: correlation between the mouth opening measured in the generated frames (darkness of the mouth
  region found by YuNet on the portrait) and the loudness of the audio per frame, averaged over identities x audio;
* lipsync_corr_shuffled: the same, for videos generated from the audio cut into 0.2 s pieces and shuffled
  (correlated with the loudness of the original audio): what no lip-sync gives;
* identity: similarity (centred cosine, 16x16 colour thumbnails) of the generated frames to the reference portrait,
  next to identity_other: the same against another identity's portrait;
* boundary_ratio: mean frame-to-frame change across clip boundaries / inside clips (1 = seamless);
* flicker: mean frame-to-frame change inside the face box of the generated videos (pixels in [0, 1]), next to
  flicker_real: the same for a real clip of each held-out person (the synthetic renderer, same length and requested
  speed, other speech) after a round trip through the model's VAE, the smoothest video its decoder gives. Generated
  faces that change more than real ones flicker (temporal inconsistency), which also hides head motion;
* speed_measured: requested head speed -> head rotation speed measured with YuNet landmarks in the generated frames
  (degrees per frame, the training data's measurement; poses averaged over 9 frames instead of 5 because landmarks
  jitter more on small frames).

Identities and speech are drawn from seeds far from those of the training data (training uses 1000+).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HELD_OUT_SEED = 900_000  # synthetic identities / speech for evaluation: never used for training data


def frame_loudness(waveform: torch.Tensor, frames: int, fps: float, rate: int = 16000) -> np.ndarray:
    """RMS of the waveform over each video frame's time span -> (frames,)."""
    x = waveform.numpy()
    edges = (np.arange(frames + 1) / fps * rate).astype(int).clip(0, len(x))
    return np.array([np.sqrt(np.mean(x[a:b] ** 2)) if b > a else 0.0 for a, b in zip(edges[:-1], edges[1:])])


def shuffle_audio(waveform: torch.Tensor, seed: int, piece: float = 0.2, rate: int = 16000) -> torch.Tensor:
    """The same sound cut into `piece`-second pieces put in a random order: same voice, timing destroyed."""
    n = int(piece * rate)
    pieces = list(waveform.split(n))
    order = np.random.default_rng(seed).permutation(len(pieces))
    return torch.cat([pieces[i] for i in order])


def mouth_box(face, size: int) -> tuple:
    """A box around the mouth from YuNet's two mouth corners (in pixels of a size x size image)."""
    (lx, ly), (rx, ry) = face.landmarks[3].tolist(), face.landmarks[4].tolist()
    width = max(abs(rx - lx), 2.0)
    cx, cy = (lx + rx) / 2, (ly + ry) / 2
    box = (cx - 0.6 * width, cy - 0.45 * width, cx + 0.6 * width, cy + 0.65 * width)
    return tuple(float(np.clip(v, 0, size)) for v in box)


def in_box(images: torch.Tensor, box: tuple) -> torch.Tensor:
    """The pixels of (..., H, W) inside box (x0, y0, x1, y1), rounded to whole pixels, at least one pixel."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0 = max(0, x0), max(0, y0)
    return images[..., y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]


def mouth_opening(frames: torch.Tensor, box: tuple) -> np.ndarray:
    """Darkness of the mouth region per frame (an open mouth shows its dark inside): 1 - mean luminance."""
    luma = in_box(frames[:, 0] * 0.299 + frames[:, 1] * 0.587 + frames[:, 2] * 0.114, box)
    return (1 - luma.flatten(1).mean(1)).numpy()


def thumbnail(images: torch.Tensor) -> torch.Tensor:
    small = F.interpolate(images, size=(16, 16), mode="area").flatten(1)
    return small - small.mean(1, keepdim=True)


def similarity(frames: torch.Tensor, reference: torch.Tensor) -> float:
    return float(F.cosine_similarity(thumbnail(frames), thumbnail(reference)).mean())


def face_change(frames: torch.Tensor, box: tuple) -> float:
    """Mean absolute frame-to-frame change inside the face box, frames (S, 3, H, W) in [0, 1]."""
    face = in_box(frames, box)
    return float((face[1:] - face[:-1]).abs().mean())


def boundary_ratio(frames: torch.Tensor, clip: int) -> float:
    change = (frames[1:] - frames[:-1]).abs().flatten(1).mean(1)  # change[t]: frame t -> t+1
    at_boundary = torch.tensor([(t + 1) % clip == 0 for t in range(change.shape[0])])
    if not at_boundary.any() or at_boundary.all():
        return float("nan")
    return float(change[at_boundary].mean() / change[~at_boundary].mean().clamp_min(1e-8))


def head_speed(detector, frames: torch.Tensor) -> float:
    from .face import NoFaceError, head_pose, rotation_speed, track_faces

    try:
        _, landmarks, _ = track_faces(detector, frames)
    except NoFaceError:
        return float("nan")
    return float(rotation_speed(torch.stack([head_pose(lm) for lm in landmarks])).mean())


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() < 1e-8 or b.std() < 1e-8:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def evaluate(checkpoint, detector_weights, audio_files=(), seed: int = 0, identities: int = 3, seconds: float = 4.0,
             steps: int | None = None, speeds=(0.5, 1.5, 3.0), base_speed: float = 0.5, vae=None, audio_encoder=None,
             speech_clips: int = 2, log=print) -> dict:
    from .audio import load_audio
    from .cli import load_pipeline
    from .face import Crop, YuNetDetector
    from .sampler import GenerationInputs, SamplerSettings, generate
    from .synthetic import Identity, make_clip, render, speech

    model, codec, encoder = load_pipeline(checkpoint, vae, audio_encoder)
    cfg = model.cfg
    size, fps = cfg.size, cfg.fps
    detector = YuNetDetector(detector_weights, confidence=0.3)
    base = HELD_OUT_SEED + 1000 * seed
    sounds = [(f"synthetic speech {base + 500 + k}", torch.from_numpy(speech(seconds, base + 500 + k)[0]))
              for k in range(speech_clips)]
    sounds += [(str(f), load_audio(f)) for f in audio_files]
    if not sounds:
        raise ValueError("no audio to evaluate with: give --audio files or --speech-clips 1 or more")
    portraits, seeds, candidate = [], [], base
    while len(portraits) < identities:  # held-out people whose face YuNet finds (a few drawn faces it misses)
        if candidate - base >= 10 * identities:
            raise RuntimeError(f"YuNet finds too few faces among held-out identities {base}..{candidate}")
        large = render(Identity.sample(np.random.default_rng(candidate)), 128, 0.0, 0.0, 0.0, 0.0, 0.0)
        candidate += 1
        faces = detector.detect(torch.from_numpy(np.array(large)).permute(2, 0, 1)[None].float() / 255)[0]
        if not faces:
            log(f"[eval] no face found in held-out identity {candidate - 1}: skipped")
            continue
        image = large.resize((size, size))  # as prepared: 128 px -> the model's size
        face = Crop(64.0, 64.0, 128.0, size, 128, 128).map_face(faces[0])
        portraits.append((torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255, face))
        seeds.append(candidate - 1)

    def run(portrait, face, waveform, speed, run_seed):
        from .face import face_box_mask

        features, length = encoder(waveform, fps=fps, clip_length=cfg.frames_per_clip)
        mask = face_box_mask([face], size, size, expand=1.2)
        inputs = GenerationInputs(reference_latent=codec.encode(portrait * 2 - 1), audio_features=features,
                                  face_mask=mask, speed=speed if cfg.speed else None, num_frames=length)
        settings = SamplerSettings(steps=steps, seed=run_seed)
        clips = [codec.decode(c.latents[0].transpose(0, 1)).float() for c in generate(model, inputs, settings)]
        return torch.cat(clips)

    started = time.perf_counter()
    lips, lips_shuffled, ident, ident_other, boundaries, flicker, flicker_real = [], [], [], [], [], [], []
    for i, (portrait, face) in enumerate(portraits):
        box = mouth_box(face, size)
        for j, (name, waveform) in enumerate(sounds):
            frames = run(portrait, face, waveform, base_speed, seed)
            loud = frame_loudness(waveform, frames.shape[0], fps)
            lips.append(correlation(mouth_opening(frames, box), loud))
            shuffled = run(portrait, face, shuffle_audio(waveform, seed + j), base_speed, seed)
            lips_shuffled.append(correlation(mouth_opening(shuffled, box), loud))
            ident.append(similarity(frames, portrait))
            ident_other.append(similarity(frames, portraits[(i + 1) % len(portraits)][0]))
            boundaries.append(boundary_ratio(frames, cfg.frames_per_clip))
            flicker.append(face_change(frames, face.box))
            log(f"[eval] identity {i + 1}/{len(portraits)}, {name}: lipsync {lips[-1]:.3f} (shuffled "
                f"{lips_shuffled[-1]:.3f}), identity {ident[-1]:.3f}, boundary {boundaries[-1]:.2f}  "
                f"({time.perf_counter() - started:.0f}s)")
        # the same person really filmed (rendered at 128 px, prepared to the model's size as the training data is)
        real = torch.from_numpy(make_clip(seeds[i], seconds, fps, 128, base_speed)[0]).permute(0, 3, 1, 2)
        real = F.interpolate(real.float() / 255, size=(size, size), mode="area")
        real = torch.cat([codec.decode(codec.encode(c * 2 - 1)).float() for c in real.split(16)])
        flicker_real.append(face_change(real, face.box))
    measured = {}
    if cfg.speed is not None:
        for speed in speeds:
            values = [head_speed(detector, run(p, f, sounds[0][1], speed, seed)) for p, f in portraits]
            measured[str(speed)] = round(float(np.nanmean(values)), 3)
            log(f"[eval] requested speed {speed}: measured {measured[str(speed)]} deg/frame")
    return {
        "checkpoint": str(checkpoint), "seed": seed, "identities": identities, "first_identity": base,
        "audio": [n for n, _ in sounds],
        "steps": steps or cfg.steps, "size": size,
        "lipsync_corr": round(float(np.mean(lips)), 4),
        "lipsync_corr_shuffled": round(float(np.mean(lips_shuffled)), 4),
        "identity": round(float(np.mean(ident)), 4), "identity_other": round(float(np.mean(ident_other)), 4),
        "boundary_ratio": round(float(np.nanmean(boundaries)), 4),
        "flicker": round(float(np.mean(flicker)), 4), "flicker_real": round(float(np.mean(flicker_real)), 4),
        "speed_measured": measured,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv=None):
    from .cli import DEMO_CHECKPOINT, positive

    p = argparse.ArgumentParser(prog="python -m emo_core eval-synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT), help="EMO checkpoint (default: the bundled demo)")
    p.add_argument("--audio", nargs="*", default=[], help="held-out audio files (speech or singing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--identities", type=positive(), default=3)
    p.add_argument("--seconds", type=positive(float), default=4.0, help="length of the synthetic held-out speech")
    p.add_argument("--speech-clips", type=positive(), default=2, help="how many held-out synthetic speech clips")
    p.add_argument("--steps", type=positive(), default=None)
    p.add_argument("--speeds", type=float, nargs="+", default=[0.5, 1.5, 3.0])
    p.add_argument("--vae", help="only for checkpoints without a bundled VAE")
    p.add_argument("--audio-encoder", help="only for checkpoints without a bundled audio encoder")
    p.add_argument("--face-detector", required=True, help="YuNet weights (yunet_final.pth): finds the mouth in the "
                                                           "portraits and measures head motion")
    args = p.parse_args(argv)
    try:
        result = evaluate(args.checkpoint, args.face_detector, args.audio, args.seed, args.identities, args.seconds,
                          args.steps, tuple(args.speeds), vae=args.vae, audio_encoder=args.audio_encoder,
                          speech_clips=args.speech_clips, log=lambda m: print(m, file=sys.stderr))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(result))
