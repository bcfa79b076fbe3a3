"""The supervisor of ``WEB_WORKERS=2``, as real processes on loopback: killed with SIGKILL, its
workers drain and exit, and the next start finds the port free and removes what the killed one
left in the temporary folder; a worker started by a supervisor of another version; a worker that
does not stop, killed after the configured grace; a frozen one, replaced."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from service.config import Config
from service.files import memory_root
from service.occupancy import create_file
from service.process import stop_signals
from service.workers import Supervisor, _Worker

from .conftest import fill, http, service_with_key, wait_until


def alive(pid: int) -> bool:
    """Running, neither gone nor a zombie (an orphan's new parent may not reap it at once)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
def test_workers_of_a_killed_supervisor_drain_and_the_next_start_tidies_up(service_process, tmp_path):
    """Nothing would replace the orphans, and they would keep the port from the next supervisor."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'k.db'}",
        "OUTBOX_DIR": str(tmp_path / "outbox"),
        "WEB_WORKERS": "2",
        "TMPDIR": str(scratch),
    }
    first = service_process(env)
    wait_until(lambda: "with 2 workers" in first.log(), 30, "both workers ready")
    workers = children(first.pid)
    assert len(workers) == 2
    metrics = metrics_folder(workers[0])
    assert metrics.parent == (memory_root() or scratch) and metrics.name.startswith("heartify-prometheus-")
    first.kill()
    wait_until(lambda: not any(alive(pid) for pid in workers), 15, "the orphaned workers to exit")
    log = first.log()  # the first to notice drains, and the socket it shuts tells the other
    assert "is gone: draining" in log and log.count("Draining") == 2 and "Traceback" not in log

    again = service_process({**env, "PORT": str(first.port)})  # the same port
    assert not metrics.exists()
    wait_until(lambda: "with 2 workers" in again.log(), 30, "both workers ready")
    current = metrics_folder(children(again.pid)[0])
    assert current.exists()
    again.signal(signal.SIGHUP)  # a closed terminal: the same clean stop as SIGTERM
    assert again.wait() == 0
    assert not current.exists() and ours(scratch) == [] and "Stopped" in again.log()


def metrics_folder(worker: int) -> Path:
    """The Prometheus folder its supervisor gave the worker."""
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    return Path(next(v for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")).split(b"=", 1)[1].decode())


def ours(folder: Path) -> list[Path]:
    """The service's files in ``folder`` (libraries put theirs there too)."""
    return [p for p in folder.iterdir() if "heartify" in p.name]


def test_a_worker_started_by_a_supervisor_of_another_version_says_so():
    """The code replaced on disk under a running service: its old supervisor starts a new worker
    with the arguments it knows (here, those of the version before the interface had a number)."""
    done = subprocess.run(
        [sys.executable, "-m", "service.workers", "3", "4", "5", "0", str(os.getpid())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "heartify: this worker's code is not its supervisor's (the service was replaced on disk while it ran): "
        "restart the service."
    )


def test_a_service_started_with_nohup_keeps_ignoring_sighup():
    """``nohup`` starts it with SIGHUP ignored, to outlive the terminal: the service must not
    take SIGHUP back as a stop."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert stop_signals() == (signal.SIGTERM,)
    finally:
        signal.signal(signal.SIGHUP, previous)
    if previous is not signal.SIG_IGN:
        assert stop_signals() == (signal.SIGTERM, signal.SIGHUP)


@pytest.mark.slow
def test_a_frozen_worker_is_replaced_and_one_that_does_not_stop_is_killed_after_the_grace(service_process, tmp_path):
    """A worker frozen while it serves (SIGSTOP here; a hung loop alike) keeps the connections
    it holds, and nothing else serves them: after WORKER_TIMEOUT_SECONDS without a sign of life
    it is killed and replaced. When the service stops, a frozen worker (or a request longer than
    the grace) held every stop for a fixed 30 s, whatever SHUTDOWN_GRACE_SECONDS said: longer
    than docker waits, and shorter than a grace set above it."""
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'f.db'}",
        "OUTBOX_DIR": str(tmp_path / "outbox"),
        "WEB_WORKERS": "2",
        "SHUTDOWN_GRACE_SECONDS": "0",
        "WORKER_TIMEOUT_SECONDS": "5",
    }
    service = service_process(env)
    wait_until(lambda: "with 2 workers" in service.log(), 30, "both workers ready")
    hung, other = children(service.pid)
    os.kill(hung, signal.SIGSTOP)
    wait_until(lambda: not alive(hung), 20, "the frozen worker killed")
    assert f"Worker {hung} has shown no sign of life for over 5 s (frozen or hung); killing it" in service.log()
    wait_until(lambda: len(children(service.pid)) == 2 and hung not in children(service.pid), 20, "a replacement")
    replacement = next(pid for pid in children(service.pid) if pid != other)
    # The supervisor's line, the first two workers', then the replacement's.
    wait_until(lambda: service.log().count("Serving on") == 4, 30, "the replacement serving")
    assert alive(other)  # its loop kept beating
    frozen = replacement
    os.kill(frozen, signal.SIGSTOP)
    service.signal(signal.SIGTERM)
    assert service.wait() != 0  # a worker had to be killed
    assert f"Worker {frozen} did not stop within 5 s; killing it" in service.log()


def test_a_worker_that_cannot_be_started_leaves_no_descriptor_behind(monkeypatch):
    """The supervisor tries again while the container is out of processes: each try must not
    cost descriptors, or after a few hundred it could open nothing at all."""
    from service.config import Config
    from service.workers import Supervisor

    def out_of_processes(*args, **kwargs):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", out_of_processes)
    with socket.socket() as listener:
        supervisor = Supervisor(Config(), listener, {}, occupancy_fd=listener.fileno(), lock_fd=None)
        before = len(os.listdir("/proc/self/fd"))
        for slot in range(5):
            with pytest.raises(OSError):
                supervisor._spawn(slot)
        assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.slow
def test_a_full_temporary_directory_crashes_no_worker_and_a_body_it_cannot_hold_gets_its_503(
    service_process, tmp_path, small_disk
):
    """waitress spools large bodies to the temporary directory, where uploads can fill it. The
    workers' metrics do not live there (a page of their memory-mapped files first written on a
    full disk killed every worker with SIGBUS, again after each restart), and a body that no
    longer fits gets a JSON 503 instead of a reset connection."""
    env = {"WEB_WORKERS": "2", "TMPDIR": str(small_disk), "MAX_BATCH_WINDOWS": "1"}  # bodies of 1 MiB at most
    service, key = service_with_key(service_process, tmp_path, env)
    wait_until(lambda: "with 2 workers" in service.log(), 30, "both workers ready")
    fill(small_disk)
    window = {"ecg_signal": [float(i % 40) for i in range(1300)]}
    for _ in range(6):  # new connections, so both workers serve; each answer counts new labels
        assert http("POST", f"{service.url}/api/v1/denoising", window, {"x-api-key": key})[0] == 200
        assert http("GET", f"{service.url}/api/v1/unknown")[0] == 404
        assert http("GET", f"{service.url}/readyz")[0] == 200
    head = (
        b"POST /api/v1/denoising/record?sampling_rate=1000 HTTP/1.1\r\nHost: x\r\nx-api-key: %s\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: 1200000\r\n\r\n" % key.encode()
    )
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as client:
        client.sendall(head + bytes(600_000))  # past what waitress keeps in memory: spooled
        answer = b""
        while part := client.recv(65536):
            answer += part
    assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 30" in answer
    assert answer.endswith(b'{"error":"The server has no room for this upload now. Try again later."}')
    assert http("GET", f"{service.url}/metrics")[0] == 200
    assert "exited with" not in service.log()


def test_a_pause_of_the_whole_machine_kills_no_worker(tmp_path):
    """After a docker pause or a suspended VM, the clock has moved on and no worker has beaten
    yet: every worker looked hung at once. A supervisor that comes round late starts counting
    anew; one that does not kills the silent worker."""
    config = Config(worker_timeout_s=5)
    with create_file(1) as occupancy, socket.socket() as listener:
        supervisor = Supervisor(config, listener, {}, occupancy.fileno(), None)
        process = subprocess.Popen(["sleep", "60"])
        read_fd, write_fd = os.pipe()
        os.close(write_fd)
        worker = _Worker(process, read_fd, 0, ready=True, ready_since=time.monotonic() - 100)  # silent for long
        supervisor._workers.append(worker)
        try:
            supervisor._last_check = time.monotonic() - 60  # the supervisor stood still too
            supervisor._kill_hung()
            supervisor._kill_hung()
            assert process.poll() is None and not worker.killed
            worker.ready_since = time.monotonic() - 100
            supervisor._kill_hung()
            assert process.wait(10) == -signal.SIGKILL and worker.killed
        finally:
            process.kill()
            process.wait()
            worker.close()


@contextmanager
def supervising(*workers: tuple[float, bool]) -> Iterator[tuple[Supervisor, list[_Worker]]]:
    """A supervisor (start timeout 5 s) of stand-in workers, one per (age in seconds, ready):
    processes that sleep, killed at the end."""
    with create_file(len(workers)) as occupancy, socket.socket() as listener:
        supervisor = Supervisor(Config(worker_start_timeout_s=5), listener, {}, occupancy.fileno(), None)
        for slot, (age, ready) in enumerate(workers):
            read_fd, write_fd = os.pipe()
            os.close(write_fd)
            process = subprocess.Popen(["sleep", "60"])
            supervisor._workers.append(_Worker(process, read_fd, slot, started=time.monotonic() - age, ready=ready))
        try:
            yield supervisor, list(supervisor._workers)
        finally:
            for worker in supervisor._workers:
                worker.process.kill()
                worker.process.wait()
                worker.close()


def test_a_worker_not_ready_in_time_is_killed_and_one_starting_within_it_is_not():
    """A replacement stuck on its way to ready (a name lookup that never ends) was a worker less,
    for good, and said nothing."""
    with supervising((4, False), (6, False)) as (supervisor, (starting, stuck)):
        supervisor._kill_hung()
        assert stuck.process.wait(10) == -signal.SIGKILL and stuck.killed
        assert starting.process.poll() is None and not starting.killed


def test_a_first_start_refuses_a_worker_that_is_not_ready_in_time_whichever_it_is():
    """Only the first worker was looked at: with it ready, a second one stuck on its way held
    the start for good."""
    with supervising((10, True), (10, False)) as (supervisor, (ready, stuck)):
        gives_up = threading.Timer(5, setattr, (supervisor, "_stopping", True))  # else it waited for good
        gives_up.start()
        try:
            problem = supervisor._first_start_failure()
        finally:
            gives_up.cancel()
        assert problem == f"worker {stuck.process.pid} was not ready 5 s after its start (frozen or hung)."
        assert stuck.process.wait(10) == -signal.SIGKILL and ready.process.poll() is None


@pytest.mark.slow
def test_workers_replaced_while_postgres_is_down_serve_the_outage_answers(pg_cluster, service_process, tmp_path):
    """A worker that found the database away at its start exited, and so did every replacement,
    a longer while apart each time: with none left, the supervisor's socket took connections that
    nobody answered, health checks included. Now a replacement serves the outage's answers, and
    all of them once the database is back."""
    env = {"DATABASE_URL": pg_cluster.url, "SECRET_KEY": "s" * 40, "OUTBOX_DIR": str(tmp_path), "WEB_WORKERS": "2"}
    service = service_process(env)
    wait_until(lambda: "with 2 workers" in service.log(), 30, "both workers ready")
    pg_cluster.stop()
    for pid in children(service.pid):
        os.kill(pid, signal.SIGKILL)
    # The supervisor's line, the first two workers', then the replacements'.
    wait_until(lambda: service.log().count("Serving on") == 5, 60, "both replacements serving")
    assert "ERROR service.workers: Worker" in service.log() and "no worker serves meanwhile" in service.log()
    assert http("GET", f"{service.url}/healthz") == (200, {"status": "ok"})
    assert http("GET", f"{service.url}/readyz")[0] == 503
    window = {"ecg_signal": [0.0] * 1300}
    status, body = http("POST", f"{service.url}/api/v1/denoising", window, {"x-api-key": "never-seen"})
    assert status == 503 and "the database does not answer" in body["error"]
    pg_cluster.start()
    wait_until(lambda: http("GET", f"{service.url}/readyz")[0] == 200, 30, "ready once the database is back")
    generation = f"{service.url}/api/v1/api-keys/generation"  # each worker's probe finds it within a second
    wait_until(lambda: http("POST", generation, {"email": "back@example.org"})[0] == 200, 10, "keys mailed again")
