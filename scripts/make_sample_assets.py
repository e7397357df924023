"""Makes the bundled sample portrait and sample audio (deterministic; run from the repo root):

    python scripts/make_sample_assets.py

emo_core/assets/portrait.png: a drawn head-and-shoulders portrait, 256x256.
emo_core/assets/speech.wav: 4 s of a speech-like signal at 16 kHz (harmonic voice with a moving pitch and
formants, syllable envelopes, pauses, breath noise), 16-bit mono.
"""

import wave
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parents[1] / "emo_core" / "assets"


def portrait(size=256):
    img = Image.new("RGB", (size, size), (70, 96, 130))
    d = ImageDraw.Draw(img)
    s = size / 256
    box = lambda *xy: [v * s for v in xy]
    d.ellipse(box(40, 190, 216, 330), fill=(48, 62, 92))  # shoulders
    d.rectangle(box(108, 160, 148, 205), fill=(214, 170, 140))  # neck
    d.ellipse(box(68, 34, 188, 186), fill=(226, 184, 152))  # face
    d.chord(box(62, 24, 194, 120), 180, 360, fill=(58, 38, 28))  # hair
    for x in (98, 158):
        d.ellipse(box(x - 13, 96, x + 13, 112), fill=(250, 250, 250))
        d.ellipse(box(x - 6, 98, x + 6, 110), fill=(60, 40, 30))
        d.line(box(x - 15, 88, x + 13, 86), fill=(70, 48, 36), width=max(1, int(3 * s)))
    d.polygon(box(128, 112, 120, 140, 136, 140), fill=(206, 160, 130))  # nose
    d.chord(box(106, 146, 150, 168), 0, 180, fill=(170, 70, 70))  # mouth
    return img.filter(ImageFilter.GaussianBlur(0.6 * s))


def speech(seconds=4.0, rate=16000, seed=7):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 120 + 25 * np.sin(2 * np.pi * 0.7 * t) + 10 * np.sin(2 * np.pi * 2.3 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 30))
    f1 = 500 + 250 * np.sin(2 * np.pi * 3.1 * t)
    f2 = 1500 + 500 * np.sin(2 * np.pi * 1.7 * t + 1)
    formant = 0.6 + 0.4 * (np.cos(2 * np.pi * f1 / 4000 * 3) + np.cos(2 * np.pi * f2 / 4000)) / 2
    syllables = np.clip(np.sin(2 * np.pi * 3.8 * t) * 1.3, 0, 1) ** 1.5
    pauses = (np.sin(2 * np.pi * 0.35 * t + 0.5) > -0.6).astype(float)
    signal = voice * formant * syllables * pauses + 0.01 * rng.standard_normal(t.shape)
    return (signal / np.abs(signal).max() * 0.6).astype(np.float32)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    portrait().save(OUT / "portrait.png", optimize=True)
    pcm = (speech() * 32767).astype("<i2")
    with wave.open(str(OUT / "speech.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())


if __name__ == "__main__":
    main()
