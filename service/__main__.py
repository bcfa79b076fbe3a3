"""``python -m service``: serve the API with waitress, configured from the environment.

Start-up failures print one sentence to stderr and exit 1. SIGTERM (``docker stop``) and Ctrl-C
stop accepting requests, let the batcher finish, flush ``last_used`` and close the database.
"""

from __future__ import annotations

import logging
import signal
import sys
from contextlib import ExitStack

from service import logs
from service.app import create_app
from service.config import Config, ConfigError
from service.runtime import Runtime, StartupError
from service.server import create_server

log = logging.getLogger("service")


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(0)  # waitress's run loop catches it and shuts its threads down


def main() -> int:
    with ExitStack() as stack:
        try:
            config = Config.from_env()
            logs.configure(config.log_level)
            runtime = stack.enter_context(Runtime(config))
        except (ConfigError, StartupError) as exc:
            print(f"heartify: {exc}", file=sys.stderr)
            return 1
        try:
            server = create_server(create_app(runtime.deps), config)
        except OSError as exc:
            print(f"heartify: cannot listen on {config.host}:{config.port} ({exc.strerror or exc}).", file=sys.stderr)
            return 1
        stack.callback(server.close)
        signal.signal(signal.SIGTERM, _terminate)
        log.info(
            "Serving on http://%s:%s with %d threads, up to %d connections",
            config.host,
            server.effective_port,
            config.web_threads,
            server.adj.connection_limit,
        )
        server.run()
    log.info("Stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
