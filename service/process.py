"""What every process of the service does at its start and stop: read its configuration, refuse
with one sentence (never a traceback) when it cannot go on, and know the signals that stop it."""

from __future__ import annotations

import signal
import sys

from service import logs
from service.config import Config, ConfigError


def refuse(problem: object) -> int:
    """A start or a command that cannot go on: its one sentence on stderr; the exit code, 1."""
    print(f"heartify: {problem}", file=sys.stderr)
    return 1


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
