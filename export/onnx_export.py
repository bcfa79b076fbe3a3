"""PyTorch → ONNX export and the numeric parity check that proves both compute the same function."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from export.conv2d import as_conv2d
from export.model import AttentionUNet
from export.synth import noisy_windows
from service.contract import INPUT_NAME, OUTPUT_NAME, WINDOW, normalize
from service.engine import Engine

OPSET = 18
PARITY_TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 7, 64)
PARITY_WINDOWS = 256


class ParityError(Exception):
    """ONNX Runtime and PyTorch disagree beyond the tolerance."""


@dataclass(frozen=True)
class Parity:
    windows: int
    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float

    def as_dict(self) -> dict:
        return asdict(self)


def to_onnx_bytes(model: AttentionUNet, conv2d: bool = True) -> bytes:
    """Serialized ONNX model: input ``ecg`` [N, 1, 1300] with a dynamic batch, output ``denoised``.

    With ``conv2d`` the graph runs its convolutions as 2-D over ``N×C×1×L`` (see export/conv2d.py).
    """
    model = model.eval()
    example = torch.zeros(2, 1, WINDOW)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            dynamic_shapes={"x": {0: batch}},
        )
        proto = onnx.load(str(path))
    if conv2d:
        proto = as_conv2d(proto)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def parity_windows(count: int = PARITY_WINDOWS, seed: int = 0) -> np.ndarray:
    """Normalized ``N×1×1300`` inputs: three quarters noisy synthetic ECG, one quarter Gaussian."""
    rng = np.random.default_rng(seed)
    ecg = noisy_windows(rng, count - count // 4)
    gauss = rng.standard_normal((count // 4, WINDOW))
    z, _, _ = normalize(np.concatenate([ecg, gauss]))
    return z


def check_parity(
    model: AttentionUNet,
    onnx_path: str | Path,
    windows: np.ndarray | None = None,
    batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES,
    tolerance: float = PARITY_TOLERANCE,
) -> Parity:
    """Compare PyTorch (eval) and onnxruntime (CPU) on the same windows at each batch size."""
    windows = parity_windows() if windows is None else windows
    with torch.inference_mode():
        expected = model.eval()(torch.from_numpy(windows)).numpy()
    engine = Engine(onnx_path).start()
    diffs = []
    for size in batch_sizes:
        got = np.concatenate([engine.run(windows[i : i + size]) for i in range(0, len(windows), size)])
        diffs.append(np.abs(got.astype(np.float64) - expected))
    diff = np.concatenate(diffs)
    result = Parity(len(windows), tuple(batch_sizes), float(diff.max()), float(diff.mean()), tolerance)
    if not result.max_abs_diff <= tolerance:  # also catches NaN
        raise ParityError(
            f"parity check failed: max |onnxruntime − PyTorch| = {result.max_abs_diff:.3g} "
            f"exceeds {tolerance:g} ({onnx_path})"
        )
    return result
