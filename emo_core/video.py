"""Streaming mp4 writer with PyAV (no ffmpeg subprocess): H.264 (yuv420p) + AAC, exact frame rate.

Frames are written clip by clip as they are generated, so a long video never sits in memory; the audio track is
trimmed or zero-padded to the video's duration when the file is closed.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

# the sample rates AAC can carry: other rates are resampled to the next one up (at most 96 kHz)
AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)


class VideoWriter:
    def __init__(self, path, fps: float, audio: torch.Tensor | None = None, sample_rate: int = 16000,
                 crf: int = 18, metadata: dict | None = None):
        """audio: (n,) mono or (channels, n) float in [-1, 1] at `sample_rate` (the first two channels are kept), or
        None for a silent video. crf: H.264 quality, 0 (lossless) .. 51 (worst); 18 is visually lossless."""
        import av

        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf (H.264 quality) must be between 0 and 51, got {crf}")
        if audio is not None:
            audio = np.atleast_2d(np.asarray(audio, dtype=np.float32))
            if audio.ndim != 2 or audio.shape[0] > 16 or audio.shape[1] == 0:
                raise ValueError(f"audio must be (samples,) or (channels, samples), got {audio.shape}")
            if not sample_rate > 0:
                raise ValueError(f"the audio's sample rate must be positive, got {sample_rate}")
            audio, sample_rate = audio[:2], int(round(sample_rate))
            if sample_rate not in AAC_RATES:
                from .audio import resample

                target = min([r for r in AAC_RATES if r >= sample_rate], default=AAC_RATES[-1])
                audio, sample_rate = np.stack([resample(c, sample_rate, target) for c in audio]), target
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.crf, self.frames = crf, 0
        self.audio = audio
        self.sample_rate = sample_rate
        # use_metadata_tags: mp4 keeps custom keys (e.g. ComfyUI's "prompt" and "workflow"), as ComfyUI writes them
        self.container = av.open(str(self.path), mode="w", options={"movflags": "use_metadata_tags"})
        for key, value in (metadata or {}).items():
            self.container.metadata[key] = str(value)
        self.video = self.audio_stream = None
        self.audio_written = 0  # samples of audio already encoded

    def write(self, frames: torch.Tensor) -> None:
        """frames: (N, H, W, 3) in [0, 1] (ComfyUI IMAGE layout) or (N, 3, H, W); a 4th (alpha) channel is
        dropped, as H.264 has none."""
        import av

        if frames.ndim != 4 or not ({3, 4} & {frames.shape[1], frames.shape[-1]}):
            raise ValueError(f"frames must be (N, H, W, 3) or (N, 3, H, W) (or RGBA), got {tuple(frames.shape)}")
        if frames.shape[-1] not in (3, 4):
            frames = frames.permute(0, 2, 3, 1)
        frames = frames[..., :3]
        if self.video is not None and frames.shape[1:3] != self.size:
            raise ValueError(f"every frame must have the size of the first ({self.size}), got {tuple(frames.shape[1:3])}")
        self.size = tuple(frames.shape[1:3])
        pixels = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        if self.video is None:
            height, width = pixels.shape[1:3]
            self.video = self.container.add_stream("libx264", rate=self.fps)
            self.video.width, self.video.height = width + width % 2, height + height % 2  # yuv420p: even sizes
            self.video.pix_fmt = "yuv420p"
            self.video.options = {"crf": str(self.crf), "preset": "medium"}
            if self.audio is not None:
                self.audio_stream = self.container.add_stream("aac", rate=self.sample_rate)
                self.audio_stream.layout = "mono" if self.audio.shape[0] == 1 else "stereo"
        for image in pixels:
            if image.shape[0] % 2 or image.shape[1] % 2:
                image = np.pad(image, ((0, image.shape[0] % 2), (0, image.shape[1] % 2), (0, 0)), mode="edge")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = self.frames
            self.container.mux(self.video.encode(frame))
            self.frames += 1
        if self.audio_stream is not None:
            self._write_audio(until=int(self.frames / self.fps * self.sample_rate) // 1024 * 1024)

    def close(self) -> Path:
        if self.video is None:
            self.container.close()
            raise ValueError("no frames were written")
        self.container.mux(self.video.encode(None))
        if self.audio_stream is not None:
            self._write_audio(until=round(self.frames / self.fps * self.sample_rate))  # trimmed or zero-padded
            self.container.mux(self.audio_stream.encode(None))
        self.container.close()
        return self.path

    def _write_audio(self, until: int):
        """Encode audio samples [audio_written, until), zero-padded past the end of the track (interleaved with
        the video as clips arrive)."""
        import av

        layout = self.audio_stream.layout.name
        while self.audio_written < until:
            start, stop = self.audio_written, min(self.audio_written + 1024, until)
            chunk = self.audio[:, start:stop]
            chunk = np.pad(chunk, ((0, 0), (0, stop - start - chunk.shape[1])))
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=layout)
            frame.sample_rate, frame.pts = self.sample_rate, start
            self.container.mux(self.audio_stream.encode(frame))
            self.audio_written = stop

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            self.close()
        elif self.video is None:
            self.container.close()
        else:  # stopped part-way (Ctrl-C, an error): the frames written so far still make a playable video
            try:
                self.close()
            except Exception:
                self.container.close()


def first_frame_times(path) -> tuple[float | None, float | None]:
    """When the first picture and the first sound of a file are shown, in seconds (None for a missing or
    undecodable stream). Files whose tracks start apart need their sound shifted to match the picture."""
    import av

    times = []
    for kind in ("video", "audio"):
        try:
            with av.open(str(path)) as container:
                streams = getattr(container.streams, kind)
                frame = next(iter(container.decode(streams[0])), None) if streams else None
                times.append(float(frame.time) if frame is not None and frame.time is not None else None)
        except av.FFmpegError:
            times.append(None)
    return times[0], times[1]


class VideoFrames:
    """A video file's frames, decoded anew on each pass over it and handed out `batch` at a time as uint8 RGB,
    (B, H, W, 3), or (B, 3, H, W) with `channels_first`: a long 1080p video is read several times rather than held
    whole (a minute of it is 9 GB of pixels). With `fps`, the frames are resampled to that rate by picking, for
    each output time, the frame shown at that moment (nearest earlier timestamp); at most `max_frames` of them."""

    def __init__(self, path, fps: float | None = None, max_frames: int | None = None, batch: int = 32,
                 channels_first: bool = False):
        import av

        self.path, self.max_frames, self.batch, self.channels_first = Path(path), max_frames, batch, channels_first
        if not self.path.is_file():
            raise FileNotFoundError(f"video file not found: {self.path}")
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise ValueError(f"{self.path.name} has no video stream")
                stream = container.streams.video[0]
                self.native_fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        except av.FFmpegError as e:
            raise ValueError(f"{self.path.name}: cannot decode video ({e})") from e
        self.fps = self.native_fps if fps is None else float(fps)
        self.resample = fps is not None

    def __iter__(self):
        chunk = []
        for frame in self._frames():
            chunk.append(frame)
            if len(chunk) == self.batch:
                yield self._tensor(chunk)
                chunk = []
        if chunk:
            yield self._tensor(chunk)

    def _tensor(self, frames: list) -> torch.Tensor:
        images = torch.from_numpy(np.stack(frames))
        return images.permute(0, 3, 1, 2) if self.channels_first else images

    def _frames(self):
        """(H, W, 3) uint8 arrays, one output frame at a time."""
        import av

        native, fps = self.native_fps, self.fps
        limit = float("inf") if self.max_frames is None else self.max_frames
        emitted, decoded, start, shown, end = 0, 0, None, None, 0.0
        pending = []  # output frames picked, not yet known to lie whole inside the video
        try:
            with av.open(str(self.path)) as container:
                for frame in container.decode(container.streams.video[0]):
                    if emitted >= limit:
                        return
                    time = float(frame.time) if frame.time is not None else decoded / native
                    decoded += 1
                    if not self.resample:
                        yield frame.to_ndarray(format="rgb24")
                        emitted += 1
                        if emitted >= limit:  # (not decoding one frame more: it might be damaged)
                            return
                        continue
                    # output frame k (time k / fps) is the latest frame shown at that moment: the frame before
                    # this one, for the output times before this one's
                    start = time if start is None else start
                    while shown is not None and (emitted + len(pending)) / fps + 1e-6 < time - start:
                        pending.append(shown)
                    shown, end = frame.to_ndarray(format="rgb24"), time - start + 1 / native
                    # the video lasts at least until this frame's end (one native frame time): what ends before is
                    # a whole output frame
                    while pending and (emitted + 1) / fps <= end + 1e-6 and emitted < limit:
                        yield pending.pop(0)
                        emitted += 1
                    if emitted >= limit:
                        return
        except av.FFmpegError as e:
            raise ValueError(f"{self.path.name}: cannot decode video ({e})") from e
        # as many whole output frames as the video lasts (its last frame is shown for one native frame time)
        while shown is not None and (emitted + 1) / fps <= end + 1e-6 and emitted < limit:
            yield pending.pop(0) if pending else shown
            emitted += 1


def read_video(path, fps: float | None = None, max_frames: int | None = None) -> tuple[torch.Tensor, float]:
    """Decode the first video stream -> (frames (S, H, W, 3) uint8 RGB, fps): the whole of VideoFrames at once."""
    video = VideoFrames(path, fps, max_frames)
    frames = list(video)
    if not frames:
        raise ValueError(f"{Path(path).name} contains no video frames")
    return torch.cat(frames), video.fps
