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
    samples, rate = read_audio(path)
    return to_mono(samples, rate, sample_rate)


def read_audio(path) -> tuple[torch.Tensor, int]:
    """Decode any audio file PyAV reads -> (samples (channels, n) float32, sample rate), as stored."""
    import av

    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder, not an audio file")
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
    return torch.from_numpy(np.concatenate(chunks, axis=1)), rate


def to_mono(samples: torch.Tensor, rate: int, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """(channels, n) or (n,) float samples at `rate` (e.g. a ComfyUI AUDIO waveform) -> mono float32 (n',) at
    `sample_rate`: the arithmetic channel mean first, then libsoxr HQ resampling (Hallo's order)."""
    samples = samples.detach().float().cpu()
    if samples.ndim == 1:
        samples = samples[None]
    if samples.ndim != 2 or samples.shape[1] == 0:
        raise ValueError(f"audio must be (channels, samples) with at least one sample, got {tuple(samples.shape)}")
    mono = samples.mean(dim=0).numpy()
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


SILENCE_PEAK = 1e-4  # -80 dBFS: below this everywhere, a clip holds no sound to animate from


def check_speech(waveform: torch.Tensor, fps: float, sample_rate: int = SAMPLE_RATE) -> None:
    """Refuse audio a talking head cannot be made from: silence, or less than two video frames of sound.
    waveform: mono samples at `sample_rate`."""
    from .sampler import EMOInputError

    frames = frame_count(waveform.numel(), fps, sample_rate)
    if frames < 2:
        raise EMOInputError(f"the audio is {waveform.numel() / sample_rate * 1000:.0f} ms long: that is {frames} "
                            f"video frame(s) at {fps:g} fps; connect at least {2 / fps:.2f} s of speech or singing")
    peak = float(waveform.abs().max())
    if peak < SILENCE_PEAK:
        raise EMOInputError(f"the audio is silent (peak {20 * math.log10(max(peak, 1e-12)):.0f} dBFS): EMO animates "
                            f"the face from the sound; connect speech or singing (or check the input's volume)")


class Wav2Vec2Features:
    """wav2vec2 weights + Hallo's way of turning a waveform into per-video-frame features."""

    def __init__(self, model):
        self.model = model.eval()

    @classmethod
    def from_files(cls, weights, config=None, dtype=torch.float32, device="cpu") -> "Wav2Vec2Features":
        """weights: a .safetensors / .bin state dict (keys with or without the `wav2vec2.` prefix of CTC
        checkpoints; the CTC head is ignored), or a transformers model folder (config.json + model.safetensors or
        pytorch_model.bin); config: a transformers Wav2Vec2Config json, or None to use the folder's, one beside
        the file (<name>_config.json, <name>.json), or to derive it from the weights (base / large layouts)."""
        from .checkpoint import read_state_dict

        weights = Path(weights)
        if weights.is_dir():
            found = [weights / n for n in ("model.safetensors", "pytorch_model.bin") if (weights / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{weights} holds no model.safetensors or pytorch_model.bin")
            config = config or (weights / "config.json" if (weights / "config.json").is_file() else None)
            weights = found[0]
        elif config is None:  # a config beside the file: <name>_config.json or <name>.json
            config = next((c for c in (weights.with_name(f"{weights.stem}_config.json"), weights.with_suffix(".json"))
                           if c.is_file()), None)
        state_dict, _ = read_state_dict(weights)
        config = json.loads(Path(config).read_text()) if config else None
        return cls.from_state_dict(state_dict, config, dtype=dtype, device=device)

    @classmethod
    def from_state_dict(cls, state_dict: dict, config: dict | None = None, num_heads: int | None = None,
                        dtype=torch.float32, device="cpu") -> "Wav2Vec2Features":
        """From wav2vec2 weights in transformers' names, e.g. those inside ComfyUI's AUDIO_ENCODER
        (`encoder.get_sd()`) or a file of models/audio_encoders. Without a config, it is derived from the tensor
        shapes; the head count, which shapes do not tell, defaults to hidden / 64 (base 12, large 16)."""
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        state_dict = _wav2vec2_keys(state_dict)
        config = Wav2Vec2Config(**config) if config else _config_from_shapes(state_dict, num_heads)
        model = Wav2Vec2Model(config)
        state_dict = _weight_norm_names(state_dict, model.state_dict())
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if "masked_spec_embed" in missing:  # only used for training-time masking; many files leave it out. Zeros,
            with torch.no_grad():            # not the random init: the same file must give the same weights
                model.masked_spec_embed.zero_()
        missing = [k for k in missing if k != "masked_spec_embed"]
        if missing or unexpected:
            raise ValueError(f"these wav2vec2 weights do not fit the model they describe: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
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
            x = torch.cat([x, x.new_zeros(extra * int(SAMPLE_RATE // fps))])  # zeros after normalisation
            seq_len += extra
        return x, seq_len, audio_length

    @torch.no_grad()
    def __call__(self, waveform: torch.Tensor, fps: float = 25, clip_length: int | None = None,
                 max_frames: int = 1500, context: int = 250, progress=None):
        """waveform: (n,) mono at 16 kHz. Returns (features (S, layers, hidden) float32 on the CPU, audio_length):
        S is padded to a multiple of clip_length when given; audio_length is the unpadded frame count.

        Up to `max_frames` video frames (60 s at 25 fps) the transformer runs once over the whole sequence, exactly
        as Hallo does. Longer audio, whose attention would grow with the square of its length, is encoded in
        windows of `max_frames` frames that also see `context` frames on each side; only each window's interior is
        kept. The convolutional features are exact in both cases. `progress(done, total)` is called per window."""
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if waveform.ndim != 1 or waveform.numel() < 400:
            raise ValueError(f"audio must be mono and at least 400 samples (25 ms) long, got shape "
                             f"{tuple(waveform.shape)}")
        x, seq_len, audio_length = self.model_input(waveform, fps, clip_length)
        m = self.model
        param = next(m.parameters())
        cnn = self.conv_features(x.to(param))  # (1, C, T) at 50 Hz
        cnn = F.interpolate(cnn, size=seq_len, mode="linear", align_corners=True).transpose(1, 2)  # (1, S, C)
        hidden, _ = m.feature_projection(cnn)  # (1, S, H)
        if seq_len <= max_frames:
            out = m.encoder(hidden, output_hidden_states=True, return_dict=True)
            return torch.stack(out.hidden_states[1:], dim=2)[0].float().cpu(), audio_length  # (S, layers, H)
        features = []
        starts = range(0, seq_len, max_frames)
        for i, start in enumerate(starts):
            lo, hi = max(0, start - context), min(seq_len, start + max_frames + context)
            out = m.encoder(hidden[:, lo:hi], output_hidden_states=True, return_dict=True)
            window = torch.stack(out.hidden_states[1:], dim=2)[0]  # (hi - lo, layers, H)
            features.append(window[start - lo: start - lo + min(max_frames, seq_len - start)].float().cpu())
            if progress is not None:
                progress(i + 1, len(starts))
        return torch.cat(features), audio_length

    def conv_features(self, x: torch.Tensor, chunk_frames: int = 1500) -> torch.Tensor:
        """The convolutional feature encoder on (N,) samples -> (1, C, T), T = (N - 400) // 320 + 1, computed in
        chunks of `chunk_frames` output frames so memory stays bounded. Exact: every chunk sees its whole receptive
        field, and the first layer's per-channel normalisation over the whole signal ("group" norm) uses
        statistics gathered over the whole signal first."""
        layers = self.model.feature_extractor.conv_layers
        frames = (x.shape[0] - 400) // 320 + 1
        if frames <= chunk_frames:
            return self.model.feature_extractor(x[None])
        first = layers[0]
        stats = _channel_stats(first.conv, x, chunk=chunk_frames * 64) if hasattr(first, "layer_norm") and \
            isinstance(first.layer_norm, torch.nn.GroupNorm) else None
        out = []
        for t0 in range(0, frames, chunk_frames):
            t1 = min(frames, t0 + chunk_frames)
            h = x[320 * t0: 320 * (t1 - 1) + 400][None, None]
            for i, layer in enumerate(layers):
                if i == 0 and stats is not None:
                    mean, var = stats
                    h = layer.conv(h)
                    h = (h - mean) / torch.sqrt(var + layer.layer_norm.eps)
                    h = layer.activation(h * layer.layer_norm.weight[:, None] + layer.layer_norm.bias[:, None])
                else:
                    h = layer(h)
            out.append(h)
        return torch.cat(out, dim=2)


def random_audio_encoder(layers: int, hidden: int, seed: int = 0) -> Wav2Vec2Features:
    """A randomly initialised wav2vec2 (base's kernels and strides, small widths) for tests and the random demo."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(seed)
    heads = 2 if hidden % 2 == 0 else 1
    config = Wav2Vec2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=hidden * 2, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=heads)
    return Wav2Vec2Features(Wav2Vec2Model(config))


def _channel_stats(conv, x: torch.Tensor, chunk: int):
    """Per-channel mean and (biased) variance over time of conv(x), chunk by chunk: each chunk's own statistics,
    combined in float64 with the parallel-variance rule (no full-size float64 copies)."""
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    frames = (x.shape[0] - kernel) // stride + 1
    count, mean, m2 = 0, 0.0, 0.0
    for u0 in range(0, frames, chunk):
        u1 = min(frames, u0 + chunk)
        y = conv(x[stride * u0: stride * (u1 - 1) + kernel][None, None])[0]  # (C, u1 - u0)
        var_c, mean_c = torch.var_mean(y, dim=1, unbiased=False)
        n = u1 - u0
        delta = mean_c.double() - mean
        mean = mean + delta * n / (count + n)
        m2 = m2 + var_c.double() * n + delta * delta * count * n / (count + n)
        count += n
    return mean.to(x.dtype)[:, None], (m2 / count).to(x.dtype)[:, None]


def _wav2vec2_keys(state_dict: dict) -> dict:
    """Keep the wav2vec2 model's own tensors (drop a CTC head, quantizer, ...), without a `wav2vec2.` prefix."""
    return {k.removeprefix("wav2vec2."): v for k, v in state_dict.items()
            if not k.startswith(("lm_head.", "quantizer.", "project_", "project_q", "project_hid"))}


def _weight_norm_names(state_dict: dict, target: dict) -> dict:
    """Old weight-norm names (weight_g / weight_v) -> PyTorch's parametrisation names, where the model uses those."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("conv.weight_g") and key not in target:
            key = key.replace("conv.weight_g", "conv.parametrizations.weight.original0")
        if key.endswith("conv.weight_v") and key not in target:
            key = key.replace("conv.weight_v", "conv.parametrizations.weight.original1")
        out[key] = value
    return out


def _config_from_shapes(state_dict: dict, num_heads: int | None):
    """A transformers Wav2Vec2Config for wav2vec2 weights, from their shapes (kernels and strides are wav2vec2's)."""
    from transformers import Wav2Vec2Config

    try:
        hidden = state_dict["feature_projection.projection.weight"].shape[0]
        convs = sorted(int(k.split(".")[2]) for k in state_dict
                       if k.startswith("feature_extractor.conv_layers.") and k.endswith(".conv.weight"))
        conv_dim = tuple(state_dict[f"feature_extractor.conv_layers.{i}.conv.weight"].shape[0] for i in convs)
        layers = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.layers."))
        intermediate = state_dict["encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0]
        pos = next(v for k, v in state_dict.items() if k.startswith("encoder.pos_conv_embed.conv.")
                   and (k.endswith("weight_v") or k.endswith("original1")))
    except (KeyError, StopIteration, ValueError) as e:
        raise ValueError(f"not wav2vec2 weights: a tensor is missing ({e})") from e
    layer_norm_convs = "feature_extractor.conv_layers.1.layer_norm.weight" in state_dict
    return Wav2Vec2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=num_heads or max(1, hidden // 64),
        intermediate_size=intermediate, conv_dim=conv_dim,
        conv_bias="feature_extractor.conv_layers.0.conv.bias" in state_dict,
        feat_extract_norm="layer" if layer_norm_convs else "group",
        do_stable_layer_norm=layer_norm_convs,  # large-style checkpoints are pre-LayerNorm
        num_conv_pos_embeddings=pos.shape[-1], num_conv_pos_embedding_groups=hidden // pos.shape[1])
