"""Denoising quality per window, in the input's units: SNR, RMSE, PRD and cosine similarity."""

from __future__ import annotations

import numpy as np
from scipy import signal

from service.contract import SAMPLING_RATE_HZ

_BANDPASS = signal.butter(4, [0.5, 40.0], btype="bandpass", fs=SAMPLING_RATE_HZ, output="sos")


def bandpass(windows: np.ndarray) -> np.ndarray:
    """The classical baseline: 0.5–40 Hz zero-phase Butterworth band-pass of each window."""
    return signal.sosfiltfilt(_BANDPASS, windows, axis=-1)


def snr_db(clean: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    return 10 * np.log10(np.sum(clean**2, axis=-1) / np.maximum(np.sum((clean - estimate) ** 2, axis=-1), 1e-20))


def scores(noisy: np.ndarray, clean: np.ndarray, estimate: np.ndarray) -> dict[str, float]:
    """Means over windows; ``snr_improvement_db`` is output SNR minus input SNR."""
    err = clean - estimate
    snr_out = snr_db(clean, estimate)
    cosine = np.sum(clean * estimate, axis=-1) / (
        np.linalg.norm(clean, axis=-1) * np.maximum(np.linalg.norm(estimate, axis=-1), 1e-12)
    )
    return {
        "snr_in_db": float(np.mean(snr_db(clean, noisy))),
        "snr_out_db": float(np.mean(snr_out)),
        "snr_improvement_db": float(np.mean(snr_out - snr_db(clean, noisy))),
        "rmse": float(np.mean(np.sqrt(np.mean(err**2, axis=-1)))),
        "prd_percent": float(np.mean(100 * np.sqrt(np.sum(err**2, axis=-1) / np.sum(clean**2, axis=-1)))),
        "cosine": float(np.mean(cosine)),
    }
