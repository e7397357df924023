"""Behaviour of the EMO network and sampler on tiny random models: every conditioning signal changes the output,
the zero-initialised layers leave a fresh Backbone unchanged, sampling is deterministic, cancellable and bounded."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from emo_core.checkpoint import load_model, save_checkpoint
from emo_core.config import EMOConfig, preset
from emo_core.models.emo import EMONet
from emo_core.models.unet import UNetConditions
from emo_core.random_weights import randomize_
from emo_core.sampler import (EMOInputError, GenerationCancelled, GenerationInputs, SamplerSettings, SamplerStats,
                              encode_reference, generate)

LATENT = 8  # 64x64 images


def tiny_model(name="tiny", seed=0):
    torch.manual_seed(seed)
    return randomize_(EMONet(preset(name)), seed).eval()


def inputs_for(model, frames=8, seed=1, **overrides):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    base = dict(
        reference_latent=torch.randn(1, 4, LATENT, LATENT, generator=g),
        audio_features=torch.randn(frames, cfg.audio.layers, cfg.audio.channels, generator=g),
        face_mask=(torch.rand(1, cfg.face_locator.in_channels, LATENT * 8, LATENT * 8, generator=g) > 0.5).float(),
        speed=2.0 if cfg.speed else None,
        identity_embedding=torch.randn(cfg.identity_dim, generator=g) if cfg.identity_tokens else None,
    )
    base.update(overrides)
    return GenerationInputs(**base)


def run(model, inputs, codec=None, stats=None, **settings):
    settings = {"steps": 2, "seed": 0, **settings}
    clips = generate(model, inputs, SamplerSettings(**settings), codec=codec, stats=stats)
    return torch.cat([c.latents for c in clips], dim=2)


class PixelCodec:
    """A stand-in VAE for the Hallo motion-frame path: average-pool / nearest-upsample (no learned weights)."""

    def encode(self, pixels):
        return torch.nn.functional.avg_pool2d(pixels, 8)[:, :1].expand(-1, 4, -1, -1)

    def decode(self, latents):
        return torch.nn.functional.interpolate(latents[:, :3], scale_factor=8).clamp(-1, 1) / 2 + 0.5


@pytest.fixture(scope="module")
def emo():
    return tiny_model("tiny")


@pytest.fixture(scope="module")
def hallo():
    return tiny_model("hallo-tiny")


@pytest.mark.parametrize("signal", ["audio_features", "reference_latent", "face_mask", "speed"])
def test_each_emo_conditioning_signal_changes_the_output(emo, signal):
    base = inputs_for(emo)
    g = torch.Generator().manual_seed(99)
    changed = {
        "audio_features": torch.randn(base.audio_features.shape, generator=g),
        "reference_latent": torch.randn(base.reference_latent.shape, generator=g),
        "face_mask": 1 - base.face_mask,
        "speed": 7.0,
    }[signal]
    a = run(emo, base)
    b = run(emo, dataclasses.replace(base, **{signal: changed}))
    assert (a - b).abs().max() > 1e-3, f"{signal} has no effect"


@pytest.mark.parametrize("signal", ["audio_features", "identity_embedding", "face_mask", "region_masks"])
def test_each_hallo_conditioning_signal_changes_the_output(hallo, signal):
    base = inputs_for(hallo)
    g = torch.Generator().manual_seed(99)
    levels = [LATENT ** 2 // 4 ** i for i in range(4)]
    changed = {
        "audio_features": torch.randn(base.audio_features.shape, generator=g),
        "identity_embedding": torch.randn(base.identity_embedding.shape, generator=g),
        "face_mask": 1 - base.face_mask,
        "region_masks": {k: [torch.rand(n, generator=g) for n in levels] for k in ("full", "face", "lip")},
    }[signal]
    a = run(hallo, base, codec=PixelCodec())
    b = run(hallo, dataclasses.replace(base, **{signal: changed}), codec=PixelCodec())
    assert (a - b).abs().max() > 1e-3, f"{signal} has no effect"


def backbone_call(model, motion_features, audio, speed, face, frames=4):
    """One Backbone forward with explicit reference / motion-frame features (bank) for 1 row."""
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(1, 4, LATENT, LATENT, generator=g)
    with torch.no_grad():
        bank = model.reference_features(ref, None)
        bank = [torch.cat([b[:, None], m], dim=1) for b, m in zip(bank, motion_features)]
        windows = audio[None].unfold(1, 5, 1).permute(0, 1, 4, 2, 3)[:, :frames]  # any (1, F, 5, layers, C) windows
        cond = UNetConditions(bank=bank, use_reference=torch.tensor([True]), audio=model.audio_proj(windows)[0],
                              speed=model.speed_encoder(speed[None])[:, :frames])
        face_features = model.face_locator(face)[:, :, None].expand(-1, -1, frames, -1, -1)
        x = torch.randn(1, 4, 4, LATENT, LATENT, generator=g)[:, :, :frames]
        return model.denoise(x, torch.tensor(500), cond, face_features)


def conditions(model, seed, frames=4, motion=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        shapes = [b.shape for b in model.reference_features(torch.zeros(1, 4, LATENT, LATENT), None)]
    return dict(
        motion_features=[torch.randn(1, motion, *s[1:], generator=g) for s in shapes],
        audio=torch.randn(frames + 4, model.cfg.audio.layers, model.cfg.audio.channels, generator=g),
        speed=torch.rand(frames, generator=g) * 8,
        face=torch.rand(1, 1, LATENT * 8, LATENT * 8, generator=g),
    )


def test_motion_frames_change_the_output(emo):
    a = conditions(emo, 1)
    b = dict(a, motion_features=conditions(emo, 2)["motion_features"])
    assert (backbone_call(emo, **a) - backbone_call(emo, **b)).abs().max() > 1e-3


def test_zero_initialised_layers_leave_a_fresh_backbone_unchanged():
    torch.manual_seed(0)
    fresh = EMONet(preset("tiny")).eval()  # audio, temporal, speed layers and face locator output are zero-init
    a, b = conditions(fresh, 1), conditions(fresh, 2)
    out_a, out_b = backbone_call(fresh, **a), backbone_call(fresh, **b)
    torch.testing.assert_close(out_a, out_b, atol=1e-6, rtol=0)  # audio, speed, face, motion frames: no effect
    # ... and the frames are denoised independently, as by the image UNet the Backbone was initialised from.
    single = backbone_call(fresh, **{**a, "speed": a["speed"][:1]}, frames=1)
    torch.testing.assert_close(out_a[:, :, :1], single, atol=1e-5, rtol=0)
    # The same check fails once those layers carry weights: the test can tell.
    randomize_(fresh, 3)
    assert (backbone_call(fresh, **a) - backbone_call(fresh, **b)).abs().max() > 1e-3


def test_sampling_is_deterministic_for_a_seed(emo):
    inputs = inputs_for(emo)
    torch.testing.assert_close(run(emo, inputs, seed=7), run(emo, inputs, seed=7), atol=0, rtol=0)
    assert (run(emo, inputs, seed=7) - run(emo, inputs, seed=8)).abs().max() > 1e-3


def test_frame_noise_shares_the_asked_part_of_the_variance():
    from emo_core.sampler import frame_noise

    independent = frame_noise((2, 4, 8, 6, 6), 0.0, torch.Generator().manual_seed(5))
    torch.testing.assert_close(independent, torch.randn((2, 4, 8, 6, 6), generator=torch.Generator().manual_seed(5)),
                               atol=0, rtol=0)  # rho = 0: exactly the paper's independent draws
    noise = frame_noise((64, 4, 2, 16, 16), 0.6, torch.Generator().manual_seed(5))
    a, b = noise[:, :, 0].flatten(), noise[:, :, 1].flatten()
    assert abs(float(noise.var()) - 1) < 0.03  # every frame stays N(0, I)
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1]) - 0.6) < 0.03


def test_correlated_noise_makes_frames_and_clips_alike(emo):
    inputs = inputs_for(emo, frames=emo.cfg.frames_per_clip * 2)
    inputs.audio_features = inputs.audio_features[:1].expand_as(inputs.audio_features)  # only the noise differs

    def change(video):  # (1, 4, S, h, w): mean frame-to-frame change inside clips, and clip 0 vs clip 1
        f = emo.cfg.frames_per_clip
        inside = (video[:, :, 1:f] - video[:, :, :f - 1]).abs().mean()
        return float(inside), float((video[:, :, :f] - video[:, :, f:]).abs().mean())

    # no motion frames: both clips are made from the same conditions, so only the noise tells them apart
    independent = change(run(emo, inputs, motion_frames=0))
    correlated = change(run(emo, inputs, motion_frames=0, noise_correlation=0.95))
    assert correlated[0] < 0.5 * independent[0]  # frames of a clip share their noise
    assert correlated[1] < 0.5 * independent[1]  # and consecutive clips share it too (drawn once per video)
    with pytest.raises(EMOInputError, match="noise correlation"):
        run(emo, inputs, noise_correlation=1.0)


def test_clip_by_clip_any_length(emo):
    cfg = emo.cfg
    frames = cfg.frames_per_clip * 3 + 1  # 3 full clips and 1 frame
    stats = SamplerStats()
    steps = []
    clips = list(generate(emo, inputs_for(emo, frames=frames), SamplerSettings(steps=2),
                          progress=lambda *a: steps.append(a), stats=stats))
    assert [c.index for c in clips] == [0, 1, 2, 3]
    assert sum(c.latents.shape[2] for c in clips) == frames
    assert stats.reference_calls == 4 and stats.backbone_calls == 8  # ReferenceNet once per clip, not per step
    # ... on the portrait once, then on each later clip's motion frames only (rows: CFG groups of contexts)
    assert stats.reference_images == 1 + 3 * cfg.motion_frames * (2 if cfg.identity_tokens else 1)
    assert steps[-1] == (8, 8, 3, 4) and len(steps) == 8


def test_given_portrait_features_are_used_as_they_are(emo):
    """The ComfyUI ReferenceNet node computes the portrait's features once; the sampler then runs ReferenceNet on
    motion frames only, and the video is the one it would have computed itself."""
    from emo_core.sampler import run_reference_net

    inputs = inputs_for(emo, frames=emo.cfg.frames_per_clip * 2)
    assert not emo.cfg.identity_tokens  # (those compute the portrait's features with the identity)
    expected = run(emo, inputs, seed=3)
    inputs.reference_features = run_reference_net(emo, inputs.reference_latent)
    stats = SamplerStats()
    torch.testing.assert_close(run(emo, inputs, seed=3, stats=stats), expected, atol=1e-5, rtol=0)
    assert stats.reference_images == emo.cfg.motion_frames  # the second clip's motion frames only
    inputs.reference_features = [f * 0 for f in inputs.reference_features]
    assert (run(emo, inputs, seed=3) - expected).abs().max() > 1e-3  # and they are what the video is made from


def test_cfg_rows_run_as_one_batched_forward(emo):
    seen = []
    handle = emo.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        run(emo, inputs_for(emo), guidance_scale=3.5)
        run(emo, inputs_for(emo), guidance_scale=1.0)
    finally:
        handle.remove()
    assert seen == [2, 2, 2, 2, 1, 1, 1, 1]


def test_cancel_stops_within_one_step(emo):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(GenerationCancelled):
        list(generate(emo, inputs_for(emo), SamplerSettings(steps=2), cancel=cancel))
    assert len(calls) == 4


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp", "unipc"])
def test_schedulers(emo, scheduler):
    out = run(emo, inputs_for(emo), scheduler=scheduler, steps=3)
    assert torch.isfinite(out).all()


def test_bad_inputs_have_clear_errors(emo):
    base = inputs_for(emo)
    cases = [
        (dict(audio_features=base.audio_features[:0]), "hold no frame"),
        (dict(face_mask=base.face_mask.expand(3, -1, -1, -1), num_frames=5), "mask has 3 frames but the video has 5"),
        (dict(audio_features=base.audio_features[:, :1]), "audio features must be"),
        (dict(face_mask=base.face_mask[:, :, :10]), "face mask must be"),
        (dict(face_mask=base.face_mask[0]), "face mask must be"),
        (dict(num_frames=0), "num_frames"),
        (dict(reference_latent=base.reference_latent[0]), "reference latent must be"),
        (dict(speed=torch.ones(3)), "speed must be"),
    ]
    for change, message in cases:
        with pytest.raises(EMOInputError, match=message):
            run(emo, dataclasses.replace(base, **change))
    for settings, message in [(dict(scheduler="euler_magic"), "scheduler"), (dict(steps=0), "steps must be"),
                              (dict(frames_per_clip=1, motion_frames=2), "cannot exceed frames per clip")]:
        with pytest.raises(EMOInputError, match=message):
            run(emo, base, **settings)
    with pytest.raises(EMOInputError, match="multiples of 8"):
        encode_reference(PixelCodec(), torch.zeros(1, 3, 100, 128))
    with pytest.raises(EMOInputError, match="one flat colour: there is no face"):  # e.g. a blanked image
        encode_reference(PixelCodec(), torch.tensor([0.3, 0.5, -0.2]).view(1, 3, 1, 1).expand(1, 3, 64, 64))
    faint = torch.full((1, 3, 64, 64), 0.3)
    faint[..., 20:40, 20:40] += 6 / 255  # a faint picture (3 steps of 8-bit colour) is still a picture
    assert encode_reference(PixelCodec(), faint).shape[0] == 1


def test_audio_shorter_than_a_clip_and_one_mask_per_kept_frame(emo):
    """Audio features come padded to whole clips (8 here); the video keeps num_frames of them. A clip's worth of
    audio is not needed, and one face mask per kept frame is what a user gives."""
    base = inputs_for(emo)
    short = run(emo, dataclasses.replace(base, audio_features=base.audio_features[:2]))
    assert short.shape[2] == 2 and torch.isfinite(short).all()
    masks = base.face_mask.expand(5, -1, -1, -1).clone()
    masks[3:] = 0  # the face leaves the last frames' mask: their features differ from the first frames'
    out = run(emo, dataclasses.replace(base, face_mask=masks, num_frames=5))
    assert out.shape[2] == 5 and not torch.equal(out, run(emo, dataclasses.replace(base, num_frames=5)))


def test_config_round_trips_through_json():
    for name in ("emo", "hallo", "tiny", "hallo-tiny", "small"):
        cfg = preset(name)
        assert EMOConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        EMOConfig.from_dict({"name": "x", "wings": 2})


class CastOps:
    """An `operations` namespace like ComfyUI's manual-cast ops: weights stay in their storage dtype and are cast
    to the activations' dtype and device at every call."""

    class Linear(torch.nn.Linear):
        def forward(self, x):
            return F.linear(x, self.weight.to(x), None if self.bias is None else self.bias.to(x))

    class Conv2d(torch.nn.Conv2d):
        def forward(self, x):
            return self._conv_forward(x, self.weight.to(x), None if self.bias is None else self.bias.to(x))

    class GroupNorm(torch.nn.GroupNorm):
        def forward(self, x):
            return F.group_norm(x, self.num_groups, self.weight.to(x), self.bias.to(x), self.eps)

    class LayerNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(x), self.bias.to(x), self.eps)


@pytest.mark.parametrize("name", ["tiny", "hallo-tiny"])
def test_operations_namespace_with_weights_stored_in_another_dtype(tmp_path, name):
    reference = tiny_model(name)
    save_checkpoint(reference, tmp_path / "model.safetensors")
    cast = load_model(tmp_path / "model.safetensors", dtype=torch.bfloat16, operations=CastOps).eval()
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16}
    assert isinstance(cast.backbone.conv_in, CastOps.Conv2d)
    with torch.no_grad():  # the same weights, rounded to bf16, stored and computed in float32
        for p in reference.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    inputs = inputs_for(reference)
    codec = PixelCodec()
    expected = run(reference, inputs, codec=codec)
    out = torch.cat([c.latents for c in generate(cast, inputs, SamplerSettings(steps=2), codec=codec,
                                                 dtype=torch.float32)], dim=2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)  # computed in float32 from bf16-stored weights


def test_motion_frames_carry_the_previous_clip_through_the_sampler(emo):
    frames, m = emo.cfg.frames_per_clip, emo.cfg.audio.window
    base = inputs_for(emo, frames=2 * frames)
    audio = base.audio_features.clone()
    audio[: frames - m] += 3  # changes clip 1 only: clip 2's audio windows start at frame F - m
    changed = dataclasses.replace(base, audio_features=audio)
    for motion, depends in ((0, False), (2, True)):
        a = run(emo, base, motion_frames=motion)[:, :, frames:]
        b = run(emo, changed, motion_frames=motion)[:, :, frames:]
        assert ((a - b).abs().max() > 1e-3) == depends, f"motion_frames={motion}"


def test_clips_are_produced_lazily_and_cut_to_num_frames(emo):
    frames = emo.cfg.frames_per_clip
    stats = SamplerStats()
    clips = generate(emo, inputs_for(emo, frames=5 * frames, num_frames=frames + 1), SamplerSettings(steps=2),
                     stats=stats)
    first = next(clips)
    assert stats.backbone_calls == 2 and first.latents.shape[2] == frames  # nothing beyond the first clip yet
    rest = list(clips)
    assert [c.latents.shape[2] for c in rest] == [1] and stats.backbone_calls == 4  # 2 clips, not 5


def test_benchmark_prints_one_json_line(capsys):
    from emo_core.bench import main

    main(["--preset", "tiny", "--clips", "2", "--steps", "1", "--threads", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    for key in ("frames", "clips", "steps", "wall_s", "s_per_frame", "peak_rss_mb", "peak_cuda_mb",
                "reference_calls", "reference_images", "load_s"):
        assert key in result, key
    assert result["frames"] == 2 * preset("tiny").frames_per_clip and result["reference_calls"] == 2
