"""`artifacts/manifest.json`: checksums, versions and measured figures of the shipped model files.

Several offline commands (export, training, evaluation, quantization) each add their part, so
updates merge into the existing file and are written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.files import atomic_write
from service.manifest import sha256  # the same checksum the service verifies at start

__all__ = ["sha256", "read", "update"]


def read(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def update(path: str | Path, changes: dict[str, Any]) -> dict[str, Any]:
    """Merge ``changes`` into the manifest (one level deep for dict values) and save it."""
    manifest = read(path)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key] = {**manifest[key], **value}
        else:
            manifest[key] = value
    atomic_write(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest
