"""`python -m export --weights W.pth --out M.onnx`: export, prove parity, record in the manifest.

Expected failures (missing or mismatched checkpoint, failed parity) end with exit code 1 and one
sentence on stderr; the output file and manifest are only replaced once parity has passed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime
import torch

from export import manifest
from export.checkpoint import CheckpointError, load_model
from export.model import SAMPLING_RATE_HZ, WINDOW
from export.onnx_export import OPSET, PARITY_TOLERANCE, ParityError, check_parity, to_onnx_bytes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, type=Path, help="PyTorch checkpoint (.pth)")
    parser.add_argument("--out", required=True, type=Path, help="ONNX file to write")
    parser.add_argument("--manifest", type=Path, help="manifest to update (default: manifest.json beside --out)")
    parser.add_argument("--model-version", type=int,
                        help="version reported by the service (default: the manifest's, else 1)")
    parser.add_argument("--conv1d", action="store_true", help="keep 1-D convolutions (slower; for comparison)")
    parser.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE, help="largest allowed abs difference")
    parser.add_argument("--verify-only", action="store_true", help="check parity of an existing --out, write nothing")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    model = load_model(args.weights)
    if args.verify_only:
        if not args.out.is_file():
            raise CheckpointError(f"ONNX model not found: {args.out}")
        parity = check_parity(model, args.out, tolerance=args.tolerance)
        return f"parity ok: max abs diff {parity.max_abs_diff:.3g}, mean {parity.mean_abs_diff:.3g}"

    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=f".{args.out.name}.", suffix=".onnx")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(to_onnx_bytes(model, conv2d=not args.conv1d))
        parity = check_parity(model, tmp, tolerance=args.tolerance)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the service may run as another user
        os.replace(tmp, args.out)
    finally:
        Path(tmp).unlink(missing_ok=True)

    manifest_path = args.manifest or args.out.parent / "manifest.json"
    # Re-exporting without a version must not turn the shipped version back into 1.
    version = args.model_version
    if version is None:
        version = manifest.read(manifest_path).get("model_version", 1)
    manifest.update(
        manifest_path,
        {
            "model_version": version,
            "input": {"name": "ecg", "shape": ["N", 1, WINDOW], "sampling_rate_hz": SAMPLING_RATE_HZ},
            "output": {"name": "denoised", "shape": ["N", 1, WINDOW]},
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
