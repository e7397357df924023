"""The pack inside a real ComfyUI: registration, the API workflows of workflows/api/, outputs, interrupts and
bad input. Skipped with one loud line when no ComfyUI is found (see comfy_server.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import av
import pytest

from .comfy_server import COMFYUI, EMO_NODES, WORKFLOWS, Server, start_server
from .conftest import REPO

if COMFYUI is None:
    print("\n" + "=" * 78 + "\nSKIPPED: ComfyUI integration tests: no ComfyUI found (install the pack in "
          "custom_nodes/ or set COMFYUI_PATH)\n" + "=" * 78)
pytestmark = pytest.mark.skipif(COMFYUI is None, reason="no ComfyUI: set COMFYUI_PATH")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("comfyui-run"))
    yield srv
    srv.stop()


def workflow(name: str, changes: dict | None = None) -> dict:
    """An API workflow of workflows/api/ (or of tests/workflows/), with {(node id, input): value} changes."""
    path = WORKFLOWS / "api" / name
    prompt = json.loads((path if path.is_file() else Path(__file__).parent / "workflows" / name).read_text())
    for (node, key), value in (changes or {}).items():
        prompt[node]["inputs"][key] = value
    return prompt


def output_video(server: Server, result: dict) -> Path:
    assert result["status"]["status_str"] == "success", json.dumps(result["status"], indent=1)[-3000:]
    videos = [item for out in result["outputs"].values() for item in out.get("images", [])
              if item["filename"].endswith(".mp4")]
    assert len(videos) == 1
    return server.base / "output" / videos[0]["subfolder"] / videos[0]["filename"]


def probe(path: Path) -> dict:
    with av.open(str(path)) as c:
        video = c.streams.video[0]
        frames = sum(1 for _ in c.decode(video))
        info = {"frames": frames, "fps": float(video.average_rate), "width": video.width, "height": video.height,
                "audio": [s.codec_context.name for s in c.streams.audio], "duration": c.duration / 1e6,
                "metadata": dict(c.metadata)}
    return info


def test_every_node_registers_without_import_error(server):
    info = server.get("/object_info")
    ours = {name: node for name, node in info.items() if node.get("python_module", "").endswith("comfyui-emo")}
    assert set(ours) == EMO_NODES
    for name, node in ours.items():
        assert node["category"] == "EMO"
        for group in ("required", "optional"):
            for key, spec in node["input"].get(group, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{key} has no tooltip"
    log = server.log.read_text()
    startup = log.split("Starting server")[0]
    assert "IMPORT FAILED" not in log and "comfyui-emo" in log
    timing = re.search(r"([0-9.]+) seconds: \S*comfyui-emo\s*$", log, re.MULTILINE)
    assert timing and float(timing.group(1)) < 1.0  # importing the pack is cheap: heavy imports wait for execute
    assert "Traceback" not in startup
    assert not [line for line in startup.splitlines() if "emo" in line.lower() and "warn" in line.lower()]


def test_default_workflow_runs_the_bundled_demo_with_nothing_to_download(server):
    """The template as shipped: the demo model from the pack (with its own VAE and audio encoder), the bundled
    sample portrait and 4 s of speech; only the step count is lowered to keep the test short."""
    info = probe(output_video(server, server.run(workflow("portrait_speech_to_video.json", {("9", "steps"): 4}))))
    assert info["frames"] == 100 and info["fps"] == 25 and (info["width"], info["height"]) == (256, 256)
    assert info["audio"] == ["aac"] and abs(info["duration"] - 4.0) < 0.1
    assert "prompt" in info["metadata"]  # the workflow travels with the video


def test_a_checkpoint_written_again_under_its_name_is_loaded_again(server):
    """ComfyUI caches node outputs: Load EMO's fingerprint (the file's size and time) makes a model trained again
    into the same file load again, while an unchanged file stays cached."""
    demo = REPO / "emo_core" / "assets" / "emo-demo.safetensors"
    target = server.base / "models" / "emo" / "retrained.safetensors"
    shutil.copyfile(demo, target)
    prompt = workflow("portrait_speech_to_video.json",
                      {("3", "checkpoint"): "retrained.safetensors", ("9", "steps"): 1})

    def loads():
        lines = server.log.read_text().splitlines()
        return sum("EMO: loaded" in line and "retrained.safetensors" in line for line in lines)

    output_video(server, server.run(prompt))
    assert loads() == 1
    server.run(prompt)
    assert loads() == 1  # unchanged: from the cache
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))  # "trained again"
    output_video(server, server.run(prompt))
    assert loads() == 2


def test_long_audio_many_clips(server):
    info = probe(output_video(server, server.run(workflow("long_audio.json", {("9", "steps"): 2}))))
    assert info["frames"] == 50 and abs(info["duration"] - 2.0) < 0.1  # 7 clips of 8 frames
    # the sampler sees (ComfyUI's hidden prompt) that EMO Decode + Save Video alone takes its latents
    assert "the latents go only to EMO Decode + Save Video" in server.log.read_text()
    # EMO Decode + Save Video takes Encode Audio's fps through the template's link: one setting keeps them in sync
    info = probe(output_video(server, server.run(workflow("long_audio.json", {("9", "steps"): 2, ("8", "fps"): 12.5}))))
    assert info["frames"] == 25 and info["fps"] == 12.5 and abs(info["duration"] - 2.0) < 0.1
    assert "the audio lasts" not in server.log.read_text()
    info = probe(output_video(server, server.run(workflow("long_audio.json", {("9", "steps"): 2, ("11", "fps"): 30}))))
    assert info["frames"] == 50 and abs(info["duration"] - 50 / 30) < 0.1  # the sound cut to the picture, and
    assert "the audio lasts 2.00 s, 50 frames at 30 fps last 1.67 s" in server.log.read_text()  # the user told


def test_chained_with_other_nodes(server):
    info = probe(output_video(server, server.run(workflow("emo_chained.json", {("9", "steps"): 2}))))
    assert info["frames"] == 25 and (info["width"], info["height"]) == (256, 256)  # upscaled after decoding


def test_separate_vae_and_audio_encoder_loaders(server):
    """Checkpoints without a bundled VAE / wav2vec2 (Hallo's) take core Load VAE and Load Audio Encoder."""
    info = probe(output_video(server, server.run(workflow("separate_loaders.json"))))
    assert info["frames"] == 50 and (info["width"], info["height"]) == (128, 128)


def hallo_template() -> dict:
    """The Hallo template as shipped, its files swapped for the test's stand-ins (the tiny Hallo, i.e. the parity
    fixture's net, carries its own small wav2vec2, so Load Audio Encoder is disconnected; a stand-in ArcFace .onnx
    in models/insightface), the portrait at 128 px, 1 step."""
    prompt = workflow("hallo_portrait_to_video.json", {
        ("3", "checkpoint"): "tiny-hallo.safetensors", ("4", "vae_name"): "random-sd-vae.safetensors",
        ("6", "recognition_model"): "tiny-arcface.onnx", ("6", "confidence"): 0.3, ("7", "confidence"): 0.3,
        ("12", "width"): 128, ("12", "height"): 128, ("10", "steps"): 1})
    del prompt["9"]["inputs"]["audio_encoder"], prompt["5"]
    return prompt


def test_hallo_template_takes_the_face_identity(server):
    """A Hallo-style checkpoint conditions on the ArcFace identity from EMO Face Identity; without it the sampler
    says what to connect."""
    info = probe(output_video(server, server.run(hallo_template())))
    assert info["frames"] == 25 and (info["width"], info["height"]) == (128, 128) and info["audio"] == ["aac"]
    assert abs(info["duration"] - 1.0) < 0.1
    assert "EMO: face identity from tiny-arcface.onnx: face at" in server.log.read_text()
    prompt = hallo_template()
    del prompt["10"]["inputs"]["face_identity"]
    result = server.run(prompt)
    assert result["status"]["status_str"] == "error"
    assert "connect EMO Face Identity" in json.dumps(result["status"]["messages"])
    prompt = hallo_template()
    prompt["11"]["inputs"]["vae"] = ["3", 1]  # Load EMO's empty VAE output: this checkpoint carries none
    errors = [m["data"] for m in server.run_listening(prompt) if m["type"] == "execution_error"]
    assert len(errors) == 1 and errors[0]["node_type"] == "VAEDecode"
    assert "tiny-hallo.safetensors carries no VAE" in errors[0]["exception_message"]
    assert server.get("/system_stats")


def test_bad_input_is_a_clear_error_and_the_server_keeps_running(server):
    prompt = workflow("portrait_speech_to_video.json", {("9", "frames_per_clip"): 1, ("9", "motion_frames"): 4})
    result = server.run(prompt)
    assert result["status"]["status_str"] == "error"
    messages = json.dumps(result["status"]["messages"])
    assert "motion frames (4) cannot exceed frames per clip (1)" in messages
    assert server.get("/system_stats")  # still serving
    result = server.run(workflow("separate_loaders.json", {("2", "audio"): "silence.wav"}))
    assert result["status"]["status_str"] == "error"
    assert "the audio is silent" in json.dumps(result["status"]["messages"])
    result = server.run(workflow("portrait_speech_to_video.json", {("3", "checkpoint"): "missing.safetensors"}))
    assert result["status"]["status_str"] in ("rejected", "error")
    assert "missing.safetensors" in json.dumps(result["status"]["messages"])
    assert server.get("/system_stats")


def test_interrupt_stops_sampling_within_a_step(server):
    prompt = workflow("long_audio.json", {("9", "steps"): 200, ("9", "seed"): 7})
    started = len(server.log.read_text().split("EMO: sampling"))
    prompt_id = server.submit(prompt)
    deadline = time.time() + 120
    while len(server.log.read_text().split("EMO: sampling")) == started:  # wait until the sampler runs
        assert time.time() < deadline, "sampling did not start"
        time.sleep(0.2)
    time.sleep(2.0)
    server.post("/interrupt")
    asked = time.time()
    result = server.wait(prompt_id, timeout=60)
    assert time.time() - asked < 10  # one step of this model is a fraction of a second
    assert "execution_interrupted" in json.dumps(result["status"]["messages"])
    assert not any(item["filename"].endswith(".mp4") for out in result.get("outputs", {}).values()
                   for item in out.get("images", []))
    assert server.get("/system_stats")
