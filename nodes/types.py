"""What flows between the EMO nodes besides ComfyUI's core types (IMAGE, MASK, AUDIO, VAE, LATENT, VIDEO).

Plain data holders: no file paths, no model logic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from comfy_api.latest import io

EMO_MODEL = io.Custom("EMO_MODEL")
EMO_AUDIO = io.Custom("EMO_AUDIO")
EMO_REFERENCE = io.Custom("EMO_REFERENCE")
EMO_FACE_IDENTITY = io.Custom("EMO_FACE_IDENTITY")  # emo_core.face_identity.FaceIdentity: embedding + its face


@dataclass(eq=False)  # compared and hashed by identity: it keys the cache of its bundled audio encoder
class EMOModel:
    patcher: Any  # comfy.model_patcher.ModelPatcher over an emo_core EMONet built from comfy.ops
    compute_dtype: Any  # torch dtype the activations use (may differ from the stored weights)
    name: str
    audio_encoder: Any = None  # (transformers config, state dict) of the wav2vec2 bundled in the checkpoint

    @property
    def config(self):
        return self.patcher.model.cfg


@dataclass
class EMOAudio:
    features: Any  # (S, layers, channels) float32 on the CPU, S padded to whole clips
    frames: int  # video frames the audio covers (the rest is clip padding)
    fps: float


@dataclass
class EMOReference:
    latent: Any  # (1, 4, h, w) scaled VAE latent of the portrait
    codec: Any  # the core VAE as a LatentCodec (motion frames through pixels, Hallo)
    height: int
    width: int
    features: Any = None  # ReferenceNet's features of the portrait, per block (1, L, C) on the CPU; None for models
    #                       whose ReferenceNet attends to the face identity (Hallo): the sampler computes them then
    model: Any = None  # weakref.ref to the EMONet that computed `features` (a weak one: the loader's patcher owns it)
