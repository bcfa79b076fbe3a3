"""The evaluation command on synthetic data: a full table, a verdict, figures; and on the real
data when it is present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export.evaluate import beat_agreement, evaluate, evaluate_families, family_table, figures, main, table
from export.synth import synthetic_corpus

from .conftest import one_thread_engine

pytestmark = pytest.mark.slow  # exports, evaluates or trains a model
SHIPPED = Path(__file__).resolve().parents[2] / "artifacts" / "attention_unet.int8.onnx"


def test_evaluation_covers_16_cases_for_model_and_baseline(tmp_path):
    """The shipped model (not a random export: the tests that read one share it, and a process
    here would wait for the other's export) beats the band-pass filter in every case."""
    corpus = synthetic_corpus(np.random.default_rng(0))
    engine = one_thread_engine(SHIPPED)
    result = evaluate(engine, corpus, per_case=2)
    assert len(result["cases"]) == 16
    assert {"model", "bandpass"} <= result["cases"][0].keys()
    summary = result["summary"]
    assert summary["targets_met"] is True and summary["cases_better_than_bandpass"] == 16
    assert "| mixture | 12 dB |" in table(result)
    checks = figures(engine, corpus, tmp_path / "no-data", tmp_path)
    assert (tmp_path / "examples.png").stat().st_size > 10_000 and checks == {}


def test_family_evaluation_scores_trained_and_held_out_families_apart():
    corpus = synthetic_corpus(np.random.default_rng(0))
    result = evaluate_families(one_thread_engine(SHIPPED), corpus, per_case=2)
    held_out = {c["noise"] for c in result["cases"] if c["held_out"]}
    assert held_out == {"cadence", "spikes", "respiration", "em reversed"}
    assert result["summary"]["held_out"]["cases"] == 16 and result["summary"]["trained"]["cases"] == 12
    text = family_table(result)
    assert "| em reversed (held out) | 12 dB |" in text and "| coloured | -6 dB |" in text


def test_beat_agreement_counts_matches_within_tolerance():
    agreement = beat_agreement(np.array([10, 100, 200]), np.array([12, 150, 205]))
    assert agreement == {"beats_before": 3, "beats_after": 3, "matched": 2, "f1": 2 * 2 / 6}


def test_command_on_real_data_writes_both_tables_and_the_polar_checks(
    real_data, real_corpus, tmp_path, capsys, monkeypatch
):
    # The corpus the other tests share (loading it again cost seconds; test_data checks the loading).
    monkeypatch.setattr("export.evaluate.corpus_or_exit", lambda root: real_corpus)
    args = ["--model", str(SHIPPED), "--data", str(real_data), "--out-dir", str(tmp_path), "--per-case", "1"]
    assert main([*args, "--record-minutes", "0.25"]) == 0
    result = json.loads((tmp_path / "evaluation-attention_unet.int8.json").read_text())
    assert len(result["cases"]) == 16 and len(result["noise_families"]["cases"]) == 28
    assert result["records"]["summary"]["records"] > 0 and (tmp_path / "records.png").exists()
    assert result["polar_h10_beats"]["rest_40s"]["beats_before"] > 0
    assert "Synthetic noise families" in capsys.readouterr().out
