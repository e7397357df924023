"""Initialise an EMONet from public pretrained weights: Stable Diffusion 1.5 and AnimateDiff.

The paper initialises both UNets (ReferenceNet and Backbone) from SD1.5 and the temporal modules from AnimateDiff.
Below `reference_net.` / `backbone.` our module names are diffusers' `UNet2DConditionModel` names and AnimateDiff's
motion-module names, so initialising is a copy by name:

    load_sd15_unet(path)             -> {diffusers UNet key: tensor}  diffusers folder or original single file
    init_from_sd15(model, path)      -> InitReport                    copies into reference_net.* and backbone.*
    load_motion_module(path)         -> {AnimateDiff key: tensor}     mm_sd_v15_v2 .ckpt / .safetensors
    init_motion_modules(model, path) -> InitReport                    copies into backbone.*.motion_modules.*

Original single-file checkpoints (LDM keys `model.diffusion_model.*`) are converted by diffusers' own
`convert_ldm_unet_checkpoint`. Pickled files are only ever read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import describe, few, group_keys, read_state_dict

LDM_PREFIX = "model.diffusion_model."
UNET_PREFIXES = ("reference_net.", "backbone.")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                     "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")


@dataclass
class InitReport:
    """What an `init_*` call wrote into the model. Keys are model state-dict names (with their prefix)."""

    source: str
    loaded: dict = field(default_factory=dict)  # prefix -> [model keys written]
    no_home: list = field(default_factory=list)  # file tensors whose name does not exist in the model: ignored
    mismatched: list = field(default_factory=list)  # (model key, file shape, model shape): skipped
    adapted: list = field(default_factory=list)  # (model key, note): tensors copied only in part (pos_encoder.pe)
    left_at_init: list = field(default_factory=list)  # model keys in this loader's scope that it did not write

    def summary(self) -> str:
        loaded = ", ".join(f"{len(keys)} tensors into {prefix}*" for prefix, keys in self.loaded.items())
        lines = [f"weights from {self.source}", f"  loaded: {loaded}"]
        if self.no_home:
            lines.append(f"  no home in the model, ignored ({len(self.no_home)}): {group_keys(self.no_home)}")
        if self.mismatched:
            key, theirs, ours = self.mismatched[0]
            lines.append(f"  shape mismatch, model keeps its own ({len(self.mismatched)}): "
                         f"{group_keys(k for k, _, _ in self.mismatched)}; e.g. {key}: file {theirs}, model {ours}")
        for note, keys in _by_note(self.adapted).items():
            lines.append(f"  copied in part ({len(keys)}): {group_keys(keys)}: {note}")
        if self.left_at_init:
            lines.append(f"  left at the model's own initialisation ({len(self.left_at_init)}): "
                         f"{group_keys(self.left_at_init)}")
        return "\n".join(lines)


# ---- SD1.5 UNet ------------------------------------------------------------------------------------------------

def load_sd15_unet(path, num_heads: int = 8) -> dict:
    """An SD1.5 UNet's weights as {diffusers `UNet2DConditionModel` key: tensor}.

    path: a diffusers pipeline folder (with `unet/`), a diffusers UNet folder (`config.json` +
    `diffusion_pytorch_model.safetensors` or `.bin`), or an original single-file checkpoint (.safetensors, .ckpt,
    .pth) with LDM keys `model.diffusion_model.*` (VAE / text-encoder keys in it are ignored). UNet widths may
    differ from SD1.5's (the layout is read from the tensor shapes); `num_heads` only enters the config used to
    check the converted keys, since the head count cannot be read from shapes. Raises ValueError /
    FileNotFoundError naming the file when it is not a complete SD1.5-layout UNet."""
    return _load_sd15(path, num_heads)[0]


def sd15_config_from_ldm(unet: dict, num_heads: int = 8) -> dict:
    """A diffusers `UNet2DConditionModel` config read from the shapes of an LDM UNet state dict (keys without the
    `model.diffusion_model.` prefix): block_out_channels from the ResNet convs, layers_per_block from the number of
    input blocks, cross_attention_dim from attn2.to_k. Heads and GroupNorm groups are not visible in shapes:
    `attention_head_dim` (diffusers' legacy name for the head count) is `num_heads`, and norm_num_groups is the
    largest divisor of 32 that fits every width (32 for SD1.5)."""
    blocks = {int(k.split(".")[1]) for k in unet if k.startswith("input_blocks.")}
    if not blocks or "input_blocks.0.0.weight" not in unet or "out.2.weight" not in unet:
        raise ValueError("no input_blocks.0.0 (conv_in) or out.2 (conv_out) weights")
    down_at = sorted(i for i in blocks if f"input_blocks.{i}.0.op.weight" in unet)
    levels = len(down_at) + 1
    count = max(blocks) + 1  # conv_in + levels·layers ResNets (+ attention) + (levels - 1) downsamplers
    layers = count // levels - 1
    if layers < 1 or count != levels * (layers + 1) or down_at != [(k + 1) * (layers + 1) for k in range(levels - 1)]:
        raise ValueError(f"input_blocks 0..{count - 1} with downsamplers at {down_at} are not a UNet layout")
    first = [1 + k * (layers + 1) for k in range(levels)]  # the first ResNet of each level
    channels = [unet[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in first]
    attention = [f"input_blocks.{i}.1.proj_in.weight" in unet for i in first]
    to_k = sorted(k for k in unet if k.endswith("attn2.to_k.weight"))
    if not to_k:
        raise ValueError("no cross-attention (attn2.to_k) weights")
    depth = 1 + max(int(m.group(1)) for k in unet if (m := re.search(r"transformer_blocks\.(\d+)\.", k)))
    proj_in = unet[next(k for k in sorted(unet) if k.endswith(".proj_in.weight"))]  # 1x1 conv (SD1.5) or linear
    return {
        "in_channels": unet["input_blocks.0.0.weight"].shape[1],
        "out_channels": unet["out.2.weight"].shape[0],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attention[::-1]],
        "cross_attention_dim": unet[to_k[0]].shape[1],
        "attention_head_dim": num_heads,
        "use_linear_projection": proj_in.ndim == 2,
        "transformer_layers_per_block": depth,
        "norm_num_groups": math.gcd(32, *channels),
    }


def _load_sd15(path, num_heads: int) -> tuple:
    """(weights in diffusers names, diffusers UNet config)."""
    path = Path(path)
    if path.is_dir():
        return _load_diffusers_folder(path)
    checkpoint, _ = read_state_dict(path)
    unet = {k[len(LDM_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(LDM_PREFIX)}
    if not unet:
        raise ValueError(f"{path} has no model.diffusion_model.* keys, so it is not an SD1.5 checkpoint; "
                         f"it looks like {describe(checkpoint)}")
    if "label_emb.0.0.weight" in unet:
        raise ValueError(f"{path} is not an SD1.5 UNet: it has class / size conditioning (label_emb), as SDXL does")
    try:
        config = sd15_config_from_ldm(unet, num_heads)
    except (KeyError, ValueError, StopIteration) as e:
        raise ValueError(f"{path}: its model.diffusion_model.* keys do not follow the SD1.5 UNet layout: {e}") from e
    _check_sd15_layout(config, path)
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    weights = convert_ldm_unet_checkpoint(checkpoint, config)
    used = {id(v) for v in weights.values()}
    _check_complete(weights, config, path, unconverted=[LDM_PREFIX + k for k, v in unet.items() if id(v) not in used])
    return weights, config


def _load_diffusers_folder(folder: Path) -> tuple:
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    config_file = unet_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers UNet folder: it has no config.json "
                                f"(nor unet/config.json)")
    config = json.loads(config_file.read_text())
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"{config_file} describes a {config['_class_name']}, not a UNet2DConditionModel")
    weights_file = next((unet_dir / n for n in DIFFUSERS_WEIGHTS if (unet_dir / n).is_file()), None)
    if weights_file is None:
        raise FileNotFoundError(f"{unet_dir} has config.json but none of {DIFFUSERS_WEIGHTS} "
                                f"(it holds {sorted(p.name for p in unet_dir.iterdir())})")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    _check_sd15_layout(config, config_file)
    weights, _ = read_state_dict(weights_file)
    _check_complete(weights, config, weights_file)
    return weights, config


def _check_sd15_layout(config: dict, source) -> None:
    """SD1.5 = cross-attention in every down/up block but the lowest resolution, one conv-projected transformer
    block per attention, a text cross-attention, no class / size embedding. (EMONet hard-codes this layout.)"""
    n = len(config.get("block_out_channels", ()))
    problems = []
    if list(config.get("down_block_types", [])) != ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]:
        problems.append(f"down blocks {config.get('down_block_types')}")
    if list(config.get("up_block_types", [])) != ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1):
        problems.append(f"up blocks {config.get('up_block_types')}")
    if config.get("use_linear_projection"):
        problems.append("linear proj_in/proj_out (SD2.x / SDXL style)")
    depth = config.get("transformer_layers_per_block", 1)
    if any(d != 1 for d in (depth if isinstance(depth, (list, tuple)) else [depth])):
        problems.append(f"transformer_layers_per_block {depth}")
    if config.get("addition_embed_type") or config.get("class_embed_type"):
        problems.append("class / added-condition embeddings (SDXL style)")
    if problems:
        raise ValueError(f"{source} is not an SD1.5-layout UNet: " + "; ".join(problems))


def _check_complete(weights: dict, config: dict, source, unconverted=()) -> None:
    """Compare against the keys and shapes of `UNet2DConditionModel(config)` (built on the meta device)."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UNet2DConditionModel.from_config(config).state_dict().items()}
    missing = [k for k in expected if weights.get(k) is None]
    unexpected = [k for k in weights if k not in expected] + list(unconverted)
    wrong = [f"{k} {tuple(weights[k].shape)} (expected {expected[k]})" for k in expected
             if weights.get(k) is not None and tuple(weights[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        parts = [f"{name} {few(keys, 3)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ValueError(f"{source} is not a complete SD1.5-layout UNet: " + "; ".join(parts))


def init_from_sd15(model: nn.Module, path, num_heads: int | None = None) -> InitReport:
    """Copy SD1.5 UNet weights into both `reference_net.*` and `backbone.*` of an EMONet wherever the name exists
    in the model and the shape matches; everything else keeps the model's own initialisation.

    Expected skips: ReferenceNet has no conv_norm_out/conv_out (and, in EMO presets without identity tokens, no
    attn2/norm2); in the EMO preset the Backbone's attn2.to_k/to_v read reference features (width C) instead of
    768-d text, so they keep their own init. The audio, motion and speed layers, face locator and projections are
    not in SD1.5 at all. Raises ValueError when fewer than half of the file's tensors fit either UNet (a UNet of
    other widths). num_heads: defaults to the model's `cfg.unet.num_heads`."""
    heads = num_heads or model.cfg.unet.num_heads
    weights, config = _load_sd15(path, heads)
    state = model.state_dict()
    report = InitReport(source=str(path), loaded={prefix: [] for prefix in UNET_PREFIXES})
    plan = []
    for prefix in UNET_PREFIXES:
        for key, tensor in weights.items():
            name = prefix + key
            if name not in state:
                report.no_home.append(name)
            elif state[name].shape != tensor.shape:
                report.mismatched.append((name, tuple(tensor.shape), tuple(state[name].shape)))
            else:
                plan.append((state[name], tensor))
                report.loaded[prefix].append(name)
        if len(report.loaded[prefix]) < len(weights) / 2:
            u = model.cfg.unet
            raise ValueError(
                f"{path}: only {len(report.loaded[prefix])} of its {len(weights)} UNet tensors fit the model's "
                f"{prefix}*: the file's UNet has block_out_channels {list(config['block_out_channels'])}, "
                f"layers_per_block {config['layers_per_block']}, cross_attention_dim {config['cross_attention_dim']};"
                f" the model's config has {list(u.block_out_channels)}, {u.layers_per_block}, "
                f"{u.cross_attention_dim}")
    _copy(plan)
    written = set().union(*report.loaded.values())
    report.left_at_init = [k for k in state if k not in written]
    return report


# ---- AnimateDiff motion modules --------------------------------------------------------------------------------

def load_motion_module(path) -> dict:
    """An AnimateDiff motion-module file (`mm_sd_v15_v2.ckpt` / .safetensors) as {key: tensor}, keys as AnimateDiff
    spells them, e.g. `down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0
    .pos_encoder.pe` (1, 32, 320). A "state_dict" wrapper and a `module.` key prefix are removed."""
    state = {k.removeprefix("module."): v for k, v in read_state_dict(path)[0].items()}
    if not any(".motion_modules." in k for k in state):
        raise ValueError(f"{path} has no *.motion_modules.* keys, so it is not an AnimateDiff motion module; "
                         f"it looks like {describe(state)}")
    if not any(".temporal_transformer." in k for k in state):
        raise ValueError(f"{path} is in diffusers' MotionAdapter format (no temporal_transformer in its keys); "
                         f"use the original AnimateDiff file (mm_sd_v15_v2.ckpt)")
    return state


def init_motion_modules(model: nn.Module, path, strict: bool = True) -> InitReport:
    """Copy AnimateDiff motion-module weights into `backbone.` + key.

    Every motion-module key of the model (except the EMO-only speed_attention, which keeps its own zero-output
    init) must be in the file, and every file key must exist in the model with its shape; otherwise ValueError
    naming them. strict=False instead loads what fits and reports the rest (e.g. AnimateDiff v1 files, which have
    no mid-block motion module: that module then stays at its own initialisation, an identity).

    Positional tables (`pos_encoder.pe`, (1, max_len, C)) of another length are not an error: AnimateDiff's table
    is the same fixed sinusoid as ours, only longer or shorter (v1: 24 positions, v2: 32). We copy the first
    min(file, model) positions and keep the model's own rows beyond, so a longer model table stays the correct
    sinusoid and a shorter one is a truncation; each such copy is noted in `report.adapted`."""
    weights = load_motion_module(path)
    state = model.state_dict()
    targets = {k.removeprefix("backbone."): k for k in state
               if k.startswith("backbone.") and ".motion_modules." in k and ".speed_attention." not in k}
    report = InitReport(source=str(path), loaded={"backbone.": []})
    plan = []
    for key, tensor in weights.items():
        if key not in targets:
            report.no_home.append("backbone." + key)
            continue
        name, target = targets[key], state[targets[key]]
        if key.endswith(".pos_encoder.pe") and tensor.ndim == 3 and tensor.shape[::2] == target.shape[::2] \
                and tensor.shape[1] != target.shape[1]:
            rows = min(tensor.shape[1], target.shape[1])
            target, tensor = target[:, :rows], tensor[:, :rows]
            report.adapted.append((name, f"pos_encoder.pe: file has {weights[key].shape[1]} positions, model "
                                         f"{state[name].shape[1]}; copied the first {rows}"))
        if tensor.shape != target.shape:
            report.mismatched.append((name, tuple(tensor.shape), tuple(target.shape)))
            continue
        plan.append((target, tensor))
        report.loaded["backbone."].append(name)
    missing = [k for k in targets if k not in weights]
    if strict and (missing or report.no_home or report.mismatched):
        parts = [f"{what} {few(keys, 3)}" for what, keys in (
            ("missing", missing), ("unexpected", [k.removeprefix("backbone.") for k in report.no_home]),
            ("wrong shape", [f"{k} file {a} model {b}" for k, a, b in report.mismatched])) if keys]
        hint = ""
        if missing and all(k.startswith("mid_block.") for k in missing):
            hint = (" (AnimateDiff v1 files have no mid-block motion module: use mm_sd_v15_v2, or strict=False to "
                    "leave it at its own initialisation)")
        raise ValueError(f"{path} does not fit the model's motion modules: " + "; ".join(parts) + hint)
    _copy(plan)
    written = set(report.loaded["backbone."])
    report.left_at_init = [k for k in state if ".motion_modules." in k and k not in written]
    return report


# ---- helpers ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def _copy(plan: list) -> None:
    """plan: [(model tensor or view of it, source tensor)]; casts to the model's dtype and device."""
    for target, source in plan:
        target.copy_(source)


def _by_note(pairs) -> dict:
    out = {}
    for key, note in pairs:
        out.setdefault(note, []).append(key)
    return out
