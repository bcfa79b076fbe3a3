"""Slow clients cannot starve the others: 500 raw sockets trickle request headers at a real
``python -m service`` with the default connection limit (the timeouts shortened so the test is
short), and meanwhile the probes and a denoise answer; then the server times them out, and
closes a connection that sends nothing."""

from __future__ import annotations

import socket

import numpy as np
import orjson
import pytest

from benchmarks.slow_clients import Tricklers, probe
from tests.service.conftest import service_with_key, wait_until

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
    finally:
        tricklers.close()
        idle.close()
