"""Whole recordings: resampled to the model's rate, cut into overlapping windows, cross-faded back.

NumPy (and soxr) only; the HTTP resource and ``python -m service.record`` both go through
``denoise``, which takes the function that runs the windows (the batcher, or an engine).

- Resampling uses soxr, a small polyphase resampler for any ratio (250.5 Hz too), so the
  runtime image stays small; docs/performance.md compares it with scipy's ``resample_poly``.
  soxr treats the signal as zero beyond its ends, which rings at an offset, so the straight line
  through the first and last samples is taken out before and put back (exactly) after.
- Windows overlap by ``WINDOW − HOP`` samples, the first starting at the recording's first
  sample and the last ending at its last, so that the model sees only real signal, as a window
  request does; each end's window gets the whole weight on its outer half (a recording of one
  window comes back as that window's answer). Padding the ends by reflection instead, so that
  they sat mid-window, left the first and last seconds with more error (docs/model-card.md).
  A recording shorter than a window is padded by reflection to one.
- Every window is centred on its own mean before it runs. The model z-scores it anyway (so it
  sees the same input) and its output is the zero-mean high-passed ECG; restored "in input
  units" it then comes back as ``output·σ`` with no per-window offset to jump at the seams.
- A window with no variation at all (a lead off) comes back as zeros, not as the model's answer
  to a flat input, which ``contract.normalize`` would scale by the recording's magnitude.
- Stitching is a weighted mean of the windows covering each sample, with Hann weights that
  vanish at the window edges, where the model has the least context, but at the recording's ends.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import numpy as np
import soxr

from service.contract import SAMPLING_RATE_HZ, WINDOW

HOP = WINDOW // 2  # each sample is covered by two windows, which the cross-fade blends
MIN_RATE_HZ = 50.0
MAX_RATE_HZ = 1000.0
MIN_SECONDS = 2.0
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # below it, float32 loses digits, then everything
_WEIGHTS = np.sin(np.pi * (np.arange(WINDOW) + 0.5) / WINDOW) ** 2  # Hann, > 0 inside, → 0 at both edges
# The recording's first and last windows: no other window covers their outer halves.
_FIRST = np.where(np.arange(WINDOW) < HOP, 1.0, _WEIGHTS)
_LAST = np.where(np.arange(WINDOW) >= HOP, 1.0, _WEIGHTS)

Runner = Callable[[np.ndarray], np.ndarray]


def resample(x: np.ndarray, rate: float, new_rate: float, length: int) -> np.ndarray:
    """``x`` at ``rate`` Hz → ``length`` samples at ``new_rate`` Hz (float64).

    The line through the end samples is taken out, and the rest is extended by odd reflection
    (value and slope continue through the ends) for at least half a second, by a whole number of
    samples at both rates so that the grids stay aligned; the line is added back at the new
    instants. The resampler then never meets the jump to its zero padding, which would ring.
    """
    x = np.asarray(x, dtype=np.float64)
    if rate == new_rate and len(x) == length:
        return x.copy()
    ramp = np.linspace(x[0], x[-1], len(x))
    pad = _aligned_pad(rate, new_rate)
    extended = np.pad(x - ramp, pad, mode="reflect", reflect_type="odd") if len(x) > 1 else x - ramp
    y = soxr.resample(extended, rate, new_rate, quality="HQ")
    start = round(pad * new_rate / rate) if len(x) > 1 else 0
    y = y[start : start + length]
    y = np.pad(y, (0, length - len(y)), mode="edge")
    # The line at the new instants: sample k sits at k / new_rate seconds, as sample j at j / rate.
    span = (len(x) - 1) / rate
    t = np.minimum(np.arange(length) / new_rate, span)
    return y + x[0] + (x[-1] - x[0]) * (t / span if span else 0)


def _aligned_pad(rate: float, new_rate: float) -> int:
    """The fewest samples, at least half a second, that are a whole number of samples at both rates
    (0 if that takes more than a minute: then the ends ring a little)."""
    ratio = Fraction(new_rate).limit_denominator(1000) / Fraction(rate).limit_denominator(1000)
    step = ratio.denominator
    pad = step * -(-int(np.ceil(rate / 2)) // step)
    return pad if pad <= 60 * rate else 0


def model_length(samples: int, rate: float) -> int:
    """Samples at the model's rate that span the recording to its last sample (so that the way
    back interpolates everywhere and never extrapolates)."""
    return int(np.ceil((samples - 1) * SAMPLING_RATE_HZ / rate - 1e-9)) + 1


def _layout(n: int) -> tuple[np.ndarray, int]:
    """Where the windows over ``n`` samples start, and the padding before them (and after, to one
    window) when ``n`` is shorter than a window."""
    if n < WINDOW:
        return np.zeros(1, dtype=int), (WINDOW - n) // 2
    starts = np.arange(0, n - WINDOW + 1, HOP)
    return (starts if starts[-1] == n - WINDOW else np.append(starts, n - WINDOW)), 0


def cut(x: np.ndarray) -> np.ndarray:
    """Overlapping ``N×WINDOW`` windows over ``x`` (at the model's rate), each centred on its mean."""
    n = len(x)
    starts, left = _layout(n)
    padded = np.pad(
        np.asarray(x, dtype=np.float64), (left, max(0, WINDOW - n - left)), mode="reflect" if n > 1 else "edge"
    )
    windows = padded[starts[:, None] + np.arange(WINDOW)]
    return windows - windows.mean(axis=1, keepdims=True)


def stitch(windows: np.ndarray, length: int) -> np.ndarray:
    """The weighted mean of overlapping windows (as ``cut`` made them for ``length`` samples)."""
    starts, left = _layout(length)
    total = max(length, WINDOW)
    acc = np.zeros(total)
    weight = np.zeros(total)
    last = len(starts) - 1
    for i, (start, window) in enumerate(zip(starts, windows, strict=True)):
        weights = np.ones(WINDOW) if i == 0 == last else _FIRST if i == 0 else _LAST if i == last else _WEIGHTS
        acc[start : start + WINDOW] += weights * window
        weight[start : start + WINDOW] += weights
    return acc[left : left + length] / weight[left : left + length]


def denoise(samples: np.ndarray, rate: float, run: Runner) -> np.ndarray:
    """The denoised recording, at ``rate`` and as long as ``samples``, in their units, baseline removed.

    ``run`` maps ``N×WINDOW`` windows to the model's output in the windows' units (``output·σ + μ``).
    """
    # soxr overflows from magnitudes of about 1e36 (JSON admits 1e100): the recording goes through
    # at magnitudes about 1, scaled by a power of two, which is exact both ways.
    _, exponent = np.frexp(np.max(np.abs(samples)))
    n = model_length(len(samples), rate)
    x = resample(np.ldexp(samples, -exponent), rate, SAMPLING_RATE_HZ, n)
    windows = cut(x)
    # A flat window (a lead off, a clipped stretch) holds no ECG: its z-score is all zeros with
    # σ taken as 1, and the model's small answer to zeros, scaled by the recording's magnitude
    # (its offset included), would come back as an invented signal. It comes back flat. Flat by
    # its range: centred, it is not quite zero when its level's mean is off in the last bit.
    flat = np.ptp(windows, axis=1, keepdims=True) == 0
    clean = stitch(np.where(flat, 0.0, run(windows)), n)
    return np.ldexp(resample(clean, SAMPLING_RATE_HZ, rate, len(samples)), exponent)


def compact(samples: np.ndarray) -> np.ndarray:
    """float32, the model's own precision and half as long to write, unless a value is beyond
    float32's range either way (JSON numbers and CSV files may reach 1e100, or 1e-100, where
    float32 has zeros): then as it is."""
    with np.errstate(over="ignore", under="ignore"):
        out = samples.astype(np.float32)
    lost = (np.abs(out) < FLOAT32_TINY) & (samples != 0)
    return out if np.isfinite(out).all() and not lost.any() else samples


def to_float32(samples: np.ndarray) -> np.ndarray:
    """For answers that must be float32: clipped to its largest values, which the model may
    overshoot on an input that reaches them."""
    return np.clip(samples, -FLOAT32_MAX, FLOAT32_MAX).astype("<f4")
