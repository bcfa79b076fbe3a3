"""Fixtures for the offline stage: small random checkpoints and their exports, made in tmp folders."""

from __future__ import annotations

import fcntl
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from export.__main__ import main as export_main
from export.data import Corpus, load_corpus
from export.model import AttentionUNet
from service.engine import Engine

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def one_thread_engine(path: Path) -> Engine:
    """The service's engine on one thread: the suite runs more processes than there are cores
    (torch's threads are one per process already: tests/conftest.py), and an engine's default
    threads spin while they wait for each other."""
    return Engine(path, threads=1, lone_threads=1).start()


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with non-trivial BatchNorm statistics, so parity exercises every layer."""
    torch.manual_seed(seed)
    model = AttentionUNet()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.state_dict()


@contextmanager
def first_here(tmp_path_factory: pytest.TempPathFactory, worker_id: str, name: str) -> Iterator[tuple[Path, bool]]:
    """A folder shared by the test processes of this run (pytest-xdist), and whether this process
    is the first here and must fill it; the others wait on a lock until it is filled. The export
    costs seconds, and the tests only read what it writes."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if worker_id != "master" else base  # the processes' folders share a parent
    folder = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        first = not folder.exists()
        folder.mkdir(exist_ok=True)
        yield folder, first


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, worker_id) -> Path:
    with first_here(tmp_path_factory, worker_id, "checkpoint") as (folder, first):
        if first:
            torch.save(random_state_dict(), folder / "model.pth")
    return folder / "model.pth"


@pytest.fixture(scope="session")
def exported(checkpoint, tmp_path_factory, worker_id) -> Path:
    """One export of the random checkpoint, shared by the tests that only read it (parity on 16
    windows: the default 256 cost seconds and proved nothing more about the exporter)."""
    with first_here(tmp_path_factory, worker_id, "onnx") as (folder, first):
        if first:
            out = folder / "attention_unet.onnx"
            assert export_main(["--weights", str(checkpoint), "--out", str(out), "--parity-windows", "16"]) == 0
    return folder / "attention_unet.onnx"


@pytest.fixture
def real_data() -> Path:
    if not (DATA / "mitdb").is_dir():
        pytest.skip(f"real ECG data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def real_corpus(tmp_path_factory, worker_id) -> Corpus:
    """``load_corpus`` of the real data, once per run for every test process: it reads and
    resamples every record, seconds each time. The first process to ask loads it (the loading is
    what the split test checks) and leaves a pickle for the others."""
    if not (DATA / "mitdb").is_dir():
        pytest.skip(f"real ECG data not found at {DATA}")
    with first_here(tmp_path_factory, worker_id, "corpus") as (folder, first):
        if first:
            corpus = load_corpus(DATA)
            (folder / "corpus.pickle").write_bytes(pickle.dumps(corpus))
            return corpus
    return pickle.loads((folder / "corpus.pickle").read_bytes())
