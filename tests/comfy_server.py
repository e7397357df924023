"""A real ComfyUI server with this pack installed, for the integration and browser tests.

The ComfyUI is the one this pack is installed in (custom_nodes/<pack> inside a ComfyUI tree) or COMFYUI_PATH
(scripts/test.sh prepares it from ../shared/comfyui). The server runs on loopback with its own base directory;
the weights are tiny ones the tests make (comfy_models.py).
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

from .comfy_models import make_models
from .conftest import REPO

WORKFLOWS = REPO / "workflows"
EMO_NODES = {"EMOLoader", "EMOSampleInputs", "EMOEncodeAudio", "EMOFaceMask", "EMOFaceIdentity", "EMOReferenceNet",
             "EMOSampler", "EMOVideoCombine", "EMODecodeSaveVideo"}


def find_comfyui() -> Path | None:
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"])
    if REPO.parent.name == "custom_nodes" and (REPO.parent.parent / "main.py").is_file():
        return REPO.parent.parent
    return None


COMFYUI = find_comfyui()


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
        try:
            prompt_id = self.submit(prompt)
        except urllib.error.HTTPError as e:
            return {"status": {"status_str": "rejected", "messages": [json.loads(e.read())]}}
        return self.wait(prompt_id, timeout)

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                if history[prompt_id]["status"]["status_str"] in ("success", "error"):
                    return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"workflow did not finish in {timeout} s")

    def run_listening(self, prompt: dict, timeout: float = 600) -> list:
        """Run a workflow while listening on the websocket, as the frontend does: the messages it sends, some of
        which (a node's ExecutionBlocker message) never reach the history."""
        import asyncio

        import aiohttp

        async def listen():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"http://127.0.0.1:{self.port}/ws?clientId=emo-tests") as ws:
                    prompt_id = await asyncio.to_thread(self.submit, prompt)
                    messages = []
                    async for message in ws:
                        if message.type != aiohttp.WSMsgType.TEXT:
                            continue
                        event = json.loads(message.data)
                        messages.append(event)
                        data = event.get("data", {})
                        if data.get("prompt_id") == prompt_id and (
                                event["type"] in ("execution_success", "execution_interrupted")
                                or event["type"] == "executing" and data.get("node") is None):
                            return messages
                    return messages

        return asyncio.run(asyncio.wait_for(listen(), timeout))

    def submit(self, prompt: dict) -> str:
        data = json.dumps({"prompt": prompt, "client_id": "emo-tests"}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/prompt", data=data,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())["prompt_id"]

    def post(self, path: str, body: dict | None = None):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body or {}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).close()

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


def start_server(base: Path) -> "Server":
    """A ComfyUI with this pack, the test models and test inputs under `base`."""
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
    with wave.open(str(inputs / "silence.wav"), "wb") as silence:
        silence.setnchannels(1)
        silence.setsampwidth(2)
        silence.setframerate(16000)
        silence.writeframes(bytes(2 * 16000))
    return Server(base)
