"""Slow clients cannot starve the others: 500 raw sockets trickle request headers at a real
``python -m service`` with the default connection limit (the timeouts shortened so the test is
short), and meanwhile the probes and a denoise answer; then the server times them out, and
closes a connection that sends nothing. And uploads past the open-files limit wait their turn."""

from __future__ import annotations

import re
import socket
import sys
import threading
import time

import numpy as np
import orjson
import pytest

from benchmarks.slow_clients import Tricklers, probe
from tests.service.conftest import service_with_key, wait_until
from tests.service.inprocess import read_all

TRICKLERS = 500
HEADER_TIMEOUT_S = 4.0
CHANNEL_TIMEOUT_S = 2.0


@pytest.mark.slow
def test_slow_clients_neither_block_the_others_nor_stay(service_process, tmp_path):
    timeouts = {"HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT_S), "CHANNEL_TIMEOUT_SECONDS": str(CHANNEL_TIMEOUT_S)}
    service, key = service_with_key(service_process, tmp_path, timeouts)
    window = np.sin(np.arange(1300) / 5).tolist()
    denoise = (
        "POST",
        "/api/v1/denoising",
        orjson.dumps({"ecg_signal": window}),
        {"Content-Type": "application/json", "x-api-key": key},
    )
    idle = socket.create_connection(("127.0.0.1", service.port), timeout=CHANNEL_TIMEOUT_S + 3)
    # Blank lines, which may precede a request, kept a connection open past every timeout.
    blank = socket.create_connection(("127.0.0.1", service.port), timeout=CHANNEL_TIMEOUT_S + 3)
    blank_closed: list[float] = []
    sending = threading.Thread(target=send_blank_lines, args=(blank, HEADER_TIMEOUT_S + 8, blank_closed), daemon=True)
    sending.start()
    tricklers = Tricklers(service.port, TRICKLERS, interval=0.5, reconnect=False).start()
    try:
        assert tricklers.open == TRICKLERS
        for request in [("GET", "/healthz", None, {}), ("GET", "/readyz", None, {}), denoise]:
            status, seconds = probe(service.port, *request, timeout=2.0)
            assert (request[1], status) == (request[1], 200), f"no answer within {seconds:.1f} s"
        assert tricklers.open == TRICKLERS  # all still trickling while the others were served

        wait_until(lambda: tricklers.open == 0, HEADER_TIMEOUT_S + 5, "the server to close the trickling connections")
        assert min(seconds for seconds, _ in tricklers.closed) >= HEADER_TIMEOUT_S - 0.5
        answers = {received.split(b"\r\n", 1)[0] for _, received in tricklers.closed}
        assert answers == {b"HTTP/1.1 408 Request Timeout"}
        assert tricklers.closed[0][1].endswith(b'{"error":"Request headers not received within 4 seconds"}')
        assert idle.recv(1) == b""  # closed without an answer
        sending.join()
        assert blank_closed, "the connection that sent blank lines is still open"
    finally:
        tricklers.close()
        idle.close()
        blank.close()


def send_blank_lines(sock: socket.socket, seconds: float, closed: list[float]) -> None:
    """A blank line every 0.3 s for ``seconds``, or until the server has closed the connection."""
    started = time.monotonic()
    while time.monotonic() < started + seconds:
        try:
            sock.sendall(b"\r\n")
        except OSError:  # the server closed it, and reset it at the next line
            closed.append(time.monotonic() - started)
            return
        time.sleep(0.3)


@pytest.mark.slow
def test_uploads_past_the_open_files_limit_wait_their_turn_and_health_checks_answer(service_process, tmp_path):
    """Each upload past 64 KiB holds a descriptor for the file its body is spooled to, beside
    its socket, and a client that pipelines holds two (the server reads one request ahead).
    With the open-files limit low, the connection limit counted one a connection: a few hundred
    such uploads used the last descriptors, bodies were dropped unanswered, and accept() failed
    in a loop that held the health checks. Those past the limit now wait in the listen queue
    (as every connection past it does, health checks included), and all are served."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nulimit -n 256\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    env = {"WEB_WORKERS": "1", "WEB_THREADS": "16", "DENOISE_RATE_PER_SECOND": "0"}
    service, key = service_with_key(service_process, tmp_path, env, python=str(python))
    assert "CONNECTION_LIMIT lowered to 48" in service.log()  # (256 - 64 - 3 × 16) ÷ 3
    body = orjson.dumps({"ecg_signals": [np.sin(np.arange(1300) / 5).tolist()]})
    body = body[:-1] + b" " * (70_000 - len(body)) + b"}"  # one window in 70 KB: spooled, quick to denoise
    head = b"POST /api/v1/denoising/batch HTTP/1.1\r\nHost: x\r\nx-api-key: %s\r\n" % key.encode()
    head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    uploads = []
    try:
        for _ in range(100):
            upload = socket.create_connection(("127.0.0.1", service.port), timeout=60)
            # Two, pipelined, all but the last byte: each holds a spool file.
            upload.sendall(head + b"\r\n" + body + head + b"Connection: close\r\n\r\n" + body[:-1])
            uploads.append(upload)
        for upload in uploads:
            upload.sendall(body[-1:])
        answers = [re.findall(rb"HTTP/1\.1 (\d{3}) ", read_all(upload)) for upload in uploads]
    finally:
        for upload in uploads:
            upload.close()
    assert answers == [[b"200", b"200"]] * len(uploads)
    assert "Too many open files" not in service.log()
    assert probe(service.port, "GET", "/healthz", None, {}, timeout=5.0)[0] == 200
