"""Initialise an EMONet from public pretrained weights: Stable Diffusion 1.5 and AnimateDiff.

The paper initialises both UNets (ReferenceNet and Backbone) from SD1.5 and the temporal modules from
AnimateDiff. Our module names below `reference_net.` / `backbone.` are diffusers' `UNet2DConditionModel` names and
AnimateDiff's motion-module names, so initialising is a copy by name:

    load_sd15_unet(path)            -> {diffusers UNet key: tensor}   (diffusers folder or original single file)
    init_from_sd15(model, path)     -> InitReport                     (copies into reference_net.* and backbone.*)
    load_motion_module(path)        -> {AnimateDiff key: tensor}      (mm_sd_v15_v2 .ckpt / .safetensors)
    init_motion_modules(model, path) -> InitReport                    (copies into backbone.*.motion_modules.*)

Original single-file checkpoints (LDM keys `model.diffusion_model.*`) are converted with diffusers' own
`convert_ldm_unet_checkpoint`. Pickled files are only read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

LDM_PREFIX = "model.diffusion_model."
UNET_PREFIXES = ("reference_net.", "backbone.")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# ---- reading files ---------------------------------------------------------------------------------------------

def read_state_dict(path) -> dict:
    """All tensors of a .safetensors or pickled (.ckpt/.pt/.pth/.bin) file, unwrapped from nested "state_dict" keys.

    Pickles are read with `weights_only=True`: a file whose unpickling would import or call anything beyond plain
    tensors and containers is refused. Raises FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file" + (" (it is a folder)" if path.is_dir() else ""))
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            data = load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError: truncated, corrupt or not safetensors at all
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    elif suffix in PICKLE_SUFFIXES:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" not in str(e):
                raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            what = f" (it wants `{found.group(1)}`)" if found else ""
            raise ValueError(
                f"refused to load {path}: unpickling it would import or run code{what}, which weights_only loading "
                f"forbids. Only plain tensor checkpoints are accepted; if you trust the file, re-save its tensors as "
                f".safetensors with a trusted tool.") from e
        except Exception as e:  # RuntimeError (bad zip), EOFError, KeyError, ...: truncated or not a checkpoint
            raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                             f"{type(e).__name__}: {e}") from e
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; expected .safetensors or one of {PICKLE_SUFFIXES}")
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a state dict of tensors")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def describe_keys(keys) -> str:
    """A guess at what a state dict is, from its key names, for error messages."""
    keys = list(keys)
    has = lambda *parts: any(any(p in k for p in parts) for k in keys)  # noqa: E731
    if not keys:
        return "it holds no tensors"
    if has("lora_down", "lora_up", "lora_A", "lora_B", "lora."):
        guess = "a LoRA"
    elif has("denoising_unet.", "reference_unet."):
        guess = "a Hallo / AnimateAnyone net.pth (load it with the EMO checkpoint loader instead)"
    elif has(".motion_modules."):
        guess = "an AnimateDiff motion module"
    elif has("control_model.", "input_hint_block", "controlnet_cond_embedding"):
        guess = "a ControlNet"
    elif has("conditioner.embedders."):
        guess = "an SDXL-family checkpoint"
    elif has("first_stage_model.", "encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.",
             "quant_conv."):
        guess = "a VAE"
    elif has("cond_stage_model.", "text_model.", "text_projection"):
        guess = "a CLIP text encoder"
    elif "conv_in.weight" in keys and has("down_blocks.0.resnets.0."):
        guess = "diffusers-format UNet weights; pass the folder that also holds its config.json"
    else:
        from diffusers.loaders.single_file_utils import infer_diffusers_model_type
        kind = infer_diffusers_model_type(dict.fromkeys(keys))if False else None  # needs shapes; see below
        guess = kind or "nothing known"
    return f"it looks like {guess}; {len(keys)} keys, e.g. {_few(sorted(keys))}"


def _few(items, n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)})"
