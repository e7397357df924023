"""Tiny-but-loadable weights for running the EMO nodes in a real ComfyUI: made here, never downloaded.

ComfyUI's own loaders accept only real layouts (its VAELoader builds an SD-sized VAE, its AudioEncoderLoader only
768- or 1024-wide wav2vec2), so the VAE and the audio encoder have the real sizes with random weights; the EMO
model is tiny, with an audio projection that reads wav2vec2-base features. Cached under ~/.cache/emo-comfyui.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

VERSION = "1"


def tiny_emo_config():
    from emo_core.config import preset

    cfg = preset("tiny")
    cfg.name = "tiny-base-audio"
    cfg.audio.layers, cfg.audio.channels = 12, 768  # wav2vec2-base features, as from ComfyUI's AUDIO_ENCODER
    return cfg


def make_models(root: Path) -> Path:
    """models/{emo,vae,audio_encoders,face_detection} under `root`, built once per VERSION."""
    done = root / f".complete-{VERSION}"
    if done.is_file():
        return root
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from emo_core.checkpoint import save_checkpoint
    from emo_core.models.emo import EMONet
    from emo_core.random_weights import randomize_

    for sub in ("emo", "vae", "audio_encoders", "face_detection"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_checkpoint(randomize_(EMONet(tiny_emo_config()), 0), root / "emo" / "tiny-emo.safetensors")
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    save_file({k: v.half().contiguous() for k, v in vae.state_dict().items()}, root / "vae" / "random-sd-vae.safetensors")
    encoder = Wav2Vec2Model(Wav2Vec2Config())  # wav2vec2-base layout, random weights
    save_file({k: v.half().contiguous() for k, v in encoder.state_dict().items()},
              root / "audio_encoders" / "random-wav2vec2-base.safetensors")
    face = Path(os.environ.get("EMO_FACE_FIXTURE", Path(__file__).resolve().parents[2] / "shared/fixtures/face"))
    shutil.copy(face / "yunet_final.pth", root / "face_detection" / "yunet_final.pth")
    done.write_text("ok")
    return root


if __name__ == "__main__":
    import sys

    print(make_models(Path(sys.argv[1])))
