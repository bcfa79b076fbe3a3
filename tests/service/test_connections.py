"""``service.connections.Server`` in-process, on a free loopback port: the drain when the
listening socket that workers share is shut, a worker's own drain, which must not shut it, the
connections queued in the socket when the service stops, a request still uploading when the
drain begins, health checks ahead of the queue, heads that are refused, answers nobody reads,
and requests waitress cannot parse (uploads: ``test_uploads``)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import tempfile
import threading
import time
import urllib.request

import falcon
import pytest

from service import channels, connections
from service.config import Config
from service.connections import Parent, Routes, create_server
from service.pace import Pace

from .conftest import fill, wait_until
from .inprocess import Echo, Long, app_with, read_all, started


class Held:
    """Answers once the test lets it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.entered.set()
        self.release.wait(10)
        resp.media = {"status": "done"}


def test_a_shut_socket_drains_the_worker_after_its_requests(caplog):
    """Workers share one listening socket, which the supervisor shuts when the service stops: each
    must finish its requests and then stop, not lose its loop's upkeep (waitress closes a server
    whose socket hangs up, and then nothing would ever end the loop)."""
    held = Held()
    app = app_with({"/held": held})
    server = create_server(app, Config(host="127.0.0.1", port=0, shutdown_grace_s=10))
    loop = started(server)
    answers: list[int] = []
    url = f"http://127.0.0.1:{server.effective_port}/held"
    client = threading.Thread(target=lambda: answers.append(urllib.request.urlopen(url, timeout=10).status))
    client.start()
    assert held.entered.wait(10)
    server.socket.shutdown(socket.SHUT_RD)  # what the supervisor does to the shared socket
    server.handle_accept()  # what the loop does when the poll finds the shut socket readable
    held.release.set()
    client.join(10)
    assert answers == [200]
    loop.join(10)
    assert not loop.is_alive()  # drained and stopped on its own
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info]


def test_answers_given_during_a_drain_close_their_connection():
    """A kept-alive client whose answer came during the drain would send its next request on a
    connection the drain is about to close; told "Connection: close", it opens a new one."""
    held = Held()
    app = app_with({"/held": held})
    server = create_server(app, Config(host="127.0.0.1", port=0, shutdown_grace_s=10))
    loop = started(server)
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
        client.sendall(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")  # HTTP/1.1: kept alive by default
        assert held.entered.wait(10)
        server.drain(10)
        wait_until(lambda: server.draining, 10, "the drain")
        held.release.set()
        answer = read_all(client)  # the server closes the connection after the answer
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 200") and head.count(b"\r\nConnection: ") == 1
    assert b"\r\nConnection: close" in head
    loop.join(10)
    assert not loop.is_alive()


def test_a_workers_own_drain_leaves_the_shared_socket_serving():
    """SIGTERM to one worker: it stops taking connections, but a shut socket would stay shut for
    every process that holds it, its replacement included, and the service would stop."""
    listener = socket.create_server(("127.0.0.1", 0))
    others = listener.dup()  # the other workers' hold on the same socket
    config = Config(host="127.0.0.1", port=0, shutdown_grace_s=5)
    server = create_server(falcon.App(), config, listener=listener, supervisor=Parent(os.getppid()))
    loop = started(server)
    server.drain(5)
    loop.join(10)
    assert not loop.is_alive()
    with socket.create_connection(others.getsockname(), timeout=5) as client:
        served, _ = others.accept()
        client.sendall(b"ping")
        assert served.recv(4) == b"ping"
        served.close()
    others.close()


class Hello:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"hello": "world"}


def queued_request(port: int) -> socket.socket:
    """A client connected, its request sent, its connection still queued in the listening socket."""
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    return client


def answer_to(client: socket.socket) -> bytes:
    answer = b""
    with contextlib.suppress(ConnectionResetError):
        while not answer.endswith(b"}") and (part := client.recv(65536)):
            answer += part
    client.close()
    return answer


@pytest.mark.parametrize("worker", [False, True], ids=["single process", "worker of a stopping service"])
def test_connections_queued_when_the_service_stops_are_served_and_later_ones_refused(worker):
    """Shutting a listening socket resets the connections queued in it: clients that connected
    before the stop, most with their request sent. The drain accepts them first."""
    app = app_with({"/hello": Hello()})
    config = Config(host="127.0.0.1", port=0, shutdown_grace_s=10)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    parent = Parent(os.getppid(), stopping=lambda: True) if worker else None  # None: the socket is its own
    server = create_server(app, config, listener=listener, supervisor=parent)
    clients = [queued_request(port) for _ in range(3)]  # no loop runs yet: nothing accepts them
    server.drain(10)
    loop = started(server)
    answers = [answer_to(client) for client in clients]
    assert all(a.startswith(b"HTTP/1.1 200") and a.endswith(b'{"hello": "world"}') for a in answers), answers
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    loop.join(10)
    assert not loop.is_alive()
    listener.close()


def test_a_request_waiting_unread_on_a_kept_alive_connection_when_the_drain_begins_is_answered():
    """The drain closes kept-alive connections between two requests, but not one whose next
    request has arrived and waits in the socket for the loop to read it: closing a socket with
    unread bytes resets the connection, and the client loses a request it had sent."""
    app = app_with({"/hello": Hello()})
    server = create_server(app, Config(host="127.0.0.1", port=0, shutdown_grace_s=10))
    client = socket.create_connection(("127.0.0.1", server.effective_port), timeout=10)
    server.handle_accept()
    [channel] = server.active_channels.values()
    channel.first_request = False  # as after an answered request: kept alive, between two
    client.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    server.drain(10)  # before the loop has read it
    loop = started(server)
    answer = answer_to(client)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"hello": "world"}'), answer
    loop.join(10)
    assert not loop.is_alive()


def test_a_request_still_uploading_when_the_drain_begins_is_answered():
    app = app_with({"/echo": Echo()})
    server = create_server(app, Config(host="127.0.0.1", port=0, shutdown_grace_s=10))
    loop = started(server)
    body = b"x" * 100_000
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
        client.sendall(head + body[:1000])
        uploading = lambda c: c.request is not None and c.request.headers_finished  # noqa: E731
        wait_until(lambda: any(map(uploading, list(server.active_channels.values()))), 10, "the upload")
        server.drain(10)
        wait_until(lambda: server.draining, 10, "the drain")  # its first pass closes idle connections
        client.sendall(body[1000:])
        answer = b""
        while not answer.endswith(b"}") and (part := client.recv(65536)):
            answer += part
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"received": 100000}')
    loop.join(10)
    assert not loop.is_alive()


def test_each_route_has_its_body_limit_and_waitress_refusals_are_json():
    """A body past its route's limit is refused from its headers, unread, with the app's JSON
    413; another route takes a larger one. waitress's other refusals are JSON too."""
    app = app_with({"/echo": Echo(), "/large": Echo()})
    config = Config(host="127.0.0.1", port=0)
    limits = {"": 1000, "/large": 100_000, "/large application/octet-stream": 2000}
    server = create_server(app, config, Routes(body_limits=limits))
    loop = started(server)

    def send(head: bytes, body: bytes = b"") -> bytes:
        with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
            client.sendall(head + body)
            return read_all(client)

    declared = send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")  # no body sent
    slashes = send(
        b"POST //large HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\nConnection: close\r\n\r\n", b"x" * 50000
    )
    assert slashes.startswith(b"HTTP/1.1 200 ")  # the route Falcon finds: /large, and its limit
    assert declared.startswith(b"HTTP/1.1 413 ") and b"Content-Type: application/json" in declared
    assert b"X-Content-Type-Options: nosniff" in declared and b"Cache-Control: no-store" in declared
    assert declared.endswith(b'{"error":"Request body too large (limit 1000 bytes)"}')
    expecting = send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
    assert expecting.startswith(b"HTTP/1.1 413 ")  # not "100 Continue", which curl takes to send it all
    binary = b"Content-Type: Application/Octet-Stream; x=y\r\nContent-Length: 5000\r\nExpect: 100-continue"
    by_type = send(b"POST /large HTTP/1.1\r\nHost: x\r\n" + binary + b"\r\n\r\n")  # its media type's limit
    assert by_type.startswith(b"HTTP/1.1 413 ") and by_type.endswith(b'(limit 2000 bytes)"}')
    chunk = b"%x\r\n%s\r\n" % (1500, b"x" * 1500)
    chunked = send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", chunk + b"0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 413 ") and chunked.endswith(b'(limit 1000 bytes)"}')
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    huge_chunk = send(head, b"ffffffffffffffffffff\r\nxx")  # declared past the limit, then silence
    assert huge_chunk.startswith(b"HTTP/1.1 413 ") and huge_chunk.endswith(b'(limit 1000 bytes)"}')
    body = b"x" * 50_000
    large = send(b"POST /large HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 50000\r\n\r\n", body)
    assert large.startswith(b"HTTP/1.1 200 ") and large.endswith(b'{"received": 50000}')
    other_method = send(b"PUT /large HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n")
    assert other_method.startswith(b"HTTP/1.1 413 ")  # large bodies are POSTed: no place, no spool
    for length in (b"ten", b"0" * 5000 + b"2"):  # past 4300 digits int() refuses it: "Bad URI" was said
        malformed = send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n")
        assert malformed.startswith(b"HTTP/1.1 400 ") and malformed.endswith(
            b'{"error":"Bad Request: Content-Length is invalid"}'
        )
    server.drain(1)
    loop.join(10)


BASE = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n"  # 3 header lines
HEADS = {
    "100 header lines": (BASE + b"a: b\r\n" * 97 + b"\r\n", b"200"),
    "101 header lines": (BASE + b"a: b\r\n" * 98 + b"\r\n", b"431"),
    "33 KiB of head": (BASE + b"x: " + b"y" * (33 << 10) + b"\r\n\r\n", b"431"),
    "bare LF": (b"POST /echo HTTP/1.1\nHost: x\nContent-Length: 0\n\n", b"400"),
    "Content-Length and Transfer-Encoding": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"400",
    ),
    "Transfer-Encoding in HTTP/1.0": (
        b"POST /echo HTTP/1.0\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n0\r\n\r\n",
        b"400",
    ),
    "HTTP/1.1 without Host": (b"POST /echo HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"400"),
    "two Hosts": (b"POST /echo HTTP/1.1\r\nHost: x\r\nHost: y\r\nContent-Length: 0\r\n\r\n", b"400"),
    "a bare LF before the end": (b"POST /echo HTTP/1.1\r\nHost: x\n\r\n", b"400"),
    "an empty Transfer-Encoding with Content-Length": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\nContent-Length: 0\r\n\r\n",
        b"400",
    ),
    "chunked twice": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        b"400",
    ),
    "chunked in two headers": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"400",
    ),
    "HTTP/2.0": (b"POST /echo HTTP/2.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"400"),  # was served as 1.0
    "no version (HTTP/0.9)": (b"POST /echo\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"400"),
    "a folded header": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked, chunked\r\n\r\n0\r\n\r\n",
        b"400",
    ),
    "a chunk size line without its CR": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\nhi\r\n0\r\n\r\n",
        b"400",
    ),
    "HTTP/1.0 without Host": (b"POST /echo HTTP/1.0\r\nContent-Length: 0\r\n\r\n", b"200"),
    # Answered, and with no "100 Continue": waitress sent one, then waited for the body.
    "Expect: 100-continue and no body": (BASE + b"Expect: 100-continue\r\n\r\n", b"200"),
}


@pytest.mark.parametrize("name", HEADS)
def test_heads_that_would_hold_the_loop_or_smuggle_a_request_are_refused_and_closed(name, caplog):
    """Checked as they arrive, at the speed of C: waitress parses a head in the loop that serves
    every connection, a few microseconds a line. A refused head is answered at once (bare LFs
    waited for the header timeout), and its connection closed: bytes a front end may have read
    as this request's body (Content-Length with Transfer-Encoding) are never read as another.
    Its access line names no method or path where none was parsed (it said "GET /")."""
    caplog.set_level(logging.INFO, logger="service.access")
    server = create_server(app_with({"/echo": Echo()}), Config(host="127.0.0.1", port=0))
    loop = started(server)
    sent, status = HEADS[name]
    # After a request framed two ways, what a front end may have read as its body: never served.
    smuggled = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n" if "Transfer-Encoding" in name else b""
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=5) as client:
        client.sendall(sent + smuggled)
        answer = read_all(client)
    assert re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer) == [status]
    assert status == b"200" or b'{"error":' in answer
    if status != b"200":
        unparsed = status == b"431" or "LF" in name or "folded" in name
        line = next(r.getMessage() for r in caplog.records if r.name == "service.access")
        assert line.startswith(("- - " if unparsed else "POST /echo ") + status.decode())
    server.drain(1)
    loop.join(10)


def test_a_chunk_size_line_that_never_ends_is_refused_as_it_grows():
    """waitress keeps the line in memory and searches all of it at every read, up to the body's
    limit: megabytes of it held the loop for seconds."""
    server = create_server(
        app_with({"/echo": Echo()}), Config(host="127.0.0.1", port=0), Routes(body_limits={"": 100 << 20})
    )
    loop = started(server)
    data = b"%x\r\n%s\r\n" % (4 << 20, b"x" * (4 << 20))  # room for the framing of small chunks after it
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=5) as client:
        client.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + data)
        client.sendall(b"1;" + b"a" * 40_000)
        answer = read_all(client)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"chunk size line or trailer too long" in answer
    server.drain(1)
    loop.join(10)


def test_a_body_of_tiny_chunks_is_refused_and_chunks_of_a_few_kib_are_taken():
    """waitress decodes chunks one by one in the loop that serves every connection: bodies of
    one-byte chunks from a few hundred clients held it for seconds at a time, and the supervisor
    killed the workers as frozen."""
    server = create_server(app_with({"/echo": Echo()}), Config(host="127.0.0.1", port=0))
    loop = started(server)
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    answers = []
    for size, count in ((1, 50_000), (512, 800)):
        with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
            with contextlib.suppress(ConnectionError):  # refused, it may close before all is sent
                client.sendall(head + (b"%x\r\n" % size + b"x" * size + b"\r\n") * count + b"0\r\n\r\n")
            answers.append(read_all(client))
    tiny, fine = answers
    assert tiny.startswith(b"HTTP/1.1 400 ") and b"chunks too small" in tiny
    assert fine.startswith(b"HTTP/1.1 200 ") and fine.endswith(b'{"received": 409600}')  # a file read 512 B at a time
    server.drain(1)
    loop.join(10)


def test_an_answer_its_client_does_not_read_is_closed_and_frees_its_thread():
    """With a request pipelined behind it, the thread that wrote it waited for the client to read,
    for good (and a recording held its upload place meanwhile)."""
    long = Long()
    server = create_server(app_with({"/long": long}), Config(host="127.0.0.1", port=0, channel_timeout_s=1))
    loop = started(server)
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(b"GET /long HTTP/1.1\r\nHost: x\r\n\r\n" * 2)  # and never read
        wait_until(lambda: long.answered, 10, "the answer being written")  # its thread may be done already
        wait_until(lambda: server.task_dispatcher.active_count == 0, 10, "the thread freed")
    server.drain(1)
    loop.join(10)


def test_a_pace_is_taken_over_each_window_not_since_the_start():
    """An upload (or a download) fast at first and then trickling averaged enough, since its
    start, to hold its upload place (or its answer in memory) for hours."""
    pace = Pace(30, 100)
    pace.begin(0, 0)
    assert not pace.slow(29, 0)  # the window has not ended
    assert not pace.slow(30, 1_000_000)
    assert pace.slow(60, 1_000_001)  # 1 byte in the last 30 s
    assert not pace.slow(90, 1_010_000)
    pace.stop()  # nothing waited on the client
    assert not pace.slow(200, 1_010_000)  # a window begins
    assert pace.slow(231, 1_010_000)


def long_answers(monkeypatch, window_s: float, least_bytes_per_s: int) -> tuple[connections.Server, threading.Thread]:
    """A server of long answers, whose clients must read them at ``least_bytes_per_s`` over each
    ``window_s``."""
    monkeypatch.setattr(channels, "DOWNLOAD_WINDOW_S", window_s)
    monkeypatch.setattr(channels, "MIN_DOWNLOAD_BYTES_PER_S", least_bytes_per_s)
    server = create_server(app_with({"/long": Long()}), Config(host="127.0.0.1", port=0))
    return server, started(server)


def test_an_answer_read_too_slowly_is_closed(monkeypatch):
    """Answers are held in memory until sent: a client that reads a few bytes now and then held a
    recording's answer there for as long as it liked."""
    server, loop = long_answers(monkeypatch, window_s=0.5, least_bytes_per_s=1 << 20)
    received, deadline = 0, time.monotonic() + 15
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(b"GET /long HTTP/1.1\r\nHost: x\r\n\r\n")
        while time.monotonic() < deadline and (received < 1024 or server.active_channels):  # 5 KiB/s
            received += len(client.recv(1024))
            time.sleep(0.2)
        with contextlib.suppress(ConnectionResetError):
            while part := client.recv(65536):  # what its own buffers held: the rest was dropped
                received += len(part)
    assert 0 < received < 1 << 20  # closed long before the end, with a reset
    assert not server.active_channels
    server.drain(1)
    loop.join(10)


def test_an_answer_the_kernel_holds_unread_is_closed_too(monkeypatch):
    """An answer that fits in the kernel's send buffer left nothing in the server's: the pace
    stopped as if the client had read it, and the connection idled out on a close that waited
    for a write the full socket never allowed, for good."""
    monkeypatch.setattr(channels, "DOWNLOAD_WINDOW_S", 0.5)
    monkeypatch.setattr(channels, "MIN_DOWNLOAD_BYTES_PER_S", 64 << 10)
    server = create_server(app_with({"/long": Long(3 << 20)}), Config(host="127.0.0.1", port=0, channel_timeout_s=1))
    loop = started(server)
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(b"GET /long HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
        wait_until(lambda: server.active_channels, 5, "the connection")
        channel = next(iter(server.active_channels.values()))
        wait_until(lambda: not channel.total_outbufs_len, 10, "the answer handed to the kernel")
        wait_until(lambda: not server.active_channels, 10, "the connection closed")
    server.drain(1)
    loop.join(10)


def test_an_answer_read_steadily_faster_than_the_least_rate_is_not_closed(monkeypatch):
    """The rate was taken from what the kernel took: its send buffer of megabytes is reported
    writable only once a good part has gone, and clients reading four times the least rate were
    reset."""
    server, loop = long_answers(monkeypatch, window_s=1.0, least_bytes_per_s=64 << 10)
    received, until = 0, time.monotonic() + 5
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
        client.sendall(b"GET /long HTTP/1.1\r\nHost: x\r\n\r\n")
        while time.monotonic() < until:  # 256 KiB/s, four times the least rate
            part = client.recv(32 << 10, socket.MSG_WAITALL)
            assert part, "closed"
            received += len(part)
            time.sleep(0.125)
        assert server.active_channels
    server.drain(1)
    loop.join(10)


def test_answers_waiting_on_their_clients_are_kept_to_a_budget(monkeypatch):
    """A client that reads each answer just fast enough held as many in memory as it opened
    connections: recordings' answers are tens of MB each."""
    monkeypatch.setattr(connections, "UNSENT_BUDGET", 50 << 20)
    server = create_server(app_with({"/long": Long(30 << 20)}), Config(host="127.0.0.1", port=0))
    loop = started(server)
    clients = []
    for _ in range(2):
        client = socket.create_connection(("127.0.0.1", server.effective_port), timeout=10)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(b"GET /long HTTP/1.1\r\nHost: x\r\n\r\n")  # and reads nothing
        clients.append(client)
    seen: set[int] = set()  # the connections the server has held: one closed must be after both came

    def one_closed() -> bool:
        channels = list(server.active_channels)
        seen.update(channels)
        return len(seen) == 2 and len(channels) == 1

    deadline = time.monotonic() + 10
    while not one_closed():  # polled more often than wait_until: the second may not stay long
        assert time.monotonic() < deadline, "timed out waiting for one closed"
        time.sleep(0.005)
    time.sleep(1.5)  # another check or more
    assert len(server.active_channels) == 1  # the rest fits
    for client in clients:
        client.close()
    server.drain(1)
    loop.join(10)


def test_a_long_answer_is_written_whole_while_the_disk_is_full(small_disk, monkeypatch):
    """Past 1 MiB waitress wrote answers to a temporary file: on a full disk one was cut short,
    its connection never closed, and its worker spun at full CPU."""
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))
    fill(small_disk)
    server = create_server(app_with({"/long": Long(3 << 20)}), Config(host="127.0.0.1", port=0))  # past 1 MiB
    loop = started(server)
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
        client.sendall(b"GET /long HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = read_all(client)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"x" * 1000)
    assert len(answer.partition(b"\r\n\r\n")[2]) == 3 << 20
    server.drain(1)
    loop.join(10)


def test_a_pipelined_request_is_timed_from_its_own_first_byte():
    """Begun in the same read as the end of the one before, its head was timed from that one's
    first byte: a body sent slowly made the next request's head late at once."""
    server = create_server(app_with({"/echo": Echo()}), Config(host="127.0.0.1", port=0, header_timeout_s=2))
    loop = started(server)
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
        client.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n")
        for _ in range(2):  # the body over 3 s: headers only are bound by the header timeout
            client.sendall(b"x")
            time.sleep(1.5)
        client.sendall(b"xPOST /echo HTTP/1.1\r\n")  # the last byte, and the next request begins
        time.sleep(1.5)  # maintenance passes come meanwhile (every second): the head is 1.5 s old, not 4.5
        client.sendall(b"Host: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        answer = read_all(client)
    assert re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer) == [b"200", b"200"]
    server.drain(1)
    loop.join(10)


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout_and_a_kept_alive_one_is_not():
    """Silent from the accept, a connection was held for the idle timeout (75 s by default), not
    the header timeout: about two thousand of them, opened again as they closed, kept everyone
    else out. Kept alive after a request, a connection still has the idle timeout."""
    config = Config(host="127.0.0.1", port=0, header_timeout_s=1, channel_timeout_s=30)
    server = create_server(app_with({"/echo": Echo()}), config)
    loop = started(server)
    address = ("127.0.0.1", server.effective_port)
    with socket.create_connection(address, timeout=10) as silent, socket.create_connection(address, timeout=10) as kept:
        kept.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        assert echoed(kept).startswith(b"HTTP/1.1 200 ")
        began = time.monotonic()
        assert silent.recv(1) == b""  # closed, without an answer: it asked nothing
        assert time.monotonic() - began < 5
        kept.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        assert echoed(kept).startswith(b"HTTP/1.1 200 ")  # still open
    server.drain(1)
    loop.join(10)


def test_at_the_connection_limit_idle_connections_make_room():
    """Silent connections that held the whole limit kept every new client in the listen queue
    until the header timeout (or, with a body of a few bytes that never came, the upload pace's
    30 s), and a client that opened them anew kept everyone out again. A request under way is
    never closed to make room."""
    held = Held()
    config = Config(host="127.0.0.1", port=0, connection_limit=16, header_timeout_s=60, channel_timeout_s=60)
    server = create_server(app_with({"/echo": Echo(), "/held": held}), config)
    loop = started(server)
    address = ("127.0.0.1", server.effective_port)
    with contextlib.ExitStack() as stack:
        busy = stack.enter_context(socket.create_connection(address, timeout=10))
        busy.sendall(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held.entered.wait(10)
        silent = [stack.enter_context(socket.create_connection(address, timeout=10)) for _ in range(20)]
        for client in silent[::2]:  # a head, and a body of 4 bytes that does not come
            client.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nx")
        newcomer = stack.enter_context(socket.create_connection(address, timeout=10))  # in the queue, behind some
        newcomer.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        assert echoed(newcomer).startswith(b"HTTP/1.1 200 ")  # before the header timeout of 60 s
        assert silent[0].recv(1) == b"" and silent[1].recv(1) == b""  # closed, unanswered
        held.release.set()
        assert busy.recv(1 << 16).startswith(b"HTTP/1.1 200 ")
    server.drain(1)
    loop.join(10)


def test_making_room_spares_a_connection_whose_next_request_waits_unread():
    """Idle for a second by its parser's state, with its next request already in the socket:
    closed, it was reset, and a POST its client would not send again was lost."""
    server = create_server(app_with({"/echo": Echo()}), Config(host="127.0.0.1", port=0))
    try:
        with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
            server.handle_accept()  # the loop does not run: nothing is read from the connection
            [channel] = server.active_channels.values()
            client.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
            wait_until(lambda: channel.socket.recv(1, socket.MSG_PEEK), 5, "the request in the socket")
            server.adj.connection_limit = len(server._map)
            server._make_room(time.time() + 2)
            assert not channel.will_close
    finally:
        server.close()


def test_making_room_gives_a_small_body_its_time_from_the_100_continue():
    """Timed from the head's first byte, a body asked for late (its "100 Continue" sent after a
    pipelined request ahead of it) was a second old, and closed, before its client could send it."""
    server = create_server(app_with({"/echo": Echo()}), Config(host="127.0.0.1", port=0))
    try:
        with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
            server.handle_accept()  # the loop does not run: the test reads for it
            [channel] = server.active_channels.values()
            client.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
            wait_until(lambda: channel.socket.recv(1, socket.MSG_PEEK), 5, "the head in the socket")
            channel.handle_read()
            server.adj.connection_limit = len(server._map)
            began = channel.request.body_since
            server._make_room(began + 1.5)  # a second and a half after the head: its body may come
            assert not channel.will_close
            server._make_room(began + 2.5)  # it never came
            assert channel.will_close
    finally:
        server.close()


def echoed(client: socket.socket) -> bytes:
    """One answer of ``Echo`` to a body of two bytes, read whole from a kept-alive connection."""
    answer = b""
    while not answer.endswith(b'{"received": 2}'):
        part = client.recv(1 << 16)
        assert part, answer
        answer += part
    return answer


def test_a_request_whose_client_half_closed_before_it_began_is_logged_499_and_not_run(caplog):
    """``shutdown(SHUT_WR)`` after the request (``nc -N``) is taken for a hang-up, as nginx
    takes it; a request still waiting for a thread then was dropped without an access-log line
    (and run or not, by chance)."""
    caplog.set_level(logging.INFO, logger="service.access")
    held, other = Held(), Held()
    other.release.set()
    server = create_server(app_with({"/held": held, "/other": other}), Config(host="127.0.0.1", port=0, web_threads=1))
    loop = started(server)
    address = ("127.0.0.1", server.effective_port)
    with (
        socket.create_connection(address, timeout=10) as busy,
        socket.create_connection(address, timeout=10) as leaving,
    ):
        busy.sendall(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")  # the only thread is taken
        assert held.entered.wait(10)
        leaving.sendall(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
        leaving.shutdown(socket.SHUT_WR)
        time.sleep(0.5)  # the server reads the end of input
        held.release.set()
        assert busy.recv(1 << 16).startswith(b"HTTP/1.1 200 ")
        assert leaving.recv(1) == b""
    lines = lambda: [r.getMessage() for r in caplog.records if r.name == "service.access"]  # noqa: E731
    wait_until(lambda: any(line.startswith("GET /other 499 ") for line in lines()), 5, "the 499 line")
    assert not other.entered.is_set()  # not run
    server.drain(1)
    loop.join(10)


class Ordered:
    """Records the order in which requests reach the app; the first one waits to be released."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.first_in = threading.Event()
        self.release = threading.Event()

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str = "") -> None:
        self.order.append(req.path)
        if len(self.order) == 1:
            self.first_in.set()
            self.release.wait(10)
        resp.media = {}


def test_health_checks_go_ahead_of_the_requests_waiting_for_a_thread():
    ordered = Ordered()
    app = app_with(dict.fromkeys(("/busy/{name}", "/healthz", "/readyz"), ordered))
    server = create_server(app, Config(host="127.0.0.1", port=0, web_threads=1))
    loop = started(server)
    base = f"http://127.0.0.1:{server.effective_port}"

    def get(path: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: urllib.request.urlopen(base + path, timeout=10).read())
        thread.start()
        return thread

    clients = [get("/busy/0")]
    assert ordered.first_in.wait(10)  # the one thread is taken
    for path in ("/busy/1", "/busy/2", "/healthz", "/readyz"):
        queued = len(server.task_dispatcher.queue)
        clients.append(get(path))
        wait_until(lambda q=queued: len(server.task_dispatcher.queue) > q, 10, f"{path} queued")
    ordered.release.set()
    for client in clients:
        client.join(10)
    assert ordered.order[0] == "/busy/0" and set(ordered.order[1:3]) == {"/healthz", "/readyz"}
    assert ordered.order[3:] == ["/busy/1", "/busy/2"]
    server.drain(1)
    loop.join(10)


@pytest.mark.parametrize(
    "sent, statuses",
    [
        (b"GARBAGE\r\n\r\n", [b"400"]),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n", [b"200", b"400"]),  # pipelined
        (b"GET http://[::1/healthz HTTP/1.1\r\nHost: x\r\n\r\n", [b"400"]),  # an address urlsplit refuses
    ],
)
def test_a_request_that_cannot_be_parsed_gets_its_400_and_the_connection_closes(sent, statuses, caplog):
    """Such a request has no path: the queue that puts health checks first must pass it on, or
    the connection is dropped unanswered, or, behind a pipelined request, held open forever. Its
    refusal has its access-log line all the same."""
    caplog.set_level(logging.INFO, logger="service.access")
    ordered = Ordered()
    ordered.order.append("")  # no request waits to be released
    app = app_with({"/healthz": ordered})
    server = create_server(app, Config(host="127.0.0.1", port=0))
    loop = started(server)
    with socket.create_connection(("127.0.0.1", server.effective_port), timeout=10) as client:
        client.sendall(sent)
        answer = read_all(client)  # to the end: the server closes the connection
    assert re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer) == statuses
    assert [r.getMessage().split()[1:3] for r in caplog.records if r.name == "service.access"] == [["-", "400"]]
    server.drain(1)
    loop.join(10)
