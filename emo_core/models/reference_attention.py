"""Spatial transformer with reference-attention: where ReferenceNet features enter the Backbone.

The same module serves both UNets:

* in ReferenceNet it is a plain SD1.5 transformer block that also hands out its reference feature, the input of
  its self-attention (LayerNorm1 output), one per block: the "bank";
* in the Backbone it reads the paired bank entry of the reference image in one of two ways:
  - "cross" (EMO paper): the cross-attention attends to the reference features;
  - "self" (Hallo / AnimateAnyone): reference tokens are appended to the keys/values of self-attention.
  It also returns the bank entries of the motion frames, which the temporal module concatenates in front of the
  clip frames (see temporal.py).
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import nn

from .layers import Attention, FeedForward


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None, injection: str | None,
                 dtype=None, device=None, operations=nn):
        """injection: None (ReferenceNet), "self" or "cross" (Backbone). context_dim: width of the identity tokens
        for the cross-attention slot, or None when that slot is unused."""
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.injection = injection
        self.norm1 = operations.LayerNorm(dim, dtype=dtype, device=device)
        self.attn1 = Attention(dim, heads, dim // heads, **kw)
        if injection == "cross":
            self.norm2 = operations.LayerNorm(dim, dtype=dtype, device=device)
            self.attn2 = Attention(dim, heads, dim // heads, context_dim=dim, **kw)  # keys/values: reference features
        elif context_dim is not None:
            self.norm2 = operations.LayerNorm(dim, dtype=dtype, device=device)
            self.attn2 = Attention(dim, heads, dim // heads, context_dim=context_dim, **kw)  # identity tokens
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = operations.LayerNorm(dim, dtype=dtype, device=device)
        self.ff = FeedForward(dim, **kw)

    def forward(self, h, context=None, reference=None, use_reference=None):
        """h: (N, L, C) tokens (N = rows·frames in the Backbone). context: (N, T, D) identity tokens or None.
        reference: (N, L, C) reference-image features, one per row of h. use_reference: (N,) bool, False where the
        reference is dropped (the unconditional CFG row). Returns (h, n1), n1 being this block's bank feature."""
        n1 = self.norm1(h)
        if self.injection == "self" and reference is not None:
            h = h + self._self_attention_with_reference(n1, reference, use_reference)
        else:
            h = h + self.attn1(n1)
        if self.attn2 is not None:
            n2 = self.norm2(h)
            if self.injection == "cross":
                if reference is not None:
                    out = self.attn2(n2, reference.to(n2.dtype))
                    h = h + out * use_reference.to(out.dtype)[:, None, None]
            else:
                h = h + self.attn2(n2, context)
        h = h + self.ff(self.norm3(h))
        return h, n1

    def _self_attention_with_reference(self, n1, reference, use_reference):
        # Rows with the reference attend to [own tokens, reference tokens] (2L keys); the others to themselves.
        reference = reference.to(n1.dtype)
        if bool(use_reference.all()):
            return self.attn1(n1, torch.cat([n1, reference], dim=1))
        out = torch.empty_like(n1)
        out[~use_reference] = self.attn1(n1[~use_reference])
        if bool(use_reference.any()):
            q = n1[use_reference]
            out[use_reference] = self.attn1(q, torch.cat([q, reference[use_reference]], dim=1))
        return out


class SpatialTransformer(nn.Module):
    """GroupNorm -> 1x1 conv -> TransformerBlock over the h·w tokens of each image -> 1x1 conv -> + input."""

    def __init__(self, channels: int, heads: int, context_dim: int | None, injection: str | None,
                 groups: int, frame_tiling: bool = False, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.frame_tiling = frame_tiling
        self.norm = operations.GroupNorm(groups, channels, eps=1e-6, affine=True, **kw)
        self.proj_in = operations.Conv2d(channels, channels, 1, **kw)
        self.transformer_blocks = nn.ModuleList([
            TransformerBlock(channels, heads, context_dim, injection, operations=operations, **kw)])
        self.proj_out = operations.Conv2d(channels, channels, 1, **kw)

    def forward(self, x, context=None, bank=None, use_reference=None, frames: int = 1):
        """x: (B·F, C, h, w), frames folded batch-major. context: (B, T, D) or None.
        bank: (B, 1+M, L, C) this block's reference features per row: image 0 = reference, then M motion frames.
        Returns (x, feature): feature is (B·F, L, C), the bank entry this block writes (used by ReferenceNet),
        or, when a bank was read, the motion-frame features (B, C, M, h, w) for the temporal module."""
        height, width = x.shape[-2:]
        residual = x
        h = rearrange(self.proj_in(self.norm(x)), "n c y x -> n (y x) c")
        if context is not None:
            context = repeat(context, "b t d -> (b f) t d", f=frames)
        reference = None
        if bank is not None:
            # Each frame of row b reads row b's reference; Hallo quirk (frame_tiling): the B rows are tiled over
            # the B·F frame rows instead, so frame row j reads the reference of row j mod B.
            pattern = "b l c -> (f b) l c" if self.frame_tiling else "b l c -> (b f) l c"
            reference = repeat(bank[:, 0], pattern, f=frames)
            use_reference = repeat(use_reference, "b -> (b f)", f=frames)
        h, feature = self.transformer_blocks[0](h, context, reference, use_reference)
        x = self.proj_out(rearrange(h, "n (y x) c -> n c y x", y=height, x=width)) + residual
        if bank is not None:
            feature = rearrange(bank[:, 1:], "b m (y x) c -> b c m y x", y=height, x=width)
        return x, feature
