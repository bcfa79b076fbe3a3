"""Fixtures for the offline stage: small random checkpoints and their exports, made in tmp folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from export.__main__ import main as export_main
from export.model import AttentionUNet

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with non-trivial BatchNorm statistics, so parity exercises every layer."""
    torch.manual_seed(seed)
    model = AttentionUNet()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.state_dict()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    torch.save(random_state_dict(), path)
    return path


@pytest.fixture(scope="session")
def exported(checkpoint, tmp_path_factory) -> Path:
    """One export of the random checkpoint, shared by the tests that only read it (parity on 16
    windows: the default 256 cost seconds and proved nothing more about the exporter)."""
    out = tmp_path_factory.mktemp("onnx") / "attention_unet.onnx"
    assert export_main(["--weights", str(checkpoint), "--out", str(out), "--parity-windows", "16"]) == 0
    return out


@pytest.fixture
def real_data() -> Path:
    if not (DATA / "mitdb").is_dir():
        pytest.skip(f"real ECG data not found at {DATA}")
    return DATA
