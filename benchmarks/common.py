"""What every benchmark shares: the machine's description, timing loops, results on disk."""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from service.cpus import usable_cpus

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "usable_cpus": usable_cpus(),
        "python": platform.python_version(),
    }


def time_calls(
    call: Callable[[], object], seconds: float, warmup: int = 3, streams: int = 1, idle_s: float = 0.0
) -> np.ndarray:
    """Per-call wall times (s) of ``call`` repeated for about ``seconds`` after a warm-up, in
    ``streams`` threads calling at once (their times pooled; each thread is busy the whole time,
    so throughput is ``streams`` × calls / total time). ``idle_s`` > 0: the thread sleeps that
    long before each call, as a service at one connection waits for the client's next request."""

    def loop(_: int) -> list[float]:
        for _ in range(warmup):
            call()
        times: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 5:
            if idle_s:
                time.sleep(idle_s)
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return times

    with ThreadPoolExecutor(streams) as pool:
        return np.concatenate([np.array(t) for t in pool.map(loop, range(streams))])


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns`` pairs a row key with its header; floats get two decimals."""
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def require_wrk() -> None:
    """The HTTP benchmarks drive the service with wrk: compiled, so it takes little of the CPUs."""
    if shutil.which("wrk") is None:
        raise SystemExit("error: wrk is not installed (apt-get install wrk)")


def subplots(*args, **kwargs):
    """``plt.subplots`` on the off-screen backend: benchmarks run on machines without a screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_chart(fig, path: Path, payload: dict, what: str) -> None:
    """Titles ``fig`` with what it shows and the machine and date of the run, so a chart is never
    read apart from where it was measured; writes it and frees it."""
    import matplotlib.pyplot as plt

    m = payload["machine"]
    fig.suptitle(f"{what} — {m['cpu']}, {m['usable_cpus']} CPUs, {m['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
