"""CPU inference with one shared onnxruntime session.

The engine talks tensors only: it z-scores windows, runs the model on ``N×1×L`` float32 batches
and maps the output back. HTTP, keys and storage live elsewhere.
"""
from __future__ import annotations

import math
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

INPUT_NAME = "ecg"
OUTPUT_NAME = "denoised"


def usable_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota.

    ``os.cpu_count()`` reports the host, so a container limited to 1 CPU would start one thread
    per host core and thrash.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota() -> float | None:
    """CPU quota in CPUs from cgroup v2 ``cpu.max`` or v1 ``cfs_quota_us``; None when unlimited."""
    v2 = Path("/sys/fs/cgroup/cpu.max")
    try:
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        if v1.exists():
            quota_us = int(v1.read_text())
            period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


def normalize(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-score each row with its own mean and standard deviation (a deviation of 0 counts as 1).

    Returns the normalized ``N×1×L`` float32 tensor and the per-window ``μ`` and ``σ`` (``N×1``)
    that map the model's output back to the input's units: ``output·σ + μ``.
    """
    windows = np.asarray(windows, dtype=np.float64)
    n = windows.shape[1]
    # Four passes over the window, where ``mean``, ``std``, subtract, divide and ``astype`` made
    # nine: each NumPy call on more than 500 values lets go of the GIL, and under load the request
    # thread then queues for it again behind the others. With a model that does nothing, at 16
    # connections, this and the one-pass bound check in validation took the service from 1480 to
    # 1680 requests/s and from 38 to 23 thread switches per request (README, levers).
    mu = windows.sum(axis=1, keepdims=True) / n
    centered = windows - mu
    sigma = np.sqrt(np.einsum("ij,ij->i", centered, centered)[:, None] / n)
    sigma[sigma == 0] = 1.0
    z = np.empty((len(windows), 1, n), dtype=np.float32)
    np.divide(centered, sigma, out=z[:, 0, :], casting="same_kind")
    return z, mu, sigma


OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


_arena_lock = threading.Lock()
_arena_registered = False


def _register_arena() -> None:
    """Once per process: the CPU memory arena that every session shares, growing by what is asked.

    onnxruntime's default arena doubles whenever it runs short and never shrinks, so under load
    resident memory stepped up ~20 MB at once, 15 s or minutes after start; with no arena at all
    (plain malloc) it wandered by ±50 MB. Extending by the requested size only, it settles during
    the first minute of load and then stays flat (+0.2 % to +0.6 % over four 10-minute soaks on
    two machines, README), at the same throughput.
    """
    global _arena_registered
    with _arena_lock:
        if not _arena_registered:
            cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(cpu, ort.OrtArenaCfg({"arena_extend_strategy": 1}))  # kSameAsRequested
            _arena_registered = True


def session_options(threads: int | None = None, spinning: bool = False, level: str = "all") -> ort.SessionOptions:
    """Session settings of the engine; the benchmarks vary the same knobs through here.

    Spinning is off by default: spinning workers burn a core while the service idles, and
    requests arrive milliseconds apart.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cpus()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = OPTIMIZATION_LEVELS[level]
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.use_env_allocators", "1")
    _register_arena()
    return options


def lone_choice(medians: dict[int, float]) -> int:
    """The thread count for lone runs, from each candidate's median time: the fastest.

    One place for the rule, which the benchmarks apply too when they compare the service with
    the engine at the service's own setting.
    """
    return min(medians, key=medians.__getitem__)


class Engine:
    """onnxruntime CPU sessions shared by all request threads (``run`` is thread-safe).

    Batches run on a session of ``threads`` threads, several side by side under load. A lone
    window (one that the batcher runs while nothing else runs) may run faster spread over all
    cores, or not: on the development machines fp32 did (3.75 against 4.67 ms on 2 cores), while
    int8 did on one CPU and ran slower on another (2.24 against 1.85 ms). So with
    ``lone_threads=None`` ``warm_up`` times one window on ``threads`` and on all usable CPUs and
    keeps the faster for lone runs (``lone_choice``); a second session costs a second copy of the
    weights (about 15 MB for the fp32 model) and is dropped when it loses.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        threads: int | None = None,
        spinning: bool = False,
        lone_threads: int | None = None,
    ) -> None:
        self._session = _open(model_path, session_options(threads, spinning))
        self.threads = threads or usable_cpus()
        counts = [lone_threads] if lone_threads else sorted({self.threads, usable_cpus()})
        self._lone_candidates = {
            n: self._session if n == self.threads else _open(model_path, session_options(n, spinning)) for n in counts
        }
        self.lone_threads = counts[-1]  # until warm_up has timed the candidates
        self._lone = self._lone_candidates[self.lone_threads]
        shape = self._session.get_inputs()[0].shape
        self.window = int(shape[-1])

    def warm_up(self, max_batch: int, concurrent: int = 1, lone_rounds: int = 15) -> None:
        """Run the largest batch ``concurrent`` times at once and once on each lone candidate, then
        choose the lone session (the median of ``lone_rounds`` interleaved single-window runs).

        A session's first run prepares its kernels, which would otherwise delay the first
        request; and the process reaches its working memory at start, not under the first load.
        """
        batch = np.zeros((max_batch, 1, self.window), dtype=np.float32)
        with ThreadPoolExecutor(concurrent) as pool:
            list(pool.map(lambda _: self.run(batch), range(concurrent)))
        candidates = self._lone_candidates
        for session in candidates.values():
            if session is not self._session:
                _run(session, batch)
        if len(candidates) > 1:
            times: dict[int, list[float]] = {n: [] for n in candidates}
            for _ in range(lone_rounds):
                for n, session in candidates.items():
                    start = time.perf_counter()
                    _run(session, batch[:1])
                    times[n].append(time.perf_counter() - start)
            self.lone_threads = lone_choice({n: statistics.median(t) for n, t in times.items()})
            self._lone = candidates[self.lone_threads]
        self._lone_candidates = {self.lone_threads: self._lone}  # the loser's weights are freed

    def run(self, batch: np.ndarray, lone: bool = False) -> np.ndarray:
        """Raw model call on a normalized ``N×1×L`` float32 batch; ``lone``: nothing else runs."""
        return _run(self._lone if lone else self._session, batch)

    def denoise(self, windows: np.ndarray, input_units: bool = False) -> np.ndarray:
        """Denoise ``N×L`` windows; the result is in normalized units unless ``input_units``."""
        z, mu, sigma = normalize(windows)
        return restore(self.run(z), mu, sigma, input_units)


def _run(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    return session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


def _open(model_path: str | os.PathLike, options: ort.SessionOptions) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])


def restore(out: np.ndarray, mu: np.ndarray, sigma: np.ndarray, input_units: bool) -> np.ndarray:
    """The model's ``N×1×L`` output as ``N×L``, mapped back by ``·σ + μ`` (in float64) if ``input_units``.

    Normalized output stays float32, exactly what the model computed: its shortest decimal form
    is about half as long in JSON as the float64 one, for the same values.
    """
    out = out[:, 0, :]
    return out.astype(np.float64) * sigma + mu if input_units else out
