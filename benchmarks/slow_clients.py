"""Slow clients: do trickling connections starve the others?

`python -m benchmarks.slow_clients` starts `python -m service` on a free loopback port (SQLite,
mails to an outbox folder, a real key through the mailed links), opens ``--connections`` raw
sockets that each send one byte of a never-ending request header every second, and while they
trickle, for ``--seconds``, asks ``/healthz``, ``/readyz`` and a valid denoise once a second
each on fresh connections. It reports each probe's worst latency and failures (none answered
within ``--timeout``), and when the server closed the trickling sockets (each is replaced by a new one at once, so
``--connections`` trickle all along). ``--env NAME=VALUE``
sets the service's variables, e.g. the connection settings of an earlier default; ``--idle``
opens connections that send nothing, to measure what open connections cost the others.
"""

from __future__ import annotations

import argparse
import http.client
import json
import selectors
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import machine, save
from benchmarks.http import ROOT, Server
from export.synth import noisy_windows

HEADER = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Trickle: " + b"a" * 4096


class Tricklers:
    """``count`` sockets in one thread, each sending the next byte of ``HEADER`` every
    ``interval`` seconds (``idle``: nothing at all). Per socket the server closed, ``closed``
    holds the seconds from its connect and what the server sent before closing; with
    ``reconnect`` each is replaced at once, so ``count`` keep trickling all along."""

    def __init__(self, port: int, count: int, idle: bool = False, interval: float = 1.0, reconnect: bool = True):
        self.closed: list[tuple[float, bytes]] = []
        self.connect_failures = 0
        self._port, self._count, self._idle, self._interval, self._reconnect = port, count, idle, interval, reconnect
        self._selector = selectors.DefaultSelector()
        self._socks: dict[socket.socket, list] = {}  # connect time, bytes sent, bytes received
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Tricklers:
        for _ in range(self._count):
            self._connect()
        self.started = time.monotonic()
        self._thread.start()
        return self

    @property
    def open(self) -> int:
        return len(self._socks)

    def _connect(self) -> None:
        sock = socket.socket()
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", self._port))
        except OSError:
            self.connect_failures += 1
            sock.close()
            return
        sock.setblocking(False)
        self._socks[sock] = [time.monotonic(), 0, b""]
        self._selector.register(sock, selectors.EVENT_READ)

    def _drop(self, sock: socket.socket) -> None:
        connected, _, received = self._socks.pop(sock)
        self.closed.append((time.monotonic() - connected, received))
        self._selector.unregister(sock)
        sock.close()
        if self._reconnect and not self._stop.is_set():
            self._connect()

    def _run(self) -> None:
        next_round = time.monotonic()
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=max(0.0, next_round - time.monotonic())):
                try:
                    data = key.fileobj.recv(65536)
                except OSError:
                    data = b""
                if data:  # an answer: the server times the request out
                    self._socks[key.fileobj][2] += data
                else:
                    self._drop(key.fileobj)
            if time.monotonic() < next_round:
                continue
            next_round += self._interval
            for sock, state in [] if self._idle else list(self._socks.items()):
                try:
                    sock.send(HEADER[state[1] % len(HEADER)].to_bytes())
                    state[1] += 1
                except BlockingIOError:
                    pass
                except OSError:
                    self._drop(sock)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for sock in list(self._socks):
            sock.close()


def probe(port: int, method: str, path: str, body: bytes | None, headers: dict, timeout: float) -> tuple[int, float]:
    """One request on a fresh connection: its status (0: no answer in time) and seconds taken."""
    start = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status, time.monotonic() - start
    except OSError:
        return 0, time.monotonic() - start
    finally:
        connection.close()


def scenario(connections: int, seconds: float, timeout: float, env: dict[str, str], idle: bool = False) -> dict:
    window = [round(float(v), 4) for v in noisy_windows(np.random.default_rng(0), 1)[0]]
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp), ROOT / "artifacts" / "attention_unet.onnx", {"LOG_LEVEL": "INFO", **env})
        try:
            key = server.api_key()
            denoise = (
                "POST",
                "/api/v1/denoising",
                json.dumps({"ecg_signal": window}).encode(),
                {"Content-Type": "application/json", "x-api-key": key},
            )
            probes = {
                "healthz": ("GET", "/healthz", None, {}),
                "readyz": ("GET", "/readyz", None, {}),
                "denoise": denoise,
            }
            tricklers = Tricklers(server.port, connections, idle).start()
            futures: dict[str, list[Future]] = {name: [] for name in probes}
            open_counts = []
            # Each probe in a thread of its own, once a second, whether or not the last one answered.
            with ThreadPoolExecutor(max_workers=len(probes) * int(timeout + 2)) as pool:
                for tick in range(int(seconds)):
                    time.sleep(max(0.0, tricklers.started + tick + 1 - time.monotonic()))
                    for name, args in probes.items():
                        futures[name].append(pool.submit(probe, server.port, *args, timeout=timeout))
                    open_counts.append(tricklers.open)
            results = {name: [f.result() for f in done] for name, done in futures.items()}
            tricklers.close()
        finally:
            server.stop()
    summary = {
        "connections": connections,
        "idle": idle,
        "seconds": seconds,
        "env": env,
        "connect_failures": tricklers.connect_failures,
        "trickling_open_min": min(open_counts),
        "trickling_open_end": open_counts[-1],
        "closed_by_server": len(tricklers.closed),  # and reopened
        "closed_after_s_median": statistics.median(t for t, _ in tricklers.closed) if tricklers.closed else None,
    }
    for name, rows in results.items():
        answered = [t for status, t in rows if status == 200]
        summary[name] = {
            "probes": len(rows),
            "ok": len(answered),
            "failed": len(rows) - len(answered),
            "within_2s": sum(1 for status, t in rows if status == 200 and t <= 2.0),
            "median_s": statistics.median(t for _, t in rows),
            "max_s": max(t for _, t in rows),
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.slow_clients", description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--timeout", type=float, default=5, help="a probe not answered within this failed")
    parser.add_argument("--idle", action="store_true", help="the connections send nothing (idle keep-alive clients)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--label", default="slow-clients")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    summary = scenario(args.connections, args.seconds, args.timeout, env, args.idle)
    print(json.dumps(summary, indent=2))
    print(f"saved {save(args.label, {'machine': machine(), **summary})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
