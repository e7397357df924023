"""Temporal (motion) modules: self-attention over the frame axis, with the motion frames in front and speed control.

AnimateDiff layout (names: temporal_transformer.norm/proj_in/transformer_blocks/proj_out, attention_blocks.N with
pos_encoder.pe, norms.N, ff, ff_norm), so AnimateDiff `mm_sd_v15_v2` and Hallo weights load by name.

Motion frames (paper: "their features are concatenated with the temporal-layer input along the frame axis"):
`MotionModule.forward` prepends the M motion-frame features to the F clip frames, attends over all M+F frames,
and returns only the F clip frames.

Speed layers (paper): after the temporal self-attentions, each clip frame cross-attends to its speed tokens; the
output projection is zero-initialised so that adding speed layers leaves a trained network unchanged.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from .layers import Attention, FeedForward, zero_module


class PositionalEncoding(nn.Module):
    def __init__(self, dim: int, max_len: int, device=None):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(position * div_term)
        pe[0, :, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.to(device=device))  # (1, max_len, dim), float32 whatever the weights' dtype

    def forward(self, x):
        # x: (N, T, C)
        if x.shape[1] > self.pe.shape[1]:
            raise ValueError(f"temporal module: {x.shape[1]} frames (motion + clip) exceed the positional table "
                             f"({self.pe.shape[1]}); lower frames per clip or motion frames")
        return x + self.pe[:, : x.shape[1]].to(x)


class TemporalSelfAttention(Attention):
    """Self-attention across frames at one spatial position, on position-encoded inputs."""

    def __init__(self, dim: int, heads: int, max_len: int, dtype=None, device=None, operations=nn):
        super().__init__(dim, heads, dim // heads, dtype=dtype, device=device, operations=operations)
        self.pos_encoder = PositionalEncoding(dim, max_len, device=device)

    def forward(self, x, context=None):
        return super().forward(self.pos_encoder(x))


class SpeedAttention(nn.Module):
    """Cross-attention from each frame's token to that frame's speed tokens (zero-initialised output)."""

    def __init__(self, dim: int, heads: int, speed_dim: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.norm = operations.LayerNorm(dim, dtype=dtype, device=device)
        self.attn = Attention(dim, heads, dim // heads, context_dim=speed_dim,
                              dtype=dtype, device=device, operations=operations)
        zero_module(self.attn.to_out[0])

    def forward(self, h, speed):
        # h: (B·h·w, F, C) clip-frame tokens; speed: (B, F, K, D) speed tokens per clip frame.
        # All spatial positions of a frame share that frame's speed tokens: attend per (row, frame).
        b, f = speed.shape[:2]
        q = rearrange(self.norm(h), "(b s) f c -> (b f) s c", b=b)
        out = self.attn(q, rearrange(speed, "b f k d -> (b f) k d"))
        return rearrange(out, "(b f) s c -> (b s) f c", f=f)


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, speed_dim: int | None,
                 dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.attention_blocks = nn.ModuleList([TemporalSelfAttention(dim, heads, max_len, **kw) for _ in range(2)])
        self.norms = nn.ModuleList([operations.LayerNorm(dim, dtype=dtype, device=device) for _ in range(2)])
        self.speed_attention = SpeedAttention(dim, heads, speed_dim, **kw) if speed_dim else None
        self.ff = FeedForward(dim, **kw)
        self.ff_norm = operations.LayerNorm(dim, dtype=dtype, device=device)

    def forward(self, h, motion_frames: int, speed=None):
        # h: (B·h·w, M+F, C)
        for attn, norm in zip(self.attention_blocks, self.norms):
            h = h + attn(norm(h))
        if self.speed_attention is not None and speed is not None:
            clip = h[:, motion_frames:]
            h = torch.cat([h[:, :motion_frames], clip + self.speed_attention(clip, speed)], dim=1)
        return h + self.ff(self.ff_norm(h))


class TemporalTransformer(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, groups: int, speed_dim: int | None,
                 dtype=None, device=None, operations=nn):
        super().__init__()
        self.norm = operations.GroupNorm(groups, dim, eps=1e-6, affine=True, dtype=dtype, device=device)
        self.proj_in = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.transformer_blocks = nn.ModuleList([
            TemporalTransformerBlock(dim, heads, max_len, speed_dim, dtype=dtype, device=device, operations=operations)])
        self.proj_out = zero_module(operations.Linear(dim, dim, dtype=dtype, device=device))

    def forward(self, x, motion_frames: int, speed=None):
        # x: (B, C, T, h, w) with T = M + F
        b, _, t, height, width = x.shape
        h = self.norm(rearrange(x, "b c t y x -> (b t) c y x"))
        h = self.proj_in(rearrange(h, "(b t) c y x -> (b y x) t c", b=b))
        h = self.transformer_blocks[0](h, motion_frames, speed)
        h = rearrange(self.proj_out(h), "(b y x) t c -> b c t y x", b=b, y=height, x=width)
        return h + x


class MotionModule(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, groups: int, speed_dim: int | None = None,
                 dtype=None, device=None, operations=nn):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(dim, heads, max_len, groups, speed_dim,
                                                        dtype=dtype, device=device, operations=operations)

    def forward(self, x, frames: int, motion=None, speed=None):
        """x: (B·F, C, h, w) clip frames, folded batch-major. motion: (B, C, M, h, w) motion-frame features or None.
        speed: (B, F, K, D) speed tokens or None. Returns (B·F, C, h, w)."""
        clip = rearrange(x, "(b f) c y x -> b c f y x", f=frames)
        m = 0 if motion is None else motion.shape[2]
        if m:
            clip = torch.cat([motion.to(clip.dtype), clip], dim=2)  # (B, C, M+F, h, w): motion frames first
        out = self.temporal_transformer(clip, m, speed)[:, :, m:]
        return rearrange(out, "b c f y x -> (b f) c y x")
