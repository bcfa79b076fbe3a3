"""A throwaway PostgreSQL cluster for fault tests: its own data folder and free loopback port,
so a test can stop, freeze (SIGSTOP) and restart it without touching the shared server on 5432.

``initdb`` refuses to run as root, so the cluster runs as the ``postgres`` user when the tests
run as root. The data folder is made once per session and copied for each cluster.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

BIN_CANDIDATES = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin")


def _bin(name: str) -> str | None:
    for folder in BIN_CANDIDATES:
        if os.access(f"{folder}/{name}", os.X_OK):
            return f"{folder}/{name}"
    return shutil.which(name)


def missing() -> str | None:
    """Why no cluster can be made here, or None."""
    if _bin("initdb") is None or _bin("pg_ctl") is None:
        return "initdb and pg_ctl (PostgreSQL server binaries) are not installed"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user for initdb"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_owner(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        args = ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in args)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kwargs)


_template: Path | None = None


def _template_folder() -> Path:
    """One initdb per test session; each cluster starts from a copy."""
    global _template
    if _template is None:
        root = Path(tempfile.mkdtemp(prefix="hf-pg-template-"))
        atexit.register(shutil.rmtree, root, True)
        _chown(root)
        done = _as_owner([_bin("initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "postgres", "--no-sync"])
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip()}")
        _template = root / "data"
    return _template


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")
        os.chmod(path, 0o700)


class PgCluster:
    """``start``/``stop`` a cluster in ``folder``; ``freeze``/``thaw`` its postmaster and backends."""

    def __init__(self) -> None:
        # Not under pytest's tmp_path: its parents are private to root, and the server runs as
        # the postgres user.
        self.folder = Path(tempfile.mkdtemp(prefix="hf-pg-"))
        self.port = _free_port()
        self.data = self.folder / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> PgCluster:
        if not self.data.exists():
            _chown(self.folder)
            shutil.copytree(_template_folder(), self.data)
            if os.geteuid() == 0:
                subprocess.run(["chown", "-R", "postgres:postgres", str(self.folder)], check=True)
            os.chmod(self.data, 0o700)
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        done = _as_owner(
            [_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w", "start"]
        )
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()} {done.stdout.strip()}")
        return self

    def stop(self) -> None:
        self.thaw()
        _as_owner([_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _pids(self) -> list[int]:
        """The postmaster and every backend: all processes whose parent is the postmaster."""
        try:
            postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        return [postmaster, *map(int, children)]

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and every query hangs, as on a hung server."""
        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
