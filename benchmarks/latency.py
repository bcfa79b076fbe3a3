"""Lone-request latency, paired: the service at 1 connection against the engine on one window.

The target "p50 at 1 connection ≤ the engine's single-window latency + 1.5 ms" compares two
numbers that this shared machine moves by ±0.5 ms from one minute to the next. So each round
measures both back to back — the in-process engine on one window at each lone setting, then the
running service under wrk at 1 connection — and the overhead is taken per round; the table
gives every round and the median. Run `python -m benchmarks.latency` on an otherwise idle
machine (wrk: `apt-get install wrk`).

The engine's figure is for calls back to back. At 1 connection the service's cores idle between
requests, while the response travels to wrk and the next request back, and on some machines a
call that follows even a millisecond of idleness is slower (cold caches, a halted virtual CPU).
So each round also times the lone settings with ``--idle-ms`` of sleep before every call, and
gives the service's overhead over that too: what the HTTP path itself adds.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from benchmarks.common import machine, markdown_table, require_wrk, save
from benchmarks.engine import ort_case
from benchmarks.http import ROOT, serving, wrk
from export.synth import noisy_windows
from service.contract import normalize
from service.cpus import usable_cpus


def rounds(model: Path, count: int, seconds: int, idle_ms: float) -> list[dict]:
    cpus = usable_cpus()
    # (threads, spinning): the batch workers' setting, all CPUs, and all CPUs spinning: the
    # service's lone run (ORT_LONE_THREADS and ORT_LONE_SPINNING unset).
    settings = sorted({(1, False), (cpus, False), (cpus, True)})
    lone = f"{cpus}t_spin"
    window = normalize(noisy_windows(np.random.default_rng(0), 1))[0]
    rows = []
    with serving(model, {}) as (server, script):
        for i in range(count):
            row: dict = {"round": i + 1}
            for threads, spinning in settings:
                times = ort_case(model, window, threads, spinning, seconds)
                row[f"engine_{threads}t{'_spin' if spinning else ''}_p50_ms"] = float(np.percentile(times, 50) * 1e3)
            times = ort_case(model, window, cpus, True, seconds, idle_s=idle_ms / 1e3)
            row[f"after_idle_{lone}_p50_ms"] = float(np.percentile(times, 50) * 1e3)
            row["service_p50_ms"] = wrk(server, script, 1, seconds)["p50_ms"]
            engine = {k: v for k, v in row.items() if k.startswith("engine_")}
            row["overhead_vs_fastest_ms"] = row["service_p50_ms"] - min(engine.values())
            row["overhead_vs_lone_setting_ms"] = row["service_p50_ms"] - row[f"engine_{lone}_p50_ms"]
            row["overhead_vs_lone_setting_after_idle_ms"] = row["service_p50_ms"] - row[f"after_idle_{lone}_p50_ms"]
            print(
                f"{model.name} round {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "round"),
                flush=True,
            )
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        type=Path,
        nargs="+",
        default=[ROOT / "artifacts" / "attention_unet.onnx", ROOT / "artifacts" / "attention_unet.int8.onnx"],
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4, help="per measurement")
    parser.add_argument(
        "--idle-ms",
        type=float,
        default=1.0,
        help="sleep before each engine call in the after-idle measurement (about the service's turnaround at 1 connection)",
    )
    parser.add_argument("--name", default="latency", help="results file name")
    args = parser.parse_args(argv)
    require_wrk()
    runs = []
    for model in args.models:
        rows = rounds(model, args.rounds, args.seconds, args.idle_ms)
        median = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "round"}
        runs.append({"model": model.name, "rounds": rows, "median": median})
    path = save(
        args.name,
        {
            "machine": machine(),
            "load_generator": "wrk 4.1, 1 thread, 1 connection",
            "idle_ms": args.idle_ms,
            "runs": runs,
        },
    )
    for run in runs:
        print(f"\n{run['model']} (median of {len(run['rounds'])} rounds)")
        columns = [(k, k.replace("_ms", " (ms)").replace("_", " ")) for k in run["rounds"][0]]
        print(markdown_table(run["rounds"] + [{"round": "median", **run["median"]}], columns))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
