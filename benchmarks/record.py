"""Whole-recording benchmark: `python -m benchmarks.record` → benchmarks/results/record-MMDD.json.

1. The resamplers: soxr (HQ, what the service uses) against scipy's ``resample_poly``: the error
   of a band-limited (0.5–40 Hz) signal taken down to 130 Hz and back, and the time per hour.
2. The in-process engine's best rate in this run (batches of 8, one single-threaded stream per
   CPU: the service's own setting), to compare the service with.
3. One hour at 130 Hz through `python -m service` over HTTP, in JSON and in float32: wall time,
   windows per second counting the overlap, and the peak growth of the server's resident memory.
4. Single-window requests at 4 connections: their p50 alone, and while the hour runs alongside.
"""

from __future__ import annotations

import http.client
import json
import tempfile
import threading
import time
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path

import numpy as np
import soxr
from scipy.signal import resample_poly

from benchmarks.common import machine, save, time_calls
from benchmarks.http import Server
from service import recording
from service.contract import SAMPLING_RATE_HZ, WINDOW
from service.cpus import usable_cpus
from service.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "artifacts" / "attention_unet.onnx"
HOUR = 3600 * SAMPLING_RATE_HZ


def band_limited(seconds: float, rate: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    f, phase = rng.uniform(0.5, 40, 40), rng.uniform(0, 2 * np.pi, 40)
    return np.sin(2 * np.pi * f[:, None] * t + phase[:, None]).sum(axis=0)


def resamplers() -> list[dict]:
    def poly(x: np.ndarray, rate: float, new_rate: float) -> np.ndarray:
        ratio = Fraction(new_rate).limit_denominator(1000) / Fraction(rate).limit_denominator(1000)
        return resample_poly(x, ratio.numerator, ratio.denominator)

    candidates = {"soxr HQ": lambda x, a, b: soxr.resample(x, a, b, quality="HQ"), "scipy resample_poly": poly}
    rng = np.random.default_rng(0)
    rows = []
    for rate in (250, 250.5, 360, 500, 1000):
        x, hour = band_limited(60, rate, rng), band_limited(3600, rate, rng)
        inner = slice(round(2 * rate), -round(2 * rate))
        for name, f in candidates.items():
            back = f(f(x, rate, SAMPLING_RATE_HZ), SAMPLING_RATE_HZ, rate)[: len(x)]
            error = np.sqrt(np.mean((back - x)[inner] ** 2) / np.mean(x[inner] ** 2))
            times = time_calls(
                lambda f=f, h=hour, r=rate: f(f(h, r, SAMPLING_RATE_HZ), SAMPLING_RATE_HZ, r), 2, warmup=1
            )
            rows.append(
                {
                    "resampler": name,
                    "rate_hz": rate,
                    "round_trip_snr_db": float(-20 * np.log10(error)),
                    "ms_per_hour_down_and_up": float(np.median(times) * 1000),
                }
            )
    return rows


def engine_best(seconds: float) -> float:
    streams = usable_cpus()
    engine = Engine(MODEL, threads=1, lone_threads=1, warm_batch=8, warm_concurrent=streams).start()
    batch = np.random.default_rng(1).standard_normal((8, 1, WINDOW)).astype(np.float32)
    times = time_calls(lambda: engine.run(batch), seconds, streams=streams)
    engine.close()
    return float(8 * len(times) / (times.sum() / streams))


def post(server: Server, path: str, body: bytes, kind: str, key: str, connection=None) -> tuple[int, bytes]:
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    connection.request("POST", path, body, {"Content-Type": kind, "x-api-key": key})
    response = connection.getresponse()
    data = response.read()
    if own:
        connection.close()
    return response.status, data


def record_request(server: Server, key: str, signal: np.ndarray, binary: bool) -> dict:
    """One hour through HTTP while the server's RSS is sampled every 20 ms."""
    if binary:
        body, kind, path = (
            signal.astype("<f4").tobytes(),
            "application/octet-stream",
            "/api/v1/denoising/record?sampling_rate=130",
        )
    else:
        body, kind, path = (
            json.dumps({"ecg_signal": signal.tolist()}).encode(),
            "application/json",
            "/api/v1/denoising/record",
        )
    before = server.rss_mb()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], server.rss_mb())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    status, data = post(server, path, body, kind, key)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    assert status == 200, data[:200]
    windows = len(recording.cut(np.zeros(len(signal))))
    return {
        "form": "float32" if binary else "JSON",
        "body_mb": len(body) / 1e6,
        "answer_mb": len(data) / 1e6,
        "wall_s": wall,
        "windows": windows,
        "windows_per_s": windows / wall,
        "rss_before_mb": before,
        "rss_peak_growth_mb": peak[0] - before,
    }


def singles(server: Server, key: str, stop: threading.Event, seconds: float | None) -> list[float]:
    """Single windows from 4 connections until ``stop`` is set (or ``seconds`` pass); their latencies."""
    body = json.dumps({"ecg_signal": [round(float(v), 4) for v in band_limited(10, 130, np.random.default_rng(2))]})
    latencies: list[float] = []
    end = time.monotonic() + (seconds or 1e9)

    def loop() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        while not stop.is_set() and time.monotonic() < end:
            start = time.perf_counter()
            status, _ = post(server, "/api/v1/denoising", body.encode(), "application/json", key, connection)
            latencies.append(time.perf_counter() - start)
            assert status == 200
        connection.close()

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def main() -> int:
    payload: dict = {"machine": machine(), "resamplers": resamplers()}
    payload["engine_best_windows_per_s"] = engine_best(5)
    signal = 512 + 300 * np.sin(np.pi * 1.1 * np.arange(HOUR) / SAMPLING_RATE_HZ) ** 40
    signal += 20 * np.random.default_rng(3).standard_normal(HOUR)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp), MODEL, {})
        try:
            key = server.api_key()
            record_request(server, key, signal[: 60 * SAMPLING_RATE_HZ], binary=True)  # warm-up
            runs = [record_request(server, key, signal, binary) for binary in (False, True)]
            for run in runs:
                run["share_of_engine"] = run["windows_per_s"] / payload["engine_best_windows_per_s"]
            payload["hour"] = runs
            alone = singles(server, key, threading.Event(), 5)
            stop = threading.Event()
            result: dict = {}
            thread = threading.Thread(target=lambda: result.update(record_request(server, key, signal, True)))
            thread.start()
            time.sleep(0.5)
            alongside: list[float] = []
            worker = threading.Thread(target=lambda: alongside.extend(singles(server, key, stop, None)))
            worker.start()
            thread.join()
            stop.set()
            worker.join()
            payload["singles_at_4_connections"] = {
                "alone_p50_ms": float(np.median(alone) * 1000),
                "alone_requests": len(alone),
                "with_hour_p50_ms": float(np.median(alongside) * 1000),
                "with_hour_p95_ms": float(np.percentile(alongside, 95) * 1000),
                "with_hour_requests": len(alongside),
                "hour_wall_s_meanwhile": result["wall_s"],
            }
            s = payload["singles_at_4_connections"]
            s["ratio"] = s["with_hour_p50_ms"] / s["alone_p50_ms"]
        finally:
            server.stop()
    path = save(f"record-{datetime.now(UTC):%m%d}", payload)
    print(json.dumps({k: v for k, v in payload.items() if k != "resamplers"}, indent=2))
    for row in payload["resamplers"]:
        print(row)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
