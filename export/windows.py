"""Noisy/clean window pairs: random augmented ones for training, a fixed grid for validation.

A noisy window is clean + noise scaled to an input SNR (dB, over the window). The noise is made
zero-mean over the window: the model sees the noisy window z-scored with its own μ and σ and
learns to output (clean − μ)/σ, and no model can recover a constant offset that z-scoring removed,
so an offset in the noise would only add an error that no denoiser could avoid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import resample_poly

from export.data import NOISE_TYPES, Corpus, Record
from export.families import HELD_OUT, TRAINED
from service.contract import SAMPLING_RATE_HZ, WINDOW

EVAL_NOISE = ("bw", "em", "ma", "mixture")
EVAL_SNR_DB = (-6, 0, 6, 12)
TRAIN_SNR_DB = (-8.0, 24.0)


def scale_to_snr(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``noise``, made zero-mean, scaled so that 10·log10(Σclean² / Σnoise²) = ``snr_db``."""
    noise = noise - noise.mean()
    power = np.sum(clean**2) / max(np.sum(noise**2), 1e-12)
    return noise * np.sqrt(power / 10 ** (snr_db / 10))


def _segment(rng: np.random.Generator, channels: np.ndarray, n: int = WINDOW) -> np.ndarray:
    channel = channels[rng.integers(len(channels))]
    start = rng.integers(0, channel.size - n)
    return channel[start : start + n].astype(np.float64)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x - x.mean()
    return x / max(np.sqrt(np.mean(x**2)), 1e-12)


def mixture(rng: np.random.Generator, noise: dict[str, np.ndarray], weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted sum of one unit-power segment of each recorded noise type."""
    weights = np.full(len(NOISE_TYPES), 1 / len(NOISE_TYPES)) if weights is None else weights
    return sum(w * _unit(_segment(rng, noise[k])) for w, k in zip(weights, NOISE_TYPES))


class LeadPool:
    """Every lead of some records, drawn in proportion to its length (computed once, drawn often)."""

    def __init__(self, records: list[Record]) -> None:
        self._leads = [s for r in records for s in r.signals]
        self._p = _by_length(self._leads)
        self.pairs = [r.signals[:2] for r in records if len(r.signals) >= 2]
        self._pair_p = _by_length([first for first, _ in self.pairs])

    def clean_segment(self, rng: np.random.Generator, n: int = WINDOW) -> np.ndarray:
        """A random stretch of a random lead; flat stretches are redrawn."""
        while True:
            clean = _segment(rng, [self._leads[rng.choice(len(self._leads), p=self._p)]], n)
            if _carries_ecg(clean):
                return clean

    def mixed_segment(self, rng: np.random.Generator, n: int = WINDOW) -> np.ndarray:
        """cos θ·lead 1 + sin θ·lead 2 of one record over the same stretch, θ uniform: under the
        heart-dipole model a lead is a projection of one heart vector, so this is a lead that
        electrodes placed elsewhere (a chest strap's, say) could have recorded."""
        while True:
            first, second = self.pairs[rng.choice(len(self.pairs), p=self._pair_p)]
            start = rng.integers(0, min(first.size, second.size) - n)
            theta = rng.uniform(0, 2 * np.pi)
            clean = np.cos(theta) * first[start : start + n] + np.sin(theta) * second[start : start + n]
            if _carries_ecg(clean):
                return clean.astype(np.float64)


def _by_length(leads: list[np.ndarray]) -> np.ndarray:
    """Drawing probabilities proportional to the leads' lengths (empty for no leads)."""
    sizes = np.array([lead.size for lead in leads], dtype=np.float64)
    return sizes / sizes.sum()


def _carries_ecg(clean: np.ndarray) -> bool:
    return clean.std() > 0.02  # mV: leads-off or flat-line stretches carry no ECG


@dataclass
class TrainingWindows:
    """Random training pairs with the augmentations a chest strap meets."""

    corpus: Corpus
    snr_db: tuple[float, float] = TRAIN_SNR_DB  # input SNR drawn uniformly from this range
    clean_fraction: float = 0.0  # share of windows given with no noise: a clean window is to be left as it is
    time_stretch: float = 0.0  # clean ECG played up to this fraction faster or slower (see _clean)
    lead_mix: float = 0.0  # share of clean windows that mix a record's two leads (LeadPool.mixed_segment)
    synthetic_noise: float = 0.0  # share of noisy windows whose noise is a synthetic family (export.families)

    def __post_init__(self) -> None:
        self._pool = LeadPool(self.corpus.train)
        if self.lead_mix and not self._pool.pairs:
            raise ValueError("lead_mix needs training records with two leads")

    def sample(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self._pair(rng) for _ in range(count)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def _pair(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        clean = self._clean(rng)
        clean = clean * rng.choice([-1.0, 1.0], p=[0.3, 0.7]) * np.exp(rng.uniform(np.log(0.3), np.log(3)))
        if self.clean_fraction and rng.random() < self.clean_fraction:  # no draw at 0: old runs replay
            return clean.copy(), clean
        noise = self._noise(rng)
        noisy = clean + scale_to_snr(clean, noise, rng.uniform(*self.snr_db))
        t = np.arange(WINDOW) / SAMPLING_RATE_HZ
        if rng.random() < 0.3:  # powerline hum
            amp = rng.uniform(0.02, 0.5) * clean.std()
            noisy += amp * np.sin(2 * np.pi * rng.choice([50.0, 60.0]) * t + rng.uniform(0, 2 * np.pi))
        if rng.random() < 0.1:  # a short saturation or dropout of the amplifier
            start, length = rng.integers(0, WINDOW - 65), rng.integers(6, 65)
            level = rng.choice([noisy.max(), noisy.min(), 0.0])
            noisy[start : start + length] = level
        noisy -= (noisy - clean).mean()  # keep the added noise zero-mean (see the module docstring)
        return noisy, clean

    def _clean(self, rng: np.random.Generator) -> np.ndarray:
        """A clean window; with ``time_stretch``, a stretch of 0.9…1.1× its length (for 0.1) resampled
        to the window, as if the heart beat slower or faster: other heart rates and QRS widths
        than the training patients show. No draw at 0, so earlier runs replay.
        """
        if not self.time_stretch:
            return self._lead(rng, WINDOW)
        # Steps of 1 % keep resample_poly's filter short; 10 % extra on each side absorbs its edges.
        down = round(100 * rng.uniform(1 - self.time_stretch, 1 + self.time_stretch))
        segment = self._lead(rng, WINDOW * (down + 20) // 100)
        margin = WINDOW // 10
        return resample_poly(segment, 100, down)[margin : margin + WINDOW]

    def _lead(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.lead_mix and rng.random() < self.lead_mix:  # no draw at 0: old runs replay
            return self._pool.mixed_segment(rng, n)
        return self._pool.clean_segment(rng, n)

    def _noise(self, rng: np.random.Generator) -> np.ndarray:
        if self.synthetic_noise and rng.random() < self.synthetic_noise:  # no draw at 0: old runs replay
            family = list(TRAINED.values())[rng.integers(len(TRAINED))]
            return _unit(family(rng)) + rng.uniform(0, 1) * _unit(mixture(rng, self.corpus.noise_train))
        kind = rng.choice(["bw", "em", "ma", "mixture", "white"], p=[0.2, 0.2, 0.2, 0.3, 0.1])
        if kind == "white":
            return rng.standard_normal(WINDOW) + 0.5 * _unit(mixture(rng, self.corpus.noise_train))
        if kind == "mixture":
            return mixture(rng, self.corpus.noise_train, rng.dirichlet(np.ones(len(NOISE_TYPES))))
        return _segment(rng, self.corpus.noise_train[kind])


def validation_grid(
    corpus: Corpus, per_case: int, seed: int = 2026
) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Fixed (noisy, clean) windows per (noise type, input SNR) from validation records and noise."""
    recorded = {kind: (lambda rng, kind=kind: _segment(rng, corpus.noise_validation[kind])) for kind in NOISE_TYPES}
    return _grid(corpus, {**recorded, "mixture": lambda rng: mixture(rng, corpus.noise_validation)}, per_case, seed)


def family_grid(corpus: Corpus, per_case: int, seed: int) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Validation records with the synthetic noise families (export.families) and with validation
    `em` played backwards: its spectrum and bursts, in shapes the recording never shows."""
    reversed_em = lambda rng: _segment(rng, corpus.noise_validation["em"])[::-1].copy()
    return _grid(corpus, {**TRAINED, **HELD_OUT, "em reversed": reversed_em}, per_case, seed)


def _grid(
    corpus: Corpus, noises: dict, per_case: int, seed: int
) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    pool = LeadPool(corpus.validation)
    grid = {}
    for kind, draw in noises.items():
        for snr in EVAL_SNR_DB:
            noisy, clean = [], []
            for _ in range(per_case):
                c = pool.clean_segment(rng)
                noisy.append(c + scale_to_snr(c, draw(rng), snr))
                clean.append(c)
            grid[(kind, snr)] = (np.stack(noisy), np.stack(clean))
    return grid
