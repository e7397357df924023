"""The bundled demo model (emo_core/assets/emo-demo.safetensors), trained by scripts/train_demo.sh: it is small,
self-contained, and it really talks. Quality is measured from the pixels of generated videos (eval-synthetic) on
held-out synthetic identities and held-out speech."""

import pytest

from emo_core.checkpoint import load_companions, read_metadata
from emo_core.cli import DEMO_CHECKPOINT, load_pipeline
from emo_core.evaluate import evaluate

from .conftest import face_fixture_dir


def test_demo_model_is_small_and_self_contained():
    assert DEMO_CHECKPOINT.stat().st_size < 20 * 2**20
    assert read_metadata(DEMO_CHECKPOINT)["stage"] == "3"
    assert set(load_companions(DEMO_CHECKPOINT)) == {"vae", "audio_encoder"}
    model, codec, encoder = load_pipeline(DEMO_CHECKPOINT)
    assert model.cfg.name == "demo" and model.cfg.speed is not None
    assert encoder.layers == model.cfg.audio.layers


@pytest.fixture(scope="module")
def metrics():
    # A short version of `python -m emo_core eval-synthetic` (2 held-out people, 1 held-out speech clip of 2 s,
    # 10 DDIM steps) to keep the suite fast; the note of the issue has the full run's numbers.
    return evaluate(DEMO_CHECKPOINT, face_fixture_dir() / "yunet_final.pth", seed=1, identities=2, seconds=2.0,
                    steps=10, speeds=(0.5, 3.0), speech_clips=1, log=print)


def test_demo_lipsync_is_clearly_above_the_shuffled_audio_baseline(metrics):
    assert metrics["lipsync_corr"] > 0.3
    assert metrics["lipsync_corr"] > metrics["lipsync_corr_shuffled"] + 0.2


def test_demo_clip_boundaries_are_as_smooth_as_inside_clips(metrics):
    assert 0.5 < metrics["boundary_ratio"] < 1.6  # measured 1.10 by eval-synthetic --seed 0 (see the issue note)


def test_demo_faces_flicker_at_most_a_few_times_as_much_as_real_video(metrics):
    # Frame-to-frame change in the face box: 0.0286 generated vs 0.0138 for a real clip of the same people through
    # the VAE (eval-synthetic --seed 0, see the issue note). The gap is the demo's main weakness; this guards it from
    # growing (e.g. temporal modules that stop being used would leave every frame on its own).
    assert metrics["flicker_real"] > 0 and metrics["flicker"] < 3 * metrics["flicker_real"]


def test_demo_keeps_the_identity(metrics):
    assert metrics["identity"] > metrics["identity_other"] + 0.1


@pytest.mark.xfail(strict=False, reason="issue 5, open: the demo model's speed control does not work yet. Its "
                   "speed layers are used in training, barely (first-clip loss 0.0340 with the right speed labels, "
                   "0.0345 shuffled; none on continuing clips), and a generated head does not turn faster when asked: "
                   "eval-synthetic --seed 0 measured 2.37, 1.85, 1.70 deg/frame for 0.5, 1.5, 3.0, landmark noise "
                   "(real clips turning at 3 deg/frame read 1.6-4.7 through its 64 px VAE). Speed acts on first "
                   "clips only when the spatial layers train too and high-noise steps dominate, and no variant tried "
                   "(4 motion frames included) makes continuing clips follow their motion frames' velocity. With "
                   "this short eval it may pass by chance")
def test_demo_faster_requested_speed_gives_faster_measured_head_motion(metrics):
    # A working speed control must make the head of a fast request measurably faster than that of a slow one.
    speeds = metrics["speed_measured"]
    assert speeds["3.0"] > speeds["0.5"] + 0.4


def test_face_change_is_measured_inside_the_face_box_only():
    import torch

    from emo_core.evaluate import face_change

    frames = torch.zeros(4, 3, 32, 32)
    frames[1::2, :, :, :8] = 1  # flicker outside the box
    assert face_change(frames, (10, 10, 20, 20)) == 0
    frames[1::2, :, 12:14, 12:14] = 1  # 4 of the 100 box pixels change at every frame
    assert abs(face_change(frames, (10, 10, 20, 20)) - 0.04) < 1e-6


def test_demo_speed_layers_change_the_video():
    """The requested head speed reaches the pixels (the speed layers were trained in stage 3)."""
    import torch

    from emo_core.cli import ASSETS, load_image
    from emo_core.face import centred_face_mask
    from emo_core.sampler import GenerationInputs, SamplerSettings, generate
    from emo_core.synthetic import speech

    model, codec, encoder = load_pipeline(DEMO_CHECKPOINT)
    features, frames = encoder(torch.from_numpy(speech(1.0, 3)[0]), fps=25, clip_length=model.cfg.frames_per_clip)
    portrait = torch.nn.functional.interpolate(load_image(ASSETS / "portrait.png"), size=(64, 64), mode="area")
    portrait = portrait * 2 - 1
    videos = {}
    for speed in (0.5, 3.0):
        inputs = GenerationInputs(reference_latent=codec.encode(portrait), audio_features=features,
                                  face_mask=centred_face_mask(64, 64), speed=speed, num_frames=16)
        videos[speed] = torch.cat([codec.decode(c.latents[0].transpose(0, 1))
                                   for c in generate(model, inputs, SamplerSettings(seed=0, steps=6))])
    change = (videos[0.5] - videos[3.0]).abs()  # a small effect, see the issue note
    assert float(change.mean()) > 0.001 and float(change.max()) > 0.01
