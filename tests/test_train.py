"""Data preparation and the three training stages on a few tiny synthetic videos (smoke runs of a few steps)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from safetensors import safe_open

from emo_core.audio import Wav2Vec2Features, random_audio_encoder
from emo_core.checkpoint import CheckpointError, load_checkpoint, load_model, read_metadata
from emo_core.config import preset
from emo_core.data import PreparedDataset, SkipVideo, prepare, prepare_video
from emo_core.face import YuNetDetector
from emo_core.synthetic import speech, write_clip
from emo_core.train import (ClipSamples, TrainConfig, TrainingStep, _pixels, bundle, train, train_vae,
                            trainable_names)
from emo_core.train import main as train_main  # the command line: python -m emo_core train ...
from emo_core.video import VideoWriter

from .conftest import REPO, face_fixture_dir

SIZE = 64


def _write(path, frames, audio):
    with VideoWriter(path, 25, audio=audio, sample_rate=16000) as writer:
        writer.write(frames)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Two good synthetic videos, four bad ones, prepared; a VAE trained for two steps; a tiny audio encoder."""
    root = tmp_path_factory.mktemp("train")
    videos = root / "videos"
    for i in range(2):  # seeds 20 and 22: prepare skips the person of seed 21
        write_clip(videos / f"person{i}.mp4", seed=(20, 22)[i], seconds=1.2, size=128, speed=2.0)
    (videos / "broken.mp4").write_bytes(b"this is not a video")
    wall = torch.full((30, 3, 96, 96), 0.6)
    sound = speech(1.2, 3)[0]
    _write(videos / "silent.mp4", wall, np.zeros_like(sound))
    _write(videos / "no_audio.mp4", wall, None)
    _write(videos / "no_face.mp4", wall, sound)
    encoder = random_audio_encoder(3, 16)  # the tiny preset's audio layout
    encoder.model.save_pretrained(root / "encoder")
    detector = YuNetDetector(face_fixture_dir() / "yunet_final.pth", confidence=0.3)
    index = prepare(videos, root / "prepared", encoder, detector, size=SIZE, clip_frames=6, log=lambda m: None)
    train_vae(PreparedDataset(root / "prepared"), root / "vae", steps=2, batch_size=2, log=lambda m: None)
    return root, index


def test_prepare_keeps_good_videos_and_reports_bad_ones(workdir):
    root, index = workdir
    assert [v["name"] for v in index["videos"]] == ["person0", "person1"]
    reasons = {s["video"].rsplit("/", 1)[-1]: s["reason"] for s in index["skipped"]}
    assert set(reasons) == {"broken.mp4", "silent.mp4", "no_audio.mp4", "no_face.mp4"}
    assert "unreadable" in reasons["broken.mp4"]
    assert "silent" in reasons["silent.mp4"]
    assert "no usable audio" in reasons["no_audio.mp4"]
    assert "no face" in reasons["no_face.mp4"]
    assert index["clips"] == [[v, s] for v in range(2) for s in range(0, 30 - 6 + 1, 6)]
    video = PreparedDataset(root / "prepared").video(0)
    assert video["frames"].shape == (30, SIZE, SIZE, 3) and video["frames"].dtype == torch.uint8
    assert video["audio"].shape == (30, 3, 16)
    assert video["speed"].shape == (30,) and bool((video["speed"] >= 0).all())
    assert int(video["speed_bucket"].max()) < len(index["speed_centres"])
    boxes = video["boxes"]
    assert bool((boxes[:, 2] > boxes[:, 0]).all()) and float(boxes.max()) <= SIZE * 1.5


def test_prepare_holds_a_batch_of_a_long_video_not_the_whole_of_it(workdir, detector, photo, tmp_path):
    """A minute of 1080p is 9 GB of pixels: a video is read batch by batch, once for the faces, once for their
    landmarks, once for the crops. Here 10 s at 256 px (49 MB decoded) must never be in memory at once."""
    import tracemalloc

    root, _ = workdir
    frames = torch.nn.functional.interpolate(photo, size=(256, 256), mode="area").expand(250, -1, -1, -1)
    _write(tmp_path / "long.mp4", frames, speech(10.0, 5)[0])
    encoder = Wav2Vec2Features.from_files(root / "encoder")
    tracemalloc.start()  # counts numpy's arrays: every decoded frame
    try:
        data = prepare_video(tmp_path / "long.mp4", encoder, detector, SIZE, 25, [0.0, 1.0], min_frames=6)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data["frames"].shape == (250, SIZE, SIZE, 3) and bool(data["found"].all())
    assert peak < 12e6, f"{peak / 1e6:.0f} MB held at once for a 49 MB video"


def test_prepare_skips_a_video_too_short_for_one_clip(workdir, detector, photo, tmp_path):
    root, _ = workdir
    frames = torch.nn.functional.interpolate(photo, size=(128, 128), mode="area").expand(3, -1, -1, -1)
    _write(tmp_path / "short.mp4", frames, speech(1.0, 5)[0])  # the sound is cut to the picture's 3 frames
    encoder = Wav2Vec2Features.from_files(root / "encoder")
    with pytest.raises(SkipVideo, match="too short: 3 frames of sound, at least 6 needed"):
        prepare_video(tmp_path / "short.mp4", encoder, detector, SIZE, 25, [0.0, 1.0], min_frames=6)


def test_prepared_videos_and_the_vae_are_readable_like_any_new_file(workdir):
    root, index = workdir
    umask = os.umask(0o022)
    os.umask(umask)
    files = [root / "prepared" / v["file"] for v in index["videos"]] + list((root / "vae").glob("*.safetensors"))
    assert len(files) == 3 and {f.stat().st_mode & 0o777 for f in files} == {0o666 & ~umask}


def test_prepare_in_parallel_writes_the_same_files(workdir, tmp_path):
    root, index = workdir
    encoder = Wav2Vec2Features.from_files(root / "encoder")
    detector = YuNetDetector(face_fixture_dir() / "yunet_final.pth", confidence=0.3)
    torch.set_num_threads(1)  # what each worker runs on
    one = prepare(root / "videos", tmp_path / "one", encoder, detector, size=SIZE, clip_frames=6, log=lambda m: None)
    lines = []
    two = prepare(root / "videos", tmp_path / "two", encoder, detector, size=SIZE, clip_frames=6, workers=2,
                  log=lines.append)
    assert two["videos"] == one["videos"] and two["skipped"] == one["skipped"] and two["clips"] == one["clips"]
    for video in one["videos"]:  # the same tensors and metadata (safetensors orders the metadata per process)
        one_file, two_file = tmp_path / "one" / video["file"], tmp_path / "two" / video["file"]
        with safe_open(one_file, "pt") as a, safe_open(two_file, "pt") as b:
            assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    assert sum("SKIPPED" in line for line in lines) == 4 and lines[-1].startswith("[prepare] 2 videos")
    with pytest.raises(ValueError, match="workers must be at least 1"):
        prepare(root / "videos", tmp_path / "three", encoder, detector, workers=0)


def test_prepare_resumes_and_refuses_empty_folders(workdir, tmp_path):
    root, index = workdir
    encoder = Wav2Vec2Features.from_files(root / "encoder")
    detector = YuNetDetector(face_fixture_dir() / "yunet_final.pth", confidence=0.3)
    lines = []
    again = prepare(root / "videos", root / "prepared", encoder, detector, size=SIZE, clip_frames=6, log=lines.append)
    assert again["videos"] == index["videos"]
    assert sum("kept (prepared before)" in line for line in lines) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no videos"):
        prepare(tmp_path / "empty", tmp_path / "out", encoder, detector)
    # the command line: a folder of nothing but bad videos is an error (an empty training set is not a success)
    from emo_core.data import main as prepare_main

    (tmp_path / "bad").mkdir()
    for name in ("broken.mp4", "no_face.mp4"):
        shutil.copy(root / "videos" / name, tmp_path / "bad" / name)
    with pytest.raises(SystemExit) as stop:
        prepare_main([str(tmp_path / "bad"), str(tmp_path / "bad-prepared"), "--audio-encoder", str(root / "encoder"),
                      "--face-detector", str(face_fixture_dir() / "yunet_final.pth"), "--size", str(SIZE)])
    assert "none of the 2 videos could be used (1 x unreadable video; 1 x no face found)" in str(stop.value)


def _config(root, stage, out, init="scratch", steps=3, **extra):
    cfg = dict(stage=stage, data=str(root / "prepared"), vae=str(root / "vae"), output=str(root / out),
               init=init, steps=steps, batch_size=2, learning_rate=1e-3, weight_decay=0.0, save_every=2,
               log_every=1, model="tiny", latent_scale="vae")
    cfg.update(extra)
    path = root / f"{out}.json"
    path.write_text(json.dumps(cfg))
    return TrainConfig.load(path)


def test_config_values_out_of_range_are_refused(tmp_path):
    assert _config(tmp_path, 2, "good").first_clip_prob == 0.1
    for stage, bad, message in ((2, {"first_clip_prob": 1.5}, "first_clip_prob is a probability"),
                                (2, {"uncond_prob": -0.1}, "uncond_prob is a probability"),
                                (2, {"uncond_prob": "0.1"}, "uncond_prob must be a number, got '0.1'"),
                                (2, {"steps": 0}, "steps must be a whole number"),
                                (2, {"batch_size": 2.5}, "batch_size must be a whole number"),
                                (2, {"warmup_steps": -1}, "warmup_steps must be a whole number of at least 0"),
                                (2, {"learning_rate": 0}, "learning_rate must be a number above 0"),
                                (2, {"learning_rate": "1e-3"}, "learning_rate must be a number, got '1e-3'"),
                                (2, {"init": None}, "init must be a string, got None"),
                                (2, {"face_expand": "1.2"}, "face_expand must be a number"),
                                (2, {"gradient_checkpointing": 1}, "gradient_checkpointing must be true or false"),
                                (2, {"model": ["tiny"]}, "model must be a string or an object"),
                                (2, {"noise_correlation": "0.5"}, "noise_correlation must be a number or null"),
                                (1, {"latent_scale": "VAE"}, "latent_scale is a number or \"vae\""),
                                (2, {"trainable": "motion_modules"}, "trainable must be a list or null"),
                                (2, {"trainable": [1]}, "trainable is a list of parameter-name parts"),
                                (3, {"frozen": [""]}, "frozen is a list of parameter-name parts"),
                                (4, {}, "stage must be 1, 2 or 3"),
                                (2, {"mixed_precison": "no"}, "unknown settings")):
        with pytest.raises(ValueError, match=message):
            _config(tmp_path, stage, "bad", **bad)
    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps([{"stage": 1}]))
    with pytest.raises(ValueError, match="a training config is a JSON object of settings.*got a list"):
        TrainConfig.load(listed)


def _snapshot(path):
    _, state_dict, _ = load_checkpoint(path)
    return state_dict


def _changed(before, after, group):
    names = [k for k in after if group(k)]
    assert names, "the group names no parameter"
    return {k for k in names if not torch.equal(before[k], after[k])}


def test_three_stages_train_what_the_paper_trains(workdir):
    root, _ = workdir
    log = []
    first = train(_config(root, 1, "stage1"), log=log.append)
    assert read_metadata(first)["stage"] == "1"
    fresh = load_model(first)  # reloads as a model
    assert fresh.cfg.latent_scale == pytest.approx(json.loads((root / "vae" / "config.json").read_text())
                                                   ["scaling_factor"])
    losses = [float(line.split(",")[1]) for line in (root / "stage1" / "log.csv").read_text().splitlines()[1:]]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert (root / "stage1" / "loss.svg").read_text().startswith("<svg")

    stage1 = _snapshot(first)
    with pytest.raises(ValueError, match="noise_correlation"):
        train(_config(root, 2, "stage2", init=f"checkpoint:{first}", noise_correlation=1.0), log=log.append)
    second = train(_config(root, 2, "stage2", init=f"checkpoint:{first}", noise_correlation=0.5), log=log.append)
    assert load_model(second).cfg.noise_correlation == 0.5  # recorded for sampling
    stage2 = _snapshot(second)
    temporal = lambda k: ".motion_modules." in k  # noqa: E731
    audio = lambda k: ".audio_modules." in k or k.startswith("audio_proj.")  # noqa: E731
    spatial = lambda k: k.startswith(("reference_net.", "backbone.", "face_locator.")) and not (  # noqa: E731
        temporal(k) or audio(k))
    assert _changed(stage1, stage2, temporal) and _changed(stage1, stage2, audio)
    assert not _changed(stage1, stage2, spatial)
    assert not _changed(stage1, stage2, lambda k: k.startswith("speed_encoder.") or "speed_attention" in k)

    third = train(_config(root, 3, "stage3", init=f"checkpoint:{second}"), log=log.append)
    assert load_model(third).cfg.noise_correlation == 0.5  # kept from the init
    stage3 = _snapshot(third)
    assert _changed(stage2, stage3, lambda k: k.startswith("speed_encoder."))
    assert _changed(stage2, stage3, temporal)
    assert not _changed(stage2, stage3, audio), "stage 3 keeps the audio layers frozen"
    assert not _changed(stage2, stage3, spatial)
    # the override: the whole network but the audio layers, which the paper keeps frozen in stage 3
    whole = train(_config(root, 3, "stage3-whole", init=f"checkpoint:{second}", frozen=["audio_modules"],
                          trainable=["reference_net", "backbone", "face_locator", "speed_encoder"]), log=log.append)
    stage3_whole = _snapshot(whole)
    assert _changed(stage2, stage3_whole, spatial) and _changed(stage2, stage3_whole, temporal)
    assert not _changed(stage2, stage3_whole, audio)

    # stage 1 trained the spatial layers and the face locator, not the temporal or audio layers
    start = load_model(first).state_dict()
    names = trainable_names(fresh, 1)
    assert names and not any(temporal(k) or audio(k) for k in names)
    assert any(k.startswith("face_locator.") for k in names) and any(k.startswith("reference_net.") for k in names)
    assert set(start) == set(stage1)


def test_a_trainable_or_frozen_part_that_names_no_parameter_is_refused():
    from emo_core.checkpoint import build_model

    model = build_model(preset("tiny"))
    assert trainable_names(model, 3, ["backbone"], ["audio_modules"])
    for override, frozen in ((["backbone"], ["audio_module"]), (["backbon"], None)):
        with pytest.raises(ValueError, match=r"name no parameter of this model.*backbone"):
            trainable_names(model, 3, override, frozen)


def test_first_clip_samples_start_the_video_from_its_first_frame(workdir):
    """A first-clip sample is what generation does first: the video's start, its first frame as the reference, no
    motion frames. Other clips start anywhere, with a random reference."""
    from emo_core.config import preset
    from emo_core.train import ClipSamples

    root, _ = workdir
    cfg = preset("tiny")
    m, f = cfg.motion_frames, cfg.frames_per_clip
    data = PreparedDataset(root / "prepared")
    first = ClipSamples(data, 2, cfg, 1.1, first_clip_prob=1.0, uncond_prob=0.0, seed=0, length=8)
    assert len(list(first)) == len(first)  # iterating stops at the end
    for item in first:
        assert item["first"] and item["reference_id"] == 0
        assert item["frame_ids"].tolist() == [0] * m + list(range(f))
        frames = data.video(int(item["video"]))["frames"]
        torch.testing.assert_close(item["reference"], _pixels(frames[0]))
        torch.testing.assert_close(item["frames"][m:], _pixels(frames[:f]))
    others = ClipSamples(data, 2, cfg, 1.1, first_clip_prob=0.0, uncond_prob=0.0, seed=0, length=16)
    later = [others[i] for i in range(len(others))]
    assert not any(item["first"] for item in later)
    assert len({int(item["frame_ids"][0]) for item in later}) > 1 and any(item["reference_id"] for item in later)
    for item in later:
        start = int(item["frame_ids"][0])
        assert item["frame_ids"].tolist() == list(range(start, start + m + f))


def test_cached_latents_are_the_encoded_frames(workdir):
    """cache_latents: every frame encoded once and kept; the training run sees the latents it would have encoded."""
    from diffusers import AutoencoderKL

    from emo_core.data import PreparedDataset
    from emo_core.train import LatentCache, encode_latents

    root, _ = workdir
    data = PreparedDataset(root / "prepared")
    vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True).eval()
    cache = LatentCache(vae, data, 0.5)
    ids = torch.tensor([[3, 0, 7], [1, 1, 2]])
    got = cache(torch.tensor([0, 1]), ids)
    for row, v in enumerate((0, 1)):
        expected = encode_latents(vae, _pixels(data.video(v)["frames"][ids[row]]), 0.5)
        torch.testing.assert_close(got[row], expected, atol=1e-4, rtol=0)  # batch composition: float rounding
    assert set(cache.latents) == {0, 1} and cache.latents[0].shape[0] == data.video(0)["frames"].shape[0]

    losses = {}
    for cached in (False, True):
        out = f"cache-{cached}"
        train(_config(root, 1, out, steps=2, cache_latents=cached, save_every=10), log=lambda *_: None)
        losses[cached] = [float(line.split(",")[1]) for line in (root / out / "log.csv").read_text().splitlines()[1:]]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)

    # the run kept its latents on disk: a later stage reads them instead of encoding, unless a video changed
    path = LatentCache.file_for(data, vae, 0.5)
    assert path.parent == root / "prepared" / "latents"
    kept = LatentCache.file_for(data, vae, vae.config.scaling_factor)
    assert kept.is_file() and kept != path  # the file is named after the VAE and the scale
    cache.path = path
    assert cache.save() is None and path.is_file()
    again = LatentCache(vae, data, 0.5, path)
    torch.testing.assert_close(again(torch.tensor([0, 1]), ids), got, atol=0, rtol=0)
    assert not again.added  # nothing encoded
    data.video(1)["frames"][1] = 255 - data.video(1)["frames"][1]  # a video prepared again, differently
    try:
        changed = LatentCache(vae, data, 0.5, path)
        fresh = changed(torch.tensor([0, 1]), ids)
        assert changed.added and set(changed.hashes) == set(again.hashes)
        torch.testing.assert_close(fresh[0], got[0], atol=0, rtol=0)
        assert not torch.allclose(fresh[1], got[1])  # frame 1 of video 1 changed and was encoded again
    finally:
        data.video(1)["frames"][1] = 255 - data.video(1)["frames"][1]
    path.write_bytes(b"damaged")  # an unreadable file is encoded again and replaced
    damaged = LatentCache(vae, data, 0.5, path)
    torch.testing.assert_close(damaged(torch.tensor([0, 1]), ids), got, atol=0, rtol=0)
    assert damaged.added and damaged.save() is None and LatentCache(vae, data, 0.5, path).stored.keys() == {
        data.videos[0]["file"], data.videos[1]["file"]}


def _tone_video(path, audio_delay: int, picture_delay: int = 0):
    """1 s of black picture, starting `picture_delay` frames (at 25 fps) into the file; a 300 Hz tone from 0.5 s
    of the sound track, which starts `audio_delay` samples (at 16 kHz) into the file."""
    import av

    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        audio.layout = "mono"
        for i in range(25):
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            frame.pts = i + picture_delay
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        t = np.arange(16000) / 16000
        tone = (np.sin(2 * np.pi * 300 * t) * (t >= 0.5)).astype(np.float32)[None]
        for start in range(0, 16000, 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, start:start + 1024]), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = 16000, start + audio_delay
            container.mux(audio.encode(frame))
        container.mux(audio.encode(None))


def test_prepare_pairs_each_frame_with_its_own_sound_when_the_tracks_start_apart(tmp_path):
    from emo_core.data import sound_of_the_picture

    for delay, onset in ((0, 0.5), (6400, 0.9)):  # a sound track 0.4 s late: its tone is heard at 0.9 s
        _tone_video(tmp_path / f"delay{delay}.mp4", delay)
        sound = sound_of_the_picture(tmp_path / f"delay{delay}.mp4").numpy()
        assert abs(np.argmax(np.abs(sound) > 0.3) / 16000 - onset) < 0.005
    _tone_video(tmp_path / "late_picture.mp4", 0, picture_delay=50)  # the picture starts as the sound ends
    with pytest.raises(ValueError, match="the sound ends .* before the picture starts"):
        sound_of_the_picture(tmp_path / "late_picture.mp4")


def test_prepare_redoes_what_changed_and_refuses_other_settings(workdir, tmp_path):
    root, _ = workdir
    videos, out = tmp_path / "videos", tmp_path / "prepared"
    videos.mkdir()
    (videos / "a.mp4").write_bytes((root / "videos" / "person0.mp4").read_bytes())
    (videos / "a.mov").write_bytes((root / "videos" / "person1.mp4").read_bytes())  # the same name but for the suffix
    encoder = Wav2Vec2Features.from_files(root / "encoder")
    detector = YuNetDetector(face_fixture_dir() / "yunet_final.pth", confidence=0.3)
    index = prepare(videos, out, encoder, detector, size=SIZE, clip_frames=6, log=lambda m: None)
    assert [v["name"] for v in index["videos"]] == ["a__mov", "a__mp4"]
    from emo_core.data import _file_names  # one file on Windows and macOS: names are compared without case

    assert _file_names(videos, [videos / "Talk.mp4", videos / "talk.mov"]) == ["Talk__mp4", "talk__mov"]
    data = PreparedDataset(out)
    assert not torch.equal(data.video(0)["frames"], data.video(1)["frames"])
    (videos / "a.mp4").write_bytes((root / "videos" / "person1.mp4").read_bytes())  # replaced by another video
    lines = []
    prepare(videos, out, encoder, detector, size=SIZE, clip_frames=6, log=lines.append)
    assert ["kept" in line for line in lines[:2]] == [True, False]
    data = PreparedDataset(out)
    assert torch.equal(data.video(0)["frames"], data.video(1)["frames"])
    files = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    other_encoder = random_audio_encoder(3, 16, seed=1)  # the same shape, other weights
    for changed, setting in (({"encoder": other_encoder}, "audio_encoder"), ({"size": 32}, "size 64 \\(now 32\\)")):
        arguments = dict(encoder=encoder, detector=detector, size=SIZE, clip_frames=6, log=lambda m: None)
        with pytest.raises(ValueError, match=f"prepared with other settings: {setting}.*nothing was changed"):
            prepare(videos, out, **{**arguments, **changed})
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == files
    other_encoder.model.save_pretrained(tmp_path / "other_encoder")
    cfg = _config(root, 1, "mismatch", audio_encoder=str(tmp_path / "other_encoder"))
    with pytest.raises(ValueError, match="prepared with another wav2vec2 of the same shape"):
        train(cfg, log=lambda m: None)
    assert not (root / "mismatch").exists()


def test_bad_vae_folders_and_damaged_prepared_files_stop_training_before_it_starts(workdir, tmp_path):
    import shutil

    root, _ = workdir
    for vae, message in ((tmp_path / "missing", "is not a folder"), (root / "encoder", "not a VAE"),
                         (root / "prepared", "no readable config.json")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            train(_config(root, 1, "bad_vae", vae=str(vae)), log=lambda m: None)
    shutil.copytree(root / "prepared", tmp_path / "prepared")
    damaged = tmp_path / "prepared" / "videos" / "person1.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with pytest.raises(ValueError, match="prepared video .*person1.safetensors cannot be read.*prepare"):
        train(_config(root, 1, "bad_data", data=str(tmp_path / "prepared")), log=lambda m: None)
    assert not (root / "bad_vae").exists() and not (root / "bad_data").exists()
    data = PreparedDataset(root / "prepared")
    data.index["fps"] = 30
    with pytest.raises(ValueError, match="prepared at 30 fps, the model runs at 25"):
        ClipSamples(data, 2, preset("tiny"), 1.2, 0.1, 0.1, 0, 4)
    vae_files = {f: f.read_bytes() for f in (root / "vae").iterdir()}
    with pytest.raises(ValueError, match="is not empty.*--overwrite"):
        train_vae(PreparedDataset(root / "prepared"), root / "vae", steps=1, batch_size=2, log=lambda m: None)
    assert {f: f.read_bytes() for f in (root / "vae").iterdir()} == vae_files


def test_an_error_in_training_keeps_the_steps_done(workdir, monkeypatch):
    root, _ = workdir
    calls = []
    forward = TrainingStep.forward

    def failing(self, *args):
        calls.append(1)
        if len(calls) in (1, 4):  # the first step of the first run, the third of the second
            raise RuntimeError("out of memory (a test)")
        return forward(self, *args)

    monkeypatch.setattr(TrainingStep, "forward", failing)
    cfg = _config(root, 1, "failing", steps=4, save_every=100)
    lines = []
    with pytest.raises(RuntimeError, match="a test"):
        train(cfg, log=lines.append)  # nothing done: nothing saved, and --resume starts afresh
    assert not (root / "failing" / "checkpoints").exists()
    with pytest.raises(RuntimeError, match="a test"):
        train(cfg, resume=True, log=lines.append)
    assert any("before its first save; starting it from step 0" in line for line in lines)
    assert any("stopped by an error at step 2; the 2 steps done are saved" in line for line in lines)
    assert json.loads((root / "failing" / "checkpoints" / "step_0000002" / "step.json").read_text()) == {"step": 2}
    monkeypatch.setattr(TrainingStep, "forward", forward)
    train(cfg, resume=True, log=lines.append)
    assert any("resumed" in line and "at step 2" in line for line in lines)
    steps = [int(line.split(",")[0]) for line in (root / "failing" / "log.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4]


def test_ctrl_c_saves_the_steps_done_and_the_command_fails(workdir, monkeypatch):
    root, _ = workdir
    forward, calls = TrainingStep.forward, []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return forward(self, *args)

    monkeypatch.setattr(TrainingStep, "forward", interrupted)
    cfg = _config(root, 1, "ctrl_c", steps=4, save_every=100)
    with pytest.raises(SystemExit) as stop:  # a script running the stages in turn must not go on to the next
        train_main(["train", str(root / "ctrl_c.json")])
    assert stop.value.code == 130
    assert json.loads((root / "ctrl_c" / "checkpoints" / "step_0000002" / "step.json").read_text()) == {"step": 2}
    monkeypatch.setattr(TrainingStep, "forward", forward)
    lines = []
    train(cfg, resume=True, log=lines.append)
    assert any("resumed" in line and "at step 2" in line for line in lines)


def test_gradient_checkpointing_recomputes_the_layers_and_trains_the_same(workdir, monkeypatch):
    """`gradient_checkpointing` (training memory): the layers of all stages (ResNets, transformers, temporal and
    audio layers) go through torch's checkpoint, and the trained weights are those of a run without it."""
    import emo_core.models.unet as unet

    root, _ = workdir
    start = train(_config(root, 1, "checkpointing-stage1", steps=1), log=lambda m: None)
    recomputed = []
    plain_checkpoint = unet.checkpoint

    def counted(module, *args, **kwargs):
        recomputed.append(type(module).__name__)
        return plain_checkpoint(module, *args, **kwargs)

    monkeypatch.setattr(unet, "checkpoint", counted)
    runs = {}
    for on in (False, True):
        runs[on] = _snapshot(train(_config(root, 2, f"checkpointing-{on}", init=f"checkpoint:{start}", steps=2,
                                           gradient_checkpointing=on), log=lambda m: None))
        assert bool(recomputed) == on
    assert {"ResnetBlock", "SpatialTransformer", "MotionModule", "EMOAudioAttention"} <= set(recomputed)
    assert runs[True].keys() == runs[False].keys()
    assert all(torch.allclose(runs[True][k], runs[False][k], atol=1e-6) for k in runs[False])


def test_gradient_accumulation_steps_once_per_accumulated_batches(workdir, monkeypatch):
    """`gradient_accumulation: 2` with batches of 1: each logged step is one optimizer step over 2 samples."""
    root, _ = workdir
    drawn = []
    plain_item = ClipSamples.__getitem__
    monkeypatch.setattr(ClipSamples, "__getitem__", lambda self, i: drawn.append(i) or plain_item(self, i))
    out = train(_config(root, 1, "accumulation", steps=2, batch_size=1, gradient_accumulation=2),
                log=lambda m: None).parent
    optimizer = torch.load(out / "checkpoints" / "step_0000002" / "optimizer.bin", weights_only=True)
    assert {float(state["step"]) for state in optimizer["state"].values()} == {2.0}  # not 4: one per 2 batches
    rows = [line.split(",") for line in (out / "log.csv").read_text().splitlines()[1:]]
    assert [row[0] for row in rows] == ["1", "2"] and len(drawn) == 4  # 2 steps of 2 samples


def test_mixed_precision_runs_the_step_in_bf16(workdir):
    """`mixed_precision: "bf16"` (accelerate's autocast; a command of its own, as accelerate sets it once per
    process): the same first step as in fp32, computed in bf16."""
    root, _ = workdir
    train(_config(root, 1, "precision-fp32", steps=1), log=lambda m: None)
    _config(root, 1, "precision-bf16", steps=1, mixed_precision="bf16")
    run = subprocess.run([sys.executable, "-m", "emo_core", "train", str(root / "precision-bf16.json")], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    first = {name: float((root / f"precision-{name}" / "log.csv").read_text().splitlines()[1].split(",")[1])
             for name in ("fp32", "bf16")}
    assert first["bf16"] != first["fp32"] and abs(first["bf16"] - first["fp32"]) < 0.02 * first["fp32"], first


def test_two_processes_train_one_run_resume_it_and_stop_together(workdir):
    """Training in several processes, as `accelerate launch` or torchrun starts it on GPUs (here 2 CPU processes
    talking over gloo): every process checks the output folder before the first writes to it (the second one used
    to find the first one's run.json and stop), one report, the steps shared, the warmup counted in steps (it ran
    twice as fast), a resume; and a time limit or Ctrl-C stops both processes at the same step, saved."""
    root, _ = workdir
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}

    def launch(name, steps, *options, wait=True):
        _config(root, 1, name, steps=steps, warmup_steps=4)  # (the config file is root/NAME.json)
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "emo_core", "train",
                   str(root / f"{name}.json"), *options]
        if not wait:
            return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        return run.returncode, run.stdout + run.stderr

    def rows(name):
        return [line.split(",") for line in (root / name / "log.csv").read_text().splitlines()[1:]]

    code, said = launch("two-processes", 4)
    assert code == 0, said[-3000:]
    assert said.count("(2 process(es)); 4 steps of 4 samples") == 1 and said.count("4/4 steps in") == 1, said[-3000:]
    out = root / "two-processes"
    assert [float(row[2]) for row in rows("two-processes")] == [2.5e-4, 5e-4, 7.5e-4, 1e-3]  # 4 steps of warmup
    assert read_metadata(out / "model.safetensors")["step"] == "4" and load_model(out / "model.safetensors")
    code, said = launch("two-processes", 6, "--resume")
    assert code == 0, said[-3000:]
    assert said.count(f"resumed {out} at step 4") == 1 and said.count("6/6 steps in") == 1, said[-3000:]
    assert len(rows("two-processes")) == 6

    code, said = launch("two-processes-limited", 10**5, "--max-minutes", "0.001")
    assert code == 0 and said.count("(time limit of 0.001 minutes reached; --resume continues)") == 1, said[-3000:]
    run = launch("two-processes-stopped", 10**5, wait=False)
    try:
        deadline = time.time() + 300
        while not (root / "two-processes-stopped" / "log.csv").is_file() or len(rows("two-processes-stopped")) < 2:
            assert run.poll() is None and time.time() < deadline, run.communicate()[0][-3000:]
            time.sleep(0.2)
        # Ctrl-C where only one process gets it (the launcher of one machine of several): the other process used to
        # wait for it in the next step's gradient exchange while it waited in the save, until killed, unsaved
        os.kill(psutil.Process(run.pid).children()[-1].pid, signal.SIGINT)
        said = run.communicate(timeout=120)[0]
    finally:
        if run.poll() is None:  # a hang: nothing may outlive the test
            for process in psutil.Process(run.pid).children(recursive=True) + [psutil.Process(run.pid)]:
                process.kill()
    assert run.returncode != 0 and said.count("; --resume continues)") == 1, said[-3000:]
    saved = [p for p in (root / "two-processes-stopped" / "checkpoints").glob("step_*") if (p / "step.json").is_file()]
    assert saved and {p.name for p in saved[-1].glob("random_states_*.pkl")} == {"random_states_0.pkl",
                                                                                 "random_states_1.pkl"}


def test_resume_continues_and_mismatches_are_refused(workdir):
    root, _ = workdir
    cfg = _config(root, 1, "resume", steps=2)
    train(cfg, log=lambda m: None)
    state = root / "resume" / "checkpoints" / "step_0000002"
    stamps = {f.name: f.stat().st_mtime_ns for f in state.iterdir()}
    train(cfg, resume=True, log=lambda m: None)  # nothing left to train: the saved state is not written again
    assert {f.name: f.stat().st_mtime_ns for f in state.iterdir()} == stamps
    with pytest.raises(ValueError, match="already holds a training run"):
        train(cfg, log=lambda m: None)
    (root / "mine").mkdir()  # a folder of the user's that is not a training run: never written into
    (root / "mine" / "model.safetensors").write_bytes(b"the user's own model")
    with pytest.raises(ValueError, match="a folder with files in it but not a training run"):
        train(_config(root, 1, "mine", steps=2), log=lambda m: None)
    assert [f.name for f in (root / "mine").iterdir()] == ["model.safetensors"]
    other = _config(root, 1, "resume", steps=4, model="demo")
    with pytest.raises(ValueError, match="cannot resume"):
        train(other, resume=True, log=lambda m: None)
    changed = _config(root, 1, "resume", steps=4, noise_correlation=0.3)  # would change the saved model's config
    with pytest.raises(ValueError, match="other model settings: noise_correlation"):
        train(changed, resume=True, log=lambda m: None)
    with pytest.raises(ValueError, match="trained with frozen None, this config says \\['face_locator'\\]"):
        train(_config(root, 1, "resume", steps=4, frozen=["face_locator"]), resume=True, log=lambda m: None)
    more = _config(root, 1, "resume", steps=4)
    lines = []
    train(more, resume=True, log=lines.append)
    assert any("resumed" in line and "at step 2" in line for line in lines)
    steps = [int(line.split(",")[0]) for line in (root / "resume" / "log.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4]
    with pytest.raises(CheckpointError, match="stage-1 checkpoint"):
        train(_config(root, 3, "wrong", init=f"checkpoint:{root / 'resume' / 'model.safetensors'}"),
              log=lambda m: None)
    assert not (root / "wrong" / "model.safetensors").exists()


def test_bundle_carries_vae_and_audio_encoder(workdir, tmp_path):
    from emo_core.cli import load_pipeline

    root, _ = workdir
    model_file = root / "stage1" / "model.safetensors"
    if not model_file.is_file():
        train(_config(root, 1, "stage1"), log=lambda m: None)
    out = bundle(model_file, root / "vae", root / "encoder", tmp_path / "bundled.safetensors", dtype="fp16")
    model, codec, encoder = load_pipeline(out)
    original = load_model(model_file)
    for key, value in original.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value.half().float())
    sound = torch.from_numpy(speech(1.0, 1)[0])
    want, _ = Wav2Vec2Features.from_files(root / "encoder")(sound)
    got, _ = encoder(sound)
    assert got.shape == want.shape and float((got - want).abs().max()) < 0.05 * float(want.abs().max())
    assert codec.scale == pytest.approx(model.cfg.latent_scale)
    pixels = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    assert codec.decode(codec.encode(pixels)).shape == (1, 3, SIZE, SIZE)
    _, state_dict, _ = load_checkpoint(out)
    assert not any(k.startswith(("vae.", "audio_encoder.")) for k in state_dict)
    # an existing file is replaced only when asked, and never the trained model itself
    with pytest.raises(ValueError, match="exists: choose a new file name, or pass --overwrite"):
        bundle(model_file, root / "vae", root / "encoder", out)
    size = out.stat().st_size
    bundle(model_file, root / "vae", root / "encoder", out, dtype="fp32", overwrite=True)
    assert out.stat().st_size > size  # fp32 now, fp16 before
    with pytest.raises(ValueError, match="--out is the --checkpoint itself"):
        bundle(model_file, root / "vae", root / "encoder", model_file, overwrite=True)
