"""One config object selects the whole EMO-family network: the paper's EMO and Hallo are two presets of it.

Every field is plain data so the config serialises to JSON (it travels inside our checkpoints' metadata).
Sizes use the diffusers SD1.5 vocabulary; where Hallo computes something unusual, the field that reproduces it
says so ("Hallo quirk").
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

SD15_BLOCKS = (320, 640, 1280, 1280)

# Hallo's DDIM settings (configs/inference/default.yaml); the paper's EMO uses DDIM 40 steps as well.
HALLO_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}


@dataclass
class UNetConfig:
    """SD1.5-shaped UNet: 3 cross-attention down blocks + 1 plain, a mid block, 1 plain up block + 3 cross-attention."""

    block_out_channels: tuple = SD15_BLOCKS
    layers_per_block: int = 2
    num_heads: int = 8  # diffusers' legacy `attention_head_dim`: the number of heads; head_dim = channels / heads
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0


@dataclass
class AudioConfig:
    """wav2vec2 features per video frame -> tokens, and the audio attention layers of the Backbone."""

    layers: int = 12  # stacked wav2vec2 hidden states per frame
    channels: int = 768  # wav2vec2 hidden size
    window: int = 2  # m: frame f sees audio frames f-m .. f+m
    tokens: int = 32  # audio tokens per frame
    intermediate_dim: int = 512
    attention_dim: int = 768  # width of the audio tokens
    # "emo": one cross-attention to the audio tokens after each reference-attention layer (the paper).
    # "hallo": Hallo's audio transformer with three mask-weighted cross-attentions (full / face / lip).
    module: str = "emo"


@dataclass
class MotionConfig:
    """AnimateDiff-style temporal modules (self-attention over the frame axis) at every resolution."""

    heads: int = 8
    max_len: int = 32  # longest frame axis (motion frames + clip frames) the positional table covers
    norm_groups: int = 32  # Hallo/AnimateDiff hard-code 32 groups regardless of the UNet's norm_num_groups
    # Motion modules of the plain blocks (down_blocks.3, up_blocks.0) are run (EMO). Hallo quirk: its checkpoint
    # has them but its inference code never runs them, so the `hallo` preset sets this to False.
    run_in_plain_blocks: bool = True


@dataclass
class SpeedConfig:
    """The paper's speed layers: head rotation speed -> bucket encoding -> MLP -> tokens the temporal layers attend to.

    The paper does not publish bucket centres or radii. We use `buckets` evenly spaced centres over
    [0, max_speed] degrees per frame with radius = the spacing, so neighbouring buckets overlap.
    """

    buckets: int = 9
    max_speed: float = 8.0  # degrees of head rotation per frame at the last bucket centre
    window: int = 2  # frames f-m .. f+m of speed encodings feed frame f
    tokens: int = 2
    dim: int = 768

    def centres(self) -> list:
        return [self.max_speed * i / (self.buckets - 1) for i in range(self.buckets)]

    def radii(self) -> list:
        return [self.max_speed / (self.buckets - 1)] * self.buckets


@dataclass
class FaceLocatorConfig:
    """Light convs that encode the face-region mask; the result is added to the noisy latent (EMO) or conv_in (Hallo)."""

    in_channels: int = 1  # EMO: one-channel box mask; Hallo: an RGB face-region image
    block_out_channels: tuple = (16, 32, 64, 128)
    inject: str = "latent"  # "latent": added to the noisy latent (EMO); "conv_in": added after conv_in (Hallo)


@dataclass
class EMOConfig:
    name: str = "emo"
    unet: UNetConfig = field(default_factory=UNetConfig)
    # "cross": the Backbone's cross-attention attends to the ReferenceNet features (the paper).
    # "self": ReferenceNet tokens are appended to the keys/values of self-attention (Hallo, AnimateAnyone).
    reference_injection: str = "cross"
    identity_tokens: int = 0  # Hallo: face-identity (ArcFace) embedding -> tokens for the cross-attention slot
    identity_dim: int = 512
    audio: AudioConfig = field(default_factory=AudioConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    speed: SpeedConfig | None = field(default_factory=SpeedConfig)
    face_locator: FaceLocatorConfig = field(default_factory=FaceLocatorConfig)
    # Clip-by-clip generation.
    frames_per_clip: int = 12
    motion_frames: int = 4
    first_clip_motion: str = "zeros"  # "zeros" (paper) or "reference" (Hallo: the reference image repeated)
    motion_frames_source: str = "latents"  # "latents": previous clip's latents; "pixels": decode + re-encode (Hallo)
    # Classifier-free guidance: what the unconditional row drops ("identity", "audio", "face_locator", "reference").
    cfg_uncond: tuple = ("audio", "reference")
    guidance_scale: float = 3.5
    steps: int = 40
    # Share of the noise variance common to all frames of a clip, in training and sampling (PYoCo's mixed noise,
    # Ge et al. 2023): 0 = independent noise per frame (the paper). Frames that share noise need not be made
    # consistent by the temporal modules alone (see sampler.frame_noise).
    noise_correlation: float = 0.0
    scheduler: dict = field(default_factory=lambda: dict(HALLO_SCHEDULER))
    fps: int = 25
    size: int = 512  # square image side in pixels the model was trained at (the default generation size)
    latent_scale: float = 0.18215
    reference_timestep: int = 0
    # Hallo quirk: the reference features are handed to the Backbone as float16 even in a float32 run.
    reference_bank_fp16: bool = False
    # Hallo quirk: with CFG the reference pass sees the 2 identity contexts tiled over its rows, so row i
    # (images [ref, motion frames] x 2 groups) gets context i mod 2 instead of its own group's context.
    reference_context_tiling: bool = False
    # Hallo quirk: in the Backbone the B reference rows are tiled (not repeated) over the B·F frame rows, so frame
    # row j reads the reference of row j mod B; with CFG the conditional row's even frames read the reference that
    # was computed with the unconditional identity context.
    reference_frame_tiling: bool = False

    # ---- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "EMOConfig":
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"EMO config has unknown fields {sorted(unknown)}; was it written by a newer version?")
        nested = {"unet": UNetConfig, "audio": AudioConfig, "motion": MotionConfig,
                  "speed": SpeedConfig, "face_locator": FaceLocatorConfig}
        for key, sub in nested.items():
            if isinstance(data.get(key), dict):
                data[key] = _sub_from_dict(sub, data[key])
        for key in ("cfg_uncond",):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "EMOConfig":
        return cls.from_dict(json.loads(text))

    def validate(self) -> "EMOConfig":
        choices = {
            "reference_injection": ("cross", "self"),
            "first_clip_motion": ("zeros", "reference"),
            "motion_frames_source": ("latents", "pixels"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"EMO config: {key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.audio.module not in ("emo", "hallo"):
            raise ValueError(f"EMO config: audio.module must be 'emo' or 'hallo', got {self.audio.module!r}")
        if self.face_locator.inject not in ("latent", "conv_in"):
            raise ValueError("EMO config: face_locator.inject must be 'latent' or 'conv_in'")
        bad = set(self.cfg_uncond) - {"identity", "audio", "face_locator", "reference"}
        if bad:
            raise ValueError(f"EMO config: cfg_uncond has unknown entries {sorted(bad)}")
        if not 0 <= self.noise_correlation < 1:
            raise ValueError(f"EMO config: noise_correlation must be in [0, 1), got {self.noise_correlation}")
        if self.motion_frames + self.frames_per_clip > self.motion.max_len:
            raise ValueError(f"EMO config: motion_frames + frames_per_clip = {self.motion_frames + self.frames_per_clip}"
                             f" exceeds the temporal position table ({self.motion.max_len})")
        return self


def _sub_from_dict(cls, data: dict):
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"EMO config section {cls.__name__} has unknown fields {sorted(unknown)}")
    return cls(**data)


# ---- presets ---------------------------------------------------------------------------------------------------

def _hallo(unet: UNetConfig, audio: AudioConfig, motion_heads: int, frames: int) -> EMOConfig:
    return EMOConfig(
        name="hallo",
        unet=unet,
        reference_injection="self",
        identity_tokens=4,
        audio=audio,
        motion=MotionConfig(heads=motion_heads, max_len=32, run_in_plain_blocks=False),
        speed=None,
        face_locator=FaceLocatorConfig(in_channels=3, block_out_channels=(16, 32, 64, 128), inject="conv_in"),
        frames_per_clip=frames,
        motion_frames=2,
        first_clip_motion="reference",
        motion_frames_source="pixels",
        cfg_uncond=("identity", "audio", "face_locator", "reference"),
        guidance_scale=3.5,
        steps=40,
        reference_bank_fp16=True,
        reference_context_tiling=True,
        reference_frame_tiling=True,
    )


def _emo(unet: UNetConfig, audio: AudioConfig, motion_heads: int, speed_dim: int, name: str,
         frames: int = 12, motion_frames: int = 4) -> EMOConfig:
    return EMOConfig(
        name=name,
        unet=unet,
        reference_injection="cross",
        identity_tokens=0,
        audio=audio,
        motion=MotionConfig(heads=motion_heads, max_len=32, run_in_plain_blocks=True),
        speed=SpeedConfig(dim=speed_dim),
        face_locator=FaceLocatorConfig(in_channels=1, inject="latent"),
        frames_per_clip=frames,
        motion_frames=motion_frames,
    )


def preset(name: str) -> EMOConfig:
    """Named configurations: `emo` and `hallo` at SD1.5 size, `small`, `tiny`, `demo` (EMO structure) and `hallo-tiny`."""
    if name == "emo":
        return _emo(UNetConfig(), AudioConfig(module="emo"), 8, 768, "emo")
    if name == "hallo":
        return _hallo(UNetConfig(), AudioConfig(module="hallo"), 8, 16)
    if name == "small":
        unet = UNetConfig(block_out_channels=(64, 128, 256, 256), layers_per_block=1, num_heads=4,
                          cross_attention_dim=256, norm_num_groups=32)
        audio = AudioConfig(layers=12, channels=768, tokens=8, intermediate_dim=256, attention_dim=256, module="emo")
        return _emo(unet, audio, 4, 256, "small")
    if name == "tiny":
        unet = UNetConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, num_heads=4,
                          cross_attention_dim=48, norm_num_groups=8)
        audio = AudioConfig(layers=3, channels=16, tokens=4, intermediate_dim=32, attention_dim=40, module="emo")
        return _emo(unet, audio, 2, 40, "tiny", frames=4, motion_frames=2)
    if name == "demo":
        # The bundled demo model: trained on CPU in minutes on synthetic faces at 64x64 (8x8 latents), with its own
        # small VAE and a small frozen wav2vec2 (4 layers, width 32) inside the same checkpoint.
        unet = UNetConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1, num_heads=4,
                          cross_attention_dim=64, norm_num_groups=8)
        audio = AudioConfig(layers=4, channels=32, tokens=4, intermediate_dim=64, attention_dim=64, module="emo")
        cfg = _emo(unet, audio, 4, 64, "demo", frames=8, motion_frames=2)
        cfg.motion.norm_groups = 8
        cfg.speed = SpeedConfig(buckets=9, max_speed=4.0, dim=64)
        cfg.face_locator.block_out_channels = (8, 16, 32, 32)
        cfg.steps = 20
        cfg.size = 64
        return cfg
    if name == "hallo-tiny":
        unet = UNetConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, num_heads=4,
                          cross_attention_dim=48, norm_num_groups=8)
        audio = AudioConfig(layers=3, channels=16, tokens=4, intermediate_dim=32, attention_dim=40, module="hallo")
        cfg = _hallo(unet, audio, 2, 4)
        cfg.name = "hallo-tiny"
        return cfg
    raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")


PRESETS = ("emo", "hallo", "small", "tiny", "demo", "hallo-tiny")


def from_hallo_configs(unet_config: dict, inference: dict, audio_proj: dict, image_proj: dict,
                       face_locator: dict | None = None) -> EMOConfig:
    """Build the config of a Hallo checkpoint from Hallo's own config files (diffusers unet config.json,
    the inference yaml as a dict, and the AudioProjModel / ImageProjModel / FaceLocator arguments)."""
    add = inference["unet_additional_kwargs"]
    unet = UNetConfig(
        block_out_channels=tuple(unet_config["block_out_channels"]),
        layers_per_block=unet_config["layers_per_block"],
        num_heads=unet_config["attention_head_dim"],
        cross_attention_dim=unet_config["cross_attention_dim"],
        norm_num_groups=unet_config["norm_num_groups"],
        norm_eps=unet_config["norm_eps"],
        in_channels=unet_config["in_channels"],
        out_channels=unet_config["out_channels"],
        flip_sin_to_cos=unet_config["flip_sin_to_cos"],
        freq_shift=unet_config["freq_shift"],
    )
    if audio_proj["output_dim"] != add["audio_attention_dim"]:
        raise ValueError("Hallo config: AudioProjModel output_dim differs from unet audio_attention_dim")
    audio = AudioConfig(layers=audio_proj["blocks"], channels=audio_proj["channels"],
                        window=(audio_proj["seq_len"] - 1) // 2, tokens=audio_proj["context_tokens"],
                        intermediate_dim=audio_proj["intermediate_dim"], attention_dim=audio_proj["output_dim"],
                        module="hallo")
    mm = add["motion_module_kwargs"]
    cfg = _hallo(unet, audio, mm["num_attention_heads"], inference["data"]["n_sample_frames"])
    cfg.motion.max_len = mm["temporal_position_encoding_max_len"]
    cfg.identity_tokens = image_proj["clip_extra_context_tokens"]
    cfg.identity_dim = image_proj["clip_embeddings_dim"]
    if face_locator:
        cfg.face_locator.in_channels = face_locator.get("conditioning_channels", 3)
        cfg.face_locator.block_out_channels = tuple(face_locator.get("block_out_channels", (16, 32, 64, 128)))
    cfg.motion_frames = inference["data"]["n_motion_frames"]
    cfg.steps = inference.get("inference_steps", 40)
    cfg.guidance_scale = inference.get("cfg_scale", 3.5)
    cfg.scheduler = {**HALLO_SCHEDULER, **inference.get("noise_scheduler_kwargs", {})}
    cfg.fps = inference["data"].get("export_video", {}).get("fps", 25)
    return cfg.validate()
