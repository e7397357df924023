"""Glue between the EMO nodes and ComfyUI's runtime: model patchers, devices and dtypes, progress and interrupts,
type conversion. Model logic stays in emo_core."""

from __future__ import annotations

import logging
import os
import weakref

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.utils
import torch

from ..emo_core.audio import Wav2Vec2Features, check_speech, to_mono
from ..emo_core.checkpoint import DTYPES, build_model, read_checkpoint
from ..emo_core.face import YuNetDetector, centred_face_mask, face_box_mask, hallo_region_masks
from ..emo_core.sampler import EMOInputError, GenerationInputs, SamplerSettings, generate, run_reference_net
from ..emo_core.sampler import encode_reference as encode_reference_latent
from ..emo_core.vae import ldm_config
from ..emo_core.video import VideoWriter
from .types import EMOAudio, EMOModel, EMOReference

log = logging.getLogger("EMO")


# ---- Load EMO -------------------------------------------------------------------------------------------------

def load_emo_model(path: str, precision: str):
    """(EMO_MODEL, core VAE or None): the VAE is the one bundled in the checkpoint, if it carries one."""
    checkpoint = read_checkpoint(path)
    config, state_dict, bundled = checkpoint.config, checkpoint.state_dict, checkpoint.companions
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    params = sum(v.numel() for v in state_dict.values())
    if precision == "auto":
        weight_dtype = mm.unet_dtype(device=load_device, model_params=params)
    else:
        weight_dtype = DTYPES[precision]
    compute_dtype = mm.unet_manual_cast(weight_dtype, load_device) or weight_dtype
    operations = comfy.ops.pick_operations(weight_dtype, compute_dtype, load_device=load_device)
    model = build_model(config, state_dict, source=os.path.basename(path), looks_like=checkpoint.looks_like,
                        dtype=weight_dtype, device=offload_device, operations=operations).eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    log.info("EMO: loaded %s (%s, %.0f M parameters, weights %s, compute %s%s)", path, config.name, params / 1e6,
             weight_dtype, compute_dtype, "; with its own VAE and audio encoder" if bundled else "")
    vae = None
    if "vae" in bundled:
        vae_config, vae_weights = bundled["vae"]
        vae = comfy.sd.VAE(sd=vae_weights, config={"params": ldm_config(vae_config)})
    return EMOModel(patcher, compute_dtype, path, bundled.get("audio_encoder")), vae


# ---- EMO Sample Portrait + Speech ------------------------------------------------------------------------------

def sample_inputs():
    """IMAGE (1, H, W, 3) and AUDIO of the bundled sample."""
    from ..emo_core.audio import read_audio
    from ..emo_core.cli import ASSETS, load_image

    waveform, rate = read_audio(ASSETS / "speech.wav")
    return load_image(ASSETS / "portrait.png").permute(0, 2, 3, 1), {"waveform": waveform[None], "sample_rate": rate}


# ---- EMO Encode Audio -----------------------------------------------------------------------------------------

_encoders = weakref.WeakKeyDictionary()  # AUDIO_ENCODER or EMO_MODEL -> (our extractor, its ModelPatcher)


class _Holder(torch.nn.Module):
    """A plain module around the transformers model: ModelPatcher sets `.device` on what it holds, which
    transformers models expose read-only."""

    def __init__(self, model):
        super().__init__()
        self.model = model


def _feature_extractor(audio_encoder, emo_model: EMOModel):
    """Our Hallo-style feature extractor on the weights of ComfyUI's AUDIO_ENCODER (or, when none is connected, of
    the wav2vec2 bundled in the EMO checkpoint), under ComfyUI's memory manager."""
    key = audio_encoder if audio_encoder is not None else emo_model
    if key not in _encoders:
        if audio_encoder is not None:
            config, state_dict = None, audio_encoder.get_sd()
        elif emo_model.audio_encoder is not None:
            config, state_dict = emo_model.audio_encoder
        else:
            raise EMOInputError(f"{os.path.basename(emo_model.name)} carries no audio encoder: connect Load Audio "
                                f"Encoder with the wav2vec2 it was trained with (e.g. wav2vec2-base-960h for Hallo, "
                                f"in models/audio_encoders)")
        extractor = Wav2Vec2Features.from_state_dict(state_dict, config, device=mm.text_encoder_offload_device())
        patcher = comfy.model_patcher.ModelPatcher(_Holder(extractor.model), load_device=mm.text_encoder_device(),
                                                   offload_device=mm.text_encoder_offload_device())
        _encoders[key] = (extractor, patcher)
    return _encoders[key]


def encode_audio(emo_model: EMOModel, audio_encoder, audio: dict, fps: float):
    cfg = emo_model.config
    waveform, rate = audio["waveform"], audio["sample_rate"]
    if waveform.ndim in (1, 2):  # (N) or (C, N) from nodes that leave out ComfyUI's batch axis
        waveform = waveform.reshape(1, -1, waveform.shape[-1])
    if waveform.ndim != 3:
        raise EMOInputError(f"AUDIO waveform must be (batch, channels, samples), got {tuple(waveform.shape)}")
    if waveform.shape[-1] == 0:
        raise EMOInputError("the audio is empty (no samples): connect a clip with sound")
    if waveform.shape[0] > 1:
        log.warning("EMO: the AUDIO input holds a batch of %d clips; the video follows the first", waveform.shape[0])
    mono = to_mono(waveform[0], rate)
    check_speech(mono, fps)
    extractor, patcher = _feature_extractor(audio_encoder, emo_model)
    if extractor.layers != cfg.audio.layers:
        raise EMOInputError(f"this audio encoder has {extractor.layers} layers, the EMO model expects features of "
                            f"{cfg.audio.layers} (e.g. wav2vec2-base-960h for Hallo): load the encoder the "
                            f"checkpoint was trained with")
    mm.load_models_gpu([patcher], force_full_load=True)  # plain torch layers: all on one device
    pbar = comfy.utils.ProgressBar(1)
    features, frames = extractor(mono.to(patcher.load_device), fps=fps, clip_length=cfg.frames_per_clip,
                                 progress=lambda done, total: pbar.update_absolute(done, total))
    samples = round(frames / fps * rate)  # the sound of exactly the frames that will be generated
    sound = waveform[:1, :, :samples]
    if sound.shape[-1] < samples:
        sound = torch.nn.functional.pad(sound, (0, samples - sound.shape[-1]))
    return EMOAudio(features, frames, fps), {"waveform": sound, "sample_rate": rate}


# ---- EMO Face Mask --------------------------------------------------------------------------------------------

def face_masks(detector_path: str, image: torch.Tensor, expand: float, face_index: int, fallback: bool,
               confidence: float):
    """IMAGE (B, H, W, 3) -> MASK (B, H, W): the expanded face box per image."""
    detector = YuNetDetector(detector_path, confidence=confidence)
    height, width = image.shape[1:3]
    pbar = comfy.utils.ProgressBar(image.shape[0])

    def progress(done, total):
        mm.throw_exception_if_processing_interrupted()
        pbar.update_absolute(done, total)

    found = detector.detect(image.permute(0, 3, 1, 2), progress=progress)  # 16 frames at a time
    masks = [face_box_mask(faces, height, width, expand, face_index, fallback, f"image {i + 1} of {image.shape[0]}")
             for i, faces in enumerate(found)]
    return torch.cat(masks)[:, 0]


# ---- EMO Face Identity ---------------------------------------------------------------------------------------

def face_identity(detector_path: str, model_path: str, image: torch.Tensor, face_index: int, zeros_if_no_face: bool,
                  confidence: float):
    """IMAGE (B, H, W, C) -> emo_core FaceIdentity of the first image (CPU: onnxruntime, no GPU memory)."""
    from ..emo_core.face_identity import ArcFace
    from ..emo_core.face_identity import face_identity as identity_of

    detector = YuNetDetector(detector_path, confidence=confidence)
    identity = identity_of(image[:1].permute(0, 3, 1, 2), detector, ArcFace(model_path), face_index, zeros_if_no_face)
    where = "no face, zero embedding" if identity.face is None else f"face at {tuple(map(round, identity.face.box))}"
    log.info("EMO: face identity from %s: %s", os.path.basename(model_path), where)
    return identity


# ---- EMO ReferenceNet -----------------------------------------------------------------------------------------

class ComfyVAECodec:
    """ComfyUI's VAE as emo_core's LatentCodec: pixels in [-1, 1] (N, 3, H, W) <-> scaled latents (N, 4, h, w)."""

    def __init__(self, vae, scale: float):
        self.vae, self.scale = vae, scale

    def encode(self, pixels):
        return self.vae.encode((pixels.float().cpu() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)) * self.scale

    def decode(self, latents):
        return self.vae.decode(latents.float().cpu() / self.scale).permute(0, 3, 1, 2)  # IMAGE (N, H, W, 3) -> NCHW


class ReloadAfterVAE:
    """The sampler's codec: each core VAE call loads the VAE and may unload other models to make room for it, so
    after each one the EMO model is loaded again (motion frames go through the VAE between clips in Hallo)."""

    def __init__(self, codec, reload):
        self.codec, self.reload = codec, reload

    def encode(self, pixels):
        latents = self.codec.encode(pixels)
        self.reload()
        return latents

    def decode(self, latents):
        images = self.codec.decode(latents)
        self.reload()
        return images


def encode_reference(emo_model: EMOModel, image: torch.Tensor, vae) -> EMOReference:
    if vae is None:
        raise EMOInputError("no VAE: this EMO checkpoint carries none, so connect Load VAE with the VAE it was "
                            "trained with (e.g. sd-vae-ft-mse for Hallo, in models/vae)")
    if getattr(vae, "latent_channels", 4) != emo_model.config.unet.in_channels:
        raise EMOInputError(f"this VAE makes {vae.latent_channels}-channel latents; the EMO model needs an SD1.5 VAE "
                            f"({emo_model.config.unet.in_channels} channels), e.g. sd-vae-ft-mse")
    codec = ComfyVAECodec(vae, emo_model.config.latent_scale)
    pixels = image[:1, :, :, :3].permute(0, 3, 1, 2) * 2 - 1
    latent = encode_reference_latent(codec, pixels)
    reference = EMOReference(latent, codec, image.shape[1], image.shape[2])
    if not emo_model.config.identity_tokens:  # computed once here, reused by every clip of every sampler run
        patcher = emo_model.patcher
        mm.load_models_gpu([patcher])
        latent_on_device = latent.to(device=patcher.load_device, dtype=emo_model.compute_dtype)
        features = run_reference_net(patcher.model, latent_on_device)
        reference.features = [f.to(mm.intermediate_device()) for f in features]
        reference.model = weakref.ref(patcher.model)
    return reference


# ---- EMO Audio-Driven Sampler ---------------------------------------------------------------------------------

def sample(emo_model: EMOModel, reference: EMOReference, emo_audio: EMOAudio, face_mask, face_identity, *, seed, steps,
           cfg, scheduler, frames_per_clip, motion_frames, speed, decoded_whole: bool = True) -> torch.Tensor:
    """Returns LATENT samples (frames, 4, h, w), unscaled as core VAE Decode expects. decoded_whole: whether the
    latents go to a node that decodes every frame at once (VAE Decode), so the frames must fit in memory."""
    config = emo_model.config
    if face_mask is None:  # as the command line: a portrait framed around the face
        mask = centred_face_mask(reference.height, reference.width)
    else:
        if tuple(face_mask.shape[-2:]) != (reference.height, reference.width):
            raise EMOInputError(f"face mask is {face_mask.shape[-1]}x{face_mask.shape[-2]}, the portrait "
                                f"{reference.width}x{reference.height}: make the mask from the same image")
        mask = face_mask.reshape(-1, 1, *face_mask.shape[-2:]).float()
    embedding, regions = None, None
    if config.identity_tokens:
        if face_identity is None:
            raise EMOInputError(f"{os.path.basename(emo_model.name)} conditions on the face identity (Hallo's ArcFace "
                                f"input): connect EMO Face Identity (with glintr100.onnx from Hallo's face_analysis "
                                f"models in models/insightface) to the sampler's face_identity")
        embedding = face_identity.embedding
        face = face_identity.face_at(reference.height, reference.width)
        if face is not None and config.audio.module == "hallo":
            regions = hallo_region_masks(face, reference.height, reference.width,
                                         levels=len(config.unet.block_out_channels))
    inputs = GenerationInputs(reference_latent=reference.latent, audio_features=emo_audio.features, face_mask=mask,
                              identity_embedding=embedding, region_masks=regions,
                              speed=speed if config.speed else None, num_frames=emo_audio.frames,
                              reference_features=reference.features if reference.model is not None
                              and reference.model() is emo_model.patcher.model else None)
    settings = SamplerSettings(steps=steps, guidance_scale=cfg, seed=seed, scheduler=scheduler,
                               frames_per_clip=frames_per_clip, motion_frames=motion_frames)
    # core VAE Decode will hold every frame as a float32 IMAGE: refuse now what would fail after the whole run
    decoded = emo_audio.frames * reference.height * reference.width * 3 * 4
    free = mm.get_free_memory(mm.intermediate_device())
    if not decoded_whole:
        log.info("EMO: the latents go only to EMO Decode + Save Video, which decodes a few frames at a time: not "
                 "checked against the free memory")
    elif decoded > free:
        raise EMOInputError(f"{emo_audio.frames} frames of {reference.width}x{reference.height} decode to "
                            f"{decoded / 2**30:.1f} GB of IMAGE (VAE Decode holds every frame as float32), and "
                            f"{free / 2**30:.1f} GB of memory is free: connect the sampler's latent to EMO Decode + "
                            f"Save Video instead of VAE Decode (it decodes a few frames at a time into the mp4), or "
                            f"split the audio into shorter parts, or use a smaller portrait")
    patcher = emo_model.patcher
    memory = _activation_bytes(config, reference, settings, emo_model)
    mm.load_models_gpu([patcher], memory_required=memory)
    codec = ReloadAfterVAE(reference.codec, lambda: mm.load_models_gpu([patcher], memory_required=memory))
    pbar = comfy.utils.ProgressBar(1)
    frames = settings.frames_per_clip or config.frames_per_clip
    log.info("EMO: sampling %d frames in clips of %d, %d steps each", emo_audio.frames, frames, steps)

    def progress(step, total, clip, clips):
        pbar.update_absolute(step, total)

    out, out_of_memory = [], False
    try:
        for clip in generate(patcher.model, inputs, settings, codec=codec, progress=progress,
                             cancel=_interrupted, device=patcher.load_device, dtype=emo_model.compute_dtype):
            out.append(clip.latents[0].transpose(0, 1).float().to(mm.intermediate_device()) / config.latent_scale)
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True  # raised again below, once the failed step's tensors are released with this frame
    if out_of_memory:
        # still an out-of-memory error, so that ComfyUI unloads every model (it only does for this type) and the
        # next run starts with free memory; with what to change
        raise torch.cuda.OutOfMemoryError("EMO ran out of GPU memory: lower frames_per_clip or the portrait size, "
                                          "or load EMO with fp16; cfg 1.0 halves the memory")
    return torch.cat(out)


def _interrupted() -> bool:
    mm.throw_exception_if_processing_interrupted()  # raises ComfyUI's own interrupt exception
    return False


def _activation_bytes(config, reference, settings, emo_model) -> int:
    """A generous estimate of the sampler's working memory, so ComfyUI frees room before a long run."""
    frames = (settings.frames_per_clip or config.frames_per_clip) + config.motion_frames
    tokens = (reference.height // 8) * (reference.width // 8)
    rows = 2 if (settings.guidance_scale or config.guidance_scale) != 1 else 1
    element = torch.finfo(emo_model.compute_dtype).bits // 8
    return int(rows * frames * tokens * config.unet.block_out_channels[0] * 40 * element)


# ---- EMO Video Combine, EMO Decode + Save Video ----------------------------------------------------------------

def write_video(path: str, images: torch.Tensor, fps: float, audio, crf: int, metadata: dict) -> None:
    """IMAGE frames + AUDIO -> mp4."""
    batches = (images[start:start + 16] for start in range(0, images.shape[0], 16))
    _write(path, batches, images.shape[0], fps, audio, crf, metadata, "EMO Video Combine")


def decode_video(path: str, latents: torch.Tensor, vae, fps: float, audio, crf: int, metadata: dict,
                 batch: int) -> None:
    """LATENT samples (frames, 4, h, w) + AUDIO -> mp4, decoded by core VAE `batch` frames at a time straight
    into the file: memory holds one batch of frames, not the whole video as VAE Decode's IMAGE does. The latents
    are those check_latents accepts."""
    batches = (vae.decode(latents[start:start + batch]) for start in range(0, latents.shape[0], batch))
    _write(path, batches, latents.shape[0], fps, audio, crf, metadata, "EMO Decode + Save Video")


def check_latents(latents: torch.Tensor, vae) -> None:
    """What EMO Decode + Save Video can decode: image latents of at least one frame, with the VAE's channels."""
    if latents.ndim != 4:
        raise EMOInputError(f"EMO Decode + Save Video takes image latents (frames, channels, height, width), as EMO's "
                            f"sampler makes; got shape {tuple(latents.shape)}: use VAE Decode for other latents")
    if latents.shape[0] == 0:
        raise EMOInputError("the latent holds no frames: nothing to decode")
    if latents.shape[1] != getattr(vae, "latent_channels", latents.shape[1]):
        raise EMOInputError(f"the latents have {latents.shape[1]} channels, this VAE decodes {vae.latent_channels}: "
                            f"connect the VAE the EMO model works with (Load EMO's vae for the demo model)")


def _write(path: str, batches, frames: int, fps: float, audio, crf: int, metadata: dict, node: str) -> None:
    """Writes batches of IMAGE frames with the sound, one progress tick per batch; ComfyUI's Cancel stops it
    between batches and the frames written so far stay a playable video."""
    sound, rate = None, 16000
    if audio is not None:
        sound, rate = audio["waveform"][0].float().cpu().numpy(), audio["sample_rate"]
        heard, seen = sound.shape[-1] / rate, frames / fps
        if abs(heard - seen) > 1.5 / fps:  # the sound is cut or padded to the picture: out of sync if fps differ
            log.warning("%s: the audio lasts %.2f s, %d frames at %g fps last %.2f s; if the frames come from EMO "
                        "Encode Audio's sound, connect Encode Audio's fps output to this node's fps",
                        node, heard, frames, fps, seen)
    pbar = comfy.utils.ProgressBar(frames)
    with VideoWriter(path, fps, audio=sound, sample_rate=rate, crf=crf, metadata=metadata) as writer:
        try:
            for images in batches:
                writer.write(images)
                pbar.update_absolute(writer.frames, frames)  # in a server, its progress hook raises on Cancel
                mm.throw_exception_if_processing_interrupted()
        except BaseException:
            if writer.frames:  # the writer closes the file as a playable video of them
                log.warning("%s: stopped after %d of %d frames; %s holds them", node, writer.frames, frames, path)
            raise
