"""One run that compares every way of serving the model: `python -m benchmarks.scale` (`make bench-scale`).

For fp32 and int8, in one run on the same model files: the in-process engine (its best windows/s
over batch sizes and thread settings, spinning included, and its lone-window p50), then under wrk
at 1, 16 and 64 connections, one window per request: the service with ``WEB_WORKERS=1`` and with
its default, the FastAPI peer (benchmarks/peers) and, once, the old service's way (Flask, PyTorch
eager). For the default service also the PSS of all its processes under load, its idle CPU, and
the throughput /metrics costs (METRICS on and off, alternated at 16 connections, and the CPU its
parts add per request over the service's CPU per request: benchmarks.metrics_cost). About 6 minutes;
wrk must be installed (`apt-get install wrk`) and the peers' packages
(`pip install -r benchmarks/peers/requirements.txt`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from benchmarks.common import machine, markdown_table, require_wrk, save, save_chart, subplots
from benchmarks.engine import ort_case
from benchmarks.http import ROOT, serving, wrk
from export.synth import noisy_windows
from service.contract import normalize
from service.cpus import usable_cpus

ARTIFACTS = ROOT / "artifacts"
MODELS = {"fp32": ARTIFACTS / "attention_unet.onnx", "int8": ARTIFACTS / "attention_unet.int8.onnx"}
FASTAPI = [
    sys.executable,
    "-m",
    "uvicorn",
    "benchmarks.peers.fastapi_app:app",
    "--port",
    "{port}",
    "--log-level",
    "error",
]
OLD = [sys.executable, "-m", "benchmarks.peers.old_service", "{port}"]
ENGINE_BATCHES = (1, 4, 8, 16)
IDLE_S = 10


def engine(model: Path, seconds: float) -> dict:
    """Best windows/s (batch sizes × 1 thread × cores streams or cores threads × 1 stream × spinning)
    and the fastest lone window (batch 1, one call at a time, 1 or all threads, spinning or not)."""
    cpus = usable_cpus()
    windows = normalize(noisy_windows(np.random.default_rng(0), max(ENGINE_BATCHES)))[0]
    best = {"windows_per_s": 0.0}
    for batch in ENGINE_BATCHES:
        for threads, streams in sorted({(1, cpus), (cpus, 1)}):
            for spinning in (False, True):
                times = ort_case(model, windows[:batch], threads, spinning, seconds, streams=streams)
                rate = streams * batch * len(times) / times.sum()
                if rate > best["windows_per_s"]:
                    best = {
                        "windows_per_s": rate,
                        "batch": batch,
                        "threads": threads,
                        "streams": streams,
                        "spinning": spinning,
                    }
    lone = {"p50_ms": float("inf")}
    for threads in sorted({1, cpus}):
        for spinning in (False, True):
            p50 = float(np.percentile(ort_case(model, windows[:1], threads, spinning, seconds), 50) * 1e3)
            if p50 < lone["p50_ms"]:
                lone = {"p50_ms": p50, "threads": threads, "spinning": spinning}
    print(f"engine {model.name}: best {best}, lone {lone}", flush=True)
    return {"best": best, "lone": lone}


def served(label: str, model: Path, env: dict[str, str], command: list[str] | None, args, footprint: bool) -> dict:
    """wrk at each connection count; ``footprint``: also PSS under load and idle CPU."""
    with serving(model, env, command=command) as (server, script):
        rows = []
        for c in args.connections:
            rows.append(wrk(server, script, c, args.seconds))
            r = rows[-1]
            print(
                f"{label} {model.name}: {c:3d} connections {r['requests_per_s']:8.1f} req/s p50 {r['p50_ms']:.2f} ms "
                f"p99 {r['p99_ms']:.2f} ms errors {r['errors']} PSS {r['pss_peak_mb']:.0f} MB",
                flush=True,
            )
        result = {"label": label, "model": model.name, "env": env, "rows": rows, "processes": len(server.pids())}
        if footprint:
            time.sleep(3)  # what wrk left in flight finishes
            before = server.cpu_seconds()
            time.sleep(IDLE_S)
            result["idle_cpu_percent"] = (server.cpu_seconds() - before) / IDLE_S * 100
            result["pss_under_load_mb"] = max(r["pss_peak_mb"] for r in rows)
    return result


def metrics_cost(model: Path, seconds: int, rounds: int) -> dict:
    """Requests/s at 16 connections with METRICS on and off, two services up at once, alternated."""
    with ExitStack() as stack:
        on = stack.enter_context(serving(model, {}))
        off = stack.enter_context(serving(model, {"METRICS": "off"}))
        rates: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(rounds):
            for name, (server, script) in (("on", on), ("off", off)):
                rates[name].append(wrk(server, script, 16, seconds)["requests_per_s"])
    on_rate, off_rate = statistics.median(rates["on"]), statistics.median(rates["off"])
    print(f"metrics {model.name}: on {rates['on']} off {rates['off']}", flush=True)
    return {"on": rates["on"], "off": rates["off"], "cost_percent": (off_rate - on_rate) / off_rate * 100}


def metrics_cpu() -> dict:
    """benchmarks.metrics_cost in a fresh interpreter (multiprocess mode must be set before import)."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.metrics_cost"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def load_average() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def ratios(run: dict) -> dict:
    """Ours (default) against the engine, the old service and the peer, per connection count."""
    by = {s["label"]: {r["connections"]: r for r in s["rows"]} for s in run["services"]}
    ours, peer, single = by["ours"], by["fastapi peer"], by["ours, WEB_WORKERS=1"]
    out = {
        "vs_engine_best_at_16": ours[16]["windows_per_s"] / run["engine"]["best"]["windows_per_s"],
        "p50_over_engine_lone_at_1_ms": ours[1]["p50_ms"] - run["engine"]["lone"]["p50_ms"],
        "workers_1_vs_engine_best_at_16": single[16]["windows_per_s"] / run["engine"]["best"]["windows_per_s"],
    }
    for c in ours:
        out[f"vs_peer_requests_at_{c}"] = ours[c]["requests_per_s"] / peer[c]["requests_per_s"]
        out[f"vs_peer_p50_at_{c}"] = ours[c]["p50_ms"] / peer[c]["p50_ms"]
        out[f"vs_peer_p99_at_{c}"] = ours[c]["p99_ms"] / peer[c]["p99_ms"]
        if "old service" in by:
            out[f"vs_old_requests_at_{c}"] = ours[c]["requests_per_s"] / by["old service"][c]["requests_per_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="per wrk point")
    parser.add_argument("--engine-seconds", type=float, default=1.0, help="per engine setting")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--metrics-rounds", type=int, default=2)
    parser.add_argument("--name", default="scale", help="results file name")
    args = parser.parse_args(argv)
    require_wrk()
    started, load_before = time.monotonic(), load_average()
    old = served("old service", MODELS["fp32"], {}, OLD, args, footprint=False)
    cpu = metrics_cpu()
    runs = []
    for precision, model in MODELS.items():
        run = {"precision": precision, "engine": engine(model, args.engine_seconds)}
        run["services"] = [
            served("ours", model, {}, None, args, footprint=True),
            served("ours, WEB_WORKERS=1", model, {"WEB_WORKERS": "1"}, None, args, footprint=True),
            served("fastapi peer", model, {}, FASTAPI, args, footprint=True),
            old,
        ]
        run["metrics"] = metrics_cost(model, args.seconds, args.metrics_rounds)
        ours = run["services"][0]["rows"]
        run["metrics"]["server_cpu_ms_per_request_at_16"] = next(r for r in ours if r["connections"] == 16)[
            "server_cpu_ms_per_request"
        ]
        per_request_us = cpu["middleware_us"] + cpu["observer_us"]
        run["metrics"]["cpu_share_percent"] = (
            per_request_us / 1e3 / run["metrics"]["server_cpu_ms_per_request_at_16"] * 100
        )
        run["ratios"] = ratios(run)
        runs.append(run)
    payload = {
        "machine": machine(),
        "load_generator": "wrk 4.1, 1 thread, same machine",
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "minutes": (time.monotonic() - started) / 60,
        "metrics_cpu_us_per_request": cpu,
        "runs": runs,
    }
    path = save(args.name, payload)
    chart(payload, path.with_suffix(".png"))
    for run in runs:
        rows = [{"service": s["label"], **r} for s in run["services"] for r in s["rows"]]
        print(f"\n{run['precision']}: engine {run['engine']}")
        print(
            markdown_table(
                rows,
                [
                    ("service", "service"),
                    ("connections", "connections"),
                    ("requests_per_s", "req/s"),
                    ("p50_ms", "p50 ms"),
                    ("p99_ms", "p99 ms"),
                    ("errors", "errors"),
                    ("pss_peak_mb", "PSS MB"),
                ],
            )
        )
        footprint = {s["label"]: (s.get("pss_under_load_mb"), s.get("idle_cpu_percent")) for s in run["services"]}
        print("PSS under load MB, idle CPU %:", footprint)
        print("metrics:", run["metrics"])
        print("ratios:", {k: round(v, 3) for k, v in run["ratios"].items()})
    print(f"load average before {load_before}, after {payload['load_average_after']}; {payload['minutes']:.1f} min")
    print(f"wrote {path}")
    return 0


def chart(payload: dict, path: Path) -> None:
    fig, axes = subplots(1, len(payload["runs"]), figsize=(11, 4))
    for ax, run in zip(np.atleast_1d(axes), payload["runs"], strict=True):
        for service in run["services"]:
            c = [r["connections"] for r in service["rows"]]
            ax.plot(c, [r["requests_per_s"] for r in service["rows"]], marker="o", label=service["label"])
        ax.axhline(run["engine"]["best"]["windows_per_s"], color="k", ls="--", lw=1, label="engine best (windows/s)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("connections")
        ax.set_ylabel("requests / s (one window each)")
        ax.set_title(run["precision"], fontsize=9)
        ax.legend(fontsize=7)
    save_chart(fig, path, payload, "POST /api/v1/denoising: ours, the FastAPI peer and the old service")


if __name__ == "__main__":
    raise SystemExit(main())
