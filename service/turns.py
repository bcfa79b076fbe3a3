"""Turns at a costly piece of work (a whole recording): a few at a time, a few more waiting.

Each turn holds memory, and each waiting request holds a web thread. Without a bound on the
waiting, requests for recordings could take every thread of a worker, and its health checks,
which need a thread too, would go unanswered: a balancer, or Kubernetes' liveness probe, would
take a busy worker for a dead one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Busy(Exception):
    """No turn now, nor within the wait: the client is asked to try again (503)."""


class Turns:
    def __init__(self, at_once: int, waiting: int, wait_s: float) -> None:
        self._free = threading.BoundedSemaphore(at_once)
        self._waiting = threading.BoundedSemaphore(waiting)
        self._wait_s = wait_s

    @contextmanager
    def turn(self) -> Iterator[None]:
        """A turn for the ``with`` block; ``Busy`` if none came within the wait, or if as many
        requests as allowed already wait (then at once)."""
        if not self._free.acquire(blocking=False):
            if not self._waiting.acquire(blocking=False):
                raise Busy("Busy with other recordings. Try again shortly.")
            try:
                if not self._free.acquire(timeout=self._wait_s):
                    raise Busy("Busy with other recordings. Try again shortly.")
            finally:
                self._waiting.release()
        try:
            yield
        finally:
            self._free.release()
