"""HTTP benchmark: the real service under concurrent clients, driven by `wrk`.

`python -m benchmarks.http` starts `python -m service` on a free loopback port (SQLite, mails to
an outbox folder), obtains a real API key through the mailed links, and posts realistic windows
with wrk (compiled, one thread, so the load generator takes as little CPU from the server as
possible) at 1, 4, 16 and 64 connections: requests/s, p50/p95/p99 latency, errors, the server's
resident memory under load and its CPU use while idle. ``--soak 600`` adds a 10-minute run at 16
connections with the memory sampled every minute. Install wrk with `apt-get install wrk`.
"""

from __future__ import annotations

import argparse
import email
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, machine, markdown_table, require_wrk, save, save_chart, subplots
from export.synth import noisy_windows

ROOT = Path(__file__).resolve().parent.parent
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-api-key"] = "%(key)s"
local f = io.open("%(body)s", "r"); wrk.body = f:read("*a"); f:close()
done = function(summary, latency, requests)
  io.write(string.format('{"requests": %%d, "duration_us": %%d, "errors": %%d, "p50_us": %%d, "p95_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m service` in a subprocess with its own database and outbox folder; ``command``
    (formatted with ``port``) starts another server instead (benchmarks.peers)."""

    def __init__(self, folder: Path, model: Path, extra_env: dict[str, str], command: list[str] | None = None) -> None:
        self.port = free_port()
        self.outbox = folder / "outbox"
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "DATABASE_URL": f"sqlite:///{folder / 'bench.db'}",
            "OUTBOX_DIR": str(self.outbox),
            "MODEL_PATH": str(model),
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "BASE_URL": self.url,
            "LOG_LEVEL": "WARNING",
            "MAIL_RETRY_MIN_SECONDS": "0.05",
            # One key and one client send everything: the per-key and per-client limits would
            # answer most of the load with 429 (what they are for) instead of measuring it.
            "DENOISE_RATE_PER_SECOND": "0",
            "MAIL_LIMIT_PER_CLIENT": "0",
            "KEY_REQUESTS_PER_MINUTE": "0",
            **extra_env,
        }
        env.pop("SMTP_HOST", None)
        command = [a.format(port=self.port) for a in command] if command else None
        # A peer's request log would flood the benchmark's output: it goes to a file.
        log = folder / "server.log"
        with open(log, "wb") as out:
            quiet = {"stdout": out, "stderr": subprocess.STDOUT} if command else {}
            self.process = subprocess.Popen(command or [sys.executable, "-m", "service"], cwd=ROOT, env=env, **quiet)
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{command or 'the service'} did not become ready: {log.read_text()[-2000:]}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return urllib.request.urlopen(f"{self.url}/readyz", timeout=1).status == 200
        except OSError:
            return False

    def _post(self, path: str, payload: dict) -> None:
        request = urllib.request.Request(
            f"{self.url}{path}", json.dumps(payload).encode(), {"Content-Type": "application/json"}
        )
        urllib.request.urlopen(request, timeout=10).read()

    def _next_mail_text(self, seen: set[Path]) -> str:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            new = sorted(set(self.outbox.glob("*.eml")) - seen)
            if new:
                seen.add(new[0])
                message = email.message_from_bytes(new[0].read_bytes())
                return next(
                    p.get_payload(decode=True).decode() for p in message.walk() if p.get_content_type() == "text/plain"
                )
            time.sleep(0.05)
        raise RuntimeError("no mail arrived in the outbox")

    def api_key(self, address: str = "bench@example.com") -> str:
        """A real key: request it, follow the mailed link, read the key from the second mail."""
        seen: set[Path] = set(self.outbox.glob("*.eml")) if self.outbox.exists() else set()
        self._post("/api/v1/api-keys/generation", {"email": address})
        link = re.search(r"https?://\S+token=[\w-]+", self._next_mail_text(seen)).group(0)
        urllib.request.urlopen(link, timeout=10).read()
        return re.search(r"Your API key: (\S+)", self._next_mail_text(seen)).group(1)

    def pids(self) -> list[int]:
        """The server and its descendants (the workers of WEB_WORKERS > 1)."""
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            with suppress(OSError):
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        return found

    def _sum_kb(self, file: str, field: str) -> float:
        total = 0
        for pid in self.pids():
            try:
                lines = Path(f"/proc/{pid}/{file}").read_text().splitlines()
            except OSError:
                continue
            total += next((int(line.split()[1]) for line in lines if line.startswith(field)), 0)
        return total / 1024

    def rss_mb(self) -> float:
        """Resident memory of all its processes (shared pages counted once per process)."""
        return self._sum_kb("status", "VmRSS:")

    def pss_mb(self) -> float:
        """Proportional set size of all its processes: shared pages split between them."""
        return self._sum_kb("smaps_rollup", "Pss:")

    def cpu_seconds(self) -> float:
        """User + system time of all its live processes."""
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()


def wrk(server: Server, script: Path, connections: int, seconds: int, windows: int = 1) -> dict:
    """One wrk run; the server's resident memory is sampled while it runs. ``windows`` > 1:
    the script posts that many windows per request to the batch endpoint."""
    path = "/api/v1/denoising/batch" if windows > 1 else "/api/v1/denoising"
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"{server.url}{path}",
    ]
    cpu_before = server.cpu_seconds()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak = pss = 0.0
    while process.poll() is None:
        peak = max(peak, server.rss_mb())
        pss = max(pss, server.pss_mb())
        time.sleep(0.25)
    cpu = server.cpu_seconds() - cpu_before
    line = next(row for row in process.stdout.read().splitlines() if row.startswith("{"))
    r = json.loads(line)
    return {
        "connections": connections,
        "requests_per_s": r["requests"] / (r["duration_us"] / 1e6),
        "windows_per_s": windows * r["requests"] / (r["duration_us"] / 1e6),
        "p50_ms": r["p50_us"] / 1e3,
        "p95_ms": r["p95_us"] / 1e3,
        "p99_ms": r["p99_us"] / 1e3,
        "errors": r["errors"],
        "requests": r["requests"],
        "rss_peak_mb": peak,
        "pss_peak_mb": pss,
        "server_cpu_ms_per_request": cpu / max(r["requests"], 1) * 1e3,  # all its threads, user + system
    }


PEER_KEY = "benchmark-peer-key"


@contextmanager
def serving(
    model: Path, extra_env: dict[str, str], windows: int = 1, command: list[str] | None = None
) -> Iterator[tuple[Server, Path]]:
    """A running service and a wrk script that posts ``windows`` realistic windows with a real key;
    ``command``: a peer server instead (benchmarks.peers), which takes ``PEER_KEY``."""
    if command:
        extra_env = {**extra_env, "API_KEY": PEER_KEY}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        body = folder / "body.json"
        signals = [[round(float(v), 4) for v in w] for w in noisy_windows(np.random.default_rng(0), windows)]
        body.write_text(json.dumps({"ecg_signals": signals} if windows > 1 else {"ecg_signal": signals[0]}))
        server = Server(folder, model, extra_env, command)
        try:
            script = folder / "post.lua"
            script.write_text(LUA % {"key": PEER_KEY if command else server.api_key(), "body": body})
            wrk(server, script, 4, 2, windows)  # warm-up
            yield server, script
        finally:
            server.stop()


def measure(
    model: Path,
    label: str,
    connections: list[int],
    seconds: int,
    soak: int,
    extra_env: dict[str, str],
    windows: int = 1,
) -> dict:
    with serving(model, extra_env, windows) as (server, script):
        rows = []
        for c in connections:
            rows.append(wrk(server, script, c, seconds, windows))
            print(
                f"{label}: {c:3d} connections {rows[-1]['requests_per_s']:8.1f} req/s p50 {rows[-1]['p50_ms']:.2f} ms "
                f"p99 {rows[-1]['p99_ms']:.2f} ms errors {rows[-1]['errors']} rss {rows[-1]['rss_peak_mb']:.0f} MB",
                flush=True,
            )
        time.sleep(5)  # requests that wrk left in flight finish (at 64 connections × 8 windows, seconds)
        before = server.cpu_seconds()
        time.sleep(10)
        idle_cpu = (server.cpu_seconds() - before) / 10 * 100
        soak_rows = []
        for minute in range(soak // 60):
            soak_rows.append(
                {"minute": minute + 1, **wrk(server, script, 16, 60, windows), "rss_after_mb": server.rss_mb()}
            )
            print(f"{label}: soak minute {minute + 1}: rss {soak_rows[-1]['rss_after_mb']:.1f} MB", flush=True)
    result = {
        "label": label,
        "model": model.name,
        "env": extra_env,
        "windows_per_request": windows,
        "rows": rows,
        "idle_cpu_percent": idle_cpu,
    }
    if soak_rows:
        first, last = soak_rows[0]["rss_after_mb"], soak_rows[-1]["rss_after_mb"]
        result["soak"] = {"minutes": soak_rows, "rss_growth_percent": (last - first) / first * 100}
    return result


def vs_engine(run: dict, engine_results: dict) -> dict:
    """The service against the in-process engine of the same model (``benchmarks.engine``'s results):
    throughput at 16 connections over the engine's best, and p50 at 1 connection over the
    engine's single-window latency, both its fastest and at the service's own setting."""
    key = "onnxruntime int8" if "int8" in run["model"] else "onnxruntime fp32"
    best = engine_results["best"][key]["windows_per_s"]
    # A lone call: one stream, batch 1. The service runs a lone request on ORT_LONE_THREADS
    # threads (unset: all usable CPUs), spinning inside the run unless ORT_LONE_SPINNING is off.
    singles = [r for r in engine_results["rows"] if r["engine"] == key and r["batch"] == 1 and r.get("streams", 1) == 1]
    fastest = min(singles, key=lambda r: r["p50_ms"])
    threads = int(run["env"].get("ORT_LONE_THREADS") or engine_results["machine"]["usable_cpus"])
    spinning = "off" if run["env"].get("ORT_LONE_SPINNING") == "off" or threads == 1 else "on"
    alike = next(r["p50_ms"] for r in singles if r["threads"] == threads and r["spinning"] == spinning)
    at16 = next((r for r in run["rows"] if r["connections"] == 16), None)
    at1 = next((r for r in run["rows"] if r["connections"] == 1), None)
    return {
        "engine_best_windows_per_s": best,
        "throughput_ratio_at_16": at16 and at16["windows_per_s"] / best,
        "engine_batch1_p50_ms": fastest["p50_ms"],
        "p50_overhead_at_1_ms": at1 and at1["p50_ms"] - fastest["p50_ms"],
        "engine_batch1_p50_ms_service_setting": alike,
        "p50_overhead_at_1_ms_service_setting": at1 and at1["p50_ms"] - alike,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        type=Path,
        nargs="+",
        default=[ROOT / "artifacts" / "attention_unet.onnx", ROOT / "artifacts" / "attention_unet.int8.onnx"],
    )
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--soak", type=int, default=0, help="seconds of an extra run at 16 connections (memory growth)")
    parser.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for the service (batcher settings, threads)"
    )
    parser.add_argument("--name", default="http", help="results file name")
    parser.add_argument(
        "--engine",
        type=Path,
        default=RESULTS / "engine.json",
        help="engine results to compare with (vs_engine): the same machine, the same hour",
    )
    parser.add_argument(
        "--windows-per-request",
        type=int,
        default=1,
        help="> 1: post that many windows per request to /api/v1/denoising/batch",
    )
    args = parser.parse_args(argv)
    require_wrk()
    extra_env = dict(item.split("=", 1) for item in args.env)
    runs = [
        measure(m, m.name, args.connections, args.seconds, args.soak, extra_env, args.windows_per_request)
        for m in args.models
    ]
    if args.engine.exists():
        engine_results = json.loads(args.engine.read_text())
        for run in runs:
            run["vs_engine"] = vs_engine(run, engine_results)
    payload = {"machine": machine(), "load_generator": "wrk 4.1, 1 thread, same machine", "runs": runs}
    path = save(args.name, payload)
    chart(payload, RESULTS / f"{args.name}.png")
    for run in runs:
        print(f"\n{run['label']} {run['env'] or ''} (idle CPU {run['idle_cpu_percent']:.2f} %)")
        print(
            markdown_table(
                run["rows"],
                [
                    ("connections", "connections"),
                    ("requests_per_s", "req/s"),
                    ("windows_per_s", "windows/s"),
                    ("p50_ms", "p50 ms"),
                    ("p95_ms", "p95 ms"),
                    ("p99_ms", "p99 ms"),
                    ("errors", "errors"),
                    ("rss_peak_mb", "RSS MB"),
                    ("server_cpu_ms_per_request", "server CPU ms/request"),
                ],
            )
        )
        for key in ("vs_engine", "soak"):
            if key in run:
                print(key, json.dumps({k: v for k, v in run[key].items() if k != "minutes"}))
    print(f"wrote {path}")
    return 0


def chart(payload: dict, path: Path) -> None:
    fig, (left, right) = subplots(1, 2, figsize=(10, 4))
    for run in payload["runs"]:
        c = [r["connections"] for r in run["rows"]]
        left.plot(c, [r["windows_per_s"] for r in run["rows"]], marker="o", label=run["label"])
        right.plot(c, [r["p50_ms"] for r in run["rows"]], marker="o", label=f"{run['label']} p50")
        right.plot(c, [r["p99_ms"] for r in run["rows"]], marker="x", ls="--", label=f"{run['label']} p99")
    for ax, ylabel in ((left, "windows / s"), (right, "latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("connections")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    per_request = payload["runs"][0]["windows_per_request"]
    endpoint = f"/api/v1/denoising/batch, {per_request} windows per request" if per_request > 1 else "/api/v1/denoising"
    save_chart(fig, path, payload, f"POST {endpoint}")


if __name__ == "__main__":
    raise SystemExit(main())
