"""Tiny-but-loadable weights for running the EMO nodes in a real ComfyUI: made here, never downloaded.

ComfyUI's own loaders accept only real layouts (its VAELoader builds an SD-sized VAE, its AudioEncoderLoader only
768- or 1024-wide wav2vec2), so the VAE and the audio encoder have the real sizes with random weights; the EMO
model is tiny, with an audio projection that reads wav2vec2-base features. A tiny Hallo (the parity fixture's
net, in our format with a small random wav2vec2 inside) and a stand-in ArcFace (.onnx) run the face-identity path.
Cached under ~/.cache/emo-comfyui.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

VERSION = "2"


def tiny_emo_config():
    from emo_core.config import preset

    cfg = preset("tiny")
    cfg.name = "tiny-base-audio"
    cfg.audio.layers, cfg.audio.channels = 12, 768  # wav2vec2-base features, as from ComfyUI's AUDIO_ENCODER
    return cfg


def make_models(root: Path) -> Path:
    """models/{emo,vae,audio_encoders,face_detection,insightface} under `root`, built once per VERSION."""
    done = root / f".complete-{VERSION}"
    if done.is_file():
        return root
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from emo_core.checkpoint import save_checkpoint
    from emo_core.models.emo import EMONet
    from emo_core.random_weights import randomize_

    for sub in ("emo", "vae", "audio_encoders", "face_detection", "insightface"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_checkpoint(randomize_(EMONet(tiny_emo_config()), 0), root / "emo" / "tiny-emo.safetensors")
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    save_file({k: v.half().contiguous() for k, v in vae.state_dict().items()},
              root / "vae" / "random-sd-vae.safetensors")
    encoder = Wav2Vec2Model(Wav2Vec2Config())  # wav2vec2-base layout, random weights
    save_file({k: v.half().contiguous() for k, v in encoder.state_dict().items()},
              root / "audio_encoders" / "random-wav2vec2-base.safetensors")
    face = Path(os.environ.get("EMO_FACE_FIXTURE", Path(__file__).resolve().parents[2] / "shared/fixtures/face"))
    shutil.copy(face / "yunet_final.pth", root / "face_detection" / "yunet_final.pth")
    make_tiny_hallo(root / "emo" / "tiny-hallo.safetensors")
    write_tiny_arcface(root / "insightface" / "tiny-arcface.onnx")
    done.write_text("ok")
    return root


def make_tiny_hallo(out: Path) -> Path:
    """The Hallo parity fixture's net in our format, with a random wav2vec2 of the widths its audio projection reads
    (3 layers of 16) inside, so EMO Encode Audio needs no encoder ComfyUI cannot build."""
    from emo_core.audio import random_audio_encoder
    from emo_core.checkpoint import build_model, read_checkpoint
    from emo_core.train import save_bundle

    from .conftest import hallo_fixture_dir

    loaded = read_checkpoint(hallo_fixture_dir() / "net.safetensors")
    model = build_model(loaded.config, loaded.state_dict, "net.safetensors", loaded.looks_like)
    encoder = random_audio_encoder(loaded.config.audio.layers, loaded.config.audio.channels, seed=0).model
    return save_bundle(model, out, audio_encoder=encoder)


if __name__ == "__main__":
    import sys

    print(make_models(Path(sys.argv[1])))


def write_tiny_arcface(path: Path, dim: int = 512, builtin_normalisation: bool = False, seed: int = 0) -> torch.Tensor:
    """A stand-in for an InsightFace recognition model (.onnx): (N, 3, 112, 112) -> 8x8 average pool -> a random
    linear map to `dim` values. With builtin_normalisation the graph starts with Sub and Mul nodes named as in
    InsightFace's older exports (so it takes 0..255 pixels). Returns the linear map (588, dim)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = torch.randn(3 * 14 * 14, dim, generator=torch.Generator().manual_seed(seed)) / 24
    nodes, source = [], "input.1"
    if builtin_normalisation:
        nodes += [helper.make_node("Sub", ["input.1", "mean"], ["centred"], name="_minus0"),
                  helper.make_node("Mul", ["centred", "scale"], ["normalised"], name="_mul0")]
        source = "normalised"
    nodes += [helper.make_node("AveragePool", [source], ["pooled"], name="pool", kernel_shape=[8, 8], strides=[8, 8]),
              helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
              helper.make_node("MatMul", ["flat", "weight"], ["683"], name="fc")]
    initializers = [numpy_helper.from_array(weight.numpy(), "weight")]
    if builtin_normalisation:
        initializers += [numpy_helper.from_array(np.array(127.5, dtype=np.float32), "mean"),
                         numpy_helper.from_array(np.array(1 / 127.5, dtype=np.float32), "scale")]
    graph = helper.make_graph(nodes, "tiny_arcface",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
                              [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", dim])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return weight
