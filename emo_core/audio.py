"""Audio -> one wav2vec2 feature vector per video frame and layer, computed the way Hallo computes it.

Hallo (and so the checkpoints trained with it) does not run wav2vec2 at its native 50 Hz: it normalises the
whole signal, zero-pads it to whole clips, runs the convolutional feature encoder, *resamples the CNN features
linearly to exactly one vector per video frame*, and only then runs the transformer; all layer outputs are
stacked. See ../shared/fixtures/hallo_tiny/README.md, "What Hallo's audio preprocessing computes".

The model is transformers' `Wav2Vec2Model`, used through its own submodules (feature_extractor,
feature_projection, encoder).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000


def load_audio(path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Decode any audio file PyAV reads -> mono float32 (n,) at `sample_rate`. Channels are averaged before
    resampling, and resampling is libsoxr "HQ", as librosa does for Hallo."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError(f"{path.name} has no audio stream")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate
            to_float = av.AudioResampler(format="fltp")  # planar float32, same rate and channels (exact for PCM)
            chunks = [f.to_ndarray() for frame in container.decode(stream) for f in to_float.resample(frame)]
    except av.FFmpegError as e:
        raise ValueError(f"{path.name}: cannot decode audio ({e})") from e
    if not chunks:
        raise ValueError(f"{path.name} contains no audio samples")
    samples = np.concatenate(chunks, axis=1)  # (channels, n)
    mono = samples.mean(axis=0)
    if rate != sample_rate:
        mono = resample(mono, rate, sample_rate)
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """libsoxr "HQ" resampling (what librosa uses for Hallo), padded or trimmed to ceil(n · target / rate)."""
    import soxr

    y = soxr.resample(x, rate, target, quality="HQ")
    want = math.ceil(len(x) * target / rate)
    return np.pad(y, (0, max(0, want - len(y))))[:want].astype(np.float32)


def frame_count(num_samples: int, fps: float, sample_rate: int = SAMPLE_RATE) -> int:
    """Hallo's frame count: ceil(n / rate · fps) in double precision, in exactly that order (see the README: for
    some multiples of 640 samples this is one more than integer arithmetic gives)."""
    return math.ceil(num_samples / sample_rate * fps)


class Wav2Vec2Features:
    """wav2vec2 weights + Hallo's way of turning a waveform into per-video-frame features."""

    def __init__(self, model):
        self.model = model.eval()

    @classmethod
    def from_files(cls, weights, config, dtype=torch.float32, device="cpu") -> "Wav2Vec2Features":
        """weights: a .safetensors / .bin state dict (keys with or without the `wav2vec2.` prefix of CTC
        checkpoints; the CTC head is ignored); config: a transformers Wav2Vec2Config json."""
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        from .checkpoint import read_state_dict

        model = Wav2Vec2Model(Wav2Vec2Config(**json.loads(Path(config).read_text())))
        state_dict, _ = read_state_dict(weights)
        model.load_state_dict(_wav2vec2_keys(state_dict, model.state_dict()), strict=True)
        return cls(model.to(device=device, dtype=dtype))

    @property
    def layers(self) -> int:
        return self.model.config.num_hidden_layers

    def normalise(self, waveform: torch.Tensor) -> torch.Tensor:
        # Zero mean, unit variance over the whole signal (population variance, epsilon inside the root).
        x = waveform.float()
        return (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)

    def model_input(self, waveform: torch.Tensor, fps: float = 25, clip_length: int | None = None):
        """waveform: (n,) mono 16 kHz -> (input values (N,), frames S after padding, unpadded frames)."""
        x = self.normalise(waveform)
        seq_len = frame_count(x.shape[0], fps)
        audio_length = seq_len
        if clip_length and seq_len % clip_length:
            extra = clip_length - seq_len % clip_length
            x = torch.cat([x, x.new_zeros(extra * (SAMPLE_RATE // int(fps)))])  # zeros after normalisation
            seq_len += extra
        return x, seq_len, audio_length

    @torch.no_grad()
    def __call__(self, waveform: torch.Tensor, fps: float = 25, clip_length: int | None = None):
        """waveform: (n,) mono at 16 kHz. Returns (features (S, layers, hidden), audio_length): S is padded to a
        multiple of clip_length when given; audio_length is the unpadded frame count."""
        if waveform.ndim != 1 or waveform.numel() < 400:
            raise ValueError(f"audio must be mono and at least 400 samples (25 ms) long, got shape "
                             f"{tuple(waveform.shape)}")
        x, seq_len, audio_length = self.model_input(waveform, fps, clip_length)
        m = self.model
        param = next(m.parameters())
        cnn = m.feature_extractor(x[None].to(param))  # (1, C, T) at 50 Hz
        cnn = F.interpolate(cnn, size=seq_len, mode="linear", align_corners=True).transpose(1, 2)  # (1, S, C)
        hidden, _ = m.feature_projection(cnn)
        out = m.encoder(hidden, output_hidden_states=True, return_dict=True)
        return torch.stack(out.hidden_states[1:], dim=2)[0].float(), audio_length  # (S, layers, hidden)


def random_audio_encoder(layers: int, hidden: int, seed: int = 0) -> Wav2Vec2Features:
    """A randomly initialised wav2vec2 (base's kernels and strides, small widths) for tests and the random demo."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(seed)
    heads = 2 if hidden % 2 == 0 else 1
    config = Wav2Vec2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=hidden * 2, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=heads)
    return Wav2Vec2Features(Wav2Vec2Model(config))


def _wav2vec2_keys(state_dict: dict, target: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        if key.startswith("lm_head.") or key.startswith("quantizer.") or key.startswith("project_"):
            continue
        key = key.removeprefix("wav2vec2.")
        if key.endswith("conv.weight_g") and key not in target:
            key = key.replace("conv.weight_g", "conv.parametrizations.weight.original0")
        if key.endswith("conv.weight_v") and key not in target:
            key = key.replace("conv.weight_v", "conv.parametrizations.weight.original1")
        out[key] = value
    return out
