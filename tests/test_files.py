"""The file helpers: atomic writes (readers see the old file or the whole new one, and a write
that fails its check, such as an export that fails parity or a model that fails the quality gate,
leaves the old file and no temporary one), and scratch folders that a killed process leaves
only until the next start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
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


def test_without_a_mode_a_replaced_file_keeps_its_own_and_a_new_one_follows_the_umask(tmp_path):
    """A recording written over a private file must stay private (it was made 0644)."""
    private = tmp_path / "private.csv"
    private.write_text("1\n")
    private.chmod(0o600)
    atomic_write(private, b"2\n")
    assert private.stat().st_mode & 0o777 == 0o600
    mask = os.umask(0o077)
    try:
        atomic_write(tmp_path / "new.csv", b"3\n")
    finally:
        os.umask(mask)
    assert (tmp_path / "new.csv").stat().st_mode & 0o777 == 0o600


def test_a_scratch_folder_is_removed_by_the_next_start_once_its_processes_are_gone(tmp_path, monkeypatch):
    """kill -9 leaves the folder. While a child that got its descriptor runs (an orphaned worker
    still writing there) the next call leaves it, and removes it once the child is gone too; a
    live process's folder is always left."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    holder = (
        "import subprocess, sys, tempfile, time; tempfile.tempdir = sys.argv[1]; "
        "from service.files import scratch_folder; held = scratch_folder('t-'); folder, fd = held.__enter__(); "
        "child = subprocess.Popen(['sleep', '60'], pass_fds=(fd,)); "
        "print(folder, child.pid, flush=True); time.sleep(60)"
    )
    killed = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    folder, child = killed.stdout.readline().split()
    abandoned = Path(folder)
    killed.kill()
    killed.wait(10)
    killed.stdout.close()
    with scratch_folder("t-"):
        assert abandoned.exists()  # the orphaned child holds it
    os.kill(int(child), signal.SIGKILL)
    wait_until(lambda: not alive(int(child)), 10, "the child to end")
    with scratch_folder("t-") as (live, _):
        assert not abandoned.exists() and live.is_dir()
        with scratch_folder("t-") as (mine, _):
            assert live.is_dir() and mine.is_dir() and mine != live
        assert not mine.exists()
    assert list(tmp_path.iterdir()) == []


def alive(pid: int) -> bool:
    """Running, neither gone nor a zombie (an orphan's new parent may not reap it at once)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
