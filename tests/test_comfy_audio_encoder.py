"""The wav2vec2 weights inside ComfyUI's own AUDIO_ENCODER load into our feature extractor unchanged.

Runs ComfyUI's real `comfy.audio_encoders.wav2vec2` (from COMFYUI_PATH, or the snapshot in ../shared/comfyui
extracted to a temporary folder) in a subprocess, so none of ComfyUI's global state enters this process.
"""

import os
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from emo_core.audio import Wav2Vec2Features

from .conftest import REPO

COMFY_SCRIPT = textwrap.dedent("""
    import sys
    out = sys.argv[1]
    sys.argv = ["comfy", "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.ops, torch
    from comfy.audio_encoders.wav2vec2 import Wav2Vec2Model
    from safetensors.torch import save_file

    torch.manual_seed(0)
    # ComfyUI's base-style layout (as load_audio_encoder_from_sd builds it for 768-wide files), small widths
    model = Wav2Vec2Model(embed_dim=64, num_heads=4, num_layers=2, conv_norm=False, conv_bias=False,
                          do_normalize=False, do_stable_layer_norm=False, dtype=torch.float32, device="cpu",
                          operations=comfy.ops.manual_cast).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * (1 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.05)
                    + (1 if p.ndim == 1 and p.shape[0] in (64, 512) else 0))
        audio = torch.randn(1, 1, 16000)
        _, layers = model(audio)
    save_file({**{"weights." + k: v.contiguous() for k, v in model.state_dict().items()},
               "audio": audio[0, 0], "layers": torch.stack(layers)[:, 0]}, out)
""")


def comfy_root(tmp_path_factory, whole: bool = False):
    """COMFYUI_PATH, or the snapshot extracted to a temporary folder (only comfy/ unless `whole`)."""
    if os.environ.get("COMFYUI_PATH"):
        return os.environ["COMFYUI_PATH"]
    tarballs = sorted((REPO.parent / "shared" / "comfyui").glob("ComfyUI-*.tar.gz"))
    if not tarballs:
        print("\n" + "=" * 70 + "\nSKIPPED: no ComfyUI found (set COMFYUI_PATH): AUDIO_ENCODER weight test\n" + "=" * 70)
        pytest.skip("no ComfyUI checkout or snapshot found; set COMFYUI_PATH")
    target = tmp_path_factory.mktemp("comfyui")
    with tarfile.open(tarballs[-1]) as t:
        t.extractall(target, members=[m for m in t.getmembers() if whole or m.name.startswith("ComfyUI/comfy/")],
                     filter="data")
    return target / "ComfyUI"


def test_comfyui_audio_encoder_weights_load_unchanged(tmp_path_factory, tmp_path):
    root = comfy_root(tmp_path_factory)
    out = tmp_path / "comfy_wav2vec2.safetensors"
    run = subprocess.run([sys.executable, "-c", COMFY_SCRIPT, str(out)], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    data = load_file(out)
    weights = {k[len("weights."):]: v for k, v in data.items() if k.startswith("weights.")}
    ours = Wav2Vec2Features.from_state_dict(weights, num_heads=4)  # what the EMO Encode Audio node does
    with torch.no_grad():
        hidden = ours.model(data["audio"][None], output_hidden_states=True).hidden_states
    torch.testing.assert_close(torch.stack(hidden)[:, 0], data["layers"], atol=1e-4, rtol=0)
