"""Turns at a costly piece of work (a whole recording, a large batch request): a few at a time, a
few more waiting in line, the rest refused at once.

Each turn holds memory, and each waiting request holds a web thread. Without a bound on the
waiting, requests for recordings could take every thread of a worker, and its health checks,
which need a thread too, would go unanswered: a balancer, or Kubernetes' liveness probe, would
take a busy worker for a dead one. Waiters are served in the order they came: a newcomer never
takes a freed turn from one already waiting.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

BUSY = "Busy with other recordings. Try again shortly."
BUSY_BATCHES = "Busy with other batch requests. Try again shortly."
BUSY_RETRY_AFTER_S = 5  # most recordings take a few seconds
CHECK_GONE_S = 0.5  # how often a waiter looks whether its client has hung up


class Busy(Exception):
    """No turn now, nor within the wait: the client is asked to try again (503)."""


class ClientGone(Exception):
    """The client hung up while its request waited for a turn: nobody would read the answer."""


class Turns:
    def __init__(self, at_once: int, waiting: int, wait_s: float, busy: str = BUSY) -> None:
        self._busy = busy  # what the 503 says
        self._changed = threading.Condition()
        self._free = at_once
        self._line: deque[object] = deque()  # one ticket per waiting request, first come first
        self._most_waiting = waiting
        self._wait_s = wait_s

    @contextmanager
    def turn(self, gone: Callable[[], bool] = lambda: False) -> Iterator[None]:
        """A turn for the ``with`` block; ``Busy`` if none came within the wait, or at once if as
        many requests as allowed already wait; ``ClientGone`` if ``gone()`` says the client has
        hung up meanwhile (it leaves the line, and its turn goes to the next)."""
        with self._changed:
            if self._free and not self._line:
                self._free -= 1
            elif len(self._line) >= self._most_waiting:
                raise Busy(self._busy)
            else:
                self._wait_in_line(gone)
        try:
            if gone():
                raise ClientGone()
            yield
        finally:
            with self._changed:
                self._free += 1
                self._changed.notify_all()

    def _wait_in_line(self, gone: Callable[[], bool]) -> None:
        ticket = object()
        self._line.append(ticket)
        deadline = time.monotonic() + self._wait_s
        try:
            while not self._changed.wait_for(
                lambda: self._free and self._line[0] is ticket, min(CHECK_GONE_S, deadline - time.monotonic())
            ):
                if gone():
                    raise ClientGone()
                if time.monotonic() >= deadline:
                    raise Busy(self._busy)
            self._free -= 1
        finally:
            self._line.remove(ticket)
            self._changed.notify_all()  # the next in line may be first now
