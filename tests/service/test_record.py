"""Whole recordings: the signal processing of ``service.recording``, ``POST /api/v1/denoising/record``
in JSON and float32, every bad input, sharing the batcher with single windows, and the command.

Synthetic signals always; the real recordings of ``../shared/data`` where they are present."""

from __future__ import annotations

import contextlib
import gzip
import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import falcon.testing
import numpy as np
import orjson
import pytest

from service import codec, record, recording, resources
from service.app import create_app, server_rules
from service.batcher import Batcher
from service.connections import create_server
from service.contract import SAMPLING_RATE_HZ, WINDOW
from service.engine import Engine
from service.runtime import Runtime

from .conftest import (
    INT8,
    REPO,
    CountingEngine,
    ThreadRecordingEngine,
    issue_key,
    service_with_key,
    smtp_config,
    wait_until,
)
from .inprocess import read_all

DATA = REPO.parent / "shared" / "data"
URL = "/api/v1/denoising/record"


def ecg(seconds: float, rate: float, seed: int = 0, offset: float = 512.0, noise: float = 1.0) -> np.ndarray:
    """ECG-like beats in ADC-like units (offset, scale), with baseline wander and white noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    beats = np.sin(np.pi * 1.1 * t) ** 40
    return offset + 300 * beats + noise * (40 * np.sin(2 * np.pi * 0.2 * t) + 15 * rng.standard_normal(len(t)))


@pytest.fixture
def key(runtime) -> str:
    return issue_key(runtime.store, "records@example.org")


def post_json(client, key, body, **kwargs):
    return client.simulate_post(URL, json=body, headers={"x-api-key": key}, **kwargs)


def post_binary(client, key, samples, rate=None, **kwargs):
    params = {"sampling_rate": str(rate)} if rate is not None else None
    return client.simulate_post(
        URL,
        body=np.asarray(samples, dtype="<f4").tobytes(),
        params=params,
        headers={"x-api-key": key, "Content-Type": "application/octet-stream"},
        **kwargs,
    )


# -- the signal processing -----------------------------------------------------------------------
@pytest.mark.parametrize("length", [260, WINDOW - 1, WINDOW, WINDOW + 1, 3 * WINDOW + 7, 4 * WINDOW])
def test_stitch_is_exact_on_windows_cut_from_one_signal(length):
    """Cross-fading windows that agree gives the signal back, ends included (no zero weight)."""
    x = np.random.default_rng(3).standard_normal(length)
    windows = recording.cut(x)
    if length >= WINDOW:  # windows over the signal alone: each one's mean put back gives it again
        means = [x[start : start + WINDOW].mean() for start in _starts(length)]
        np.testing.assert_allclose(recording.stitch(windows + np.c_[means], length), x, atol=1e-12)
    else:  # one window, padded by reflection and centred: the signal less that window's mean
        assert np.ptp(recording.stitch(windows, length) - x) < 1e-12


def _starts(length: int) -> list[int]:
    return [0] if length < WINDOW else sorted({*range(0, length - WINDOW + 1, recording.HOP), length - WINDOW})


@pytest.mark.parametrize("length", [260, WINDOW, WINDOW + 1, 4 * WINDOW, 4 * WINDOW + 100])
def test_cut_starts_at_the_first_sample_and_ends_at_the_last(length):
    """The model sees the recording's own ends, as a window request would, not a mirror of them."""
    x = ecg(length / 130, 130)
    windows = recording.cut(x)
    assert windows.shape == (len(_starts(length)), WINDOW)
    np.testing.assert_allclose(windows.mean(axis=1), 0, atol=1e-9)
    if length >= WINDOW:
        np.testing.assert_allclose(windows[0], x[:WINDOW] - x[:WINDOW].mean(), atol=1e-9)
        np.testing.assert_allclose(windows[-1], x[-WINDOW:] - x[-WINDOW:].mean(), atol=1e-9)


def test_a_recording_of_one_window_comes_back_as_that_windows_answer():
    """No cross-fade where nothing overlaps: the answer the window route would give, centred."""
    x = ecg(10, 130) + 3.0
    assert len(x) == WINDOW
    twice = recording.denoise(x, SAMPLING_RATE_HZ, lambda windows: 2 * windows)
    np.testing.assert_allclose(twice, 2 * (x - x.mean()), atol=1e-9)


@pytest.mark.parametrize("rate", [50, 250.5, 360, 1000, 130.05])
def test_resampling_there_and_back_keeps_a_band_limited_signal(rate):
    t = np.arange(round(20 * rate)) / rate
    x = 500 + np.sin(2 * np.pi * 1.3 * t) + 0.3 * np.sin(2 * np.pi * 17 * t)
    n = recording.model_length(len(x), rate)
    back = recording.resample(recording.resample(x, rate, SAMPLING_RATE_HZ, n), SAMPLING_RATE_HZ, rate, len(x))
    assert len(back) == len(x)
    inner = slice(round(rate), -round(rate))
    assert np.abs(back - x)[inner].max() < 2e-4  # the middle: the resampler itself
    assert np.abs(back - x).max() < 0.02  # the ends: no ringing from the offset


def test_the_130_hz_path_is_not_resampled():
    x = ecg(10, 130)
    np.testing.assert_array_equal(recording.resample(x, 130, 130, len(x)), x)


# -- the endpoint --------------------------------------------------------------------------------
@pytest.mark.parametrize("seconds, rate", [(2, 130), (10, 130), (10 + 1 / 130, 130), (2, 50), (2, 250.5), (2, 1000)])
def test_lengths_and_rates_come_back_as_sent(client, key, seconds, rate):
    x = ecg(seconds, rate)
    result = post_json(client, key, {"ecg_signal": x.tolist(), "sampling_rate": rate})
    assert result.status_code == 200, result.json
    assert set(result.json) == {"modelVersion", "sampling_rate", "denoised_signal"}
    assert result.json["sampling_rate"] == rate
    out = np.array(result.json["denoised_signal"])
    assert len(out) == len(x) and np.all(np.isfinite(out))
    assert abs(out.mean()) < 0.1 * out.std()  # baseline removed: not around the input's 512
    assert 0.3 < out.std() / (x - x.mean()).std() < 1.5  # in the input's units


def test_json_values_beyond_float32_come_back_finite(client, key):
    """JSON admits numbers up to 1e100; the answer, in the input's units, must not overflow."""
    x = ecg(2, 130) * 1e60
    result = post_json(client, key, {"ecg_signal": x.tolist()})
    assert result.status_code == 200
    out = result.json["denoised_signal"]
    assert all(isinstance(v, float) and np.isfinite(v) for v in out) and max(map(abs, out)) > 1e50


@pytest.mark.parametrize("scale", [2.0**120, 2.0**-200])
def test_values_far_from_one_are_denoised_as_their_scaled_copy_at_any_rate(client, key, scale):
    """The resampler overflows from about 1e36: a recording scaled by 2**120 (1.3e36) must come
    back as the unscaled one's answer, scaled (powers of two scale exactly), not as nulls; one
    scaled by 2**-200 (6e-61), not as float32's zeros."""
    x = ecg(4, 250, seed=6)
    unscaled = post_json(client, key, {"ecg_signal": x.tolist(), "sampling_rate": 250}).json["denoised_signal"]
    scaled = post_json(client, key, {"ecg_signal": (x * scale).tolist(), "sampling_rate": 250})
    assert scaled.status_code == 200
    np.testing.assert_allclose(np.array(scaled.json["denoised_signal"]) / scale, unscaled, rtol=1e-6, atol=0)


def test_float32_at_its_largest_values_comes_back_finite(client, key):
    """A square wave at float32's largest values: the model overshoots them."""
    x = np.sign(np.sin(np.arange(520) / 5)) * np.finfo(np.float32).max
    result = post_binary(client, key, x, 130)
    assert result.status_code == 200
    assert np.isfinite(np.frombuffer(result.content, "<f4")).all()


def test_a_flat_stretch_comes_back_flat_whatever_the_offset(client, key):
    """A lead off for 30 s, in ADC counts: baseline removed, it comes back as a flat line at 0
    where only flat windows cover it, and the same whatever the offset, not as the model's answer
    to a flat window scaled by the recording's magnitude (offset included)."""
    x = ecg(60, 130, seed=8, offset=0)
    x[10 * 130 : 40 * 130] = 0.0
    answers = {}
    # 512.3 and 1.7: levels whose mean is off in its last bit, so that a flat window centred on
    # it was not quite zero (1e-16), and came back as an invented signal 60 times the beats.
    for offset in (0.0, 2048.0, 1e6, 512.3, 1.7):
        answers[offset] = np.array(
            post_json(client, key, {"ecg_signal": (x + offset).tolist()}).json["denoised_signal"]
        )
        assert np.abs(answers[offset][15 * 130 : 35 * 130]).max() < 1e-6 * max(1.0, offset)
        flat = post_json(client, key, {"ecg_signal": [offset] * 1300}).json["denoised_signal"]
        assert np.abs(flat).max() < 1e-6 * max(1.0, offset)
    assert np.abs(answers[0.0][: 10 * 130]).max() > 100  # the beats are still there
    np.testing.assert_allclose(answers[2048.0], answers[0.0], atol=1e-3)
    np.testing.assert_allclose(answers[1e6], answers[0.0], atol=0.5)
    np.testing.assert_allclose(answers[512.3], answers[0.0], atol=1e-3)


def test_a_json_recording_takes_its_rate_from_the_query_too_and_never_ignores_it(client, key):
    """A rate given and ignored would denoise the recording at the wrong rate, silently."""
    x = ecg(4, 250, seed=2)
    in_body = post_json(client, key, {"ecg_signal": x.tolist(), "sampling_rate": 250}).json
    in_query = post_json(client, key, {"ecg_signal": x.tolist()}, params={"sampling_rate": "250"}).json
    assert in_query == in_body and in_query["sampling_rate"] == 250
    both = post_json(client, key, {"ecg_signal": x.tolist(), "sampling_rate": 250}, params={"sampling_rate": "250.0"})
    assert both.status_code == 200
    differ = post_json(client, key, {"ecg_signal": x.tolist(), "sampling_rate": 250}, params={"sampling_rate": "360"})
    assert differ.status_code == 400
    assert differ.json == {"error": "sampling_rate given twice, differently: 250 Hz in the body, 360 Hz in the query"}
    twice = post_json(client, key, {"ecg_signal": x.tolist()}, query_string="sampling_rate=250&sampling_rate=130")
    assert twice.status_code == 400
    assert twice.json == {"error": "sampling_rate given more than once, differently: '250' and '130'"}
    same = post_json(client, key, {"ecg_signal": x.tolist()}, query_string="sampling_rate=250&sampling_rate=250.0")
    assert same.json == in_body
    low = post_json(client, key, {"ecg_signal": x.tolist()}, params={"sampling_rate": "20"})
    assert (low.status_code, low.json) == (400, {"error": "sampling_rate must be from 50 to 1000 Hz (got 20)"})
    huge = post_json(client, key, {"ecg_signal": x.tolist(), "sampling_rate": 1e308})  # not 309 digits
    assert huge.json == {"error": "sampling_rate must be from 50 to 1000 Hz (got 1e+308)"}
    nested = post_json(client, key, {"ecg_signal": [x[:1300].tolist()] * 3})  # not "at least 2 seconds"
    assert nested.json == {"error": "ecg_signal[0] must be a finite number (got an array)"}


def test_json_and_binary_agree_and_130_hz_is_the_default(client, key):
    x = ecg(10 + 1 / 360, 360, seed=4).astype(np.float32)
    as_json = post_json(client, key, {"ecg_signal": x.tolist(), "sampling_rate": 360})
    as_binary = post_binary(client, key, x, 360)
    assert as_binary.status_code == 200 and as_binary.headers["content-type"] == "application/octet-stream"
    np.testing.assert_allclose(np.frombuffer(as_binary.content, "<f4"), as_json.json["denoised_signal"], atol=1e-4)
    default = post_json(client, key, {"ecg_signal": x[:1300].tolist()})
    assert default.json["sampling_rate"] == 130 and len(default.json["denoised_signal"]) == 1300


def test_no_seams_and_better_than_glued_windows(client, key, engine):
    """A clean signal comes back closer to itself than glued windows do, with no jump at their
    boundaries."""
    x = ecg(60, 130, seed=5, offset=0, noise=0)
    x -= x.mean()
    clean = np.frombuffer(post_binary(client, key, x, 130).content, "<f4")[: 6 * WINDOW]
    glued = engine.denoise(x[: 6 * WINDOW].reshape(-1, WINDOW), input_units=True).reshape(-1)
    target = x[: 6 * WINDOW]
    jumps = np.abs(np.diff(clean))[WINDOW - 1 :: WINDOW][:5]
    assert jumps.max() < 3 * np.median(np.abs(np.diff(clean)))
    assert np.sqrt(np.mean((clean - target) ** 2)) <= np.sqrt(np.mean((glued - target) ** 2))


@pytest.mark.skipif(not (DATA / "mitdb" / "100.hea").exists(), reason=f"no MIT-BIH records under {DATA}")
def test_a_real_recording_at_its_own_rate_matches_the_130_hz_path(client, key):
    """MIT-BIH 100 sent at its own 360 Hz and sent resampled to 130 Hz: the same clean ECG."""
    wfdb = pytest.importorskip("wfdb")
    raw = wfdb.rdrecord(str(DATA / "mitdb" / "100"), sampto=360 * 60).p_signal[:, 0]
    at_360 = np.frombuffer(post_binary(client, key, raw, 360).content, "<f4")
    at_130 = np.frombuffer(post_binary(client, key, recording.resample(raw, 360, 130, 130 * 60), 130).content, "<f4")
    back = recording.resample(at_360, 360, 130, 130 * 60)
    assert np.corrcoef(back, at_130)[0, 1] > 0.98


BAD_JSON = [
    ({}, "Missing required field: ecg_signal"),
    ({"ecg_signal": "1,2,3"}, "ecg_signal must be an array"),
    ({"ecg_signal": [0.0] * 17 + [None] + [0.0] * 300}, "ecg_signal[17] must be a finite number (got null)"),
    ({"ecg_signal": [0.0] * 300 + ["1"]}, "ecg_signal[300] must be a finite number (got a string)"),
    ({"ecg_signal": [0.0] * 259}, "ecg_signal must hold at least 2 seconds: 260 values at 130 Hz (got 259)"),
    ({"ecg_signal": [0.0] * 600, "sampling_rate": "250"}, "sampling_rate must be a number of Hz (got a string)"),
    ({"ecg_signal": [0.0] * 600, "sampling_rate": True}, "sampling_rate must be a number of Hz (got a boolean)"),
    ({"ecg_signal": [0.0] * 600, "sampling_rate": 49.9}, "sampling_rate must be from 50 to 1000 Hz (got 49.9)"),
    ({"ecg_signal": [0.0] * 6000, "sampling_rate": 1001}, "sampling_rate must be from 50 to 1000 Hz (got 1001)"),
    ({"ecg_signal": [0.0] * 600, "sampling_rate": 10**400}, "sampling_rate must be from 50 to 1000 Hz (got inf)"),
]


@pytest.mark.parametrize("body, message", BAD_JSON)
def test_bad_json_gets_400_naming_the_fault(client, key, body, message):
    result = post_json(client, key, body)
    assert result.status_code == 400 and result.json["error"] == message


BIG_ENDIAN = (
    "A binary body holds little-endian float32 samples; these read as big-endian ones (send them little-endian)"
)


@pytest.mark.parametrize(
    "data, rate, message",
    [
        (b"\0" * 4000, None, "Missing required query parameter: sampling_rate (binary bodies carry no rate)"),
        (b"\0" * 4000, "fast", "sampling_rate must be a number of Hz (got 'fast')"),
        (b"\0" * 4000, "2000", "sampling_rate must be from 50 to 1000 Hz (got 2000)"),
        (b"\0" * 4000, "1_000", "sampling_rate must be a number of Hz (got '1_000')"),
        (b"\0" * 4000, "\uff12\uff15\uff10", "sampling_rate must be a number of Hz (got '\uff12\uff15\uff10')"),
        (b"\0" * 4000, "nan", "sampling_rate must be a number of Hz (got 'nan')"),
        (b"\0" * 4000, "1000.0000000001", "sampling_rate must be from 50 to 1000 Hz (got 1000.0000000001)"),
        (b"\0" * 4000, "49.99999999999999", "sampling_rate must be from 50 to 1000 Hz (got 49.99999999999999)"),
        (b"\0" * 4000, "9" * 5000 + "x", f"sampling_rate must be a number of Hz (got '{'9' * 40}…')"),
        (b"\0" * 4001, "130", "A binary body holds float32 samples, 4 bytes each (got 4001 bytes)"),
        (np.r_[np.zeros(5), np.nan, np.zeros(300)], "130", "ecg_signal[5] must be a finite number (got NaN)"),
        (np.r_[np.zeros(300), -np.inf], "130", "ecg_signal[300] must be a finite number (got -Infinity)"),
        # Samples in big-endian order: ADC counts, and a signal in mV (it was answered 200, in garbage).
        (np.round(2000 * np.sin(np.arange(650) / 20)).astype(">f4").tobytes(), "130", BIG_ENDIAN),
        ((0.8 * np.sin(np.arange(650) / 20) + 0.01).astype(">f4").tobytes(), "130", BIG_ENDIAN),
    ],
)
def test_bad_binary_gets_400_naming_the_fault(client, key, data, rate, message):
    body = data if isinstance(data, bytes) else np.asarray(data, "<f4").tobytes()
    result = client.simulate_post(
        URL,
        body=body,
        params={"sampling_rate": rate} if rate else None,
        headers={"x-api-key": key, "Content-Type": "application/octet-stream"},
    )
    assert result.status_code == 400 and result.json["error"] == message


def test_a_compressed_body_gets_415_rather_than_being_denoised_as_samples(client, key):
    """A gzip stream read as float32 samples came back 200, denoised noise, or a 400 about its bytes."""
    samples = (0.8 * np.sin(np.arange(1300) / 20)).astype("<f4").tobytes()
    for coding, body, kind in (
        ("gzip", gzip.compress(samples), "application/octet-stream"),
        ("GZIP, identity", gzip.compress(samples), "application/octet-stream"),
        ("deflate", zlib.compress(b'{"ecg_signal": [0.5]}'), "application/json"),
    ):
        headers = {"x-api-key": key, "Content-Type": kind, "Content-Encoding": coding}
        result = client.simulate_post(URL, body=body, params={"sampling_rate": "130"}, headers=headers)
        expected = f"Content-Encoding {coding.lower()!r} is not supported: send the body uncompressed"
        assert result.status_code == 415 and result.json == {"error": expected}
    headers = {"x-api-key": key, "Content-Type": "application/octet-stream", "Content-Encoding": "identity"}
    assert client.simulate_post(URL, body=samples, params={"sampling_rate": "130"}, headers=headers).status_code == 200


def test_a_rate_of_many_digits_is_refused_rather_than_hanging():
    """Digits, then a letter: the rate's pattern split the digits every way before it gave up,
    holding the GIL (the worker's loop too) for seconds at 30,000 digits, for hours at 200,000.
    In a process of its own: a match holds the GIL, and no thread of this one could time it out."""
    check = (
        "from service import validation\n"
        "try:\n    validation.binary_record(b'', '1' * 200_000 + 'x', 3600)\n"
        "except validation.ValidationError as exc:\n    print(exc)"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("sampling_rate must be a number of Hz (got '1111")


def test_keys_are_required(client):
    assert client.simulate_post(URL, json={"ecg_signal": [0.0] * 300}).status_code == 401
    wrong = client.simulate_post(URL, json={"ecg_signal": [0.0] * 300}, headers={"x-api-key": "nope"})
    assert wrong.status_code == 401 and wrong.json["error"] == "Invalid or inactive API key"


def test_too_long_gets_413_and_the_limit_follows_max_record_seconds(runtime_with, sqlite_url):
    import falcon.testing

    from service.app import create_app

    runtime = runtime_with(sqlite_url, max_record_seconds=5)
    client = falcon.testing.TestClient(create_app(runtime.deps))
    key = issue_key(runtime.store, "long@example.org")
    result = post_json(client, key, {"ecg_signal": [0.0] * 1300, "sampling_rate": 250})
    assert (
        result.status_code == 413
        and result.json["error"] == "Recording too long: at most 5 seconds (got 5.2 s at 250 Hz)"
    )
    assert post_binary(client, key, np.zeros(651), 130).status_code == 413
    limit = runtime.deps.config.record_body_bytes(binary=True)
    big = post_binary(client, key, np.zeros(limit // 4 + 1), 1000)
    assert big.status_code == 413 and big.json["error"] == f"Request body too large (limit {limit} bytes)"


def test_a_body_of_more_numbers_or_arrays_than_its_route_takes_is_refused_before_it_is_parsed(runtime_with, sqlite_url):
    """Within a body limit, which is sized for long numbers, "0,0,0…" packs many times as many
    values, and "[[[…]]]" a list every byte: parsed, they took gigabytes. Each route counts the
    commas and brackets of a body over 64 KiB first: a recording up to its longest, a window
    route up to twice what it takes (a window a little too long gets the 400 that says so)."""
    rt = runtime_with(sqlite_url, max_record_seconds=2)  # 2000 samples at most
    client = falcon.testing.TestClient(create_app(rt.deps))
    key = issue_key(rt.store, "many@example.org")
    headers = {"x-api-key": key, "Content-Type": "application/json"}
    result = post_json(client, key, {"ecg_signal": [0] * 90_000, "sampling_rate": 1000})
    assert result.status_code == 413
    assert result.json == {"error": "Request body too large: more than 2016 values"}
    just_over = post_json(client, key, {"ecg_signal": [0] * 2001, "sampling_rate": 1000})
    assert just_over.json == {"error": "Recording too long: at most 2 seconds (got 2.001 s at 1000 Hz)"}
    assert post_json(client, key, {"ecg_signal": ecg(2, 1000).tolist(), "sampling_rate": 1000}).status_code == 200
    nested = b'{"ecg_signal": [' + b",".join([b"[" * 50 + b"]" * 50] * 700) + b"]}"  # 35000 lists in 70 kB
    bomb = client.simulate_post(URL, body=nested, headers=headers)
    assert bomb.status_code == 413 and bomb.json == {"error": "Request body too large: more than 17 arrays and objects"}
    keys = {"ecg_signal": [0.5] * 500, "sampling_rate": 1000, **{f"k{n:079}": 0 for n in range(1000)}}
    key_bomb = post_json(client, key, keys)  # each key a string object, and an entry of a dict
    assert key_bomb.status_code == 413 and key_bomb.json == {"error": "Request body too large: more than 17 strings"}
    for encoding, errors in (("utf-16-le", "surrogatepass"), ("utf-8", "surrogatepass")):
        lone = ('{"ecg_signal": "' + "\ud800" * 40_000 + '"}').encode(encoding, errors)  # past 64 KiB
        stalled = client.simulate_post(URL, body=lone, headers=headers)  # decoded, it held the GIL for seconds
        assert stalled.status_code == 400 and stalled.json["error"] == "Missing required field: ecg_signal"
    batch_bomb = client.simulate_post(
        "/api/v1/denoising/batch", body=nested.replace(b"signal", b"signals"), headers=headers
    )
    assert batch_bomb.json == {"error": "Request body too large: more than 144 arrays and objects"}
    zeros = client.simulate_post("/api/v1/denoising", json={"ecg_signal": [0] * 200_000}, headers=headers)
    assert zeros.status_code == 413 and zeros.json == {"error": "Request body too large: more than 166416 values"}
    at_500_hz = client.simulate_post("/api/v1/denoising", json={"ecg_signal": [0.123456789] * 5000}, headers=headers)
    assert at_500_hz.status_code == 400
    assert at_500_hz.json["error"] == "ecg_signal must have exactly 1300 values (got 5000)"
    too_many = {"ecg_signals": [[0.123456789] * WINDOW] * 65}  # one window over the batch limit, 1 MB
    over = client.simulate_post("/api/v1/denoising/batch", json=too_many, headers=headers)
    assert over.status_code == 400 and over.json == {"error": "ecg_signals must hold 1 to 64 windows (got 65)"}


def test_a_large_body_the_stdlib_must_parse_lets_the_other_threads_run():
    """orjson refuses ``NaN`` (and numbers beyond float64), and the stdlib's scanner, which reads
    them as the old service did, held the GIL through the whole body: one recording froze its
    worker's other threads, health checks included, for seconds."""
    body = b'{"ecg_signal": [NaN,' + b"0.25," * 1_000_000 + b'0.5], "sampling_rate": 1000}'
    turns, stop = [0], threading.Event()

    def other_thread() -> None:
        while not stop.is_set():
            turns[0] += 1
            time.sleep(0.001)

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        before = turns[0]
        parsed = codec.loads(body, 2_000_000, 16)
        during = turns[0] - before
    finally:
        stop.set()
        thread.join()
    assert np.isnan(parsed["ecg_signal"][0]) and len(parsed["ecg_signal"]) == 1_000_002
    assert during >= 20, during  # held throughout, it ran a few times at most


class GatedEngine(CountingEngine):
    """The shared engine, whose runs wait until the test opens the gate."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.threads, self.lone_threads = engine.threads, engine.lone_threads
        self.entered = threading.Event()
        self.gate = threading.Event()

    def run(self, batch, lone=False):
        self.entered.set()
        self.gate.wait(30)
        return super().run(batch, lone)


def test_recordings_past_the_workers_turns_wait_then_get_503(tmp_path, engine, smtp, sqlite_url, monkeypatch):
    """RECORD_CONCURRENCY bounds the memory recordings take in one worker: one more waits for a
    turn, and gets a 503 with Retry-After if none comes in time."""
    monkeypatch.setattr(resources, "RECORD_WAIT_S", 0.5)
    gated = GatedEngine(engine)
    with Runtime(smtp_config(tmp_path, sqlite_url, smtp, record_concurrency=1), engine=gated) as rt:
        client = falcon.testing.TestClient(create_app(rt.deps))
        key = issue_key(rt.store, "turns@example.org")
        body = {"ecg_signal": ecg(4, 130).tolist()}
        first: list[int] = []
        running = threading.Thread(target=lambda: first.append(post_json(client, key, body).status_code))
        running.start()
        assert gated.entered.wait(10)
        busy = post_json(client, key, body)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
        assert busy.json == {"error": "Busy with other recordings. Try again shortly."}
        gated.gate.set()
        running.join(30)
        assert first == [200]
        assert post_json(client, key, body).status_code == 200  # the turn is free again


def test_large_batch_requests_past_their_turns_get_503_and_small_ones_pass(tmp_path, engine, smtp, sqlite_url):
    """Each large batch request holds a web thread while its windows run: one client's dozens in
    flight held every thread, and other clients' windows waited seconds for one. A quarter of the
    threads at most: with 16, two run and two wait."""
    gated = GatedEngine(engine)
    with Runtime(smtp_config(tmp_path, sqlite_url, smtp, web_threads=16), engine=gated) as rt:
        client = falcon.testing.TestClient(create_app(rt.deps))
        key = issue_key(rt.store, "batches@example.org")
        headers = {"x-api-key": key}
        large = {"ecg_signals": ecg(90, 130).reshape(9, WINDOW).tolist()}  # more than one model run
        small = {"ecg_signals": large["ecg_signals"][:8]}
        answers: list[int] = []

        def post(body: dict) -> None:
            answers.append(client.simulate_post("/api/v1/denoising/batch", json=body, headers=headers).status_code)

        threads = [threading.Thread(target=post, args=(body,)) for body in (large, large, large, large, small)]
        threads[0].start()
        assert gated.entered.wait(10)
        for thread in threads[1:4]:
            thread.start()
        time.sleep(0.3)  # the second runs, the third and fourth wait for a turn
        busy = client.simulate_post("/api/v1/denoising/batch", json=large, headers=headers)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
        assert busy.json == {"error": "Busy with other batch requests. Try again shortly."}
        threads[4].start()  # needs no turn
        time.sleep(0.3)
        gated.gate.set()
        for thread in threads:
            thread.join(30)
        assert answers.count(200) == 5


def test_a_recording_whose_client_hung_up_leaves_the_line(tmp_path, engine, smtp, sqlite_url, caplog):
    """A real server: one recording runs, one waits in line and its client hangs up, a third
    comes. The second leaves the line without running (logged 499), so the third waits for the
    turn instead of getting the 503 for a full line, and nothing runs for nobody."""
    caplog.set_level(logging.INFO, logger="service.access")
    gated = GatedEngine(engine)
    config = smtp_config(tmp_path, sqlite_url, smtp, host="127.0.0.1", port=0, web_threads=4)  # 1 turn, 1 waiting
    with Runtime(config, engine=gated) as rt:
        server = create_server(create_app(rt.deps), config)
        loop = threading.Thread(target=server.run, daemon=True)
        loop.start()
        key = issue_key(rt.store, "gone@example.org")
        body = orjson.dumps({"ecg_signal": ecg(4, 130).tolist()})
        head = b"POST /api/v1/denoising/record HTTP/1.1\r\nHost: x\r\nx-api-key: %s\r\n" % key.encode()
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        answers: dict[str, bytes] = {}

        def post(name: str) -> None:
            with socket.create_connection(("127.0.0.1", server.effective_port), timeout=30) as client:
                client.sendall(head + body)
                answers[name] = client.recv(12)

        first = threading.Thread(target=post, args=("first",))
        first.start()
        assert gated.entered.wait(10)
        with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as hung_up:
            hung_up.sendall(head + body)
            time.sleep(0.3)  # in line by now
        wait_until(lambda: any(" 499 " in r.getMessage() for r in caplog.records), 10, "the hung-up one gone")
        third = threading.Thread(target=post, args=("third",))
        third.start()
        time.sleep(0.3)
        assert "third" not in answers  # waiting for the turn, not refused
        gated.gate.set()
        for thread in (first, third):
            thread.join(30)
        assert answers == {"first": b"HTTP/1.1 200", "third": b"HTTP/1.1 200"}
        server.drain(1)
        loop.join(10)


def test_recordings_read_slowly_hold_no_thread(tmp_path, smtp, sqlite_url):
    """waitress's thread that wrote an answer past 16 MiB waited for its client to read it
    before it served the request pipelined behind: two such clients held both threads, and
    health checks hung."""
    config = smtp_config(tmp_path, sqlite_url, smtp, host="127.0.0.1", port=0, web_threads=2)
    int8 = Engine(INT8, threads=1, lone_threads=1).start()
    with contextlib.closing(int8), Runtime(config, engine=int8) as rt:
        server = create_server(create_app(rt.deps), config, server_rules(rt.deps))
        loop = threading.Thread(target=server.run, daemon=True)
        loop.start()
        port = server.effective_port
        key = issue_key(rt.store, "slow-reader@example.org")
        body = orjson.dumps({"ecg_signal": (9e99 * np.sin(np.arange(1_000_000) / 50)).tolist()})  # 23 MB back
        head = b"POST /api/v1/denoising/record?sampling_rate=1000 HTTP/1.1\r\nHost: x\r\nx-api-key: %s\r\n"
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        request = head % (key.encode(), len(body)) + body + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        slow = []
        for _ in range(2):
            client = socket.create_connection(("127.0.0.1", port), timeout=30)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.sendall(request)  # and reads nothing yet
            slow.append(client)
            wait_until(
                lambda: sum(c.total_outbufs_len > 16 << 20 for c in list(server.active_channels.values())) == len(slow),
                60,
                "the answer waiting on its reader",
            )
            # Its upload place is given back once its task ends, just after the answer is written:
            # the next recording needs it, or gets a 503.
            wait_until(lambda: server.intake.places.free == 1, 10, "the upload place given back")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as probe:
            probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert read_all(probe).startswith(b"HTTP/1.1 200 ")
        for client in slow:
            client.close()
        server.drain(1)
        loop.join(10)


def test_a_large_recording_without_an_active_key_is_refused_before_it_is_uploaded(service_process, tmp_path):
    """A body past the default limit is spooled to disk as it arrives. The served process
    answers a recording without a key, or with a key that is not active, from its headers: the
    client gets its 401 without sending the body. With an active key, a client that expects
    "100 Continue" gets it, sends the body and is served."""
    service, key = service_with_key(service_process, tmp_path, {"MAX_BATCH_WINDOWS": "1"})  # 1 MiB default
    samples = ecg(300, 1000).astype("<f4")  # 1.2 MB
    head = (
        b"POST /api/v1/denoising/record?sampling_rate=1000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n" % samples.nbytes
    )

    def answer(client: socket.socket) -> tuple[bytes, bytes]:
        data = b""
        while part := client.recv(1 << 20):
            data += part
        status, _, body = data.partition(b"\r\n\r\n")
        return status.split(b"\r\n")[0], body

    for named, message in (
        (b"", b"Missing x-api-key header"),
        (b"x-api-key: nope\r\n", b"Invalid or inactive API key"),
    ):
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as client:
            client.sendall(head + named + b"\r\n")  # and not a byte of the body
            assert answer(client) == (b"HTTP/1.1 401 Unauthorized", b'{"error":"%s"}' % message)
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as client:
        client.sendall(head + b"x-api-key: %s\r\nExpect: 100-continue\r\n\r\n" % key.encode())
        assert client.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.sendall(samples.tobytes())
        status, body = answer(client)
    assert status == b"HTTP/1.1 200 OK" and len(body) == samples.nbytes


@pytest.mark.slow
def test_recordings_leave_no_memory_behind(service_process, tmp_path):
    """glibc raised its mmap threshold with each large array freed, and then took a recording's
    arrays from the heap, which kept them: each recording of 20 minutes at 1000 Hz left the
    process about 14 MB larger, each of the longest about 100 MB, past a GB after a few."""
    service, key = service_with_key(service_process, tmp_path, {"WEB_WORKERS": "1"})

    def resident_mb() -> float:
        status = Path(f"/proc/{service.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024

    samples = ecg(1200, 1000).astype("<f4")
    after = []
    for shorter in range(3):  # sizes that differ, as real recordings do
        body = samples[: len(samples) - 50_000 * shorter].tobytes()
        request = urllib.request.Request(
            f"{service.url}/api/v1/denoising/record?sampling_rate=1000",
            body,
            {"Content-Type": "application/octet-stream", "x-api-key": key},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            assert len(answer.read()) == len(body)
        after.append(resident_mb())
    # From the second on: the first warms the process up. Without the fix, +18 MB a recording.
    assert after[2] - after[1] < 10, after


def test_503_without_a_model(runtime, engine):
    import falcon.testing

    from service.app import Deps, create_app
    from service.batcher import Batcher

    closed = Batcher(engine, 8, 0.0)
    closed.close()
    deps = Deps(runtime.deps.config, runtime.deps.keys, runtime.store, closed, 6)
    key = issue_key(runtime.store, "nomodel@example.org")
    result = post_json(falcon.testing.TestClient(create_app(deps)), key, {"ecg_signal": [0.0] * 300})
    assert result.status_code == 503 and result.json["error"] == "Model not loaded"


# -- sharing the engine --------------------------------------------------------------------------
def test_single_windows_get_through_while_a_recording_runs(engine):
    """A single window sent while a long recording is under way comes back before the recording."""
    batcher = Batcher(engine, max_size=8, max_wait_s=0, workers=1).start()
    windows = np.random.default_rng(7).standard_normal((96, WINDOW))
    finished: dict[str, float] = {}

    def long_request() -> None:
        batcher.denoise_many(windows)
        finished["record"] = time.monotonic()

    thread = threading.Thread(target=long_request)
    try:
        thread.start()
        time.sleep(0.05)
        single = batcher.denoise(windows[:1])
        finished["single"] = time.monotonic()
        thread.join(30)
    finally:
        batcher.close()
    assert finished["single"] < finished["record"]
    np.testing.assert_allclose(single, engine.denoise(windows[:1]), atol=1e-5)


def test_single_windows_get_through_while_batch_requests_run(engine):
    """A batch request of 64 windows was one job among the windows, in their order: a client
    that kept batches in flight held every other client's window behind them for seconds."""
    batcher = Batcher(engine, max_size=8, max_wait_s=0, workers=1).start()
    windows = np.random.default_rng(5).standard_normal((64, WINDOW))
    finished: dict[str, float] = {}
    answers: dict[str, np.ndarray] = {}

    def batch(name: str) -> None:
        answers[name] = batcher.denoise(windows)
        finished[name] = time.monotonic()

    threads = [threading.Thread(target=batch, args=(f"batch{n}",)) for n in range(3)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.05)
        single = batcher.denoise(windows[:1])
        finished["single"] = time.monotonic()
        for thread in threads:
            thread.join(30)
    finally:
        batcher.close()
    assert finished["single"] < min(finished[f"batch{n}"] for n in range(3))
    np.testing.assert_allclose(single, engine.denoise(windows[:1]), atol=1e-5)
    np.testing.assert_allclose(answers["batch0"], engine.denoise(windows), atol=1e-4)


def test_a_batch_request_that_finds_the_service_idle_runs_alone_on_every_core(engine):
    """Chunked, it ran on the batch workers' single threads: twice as slow on 2 cores."""
    recorded = ThreadRecordingEngine(engine)
    batcher = Batcher(recorded, max_size=8, max_wait_s=0, workers=1).start()
    windows = np.random.default_rng(4).standard_normal((20, WINDOW))
    try:
        out = batcher.denoise(windows)
    finally:
        batcher.close()
    assert recorded.calls == [(threading.get_ident(), True)] * 3 and recorded.runs == [8, 8, 4]
    np.testing.assert_allclose(out, engine.denoise(windows), atol=1e-4)


def test_a_window_runs_beside_a_recording_instead_of_behind_its_chunk(engine):
    """A window that finds only a recording's chunks in its worker runs at once, in its own
    thread and on one core (the batch session), not after the chunk under way."""
    recorded = ThreadRecordingEngine(engine)
    batcher = Batcher(recorded, max_size=8, max_wait_s=0, workers=1).start()
    windows = np.random.default_rng(9).standard_normal((96, WINDOW))
    thread = threading.Thread(target=batcher.denoise_many, args=(windows,))
    try:
        thread.start()
        wait_until(lambda: recorded.calls, what="the recording's first chunk")
        single = batcher.denoise(windows[:1])
        thread.join(30)
    finally:
        batcher.close()
    calls = [(thread, lone, size) for (thread, lone), size in zip(recorded.calls, recorded.runs, strict=True)]
    assert [c for c in calls if c[0] == threading.get_ident()] == [(threading.get_ident(), False, 1)]
    np.testing.assert_allclose(single, engine.denoise(windows[:1]), atol=1e-5)


def test_denoise_many_equals_the_engine(engine):
    batcher = Batcher(engine, max_size=8, max_wait_s=0, workers=2).start()
    windows = np.random.default_rng(8).standard_normal((11, WINDOW)) + 3
    try:
        np.testing.assert_allclose(batcher.denoise_many(windows, True), engine.denoise(windows, True), atol=1e-4)
    finally:
        batcher.close()


# -- the command ---------------------------------------------------------------------------------
def test_the_command_reads_and_writes_csv_and_npy(tmp_path: Path, capsys):
    x = ecg(12, 250, seed=9)
    (tmp_path / "in.csv").write_text("ecg_mV\n" + "\n".join(f"{v:.6f}" for v in x) + "\n")
    np.save(tmp_path / "in.npy", x.astype(np.float32))
    assert record.main([str(tmp_path / "in.csv"), str(tmp_path / "out.csv"), "--rate", "250"]) == 0
    assert record.main([str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), "--rate", "250"]) == 0
    from_csv, header = record.read(tmp_path / "out.csv")
    assert header == "ecg_mV" and len(from_csv) == len(x)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), from_csv, atol=1e-3)
    assert "windows" in capsys.readouterr().err  # the progress bar


def test_the_command_refuses_a_bad_file_in_one_line(tmp_path: Path, capsys):
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,4\n")
    assert record.main([str(tmp_path / "bad.csv"), str(tmp_path / "out.csv")]) == 1
    assert capsys.readouterr().err.startswith("heartify: ")
    (tmp_path / "good.csv").write_text("\n".join(map(str, ecg(3, 130))))
    assert record.main([str(tmp_path / "good.csv"), str(tmp_path / "missing" / "out.csv")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("heartify: ") and "missing is not a folder" in err and len(err.splitlines()) == 1
    values = list(map(str, ecg(3, 130)))
    (tmp_path / "gap.csv").write_text("ecg\n" + "\n".join(values[:100] + [""] + values[100:]) + "\n\n")
    assert record.main([str(tmp_path / "gap.csv"), str(tmp_path / "out.csv")]) == 1  # it was read without the gap
    err = capsys.readouterr().err
    assert "has an empty row (line 102)" in err and len(err.splitlines()) == 1
    (tmp_path / "ends.csv").write_text("ecg\n" + "\n".join(values) + "\n\n\n")  # blank lines at the end: fine
    assert record.main([str(tmp_path / "ends.csv"), str(tmp_path / "out.csv")]) == 0


def odd_npy(path: Path, kind: str) -> None:
    x = ecg(3, 130)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "archive":
        with open(path, "wb") as out:
            np.savez(out, a=x, b=x)
    elif kind == "declares more than it holds":
        np.save(path, x)
        path.write_bytes(path.read_bytes().replace(b"(390,)", b"(10000000000,)"))
    elif kind == "complex":
        np.save(path, x + 1j * x)
    elif kind == "beyond float64's reach":
        np.save(path, x / np.abs(x).max() * 1.7e308)  # finite, but squares overflow


@pytest.mark.parametrize(
    "kind", ["empty", "archive", "declares more than it holds", "complex", "beyond float64's reach"]
)
def test_the_command_refuses_an_odd_npy_file_in_one_line(tmp_path: Path, capsys, kind):
    """Each of these gave a traceback, or a silently wrong output (the imaginary part dropped,
    infinities written)."""
    odd_npy(tmp_path / "odd.npy", kind)
    assert record.main([str(tmp_path / "odd.npy"), str(tmp_path / "out.npy")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("heartify: ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out.npy").exists()


def test_a_write_that_fails_leaves_the_file_it_replaces_as_it_was(tmp_path: Path, monkeypatch, capsys):
    """Output and input may be one file: a full disk halfway through had left half a file."""
    path = tmp_path / "same.csv"
    path.write_text("\n".join(f"{v:.6f}" for v in ecg(3, 130)) + "\n")
    before = path.read_bytes()

    def half_then_full(out, samples, **kwargs):
        out.write(b"0.1\n" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savetxt", half_then_full)
    assert record.main([str(path), str(path)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["same.csv"]


def test_an_output_that_is_a_folder_is_refused_before_the_work(tmp_path: Path, capsys):
    (tmp_path / "in.csv").write_text("\n".join(map(str, ecg(3, 130))))
    (tmp_path / "out.csv").mkdir()
    assert record.main([str(tmp_path / "in.csv"), str(tmp_path / "out.csv")]) == 1
    err = capsys.readouterr().err
    assert err == f"heartify: {tmp_path / 'out.csv'} is a folder: the output must be a file.\n"


def test_a_byte_order_mark_is_not_taken_for_a_header(tmp_path: Path):
    """Spreadsheets save "CSV UTF-8" with one; the first sample must stay a sample."""
    x = ecg(3, 130)
    (tmp_path / "bom.csv").write_text("\n".join(f"{v:.6f}" for v in x), encoding="utf-8-sig")
    samples, header = record.read(tmp_path / "bom.csv")
    assert header is None and len(samples) == len(x) and samples[0] == pytest.approx(x[0], abs=1e-6)


def test_a_rate_near_a_bound_is_told_as_written():
    """{rate:g} wrote 50.0000001 Hz as 50, and 3600.00000036 s at 999.9999999 Hz as "3600 s at
    1000 Hz", in a refusal for being too long."""
    from service import validation

    with pytest.raises(validation.ValidationError, match=r"101 values at 50\.0000001 Hz \(got 100\)"):
        validation.binary_record(np.ones(100, "<f4").tobytes(), "50.0000001", 3600)
    with pytest.raises(validation.TooLong, match=r"got 3600\.00000036 s at 999\.9999999 Hz"):
        validation.binary_record(np.ones(3_600_000, "<f4").tobytes(), "999.9999999", 3600)
