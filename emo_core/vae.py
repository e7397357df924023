"""The SD1.5 VAE outside ComfyUI (CLI, tests, benchmark): diffusers' AutoencoderKL as a `LatentCodec`.

Inside ComfyUI the nodes use the core VAE object instead. Latents are `latent_dist.mean × scale` (0.18215 for
SD1.5; Hallo uses that constant rather than the config's scaling factor).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL


def load_vae_folder(folder) -> AutoencoderKL:
    """A diffusers VAE folder (config.json + weights, as `train-vae` writes and SD VAE releases ship), with a clear
    error for anything else."""
    folder = Path(folder)
    what = "a diffusers VAE folder (config.json and diffusion_pytorch_model.safetensors, as train-vae writes)"
    if not folder.is_dir():
        raise FileNotFoundError(f"the VAE {folder} is not a folder: give {what}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"the VAE folder {folder} has no readable config.json ({e}): give {what}") from None
    if config.get("_class_name") != "AutoencoderKL":
        raise ValueError(f"{folder} holds a {config.get('_class_name') or 'model without a class name'}, not a VAE: "
                         f"give {what}")
    if not any((folder / f"diffusion_pytorch_model.{ext}").is_file() for ext in ("safetensors", "bin")):
        raise FileNotFoundError(f"the VAE folder {folder} has no weights (diffusion_pytorch_model.safetensors): "
                                f"give {what}")
    return AutoencoderKL.from_pretrained(folder, local_files_only=True)


class DiffusersVAE:
    def __init__(self, vae: AutoencoderKL, scale: float = 0.18215, decode_batch: int = 8):
        self.vae, self.scale, self.decode_batch = vae, scale, decode_batch

    @classmethod
    def from_files(cls, weights, config=None, dtype=torch.float32, device="cpu", scale: float = 0.18215):
        """weights: a diffusers VAE folder, or a .safetensors state dict with `config` (a diffusers config json)
        beside it or given explicitly."""
        weights = Path(weights)
        if not weights.exists():
            raise FileNotFoundError(f"VAE not found: {weights} (give a diffusers VAE folder, e.g. sd-vae-ft-mse/, or "
                                    f"its .safetensors with the config.json beside it)")
        if weights.is_dir():
            vae = load_vae_folder(weights)
        else:
            from .checkpoint import read_state_dict

            config = Path(config) if config else _find_config(weights)
            vae = AutoencoderKL.from_config(json.loads(config.read_text()))
            state_dict, _ = read_state_dict(weights)
            vae.load_state_dict(state_dict)
        return cls(vae.to(device=device, dtype=dtype).eval(), scale)

    @classmethod
    def from_state_dict(cls, config: dict, state_dict: dict, dtype=torch.float32, device="cpu",
                        scale: float | None = None):
        """A diffusers AutoencoderKL from its config and weights (e.g. the VAE bundled inside an EMO checkpoint);
        the latent scale defaults to the config's scaling_factor."""
        vae = AutoencoderKL.from_config(config)
        vae.load_state_dict(state_dict)
        scale = scale if scale is not None else vae.config.scaling_factor
        return cls(vae.to(device=device, dtype=dtype).eval(), scale)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: (N, 3, H, W) in [-1, 1] -> (N, 4, H/8, W/8)
        with torch.no_grad():
            return self.vae.encode(pixels.to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist.mean * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # latents: (N, 4, h, w) -> (N, 3, 8h, 8w) in [0, 1], decoded a few frames at a time
        out = []
        with torch.no_grad():
            for chunk in latents.split(self.decode_batch):
                x = self.vae.decode(chunk.to(device=self.vae.device, dtype=self.vae.dtype) * (1 / self.scale)).sample
                out.append((x / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)


def ldm_config(config: dict) -> dict:
    """The original (LDM) AutoencoderKL settings of a diffusers AutoencoderKL config: what ComfyUI's VAE class
    takes as `config={"params": ...}` to build a VAE of another width than SD's (e.g. a bundled small one).
    Diffusers' per-level widths become LDM's base width times multipliers; LDM norms always have 32 groups."""
    blocks = list(config["block_out_channels"])
    if config.get("norm_num_groups", 32) != 32 or any(c % blocks[0] for c in blocks):
        raise ValueError(f"this VAE (widths {blocks}, {config.get('norm_num_groups')} norm groups) has no LDM "
                         f"equivalent: LDM VAEs use 32 norm groups and widths that are multiples of the first")
    latent = config.get("latent_channels", 4)
    ddconfig = {"double_z": True, "z_channels": latent, "resolution": config.get("sample_size", 256),
                "in_channels": config.get("in_channels", 3), "out_ch": config.get("out_channels", 3),
                "ch": blocks[0], "ch_mult": [c // blocks[0] for c in blocks],
                "num_res_blocks": config.get("layers_per_block", 2), "attn_resolutions": [], "dropout": 0.0}
    return {"embed_dim": latent, "ddconfig": ddconfig}


def random_vae(tiny: bool, dtype=torch.float32, device="cpu", seed: int = 0) -> DiffusersVAE:
    """A randomly initialised VAE of the SD1.5 layout (sd-vae-ft-mse), or a tiny one for tiny models."""
    torch.manual_seed(seed)
    blocks = (16, 16, 32, 32) if tiny else (128, 256, 512, 512)
    vae = AutoencoderKL(block_out_channels=blocks, norm_num_groups=8 if tiny else 32, layers_per_block=1 if tiny else 2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return DiffusersVAE(vae.to(device=device, dtype=dtype).eval())


def _find_config(weights: Path) -> Path:
    for candidate in (weights.with_suffix(".json"), weights.parent / f"{weights.stem}_config.json",
                      weights.parent / "vae_config.json", weights.parent / "config.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no diffusers config found beside the VAE weights {weights}: put its config.json beside "
                            f"it (or give the whole diffusers folder)")
