"""The file helpers: atomic writes (readers see the old file or the whole new one, and a write
that fails its check, such as an export that fails parity or a model that fails the quality gate,
leaves the old file and no temporary one), and scratch folders that a killed process leaves
only until the next start."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from service.files import atomic_path, atomic_write, scratch_folder

REPO = Path(__file__).resolve().parents[1]


def test_a_failed_check_leaves_the_old_file_and_nothing_else(tmp_path):
    target = tmp_path / "out" / "model.onnx"
    atomic_write(target, b"old")
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a new model")
        raise ValueError("parity check failed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["model.onnx"]


def test_a_passed_write_replaces_the_file_with_the_mode_asked_for(tmp_path):
    target = tmp_path / "folder made" / "mail.eml"
    atomic_write(target, b"new", mode=0o600)
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["mail.eml"]


def test_a_scratch_folder_is_removed_by_the_next_start_once_its_process_is_killed(tmp_path, monkeypatch):
    """kill -9 leaves the folder; the next call removes it, and leaves a live process's folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    holder = (
        "import sys, tempfile, time; tempfile.tempdir = sys.argv[1]; from service.files import scratch_folder; "
        "print(scratch_folder('t-').__enter__(), flush=True); time.sleep(60)"
    )
    killed = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    abandoned = Path(killed.stdout.readline().strip())
    killed.kill()
    killed.wait(10)
    killed.stdout.close()
    with scratch_folder("t-") as live:
        assert not abandoned.exists() and live.is_dir()
        with scratch_folder("t-") as mine:
            assert live.is_dir() and mine.is_dir() and mine != live
        assert not mine.exists()
    assert list(tmp_path.iterdir()) == []
