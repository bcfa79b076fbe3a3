"""Waiting on descriptors with ``poll()``, which, unlike ``select()``, takes descriptors past 1024:
the service raises its open-files limit and holds thousands of client connections, so the
database's connections, opened anew every minute, land up there (``select()`` then raised
``ValueError``, a 500 for the request)."""

from __future__ import annotations

import select
from collections.abc import Sequence

READ, WRITE = select.POLLIN, select.POLLOUT


def ready(fds: Sequence[int], events: int, timeout_s: float | None = None) -> set[int]:
    """Those of ``fds`` ready for ``events``, or closed or failed, within ``timeout_s`` (None: no
    limit; 0: now)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, events)
    return {fd for fd, _ in poller.poll(None if timeout_s is None else max(0.0, timeout_s) * 1000)}
