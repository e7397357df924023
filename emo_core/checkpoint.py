"""Reading and writing EMO-family checkpoints.

Formats, detected automatically:

* ours: one `.safetensors` file whose metadata holds the config (`emo_config`, JSON) and format tag;
* Hallo's `net.pth` (or the same state dict as safetensors): prefixes reference_unet., denoising_unet.,
  face_locator., imageproj., audioproj. At SD1.5 size it is the `hallo` preset; at any other size the config
  must lie beside it (`<name>.emo.json` in our format, or a `config.json` in Hallo vocabulary as the parity
  fixture has).

Pickles are only ever read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import EMOConfig, from_hallo_configs, preset

FORMAT_TAG = "emo-comfyui/1"
HALLO_PREFIXES = {
    "reference_unet.": "reference_net.",
    "denoising_unet.": "backbone.",
    "face_locator.": "face_locator.",
    "imageproj.": "image_proj.",
    "audioproj.": "audio_proj.",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message that says why and what to do."""


def read_state_dict(path) -> tuple[dict, dict]:
    """Returns (tensors, metadata) of a .safetensors / .pth / .ckpt / .bin file, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path.name}: not a readable safetensors file ({e}); the file may be truncated "
                                  f"or corrupt: download or copy it again") from e
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path.name}: refused to load: this pickle contains code or objects that are not "
                              f"plain tensors, and loading it could run that code. Use a .safetensors file or a "
                              f"checkpoint saved as a plain state dict. ({str(e).splitlines()[0]})") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path.name}: not a readable PyTorch checkpoint ({e}); the file may be truncated "
                              f"or corrupt") from e
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path.name}: expected a state dict of tensors, found {type(data).__name__}")
    return data, {}


def describe(state_dict: dict, metadata: dict | None = None) -> str:
    """A short guess of what a state dict is, for error messages."""
    metadata = metadata or {}
    keys = list(state_dict)
    if metadata.get("format") == FORMAT_TAG:
        return "an EMO checkpoint of this pack"
    if any(k.startswith("denoising_unet.") for k in keys):
        return "a Hallo net.pth"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "an original Stable Diffusion single-file checkpoint (load it as SD1.5 initialisation for training)"
    if keys and all(".motion_modules." in k for k in keys):
        return "an AnimateDiff motion-module checkpoint (load it as motion-module initialisation for training)"
    if any(k.startswith(("encoder.down", "decoder.up")) for k in keys):
        return "a VAE (put it in models/vae)"
    if any(k.startswith(("wav2vec2.", "feature_extractor.")) for k in keys):
        return "a wav2vec2 audio encoder (put it in models/audio_encoders)"
    if any("lora" in k for k in keys):
        return "a LoRA"
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
        return "a diffusers UNet"
    return f"an unknown state dict ({len(keys)} tensors, e.g. {keys[:3]})"


def hallo_to_emo(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        for old, new in HALLO_PREFIXES.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            out[key] = value  # left as is: reported as unexpected by check_state_dict
    return out


def check_state_dict(model: torch.nn.Module, state_dict: dict, source: str, looks_like: str):
    """Raise a CheckpointError naming missing / unexpected / mis-shaped keys, if any."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state_dict]
    unexpected = [k for k in state_dict if k not in ours]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(ours[k].shape)}"
              for k in ours if k in state_dict and tuple(state_dict[k].shape) != tuple(ours[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{source} does not match the EMO model it should build; the file looks like {looks_like}."]
        for name, items in (("missing", missing), ("unexpected", unexpected)):
            if items:
                parts.append(f"{len(items)} {name} keys in {_group(items)}, e.g. {items[0]}")
        if shapes:
            parts.append(f"{len(shapes)} with another shape, e.g. " + "; ".join(shapes[:3]))
        parts.append("Is this the right file for this config? A Hallo checkpoint that is not SD1.5-sized needs its "
                     "config beside it (<name>.emo.json).")
        raise CheckpointError("\n".join(parts))


def _group(keys: list) -> str:
    """'backbone.down_blocks (120), image_proj (4)': where a list of keys lives, by their first two names."""
    counts = {}
    for key in keys:
        head = ".".join(key.split(".")[:2]) if key.split(".")[0] in ("backbone", "reference_net") else key.split(".")[0]
        counts[head] = counts.get(head, 0) + 1
    groups = [f"{head} ({n})" for head, n in counts.items()]
    return ", ".join(groups[:8]) + (" ..." if len(groups) > 8 else "")


def _sidecar_config(path: Path) -> EMOConfig | None:
    own = path.with_suffix(".emo.json")
    if own.is_file():
        return EMOConfig.from_json(own.read_text())
    hallo = path.parent / "config.json"
    if hallo.is_file():
        data = json.loads(hallo.read_text())
        voc = data.get("hallo_vocabulary")
        if voc:
            return from_hallo_configs(voc["stable_diffusion_unet_config.json"], voc["inference_yaml"],
                                      voc["AudioProjModel"], voc["ImageProjModel"], voc.get("FaceLocator"))
    return None


def load_checkpoint(path, config: EMOConfig | None = None) -> tuple[EMOConfig, dict, str]:
    """Read any supported checkpoint. Returns (config, state dict in our key names, what the file looks like),
    on the CPU. The config comes from the file (ours), beside it, or the `hallo` preset; `config` overrides it."""
    path = Path(path)
    state_dict, metadata = read_state_dict(path)
    looks_like = describe(state_dict, metadata)
    if metadata.get("format") == FORMAT_TAG:
        own = EMOConfig.from_json(metadata["emo_config"])
        looks_like = f"an EMO checkpoint of config {own.name!r} ({'x'.join(map(str, own.unet.block_out_channels))})"
        return config or own, state_dict, looks_like
    if looks_like == "a Hallo net.pth":
        if config is None:
            config = _sidecar_config(path)
        if config is None:
            width = tuple(state_dict["denoising_unet.conv_in.weight"].shape[:1])
            if width != (320,):
                raise CheckpointError(f"{path.name} is a Hallo checkpoint of width {width[0]} (not SD1.5); its "
                                      f"config is needed beside it as {path.with_suffix('.emo.json').name}")
            config = preset("hallo")
        return config, hallo_to_emo(state_dict), looks_like
    raise CheckpointError(f"{path.name} is not an EMO or Hallo checkpoint: it looks like {looks_like}.")


def build_model(config: EMOConfig, state_dict: dict | None = None, source: str = "checkpoint",
                looks_like: str = "an EMO-family checkpoint", dtype=None, device=None, operations=torch.nn):
    """Build EMONet from a config (and load a state dict strictly, with a readable error on mismatch)."""
    from .models.emo import EMONet

    if state_dict is None:
        return EMONet(config, dtype=dtype, device=device, operations=operations)
    with torch.device("meta"):
        probe = EMONet(config)
    check_state_dict(probe, state_dict, source, looks_like)
    model = EMONet(config, dtype=dtype, device=device, operations=operations)
    model.load_state_dict(state_dict, strict=True)
    return model


def load_model(path, config: EMOConfig | None = None, dtype=torch.float32, device="cpu", operations=torch.nn):
    config, state_dict, looks_like = load_checkpoint(path, config)
    return build_model(config, state_dict, Path(path).name, looks_like, dtype=dtype, device=device,
                       operations=operations)


def save_checkpoint(model, path) -> None:
    """Our format: one safetensors file, the config in its metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": FORMAT_TAG, "emo_config": model.cfg.to_json()})
