"""The model's contract, shared by the export stage and the service.

One window is 10 s of one ECG lead at 130 Hz. The model takes ``N×1×WINDOW`` float32 z-scored
windows named ``INPUT_NAME`` and returns the clean estimate in the same normalized units as
``OUTPUT_NAME``. Importing this module needs NumPy only, neither torch nor onnxruntime.
"""

from __future__ import annotations

import numpy as np

SAMPLING_RATE_HZ = 130
WINDOW = 10 * SAMPLING_RATE_HZ
INPUT_NAME = "ecg"
OUTPUT_NAME = "denoised"


TINY_SIGMA = 1e-140


def normalize(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-score each row with its own mean and standard deviation (a deviation of 0 counts as 1).

    Returns the normalized ``N×1×L`` float32 tensor and the per-window ``μ`` and ``σ`` (``N×1``)
    that map the model's output back to the input's units: ``output·σ + μ``.
    """
    windows = np.asarray(windows, dtype=np.float64)
    n = windows.shape[1]
    # As few passes as possible: each NumPy call on a long row lets go of the GIL, and under load
    # the request thread then queues for it again behind the others (docs/performance.md).
    mu = windows.sum(axis=1, keepdims=True) / n
    centered = windows - mu
    sigma = np.sqrt(np.einsum("ij,ij->i", centered, centered)[:, None] / n)
    # Below about 1e-150 the squares are subnormal, then zero: σ comes out wrong, then 0, as
    # for a flat row. Such rows are scaled first.
    flat = sigma[:, 0] < TINY_SIGMA
    if flat.any():
        scale = np.abs(centered[flat]).max(axis=1, keepdims=True)
        scale[scale == 0] = 1.0
        scaled = centered[flat] / scale
        sigma[flat] = scale * np.sqrt(np.einsum("ij,ij->i", scaled, scaled)[:, None] / n)
    sigma[sigma == 0] = 1.0
    z = np.empty((len(windows), 1, n), dtype=np.float32)
    np.divide(centered, sigma, out=z[:, 0, :], casting="same_kind")
    return z, mu, sigma


def restore(out: np.ndarray, mu: np.ndarray, sigma: np.ndarray, input_units: bool) -> np.ndarray:
    """The model's ``N×1×L`` output as ``N×L``, mapped back by ``·σ + μ`` (in float64) if ``input_units``.

    Normalized output stays float32, exactly what the model computed: its shortest decimal form
    is about half as long in JSON as the float64 one, for the same values.
    """
    out = out[:, 0, :]
    return out.astype(np.float64) * sigma + mu if input_units else out
