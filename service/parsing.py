"""waitress's request parser with the service's limits, checked as a request arrives, before the
app sees it: heads bounded in lines and bytes and refused when they could smuggle a request; each
route's body limit; bodies that must keep a least rate; chunks that must not be tiny; the places a
whole recording needs; and the gate that judges a large upload by its key before it is read.
``service.connections`` serves the requests this parses.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from waitress.adjustments import Adjustments
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.utilities import BadRequest, Error, RequestEntityTooLarge, RequestHeaderFieldsTooLarge

from service.codec import media_type
from service.logs import Tally
from service.pace import Pace
from service.turns import BUSY, BUSY_RETRY_AFTER_S

# A request's head: at most this many lines (HAProxy's default limit is 101 header fields) and
# bytes (nginx's default buffers hold 32 KiB; waitress's own limit is 256 KiB, and a slow
# client's unfinished head is held in memory until the header timeout).
MAX_HEADER_LINES = 100
MAX_HEADER_BYTES = 32 << 10
# A request body must come at this many bytes a second over each window this long (all of
# what is left of a smaller one within the window), or it is answered 408 and closed: a few
# clients that trickle a byte now and then would otherwise hold every upload place, or disk and
# memory for as long as they liked. 8 KiB/s is a 64 kbit/s link.
UPLOAD_WINDOW_S = 30.0
MIN_UPLOAD_BYTES_PER_S = 8 << 10
# Bodies past this are written to a file as they arrive (waitress's ``inbuf_overflow``), and the
# gate judges their key first; those under it stay in memory.
SPOOL_BYTES = 64 << 10
# The bytes of such files one worker holds at once for bodies that take no upload place (batches,
# up to a few MB each): past it, the next gets a 503 before it is read. A thousand connections
# with one key held gigabytes of the temporary directory.
SPOOL_ROOM_BYTES = 256 << 20
# waitress decodes a chunked body chunk by chunk, in Python, in the loop that serves every
# connection: a body of one-byte chunks cost it a hundred times what the same bytes cost with a
# Content-Length. So chunks are fed to it a slice at a time, and their framing (size lines and
# CRLFs) may take this much, and a share of the data beyond it (chunks of about 512 bytes or
# more: clients that read a file a KiB at a time send such).
CHUNK_SLICE = 4 << 10
CHUNK_FRAMING_FREE = 1 << 10
CHUNK_FRAMING_SHARE = 64


class Unavailable(Error):
    """A body the worker cannot take now: a 503 with ``message`` and ``Retry-After``."""

    code = 503
    reason = "Service Unavailable"
    message = ""
    retry_after_s = BUSY_RETRY_AFTER_S


class UploadsBusy(Unavailable):
    """Every place for a large upload is taken (``Intake.places``)."""

    message = BUSY  # as a recording with no turn (service.turns)


class SpoolFull(Unavailable):
    """The worker's room for spooled bodies is taken (``Intake.spool_room``)."""

    message = "Busy receiving other large requests. Try again shortly."


class NoRoom(Unavailable):
    """The temporary directory, where waitress spools large bodies, cannot hold this one."""

    message = "The server has no room for this upload now. Try again later."
    retry_after_s = 30  # a full temporary directory takes longer to free


@dataclass(frozen=True)
class Refusal:
    """An answer given to a large upload before its body is read (``UploadGate``)."""

    code: int
    reason: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()


# Judges a body that would be spooled to disk (past SPOOL_BYTES) from its request's x-api-key
# header (None when it has none) before the body is read: None lets it in, a Refusal answers at
# once. It may read the database, so it runs on a thread of its own, never in the loop's.
UploadGate = Callable[[str | None], Refusal | None]


class GateRefused(Error):
    """A large upload the gate refused (``Refusal``)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.code, self.reason, self.refusal = refusal.code, refusal.reason, refusal


class Allowance:
    """So much of something that the requests of one worker share: taken in the loop's thread
    as a body is let in, given back in a task's once it is answered."""

    def __init__(self, total: int) -> None:
        self._free = total
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        return self._free

    def take(self, amount: int = 1) -> bool:
        with self._lock:
            if amount > self._free:
                return False
            self._free -= amount
            return True

    def give_back(self, amount: int = 1) -> None:
        with self._lock:
            self._free += amount


@dataclass
class Intake:
    """What the requests of one worker share before the app sees them.

    waitress spools a body past ``SPOOL_BYTES`` to a file as it arrives: without a bound, clients
    could fill the disk (hundreds of connections, each a whole recording, or a thousand batches).
    The gate keeps clients without an active key out; these bound the others. ``limits``: the
    adjustments of each route's body limit, by path ("" for the others); a body on a route whose
    limit is past ``place_above`` (a whole recording) takes one of ``places``, any other spooled
    body its length of ``spool_room``; ``gated``: large bodies wait for the gate's verdict."""

    limits: dict[str, Adjustments]
    place_above: int
    places: Allowance
    spool_room: Allowance = field(default_factory=lambda: Allowance(SPOOL_ROOM_BYTES))
    gated: bool = False
    # Bodies that could not be spooled (a full, gone or read-only temporary directory), and why,
    # since the server's last line about them.
    unspooled: Tally = field(default_factory=Tally)
    unspooled_why: str = ""


def _codings(head: bytes) -> int:
    """How many transfer codings the Transfer-Encoding headers of ``head`` list."""
    lines = head.lower().split(b"\n")
    values = b",".join(line.partition(b":")[2] for line in lines if line.startswith(b"transfer-encoding:"))
    return sum(1 for coding in values.split(b",") if coding.strip(b" \t\r"))


class Request(HTTPRequestParser):
    """waitress's request parser, with the body limit of the request's route: a body declared
    (or chunked) past it is refused before it is read, as waitress does past its one limit. A
    body that will be spooled needs an upload place (a whole recording) or its room (the others),
    or gets a 503 before it is read (``Intake``); with a gate, it takes them once the gate has
    let it in.

    And stricter about the head, which waitress parses in its one loop for every connection:
    more than ``MAX_HEADER_LINES`` lines are refused (431) as they arrive, before waitress's
    parsing, which costs the loop time for every line (docs/security.md); a head with a bare LF
    gets its 400 at once, not a 408 after the header timeout; and, as RFC 9112 requires, a
    request with both Content-Length and Transfer-Encoding (the way requests are smuggled past a
    front end that reads the other one), chunked twice, an HTTP/1.1 request without a Host, one
    with several, and one of another major version, get a 400 and their connection is closed.
    """

    needs_place = False  # a body on a route past ``place_above`` (a whole recording)
    holds_place = False
    spooled = False  # a body past SPOOL_BYTES, or chunked, on a route that takes more
    holds_room = 0  # the bytes of spool room it holds
    # Its body's rate, from when it may come (a gate's verdict may come later than its head).
    upload_pace: Pace | None = None
    body_since = 0.0  # time.time() from when its body may come (its "100 Continue", if it asked)
    made_up_head = False  # refused before its head was parsed: its method and path are unknown
    judging = False  # a large upload waiting for the gate's verdict: its body is not read meanwhile
    held_continue = False  # its client expects "100 Continue", which waits for the verdict

    def __init__(self, adj: Adjustments, intake: Intake) -> None:
        super().__init__(adj)
        self._intake = intake

    def parse_header(self, header_plus: bytes) -> None:
        try:
            super().parse_header(header_plus)
        except ValueError as exc:
            if "integer string conversion" in str(exc):  # a Content-Length of over 4300 digits
                raise ParsingError("Content-Length is invalid") from exc
            raise ParsingError("Bad URI") from exc  # urlsplit's on "http://[::1/": waitress closed with no answer
        if not self.version.startswith("1."):  # waitress served HTTP/2.0, and none (0.9), as 1.0
            raise ParsingError(f"HTTP/{self.version or '0.9'} is not supported")
        # waitress drops Transfer-Encoding from the headers of HTTP/1.1 (an empty one too)
        framed_twice = b"\ntransfer-encoding:" in header_plus.lower() and "CONTENT_LENGTH" in self.headers
        if framed_twice:
            raise ParsingError("both Content-Length and Transfer-Encoding")
        if "TRANSFER_ENCODING" in self.headers:  # left by waitress on HTTP/1.0, which has none
            raise ParsingError("Transfer-Encoding in an HTTP/1.0 request")
        if _codings(header_plus) > 1:  # chunked twice (waitress refuses every other coding): RFC 9112
            raise ParsingError("chunked more than once")
        if self.version == "1.1" and not self.headers.get("HOST"):
            raise ParsingError("an HTTP/1.1 request needs a Host header")
        if "," in self.headers.get("HOST", ""):  # waitress joins repeated headers with commas
            raise ParsingError("more than one Host header")
        # As Falcon routes it: "//api/…" reaches the same resource as "/api/…".
        path = "/" + self.path.lstrip("/")
        media = media_type(self.headers.get("CONTENT_TYPE"))
        limits, place_above = self._intake.limits, self._intake.place_above
        self.adj = limits.get(f"{path} {media}") or limits.get(path) or limits[""]
        if self.command != "POST":  # the large routes take their large bodies by POST only
            self.adj = limits[""]
        limit = self.adj.max_request_body_size - 1  # waitress refuses from its setting on
        self.needs_place = limit > place_above and (self.chunked or place_above < self.content_length <= limit)
        # Chunked bodies may grow past SPOOL_BYTES, where the route takes that much (the routes
        # that take no key take less).
        self.spooled = limit >= SPOOL_BYTES and (self.chunked or self.content_length > SPOOL_BYTES)
        if self._intake.gated and (self.needs_place or self.spooled):  # let in (and a place taken) once judged
            self.judging = True
            self.held_continue, self.expect_continue = self.expect_continue, False
        elif self.chunked or self.content_length:
            self.let_in()
        else:  # no body to ask for: waitress sent "100 Continue", then waited for one until the idle timeout
            self.expect_continue = False

    def let_in(self) -> bool:
        """Its body may come from now on: its pace begins, and a large upload takes an upload
        place, or another spooled body its room, or it gets a 503 (from its headers)."""
        self.begin_pace()
        if self.needs_place:
            self.holds_place = self._intake.places.take()
            if not self.holds_place:
                self._fail(UploadsBusy("every place for a large upload is taken"))
        elif self.spooled:
            room = self.content_length or self.adj.max_request_body_size - 1  # chunked: the most it may be
            if self._intake.spool_room.take(room):
                self.holds_room = room
            else:
                self._fail(SpoolFull("the room for spooled bodies is taken"))
        return self.error is None

    def begin_pace(self) -> None:
        self.body_since = time.time()
        self.upload_pace = Pace(UPLOAD_WINDOW_S, MIN_UPLOAD_BYTES_PER_S)
        self.upload_pace.begin(self.body_since, self.body_bytes_received)

    @property
    def api_key(self) -> str | None:
        return self.headers.get("X_API_KEY") or None

    def refuse(self, refusal: Refusal) -> None:
        self._fail(GateRefused(refusal))

    def received(self, data: bytes) -> int:
        if self.body_rcv is None and not self.completed and (error := self._bad_head(self.header_plus + data)):
            self.parse_header(b"GET / HTTP/1.0\r\n")  # as waitress does for a head too large
            self.made_up_head = True
            self._fail(error)
            return len(data)
        if self.chunked and self.body_rcv is not None:
            data = data[:CHUNK_SLICE]  # waitress's channel gives the rest in the next call
        try:
            consumed = super().received(data)
        except OSError as exc:  # the spool file: a full disk, a quota, a directory gone or read-only
            self._intake.unspooled.add()
            self._intake.unspooled_why = exc.strerror or str(exc)
            self._fail(NoRoom(self._intake.unspooled_why))
            return len(data)
        if self.error is None and (error := self._body_problem()):
            self._fail(error)
        if self.error is not None:  # refused from its headers: no "100 Continue" invites the body
            self.expect_continue = False
        return consumed

    def _fail(self, error: Error) -> None:
        """Answered ``error`` at once: nothing more of the request is read."""
        self.error = error
        self.completed = True

    def _body_problem(self) -> Error | None:
        """What is wrong with the body so far that need not wait for its end."""
        receiver = self.body_rcv if self.chunked else None
        if receiver is not None and b"\n" in receiver.control_line:  # waitress waits for a CRLF: 408 at the pace's end
            return BadRequest("chunk size lines must end in CRLF")
        if receiver is not None and max(len(receiver.control_line), len(receiver.trailer)) > MAX_HEADER_BYTES:
            # waitress holds a chunk's size line (and the trailer) in memory until its end, and
            # searches all of it again at every read: megabytes of it held the loop for seconds.
            return BadRequest("a chunk size line or trailer too long")
        if receiver is not None and self._framing_too_large(receiver):
            return BadRequest(f"chunks too small: they must average about {CHUNK_FRAMING_SHARE * 8} bytes or more")
        chunk = receiver.chunk_remainder if receiver is not None else 0
        if self.body_bytes_received + chunk >= self.adj.max_request_body_size:
            # A chunk declared past the limit: refused now, as a Content-Length past it is,
            # instead of once the body has come (or after the idle timeout, if it never does).
            return RequestEntityTooLarge("a chunk exceeds the body limit")
        return None

    def _framing_too_large(self, receiver: Any) -> bool:
        data = len(receiver.buf)  # the chunks' data so far; body_bytes_received counts their framing too
        return self.body_bytes_received - data > CHUNK_FRAMING_FREE + data // CHUNK_FRAMING_SHARE

    @staticmethod
    def _bad_head(head: bytes) -> Error | None:
        """What is wrong with a head so far (before waitress parses it, at the speed of C)."""
        end = head.find(b"\r\n\r\n")
        head = head if end < 0 else head[:end]
        if head.count(b"\n") > MAX_HEADER_LINES:
            return RequestHeaderFieldsTooLarge(f"more than {MAX_HEADER_LINES} header lines")
        if head.count(b"\n") != head.count(b"\r\n"):
            return BadRequest("lines must end in CRLF")
        if b"\n " in head or b"\n\t" in head:  # RFC 9112 lets a server refuse them: folded, a header
            # escaped the checks made on the header's own lines (Transfer-Encoding's codings)
            return BadRequest("folded header lines (obs-fold) are not accepted")
        return None

    def close(self) -> None:
        """After its answer, or when its client hangs up while it is read (``Channel``)."""
        try:
            with contextlib.suppress(OSError):  # a spool file that cannot flush on a full disk
                super().close()
        finally:
            if self.holds_place:
                self.holds_place = False
                self._intake.places.give_back()
            if self.holds_room:
                self._intake.spool_room.give_back(self.holds_room)
                self.holds_room = 0
