"""Clip-by-clip audio-driven sampling (no ComfyUI import).

For each clip of F frames:

1. ReferenceNet features of [reference image, the M motion frames] (the previous clip's last frames; for the
   first clip zeros (EMO) or the reference repeated (Hallo)) are reused by every step. The portrait's own
   features are computed once per video (or given, computed by the ComfyUI ReferenceNet node); per clip only the
   motion frames run through ReferenceNet.
2. The clip's audio windows become audio tokens; the face mask becomes face-locator features; the head speed
   becomes speed tokens.
3. A diffusers scheduler (DDIM by default) denoises the clip; the conditional and unconditional CFG rows run as
   one batched Backbone forward.
4. The clip is yielded as soon as it is done; only its last M frames are kept for the next clip, so memory does
   not grow with the length of the video.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from .models.conditioning import frame_windows
from .models.unet import UNetConditions

SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "dpmpp": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
    "ddpm": (DDPMScheduler, {}),  # training: adds noise and gives the targets with the same schedule
}


class EMOInputError(ValueError):
    """Bad input to the sampler: the message says what was wrong and what to do."""


class GenerationCancelled(RuntimeError):
    pass


class LatentCodec(Protocol):
    """The VAE as the sampler sees it (only needed when motion frames go through pixels, as in Hallo)."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) in [-1, 1] -> (N, 4, H/8, W/8) scaled
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # (N, 4, h, w) scaled -> (N, 3, 8h, 8w) in [0, 1]
        ...


def encode_reference(codec: LatentCodec, image: torch.Tensor) -> torch.Tensor:
    """The portrait (1, 3, H, W) in [-1, 1] -> its scaled VAE latent (1, 4, H/8, W/8), with a clear error for sizes
    the VAE and the UNet cannot take."""
    if image.ndim != 4 or image.shape[:2] != (1, 3):
        raise EMOInputError(f"reference image must be (1, 3, H, W) RGB, got {tuple(image.shape)}")
    height, width = image.shape[-2:]
    if height % 8 or width % 8:
        raise EMOInputError(f"reference image is {width}x{height}: width and height must be multiples of 8; "
                            f"crop or resize it (e.g. to {width // 8 * 8}x{height // 8 * 8})")
    if height < 64 or width < 64:
        raise EMOInputError(f"reference image is {width}x{height}: at least 64x64 is needed")
    if float((image.amax((-2, -1)) - image.amin((-2, -1))).max()) < 4 / 255:  # 2 steps of 8-bit ([-1, 1] spans 2)
        raise EMOInputError("reference image is one flat colour: there is no face to animate (the model would make "
                            "a video of noise); give a portrait, and check that the nodes or crop before it did not "
                            "blank it")
    return codec.encode(image)


@dataclass
class GenerationInputs:
    reference_latent: torch.Tensor  # (1, 4, h, w) scaled VAE latent of the portrait
    audio_features: torch.Tensor  # (S, layers, channels): wav2vec2 features, one vector per video frame and layer
    face_mask: torch.Tensor | None = None  # (1 or S, C, 8h, 8w) in [0, 1]; C = face locator input channels (1 or 3)
    identity_embedding: torch.Tensor | None = None  # (identity_dim,) face-identity embedding (Hallo)
    speed: float | torch.Tensor | None = None  # head rotation speed, degrees per frame: a number or (S,)
    region_masks: dict | None = None  # Hallo: {"full"|"face"|"lip": [per UNet level (L_level,)]}
    motion_scale: tuple = (1.0, 1.0, 1.0)  # Hallo: weights of the full / face / lip audio branches
    num_frames: int | None = None  # frames to keep (default S)
    reference_features: list | None = None  # run_reference_net() of the portrait (models without identity tokens)


@dataclass
class SamplerSettings:
    steps: int | None = None  # default: the config's (40)
    guidance_scale: float | None = None  # default: the config's (3.5)
    seed: int = 0
    scheduler: str = "ddim"
    frames_per_clip: int | None = None  # default: the config's
    motion_frames: int | None = None  # default: the config's
    noise_correlation: float | None = None  # default: the config's (what the model was trained with)


@dataclass
class Clip:
    index: int
    count: int
    first_frame: int
    latents: torch.Tensor  # (1, 4, F, h, w); the last clip is cut to the frames that are kept


@dataclass
class SamplerStats:
    reference_calls: int = 0  # ReferenceNet forward passes
    reference_images: int = 0  # images they processed in all
    backbone_calls: int = 0


def make_scheduler(name: str, config: dict):
    if name not in SCHEDULERS:
        raise EMOInputError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    cls, extra = SCHEDULERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls(**{k: v for k, v in {**config, **extra}.items() if k in accepted})


def generate(model, inputs: GenerationInputs, settings: SamplerSettings = SamplerSettings(),
             codec: LatentCodec | None = None, progress: Callable | None = None,
             cancel: Callable[[], bool] | None = None, initial_noise: list | None = None,
             stats: SamplerStats | None = None, device=None, dtype=None) -> Iterator[Clip]:
    """Generate the video clip by clip. `progress(step, total_steps, clip, clips)` is called after every denoising
    step (it may raise to interrupt); `cancel()` returning True stops within one step. `initial_noise`: optional
    per-clip noise (1, 4, F, h, w) instead of drawing it from the seed. `device`, `dtype`: where and in what the
    activations are computed (default: those of the model's weights; ComfyUI passes its own, which can differ
    from the storage dtype)."""
    cfg = model.cfg
    weight = model.backbone.conv_in.weight
    device = torch.device(device) if device is not None else weight.device
    dtype = dtype or weight.dtype
    stats = stats if stats is not None else SamplerStats()
    frames = _default(settings.frames_per_clip, cfg.frames_per_clip)
    motion = _default(settings.motion_frames, cfg.motion_frames)
    steps = _default(settings.steps, cfg.steps)
    guidance = _default(settings.guidance_scale, cfg.guidance_scale)
    correlation = _default(settings.noise_correlation, cfg.noise_correlation)
    _validate(model, inputs, frames, motion, steps, correlation, codec)

    audio = inputs.audio_features  # stays where it is: only each clip's windows go to the device
    total = audio.shape[0]
    keep = _kept_frames(inputs)
    clips = math.ceil(keep / frames)
    audio = _pad_frames(audio, clips * frames)  # repeat the last frame to fill the last clip
    speed = _speed_sequence(inputs.speed, total, clips * frames, device)

    rows = 2 if guidance != 1.0 else 1  # row 0 unconditional, row 1 conditional
    drop = set(cfg.cfg_uncond) if rows == 2 else set()
    identity, groups = _identity_tokens(model, inputs, drop, rows, device, dtype)  # (rows, T, D) or None
    reference_latent = inputs.reference_latent.to(device=device, dtype=dtype)
    region_masks = _region_masks(inputs.region_masks, rows * frames, device, dtype)
    use_reference = torch.tensor([("reference" not in drop) or r == rows - 1 for r in range(rows)], device=device)
    portrait = _portrait_bank(model, inputs, reference_latent, identity, groups, stats, device, dtype)

    generator = torch.Generator("cpu").manual_seed(settings.seed)
    # the frames' shared noise is drawn once for the whole video: consecutive clips share it too
    shared = torch.randn((1, cfg.unet.in_channels, 1, *reference_latent.shape[-2:]), generator=generator) \
        if correlation > 0 and initial_noise is None else None
    motion_latents = None  # (M, 4, h, w) of the previous clip
    face = None
    for c in range(clips):
        start = c * frames
        with torch.no_grad():
            windows = clip_windows(audio, start, frames, cfg.audio.window).to(device=device, dtype=dtype)
            audio_tokens = _cfg_rows(model.audio_proj(windows[None]), "audio" in drop, rows)  # (rows, F, K, D)
            if inputs.face_mask is not None and (face is None or inputs.face_mask.shape[0] > 1):
                face = _cfg_rows(_face_features(model, inputs.face_mask, start, frames, dtype, device),
                                 "face_locator" in drop, rows)
            bank = _reference_bank(model, portrait, motion_latents, motion, identity, groups, rows, stats)
            cond = UNetConditions(
                context=identity, bank=bank, use_reference=use_reference, audio=audio_tokens.flatten(0, 1),
                region_masks=region_masks, motion_scale=tuple(float(s) for s in inputs.motion_scale),
                speed=_speed_tokens(model, speed, start, frames, rows, dtype))

        scheduler = make_scheduler(settings.scheduler, cfg.scheduler)
        scheduler.set_timesteps(steps, device=device)
        if initial_noise is not None:
            noise = initial_noise[c]
        else:
            noise = frame_noise((1, cfg.unet.in_channels, frames, *reference_latent.shape[-2:]), correlation,
                                generator, shared)
        latents = noise.to(device=device, dtype=torch.float32) * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            if cancel is not None and cancel():
                raise GenerationCancelled(f"cancelled at clip {c + 1}/{clips}, step {i + 1}/{steps}")
            with torch.no_grad():
                x = scheduler.scale_model_input(latents, t).to(dtype).expand(rows, -1, -1, -1, -1)
                pred = model.denoise(x, t, cond, face).float()
                stats.backbone_calls += 1
                if rows == 2:
                    pred = pred[0:1] + guidance * (pred[1:2] - pred[0:1])
                latents = scheduler.step(pred, t, latents).prev_sample
            if progress is not None:
                progress(c * steps + i + 1, clips * steps, c, clips)

        if motion:
            last = latents[0, :, -motion:].transpose(0, 1)  # (M, 4, h, w)
            motion_latents = _next_motion_frames(cfg, last, codec).to(device=device, dtype=dtype)
        kept = min(frames, keep - start)
        yield Clip(index=c, count=clips, first_frame=start, latents=latents[:, :, :kept])
        del cond, bank, latents


def frame_noise(shape: tuple, correlation: float, generator: torch.Generator | None = None,
                shared: torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian noise for video latents (B, C, F, h, w) whose frames share a fraction `correlation` of their
    variance: sqrt(ρ)·shared + sqrt(1 - ρ)·own, with `shared` (B, C, 1, h, w) drawn here unless given (PYoCo's
    mixed noise). Every frame stays N(0, I); ρ = 0 gives exactly the independent draws of torch.randn."""
    noise = torch.randn(shape, generator=generator)
    if correlation <= 0:
        return noise
    if shared is None:
        shared = torch.randn((*shape[:2], 1, *shape[3:]), generator=generator)
    return math.sqrt(correlation) * shared + math.sqrt(1 - correlation) * noise


def _cfg_rows(x: torch.Tensor, drop: bool, rows: int) -> torch.Tensor:
    """One conditional row (1, ...) -> the CFG rows: [zeros, x] when the unconditional row drops it, else x repeated."""
    if rows == 2 and drop:
        return torch.cat([torch.zeros_like(x), x])
    return x.expand(rows, *x.shape[1:])


def _default(value, default):
    return default if value is None else value


def _kept_frames(inputs: GenerationInputs) -> int:
    """The video's length in frames: num_frames, at most as many as the audio features cover."""
    total = inputs.audio_features.shape[0]
    return min(_default(inputs.num_frames, total), total)


def _validate(model, inputs: GenerationInputs, frames: int, motion: int, steps: int, correlation: float, codec):
    cfg = model.cfg
    ref = inputs.reference_latent
    if ref.ndim != 4 or ref.shape[0] != 1 or ref.shape[1] != cfg.unet.in_channels:
        raise EMOInputError(f"reference latent must be (1, {cfg.unet.in_channels}, h, w), got {tuple(ref.shape)}")
    feats = inputs.audio_features
    want = (cfg.audio.layers, cfg.audio.channels)
    if feats.ndim != 3 or tuple(feats.shape[1:]) != want:
        raise EMOInputError(f"audio features must be (frames, {want[0]} layers, {want[1]} channels) for this model, "
                            f"got {tuple(feats.shape)}: encode the audio with the wav2vec2 model the checkpoint "
                            f"expects")
    if feats.shape[0] < 1:
        raise EMOInputError("the audio features hold no frame: encode a clip with sound")
    if frames + motion > cfg.motion.max_len:
        raise EMOInputError(f"frames per clip + motion frames = {frames + motion} exceeds the temporal modules' "
                            f"limit of {cfg.motion.max_len}")
    if frames < 1 or motion < 0 or steps < 1:
        raise EMOInputError(f"frames per clip and steps must be >= 1 and motion frames >= 0, got {frames}, {steps} "
                            f"and {motion}")
    if motion > frames:
        raise EMOInputError(f"motion frames ({motion}) cannot exceed frames per clip ({frames}): they are the "
                            f"previous clip's last frames")
    if not 0 <= correlation < 1:
        raise EMOInputError(f"noise correlation must be in [0, 1), got {correlation}")
    if inputs.num_frames is not None and inputs.num_frames < 1:
        raise EMOInputError(f"num_frames must be >= 1, got {inputs.num_frames}")
    if motion and cfg.motion_frames_source == "pixels" and codec is None:
        raise EMOInputError("this model re-encodes motion frames through the VAE (Hallo): pass the VAE as `codec`")
    if inputs.face_mask is not None:
        mask = inputs.face_mask
        size = tuple(s * 8 for s in ref.shape[-2:])
        if mask.ndim != 4 or tuple(mask.shape[-2:]) != size:
            raise EMOInputError(f"face mask must be (1, C, H, W) for the whole video or (frames, C, H, W), at the "
                                f"image size {size}, got {tuple(mask.shape)}")
        if mask.shape[-3] not in (1, cfg.face_locator.in_channels):
            raise EMOInputError(f"face mask must have 1 or {cfg.face_locator.in_channels} channels, "
                                f"got {mask.shape[-3]}")
        video = _kept_frames(inputs)
        if 1 < mask.shape[0] < video:
            raise EMOInputError(f"per-frame face mask has {mask.shape[0]} frames but the video has {video}; give "
                                f"one mask, or one per video frame")
    if inputs.region_masks is not None:
        levels = [math.prod(s) for s in level_sizes(ref.shape[-2:], len(cfg.unet.block_out_channels))]
        for key in ("full", "face", "lip"):
            got = [m.numel() for m in inputs.region_masks.get(key, [])]
            if got != levels:
                raise EMOInputError(f"region mask {key!r} must have one mask per UNet level with {levels} values, "
                                    f"got {got}")
    if len(inputs.motion_scale) != 3:
        raise EMOInputError(f"motion_scale must have 3 weights (full, face, lip), got {inputs.motion_scale}")


def level_sizes(hw, levels: int) -> list:
    """(h, w) of each UNet level for a latent of size hw: level 0 is the latent, each next one halved (rounded up,
    as the stride-2 convolutions do)."""
    sizes, (h, w) = [], hw
    for _ in range(levels):
        sizes.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return sizes


def _pad_frames(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[0] >= length:
        return x[:length]
    return torch.cat([x, x[-1:].expand(length - x.shape[0], *x.shape[1:])])


def _speed_sequence(speed, total: int, padded: int, device):
    if speed is None:
        return None
    speed = torch.as_tensor(speed, dtype=torch.float32, device=device)
    if speed.ndim == 0:
        speed = speed.expand(total)
    if speed.ndim != 1 or speed.shape[0] < total:
        raise EMOInputError(f"speed must be a number or one value per frame ({total}), got shape {tuple(speed.shape)}")
    return _pad_frames(speed, padded)


def with_margin(x: torch.Tensor, start: int, frames: int, m: int) -> torch.Tensor:
    """Frames start-m .. start+frames+m of a per-frame sequence, indices clamped to it: windowing this slice gives
    the clip's frames exactly the ±m windows the whole sequence would, without building them all."""
    idx = torch.arange(start - m, start + frames + m, device=x.device).clamp(0, x.shape[0] - 1)
    return x[idx]


def clip_windows(audio: torch.Tensor, start: int, frames: int, m: int) -> torch.Tensor:
    """The ±m windows of one clip's frames, (F, 2m+1, layers, channels)."""
    return frame_windows(with_margin(audio, start, frames, m), m, dim=0)[m:m + frames]


def _speed_tokens(model, speed, start: int, frames: int, rows: int, dtype):
    if speed is None or not hasattr(model, "speed_encoder"):
        return None
    m = model.cfg.speed.window
    tokens = model.speed_encoder(with_margin(speed, start, frames, m)[None], dtype)[:, m:m + frames]  # (1, F, K, D)
    return _cfg_rows(tokens, False, rows)  # the speed is kept in both rows


def _identity_tokens(model, inputs, drop: set, rows: int, device, dtype):
    """Identity tokens per CFG row and the number of distinct contexts (1, or 2 when the unconditional row drops
    the identity)."""
    if not model.cfg.identity_tokens:
        return None, 1
    emb = inputs.identity_embedding
    zero = torch.zeros(1, model.cfg.identity_dim, device=device, dtype=dtype)
    emb = zero if emb is None else emb.reshape(1, -1).to(device=device, dtype=dtype)
    if emb.shape[1] != model.cfg.identity_dim:
        raise EMOInputError(f"identity embedding must have {model.cfg.identity_dim} values, got {emb.shape[1]}")
    with torch.no_grad():
        if rows == 2 and "identity" in drop:
            return model.image_proj(torch.cat([zero, emb])), 2
        return model.image_proj(emb).expand(rows, -1, -1), 1


def _face_features(model, mask, start: int, frames: int, dtype, device):
    """Face-locator features (1, Cf, F, h, w) of one mask (1, C, H, W) or of the clip's per-frame masks (S, C, H, W)."""
    if mask.shape[0] > 1:
        mask = _pad_frames(mask[start:start + frames], frames)
    mask = mask.to(device=device, dtype=dtype).expand(-1, model.cfg.face_locator.in_channels, -1, -1)
    with torch.no_grad():
        features = model.face_locator(mask)  # (1 or F, Cf, h, w)
    return features.transpose(0, 1)[None].expand(-1, -1, frames, -1, -1)


def _region_masks(masks, rows_frames: int, device, dtype):
    if masks is None:
        return None
    return {k: [m.reshape(1, -1).to(device=device, dtype=dtype).expand(rows_frames, -1) for m in masks[k]]
            for k in ("full", "face", "lip")}


def run_reference_net(model, latents: torch.Tensor, context: torch.Tensor | None = None,
                      stats: SamplerStats | None = None) -> list:
    """ReferenceNet's features of images (the portrait, or motion frames): latents (R, 4, h, w) -> per block
    (R, L, C); `context` (R, T, D): the identity tokens each attends to (Hallo), None for EMO."""
    with torch.no_grad():
        bank = model.reference_features(latents, context)
    if stats is not None:
        stats.reference_calls += 1
        stats.reference_images += latents.shape[0]
    return bank


def _portrait_bank(model, inputs: GenerationInputs, reference_latent, identity, groups: int, stats: SamplerStats,
                   device, dtype) -> list:
    """The portrait's features per identity context: [context][block] (1, L, C). Given ones are used when the
    model has no identity tokens (they were computed without a context)."""
    given = inputs.reference_features
    if given is not None and identity is None:
        return [[f.to(device=device, dtype=dtype) for f in given]]
    if identity is None:
        return [run_reference_net(model, reference_latent, None, stats)]
    bank = run_reference_net(model, reference_latent.expand(groups, -1, -1, -1), identity[:groups], stats)
    return [[f[g:g + 1] for f in bank] for g in range(groups)]


def _reference_bank(model, portrait: list, motion_latents, motion: int, identity, groups: int, rows: int,
                    stats: SamplerStats) -> list:
    """The clip's ReferenceNet features of [reference, M motion frames] per context group: per block
    (rows, 1+M, L, C). Only the motion frames run through ReferenceNet; the portrait's come from `portrait`."""
    cfg = model.cfg
    per_group = 1 + motion
    tiling = groups == 2 and cfg.reference_context_tiling

    def context(g: int, p: int) -> int:  # identity context of position p of group g
        return (g * per_group + p) % 2 if tiling else g  # Hallo quirk: image row i of the batch gets context i mod 2

    if not motion:
        moving = [[f[:0] for f in portrait[0]] for _ in range(groups)]  # no motion frames: (0, L, C) per block
    elif motion_latents is None and cfg.first_clip_motion == "zeros":
        moving = [[torch.zeros_like(f).expand(motion, -1, -1) for f in portrait[0]] for _ in range(groups)]
    elif motion_latents is None:  # Hallo: the first clip's motion frames are the reference itself
        moving = [[torch.cat([portrait[context(g, p)][b] for p in range(1, per_group)]) for b in
                   range(len(portrait[0]))] for g in range(groups)]
    else:
        latents = motion_latents.repeat(groups, 1, 1, 1)  # (G·M, 4, h, w): group 0's frames, then group 1's
        contexts = None
        if identity is not None:
            contexts = torch.stack([identity[context(g, p)] for g in range(groups) for p in range(1, per_group)])
        bank = run_reference_net(model, latents, contexts, stats)
        moving = [[f[g * motion:(g + 1) * motion] for f in bank] for g in range(groups)]
    out = []
    for b in range(len(portrait[0])):
        feature = torch.stack([torch.cat([portrait[context(g, 0)][b], moving[g][b]])
                               for g in range(groups)])  # (G, 1+M, L, C)
        out.append(feature.expand(rows, -1, -1, -1) if groups == 1 else feature)
    return out


def _next_motion_frames(cfg, last: torch.Tensor, codec) -> torch.Tensor:
    """The previous clip's last M frames as latents (M, 4, h, w); Hallo decodes and re-encodes them."""
    if cfg.motion_frames_source == "pixels":
        with torch.no_grad():
            return codec.encode(codec.decode(last) * 2 - 1)  # decode gives [0, 1]
    return last
