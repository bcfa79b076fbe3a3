"""Logging set-up and filters that keep the service's log readable under load."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
access_log = logging.getLogger("service.access")
# nginx's status for a request whose client hung up before its answer: no answer is sent, but the
# access log and the metrics say what became of it.
CLIENT_GONE = 499


def first_line(exc: BaseException) -> str:
    """An error's message in one line, for a log line or a one-sentence refusal."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def log_access(method: str, path: str, status: int, duration_ms: float, request_id: str, client: str) -> None:
    """One access-log line: the app's answers (``middleware.RequestContext``) and waitress's
    refusals from the headers (``channels.JsonErrorTask``) alike."""
    access_log.info(
        "%s %s %s %.1fms id=%s client=%s",
        loggable(method),
        loggable(path),
        status,
        duration_ms,
        request_id,
        client,
    )


def loggable(text: str, limit: int = 200) -> str:
    """The client's text with control characters (and non-ASCII) escaped, and cut at ``limit``
    characters: a decoded path may hold a newline that forges a log line of its choosing, or
    terminal escape sequences, and a method or a path may be kilobytes long."""
    return text[:limit].encode("unicode_escape").decode("ascii")


class Tally:
    """Counts what happened between the lines that say how often: one line per ``interval_s``
    at most, however often it happens."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self._interval_s = interval_s
        self._next = -math.inf
        self._lock = threading.Lock()  # metrics count from every thread
        self.count = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.count += n

    def due(self, now: float) -> int:
        """The count since the last line, if there is one and a line is due now (the count then
        starts anew); else 0."""
        with self._lock:
            if not self.count or now < self._next:
                return 0
            count, self.count, self._next = self.count, 0, now + self._interval_s
            return count


class QueueDepthSummary(logging.Filter):
    """waitress warns once per request that waits for a free web thread: under steady load that
    is hundreds of lines a minute. One line per ``interval_s``, naming the deepest queue."""

    def __init__(self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._clock = clock
        self._last = -math.inf
        self._deepest = 0

    def filter(self, record: logging.LogRecord) -> bool:
        depth = record.args[0] if isinstance(record.args, tuple) and record.args else 0
        self._deepest = max(self._deepest, depth)
        now = self._clock()
        if now - self._last < self._interval_s:
            return False
        record.msg = "Requests are queuing for a web thread: %d deep at most since the last report (WEB_THREADS)"
        record.args, self._last, self._deepest = (self._deepest,), now, 0
        return True


class ConnectionLimitSummary(logging.Filter):
    """waitress warns each time the open connections reach the limit, and tells when they drop
    below it again: under a flood of connections, dozens of lines a second. One line per
    ``interval_s``, with how often it was reached."""

    REACHED = "total open connections reached the connection limit"
    BELOW = "total open connections dropped below the connection limit"

    def __init__(self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._reached = Tally(interval_s)
        self._clock = clock

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.msg if isinstance(record.msg, str) else ""
        if text.startswith(self.BELOW):
            return False
        if not text.startswith(self.REACHED):
            return True
        self._reached.add()
        times = self._reached.due(self._clock())
        if not times:
            return False
        record.msg = "Open connections reached CONNECTION_LIMIT %d time(s) since the last report: new ones waited"
        record.args = (times,)
        return True


class ClientText(logging.Filter):
    """waitress names a request's decoded path in its own lines ("Client disconnected while
    serving …"), already formatted: escaped here as the access log escapes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = loggable(record.getMessage(), 2000), ()
        return True


def configure(level: str) -> None:
    logging.basicConfig(level=level, format=FORMAT)
    filters = (("waitress", ClientText), ("waitress", ConnectionLimitSummary), ("waitress.queue", QueueDepthSummary))
    for name, kind in filters:
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):  # once, however often configured
            logger.addFilter(kind())
