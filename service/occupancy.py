"""How many model runs every worker process of this machine has queued or under way.

A request that finds its own worker idle runs at once on all cores (the engine's lone session),
which is only faster when the other workers are idle too: otherwise it takes cores their batches
are using. So each worker process owns one 8-byte slot of a small file that the supervisor
creates (``service.workers``); it writes its count there and reads the others'. One writer per
slot, each write one aligned 8-byte store through a memoryview: no lock crosses processes, and a
stale read only costs one request the fast path or a moment of shared cores. A worker counts as
busy from its start until its batcher runs (it loads and warms its model meanwhile); when a
worker dies, the supervisor zeroes its slot, and its replacement takes the same one.

``Occupancy()`` without a file is a single process's: no other worker, so the others are idle.
"""

from __future__ import annotations

import mmap
import os
from contextlib import suppress
from pathlib import Path

SLOT_BYTES = 8  # one signed 64-bit count


def create_file(path: Path, workers: int) -> None:
    """The supervisor's part: a file of ``workers`` zeroed slots."""
    with open(path, "wb") as file:
        file.write(bytes(SLOT_BYTES * workers))


def clear_slot(path: Path, slot: int) -> None:
    """The supervisor's part when a worker has died: its runs are gone with it."""
    with open(path, "r+b") as file:
        file.seek(slot * SLOT_BYTES)
        file.write(bytes(SLOT_BYTES))


class Occupancy:
    def __init__(self, path: Path | None = None, slot: int = 0) -> None:
        self._path = path
        self._slot = slot
        self._map: mmap.mmap | None = None
        self._slots: memoryview | None = None  # the file as signed 64-bit counts
        self._others: list[int] = []

    def start(self) -> Occupancy:
        """Map the file and count this worker as busy until its batcher publishes its count."""
        if self._path is not None:
            fd = os.open(self._path, os.O_RDWR)
            try:
                self._map = mmap.mmap(fd, 0)
            finally:
                os.close(fd)
            slots = memoryview(self._map).cast("q")
            if not 0 <= self._slot < len(slots):
                count = len(slots)
                slots.release()
                self._map.close()
                raise ValueError(f"slot {self._slot} outside the {count} of {self._path}")
            self._slots = slots
            self._others = [i for i in range(len(slots)) if i != self._slot]
            self.publish(1)
        return self

    def close(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None and self._map is not None:
            slots[self._slot] = 0
            slots.release()
            self._map.close()
            self._map = None

    def publish(self, count: int) -> None:
        """This worker's count of runs queued or under way."""
        slots = self._slots
        if slots is not None:
            with suppress(ValueError):  # released by close() meanwhile: the worker is stopping
                slots[self._slot] = count

    def others_idle(self) -> bool:
        """True when no other worker has a run queued or under way."""
        slots = self._slots
        if slots is None:
            return True
        try:
            return not any(slots[i] for i in self._others)
        except ValueError:  # released by close() meanwhile
            return True
