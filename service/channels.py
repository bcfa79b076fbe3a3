"""waitress's connection and tasks with the service's rules: the state the server's limits read
(when a request began, its answers' pace, a lingering close, the gate's verdict), and the answers
the server gives itself, in the JSON of the app's errors. ``service.connections`` runs them.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import termios
import time
from typing import Any

import orjson
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask, WSGITask

from service.clients import canonical
from service.logs import CLIENT_GONE, log_access
from service.pace import Pace
from service.parsing import MIN_UPLOAD_BYTES_PER_S, GateRefused, Refusal, Request, Unavailable

# The headers of every JSON error the server answers itself, as the app's error answers carry.
JSON_ERROR_HEADERS = (
    ("Content-Type", "application/json"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
)
# A connection opened for a request not yet sent: how long a drain waits for its first bytes.
FIRST_BYTES_S = 1.0
# How long a connection answered before its request's body was read drops what still comes.
LINGER_S = 5.0
# Answers are held in memory until sent: one whose client takes it slower than this, over a
# window this long, has its connection closed.
DOWNLOAD_WINDOW_S = 30.0
MIN_DOWNLOAD_BYTES_PER_S = 8 << 10


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
        elif isinstance(error, Unavailable):
            message = error.message
            self.response_headers.append(("Retry-After", str(error.retry_after_s)))
        else:
            message = f"{error.reason}: {error.body}"
        body = orjson.dumps({"error": message})
        self.status = f"{error.code} {error.reason}"
        self.response_headers += JSON_ERROR_HEADERS
        request, channel = self.request, self.channel
        self.response_headers += channel.server.cors_headers(request.headers.get("ORIGIN"))
        self.set_close_on_finish()
        channel.linger = True
        self.content_length = len(body)
        self.write(body)
        # A head refused before it was parsed (waitress's too large, or ours) shows "GET /".
        unparsed = error.code == 431 or getattr(request, "made_up_head", False)
        channel.log_own_answer(None if unparsed else request, error.code)


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
    blank = False  # the last bytes read were blank lines only
    aborted = False  # closed by the server (``abort``), not by its client
    sent_bytes = 0

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.opened = time.time()
        # Its answers' rate: windows begin when an answer waits on its client, and end whenever
        # the client has caught up.
        self.download_pace = Pace(DOWNLOAD_WINDOW_S, MIN_DOWNLOAD_BYTES_PER_S)
        super().__init__(*args, **kw)

    def parser_class(self, adj: Adjustments) -> Request:  # waitress calls self.parser_class(self.adj)
        return Request(adj, self.server.intake)

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
            idle_since = self.last_activity
            super().handle_read()
            if self.blank:  # blank lines are no activity: they kept a connection open for ever
                self.last_activity = idle_since
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
        """waitress's, but for a request whose client hung up, or half-closed, before the request
        began: not run, and logged as nginx logs it, 499 (waitress dropped it without a line).
        Then: a client that hung up while an earlier answer was written leaves the requests it
        had pipelined behind it unserved; close them, and give back their places."""
        self.first_request = False  # one was read whole (``received`` may not see it queued)
        with self.requests_lock:
            if not self.requests:  # closed so after waitress had queued this turn
                return
            gone: list[Request] = []
            if not self.connected:
                gone, self.requests = self.requests, []
        for request in gone:
            if not self.aborted:  # the requests behind an answer the server gave up on are not the client's doing
                self.log_own_answer(request, CLIENT_GONE)
            request.close()
        if gone:
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
        # Blank lines outside a body: those that may precede a request (waitress takes each pair
        # for an empty request and drops it), or that end a request's head.
        self.blank = data.isspace() and (reading is None or not reading.headers_finished)
        more = super().received(data)
        if reading is None or (self.request is not None and self.request is not reading):
            self.request_began = now  # these bytes began a request (or two, the last one counts)
        if self.requests:
            self.first_request = False
        if self.request is not None and self.request.judging and not judging:  # its headers just came
            self.server.judge(self, self.request)
        return more

    def log_own_answer(self, request: Request | None, status: int) -> None:
        """The access-log line of an answer the server gives (or, 499, does not give) itself,
        with the peer's address: the request never reached the app, which knows the trusted
        proxies. ``request`` None: a head that could not be parsed, with no method or path."""
        method = path = "-"
        if request is not None:
            method, path = (getattr(request, name, None) or "-" for name in ("command", "path"))
        peer = canonical(str(self.addr[0])) if isinstance(self.addr, tuple) else "-"
        log_access(method, path, status, (time.time() - self.request_began) * 1000, "-", peer)
        self.server.refused(status)

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
        return self._unread()

    def _unread(self) -> bool:
        """Bytes wait in the socket that the loop has not read yet (b"": the client has closed)."""
        try:
            return bool(self.socket.recv(1, socket.MSG_PEEK))
        except OSError:  # nothing to read (EAGAIN), or reset
            return False

    def idle(self) -> bool:
        """Nothing under way: no request served or answered, no large body being read, none
        waiting in the socket unread; at most the start of a request (``reading_head``)."""
        return (
            self.connected
            and not (self.will_close or self.close_when_flushed or self.requests or self.total_outbufs_len)
            and (self.request is None or self.reading_head())
            and not self._unread()
        )

    def reading_head(self) -> bool:
        """Reading a request's headers, or a body that the least upload rate sends in a second
        (once it may come: not while its "100 Continue" is owed): a larger upload may take its
        time (within its pace), but a client that sent a body of a few bytes one a second held
        its connection for as long as the pace allows (30 s)."""
        request = self.request
        if request is None or self.requests:
            return False
        if not request.headers_finished:
            return True
        small = not (request.completed or request.chunked) and request.content_length <= MIN_UPLOAD_BYTES_PER_S
        return small and not request.expect_continue

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
        (one that reads a few bytes a minute would otherwise hold a recording's answer in memory).
        They may wait in the kernel alone: an answer that fitted in its send buffer left nothing
        here, and a client that read none of it kept the connection for good (the idle close
        waits for a write that a full socket never allows)."""
        unread = self._unread_in_kernel()
        if not (self.total_outbufs_len or unread):
            self.download_pace.stop()
            return False
        return self.download_pace.slow(now, self.sent_bytes - unread)

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
        self.aborted = True
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
