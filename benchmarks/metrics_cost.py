"""CPU that metrics add to each request, in-process: `python -m benchmarks.metrics_cost`.

A throughput difference of 2 % is below what this shared machine can resolve between two wrk
runs, so this times the parts themselves: a Falcon request through ``falcon.testing`` with and
without the metrics middleware, and the batcher's observer, in prometheus-client's multiprocess
mode (values in files, as with several workers). Divided by the service's CPU per request (from
the HTTP runs), it is the share of throughput that metrics cost on a CPU-bound service.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import falcon
import falcon.testing


class _Ok:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


def _per_request_us(app: falcon.App, n: int) -> float:
    client = falcon.testing.TestClient(app)
    for _ in range(500):
        client.simulate_get("/x")
    start = time.perf_counter()
    for _ in range(n):
        client.simulate_get("/x")
    return (time.perf_counter() - start) / n * 1e6


def measure(n: int = 20000, rounds: int = 3) -> dict:
    """Best of ``rounds`` for each: the fastest round is the least disturbed by other tenants."""
    from service.metrics import Metrics, RequestMetrics  # after PROMETHEUS_MULTIPROC_DIR is set

    metrics = Metrics()
    plain, counted = falcon.App(), falcon.App(middleware=[RequestMetrics(metrics)])
    for app in (plain, counted):
        app.add_route("/x", _Ok())
    without = min(_per_request_us(plain, n) for _ in range(rounds))
    with_metrics = min(_per_request_us(counted, n) for _ in range(rounds))
    start = time.perf_counter()
    for _ in range(n):
        metrics.inference(1, 0.003, 0)
    observer = (time.perf_counter() - start) / n * 1e6
    return {"middleware_us": with_metrics - without, "observer_us": observer, "request_without_us": without}


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        print(json.dumps(measure()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
