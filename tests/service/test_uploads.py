"""Large uploads through ``service.connections.Server`` in-process: upload places, the gate that
judges a key before the body is read, a disk that fills, a client that sends before it reads,
and uploads that trickle."""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import socket
import struct
import tempfile
import threading
import time

import pytest

from service import parsing
from service.config import Config
from service.connections import Routes, create_server
from service.parsing import Refusal

from .conftest import fill, wait_until
from .inprocess import Echo, Long, app_with, read_all, started


def test_large_uploads_need_a_place_and_give_it_back():
    """Bodies past the default limit are spooled to disk as they arrive: a worker receives as
    many at once as recordings have turns (half its threads), and answers the next one 503 from
    its headers, unread."""
    app = app_with({"/echo": Echo(), "/large": Echo(), "/long": Long()})
    config = Config(host="127.0.0.1", port=0, web_threads=2)  # one place
    server = create_server(app, config, Routes(body_limits={"": 1000, "/large": 100_000}))
    loop = started(server)
    port = server.effective_port
    head = b"POST /large HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 50000\r\n\r\n"

    def upload_begun(body: bytes = b"x" * 100) -> socket.socket:
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(head + body)
        return client

    first = upload_begun()
    wait_until(lambda: server.intake.places.free == 0, 10, "the place taken")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as second:
        second.sendall(head)
        refused = read_all(second)
    assert refused.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 5" in refused
    assert refused.endswith(b'{"error":"Busy with other recordings. Try again shortly."}')
    with socket.create_connection(("127.0.0.1", port), timeout=10) as small:  # small bodies need none
        small.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 500\r\n\r\n" + b"y" * 500
        )
        assert read_all(small).endswith(b'{"received": 500}')
    first.sendall(b"x" * 49_900)
    assert read_all(first).endswith(b'{"received": 50000}')  # answered: its place is free again
    first.close()
    hung_up = upload_begun()
    wait_until(lambda: server.intake.places.free == 0, 10, "the place taken")
    hung_up.close()  # its client gives up mid-upload: the place comes back too
    wait_until(lambda: server.intake.places.free == 1, 10, "the place given back")
    for _ in range(2):  # a large upload pipelined behind a long answer, and the client hangs up
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            chunked = b"POST /large HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            client.sendall(b"GET /long HTTP/1.1\r\nHost: x\r\n\r\n" + chunked)
            client.recv(65536)
        wait_until(lambda: server.intake.places.free == 1, 10, "the pipelined request's place given back")
    with upload_begun(b"x" * 50_000) as last:
        assert read_all(last).endswith(b'{"received": 50000}')
    server.drain(1)
    loop.join(10)


def test_other_spooled_bodies_share_a_room_and_give_it_back(monkeypatch):
    """Batches past 64 KiB are spooled too, and took no place: a thousand connections with one
    key held gigabytes of the temporary directory. Each takes its length of a worker's room for
    them, and the next that does not fit is answered 503 from its headers, unread."""
    monkeypatch.setattr(parsing, "SPOOL_ROOM_BYTES", 250_000)
    app = app_with({"/batch": Echo()})
    config = Config(host="127.0.0.1", port=0)
    server = create_server(app, config, Routes(body_limits={"": 1000, "/batch": 200_000}, place_above=200_000))
    loop = started(server)

    def upload(length: int, sent: bytes = b"x") -> socket.socket:
        client = socket.create_connection(("127.0.0.1", server.effective_port), timeout=10)
        client.sendall(b"POST /batch HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % length)
        client.sendall(sent)
        return client

    first, second = upload(100_000), upload(100_000)
    wait_until(lambda: server.intake.spool_room.free == 50_000, 10, "their room taken")
    with upload(60_000, b"") as third:  # under 64 KiB: kept in memory, it takes no room
        third.sendall(b"y" * 60_000)
        assert read_all(third).endswith(b'{"received": 60000}')
    with upload(70_000, b"") as fourth:
        refused = read_all(fourth)
    assert refused.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 5" in refused
    assert refused.endswith(b'{"error":"Busy receiving other large requests. Try again shortly."}')
    assert server.intake.places.free == config.recording_threads  # no place taken by any
    first.sendall(b"x" * 99_999)
    assert read_all(first).endswith(b'{"received": 100000}')
    second.close()  # its client gives up: its room comes back too
    wait_until(lambda: server.intake.spool_room.free == 250_000, 10, "the room given back")
    with upload(200_000, b"z" * 200_000) as fifth:
        assert read_all(fifth).endswith(b'{"received": 200000}')
    first.close()
    server.drain(1)
    loop.join(10)


def test_a_large_upload_is_judged_by_its_key_before_its_body_is_read(caplog):
    """The gate answers a large upload from its headers: refused, the client gets the answer
    without sending its body, and the place is free again; let in, a client that expects
    "100 Continue" gets it only then. A gate that fails lets the body in for the app to judge,
    and bodies under the default limit never wait for it."""
    caplog.set_level(logging.INFO, logger="service.access")
    held = threading.Event()

    def gate(key: str | None) -> Refusal | None:
        if key == "broken":
            raise RuntimeError("the gate broke")
        if key == "slow":
            held.wait(10)
        if key in ("good", "slow", "broken"):
            return None
        return Refusal(401, "Unauthorized", "No key" if key is None else "Bad key", (("Retry-After", "7"),))

    app = app_with({"/large": Echo()})
    config = Config(host="127.0.0.1", port=0, web_threads=2)  # one place
    server = create_server(app, config, Routes(body_limits={"": 1000, "/large": 100_000}, upload_gate=gate))
    loop = started(server)
    port = server.effective_port

    def connect(key: str | None, length: int = 50_000, extra: bytes = b"") -> socket.socket:
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        named = b"" if key is None else b"x-api-key: %s\r\n" % key.encode()
        client.sendall(
            b"POST /large HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n%s%s\r\n"
            % (length, named, extra)
        )
        return client

    began = time.time()
    for key, message in ((None, b"No key"), ("wrong", b"Bad key")):
        with connect(key) as client:  # no body sent: the answer comes from the headers
            answer = read_all(client)
        assert answer.startswith(b"HTTP/1.1 401 Unauthorized") and b"Retry-After: 7" in answer
        assert answer.endswith(b'{"error":"%s"}' % message)
        assert server.intake.places.free == 1  # uploads the gate refuses take no place
    lines = [r.getMessage() for r in caplog.records if r.name == "service.access"]
    assert len(lines) == 2 and all(
        re.fullmatch(r"POST /large 401 [0-9.]+ms id=- client=127\.0\.0\.1", x) for x in lines
    )
    took_ms = [float(re.search(r" ([0-9.]+)ms ", x).group(1)) for x in lines]
    assert all(0 <= ms <= (time.time() - began) * 1000 for ms in took_ms)  # each from its own first byte
    with connect("good", extra=b"Expect: 100-continue\r\n") as client:
        assert client.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.sendall(b"x" * 50_000)
        assert read_all(client).endswith(b'{"received": 50000}')
    with connect("slow", extra=b"Expect: 100-continue\r\n") as client:
        client.settimeout(0.5)
        with pytest.raises(TimeoutError):  # no "100 Continue" before the verdict
            client.recv(100)
        assert server.intake.places.free == 1  # nor a place: uploads the gate refuses take none
        held.set()
        client.settimeout(10)
        assert client.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.sendall(b"x" * 50_000)
        assert read_all(client).endswith(b'{"received": 50000}')
    with connect("broken") as client:
        client.sendall(b"x" * 50_000)
        assert read_all(client).endswith(b'{"received": 50000}')
    with connect(None, 500) as client:  # under the default limit: no place, no gate
        client.sendall(b"x" * 500)
        assert read_all(client).endswith(b'{"received": 500}')
    server.drain(1)
    loop.join(10)


def test_an_upload_that_fills_the_disk_gets_its_503_and_gives_its_place_back(small_disk, monkeypatch):
    """The spool file that cannot be written cannot be closed either (its buffer cannot be
    flushed): the place went with it, and once every place had, each recording got 503."""
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))
    fill(small_disk)
    app = app_with({"/large": Echo()})
    config = Config(host="127.0.0.1", port=0, web_threads=2)  # one place
    server = create_server(app, config, Routes(body_limits={"": 1000, "/large": 2_000_000}))
    loop = started(server)
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
        client.sendall(b"POST /large HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        with contextlib.suppress(OSError):  # the server may close while the rest is sent
            for _ in range(150):
                client.sendall(b"x" * 4096)
        answer = read_all(client)
    assert answer.startswith(b"HTTP/1.1 503 ")
    wait_until(lambda: server.intake.places.free == 1, 10, "the place given back")
    server.drain(1)
    loop.join(10)


def test_an_upload_whose_temporary_directory_is_gone_gets_its_503(tmp_path, monkeypatch, caplog):
    """Only a full disk was answered: a temporary directory removed (or remounted read-only)
    under the server closed the connection unanswered, with waitress's traceback per request."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(gone))
    gone.rmdir()
    server = create_server(
        app_with({"/large": Echo()}),
        Config(host="127.0.0.1", port=0),
        Routes(body_limits={"": 1000, "/large": 200_000}),
    )
    loop = started(server)
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
        client.sendall(b"POST /large HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        with contextlib.suppress(OSError):  # the server may close while the rest is sent
            client.sendall(b"x" * 100_000)
        answer = read_all(client)
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert answer.endswith(b'{"error":"The server has no room for this upload now. Try again later."}')
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    said = "Answered 503 to 1 request(s) whose body could not be written to the temporary directory (No such file"
    wait_until(lambda: any(r.getMessage().startswith(said) for r in caplog.records), 5, "one line, a minute at most")
    server.drain(1)
    loop.join(10)


def test_a_client_that_sends_its_whole_body_before_it_reads_gets_the_refusal():
    """Answered from its head, an upload still arriving was reset by the kernel once the
    connection closed, and a client that sends before it reads (without Expect: 100-continue)
    lost the answer to the reset. The close lingers: the answer, the end, then what still comes
    is dropped."""
    server = create_server(
        app_with({"/large": Echo()}),
        Config(host="127.0.0.1", port=0),
        Routes(
            body_limits={"": 1000, "/large": 50_000_000},
            upload_gate=lambda key: Refusal(401, "Unauthorized", "Bad key"),
        ),
    )
    loop = started(server)
    for size in (2_000_000, 20_000_000):
        connection = http.client.HTTPConnection("127.0.0.1", server.effective_port, timeout=10)
        connection.request("POST", "/large", body=bytes(size), headers={"x-api-key": "wrong"})
        answer = connection.getresponse()
        assert (answer.status, answer.read()) == (401, b'{"error":"Bad key"}')
        connection.close()
    server.drain(1)
    loop.join(10)


def test_a_verdict_that_comes_after_the_server_closed_writes_nowhere(tmp_path):
    """The gate's thread outlives the loop when a verdict is slow; it woke the loop through a pipe
    whose descriptor, once closed, the next file opened took."""
    release, asked = threading.Event(), threading.Event()

    def gate(key: str | None) -> Refusal | None:
        asked.set()
        release.wait(10)

    server = create_server(
        app_with({"/large": Echo()}),
        Config(host="127.0.0.1", port=0),
        Routes(body_limits={"": 1000, "/large": 100_000}, upload_gate=gate),
    )
    loop = started(server)
    client = socket.create_connection(("127.0.0.1", server.effective_port), timeout=10)
    client.sendall(b"POST /large HTTP/1.1\r\nHost: x\r\nx-api-key: k\r\nContent-Length: 50000\r\n\r\n")
    assert asked.wait(10)
    server.drain(0.1)
    loop.join(10)
    server.close()
    client.close()
    opened = [os.open(tmp_path / f"f{i}", os.O_RDWR | os.O_CREAT) for i in range(4)]  # the pipe's numbers, likely
    release.set()
    server._judges.shutdown(wait=True)  # the verdict has been given
    assert all(os.fstat(fd).st_size == 0 for fd in opened)
    for fd in opened:
        os.close(fd)


def test_a_large_upload_that_trickles_is_closed_and_gives_its_place_back(monkeypatch):
    """A byte now and then keeps a connection from ever being idle: a few such uploads held every
    place, and every other recording got 503. Over each window, an upload must average the least
    rate."""
    monkeypatch.setattr(parsing, "UPLOAD_WINDOW_S", 0.5)
    monkeypatch.setattr(parsing, "MIN_UPLOAD_BYTES_PER_S", 1 << 20)
    app = app_with({"/large": Echo()})
    server = create_server(
        app, Config(host="127.0.0.1", port=0, web_threads=2), Routes(body_limits={"": 1000, "/large": 100_000})
    )
    loop = started(server)
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
        client.sendall(b"POST /large HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n" + b"x" * 100)
        wait_until(lambda: server.intake.places.free == 0, 10, "the place taken")
        answer = read_all(client)
    assert answer.startswith(b"HTTP/1.1 408 ") and answer.endswith(
        b'{"error":"Request body too slow: uploads must average 1024 KiB/s"}'
    )
    wait_until(lambda: server.intake.places.free == 1, 10, "the place given back")
    server.drain(1)
    loop.join(10)


def test_the_servers_own_answers_to_a_browser_carry_the_apps_cors_headers():
    """A large upload refused from its headers is answered by the server, not the app: without
    the CORS headers the app's middleware adds, a browser on an allowed origin saw a failed fetch
    instead of its 401."""
    gate = lambda key: Refusal(401, "Unauthorized", "No key")  # noqa: E731
    config = Config(host="127.0.0.1", port=0, cors_allow_origins=("https://app.example.org",))
    server = create_server(
        app_with({"/large": Echo()}), config, Routes(body_limits={"": 1000, "/large": 100_000}, upload_gate=gate)
    )
    loop = started(server)
    answers = {}
    for origin in ("https://app.example.org", "https://evil.example"):
        with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
            client.sendall(
                b"POST /large HTTP/1.1\r\nHost: x\r\nOrigin: %s\r\nContent-Length: 50000\r\n\r\n" % origin.encode()
            )
            answers[origin] = read_all(client)
    allowed, other = answers.values()
    assert (
        allowed.startswith(b"HTTP/1.1 401 ")
        and b"\r\nAccess-Control-Allow-Origin: https://app.example.org\r\n" in allowed
    )
    assert b"\r\nAccess-Control-Expose-Headers: X-Request-ID, Retry-After\r\n" in allowed
    assert other.startswith(b"HTTP/1.1 401 ") and b"Access-Control-Allow-Origin" not in other
    assert all(b"\r\nVary: Origin\r\n" in answer for answer in (allowed, other))
    server.drain(1)
    loop.join(10)


def test_a_client_that_resets_as_its_100_continue_is_sent_logs_no_error(caplog):
    """The send's failure closed the connection inside waitress's read of the request, which then
    went on with the request the close had cleared: an ERROR and a traceback per connection, for
    anyone to write."""
    caplog.set_level(logging.INFO)
    server = create_server(app_with({"/echo": Echo()}), Config(host="127.0.0.1", port=0))
    loop = started(server)
    for _ in range(20):
        client = socket.create_connection(("127.0.0.1", server.effective_port), timeout=10)
        client.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 500\r\n\r\n")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset, after the request
    wait_until(lambda: not server.active_channels, 10, "every connection closed")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
        client.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello")
        assert read_all(client).endswith(b'{"received": 5}')
    server.drain(1)
    loop.join(10)


def test_a_body_written_to_disk_is_judged_by_its_key_on_any_route():
    """Past 64 KiB waitress writes a body to a file as it arrives: on the window routes, under
    the default limit, clients without a key spooled gigabytes that way."""
    gate = lambda key: None if key == "good" else Refusal(401, "Unauthorized", "No key")  # noqa: E731
    config = Config(host="127.0.0.1", port=0)
    server = create_server(app_with({"/echo": Echo()}), config, Routes(body_limits={"": 1 << 20}, upload_gate=gate))
    loop = started(server)
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 100000\r\n"
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
        client.sendall(head + b"\r\n")  # no body: the answer comes from the headers
        assert read_all(client).endswith(b'{"error":"No key"}')
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
        client.sendall(head + b"x-api-key: good\r\n\r\n" + b"x" * 100_000)
        assert read_all(client).endswith(b'{"received": 100000}')
    assert server.intake.places.free == Config().recording_threads  # under the default limit: no place taken
    server.drain(1)
    loop.join(10)


def test_a_chunked_body_on_a_route_that_takes_no_key_is_not_judged_by_one():
    """Every chunked body went to the gate: a key request sent chunked (Node, Go, requests with a
    generator) got 401 for a route that takes no key, whenever its body came after its head."""
    gate = lambda key: Refusal(401, "Unauthorized", "No key")  # noqa: E731
    limits = {"": 1 << 20, "/keyless": 16 << 10}
    server = create_server(
        app_with({"/keyless": Echo()}), Config(host="127.0.0.1", port=0), Routes(body_limits=limits, upload_gate=gate)
    )
    loop = started(server)
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
        client.sendall(b"POST /keyless HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n")
        time.sleep(0.2)
        client.sendall(b"5\r\nhello\r\n0\r\n\r\n")
        assert read_all(client).endswith(b'{"received": 5}')
    server.drain(1)
    loop.join(10)


def test_a_small_body_that_stalls_is_closed(monkeypatch):
    """Only large uploads had a least rate: a body under 64 KiB kept in memory, a byte now and
    then, for as long as its client liked."""
    monkeypatch.setattr(parsing, "UPLOAD_WINDOW_S", 0.5)
    server = create_server(app_with({"/echo": Echo()}), Config(host="127.0.0.1", port=0))
    loop = started(server)
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
        client.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        answer = read_all(client)  # the rest never comes within the window
    assert answer.startswith(b"HTTP/1.1 408 ") and b"Request body too slow" in answer
    server.drain(1)
    loop.join(10)
