"""`python -m export.quantize`: static int8 post-training quantization with a quality gate.

QDQ format, per-channel int8 weights, uint8 activations (the fast u8s8 path on x86), calibrated
on real ECG training windows after onnxruntime's recommended pre-processing (shape inference and
graph optimization). onnxruntime's CPU provider has no quantized ConvTranspose, so the decoder's
upsampling is first rewritten as the equivalent 1×1 Conv + reshape (export/conv2d.py), which
quantizes. The result ships only if its quality stays within the gate of the fp32 model on the
same validation windows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from export import manifest
from export.cli import corpus_or_exit, model_or_exit
from export.conv2d import upsampling_as_conv
from export.data import Corpus
from export.evaluate import evaluate
from service.contract import INPUT_NAME, normalize
from service.engine import Engine
from service.files import atomic_path

MAX_MEAN_LOSS_DB = 0.3
MAX_CASE_LOSS_DB = 0.5
_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


class Windows(CalibrationDataReader):
    """Feeds normalized ``N×1×1300`` batches to the calibrator."""

    def __init__(self, z: np.ndarray, batch: int = 32) -> None:
        self._batches = iter([z[i : i + batch] for i in range(0, len(z), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def calibration_windows(corpus: Corpus, count: int, seed: int = 11) -> np.ndarray:
    """Noisy training windows (never validation ones), normalized as the service does."""
    from export.windows import TrainingWindows

    noisy, _ = TrainingWindows(corpus).sample(np.random.default_rng(seed), count)
    return normalize(noisy)[0]


def full_resolution_nodes(model: Path) -> list[str]:
    """Nodes whose output keeps the full time resolution: the outermost U-Net level.

    Its activations carry the fine detail of the output (the first encoder block, the last
    attention gate and decoder block, the final 1×1 convolution); 8-bit activations there cost
    up to 0.9 dB on clean-ish windows, for about 3 % of the model's arithmetic.
    """
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(model)))
    last_dim = {
        v.name: v.type.tensor_type.shape.dim[-1].dim_value
        for v in inferred.graph.value_info
        if v.type.tensor_type.shape.dim
    }
    full = max(last_dim.values())
    return [n.name for n in inferred.graph.node if n.output and last_dim.get(n.output[0]) == full]


def quantize(
    fp32: Path, out: Path, windows: np.ndarray, method: str = "percentile", keep_full_resolution: bool = True
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rewritten, prepared = Path(tmp) / "rewritten.onnx", Path(tmp) / "prepared.onnx"
        onnx.save(upsampling_as_conv(onnx.load(str(fp32))), str(rewritten))
        quant_pre_process(str(rewritten), str(prepared))
        quantize_static(
            str(prepared),
            str(out),
            Windows(windows),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=[
                "Conv",
                "MaxPool",
                "Add",
                "Mul",
                "Concat",
                "Relu",
                "LeakyRelu",
                "Sigmoid",
                "Reshape",
                "Transpose",
            ],
            nodes_to_exclude=full_resolution_nodes(prepared) if keep_full_resolution else None,
            calibrate_method=_METHODS[method],
            extra_options={"CalibPercentile": 99.999} if method == "percentile" else None,
        )


def quality_gate(fp32: dict, int8: dict) -> tuple[bool, dict]:
    """int8 mean ΔSNR within 0.3 dB of fp32 and no case more than 0.5 dB worse."""
    losses = [
        f["model"]["snr_improvement_db"] - q["model"]["snr_improvement_db"]
        for f, q in zip(fp32["cases"], int8["cases"])
    ]
    mean_loss = fp32["summary"]["mean_snr_improvement_db"] - int8["summary"]["mean_snr_improvement_db"]
    figures = {
        "fp32_mean_snr_improvement_db": fp32["summary"]["mean_snr_improvement_db"],
        "int8_mean_snr_improvement_db": int8["summary"]["mean_snr_improvement_db"],
        "mean_loss_db": float(mean_loss),
        "worst_case_loss_db": float(max(losses)),
    }
    return mean_loss <= MAX_MEAN_LOSS_DB and max(losses) <= MAX_CASE_LOSS_DB, figures


class GateFailed(Exception):
    """The int8 model loses too much quality against the fp32 one."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.quantize", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("artifacts/attention_unet.onnx"))
    parser.add_argument("--out", type=Path, default=Path("artifacts/attention_unet.int8.onnx"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--manifest", type=Path, help="default: manifest.json beside --out")
    parser.add_argument("--calibration-windows", type=int, default=512)
    parser.add_argument("--method", choices=sorted(_METHODS), default="percentile")
    parser.add_argument("--per-case", type=int, default=100, help="validation windows per case for the gate")
    args = parser.parse_args(argv)
    corpus = corpus_or_exit(args.data)
    model_or_exit(args.model)
    try:
        with atomic_path(args.out) as tmp:  # replaced only once the gate has passed
            quantize(args.model, tmp, calibration_windows(corpus, args.calibration_windows), args.method)
            passed, figures = quality_gate(
                evaluate(Engine(args.model).start(), corpus, args.per_case),
                evaluate(Engine(tmp).start(), corpus, args.per_case),
            )
            print(", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
            if not passed:
                raise GateFailed()
    except GateFailed:
        print(
            f"error: int8 model fails the quality gate (mean loss ≤ {MAX_MEAN_LOSS_DB} dB, every case ≤ {MAX_CASE_LOSS_DB} dB)",
            file=sys.stderr,
        )
        return 1
    manifest.update(
        args.manifest or args.out.parent / "manifest.json",
        {
            "models": {
                args.out.name: {
                    "sha256": manifest.sha256(args.out),
                    "bytes": args.out.stat().st_size,
                    "precision": "int8 (QDQ, per-channel int8 weights, uint8 activations; full-resolution level in float)",
                    "from": args.model.name,
                    "calibration": f"{args.calibration_windows} noisy training windows, {args.method}",
                    "quality_gate": figures,
                }
            }
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
