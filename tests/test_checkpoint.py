"""Checkpoint formats: ours (config in metadata), Hallo's net.pth (full-size key map), and clear errors."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from emo_core.checkpoint import (CheckpointError, hallo_to_emo, load_checkpoint, load_model, save_checkpoint)
from emo_core.config import preset
from emo_core.models.emo import EMONet
from emo_core.random_weights import randomize_


def test_every_full_size_hallo_key_maps_on_the_meta_device(hallo_fixture):
    manifest = json.loads((hallo_fixture / "full_size_keys.json").read_text())["net_pth"]["keys"]
    keys = manifest if isinstance(manifest, dict) else {k["key"]: k for k in manifest}
    with torch.device("meta"):
        model = EMONet(preset("hallo"))
    ours = model.state_dict()
    mapped = hallo_to_emo({k: None for k in keys})
    assert set(mapped) == set(ours), (sorted(set(mapped) - set(ours))[:5], sorted(set(ours) - set(mapped))[:5])
    for hallo_key, info in keys.items():
        our_key = next(iter(hallo_to_emo({hallo_key: None})))
        assert list(ours[our_key].shape) == list(info["shape"]), hallo_key


def test_hallo_fixture_loads_with_its_sidecar_config(hallo_fixture):
    config, state_dict, looks_like = load_checkpoint(hallo_fixture / "net.safetensors")
    assert config.unet.block_out_channels == (32, 32, 64, 64) and config.reference_injection == "self"
    assert looks_like == "a Hallo net.pth"
    assert len(state_dict) == len(load_file(hallo_fixture / "net.safetensors"))


def test_our_format_round_trips(tmp_path):
    model = randomize_(EMONet(preset("tiny")), 4)
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(model, path)
    loaded = load_model(path)
    assert loaded.cfg == model.cfg
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_saved_checkpoints_get_the_mode_of_any_new_file(tmp_path):
    """safetensors 0.8 writes every file 0o600 whatever the umask (its issue #782): a model trained by one user would
    be unreadable to a ComfyUI running as another. Ours get what open() gives; a file replaced keeps its mode."""
    model = EMONet(preset("tiny"))
    path = tmp_path / "tiny.safetensors"
    umask = os.umask(0o027)
    try:
        save_checkpoint(model, path)
        assert path.stat().st_mode & 0o777 == 0o640
        os.umask(0o022)
        save_checkpoint(model, tmp_path / "other.safetensors")
        assert (tmp_path / "other.safetensors").stat().st_mode & 0o777 == 0o644
        path.chmod(0o600)  # the owner made it private: saving over it keeps it private
        save_checkpoint(model, path)
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(umask)


def test_a_checkpoint_of_another_model_names_the_keys(tmp_path):
    model = EMONet(preset("tiny"))
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(model, path)
    with pytest.raises(CheckpointError, match="missing") as err:
        load_model(path, config=preset("hallo-tiny"))
    assert "image_proj (4)" in str(err.value) and "config 'tiny'" in str(err.value)


def test_truncated_files_are_reported(tmp_path, hallo_fixture):
    data = (hallo_fixture / "net.safetensors").read_bytes()
    path = tmp_path / "net.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    pth = tmp_path / "net.pth"
    torch.save(load_file(hallo_fixture / "net.safetensors"), pth)
    pth.write_bytes(pth.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(pth)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/emo-pwned",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "net.pth"
    with open(path, "wb") as f:
        pickle.dump({"denoising_unet.conv_in.weight": Evil()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not os.path.exists("/tmp/emo-pwned")


def test_other_files_are_named(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="VAE"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing.safetensors")


def test_hallo_checkpoint_of_unknown_size_asks_for_its_config(tmp_path, hallo_fixture):
    path = tmp_path / "net.safetensors"
    path.write_bytes((hallo_fixture / "net.safetensors").read_bytes())  # no config.json beside it
    with pytest.raises(CheckpointError, match="emo.json"):
        load_checkpoint(path)
