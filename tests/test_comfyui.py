"""The pack inside a real ComfyUI: registration, the API workflows of workflows/api/, outputs, bad input.

The ComfyUI is the one this pack is installed in (custom_nodes/<pack> inside a ComfyUI tree) or COMFYUI_PATH
(scripts/test.sh sets it up from ../shared/comfyui); without one these tests are skipped with one loud line.
The server runs on loopback with its own base directory; the weights are tiny ones the tests make.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path

import av
import pytest

from .comfy_models import make_models
from .conftest import REPO

WORKFLOWS = REPO / "workflows" / "api"
EMO_NODES = {"EMOLoader", "EMOEncodeAudio", "EMOFaceMask", "EMOReferenceNet", "EMOSampler", "EMOVideoCombine"}


def find_comfyui() -> Path | None:
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"])
    if REPO.parent.name == "custom_nodes" and (REPO.parent.parent / "main.py").is_file():
        return REPO.parent.parent
    return None


COMFYUI = find_comfyui()
if COMFYUI is None:
    print("\n" + "=" * 78 + "\nSKIPPED: ComfyUI integration tests: no ComfyUI found (install the pack in "
          "custom_nodes/ or set COMFYUI_PATH)\n" + "=" * 78)
pytestmark = pytest.mark.skipif(COMFYUI is None, reason="no ComfyUI: set COMFYUI_PATH")


class Server:
    def __init__(self, base: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base, self.log = base, base / "server.log"
        args = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(base), "--temp-directory", str(base / "temp"), "--disable-auto-launch"]
        self.process = subprocess.Popen(args, cwd=COMFYUI, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                if self.process.poll() is not None:
                    break
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not start:\n{self.log.read_text()[-3000:]}")

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
            return json.loads(r.read())

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        data = json.dumps({"prompt": prompt, "client_id": "emo-tests"}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/prompt", data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                prompt_id = json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            return {"status": {"status_str": "rejected", "messages": [json.loads(e.read())]}}
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                if history[prompt_id]["status"]["status_str"] in ("success", "error"):
                    return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"workflow did not finish in {timeout} s")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


def write_speech(path: Path, seconds: float):
    with wave.open(str(REPO / "emo_core" / "assets" / "speech.wav")) as src, wave.open(str(path), "wb") as dst:
        dst.setnchannels(1)
        dst.setsampwidth(2)
        dst.setframerate(src.getframerate())
        dst.writeframes(src.readframes(int(seconds * src.getframerate())))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui-run")
    (base / "custom_nodes").mkdir()
    os.symlink(REPO, base / "custom_nodes" / "comfyui-emo")
    models = make_models(Path(os.environ.get("EMO_TEST_MODELS", Path.home() / ".cache/emo-comfyui/test-models")))
    shutil.copytree(models, base / "models", symlinks=True, ignore=shutil.ignore_patterns(".complete-*"),
                    copy_function=os.symlink)
    inputs = base / "input"
    inputs.mkdir()
    from PIL import Image

    Image.open(REPO / "emo_core" / "assets" / "portrait.png").resize((128, 128)).save(inputs / "portrait.png")
    Image.open(REPO / "emo_core" / "assets" / "portrait.png").save(inputs / "portrait_256.png")
    write_speech(inputs / "speech.wav", 1.0)
    write_speech(inputs / "speech_long.wav", 2.0)
    srv = Server(base)
    yield srv
    srv.stop()


def workflow(name: str, changes: dict | None = None) -> dict:
    """An API workflow of workflows/api/, with {(node id, input): value} changes."""
    prompt = json.loads((WORKFLOWS / name).read_text())
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
    assert "IMPORT FAILED" not in log and "comfyui-emo" in log
    assert "Traceback" not in log.split("Starting server")[0]


def test_portrait_and_speech_to_mp4(server):
    info = probe(output_video(server, server.run(workflow("portrait_speech_to_video.json"))))
    assert info["frames"] == 25 and info["fps"] == 25 and (info["width"], info["height"]) == (128, 128)
    assert info["audio"] == ["aac"] and abs(info["duration"] - 1.0) < 0.1
    assert "prompt" in info["metadata"]  # the workflow travels with the video


def test_long_audio_many_clips(server):
    prompt = workflow("portrait_speech_to_video.json", {("2", "audio"): "speech_long.wav", ("9", "steps"): 1})
    info = probe(output_video(server, server.run(prompt)))
    assert info["frames"] == 50 and abs(info["duration"] - 2.0) < 0.1  # 13 clips of 4 frames


def test_chained_with_other_nodes(server):
    info = probe(output_video(server, server.run(workflow("emo_chained.json"))))
    assert info["frames"] == 25 and (info["width"], info["height"]) == (256, 256)  # upscaled after decoding


def test_bad_input_is_a_clear_error_and_the_server_keeps_running(server):
    prompt = workflow("portrait_speech_to_video.json", {("9", "frames_per_clip"): 1, ("9", "motion_frames"): 4})
    result = server.run(prompt)
    assert result["status"]["status_str"] == "error"
    messages = json.dumps(result["status"]["messages"])
    assert "motion frames (4) cannot exceed frames per clip (1)" in messages
    assert server.get("/system_stats")  # still serving
    result = server.run(workflow("portrait_speech_to_video.json", {("3", "checkpoint"): "missing.safetensors"}))
    assert result["status"]["status_str"] in ("rejected", "error")
    assert "missing.safetensors" in json.dumps(result["status"]["messages"])
    assert server.get("/system_stats")
