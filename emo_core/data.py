"""Training data: a folder of talking-head videos (mp4 with audio) -> a prepared training set.

    python -m emo_core prepare VIDEOS_DIR OUT_DIR --audio-encoder WAV2VEC2 [--size 512] [--fps 25]

Per video, one `OUT_DIR/videos/<name>.safetensors` holds (S = frames at the training frame rate):

    frames        (S, size, size, 3) uint8  a face-centred square crop, one crop per video (stable framing)
    boxes         (S, 4) float32            the face box per frame in crop pixels (face-locator masks)
    found         (S,) uint8                1 where the detector found the face (else the nearest detection)
    poses         (S, 3) float32            yaw, pitch, roll in degrees (from the 5 landmarks)
    speed         (S,) float32              head rotation speed, degrees per frame (what the speed layers see)
    speed_bucket  (S,) int64                index of the nearest speed-bucket centre
    audio         (S, layers, C) float16    wav2vec2 features per frame, computed once here (cached)

and `OUT_DIR/dataset.json` lists the videos, the clip index (video, first frame) and every skipped video with the
reason. Bad videos (unreadable, no audio, silent, no face, too short) are reported and skipped; the run never stops
for one of them. Already prepared videos are kept when the run is repeated (interrupt and re-run to resume).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .checkpoint import weights_fingerprint

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
FORMAT = "emo-comfyui-dataset/1"


class SkipVideo(Exception):
    """A video that cannot be used, with the reason."""


def prepare_video(path: Path, encoder, detector, size: int, fps: float, centres: list, min_frames: int,
                  min_face: float = 0.5) -> dict:
    """One video -> the tensors listed in the module docstring. Raises SkipVideo with the reason."""
    from .face import NoFaceError, crop_image, face_crop, head_pose, rotation_speed, track_faces, unit_float
    from .video import VideoFrames

    try:
        video = VideoFrames(path, fps=fps, batch=16, channels_first=True)
    except (ValueError, FileNotFoundError) as e:
        raise SkipVideo(f"unreadable video: {e}") from None
    try:
        waveform = sound_of_the_picture(path)
    except ValueError as e:
        raise SkipVideo(f"no usable audio: {e}") from None
    if float(waveform.abs().max()) < 1e-4:
        raise SkipVideo("the audio is silent")
    heard = int(waveform.shape[0] / 16000 * fps)
    if heard < min_frames:
        raise SkipVideo(f"too short: {heard} frames of sound, at least {min_frames} needed")
    # The frames that have sound, read three times (faces, their landmarks, the crops) rather than held whole.
    video.max_frames = heard
    try:
        boxes, landmarks, found = track_faces(detector, video)
    except NoFaceError:
        raise SkipVideo("no face found") from None
    except ValueError as e:
        raise SkipVideo(f"unreadable video: {e}") from None
    count = len(boxes)
    if count < min_frames:
        raise SkipVideo(f"too short: {count} frames with both picture and sound, at least {min_frames} needed")
    if float(found.float().mean()) < min_face:
        raise SkipVideo(f"the face is found in only {100 * float(found.float().mean()):.0f}% of the frames")
    box = tuple(np.median(np.asarray(boxes), axis=0).tolist())  # one crop for the whole video: stable framing
    crops = []  # (S, size, size, 3) uint8
    try:
        for images in video:
            crop = face_crop(box, *images.shape[-2:], size)
            pixels = crop_image(unit_float(images), crop).clamp(0, 1) * 255
            crops.append(pixels.round().to(torch.uint8).permute(0, 2, 3, 1))
    except ValueError as e:
        raise SkipVideo(f"unreadable video: {e}") from None
    cropped = sum(c.shape[0] for c in crops)
    if cropped != count:
        raise SkipVideo(f"unreadable video: {cropped} frames on its last reading, {count} before")
    crops = torch.cat(crops)
    scale = size / crop.side
    offset = torch.tensor([crop.cx - crop.side / 2, crop.cy - crop.side / 2] * 2)
    crop_boxes = (torch.tensor(boxes, dtype=torch.float32) - offset) * scale
    poses = torch.stack([head_pose(lm) for lm in landmarks]).float()
    speed = rotation_speed(poses).float()
    bucket = (speed[:, None] - torch.tensor(centres)[None]).abs().argmin(dim=1)
    features, _ = encoder(waveform, fps=fps)
    features = features[:count]
    if features.shape[0] < count:
        features = torch.cat([features, features[-1:].expand(count - features.shape[0], -1, -1)])
    return {
        "frames": crops.contiguous(),
        "boxes": crop_boxes.contiguous(),
        "found": found.to(torch.uint8),
        "poses": poses,
        "speed": speed,
        "speed_bucket": bucket,
        "audio": features.to(torch.float16).contiguous(),
    }


def sound_of_the_picture(path: Path) -> torch.Tensor:
    """A video's sound, mono at 16 kHz, starting at its first picture: a track that starts later than the picture
    (or earlier) is padded with silence (or trimmed), so that each frame is paired with its own sound."""
    from .audio import SAMPLE_RATE, read_audio, to_mono
    from .video import first_frame_times

    sound, rate = read_audio(path)
    waveform = to_mono(sound, rate)
    picture, audio = first_frame_times(path)
    shift = round((audio - picture) * SAMPLE_RATE) if audio is not None and picture is not None else 0
    if -shift >= waveform.shape[0]:
        raise ValueError(f"the sound ends ({waveform.shape[0] / SAMPLE_RATE:.2f} s) before the picture starts "
                         f"({-shift / SAMPLE_RATE:.2f} s after the sound)")
    if shift > 0:
        return torch.cat([waveform.new_zeros(shift), waveform])
    return waveform[-shift:]


def prepare(videos: Path, out: Path, encoder, detector, size: int = 512, fps: float = 25, clip_frames: int = 16,
            centres: list | None = None, workers: int = 1, log=print) -> dict:
    """Prepare every video under `videos` into `out` (see the module docstring). Returns the dataset index.
    workers > 1 prepares that many videos at a time in worker processes, each on one torch thread with its own copy
    of the encoder and detector: the files are the same for any number of workers, and the same as one process on
    one torch thread gives (on more threads, the same to float rounding)."""
    from .config import SpeedConfig
    from .face import HEAD_SPEED_METHOD

    videos, out = Path(videos), Path(out)
    if not videos.is_dir():
        raise FileNotFoundError(f"video folder not found: {videos}" + (" (that is a file)" if videos.exists() else ""))
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output {out} is a file: give a folder for the prepared training set")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    files = sorted(p for p in videos.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise ValueError(f"{videos} holds no videos ({', '.join(VIDEO_SUFFIXES)}): nothing to prepare")
    centres = centres or SpeedConfig().centres()
    settings = {"size": size, "fps": fps, "audio_layers": encoder.layers,
                "audio_channels": encoder.model.config.hidden_size, "speed_centres": centres,
                "head_speed": HEAD_SPEED_METHOD, "audio_encoder": weights_fingerprint(encoder.model)}
    _refuse_other_settings(out, settings)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    names = _file_names(videos, files)
    jobs = [(path, out / "videos" / f"{name}.safetensors", size, fps, centres, clip_frames, settings)
            for path, name in zip(files, names)]
    index = {"format": FORMAT, **settings, "videos": [], "skipped": [], "clips": [], "clip_frames": clip_frames}
    started = time.perf_counter()
    pool = None
    try:
        if workers == 1 or len(jobs) < 2:
            results = (_prepare_one(job, encoder, detector) for job in jobs)
        else:
            pool = ProcessPoolExecutor(min(workers, len(jobs)), initializer=_start_worker,
                                       initargs=(encoder, detector))
            results = pool.map(_prepare_in_worker, jobs)  # in file order, whatever finishes first
        for i, (path, name, (frames, note)) in enumerate(zip(files, names, results)):
            if frames is None:
                index["skipped"].append({"video": str(path), "reason": note})
                log(f"[prepare] {i + 1}/{len(files)} SKIPPED {path.name}: {note}")
                continue
            v = len(index["videos"])
            index["videos"].append({"name": name, "file": f"videos/{name}.safetensors", "frames": frames,
                                    "source": str(path)})
            index["clips"] += [[v, s] for s in range(0, frames - clip_frames + 1, clip_frames)]
            log(f"[prepare] {i + 1}/{len(files)} {path.name}: {note}  ({time.perf_counter() - started:.0f}s)")
    except KeyboardInterrupt:
        log("[prepare] interrupted: the index below covers the videos prepared so far; run again to continue")
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        (out / "dataset.json").write_text(json.dumps(index, indent=1))
    log(f"[prepare] {len(index['videos'])} videos, {len(index['clips'])} clips of {clip_frames} frames, "
        f"{len(index['skipped'])} skipped -> {out / 'dataset.json'}")
    return index


def _file_names(videos: Path, files: list) -> list:
    """Prepared-file names: the path under the video folder without its suffix, folders joined by "__"; videos
    that would share a name (a.mp4 and a.mov, or A.mp4 and a.mov) keep their suffix too (a__mp4, a__mov)."""
    names = [p.relative_to(videos).with_suffix("").as_posix().replace("/", "__") for p in files]
    # compared without case: on Windows and macOS, Talk.safetensors and talk.safetensors are one file
    shared = {n for n, count in Counter(n.casefold() for n in names).items() if count > 1}
    names = [f"{n}__{p.suffix[1:].lower()}" if n.casefold() in shared else n for n, p in zip(names, files)]
    clash = [n for n, count in Counter(n.casefold() for n in names).items() if count > 1]
    if clash:
        raise ValueError(f"videos under {videos} would be prepared into the same file {clash[0]}.safetensors "
                         f"(names that differ only in case): rename one of them")
    return names


def _refuse_other_settings(out: Path, settings: dict):
    """A prepared set is made with one set of settings: preparing into it with others would replace it file by
    file (a mixture, if stopped half-way). Settings an older index does not record are not compared."""
    try:
        before = json.loads((out / "dataset.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    differ = [k for k in settings if k in before and before[k] != settings[k]]
    if differ:
        said = ", ".join(f"{k} {before[k]!r} (now {settings[k]!r})" for k in differ)
        raise ValueError(f"{out} was prepared with other settings: {said}. Prepare into another folder, or delete "
                         f"{out} to prepare it again with these (nothing was changed)")


def _source_stamp(path: Path) -> str:
    stat = path.stat()
    return json.dumps({"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})


def _prepare_one(job: tuple, encoder, detector) -> tuple:
    """One video of `prepare` -> (frames, note), or (None, reason) for a video that cannot be used. A file
    prepared before is kept when its settings and its source video (size and modification time) are the same."""
    from .checkpoint import save_safetensors

    path, target, size, fps, centres, clip_frames, settings = job
    stamp = _source_stamp(path)
    if target.is_file() and _metadata(target) == (settings, stamp):
        return _frame_count(target), "kept (prepared before)"
    try:
        data = prepare_video(path, encoder, detector, size, fps, centres, min_frames=clip_frames)
    except SkipVideo as e:
        return None, str(e)
    save_safetensors(data, target, metadata={"source": str(path), "settings": json.dumps(settings),
                                             "source_stamp": stamp})
    frames = data["frames"].shape[0]
    return frames, (f"{frames} frames, face in {100 * float(data['found'].float().mean()):.0f}%, "
                    f"speed {float(data['speed'].mean()):.2f} deg/frame")


_worker_tools = None  # (encoder, detector) of a worker process of `prepare`


def _start_worker(encoder, detector):
    global _worker_tools
    torch.set_num_threads(1)  # one video per worker process: the processes share the cores
    _worker_tools = (encoder, detector)


def _prepare_in_worker(job: tuple) -> tuple:
    return _prepare_one(job, *_worker_tools)


def _metadata(path: Path) -> tuple:
    """(settings, source stamp) a prepared file was made with; (None, None) for a damaged file (prepare again)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta.get("settings", "null")), meta.get("source_stamp")
    except Exception:
        return None, None


def _frame_count(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return f.get_slice("frames").get_shape()[0]


class PreparedDataset:
    """A prepared training set, read lazily: each video's tensors are loaded the first time they are needed and
    kept (`keep_in_memory`) or read again from the memory-mapped file each time."""

    def __init__(self, root, keep_in_memory: bool = True):
        self.root = Path(root)
        index_file = self.root / "dataset.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"{index_file} not found: run `python -m emo_core prepare VIDEOS {self.root}` "
                                    f"first")
        try:
            self.index = json.loads(index_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{index_file} cannot be read ({e}): run `python -m emo_core prepare VIDEOS "
                             f"{self.root}` again (it keeps the videos already prepared)") from None
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index_file} is not a dataset prepared by this pack (format "
                             f"{self.index.get('format')!r})")
        if not self.index["videos"]:
            raise ValueError(f"the dataset {self.root} holds no usable video (skipped: "
                             f"{[s['reason'] for s in self.index['skipped']][:5]})")
        self.keep_in_memory = keep_in_memory
        self._cache = {}

    @property
    def videos(self) -> list:
        return self.index["videos"]

    def video(self, i: int) -> dict:
        if i in self._cache:
            return self._cache[i]
        path = self.root / self.videos[i]["file"]
        try:
            with safe_open(str(path), framework="pt") as f:
                data = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # missing, truncated or overwritten file
            raise ValueError(self._damaged(path, e)) from None
        if self.keep_in_memory:
            self._cache[i] = data
        return data

    def check(self):
        """Open every prepared file's header, so that a missing or damaged file stops a run before it starts."""
        for v in self.videos:
            path = self.root / v["file"]
            try:
                with safe_open(str(path), framework="pt") as f:
                    f.get_slice("frames")
            except Exception as e:
                raise ValueError(self._damaged(path, e)) from None

    def _damaged(self, path: Path, error: Exception) -> str:
        return (f"the prepared video {path} cannot be read ({error}): run `python -m emo_core prepare` into "
                f"{self.root} again; it keeps the good files and prepares this one again")


def main(argv=None):
    from .audio import Wav2Vec2Features
    from .cli import positive
    from .face import YuNetDetector

    p = argparse.ArgumentParser(prog="python -m emo_core prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", type=Path, help="folder of talking-head videos with sound (searched recursively)")
    p.add_argument("out", type=Path, help="output folder of the prepared training set")
    p.add_argument("--audio-encoder", required=True, help="wav2vec2 the model will be trained with: a transformers "
                                                          "folder or a weights file")
    p.add_argument("--face-detector", required=True, help="YuNet weights (yunet_final.pth)")
    p.add_argument("--confidence", type=float, default=0.6, help="face detection threshold (0.3 for drawn faces)")
    p.add_argument("--size", type=positive(), default=512, help="side of the face-centred square crop in pixels")
    p.add_argument("--fps", type=positive(float), default=25, help="training frame rate; videos are resampled to it")
    p.add_argument("--clip-frames", type=positive(), default=16,
                   help="frames per entry of the clip index (motion + clip)")
    p.add_argument("--max-speed", type=positive(float), default=8.0,
                   help="head speed (deg/frame) of the last speed bucket")
    p.add_argument("--buckets", type=positive(), default=9, help="number of speed buckets")
    p.add_argument("--workers", type=positive(), default=1,
                   help="videos prepared in parallel, each worker on one thread with its own copy of the audio "
                        "encoder and face detector (memory!); the files do not depend on the number of workers")
    args = p.parse_args(argv)
    from .config import SpeedConfig

    centres = SpeedConfig(buckets=args.buckets, max_speed=args.max_speed).centres()
    try:
        encoder = Wav2Vec2Features.from_files(args.audio_encoder)
        detector = YuNetDetector(args.face_detector, confidence=args.confidence)
        index = prepare(args.videos, args.out, encoder, detector, args.size, args.fps, args.clip_frames, centres,
                        args.workers)
        if not index["videos"]:  # an empty training set is not a success: a script should stop here
            reasons = Counter(skip["reason"].split(":")[0] for skip in index["skipped"])
            sys.exit(f"error: none of the {len(index['skipped'])} videos could be used ("
                     f"{'; '.join(f'{n} x {reason}' for reason, n in reasons.most_common())}): nothing to train on")
    except KeyboardInterrupt:
        sys.exit("[prepare] interrupted")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
