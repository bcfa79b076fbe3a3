"""``last_used`` without a database write on the denoising hot path.

Requests record the time in memory; a background loop writes the latest time per key in one
transaction every few seconds, and once more at shutdown.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from service.background import Loop
from service.database import QUIET_ERRORS
from service.store import utcnow

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from service.store import Store


class LastUsed:
    """The latest use of each key, held in memory and written in the background."""

    def __init__(self, store: Store, flush_every_s: float, clock: Callable[[], datetime] = utcnow) -> None:
        self._store = store
        self._clock = clock
        self._pending: dict[int, datetime] = {}
        self._lock = threading.Lock()
        self._every_s = flush_every_s
        self._loop = Loop("last-used", self._step, error_delay_s=flush_every_s, quiet=QUIET_ERRORS)

    def touch(self, key_id: int) -> None:
        """O(1) and in memory: the only cost a successful denoising call pays for last_used."""
        now = self._clock()
        with self._lock:
            self._pending[key_id] = now

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            self._store.record_last_used(pending)
        except Exception:
            with self._lock:  # keep them for the next flush, unless a newer time came in
                for key_id, when in pending.items():
                    self._pending.setdefault(key_id, when)
            raise

    def start(self) -> LastUsed:
        self._loop.start()
        return self

    def close(self) -> None:
        """A last flush; while the database is away the times still held are reported, not raised."""
        self._loop.close()
        try:
            self.flush()
        except QUIET_ERRORS:
            log.warning("%d last_used times not written: the database is unavailable at shutdown", len(self._pending))

    def _step(self) -> float:
        self.flush()
        return self._every_s
