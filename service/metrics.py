"""Prometheus metrics: the metric objects, the middleware that counts requests, and ``/metrics``.

With several worker processes (``service.workers``) the supervisor sets ``PROMETHEUS_MULTIPROC_DIR``
before any worker starts: prometheus-client then keeps every value in a file per process there,
and a scrape of any worker (or of the supervisor's ``METRICS_PORT``) merges them all, so one
scrape sees the whole service. The metric objects are made in ``Metrics.__init__``, not at import,
so that each process makes them after that variable is known and tests can make several.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from service.logs import Tally

if TYPE_CHECKING:  # the supervisor imports this module, and never loads Falcon
    import falcon

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED = "unmatched"  # the route label of every path no route matches: raw paths would be unbounded
REFUSED = "refused"  # the route label of answers the server gives from a request's headers, before any route
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
UNAVAILABLE = "Metrics unavailable: their folder was removed; the service makes it again"
# Connections METRICS_PORT serves at once: scrapers come one or two at a time. Within the
# descriptors the API's connection limit leaves free (connections.RESERVED_FILES).
METRICS_CONNECTIONS = 8


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def exposition_registry(own: CollectorRegistry) -> CollectorRegistry:
    """What a scrape reports: every process's files in multiprocess mode, else ``own``'s metrics."""
    folder = multiprocess_dir()
    if folder is None:
        return own
    try:
        return merged_registry(folder)
    except ValueError:  # prometheus-client's word for a folder that is not there
        raise MetricsUnavailable(folder) from None


def merged_registry(folder: str) -> CollectorRegistry:
    """The metrics of every process that wrote to ``folder``, merged at each scrape."""
    registry = CollectorRegistry()
    _SizedFiles(registry, folder)
    return registry


class _SizedFiles(MultiProcessCollector):
    """prometheus-client's merge of every process's files, but for those a starting worker has
    made and not yet sized: reading one failed the whole scrape (a 500 while a worker started).
    Such a file holds no value yet, so leaving it out loses nothing."""

    def __init__(self, registry: CollectorRegistry, folder: str) -> None:
        self._folder = folder
        super().__init__(registry, path=folder)

    def collect(self) -> Iterable[Metric]:
        if not os.path.isdir(self._folder):  # an empty answer would read as every series gone
            raise MetricsUnavailable(self._folder)
        files = [path for path in glob.glob(os.path.join(self._folder, "*.db")) if _sized(path)]
        try:
            return self.merge(files, accumulate=True)
        except FileNotFoundError:  # the folder removed during the scrape
            raise MetricsUnavailable(self._folder) from None


class MetricsUnavailable(Exception):
    """A scrape that cannot be answered truthfully: a 503, not a 200 with every series gone."""

    def __init__(self, folder: str) -> None:
        super().__init__(f"the metrics folder {folder} is missing")


def _sized(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except FileNotFoundError:  # a dead worker's live gauge, removed meanwhile
        return False


def _never_fails(write: Callable[..., None]) -> Callable[..., None]:
    """A value that cannot be written is lost, never the answer, mail or model run it counts.
    In multiprocess mode prometheus-client opens a file in the folder at the first value of each
    kind in a process: with the folder removed (systemd-logind's ``RemoveIPC`` empties
    ``/dev/shm`` at logout) that raised in the middle of an answer, health checks included."""

    @functools.wraps(write)
    def guarded(self: Metrics, *args: object) -> None:
        try:
            write(self, *args)
        except OSError as exc:
            self._lost.add()
            if count := self._lost.due(time.monotonic()):
                log.error("%d metric value(s) could not be written (%s); the answers go on without them", count, exc)

    return guarded


class Metrics:
    """The service's metrics, registered in a registry of their own. Every write goes through a
    method here, which never raises (``_never_fails``)."""

    def __init__(self) -> None:
        self._lost = Tally()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "heartify_requests", "HTTP requests answered", ["route", "status"], registry=r
        )  # exposed as heartify_requests_total
        self.request_duration = Histogram(
            "heartify_request_duration_seconds", "Time from request to response", ["route"], registry=r
        )
        self.batch_size = Histogram(
            "heartify_inference_batch_size", "Windows per model run", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_duration = Histogram("heartify_inference_duration_seconds", "Time of one model run", registry=r)
        self.queue_depth = Gauge(
            "heartify_queue_depth", "Requests waiting for a batch", multiprocess_mode="livesum", registry=r
        )
        self.outbox_pending = Gauge(
            "heartify_outbox_pending", "Mails not yet delivered", multiprocess_mode="mostrecent", registry=r
        )
        self.model_info = Gauge(
            "heartify_model_info",
            "The model served",
            ["version", "precision", "sha256"],
            multiprocess_mode="max",
            registry=r,
        )
        self.worker_start_time = Gauge(
            "heartify_worker_start_time_seconds",
            "When each serving process started (pid label: one per worker)",
            multiprocess_mode="liveall",
            registry=r,
        )
        self.rate_limited = Counter("heartify_rate_limited", "Requests refused by a rate limit", ["limit"], registry=r)
        self.mail_failures = Counter("heartify_mail_failures", "Mails that failed to send", ["kind"], registry=r)
        self.worker_start_time.set_to_current_time()

    @_never_fails
    def answered(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.request_duration.labels(route).observe(seconds)

    @_never_fails
    def refused(self, status: int) -> None:
        """An answer the server gave itself (``connections.Server``), before any route."""
        self.requests.labels(REFUSED, str(status)).inc()

    @_never_fails
    def limited(self, limit: str) -> None:
        self.rate_limited.labels(limit=limit).inc()

    @_never_fails
    def mail_failure(self, kind: str) -> None:
        self.mail_failures.labels(kind=kind).inc()

    @_never_fails
    def pending_mails(self, count: int) -> None:
        self.outbox_pending.set(count)

    @_never_fails
    def model(self, version: int, precision: str, sha256: str) -> None:
        self.model_info.labels(str(version), precision, sha256).set(1)

    @_never_fails
    def inference(self, windows: int, seconds: float, queued: int) -> None:
        """The batcher's observer: one model run of ``windows``, ``queued`` requests still waiting."""
        self.batch_size.observe(windows)
        self.inference_duration.observe(seconds)
        self.queue_depth.set(queued)


class RequestMetrics:
    """Falcon middleware: counts every response by route template (never the raw path) and status."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.perf_counter) -> None:
        self._metrics = metrics
        self._clock = clock

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.metrics_start = self._clock()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        route = req.uri_template if resource is not None and req.uri_template else UNMATCHED
        now = self._clock()
        self._metrics.answered(route, resp.status_code, now - req.context.get("metrics_start", now))


class Exposition:
    """``GET /metrics``: the Prometheus text format, no API key.

    A page is served for up to ``max_age_s`` to every scrape: it reads and merges every process's
    files, and a client that asked for it from many connections (no key needed) slowed everyone
    else's windows; scrapers come seconds apart, and one at a time makes the page meanwhile."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic, max_age_s: float = 1.0) -> None:
        self._metrics = metrics
        self._clock = clock
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._page: tuple[float, bytes] | None = None  # when it was made, and the page

    def _latest(self) -> bytes:
        with self._lock:
            if self._page is None or self._clock() - self._page[0] >= self._max_age_s:
                page = generate_latest(exposition_registry(self._metrics.registry))
                self._page = (self._clock(), page)  # from when it is made: scrapes queued meanwhile take it
            return self._page[1]

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            data = self._latest()
        except MetricsUnavailable as exc:
            log.error("A scrape got 503: %s", exc)
            resp.status, resp.media = 503, {"error": UNAVAILABLE}
            return
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = data

    on_head = on_get  # as on METRICS_PORT and the health checks; Falcon drops the body


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """prometheus-client's threaded server, bounded: at most ``connections`` at once (more are
    closed unanswered), ``idle_s`` of silence and ``deadline_s`` in all on each. Unbounded, a
    thousand idle connections took every descriptor of the process, and the API's port stopped
    accepting."""

    daemon_threads = True

    def __init__(self, address: tuple, connections: int, idle_s: float, deadline_s: float) -> None:
        self._slots = threading.BoundedSemaphore(connections)
        self._idle_s = idle_s
        self._deadline_s = deadline_s
        super().__init__(address, _QuietHandler)

    def process_request(self, request: socket.socket, client_address: object) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            request.settimeout(self._idle_s)
            super().process_request(request, client_address)  # its thread gives the slot back
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:
        """ThreadingMixIn's, with the slot given back before the connection closes (a client
        that sees the close may connect again at once), and a deadline: a client that trickles
        a byte at a time is never idle."""
        deadline = threading.Timer(self._deadline_s, _cut, (request,))
        deadline.daemon = True
        try:
            deadline.start()  # inside: a thread that cannot start must not keep the slot
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            deadline.cancel()
            self._slots.release()
            self.shutdown_request(request)

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("Metrics request from %s failed", client_address, exc_info=True)  # timed out, hung up


def _cut(request: socket.socket) -> None:
    with contextlib.suppress(OSError):
        request.shutdown(socket.SHUT_RDWR)


class _QuietHandler(WSGIRequestHandler):
    # The answers the handler gives itself (a head too large, a bad request line) in the JSON of
    # the API's, not as an HTML page.
    error_message_format = '{"error":"%(code)d %(message)s"}'
    error_content_type = "application/json"

    def log_message(self, format: str, *args: object) -> None:
        """No line per scrape."""

    def end_headers(self) -> None:
        """For the handler's own answers (the app's get theirs in ``_only_metrics``)."""
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()


def _only_metrics(app: Callable) -> Callable:
    """prometheus-client's app answers every path, and other methods than GET in plain text; the
    port serves ``GET /metrics`` (and HEAD, as the API's probes do), and the rest get the JSON
    404 or 405 of the API. Every answer is ``nosniff``, as the API's are."""

    def only(environ: dict, start_response: Callable) -> list[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            return _json_error(start_response, "404 Not Found")
        method = environ.get("REQUEST_METHOD")
        if method not in ("GET", "HEAD", "OPTIONS"):
            return _json_error(start_response, "405 Method Not Allowed", (("Allow", "GET, HEAD, OPTIONS"),))

        def nosniff(status: str, headers: list[tuple[str, str]], *exc_info: object) -> Callable:
            return start_response(status, [*headers, ("X-Content-Type-Options", "nosniff")], *exc_info)

        try:
            body = app({**environ, "REQUEST_METHOD": "GET"} if method == "HEAD" else environ, nosniff)
        except MetricsUnavailable as exc:
            log.error("A scrape got 503: %s", exc)
            body = _json_error(start_response, "503 Service Unavailable", message=UNAVAILABLE)
        return [] if method == "HEAD" else body

    return only


def _json_error(
    start_response: Callable, status: str, headers: tuple[tuple[str, str], ...] = (), message: str | None = None
) -> list[bytes]:
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("X-Content-Type-Options", "nosniff"),
            ("Cache-Control", "no-store"),
            *headers,
        ],
    )
    return [b'{"error":"%s"}' % (message or status).encode()]


class MetricsPort:
    """``/metrics`` on ``METRICS_PORT``, in a thread of its own."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        connections: int = METRICS_CONNECTIONS,
        idle_s: float = 10.0,
        deadline_s: float = 30.0,
    ) -> None:
        self._host = host
        self._port = port
        self._app = _only_metrics(make_wsgi_app(registry))
        self._bounds = (connections, idle_s, deadline_s)
        self._httpd: _MetricsServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsPort:
        """Binds the port (``OSError`` if it cannot) and serves it."""
        family, _, _, _, address = socket.getaddrinfo(
            self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        server_class = type("MetricsServer", (_MetricsServer,), {"address_family": family})
        self._httpd = server_class(address, *self._bounds)
        self._httpd.set_app(self._app)
        thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-port", daemon=True)
        thread.start()
        self._thread = thread  # only once it serves: shutdown() would wait forever for a loop never begun
        log.info("Metrics on http://%s:%s/metrics", self._host, self._port)
        return self

    def close(self) -> None:
        if self._httpd is None:
            return
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
        self._httpd.server_close()
