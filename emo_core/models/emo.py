"""EMONet: the whole EMO-family network as one module (the paper's Figure 2).

    reference image + motion frames --VAE--> ReferenceNet --features--> Backbone <-- noisy clip latents
    wav2vec2 features --AudioProjection--> audio tokens ----------------^   ^   ^
    face-region mask --FaceLocator------------------------------------------'   |
    head speed --SpeedEncoder (paper) / identity embedding --IdentityProjection (Hallo)

State-dict prefixes: reference_net., backbone., face_locator., audio_proj., image_proj. (Hallo only),
speed_encoder. (EMO only). Below the prefix, names are diffusers' SD1.5 / AnimateDiff / Hallo vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import EMOConfig
from .conditioning import AudioProjection, FaceLocator, IdentityProjection, SpeedEncoder
from .unet import Backbone, ReferenceNet, UNetConditions


class EMONet(nn.Module):
    def __init__(self, cfg: EMOConfig, dtype=None, device=None, operations=nn):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        kw = dict(dtype=dtype, device=device, operations=operations)
        u, a = cfg.unet, cfg.audio
        self.reference_net = ReferenceNet(cfg, **kw)
        self.backbone = Backbone(cfg, **kw)
        face_out = u.in_channels if cfg.face_locator.inject == "latent" else u.block_out_channels[0]
        self.face_locator = FaceLocator(cfg.face_locator.in_channels, cfg.face_locator.block_out_channels, face_out,
                                        **kw)
        self.audio_proj = AudioProjection(2 * a.window + 1, a.layers, a.channels, a.intermediate_dim,
                                          a.attention_dim, a.tokens, **kw)
        if cfg.identity_tokens:
            self.image_proj = IdentityProjection(cfg.identity_dim, u.cross_attention_dim, cfg.identity_tokens, **kw)
        if cfg.speed is not None:
            s = cfg.speed
            self.speed_encoder = SpeedEncoder(s.centres(), s.radii(), s.window, s.tokens, s.dim, **kw)

    def reference_features(self, latents: torch.Tensor, context: torch.Tensor | None) -> list:
        """latents: (R, 4, h, w) scaled VAE latents; context: (R, T, D) identity tokens or None.
        Returns per spatial transformer (R, L, C), rounded through float16 when the config says so (Hallo)."""
        bank = self.reference_net(latents, self.cfg.reference_timestep, context)
        if self.cfg.reference_bank_fp16:
            bank = [b.to(torch.float16).to(b.dtype) for b in bank]
        return bank

    def denoise(self, sample, timestep, cond: UNetConditions, face_features=None) -> torch.Tensor:
        return self.backbone(sample, timestep, cond, face_features)
