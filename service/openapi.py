"""The OpenAPI 3.1 description served at ``/openapi.json``.

A test compares its paths and methods with the app's routes, so it cannot silently drift.
"""

from __future__ import annotations

import math
from typing import Any

from service.contract import SAMPLING_RATE_HZ, WINDOW
from service.keys import EmailTaken, InvalidKey, NoActiveKey
from service.messages import LINK_TTL
from service.recording import MAX_RATE_HZ, MIN_RATE_HZ, MIN_SECONDS
from service.resources import BATCH_WAIT_S, BINARY, MISSING_KEY, RECORD_WAIT_S
from service.turns import BUSY, BUSY_BATCHES
from service.validation import EMAIL_PATTERN, MAX_ABS, MAX_EMAIL

_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _response(description: str, schema: str, media: str = _JSON) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": _ref(schema)}}}


def _error(description: str) -> dict[str, Any]:
    return _response(description, "Error")


def _body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {_JSON: {"schema": _ref(schema)}}}


_UNITS = {
    "name": "units",
    "in": "query",
    "required": False,
    "description": "`normalized` (default, as the original service): the model's output for the z-scored "
    "window. `input`: the output mapped back to the input's units, `output·σ + μ`.",
    "schema": {"type": "string", "enum": ["normalized", "input"], "default": "normalized"},
}

_UNAUTHORIZED = _error(f"`{MISSING_KEY}` or `{InvalidKey.message}`")
_DENOISE_ERRORS = {
    "400": _error(
        "Body missing or not JSON, a missing field, wrong length, or an element that is not a finite "
        "number (the message names it)"
    ),
    "401": _UNAUTHORIZED,
    "413": _error("Request body too large: over the byte limit, or more numbers (or arrays) than the route takes"),
    "429": _error("`Too many requests for this API key. Slow down.` (with `Retry-After`)"),
    "503": _error("`Model not loaded`, or the database does not answer (with `Retry-After`)"),
}


def _record(max_seconds: float) -> dict[str, Any]:
    float32 = {"type": "string", "format": "binary", "description": "little-endian float32 samples"}
    return {
        "post": {
            "summary": "Denoise a whole recording of any length and sampling rate",
            "description": f"{MIN_SECONDS:g} s to {max_seconds:g} s of one lead at {MIN_RATE_HZ:g}–{MAX_RATE_HZ:g} Hz. "
            "It is resampled to 130 Hz, cut into windows overlapping by half, denoised, cross-faded and "
            "resampled back: the answer has as many samples as the request, in the input's units, with the "
            "baseline removed (the model's target is the 0.5 Hz high-passed ECG). A JSON body answers in "
            "JSON; an `application/octet-stream` body (float32, with `?sampling_rate=`) answers in float32.",
            "tags": ["Denoising"],
            "security": [{"apiKey": []}],
            "parameters": [
                {
                    "name": "sampling_rate",
                    "in": "query",
                    "required": False,
                    "description": "Hz; required with a binary body. A JSON body may carry it instead "
                    "(given both ways, they must agree); with neither, 130",
                    "schema": {"type": "number", "minimum": MIN_RATE_HZ, "maximum": MAX_RATE_HZ},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {_JSON: {"schema": _ref("RecordRequest")}, BINARY: {"schema": float32}},
            },
            "responses": {
                "200": {
                    "description": "The denoised recording, as long as the request and in its form",
                    "content": {_JSON: {"schema": _ref("RecordResponse")}, BINARY: {"schema": float32}},
                },
                "400": _error(
                    f"Body missing or not JSON, shorter than {MIN_SECONDS:g} s, a bad or missing rate, or a sample that is not a "
                    "finite number (the message names it)"
                ),
                "401": _UNAUTHORIZED,
                "413": _error(
                    f"Longer than {max_seconds:g} s, a body over the limit that follows from it, or more "
                    "numbers (or arrays and objects) than a recording that long can hold"
                ),
                "415": _error("A `Content-Encoding` other than `identity`: the body must come uncompressed"),
                "429": _DENOISE_ERRORS["429"],
                "503": _error(
                    f"`Model not loaded`; the database does not answer; or `{BUSY}` when no turn came within "
                    f"{RECORD_WAIT_S:g} s (`RECORD_CONCURRENCY`), or at once when half of the "
                    "worker's threads already run or wait for recordings, or from the headers when as many large "
                    "bodies are being received (all with `Retry-After`, but `Model not loaded`)"
                ),
            },
        }
    }


def _key_request(summary: str, conflict: tuple[str, str]) -> dict[str, Any]:
    status, description = conflict
    return {
        "post": {
            "summary": summary,
            "tags": ["API keys"],
            "requestBody": _body("EmailRequest"),
            "responses": {
                "200": _response("Mail queued; it is retried until delivered", "MailSent"),
                "400": _error("`Missing required field: email` or `Invalid email format` (with a `reason`)"),
                status: _error(description),
                "413": _error("Request body too large"),
                "429": _error("Too many key mails for this address or from this client (with `Retry-After`)"),
                "503": _error("The database does not answer (with `Retry-After`)"),
            },
        }
    }


def _get_and_head(summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    """GET, and HEAD with the same status and no body (health checks, this document)."""
    return {
        "get": {"summary": summary, "tags": ["Operations"], "responses": responses},
        "head": {
            "summary": f"{summary} (status only)",
            "tags": ["Operations"],
            "responses": {status: {"description": r["description"]} for status, r in responses.items()},
        },
    }


_METRICS = _get_and_head(
    "Prometheus metrics of every worker, no API key",
    {
        "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
        "503": _error("The metrics folder was removed; the service makes it again"),
    },
)


def document(max_batch_windows: int, max_record_seconds: float, metrics: bool = False) -> dict[str, Any]:
    """``metrics``: the app serves ``/metrics`` on its API port."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Heartify Denoising API",
            "version": "1.0.0",
            "description": "Attention U-Net denoising of 10-second single-lead ECG windows; API keys by email.",
        },
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
            "schemas": _schemas(max_batch_windows, max_record_seconds),
        },
        "paths": _paths(max_batch_windows, max_record_seconds, metrics),
    }


def _schemas(max_batch_windows: int, max_record_seconds: float) -> dict[str, Any]:
    window = {
        "type": "array",
        "items": {"type": "number", "maximum": MAX_ABS, "minimum": -MAX_ABS},
        "minItems": WINDOW,
        "maxItems": WINDOW,
        "description": f"{WINDOW} finite numbers: 10 seconds of one ECG lead at 130 Hz",
    }
    # Outputs are unbounded: with ?units=input they are output·σ + μ, beyond MAX_ABS for inputs near it.
    denoised = {
        "type": "array",
        "items": {"type": "number"},
        "minItems": WINDOW,
        "maxItems": WINDOW,
        "description": f"{WINDOW} denoised values",
    }
    return {
        "Window": window,
        "DenoisedWindow": denoised,
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string"},
                "expected_format": {"type": "object"},
                "note": {"type": "string"},
                "reason": {"type": "string", "description": "why an email address was refused"},
            },
        },
        "DenoiseRequest": {
            "type": "object",
            "required": ["ecg_signal"],
            "properties": {"ecg_signal": _ref("Window")},
        },
        "DenoiseResponse": {
            "type": "object",
            "required": ["modelVersion", "denoised_signal"],
            "properties": {"modelVersion": {"type": "integer"}, "denoised_signal": _ref("DenoisedWindow")},
        },
        "BatchRequest": {
            "type": "object",
            "required": ["ecg_signals"],
            "properties": {
                "ecg_signals": {
                    "type": "array",
                    "items": _ref("Window"),
                    "minItems": 1,
                    "maxItems": max_batch_windows,
                }
            },
        },
        "BatchResponse": {
            "type": "object",
            "required": ["modelVersion", "denoised_signals"],
            "properties": {
                "modelVersion": {"type": "integer"},
                "denoised_signals": {"type": "array", "items": _ref("DenoisedWindow")},
            },
        },
        "RecordRequest": {
            "type": "object",
            "required": ["ecg_signal"],
            "properties": {
                # What some rate admits: 2 s at the lowest rate, the longest recording at
                # the highest (the service checks the rate's own, with a 400 or a 413).
                "ecg_signal": {
                    "type": "array",
                    "items": {"type": "number", "maximum": MAX_ABS, "minimum": -MAX_ABS},
                    "minItems": math.ceil(MIN_SECONDS * MIN_RATE_HZ),
                    "maxItems": math.floor(max_record_seconds * MAX_RATE_HZ),
                },
                "sampling_rate": {
                    "type": "number",
                    "minimum": MIN_RATE_HZ,
                    "maximum": MAX_RATE_HZ,
                    "default": SAMPLING_RATE_HZ,
                },
            },
        },
        "RecordResponse": {
            "type": "object",
            "required": ["modelVersion", "sampling_rate", "denoised_signal"],
            "properties": {
                "modelVersion": {"type": "integer"},
                "sampling_rate": {"type": "number"},
                "denoised_signal": {"type": "array", "items": {"type": "number"}},
            },
        },
        "EmailRequest": {
            "type": "object",
            "required": ["email"],
            "properties": {
                "email": {
                    "type": "string",
                    "format": "email",
                    "maxLength": MAX_EMAIL,
                    "pattern": EMAIL_PATTERN,
                    "description": "An address a mail can be sent to: ASCII, a public domain name "
                    "(no IP address, no special-use name such as `.local` or `.test`), no quoted "
                    "local part. The pattern admits a subset of what the service accepts.",
                }
            },
        },
        "MailSent": {
            "type": "object",
            "required": ["message", "email"],
            "properties": {"message": {"type": "string"}, "email": {"type": "string"}},
        },
        "Status": {
            "type": "object",
            "required": ["status"],
            "properties": {
                "status": {"type": "string"},
                "model": {"type": "boolean"},
                "database": {"type": "boolean"},
            },
        },
    }


def _paths(max_batch_windows: int, max_record_seconds: float, metrics: bool) -> dict[str, Any]:
    return {
        "/api/v1/denoising": {
            "post": {
                "summary": "Denoise one window",
                "tags": ["Denoising"],
                "security": [{"apiKey": []}],
                "parameters": [_UNITS],
                "requestBody": _body("DenoiseRequest"),
                "responses": {"200": _response("Denoised window", "DenoiseResponse"), **_DENOISE_ERRORS},
            }
        },
        "/api/v1/denoising/batch": {
            "post": {
                "summary": f"Denoise 1 to {max_batch_windows} windows in one request",
                "description": "Each window is validated as in `/api/v1/denoising`; errors name the window, "
                "e.g. `ecg_signals[3][17] must be a finite number (got null)`.",
                "tags": ["Denoising"],
                "security": [{"apiKey": []}],
                "parameters": [_UNITS],
                "requestBody": _body("BatchRequest"),
                "responses": {
                    "200": _response("Denoised windows, in order", "BatchResponse"),
                    **_DENOISE_ERRORS,
                    "503": _error(
                        f"`Model not loaded`; the database does not answer; or `{BUSY_BATCHES}` when a batch "
                        f"of more than `BATCH_MAX_SIZE` windows (8 at least) got no turn within {BATCH_WAIT_S:g} s, or at once "
                        "when as many wait (with `Retry-After`)"
                    ),
                },
            }
        },
        "/api/v1/denoising/record": _record(max_record_seconds),
        "/api/v1/api-keys/generation": _key_request(
            "Mail a link that creates an API key",
            ("409", EmailTaken.message),
        ),
        "/api/v1/api-keys/deactivation": _key_request(
            "Mail a link that deactivates the active API key",
            ("404", NoActiveKey.message),
        ),
        "/api/v1/api-keys/verify": {
            "get": {
                "summary": f"Follow a mailed link (single use, valid {LINK_TTL.total_seconds() / 3600:g} hours)",
                "tags": ["API keys"],
                "parameters": [
                    {
                        "name": "token",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "Key created and mailed, or key deactivated",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    "400": _error("`Invalid verification link`, `Invalid or expired token` or `Token has expired`"),
                    "503": _error("The database does not answer (with `Retry-After`)"),
                },
            }
        },
        "/healthz": _get_and_head("The process answers", {"200": _response("Alive", "Status")}),
        "/readyz": _get_and_head(
            "Model loaded and database reachable",
            {"200": _response("Ready", "Status"), "503": _response("Not ready", "Status")},
        ),
        "/openapi.json": _get_and_head(
            "This document", {"200": {"description": "OpenAPI 3.1", "content": {_JSON: {"schema": {"type": "object"}}}}}
        ),
        **({"/metrics": _METRICS} if metrics else {}),
    }
