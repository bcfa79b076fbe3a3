"""The JSON of request and response bodies: orjson, as lenient as the old service where old
clients need it, and bounded before a request's body is parsed.

A body's size says little about what it costs once parsed. The record route's limit is sized for
a long recording written with long numbers; within it, "0,0,0…" packs twenty times as many
values, "[[[[…]]]]" a list every byte, and an object millions of keys, each costing tens of
bytes as Python objects: gigabytes for one request. So the commas, the opening brackets and the
quotes are counted first.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson
from falcon.media import JSONHandler

# Bodies up to this many characters are parsed uncounted: whatever they hold costs at most a few
# MB once parsed, and the counts would be a few passes over every window request's body.
SMALL_BODY = 1 << 16
HUGE = 10**400  # stands in for every integer with more digits (``_integer``): beyond float64 all
HUGE_DIGITS = len(str(HUGE))  # JSON integers have no leading zeros: more digits are larger


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header, without parameters; case-insensitive (RFC 9110)."""
    return (content_type or "").split(";")[0].strip().lower()


class TooManyValues(Exception):
    """A JSON body with more numbers, or more arrays and objects, than any route takes."""

    def __init__(self, limit: int, what: str) -> None:
        super().__init__(f"Request body too large: more than {limit} {what}")


def loads(text: str | bytes, max_values: int, max_containers: int) -> Any:
    """orjson, falling back to the stdlib for what the old Flask service also accepted.

    Old clients may send ``NaN``/``Infinity`` literals, and integers beyond 64 bits; they must
    reach validation and get the 400 that names the value's index, not the "not JSON" 400.
    ``text``: decoded, or UTF-8 bytes (the stdlib decodes them as the old service did, lone
    surrogates included, where orjson refuses them; but only in bodies up to ``SMALL_BODY``:
    that decoding is slow and holds the GIL, and a recording's body of them held every thread of
    its worker for seconds). In larger bodies the stdlib hands each number
    to a Python function, which lets other threads run between numbers: its scanner holds the
    GIL otherwise, and one recording with a ``NaN`` in it froze its worker, health checks
    included, for the whole parse.

    A body (larger than ``SMALL_BODY``) with ``max_values`` commas or more (so more values), or
    more than ``max_containers`` arrays and objects, or as many strings (keys included), is
    refused before it is parsed.
    """
    if len(text) > SMALL_BODY:
        comma, bracket, brace, quote = (",", "[", "{", '"') if isinstance(text, str) else (b",", b"[", b"{", b'"')
        if text.count(comma) >= max_values:
            raise TooManyValues(max_values, "values")
        if text.count(bracket) + text.count(brace) > max_containers:
            raise TooManyValues(max_containers, "arrays and objects")
        if text.count(quote) > 2 * max_containers:  # an escaped quote counts too: no body needs one
            raise TooManyValues(max_containers, "strings")
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        hooks: dict[str, Callable[[str], Any]] = {"parse_int": _integer}
        if len(text) > SMALL_BODY:
            if isinstance(text, bytes):
                text = text.decode()  # strict: a UnicodeDecodeError (a ValueError) if not UTF-8 proper
            hooks["parse_float"] = _yielding_float
        try:
            return json.loads(text, **hooks)
        except RecursionError:  # absurdly deep nesting is just malformed JSON
            raise ValueError("JSON nested too deeply") from None


def response_handler() -> JSONHandler:
    """Falcon's JSON media handler for answers; NumPy arrays serialize as lists. (Requests are
    read by each route with its own limits: ``resources.JsonBody``.)"""
    return JSONHandler(dumps=partial(orjson.dumps, option=orjson.OPT_SERIALIZE_NUMPY))


def _yielding_float(digits: str) -> float:
    """``float``, as a Python function: the interpreter can switch threads on each call, where
    the builtin, called from the scanner's C code, never gives the GIL up."""
    return float(digits)


def _integer(digits: str) -> int:
    """An integer of more digits than ``HUGE`` is beyond every limit we have: ``HUGE`` stands in
    for it, with its sign, unconverted (the conversion takes time quadratic in the digits, and
    Python refuses it past 4300)."""
    if len(digits) <= HUGE_DIGITS:
        return int(digits)
    return -HUGE if digits.startswith("-") else HUGE
