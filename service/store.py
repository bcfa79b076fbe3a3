"""Persistence: Peewee models and the queries the service needs (keys, tokens, mail outbox).

Only sha256 digests of keys and tokens are stored, so a copy of the database grants nothing. The
store talks SQL only; the flows that combine these queries live in ``keys`` and ``mail``.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import peewee as pw
from playhouse.pool import PooledPostgresqlDatabase, PooledSqliteDatabase

from service.config import ConfigError
from service.messages import Mail

log = logging.getLogger(__name__)

GENERATION = "generation"
DEACTIVATION = "deactivation"
# A process that claimed a mail and died leaves it to other workers after this long.
CLAIM_LEASE = timedelta(minutes=2)
# A pooled request thread waits this long for a free connection before failing.
POOL_WAIT_S = 10

_proxy = pw.DatabaseProxy()


class KeyConflict(Exception):
    """A concurrent transaction activated a key for the same email first (the unique index)."""


def utcnow() -> datetime:
    """Naive UTC: the one form stored in both SQLite and PostgreSQL ``timestamp`` columns."""
    return datetime.now(UTC).replace(tzinfo=None)


class _Model(pw.Model):
    class Meta:
        database = _proxy


class ApiKey(_Model):
    email = pw.CharField(max_length=254)  # queried with is_active: served by the index below
    key_hash = pw.CharField(max_length=64, unique=True)
    is_active = pw.BooleanField(default=True)
    created_at = pw.DateTimeField(default=utcnow)
    deactivated_at = pw.DateTimeField(null=True)
    last_used = pw.DateTimeField(null=True)

    class Meta:
        table_name = "api_key"


# At most one active key per email, whatever the interleaving of concurrent verifications.
ApiKey.add_index(
    ApiKey.index(ApiKey.email, unique=True, name="api_key_one_active_per_email").where(ApiKey.is_active == True)  # noqa: E712
)


class Token(_Model):
    token_hash = pw.CharField(max_length=64, unique=True)
    kind = pw.CharField(max_length=16)
    email = pw.CharField(max_length=254)
    created_at = pw.DateTimeField(default=utcnow)
    expires_at = pw.DateTimeField()
    used_at = pw.DateTimeField(null=True)

    class Meta:
        table_name = "verification_token"


class OutboxMail(_Model):
    recipient = pw.CharField(max_length=254)
    subject = pw.CharField(max_length=200)
    # Bodies carry plaintext keys and tokens: they are wiped once the mail is delivered.
    text_body = pw.TextField(null=True)
    html_body = pw.TextField(null=True)
    created_at = pw.DateTimeField(default=utcnow)
    attempts = pw.IntegerField(default=0)
    next_attempt_at = pw.DateTimeField(default=utcnow, index=True)
    sent_at = pw.DateTimeField(null=True)
    last_error = pw.TextField(null=True)

    class Meta:
        table_name = "outbox_mail"

    def as_mail(self) -> Mail:
        return Mail(self.recipient, self.subject, self.text_body or "", self.html_body or "")


MODELS = (ApiKey, Token, OutboxMail)


def open_database(url: str, max_connections: int) -> pw.Database:
    """``sqlite:///path`` (WAL) or ``postgresql://user:pw@host:port/db?param=…``, both pooled."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if not path or path == ":memory:":
            raise ConfigError("DATABASE_URL must name an SQLite file, e.g. sqlite:///heartify.db.")
        return PooledSqliteDatabase(
            path,
            max_connections=max_connections,
            timeout=POOL_WAIT_S,
            check_same_thread=False,  # pooled connections move between request threads
            lock_type="IMMEDIATE",  # take the write lock at BEGIN: no upgrade deadlocks
            pragmas={"journal_mode": "wal", "synchronous": "normal", "busy_timeout": 5000, "foreign_keys": 1},
        )
    if parts.scheme in ("postgresql", "postgres"):
        return PooledPostgresqlDatabase(
            unquote(parts.path.lstrip("/")) or "postgres",
            max_connections=max_connections,
            timeout=POOL_WAIT_S,
            host=parts.hostname or None,
            port=parts.port,
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            **dict(parse_qsl(parts.query)),
        )
    raise ConfigError(f"DATABASE_URL must start with sqlite:/// or postgresql:// (got {parts.scheme or 'no'} scheme).")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


class Store:
    """Queries over one pooled database. Peewee binds models globally: one store per process."""

    def __init__(self, url: str, max_connections: int) -> None:
        self._url = url
        self._max_connections = max_connections
        self.db: pw.Database | None = None  # opened by start

    def start(self) -> Store:
        """Open the pool and create what is missing (``IF NOT EXISTS`` for every table and index)."""
        self.db = open_database(self._url, self._max_connections)
        _proxy.initialize(self.db)
        # The key lookup runs on every denoising request: peewee writes its SQL once, in the
        # database's own dialect, and each request only executes it.
        self._active_key_sql, params = (
            ApiKey.select(ApiKey.id)
            .where((ApiKey.key_hash == "") & (ApiKey.is_active == True))  # noqa: E712
            .sql()
        )
        self._active_key_flags = tuple(params[1:])  # the key's digest goes first
        self.create_tables()
        return self

    def create_tables(self) -> None:
        """Idempotent: ``IF NOT EXISTS`` for every table and index."""
        with self.db.connection_context():
            self.db.create_tables(MODELS, safe=True)

    def ping(self) -> bool:
        try:
            with self.db.connection_context():
                self.db.execute_sql("SELECT 1")
        except pw.PeeweeException:
            return False
        return True

    def transaction(self) -> AbstractContextManager[Any]:
        return self.db.atomic()

    def release(self) -> None:
        """Return this thread's connection to the pool (end of a request)."""
        if not self.db.is_closed():
            self.db.close()

    def close(self) -> None:
        if self.db is not None:
            self.db.close_all()

    # -- keys -------------------------------------------------------------------------------
    def active_key_id(self, key_hash: str) -> int | None:
        row = self.db.execute_sql(self._active_key_sql, (key_hash, *self._active_key_flags)).fetchone()
        return row[0] if row else None

    def has_active_key(self, email: str) -> bool:
        return ApiKey.select().where((ApiKey.email == email) & (ApiKey.is_active == True)).exists()  # noqa: E712

    def deactivate_keys(self, email: str, now: datetime) -> int:
        return (
            ApiKey.update(is_active=False, deactivated_at=now)
            .where((ApiKey.email == email) & (ApiKey.is_active == True))  # noqa: E712
            .execute()
        )

    def add_key(self, email: str, key_hash: str, now: datetime) -> None:
        try:
            ApiKey.create(email=email, key_hash=key_hash, created_at=now)
        except pw.IntegrityError as exc:
            raise KeyConflict(email) from exc

    def record_last_used(self, times: dict[int, datetime]) -> None:
        with self.db.connection_context(), self.db.atomic():
            for key_id, when in times.items():
                ApiKey.update(last_used=when).where(ApiKey.id == key_id).execute()

    # -- tokens -----------------------------------------------------------------------------
    def add_token(self, token_hash: str, kind: str, email: str, now: datetime, ttl: timedelta) -> None:
        Token.create(token_hash=token_hash, kind=kind, email=email, created_at=now, expires_at=now + ttl)

    def find_token(self, token_hash: str) -> Token | None:
        return Token.get_or_none(Token.token_hash == token_hash)

    def use_token(self, token_id: int, now: datetime) -> bool:
        """Mark the token used; False when another request used it first (single use)."""
        query = Token.update(used_at=now).where((Token.id == token_id) & Token.used_at.is_null())
        return query.execute() == 1

    def spend_tokens(self, email: str, kind: str, now: datetime) -> int:
        """Mark the email's unused tokens of ``kind`` used."""
        query = Token.update(used_at=now).where((Token.email == email) & (Token.kind == kind) & Token.used_at.is_null())
        return query.execute()

    # -- outbox -----------------------------------------------------------------------------
    def enqueue_mail(self, mail: Mail, now: datetime) -> None:
        OutboxMail.create(
            recipient=mail.recipient,
            subject=mail.subject,
            text_body=mail.text,
            html_body=mail.html,
            created_at=now,
            next_attempt_at=now,
        )

    def claim_due_mails(self, limit: int) -> list[OutboxMail]:
        """Due mails this worker now owns: each is leased by one atomic update, so concurrent
        workers (threads or replicas) never send the same mail at the same time.

        One write transaction, with the rows read before the first update: updating while the
        select's cursor was still open made SQLite upgrade a read snapshot to a write, which fails
        at once ("database is locked") when another connection wrote in between.
        """
        with self.db.connection_context(), self.db.atomic():
            now = utcnow()
            due = list(
                OutboxMail.select()
                .where(OutboxMail.sent_at.is_null() & (OutboxMail.next_attempt_at <= now))
                .order_by(OutboxMail.next_attempt_at, OutboxMail.id)
                .limit(limit)
            )
            claimed = []
            for mail in due:
                lease = OutboxMail.update(next_attempt_at=now + CLAIM_LEASE).where(
                    (OutboxMail.id == mail.id) & OutboxMail.sent_at.is_null() & (OutboxMail.next_attempt_at <= now)
                )
                if lease.execute() == 1:
                    claimed.append(mail)
            return claimed

    def mark_sent(self, mail_id: int) -> None:
        with self.db.connection_context():
            OutboxMail.update(sent_at=utcnow(), text_body=None, html_body=None, last_error=None).where(
                OutboxMail.id == mail_id
            ).execute()

    def retry_mail(self, mail_id: int, attempts: int, delay_s: float, error: str) -> None:
        with self.db.connection_context():
            OutboxMail.update(
                attempts=attempts,
                next_attempt_at=utcnow() + timedelta(seconds=delay_s),
                last_error=error[:1000],
            ).where(OutboxMail.id == mail_id).execute()

    def pending_mails(self) -> int:
        """Mails not yet delivered (due or waiting for a retry)."""
        with self.db.connection_context():
            return OutboxMail.select().where(OutboxMail.sent_at.is_null()).count()

    def seconds_to_next_mail(self) -> float | None:
        """Seconds until the earliest undelivered mail is due (0 if overdue); None if none waits."""
        with self.db.connection_context():
            due = OutboxMail.select(pw.fn.MIN(OutboxMail.next_attempt_at)).where(OutboxMail.sent_at.is_null()).scalar()
        if due is None:
            return None
        if isinstance(due, str):  # SQLite hands aggregates back as text
            due = datetime.fromisoformat(due)
        return max(0.0, (due - utcnow()).total_seconds())
