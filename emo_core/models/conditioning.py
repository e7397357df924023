"""Small encoders that turn the conditioning signals into what the Backbone consumes.

* FaceLocator: face-region mask -> features added to the noisy latent / conv_in output.
* AudioProjection: per video frame, a ±m window of multi-layer wav2vec2 features -> audio tokens.
* IdentityProjection (Hallo's ImageProjModel): 512-d face-identity embedding -> tokens for the cross-attention slot.
* SpeedEncoder (the paper's speed layers): head rotation speed -> tanh bucket encoding -> ±m window -> MLP -> tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .layers import zero_module


def frame_windows(x: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    """Per-frame values along `dim` -> a new axis after it of size 2m+1: frame i gathers frames i-m .. i+m,
    indices clamped to the sequence (Hallo's rule). E.g. (S, layers, C) with dim 0 -> (S, 2m+1, layers, C)."""
    n = x.shape[dim]
    offsets = torch.arange(-m, m + 1, device=x.device)
    idx = (torch.arange(n, device=x.device)[:, None] + offsets[None]).clamp(0, n - 1)
    return x.index_select(dim, idx.flatten()).unflatten(dim, (n, 2 * m + 1))


class FaceLocator(nn.Module):
    """conv3x3 + SiLU, then per stage [conv3x3 + SiLU, stride-2 conv3x3 + SiLU], then a zero-initialised conv3x3."""

    def __init__(self, in_channels: int, block_out_channels: tuple, out_channels: int,
                 dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(kernel_size=3, padding=1, dtype=dtype, device=device)
        chs = list(block_out_channels)
        self.conv_in = operations.Conv2d(in_channels, chs[0], **kw)
        self.blocks = nn.ModuleList()
        for a, b in zip(chs[:-1], chs[1:]):
            self.blocks.append(operations.Conv2d(a, a, **kw))
            self.blocks.append(operations.Conv2d(a, b, stride=2, **kw))
        self.conv_out = zero_module(operations.Conv2d(chs[-1], out_channels, **kw))

    def forward(self, mask):
        # mask: (N, C_in, H, W) in [0, 1] -> (N, out_channels, H/8, W/8)
        x = F.silu(self.conv_in(mask))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class AudioProjection(nn.Module):
    """(window, layers, channels) per frame, flattened row-major -> Linear-ReLU-Linear-ReLU-Linear -> K tokens -> LN."""

    def __init__(self, window: int, layers: int, channels: int, intermediate: int, dim: int, tokens: int,
                 dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.tokens, self.dim = tokens, dim
        self.proj1 = operations.Linear(window * layers * channels, intermediate, **kw)
        self.proj2 = operations.Linear(intermediate, intermediate, **kw)
        self.proj3 = operations.Linear(intermediate, tokens * dim, **kw)
        self.norm = operations.LayerNorm(dim, **kw)

    def forward(self, windows):
        # windows: (B, F, 2m+1, layers, channels) -> (B, F, K, D)
        x = rearrange(windows, "b f w l c -> b f (w l c)")
        x = self.proj3(F.relu(self.proj2(F.relu(self.proj1(x)))))
        return self.norm(rearrange(x, "b f (k d) -> b f k d", k=self.tokens))


class IdentityProjection(nn.Module):
    """Hallo's ImageProjModel: Linear(512 -> K·D), K tokens, LayerNorm."""

    def __init__(self, embed_dim: int, dim: int, tokens: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.tokens = tokens
        self.proj = operations.Linear(embed_dim, tokens * dim, dtype=dtype, device=device)
        self.norm = operations.LayerNorm(dim, dtype=dtype, device=device)

    def forward(self, embedding):
        # embedding: (B, 512) -> (B, K, D)
        return self.norm(rearrange(self.proj(embedding), "b (k d) -> b k d", k=self.tokens))


class SpeedEncoder(nn.Module):
    """s_d = tanh((w - c_d) / r_d * 3) for each bucket d; frame f sees the encodings of f-m .. f+m -> MLP -> tokens."""

    def __init__(self, centres: list, radii: list, window: int, tokens: int, dim: int,
                 dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.centres, self.radii = list(centres), list(radii)  # config values, not weights
        self.window, self.tokens = window, tokens
        width = (2 * window + 1) * len(centres)
        self.proj1 = operations.Linear(width, dim, **kw)
        self.proj2 = operations.Linear(dim, tokens * dim, **kw)
        self.norm = operations.LayerNorm(dim, **kw)

    def buckets(self, speed):
        # speed: (B, S) degrees per frame -> (B, S, d), computed in float32
        centres = torch.tensor(self.centres, device=speed.device)
        radii = torch.tensor(self.radii, device=speed.device)
        return torch.tanh((speed.float()[..., None] - centres) / radii * 3)

    def forward(self, speed, dtype=torch.float32):
        # speed: (B, S) -> (B, S, K, D) in the compute dtype
        win = frame_windows(self.buckets(speed), self.window, dim=1)  # (B, S, 2m+1, d)
        x = rearrange(win, "b s w d -> b s (w d)").to(dtype)
        x = self.proj2(F.silu(self.proj1(x)))
        return self.norm(rearrange(x, "b s (k d) -> b s k d", k=self.tokens))
