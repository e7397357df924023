"""Building blocks shared by every network: attention, feed-forward, ResNet, resamplers, timestep embedding.

Every layer is built from an `operations` namespace (default `torch.nn`); inside ComfyUI the nodes pass
`comfy.ops.*` so the same modules get ComfyUI's weight casting and low-VRAM streaming. Names of submodules follow
diffusers' SD1.5 vocabulary so state dicts line up with SD1.5, AnimateDiff and Hallo checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from einops import rearrange
from torch import nn


def zero_module(module: nn.Module) -> nn.Module:
    """Zero-initialise a layer that is added to a pretrained network, so that the network's output is unchanged."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention` (diffusers names: to_q, to_k, to_v, to_out.0)."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 dtype=None, device=None, operations=nn):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = operations.Linear(query_dim, inner, bias=False, dtype=dtype, device=device)
        self.to_k = operations.Linear(context_dim, inner, bias=False, dtype=dtype, device=device)
        self.to_v = operations.Linear(context_dim, inner, bias=False, dtype=dtype, device=device)
        self.to_out = nn.ModuleList([operations.Linear(inner, query_dim, dtype=dtype, device=device)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (N, Lq, query_dim); context: (N, Lk, context_dim), default x itself.
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (rearrange(t, "n l (h d) -> n h l d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](rearrange(out, "n h l d -> n l (h d)"))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.proj = operations.Linear(dim_in, dim_out * 2, dtype=dtype, device=device)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with hidden width 4·dim (diffusers names: net.0.proj, net.2)."""

    def __init__(self, dim: int, mult: int = 4, dtype=None, device=None, operations=nn):
        super().__init__()
        self.net = nn.ModuleList([
            GEGLU(dim, dim * mult, dtype=dtype, device=device, operations=operations),
            nn.Identity(),  # dropout slot in diffusers' layout (index 1)
            operations.Linear(dim * mult, dim, dtype=dtype, device=device),
        ])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class TimestepEmbedding(nn.Module):
    """Sinusoidal timestep features -> Linear -> SiLU -> Linear (diffusers: time_embedding.linear_1/2)."""

    def __init__(self, channels: int, embed_dim: int, flip_sin_to_cos: bool, freq_shift: int,
                 dtype=None, device=None, operations=nn):
        super().__init__()
        self.channels, self.flip_sin_to_cos, self.freq_shift = channels, flip_sin_to_cos, freq_shift
        self.linear_1 = operations.Linear(channels, embed_dim, dtype=dtype, device=device)
        self.linear_2 = operations.Linear(embed_dim, embed_dim, dtype=dtype, device=device)

    def forward(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t_emb = get_timestep_embedding(timesteps, self.channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                       downscale_freq_shift=self.freq_shift).to(dtype)
        return self.linear_2(F.silu(self.linear_1(t_emb)))


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> + time projection -> GroupNorm -> SiLU -> conv3x3 -> + shortcut.

    Works per image; video frames are folded into the batch (inflated convs and GroupNorms are per frame).
    """

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, groups: int, eps: float,
                 dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm1 = operations.GroupNorm(groups, in_ch, eps=eps, affine=True, **kw)
        self.conv1 = operations.Conv2d(in_ch, out_ch, 3, padding=1, **kw)
        self.time_emb_proj = operations.Linear(temb_ch, out_ch, **kw)
        self.norm2 = operations.GroupNorm(groups, out_ch, eps=eps, affine=True, **kw)
        self.conv2 = operations.Conv2d(out_ch, out_ch, 3, padding=1, **kw)
        self.conv_shortcut = operations.Conv2d(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None

    def forward(self, x, temb):
        # x: (N, C, h, w); temb: (N, temb_ch)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    def __init__(self, ch: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.conv = operations.Conv2d(ch, ch, 3, stride=2, padding=1, dtype=dtype, device=device)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.conv = operations.Conv2d(ch, ch, 3, padding=1, dtype=dtype, device=device)

    def forward(self, x, size):
        # Nearest-neighbour to the skip connection's size (x2 for even sizes; also right for odd latent sizes).
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
