"""How many model runs every worker process of this machine has queued or under way.

A request that finds its own worker idle runs at once on all cores (the engine's lone session),
which is only faster when the other workers are idle too: otherwise it takes cores their batches
are using. So each worker process owns one 8-byte slot of a small file that the supervisor
creates (``service.workers``); it writes its count there and reads the others'. One writer per
slot and aligned 8-byte stores: no lock crosses processes, and a stale read only costs one
request the fast path or a moment of shared cores. A worker killed in the middle of a run leaves
its count behind until its replacement, which takes the same slot, zeroes it.

``Occupancy()`` without a file is a single process's: no other worker, so the others are idle.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

SLOT = struct.Struct("q")


def create_file(path: Path, workers: int) -> None:
    """The supervisor's part: a file of ``workers`` zeroed slots."""
    with open(path, "wb") as file:
        file.write(bytes(SLOT.size * workers))


class Occupancy:
    def __init__(self, path: Path | None = None, slot: int = 0) -> None:
        self._path = path
        self._slot = slot
        self._map: mmap.mmap | None = None
        self._others: list[int] = []

    def start(self) -> Occupancy:
        if self._path is not None:
            fd = os.open(self._path, os.O_RDWR)
            try:
                self._map = mmap.mmap(fd, 0)
            finally:
                os.close(fd)
            slots = len(self._map) // SLOT.size
            if not 0 <= self._slot < slots:
                raise ValueError(f"slot {self._slot} outside the {slots} of {self._path}")
            self._others = [i * SLOT.size for i in range(slots) if i != self._slot]
            self.publish(0)
        return self

    def close(self) -> None:
        if self._map is not None:
            self.publish(0)
            self._map.close()
            self._map = None

    def publish(self, count: int) -> None:
        """This worker's count of runs queued or under way."""
        if self._map is not None:
            SLOT.pack_into(self._map, self._slot * SLOT.size, count)

    def others_idle(self) -> bool:
        """True when no other worker has a run queued or under way."""
        if self._map is None:
            return True
        return not any(SLOT.unpack_from(self._map, offset)[0] for offset in self._others)
