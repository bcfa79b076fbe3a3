"""In-process engine benchmark: PyTorch eager vs onnxruntime fp32 (1-D and 2-D) vs int8.

`python -m benchmarks.engine` measures throughput (windows/s) and per-call latency (p50, p99)
over batch sizes, thread settings and concurrent runs on one session (streams), the model's
floating-point work per window and the achieved GFLOP/s next to this machine's measured
single-precision matrix-multiply peak.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from benchmarks.common import RESULTS, machine, markdown_table, save, save_chart, subplots, time_calls
from export.synth import noisy_windows
from service.contract import INPUT_NAME, OUTPUT_NAME, normalize
from service.cpus import usable_cpus
from service.engine import session_options

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
LEVEL_BATCH = 16  # batch of the graph-optimization-level comparison


def flops_per_window(path: Path) -> float:
    """2·MACs of every Conv and ConvTranspose for one window (other ops are negligible)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*model.graph.value_info, *model.graph.output)
    }
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0.0
    for node in model.graph.node:
        if node.op_type == "Conv":
            out = shapes[node.output[0]]
            w = weights[node.input[1]]  # [O, I, *k]
            total += 2 * np.prod(out[1:]) * np.prod(w[1:])
        elif node.op_type == "ConvTranspose":
            inp = shapes.get(node.input[0])
            w = weights[node.input[1]]  # [I, O, *k]
            total += 2 * np.prod(inp[1:]) * np.prod(w[1:])
    return float(total)


def matmul_peak(threads: int, seconds: float) -> dict:
    """Single-precision GEMM GFLOP/s of onnxruntime (MLAS, the kernels its convolutions use) and NumPy."""
    n = 1024
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [n, n])],
        [numpy_helper.from_array(a, "b")],
    )
    session = ort.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(),
        session_options(threads, spinning=True),
        providers=["CPUExecutionProvider"],
    )
    flops = 2 * n**3
    ort_best = flops / time_calls(lambda: session.run(None, {"a": a}), seconds).min() / 1e9
    numpy_best = flops / time_calls(lambda: a @ a, seconds).min() / 1e9
    return {
        "onnxruntime_gflops": ort_best,
        "numpy_gflops": numpy_best,
        "peak_gflops": max(ort_best, numpy_best),
        "n": n,
    }


def ort_case(
    path: Path,
    batch: np.ndarray,
    threads: int,
    spinning: bool,
    seconds: float,
    level: str = "all",
    streams: int = 1,
    idle_s: float = 0.0,
) -> np.ndarray:
    """Call times of one shared session, run by ``streams`` threads at once (as the batcher's workers do)."""
    session = ort.InferenceSession(
        str(path), session_options(threads, spinning, level), providers=["CPUExecutionProvider"]
    )
    return time_calls(lambda: session.run([OUTPUT_NAME], {INPUT_NAME: batch}), seconds, streams=streams, idle_s=idle_s)


def torch_case(weights: Path, batch: np.ndarray, threads: int, seconds: float) -> np.ndarray:
    import torch

    from export.checkpoint import load_model

    torch.set_num_threads(threads)
    model = load_model(weights)
    x = torch.from_numpy(batch)

    def call() -> None:
        with torch.no_grad():
            model(x)

    return time_calls(call, seconds)


def summarize(times: np.ndarray, batch: int, flops: float, streams: int = 1) -> dict:
    throughput = streams * batch * len(times) / times.sum()
    return {
        "windows_per_s": float(throughput),
        "p50_ms": float(np.percentile(times, 50) * 1e3),
        "p99_ms": float(np.percentile(times, 99) * 1e3),
        "ms_per_window": float(1e3 / throughput),
        "gflops": float(throughput * flops / 1e9),
    }


def conv1d_model(weights: Path, folder: Path) -> Path:
    from export.checkpoint import load_model
    from export.onnx_export import to_onnx_bytes

    path = folder / "attention_unet.conv1d.onnx"
    path.write_bytes(to_onnx_bytes(load_model(weights), conv2d=False))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measured setting")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--weights", type=Path, default=ARTIFACTS / "best_attention_unet.pth")
    parser.add_argument("--name", default="engine", help="results file name (the HTTP benchmark's --engine reads it)")
    args = parser.parse_args(argv)

    cpus = usable_cpus()
    thread_counts = sorted({1, cpus})
    # (intra-op threads, concurrent runs on the one session): one run on every core, one
    # single-threaded run, and as many runs as cores, single-threaded or sharing the full pool.
    settings = sorted({(t, s) for t in thread_counts for s in sorted({1, cpus})})
    windows = normalize(noisy_windows(np.random.default_rng(0), max(*args.batches, LEVEL_BATCH)))[0]
    peak = matmul_peak(cpus, args.seconds)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            "onnxruntime fp32 (Conv1d)": conv1d_model(args.weights, Path(tmp)),
            "onnxruntime fp32": ARTIFACTS / "attention_unet.onnx",
            "onnxruntime int8": ARTIFACTS / "attention_unet.int8.onnx",
        }
        flops = flops_per_window(models["onnxruntime fp32"])
        for threads in thread_counts:
            rows.append(
                {
                    "engine": "PyTorch eager",
                    "batch": 1,
                    "threads": threads,
                    "streams": 1,
                    "spinning": "-",
                    **summarize(torch_case(args.weights, windows[:1], threads, args.seconds), 1, flops),
                }
            )
        for name, path in models.items():
            for batch in args.batches:
                for threads, streams in settings:
                    for spinning in (False, True):
                        times = ort_case(path, windows[:batch], threads, spinning, args.seconds, streams=streams)
                        rows.append(
                            {
                                "engine": name,
                                "batch": batch,
                                "threads": threads,
                                "streams": streams,
                                "spinning": "on" if spinning else "off",
                                **summarize(times, batch, flops, streams),
                            }
                        )
                        print(
                            f"{name:28s} batch {batch:3d} threads {threads} streams {streams} spinning {spinning!s:5s} "
                            f"{rows[-1]['windows_per_s']:8.1f} windows/s",
                            flush=True,
                        )
        levels = []
        for level in ("disable", "basic", "extended", "all"):
            times = ort_case(models["onnxruntime fp32"], windows[:LEVEL_BATCH], cpus, False, args.seconds, level)
            levels.append({"level": level, **summarize(times, LEVEL_BATCH, flops)})

    best = {
        name: max((r for r in rows if r["engine"] == name), key=lambda r: r["windows_per_s"])
        for name in dict.fromkeys(r["engine"] for r in rows)
    }
    fp32, int8 = best["onnxruntime fp32"], best["onnxruntime int8"]
    verdict = {
        "flops_per_window": flops,
        "matmul_peak": peak,
        "fp32_fraction_of_peak": fp32["gflops"] / peak["peak_gflops"],
        "int8_speedup_over_fp32": int8["windows_per_s"] / fp32["windows_per_s"],
        "conv2d_speedup_over_conv1d": fp32["windows_per_s"] / best["onnxruntime fp32 (Conv1d)"]["windows_per_s"],
        "fp32_speedup_over_pytorch_eager_batch1": fp32["windows_per_s"] / best["PyTorch eager"]["windows_per_s"],
    }
    payload = {"machine": machine(), "rows": rows, "best": best, "optimization_levels": levels, "summary": verdict}
    path = save(args.name, payload)
    chart(payload, RESULTS / f"{args.name}.png")

    columns = [
        ("engine", "engine"),
        ("batch", "batch"),
        ("threads", "threads"),
        ("streams", "streams"),
        ("spinning", "spinning"),
        ("windows_per_s", "windows/s"),
        ("p50_ms", "p50 ms"),
        ("p99_ms", "p99 ms"),
        ("gflops", "GFLOP/s"),
    ]
    print(markdown_table(list(best.values()), columns))
    print()
    print(
        markdown_table(
            levels,
            [
                ("level", "graph optimization"),
                ("windows_per_s", f"windows/s (batch {LEVEL_BATCH})"),
                ("p50_ms", "p50 ms"),
            ],
        )
    )
    print(
        f"\nmodel: {flops / 1e9:.3f} GFLOP per window; matmul peak {peak['peak_gflops']:.1f} GFLOP/s "
        f"(onnxruntime {peak['onnxruntime_gflops']:.1f}, NumPy {peak['numpy_gflops']:.1f})"
    )
    print(", ".join(f"{k} {v:.2f}" for k, v in verdict.items() if k not in ("matmul_peak", "flops_per_window")))
    print(f"wrote {path} and {RESULTS / f'{args.name}.png'}")
    return 0


def chart(payload: dict, path: Path) -> None:
    rows = payload["rows"]
    fig, ax = subplots(figsize=(9, 4.5))
    engines = [e for e in dict.fromkeys(r["engine"] for r in rows) if e != "PyTorch eager"]
    batches = sorted({r["batch"] for r in rows if r["engine"] in engines})
    width = 0.8 / len(engines)
    for i, engine in enumerate(engines):
        values = [max(r["windows_per_s"] for r in rows if r["engine"] == engine and r["batch"] == b) for b in batches]
        ax.bar(np.arange(len(batches)) + i * width, values, width, label=engine)
    eager = payload["best"]["PyTorch eager"]["windows_per_s"]
    ax.axhline(eager, color="k", ls="--", lw=1, label=f"PyTorch eager, batch 1 ({eager:.0f}/s)")
    ax.set_xticks(np.arange(len(batches)) + width * (len(engines) - 1) / 2, [f"batch {b}" for b in batches])
    ax.set_ylabel("windows / s (best thread setting)")
    ax.legend(fontsize=8)
    save_chart(fig, path, payload, "Engine throughput")


if __name__ == "__main__":
    raise SystemExit(main())
