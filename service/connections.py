"""The HTTP server: waitress, with limits that keep slow and idle clients from starving the others,
and a drain that lets the requests under way finish when the process is asked to stop.

waitress reads every connection in one loop and stops accepting at its connection limit (100 by
default). A client that trickles its request headers is never idle, so waitress's idle timeout
never closes it, and a hundred such clients stop the service for everyone, health checks
included. So, as nginx and HAProxy do in front of an application server:

- the connection limit is sized from the open-files limit (its soft limit raised to the hard
  one), and the loop uses poll(), as select() cannot watch descriptors above 1024;
- a request whose headers are not complete ``header_timeout_s`` after its first byte gets a JSON
  408 and its connection is closed (nginx's ``client_header_timeout``, HAProxy's
  ``timeout http-request``);
- a connection with no request under way and nothing received or sent for ``channel_timeout_s``
  is closed (waitress's ``channel_timeout``, nginx's ``keepalive_timeout``), and so is one whose
  client reads nothing of its answer for as long;
- heads are bounded in lines and bytes, and refused when they could smuggle a request (``Request``);
- a body that would be spooled to disk is judged by its key before it is read (``UploadGate``),
  a whole recording needs one of a few places (``UploadPlaces``), every body must come at a
  least rate, and every answer be read at one (``Pace``); chunks must not be tiny (``Request``);
- an answer given before its request's body was read closes with a linger (``Channel``);
- all of these are checked every second (``Server.maintenance``);
- the health checks go ahead of the requests that wait for a thread (``Dispatcher``).

``drain`` (on SIGTERM, or when a worker finds its supervisor gone) stops accepting connections,
closes idle ones, and ends the loop once no request is under way, or after a grace period:
waitress alone waits 5 s for its threads and then tears the runtime down under a request still
running. When the whole service stops, the process closes the door: it accepts the connections
already queued in the listening socket (their clients connected before the stop, and most have
sent their request: shutting the socket would reset them) and shuts the socket, so that later
ones are refused rather than left waiting. A worker replaced on its own only stops taking
connections from the socket it shares with the others: a shut socket stays shut for every
process that holds it, the worker's replacement included.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import logging
import os
import resource
import select
import socket
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask
from waitress.utilities import BadRequest, Error, RequestEntityTooLarge, RequestHeaderFieldsTooLarge

from service.config import ConfigError
from service.logs import log_access
from service.turns import BUSY, BUSY_RETRY_AFTER_S

if TYPE_CHECKING:
    from service.config import Config

log = logging.getLogger("service.connections")
PROBES = frozenset({"/healthz", "/readyz"})  # served before the requests queued for a thread
# Descriptors the process needs besides client connections: the listening socket, the database,
# the model, log and outbox files, the waitress trigger pipe, METRICS_PORT's connections.
RESERVED_FILES = 64
MIN_CONNECTIONS = 16  # fewer, and a start is refused: health checks and a few clients need room
# A connection opened for a request not yet sent: how long a drain waits for its first bytes.
FIRST_BYTES_S = 1.0
# The most connections a stop accepts from the listening socket's queue: more than its backlog.
SWEEP_MAX = 8192
# A request's head: at most this many lines (HAProxy's default limit is 101 header fields) and
# bytes (nginx's default buffers hold 32 KiB; waitress's own limit is 256 KiB, and a slow
# client's unfinished head is held in memory until the header timeout).
MAX_HEADER_LINES = 100
MAX_HEADER_BYTES = 32 << 10
# How long a connection answered before its request's body was read drops what still comes.
LINGER_S = 5.0
# Seconds a client is asked to wait when the temporary directory is full.
NO_ROOM_RETRY_AFTER_S = 30
# A request body must come at this many bytes a second over each window this long (all of
# what is left of a smaller one within the window), or it is answered 408 and closed: a few
# clients that trickle a byte now and then would otherwise hold every upload place, or disk and
# memory for as long as they liked. 8 KiB/s is a 64 kbit/s link.
UPLOAD_WINDOW_S = 30.0
MIN_UPLOAD_BYTES_PER_S = 8 << 10
# Bodies past this are written to a file as they arrive (waitress's ``inbuf_overflow``), and the
# gate judges their key first; those under it stay in memory.
SPOOL_BYTES = 64 << 10
# waitress decodes a chunked body chunk by chunk, in Python, in the loop that serves every
# connection: a body of one-byte chunks cost it a hundred times what the same bytes cost with a
# Content-Length. So chunks are fed to it a slice at a time, and their framing (size lines and
# CRLFs) may take this much, and a share of the data beyond it (chunks of about 512 bytes or
# more: clients that read a file a KiB at a time send such).
CHUNK_SLICE = 4 << 10
CHUNK_FRAMING_FREE = 1 << 10
CHUNK_FRAMING_SHARE = 64
# Answers are held in memory until sent: one whose client takes it slower than this, over a
# window this long, has its connection closed.
DOWNLOAD_WINDOW_S = 30.0
MIN_DOWNLOAD_BYTES_PER_S = 8 << 10
# Answers waiting on their clients, held in memory, may take this much of a worker in all: past
# it, the connections with the most waiting are closed (a recording's answer is tens of MB, and
# a client that reads each just fast enough would otherwise hold as many as it opens connections).
UNSENT_BUDGET = 128 << 20
# Answers given by the server itself, not the app (JsonErrorTask), name these to browsers, as
# the app's CORS middleware does.
CORS_EXPOSED = ("X-Request-ID", "Retry-After")


def raise_open_files_limit() -> int:
    """Raise this process's soft open-files limit to the hard one; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # some platforms cap it below the hard limit
            pass
    return soft


def _timeout_response(message: str) -> bytes:
    body = orjson.dumps({"error": message})
    head = (
        b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: application/json\r\n"
        b"X-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    return head + body


class UploadsBusy(Error):
    """Every place for a large upload is taken (``UploadPlaces``)."""

    code = 503
    reason = "Service Unavailable"


class NoRoom(Error):
    """The temporary directory, where waitress spools large bodies, cannot hold this one."""

    code = 503
    reason = "Service Unavailable"


@dataclass(frozen=True)
class Refusal:
    """An answer given to a large upload before its body is read (``UploadGate``)."""

    code: int
    reason: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()


# Judges a body that would be spooled to disk (past SPOOL_BYTES) from its request's x-api-key
# header (None when it has none) before the body is read: None lets it in, a Refusal answers at
# once. It may read the database, so it runs on a thread of its own, never in the loop's.
UploadGate = Callable[[str | None], Refusal | None]


class GateRefused(Error):
    """A large upload the gate refused (``Refusal``)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.code, self.reason, self.refusal = refusal.code, refusal.reason, refusal


class Pace:
    """A transfer's least rate, taken over windows of ``window_s``: one that a client who trickles
    a byte now and then cannot meet on average by having sent (or read) fast at first."""

    def __init__(self, window_s: float, least_bytes_per_s: int) -> None:
        self._window_s, self._least = window_s, least_bytes_per_s
        self._since: float | None = None
        self._done_then = 0

    def begin(self, now: float, done: int) -> None:
        self._since, self._done_then = now, done

    def stop(self) -> None:
        """Nothing waits on the client (it has caught up): the next window begins afresh."""
        self._since = None

    def slow(self, now: float, done: int, total: int | None = None) -> bool:
        """Less than the least rate over the window that has just ended (a window begins if none
        had), or than what was left of ``total``; ``done``: the bytes moved so far."""
        since = self._since  # read once: a task thread may stop it meanwhile (``Channel._flush_some``)
        if since is None:
            self.begin(now, done)
            return False
        took_s = now - since
        if took_s < self._window_s:
            return False
        least = self._least * took_s if total is None else min(self._least * took_s, total - self._done_then)
        slow = done - self._done_then < least
        self.begin(now, done)
        return slow


class UploadPlaces:
    """How many bodies larger than the default limit (whole recordings) one worker receives at
    once. waitress spools each to a file as it arrives, before the app sees it: without a bound,
    clients could fill the disk (hundreds of connections, each a whole recording). The gate
    (``UploadGate``) keeps clients without an active key out; this bounds the others."""

    def __init__(self, places: int) -> None:
        self._free = places
        self._lock = threading.Lock()  # taken in the loop's thread, given back in a task's

    @property
    def free(self) -> int:
        return self._free

    def take(self) -> bool:
        with self._lock:
            if not self._free:
                return False
            self._free -= 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self._free += 1


class Request(HTTPRequestParser):
    """waitress's request parser, with the body limit of the request's route: a body declared
    (or chunked) past it is refused before it is read, as waitress does past its one limit. A
    body on a route whose limit is past ``place_above`` (a whole recording's) needs an upload
    place, or gets a 503 before it is read;
    with a gate, the place is taken once the gate has let the upload in.

    And stricter about the head, which waitress parses in its one loop for every connection:
    more than ``MAX_HEADER_LINES`` lines are refused (431) as they arrive, before waitress's
    parsing, which costs the loop time for every line (docs/security.md); a head with a bare LF
    gets its 400 at once, not a 408 after the header timeout; and, as RFC 9112 requires, a
    request with both Content-Length and Transfer-Encoding (the way requests are smuggled past a
    front end that reads the other one), an HTTP/1.1 request without a Host, and one with
    several, get a 400 and their connection is closed.
    """

    needs_place = False  # a body on a route past ``place_above`` (a whole recording)
    holds_place = False
    # Its body's rate, from when it may come (a gate's verdict may come later than its head).
    upload_pace: Pace | None = None
    made_up_head = False  # refused before its head was parsed: its method and path are unknown
    judging = False  # a large upload waiting for the gate's verdict: its body is not read meanwhile
    held_continue = False  # its client expects "100 Continue", which waits for the verdict

    def __init__(
        self,
        adj: Adjustments,
        limits: dict[str, Adjustments],
        places: UploadPlaces,
        place_above: int,
        gated: bool = False,
    ) -> None:
        super().__init__(adj)
        self._limits = limits  # by path, "" for the others: adjustments that differ in the limit
        self._places = places
        self._place_above = place_above
        self._gated = gated  # large uploads wait for the gate's verdict

    def parse_header(self, header_plus: bytes) -> None:
        try:
            super().parse_header(header_plus)
        except ValueError as exc:  # urlsplit's on "http://[::1/": waitress closed with no answer
            raise ParsingError("Bad URI") from exc
        # waitress drops Transfer-Encoding from the headers of HTTP/1.1 (an empty one too)
        framed_twice = b"\ntransfer-encoding:" in header_plus.lower() and "CONTENT_LENGTH" in self.headers
        if framed_twice:
            raise ParsingError("both Content-Length and Transfer-Encoding")
        if "TRANSFER_ENCODING" in self.headers:  # left by waitress on HTTP/1.0, which has none
            raise ParsingError("Transfer-Encoding in an HTTP/1.0 request")
        if self.version == "1.1" and not self.headers.get("HOST"):
            raise ParsingError("an HTTP/1.1 request needs a Host header")
        if "," in self.headers.get("HOST", ""):  # waitress joins repeated headers with commas
            raise ParsingError("more than one Host header")
        # As Falcon routes it: "//api/…" reaches the same resource as "/api/…".
        path = "/" + self.path.lstrip("/")
        media = self.headers.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        self.adj = self._limits.get(f"{path} {media}") or self._limits.get(path) or self._limits[""]
        if self.command != "POST":  # the large routes take their large bodies by POST only
            self.adj = self._limits[""]
        large_route = self.adj.max_request_body_size > self._place_above + 1
        self.needs_place = large_route and (
            self.chunked or self._place_above < self.content_length < self.adj.max_request_body_size
        )
        # Chunked bodies may grow past SPOOL_BYTES, where the route takes that much (the routes
        # that take no key take less).
        spooled = self.adj.max_request_body_size > SPOOL_BYTES and (self.chunked or self.content_length > SPOOL_BYTES)
        if self._gated and (self.needs_place or spooled):  # let in (and a place taken) once judged
            self.judging = True
            self.held_continue, self.expect_continue = self.expect_continue, False
        elif self.chunked or self.content_length:
            self.let_in()
        else:  # no body to ask for: waitress sent "100 Continue", then waited for one until the idle timeout
            self.expect_continue = False

    def let_in(self) -> bool:
        """Its body may come from now on: its pace begins, and a large upload takes an upload
        place, or gets the busy 503 (from its headers)."""
        self.begin_pace()
        if self.needs_place:
            self.holds_place = self._places.take()
            if not self.holds_place:
                self.error = UploadsBusy("every place for a large upload is taken")
                self.completed = True
        return self.error is None

    def begin_pace(self) -> None:
        self.upload_pace = Pace(UPLOAD_WINDOW_S, MIN_UPLOAD_BYTES_PER_S)
        self.upload_pace.begin(time.time(), self.body_bytes_received)

    @property
    def api_key(self) -> str | None:
        return self.headers.get("X_API_KEY") or None

    def refuse(self, refusal: Refusal) -> None:
        self.error = GateRefused(refusal)
        self.completed = True

    def received(self, data: bytes) -> int:
        if self.body_rcv is None and not self.completed and (error := self._bad_head(self.header_plus + data)):
            self.parse_header(b"GET / HTTP/1.0\r\n")  # as waitress does for a head too large
            self.made_up_head = True
            self.error = error
            self.completed = True
            return len(data)
        if self.chunked and self.body_rcv is not None:
            data = data[:CHUNK_SLICE]  # waitress's channel gives the rest in the next call
        try:
            consumed = super().received(data)
        except OSError as exc:  # the spool file: a full disk, or over a quota
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            log.warning("No room in the temporary directory for a request body: %s", exc.strerror)
            self.error = NoRoom(exc.strerror)
            self.completed = True
            return len(data)
        receiver = self.body_rcv if self.chunked else None
        if (
            self.error is None
            and receiver is not None
            and max(len(receiver.control_line), len(receiver.trailer)) > MAX_HEADER_BYTES
        ):
            # waitress holds a chunk's size line (and the trailer) in memory until its end, and
            # searches all of it again at every read: megabytes of it held the loop for seconds.
            self.error = BadRequest("a chunk size line or trailer too long")
            self.completed = True
        if self.error is None and receiver is not None and self._framing_too_large(receiver):
            self.error = BadRequest(
                f"chunks too small: they must average about {CHUNK_FRAMING_SHARE * 8} bytes or more"
            )
            self.completed = True
        chunk = self.body_rcv.chunk_remainder if self.chunked and self.body_rcv is not None else 0
        if self.error is None and self.body_bytes_received + chunk >= self.adj.max_request_body_size:
            # A chunk declared past the limit: refused now, as a Content-Length past it is,
            # instead of once the body has come (or after the idle timeout, if it never does).
            self.error = RequestEntityTooLarge("a chunk exceeds the body limit")
            self.completed = True
        if self.error is not None:  # refused from its headers: no "100 Continue" invites the body
            self.expect_continue = False
        return consumed

    def _framing_too_large(self, receiver: Any) -> bool:
        data = len(receiver.buf)  # the chunks' data so far; body_bytes_received counts their framing too
        return self.body_bytes_received - data > CHUNK_FRAMING_FREE + data // CHUNK_FRAMING_SHARE

    @staticmethod
    def _bad_head(head: bytes) -> Error | None:
        """What is wrong with a head so far (before waitress parses it, at the speed of C)."""
        end = head.find(b"\r\n\r\n")
        head = head if end < 0 else head[:end]
        if head.count(b"\n") > MAX_HEADER_LINES:
            return RequestHeaderFieldsTooLarge(f"more than {MAX_HEADER_LINES} header lines")
        if head.count(b"\n") != head.count(b"\r\n"):
            return BadRequest("lines must end in CRLF")
        return None

    def close(self) -> None:
        """After its answer, or when its client hangs up while it is read (``Channel``)."""
        try:
            with contextlib.suppress(OSError):  # a spool file that cannot flush on a full disk
                super().close()
        finally:
            if self.holds_place:
                self.holds_place = False
                self._places.give_back()


class JsonErrorTask(ErrorTask):
    """waitress's answer to a request it does not pass on (malformed, too large, an encoding it
    does not implement, a large upload refused), in the shape of every other error: ``{"error":
    "…"}``, with its access-log line (the peer's address: it never reached the app, which knows
    the trusted proxies)."""

    def execute(self) -> None:
        error = self.request.error
        if error.code == 413:  # the words of the app's own 413
            message = f"Request body too large (limit {self.request.adj.max_request_body_size - 1} bytes)"
        elif isinstance(error, GateRefused):
            message = error.body
            self.response_headers += list(error.refusal.headers)
        elif isinstance(error, UploadsBusy):  # as a recording with no turn (service.turns)
            message = BUSY
            self.response_headers.append(("Retry-After", str(BUSY_RETRY_AFTER_S)))
        elif isinstance(error, NoRoom):
            message = "The server has no room for this upload now. Try again later."
            self.response_headers.append(("Retry-After", str(NO_ROOM_RETRY_AFTER_S)))
        else:
            message = f"{error.reason}: {error.body}"
        body = orjson.dumps({"error": message})
        self.status = f"{error.code} {error.reason}"
        self.response_headers += [
            ("Content-Type", "application/json"),
            ("X-Content-Type-Options", "nosniff"),
            ("Cache-Control", "no-store"),
        ]
        request, channel = self.request, self.channel
        self.response_headers += channel.server.cors_headers(request.headers.get("ORIGIN"))
        self.set_close_on_finish()
        channel.linger = True
        self.content_length = len(body)
        self.write(body)
        took_ms = (time.time() - channel.request_began) * 1000
        peer = channel.addr[0] if isinstance(channel.addr, tuple) else "-"
        # A head refused before it was parsed (waitress's too large, or ours) shows "GET /".
        unparsed = error.code == 431 or getattr(request, "made_up_head", False)
        method = path = "-"
        if not unparsed:  # a head waitress could not parse has neither
            method, path = (getattr(request, name, None) or "-" for name in ("command", "path"))
        log_access(method, path, error.code, took_ms, "-", str(peer))
        channel.server.refused(error.code)


class Task(WSGITask):
    """waitress's task for a request; once a drain has begun, its answer says ``Connection:
    close``. The client then sends its next request on a new connection, which another worker
    takes or the stopped service refuses, instead of on this one as the drain closes it."""

    def build_response_header(self) -> bytes:
        if self.channel.server.drain_until is not None:  # as if the client had asked (HTTP/1.0 too)
            self.request.headers["CONNECTION"] = "close"
        return super().build_response_header()


class Channel(HTTPChannel):
    """waitress's connection, with the state the server's limits read: when it opened and when the
    request it is reading began, its answers' pace, its lingering close, and the gate's verdict."""

    task_class = Task
    error_task_class = JsonErrorTask

    request_began = 0.0  # time.time() of the first byte of the request being read
    first_request = True  # no request has been read whole on this connection yet
    # Answered and closed before its request's body was read (JsonErrorTask): closed at once, the
    # body still arriving made the kernel reset the connection, and a client that sends its body
    # before it reads (most do, but for Expect: 100-continue) lost the answer to the reset. So the
    # close lingers, as nginx's does: the answer and then the end are sent, and what the client
    # still sends is read and dropped, for up to LINGER_S.
    linger = False
    lingering_until: float | None = None
    sent_bytes = 0

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.opened = time.time()
        # Its answers' rate: windows begin when an answer waits on its client, and end whenever
        # the client has caught up.
        self.download_pace = Pace(DOWNLOAD_WINDOW_S, MIN_DOWNLOAD_BYTES_PER_S)
        super().__init__(*args, **kw)

    def parser_class(self, adj: Adjustments) -> Request:  # waitress calls self.parser_class(self.adj)
        server = self.server
        return Request(adj, server.body_limits, server.upload_places, server.place_above, server.gated)

    def judged(self, request: Request, refusal: Refusal | None) -> None:
        """The gate's verdict on the large upload being read; in the loop's thread. Refused, it
        is answered as waitress answers a request it cannot take, and its connection closed."""
        if request is not self.request or not self.connected:  # closed meanwhile (timed out)
            return
        with self.requests_lock:  # as waitress's received, which ``readable`` kept from running
            request.judging = False
            if refusal is not None:
                request.refuse(refusal)
            if request.completed or not request.let_in():  # refused, or no place: answered now
                self.request = None
                self.requests.append(request)
                if len(self.requests) == 1:
                    self.server.add_task(self)
            elif request.held_continue:
                request.expect_continue = True
                if not self.requests and not self.sent_continue:  # else service() sends it, in order
                    self.send_continue()

    def handle_close(self) -> None:
        if self.request is not None:  # its client hung up while it was read: its place is free
            self.request.close()
            self.request = None
        if self.linger and self.lingering_until is None and self.connected:
            try:
                self.socket.shutdown(socket.SHUT_WR)  # after the answer: the client reads it, then the end
            except OSError:
                pass
            else:
                self.lingering_until = time.time() + LINGER_S
                return
        self.lingering_until = None
        super().handle_close()

    def readable(self) -> bool:
        if self.lingering_until is not None:
            return True
        return super().readable() and not (self.request is not None and self.request.judging)

    def writable(self) -> bool:
        return self.lingering_until is None and super().writable()

    def handle_read(self) -> None:
        """waitress's, but for a lingering close: what the client still sends is read and dropped,
        until it has sent it all (or gone) or ``LINGER_S`` has passed (``Server.maintenance``)."""
        if self.lingering_until is None:
            super().handle_read()
            return
        try:
            if self.socket.recv(1 << 16):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self.handle_close()

    def service(self) -> None:
        """waitress's, then: a client that hung up while an earlier answer was written leaves
        the requests it had pipelined behind it unserved; close them, and give back their places."""
        with self.requests_lock:
            if not self.requests:  # closed so after waitress had queued this turn
                return
        super().service()
        if not self.connected:
            with self.requests_lock:
                for request in self.requests:
                    request.close()
                self.requests = []

    def received(self, data: bytes) -> bool:
        now, reading = time.time(), self.request
        judging = reading is not None and reading.judging
        more = super().received(data)
        if reading is None or (self.request is not None and self.request is not reading):
            self.request_began = now  # these bytes began a request (or two, the last one counts)
        if self.requests:
            self.first_request = False
        if self.request is not None and self.request.judging and not judging:  # its headers just came
            self.server.judge(self, self.request)
        return more

    def send_continue(self) -> None:
        """waitress's, where the upload's rate counts from here (its client waited for this), and
        a failed send does not close the connection in the middle of ``received`` (waitress went on
        with the request the close had cleared): the loop's next read or write sees the reset."""
        request = self.request
        if request is None or not self.connected:  # closed meanwhile (``Server.maintenance``)
            return
        request.begin_pace()
        request.expect_continue = False
        line = b"HTTP/1.1 100 Continue\r\n\r\n"
        with self.outbuf_lock:
            self.outbufs[-1].append(line)
            self.current_outbuf_count += len(line)
            self.total_outbufs_len += len(line)
            self.sent_continue = True
            self._flush_some(do_close=False)
        request.completed = False

    def owed(self, now: float) -> bool:
        """During a drain: this connection's client is owed an answer. It is while a request is
        being read (headers bounded by the header timeout), served or answered; while bytes of
        the next one wait unread in the socket; and, for ``FIRST_BYTES_S``, on a connection
        opened for a request not sent yet. A kept-alive connection with nothing to read is not."""
        if self.lingering_until is not None:  # answered already
            return False
        if self.requests or self.request is not None or self.total_outbufs_len:
            return True
        if self.first_request and now - self.opened < FIRST_BYTES_S:
            return True
        try:
            return bool(self.socket.recv(1, socket.MSG_PEEK))  # b"": the client has closed it
        except OSError:  # nothing to read (EAGAIN), or reset
            return False

    def reading_headers(self) -> bool:
        """Part of a request's headers has arrived, and no response is being made."""
        return self.request is not None and not self.request.headers_finished and not self.requests

    def uploading_slowly(self, now: float) -> bool:
        """A body under way that came slower than the least rate over its last window."""
        request = self.request
        if request is None or request.upload_pace is None or request.completed:
            return False
        if self.requests or request.expect_continue or self.total_outbufs_len:
            # Not read meanwhile: an earlier request is served or its answer sent, or its client
            # waits for "100 Continue". Its window begins once it may come again.
            request.upload_pace.stop()
            return False
        total = None if request.chunked else request.content_length
        return request.upload_pace.slow(now, request.body_bytes_received, total)

    def send(self, data: bytes, do_close: bool = True) -> int:
        sent = super().send(data, do_close)
        self.sent_bytes += sent
        return sent

    def _flush_some(self, do_close: bool = True) -> bool:
        flushed = super()._flush_some(do_close)
        if not self.total_outbufs_len:  # caught up
            self.download_pace.stop()
        return flushed

    def reading_slowly(self, now: float) -> bool:
        """Its answers wait on it and went out slower than the least rate over the last window
        (one that reads a few bytes a minute would otherwise hold a recording's answer in memory)."""
        if not self.total_outbufs_len:
            self.download_pace.stop()
            return False
        return self.download_pace.slow(now, self.sent_bytes - self._unread_in_kernel())

    def _unread_in_kernel(self) -> int:
        """What the kernel holds of what was sent, not yet acknowledged by the client: a buffer of
        megabytes, which poll() reports writable only once a good part of it has gone, so that
        bytes handed to it say little of how fast the client reads."""
        try:
            queued = fcntl.ioctl(self.socket.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except (OSError, AttributeError):  # not Linux, or closed
            return 0
        return struct.unpack("i", queued)[0]

    def abort(self) -> None:
        """Closed with a reset: what the kernel still holds for a client that does not read is
        dropped too (nginx's ``reset_timedout_connection``)."""
        with contextlib.suppress(OSError):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.linger = False
        self.handle_close()

    def time_out(self, response: bytes) -> None:
        """Answer ``response`` and close: nothing else is writing, as no request is under way."""
        with self.outbuf_lock:
            self.outbufs[-1].append(response)
            self.total_outbufs_len += len(response)
        self.close_when_flushed = True
        self.linger = True  # a slow upload's client is still sending


class Dispatcher(ThreadedTaskDispatcher):
    """waitress's queue of requests for its threads, with the health checks first.

    Under a burst every thread waits on the model and the queue is first in, first out: a probe
    behind a hundred denoising requests took seconds, and a balancer or Kubernetes that times it
    out takes a busy replica for a dead one (and restarts it, under the same load)."""

    def add_task(self, task: Any) -> None:
        requests = task.requests  # task is the connection; its first request is the one to serve
        first = requests[0] if requests else None
        # A request waitress could not parse has an error and may have no path: it goes in turn.
        if first is not None and first.error is None and getattr(first, "path", None) in PROBES:
            with self.lock:
                self.queue.appendleft(task)
                self.queue_cv.notify()
            return
        super().add_task(task)


class Server(TcpWSGIServer):
    """waitress's TCP server with ``Channel`` connections, the limits on slow clients (checked
    each second in ``maintenance``), the upload gate and the drain."""

    channel_class = Channel
    next_log = 0.0  # when the next line about slow clients may be logged
    drain_until: float | None = None  # set by drain: the loop ends then at the latest
    draining = False  # the drain has begun in the loop

    def __init__(
        self,
        app: Any,
        header_timeout_s: float,
        channel_timeout_s: float,
        grace_s: float,
        upload_places: int,
        supervisor: int | None = None,
        service_stopping: Callable[[], bool] = lambda: False,
        body_limits: dict[str, int] | None = None,
        place_above: int | None = None,
        upload_gate: UploadGate | None = None,
        heartbeat: Callable[[], None] = lambda: None,
        cors_origins: str | tuple[str, ...] = (),  # Config.cors_origins
        refused: Callable[[int], None] = lambda status: None,
        **kw: Any,
    ) -> None:
        self.header_timeout_s = header_timeout_s
        self.cors_origins = cors_origins
        self.refused = refused  # told the status of each answer the server gives itself (metrics)
        self.heartbeat = heartbeat  # a worker's: tells its supervisor that the loop runs
        self._upload_gate = upload_gate
        # One thread: the verdicts are quick (a cached key, or one indexed read).
        self._judges = ThreadPoolExecutor(1, thread_name_prefix="upload-gate") if upload_gate else None
        self._loop_closed = False  # a verdict that comes later must not write to the closed wake-up pipe
        self._closing = threading.Lock()
        self.supervisor = supervisor  # a worker's parent: the process that replaces dead workers
        self.service_stopping = service_stopping  # a worker's: its supervisor is stopping them all
        self.door_closed = False
        self.sweep_ended = False  # close_door can accept no more (the socket shut, no descriptor left)
        self.grace_s = grace_s
        self.channel_timeout_s = channel_timeout_s
        self.timed_out = 0  # connections closed for slow headers or uploads since the last log line
        self._timeout_response = _timeout_response(f"Request headers not received within {header_timeout_s:g} seconds")
        self._slow_upload_response = _timeout_response(
            f"Request body too slow: uploads must average {MIN_UPLOAD_BYTES_PER_S >> 10} KiB/s"
        )
        super().__init__(app, **kw)
        self.upload_places = UploadPlaces(upload_places)
        self.body_limits = {}  # by path: the adjustments with that route's limit (Request)
        for path, limit in {"": self.adj.max_request_body_size - 1, **(body_limits or {})}.items():
            self.body_limits[path] = copy.copy(self.adj)
            self.body_limits[path].max_request_body_size = limit + 1  # waitress refuses from the limit on
        # Bodies on routes that take more than this need an upload place (Request).
        self.place_above = self.body_limits[""].max_request_body_size - 1 if place_above is None else place_above

    def cors_headers(self, origin: str | None) -> list[tuple[str, str]]:
        """For an answer of the server's own, what the app's CORS middleware adds to its own."""
        if not self.cors_origins:
            return []
        headers = [("Vary", "Origin")]
        wildcard = self.cors_origins == "*"
        if origin is not None and (wildcard or origin in self.cors_origins):
            headers += [
                ("Access-Control-Allow-Origin", "*" if wildcard else origin),
                ("Access-Control-Expose-Headers", ", ".join(CORS_EXPOSED)),
            ]
        return headers

    @property
    def gated(self) -> bool:
        return self._upload_gate is not None

    def judge(self, channel: Channel, request: Request) -> None:
        """Ask the gate about ``request``, a large upload whose headers have come; the verdict
        goes back to ``channel`` in the loop's thread. A gate that fails lets the body in: the
        app answers it then, as it answers any request."""

        def verdict(done: Future) -> None:
            refusal = None
            if not done.cancelled():  # cancelled: the server is closing
                if (exc := done.exception()) is None:
                    refusal = done.result()
                else:
                    log.warning("The upload gate failed (%r); the app will judge the upload", exc)
            with self._closing:  # its descriptor may belong to another file once closed
                if not self._loop_closed:
                    self.trigger.pull_trigger(lambda: channel.judged(request, refusal))

        assert self._judges is not None and self._upload_gate is not None  # judging needs a gate
        self._judges.submit(self._upload_gate, request.api_key).add_done_callback(verdict)

    def close(self) -> None:
        if self._judges is not None:
            self._judges.shutdown(wait=False, cancel_futures=True)
        with self._closing:
            self._loop_closed = True
            super().close()

    def drain(self, grace_s: float) -> None:
        """Called from a signal handler: the loop's next maintenance pass starts the drain. A
        second signal, or one that comes while the process closes, changes nothing."""
        if self.drain_until is not None:
            return
        self.drain_until = time.time() + grace_s
        self.next_channel_cleanup = 0  # at once, not at the next cleanup interval
        with contextlib.suppress(OSError):  # the loop has already closed its wake-up pipe
            self.pull_trigger()

    def accept_connections(self) -> None:
        """waitress calls ``listen`` here; a socket a worker inherits already listens, and
        listening again would reopen it after the supervisor shut it to stop the service (and
        replace the supervisor's backlog with waitress's)."""
        if self.supervisor is None:
            super().accept_connections()
        else:
            self.accepting = True

    def accept(self) -> tuple[socket.socket, Any] | None:
        """waitress's accept; on a listening socket that was shut down (the supervisor stopping
        the service) the poll says readable and accept fails: that is the close, not an error to
        log with its traceback."""
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                self.handle_close()
            elif not self.door_closed:
                raise
            self.sweep_ended = True  # closing the door: take what can be taken, quietly
            return None

    def handle_close(self) -> None:
        """The listening socket was shut down: by this process's drain, or, for a worker, by
        another worker closing the door, the supervisor, or an orphaned worker's drain. Drain,
        staying in the loop, whose maintenance runs the drain (waitress would close the server,
        and the loop would end under the requests under way); nothing more can be accepted."""
        self.accepting = False
        if self.drain_until is None:
            log.info("The listening socket was shut down (the service is stopping): draining")
            self.drain(self.grace_s)

    def orphaned(self) -> bool:
        """A worker whose supervisor has gone: nothing would replace it or the others."""
        return self.supervisor is not None and os.getppid() != self.supervisor

    def close_door(self) -> None:
        """Accept the connections queued in the listening socket, then shut it: the queued ones
        are served, later ones refused (shutting a listening socket resets those it holds)."""
        self.door_closed = True
        queued = select.poll()
        queued.register(self.socket, select.POLLIN)
        for _ in range(SWEEP_MAX):  # bounded: connections keep arriving until the shutdown
            if self.sweep_ended or not queued.poll(0):
                break
            self.handle_accept()  # a client that gave up meanwhile is skipped (ECONNABORTED)
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RD)

    def _drained(self, now: float) -> bool:
        """Stop accepting; close idle connections; True once nothing is under way or time is up."""
        if not self.draining:
            self.draining = True
            self.accepting = False
            log.info("Draining: no new connections; waiting for the requests under way")
        # The socket is this process's, or no one's, or the whole service stops.
        if not self.door_closed and (self.supervisor is None or self.orphaned() or self.service_stopping()):
            self.close_door()
        busy = []
        for channel in self.active_channels.values():
            if channel.owed(now):
                busy.append(channel)
            else:
                channel.will_close = True
        # A request whose client hung up has left its channel but may still run in a thread,
        # which then writes to the loop's wake-up pipe: the loop must outlive it.
        tasks = self.task_dispatcher.active_count + len(self.task_dispatcher.queue)
        if (busy or tasks) and now < self.drain_until:
            return False
        if busy or tasks:
            log.warning("Stopping with %d request(s) still under way after the grace period", max(len(busy), tasks))
        return True

    def maintenance(self, now: float) -> None:
        """Runs every ``cleanup_interval`` seconds in the loop's thread (waitress's hook)."""
        self.heartbeat()
        if self.drain_until is None and self.orphaned():
            log.warning("The supervisor (pid %d) is gone: draining", self.supervisor)
            self.drain(self.grace_s)
        if self.drain_until is not None and self._drained(now):
            raise SystemExit(0)  # run() catches it and stops waitress's (now idle) threads
        waiting: list[Channel] = []  # with answers not yet sent
        for channel in list(self.active_channels.values()):
            if channel.total_outbufs_len:
                waiting.append(channel)
            if channel.lingering_until is not None and now > channel.lingering_until:
                channel.handle_close()
            elif channel.total_outbufs_len and now - channel.last_activity > self.channel_timeout_s:
                # An answer its client does not read: closed, the thread that waits to write the
                # rest gives up (and a recording its upload place), as nginx's send_timeout does.
                channel.abort()
            elif channel.reading_slowly(now):  # answers are held in memory until they are read
                channel.abort()
            if channel.will_close or channel.close_when_flushed or not channel.connected:
                continue
            if channel.reading_headers() and now - channel.request_began > self.header_timeout_s:
                channel.time_out(self._timeout_response)
                self.timed_out += 1
                self.refused(408)
            elif channel.uploading_slowly(now):
                channel.time_out(self._slow_upload_response)
                self.timed_out += 1
                self.refused(408)
            elif not channel.requests and now - channel.last_activity > self.channel_timeout_s:
                channel.will_close = True
        self._keep_to_budget(waiting)
        if self.timed_out and now >= self.next_log:
            log.warning(
                "Closed %d connection(s) whose request headers took longer than %g s, or whose body "
                "came at under %d KiB/s (slow clients)",
                self.timed_out,
                self.header_timeout_s,
                MIN_UPLOAD_BYTES_PER_S >> 10,
            )
            self.timed_out = 0
            self.next_log = now + 60

    def _keep_to_budget(self, waiting: list[Channel]) -> None:
        """Close the connections with the most answer waiting until the rest fit ``UNSENT_BUDGET``."""
        unsent = sum(channel.total_outbufs_len for channel in waiting if channel.connected)
        if unsent <= UNSENT_BUDGET:
            return
        for channel in sorted(waiting, key=lambda c: c.total_outbufs_len, reverse=True):
            if unsent <= UNSENT_BUDGET:
                break
            if channel.connected:
                unsent -= channel.total_outbufs_len
                log.warning(
                    "Closed a connection with %d MiB of answers waiting: over %d MiB wait on clients",
                    channel.total_outbufs_len >> 20,
                    UNSENT_BUDGET >> 20,
                )
                channel.abort()


def create_server(
    app: Any,
    config: Config,
    listener: socket.socket | None = None,
    supervisor: int | None = None,
    service_stopping: Callable[[], bool] = lambda: False,
    body_limits: dict[str, int] | None = None,
    place_above: int | None = None,
    upload_gate: UploadGate | None = None,
    heartbeat: Callable[[], None] = lambda: None,
    refused: Callable[[int], None] = lambda status: None,
) -> Server:
    """The server for ``app`` on HOST:PORT, or on ``listener`` already bound (a worker's, whose
    parent is the process ``supervisor``, which tells through ``service_stopping`` that it stops
    every worker, and hears through ``heartbeat`` that its loop runs); ``run()`` serves until
    SystemExit. ``body_limits``: the largest body of each
    route, by path ("" for the others) or by "path media/type" (``app.body_limits``), else
    ``MAX_BATCH_WINDOWS``'s; a body on a route whose limit is past ``place_above`` (the default
    limit's, unless given) needs an upload place. ``upload_gate``: judges a body past the default limit from its key
    before it is read (``app.upload_gate``); without one, every such body is read. ``refused``:
    told the status of each answer the server gives itself, from a request's headers."""
    body_limits = body_limits or {"": config.max_body_bytes}
    files = raise_open_files_limit()
    limit = min(config.connection_limit, files - RESERVED_FILES)
    if limit < MIN_CONNECTIONS:
        raise ConfigError(
            f"the open-files limit ({files}) leaves room for {max(0, limit)} client connections: "
            f"raise it (ulimit -n) to at least {RESERVED_FILES + MIN_CONNECTIONS}."
        )
    if limit < config.connection_limit:
        log.warning("CONNECTION_LIMIT lowered to %d: the open-files limit is %d", limit, files)
    adj = Adjustments(
        host=config.host,
        port=config.port,
        threads=config.web_threads,
        # The largest route's; each request gets its route's once its path is known (Request).
        max_request_body_size=max(body_limits.values()) + 1,
        ident="heartify",
        recv_bytes=1 << 16,  # a one-window body in one read instead of four
        inbuf_overflow=SPOOL_BYTES,
        max_request_header_size=MAX_HEADER_BYTES,
        # Answers stay in memory, where the app has made them already (their size follows the
        # bodies'): past waitress's 1 MiB they went to a file, and on a full disk one was cut
        # short, its connection never closed, and its worker spun.
        outbuf_overflow=sys.maxsize,
        # And no thread waits for a client to read them: past waitress's 16 MiB, the thread that
        # wrote an answer waited for its client before it served the request pipelined behind
        # it, and a few slowly read recordings held every thread (health checks hung). A
        # connection reads no new request while an answer waits, so it holds two at most, and
        # one read too slowly is closed (``Channel.reading_slowly``).
        outbuf_high_watermark=sys.maxsize,
        # Read one request ahead: a client's hang-up is then seen while its request is served
        # (environ["waitress.client_disconnected"]), so a recording waiting for a turn leaves.
        channel_request_lookahead=1,
        # The proxy headers reach the app, which reads only X-Forwarded-For, and trusts it only
        # from TRUSTED_PROXIES (clients.client_address); waitress would drop them all, as it
        # trusts no proxy here. Forwarded and X-Forwarded-Host/Proto/Port are the client's say.
        clear_untrusted_proxy_headers=False,
        connection_limit=limit,
        asyncore_use_poll=True,
        cleanup_interval=1,
    )
    dispatcher = Dispatcher()
    dispatcher.set_thread_count(adj.threads)
    where: dict[str, Any] = {"sockinfo": adj.listen[0]}
    if listener is not None:
        sockinfo = (listener.family, listener.type, listener.proto, listener.getsockname())
        where = {"_sock": listener, "bind_socket": False, "sockinfo": sockinfo}
    return Server(
        app,
        header_timeout_s=config.header_timeout_s,
        channel_timeout_s=config.channel_timeout_s,
        grace_s=config.shutdown_grace_s,
        upload_places=config.recording_threads,
        supervisor=supervisor,
        service_stopping=service_stopping,
        body_limits=body_limits,
        place_above=place_above,
        upload_gate=upload_gate,
        heartbeat=heartbeat,
        cors_origins=config.cors_origins,
        refused=refused,
        dispatcher=dispatcher,
        adj=adj,
        **where,
    )
