"""Audio features the way Hallo computes them (fixture parity), audio loading, mp4 writing, the CLI main job."""

import json
import math
import subprocess
import sys
import wave

import av
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from emo_core.audio import Wav2Vec2Features, check_speech, frame_count, load_audio
from emo_core.video import VideoWriter

from .conftest import REPO


@pytest.fixture(scope="module")
def audio_fixture(hallo_fixture):
    path = hallo_fixture / "audio_features.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    encoder = Wav2Vec2Features.from_files(hallo_fixture / "audio_encoder.safetensors",
                                          hallo_fixture / "audio_encoder_config.json")
    cases = sorted({k.split(".")[0] for k in load_file(path)})
    return load_file(path), meta, encoder, cases


def test_features_match_hallo_from_the_16k_waveform(audio_fixture):
    data, meta, encoder, cases = audio_fixture
    fps, clip = float(meta["fps"]), int(meta["clip_length"])
    for case in cases:
        waveform = data[f"{case}.waveform_16k"]
        values, seq_len, audio_length = encoder.model_input(waveform, fps, clip)
        assert seq_len == int(data[f"{case}.seq_len"]) and audio_length == int(data[f"{case}.audio_length"])
        assert values.numel() == int(data[f"{case}.padded_num_samples"])
        torch.testing.assert_close(values, data[f"{case}.input_values"][0], atol=2e-6, rtol=0)
        features, length = encoder(waveform, fps, clip)
        torch.testing.assert_close(features, data[f"{case}.audio_emb"], atol=1e-4, rtol=0)
    unpadded, _ = encoder(data["case_a.waveform_16k"], fps, None)  # the training-data variant: no clip padding
    torch.testing.assert_close(unpadded, data["case_a.debug.audio_emb_no_clip_padding"], atol=1e-4, rtol=0)


def test_loader_matches_hallo_resampling(audio_fixture, tmp_path):
    data, meta, _, cases = audio_fixture
    for case in cases:
        samples = data[f"{case}.input_waveform"].numpy()
        rate = int(meta[f"{case}.sample_rate"])
        path = write_wav(tmp_path / f"{case}.wav", samples, rate)
        loaded = load_audio(path)
        torch.testing.assert_close(loaded, data[f"{case}.waveform_16k"], atol=1e-6, rtol=0)


def write_wav(path, samples: np.ndarray, rate: int):
    """Float WAV, samples (channels, n)."""
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_f32le", rate=rate)
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.astype(np.float32)), format="fltp",
                                           layout=layout)
        frame.sample_rate = rate
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def test_hallo_frame_count_quirk():
    assert frame_count(4480, 25) == 8 and frame_count(8960, 25) == 15  # double-precision ceil, as Hallo
    assert frame_count(52800, 25) == 83


def test_video_writer_streams_h264_and_aac(tmp_path):
    fps, frames = 25, 30
    audio = np.sin(np.linspace(0, 2000, 16000 * 2)).astype(np.float32)  # 2 s, longer than the video: trimmed
    path = tmp_path / "out.mp4"
    with VideoWriter(path, fps, audio=audio, sample_rate=16000, metadata={"comment": "test"}) as writer:
        for start in range(0, frames, 12):  # clip by clip
            n = min(12, frames - start)
            writer.write(torch.rand(n, 37, 50, 3))  # odd height: padded to even for yuv420p
    with av.open(str(path)) as c:
        video, sound = c.streams.video[0], c.streams.audio[0]
        assert video.codec_context.name == "h264" and sound.codec_context.name == "aac"
        assert video.average_rate == fps and (video.width, video.height) == (50, 38)
        decoded = sum(1 for _ in c.decode(video))
        assert c.metadata.get("comment") == "test"
    with av.open(str(path)) as c:
        samples = sum(f.samples for f in c.decode(c.streams.audio[0]))
    assert decoded == frames
    assert abs(samples / 16000 - frames / fps) < 0.07  # audio cut to the video (AAC pads < 1 frame of 1024)


@pytest.mark.parametrize("rate, stored", [(192000, 96000), (37800.0, 44100), (44100.0, 44100)])
def test_video_writer_takes_any_sample_rate_and_rgba_frames(tmp_path, rate, stored):
    """AAC carries a fixed list of rates: others are resampled to the next one up; ComfyUI's AUDIO may give the
    rate as a float; an RGBA IMAGE loses its alpha (H.264 has none)."""
    seconds = 0.4
    t = np.arange(int(seconds * rate)) / rate
    tone = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)]).astype(np.float32) * 0.5
    ramp = torch.linspace(0, 1, 32)
    rgba = torch.stack(torch.broadcast_tensors(ramp[None, :], ramp[:, None], torch.tensor(0.5), torch.tensor(0.0)),
                       dim=-1).expand(10, -1, -1, -1)  # red and green ramps, alpha 0
    path = tmp_path / "out.mp4"
    with VideoWriter(path, 25, audio=tone, sample_rate=rate) as writer:
        writer.write(rgba)
    with av.open(str(path)) as c:
        sound = c.streams.audio[0]
        assert sound.sample_rate == stored and sound.channels == 2
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    with av.open(str(path)) as c:
        audio = np.concatenate([f.to_ndarray() for f in c.decode(c.streams.audio[0])], axis=-1)
    assert len(frames) == 10 and abs(audio.shape[-1] / stored - seconds) < 0.07
    spectrum = np.abs(np.fft.rfft(audio[0, 2048:2048 + 8192]))
    assert abs(np.argmax(spectrum) * stored / 8192 - 440) < 10  # the tone kept its pitch through the resampling
    expected = (rgba[0, ..., :3] * 255).round().numpy()
    assert np.abs(frames[0].astype(float) - expected).mean() < 8  # the colour channels, not the alpha


def test_main_command_writes_a_video(tmp_path):
    out = tmp_path / "demo.mp4"
    out.write_bytes(b"an earlier video")
    run = subprocess.run([sys.executable, "-m", "emo_core", "generate", "--out", str(out), "--steps", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "emo-demo.safetensors" in run.stderr  # the bundled demo model, with its own VAE and audio encoder
    assert "replacing the earlier file" in run.stderr and [p.name for p in tmp_path.iterdir()] == ["demo.mp4"]
    with av.open(str(out)) as c:
        video = c.streams.video[0]
        frames = sum(1 for _ in c.decode(video))
        duration = c.duration / 1e6
    with wave.open(str(REPO / "emo_core" / "assets" / "speech.wav")) as w:
        seconds = w.getnframes() / w.getframerate()
    assert frames == math.ceil(seconds * 25)
    assert abs(duration - seconds) < 0.1


def test_an_interrupted_generation_keeps_the_earlier_video_and_the_frames_made(tmp_path):
    """Ctrl-C after the first clip: --out (an earlier video) is left as it was, the frames made so far are a
    playable video beside it, and the exit code is the shell's for Ctrl-C."""
    import signal

    out = tmp_path / "emo.mp4"
    out.write_bytes(b"an earlier video")
    run = subprocess.Popen([sys.executable, "-m", "emo_core", "generate", "--out", str(out), "--steps", "2"],
                           cwd=REPO, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in run.stderr:  # not a terminal: one line per clip
        lines.append(line)
        if "clip 2/" in line:
            run.send_signal(signal.SIGINT)
            break
    rest = run.communicate(timeout=120)[1]
    assert run.returncode == 130, "".join(lines) + rest
    assert out.read_bytes() == b"an earlier video"
    assert f"are in {tmp_path / 'emo.partial.mp4'}; {out} was left as it was" in rest
    with av.open(str(tmp_path / "emo.partial.mp4")) as c:
        assert sum(1 for _ in c.decode(c.streams.video[0])) >= 8  # at least the first clip


def test_main_command_reports_bad_input(tmp_path):
    def generate(*args):
        return subprocess.run([sys.executable, "-m", "emo_core", "generate", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=600)

    # settings that cannot work are refused before anything is loaded, naming the option
    for args, message in ((["--steps", "0"], "--steps: must be above 0"), (["--fps", "-5"], "--fps: must be above 0"),
                          (["--size", "30"], "--size 30: the generation size must be a multiple of 8"),
                          (["--out", str(tmp_path)], "is a folder"), (["--out", str(tmp_path / "a.gif")], ".mp4")):
        run = generate(*args)
        assert run.returncode != 0 and message in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)
    run = subprocess.run([sys.executable, "-m", "emo_core", "generate", "--audio", str(tmp_path / "missing.wav"),
                          "--out", str(tmp_path / "x.mp4")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "missing.wav" in run.stderr and "Traceback" not in run.stderr
    # the user's files are read before the model: a damaged checkpoint is not what a wrong image path reports
    (tmp_path / "model.safetensors").write_bytes(b"not a checkpoint")
    run = subprocess.run([sys.executable, "-m", "emo_core", "generate", "--image", str(tmp_path / "missing.png"),
                          "--checkpoint", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "x.mp4")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "missing.png" in run.stderr and "model.safetensors" not in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "x.mp4").exists()


@pytest.fixture(scope="module")
def encoder(hallo_fixture):
    return Wav2Vec2Features.from_files(hallo_fixture / "audio_encoder.safetensors",
                                       hallo_fixture / "audio_encoder_config.json")


def test_encoder_from_weights_alone_matches_its_config(hallo_fixture, encoder, audio_fixture):
    """ComfyUI's AUDIO_ENCODER and models/audio_encoders files carry weights only: the config comes from shapes."""
    heads = json.loads((hallo_fixture / "audio_encoder_config.json").read_text())["num_attention_heads"]
    derived = Wav2Vec2Features.from_state_dict(load_file(hallo_fixture / "audio_encoder.safetensors"),
                                               num_heads=heads)
    waveform = audio_fixture[0]["case_a.waveform_16k"]
    torch.testing.assert_close(derived(waveform)[0], encoder(waveform)[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="not wav2vec2"):
        Wav2Vec2Features.from_state_dict({"conv_in.weight": torch.zeros(1)})


def test_encoder_from_a_transformers_folder(hallo_fixture, encoder, audio_fixture, tmp_path):
    folder = tmp_path / "wav2vec2"
    encoder.model.save_pretrained(folder)  # config.json + model.safetensors, as on the hub
    waveform = audio_fixture[0]["case_b.waveform_16k"]
    torch.testing.assert_close(Wav2Vec2Features.from_files(folder)(waveform)[0], encoder(waveform)[0], atol=0, rtol=0)


def speechlike(seconds: float, rate: int = 16000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * rate)) / rate
    voice = sum(torch.sin(2 * math.pi * k * 130 * t) / k for k in range(1, 12))
    return (voice * torch.sin(2 * math.pi * 3 * t).clamp(min=0) + 0.01 * torch.randn(t.shape, generator=g)) * 0.5


def test_long_audio_is_encoded_in_windows_with_exact_conv_features(encoder):
    waveform = speechlike(70)  # 1750 frames at 25 fps
    x, seq_len, _ = encoder.model_input(waveform, 25, 16)
    torch.testing.assert_close(encoder.conv_features(x, chunk_frames=300), encoder.model.feature_extractor(x[None]),
                               atol=5e-5, rtol=0)  # chunked convolutions: exact up to float summation
    one_shot, length = encoder(waveform, 25, 16, max_frames=10**6)
    windowed, length2 = encoder(waveform, 25, 16, max_frames=500, context=250)
    assert windowed.shape == one_shot.shape and length == length2 == 1750
    assert (windowed - one_shot).abs().mean() < 0.05 * one_shot.abs().mean()  # bounded attention context only
    same, _ = encoder(waveform, 25, 16, max_frames=seq_len)  # below the limit: one shot, exact
    torch.testing.assert_close(same, one_shot, atol=0, rtol=0)


def write_pcm16(path, samples: np.ndarray, rate: int):
    import wave as wavemod

    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wavemod.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[0] if samples.ndim == 2 else 1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((pcm.T if samples.ndim == 2 else pcm).tobytes())
    return path


@pytest.mark.parametrize("case", ["telephone_8k", "stereo_48k", "silence", "clipping", "shorter_than_a_clip"])
def test_audio_inputs_of_every_kind(encoder, tmp_path, case):
    seconds = 0.3 if case == "shorter_than_a_clip" else 2.0
    base = speechlike(seconds, 48000).numpy()
    if case == "telephone_8k":
        path, rate = write_pcm16(tmp_path / "a.wav", speechlike(seconds, 8000).numpy(), 8000), 8000
    elif case == "stereo_48k":
        path, rate = write_wav(tmp_path / "a.wav", np.stack([base, 0.5 * base]), 48000), 48000
    elif case == "silence":
        path, rate = write_pcm16(tmp_path / "a.wav", np.zeros(32000), 16000), 16000
    elif case == "clipping":
        path, rate = write_pcm16(tmp_path / "a.wav", np.clip(speechlike(seconds).numpy() * 20, -1, 1), 16000), 16000
    else:
        path, rate = write_pcm16(tmp_path / "a.wav", speechlike(seconds).numpy(), 16000), 16000
    waveform = load_audio(path)
    assert waveform.shape[0] == math.ceil(round(seconds * rate) * 16000 / rate)
    features, length = encoder(waveform, 25, clip_length=16)
    assert length == frame_count(waveform.shape[0], 25)
    assert features.shape[0] % 16 == 0 and features.shape[0] >= length and torch.isfinite(features).all()


def test_silent_or_one_frame_audio_is_refused_with_a_reason():
    check_speech(speechlike(0.1), 25)  # 3 frames of sound: fine
    check_speech(torch.cat([torch.zeros(32000), speechlike(0.1)]), 25)  # quiet start, then speech: fine
    with pytest.raises(ValueError, match="the audio is silent"):
        check_speech(torch.zeros(32000), 25)
    with pytest.raises(ValueError, match="1 video frame"):
        check_speech(speechlike(0.03), 25)


def test_ten_minute_file(encoder, tmp_path):
    path = write_pcm16(tmp_path / "long.wav", speechlike(600).numpy(), 16000)
    waveform = load_audio(path)
    features, length = encoder(waveform, 25, clip_length=16)  # windows of 60 s: bounded memory
    assert length == 15000 and features.shape == (15008, 3, 32) and torch.isfinite(features).all()


def test_unreadable_audio_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wave file")
    with pytest.raises(ValueError, match="bad.wav"):
        load_audio(bad)
    with pytest.raises(ValueError, match="at least 400 samples"):
        Wav2Vec2Features.__call__(None, torch.zeros(100))


def test_main_command_animates_the_face_of_any_portrait_size(tmp_path):
    from PIL import Image

    from .conftest import face_fixture_dir

    photo = Image.open(face_fixture_dir() / "astronaut.png").convert("RGB").crop((0, 0, 512, 400))  # not square
    photo.save(tmp_path / "portrait.jpg")
    out = tmp_path / "face.mp4"
    run = subprocess.run([sys.executable, "-m", "emo_core", "generate", "--image", str(tmp_path / "portrait.jpg"),
                          "--face-detector", str(face_fixture_dir() / "yunet_final.pth"), "--out", str(out),
                          "--steps", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    with av.open(str(out)) as c:
        video = c.streams.video[0]
        first = next(c.decode(video)).to_ndarray(format="rgb24").astype(np.float32) / 255
    assert (video.width, video.height) == (512, 400)  # pasted back at the portrait's own resolution
    original = np.asarray(photo, dtype=np.float32) / 255
    assert np.abs(first[380:, :] - original[380:, :]).mean() < 0.03  # far from the face: the photo itself
    assert np.abs(first[100:150, 200:250] - original[100:150, 200:250]).mean() > 0.05  # the face: generated


def test_portraits_that_make_a_poor_video_are_warned_about(capsys):
    from argparse import Namespace

    from emo_core.cli import warn_about_framing
    from emo_core.face import Crop

    plain = Namespace(image="p.png", face_mask=None)
    warn_about_framing(Crop(100, 100, 200.0, 512, 200, 200), None, 512, plain)
    said = capsys.readouterr().err
    assert "200 px wide, enlarged 2.6x to the model's 512 px" in said and "centre square" not in said
    warn_about_framing(Crop(450, 150, 300.0, 64, 300, 900), None, 64, plain)  # no detector, or no face found
    said = capsys.readouterr().err
    assert "p.png is 900x300 and its face was not located" in said and "enlarged" not in said
    face = object()  # a detected face frames the crop
    warn_about_framing(Crop(450, 150, 300.0, 512, 300, 900), face, 512, plain)
    warn_about_framing(Crop(450, 150, 300.0, 512, 300, 900), None, 512, Namespace(image="p.png", face_mask="m.png"))
    warn_about_framing(Crop(100, 80, 160.0, 64, 160, 200), None, 64, plain)
    assert capsys.readouterr().err == ""  # a region near the model's size, an almost square image


def test_main_command_without_a_face(tmp_path):
    from PIL import Image

    from .conftest import face_fixture_dir

    wall = np.linspace(90, 170, 200 * 160).reshape(160, 200, 1).repeat(3, axis=2).astype(np.uint8)  # shaded
    Image.fromarray(wall).save(tmp_path / "wall.png")
    args = [sys.executable, "-m", "emo_core", "generate", "--image", str(tmp_path / "wall.png"), "--face-detector",
            str(face_fixture_dir() / "yunet_final.pth"), "--out", str(tmp_path / "x.mp4"), "--steps", "1"]
    run = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "no face found in wall.png" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run(args + ["--whole-image-fallback"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    mask = Image.new("L", (200, 160), 0)
    mask.paste(255, (60, 30, 120, 110))
    mask.save(tmp_path / "mask.png")
    run = subprocess.run(args + ["--face-mask", str(tmp_path / "mask.png")], cwd=REPO, capture_output=True,
                         text=True, timeout=600)  # the user's mask wins: no detection needed
    assert run.returncode == 0, run.stderr[-2000:]
    Image.new("L", (200, 160), 0).save(tmp_path / "empty.png")
    run = subprocess.run(args + ["--face-mask", str(tmp_path / "empty.png")], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode != 0 and "is empty" in run.stderr and "Traceback" not in run.stderr
    Image.new("RGB", (200, 160), (120, 130, 140)).save(tmp_path / "flat.png")  # a blank picture: nothing to animate
    flat = {str(tmp_path / "wall.png"): str(tmp_path / "flat.png"), str(tmp_path / "x.mp4"): str(tmp_path / "f.mp4")}
    run = subprocess.run([flat.get(arg, arg) for arg in args] + ["--whole-image-fallback"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "one flat colour" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "f.mp4").exists()  # no video of noise


@pytest.mark.parametrize("native", [60, 24])
def test_videos_are_resampled_to_the_training_frame_rate(tmp_path, native):
    """Output frame k (at k / 25 s) is the native frame shown at that moment; as many as the video lasts."""
    from emo_core.video import VideoFrames, read_video

    count = int(native * 1.5)
    frames = (torch.arange(count) * 250 // count / 255).view(-1, 1, 1, 1).expand(-1, 16, 16, 3)  # frame i: grey i
    with VideoWriter(tmp_path / "in.mp4", native) as writer:
        writer.write(frames)
    got, fps = read_video(tmp_path / "in.mp4", fps=25)
    shown = [math.floor(k * native / 25 + 1e-6) for k in range(int(1.5 * 25))]
    assert fps == 25.0 and got.shape[0] == len(shown)
    levels = got.float().mean(dim=(1, 2, 3))
    torch.testing.assert_close(levels, torch.tensor([i * 250 // count for i in shown], dtype=torch.float), atol=2.5,
                               rtol=0)
    assert read_video(tmp_path / "in.mp4", fps=25, max_frames=7)[0].shape[0] == 7
    video = VideoFrames(tmp_path / "in.mp4", fps=25, batch=4, channels_first=True)  # prepare's way: by batches
    for _ in range(2):  # decoded anew on each pass
        batches = list(video)
        assert [b.shape[0] for b in batches[:-1]] == [4] * (len(batches) - 1)
        assert torch.equal(torch.cat(batches), got.permute(0, 3, 1, 2))
    with VideoWriter(tmp_path / "short.mp4", native) as writer:  # 4 native frames last 4 / native s
        writer.write(frames[:4])
    whole = int((4 / native) * 25 + 1e-6)  # output frames inside that length, however many are asked for
    assert read_video(tmp_path / "short.mp4", fps=25, max_frames=whole + 1)[0].shape[0] == whole


def test_weights_without_the_training_mask_embedding_load_the_same_every_time(hallo_fixture, tmp_path):
    """wav2vec2-base-960h and other files leave out masked_spec_embed (used only for masking in training): it is
    zeros, not a random init, so the same file is the same model (prepare and train compare the weights)."""
    from safetensors.torch import save_file

    from emo_core.checkpoint import weights_fingerprint

    weights = load_file(hallo_fixture / "audio_encoder.safetensors")
    save_file({k: v for k, v in weights.items() if "masked_spec_embed" not in k}, tmp_path / "enc.safetensors")
    config = hallo_fixture / "audio_encoder_config.json"
    loaded = [Wav2Vec2Features.from_files(tmp_path / "enc.safetensors", config).model for _ in range(2)]
    assert weights_fingerprint(loaded[0]) == weights_fingerprint(loaded[1])
    assert not loaded[0].masked_spec_embed.any()


def test_non_integer_frame_rates(encoder, tmp_path):
    waveform = speechlike(2.0)
    features, length = encoder(waveform, fps=29.97, clip_length=12)
    assert length == frame_count(waveform.shape[0], 29.97) == 60 and features.shape[0] == 60
    with pytest.raises(ValueError, match="fps"):
        encoder(waveform, fps=0)
    path = tmp_path / "ntsc.mp4"
    with VideoWriter(path, 29.97, audio=waveform.numpy()) as writer:
        writer.write(torch.rand(48, 32, 32, 3))
    with av.open(str(path)) as c:
        assert float(c.streams.video[0].average_rate) == pytest.approx(29.97, abs=1e-3)
        assert sum(1 for _ in c.decode(c.streams.video[0])) == 48
    for bad in (dict(fps=0), dict(fps=25, crf=99)):
        with pytest.raises(ValueError):
            VideoWriter(tmp_path / "bad.mp4", **bad)
    writer = VideoWriter(tmp_path / "sizes.mp4", 25)
    writer.write(torch.rand(2, 32, 32, 3))
    with pytest.raises(ValueError, match="size of the first"):
        writer.write(torch.rand(2, 48, 32, 3))


def test_main_command_keeps_the_audio_and_reads_any_image(tmp_path):
    from PIL import Image

    grey16 = (np.linspace(0, 65535, 96 * 80).reshape(80, 96)).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    Image.new("RGBA", (90, 70), (200, 150, 100, 128)).save(tmp_path / "rgba.png")
    sound = np.stack([speechlike(1.0, 48000).numpy(), 0.3 * speechlike(1.0, 48000, seed=1).numpy()])
    write_wav(tmp_path / "song.wav", sound, 48000)
    from emo_core.cli import load_image

    grey = load_image(tmp_path / "grey16.png")
    assert grey.shape == (1, 3, 80, 96) and 0.45 < float(grey.mean()) < 0.55  # 16-bit values scaled, not clipped
    rgba = load_image(tmp_path / "rgba.png")
    assert torch.allclose(rgba[0, :, 0, 0], torch.tensor([200, 150, 100]) / 255 * 128 / 255, atol=0.01)
    out = tmp_path / "song.mp4"
    run = subprocess.run([sys.executable, "-m", "emo_core", "generate", "--image", str(tmp_path / "grey16.png"),
                          "--audio", str(tmp_path / "song.wav"), "--out", str(out), "--steps", "1", "--crf", "30"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    with av.open(str(out)) as c:
        audio = c.streams.audio[0]
        assert (audio.codec_context.sample_rate, audio.codec_context.channels) == (48000, 2)  # as given
        assert (c.streams.video[0].width, c.streams.video[0].height) == (96, 80)
