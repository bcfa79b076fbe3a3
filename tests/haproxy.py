"""HAProxy in front of service replicas for the replica tests: Debian's ``haproxy`` binary, run in
the foreground from a generated configuration on a free loopback port, with HTTP health checks on
``/readyz`` and a stats socket that tells which servers it considers up.
"""

from __future__ import annotations

import csv
import shutil
import socket
import subprocess
import time
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
    default_backend replicas

backend replicas
    balance roundrobin
{servers}
"""


def missing() -> str | None:
    """Why no balancer can be started here, or None."""
    if shutil.which("haproxy") is None:
        return "haproxy is not installed (Debian: apt-get install haproxy)"
    return None


class HaProxy:
    """Listens on ``port`` of 127.0.0.1 (known before the servers start, so their links can point
    at it); ``start`` returns once every server is up; ``states`` reads each server's status."""

    def __init__(self, folder: Path, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self._servers: dict[str, int] = {}
        self._folder = folder
        self._socket = folder / "haproxy.sock"
        self._process: subprocess.Popen | None = None

    def config(self) -> str:
        """The configuration for the servers (name → loopback port) given to ``start``."""
        servers = "\n".join(f"    server {name} 127.0.0.1:{port}" for name, port in self._servers.items())
        return CONFIG.format(socket=self._socket, port=self.port, servers=servers)

    def start(self, servers: dict[str, int], timeout_s: float = 10.0) -> HaProxy:
        self._servers = servers
        path = self._folder / "haproxy.cfg"
        path.write_text(self.config())
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(path)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refuses {path}: {check.stderr.strip()}")
        with open(self._folder / "haproxy.log", "ab") as log:
            self._process = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self._all_up():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"haproxy did not bring every server up: {self.log()}")
            time.sleep(0.05)
        return self

    def _all_up(self) -> bool:
        try:
            states = self.states()
        except OSError:
            return False
        return len(states) == len(self._servers) and all(s == "UP" for s in states.values())

    def states(self) -> dict[str, str]:
        """Each server's status as HAProxy sees it: UP, DOWN, ``UP 1/2`` (going down), …"""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(self._socket))
            sock.sendall(b"show stat\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        rows = csv.DictReader(b"".join(chunks).decode().lstrip("# ").splitlines())
        return {row["svname"]: row["status"] for row in rows if row["svname"] in self._servers}

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(10)

    def log(self) -> str:
        path = self._folder / "haproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""
