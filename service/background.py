"""A small daemon loop for the service's background chores (mail delivery, last_used flushes,
housekeeping, the database probe)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Loop:
    """Runs ``step`` again and again; ``step`` returns how many seconds to sleep before the next run.

    The sleep is a wait on an event, so an idle loop costs nothing, ``wake`` cuts it short when
    new work arrives and ``close`` ends it promptly. A failing step is logged and retried after
    ``error_delay_s``: a database or mail server that is briefly away must not kill the thread.
    Errors of the ``quiet`` types are retried without a log line: whoever raised them reports
    the outage once (``database.DatabaseHealth``).
    """

    def __init__(
        self, name: str, step: Callable[[], float], error_delay_s: float, quiet: tuple[type[Exception], ...] = ()
    ) -> None:
        self._step = step
        self._quiet = quiet
        self._error_delay_s = error_delay_s
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Loop:
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wakeup.set()

    @property
    def stopping(self) -> bool:
        """``stop`` or ``close`` has been called: a long step may end early."""
        return self._stopping.is_set()

    def stop(self) -> None:
        """No further step; the one under way goes on (``stopping`` tells it)."""
        self._stopping.set()
        self._wakeup.set()

    def close(self, timeout_s: float = 10.0) -> bool:
        """Stops, and waits up to ``timeout_s`` for the step under way; False if it goes on."""
        self.stop()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopping.is_set():
            # Cleared before the step: a wake that arrives during the step triggers one more run.
            self._wakeup.clear()
            try:
                delay = self._step()
            except self._quiet:
                delay = self._error_delay_s
            except Exception:
                log.exception("%s failed; retrying in %.3g s", self._thread.name, self._error_delay_s)
                delay = self._error_delay_s
            self._wakeup.wait(delay)
