"""The service's output is the model's: compared with a direct onnxruntime session on the same
windows, in both units, one window or a batch, alone or amid concurrent requests."""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest

from service.batcher import Batcher, ModelUnavailable
from service.cpus import usable_cpus
from service.engine import Engine
from service.occupancy import Occupancy, announce_stopping, clear_slot, create_file, last_beat

from .conftest import MODEL, CountingEngine, ThreadRecordingEngine, issue_key

TOLERANCE = 1e-5


def noisy_windows(n: int, seed: int = 1) -> np.ndarray:
    """ECG-like windows in ADC-like units (large offset and scale), so the units really differ."""
    rng = np.random.default_rng(seed)
    t = np.arange(1300) / 130
    beats = np.sin(2 * np.pi * rng.uniform(0.8, 2.0, (n, 1)) * t) ** 15
    return 512 + 300 * beats + 20 * rng.standard_normal((n, 1300))


@functools.cache
def direct_session() -> ort.InferenceSession:
    return ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])


def reference(windows: np.ndarray, input_units: bool) -> np.ndarray:
    """Direct onnxruntime inference with the contract's z-score written out independently."""
    session = direct_session()
    mu = windows.mean(axis=1, keepdims=True)
    sigma = windows.std(axis=1, keepdims=True)
    sigma[sigma == 0] = 1
    z = ((windows - mu) / sigma).astype(np.float32)[:, None, :]
    out = session.run(["denoised"], {"ecg": z})[0][:, 0, :].astype(np.float64)
    return out * sigma + mu if input_units else out


@pytest.fixture
def key(runtime) -> str:
    return issue_key(runtime.store, "parity@example.org")


@pytest.mark.parametrize("units, input_units", [(None, False), ("normalized", False), ("input", True)])
def test_single_window_equals_direct_inference(client, key, units, input_units):
    windows = noisy_windows(3)
    expected = reference(windows, input_units)
    for window, want in zip(windows, expected):
        params = {"units": units} if units else None
        result = client.simulate_post(
            "/api/v1/denoising", json={"ecg_signal": window.tolist()}, params=params, headers={"x-api-key": key}
        )
        assert result.status_code == 200
        np.testing.assert_allclose(result.json["denoised_signal"], want, rtol=0, atol=TOLERANCE)
    assert not input_units or np.abs(expected).mean() > 100  # input units really are not normalized


@pytest.mark.parametrize("scale", [3e-164, 1e-163, 1e-170, 1e-300])
def test_a_window_of_tiny_values_is_scaled_as_any_other(client, key, scale):
    """Its variance underflowed to 0, taken for a flat window's: the model saw zeros, and
    ``units=input`` gave the answer to a flat line. The z-score does not depend on the scale."""
    window = noisy_windows(1)[0]
    expected = reference(window[None, :], input_units=False)[0]
    for units in ("normalized", "input"):
        result = client.simulate_post(
            "/api/v1/denoising",
            json={"ecg_signal": (window * scale).tolist()},
            params={"units": units},
            headers={"x-api-key": key},
        )
        assert result.status_code == 200
        got = np.asarray(result.json["denoised_signal"])
        if units == "input":  # back in the input's units: the normalized answer times σ, plus μ
            got = (got - window.mean() * scale) / (window.std() * scale)
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE * 10)


def test_units_given_twice_differently_are_refused_not_the_last_one_taken(client, key):
    window = {"ecg_signal": noisy_windows(1)[0].tolist()}
    twice = client.simulate_post(
        "/api/v1/denoising", json=window, query_string="units=input&units=normalized", headers={"x-api-key": key}
    )
    assert twice.status_code == 400
    assert twice.json == {"error": "units given more than once, differently: 'input' and 'normalized'"}


@pytest.mark.parametrize("units, input_units", [("normalized", False), ("input", True)])
def test_batch_equals_direct_inference(client, key, units, input_units):
    windows = noisy_windows(5, seed=2)
    result = client.simulate_post(
        "/api/v1/denoising/batch",
        json={"ecg_signals": windows.tolist()},
        params={"units": units},
        headers={"x-api-key": key},
    )
    assert result.status_code == 200
    assert set(result.json) == {"modelVersion", "denoised_signals"}
    np.testing.assert_allclose(result.json["denoised_signals"], reference(windows, input_units), rtol=0, atol=TOLERANCE)


def test_concurrent_requests_get_their_own_windows(client, key):
    """Requests coalesced into one batch each get their own rows back, in their own units."""
    windows = noisy_windows(12, seed=3)
    normalized, original = reference(windows, False), reference(windows, True)

    def call(i: int) -> np.ndarray:
        units = "input" if i % 2 else "normalized"
        result = client.simulate_post(
            "/api/v1/denoising",
            json={"ecg_signal": windows[i].tolist()},
            params={"units": units},
            headers={"x-api-key": key},
        )
        assert result.status_code == 200
        return np.array(result.json["denoised_signal"])

    with ThreadPoolExecutor(6) as pool:
        outputs = list(pool.map(call, range(len(windows))))
    for i, out in enumerate(outputs):
        np.testing.assert_allclose(out, (original if i % 2 else normalized)[i], rtol=0, atol=TOLERANCE)


def test_invalid_units(client, key):
    result = client.simulate_post(
        "/api/v1/denoising",
        json={"ecg_signal": noisy_windows(1)[0].tolist()},
        params={"units": "mV"},
        headers={"x-api-key": key},
    )
    assert result.status_code == 400
    assert result.json == {"error": "units must be 'normalized' or 'input' (got 'mV')"}


@pytest.mark.parametrize(
    "signals, error",
    [
        (None, "Missing required field: ecg_signals"),
        ("x", "ecg_signals must be an array"),
        ([], "ecg_signals must hold 1 to 64 windows (got 0)"),
        ([[0.0] * 1300] * 65, "ecg_signals must hold 1 to 64 windows (got 65)"),
        ([[0.0] * 1300, "x"], "ecg_signals[1] must be an array"),
        ([0.0] * 1300, "ecg_signals[0] must be an array"),  # one window, not wrapped in a list
        ([[0.0] * 1300, [0.0] * 1300, [0.0] * 12], "ecg_signals[2] must have exactly 1300 values (got 12)"),
        ([[0.0] * 1300, [0.0] * 17 + [None] + [0.0] * 1282], "ecg_signals[1][17] must be a finite number (got null)"),
    ],
)
def test_batch_errors_name_the_window(client, key, signals, error):
    body = {} if signals is None else {"ecg_signals": signals}
    result = client.simulate_post("/api/v1/denoising/batch", json=body, headers={"x-api-key": key})
    assert result.status_code == 400
    assert result.json["error"] == error


def test_batch_requires_a_key(client):
    result = client.simulate_post("/api/v1/denoising/batch", json={"ecg_signals": [[0.0] * 1300]})
    assert result.status_code == 401


# -- the batcher on its own ----------------------------------------------------------------------
def submit_together(batcher: Batcher, windows: np.ndarray) -> list[np.ndarray]:
    with ThreadPoolExecutor(len(windows)) as pool:
        return list(pool.map(lambda w: batcher.denoise(w[None, :]), windows))


def test_batcher_coalesces_concurrent_requests(engine):
    counting = CountingEngine(engine)
    # A wait far longer than the submissions take: the batch closes because it is full.
    batcher = Batcher(counting, max_size=4, max_wait_s=30).start()
    windows = noisy_windows(4, seed=4)
    try:
        outputs = submit_together(batcher, windows)
    finally:
        batcher.close()
    assert counting.runs == [4]
    np.testing.assert_allclose(np.concatenate(outputs), reference(windows, False), rtol=0, atol=TOLERANCE)


def test_batch_size_one_runs_each_request_alone(engine):
    counting = CountingEngine(engine)
    batcher = Batcher(counting, max_size=1, max_wait_s=30).start()
    try:
        submit_together(batcher, noisy_windows(3))
    finally:
        batcher.close()
    assert counting.runs == [1, 1, 1]


def test_a_large_request_runs_in_runs_of_max_size_at_most(engine):
    counting = CountingEngine(engine)
    batcher = Batcher(counting, max_size=4, max_wait_s=0).start()
    windows = noisy_windows(10, seed=5)
    try:
        out = batcher.denoise(windows, input_units=True)
    finally:
        batcher.close()
    assert max(counting.runs) <= 4 and sum(counting.runs) == 10
    np.testing.assert_allclose(out, reference(windows, True), rtol=0, atol=TOLERANCE)


class MeetingEngine(CountingEngine):
    """The shared engine, whose runs only proceed once two of them are under way at the same time."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.meeting = threading.Barrier(2, timeout=10)

    def run(self, batch, lone=False):
        self.meeting.wait()
        return super().run(batch, lone)


def test_two_workers_run_two_batches_at_once(engine):
    batcher = Batcher(MeetingEngine(engine), max_size=1, max_wait_s=0, workers=2).start()
    windows = noisy_windows(4, seed=6)
    try:
        outputs = submit_together(batcher, windows)
    finally:
        batcher.close()
    np.testing.assert_allclose(np.concatenate(outputs), reference(windows, False), rtol=0, atol=TOLERANCE)


def batcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("batcher-")]


def test_close_finishes_queued_work_and_stops_every_worker(engine):
    assert not batcher_threads()  # no batcher of an earlier test is still running
    counting = CountingEngine(engine)
    batcher = Batcher(counting, max_size=1, max_wait_s=0, workers=3).start()
    assert len(batcher_threads()) == 3
    with ThreadPoolExecutor(6) as pool:
        pending = [pool.submit(batcher.denoise, w[None, :]) for w in noisy_windows(6, seed=7)]
        for future in pending:
            future.result(timeout=30)
    batcher.close()
    assert batcher_threads() == []
    assert sorted(counting.runs) == [1] * 6


def test_request_to_an_idle_batcher_runs_in_its_own_thread(engine):
    recording = ThreadRecordingEngine(engine)
    batcher = Batcher(recording, max_size=8, max_wait_s=0, workers=2).start()
    try:
        batcher.denoise(noisy_windows(1))
    finally:
        batcher.close()
    assert recording.calls == [(threading.get_ident(), True)]


@pytest.fixture
def occupancy_file():
    """Makes occupancy files as the supervisor does (``occupancy_file(workers)``: the descriptor)."""
    files = []

    def make(workers: int) -> int:
        files.append(create_file(workers))
        return files[-1].fileno()

    yield make
    for file in files:
        file.close()


def test_request_waits_for_the_queue_while_another_worker_runs_the_model(engine, occupancy_file):
    """Another worker process busy: the request goes through a batch worker, on one core, instead
    of taking every core in its own thread; when the other is idle again it runs alone again."""
    fd = occupancy_file(2)
    ours, other = (Occupancy(fd, slot).start() for slot in (0, 1))
    recording = ThreadRecordingEngine(engine)
    batcher = Batcher(recording, max_size=8, max_wait_s=0, workers=2, occupancy=ours).start()
    try:
        other.publish(1)
        batcher.denoise(noisy_windows(1))
        other.publish(0)
        batcher.denoise(noisy_windows(1))
    finally:
        batcher.close()
        ours.close()
        other.close()
    (queued_thread, queued_lone), alone = recording.calls
    assert queued_thread != threading.get_ident() and not queued_lone
    assert alone == (threading.get_ident(), True)


def test_a_worker_counts_as_busy_until_its_batcher_runs(engine, occupancy_file):
    """A worker loading its model takes cores: the others do not run alone over it meanwhile."""
    fd = occupancy_file(2)
    starting, other = (Occupancy(fd, slot).start() for slot in (0, 1))
    other.publish(0)
    assert not other.others_idle()
    batcher = Batcher(engine, max_size=8, max_wait_s=0, occupancy=starting).start()
    assert other.others_idle()
    batcher.close()
    starting.close()
    other.close()


def test_workers_see_each_others_counts(occupancy_file):
    fd = occupancy_file(3)
    first, second, third = (Occupancy(fd, slot).start() for slot in range(3))
    for worker in (first, second):
        worker.publish(0)
    third.publish(2)
    assert not first.others_idle() and not second.others_idle() and third.others_idle()
    third.close()  # a worker that stops leaves its slot at zero
    assert first.others_idle()
    second.publish(3)
    clear_slot(fd, 1)  # the supervisor, when the worker has died
    assert first.others_idle()
    first.close()
    second.close()
    assert Occupancy().start().others_idle()  # a single process: no others
    assert Occupancy().start().deactivations() == 0
    with pytest.raises(ValueError, match="slot 3"):
        Occupancy(fd, 3).start()


def test_a_deactivation_is_news_to_every_worker_and_a_replacement_goes_on_counting(occupancy_file):
    fd = occupancy_file(2)
    first, second = (Occupancy(fd, slot).start() for slot in (0, 1))
    first.announce_deactivation()
    assert second.deactivations() == first.deactivations() == 1
    second.close()
    clear_slot(fd, 1)  # the supervisor, when the worker has died
    replacement = Occupancy(fd, 1).start()
    replacement.announce_deactivation()
    assert first.deactivations() == 2  # never back to a count seen before
    first.close()
    replacement.close()


def test_the_supervisor_tells_every_worker_that_the_service_stops(occupancy_file):
    fd = occupancy_file(2)
    first, second = (Occupancy(fd, slot).start() for slot in (0, 1))
    first.announce_deactivation()
    assert not first.stopping() and not second.stopping()
    announce_stopping(fd)
    assert first.stopping() and second.stopping()
    assert first.deactivations() == 1 and second.others_idle() is False  # no count was overwritten
    first.close()
    second.close()
    assert not Occupancy().start().stopping()  # a single process: told by its own signal


def normalized(windows: np.ndarray) -> np.ndarray:
    mu, sigma = windows.mean(axis=1, keepdims=True), windows.std(axis=1, keepdims=True)
    return ((windows - mu) / sigma).astype(np.float32)[:, None, :]


def test_lone_session_gives_the_batch_sessions_rows():
    engine = Engine(MODEL, threads=1, lone_threads=2).start()
    windows = noisy_windows(3, seed=9)
    z = normalized(windows)
    np.testing.assert_allclose(engine.run(z, lone=True)[:, 0, :], reference(windows, False), rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(engine.run(z)[:, 0, :], reference(windows, False), rtol=0, atol=TOLERANCE)
    engine.close()


@pytest.mark.parametrize("lone_threads", [None, 1])
def test_start_opens_the_lone_session(lone_threads):
    """Unset, lone runs get a session over all usable CPUs that spins inside a run and stops when
    it returns; at the batch session's thread count they share it (one copy of the weights)."""
    engine = Engine(MODEL, threads=1, lone_threads=lone_threads).start()
    assert engine.lone_threads == (lone_threads or usable_cpus())
    options = engine._lone.get_session_options()
    assert options.intra_op_num_threads == engine.lone_threads
    assert (engine._lone is engine._session) == (engine.lone_threads == 1)
    if engine._lone is not engine._session:
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert not options.enable_mem_pattern
    windows = noisy_windows(2, seed=10)
    np.testing.assert_allclose(
        engine.run(normalized(windows), lone=True)[:, 0, :], reference(windows, False), rtol=0, atol=TOLERANCE
    )
    engine.close()


def test_failed_run_reaches_its_request_and_the_next_one_is_served(engine, occupancy_file):
    """The failed run's request gets the error; the count the other workers see is back to 0, so
    the next request still runs alone."""
    fd = occupancy_file(2)
    ours, other = (Occupancy(fd, slot).start() for slot in (0, 1))
    other.publish(0)
    recording = ThreadRecordingEngine(engine, fail_first=True)
    batcher = Batcher(recording, max_size=8, max_wait_s=0, occupancy=ours).start()
    windows = noisy_windows(1, seed=8)
    with pytest.raises(RuntimeError, match="the model broke"):
        batcher.denoise(windows)
    assert other.others_idle()
    out = batcher.denoise(windows)
    batcher.close()
    ours.close()
    other.close()
    np.testing.assert_allclose(out, reference(windows, False), rtol=0, atol=TOLERANCE)
    assert recording.calls == [(threading.get_ident(), True)] * 2


def test_closed_batcher_refuses_work(engine):
    batcher = Batcher(engine, max_size=4, max_wait_s=0)
    assert not batcher.ready  # not started
    batcher.start()
    assert batcher.ready
    batcher.close()
    assert not batcher.ready
    with pytest.raises(ModelUnavailable):
        batcher.denoise(noisy_windows(1))


def test_each_worker_beats_in_its_own_slot_and_the_counts_stay_apart(occupancy_file):
    fd = occupancy_file(2)
    first, second = (Occupancy(fd, slot).start() for slot in (0, 1))
    first.publish(0)
    assert last_beat(fd, 0) == last_beat(fd, 1) == 0  # neither loop has run yet
    before = time.monotonic()
    second.beat()
    assert last_beat(fd, 0) == 0 and before - 0.001 <= last_beat(fd, 1) <= time.monotonic()
    assert second.others_idle() and first.deactivations() == 0  # a beat is neither a run nor a deactivation
    first.close()
    second.close()
