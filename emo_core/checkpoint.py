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

import hashlib
import json
import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import EMOConfig, from_hallo_configs, preset

FORMAT_TAG = "emo-comfyui/1"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # precision names
HALLO_PREFIXES = {
    "reference_unet.": "reference_net.",
    "denoising_unet.": "backbone.",
    "face_locator.": "face_locator.",
    "imageproj.": "image_proj.",
    "audioproj.": "audio_proj.",
}


# Our checkpoints may carry the VAE and the audio encoder they were trained with (the bundled demo model does):
# tensors under these prefixes, each with its library config (diffusers / transformers JSON) in the metadata.
COMPANIONS = ("vae.", "audio_encoder.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message that says why and what to do."""


def read_state_dict(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a .safetensors or pickled (.ckpt/.pt/.pth/.bin) file on the CPU, unwrapped from
    nested "state_dict" keys.

    Pickles are read with `weights_only=True`: a file whose unpickling would import or call anything beyond
    tensors and plain containers is refused. Raises FileNotFoundError / CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file" + (" (it is a folder)" if path.is_dir() else ""))
    suffix = path.suffix.lower()
    metadata = {}
    if suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                data = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # SafetensorError: truncated, corrupt, or not safetensors at all
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}; "
                                  f"download or copy it again") from e
    elif suffix in PICKLE_SUFFIXES:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" not in str(e):
                raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                                      f"{e}") from e
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            wants = f" (it asks for `{found.group(1)}`)" if found else ""
            raise CheckpointError(
                f"refused to load {path}: unpickling it would import or run code{wants}, which weights_only "
                f"loading forbids. Only plain tensor checkpoints are accepted; if you trust the file, re-save its "
                f"tensors as .safetensors with a trusted tool.") from e
        except Exception as e:  # RuntimeError (bad zip), EOFError, KeyError, ...: truncated or not a checkpoint
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                                  f"{type(e).__name__}: {e}") from e
    else:
        raise CheckpointError(f"{path}: unsupported file type {suffix!r}; expected .safetensors or one of "
                              f"{PICKLE_SUFFIXES}")
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a state dict of tensors")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, metadata


def describe(state: dict, metadata: dict | None = None) -> str:
    """A guess at what a state dict is, from its key names, for error messages."""
    keys = list(state)
    if (metadata or {}).get("format") == FORMAT_TAG:
        return "an EMO checkpoint of this pack"
    if not keys:
        return "a file that holds no tensors"
    has = lambda *parts: any(p in k for k in keys for p in parts)  # noqa: E731
    if has("lora_down", "lora_up", "lora_A", "lora_B", "lora."):
        guess = "a LoRA"
    elif has("denoising_unet.", "reference_unet."):
        return "a Hallo net.pth"
    elif has(".motion_modules."):
        guess = "an AnimateDiff motion module"
    elif has("control_model.", "input_hint_block", "controlnet_cond_embedding"):
        guess = "a ControlNet"
    elif has("conditioner.embedders."):
        guess = "an SDXL-family checkpoint"
    elif has("model.diffusion_model."):
        guess = "an original Stable Diffusion single-file checkpoint (use it to initialise training)"
    elif has("first_stage_model.", "encoder.conv_in.", "decoder.conv_out.", "encoder.down.", "decoder.up.",
             "quant_conv.", "encoder.down_blocks."):
        guess = "a VAE (it belongs in models/vae)"
    elif has("wav2vec2.", "feature_extractor.conv_layers"):
        guess = "a wav2vec2 audio encoder (it belongs in models/audio_encoders)"
    elif has("cond_stage_model.", "text_model.", "text_projection"):
        guess = "a CLIP text encoder"
    elif "conv_in.weight" in state and has("down_blocks.0.resnets.0."):
        guess = "diffusers-format UNet weights"
    else:
        return f"an unknown state dict, keys {few(sorted(keys))}"
    return f"{guess}; keys {few(sorted(keys))}"


def few(items, n: int = 5) -> str:
    items = list(items)
    return f"[{', '.join(map(str, items[:n]))}{', ...' if len(items) > n else ''}] ({len(items)})"


def group_keys(keys) -> str:
    """Keys counted by kind, e.g. 'backbone.*.audio_modules (40), face_locator (8)'."""
    kinds = ("speed_attention", "motion_modules", "audio_modules", "attn2", "norm2")

    def kind(key: str) -> str:
        parts = key.split(".")
        found = next((k for k in kinds if k in parts), None)
        if found:
            return f"{parts[0]}.*.{found}"
        return ".".join(parts[:2]) if parts[0] in ("reference_net", "backbone") else parts[0]

    return ", ".join(f"{k} ({n})" for k, n in Counter(map(kind, keys)).items())


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
                parts.append(f"{len(items)} {name} keys in {group_keys(items)}, e.g. {items[0]}")
        if shapes:
            parts.append(f"{len(shapes)} with another shape, e.g. " + "; ".join(shapes[:3]))
        parts.append("Is this the right file for this config? A Hallo checkpoint that is not SD1.5-sized needs its "
                     "config beside it (<name>.emo.json).")
        raise CheckpointError("\n".join(parts))


def _sidecar_config(path: Path) -> EMOConfig | None:
    """The config beside a checkpoint: `<name>.emo.json` (ours) or a `config.json` in Hallo vocabulary."""
    own, hallo = path.with_suffix(".emo.json"), path.parent / "config.json"
    try:
        if own.is_file():
            return EMOConfig.from_json(own.read_text())
        if hallo.is_file():
            voc = json.loads(hallo.read_text()).get("hallo_vocabulary")
            if voc:
                return from_hallo_configs(voc["stable_diffusion_unet_config.json"], voc["inference_yaml"],
                                          voc["AudioProjModel"], voc["ImageProjModel"], voc.get("FaceLocator"))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"the config beside {path.name} ({own.name if own.is_file() else hallo.name}) is "
                              f"not a valid EMO or Hallo config: {type(e).__name__}: {e}") from e
    return None


@dataclass
class Checkpoint:
    config: EMOConfig
    state_dict: dict  # the model's tensors in our key names, on the CPU
    looks_like: str  # what the file looks like, for error messages
    companions: dict  # {"vae"|"audio_encoder": (config dict, state dict)} bundled in one of our files, else {}


def read_checkpoint(path, config: EMOConfig | None = None) -> Checkpoint:
    """Read any supported checkpoint once: the model and whatever it carries. The config comes from the file
    (ours), beside it, or the `hallo` preset; `config` overrides it."""
    path = Path(path)
    state_dict, metadata = read_state_dict(path)
    looks_like = describe(state_dict, metadata)
    if metadata.get("format") == FORMAT_TAG:
        try:
            own = EMOConfig.from_json(metadata["emo_config"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path.name}: its embedded EMO config is missing or invalid ({e}); the file was "
                                  f"not written by this pack or is damaged") from e
        looks_like = f"an EMO checkpoint of config {own.name!r} ({'x'.join(map(str, own.unet.block_out_channels))})"
        model_keys = {k: v for k, v in state_dict.items() if not k.startswith(COMPANIONS)}
        return Checkpoint(config or own, model_keys, looks_like, _companions(state_dict, metadata))
    if looks_like == "a Hallo net.pth":
        if config is None:
            config = _sidecar_config(path)
        if config is None:
            conv_in = state_dict.get("denoising_unet.conv_in.weight")
            if conv_in is None or conv_in.shape[0] != 320:
                width = "unknown width" if conv_in is None else f"width {conv_in.shape[0]}"
                raise CheckpointError(f"{path.name} is a Hallo checkpoint of {width} (not SD1.5); its config is "
                                      f"needed beside it as {path.with_suffix('.emo.json').name}")
            config = preset("hallo")
        return Checkpoint(config, hallo_to_emo(state_dict), looks_like, {})
    raise CheckpointError(f"{path.name} is not an EMO or Hallo checkpoint: it looks like {looks_like}.")


def load_checkpoint(path, config: EMOConfig | None = None) -> tuple[EMOConfig, dict, str]:
    """(config, state dict in our key names, what the file looks like) of any supported checkpoint."""
    checkpoint = read_checkpoint(path, config)
    return checkpoint.config, checkpoint.state_dict, checkpoint.looks_like


def build_model(config: EMOConfig, state_dict: dict | None = None, source: str = "checkpoint",
                looks_like: str = "an EMO-family checkpoint", dtype=None, device=None, operations=torch.nn):
    """Build EMONet from a config (and load a state dict strictly, with a readable error on mismatch)."""
    from .models.emo import EMONet

    if state_dict is None:
        return EMONet(config, dtype=dtype, device=device, operations=operations)
    with torch.device("meta"):  # no memory and no random init for weights that are loaded next
        model = EMONet(config, dtype=dtype, operations=operations)
    check_state_dict(model, state_dict, source, looks_like)
    target = model.state_dict()
    tensors = {k: v.to(device=device, dtype=target[k].dtype) for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model


def load_model(path, config: EMOConfig | None = None, dtype=torch.float32, device="cpu", operations=torch.nn):
    config, state_dict, looks_like = load_checkpoint(path, config)
    return build_model(config, state_dict, Path(path).name, looks_like, dtype=dtype, device=device,
                       operations=operations)


def weights_fingerprint(module: torch.nn.Module, salt: bytes = b"") -> str:
    """16 hex digits of a hash of a module's weights (names and bytes): which VAE or wav2vec2 a latent cache or a
    prepared dataset was made with."""
    h = hashlib.sha256(salt)
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """safetensors.torch.save_file, and the file then gets the permissions any new file gets (0o666 less the
    umask). safetensors 0.8 writes through a temporary file that is always 0o600 (safetensors issue #782): a model
    trained by one user, or in a Docker build, could not be read by a ComfyUI that runs as another."""
    kept = Path(path).stat().st_mode & 0o777 if Path(path).is_file() else None  # a file replaced keeps its mode
    save_file(tensors, str(path), metadata=metadata)
    if kept is None:
        give_ordinary_mode(path)
    else:
        os.chmod(path, kept)


def give_ordinary_mode(*paths) -> None:
    """chmod each file to 0o666 less the process's umask: what open() would have created."""
    umask = _umask()
    for p in paths:
        os.chmod(p, 0o666 & ~umask)


def _umask() -> int:
    try:  # Linux: read it without changing it (setting it briefly would race with other threads' new files)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o077)  # elsewhere: set a strict one for the moment it takes to read the old one
    os.umask(umask)
    return umask


def save_checkpoint(model, path, metadata: dict | None = None, extra: dict | None = None, dtype=None) -> None:
    """Our format: one safetensors file, the config in its metadata. `extra`: more tensors under their own prefixes
    (the bundled VAE and audio encoder); `dtype`: store floating-point tensors in this precision."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in {**model.state_dict(), **(extra or {})}.items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_safetensors(tensors, path, metadata={**(metadata or {}), "format": FORMAT_TAG,
                                              "emo_config": model.cfg.to_json()})


def load_companions(path) -> dict:
    """The VAE and audio encoder inside one of our checkpoints: {"vae"|"audio_encoder": (config dict, state dict)}
    for those it carries (none for other files)."""
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT_TAG or not any(f"{p[:-1]}_config" in metadata for p in COMPANIONS):
        return {}
    return _companions(read_state_dict(path)[0], metadata)


def _companions(state_dict: dict, metadata: dict) -> dict:
    found = {}
    for prefix in COMPANIONS:
        name = prefix[:-1]
        if f"{name}_config" in metadata:
            found[name] = (json.loads(metadata[f"{name}_config"]),
                           {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
    return found


def read_metadata(path) -> dict:
    """The safetensors metadata of a file ({} for other formats)."""
    if Path(path).suffix.lower() != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
