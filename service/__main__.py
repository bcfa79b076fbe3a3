"""``python -m service``: serve the API with waitress, configured from the environment.

Start-up failures print one sentence to stderr and exit 1. SIGTERM (``docker stop``) and Ctrl-C
stop accepting requests, let the batcher finish, flush ``last_used`` and close the database.
"""
from __future__ import annotations

import logging
import math
import signal
import sys
import time

import waitress

from service.app import create_app
from service.config import Config, ConfigError
from service.runtime import Runtime, StartupError

log = logging.getLogger("service")


class QueueDepthSummary(logging.Filter):
    """waitress warns once per request that waits for a free web thread: under steady load that
    is hundreds of lines a minute. Let one through per ``interval_s``, naming the deepest queue."""

    def __init__(self, interval_s: float = 60.0) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._last = -math.inf
        self._deepest = 0

    def filter(self, record: logging.LogRecord) -> bool:
        depth = record.args[0] if isinstance(record.args, tuple) and record.args else 0
        self._deepest = max(self._deepest, depth)
        now = time.monotonic()
        if now - self._last < self._interval_s:
            return False
        record.msg, record.args = "Requests are queuing for a web thread: %d deep at most since the last report (WEB_THREADS)", (self._deepest,)
        self._last, self._deepest = now, 0
        return True


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(0)  # waitress's run loop catches it and shuts its threads down


def main() -> int:
    try:
        config = Config.from_env()
        logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("waitress.queue").addFilter(QueueDepthSummary())
        runtime = Runtime(config)
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
            # app's limit and this one the app answers a JSON 413.
            max_request_body_size=4 * config.max_body_bytes,
            ident="heartify",
            recv_bytes=1 << 16,  # a one-window body (about 25 kB) in one read instead of four
        )
    except OSError as exc:
        runtime.close()
        print(f"heartify: cannot listen on {config.host}:{config.port} ({exc.strerror or exc}).", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    log.info("Serving on http://%s:%s with %d threads", config.host, server.effective_port, config.web_threads)
    try:
        server.run()
    finally:
        server.close()
        runtime.close()
        log.info("Stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
