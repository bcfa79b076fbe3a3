"""Start-up check of the model file against ``manifest.json`` written by the export stage.

A missing, truncated or swapped model must stop the start with one sentence, not serve garbage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


class ModelError(Exception):
    """The model cannot be served; the message is one sentence."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_model(model_path: Path, manifest_path: Path) -> int | None:
    """Check the model's sha256 against its manifest entry; returns the manifest's model_version."""
    if not model_path.is_file():
        raise ModelError(f"Model file {model_path} does not exist (set MODEL_PATH).")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"Manifest {manifest_path} does not exist (set MANIFEST_PATH).") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"Manifest {manifest_path} cannot be read as JSON ({exc}).") from None
    models = manifest.get("models") if isinstance(manifest, dict) else None
    entry = models.get(model_path.name) if isinstance(models, dict) else None
    expected = entry.get("sha256") if isinstance(entry, dict) else None
    if not isinstance(expected, str):
        raise ModelError(f"Manifest {manifest_path} has no sha256 for {model_path.name}.")
    actual = sha256(model_path)
    if actual != expected.lower():
        raise ModelError(
            f"Model file {model_path} does not match its manifest (sha256 {actual[:12]}… instead of "
            f"{expected[:12]}…), so it is corrupt or not the exported model."
        )
    version = manifest.get("model_version")
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def model_labels(model_path: Path, manifest_path: Path) -> tuple[str, str]:
    """The model-info metric's precision (the first word of the manifest's: "fp32", "int8") and
    sha256, read from the manifest entry that ``verify_model`` has already checked the file
    against, so a start hashes the model once."""
    entry = json.loads(manifest_path.read_text()).get("models", {}).get(model_path.name, {})
    words = str(entry.get("precision", "unknown")).split()
    return (words[0] if words else "unknown"), str(entry.get("sha256", "unknown")).lower()
