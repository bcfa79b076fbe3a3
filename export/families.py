"""Synthetic noise families: shapes of noise that the three recorded noise records lack.

The recorded noise (NSTDB `bw`, `em`, `ma`) is three recordings. A model trained on them alone
learns their particular shapes: time-reversed `em`, the same spectrum and the same bursts played
backwards, lost 6.7 dB on average to model version 5, where `em` itself lost 11.4. Training draws a share of its noise from the
``TRAINED`` families; evaluation also scores the ``HELD_OUT`` ones, which training never sees, as
a probe of how the model meets noise unlike anything it was trained on. Each family returns one
window of noise at an arbitrary scale (the caller scales it to an input SNR).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import signal

from service.contract import SAMPLING_RATE_HZ, WINDOW

Family = Callable[[np.random.Generator], np.ndarray]
_T = np.arange(WINDOW) / SAMPLING_RATE_HZ


def coloured(rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with a 1/f^α power spectrum, α from 0.5 to 2 (pink to brown): electrode
    and amplifier noise, slow drifts."""
    f = np.fft.rfftfreq(WINDOW, 1 / SAMPLING_RATE_HZ)
    spectrum = rng.standard_normal(f.size) + 1j * rng.standard_normal(f.size)
    spectrum[0] = 0
    spectrum[1:] *= f[1:] ** (-rng.uniform(0.5, 2.0) / 2)
    return np.fft.irfft(spectrum, WINDOW)


def muscle_bursts(rng: np.random.Generator) -> np.ndarray:
    """Band-limited noise (a random band within 8–64 Hz) in one to five bursts over a floor:
    muscles under a chest strap contracting with each movement."""
    band = sorted((rng.uniform(8, 25), rng.uniform(40, 64)))
    sos = signal.butter(4, band, btype="bandpass", fs=SAMPLING_RATE_HZ, output="sos")
    envelope = np.full(WINDOW, rng.uniform(0.05, 0.5))
    for _ in range(rng.integers(1, 6)):
        envelope += np.exp(-0.5 * ((_T - rng.uniform(0, _T[-1])) / rng.uniform(0.1, 0.8)) ** 2)
    return signal.sosfiltfilt(sos, rng.standard_normal(WINDOW)) * envelope


def motion_steps(rng: np.random.Generator) -> np.ndarray:
    """One to five sudden shifts that decay back (time constant 0.1–2 s), smoothed by a 5–30 Hz
    low-pass: an electrode that moves on the skin and settles."""
    x = np.zeros(WINDOW)
    for _ in range(rng.integers(1, 6)):
        start = rng.integers(0, WINDOW)
        x[start:] += rng.standard_normal() * np.exp(-(_T[start:] - _T[start]) / rng.uniform(0.1, 2.0))
    return signal.sosfiltfilt(signal.butter(2, rng.uniform(5, 30), fs=SAMPLING_RATE_HZ, output="sos"), x)


def cadence(rng: np.random.Generator) -> np.ndarray:
    """A periodic motion artefact at 0.8–2 Hz with up to four harmonics and a slowly varying
    amplitude: a strap moving with each pedal stroke or stride, in the ECG's own band."""
    f0 = rng.uniform(0.8, 2.0) * (1 + 0.02 * np.cumsum(rng.standard_normal(WINDOW)) / np.sqrt(WINDOW))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLING_RATE_HZ
    wave = sum(rng.uniform(0, 1) / k * np.sin(k * phase + rng.uniform(0, 2 * np.pi)) for k in range(1, 5))
    return wave * (1 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.05, 0.2) * _T + rng.uniform(0, 2 * np.pi)))


def spikes(rng: np.random.Generator) -> np.ndarray:
    """Three to twelve spikes of 1–5 samples over faint white noise: contact crackle."""
    x = 0.1 * rng.standard_normal(WINDOW)
    for _ in range(rng.integers(3, 13)):
        start = rng.integers(0, WINDOW - 5)
        x[start : start + rng.integers(1, 6)] += 3 * rng.standard_normal()
    return x


def respiration(rng: np.random.Generator) -> np.ndarray:
    """Breathing at 0.1–0.5 Hz over a slower drift: baseline wander of a smoother kind than `bw`."""
    breath = np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * _T + rng.uniform(0, 2 * np.pi))
    return breath + 0.3 * np.sin(2 * np.pi * rng.uniform(0.02, 0.1) * _T + rng.uniform(0, 2 * np.pi))


TRAINED: dict[str, Family] = {"coloured": coloured, "muscle bursts": muscle_bursts, "motion steps": motion_steps}
HELD_OUT: dict[str, Family] = {"cadence": cadence, "spikes": spikes, "respiration": respiration}
