"""The JSON of request and response bodies: orjson, as lenient as the old service where old
clients need it, and bounded before a request's body is parsed.

A body's size says little about what it costs once parsed. The record route's limit is sized for
a long recording written with long numbers; within it, "0,0,0…" packs twenty times as many
values, and "[[[[…]]]]" a list every byte, each costing tens of bytes as Python objects:
gigabytes for one request. So the commas and the opening brackets are counted first.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from typing import Any

import orjson
from falcon.media import JSONHandler

# Bodies up to this many characters are parsed uncounted: whatever they hold costs at most a few
# MB once parsed, and the counts would be a few passes over every window request's body.
SMALL_BODY = 1 << 16
HUGE = 10**400  # stands in for an integer too long to convert (``_integer``)


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
    surrogates included, where orjson refuses them).

    A body (larger than ``SMALL_BODY``) with ``max_values`` commas or more (so more values), or
    more than ``max_containers`` arrays and objects, is refused before it is parsed.
    """
    if len(text) > SMALL_BODY:
        comma, bracket, brace = (",", "[", "{") if isinstance(text, str) else (b",", b"[", b"{")
        if text.count(comma) >= max_values:
            raise TooManyValues(max_values, "values")
        if text.count(bracket) + text.count(brace) > max_containers:
            raise TooManyValues(max_containers, "arrays and objects")
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        try:
            return json.loads(text, parse_int=_integer)
        except RecursionError:  # absurdly deep nesting is just malformed JSON
            raise ValueError("JSON nested too deeply") from None


def response_handler() -> JSONHandler:
    """Falcon's JSON media handler for answers; NumPy arrays serialize as lists. (Requests are
    read by each route with its own limits: ``resources.JsonBody``.)"""
    return JSONHandler(dumps=partial(orjson.dumps, option=orjson.OPT_SERIALIZE_NUMPY))


def _integer(digits: str) -> int:
    """An integer too long for Python to convert (a guard against quadratic time) is beyond every
    limit we have: any one beyond them stands in for it, with its sign."""
    limit = sys.get_int_max_str_digits()  # 0: no limit
    if not limit or len(digits) <= limit:
        return int(digits)
    return -HUGE if digits.startswith("-") else HUGE
