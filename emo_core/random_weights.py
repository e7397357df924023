"""Seeded random weights for tests and the benchmark (the parity fixture's recipe).

Matrices and kernels ~ N(0, 1/fan_in); biases and other 1-D parameters ~ N(0, 0.02²); norm weights 1 + N(0, 0.1²).
Unlike a fresh model, the zero-initialised layers (audio/speed output projections, temporal proj_out, face
locator conv_out) become non-zero, so every conditioning path has an effect.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    norms = {name for name, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))}
    for name, p in sorted(model.named_parameters()):
        owner, _, kind = name.rpartition(".")
        if owner in norms:
            value = (1.0 if kind == "weight" else 0.0) + torch.randn(p.shape, generator=generator) * (
                0.1 if kind == "weight" else 0.02)
        elif p.ndim >= 2:
            value = torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5
        else:
            value = torch.randn(p.shape, generator=generator) * 0.02
        p.copy_(value.to(p.dtype))
    return model
