"""Falcon middleware for what every response needs: a request id and an access-log line, the
security headers, and the pooled database connection handed back."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from collections.abc import Callable

import falcon

from service.clients import Network, client_address
from service.logs import log_access
from service.pages import PAGE_STYLE

# The pages have one inline <style>: allowed by its hash, nothing else may load or run.
PAGE_CSP = (
    "default-src 'none'; "
    f"style-src 'sha256-{base64.b64encode(hashlib.sha256(PAGE_STYLE.encode()).digest()).decode()}'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def random_id() -> str:
    """32 random hex digits, as a UUID4's hex, without building the UUID."""
    return os.urandom(16).hex()


class RequestContext:
    """First in, last out: gives each request an id and its client's address, and logs one line
    when the response is ready: method, path (never the query, which may hold a token), status,
    duration, id and client. Keys travel in a header and are never logged."""

    def __init__(
        self,
        trusted_proxies: tuple[Network, ...] = (),
        clock: Callable[[], float] = time.perf_counter,
        new_id: Callable[[], str] = random_id,
    ) -> None:
        self._proxies = trusted_proxies
        self._clock = clock
        self._new_id = new_id

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = self._clock()
        given = req.get_header("X-Request-ID")
        req.context.request_id = given if given and _REQUEST_ID.fullmatch(given) else self._new_id()
        req.context.client = client_address(req.remote_addr or "-", req.get_header("X-Forwarded-For"), self._proxies)
        resp.set_header("X-Request-ID", req.context.request_id)

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        started = getattr(req.context, "started", None)
        duration_ms = (self._clock() - started) * 1000 if started is not None else 0.0
        log_access(
            req.method,
            req.path,
            resp.status_code,
            duration_ms,
            getattr(req.context, "request_id", "-"),
            getattr(req.context, "client", "-"),
        )


class SecurityHeaders:
    """``nosniff`` everywhere; ``no-store`` unless a resource says its answers may be cached (its
    ``cacheable`` attribute): signals, keys, links and errors must not stay in a shared cache,
    and a route added later is safe by default. A strict policy on HTML pages. With CORS on,
    ``Vary: Origin``: the answer's ``Access-Control-Allow-Origin`` depends on the caller's origin,
    and a shared cache must not hand one origin's answer to another."""

    def __init__(self, cors: bool = False) -> None:
        self._cors = cors

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        resp.set_header("X-Content-Type-Options", "nosniff")
        if self._cors:
            resp.append_header("Vary", "Origin")
        if not getattr(resource, "cacheable", False):
            resp.set_header("Cache-Control", "no-store")
        if (resp.content_type or "").startswith(falcon.MEDIA_HTML):
            resp.set_header("Content-Security-Policy", PAGE_CSP)
            resp.set_header("X-Frame-Options", "DENY")


class ReleaseConnection:
    """Hands the request thread's pooled database connection back after every response."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        self._release()
