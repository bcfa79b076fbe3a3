"""A transfer's least rate over windows: what a body must arrive at and an answer be read at."""

from __future__ import annotations


class Pace:
    """A transfer's least rate, taken over windows of ``window_s``: one that a client who trickles
    a byte now and then cannot meet on average by having sent (or read) fast at first."""

    def __init__(self, window_s: float, least_bytes_per_s: int) -> None:
        self._window_s, self._least = window_s, least_bytes_per_s
        self._since: float | None = None
        self._done_then = 0

    def begin(self, now: float, done: int) -> None:
        self._since, self._done_then = now, done

    def stop(self) -> None:
        """Nothing waits on the client (it has caught up): the next window begins afresh."""
        self._since = None

    def slow(self, now: float, done: int, total: int | None = None) -> bool:
        """Less than the least rate over the window that has just ended (a window begins if none
        had), or than what was left of ``total``; ``done``: the bytes moved so far."""
        since = self._since  # read once: a task thread may stop it meanwhile (``Channel._flush_some``)
        if since is None:
            self.begin(now, done)
            return False
        took_s = now - since
        if took_s < self._window_s:
            return False
        least = self._least * took_s if total is None else min(self._least * took_s, total - self._done_then)
        slow = done - self._done_then < least
        self.begin(now, done)
        return slow
