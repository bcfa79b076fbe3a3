"""The WSGI application: routes and error mapping over injected collaborators (JSON: ``codec``).

``create_app`` only wires; what the collaborators are (a loaded model, a database, a mail
worker) is decided by ``runtime`` in production and by the tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import falcon
import orjson

from service import codec, openapi, validation
from service.batcher import Batcher, ModelUnavailable
from service.codec import TooManyValues
from service.config import Config
from service.connections import CORS_EXPOSED, Routes
from service.contract import WINDOW
from service.database import UNAVAILABLE_ERRORS, DatabaseHealth, DatabaseUnavailable
from service.keys import VERIFY_PATH, BadToken, EmailTaken, InvalidKey, KeyService, NoActiveKey, Refused
from service.logs import CLIENT_GONE, loggable
from service.metrics import Exposition, Metrics, RequestMetrics
from service.middleware import ReleaseConnection, RequestContext, SecurityHeaders, random_id
from service.parsing import Refusal, UploadGate
from service.ratelimit import RateLimited
from service.resources import (
    BATCH_WAIT_S,
    BINARY,
    MISSING_KEY,
    Denoising,
    Document,
    Health,
    JsonBody,
    KeyRequest,
    Readiness,
    Recording,
    Verification,
)
from service.store import Store
from service.turns import BUSY_BATCHES, BUSY_RETRY_AFTER_S, Busy, ClientGone, Turns
from service.validation import ValidationError

log = logging.getLogger(__name__)

# Seconds a client is asked to wait when the database is away; the probe tries every second.
DATABASE_RETRY_AFTER_S = 5
DATABASE_AWAY = "Service temporarily unavailable: the database does not answer. Try again later."
RECORD = "/api/v1/denoising/record"
WINDOW_ROUTES = ("/api/v1/denoising", "/api/v1/denoising/batch")
KEY_ROUTES = ("/api/v1/api-keys/generation", "/api/v1/api-keys/deactivation")
# An email address in JSON, with room to spare; and the most the routes that take no body (and
# unknown paths) read before they answer 404 or 405.
SMALL_BODY_BYTES = 1 << 14
_REFUSAL_STATUS = {InvalidKey: 401, EmailTaken: 409, NoActiveKey: 404, BadToken: 400}


@dataclass(frozen=True)
class Deps:
    config: Config
    keys: KeyService
    store: Store
    batcher: Batcher  # closed: the model is gone, denoising answers 503
    model_version: int
    metrics: Metrics | None = None  # None: METRICS=off, no /metrics and nothing counted
    clock: Callable[[], float] = time.perf_counter  # times requests for the access log and metrics
    new_id: Callable[[], str] = random_id  # a request's id when the client gives none


def body_limits(config: Config) -> dict[str, int]:
    """The largest body each route reads, by path ("" for every route not named), or by path
    and media type where they differ. waitress refuses a larger one before reading it
    (``parsing.Request``): on a route that takes an email address, or none, nobody can make
    the service spool an hour's recording to disk, or wait for its key's verdict, before the
    app sees it. The resources check the same limits on what they read."""
    limits = {
        "": SMALL_BODY_BYTES,
        RECORD: config.record_body_bytes(binary=False),
        f"{RECORD} {BINARY}": config.record_body_bytes(binary=True),
    }
    return limits | dict.fromkeys(WINDOW_ROUTES, config.max_body_bytes)


def upload_gate(keys: KeyService, release: Callable[[], None]) -> UploadGate:
    """Judges a body that waitress would spool to disk (a whole recording, or a large batch) by
    its key, before waitress reads it (``parsing.UploadGate``): with no key, or one that is
    not active, or with the database away and the key not known here, it gets the answer the
    route would give, at once, instead of after the whole upload; nothing is spooled for it.
    The key's rate is left to the route, which takes from it once the body has come."""

    def refusal(key: str | None) -> Refusal | None:
        if not key:
            return Refusal(401, "Unauthorized", MISSING_KEY)
        try:
            keys.key_id(key)
        except InvalidKey as exc:
            return Refusal(401, "Unauthorized", str(exc))
        except DatabaseUnavailable:
            return Refusal(503, "Service Unavailable", DATABASE_AWAY, (("Retry-After", str(DATABASE_RETRY_AFTER_S)),))
        finally:
            release()  # the gate's thread holds no pooled connection between uploads
        return None

    return refusal


def server_rules(deps: Deps) -> Routes:
    """What waitress must know of the routes before the app sees a request
    (``connections.create_server``): each route's body limit, which bodies take an upload place
    (a whole recording's), the gate that judges large uploads by their key, and where the
    server's own answers are counted."""
    rules = Routes(body_limits(deps.config), deps.config.max_body_bytes, upload_gate(deps.keys, deps.store.release))
    return rules if deps.metrics is None else replace(rules, refused=deps.metrics.refused)


def create_app(deps: Deps) -> falcon.App:
    app = falcon.App(middleware=_middleware(deps))
    _use_json(app)
    _map_errors(app, deps)
    _add_routes(app, deps)
    return app


def _middleware(deps: Deps) -> list[object]:
    """Outermost first: the request's id and access line, its metrics, CORS, the security
    headers, and the database connection handed back."""
    config = deps.config
    middleware: list[object] = [RequestContext(config.trusted_proxies, deps.clock, deps.new_id)]
    if deps.metrics is not None:
        middleware.append(RequestMetrics(deps.metrics, deps.clock))
    if config.cors_origins:
        middleware.append(falcon.CORSMiddleware(allow_origins=config.cors_origins, expose_headers=list(CORS_EXPOSED)))
    return [*middleware, SecurityHeaders(cors=bool(config.cors_origins)), ReleaseConnection(deps.store.release)]


def _use_json(app: falcon.App) -> None:
    app.resp_options.media_handlers[falcon.MEDIA_JSON] = codec.response_handler()


def _map_errors(app: falcon.App, deps: Deps) -> None:
    app.set_error_serializer(_serialize_error)
    app.add_error_handler(Exception, _unexpected)  # the most specific handler wins: this one is last
    app.add_error_handler(ValidationError, _validation_error)
    app.add_error_handler(Refused, _refused)
    app.add_error_handler(ModelUnavailable, _answer(falcon.HTTP_503))
    app.add_error_handler(DatabaseUnavailable, _database_unavailable)
    app.add_error_handler(RateLimited, partial(_rate_limited, deps.metrics))
    app.add_error_handler(TooManyValues, _answer(falcon.HTTP_413))
    app.add_error_handler(Busy, _answer(falcon.HTTP_503, BUSY_RETRY_AFTER_S))
    app.add_error_handler(ClientGone, _client_gone)
    app.add_error_handler(UNAVAILABLE_ERRORS, partial(_database_error, deps.store.health))


def _add_routes(app: falcon.App, deps: Deps) -> None:
    """The window routes read up to twice the numbers of a full batch: a window at another rate,
    a batch sent to the one-window route or one window too many gets the 400 that says so."""
    config, keys, batcher, version = deps.config, deps.keys, deps.batcher, deps.model_version
    windows = config.max_batch_windows
    body = JsonBody(config.max_body_bytes, 2 * windows * WINDOW + 16)
    one = Denoising(keys, batcher, version, body, validation.ecg_signal, lambda out: {"denoised_signal": out[0]})
    batch = Denoising(
        keys,
        batcher,
        version,
        body,
        partial(validation.ecg_signals, limit=windows),
        lambda out: {"denoised_signals": out},
        Turns(config.batch_turns, config.batch_turns, BATCH_WAIT_S, BUSY_BATCHES),
        turn_above=max(8, config.batch_max_size),  # more than one model run, and than a few windows
    )
    for route, resource in zip(WINDOW_ROUTES, (one, batch), strict=True):
        app.add_route(route, resource)
    app.add_route(RECORD, Recording(keys, batcher, version, config))
    for route, action in zip(KEY_ROUTES, (keys.request_key, keys.request_deactivation), strict=True):
        app.add_route(route, KeyRequest(action, JsonBody(SMALL_BODY_BYTES, 16)))
    app.add_route(VERIFY_PATH, Verification(keys))
    app.add_route("/healthz", Health())
    app.add_route("/readyz", Readiness(batcher, deps.store))
    metrics_here = deps.metrics is not None and not config.metrics_port
    document = openapi.document(config.max_batch_windows, config.max_record_seconds, metrics_here)
    app.add_route("/openapi.json", Document(document))
    if metrics_here:
        app.add_route("/metrics", Exposition(deps.metrics, deps.clock))


def _unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params: dict) -> None:
    """A bug: logged with its traceback, the path and the request's id, and never the query
    string, which may hold a verification token (Falcon's own handler logs the whole URL)."""
    log.error(
        "Unexpected error on %s %s (id=%s)",
        loggable(req.method),
        loggable(req.path),
        getattr(req.context, "request_id", "-"),
        exc_info=exc,
    )
    resp.status = falcon.HTTP_500
    resp.media = {"error": "Internal server error"}


def _serialize_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    """Every error body has the contract's shape ``{"error": "…"}``, Falcon's own ones included."""
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps({"error": exc.description or exc.title})


def _validation_error(req: falcon.Request, resp: falcon.Response, exc: ValidationError, params: dict) -> None:
    resp.status = falcon.code_to_http_status(exc.status)
    resp.media = exc.body


def _refused(req: falcon.Request, resp: falcon.Response, exc: Refused, params: dict) -> None:
    resp.status = next(status for kind, status in _REFUSAL_STATUS.items() if isinstance(exc, kind))
    resp.media = {"error": str(exc)}


def _answer(status: str, retry_after_s: int | None = None) -> Callable[..., None]:
    """A handler that answers ``status`` with the exception's message as the error."""

    def handle(req: falcon.Request, resp: falcon.Response, exc: Exception, params: dict) -> None:
        resp.status = status
        if retry_after_s is not None:
            resp.set_header("Retry-After", str(retry_after_s))
        resp.media = {"error": str(exc)}

    return handle


def _client_gone(req: falcon.Request, resp: falcon.Response, exc: ClientGone, params: dict) -> None:
    """Nobody reads it; the access log and the metrics say what happened."""
    resp.status = f"{CLIENT_GONE} Client Closed Request"
    resp.media = {"error": "The client closed the connection"}


def _database_unavailable(req: falcon.Request, resp: falcon.Response, exc: Exception, params: dict) -> None:
    resp.status = falcon.HTTP_503
    resp.set_header("Retry-After", str(DATABASE_RETRY_AFTER_S))
    resp.media = {"error": DATABASE_AWAY}


def _database_error(
    health: DatabaseHealth, req: falcon.Request, resp: falcon.Response, exc: Exception, params: dict
) -> None:
    """A driver error that reached the app without passing the store's guard, which sees every
    statement, commit and rollback (closing a connection, say): the same 503, and the outage is
    known. A safety net: none is known to get here."""
    health.failed(exc)
    _database_unavailable(req, resp, exc, params)


def _rate_limited(
    metrics: Metrics | None, req: falcon.Request, resp: falcon.Response, exc: RateLimited, params: dict
) -> None:
    if metrics is not None:
        metrics.limited(exc.limit)
    resp.status = falcon.HTTP_429
    resp.set_header("Retry-After", str(exc.retry_after_s))
    resp.media = {"error": str(exc)}
