"""What the worker processes of one machine tell each other: how many model runs each has queued
or under way, and how many key deactivations each has made.

A request that finds its own worker idle runs at once on all cores (the engine's lone session),
which is only faster when the other workers are idle too: otherwise it takes cores their batches
are using. So each worker process owns one 8-byte slot of a small unnamed file that the
supervisor creates and the workers inherit (``service.workers``): it writes its count there and
reads the others'; with no name, nothing is left on disk however the service ends. One writer per
slot, each write one aligned 8-byte store through a memoryview: no lock crosses processes, and a
stale read only costs one request the fast path or a moment of shared cores. A worker counts as
busy from its start until its batcher runs (it loads and warms its model meanwhile); when a
worker dies, the supervisor zeroes its slot, and its replacement takes the same one.

Deactivations: each worker caches the keys it found active (``keys.ActiveKeys``). A key
deactivated through one worker must be refused by the others at once, on SQLite too, which has no
notifications: the worker counts each deactivation it commits in a second slot of its own, and
a worker that sees the sum of those counts change forgets its cache before it looks a key up.
Each count only grows, a replacement continuing from its slot, so a change is never missed.

Heartbeats: each worker's serving loop writes the time (``time.monotonic``, the machine's
monotonic clock, the same in every process) into a third slot of its own every second. The
supervisor replaces a worker whose loop has stopped (frozen with SIGSTOP, or hung) for
``WORKER_TIMEOUT_SECONDS``: it holds connections that nothing else serves.

The file's last slot is the supervisor's: non-zero once the whole service is stopping (rather than
one worker being replaced), so a draining worker knows it may shut the listening socket they share.

``Occupancy()`` without a file is a single process's: no other worker, so the others are idle.
"""

from __future__ import annotations

import mmap
import os
import sys
import tempfile
import threading
import time
from contextlib import suppress
from typing import BinaryIO

SLOT_BYTES = 8  # one signed 64-bit count
COUNTS = 3  # per worker: its runs queued or under way, the key deactivations it made, its heartbeat
BEAT = 2  # the heartbeat's place among a worker's counts: milliseconds of time.monotonic()


def create_file(workers: int) -> BinaryIO:
    """The supervisor's part: an unnamed file of zeroed slots for ``workers``, open for as long
    as the supervisor runs; the workers get its descriptor."""
    file = tempfile.TemporaryFile()  # noqa: SIM115 (the caller closes it, with the service)
    file.write(bytes(SLOT_BYTES * (COUNTS * workers + 1)))
    file.flush()
    return file


def clear_slot(fd: int, slot: int) -> None:
    """The supervisor's part when a worker has died: its runs are gone with it (its count of
    deactivations stays, for its replacement to go on from)."""
    os.pwrite(fd, bytes(SLOT_BYTES), slot * COUNTS * SLOT_BYTES)


def last_beat(fd: int, slot: int) -> float:
    """The supervisor's part: when the worker in ``slot`` last showed its loop alive
    (``time.monotonic()``; 0 before it first did)."""
    raw = os.pread(fd, SLOT_BYTES, (slot * COUNTS + BEAT) * SLOT_BYTES)
    return int.from_bytes(raw, sys.byteorder, signed=True) / 1000


def announce_stopping(fd: int) -> None:
    """The supervisor's part when the whole service stops, before it signals the workers."""
    os.pwrite(fd, (1).to_bytes(SLOT_BYTES, sys.byteorder), os.fstat(fd).st_size - SLOT_BYTES)


class Occupancy:
    def __init__(self, fd: int | None = None, slot: int = 0) -> None:
        self._fd = fd
        self._slot = slot
        self._map: mmap.mmap | None = None
        self._slots: memoryview | None = None  # the file as signed 64-bit counts
        self._others: list[int] = []  # the other workers' run counts
        self._deactivations = memoryview(b"")  # every worker's count of deactivations
        self._announcing = threading.Lock()  # one increment at a time among this worker's threads

    def start(self) -> Occupancy:
        """Map the file and count this worker as busy until its batcher publishes its count."""
        if self._fd is not None:
            self._map = mmap.mmap(self._fd, 0)  # a mapping of its own: the descriptor may be closed
            slots = memoryview(self._map).cast("q")
            workers = (len(slots) - 1) // COUNTS
            if not 0 <= self._slot < workers:
                slots.release()
                self._map.close()
                raise ValueError(f"slot {self._slot} outside the {workers} of the occupancy file")
            self._slots = slots
            self._others = [COUNTS * i for i in range(workers) if i != self._slot]
            self._deactivations = slots[1 : COUNTS * workers : COUNTS]
            self.publish(1)
        return self

    def close(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None and self._map is not None:
            slots[COUNTS * self._slot] = 0
            self._deactivations.release()
            slots.release()
            self._map.close()
            self._map = None

    def publish(self, count: int) -> None:
        """This worker's count of runs queued or under way."""
        slots = self._slots
        if slots is not None:
            with suppress(ValueError):  # released by close() meanwhile: the worker is stopping
                slots[COUNTS * self._slot] = count

    def beat(self) -> None:
        """This worker's serving loop is alive (called every second from it)."""
        slots = self._slots
        if slots is not None:
            with suppress(ValueError):  # released by close() meanwhile
                slots[COUNTS * self._slot + BEAT] = int(time.monotonic() * 1000)

    def others_idle(self) -> bool:
        """True when no other worker has a run queued or under way."""
        slots = self._slots
        if slots is None:
            return True
        try:
            return not any(slots[i] for i in self._others)
        except ValueError:  # released by close() meanwhile
            return True

    def announce_deactivation(self) -> None:
        """This worker has committed a key deactivation (after the commit, not before)."""
        slots = self._slots
        if slots is not None:
            with self._announcing, suppress(ValueError):
                slots[COUNTS * self._slot + 1] += 1

    def stopping(self) -> bool:
        """The whole service is stopping (``announce_stopping``), not only this worker."""
        slots = self._slots
        try:
            return slots is not None and slots[-1] != 0
        except ValueError:  # released by close() meanwhile
            return False

    def deactivations(self) -> int:
        """How many key deactivations all workers have made: a change means forget the cache."""
        try:
            return sum(self._deactivations)
        except ValueError:  # released by close() meanwhile
            return 0
