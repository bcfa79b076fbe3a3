"""Deletes what no flow needs any more: spent or expired tokens, delivered or given-up mails."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from service.background import Loop
from service.database import QUIET_ERRORS
from service.store import utcnow

if TYPE_CHECKING:
    from service.store import Store

log = logging.getLogger(__name__)


class Housekeeping:
    """Purges rows older than ``retention`` at start and every ``EVERY_S`` after."""

    EVERY_S = 3600.0

    def __init__(self, store: Store, retention: timedelta, clock: Callable[[], datetime] = utcnow) -> None:
        self._store = store
        self._retention = retention
        self._clock = clock
        self._loop = Loop("housekeeping", self._step, error_delay_s=60.0, quiet=QUIET_ERRORS)

    def start(self) -> Housekeeping:
        self._loop.start()
        return self

    def close(self) -> None:
        self._loop.close()

    def purge(self) -> dict[str, int]:
        removed = self._store.purge(self._clock() - self._retention)
        if any(removed.values()):
            log.info(
                "Purged %d tokens and %d mails older than %g days",
                removed["tokens"],
                removed["mails"],
                self._retention.total_seconds() / 86400,
            )
        return removed

    def _step(self) -> float:
        self.purge()
        return self.EVERY_S
