"""The Dockerfile's steps without Docker: a fresh virtual environment with requirements.txt only,
the files the image copies, ``python -m service`` configured by environment, /readyz, and the
image's HEALTHCHECK command."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from .conftest import REPO, http

DOCKERFILE = (REPO / "Dockerfile").read_text()


def dockerfile_exec_form(instruction: str) -> list[str]:
    """The JSON argument list of ``CMD``/``HEALTHCHECK … CMD`` in the Dockerfile."""
    joined = DOCKERFILE.replace("\\\n", " ")
    line = next(line for line in joined.splitlines() if line.startswith(instruction))
    return json.loads(re.search(r"CMD\s+(\[.*\])", line).group(1))


@pytest.mark.slow
def test_fresh_venv_with_runtime_requirements_serves(tmp_path, service_process):
    app = tmp_path / "app"
    shutil.copytree(REPO / "service", app / "service", ignore=shutil.ignore_patterns("__pycache__"))
    (app / "artifacts").mkdir()
    for source in [*REPO.glob("artifacts/*.onnx"), REPO / "artifacts" / "manifest.json"]:
        shutil.copy(source, app / "artifacts")
    shutil.copy(REPO / "requirements.txt", app)

    venv = tmp_path / "venv"
    # No pip of its own (ensurepip costs seconds): this interpreter's pip installs into it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-compile"]
    install = subprocess.run(
        [*pip, "--disable-pip-version-check", "-r", "requirements.txt"],
        cwd=app,
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True)
    assert no_torch.returncode != 0  # the runtime image stays free of the training stack

    command = dockerfile_exec_form("CMD")
    assert command == ["python", "-m", "service"]
    data = app / "data"
    data.mkdir()
    server = service_process(
        # No MODEL_PATH, as in the image: the copied artifacts, found where the service looks.
        {"DATABASE_URL": f"sqlite:///{data / 'heartify.db'}", "OUTBOX_DIR": str(data / "outbox"), "MODEL_PATH": None},
        python=python,
        cwd=app,
    )
    assert http("GET", f"{server.url}/readyz")[0] == 200

    healthcheck = dockerfile_exec_form("HEALTHCHECK")
    assert healthcheck[0] == "python"
    probe = subprocess.run([python, *healthcheck[1:]], env={"PORT": str(server.port)}, capture_output=True)
    assert probe.returncode == 0, probe.stderr
