"""A VAE bundled in an EMO checkpoint, of another width than SD's, is built by ComfyUI's own VAE class from the
settings `emo_core.vae.ldm_config` derives, and decodes exactly as diffusers does (what Load EMO's VAE output and
core VAE Decode rely on). ComfyUI runs in a subprocess, as in test_comfy_audio_encoder."""

import json
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file, save_file

from emo_core.train import small_vae
from emo_core.vae import ldm_config

from .test_comfy_audio_encoder import comfy_root

COMFY_SCRIPT = textwrap.dedent("""
    import json, sys
    weights, config, latents, out = sys.argv[1:5]
    sys.argv = ["comfy", "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.sd, torch
    from safetensors.torch import load_file, save_file

    vae = comfy.sd.VAE(sd=load_file(weights), config={"params": json.load(open(config))}, dtype=torch.float32)
    images = vae.decode(load_file(latents)["latents"])  # (N, H, W, 3) in [0, 1]
    encoded = vae.encode(images)
    save_file({"images": images.contiguous(), "encoded": encoded.contiguous()}, out)
""")


def test_comfyui_builds_and_decodes_the_bundled_vae(tmp_path_factory, tmp_path):
    root = comfy_root(tmp_path_factory, whole=True)
    torch.manual_seed(0)
    vae = small_vae(64).eval()
    with torch.no_grad():
        for p in vae.parameters():  # away from the default init, so every layer matters
            p.add_(torch.randn_like(p) * 0.02)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp_path / "vae.safetensors")
    (tmp_path / "ldm.json").write_text(json.dumps(ldm_config(dict(vae.config))))
    latents = torch.randn(2, 4, 8, 8)
    save_file({"latents": latents}, tmp_path / "latents.safetensors")
    run = subprocess.run([sys.executable, "-c", COMFY_SCRIPT, str(tmp_path / "vae.safetensors"),
                          str(tmp_path / "ldm.json"), str(tmp_path / "latents.safetensors"), str(tmp_path / "out.st")],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = load_file(tmp_path / "out.st")
    with torch.no_grad():
        want = (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        encoded = vae.encode(got["images"].permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean
    torch.testing.assert_close(got["images"], want, atol=1e-4, rtol=0)
    torch.testing.assert_close(got["encoded"], encoded, atol=1e-3, rtol=0)
