"""SD1.5 / AnimateDiff initialisation (emo_core.pretrained) on tiny, randomly initialised models. CPU, no network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from emo_core.config import preset
from emo_core.models.emo import EMONet
from emo_core.pretrained import (init_from_sd15, init_motion_modules, load_motion_module, load_sd15_unet,
                                 sd15_config_from_ldm)

TINY_UNET = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, attention_head_dim=4,
                 cross_attention_dim=48, norm_num_groups=8, sample_size=8)  # the UNet of the tiny / hallo-tiny presets


def make_unet(**overrides) -> UNet2DConditionModel:
    """A diffusers SD1.5-layout UNet with random weights everywhere (norm scales included, so copies are visible)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**TINY_UNET, **overrides}).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return make_unet()


@pytest.fixture(scope="module")
def files(unet, tmp_path_factory) -> dict:
    """The tiny UNet saved as a diffusers folder, inside a pipeline folder, and as original LDM single files."""
    root = tmp_path_factory.mktemp("sd15")
    unet.save_pretrained(root / "unet_folder")
    unet.save_pretrained(root / "pipeline" / "unet", safe_serialization=False)  # .bin weights
    (root / "pipeline" / "model_index.json").write_text("{}")
    ldm = to_ldm(unet.state_dict(), layers=1)
    extra = {"first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3),  # VAE and text encoder of a
             "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.randn(48)}  # full checkpoint
    save_file({**ldm, **extra}, root / "sd15.safetensors")
    torch.save({"state_dict": {**ldm, **extra}, "global_step": 1}, root / "sd15.ckpt")
    return {"folder": root / "unet_folder", "pipeline": root / "pipeline", "safetensors": root / "sd15.safetensors",
            "ckpt": root / "sd15.ckpt", "root": root}


# diffusers -> original LDM names (diffusers ships only the other direction, which load_sd15_unet uses).
RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def ldm_name(key: str, layers: int) -> str:
    module, param = key.rsplit(".", 1)
    if module in TOP_LDM:
        return f"{TOP_LDM[module]}.{param}"
    p = key.split(".")
    if p[0] == "down_blocks":
        i = int(p[1])
        if p[2] == "downsamplers":
            return f"input_blocks.{(i + 1) * (layers + 1)}.0.op.{param}"
        block = f"input_blocks.{1 + i * (layers + 1) + int(p[3])}"
    elif p[0] == "mid_block":  # middle_block.0 / .2: ResNets, .1: the transformer
        if p[1] == "resnets":
            return f"middle_block.{2 * int(p[2])}.{'.'.join([RESNET_LDM[p[3]]] + p[4:])}"
        return f"middle_block.1.{'.'.join(p[3:])}"
    else:
        i = int(p[1])
        if p[2] == "upsamplers":  # inside the last output block of the level, after the ResNet (and attention)
            return f"output_blocks.{i * (layers + 1) + layers}.{1 if i == 0 else 2}.conv.{param}"
        block = f"output_blocks.{i * (layers + 1) + int(p[3])}"
    if p[2] == "resnets":
        return f"{block}.0.{'.'.join([RESNET_LDM[p[4]]] + p[5:])}"
    return f"{block}.1.{'.'.join(p[4:])}"


def to_ldm(state: dict, layers: int) -> dict:
    return {"model.diffusion_model." + ldm_name(k, layers): v.clone() for k, v in state.items()}


# ---- loading SD1.5 UNets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["folder", "pipeline", "safetensors", "ckpt"])
def test_load_sd15_unet_every_format(unet, files, kind):
    expected = unet.state_dict()
    loaded = load_sd15_unet(files[kind])
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_config_from_ldm_shapes(unet):
    ldm = {k.removeprefix("model.diffusion_model."): v for k, v in to_ldm(unet.state_dict(), layers=1).items()}
    config = sd15_config_from_ldm(ldm, num_heads=4)
    assert config["block_out_channels"] == [32, 32, 64, 64]
    assert config["layers_per_block"] == 1
    assert config["cross_attention_dim"] == 48
    assert config["down_block_types"] == list(unet.config.down_block_types)
    assert config["up_block_types"] == list(unet.config.up_block_types)
    assert not config["use_linear_projection"]


def test_ldm_conversion_with_two_layers_per_block(tmp_path):
    """SD1.5's real layout has 2 ResNets per down level (12 input blocks): check the block arithmetic there too."""
    unet = make_unet(layers_per_block=2, block_out_channels=(8, 16, 16, 16), cross_attention_dim=12,
                     attention_head_dim=2)
    save_file(to_ldm(unet.state_dict(), layers=2), tmp_path / "two.safetensors")
    loaded = load_sd15_unet(tmp_path / "two.safetensors", num_heads=2)
    assert all(torch.equal(loaded[k], v) for k, v in unet.state_dict().items())
    assert set(loaded) == set(unet.state_dict())


# ---- init_from_sd15 --------------------------------------------------------------------------------------------

def test_init_from_sd15_copies_into_both_unets(unet, files):
    model = EMONet(preset("hallo-tiny"))
    report = init_from_sd15(model, files["safetensors"])
    sd, state = unet.state_dict(), model.state_dict()
    assert len(report.loaded["backbone."]) == len(sd)
    assert len(report.loaded["reference_net."]) == len(sd) - 4
    assert sorted(report.no_home) == sorted(f"reference_net.{m}.{p}" for m in ("conv_norm_out", "conv_out")
                                            for p in ("weight", "bias"))
    assert report.mismatched == []
    for prefix in ("reference_net.", "backbone."):
        for key in report.loaded[prefix]:
            assert torch.equal(state[key], sd[key.removeprefix(prefix)]), key
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(state["backbone." + key], sd[key]) and torch.equal(state["reference_net." + key], sd[key])
    left = set(report.left_at_init)
    assert not left & set(report.loaded["backbone."])
    for part in ("audio_modules", "motion_modules", "face_locator.", "audio_proj.", "image_proj."):
        assert any(part in k for k in left), part
    assert not any(k.startswith(("reference_net.", "backbone.")) and ".audio_modules." not in k
                   and ".motion_modules." not in k for k in left)
    text = report.summary()
    assert "reference_net.conv_out (2)" in text and "backbone.*.audio_modules" in text and "face_locator" in text


def test_reference_net_computes_like_diffusers(unet, files):
    """Every ReferenceNet feature (LayerNorm1 output of each transformer block) equals diffusers' on the same
    weights, so the reference features of an SD1.5-initialised ReferenceNet are SD1.5's."""
    model = EMONet(preset("hallo-tiny")).eval()
    init_from_sd15(model, files["folder"])
    torch.manual_seed(1)
    latents, context = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 48)
    seen = []
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    hooks = [b.norm1.register_forward_hook(lambda mod, args, out: seen.append(out)) for b in blocks]
    try:
        with torch.no_grad():
            unet(latents, 0, encoder_hidden_states=context)
            bank = model.reference_net(latents, 0, context)
    finally:
        for h in hooks:
            h.remove()
    assert len(bank) == len(seen) == 10  # 3 down + 1 mid + 2 x 3 up transformer blocks (layers_per_block 1)
    for ours, theirs in zip(bank, seen):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_init_from_sd15_emo_preset_reports_skips(files):
    model = EMONet(preset("tiny"))  # EMO: cross-attention reads reference features; ReferenceNet has no attn2
    before = {k: v.clone() for k, v in model.state_dict().items() if "attn2.to_k" in k}
    report = init_from_sd15(model, files["ckpt"])
    mismatched = [k for k, _, _ in report.mismatched]
    assert mismatched and all(k.startswith("backbone.") and (".attn2.to_k." in k or ".attn2.to_v." in k)
                              for k in mismatched)
    assert len(mismatched) == 2 * 10  # to_k and to_v of 10 transformer blocks (3 down, 1 mid, 2 x 3 up)
    assert any(".attn2." in k and k.startswith("reference_net.") for k in report.no_home)
    for key, value in before.items():  # skipped tensors keep the model's own init
        assert torch.equal(model.state_dict()[key], value)
    assert set(mismatched) <= set(report.left_at_init)
    assert any(".speed_attention." in k for k in report.left_at_init)
    text = report.summary()
    assert "shape mismatch" in text and "backbone.*.attn2" in text and "speed_attention" in text


def test_init_from_sd15_refuses_a_unet_of_other_widths(tmp_path):
    other = make_unet(block_out_channels=(16, 16, 32, 32), cross_attention_dim=24)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"only \d+ of its \d+ UNet tensors fit"):
        init_from_sd15(EMONet(preset("hallo-tiny")), tmp_path / "other")


# ---- bad inputs ------------------------------------------------------------------------------------------------

class Malicious:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": Malicious(marker)},
               tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="refused to load .*evil.ckpt.*run code"):
        load_sd15_unet(tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="refused"):
        load_motion_module(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_truncated_files(files, tmp_path):
    for name in ("sd15.safetensors", "sd15.ckpt"):
        data = (files["root"] / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=rf"{name} is not a readable .*truncated"):
            load_sd15_unet(tmp_path / name)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_sd15_unet(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_sd15_unet(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        load_sd15_unet(tmp_path / "noweights")


@pytest.mark.parametrize("keys, looks_like", [
    ({"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_out.weight": (3, 8, 3, 3)}, "a VAE"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)}, "a LoRA"),
    ({"down_blocks.0.motion_modules.0.temporal_transformer.norm.weight": (32,)}, "an AnimateDiff motion module"),
    ({"cond_stage_model.transformer.text_model.final_layer_norm.weight": (48,)}, "a CLIP text encoder"),
])
def test_not_a_unet(tmp_path, keys, looks_like):
    save_file({k: torch.zeros(s) for k, s in keys.items()}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=f"no model.diffusion_model.* keys.*it looks like {looks_like}"):
        load_sd15_unet(tmp_path / "x.safetensors")


def test_incomplete_ldm_unet(unet, tmp_path):
    ldm = to_ldm(unet.state_dict(), layers=1)
    del ldm["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    ldm["model.diffusion_model.input_blocks.1.0.stray.weight"] = torch.zeros(1)
    save_file(ldm, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match=r"broken.safetensors is not a complete SD1.5-layout UNet: missing "
                                         r"\[down_blocks.0.resnets.0.conv1.weight\].*unexpected"):
        load_sd15_unet(tmp_path / "broken.safetensors")


def test_sd2_style_unet_is_refused(tmp_path):
    sd2 = make_unet(use_linear_projection=True)
    sd2.save_pretrained(tmp_path / "sd2")
    with pytest.raises(ValueError, match="not an SD1.5-layout UNet: linear proj_in"):
        load_sd15_unet(tmp_path / "sd2")


# ---- AnimateDiff motion modules --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["hallo", "emo"])
def test_every_real_motion_module_key_has_a_home(name, hallo_fixture):
    real = json.loads((hallo_fixture / "full_size_keys.json").read_text())["motion_module_checkpoint"]["keys"]
    assert len(real) == 588
    with torch.device("meta"):
        model = EMONet(preset(name))
    shapes = {k.removeprefix("backbone."): list(v.shape) for k, v in model.state_dict().items()
              if k.startswith("backbone.") and ".motion_modules." in k and ".speed_attention." not in k}
    for key, shape in real.items():
        assert shapes.get(key) == shape, key
    assert set(shapes) == set(real)  # and the model has no motion-module key AnimateDiff lacks (speed aside)


def motion_file(model: EMONet, pe_len: int | None = None) -> dict:
    """A fake AnimateDiff file for the model's backbone: random tensors under AnimateDiff's names."""
    torch.manual_seed(2)
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone.") and ".motion_modules." in key and ".speed_attention." not in key:
            shape = list(value.shape)
            if key.endswith("pos_encoder.pe") and pe_len:
                shape[1] = pe_len
            out[key.removeprefix("backbone.")] = torch.randn(shape)
    return out


def test_init_motion_modules(tmp_path):
    model = EMONet(preset("tiny"))
    own = {k: v.clone() for k, v in model.state_dict().items()}
    weights = motion_file(model, pe_len=24)  # AnimateDiff v1-length positional tables; the model has 32
    torch.save({"state_dict": {"module." + k: v for k, v in weights.items()}}, tmp_path / "mm.ckpt")
    assert set(load_motion_module(tmp_path / "mm.ckpt")) == set(weights)
    report = init_motion_modules(model, tmp_path / "mm.ckpt")
    state = model.state_dict()
    for key, value in weights.items():
        if key.endswith("pos_encoder.pe"):
            assert torch.equal(state["backbone." + key][:, :24], value)
            assert torch.equal(state["backbone." + key][:, 24:], own["backbone." + key][:, 24:])
        else:
            assert torch.equal(state["backbone." + key], value), key
    pe_count = sum(k.endswith("pos_encoder.pe") for k in weights)
    assert len(report.adapted) == pe_count and "24 positions, model 32" in report.adapted[0][1]
    assert len(report.loaded["backbone."]) == len(weights)
    assert report.left_at_init and all(".speed_attention." in k for k in report.left_at_init)
    assert "speed_attention" in report.summary()


def test_motion_module_safetensors_exact_fit(tmp_path):
    model = EMONet(preset("hallo-tiny"))
    weights = motion_file(model)
    save_file(weights, tmp_path / "mm.safetensors")
    report = init_motion_modules(model, tmp_path / "mm.safetensors")
    assert report.adapted == [] and report.left_at_init == [] and report.no_home == []
    assert all(torch.equal(model.state_dict()["backbone." + k], v) for k, v in weights.items())


def test_motion_module_missing_and_unexpected_keys(tmp_path):
    model = EMONet(preset("hallo-tiny"))
    weights = {k: v for k, v in motion_file(model).items() if not k.startswith("mid_block.")}
    weights["down_blocks.9.motion_modules.0.temporal_transformer.norm.weight"] = torch.zeros(32)
    save_file(weights, tmp_path / "mm.safetensors")
    with pytest.raises(ValueError, match=r"missing \[mid_block.motion_modules.0.temporal_transformer.norm.weight.*"
                                         r"\(28\); unexpected \[down_blocks.9.motion_modules"):
        init_motion_modules(model, tmp_path / "mm.safetensors")
    report = init_motion_modules(model, tmp_path / "mm.safetensors", strict=False)
    assert len(report.left_at_init) == 28 and all(k.startswith("backbone.mid_block.") for k in report.left_at_init)
    assert report.no_home == ["backbone.down_blocks.9.motion_modules.0.temporal_transformer.norm.weight"]


def test_motion_module_loader_rejects_other_files(files, tmp_path):
    with pytest.raises(ValueError, match="no \\*.motion_modules.\\* keys.*looks like"):
        load_motion_module(files["safetensors"])
    save_file({"down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.weight": torch.zeros(2, 2)},
              tmp_path / "adapter.safetensors")
    with pytest.raises(ValueError, match="MotionAdapter"):
        load_motion_module(tmp_path / "adapter.safetensors")
