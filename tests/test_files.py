"""The one atomic-write helper: readers see the old file or the whole new one, and a write that
fails its check (an export that fails parity, a model that fails the quality gate) leaves the
old file and no temporary one."""

from __future__ import annotations

import pytest

from service.files import atomic_path, atomic_write


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
