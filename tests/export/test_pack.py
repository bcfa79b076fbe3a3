"""The packed corpus: the same records, split and noise as the data folder, within its 4 µV step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import wfdb

from export.cli import corpus_or_exit
from export.data import PACK_STEP_MV, Corpus, load_corpus, read_pack, write_pack
from export.pack import main
from export.synth import clean_ecg, noise, synthetic_corpus

ROOT = Path(__file__).resolve().parents[2]


def assert_same_corpus(packed: Corpus, original: Corpus) -> None:
    for side in ("train", "validation"):
        got, want = getattr(packed, side), getattr(original, side)
        assert [(r.name, r.group, len(r.signals)) for r in got] == [(r.name, r.group, len(r.signals)) for r in want]
        for a, b in zip(got, want):
            for x, y in zip(a.signals, b.signals):
                assert x.dtype == np.float32 and x.shape == y.shape
                assert np.abs(x - y).max() <= PACK_STEP_MV / 2 + 1e-5
    for side in ("noise_train", "noise_validation"):
        got, want = getattr(packed, side), getattr(original, side)
        assert sorted(got) == sorted(want)
        assert all(
            got[k].shape == want[k].shape and np.abs(got[k] - want[k]).max() <= PACK_STEP_MV / 2 + 1e-5 for k in got
        )


def test_a_packed_corpus_reads_back_within_half_a_step(tmp_path):
    corpus = synthetic_corpus(np.random.default_rng(0))
    write_pack(corpus, tmp_path / "corpus.tar.xz")
    assert_same_corpus(read_pack(tmp_path / "corpus.tar.xz"), corpus)
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.tar.xz"]  # no temporary file left behind


def test_a_signal_that_no_int16_step_holds_is_refused(tmp_path):
    corpus = synthetic_corpus(np.random.default_rng(0))
    corpus.train[0].signals[0][10] = 500.0  # mV: a jump no ECG makes
    with pytest.raises(ValueError, match="not ECG"):
        write_pack(corpus, tmp_path / "corpus.tar.xz")
    assert not (tmp_path / "corpus.tar.xz").exists()


def _wfdb_folder(root: Path) -> Path:
    """A tiny data folder in the real layout: one MIT-BIH record, one QT excerpt, three noise records."""
    rng = np.random.default_rng(3)
    for folder, name, fs, maker in (
        ("mitdb", "100", 360, clean_ecg),
        ("qtdb", "sel100", 250, clean_ecg),
        ("nstdb", "bw", 360, noise),
        ("nstdb", "em", 360, noise),
        ("nstdb", "ma", 360, noise),
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
        signal = np.stack([maker(rng, 20 * fs, fs), maker(rng, 20 * fs, fs)], axis=1)
        wfdb.wrsamp(
            name,
            fs=fs,
            units=["mV", "mV"],
            sig_name=["a", "b"],
            p_signal=signal,
            fmt=["16", "16"],
            write_dir=str(root / folder),
        )
    return root


def test_the_command_packs_a_wfdb_folder_that_every_data_option_then_reads(tmp_path, capsys):
    data = _wfdb_folder(tmp_path / "data")
    assert main(["--data", str(data), "--out", str(tmp_path / "out" / "corpus.tar.xz")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert_same_corpus(corpus_or_exit(tmp_path / "out" / "corpus.tar.xz"), load_corpus(data))


def test_a_pack_loads_where_wfdb_is_not_installed(tmp_path):
    write_pack(synthetic_corpus(np.random.default_rng(0)), tmp_path / "corpus.tar.xz")
    code = "import sys; sys.modules['wfdb'] = None; from export.data import load_corpus; print(len(load_corpus(sys.argv[1]).train))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "corpus.tar.xz")], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3"


@pytest.mark.parametrize(
    "content, message", [("not a corpus", "neither a data folder nor a corpus"), (None, "no ECG data under")]
)
def test_a_path_that_is_neither_folder_nor_pack_ends_the_command_in_one_line(tmp_path, content, message):
    path = tmp_path / "corpus.tar.xz"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit, match=f"^error: .*{message}"):
        corpus_or_exit(path)
