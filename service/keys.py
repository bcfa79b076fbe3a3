"""API keys and verification tokens: generation, hashing, and the flows of the key endpoints.

Keys and tokens are 32 random bytes, URL-safe; only their sha256 is stored. Each flow writes its
rows and the mail that carries the secret in one transaction, so a key never exists without the
mail that delivers it (the outbox worker retries that mail until it goes through).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlencode

from service import messages
from service.clients import limited_as
from service.database import DatabaseUnavailable
from service.mail import Outbox
from service.messages import Mail
from service.occupancy import Occupancy
from service.ratelimit import RateLimited, TokenBuckets
from service.sealing import Sealer
from service.store import DEACTIVATION, GENERATION, KeyConflict, Store, utcnow
from service.usage import LastUsed

# The window of the key-mail rate limits.
MAIL_WINDOW = timedelta(hours=1)
VERIFY_PATH = "/api/v1/api-keys/verify"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Refused(Exception):
    """A request the key flows turn down; ``message`` is the text clients see."""

    message = ""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)


class EmailTaken(Refused):
    message = "Email already has an active API key. Please deactivate it first."


class NoActiveKey(Refused):
    message = "No active API key found for this email"


class InvalidKey(Refused):
    message = "Invalid or inactive API key"


class BadToken(Refused):
    message = "Invalid or expired token"


class ExpiredToken(BadToken):
    message = "Token has expired"


class NoToken(BadToken):
    message = "Invalid verification link"


class ActiveKeys:
    """Active keys (digest → id) seen in the last ``ttl_s`` seconds, so that a client's requests
    do not each read the database.

    The lookup and the pool hand-off that come with it cost CPU under the GIL on every request,
    with the web threads queuing on it (docs/performance.md). Only keys found active are kept (an
    unknown key cannot grow the cache), and at most ``limit`` of them. While the database is away,
    a key whose entry has expired is still trusted: this process verified it, and a deactivation
    would have had to pass the same database. A key deactivated through this process is refused
    at once: ``forget`` clears the cache, and a lookup that began before it does not write its now
    stale answer back. A deactivation by another worker process of the same service reaches
    ``forget`` through ``service.occupancy``, and one by another replica on PostgreSQL as a
    notification (service.notifications); with notifications lost, or by a process outside the
    service on SQLite, such a key works here for ``ttl_s`` more at most. While news of
    deactivations cannot arrive at all (the listener has lost its connection: ``suspend``),
    every use reads the key again, until ``resume``.
    """

    LIMIT = 10_000  # keys kept at most; past it the cache starts again empty

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, tuple[int, float]] = {}
        self._epoch = 0  # bumped by forget: a lookup from an older epoch is not kept
        self._generation = 0  # bumped by expire: a lookup from an older one is kept as the fallback only
        self._suspended = False  # entries are kept as the outage fallback only
        self._lock = threading.Lock()

    def get(self, key_hash: str, lookup: Callable[[str], int | None]) -> int | None:
        entry = self._entries.get(key_hash)
        now = self._clock()
        if entry is not None and entry[1] > now:
            return entry[0]
        epoch, generation = self._epoch, self._generation
        try:
            key_id = lookup(key_hash)
        except DatabaseUnavailable:
            if entry is not None:  # verified here before: it keeps working through an outage
                return entry[0]
            raise
        if key_id is None:
            with self._lock:  # deactivated: no outage may bring it back
                self._entries.pop(key_hash, None)
        elif self._ttl_s > 0:
            with self._lock:
                if epoch == self._epoch:
                    if len(self._entries) >= self.LIMIT:
                        self._entries.clear()
                    fresh = generation == self._generation and not self._suspended
                    self._entries[key_hash] = (key_id, now + self._ttl_s if fresh else 0.0)
        return key_id

    def forget(self) -> None:
        with self._lock:
            self._epoch += 1
            self._entries.clear()

    def expire(self) -> None:
        """Read every key again on its next use, keeping the entries as the outage fallback."""
        with self._lock:
            self._generation += 1
            self._entries = {key_hash: (key_id, 0.0) for key_hash, (key_id, _) in self._entries.items()}

    def suspend(self) -> None:
        """Until ``resume``, read every key on every use (entries stay as the outage fallback)."""
        with self._lock:
            self._suspended = True
        self.expire()

    def resume(self) -> None:
        """Cache again, from fresh reads: what was held may be stale."""
        with self._lock:
            self._suspended = False
        self.expire()


def mailbox(email: str) -> str:
    """The mailbox an address reaches, as far as the per-address mail limit can tell: a
    subaddress (``me+tag@example.com``) reaches ``me@example.com``'s, so tags do not multiply
    the mails one inbox can be sent."""
    local, _, domain = email.rpartition("@")
    return f"{local[:1]}{local[1:].split('+', 1)[0]}@{domain}"  # "+alice+x@" is "+alice@"


@dataclass(frozen=True)
class MailLimits:
    """Key mails (generation and deactivation together) per hour; 0 = no limit."""

    per_email: int = 3
    per_client: int = 20


class KeyService:
    """The key flows over the store; ``clock`` gives the time tokens are issued and checked at,
    ``new_secret`` the keys and tokens; ``siblings``: the worker processes beside this one, which
    hear of its deactivations and tell it of theirs (``service.occupancy``)."""

    def __init__(
        self,
        store: Store,
        outbox: Outbox,
        usage: LastUsed,
        sealer: Sealer,
        base_url: str,
        key_cache_s: float,
        mail_limits: MailLimits = MailLimits(),
        buckets: TokenBuckets | None = None,
        request_buckets: TokenBuckets | None = None,
        clock: Callable[[], datetime] = utcnow,
        new_secret: Callable[[], str] = new_secret,
        siblings: Occupancy | None = None,
    ) -> None:
        self._store = store
        self._outbox = outbox
        self._usage = usage
        self._sealer = sealer
        self._base_url = base_url
        self._active = ActiveKeys(key_cache_s)
        self._limits = mail_limits
        self._buckets = buckets  # per key id: denoising requests
        self._request_buckets = request_buckets  # per client address: key requests
        self._clock = clock
        self._new_secret = new_secret
        self._siblings = siblings or Occupancy()  # the other workers of this machine, if any
        self._deactivations = self._siblings.deactivations()  # as last seen

    def authenticate(self, key: str) -> int:
        """The id of the active key ``key`` (``key_id``), within its rate."""
        key_id = self.key_id(key)
        if self._buckets is not None and (wait := self._buckets.take(key_id)):
            raise RateLimited("Too many requests for this API key. Slow down.", wait, "api_key")
        return key_id

    def key_id(self, key: str) -> int:
        """The id of the active key ``key`` (from the cache, else one indexed read; no write),
        or ``InvalidKey``; it takes nothing from the key's rate."""
        if (seen := self._siblings.deactivations()) != self._deactivations:
            self._deactivations = seen  # another worker deactivated a key: it may be cached here
            self._active.forget()
        key_id = self._active.get(digest(key), self._store.active_key_id)
        if key_id is None:
            raise InvalidKey()
        return key_id

    def forget_cached(self) -> None:
        """Keys were deactivated elsewhere: read them again, and trust none of them meanwhile."""
        self._active.forget()

    def revalidate_cached(self) -> None:
        """News of deactivations can arrive again, and some may have been lost: read every key
        again on its next use, then cache again."""
        self._active.resume()

    def stop_caching(self) -> None:
        """News of deactivations cannot arrive: read every key on every use until told again."""
        self._active.suspend()

    def used(self, key_id: int) -> None:
        self._usage.touch(key_id)

    def request_key(self, email: str, client: str) -> None:
        """Mail a generation link, unless the email already has an active key."""
        self._mail_token(email, client, GENERATION, messages.key_request_mail, needs_key=False)

    def request_deactivation(self, email: str, client: str) -> None:
        """Mail a deactivation link for the email's active key."""
        self._mail_token(email, client, DEACTIVATION, messages.deactivation_request_mail, needs_key=True)

    def verify(self, token: str | None) -> tuple[str, str]:
        """Spend a token once; returns its kind and email.

        A generation token deactivates every key of its email and mails a new one, and spends the
        email's other generation links (a mail scanner that follows an older link later must not
        replace the key just issued); a deactivation token deactivates the active key and mails a
        confirmation. Either spends the email's other deactivation tokens, which were for the
        keys now gone.
        """
        if not token:
            raise NoToken()
        try:
            try:
                kind, email, deactivated = self._verify(token)
            except KeyConflict:
                # Two generation tokens of one email verified at once: the unique index on active
                # keys let one win; running again deactivates the winner's key and issues ours.
                kind, email, deactivated = self._verify(token)
        finally:
            # Even after a failure: a commit whose answer was lost may have queued the mail,
            # which would otherwise wait for the outbox's next round (up to a minute).
            self._outbox.wake()
        if deactivated:  # now committed. Only then: a forgotten key loses its outage fallback
            self._active.forget()
            self._siblings.announce_deactivation()
        return kind, email

    def _verify(self, token: str) -> tuple[str, str, bool]:
        """The token's kind and email, and whether keys were deactivated."""
        now = self._clock()
        with self._store.transaction():
            row = self._store.find_token(digest(token))
            if row is None or row.used:
                raise BadToken()
            if row.expires_at <= now:
                raise ExpiredToken()
            # Before any row lock: two links of one email verified at once each update the
            # other's token and the email's keys, and took their row locks in opposite orders
            # (a deadlock on PostgreSQL). The second now waits, then finds its token spent.
            self._store.lock_names(row.email)
            if not self._store.use_token(row.id, now):
                raise BadToken()
            deactivated = self._store.deactivate_keys(row.email, now) > 0
            # Deactivation links still out were for the keys just deactivated: followed later,
            # they must not deactivate the key that replaces them.
            self._store.spend_tokens(row.email, DEACTIVATION, now)
            if row.kind == GENERATION:
                self._store.spend_tokens(row.email, GENERATION, now)
                key = self._new_secret()
                self._store.add_key(row.email, digest(key), now)
                self._store.enqueue_mail(self._sealer.seal(messages.new_key_mail(row.email, key)), now)
            else:
                self._store.enqueue_mail(self._sealer.seal(messages.deactivated_mail(row.email)), now)
        return row.kind, row.email, deactivated

    def _mail_token(
        self, email: str, client: str, kind: str, build: Callable[[str, str], Mail], needs_key: bool
    ) -> None:
        """Mail a link of ``kind`` if the email has an active key, or has none (``needs_key``),
        as seen under the email's lock: checked before it, a generation request that raced the
        verification of the email's last link mailed a new link beside the key just issued
        (which a mail scanner following it replaced)."""
        client = limited_as(client)
        if self._request_buckets is not None and (wait := self._request_buckets.take(client)):
            raise RateLimited("Too many key requests from this address. Try again later.", wait, "key_requests")
        token = self._new_secret()
        link = f"{self._base_url}{VERIFY_PATH}?{urlencode({'token': token})}"
        now = self._clock()
        client_digest = self._sealer.digest(client)
        box = mailbox(email)
        with self._store.transaction():
            self._store.lock_names(*{email, box, client_digest})
            if self._store.has_active_key(email) is not needs_key:
                raise NoActiveKey() if needs_key else EmailTaken()
            self._check_mail_limits(box, client_digest, now)
            self._store.add_token(digest(token), kind, email, now, messages.LINK_TTL, client_digest, box)
            self._store.enqueue_mail(self._sealer.seal(build(email, link)), now)
        self._outbox.wake()

    def _check_mail_limits(self, box: str, client_digest: str, now: datetime) -> None:
        since = now - MAIL_WINDOW
        checks = (
            (
                self._limits.per_email,
                {"mailbox": box},
                "Too many key mails for this email address. Try again later.",
                "email",
            ),
            (
                self._limits.per_client,
                {"client": client_digest},
                "Too many key mail requests from this address. Try again later.",
                "client",
            ),
        )
        for limit, who, message, name in checks:
            if limit:
                count, oldest = self._store.mail_requests_since(since, **who)
                if count >= limit:
                    raise RateLimited(message, ((oldest or now) + MAIL_WINDOW - now).total_seconds(), name)
