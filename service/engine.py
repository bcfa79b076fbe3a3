"""CPU inference with shared onnxruntime sessions.

The engine talks tensors only: it runs the model on ``N×1×L`` float32 batches (``run``; the
service's batcher z-scores the windows and maps the output back), and ``denoise`` does all three
for the offline tools. HTTP, keys and storage live elsewhere.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.contract import INPUT_NAME, OUTPUT_NAME, WINDOW, normalize, restore
from service.cpus import usable_cpus

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
    resident memory stepped up at once, long after start; with no arena at all (plain malloc) it
    wandered. Extending by the requested size only, it settles during the first minute of load
    and then stays flat at the same throughput (soaks in docs/performance.md).
    """
    global _arena_registered
    with _arena_lock:
        if not _arena_registered:
            cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(cpu, ort.OrtArenaCfg({"arena_extend_strategy": 1}))  # kSameAsRequested
            _arena_registered = True


def session_options(
    threads: int | None = None, spinning: bool = False, level: str = "all", spin_after: bool = True
) -> ort.SessionOptions:
    """Session settings of the engine; the benchmarks vary the same knobs through here.

    Spinning is off by default: spinning workers burn a core while the service idles, and
    requests arrive milliseconds apart. ``spin_after=False`` stops the spinning as soon as the
    last run returns, instead of tens of milliseconds later: the spinning then only fills the
    gaps inside a run, between its operators.

    No memory patterns: onnxruntime keeps one preplanned block per input shape and run under way,
    so every batch size the batcher forms, times the runs side by side, stayed resident; without
    them a worker held less memory after load, at the same speed (docs/performance.md).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cpus()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_mem_pattern = False
    options.graph_optimization_level = OPTIMIZATION_LEVELS[level]
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if spinning and not spin_after:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.add_session_config_entry("session.use_env_allocators", "1")
    _register_arena()
    return options


class Engine:
    """onnxruntime CPU sessions shared by all request threads (``run`` is thread-safe).

    Batches run on a session of ``threads`` threads, several side by side under load. A lone
    window (one that runs while nothing else runs on the machine) runs on a session of
    ``lone_threads``, by default all usable CPUs: spread over every core, and spinning inside the
    run (``lone_spinning``) where the waits between operators would otherwise wake sleeping
    threads, it answered faster than on one thread for both shipped models (docs/performance.md).
    The spinning stops when the run returns. With ``lone_threads`` equal to ``threads`` lone runs
    use the batch session, as each session holds a copy of the weights.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        threads: int | None = None,
        spinning: bool = False,
        lone_threads: int | None = None,
        warm_batch: int = 1,
        warm_concurrent: int = 1,
        lone_spinning: bool = True,
    ) -> None:
        self.model_path = model_path
        self.threads = threads or usable_cpus()
        self.lone_threads = lone_threads or usable_cpus()
        self._spinning = spinning
        self._lone_spinning = lone_spinning
        self._warm_batch = warm_batch
        self._warm_concurrent = warm_concurrent
        self._session: ort.InferenceSession | None = None
        self._lone: ort.InferenceSession | None = None

    def start(self) -> Engine:
        """Open the sessions and run each once.

        A session's first run prepares its kernels, which would otherwise delay the first
        request; and the process reaches its working memory at start, not under the first load.
        """
        self._session = self._open(self.threads)
        _check_contract(self._session)
        self._lone = self._session if self.lone_threads == self.threads else self._open(self.lone_threads, lone=True)
        batch = np.zeros((self._warm_batch, 1, WINDOW), dtype=np.float32)
        with ThreadPoolExecutor(self._warm_concurrent) as pool:
            list(pool.map(lambda _: _run(self._session, batch), range(self._warm_concurrent)))
        _run(self._lone, batch[:1])
        return self

    def close(self) -> None:
        self._session = self._lone = None

    def run(self, batch: np.ndarray, lone: bool = False) -> np.ndarray:
        """Raw model call on a normalized ``N×1×L`` float32 batch; ``lone``: nothing else runs."""
        session = self._lone if lone else self._session
        if session is None:
            raise RuntimeError("Engine.run before start or after close")
        return _run(session, batch)

    def denoise(self, windows: np.ndarray, input_units: bool = False) -> np.ndarray:
        """Denoise ``N×L`` windows; the result is in normalized units unless ``input_units``."""
        z, mu, sigma = normalize(windows)
        return restore(self.run(z), mu, sigma, input_units)

    def _open(self, threads: int, lone: bool = False) -> ort.InferenceSession:
        if lone:
            options = session_options(threads, self._lone_spinning, spin_after=False)
        else:
            options = session_options(threads, self._spinning)
        return ort.InferenceSession(str(self.model_path), sess_options=options, providers=["CPUExecutionProvider"])


def check_model(model_path: Path) -> None:
    """What ``Engine.start`` refuses, found at a fraction of its cost (no optimization, no runs):
    a file onnxruntime cannot load, or a model that does not take the contract's windows."""
    options = session_options(1, level="disable")
    _check_contract(ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"]))


def _check_contract(session: ort.InferenceSession) -> None:
    """A model loaded with other names, types or windows answered every request with a 500."""
    inputs = {tensor.name: tensor for tensor in session.get_inputs()}
    outputs = {tensor.name: tensor for tensor in session.get_outputs()}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ValueError(f"it has no input {INPUT_NAME!r} and output {OUTPUT_NAME!r}")
    for kind, tensor in (("takes", inputs[INPUT_NAME]), ("gives", outputs[OUTPUT_NAME])):
        shape = tuple(tensor.shape)
        # A dimension the model names (or leaves unknown) takes what it is given.
        fits = len(shape) == 3 and all(not isinstance(d, int) or d == want for d, want in zip(shape[1:], (1, WINDOW)))
        if tensor.type != "tensor(float)" or not fits:
            raise ValueError(
                f"it {kind} {tensor.type} of shape {list(shape)}, not the contract's float N×1×{WINDOW} windows"
            )


def _run(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    return session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
