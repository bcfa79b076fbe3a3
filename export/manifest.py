"""`artifacts/manifest.json`: checksums, versions and measured figures of the shipped model files.

Several offline commands (export, training, evaluation, quantization) each add their part, so
updates merge into the existing file and are written atomically.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from service.manifest import sha256  # the same checksum the service verifies at start

__all__ = ["sha256", "read", "atomic_write_bytes", "update"]


def read(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the service may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update(path: str | Path, changes: dict[str, Any]) -> dict[str, Any]:
    """Merge ``changes`` into the manifest (one level deep for dict values) and save it."""
    manifest = read(path)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key] = {**manifest[key], **value}
        else:
            manifest[key] = value
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest
