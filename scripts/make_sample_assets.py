"""Makes the bundled sample portrait and sample audio (deterministic; run from the repo root):

    python scripts/make_sample_assets.py

emo_core/assets/portrait.png: a synthetic portrait (emo_core.synthetic, identity seed 7), 256x256.
emo_core/assets/speech.wav: 4 s of synthetic speech (emo_core.synthetic.speech, seed 7) at 16 kHz, 16-bit mono.
"""

import sys
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emo_core.synthetic import SAMPLE_RATE, Identity, render, speech  # noqa: E402

OUT = ROOT / "emo_core" / "assets"


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    identity = Identity.sample(np.random.default_rng(7))
    render(identity, 256, mouth=0.15, yaw=0, pitch=0, roll=0, blink=0).save(OUT / "portrait.png", optimize=True)
    waveform, _ = speech(4.0, seed=7)
    with wave.open(str(OUT / "speech.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((waveform * 32767).astype("<i2").tobytes())


if __name__ == "__main__":
    main()
