"""Request bodies and parameters → clean values, or a ``ValidationError`` carrying the 400 body.

Messages are the API contract's; new endpoints follow the same style and name the bad window or
element (``ecg_signals[3][17] must be a finite number (got null)``).
"""

from __future__ import annotations

import math
import re
import string
from typing import Any

import numpy as np
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

from service.contract import SAMPLING_RATE_HZ, WINDOW
from service.recording import MAX_RATE_HZ, MIN_RATE_HZ, MIN_SECONDS

# Values beyond this overflow the z-score (squares exceed float64) and would come back as NaN.
MAX_ABS = 1e100
WINDOW_NOTE = f"The model expects 10 seconds of ECG sampled at {SAMPLING_RATE_HZ} Hz: exactly {WINDOW} values."
UNITS = {"normalized": False, "input": True}
_NUMBERS = {float, int}
# Each digit can belong to one part only: "[0-9]+\.?[0-9]*" split a long run of digits every
# way before it gave up on the letter after it, and held the GIL (the worker's loop too) for
# seconds on a 30,000-digit query value.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class ValidationError(ValueError):
    """A bad request; ``body`` is the JSON error document, ``status`` its HTTP status."""

    status = 400

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.body = {"error": message, **extra}


class TooLong(ValidationError):
    """A recording beyond ``MAX_RECORD_SECONDS``: too large a request, not a malformed one."""

    status = 413


class Encoded(ValidationError):
    """A body sent compressed (RFC 9110's 415): read as float32 samples, a gzip stream would be
    denoised as noise, silently."""

    status = 415


def identity_encoding(content_encoding: str | None) -> None:
    """Refuses a ``Content-Encoding`` other than ``identity``: the service decodes none."""
    coding = (content_encoding or "identity").strip().lower()
    if coding != "identity":
        raise Encoded(f"Content-Encoding {quoted(coding)} is not supported: send the body uncompressed")


def ecg_signal(body: Any) -> np.ndarray:
    """``{"ecg_signal": [1300 numbers]}`` → a 1×1300 float64 array."""
    value = _field(body, "ecg_signal", "array of 1300 float values (10 seconds @ 130Hz)")
    return _window(value, "ecg_signal")[None, :]


def ecg_signals(body: Any, limit: int) -> np.ndarray:
    """``{"ecg_signals": [[1300 numbers], …]}`` with 1 to ``limit`` windows → an N×1300 array."""
    value = _field(body, "ecg_signals", f"array of 1 to {limit} arrays of 1300 float values (10 seconds @ 130Hz each)")
    if not isinstance(value, list):
        raise ValidationError("ecg_signals must be an array")
    if value and not isinstance(value[0], list):  # one window sent flat: name it, not its length
        raise ValidationError("ecg_signals[0] must be an array")
    if not 1 <= len(value) <= limit:
        raise ValidationError(f"ecg_signals must hold 1 to {limit} windows (got {len(value)})")
    return np.stack([_window(window, f"ecg_signals[{i}]") for i, window in enumerate(value)])


def record(body: Any, max_seconds: float, rate_param: str | None = None) -> tuple[np.ndarray, float]:
    """``{"ecg_signal": [numbers], "sampling_rate": Hz}`` → samples and rate. The rate may come
    as ``?sampling_rate=`` instead (as with binary bodies); given both ways, they must agree. It
    defaults to 130 Hz only when given neither way: a rate given and then ignored would
    denoise the recording at the wrong rate, silently."""
    value = _field(body, "ecg_signal", "array of numbers: the whole recording, 2 s or more")
    if not isinstance(value, list):
        raise ValidationError("ecg_signal must be an array")
    rate = body.get("sampling_rate", SAMPLING_RATE_HZ)
    if rate is None or type(rate) not in _NUMBERS:
        raise ValidationError(f"sampling_rate must be a number of Hz (got {_kind(rate)})")
    try:
        rate = float(rate)
    except OverflowError:  # an integer beyond float64
        rate = math.inf
    rate = _rate(rate)
    if rate_param is not None:
        queried = _rate_param(rate_param)
        if "sampling_rate" in body and queried != rate:
            raise ValidationError(
                f"sampling_rate given twice, differently: {as_written(rate)} Hz in the body, {as_written(queried)} Hz in the query"
            )
        rate = queried
    if len(value) < MIN_SECONDS * rate:  # too short: what its elements are says more than their count
        _numbers(value, "ecg_signal")
    _duration(len(value), rate, max_seconds)
    return _numbers(value, "ecg_signal"), rate


def rate_meaning(rate_param: str) -> float | str:
    """What a ``?sampling_rate=`` means, to tell two apart: "250" and "250.0" are one rate."""
    return float(rate_param) if _DECIMAL.fullmatch(rate_param) else rate_param


def _rate_param(rate_param: str) -> float:
    if not _DECIMAL.fullmatch(rate_param):  # float() also takes "1_000", "inf" and other scripts' digits
        raise ValidationError(f"sampling_rate must be a number of Hz (got {quoted(rate_param)})")
    return _rate(float(rate_param))


# Magnitudes no recording's samples reach, in any unit, but that float32 samples whose bytes are
# swapped reach all the time: a byte of the mantissa becomes the exponent.
ORDINARY_MAGNITUDES = (1e-20, 1e20)


def _ordinary(samples: np.ndarray) -> bool:
    """Every sample zero or of a magnitude a recording has."""
    magnitude = np.abs(samples)
    low, high = ORDINARY_MAGNITUDES
    return bool(np.all((magnitude == 0) | ((magnitude > low) & (magnitude < high))))


def binary_record(data: bytes, rate_param: str | None, max_seconds: float) -> tuple[np.ndarray, float]:
    """Little-endian float32 samples with ``?sampling_rate=`` (required) → samples and rate."""
    if rate_param is None:
        raise ValidationError("Missing required query parameter: sampling_rate (binary bodies carry no rate)")
    rate = _rate_param(rate_param)
    if len(data) % 4:
        raise ValidationError(f"A binary body holds float32 samples, 4 bytes each (got {len(data)} bytes)")
    _duration(len(data) // 4, rate, max_seconds)
    raw = np.frombuffer(data, dtype="<f4")
    if not _ordinary(raw) and _ordinary(np.frombuffer(data, dtype=">f4")):
        raise ValidationError(
            "A binary body holds little-endian float32 samples; these read as big-endian ones (send them little-endian)"
        )
    with np.errstate(invalid="ignore"):  # a signalling NaN, refused below
        samples = raw.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(samples))
    if len(bad):
        value = samples[bad[0]]
        got = "NaN" if np.isnan(value) else f"{'-' if value < 0 else ''}Infinity"
        raise ValidationError(f"ecg_signal[{bad[0]}] must be a finite number (got {got})")
    return samples, rate


MAX_EMAIL = 254
# An RFC 2047 encoded word, "=?utf-8?q?victim?=": "=?", charset, "?", encoding, "?", text, "?=".
# Its text holds no "?", so the pattern runs in linear time (".*?" in its place was quadratic).
ENCODED_WORD = re.compile(r"=\?[^?]*\?[^?]*\?[^?]*\?=")


def email(body: Any) -> str:
    """Trimmed and lower-cased, as the old service did, and an address a mail can be sent to.

    The old service asked only for "@" and "."; then ``john.doe@`` reached the outbox, which can
    never send it, and ``a@b.c,d@e.f`` sent one key's mails to two mailboxes. email-validator
    checks the syntax (no DNS lookup) and names the fault in ``reason``. Only ASCII addresses
    pass: a non-ASCII one needs SMTPUTF8, which not every mail server offers.
    """
    value = body.get("email") if isinstance(body, dict) else None
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValidationError("Missing required field: email")
    if not isinstance(value, str):
        raise ValidationError("Invalid email format")
    value = value.strip().lower()
    if len(value) > MAX_EMAIL:  # the longest address SMTP carries; checked before any pattern
        raise ValidationError("Invalid email format", reason=f"An address has at most {MAX_EMAIL} characters.")
    if not value.isascii():
        raise ValidationError("Invalid email format", reason="Only ASCII email addresses are accepted.")
    if ENCODED_WORD.search(value):  # legal characters, but mail software decodes it to another address
        raise ValidationError("Invalid email format", reason="An address may not hold an encoded word (=?…?=).")
    try:
        validate_email(value, check_deliverability=False, allow_smtputf8=False, strict=True)
    except EmailNotValidError as exc:
        raise ValidationError("Invalid email format", reason=str(exc)) from None
    return value


def _letters_except(first: set[str]) -> str:
    return "[" + "".join(c for c in string.ascii_lowercase if c not in first) + "]"


def _words_except(words: set[str]) -> str:
    """A regular expression for the lower-case words of the words' one length, but these."""
    length = len(next(iter(words)))
    heads = sorted({w[0] for w in words})
    parts = [_letters_except(set(heads)) + (f"[a-z]{{{length - 1}}}" if length > 1 else "")]
    if length > 1:
        parts += [head + _words_except({w[1:] for w in words if w[0] == head}) for head in heads]
    return "(?:" + "|".join(parts) + ")"


def _email_pattern() -> str:
    """An ECMA-262 pattern (no lookaround, so generators need not filter) that admits only
    addresses ``email`` accepts: dot-atom local parts of at most 64 characters, lower-case
    host names of 2 to 4 labels, a top-level domain of letters other than the special-use names
    email-validator refuses (``local``, ``test``…), 254 characters at most. It is narrower than
    ``email`` (no upper-case domains, at most two dots before the @, no "?": so no encoded word)."""
    atext = "[A-Za-z0-9!#$%&'*+/=^_`{|}~-]"
    local = f"(?:{atext}{{1,64}}|{atext}{{1,20}}(?:\\.{atext}{{1,20}}){{1,2}})"
    label = "[a-z0-9]{1,20}(?:-[a-z0-9]{1,20})?"
    special = {n: {w for w in SPECIAL_USE_DOMAIN_NAMES if len(w) == n} for n in range(2, 64)}
    tld = [_words_except(words) if words else f"[a-z]{{{n}}}" for n, words in special.items()]
    return f"^{local}@(?:{label}\\.){{1,3}}(?:{'|'.join(tld)})$"


EMAIL_PATTERN = _email_pattern()


def input_units(units: str | None) -> bool:
    """The ``units`` query parameter: ``normalized`` (default, as before) or ``input``."""
    if units is None:
        return False
    if units not in UNITS:
        raise ValidationError(f"units must be 'normalized' or 'input' (got {quoted(units)})")
    return UNITS[units]


def _field(body: Any, name: str, expected: str) -> Any:
    value = body.get(name) if isinstance(body, dict) else None
    if value is None:
        raise ValidationError(f"Missing required field: {name}", expected_format={name: expected})
    return value


def quoted(text: str, limit: int = 40) -> str:
    """A client's text in an error message: quoted, and cut short (a query value may be long)."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def as_written(rate: float) -> int | float:
    """A rate as the client most likely wrote it: 250.0 → 250; 250.5 and 1000.0000000001 stay,
    to their last digit (the latter must not read as the bound 1000); 1e308 stays 1e+308, not
    309 digits."""
    rate = float(rate)
    return int(rate) if rate.is_integer() and abs(rate) < 1e16 else rate


def _rate(rate: float) -> float:
    if not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:  # NaN fails too
        raise ValidationError(
            f"sampling_rate must be from {MIN_RATE_HZ:g} to {MAX_RATE_HZ:g} Hz (got {as_written(rate)})"
        )
    return rate


def _duration(samples: int, rate: float, max_seconds: float) -> None:
    seconds = samples / rate
    if seconds < MIN_SECONDS:
        need = int(np.ceil(MIN_SECONDS * rate))
        raise ValidationError(
            f"ecg_signal must hold at least {MIN_SECONDS:g} seconds: {need} values at {as_written(rate)} Hz "
            f"(got {samples})"
        )
    if seconds > max_seconds:
        shown = f"{seconds:.1f}"
        if float(shown) <= max_seconds:  # 600.001 s must not read as the 600.0 it exceeds: every digit
            shown = repr(seconds)
        raise TooLong(f"Recording too long: at most {max_seconds:g} seconds (got {shown} s at {as_written(rate)} Hz)")


def _window(value: Any, label: str) -> np.ndarray:
    if not isinstance(value, list):
        raise ValidationError(f"{label} must be an array")
    if len(value) != WINDOW:
        raise ValidationError(f"{label} must have exactly {WINDOW} values (got {len(value)})", note=WINDOW_NOTE)
    return _numbers(value, label)


def _numbers(value: list, label: str) -> np.ndarray:
    # Fast path for the normal request; bool is an int subclass, so compare exact types (a set of
    # the types is faster than a test per element).
    if set(map(type, value)) <= _NUMBERS:
        try:
            window = np.array(value, dtype=np.float64)
        except OverflowError:  # an integer beyond float64
            window = None
        if window is not None and _bounded(window):
            return window
    index, problem = next((i, p) for i, v in enumerate(value) if (p := _element_problem(v)))
    raise ValidationError(f"{label}[{index}] {problem}")


def _bounded(window: np.ndarray) -> bool:
    """Every value finite and within MAX_ABS, in one pass for the normal window.

    Each NumPy pass lets go of the GIL (contract.normalize says what that costs): a sum of squares
    within MAX_ABS² bounds every value, and NaN, ±Infinity or an overflow fail the comparison; a
    window it does not settle gets the exact test.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if float(np.dot(window, window)) <= MAX_ABS**2:
            return True
    return bool(np.all(np.abs(window) <= MAX_ABS))


def _kind(value: Any) -> str | None:
    """How a JSON value that is not a number is named in messages."""
    return {type(None): "null", bool: "a boolean", str: "a string", list: "an array", dict: "an object"}.get(
        type(value)
    )


def _element_problem(value: Any) -> str | None:
    kind = _kind(value)
    if kind:
        return f"must be a finite number (got {kind})"
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if math.isnan(number):
        return "must be a finite number (got NaN)"
    if math.isinf(number) and isinstance(value, float):
        return f"must be a finite number (got {'-' if number < 0 else ''}Infinity)"
    if not abs(number) <= MAX_ABS:
        return f"must be a finite number of magnitude at most {MAX_ABS:g}"
    return None
