"""What every process of the service does at its start and stop: read its configuration, refuse
with one sentence (never a traceback) when it cannot go on, and know the signals that stop it."""

from __future__ import annotations

import ctypes
import signal
import sys

from service import logs
from service.config import Config, ConfigError


class StartupError(Exception):
    """The service cannot start; the message is one sentence."""


def refuse(problem: object) -> int:
    """A start or a command that cannot go on: its one sentence on stderr; the exit code, 1."""
    print(f"heartify: {problem}", file=sys.stderr)
    return 1


# glibc's mallopt parameter, and its default value, which setting it keeps from moving.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 << 10


def give_back_large_blocks() -> None:
    """Keep glibc's malloc from keeping a recording's memory. Each time a block above its mmap
    threshold is freed, glibc raises the threshold to that block's size (up to 32 MiB); past
    that, a recording's arrays came from the heap, which keeps what is freed in its middle, and
    each recording left a worker larger (docs/performance.md, Memory). Set once, the
    threshold stays: every large array has a mapping of its own, unmapped when freed (the
    windows' arrays are smaller). Elsewhere than glibc, nothing to set."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def configured() -> Config | None:
    """The configuration from the environment, logging set up; None (one sentence on stderr) if unusable."""
    try:
        config = Config.from_env()
    except ConfigError as exc:
        refuse(exc)
        return None
    logs.configure(config.log_level)
    return config


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that drain and stop the service: SIGTERM, and SIGHUP (a closed terminal; there
    is nothing to reload) unless it was ignored when the service started, as ``nohup`` does."""
    hangup = () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGTERM, *hangup)


def cannot_listen(host: str, port: int, exc: OSError) -> int:
    """The one sentence for a port that cannot be bound; the exit code."""
    return refuse(f"cannot listen on {host}:{port} ({exc.strerror or exc}).")
