"""`python -m export --weights W.pth --out M.onnx`: export, prove parity, record in the manifest.

Expected failures (missing or mismatched checkpoint, failed parity) end with exit code 1 and one
sentence on stderr; the output file and manifest are only replaced once parity has passed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx
import onnxruntime
import torch

from export import manifest
from export.checkpoint import CheckpointError, load_model
from export.onnx_export import (
    OPSET,
    PARITY_TOLERANCE,
    PARITY_WINDOWS,
    ParityError,
    check_parity,
    parity_windows,
    to_onnx_bytes,
)
from service.contract import INPUT_NAME, OUTPUT_NAME, SAMPLING_RATE_HZ, WINDOW
from service.files import atomic_path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, type=Path, help="PyTorch checkpoint (.pth)")
    parser.add_argument("--out", required=True, type=Path, help="ONNX file to write")
    parser.add_argument("--manifest", type=Path, help="manifest to update (default: manifest.json beside --out)")
    parser.add_argument(
        "--model-version", type=int, help="version reported by the service (default: the manifest's, else 1)"
    )
    parser.add_argument("--conv1d", action="store_true", help="keep 1-D convolutions (slower; for comparison)")
    parser.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE, help="largest allowed abs difference")
    parser.add_argument(
        "--parity-windows", type=int, default=PARITY_WINDOWS, help="windows compared in the parity check"
    )
    parser.add_argument("--verify-only", action="store_true", help="check parity of an existing --out, write nothing")
    return parser.parse_args(argv)


def recorded_version(manifest_path: Path, requested: int | None) -> int:
    """The version to record: the one asked for, else the manifest's, else 1. Re-exporting
    without a version must not turn the shipped version back into 1."""
    if requested is not None:
        return requested
    return manifest.read(manifest_path).get("model_version", 1)


def run(args: argparse.Namespace) -> str:
    model = load_model(args.weights)
    if args.verify_only:
        if not args.out.is_file():
            raise CheckpointError(f"ONNX model not found: {args.out}")
        parity = check_parity(model, args.out, parity_windows(args.parity_windows), tolerance=args.tolerance)
        return f"parity ok: max abs diff {parity.max_abs_diff:.3g}, mean {parity.mean_abs_diff:.3g}"

    with atomic_path(args.out) as tmp:
        tmp.write_bytes(to_onnx_bytes(model, conv2d=not args.conv1d))
        parity = check_parity(model, tmp, parity_windows(args.parity_windows), tolerance=args.tolerance)

    manifest_path = args.manifest or args.out.parent / "manifest.json"
    version = recorded_version(manifest_path, args.model_version)
    manifest.update(
        manifest_path,
        {
            "model_version": version,
            "input": {"name": INPUT_NAME, "shape": ["N", 1, WINDOW], "sampling_rate_hz": SAMPLING_RATE_HZ},
            "output": {"name": OUTPUT_NAME, "shape": ["N", 1, WINDOW]},
            "normalization": "input z-scored per window (σ=0 → 1); output·σ + μ is the clean estimate",
            "checkpoint": {"file": args.weights.name, "sha256": manifest.sha256(args.weights)},
            "models": {
                args.out.name: {
                    "sha256": manifest.sha256(args.out),
                    "bytes": args.out.stat().st_size,
                    "opset": OPSET,
                    "precision": "fp32",
                    "layout": "conv1d" if args.conv1d else "conv2d (N×C×1×L inside, N×1×1300 at the interface)",
                    "parity": parity.as_dict(),
                }
            },
            "versions": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
        },
    )
    return (
        f"wrote {args.out} (parity over {parity.windows} windows at batch sizes {list(parity.batch_sizes)}: "
        f"max abs diff {parity.max_abs_diff:.3g}, mean {parity.mean_abs_diff:.3g}); updated {manifest_path}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(run(args))
    except (CheckpointError, ParityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
