"""``GET /metrics`` in this process: the Prometheus text format, labels by route template, the
batcher's and the outbox's figures, and METRICS=off."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys

import falcon.testing
import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.config import Config
from service.connections import Routes, create_server
from service.metrics import merged_registry

from .conftest import issue_key
from .inprocess import read_all, started

NAMES = (
    "heartify_requests",
    "heartify_request_duration_seconds",
    "heartify_inference_batch_size",
    "heartify_inference_duration_seconds",
    "heartify_queue_depth",
    "heartify_outbox_pending",
    "heartify_model_info",
    "heartify_rate_limited",
    "heartify_mail_failures",
)


def scrape(client: falcon.testing.TestClient) -> dict[tuple[str, tuple], float]:
    response = client.simulate_get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_name_routes_by_template_and_count_model_runs(client, runtime):
    key = issue_key(runtime.store, "m@example.com")
    window = np.sin(np.arange(1300) / 20).tolist()
    assert (
        client.simulate_post("/api/v1/denoising", json={"ecg_signal": window}, headers={"x-api-key": key}).status_code
        == 200
    )
    assert client.simulate_post("/api/v1/denoising", json={"ecg_signal": window}).status_code == 401
    assert client.simulate_get("/no/such/path/42").status_code == 404
    assert client.simulate_get("/api/v1/api-keys/verify", params={"token": "x"}).status_code == 400
    # An answer the server gives from the headers, before any route (refusals were not counted).
    server = create_server(
        create_app(runtime.deps), Config(host="127.0.0.1", port=0), Routes(refused=runtime.deps.metrics.refused)
    )
    loop = started(server)
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as bare_lf:
        bare_lf.sendall(b"POST /api/v1/denoising HTTP/1.1\nHost: x\n\n")
        assert b" 400 Bad Request" in read_all(bare_lf)
    server.drain(1)
    loop.join(10)

    families = {f.name for f in text_string_to_metric_families(client.simulate_get("/metrics").text)}
    assert set(NAMES) <= families
    head = client.simulate_head("/metrics")  # as on METRICS_PORT, and as the health checks answer it
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/plain")
    samples = scrape(client)
    count = lambda route, status: samples.get(("heartify_requests_total", (("route", route), ("status", status))))
    assert count("/api/v1/denoising", "200") == 1
    assert count("/api/v1/denoising", "401") == 1
    assert count("unmatched", "404") == 1  # the raw path never becomes a label
    assert count("/api/v1/api-keys/verify", "400") == 1
    assert count("refused", "400") == 1
    assert not any("/no/such" in str(labels) for _, labels in samples)
    assert samples[("heartify_inference_batch_size_count", ())] == 1
    assert samples[("heartify_inference_batch_size_sum", ())] == 1
    assert samples[("heartify_inference_duration_seconds_count", ())] == 1
    info = next(labels for name, labels in samples if name == "heartify_model_info")
    assert dict(info)["precision"] == "fp32" and dict(info)["version"] == str(runtime.deps.model_version)
    assert len(dict(info)["sha256"]) == 64
    assert samples[("heartify_outbox_pending", ())] == 0


def test_one_page_serves_every_scrape_for_a_second(runtime):
    """Each scrape read and merged every process's files: a client that asked from many
    connections (no key is needed) slowed everyone else's windows."""
    now = [100.0]
    client = falcon.testing.TestClient(create_app(dataclasses.replace(runtime.deps, clock=lambda: now[0])))
    first = client.simulate_get("/metrics").text
    assert client.simulate_get("/healthz").status_code == 200
    now[0] += 0.9
    assert client.simulate_get("/metrics").text == first  # not made again
    now[0] += 0.1
    assert 'route="/healthz"' in client.simulate_get("/metrics").text and 'route="/healthz"' not in first


def test_metrics_off_has_no_route(runtime_with, sqlite_url):
    runtime = runtime_with(sqlite_url, metrics=False)
    client = falcon.testing.TestClient(create_app(runtime.deps))
    assert client.simulate_get("/metrics").status_code == 404
    assert client.simulate_get("/healthz").status_code == 200


def test_separate_metrics_port_leaves_the_api_port_without_it(runtime_with, sqlite_url):
    runtime = runtime_with(sqlite_url, metrics_port=9)  # served by service.server, not the app
    assert falcon.testing.TestClient(create_app(runtime.deps)).simulate_get("/metrics").status_code == 404


def test_the_metrics_port_serves_a_few_connections_at_a_time_and_closes_idle_and_slow_ones():
    """prometheus-client's own server had no bound: a thousand silent connections took every
    descriptor of the process, and the API's port stopped accepting."""
    import socket
    import time
    import urllib.error
    import urllib.request

    from prometheus_client import CollectorRegistry, Counter

    from service.metrics import MetricsPort

    from .conftest import free_port, wait_until

    registry = CollectorRegistry()
    Counter("probe_total", "A counter", registry=registry).inc()

    def scraped(port: int) -> bool:
        try:
            return b"probe_total 1.0" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        except OSError:  # refused while the slots were full
            return False

    bounded, lenient = free_port(), free_port()
    ports = [
        MetricsPort("127.0.0.1", bounded, registry, connections=2, idle_s=30, deadline_s=30).start(),
        MetricsPort("127.0.0.1", lenient, registry, connections=8, idle_s=0.5, deadline_s=1.5).start(),
    ]
    try:
        silent = [socket.create_connection(("127.0.0.1", bounded)) for _ in range(2)]
        time.sleep(0.2)  # both taken by the server's threads, and kept: 30 s of silence allowed
        with socket.create_connection(("127.0.0.1", bounded), timeout=2) as third:
            assert third.recv(1024) == b""  # no slot: closed at once, not after a time-out
        for client in silent:
            client.close()
        assert wait_until(lambda: scraped(bounded), 5, "a scrape once the slots are free")

        idle = socket.create_connection(("127.0.0.1", lenient), timeout=5)
        assert idle.recv(1024) == b""  # closed after half a second of silence
        idle.close()
        trickle = socket.create_connection(("127.0.0.1", lenient), timeout=5)
        started = time.monotonic()
        with pytest.raises(OSError):  # a byte every 0.3 s is never idle, but the deadline cuts it
            while time.monotonic() - started < 10:
                trickle.sendall(b"G")
                time.sleep(0.3)
        trickle.close()
        assert scraped(lenient)
        with pytest.raises(urllib.error.HTTPError) as other:  # the port serves /metrics only
            urllib.request.urlopen(f"http://127.0.0.1:{lenient}/", timeout=5)
        assert other.value.code == 404 and other.value.read() == b'{"error":"404 Not Found"}'
        with pytest.raises(urllib.error.HTTPError) as posted:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{lenient}/metrics", b"{}"), timeout=5)
        assert posted.value.code == 405 and posted.value.read() == b'{"error":"405 Method Not Allowed"}'
        head = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{lenient}/metrics", method="HEAD"))
        assert head.status == 200 and head.read() == b"" and head.headers["X-Content-Type-Options"] == "nosniff"
        with socket.create_connection(("127.0.0.1", lenient), timeout=5) as huge:  # the handler's own answer
            huge.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n")
            answer = b""
            while part := huge.recv(65536):  # until it closes
                answer += part
        assert b"Content-Type: application/json" in answer and b"nosniff" in answer and answer.endswith(b'"}')
    finally:
        for port in ports:
            port.close()


def test_a_scrape_leaves_out_the_file_a_starting_worker_has_not_sized_yet(tmp_path):
    """prometheus-client reads every process's file; one just made, still empty, failed the whole
    scrape (a 500 while a worker restarted)."""
    writer = "from prometheus_client import Counter; Counter('heartify_test', 'x').inc(3)"
    subprocess.run([sys.executable, "-c", writer], env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}, check=True)
    (tmp_path / "counter_999999.db").touch()  # made, not yet sized
    text = generate_latest(merged_registry(str(tmp_path))).decode()
    assert "heartify_test_total 3.0" in text
