"""Synthetic single-lead ECG and noise, for parity checks and test fixtures.

Real recordings never enter the repository, so checks that must run anywhere (CI included)
draw their signals from here: beats built from Gaussian P, QRS and T waves with a varying heart
rate, and the noise kinds a chest strap meets.
"""

from __future__ import annotations

import numpy as np

from service.contract import SAMPLING_RATE_HZ, WINDOW

# (centre offset in s relative to R, width in s, amplitude in mV) for P, Q, R, S, T.
_WAVES = ((-0.20, 0.025, 0.15), (-0.03, 0.010, -0.12), (0.0, 0.012, 1.1), (0.03, 0.012, -0.25), (0.28, 0.05, 0.3))


def clean_ecg(rng: np.random.Generator, n: int = WINDOW, fs: int = SAMPLING_RATE_HZ) -> np.ndarray:
    """One synthetic ECG strip in mV, heart rate 50–150 bpm with beat-to-beat variability."""
    t = np.arange(n) / fs
    rate_hz = rng.uniform(50, 150) / 60
    beats, r = [], rng.uniform(0, 1 / rate_hz)
    while r < t[-1] + 1:
        beats.append(r)
        r += rng.normal(1 / rate_hz, 0.03 / rate_hz)
    scale = rng.uniform(0.5, 2.0)
    signal = np.zeros(n)
    for r in beats:
        for offset, width, amp in _WAVES:
            signal += amp * scale * np.exp(-0.5 * ((t - r - offset) / width) ** 2)
    return signal


def noise(rng: np.random.Generator, n: int = WINDOW, fs: int = SAMPLING_RATE_HZ) -> np.ndarray:
    """Baseline wander, muscle-like white noise and powerline hum, in random proportions."""
    t = np.arange(n) / fs
    wander = sum(
        rng.uniform(0, 0.5) * np.sin(2 * np.pi * rng.uniform(0.05, 0.5) * t + rng.uniform(0, 6.3)) for _ in range(3)
    )
    muscle = rng.uniform(0, 0.2) * rng.standard_normal(n)
    hum = rng.uniform(0, 0.1) * np.sin(2 * np.pi * rng.choice([50.0, 60.0]) * t)
    return wander + muscle + hum


def noisy_windows(rng: np.random.Generator, count: int, n: int = WINDOW) -> np.ndarray:
    """``count × n`` noisy synthetic ECG windows, float64, in mV."""
    return np.stack([clean_ecg(rng, n) + noise(rng, n) for _ in range(count)])


def synthetic_corpus(rng: np.random.Generator, records: int = 4, seconds: int = 60):
    """A tiny stand-in for the real corpus, so training and evaluation run in CI without data."""
    from export.data import NOISE_TYPES, Corpus, Record

    n = seconds * SAMPLING_RATE_HZ
    made = [Record(f"synthetic/{i}", f"synthetic/{i}", (clean_ecg(rng, n),)) for i in range(records)]
    noise_of = lambda: {k: np.stack([noise(rng, n), noise(rng, n)]).astype(np.float32) for k in NOISE_TYPES}
    return Corpus(train=made[1:], validation=made[:1], noise_train=noise_of(), noise_validation=noise_of())
