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
- heads are bounded in lines and bytes, and refused when they could smuggle a request
  (``parsing.Request``);
- a body that would be spooled to disk is judged by its key before it is read
  (``parsing.UploadGate``), a whole recording needs one of a few places, and other spooled bodies
  room within a bound (``parsing.Intake``),
  every body must come at a least rate, and every answer be read at one (``pace.Pace``); chunks
  must not be tiny (``parsing.Request``);
- an answer given before its request's body was read closes with a linger (``channels.Channel``);
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
import logging
import os
import resource
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from waitress.adjustments import Adjustments
from waitress.server import TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher

from service import parsing
from service.channels import JSON_ERROR_HEADERS, Channel
from service.config import Config, ConfigError
from service.logs import Tally
from service.parsing import MAX_HEADER_BYTES, SPOOL_BYTES, Allowance, Intake, Request, UploadGate

log = logging.getLogger("service.connections")
PROBES = frozenset({"/healthz", "/readyz"})  # served before the requests queued for a thread
# Descriptors the process needs besides client connections: the listening socket, the database,
# the model, log and outbox files, the waitress trigger pipe, METRICS_PORT's connections.
RESERVED_FILES = 64
# And each pooled database connection up to three (SQLite's file, its log and shared memory).
FILES_PER_DATABASE_CONNECTION = 3
# A client connection may hold three: its socket, and the files two bodies are spooled to (the
# one being served, and the one read ahead). With one each, a few hundred uploads past 64 KiB
# used the last descriptors: bodies were dropped, and accept() failed in a loop that held
# health checks.
FILES_PER_CONNECTION = 3
# At the connection limit, connections idle this long are closed to make room.
ROOM_IDLE_S = 1.0
MIN_CONNECTIONS = 16  # fewer, and a start is refused: health checks and a few clients need room
# The most connections a stop accepts from the listening socket's queue: more than its backlog.
SWEEP_MAX = 8192
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
    headers = [("Connection", "close"), *JSON_ERROR_HEADERS, ("Content-Length", str(len(body)))]
    head = "HTTP/1.1 408 Request Timeout\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers)
    return (head + "\r\n").encode() + body


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


@dataclass(frozen=True)
class Routes:
    """What the server must know of the app's routes before the app sees a request
    (``app.server_rules``)."""

    # The largest body of each route, by path ("" for the others) or by "path media/type";
    # without "", MAX_BODY_BYTES.
    body_limits: dict[str, int] = field(default_factory=dict)
    # A body on a route whose limit is past this needs an upload place (by default: past "").
    place_above: int | None = None
    # Judges a body past the "" limit from its key before it is read; without one, each is read.
    upload_gate: UploadGate | None = None
    # Told the status of each answer the server gives itself from a request's headers (metrics).
    refused: Callable[[int], None] = lambda status: None


@dataclass(frozen=True)
class Parent:
    """A worker's supervisor (``service.workers.Supervisor``): the process that bound the
    listening socket and replaces dead workers."""

    pid: int
    stopping: Callable[[], bool] = lambda: False  # tells that it is stopping every worker
    heartbeat: Callable[[], None] = lambda: None  # told each second that the loop runs


class Server(TcpWSGIServer):
    """waitress's TCP server with ``Channel`` connections, the limits on slow clients (checked
    each second in ``maintenance``), the upload gate and the drain."""

    channel_class = Channel
    drain_until: float | None = None  # set by drain: the loop ends then at the latest
    draining = False  # the drain has begun in the loop

    def __init__(
        self,
        app: Any,
        header_timeout_s: float,
        channel_timeout_s: float,
        grace_s: float,
        upload_places: int,
        routes: Routes,
        supervisor: Parent | None = None,
        cors_origins: str | tuple[str, ...] = (),  # Config.cors_origins
        **kw: Any,
    ) -> None:
        self.header_timeout_s = header_timeout_s
        self.cors_origins = cors_origins
        self.refused = routes.refused
        self._upload_gate = routes.upload_gate
        # One thread: the verdicts are quick (a cached key, or one indexed read).
        self._judges = ThreadPoolExecutor(1, thread_name_prefix="upload-gate") if routes.upload_gate else None
        self._loop_closed = False  # a verdict that comes later must not write to the closed wake-up pipe
        self._closing = threading.Lock()
        self.supervisor = supervisor
        self.door_closed = False
        self.sweep_ended = False  # close_door can accept no more (the socket shut, no descriptor left)
        self.grace_s = grace_s
        self.channel_timeout_s = channel_timeout_s
        self.timed_out = Tally()  # connections closed for slow headers or uploads
        self.made_room = Tally()  # idle connections closed at the connection limit
        self._timeout_response = _timeout_response(f"Request headers not received within {header_timeout_s:g} seconds")
        self._slow_upload_response = _timeout_response(
            f"Request body too slow: uploads must average {parsing.MIN_UPLOAD_BYTES_PER_S >> 10} KiB/s"
        )
        super().__init__(app, **kw)
        limits = {}  # by path: the adjustments with that route's limit
        for path, limit in routes.body_limits.items():  # "" among them (create_server)
            limits[path] = copy.copy(self.adj)
            limits[path].max_request_body_size = limit + 1  # waitress refuses from the limit on
        self.intake = Intake(
            limits,
            limits[""].max_request_body_size - 1 if routes.place_above is None else routes.place_above,
            Allowance(upload_places),
            gated=routes.upload_gate is not None,
        )

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
        return self.supervisor is not None and os.getppid() != self.supervisor.pid

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
        if not self.door_closed and (self.supervisor is None or self.orphaned() or self.supervisor.stopping()):
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
        if self.supervisor is not None:
            self.supervisor.heartbeat()
        if self.drain_until is None and self.orphaned():
            log.warning("The supervisor (pid %d) is gone: draining", self.supervisor.pid)
            self.drain(self.grace_s)
        if self.drain_until is not None and self._drained(now):
            raise SystemExit(0)  # run() catches it and stops waitress's (now idle) threads
        waiting: list[Channel] = []  # with answers not yet sent
        for channel in list(self.active_channels.values()):
            if channel.total_outbufs_len:
                waiting.append(channel)
            self._police(channel, now)
        self._keep_to_budget(waiting)
        if len(self._map) >= self.adj.connection_limit:
            self._make_room(now)
        if timed_out := self.timed_out.due(now):
            log.warning(
                "Closed %d connection(s) whose request headers took longer than %g s, or whose body "
                "came at under %d KiB/s (slow clients)",
                timed_out,
                self.header_timeout_s,
                parsing.MIN_UPLOAD_BYTES_PER_S >> 10,
            )
        if unspooled := self.intake.unspooled.due(now):
            log.warning(
                "Answered 503 to %d request(s) whose body could not be written to the temporary directory (%s)",
                unspooled,
                self.intake.unspooled_why,
            )

    def _police(self, channel: Channel, now: float) -> None:
        """Close a connection that outstayed its welcome: its answer sent and lingering over, its
        answer not read, its headers or body too slow, or idle between requests."""
        if channel.lingering_until is not None and now > channel.lingering_until:
            channel.handle_close()
        elif channel.total_outbufs_len and now - channel.last_activity > self.channel_timeout_s:
            # An answer its client does not read: closed, the thread that waits to write the
            # rest gives up (and a recording its upload place), as nginx's send_timeout does.
            channel.abort()
        elif channel.reading_slowly(now):  # answers are held in memory until they are read
            channel.abort()
        if channel.will_close or channel.close_when_flushed or not channel.connected:
            return
        if channel.reading_headers() and now - channel.request_began > self.header_timeout_s:
            self._time_out(channel, self._timeout_response)
        elif channel.uploading_slowly(now):
            self._time_out(channel, self._slow_upload_response)
        elif not channel.requests and now - channel.last_activity > self._idle_limit_s(channel):
            channel.will_close = True

    def _make_room(self, now: float) -> None:
        """At the connection limit, new connections wait in the listen queue: close those idle for
        ``ROOM_IDLE_S``, as a server under pressure drops idle keep-alive connections (their
        clients open new ones). A client that held the limit with silent connections kept
        everyone else out until the header timeout, and again as it opened them anew: those it
        opens anew wait in the queue beside everyone else's."""
        closing = [c for c in self.active_channels.values() if _stale(c, now) and c.idle()]
        for channel in closing:
            channel.will_close = True
        self.made_room.add(len(closing))
        if made_room := self.made_room.due(now):
            log.warning(
                "At the connection limit (%d): closed %d idle connection(s) to make room",
                self.adj.connection_limit,
                made_room,
            )

    def _idle_limit_s(self, channel: Channel) -> float:
        """How long a connection may sit idle: between requests, ``CHANNEL_TIMEOUT_SECONDS``;
        before its first byte, no longer than a request's headers may take, as nginx counts its
        header timeout from the accept (connections that sent nothing held the connection limit
        for the idle timeout, and a client that opened them again kept everyone else out)."""
        if channel.first_request and channel.request is None:
            return min(self.header_timeout_s, self.channel_timeout_s)
        return self.channel_timeout_s

    def _time_out(self, channel: Channel, response: bytes) -> None:
        channel.time_out(response)
        self.timed_out.add()
        self.refused(408)

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


def _stale(channel: Channel, now: float) -> bool:
    """Silent for ``ROOM_IDLE_S``; or as long on a request's headers, or twice as long on its
    small body once it may come (which a client sends at once, and a slow one a byte at a time)."""
    if not channel.reading_head():
        return now - channel.last_activity >= ROOM_IDLE_S
    request = channel.request
    if request.headers_finished:
        return now - request.body_since >= 2 * ROOM_IDLE_S
    return now - channel.request_began >= ROOM_IDLE_S


def create_server(
    app: Any,
    config: Config,
    routes: Routes = Routes(),
    listener: socket.socket | None = None,
    supervisor: Parent | None = None,
) -> Server:
    """The server for ``app`` on HOST:PORT, or on ``listener`` already bound (a worker's, by its
    ``supervisor``); ``run()`` serves until SystemExit."""
    body_limits = {"": config.max_body_bytes, **routes.body_limits}
    files = raise_open_files_limit()
    reserved = RESERVED_FILES + FILES_PER_DATABASE_CONNECTION * config.web_threads
    limit = min(config.connection_limit, (files - reserved) // FILES_PER_CONNECTION)
    if limit < MIN_CONNECTIONS:
        raise ConfigError(
            f"the open-files limit ({files}) leaves room for {max(0, limit)} client connections: "
            f"raise it (ulimit -n) to at least {reserved + FILES_PER_CONNECTION * MIN_CONNECTIONS}."
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
        routes=replace(routes, body_limits=body_limits),
        supervisor=supervisor,
        cors_origins=config.cors_origins,
        dispatcher=dispatcher,
        adj=adj,
        **where,
    )
