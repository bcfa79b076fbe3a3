"""``python -m service`` (waitress) on a free loopback port, mailing a real SMTP server (aiosmtpd),
on SQLite and on PostgreSQL: the path a new user takes, a restart, and a mail server that is down."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from functools import partial

import numpy as np
import pytest

from service.__main__ import main
from service.config import Config

from .conftest import (
    MODEL,
    REPO,
    SHIPPED_VERSION,
    SmtpServer,
    free_port,
    http,
    key_in,
    service_with_key,
    smtp_env,
    verify_link,
    wait_until,
)
from .inprocess import read_all

WINDOW = (np.sin(np.arange(1300) / 20) + 0.1 * np.cos(np.arange(1300) * 3)).tolist()


def denoise(url: str, key: str) -> tuple[int, dict]:
    return http("POST", f"{url}/api/v1/denoising", {"ecg_signal": WINDOW}, {"x-api-key": key})


@pytest.mark.slow
def test_key_lifecycle(service_process, smtp, database_url):
    """Request a key, follow the mailed link, denoise with the mailed key, deactivate by mail, refused."""
    server = service_process({"DATABASE_URL": database_url, **smtp_env(smtp.port)})
    status, body = http("POST", f"{server.url}/api/v1/api-keys/generation", {"email": "New.User@Example.org"})
    assert (status, body["email"]) == (200, "new.user@example.org")

    link = verify_link(smtp.mailbox.wait_for(1)[0])
    assert link.startswith(f"{server.url}/api/v1/api-keys/verify?token=")
    status, page = http("GET", link)
    assert status == 200 and "<html" in page
    key_mail = smtp.mailbox.wait_for(2)[1]
    assert key_mail["To"] == "new.user@example.org" and key_mail.get_body(("html",)) is not None
    key = key_in(key_mail)

    status, body = denoise(server.url, key)
    assert status == 200 and body["modelVersion"] == SHIPPED_VERSION and len(body["denoised_signal"]) == 1300

    status, _ = http("POST", f"{server.url}/api/v1/api-keys/deactivation", {"email": "new.user@example.org"})
    assert status == 200
    status, page = http("GET", verify_link(smtp.mailbox.wait_for(3)[2]))
    assert status == 200 and "deactivated" in page
    assert "deactivated" in smtp.mailbox.wait_for(4)[3]["Subject"]

    assert denoise(server.url, key) == (401, {"error": "Invalid or inactive API key"})


@pytest.mark.slow
def test_restart_keeps_pending_tokens_and_keys(service_process, smtp, tmp_path):
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'restart.db'}", **smtp_env(smtp.port)}
    first = service_process(env)
    http("POST", f"{first.url}/api/v1/api-keys/generation", {"email": "keeper@example.org"})
    http("POST", f"{first.url}/api/v1/api-keys/generation", {"email": "pending@example.org"})
    links = {m["To"]: verify_link(m) for m in smtp.mailbox.wait_for(2)}
    assert http("GET", links["keeper@example.org"])[0] == 200
    key = key_in(smtp.mailbox.wait_for(3)[2])
    assert first.stop() == 0

    second = service_process(env)  # same database, new process, new port
    assert denoise(second.url, key)[0] == 200
    pending = links["pending@example.org"].replace(first.url, second.url)
    assert http("GET", pending)[0] == 200
    assert denoise(second.url, key_in(smtp.mailbox.wait_for(4)[3]))[0] == 200


@pytest.mark.slow
def test_mail_server_down_at_request_time_gets_the_mail_later(service_process, tmp_path):
    database = tmp_path / "outbox.db"
    smtp_port = free_port()  # nothing listens there yet
    env = {
        "DATABASE_URL": f"sqlite:///{database}",
        **smtp_env(smtp_port),
        "MAIL_RETRY_MIN_SECONDS": "0.1",
        "MAIL_RETRY_MAX_SECONDS": "0.3",
    }
    server = service_process(env)

    status, body = http("POST", f"{server.url}/api/v1/api-keys/generation", {"email": "patient@example.org"})
    assert (status, body["message"]) == (200, "Verification email sent. Please check your inbox.")

    def failed_attempts() -> int:
        with sqlite3.connect(database) as db:
            return db.execute("SELECT attempts FROM outbox_mail WHERE sent_at IS NULL").fetchone()[0]

    wait_until(lambda: failed_attempts() >= 2, what="failed delivery attempts")
    smtp = SmtpServer(smtp_port).start()
    try:
        link = verify_link(smtp.mailbox.wait_for(1)[0])
        assert http("GET", link)[0] == 200
        assert denoise(server.url, key_in(smtp.mailbox.wait_for(2)[1]))[0] == 200
    finally:
        smtp.stop()


@pytest.mark.slow
def test_local_run_without_smtp_writes_mails_to_log_and_folder(service_process, tmp_path):
    outbox = tmp_path / "outbox"
    server = service_process({"DATABASE_URL": f"sqlite:///{tmp_path / 'local.db'}", "OUTBOX_DIR": str(outbox)})
    assert http("POST", f"{server.url}/api/v1/api-keys/generation", {"email": "dev@example.org"})[0] == 200
    eml = wait_until(lambda: list(outbox.glob("*.eml")), what="an .eml file")
    assert "verify?token=" in eml[0].read_text()
    assert wait_until(lambda: "api-keys/verify?token=" in server.log(), what="the mail in the log")


@pytest.mark.slow
def test_health_readiness_and_oversized_body(service_process, tmp_path):
    server = service_process(
        {"DATABASE_URL": f"sqlite:///{tmp_path / 'h.db'}", "OUTBOX_DIR": str(tmp_path), "MAX_BATCH_WINDOWS": "1"}
    )
    assert http("GET", f"{server.url}/healthz") == (200, {"status": "ok"})
    assert http("GET", f"{server.url}/readyz") == (200, {"status": "ready", "model": True, "database": True})
    assert http("HEAD", f"{server.url}/healthz") == http("HEAD", f"{server.url}/readyz") == (200, "")
    limit = 1 << 20  # the floor of the body limit

    def answer_to_headers(path: str, length: int) -> bytes:
        """The answer to a POST whose headers declare ``length`` bytes, none of them sent: a
        body past the route's limit is refused from its headers, unread (a client still sending
        it may meet a closed connection, as with any server that refuses early)."""
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
            client.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path.encode(), length))
            answer = b""
            while part := client.recv(65536):
                answer += part
        return answer

    oversized = answer_to_headers("/api/v1/denoising", limit + 1)
    assert oversized.startswith(b"HTTP/1.1 413 ")
    assert oversized.endswith(b'{"error":"Request body too large (limit %d bytes)"}' % limit)
    # A route that takes an email address refuses a body past 16 KiB: waitress would have
    # spooled up to an hour's recording to disk before the app saw it.
    keys = answer_to_headers("/api/v1/api-keys/generation", 100_000_000)
    assert keys.startswith(b"HTTP/1.1 413 ") and keys.endswith(
        b'{"error":"Request body too large (limit 16384 bytes)"}'
    )
    # So do the routes that take no body, and unknown paths: they were taken for uploads and
    # answered "Missing x-api-key header" before the body was read.
    for path in ("/healthz", "/openapi.json", "/no/such/route"):
        assert answer_to_headers(path, 100_000).endswith(b'{"error":"Request body too large (limit 16384 bytes)"}')
    assert http("POST", f"{server.url}/healthz", {"a": 1})[0] == 405
    server.signal(signal.SIGHUP)  # a closed terminal: it drains, as for SIGTERM (it used to stop at once)
    assert server.wait() == 0 and "Draining" in server.log()


@pytest.fixture
def start_in_process(monkeypatch, capfd):
    """``python -m service``'s ``main`` in this process, with exactly the given variables set:
    returns its exit code and what it, or the process of its start-up checks (with several
    workers), wrote to stderr (start-up failures end before serving)."""

    def start(env: dict[str, str]) -> tuple[int, str]:
        for f in dataclasses.fields(Config):
            monkeypatch.delenv(f.metadata["env"], raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        code = main()
        return code, capfd.readouterr().err.strip()

    return start


def _identity_model(shape: list) -> bytes:
    """A valid ONNX model with the contract's names, of the given input shape."""
    import onnx
    from onnx import helper

    tensor = partial(helper.make_tensor_value_info, elem_type=onnx.TensorProto.FLOAT, shape=shape)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["ecg"], ["denoised"])], "g", [tensor("ecg")], [tensor("denoised")]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("missing", "does not exist"),
        ("corrupt", "does not match its manifest"),
        ("unlisted", "has no sha256 for"),
        ("version past an int", "must be from 0 to 2147483647 (got 18446744073709551616)"),  # answers were 500s
        ("another window", "takes tensor(float) of shape ['n', 1, 1000], not the contract's float N×1×1300 windows"),
    ],
)
def test_bad_model_stops_the_start_with_one_sentence(start_in_process, tmp_path, problem, expected):
    model = tmp_path / MODEL.name
    manifest = tmp_path / "manifest.json"
    manifest.write_text((MODEL.parent / "manifest.json").read_text())
    if problem == "corrupt":
        data = bytearray(MODEL.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model.write_bytes(bytes(data))
    elif problem == "unlisted":
        model = tmp_path / "other.onnx"
        model.write_bytes(MODEL.read_bytes())
    elif problem.startswith("version"):
        model.write_bytes(MODEL.read_bytes())
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "model_version": 2**64}))
    elif problem == "another window":
        model.write_bytes(_identity_model(["n", 1, 1000]))
        entries = json.loads(manifest.read_text())
        entries["models"][model.name]["sha256"] = hashlib.sha256(model.read_bytes()).hexdigest()
        manifest.write_text(json.dumps(entries))
    code, output = start_in_process({"MODEL_PATH": str(model), "DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"})
    assert code == 1
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1 and expected in output, output
    assert "secret" not in output and "'se'" not in output  # nothing of a password


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL must start with sqlite:/// or postgresql://"),
        ({"DATABASE_URL": "sqlite:///"}, "DATABASE_URL must name an SQLite file"),  # a traceback, once
        ({"DATABASE_URL": "sqlite:///:memory:"}, "DATABASE_URL must name an SQLite file"),
        ({"DATABASE_URL": "sqlite:///no/such/folder/x.db"}, "names a file in no/such/folder, which is not a folder"),
        ({"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "SECRET_KEY": "k"}, "cannot be used"),
        # Refused before the database is reached: a start that created the tables, then stopped.
        ({"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}, "SECRET_KEY must be set with PostgreSQL"),
        ({"PORT": "eighty"}, "PORT must be an integer"),
        ({"SMTP_SECURITY": "tls"}, "SMTP_SECURITY must be one of"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL must be one of"),
        ({"BATCH_MAX_SIZE": "0"}, "BATCH_MAX_SIZE must be at least 1"),
        ({"ORT_SPINNING": "maybe"}, "ORT_SPINNING must be on or off"),
        ({"PORT": "99999"}, "PORT must be at most 65535"),  # it served on 99999 - 65536
        ({"METRICS_PORT": "70000"}, "METRICS_PORT must be at most 65535"),
        ({"MAX_RECORD_SECONDS": "inf"}, "MAX_RECORD_SECONDS must be a finite number"),
        ({"SHUTDOWN_GRACE_SECONDS": "nan"}, "SHUTDOWN_GRACE_SECONDS must be a finite number"),  # no drain at all
        ({"DATABASE_URL": "postgresql://u:secret@db:99999/x"}, "DATABASE_URL is not a valid URL: its port"),
        ({"DATABASE_URL": "postgresql://u:se/cret@db:5432/x"}, "DATABASE_URL is not a valid URL: its port"),  # no "se"
        ({"DATABASE_URL": "postgresql://u@[::1/x"}, "DATABASE_URL is not a valid URL: its port"),
        ({"PORT": "0"}, "PORT=0 (any free port) needs BASE_URL"),  # the links would name port 0
        ({"WORKER_TIMEOUT_SECONDS": "1"}, "WORKER_TIMEOUT_SECONDS must be 0 (off) or at least 5 (got 1)"),
        ({"MODEL_VERSION": str(2**64)}, "MODEL_VERSION must be at most 2147483647"),
        ({"ORT_LONE_THREADS": "100000"}, "ORT_LONE_THREADS must be at most 256"),  # the start hung, gigabytes on
        ({"WEB_THREADS": "8", "RECORD_CONCURRENCY": "5"}, "RECORD_CONCURRENCY must be at most half of WEB_THREADS, 4"),
        ({"MAIL_RETRY_MIN_SECONDS": "100", "MAIL_RETRY_MAX_SECONDS": "10"}, "MAIL_RETRY_MIN_SECONDS must be at most"),
    ],
)
def test_bad_configuration_stops_the_start_with_one_sentence(start_in_process, tmp_path, env, expected):
    code, output = start_in_process({"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "ORT_LONE_THREADS": "1", **env})
    assert code == 1
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1 and expected in output, output


@pytest.mark.slow
def test_sigterm_lets_a_long_request_finish_and_refuses_new_ones(service_process, tmp_path):
    """A single process drains: a recording whose upload ends after waitress's own 5 s wait (which
    then tore the runtime down under the request) is answered in full, while the connections
    that come after SIGTERM are refused."""
    server, key = service_with_key(service_process, tmp_path, {"WEB_WORKERS": "1", "DENOISE_RATE_PER_SECOND": "0"})
    samples = (np.sin(np.arange(130 * 60) / 20) * 100).astype("<f4")  # a minute
    body = samples.tobytes()
    head = (
        "POST /api/v1/denoising/record?sampling_rate=130 HTTP/1.1\r\nHost: x\r\n"
        f"x-api-key: {key}\r\nContent-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as client:
        client.sendall(head + body[:1000])
        time.sleep(0.5)  # the request under way
        server.signal(signal.SIGTERM)
        wait_until(lambda: http_refused(server.url), 5, "new connections refused")
        rest = body[1000:]
        for n in range(12):  # over 6 s, past waitress's 5 (at a pace the upload rules allow)
            client.sendall(rest[n * len(rest) // 12 : (n + 1) * len(rest) // 12])
            time.sleep(0.5)
        answer = read_all(client)
    status, _, data = answer.partition(b"\r\n\r\n")
    out = np.frombuffer(data, dtype="<f4")
    assert status.startswith(b"HTTP/1.1 200 ") and len(out) == len(samples) and np.all(np.isfinite(out))
    assert np.corrcoef(out, samples)[0, 1] > 0.9
    assert server.wait() == 0
    assert "Draining" in server.log() and "Traceback" not in server.log()


def http_refused(url: str) -> bool:
    try:
        http("GET", f"{url}/healthz")
    except OSError:
        return True
    return False


def test_an_open_files_limit_with_no_room_for_clients_stops_the_start_with_one_sentence(tmp_path):
    """With the limit at 64, every descriptor went to the process's own files: it served on, up
    to 0 connections, and answered nothing, health checks included."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'f.db'}",
        "WEB_WORKERS": "1",
        "WEB_THREADS": "16",
        "PORT": "0",
        "BASE_URL": "http://127.0.0.1",
        "ORT_LONE_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)),
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "heartify: the open-files limit (64) leaves room for 0 client connections: raise it (ulimit -n) to at least 160."
    )
