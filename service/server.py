"""One serving process: the runtime, the Falcon app and waitress, until SIGTERM or Ctrl-C.

SIGTERM (or SIGHUP) drains (``connections.Server.drain``): the requests under way finish, for up to
``SHUTDOWN_GRACE_SECONDS``, before the runtime stops. Ctrl-C stops at once.

``python -m service`` runs it directly when ``WEB_WORKERS=1``; with more, each worker of
``service.workers`` runs it on the listening socket its supervisor bound.
"""

from __future__ import annotations

import logging
import signal
import socket
import tempfile
from collections.abc import Callable
from contextlib import ExitStack

from service.app import create_app, server_rules
from service.config import Config, ConfigError
from service.connections import Parent, create_server
from service.metrics import MetricsPort, exposition_registry
from service.occupancy import Occupancy
from service.process import StartupError, cannot_listen, give_back_large_blocks, refuse, stop_signals
from service.runtime import Runtime

log = logging.getLogger("service")


def serve(
    config: Config,
    listener: socket.socket | None = None,
    on_ready: Callable[[], None] | None = None,
    occupancy: Occupancy | None = None,
    parent: Parent | None = None,
) -> int:
    """Serve until stopped; 0 after a clean stop, 1 (and one sentence on stderr) if it cannot start.

    ``listener``, ``occupancy``, ``parent``: a worker's bound socket, its slot among the workers
    and its supervisor; else bind ``config.host:config.port``, alone on the machine.
    """
    # Where waitress spools large bodies: chosen now, while TMPDIR can be written, not at the first
    # upload, when tempfile would pass over a full TMPDIR for another directory without a word.
    tempfile.gettempdir()
    give_back_large_blocks()
    with ExitStack() as stack:
        try:
            runtime = stack.enter_context(Runtime(config, occupancy=occupancy))
        except (ConfigError, StartupError) as exc:
            return refuse(exc)
        try:
            deps = runtime.deps
            server = create_server(create_app(deps), config, server_rules(deps), listener, parent)
        except OSError as exc:
            return cannot_listen(config.host, config.port, exc)
        except ConfigError as exc:
            return refuse(exc)
        except RuntimeError as exc:
            if "can't start new thread" not in str(exc):
                raise
            return refuse(f"cannot start {config.web_threads} web threads ({exc}): lower WEB_THREADS.")
        stack.callback(server.close)
        if listener is None and runtime.deps.metrics is not None and config.metrics_port:
            metrics_port = MetricsPort(
                config.host, config.metrics_port, exposition_registry(runtime.deps.metrics.registry)
            )
            stack.callback(metrics_port.close)
            try:
                metrics_port.start()
            except OSError as exc:
                return cannot_listen(config.host, config.metrics_port, exc)

        def stop(signum: int, frame: object) -> None:
            server.drain(config.shutdown_grace_s)
            runtime.outbox.stop()  # the mail under way ends while the requests do

        for signum in stop_signals():
            signal.signal(signum, stop)
        log.info(
            "Serving on http://%s:%s with %d threads, up to %d connections",
            config.host,
            server.effective_port,
            config.web_threads,
            server.adj.connection_limit,
        )
        if on_ready is not None:
            on_ready()
        server.run()
    log.info("Stopped")
    return 0
