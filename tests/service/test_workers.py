"""``WEB_WORKERS=2``: two processes on one socket under a supervisor, as real processes on loopback.

One service for the whole story, as each start loads the model twice: both workers serve, one
scraped ``/metrics`` (here on ``METRICS_PORT``, served by the supervisor) counts what every
worker answered, a worker killed with SIGKILL is replaced while the other keeps answering, one
sent SIGTERM drains alone and is replaced while the socket keeps serving, a key deactivated
through one worker is refused by the other at once, and SIGTERM to the service lets the requests in flight finish, in both workers, before the service exits 0. And when
the supervisor itself is killed with SIGKILL, its workers drain and exit, and the next start
finds the port free and removes what the killed one left in the temporary folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from http.client import HTTPConnection
from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.store import Store

from .conftest import free_port, http, issue_key, smtp_env, verify_link, wait_until

WINDOWS = np.sin(np.arange(1300) / 20)[None, :].repeat(64, axis=0).tolist()


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """Sample name → labels → value."""
    status, text = http("GET", url)
    assert status == 200
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def worker_pids(metrics_url: str) -> set[int]:
    """The live workers' pids; empty while a scrape races a worker that is dying or starting
    (its metrics file half written: Prometheus would simply scrape again)."""
    try:
        samples = scrape(metrics_url)
    except (OSError, AssertionError):  # or a 503, while the metrics folder is missing
        return set()
    return {int(dict(labels)["pid"]) for labels in samples.get("heartify_worker_start_time_seconds", {})}


@pytest.mark.slow
def test_two_workers_share_the_socket_restart_and_drain(service_process, tmp_path, smtp):
    database = f"sqlite:///{tmp_path / 'w.db'}"
    metrics_port = free_port()
    server = service_process(
        {
            "DATABASE_URL": database,
            "WEB_WORKERS": "2",
            "METRICS_PORT": str(metrics_port),
            **smtp_env(smtp.port),
        }
    )
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    assert http("GET", f"{server.url}/metrics")[0] == 404  # on its own port only
    # Both ready, as the supervisor sees them: one that dies before it is ready on the first start
    # stops the service (it would not start either), and a worker shows in the metrics before then.
    wait_until(lambda: "with 2 workers" in server.log(), 30, "both workers ready")
    first = wait_until(lambda: len(p := worker_pids(metrics_url)) == 2 and p, 30, "both workers")

    sent = 0
    for _ in range(10):
        assert http("GET", f"{server.url}/healthz")[0] == 200
        sent += 1
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    for _ in range(10):  # the survivor answers while the supervisor starts a replacement
        assert http("GET", f"{server.url}/healthz")[0] == 200
        sent += 1
    replaced = wait_until(lambda: len(p := worker_pids(metrics_url)) == 2 and victim not in p and p, 30, "a new worker")
    assert len(replaced & first) == 1
    drained = min(replaced)
    os.kill(drained, signal.SIGTERM)  # one worker drains alone: the socket stays the others'
    wait_until(lambda: len(p := worker_pids(metrics_url)) == 2 and drained not in p, 30, "its replacement")
    assert f"Worker {drained} exited with 0; starting another in 0.5 s" in server.log()  # no backoff
    for _ in range(20):  # each on a new connection, whichever worker takes it
        assert http("GET", f"{server.url}/healthz")[0] == 200
        sent += 1
    healthz = scrape(metrics_url)["heartify_requests_total"][(("route", "/healthz"), ("status", "200"))]
    assert healthz == sent  # the killed worker's counts are kept, the survivor's added

    store = Store(database, max_connections=1).start()
    gone, key = issue_key(store, "gone@example.com"), issue_key(store, "w@example.com")
    store.close()
    # Both workers cache the key (each request on a new connection), one deactivates it: the
    # other refuses it at once too, on SQLite, which has no notifications.
    denoise = lambda: http("POST", f"{server.url}/api/v1/denoising", {"ecg_signal": WINDOWS[0]}, {"x-api-key": gone})
    assert [denoise()[0] for _ in range(10)] == [200] * 10
    assert http("POST", f"{server.url}/api/v1/api-keys/deactivation", {"email": "gone@example.com"})[0] == 200
    assert http("GET", verify_link(smtp.mailbox.wait_for(1)[0]))[0] == 200
    assert [denoise()[0] for _ in range(10)] == [401] * 10
    answers: list[tuple[int, object]] = []
    body, headers = orjson.dumps({"ecg_signals": WINDOWS}), {"x-api-key": key, "Content-Type": "application/json"}

    sent_all = threading.Barrier(5)

    def batch(connection: HTTPConnection) -> None:
        connection.request("POST", "/api/v1/denoising/batch", body, headers)
        sent_all.wait(30)
        response = connection.getresponse()
        answers.append((response.status, orjson.loads(response.read())))

    # Each request on a connection a worker has already answered once: a connection still in the
    # listening socket's queue when the service stops is refused, as every new one is then.
    connections = []
    for _ in range(4):  # most likely some on each worker
        connections.append(HTTPConnection("127.0.0.1", server.port, timeout=30))
        connections[-1].request("GET", "/healthz")
        assert connections[-1].getresponse().read()
    requests = [threading.Thread(target=batch, args=(connection,)) for connection in connections]
    for request in requests:
        request.start()
    # SIGTERM once the requests are sent and model runs have started (64 windows each: several
    # runs of 8). A kept-alive connection with nothing sent on it yet would be closed: the client
    # of an idle connection must expect that at any time.
    sent_all.wait(30)
    wait_until(lambda: scrape(metrics_url).get("heartify_inference_batch_size_count", {}).get((), 0) > 0, 10)
    before = len(server.log())
    assert server.stop() == 0
    for request in requests:
        request.join(30)
    assert [status for status, _ in answers] == [200] * 4
    assert all(len(body["denoised_signals"]) == 64 for _, body in answers)
    # Each worker drains, although the supervisor shuts the socket they share.
    log = server.log()
    assert log[before:].count("Draining") == 2 and "Traceback" not in log


@pytest.mark.slow
def test_a_removed_metrics_folder_fails_no_answer_and_no_worker_start(service_process, tmp_path):
    """systemd-logind's ``RemoveIPC`` empties ``/dev/shm`` at logout. Then each worker that had not
    counted a request yet answered every request with a 500, health checks included, and each
    worker started in its place died at its start."""
    metrics_port = free_port()
    server = service_process(
        {"DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}", "WEB_WORKERS": "2", "METRICS_PORT": str(metrics_port)}
    )
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    wait_until(lambda: "with 2 workers" in server.log(), 30, "both workers ready")
    first = wait_until(lambda: len(p := worker_pids(metrics_url)) == 2 and p, 30, "both workers")
    environ = (Path("/proc") / str(min(first)) / "environ").read_bytes().split(b"\0")
    folder = Path(next(v for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")).split(b"=", 1)[1].decode())
    shutil.rmtree(folder)  # before the workers have answered more than the readiness check

    assert [http("GET", f"{server.url}/healthz")[0] for _ in range(20)] == [200] * 20  # new connections
    wait_until(folder.is_dir, 10, "the folder made again")
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    # The worker started in its place counts in the new folder, where a scrape finds it.
    wait_until(lambda: worker_pids(metrics_url) - first, 30, "a new worker, counted")
    assert [http("GET", f"{server.url}/healthz")[0] for _ in range(10)] == [200] * 10
    log = server.log()
    assert "was removed: made again" in log and "Traceback" not in log
    assert f"Worker {victim} exited with -9" in log and "exited with 1" not in log
