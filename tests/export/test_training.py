"""A few steps of the real training code on tiny synthetic data: it learns, saves, resumes, repeats."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.checkpoint import load_model
from export.synth import synthetic_corpus
from export.train import Config, loss_fn, lr_factor, to_batch, train

pytestmark = pytest.mark.slow  # exports, evaluates or trains a model

# fp32: bf16 autocast on a CPU without bf16 instructions costs seconds a step; the first test
# keeps one bf16 step, as the recipe trains in bf16 (on a GPU).
TINY = {"steps_per_epoch": 3, "batch_size": 4, "val_per_case": 1, "warmup_epochs": 0, "precision": "fp32"}
BF16 = {**TINY, "steps_per_epoch": 1, "precision": "bf16"}


def test_training_writes_a_strictly_loadable_best_checkpoint_and_history_and_resumes(tmp_path):
    """One epoch, then a second run that resumes from the last checkpoint instead of starting over."""
    corpus = synthetic_corpus(np.random.default_rng(0))
    run = tmp_path / "run"
    train(corpus, Config(epochs=1, **BF16), run, tmp_path / "best.pth", progress=False)
    best = train(corpus, Config(epochs=2, **TINY), run, tmp_path / "best.pth", progress=False)
    assert best["epoch"] in (1, 2) and np.isfinite(best["mean_snr_improvement_db"])
    assert len([k for k in best if "@" in k]) == 16
    load_model(tmp_path / "best.pth")  # strict
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert torch.load(run / "last.pt", weights_only=False)["state"]["epoch"] == 2


def test_training_is_reproducible_from_its_seed_whatever_the_loader_workers(tmp_path):
    corpus = synthetic_corpus(np.random.default_rng(0))
    weights = []
    for name, workers in (("a", 0), ("b", 2)):
        cfg = Config(epochs=1, workers=workers, **TINY)
        train(corpus, cfg, tmp_path / name, tmp_path / f"{name}.pth", progress=False)
        weights.append(torch.load(tmp_path / name / "last.pt", weights_only=False)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_targets_follow_the_normalization_contract():
    rng = np.random.default_rng(1)
    clean = rng.standard_normal((3, 1300))
    noisy = 5 + 2 * clean + rng.standard_normal((3, 1300))
    x, y = to_batch(noisy, clean)
    mu, sigma = noisy.mean(axis=1, keepdims=True), noisy.std(axis=1, keepdims=True)
    assert np.allclose(x.numpy()[:, 0], (noisy - mu) / sigma, atol=1e-5)
    assert np.allclose(y.numpy()[:, 0] * sigma + mu, clean, atol=1e-4)


def test_learning_rate_warms_up_then_decays():
    cfg = Config(epochs=10, steps_per_epoch=10, warmup_epochs=1)
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] < factors[9] == 1.0
    assert factors[10] > factors[50] > factors[99] >= 0.01


def test_fine_tuning_starts_from_the_given_weights(tmp_path):
    from .conftest import random_state_dict

    start = tmp_path / "start.pth"
    torch.save(random_state_dict(seed=3), start)
    corpus = synthetic_corpus(np.random.default_rng(0))
    cfg = Config(
        epochs=1, steps_per_epoch=0, val_per_case=1, warmup_epochs=0, init=str(start), snr_min_db=0, snr_max_db=24
    )
    train(corpus, cfg, tmp_path / "run", tmp_path / "best.pth", progress=False)
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["model"]
    assert torch.equal(saved["final.weight"], torch.load(start)["final.weight"])


def test_snr_term_makes_every_window_count_per_decibel():
    """Without the term, halving the error of a nearly clean window barely moves the loss next
    to halving a noisy window's error; with it, both are worth the same 3 dB."""
    target = torch.sin(torch.linspace(0, 20, 1300)).repeat(2, 1, 1)
    error = torch.stack([torch.full((1, 1300), 0.05), torch.full((1, 1300), 0.5)])

    def gain(weight: float, window: int) -> float:
        halved = error.clone()
        halved[window] /= 2
        return float(loss_fn(target + error, target, weight) - loss_fn(target + halved, target, weight))

    assert gain(0.0, 0) < 0.15 * gain(0.0, 1)
    # A weight that dwarfs the recipe: each halving gains 10·log10(4) ≈ 6 dB in one of two windows.
    assert gain(100.0, 0) == pytest.approx(gain(100.0, 1), rel=0.05)
    assert gain(100.0, 0) == pytest.approx(100 * 6.02 / 2, rel=0.05)


def test_the_moving_average_of_the_weights_is_what_is_saved_and_it_resumes(tmp_path):
    corpus = synthetic_corpus(np.random.default_rng(0))
    run, best = tmp_path / "run", tmp_path / "best.pth"
    train(corpus, Config(epochs=1, ema_decay=0.5, **TINY), run, best, progress=False)
    last, saved = torch.load(run / "last.pt", weights_only=False), torch.load(best)
    assert all(torch.equal(saved[k], last["ema"][f"module.{k}"]) for k in saved)
    assert not torch.equal(saved["final.weight"], last["model"]["final.weight"])
    train(corpus, Config(epochs=2, ema_decay=0.5, **TINY), run, best, progress=False)
    assert torch.load(run / "last.pt", weights_only=False)["ema"]["n_averaged"] == 2 * TINY["steps_per_epoch"]
