"""How many model runs every worker process of this machine has queued or under way.

A request that finds its own worker idle runs at once on all cores (the engine's lone session),
which is only faster when the other workers are idle too: otherwise it takes cores their batches
are using. So each worker process owns one 8-byte slot of a small unnamed file that the
supervisor creates and the workers inherit (``service.workers``): it writes its count there and
reads the others'; with no name, nothing is left on disk however the service ends. One writer per
slot, each write one aligned 8-byte store through a memoryview: no lock crosses processes, and a
stale read only costs one request the fast path or a moment of shared cores. A worker counts as
busy from its start until its batcher runs (it loads and warms its model meanwhile); when a
worker dies, the supervisor zeroes its slot, and its replacement takes the same one.

``Occupancy()`` without a file is a single process's: no other worker, so the others are idle.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from contextlib import suppress
from typing import BinaryIO

SLOT_BYTES = 8  # one signed 64-bit count


def create_file(workers: int) -> BinaryIO:
    """The supervisor's part: an unnamed file of ``workers`` zeroed slots, open for as long as
    the supervisor runs; the workers get its descriptor."""
    file = tempfile.TemporaryFile()  # noqa: SIM115 (the caller closes it, with the service)
    file.write(bytes(SLOT_BYTES * workers))
    file.flush()
    return file


def clear_slot(fd: int, slot: int) -> None:
    """The supervisor's part when a worker has died: its runs are gone with it."""
    os.pwrite(fd, bytes(SLOT_BYTES), slot * SLOT_BYTES)


class Occupancy:
    def __init__(self, fd: int | None = None, slot: int = 0) -> None:
        self._fd = fd
        self._slot = slot
        self._map: mmap.mmap | None = None
        self._slots: memoryview | None = None  # the file as signed 64-bit counts
        self._others: list[int] = []

    def start(self) -> Occupancy:
        """Map the file and count this worker as busy until its batcher publishes its count."""
        if self._fd is not None:
            self._map = mmap.mmap(self._fd, 0)  # a mapping of its own: the descriptor may be closed
            slots = memoryview(self._map).cast("q")
            if not 0 <= self._slot < len(slots):
                count = len(slots)
                slots.release()
                self._map.close()
                raise ValueError(f"slot {self._slot} outside the {count} of the occupancy file")
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
