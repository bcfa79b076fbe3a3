"""``python -m service``: serve the API with waitress, configured from the environment.

Start-up failures print one sentence to stderr and exit 1. SIGTERM (``docker stop``) and Ctrl-C
stop accepting requests, let the batcher finish, flush ``last_used`` and close the database.
"""

from __future__ import annotations

import logging
import signal
import sys
from contextlib import ExitStack

import waitress

from service import logs
from service.app import create_app
from service.config import Config, ConfigError
from service.runtime import Runtime, StartupError

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
            server = waitress.create_server(
                create_app(runtime.deps),
                host=config.host,
                port=config.port,
                threads=config.web_threads,
                # Bodies declared larger than this are refused unread (plain-text 413); between the
                # app's limit and this one the app answers a JSON 413. Waitress reads a body whole
                # before the app sees it, so the record route's large limit gets only 1 MiB more.
                max_request_body_size=max(
                    4 * config.max_body_bytes, config.record_body_bytes(binary=False) + (1 << 20)
                ),
                ident="heartify",
                recv_bytes=1 << 16,  # a one-window body in one read instead of four
            )
        except OSError as exc:
            print(f"heartify: cannot listen on {config.host}:{config.port} ({exc.strerror or exc}).", file=sys.stderr)
            return 1
        stack.callback(server.close)
        signal.signal(signal.SIGTERM, _terminate)
        log.info("Serving on http://%s:%s with %d threads", config.host, server.effective_port, config.web_threads)
        server.run()
    log.info("Stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
