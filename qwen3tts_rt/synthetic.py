"""A deterministic speech-like signal: the one stand-in for a recorded voice used by the
tests, the benchmarks, the demo and the server's warm-up.

It passes the reference-audio rules for voice cloning (loud enough, no clipping, no
silence) and is cheap to make. With the defaults it is bit for bit the reference recording
of ``tests/reference`` (``tests/reference/data/ref_audio.npy``), which the official
package cloned when the reference data was made; keep them equal.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 24000


def synthetic_speech(
    seconds: float,
    rate: int = SAMPLE_RATE,
    *,
    pitch: float = 140.0,
    seed: int = 1234,
    peak: float = 0.25,
    noise: float = 0.01,
) -> np.ndarray:
    """[S] float32, S = int(seconds * rate): seven harmonics of a pitch gliding by ±30 Hz
    around ``pitch`` (Hz) at 1.3 Hz, under a 3 Hz syllable envelope, scaled to ``peak``,
    plus white noise of standard deviation ``noise`` drawn from ``seed``."""
    n = int(seconds * rate)
    if n < 1:
        raise ValueError(f"synthetic_speech needs at least one sample, got {seconds} s at {rate} Hz")
    if pitch <= 0 or 7 * (pitch + 30) >= rate / 2:
        raise ValueError(f"pitch {pitch} Hz: its 7th harmonic must stay below {rate / 2:g} Hz (rate / 2)")
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    f0 = pitch + 30 * np.sin(2 * np.pi * 1.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    wav = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    wav = peak * wav / np.abs(wav).max() + noise * rng.standard_normal(t.shape)
    return wav.astype(np.float32)
