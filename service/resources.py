"""HTTP resources: thin adapters from requests to the key flows, the batcher and the store.

Errors travel as exceptions (``ValidationError``, ``keys.Refused``, ``ModelUnavailable``) and
become JSON ``{"error": …}`` responses in the handlers that ``app`` registers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import falcon
import numpy as np

from service import codec, pages, recording, validation
from service.batcher import Batcher
from service.config import Config
from service.contract import WINDOW
from service.keys import KeyService
from service.store import Store
from service.turns import Turns

SENT = "Verification email sent. Please check your inbox."
MISSING_KEY = "Missing x-api-key header"
BINARY = "application/octet-stream"
RECORD_WAIT_S = 30.0  # how long a recording waits for a turn (RECORD_CONCURRENCY) before its 503
BATCH_WAIT_S = 10.0  # how long a large batch request waits for a turn before its 503


@dataclass(frozen=True)
class JsonBody:
    """What a route reads as JSON: at most ``max_bytes``, holding at most ``max_values`` numbers
    (and an array per window of them), counted before it is parsed (``codec``): within the
    bytes, short numbers or nested arrays would cost many times the route's need once parsed."""

    max_bytes: int
    max_values: int

    def read(self, req: falcon.Request) -> Any:
        """The parsed body, or None when it is missing or not JSON (the contract's 400 case).

        JSON only: ``application/json`` or a ``+json`` type (as the old Flask service read
        them), or none; media types are case-insensitive (RFC 9110). The text is UTF-8, with or
        without a byte order mark, or UTF-16 or UTF-32, told apart as the old service's
        ``json.loads`` told them (RFC 8259 asks for UTF-8, and clients of the old API sent others).
        """
        _check_length(req, self.max_bytes)
        media = codec.media_type(req.content_type or falcon.MEDIA_JSON)
        if not (media == falcon.MEDIA_JSON or (media.startswith("application/") and media.endswith("+json"))):
            return None
        data: bytes | str = req.bounded_stream.read()
        if not data:
            return None
        encoding = json.detect_encoding(data)
        if encoding != "utf-8":  # orjson parses UTF-8 as it came: a decoded copy would be one more body in memory
            # Lone surrogates pass as they did for the old service, in small bodies only (``codec.loads``).
            errors = "surrogatepass" if len(data) <= codec.SMALL_BODY else "strict"
            try:
                data = data.decode(encoding, errors)
            except UnicodeDecodeError:
                return None
        try:
            return codec.loads(data, self.max_values, self.max_values // WINDOW + 16)
        except ValueError:  # bytes that are not UTF-8 too
            return None


def authenticate(keys: KeyService, req: falcon.Request) -> int:
    """The key's id; a 401 without one, ``InvalidKey`` (401) for a key that is not active, and
    ``RateLimited`` (429) past the key's rate."""
    key = req.get_header("x-api-key")
    if not key:
        raise falcon.HTTPUnauthorized(description=MISSING_KEY)
    return keys.authenticate(key)


def _query(req: falcon.Request, name: str, meaning: Callable[[str], object] = str) -> str | None:
    """A query parameter that takes one value: given more than once with different meanings, it is
    a 400 (Falcon would keep the last one, and the others would be ignored silently)."""
    values = req.get_param_as_list(name) or []
    first = meaning(values[0]) if values else None
    other = next((value for value in values[1:] if meaning(value) != first), None)
    if other is not None:
        raise validation.ValidationError(
            f"{name} given more than once, differently: {validation.quoted(values[0])} and {validation.quoted(other)}"
        )
    return values[0] if values else None


def _client_gone(req: falcon.Request) -> Callable[[], bool]:
    """Tells whether the client has hung up: waitress's loop reads one request ahead."""
    return req.env.get("waitress.client_disconnected", lambda: False)


def _check_length(req: falcon.Request, limit: int) -> None:
    if (req.content_length or 0) > limit:
        raise falcon.HTTPContentTooLarge(description=f"Request body too large (limit {limit} bytes)")


class Denoising:
    """``POST /api/v1/denoising`` and ``/batch``: key, body, one trip through the batcher. A
    request of more than ``turn_above`` windows needs one of ``turns``: each holds a web thread
    for as long as its windows take, and a client that kept dozens of 64-window batches in
    flight held every thread, so that other clients' windows waited seconds for one."""

    def __init__(
        self,
        keys: KeyService,
        batcher: Batcher,
        model_version: int,
        body: JsonBody,
        parse: Callable[[Any], np.ndarray],
        render: Callable[[np.ndarray], dict[str, Any]],
        turns: Turns | None = None,
        turn_above: int = 0,
    ) -> None:
        self._keys = keys
        self._batcher = batcher
        self._model_version = model_version
        self._body = body
        self._parse = parse
        self._render = render
        self._turns = turns
        self._turn_above = turn_above

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        key_id = authenticate(self._keys, req)
        windows = self._parse(self._body.read(req))
        input_units = validation.input_units(_query(req, "units"))
        long = self._turns is not None and len(windows) > self._turn_above
        with self._turns.turn(_client_gone(req)) if long else nullcontext():
            denoised = self._batcher.denoise(windows, input_units)
        self._keys.used(key_id)
        resp.media = {"modelVersion": self._model_version, **self._render(denoised)}


class Recording:
    """``POST /api/v1/denoising/record``: a whole recording, as JSON or as raw float32, answered in kind."""

    def __init__(self, keys: KeyService, batcher: Batcher, model_version: int, config: Config) -> None:
        self._keys = keys
        self._batcher = batcher
        self._model_version = model_version
        self._max_seconds = config.max_record_seconds
        self._limits = {binary: config.record_body_bytes(binary) for binary in (False, True)}
        self._json = JsonBody(self._limits[False], config.max_record_samples + 16)
        # A recording's memory is taken while it is read and denoised; a request waits for a turn
        # with its body still in waitress's buffer (spooled to disk past parsing.SPOOL_BYTES).
        at_once = config.record_concurrency
        self._turns = Turns(at_once, config.recording_threads - at_once, RECORD_WAIT_S)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        key_id = authenticate(self._keys, req)
        validation.identity_encoding(req.get_header("Content-Encoding"))
        binary = codec.media_type(req.content_type) == BINARY
        _check_length(req, self._limits[binary])  # a refusal that costs nothing waits for no turn
        with self._turns.turn(_client_gone(req)):
            self._denoise(req, resp, key_id, binary)

    def _denoise(self, req: falcon.Request, resp: falcon.Response, key_id: int, binary: bool) -> None:
        body = req.bounded_stream.read() if binary else self._json.read(req)
        rate_param = _query(req, "sampling_rate", validation.rate_meaning)  # the body's faults come first
        if binary:
            samples, rate = validation.binary_record(body, rate_param, self._max_seconds)
        else:
            samples, rate = validation.record(body, self._max_seconds, rate_param)
        del body  # the parsed list, the request's largest object, is gone before the model runs
        clean = recording.denoise(samples, rate, partial(self._batcher.denoise_many, input_units=True))
        self._keys.used(key_id)
        if binary:  # float32 in, float32 out
            resp.content_type = BINARY
            resp.data = recording.to_float32(clean).tobytes()
            return
        resp.media = {
            "modelVersion": self._model_version,
            "sampling_rate": validation.as_written(rate),
            "denoised_signal": recording.compact(clean),
        }


class KeyRequest:
    """``POST /api/v1/api-keys/generation`` and ``/deactivation``: both mail a link for an email."""

    def __init__(self, action: Callable[[str, str], None], body: JsonBody) -> None:
        self._action = action
        self._body = body

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        email = validation.email(self._body.read(req))
        self._action(email, req.context.client)
        resp.media = {"message": SENT, "email": email}


class Verification:
    """``GET /api/v1/api-keys/verify?token=…``: the link in the mails; answers with a page."""

    def __init__(self, keys: KeyService) -> None:
        self._keys = keys

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        tokens = set(req.get_param_as_list("token") or ())
        # Several, differently: not a link the service sent (Falcon would take the last one).
        kind, email = self._keys.verify(tokens.pop() if len(tokens) == 1 else None)
        resp.content_type = falcon.MEDIA_HTML
        resp.text = pages.verified(kind, email)


class Health:
    """``GET /healthz``: the process answers."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}

    on_head = on_get  # what uptime monitors and some load balancers send; Falcon drops the body


class Readiness:
    """``GET /readyz``: 200 only while the model is loaded and the database answers."""

    def __init__(self, batcher: Batcher, store: Store) -> None:
        self._batcher = batcher
        self._store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        model = self._batcher.ready
        database = self._store.ping()
        ready = model and database
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.media = {"status": "ready" if ready else "not ready", "model": model, "database": database}

    on_head = on_get


class Document:
    """Serves a prebuilt JSON document (the OpenAPI description)."""

    cacheable = True  # the same for everyone until the service restarts

    def __init__(self, document: dict[str, Any]) -> None:
        self._document = document

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self._document

    on_head = on_get
