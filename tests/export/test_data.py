"""The data protocol: patient-wise split, SNR scaling, and (when present) the real recordings."""

from __future__ import annotations

import numpy as np
import pytest

from export.data import NOISE_TRAIN_FRACTION, NOISE_TYPES, Corpus, Record, is_validation, patient_group
from export.families import HELD_OUT, TRAINED
from export.metrics import bandpass, scores, snr_db
from export.synth import synthetic_corpus
from export.windows import EVAL_NOISE, EVAL_SNR_DB, TrainingWindows, family_grid, scale_to_snr, validation_grid


def test_excerpts_and_same_patient_records_share_a_group():
    assert patient_group("qtdb", "sel100") == patient_group("mitdb", "100") == "mitdb/100"
    assert patient_group("mitdb", "202") == patient_group("mitdb", "201") == patient_group("qtdb", "sel202")
    assert patient_group("qtdb", "sele0104") == "qtdb/sele0104"
    assert patient_group("qtdb", "sel16265") == "qtdb/sel16265"


def test_scale_to_snr_hits_the_requested_snr_with_zero_mean_noise():
    rng = np.random.default_rng(0)
    clean = rng.standard_normal(1300)
    for target in (-6, 0, 12):
        noise = scale_to_snr(clean, 3 + rng.standard_normal(1300), target)
        assert abs(noise.mean()) < 1e-9
        assert abs(snr_db(clean, clean + noise) - target) < 1e-9


def test_training_windows_are_finite_pairs_with_zero_mean_noise():
    sampler = TrainingWindows(synthetic_corpus(np.random.default_rng(0)))
    noisy, clean = sampler.sample(np.random.default_rng(1), 64)
    assert noisy.shape == clean.shape == (64, 1300)
    assert np.isfinite(noisy).all()
    assert np.abs((noisy - clean).mean(axis=1)).max() < 1e-9


def test_clean_fraction_leaves_that_share_of_windows_without_noise():
    corpus = synthetic_corpus(np.random.default_rng(0))
    noisy, clean = TrainingWindows(corpus, clean_fraction=0.25).sample(np.random.default_rng(1), 400)
    untouched = np.all(noisy == clean, axis=1)
    assert 60 < untouched.sum() < 140  # about a quarter of 400
    default_noisy, default_clean = TrainingWindows(corpus).sample(np.random.default_rng(1), 400)
    assert not np.any(np.all(default_noisy == default_clean, axis=1))


def test_validation_grid_covers_every_case_at_its_snr():
    grid = validation_grid(synthetic_corpus(np.random.default_rng(0)), per_case=3)
    assert sorted(grid) == sorted((k, s) for k in EVAL_NOISE for s in EVAL_SNR_DB)
    for (_, snr), (noisy, clean) in grid.items():
        assert np.allclose(snr_db(clean, noisy), snr, atol=1e-6)


def test_noise_families_give_one_window_each_reproducible_from_the_generator():
    for name, family in {**TRAINED, **HELD_OUT}.items():
        first, again = family(np.random.default_rng(3)), family(np.random.default_rng(3))
        assert first.shape == (1300,) and np.isfinite(first).all() and first.std() > 0, name
        assert np.array_equal(first, again), name
        assert not np.array_equal(first, family(np.random.default_rng(4))), name


def test_synthetic_noise_replaces_that_share_of_the_recorded_noise():
    made = synthetic_corpus(np.random.default_rng(0))
    silent = {k: np.zeros_like(v) for k, v in made.noise_train.items()}  # recorded noise that adds nothing
    corpus = Corpus(train=made.train, validation=made.validation, noise_train=silent, noise_validation=silent)

    def carries_noise(share: float) -> np.ndarray:
        noisy, clean = TrainingWindows(corpus, synthetic_noise=share).sample(np.random.default_rng(1), 200)
        return np.any(noisy != clean, axis=1)

    assert carries_noise(1.0).all()
    assert carries_noise(0.0).mean() < 0.6  # only white noise, hum and dropouts: about 40 %
    assert 0.6 < carries_noise(0.5).mean() < 0.9


def test_family_grid_holds_every_family_and_reversed_em_at_its_snr():
    corpus = synthetic_corpus(np.random.default_rng(0))
    grid = family_grid(corpus, per_case=2, seed=7)
    kinds = [*TRAINED, *HELD_OUT, "em reversed"]
    assert sorted(grid) == sorted((k, s) for k in kinds for s in EVAL_SNR_DB)
    for (_, snr), (noisy, clean) in grid.items():
        assert np.allclose(snr_db(clean, noisy), snr, atol=1e-6)
    assert not set(TRAINED) & set(HELD_OUT)


def test_scores_of_a_perfect_and_of_a_baseline_estimate():
    grid = validation_grid(synthetic_corpus(np.random.default_rng(0)), per_case=4)
    noisy, clean = grid[("ma", 0)]
    perfect = scores(noisy, clean, clean)
    assert perfect["cosine"] > 0.999 and perfect["rmse"] == 0
    assert np.isfinite(scores(noisy, clean, bandpass(noisy))["snr_improvement_db"])


def test_real_corpus_is_split_by_patient(real_corpus):
    corpus = real_corpus
    train_groups = {r.group for r in corpus.train}
    validation_groups = {r.group for r in corpus.validation}
    assert train_groups and validation_groups and not train_groups & validation_groups
    assert all(is_validation(g) for g in validation_groups)
    for kind, train_noise in corpus.noise_train.items():
        total = train_noise.shape[1] + corpus.noise_validation[kind].shape[1]
        assert abs(train_noise.shape[1] / total - NOISE_TRAIN_FRACTION) < 1e-3


def _tone_corpus(*lead_hz: float) -> Corpus:
    """One training record of 60 s whose leads are pure tones at ``lead_hz``: stand-ins for the heart."""
    t = np.arange(60 * 130) / 130
    leads = tuple(np.sin(2 * np.pi * hz * t) for hz in lead_hz)
    noise = {k: np.random.default_rng(0).standard_normal((2, t.size)) for k in NOISE_TYPES}
    return Corpus(train=[Record("tones", "tones", leads)], validation=[], noise_train=noise, noise_validation=noise)


def test_time_stretch_plays_the_clean_ecg_up_to_that_much_faster_or_slower():
    """A 5 Hz tone stands in for the heart: stretched by up to ±10 % it comes out at 4.5–5.5 Hz."""
    corpus = _tone_corpus(5)

    def peak_hz(stretch: float) -> np.ndarray:
        _, clean = TrainingWindows(corpus, time_stretch=stretch).sample(np.random.default_rng(2), 200)
        return np.argmax(np.abs(np.fft.rfft(clean, axis=1)), axis=1) * 130 / 1300

    assert set(peak_hz(0.0)) == {5.0}
    stretched = peak_hz(0.1)
    assert stretched.min() >= 4.4 and stretched.max() <= 5.6 and len(set(stretched)) >= 9


def test_lead_mix_gives_that_share_of_windows_a_projection_of_both_leads():
    """Lead 1 a 3 Hz tone, lead 2 a 7 Hz tone: a mixed window holds both in the ratio tan θ."""
    corpus = _tone_corpus(3, 7)

    def angles(mix: float) -> np.ndarray:
        _, clean = TrainingWindows(corpus, lead_mix=mix).sample(np.random.default_rng(3), 400)
        spectrum = np.abs(np.fft.rfft(clean, axis=1))
        return np.arctan2(spectrum[:, 70], spectrum[:, 30])  # 0: lead 1 alone, π/2: lead 2 alone

    single = angles(0.0)
    assert np.all((single < 1e-6) | (single > np.pi / 2 - 1e-6))
    mixed = angles(1.0)
    assert mixed.min() < 0.2 and mixed.max() > np.pi / 2 - 0.2 and np.mean((mixed > 0.2) & (mixed < 1.37)) > 0.6
    half = angles(0.5)
    assert 140 < np.sum((half > 1e-6) & (half < np.pi / 2 - 1e-6)) < 260


def test_lead_mix_refuses_records_with_one_lead():
    with pytest.raises(ValueError, match="two leads"):
        TrainingWindows(synthetic_corpus(np.random.default_rng(0)), lead_mix=0.5)
