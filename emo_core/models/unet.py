"""The two SD1.5-shaped UNets of EMO: ReferenceNet (2-D, writes reference features) and Backbone (denoises a clip).

Both share one skeleton (`UNet`): conv_in, timestep embedding, 3 cross-attention down blocks + 1 plain, a mid
block, 1 plain up block + 3 cross-attention up blocks. Each layer of a cross-attention block runs

    ResNet -> spatial transformer (reference-attention) -> audio attention -> temporal module

where the Backbone has all four and ReferenceNet only the first two. Video frames are folded into the batch
(B·F rows, batch-major) everywhere except inside the temporal modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from einops import rearrange
from torch import nn

from ..config import EMOConfig
from .audio_attention import EMOAudioAttention, HalloAudioModule, make_audio_module
from .layers import Downsample, ResnetBlock, TimestepEmbedding, Upsample
from .reference_attention import SpatialTransformer
from .temporal import MotionModule


@dataclass
class UNetConditions:
    """Everything a UNet forward reads besides the latents and the timestep."""

    frames: int = 1
    context: torch.Tensor | None = None  # (B, T, D) identity tokens for the cross-attention slot (Hallo)
    bank: list | None = None  # per spatial transformer: (B, 1+M, L, C) reference + motion-frame features
    use_reference: torch.Tensor | None = None  # (B,) bool: False drops the reference (unconditional CFG row)
    audio: torch.Tensor | None = None  # (B·F, K, D) audio tokens per frame
    region_masks: dict | None = None  # Hallo: {"full"|"face"|"lip": [per level (B·F, L_level)]}
    motion_scale: tuple = (1.0, 1.0, 1.0)  # Hallo: weights of the full / face / lip audio branches
    speed: torch.Tensor | None = None  # (B, F, K, D) speed tokens per frame
    temporal: bool = True  # False: image training (stage 1) runs no temporal modules
    written: list = field(default_factory=list)  # ReferenceNet: the bank, appended in block order


class Block(nn.Module):
    """One resolution level: `layers` x (ResNet [-> transformer -> audio -> temporal]) then a resampler."""

    def __init__(self, kind: str, in_ch: int, out_ch: int, skip_chs: list, audio_chs: list, temb_ch: int,
                 layers: int, attention: bool, level: int, sampler: bool, unet: "UNet", dtype=None, device=None,
                 operations=nn):
        """skip_chs: channels of the skip connection each up-block layer concatenates; audio_chs: inner width of
        each layer's Hallo audio module (a Hallo quirk: the block's input width; EMO's audio layer ignores it)."""
        super().__init__()
        cfg = unet.cfg
        kw = dict(dtype=dtype, device=device, operations=operations)
        groups, eps = cfg.unet.norm_num_groups, cfg.unet.norm_eps
        self.kind, self.level = kind, level
        self.resnets = nn.ModuleList()
        for j in range(layers):
            res_in = (in_ch if j == 0 else out_ch) + (skip_chs[j] if kind == "up" else 0)
            self.resnets.append(ResnetBlock(res_in, out_ch, temb_ch, groups, eps, **kw))
        if attention:
            self.attentions = nn.ModuleList([unet.make_transformer(out_ch, **kw) for _ in range(layers)])
        if attention and unet.temporal:
            self.audio_modules = nn.ModuleList([
                make_audio_module(cfg.audio.module, out_ch, audio_chs[j], cfg.unet.num_heads, cfg.audio.attention_dim,
                                  groups, level, **kw) for j in range(layers)])
        if unet.temporal:
            self.motion_modules = nn.ModuleList([unet.make_motion_module(out_ch, **kw) for _ in range(layers)])
        self.run_motion = unet.temporal and (attention or cfg.motion.run_in_plain_blocks)
        if sampler and kind == "down":
            self.downsamplers = nn.ModuleList([Downsample(out_ch, **kw)])
        if sampler and kind == "up":
            self.upsamplers = nn.ModuleList([Upsample(out_ch, **kw)])

    def forward(self, x, temb, cond: UNetConditions, skips: list, upsample_size=None):
        for j, resnet in enumerate(self.resnets):
            if self.kind == "up":
                x = torch.cat([x, skips.pop()], dim=1)
            x = _run(resnet, x, temb)
            motion = None
            if hasattr(self, "attentions"):
                x, motion = _spatial(self.attentions[j], x, cond)
            if hasattr(self, "audio_modules") and cond.audio is not None:
                x = _run(self.audio_modules[j], x, cond.audio, region_masks=cond.region_masks,
                         motion_scale=cond.motion_scale)
            if self.run_motion and cond.temporal:
                x = _run(self.motion_modules[j], x, cond.frames, motion, cond.speed)
            if self.kind == "down":
                skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlock(nn.Module):
    """ResNet, then (transformer -> audio -> temporal -> ResNet)."""

    def __init__(self, ch: int, temb_ch: int, level: int, unet: "UNet", dtype=None, device=None, operations=nn):
        super().__init__()
        cfg = unet.cfg
        kw = dict(dtype=dtype, device=device, operations=operations)
        groups, eps = cfg.unet.norm_num_groups, cfg.unet.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, temb_ch, groups, eps, **kw) for _ in range(2)])
        self.attentions = nn.ModuleList([unet.make_transformer(ch, **kw)])
        if unet.temporal:
            self.audio_modules = nn.ModuleList([make_audio_module(
                cfg.audio.module, ch, ch, cfg.unet.num_heads, cfg.audio.attention_dim, groups, level, **kw)])
            self.motion_modules = nn.ModuleList([unet.make_motion_module(ch, **kw)])

    def forward(self, x, temb, cond: UNetConditions):
        x = _run(self.resnets[0], x, temb)
        x, motion = _spatial(self.attentions[0], x, cond)
        if hasattr(self, "audio_modules") and cond.audio is not None:
            x = _run(self.audio_modules[0], x, cond.audio, region_masks=cond.region_masks,
                     motion_scale=cond.motion_scale)
        if hasattr(self, "motion_modules") and cond.temporal:
            x = _run(self.motion_modules[0], x, cond.frames, motion, cond.speed)
        return _run(self.resnets[1], x, temb)


def _run(module: nn.Module, *args, **kwargs):
    """Call a layer; under gradient checkpointing (training) its activations are recomputed in the backward pass
    instead of being stored. Only pure layers go through here: the lists of skips and bank features are filled
    outside, so recomputation never appends twice."""
    if getattr(module, "gradient_checkpointing", False) and module.training and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False, **kwargs)
    return module(*args, **kwargs)


def _spatial(transformer: SpatialTransformer, x, cond: UNetConditions):
    """Run a spatial transformer. Without a bank (ReferenceNet) it writes its reference feature; with one (Backbone)
    it reads its paired entry and returns the motion-frame features (B, C, M, h, w) for the temporal module."""
    if cond.bank is None:
        x, feature = _run(transformer, x, cond.context, frames=cond.frames)
        cond.written.append(feature)
        return x, None
    return _run(transformer, x, cond.context, cond.bank[transformer.bank_index], cond.use_reference,
                frames=cond.frames)


class UNet(nn.Module):
    def __init__(self, cfg: EMOConfig, temporal: bool, dtype=None, device=None, operations=nn):
        super().__init__()
        self.cfg, self.temporal = cfg, temporal
        self._transformers = 0
        kw = dict(dtype=dtype, device=device, operations=operations)
        u = cfg.unet
        chs = list(u.block_out_channels)
        levels = len(chs)
        temb_ch = chs[0] * 4
        self.conv_in = operations.Conv2d(u.in_channels, chs[0], 3, padding=1, dtype=dtype, device=device)
        self.time_embedding = TimestepEmbedding(chs[0], temb_ch, u.flip_sin_to_cos, u.freq_shift, **kw)

        self.down_blocks = nn.ModuleList()
        skip_chs = [chs[0]]
        for i, ch in enumerate(chs):
            last = i == levels - 1
            block_in = chs[max(i - 1, 0)]
            audio_chs = [block_in] + [ch] * (u.layers_per_block - 1)  # diffusers re-binds in_channels per layer
            self.down_blocks.append(Block("down", block_in, ch, [], audio_chs, temb_ch, u.layers_per_block,
                                          attention=not last, level=i, sampler=not last, unet=self, **kw))
            skip_chs += [ch] * (u.layers_per_block + (0 if last else 1))
        self.mid_block = MidBlock(chs[-1], temb_ch, levels - 1, unet=self, **kw)

        self.up_blocks = nn.ModuleList()
        rev = chs[::-1]
        prev = rev[0]
        for i, ch in enumerate(rev):
            last = i == levels - 1
            audio_chs = [rev[min(i + 1, levels - 1)]] * (u.layers_per_block + 1)  # diffusers' `in_channels`
            skips = [skip_chs.pop() for _ in range(u.layers_per_block + 1)]
            self.up_blocks.append(Block("up", prev, ch, skips, audio_chs, temb_ch, u.layers_per_block + 1,
                                        attention=i > 0, level=levels - 1 - i, sampler=not last, unet=self, **kw))
            prev = ch

    def set_gradient_checkpointing(self, enabled: bool = True):
        """Recompute each ResNet, transformer, audio and temporal layer in the backward pass (training memory)."""
        for module in self.modules():
            if isinstance(module, (ResnetBlock, SpatialTransformer, MotionModule, EMOAudioAttention,
                                   HalloAudioModule)):
                module.gradient_checkpointing = enabled

    # Factories used by the blocks, so that one place decides how each kind of layer is built.
    def make_transformer(self, ch: int, dtype=None, device=None, operations=nn) -> SpatialTransformer:
        cfg = self.cfg
        injection = cfg.reference_injection if self.temporal else None
        context_dim = cfg.unet.cross_attention_dim if cfg.identity_tokens else None
        t = SpatialTransformer(ch, cfg.unet.num_heads, context_dim, injection, cfg.unet.norm_num_groups,
                               frame_tiling=cfg.reference_frame_tiling, dtype=dtype, device=device,
                               operations=operations)
        # Pairs ReferenceNet and Backbone blocks: both UNets construct their transformers in the same order.
        t.bank_index = self._transformers
        self._transformers += 1
        return t

    def make_motion_module(self, ch: int, dtype=None, device=None, operations=nn) -> MotionModule:
        m = self.cfg.motion
        speed_dim = self.cfg.speed.dim if self.cfg.speed else None
        return MotionModule(ch, m.heads, m.max_len, m.norm_groups, speed_dim,
                            dtype=dtype, device=device, operations=operations)

    def run_blocks(self, x, temb, cond: UNetConditions):
        # x: (N, C0, h, w) after conv_in, N = rows·frames; temb: (N, 4·C0). Returns (N, C0, h, w).
        skips = [x]  # skip connections, popped in reverse by the up blocks
        for block in self.down_blocks:
            x = block(x, temb, cond, skips)
        x = self.mid_block(x, temb, cond)
        for block in self.up_blocks:
            n = len(block.resnets)
            size = skips[-n - 1].shape[-2:] if len(skips) > n else None
            x = block(x, temb, cond, skips, upsample_size=size)
        return x

    def embed_time(self, timestep, batch: int, like: torch.Tensor) -> torch.Tensor:
        """(batch, 4·C0) time embedding in the dtype and on the device of `like` (the activations)."""
        t = torch.as_tensor(timestep, device=like.device)
        if t.ndim == 0:
            t = t[None]
        return self.time_embedding(t.expand(batch), like.dtype)


class ReferenceNet(UNet):
    """SD1.5 UNet without temporal layers; runs once per clip and returns the reference features (the bank)."""

    def __init__(self, cfg: EMOConfig, dtype=None, device=None, operations=nn):
        super().__init__(cfg, temporal=False, dtype=dtype, device=device, operations=operations)

    def forward(self, latents, timestep, context=None) -> list:
        """latents: (R, 4, h, w) images [reference, motion frames...]; context: (R, T, D) or None.
        Returns one tensor per spatial transformer, (R, L, C) each, in Backbone block order."""
        temb = self.embed_time(timestep, latents.shape[0], latents)
        cond = UNetConditions(context=context)
        self.run_blocks(self.conv_in(latents), temb, cond)
        return cond.written


class Backbone(UNet):
    """The denoising UNet: SD1.5 layout + reference-attention + audio attention + temporal modules."""

    def __init__(self, cfg: EMOConfig, dtype=None, device=None, operations=nn):
        super().__init__(cfg, temporal=True, dtype=dtype, device=device, operations=operations)
        u = cfg.unet
        kw = dict(dtype=dtype, device=device)
        self.conv_norm_out = operations.GroupNorm(u.norm_num_groups, u.block_out_channels[0], eps=u.norm_eps, **kw)
        self.conv_out = operations.Conv2d(u.block_out_channels[0], u.out_channels, 3, padding=1, **kw)

    def forward(self, sample, timestep, cond: UNetConditions, face_features=None):
        """sample: (B, 4, F, h, w) noisy latents; timestep: scalar or (B,); face_features: (B, Cf, F, h, w) from
        the face locator, added to the noisy latent (EMO) or after conv_in (Hallo). Returns (B, 4, F, h, w)."""
        b, _, frames = sample.shape[:3]
        cond.frames = frames
        x = rearrange(sample, "b c f y x -> (b f) c y x")
        temb = self.embed_time(timestep, b, x).repeat_interleave(frames, dim=0)
        face = None if face_features is None else rearrange(face_features, "b c f y x -> (b f) c y x").to(x.dtype)
        inject = self.cfg.face_locator.inject
        if face is not None and inject == "latent":
            x = x + face
        x = self.conv_in(x)
        if face is not None and inject == "conv_in":
            x = x + face
        x = self.run_blocks(x, temb, cond)
        x = self.conv_out(F.silu(self.conv_norm_out(x)))
        return rearrange(x, "(b f) c y x -> b c f y x", b=b)
