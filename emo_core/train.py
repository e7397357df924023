"""Training EMO in the paper's three stages, on Hugging Face accelerate.

    python -m emo_core train CONFIG.json [--resume] [--max-minutes N]
    accelerate launch -m emo_core train CONFIG.json         # several GPUs / nodes: accelerate's own launcher

* Stage 1 (images): one frame of a video is denoised with a random other frame as the reference. ReferenceNet,
  the Backbone's spatial layers and the face locator train; temporal modules and audio layers are not run.
* Stage 2 (video): clips of n motion frames + f frames. Temporal modules and audio layers are added and trained
  (with the audio projection); a fraction of the clips are first clips: a video's start, its first frame as the
  reference and no motion frames, as generation starts.
* Stage 3 (speed): the speed layers are added; only the temporal modules and the speed layers train, the audio
  layers stay frozen.

Each stage starts from the previous stage's checkpoint (stage 1 from SD1.5 weights, or from scratch for small
models). The stage's JSON config (see `TrainConfig`, and configs/train/) names the prepared data, the VAE, the
initial weights and the optimisation settings. The run folder gets accelerate checkpoints (`--resume` continues
from the newest), `model.safetensors` (our checkpoint format, the next stage's `init`), `log.csv` and `loss.svg`.

Also here: `train-vae` (a small VAE for small models), `new-audio-encoder` (a small random wav2vec2 for small
models) and `bundle` (one checkpoint file carrying its VAE and audio encoder).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (DTYPES, CheckpointError, build_model, give_ordinary_mode, load_checkpoint, read_metadata,
                         save_checkpoint, save_safetensors, weights_fingerprint)
from .config import EMOConfig, preset
from .data import PreparedDataset
from .face import face_locator_masks
from .models.unet import UNetConditions
from .sampler import clip_windows, frame_noise, make_scheduler, with_margin

# What trains in each stage: parameter-name parts included, then parts excluded (the paper, section 3.3).
STAGE_TRAINABLE = {
    1: (["reference_net", "backbone", "face_locator"], ["motion_modules", "audio_modules"]),
    2: (["motion_modules", "audio_modules", "audio_proj"], ["speed_attention"]),
    3: (["motion_modules", "speed_encoder"], []),
}


@dataclass
class TrainConfig:
    stage: int
    data: str  # prepared dataset folder (python -m emo_core prepare)
    output: str  # run folder
    vae: str  # diffusers VAE folder the latents come from
    model: str | dict = "emo"  # stage 1: a preset name or a full EMO config; later stages: the init checkpoint's
    init: str = "scratch"  # "scratch", "sd15:PATH" (stage 1) or "checkpoint:PATH" (the previous stage's model)
    # Paths are relative to the folder the command runs in (the repository root for configs/train/).
    motion_init: str | None = None  # stage 2: AnimateDiff motion-module weights for the temporal modules
    audio_encoder: str | None = None  # the wav2vec2 the data was prepared with (checked, and recorded)
    steps: int = 30000
    batch_size: int = 4
    gradient_accumulation: int = 1
    learning_rate: float = 1e-5  # the paper's
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no", "fp16", "bf16"
    gradient_checkpointing: bool = False
    uncond_prob: float = 0.1  # drop what the config's unconditional CFG row drops (audio, reference)
    first_clip_prob: float = 0.1  # stage 2/3: first-clip samples (a video's start, no motion frames)
    cache_latents: bool = False  # keep each frame's VAE latent in memory once encoded (small datasets: LatentCache)
    face_expand: float = 1.2
    noise_correlation: float | None = None  # set the model's noise_correlation (default: keep the init's)
    trainable: list | None = None  # override: parameter-name parts to train (default: STAGE_TRAINABLE)
    frozen: list | None = None  # parameter-name parts that never train, whatever trainable or the stage selects
    latent_scale: float | str | None = None  # stage 1: a number, "vae" (the VAE's scaling_factor) or the model's
    seed: int = 0
    save_every: int = 1000
    log_every: int = 10

    @classmethod
    def load(cls, path) -> "TrainConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the training config {path}: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a training config is a JSON object of settings ({{\"stage\": 1, ...}}), "
                             f"got a {type(data).__name__} (see configs/train/ for complete examples)")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)} - {"comment"}
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        data.pop("comment", None)
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ValueError(f"{path}: missing settings {missing} (see configs/train/ for complete examples)")
        for f in dataclasses.fields(cls):
            if f.name in data and not _has_type(data[f.name], f.type):
                raise ValueError(f"{path}: {f.name} must be {_type_words(f.type)}, got {data[f.name]!r} "
                                 f"(see configs/train/ for complete examples)")
        cfg = cls(**data)
        if cfg.stage not in (1, 2, 3):
            raise ValueError(f"{path}: stage must be 1, 2 or 3, got {cfg.stage}")
        if cfg.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"{path}: mixed_precision must be no, fp16 or bf16")
        # the types are checked above: what is left are the ranges
        for name in ("uncond_prob", "first_clip_prob"):
            if not 0 <= getattr(cfg, name) <= 1:
                raise ValueError(f"{path}: {name} is a probability, between 0 and 1; got {getattr(cfg, name)!r}")
        for name, least in (("steps", 1), ("batch_size", 1), ("gradient_accumulation", 1), ("save_every", 1),
                            ("log_every", 1), ("warmup_steps", 0)):
            if getattr(cfg, name) < least:
                raise ValueError(f"{path}: {name} must be a whole number of at least {least}, "
                                 f"got {getattr(cfg, name)!r}")
        if not cfg.learning_rate > 0:
            raise ValueError(f"{path}: learning_rate must be a number above 0, got {cfg.learning_rate!r}")
        if isinstance(cfg.latent_scale, str) and cfg.latent_scale != "vae":
            raise ValueError(f"{path}: latent_scale is a number or \"vae\" (the VAE's scaling_factor), "
                             f"got {cfg.latent_scale!r}")
        for name in ("trainable", "frozen"):
            parts = getattr(cfg, name)
            if parts is not None and not all(isinstance(n, str) and n for n in parts):
                raise ValueError(f"{path}: {name} is a list of parameter-name parts such as \"motion_modules\", "
                                 f"got {parts!r}")
        return cfg


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_JSON_TYPES = {"int": "a whole number", "float": "a number", "str": "a string", "dict": "an object",
               "list": "a list", "bool": "true or false", "None": "null"}


def _has_type(value, annotation: str) -> bool:
    """Whether a JSON value fits a TrainConfig annotation such as "int", "float | None" or "str | dict"."""
    for name in annotation.split(" | "):
        if name == "None" and value is None or name == "bool" and isinstance(value, bool):
            return True
        if name == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if name == "float" and _is_number(value):
            return True
        if name in ("str", "dict", "list") and isinstance(value, {"str": str, "dict": dict, "list": list}[name]):
            return True
    return False


def _type_words(annotation: str) -> str:
    return " or ".join(_JSON_TYPES[name] for name in annotation.split(" | "))


# ---- choosing what trains ---------------------------------------------------------------------------------------

def trainable_names(model: nn.Module, stage: int, override: list | None = None, frozen: list | None = None) -> list:
    include, exclude = (override, []) if override else STAGE_TRAINABLE[stage]
    exclude = list(exclude) + list(frozen or [])
    split = [(name, name.split(".")) for name, _ in model.named_parameters()]
    unknown = [p for p in list(override or []) + list(frozen or []) if not any(p in parts for _, parts in split)]
    if unknown:  # a misspelt part would silently train, or freeze, something else than meant
        tops = sorted({parts[0] for _, parts in split})
        raise ValueError(f"trainable / frozen: {unknown} name no parameter of this model; use parts of its "
                         f"parameter names, such as {', '.join(tops)}, motion_modules, audio_modules, "
                         f"speed_attention")
    return [name for name, parts in split
            if any(p in parts for p in include) and not any(p in parts for p in exclude)]


def freeze_for_stage(model: nn.Module, stage: int, override: list | None = None, frozen: list | None = None) -> list:
    """requires_grad only on what the stage trains; returns those parameters."""
    names = set(trainable_names(model, stage, override, frozen))
    if not names:
        raise ValueError(f"nothing to train in stage {stage} (trainable {override or STAGE_TRAINABLE[stage][0]}"
                         f"{f', frozen {frozen}' if frozen else ''})")
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    return [p for n, p in model.named_parameters() if n in names]


# ---- samples ----------------------------------------------------------------------------------------------------

class ClipSamples(torch.utils.data.Dataset):
    """Index i -> one training sample, drawn with a generator seeded by (seed, i) (so a resumed run continues the
    same sequence). Stage 1: a target frame + a reference frame. Stages 2-3: n motion frames + f clip frames, a
    reference frame, the audio windows of the clip frames and the head speed with its window margin. A first-clip
    sample (probability first_clip_prob) is the start of a video with its first frame as the reference, the way
    generation starts from the portrait."""

    def __init__(self, data: PreparedDataset, stage: int, cfg: EMOConfig, face_expand: float, first_clip_prob: float,
                 uncond_prob: float, seed: int, length: int):
        self.data, self.stage, self.cfg = data, stage, cfg
        self.face_expand, self.first_clip_prob, self.uncond_prob = face_expand, first_clip_prob, uncond_prob
        self.seed, self.length = seed, length
        need = 1 if stage == 1 else cfg.frames_per_clip + cfg.motion_frames
        self.usable = [i for i, v in enumerate(data.videos) if v["frames"] >= need + 1]
        if not self.usable:
            raise ValueError(f"no video in {data.root} has the {need + 1} frames a stage-{stage} sample needs")
        if stage > 1 and float(data.index["fps"]) != float(cfg.fps):
            raise ValueError(f"{data.root} was prepared at {data.index['fps']} fps, the model runs at {cfg.fps}: its "
                             f"audio features and head speeds are per frame, so prepare the videos with --fps "
                             f"{cfg.fps}")
        if data.index["audio_layers"] != cfg.audio.layers or data.index["audio_channels"] != cfg.audio.channels:
            raise ValueError(f"the dataset's audio features are {data.index['audio_layers']} layers x "
                             f"{data.index['audio_channels']} channels, the model expects {cfg.audio.layers} x "
                             f"{cfg.audio.channels}: prepare the data with the model's wav2vec2")

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if not 0 <= i < self.length:  # the end of the samples: `for` and list() over them stop
            raise IndexError(f"sample {i} of {self.length}")
        rng = np.random.default_rng([self.seed, i])
        v = self.usable[int(rng.integers(len(self.usable)))]
        video = self.data.video(v)
        total = video["frames"].shape[0]
        size = video["frames"].shape[1]
        reference = int(rng.integers(total))
        drop = bool(rng.random() < self.uncond_prob)
        first = self.stage > 1 and bool(rng.random() < self.first_clip_prob)
        if self.stage == 1:
            frames = [int(rng.integers(total))]
            motion = 0
        else:
            motion, clip = self.cfg.motion_frames, self.cfg.frames_per_clip
            if first:
                # the first clip of a generated video: it starts at the reference image, with no motion frames
                # (their places hold copies of frame 0; the model masks them out). So the clip is the video's start
                # and the reference its first frame.
                reference = 0
                frames = [0] * motion + list(range(clip))
            else:
                start = int(rng.integers(total - motion - clip + 1))
                frames = list(range(start, start + motion + clip))
        clip_frames = frames[motion:]
        boxes = [tuple(video["boxes"][f].tolist()) for f in clip_frames]
        item = {
            "video": torch.tensor(v), "frame_ids": torch.tensor(frames), "reference_id": torch.tensor(reference),
            "reference": _pixels(video["frames"][reference]),
            "frames": _pixels(video["frames"][frames]),  # (M+F or 1, 3, H, W) in [-1, 1]
            # the paper's face-locator mask: the union of the clip's expanded face boxes, (1, H, W)
            "mask": face_locator_masks(boxes, size, size, len(boxes), self.face_expand)[0],
            "drop": torch.tensor(drop),
            "first": torch.tensor(first),
        }
        if self.stage > 1:
            m = self.cfg.audio.window
            audio = video["audio"].float()
            start = clip_frames[0]
            item["audio"] = clip_windows(audio, start, len(clip_frames), m)  # (F, 2m+1, layers, C)
            if self.cfg.speed is not None:
                item["speed"] = with_margin(video["speed"].float(), start, len(clip_frames), self.cfg.speed.window)
        return item


def _pixels(frames_uint8: torch.Tensor) -> torch.Tensor:
    # (..., H, W, 3) uint8 -> (..., 3, H, W) in [-1, 1]
    return frames_uint8.float().div(127.5).sub(1).movedim(-1, -3)


class LatentCache:
    """The VAE latent of every frame of a prepared video (the posterior mean, scaled), encoded on the video's first
    use and kept in memory. The VAE is frozen and the mean is deterministic, so these are the latents that encoding
    each batch gives, without encoding the same frames again each time they are drawn (on the demo's 64-px clips
    the encoder took half of every step). Memory: 4 x (H/8) x (W/8) floats per frame, 2.5 MB for the demo's 9600
    frames, but 64 GB for a million 512-px frames: for small datasets only.

    With `path` (a file named after the VAE's weights and scale: `file_for`), the latents are also kept on disk,
    so that the stages of a run encode the frames once: `save` writes the file, and a stored video's latents are
    used only while a hash of its frames still matches (a video prepared again is encoded again). With several
    processes each holds its own cache (memory per process) and the main one saves what it encoded: videos only
    the others drew are encoded again by the next stage."""

    def __init__(self, vae, data: PreparedDataset, scale: float, path: Path | None = None):
        self.vae, self.data, self.scale, self.path = vae, data, scale, path
        self.latents = {}  # video index -> (frames, 4, h, w) on the CPU
        self.stored, self.hashes = {}, {}  # from the file: video file name -> latents / frames hash
        self.added = False
        if path is not None and path.is_file():
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    self.hashes = dict(f.metadata() or {})
                    self.stored = {k: f.get_tensor(k) for k in f.keys()}
            except Exception:  # a damaged file: encode again, and `save` replaces it
                self.stored, self.hashes = {}, {}

    @staticmethod
    def file_for(data: PreparedDataset, vae, scale: float) -> Path:
        """<prepared set>/latents/<hash of the VAE's weights and the scale>.safetensors"""
        return data.root / "latents" / f"vae-{weights_fingerprint(vae, repr(float(scale)).encode())}.safetensors"

    def __call__(self, videos: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """videos (B,), frame indices (B, K) -> latents (B, K, 4, h, w) on the VAE's device."""
        out = []
        for v, idx in zip(videos.tolist(), ids.cpu()):
            if v not in self.latents:
                self.latents[v] = self._load(v)
            out.append(self.latents[v][idx])
        return torch.stack(out).to(next(self.vae.parameters()).device)

    def _load(self, v: int) -> torch.Tensor:
        frames = self.data.video(v)["frames"]  # (N, H, W, 3) uint8
        name = self.data.videos[v]["file"]
        digest = hashlib.sha256(frames.contiguous().numpy().tobytes()).hexdigest()
        if self.hashes.get(name) == digest and name in self.stored:
            return self.stored[name]
        latents = encode_latents(self.vae, _pixels(frames), self.scale).cpu()
        self.stored[name], self.hashes[name], self.added = latents, digest, True
        return latents

    def save(self):
        """Write the file (when latents were encoded since it was read); a folder that cannot be written only
        loses the speed-up."""
        if self.path is None or not self.added:
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            part = self.path.with_suffix(".part")
            save_safetensors({k: t.contiguous() for k, t in self.stored.items()}, part, metadata=self.hashes)
            part.replace(self.path)
        except OSError as e:
            return f"latents not kept on disk ({e})"
        self.added = False
        return None


# ---- the loss ---------------------------------------------------------------------------------------------------

class TrainingStep(nn.Module):
    """The model plus the training objective: everything that needs gradients runs inside `forward`, so that
    accelerate's DistributedDataParallel wrapper sees one forward per step."""

    def __init__(self, model, stage: int):
        super().__init__()
        self.model, self.stage = model, stage
        cfg = model.cfg
        self.scheduler = make_scheduler("ddpm", cfg.scheduler)
        self.train_reference = any(p.requires_grad for p in model.reference_net.parameters())

    def forward(self, latents, reference, batch, timesteps, noise):
        """latents: (B, 4, M+F, h, w) scaled latents of motion + clip frames (stage 1: M=0, F=1); reference:
        (B, 4, h, w). Returns the mean squared error of the prediction (v or noise, as the scheduler is set up)."""
        model, cfg = self.model, self.model.cfg
        b, _, total = latents.shape[:3]
        motion = 0 if self.stage == 1 else cfg.motion_frames
        clip = latents[:, :, motion:]  # (B, 4, F, h, w)
        frames = clip.shape[2]
        images = torch.cat([reference[:, None], latents[:, :, :motion].transpose(1, 2)], dim=1)  # (B, 1+M, 4, h, w)
        with torch.set_grad_enabled(self.train_reference and torch.is_grad_enabled()):
            bank = model.reference_features(images.flatten(0, 1), None)
        keep_motion = (~batch["first"]).to(latents.dtype).view(b, 1, 1, 1)
        bank = [torch.cat([f[:, :1], f[:, 1:] * keep_motion], dim=1) if motion else f
                for f in (x.unflatten(0, (b, 1 + motion)) for x in bank)]
        drop = batch["drop"]
        use_reference = ~drop if "reference" in cfg.cfg_uncond else torch.ones_like(drop)
        audio = speed = None
        if self.stage > 1:
            audio = model.audio_proj(batch["audio"].to(latents.dtype))  # (B, F, K, D)
            if "audio" in cfg.cfg_uncond:
                audio = audio * (~drop).to(audio.dtype).view(b, 1, 1, 1)
            audio = audio.flatten(0, 1)
        if self.stage == 3:
            m = cfg.speed.window
            speed = model.speed_encoder(batch["speed"], latents.dtype)[:, m:m + frames]
        face = model.face_locator(batch["mask"].to(latents.dtype))  # (B, C, h, w)
        if "face_locator" in cfg.cfg_uncond:
            face = face * (~drop).to(face.dtype).view(b, 1, 1, 1)
        face = face[:, :, None].expand(-1, -1, frames, -1, -1)
        cond = UNetConditions(bank=bank, use_reference=use_reference, audio=audio, speed=speed,
                              temporal=self.stage > 1)
        noisy = self.scheduler.add_noise(clip, noise, timesteps)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(clip, noise, timesteps)
        else:
            target = noise
        pred = model.denoise(noisy, timesteps, cond, face)
        return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, scale: float) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> scaled latents (N, 4, H/8, W/8): the mean of the VAE posterior, as at inference."""
    param = next(vae.parameters())
    return torch.cat([vae.encode(chunk.to(param)).latent_dist.mean * scale for chunk in pixels.split(64)])


# ---- the run ----------------------------------------------------------------------------------------------------

class LossLog:
    """The loss averaged over each log interval: a line of log.csv (step, loss, lr, seconds, samples/s) and the
    progress bar's postfix. `samples`: training samples behind each `add`."""

    HEADER = "step,loss,lr,seconds,samples_per_s\n"

    def __init__(self, path: Path, samples: int, bar, write: bool = True):
        self.path, self.samples, self.bar, self.write_file = path, samples, bar, write
        self.losses, self.started = [], time.perf_counter()
        self.last = self.started

    def add(self, loss: torch.Tensor):
        self.losses.append(float(loss.detach()))

    def flush(self, step: int, lr: float):
        if not self.losses:
            return
        mean, now = sum(self.losses) / len(self.losses), time.perf_counter()
        rate = self.samples * len(self.losses) / max(now - self.last, 1e-9)
        self.bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.1e}")
        if self.write_file:
            with open(self.path, "a") as f:
                f.write(f"{step},{mean:.6f},{lr:.3e},{now - self.started:.1f},{rate:.2f}\n")
        self.losses, self.last = [], now


def build_for_stage(cfg: TrainConfig, vae_scale: float | None):
    """The model at the start of the stage, and where it came from."""
    model, origin = _initial_model(cfg, vae_scale)
    if cfg.noise_correlation is not None:  # recorded in the model's config: sampling uses what training used
        model.cfg.noise_correlation = float(cfg.noise_correlation)
        model.cfg.validate()
    return model, origin


def _initial_model(cfg: TrainConfig, vae_scale: float | None):
    init = cfg.init
    if init.startswith("checkpoint:"):
        path = Path(init.split(":", 1)[1])
        model_cfg, state_dict, looks_like = load_checkpoint(path)
        from_stage = _checkpoint_stage(path)
        if from_stage is not None and from_stage not in (cfg.stage - 1, cfg.stage):
            raise CheckpointError(f"stage {cfg.stage} starts from the stage-{cfg.stage - 1} model (or continues a "
                                  f"stage-{cfg.stage} one), but {path} is a stage-{from_stage} checkpoint")
        model = build_model(model_cfg, state_dict, path.name, looks_like)
        origin = f"{path} (stage {from_stage})"
        if cfg.motion_init and cfg.stage == 2 and from_stage == 1:
            from .pretrained import init_motion_modules

            origin += f", temporal modules from {cfg.motion_init} ({init_motion_modules(model, cfg.motion_init)})"
        return model, origin
    if cfg.stage != 1:
        raise ValueError(f"stage {cfg.stage} must start from the previous stage: set init to "
                         f"\"checkpoint:RUN/model.safetensors\"")
    model_cfg = preset(cfg.model) if isinstance(cfg.model, str) else EMOConfig.from_dict(cfg.model)
    if cfg.latent_scale == "vae":
        if vae_scale is None:
            raise ValueError("latent_scale \"vae\": the VAE's config has no scaling_factor")
        model_cfg.latent_scale = float(vae_scale)
    elif cfg.latent_scale is not None:
        model_cfg.latent_scale = float(cfg.latent_scale)
    model = build_model(model_cfg)
    if init.startswith("sd15:"):
        from .pretrained import init_from_sd15

        report = init_from_sd15(model, init.split(":", 1)[1])
        return model, f"SD1.5 {init[5:]} ({report})"
    if init != "scratch":
        raise ValueError(f"init must be \"scratch\", \"sd15:PATH\" or \"checkpoint:PATH\", got {init!r}")
    return model, "scratch"


def _check_audio_encoder(path, data: PreparedDataset):
    """The wav2vec2 named in the config must be the one the dataset's features were computed with (the same shape
    and, for sets that record it, the same weights)."""
    from .audio import Wav2Vec2Features

    model = Wav2Vec2Features.from_files(path).model
    have = (model.config.num_hidden_layers, model.config.hidden_size)
    want = (data.index["audio_layers"], data.index["audio_channels"])
    if have != want:
        raise ValueError(f"the audio encoder {path} has {have[0]} layers of width {have[1]}, but {data.root} was "
                         f"prepared with {want[0]} x {want[1]}: prepare the data with this encoder")
    weights = weights_fingerprint(model)
    if data.index.get("audio_encoder", weights) != weights:
        raise ValueError(f"{data.root} was prepared with another wav2vec2 of the same shape as {path} (weights "
                         f"{data.index['audio_encoder']}, this one {weights}): name the encoder the data was "
                         f"prepared with, or prepare the data with this one")


def _checkpoint_stage(path) -> int | None:
    stage = read_metadata(path).get("stage")
    return int(stage) if stage else None


def train(cfg: TrainConfig, resume: bool = False, max_minutes: float | None = None, log=print) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from .vae import load_vae_folder

    out = Path(cfg.output)
    run_file = out / "run.json"
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if not accelerator.is_main_process:  # one report of the run, not one per process
        def log(message):
            pass
    set_seed(cfg.seed)
    vae = load_vae_folder(cfg.vae).eval().requires_grad_(False)
    vae.to(accelerator.device)
    model, origin = build_for_stage(cfg, getattr(vae.config, "scaling_factor", None))
    run = {"stage": cfg.stage, "model_config": model.cfg.to_dict(), "train_config": dataclasses.asdict(cfg)}
    checkpoints = out / "checkpoints"
    if run_file.is_file():
        before = json.loads(run_file.read_text())
        if not resume:
            raise ValueError(f"{out} already holds a training run: pass --resume to continue it, or choose another "
                             f"output folder (nothing was changed)")
        saved, wanted = before["model_config"], json.loads(json.dumps(run["model_config"]))
        differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        if before["stage"] != cfg.stage or differ:
            raise ValueError(f"cannot resume: {out} holds a stage-{before['stage']} run of model {saved['name']!r}; "
                             f"this config is stage {cfg.stage} of {model.cfg.name!r}"
                             f"{' with other model settings: ' + ', '.join(differ) if differ else ''}. Use the "
                             f"run's own config, or a new output folder (nothing was changed)")
        for name in ("trainable", "frozen"):
            trained = before.get("train_config", {}).get(name)
            if trained != getattr(cfg, name):
                raise ValueError(f"cannot resume: {out} was trained with {name} {trained!r}, this config says "
                                 f"{getattr(cfg, name)!r}; the saved optimizer state is for those parameters. Use the "
                                 f"run's own setting, or a new output folder (nothing was changed)")
    elif resume:
        raise ValueError(f"--resume: {out} holds no training run to continue")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {out} is {'a file' if not out.is_dir() else 'a folder with files in it'} but not a "
                         f"training run (no run.json): choose a new or empty output folder, so that nothing there is "
                         f"overwritten (nothing was changed)")
    data = PreparedDataset(cfg.data)
    data.check()
    if cfg.audio_encoder:
        _check_audio_encoder(cfg.audio_encoder, data)
        run["audio_encoder"] = cfg.audio_encoder
    if cfg.gradient_checkpointing:
        model.reference_net.set_gradient_checkpointing(True)
        model.backbone.set_gradient_checkpointing(True)
    params = freeze_for_stage(model, cfg.stage, cfg.trainable, cfg.frozen)
    count = sum(p.numel() for p in params)
    step_fn = TrainingStep(model, cfg.stage).train()
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    # accelerate steps a prepared scheduler once per process for each optimizer step: warmup_steps stays in steps
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer,
                                 num_warmup_steps=cfg.warmup_steps * accelerator.num_processes)
    per_step = cfg.batch_size * cfg.gradient_accumulation * accelerator.num_processes
    samples = ClipSamples(data, cfg.stage, model.cfg, cfg.face_expand, cfg.first_clip_prob, cfg.uncond_prob,
                          cfg.seed, length=cfg.steps * per_step)
    step_fn, optimizer, lr_scheduler = accelerator.prepare(step_fn, optimizer, lr_scheduler)

    step = 0
    latest = _latest_checkpoint(checkpoints) if resume else None
    if latest is not None:
        accelerator.load_state(str(latest))
        step = json.loads((latest / "step.json").read_text())["step"]
        log(f"[train] resumed {out} at step {step}")
    elif resume:
        log(f"[train] --resume: {out} was stopped before its first save; starting it from step 0")
    accelerator.wait_for_everyone()  # every process has checked the folder before the first one writes to it
    if latest is None and accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(run, indent=1))
        (out / "log.csv").write_text(LossLog.HEADER)
    loader = torch.utils.data.DataLoader(samples, batch_size=cfg.batch_size,
                                         sampler=range(step * per_step, len(samples)), num_workers=0)
    loader = accelerator.prepare_data_loader(loader)
    scale = model.cfg.latent_scale
    cache = None
    if cfg.cache_latents:
        cache = LatentCache(vae, data, scale, LatentCache.file_for(data, vae, scale))
    log(f"[train] stage {cfg.stage}: {model.cfg.name} from {origin}; training {count / 1e6:.2f} M of "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters on {accelerator.device} "
        f"({accelerator.num_processes} process(es)); {cfg.steps} steps of {per_step} samples")

    # noise and timesteps: each process its own (one process: the seed alone, as before)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed + step + 10**8 * accelerator.process_index)
    train_steps = model.cfg.scheduler["num_train_timesteps"]
    started = time.perf_counter()
    deadline = started + max_minutes * 60 if max_minutes else None
    bar = tqdm(total=cfg.steps, initial=step, disable=not accelerator.is_local_main_process, desc=f"stage {cfg.stage}",
               dynamic_ncols=True, mininterval=1.0)
    losses = LossLog(out / "log.csv", cfg.batch_size * accelerator.num_processes, bar, accelerator.is_main_process)
    stopped = None
    # With several processes Ctrl-C only sets a flag, and all stop together after the step (a KeyboardInterrupt
    # would catch each process in another place, some inside a collective, and none could save)
    several, interrupted = accelerator.num_processes > 1, threading.Event()
    catch_sigint = several and threading.current_thread() is threading.main_thread()  # (only there can it)
    if catch_sigint:
        previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
        for batch in loader:
            if step >= cfg.steps:
                break
            with accelerator.accumulate(step_fn):
                b = batch["frames"].shape[0]
                if cache is not None:
                    lat = cache(batch["video"], batch["frame_ids"])  # (B, M+F, 4, h, w)
                    ref = cache(batch["video"], batch["reference_id"][:, None])[:, 0]
                else:
                    lat = encode_latents(vae, batch["frames"].flatten(0, 1), scale).unflatten(0, (b, -1))
                    ref = encode_latents(vae, batch["reference"], scale)
                # (B, 4, M+F, h, w); contiguous: torch 2.9.1 on CPU crashed in the stage-3 backward without it
                lat = lat.transpose(1, 2).contiguous()
                noise = frame_noise(lat[:, :, (0 if cfg.stage == 1 else model.cfg.motion_frames):].shape,
                                    model.cfg.noise_correlation, generator).to(lat)
                t = torch.randint(0, train_steps, (b,), generator=generator)
                loss = step_fn(lat, ref, batch, t.to(lat.device), noise)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.add(accelerator.reduce(loss.detach(), "mean"))  # the mean over the processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                losses.flush(step, lr_scheduler.get_last_lr()[0])
            if step % cfg.save_every == 0:
                _save(accelerator, step_fn, checkpoints, step, out, cfg.stage)
            # a stop (the time limit; Ctrl-C with several processes) happens at the same step in every process
            if deadline and time.perf_counter() > deadline and step < cfg.steps:
                stopped = f"time limit of {max_minutes} minutes reached"
                accelerator.set_trigger()
            if interrupted.is_set():
                stopped = "interrupted"
                accelerator.set_trigger()
            if (deadline or several) and accelerator.check_trigger():
                stopped = stopped or "stopped by another process"
                break
    except KeyboardInterrupt:
        stopped = "interrupted"
    except Exception:
        bar.close()
        if accelerator.num_processes == 1 and step > 0:  # (with more, the others would wait for it forever)
            try:
                _save(accelerator, step_fn, checkpoints, step, out, cfg.stage)
                log(f"[train] stopped by an error at step {step}; the {step} steps done are saved, --resume "
                    f"continues once the cause is mended")
            except Exception as e:  # (a full disk, say): the first error is the one to report
                log(f"[train] stopped by an error at step {step}, and saving failed too: {e}")
        raise
    finally:
        bar.close()
        if catch_sigint:
            signal.signal(signal.SIGINT, previous_handler)
    _save(accelerator, step_fn, checkpoints, step, out, cfg.stage)
    if cache is not None and accelerator.is_main_process:
        problem = cache.save()
        if problem:
            log(f"[train] {problem}")
    note = f" ({stopped}; --resume continues)" if stopped else ""
    log(f"[train] stage {cfg.stage}: {step}/{cfg.steps} steps in {time.perf_counter() - started:.0f}s{note}; model: "
        f"{out / 'model.safetensors'}, loss log: {out / 'log.csv'}, plot: {out / 'loss.svg'}")
    if stopped == "interrupted":
        raise KeyboardInterrupt  # saved; still not a finished stage (a script must not go on to the next one)
    return out / "model.safetensors"


def _latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if folder.is_dir() else []
    found = [p for p in found if (p / "step.json").is_file()]
    return found[-1] if found else None


def _save(accelerator, step_fn, checkpoints: Path, step: int, out: Path, stage: int):
    accelerator.wait_for_everyone()
    folder = checkpoints / f"step_{step:07d}"
    done = (folder / "step.json").is_file()  # saved at this step already (the run ends where it last saved)
    accelerator.wait_for_everyone()  # every process has looked before the main one writes step.json
    if done:  # never write over a complete checkpoint, which a second Ctrl-C would break
        return
    accelerator.save_state(str(folder))
    give_ordinary_mode(*folder.glob("*.safetensors"))  # accelerate writes them with safetensors too
    if accelerator.is_main_process:
        (folder / "step.json").write_text(json.dumps({"step": step}))
        model = accelerator.unwrap_model(step_fn).model
        save_checkpoint(model, out / "model.safetensors", metadata={"stage": str(stage), "step": str(step)})
        write_loss_plot(out / "log.csv", out / "loss.svg", f"stage {stage}")
        for old in sorted(checkpoints.glob("step_*"), key=lambda p: p.name)[:-2]:  # keep the newest two
            import shutil

            shutil.rmtree(old, ignore_errors=True)


def write_loss_plot(csv: Path, svg: Path, title: str, width: int = 640, height: int = 320):
    """A small SVG line chart of the loss (raw per log interval, and a moving average) against the step."""
    rows = [line.split(",") for line in csv.read_text().strip().splitlines()[1:]]
    if not rows:
        return
    steps = np.array([float(r[0]) for r in rows])
    loss = np.array([float(r[1]) for r in rows])
    k = max(1, len(loss) // 20)
    smooth = np.convolve(np.pad(loss, (k // 2, k - 1 - k // 2), mode="edge"), np.ones(k) / k, mode="valid")
    lo, hi = float(min(loss.min(), smooth.min())), float(max(loss.max(), smooth.max()))
    hi = hi if hi > lo else lo + 1e-6
    x0, y0, w, h = 60, 20, width - 80, height - 60
    span = max(steps.max() - steps.min(), 1)

    def points(values):
        return " ".join(f"{x0 + (s - steps.min()) / span * w:.1f},{y0 + h - (v - lo) / (hi - lo) * h:.1f}"
                        for s, v in zip(steps, values))

    ticks = "".join(f'<text x="{x0 - 6}" y="{y0 + h - f * h + 4:.0f}" text-anchor="end">{lo + f * (hi - lo):.4g}'
                    f'</text>' for f in (0, 0.5, 1))
    svg.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="11"><rect width="100%" height="100%" fill="white"/>'
        f'<text x="{x0}" y="14">{title}: training loss (grey: per interval, blue: moving average)</text>'
        f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>{ticks}'
        f'<text x="{x0}" y="{y0 + h + 16}">{int(steps.min())}</text>'
        f'<text x="{x0 + w}" y="{y0 + h + 16}" text-anchor="end">step {int(steps.max())}</text>'
        f'<polyline fill="none" stroke="#bbb" points="{points(loss)}"/>'
        f'<polyline fill="none" stroke="#1f5fbf" stroke-width="2" points="{points(smooth)}"/></svg>')


# ---- small companions for small models: a VAE and a wav2vec2 -------------------------------------------------

def small_vae(size: int, blocks: tuple = (32, 64, 64, 64)):
    """An AutoencoderKL of the SD layout (4 levels, 8x downsampling, 4 latent channels) with narrow blocks. Norms
    have 32 groups, as ComfyUI's VAE code assumes, so core VAE nodes can load it."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                         up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=tuple(blocks),
                         layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=size)


def train_vae(data: PreparedDataset, out, steps: int = 3000, batch_size: int = 32, learning_rate: float = 1e-3,
              kl_weight: float = 1e-6, seed: int = 0, max_minutes: float | None = None, overwrite: bool = False,
              log=print) -> Path:
    """Reconstruction (L2 + L1) of the posterior mean with a small KL term on the dataset's frames. EMO only ever
    uses the mean (training latents, the reference, motion frames), and decoding samples of a freshly initialised
    posterior (std 1) slows a short training down a lot. The scaling factor is set to 1 / std of the latents so
    that they have unit variance, as SD's 0.18215 does for its VAE."""
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    out = Path(out)
    _refuse_to_replace(out, "VAE", overwrite)
    torch.manual_seed(seed)
    frames = torch.cat([data.video(i)["frames"] for i in range(len(data.videos))])  # (N, H, W, 3) uint8
    size = frames.shape[1]
    vae = small_vae(size).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=min(100, steps // 10), num_training_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.csv").write_text(LossLog.HEADER)
    started = time.perf_counter()
    bar = tqdm(total=steps, desc="vae", dynamic_ncols=True, mininterval=1.0)
    losses = LossLog(out / "log.csv", batch_size, bar)
    step, stopped = 0, None
    try:
        for step in range(1, steps + 1):
            x = _pixels(frames[torch.randint(len(frames), (batch_size,), generator=generator)])
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.mean).sample  # the mean: what EMO encodes, at training and inference
            loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + kl_weight * posterior.kl().mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.add(loss)
            bar.update(1)
            if step % 20 == 0 or step == steps:
                losses.flush(step, lr_scheduler.get_last_lr()[0])
            if max_minutes and time.perf_counter() - started > max_minutes * 60:
                stopped = f"time limit of {max_minutes} minutes reached"
                break
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        bar.close()
    vae.eval()
    with torch.no_grad():
        sample = _pixels(frames[torch.randperm(len(frames), generator=generator)[:256]])
        latents = torch.cat([vae.encode(c).latent_dist.mean for c in sample.split(64)])
        recon = torch.cat([vae.decode(c).sample for c in latents.split(64)])
    psnr = float(10 * torch.log10(4 / F.mse_loss(recon.clamp(-1, 1), sample)))
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    vae.save_pretrained(out, safe_serialization=True)
    give_ordinary_mode(*Path(out).glob("*.safetensors"))
    write_loss_plot(out / "log.csv", out / "loss.svg", "VAE")
    note = f" ({stopped})" if stopped else ""
    log(f"[train-vae] {step} steps in {time.perf_counter() - started:.0f}s{note}: reconstruction PSNR {psnr:.1f} dB, "
        f"scaling factor {vae.config.scaling_factor:.4f} -> {out}")
    if stopped == "interrupted":
        raise KeyboardInterrupt  # saved, but not the VAE that was asked for
    return out


def new_audio_encoder(out, layers: int, hidden: int, seed: int = 0, overwrite: bool = False) -> Path:
    """A randomly initialised small wav2vec2 (base's kernels and strides), saved as a transformers folder. Small
    models are trained on its frozen features: they carry loudness and timbre, which is what they learn from."""
    from .audio import random_audio_encoder

    _refuse_to_replace(Path(out), "audio encoder", overwrite)

    encoder = random_audio_encoder(layers, hidden, seed)
    encoder.model.save_pretrained(out, safe_serialization=True)
    give_ordinary_mode(*Path(out).glob("*.safetensors"))
    return Path(out)


def _refuse_to_replace(out: Path, what: str, overwrite: bool):
    """Datasets, latent caches and trained stages depend on a VAE or audio encoder: never replace one silently."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: the {what} is written as a folder; give a folder name")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} is not empty (a {what} made before? prepared data and trained models depend on "
                         f"it): choose a new folder, or pass --overwrite to replace it")


def bundle(checkpoint, vae_folder, audio_encoder, out, dtype: str = "fp16", overwrite: bool = False) -> Path:
    """One file: the EMO model plus the VAE and the wav2vec2 it was trained with (under `vae.` and
    `audio_encoder.`, their configs in the metadata), so it runs with nothing else to download."""
    from .audio import Wav2Vec2Features
    from .vae import load_vae_folder

    out = Path(out)
    if out.suffix != ".safetensors" or out.is_dir():
        raise ValueError(f"--out {out}: the bundle is one .safetensors file (what generate and Load EMO read); give "
                         f"a file name ending in .safetensors")
    if out.exists() and out.resolve() == Path(checkpoint).resolve():
        raise ValueError(f"--out is the --checkpoint itself ({out}): write the bundle to another file, so that the "
                         f"trained model is kept as it is")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists: choose a new file name, or pass --overwrite to replace it")
    config, state_dict, looks_like = load_checkpoint(checkpoint)
    model = build_model(config, state_dict, Path(checkpoint).name, looks_like)
    vae = load_vae_folder(vae_folder)
    encoder = Wav2Vec2Features.from_files(audio_encoder).model
    metadata = {k: v for k, v in read_metadata(checkpoint).items() if k in ("stage", "step")}
    return save_bundle(model, out, vae, encoder, metadata, DTYPES[dtype])


def save_bundle(model, out, vae=None, audio_encoder=None, metadata: dict | None = None, dtype=None) -> Path:
    """Save `model` in our format with a diffusers AutoencoderKL and / or a transformers Wav2Vec2Model inside."""
    extra, metadata = {}, dict(metadata or {})
    if vae is not None:
        extra.update({f"vae.{k}": v for k, v in vae.state_dict().items()})
        metadata["vae_config"] = json.dumps({k: v for k, v in dict(vae.config).items() if not k.startswith("_")})
    if audio_encoder is not None:
        extra.update({f"audio_encoder.{k}": v for k, v in audio_encoder.state_dict().items()})
        metadata["audio_encoder_config"] = audio_encoder.config.to_json_string()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out, metadata=metadata, extra=extra, dtype=dtype)
    return Path(out)


# ---- command line ---------------------------------------------------------------------------------------------

def main(argv=None):
    from .cli import COMMANDS, positive

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("train", "train-vae", "new-audio-encoder", "bundle") else "train"
    p = argparse.ArgumentParser(prog=f"python -m emo_core {command}",
                                description=__doc__ if command == "train" else COMMANDS[command][1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if command == "train":
        p.add_argument("config", help="the stage's JSON config (see configs/train/)")
        p.add_argument("--resume", action="store_true", help="continue the run in the config's output folder")
        p.add_argument("--max-minutes", type=positive(float), help="stop (and save) after this many minutes")
    elif command == "train-vae":
        p.add_argument("data", help="prepared dataset folder")
        p.add_argument("--out", required=True, help="output diffusers VAE folder")
        p.add_argument("--steps", type=positive(), default=3000)
        p.add_argument("--batch-size", type=positive(), default=32)
        p.add_argument("--lr", type=positive(float), default=1e-3)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--max-minutes", type=positive(float))
        p.add_argument("--overwrite", action="store_true", help="replace the VAE in a non-empty --out folder")
    elif command == "new-audio-encoder":
        p.add_argument("--out", required=True, help="output transformers folder")
        p.add_argument("--layers", type=positive(), default=4)
        p.add_argument("--hidden", type=positive(), default=32)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--overwrite", action="store_true", help="replace the encoder in a non-empty --out folder")
    else:
        p.add_argument("--checkpoint", required=True, help="the trained EMO model (our format)")
        p.add_argument("--vae", required=True, help="its diffusers VAE folder")
        p.add_argument("--audio-encoder", required=True, help="its wav2vec2 (transformers folder)")
        p.add_argument("--out", required=True, help="the bundle: one .safetensors file")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    try:
        if command == "train":
            train(TrainConfig.load(args.config), args.resume, args.max_minutes)
        elif command == "train-vae":
            train_vae(PreparedDataset(args.data), args.out, args.steps, args.batch_size, args.lr, seed=args.seed,
                      max_minutes=args.max_minutes, overwrite=args.overwrite)
        elif command == "new-audio-encoder":
            out = new_audio_encoder(args.out, args.layers, args.hidden, args.seed, args.overwrite)
            print(f"[new-audio-encoder] wrote {out}")
        else:
            out = bundle(args.checkpoint, args.vae, args.audio_encoder, args.out, args.dtype, args.overwrite)
            print(f"[bundle] wrote {out}")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)  # Ctrl-C, after what was done is saved: the shell's code for it, so `set -e` scripts stop
