"""The node runtime inside a real ComfyUI (in a subprocess, as in test_comfy_vae): what a server run cannot show on
a CPU. ComfyUI loads a core VAE with `load_models_gpu([vae])`, which may unload the other models to make room (all
of them under --disable-smart-memory); Hallo's motion frames go through the VAE between clips, so the sampler
must load the EMO model again before the next clip's denoising. Also EMO Face Mask over many frames: progress per
batch, and ComfyUI's interrupt stops it; a sampler out of GPU memory raises ComfyUI's OOM type, which makes ComfyUI
unload its models (a plain error would leave them loaded for the next run to run out of memory again), and a video
whose decoded frames would not fit in the free memory is refused before the run."""

import json
import os
import subprocess
import sys
from pathlib import Path

from .comfy_models import make_models
from .conftest import REPO
from .test_comfy_audio_encoder import comfy_root

COMFY_SCRIPT = """
import json, sys
packages, models, out = sys.argv[1:4]
sys.argv = ["comfy", "--cpu", "--disable-smart-memory"]
sys.path.insert(0, packages)  # holds comfyui_emo, a link to the repository
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_management as mm, comfy.sd, comfy.utils, torch
from comfyui_emo.emo_core.cli import ASSETS, load_image
from comfyui_emo.emo_core.audio import read_audio
from comfyui_emo.nodes import runtime

emo, _ = runtime.load_emo_model(f"{models}/emo/tiny-hallo.safetensors", "fp32")
vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(f"{models}/vae/random-sd-vae.safetensors"))
image = torch.nn.functional.interpolate(load_image(ASSETS / "portrait.png"), size=64, mode="area").permute(0, 2, 3, 1)
waveform, rate = read_audio(ASSETS / "speech.wav")
audio = {"waveform": waveform[:, 8000:8000 + 6400], "sample_rate": rate}  # (C, N): no batch axis
emo_audio, _ = runtime.encode_audio(emo, None, audio, 25.0)
reference = runtime.encode_reference(emo, image, vae)
identity = runtime.face_identity(f"{models}/face_detection/yunet_final.pth", f"{models}/insightface/tiny-arcface.onnx",
                                 image, 0, True, 0.6)
events = []
load = mm.load_models_gpu
def spy(models, *args, **kwargs):
    events.append(["load", [type(m.model).__name__ for m in models]])
    return load(models, *args, **kwargs)
mm.load_models_gpu = spy
denoise = emo.patcher.model.denoise
def counted(*args, **kwargs):
    events.append(["denoise"])
    return denoise(*args, **kwargs)
emo.patcher.model.denoise = counted
latents = runtime.sample(emo, reference, emo_audio, None, identity, seed=0, steps=2, cfg=1.0, scheduler="ddim",
                         frames_per_clip=None, motion_frames=None, speed=1.0)
def out_of_memory(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory (a test)")
emo.patcher.model.denoise = out_of_memory
try:
    runtime.sample(emo, reference, emo_audio, None, identity, seed=0, steps=2, cfg=1.0, scheduler="ddim",
                   frames_per_clip=None, motion_frames=None, speed=1.0)
    oom = None
except Exception as e:  # ComfyUI's executor unloads every model only for its OOM_EXCEPTION type
    oom = [isinstance(e, mm.OOM_EXCEPTION), str(e)]
emo.patcher.model.denoise = denoise
free = mm.get_free_memory
mm.get_free_memory = lambda *args, **kwargs: 10 * 64 * 64 * 3 * 4 - 1  # one byte short of the decoded frames
try:
    runtime.sample(emo, reference, emo_audio, None, identity, seed=0, steps=2, cfg=1.0, scheduler="ddim",
                   frames_per_clip=None, motion_frames=None, speed=1.0)
    short = None
except Exception as e:
    short = str(e)
mm.get_free_memory = free
ticks = []  # EMO Face Mask over a video's frames: progress per batch of 16, and it can be interrupted
comfy.utils.set_progress_bar_global_hook(lambda value, total, *args, **kwargs: ticks.append([value, total]))
frames = image.expand(20, -1, -1, -1)
masks = runtime.face_masks(f"{models}/face_detection/yunet_final.pth", frames, 1.2, 0, True, 0.6)
mm.interrupt_current_processing(True)
try:
    runtime.face_masks(f"{models}/face_detection/yunet_final.pth", frames, 1.2, 0, True, 0.6)
    stopped = False
except mm.InterruptProcessingException:
    stopped = True
json.dump({"events": events, "frames": emo_audio.frames, "latents": list(latents.shape), "masks": list(masks.shape),
           "ticks": ticks, "stopped": stopped, "oom": oom, "short": short}, open(out, "w"))
"""


def test_the_emo_model_is_loaded_again_after_each_vae_call_between_clips_and_face_masks_report_progress(
        tmp_path_factory, tmp_path):
    root = comfy_root(tmp_path_factory, whole=True)
    models = make_models(Path(os.environ.get("EMO_TEST_MODELS", Path.home() / ".cache/emo-comfyui/test-models")))
    (tmp_path / "packages").mkdir()
    os.symlink(REPO, tmp_path / "packages" / "comfyui_emo")
    run = subprocess.run([sys.executable, "-c", COMFY_SCRIPT, str(tmp_path / "packages"), str(models),
                          str(tmp_path / "out.json")], cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    events = result["events"]
    assert result["frames"] == 10 and result["latents"][0] == 10  # 0.4 s at 25 fps, a 2-D waveform
    assert result["masks"] == [20, 64, 64] and result["ticks"] == [[16, 20], [20, 20]] and result["stopped"]
    # out of GPU memory: still ComfyUI's OOM type (so that it unloads the models), saying what to change
    assert result["oom"][0] and "frames_per_clip" in result["oom"][1], result["oom"]
    # too little memory for the decoded video: refused before the run, not after it
    assert result["short"] and "10 frames of 64x64 decode to" in result["short"], result["short"]
    vae_loads = [i for i, e in enumerate(events) if e[0] == "load" and "EMONet" not in e[1]]
    assert len(vae_loads) >= 2  # motion frames decoded and encoded again between clips
    last_load = None
    for event in events:  # every denoising step runs right after the EMO model was (re)loaded
        if event[0] == "load":
            last_load = event[1]
        else:
            assert last_load is not None and "EMONet" in last_load, events


STREAM_SCRIPT = """
import json, sys
packages, out = sys.argv[1:3]
sys.argv = ["comfy", "--cpu"]
sys.path.insert(0, packages)  # holds comfyui_emo, a link to the repository
import comfy.options
comfy.options.enable_args_parsing()
import av, comfy.model_management as mm, torch
from comfyui_emo.emo_core.cli import ASSETS, load_image
from comfyui_emo.emo_core.audio import read_audio
from comfyui_emo.nodes import runtime
from comfyui_emo.nodes.nodes import streamed_only

emo, vae = runtime.load_emo_model(str(ASSETS / "emo-demo.safetensors"), "fp32")
image = torch.nn.functional.interpolate(load_image(ASSETS / "portrait.png"), size=64, mode="area").permute(0, 2, 3, 1)
waveform, rate = read_audio(ASSETS / "speech.wav")
audio = {"waveform": waveform[None, :, 8000:8000 + 16000], "sample_rate": rate}  # 1 s
emo_audio, sound = runtime.encode_audio(emo, None, audio, 25.0)
reference = runtime.encode_reference(emo, image, vae)
free = mm.get_free_memory
mm.get_free_memory = lambda *args, **kwargs: 25 * 64 * 64 * 3 * 4 - 1  # one byte short of the decoded frames
latents = runtime.sample(emo, reference, emo_audio, None, None, seed=0, steps=2, cfg=1.0, scheduler="ddim",
                         frames_per_clip=None, motion_frames=None, speed=1.0, decoded_whole=False)
mm.get_free_memory = free
batches, decoded = [], []
decode = vae.decode
def counted(samples, *args, **kwargs):
    batches.append(samples.shape[0])
    if len(batches) == 3 and stop:
        mm.interrupt_current_processing(True)  # Cancel pressed while the third batch decodes
    decoded.append(decode(samples, *args, **kwargs))
    return decoded[-1]
vae.decode = counted
stop = False
runtime.decode_video(out + "/whole.mp4", latents, vae, 25.0, sound, 18, {"prompt": "{}"}, 4)
streamed, images = batches[:], torch.cat(decoded)
stop, batches[:] = True, []
try:
    runtime.decode_video(out + "/stopped.mp4", latents, vae, 25.0, sound, 18, {}, 4)
    interrupted = False
except mm.InterruptProcessingException:
    interrupted = True
mm.interrupt_current_processing(False)
whole = decode(latents)  # VAE Decode's IMAGE of every frame at once, and EMO Video Combine's mp4 of it
runtime.write_video(out + "/combined.mp4", whole, 25.0, sound, 18, {})
def pixels(name):
    with av.open(out + name) as c:
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in c.decode(c.streams.video[0])]
        return torch.stack(frames).float()
with av.open(out + "/whole.mp4") as c:
    audio_streams = [s.codec_context.name for s in c.streams.audio]
streamed_pixels, kept = pixels("/whole.mp4"), pixels("/stopped.mp4").shape[0]
try:
    runtime.check_latents(latents[None], vae)
    bad = None
except Exception as e:
    bad = str(e)
prompt = {"9": {"class_type": "EMOSampler", "inputs": {}},
          "10": {"class_type": "EMODecodeSaveVideo", "inputs": {"latent": ["9", 0]}},
          "11": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0]}}}
only_streamed = [streamed_only(prompt, "9")]  # VAE Decode beside it
del prompt["11"]
only_streamed.append(streamed_only(prompt, "9"))  # Decode + Save alone
prompt["12"] = {"class_type": "SaveVideo", "inputs": {"video": ["10", 0]}}
only_streamed.append(streamed_only(prompt, "9"))  # its video saved again (streams copied)
prompt["13"] = {"class_type": "GetVideoComponents", "inputs": {"video": ["10", 0]}}
only_streamed.append(streamed_only(prompt, "9"))  # its video decoded whole again
only_streamed.append(streamed_only({"9": prompt["9"]}, "9"))  # nothing takes the latents
json.dump({"frames": latents.shape[0], "streamed": streamed, "interrupted": interrupted, "kept": kept,
           "stopped_batches": batches, "written": streamed_pixels.shape[0], "audio": audio_streams,
           "image_error": (images - whole).abs().max().item(),
           "video_error": (streamed_pixels - pixels("/combined.mp4")).abs().mean().item(),
           "moving": (streamed_pixels[1:] - streamed_pixels[:-1]).abs().mean().item(),
           "bad": bad, "only_streamed": only_streamed},
          open(out + "/out.json", "w"))
"""


def test_decode_and_save_holds_a_few_frames_at_a_time_and_keeps_what_it_wrote_when_cancelled(
        tmp_path_factory, tmp_path):
    """EMO Decode + Save Video, for videos whose frames would not fit in memory at once: the sampler does not
    refuse a video that goes only to it, it decodes `frames_per_batch` frames at a time into the mp4 (the same
    frames as VAE Decode's), and Cancel stops it between batches with the frames written so far playable."""
    root = comfy_root(tmp_path_factory, whole=True)
    (tmp_path / "packages").mkdir()
    os.symlink(REPO, tmp_path / "packages" / "comfyui_emo")
    run = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, str(tmp_path / "packages"), str(tmp_path)], cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["frames"] == 25  # not refused with too little memory for 25 decoded frames
    assert result["streamed"] == [4, 4, 4, 4, 4, 4, 1]  # never more than frames_per_batch decoded at once
    assert result["written"] == 25 and result["audio"] == ["aac"]
    # the frames of VAE Decode -> EMO Video Combine: decoded alike, and the same video (0..255 pixel scale)
    assert result["image_error"] < 1e-4 and result["video_error"] < 0.1 * result["moving"], result
    assert result["interrupted"] and result["stopped_batches"] == [4, 4, 4]  # stopped before a 4th batch
    assert result["kept"] == 12  # the frames written before Cancel, a playable video
    assert "takes image latents" in result["bad"], result["bad"]
    # the check is skipped only where every frame never is in memory at once
    assert result["only_streamed"] == [False, True, True, False, False]
