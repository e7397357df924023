"""Our network computes Hallo's function: checked against the hallo_tiny fixture (see its README).

Every size, frame count, step count and guidance value comes from the fixture's config.json and tensors, so the
same tests pass on any fixture with this layout (EMO_HALLO_FIXTURE). Tolerances are the README's suggestions.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from emo_core.checkpoint import load_model
from emo_core.models.reference_attention import SpatialTransformer
from emo_core.models.unet import UNetConditions
from emo_core.sampler import GenerationInputs, SamplerSettings, SamplerStats, generate
from emo_core.vae import DiffusersVAE


@pytest.fixture(scope="module")
def model(hallo_fixture):
    return load_model(hallo_fixture / "net.safetensors").eval()


@pytest.fixture(scope="module")
def forward_data(hallo_fixture):
    path = hallo_fixture / "unet_forward.safetensors"
    with safe_open(str(path), framework="pt") as f:
        order = json.loads(f.metadata()["reference_bank_order"])
    return load_file(path), order


def bank_positions(model, order):
    """Fixture bank index -> our bank index, pairing by module path."""
    ours = {name + ".transformer_blocks.0": m.bank_index for name, m in model.reference_net.named_modules()
            if isinstance(m, SpatialTransformer)}
    return {i: ours[path] for i, path in enumerate(order)}


def region_masks(data, prefix="input."):
    levels = sorted({int(k.rsplit(".", 1)[1]) for k in data if k.startswith(f"{prefix}full_mask.")})
    return {kind: [data[f"{prefix}{kind}_mask.{level}"] for level in levels] for kind in ("full", "face", "lip")}


def single_forward(model, data, round_bank=True):
    """The fixture's step list: image/audio tokens, face features, reference pass, then one Backbone call."""
    rows, frames = data["input.noisy_latents"].shape[:3:2]
    with torch.no_grad():
        image_tokens = model.image_proj(torch.cat([torch.zeros_like(data["input.face_emb"]), data["input.face_emb"]]))
        audio_tokens = model.audio_proj(data["input.wav2vec_windows"])
        face = model.face_locator(data["input.face_region_mask"])[:, :, None].expand(-1, -1, frames, -1, -1)
        images = data["input.ref_latents"].repeat(rows, 1, 1, 1)
        context = image_tokens.repeat(images.shape[0] // rows, 1, 1)  # Hallo quirk: image row i gets context i mod 2
        if round_bank:
            bank = model.reference_features(images, context)  # float16-rounded, as the hallo config says
        else:
            bank = model.reference_net(images, data["input.reference_timestep"], context)
        cond = UNetConditions(
            context=image_tokens, bank=[b.unflatten(0, (rows, -1)) for b in bank],
            use_reference=torch.arange(rows) == rows - 1, audio=audio_tokens.flatten(0, 1),
            region_masks=region_masks(data), motion_scale=tuple(data["input.motion_scale"].tolist()))
        out = model.denoise(data["input.noisy_latents"], data["input.timestep"], cond, face)
    return out, image_tokens, audio_tokens, face, bank


def test_small_modules_and_reference_bank(model, forward_data):
    data, order = forward_data
    _, image_tokens, audio_tokens, face, bank = single_forward(model, data, round_bank=False)
    torch.testing.assert_close(image_tokens, data["intermediate.image_tokens"], atol=1e-5, rtol=0)
    torch.testing.assert_close(audio_tokens, data["intermediate.audio_tokens"], atol=1e-5, rtol=0)
    torch.testing.assert_close(face, data["intermediate.face_locator_out"], atol=1e-5, rtol=0)
    for theirs, ours in bank_positions(model, order).items():
        torch.testing.assert_close(bank[ours], data[f"debug.reference_bank.{theirs:02d}"], atol=1e-5, rtol=0)


def test_unet_forward_matches_hallo(model, forward_data):
    data, _ = forward_data
    out, *_ = single_forward(model, data)
    expected = data["expected.noise_pred"]
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=0)
    # The wrong code branch (eval mode) is far away: we run the one Hallo's inference runs.
    assert (out - data["expected.noise_pred_eval_branch"]).abs().max() > 1e-2


def test_float16_reference_rounding_is_implemented(model, forward_data):
    data, _ = forward_data
    rounded, *_ = single_forward(model, data, round_bank=True)
    unrounded, *_ = single_forward(model, data, round_bank=False)
    without = data["debug.noise_pred_without_fp16_bank_rounding"]
    expected = data["expected.noise_pred"]
    gap = (expected - without).abs().max()
    assert (rounded - expected).abs().max() < gap / 2  # closer to Hallo's result than the gap ...
    assert (rounded - without).abs().max() > gap / 2  # ... and clearly not the unrounded variant
    torch.testing.assert_close(unrounded, without, atol=2e-4, rtol=0)


def test_pipeline_matches_hallo(hallo_fixture, model):
    data = load_file(hallo_fixture / "pipeline.safetensors")
    config = json.loads((hallo_fixture / "config.json").read_text())["hallo_vocabulary"]["inference_yaml"]
    clips = sorted({int(k.split(".")[1][4:]) for k in data if k.startswith("expected.clip")})
    steps = data["scheduler.timesteps"].numel()
    vae = DiffusersVAE.from_files(hallo_fixture / "vae.safetensors", hallo_fixture / "vae_config.json")
    reference = vae.encode(data["input.source_image_pixels"][None])
    torch.testing.assert_close(reference, data["clip0.ref_latents"][:1], atol=1e-5, rtol=0)
    inputs = GenerationInputs(
        reference_latent=reference, audio_features=data["input.audio_features"],
        face_mask=data["input.face_region_mask"][None], identity_embedding=data["input.face_emb"],
        region_masks=region_masks(data), motion_scale=tuple(data["input.motion_scale"].tolist()),
        num_frames=int(data["input.audio_length"]))
    stats = SamplerStats()
    # Hallo draws each clip's noise from the global generator seeded with 42: our seeded draw is the same noise.
    settings = SamplerSettings(steps=steps, guidance_scale=config["cfg_scale"], seed=42)
    out = list(generate(model, inputs, settings, codec=vae, stats=stats))
    assert [c.index for c in out] == clips
    assert stats.reference_calls == len(clips)  # once per clip, not once per step
    assert sum(c.latents.shape[2] for c in out) == int(data["input.audio_length"])
    latent_tol, frame_tol = {0: 1e-3}, {0: 5e-4}
    for clip in out:
        expected = data[f"expected.clip{clip.index}.final_latents"][:, :, : clip.latents.shape[2]]
        torch.testing.assert_close(clip.latents, expected, atol=latent_tol.get(clip.index, 5e-3), rtol=0)
        frames = vae.decode(clip.latents[0].transpose(0, 1))
        video = data[f"expected.clip{clip.index}.video"][0].transpose(0, 1)[: frames.shape[0]]
        torch.testing.assert_close(frames, video, atol=frame_tol.get(clip.index, 3e-3), rtol=0)


def test_scheduler_matches_hallo(hallo_fixture, model):
    from emo_core.sampler import make_scheduler

    data = load_file(hallo_fixture / "pipeline.safetensors")
    scheduler = make_scheduler("ddim", model.cfg.scheduler)
    scheduler.set_timesteps(data["scheduler.timesteps"].numel())
    assert torch.equal(scheduler.timesteps, data["scheduler.timesteps"])
    torch.testing.assert_close(scheduler.alphas_cumprod, data["scheduler.alphas_cumprod"], atol=1e-7, rtol=0)
