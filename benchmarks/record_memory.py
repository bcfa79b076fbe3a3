"""Memory one whole-recording request takes: `python -m benchmarks.record_memory [--seconds 3600] [--served]`.

The longest recording at the highest rate, as JSON (numbers with 12 decimals, with 3, and with
the 28 digits that fill the body limit) and as float32, with the shipped model: through the real
app in this process (``falcon.testing``, a scratch SQLite database), or with ``--served`` through
``python -m service`` with one worker (waitress spools the body to disk, and holds the answer
until it is sent). The resident set is sampled every 10 ms while the request runs; its peak over
the resident set before the request is what ``RECORD_CONCURRENCY`` multiplies.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import falcon.testing
import numpy as np
import orjson

from benchmarks.http import Server
from service.app import create_app
from service.config import Config
from service.keys import digest
from service.process import give_back_large_blocks
from service.runtime import Runtime
from service.store import utcnow

RATE_HZ = 1000
PATH = "/api/v1/denoising/record"
# A request: its body, its query parameters and its content type → its status.
Post = Callable[[bytes, dict[str, str], str], int]


def longest(count: int) -> bytes:
    """``count`` numbers of 28 digits after the point, comma-separated."""
    digits = np.random.default_rng(1).integers(0, 10**18, 1000)
    numbers = [b"0.%018d%010d" % (d, d % 10**10) for d in digits]
    return b",".join(numbers[i % 1000] for i in range(count))


def resident_mib(pid: int | str = "self") -> float:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def peak_during(request: Callable[[], int], pid: int | str) -> tuple[int, float, float]:
    """The request's status, the resident MiB of ``pid`` before it and the peak while it ran."""
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_mib(pid))
            time.sleep(0.01)

    before = resident_mib(pid)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = request()
    finally:
        done.set()
        sampler.join()
    return result, before, max(peak[0], resident_mib(pid))


@contextmanager
def in_process() -> Iterator[tuple[Post, int | str]]:
    give_back_large_blocks()  # as every serving process does first
    with tempfile.TemporaryDirectory() as scratch:
        config = Config(
            database_url=f"sqlite:///{scratch}/bench.db", outbox_dir=scratch, secret_key="b" * 40, metrics=False
        )
        with Runtime(config) as runtime:
            with runtime.store.transaction():
                runtime.store.add_key("bench@example.org", digest("bench-key"), utcnow())
            runtime.store.release()
            client = falcon.testing.TestClient(create_app(runtime.deps))

            def post(body: bytes, params: dict[str, str], kind: str) -> int:
                headers = {"x-api-key": "bench-key", "Content-Type": kind}
                return client.simulate_post(PATH, body=body, headers=headers, params=params or None).status_code

            yield post, "self"


@contextmanager
def served() -> Iterator[tuple[Post, int | str]]:
    with tempfile.TemporaryDirectory() as scratch:
        server = Server(Path(scratch), Path("artifacts/attention_unet.onnx").resolve(), {"WEB_WORKERS": "1"})
        try:
            key = server.api_key()

            def post(body: bytes, params: dict[str, str], kind: str) -> int:
                query = "?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else ""
                request = urllib.request.Request(
                    f"{server.url}{PATH}{query}", body, {"x-api-key": key, "Content-Type": kind}
                )
                with urllib.request.urlopen(request, timeout=300) as answer:
                    answer.read()
                    return answer.status

            yield post, server.process.pid
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--served", action="store_true", help="through python -m service, one worker")
    args = parser.parse_args()
    t = np.arange(int(args.seconds * RATE_HZ)) / RATE_HZ
    x = 512 + 300 * np.sin(np.pi * 1.1 * t) ** 40 + np.random.default_rng(0).standard_normal(len(t))
    cases = {
        "JSON, 12 decimals": (orjson.dumps({"ecg_signal": x.round(12).tolist(), "sampling_rate": RATE_HZ}), {}),
        "JSON, 3 decimals": (orjson.dumps({"ecg_signal": x.round(3).tolist(), "sampling_rate": RATE_HZ}), {}),
        "float32": (x.astype("<f4").tobytes(), {"sampling_rate": str(RATE_HZ)}),
        # The longest numbers the body limit leaves room for: 28 digits each.
        "JSON, 28 digits": (b'{"sampling_rate":%d,"ecg_signal":[%s]}' % (RATE_HZ, longest(len(x))), {}),
    }
    del x, t
    with served() if args.served else in_process() as (post, pid):
        where = "through python -m service" if args.served else "in this process"
        print(f"{args.seconds:g} s at {RATE_HZ} Hz, one request at a time, {where}")
        print("| body | body MiB | status | seconds | resident before (MiB) | peak (MiB) | added (MiB) |")
        print("|---|---|---|---|---|---|---|")
        for name, (body, params) in cases.items():
            kind = "application/octet-stream" if params else "application/json"
            started = time.perf_counter()
            status, before, peak = peak_during(lambda b=body, p=params, k=kind: post(b, p, k), pid)
            seconds = time.perf_counter() - started
            print(
                f"| {name} | {len(body) / 2**20:.0f} | {status} | {seconds:.1f} | "
                f"{before:.0f} | {peak:.0f} | {peak - before:.0f} |"
            )


if __name__ == "__main__":
    main()
