"""What each layer needs to import: the contract neither torch nor onnxruntime, the store no
model runtime, the supervisor of several workers no model runtime, the data side of the export stage no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "module, absent",
    [
        ("service.contract", ("torch", "onnxruntime")),
        ("service.store", ("torch", "onnxruntime")),
        ("service.config", ("torch", "onnxruntime")),
        ("service.app", ("torch",)),
        ("service.workers", ("torch", "onnxruntime")),  # the supervisor leaves the model to its workers
        ("export.data", ("torch",)),
        ("export.synth", ("torch",)),
        ("export.families", ("torch",)),
    ],
)
def test_module_imports_without(module, absent):
    code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
