"""Coalesces concurrent denoising requests into batched ``N×1×L`` engine runs.

Worker threads share the onnxruntime session: each blocks on one queue (no spinning while idle),
takes the first request, gathers more until ``max_size`` windows or ``max_wait_s`` have passed,
runs the engine once and hands each request its rows through a future. Requests pile up while a
batch runs, so under load batches form without any wait; ``max_size=1`` disables coalescing.
Several workers run batches side by side (single-threaded runs, more of them than the process's
share of the cores: service.config): one run spread over all cores leaves cores waiting in its
serial stretches, runs side by side do not.

A request that finds the batcher idle (no run under way, nothing queued), and every other worker
process of the machine idle too (``service.occupancy``), runs in its own thread, on the engine's
session for lone runs (all cores): there is nothing to coalesce it with (unless ``max_wait_s``
asks to wait for more), and the hand-off to a worker and back would only add latency. The
request counts itself in before it looks at the others, so two workers that take a request at
the same moment cannot both run alone (both may queue). Under load every request goes through
the queue, where workers that are already awake take it (running them in request threads
instead passed the lead to a sleeping thread after each batch). A batched run costs about as
much per window as single ones on a CPU, so the gain is fewer threads contending and less
per-call overhead; a wait only delays lone requests, hence 0 by default. The measurements
behind these choices are in docs/performance.md.

A long request (a whole recording: hundreds of windows; a batch request of more than half a
batch) goes through the queue in chunks of at most half a batch of windows, with at most two
chunks per worker queued or running, so the request keeps every worker busy (with one chunk per
worker, a worker waited for the request thread to hand it the next one, and a recording ran
well below the engine's rate). The queue serves short requests before long ones' chunks, and a window
that finds nothing but chunks in its worker runs at once in its own thread, beside them on one
core, instead of waiting for a chunk under way (which multiplied their latency;
docs/performance.md). A batch request of 64 windows was one job among the windows: a client that
kept a few dozen in flight held every other client's window for seconds.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from service.contract import normalize, restore
from service.engine import Engine
from service.occupancy import Occupancy

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """No model to run: none was loaded, or the service is shutting down."""

    def __init__(self) -> None:
        super().__init__("Model not loaded")  # the contract's 503 message


@dataclass
class _Job:
    batch: np.ndarray  # k×1×L, normalized
    chunk: bool = False  # a chunk of a long request (denoise_many), not a short one
    result: Future = field(default_factory=Future)


_STOP = object()
# Queue priorities: short requests first, then long ones' chunks, then the stop markers (which
# must come after every job queued before them).
SHORT, CHUNKS, STOP = 0, 1, 2

# Told of every model run: windows in it, seconds it took, requests still queued (service.metrics).
RunObserver = Callable[[int, float, int], None]


def _unobserved(windows: int, seconds: float, queued: int) -> None:
    pass


class Batcher:
    def __init__(
        self,
        engine: Engine,
        max_size: int,
        max_wait_s: float,
        workers: int = 1,
        observer: RunObserver | None = None,
        occupancy: Occupancy | None = None,
    ) -> None:
        self._engine = engine
        self._observer = observer or _unobserved
        self._max_size = max_size
        self._share = max(1, max_size // 2)  # a long request's chunk: half a batch
        self._workers = workers
        self._max_wait_s = max_wait_s
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # first in, first out within a priority
        self._lock = threading.Lock()
        self._closed = False
        self._occupancy = occupancy or Occupancy()
        self._pending = 0  # jobs queued or running, in workers or request threads (under _lock)
        self._short = 0  # those of them that are short requests, not long ones' chunks
        self._threads = [threading.Thread(target=self._work, name=f"batcher-{i}", daemon=True) for i in range(workers)]

    def start(self) -> Batcher:
        for thread in self._threads:
            thread.start()
        self._occupancy.publish(self._pending)  # ready: busy no longer than its queue says
        return self

    @property
    def ready(self) -> bool:
        return not self._closed and all(thread.is_alive() for thread in self._threads)

    def denoise(self, windows: np.ndarray, input_units: bool = False) -> np.ndarray:
        """Blocks until the rows for ``windows`` (k×L) come back from a batched run.

        Normalizing and mapping back happen here, in the request's thread: the workers only
        stack, run and split, so the serial part of each batch stays as short as it can be.
        More than half a batch of windows go as a long request's chunks (``denoise_many``),
        unless they find the whole service idle: then they run alone, as a single window does.
        """
        z, mu, sigma = normalize(windows)
        job = _Job(z)
        with self._lock:  # no job may slip in behind the stop marker
            self._check_open()
            self._count(1)  # before it looks at the other workers (see the module's docstring)
            self._short += 1
            first = self._short == 1 and self._max_wait_s == 0  # no short request ahead of it
            alone = first and self._pending == 1 and self._occupancy.others_idle()
            long = len(z) > self._share and not alone
            beside = first and self._pending > 1 and not long  # only long requests' chunks in this worker
            if long:  # it goes as chunks, counted one by one
                self._count(-1)
                self._short -= 1
            elif not (alone or beside):
                self._put(SHORT, job)
        if long:
            return restore(self._chunked(z), mu, sigma, input_units)
        if alone or beside:
            self._run([job], lone=alone)
        return restore(job.result.result(), mu, sigma, input_units)

    def denoise_many(self, windows: np.ndarray, input_units: bool = False) -> np.ndarray:
        """``denoise`` for many windows, always as chunks (see the module's docstring)."""
        z, mu, sigma = normalize(windows)
        return restore(self._chunked(z), mu, sigma, input_units)

    def _chunked(self, z: np.ndarray) -> np.ndarray:
        """The model's rows for ``z``, fed to the queue a chunk of half a batch at a time, with at
        most two chunks per worker outstanding."""
        out = np.empty_like(z)
        pending: deque[tuple[int, _Job]] = deque()
        for start in range(0, len(z), self._share):
            if len(pending) == 2 * self._workers:
                self._collect(pending, out)
            job = _Job(z[start : start + self._share], chunk=True)
            with self._lock:
                self._check_open()
                self._count(1)
                self._put(CHUNKS, job)
            pending.append((start, job))
        while pending:
            self._collect(pending, out)
        return out

    @staticmethod
    def _collect(pending: deque[tuple[int, _Job]], out: np.ndarray) -> None:
        start, job = pending.popleft()
        out[start : start + len(job.batch)] = job.result.result()

    def _count(self, jobs: int) -> None:
        """Jobs in (+) or done (-), told to the other workers; under ``_lock``."""
        self._pending += jobs
        self._occupancy.publish(self._pending)

    def _put(self, priority: int, item: object) -> None:
        self._queue.put((priority, next(self._order), item))

    def _check_open(self) -> None:
        if self._closed:
            raise ModelUnavailable

    def close(self) -> None:
        """Finish the queued jobs, then stop the workers (each one ends at the first stop marker it takes)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._threads:
                self._put(STOP, _STOP)
        for thread in self._threads:
            if thread.is_alive():
                thread.join()

    def _work(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()[2]
            if first is _STOP:
                return
            jobs, size = [first], len(first.batch)
            deadline = time.monotonic() + self._max_wait_s
            while size < self._max_size:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))[2]
                except queue.Empty:
                    break
                if job is _STOP:
                    stopping = True
                    break
                jobs.append(job)
                size += len(job.batch)
            self._run(jobs)

    def _run(self, jobs: list[_Job], lone: bool = False) -> None:
        """Run the jobs as one batch, then count them as done."""
        try:
            batch = np.concatenate([job.batch for job in jobs])
            begin = time.perf_counter()
            # Jobs gathered past max_size, or a long request run alone, run in slices of it,
            # bounding the session's memory.
            out = np.concatenate(
                [self._engine.run(batch[i : i + self._max_size], lone) for i in range(0, len(batch), self._max_size)]
            )
            self._observer(len(batch), time.perf_counter() - begin, self._queue.qsize())
        except Exception as exc:
            log.exception("Inference failed for a batch of %d requests", len(jobs))
            for job in jobs:
                job.result.set_exception(exc)
            return
        finally:
            with self._lock:
                self._count(-len(jobs))
                self._short -= sum(not job.chunk for job in jobs)
        start = 0
        for job in jobs:
            job.result.set_result(out[start : start + len(job.batch)])
            start += len(job.batch)
