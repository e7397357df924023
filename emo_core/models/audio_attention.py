"""Audio attention: the layer after each reference-attention layer through which the voice drives the face.

Two forms, chosen by `AudioConfig.module`:

* `EMOAudioAttention` (the paper): LayerNorm -> cross-attention from the image tokens of a frame to that frame's audio
  tokens -> zero-initialised output projection -> + input.
* `HalloAudioModule` (Hallo): a transformer on the frame's tokens with self-attention and three cross-attentions to
  the audio tokens whose outputs are weighted by full / face / lip region masks and by `motion_scale`.
"""

from __future__ import annotations

from einops import rearrange
from torch import nn

from .layers import Attention, FeedForward, zero_module


class EMOAudioAttention(nn.Module):
    def __init__(self, channels: int, heads: int, audio_dim: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.norm = operations.LayerNorm(channels, dtype=dtype, device=device)
        self.attn = Attention(channels, heads, channels // heads, context_dim=audio_dim,
                              dtype=dtype, device=device, operations=operations)
        zero_module(self.attn.to_out[0])

    def forward(self, x, audio, **_):
        # x: (B·F, C, h, w); audio: (B·F, K, D) the audio tokens of each frame.
        height, width = x.shape[-2:]
        h = rearrange(x, "n c y x -> n (y x) c")
        h = h + self.attn(self.norm(h), audio)
        return rearrange(h, "n (y x) c -> n c y x", y=height, x=width)


class HalloAudioBlock(nn.Module):
    """Hallo's AudioTemporalBasicTransformerBlock (names attn1, attn2_0/1/2, zero_conv_full/face/lip, ff)."""

    def __init__(self, dim: int, heads: int, audio_dim: int, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.norm1 = operations.LayerNorm(dim, dtype=dtype, device=device)
        self.attn1 = Attention(dim, heads, dim // heads, **kw)
        self.norm2 = operations.LayerNorm(dim, dtype=dtype, device=device)
        self.attn2_0 = Attention(dim, heads, dim // heads, context_dim=audio_dim, **kw)  # full
        self.attn2_1 = Attention(dim, heads, dim // heads, context_dim=audio_dim, **kw)  # face
        self.attn2_2 = Attention(dim, heads, dim // heads, context_dim=audio_dim, **kw)  # lip
        conv = dict(kernel_size=1, dtype=dtype, device=device)
        self.zero_conv_full = zero_module(operations.Conv2d(dim, dim, **conv))
        self.zero_conv_face = zero_module(operations.Conv2d(dim, dim, **conv))
        self.zero_conv_lip = zero_module(operations.Conv2d(dim, dim, **conv))
        self.norm3 = operations.LayerNorm(dim, dtype=dtype, device=device)
        self.ff = FeedForward(dim, **kw)

    def forward(self, h, audio, masks, motion_scale, height, width):
        # h: (N, L, c) tokens; audio: (N, K, D); masks: 3 x (N, L) full/face/lip weights at this level;
        # motion_scale: 3 weights for the full/face/lip branches.
        h = h + self.attn1(self.norm1(h))
        n2 = self.norm2(h)
        branches = ((self.attn2_0, self.zero_conv_full), (self.attn2_1, self.zero_conv_face),
                    (self.attn2_2, self.zero_conv_lip))
        for (attn, conv), mask, scale in zip(branches, masks, motion_scale):
            out = attn(n2, audio) * mask[:, :, None].to(n2.dtype)
            out = conv(rearrange(out, "n (y x) c -> n c y x", y=height, x=width))
            h = h + scale * rearrange(out, "n c y x -> n (y x) c")
        return h + self.ff(self.norm3(h))


class HalloAudioModule(nn.Module):
    """GroupNorm -> 1x1 conv to `inner` channels -> HalloAudioBlock -> 1x1 conv back -> + input.

    Hallo quirk: `inner` is the channel count of the UNet *block's input* (e.g. 320 inside a 640-channel
    block), so the caller passes it separately from `channels`."""

    def __init__(self, channels: int, inner: int, heads: int, audio_dim: int, groups: int, level: int,
                 dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.level = level  # mask resolution level: 0 = full latent resolution
        self.norm = operations.GroupNorm(groups, channels, eps=1e-6, affine=True, **kw)
        self.proj_in = operations.Conv2d(channels, inner, 1, **kw)
        self.transformer_blocks = nn.ModuleList([HalloAudioBlock(inner, heads, audio_dim, operations=operations, **kw)])
        self.proj_out = operations.Conv2d(inner, channels, 1, **kw)

    def forward(self, x, audio, region_masks=None, motion_scale=(1.0, 1.0, 1.0)):
        # x: (B·F, C, h, w); region_masks: {"full"|"face"|"lip": list over levels of (B·F, L_level)}.
        height, width = x.shape[-2:]
        if region_masks is None:
            ones = x.new_ones(x.shape[0], height * width)
            masks = (ones, ones, ones)
        else:
            masks = tuple(region_masks[k][self.level] for k in ("full", "face", "lip"))
        h = rearrange(self.proj_in(self.norm(x)), "n c y x -> n (y x) c")
        h = self.transformer_blocks[0](h, audio, masks, motion_scale, height, width)
        return self.proj_out(rearrange(h, "n (y x) c -> n c y x", y=height, x=width)) + x


def make_audio_module(kind: str, channels: int, block_in: int, heads: int, audio_dim: int, groups: int, level: int,
                      dtype=None, device=None, operations=nn) -> nn.Module:
    kw = dict(dtype=dtype, device=device, operations=operations)
    if kind == "hallo":
        return HalloAudioModule(channels, block_in, heads, audio_dim, groups, level, **kw)
    return EMOAudioAttention(channels, heads, audio_dim, **kw)
