"""waitress's own lines: its per-request queue warnings reach the log as one summary per
interval, and the client's text in them is escaped."""

from __future__ import annotations

import logging

from service import logs
from service.logs import QueueDepthSummary


def queue_warning(depth: int) -> logging.LogRecord:
    return logging.LogRecord("waitress.queue", logging.WARNING, __file__, 1, "Task queue depth is %d", (depth,), None)


def test_one_summary_per_interval_with_the_deepest_queue():
    now = [100.0]
    summary = QueueDepthSummary(interval_s=60.0, clock=lambda: now[0])
    first = queue_warning(1)
    assert summary.filter(first) and first.getMessage().startswith("Requests are queuing for a web thread: 1 deep")
    now[0] = 159.9
    assert [summary.filter(queue_warning(d)) for d in (3, 5, 2)] == [False, False, False]
    now[0] = 160.0
    later = queue_warning(1)
    assert summary.filter(later)
    assert "5 deep at most" in later.getMessage()
    assert not summary.filter(queue_warning(9))


def test_a_path_in_waitress_own_lines_cannot_forge_a_line():
    """A client that hung up while served got its decoded path, newline and all, into
    "Client disconnected while serving …": a line of its own choosing after it."""
    logs.configure("INFO")
    logs.configure("INFO")  # once only: twice escaped, a backslash would read as two
    assert sum(isinstance(f, logs.ClientText) for f in logging.getLogger("waitress").filters) == 1
    path = "/x\n2026-12-01 09:00:00,000 ERROR service.workers: FORGED\x1b[31m"
    record = logging.LogRecord(
        "waitress", logging.INFO, __file__, 1, f"Client disconnected while serving {path}", (), None
    )
    assert logging.getLogger("waitress").filter(record)
    assert (
        record.getMessage()
        == "Client disconnected while serving /x\\n2026-12-01 09:00:00,000 ERROR service.workers: FORGED\\x1b[31m"
    )


def test_one_line_per_interval_when_the_connection_limit_is_reached_again_and_again():
    """A flood of connections made waitress say 38 lines a second: reached, and below again."""
    now = [100.0]
    summary = logs.ConnectionLimitSummary(interval_s=60.0, clock=lambda: now[0])

    def line(text: str) -> logging.LogRecord:
        return logging.LogRecord("waitress", logging.WARNING, __file__, 1, text, (), None)

    reached = "total open connections reached the connection limit, no longer accepting new connections"
    below = "total open connections dropped below the connection limit, listening again"
    assert summary.filter(line(reached)) and not summary.filter(line(below))
    assert [summary.filter(line(reached)) for _ in range(5)] == [False] * 5
    now[0] = 160.0
    later = line(reached)
    assert summary.filter(later) and later.getMessage().startswith(
        "Open connections reached CONNECTION_LIMIT 6 time(s)"
    )
    assert summary.filter(line("Client disconnected while serving /x"))  # waitress's other lines pass
