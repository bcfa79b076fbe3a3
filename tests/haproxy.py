"""HAProxy in front of service replicas for the replica tests: Debian's ``haproxy`` binary, run in
the foreground from a generated configuration on a free loopback port, with HTTP health checks on
``/readyz`` (and, as deploy/haproxy.cfg, on ``/healthz`` for when none is ready) and a stats
socket that tells which servers it considers up.
"""

from __future__ import annotations

import csv
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

# Health checks every 500 ms; a server is out after 2 failed checks and back after 1 good one.
# A connection refused by a dead server is retried on another one (redispatch), so only the
# requests that were already on it when it died can fail.
CONFIG = """\
global
    maxconn 512
    stats socket {socket} mode 600 level user

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout check 1s
    retries 3
    option redispatch 1
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter 500ms fall 2 rise 1

frontend api
    bind 127.0.0.1:{port}
    http-request set-header X-Forwarded-For %[src]
    use_backend alive if {{ nbsrv(replicas) eq 0 }}
    default_backend replicas

backend replicas
    balance roundrobin
{servers}

backend alive
    balance roundrobin
    option httpchk GET /healthz
    http-check expect status 200
{servers}
"""


def missing() -> str | None:
    """Why no balancer can be started here, or None."""
    if shutil.which("haproxy") is None:
        return "haproxy is not installed (Debian: apt-get install haproxy)"
    return None


class HaProxy:
    """Listens on ``port`` of 127.0.0.1 in front of ``servers`` (name → loopback port). Started
    before the servers are (it binds its port at once; their links can point at it), it marks
    them up as their checks pass: ``wait_until_up``. ``states`` reads each server's status."""

    def __init__(self, folder: Path, port: int, servers: dict[str, int]) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self._servers = servers
        self._folder = folder
        self._socket = folder / "haproxy.sock"
        self._process: subprocess.Popen | None = None

    def config(self) -> str:
        servers = "\n".join(f"    server {name} 127.0.0.1:{port}" for name, port in self._servers.items())
        return CONFIG.format(socket=self._socket, port=self.port, servers=servers)

    def start(self, timeout_s: float = 10.0) -> HaProxy:
        """Returns once HAProxy answers on its stats socket, its port bound."""
        path = self._folder / "haproxy.cfg"
        path.write_text(self.config())
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(path)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refuses {path}: {check.stderr.strip()}")
        with open(self._folder / "haproxy.log", "ab") as log:
            self._process = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdout=log, stderr=subprocess.STDOUT)
        self._wait(lambda: self._rows() is not None, timeout_s, "start")
        return self

    def wait_until_up(self, timeout_s: float = 10.0) -> None:
        """Until every server is up after a passed health check (not merely up by default)."""

        def all_up() -> bool:
            rows = self._rows() or []
            checked = [r for r in rows if r["status"] == "UP" and r["check_status"] == "L7OK"]
            return len(checked) == len(self._servers)

        self._wait(all_up, timeout_s, "bring every server up")

    def _wait(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"haproxy did not {what}: {self.log()}")
            time.sleep(0.05)

    def states(self) -> dict[str, str]:
        """Each server's status as HAProxy sees it: UP, DOWN, ``UP 1/2`` (going down), …"""
        return {row["svname"]: row["status"] for row in self._rows() or []}

    def _rows(self) -> list[dict[str, str]] | None:
        """The servers' rows of ``show stat``; None while the stats socket does not answer."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                sock.connect(str(self._socket))
                sock.sendall(b"show stat\n")
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        except OSError:
            return None
        rows = csv.DictReader(b"".join(chunks).decode().lstrip("# ").splitlines())
        return [row for row in rows if row["pxname"] == "replicas" and row["svname"] in self._servers]

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(10)

    def log(self) -> str:
        path = self._folder / "haproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""
