"""What each layer needs to import: the contract, the configuration, the store and the
supervisor neither torch nor onnxruntime; the store and the engine no web framework; the app no
torch; the data side of the export stage no
torch; the record command neither the web stack nor the database. A fresh interpreter imports
each list in its order and checks after each module, so a module that pulled in a runtime is
named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ("service.contract", ("torch", "onnxruntime")),
    ("service.config", ("torch", "onnxruntime")),
    ("service.store", ("torch", "onnxruntime", "falcon")),  # the store talks SQL, not HTTP
    ("service.workers", ("torch", "onnxruntime", "falcon")),  # the supervisor leaves the model to its workers
    ("service.startup", ("torch", "onnxruntime")),  # so do the checks it runs before its workers start
    ("service.engine", ("torch", "falcon")),  # the engine talks tensors, not HTTP
    ("service.app", ("torch",)),
    ("export.data", ("torch",)),
    ("export.synth", ("torch",)),
    ("export.families", ("torch",)),
]
RECORD_COMMAND = [("service.record", ("torch", "falcon", "waitress", "peewee", "psycopg2", "prometheus_client"))]
CODE = """
import importlib, sys
for module, absent in CHECKS:
    importlib.import_module(module)
    print(module, sorted(m for m in absent if m in sys.modules))
"""


@pytest.mark.parametrize("checks", [LAYERS, RECORD_COMMAND], ids=["layers", "record command"])
def test_modules_import_without_the_runtimes_they_do_not_need(checks):
    done = subprocess.run(
        [sys.executable, "-c", f"CHECKS = {checks!r}\n{CODE}"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{module} []" for module, _ in checks]
