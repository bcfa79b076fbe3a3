"""Persistence: Peewee models and the queries the service needs (keys, tokens, mail outbox).

Only sha256 digests of keys and tokens are stored, so a copy of the database grants nothing. The
store talks SQL only; the flows that combine these queries live in ``keys`` and ``mail``.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import peewee as pw
import psycopg2
from playhouse.migrate import SchemaMigrator, migrate

from service.database import (
    DatabaseHealth,
    DatabaseUnavailable,
    first_line,
    misconfigured,
    open_database,
    postgres_params,
    unavailable,
)
from service.messages import Mail

log = logging.getLogger(__name__)

GENERATION = "generation"
DEACTIVATION = "deactivation"
# A process that claimed a mail and died leaves it to other workers after this long.
CLAIM_LEASE = timedelta(minutes=2)
# PostgreSQL: every key deactivation is announced here, so that each replica's cache of active
# keys forgets it at once (service.notifications); SQLite has no such thing and relies on the TTL.
KEYS_CHANNEL = "heartify_keys"
# The listening connection: give up connecting after this long, and notice a peer that went away
# without closing (TCP keepalives: idle, interval, count) instead of waiting on it forever.
LISTEN_CONNECT = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
}
# Replicas starting together on an empty database would race on CREATE TABLE IF NOT EXISTS
# (PostgreSQL checks the catalog before it locks it): they take turns on this advisory lock.
SCHEMA_LOCK = 7_201_020
# After a failed try to make lost tables again (no CREATE right, say), the next waits this long.
RESTORE_RETRY_S = 10.0

_proxy = pw.DatabaseProxy()


@dataclass(frozen=True)
class TokenRecord:
    """A verification token as the key flows read it (``find_token``)."""

    id: int
    kind: str  # GENERATION or DEACTIVATION
    email: str
    expires_at: datetime
    used: bool


@dataclass(frozen=True)
class ClaimedMail:
    """A mail the outbox worker has claimed (``claim_due_mails``), its bodies still sealed."""

    id: int
    mail: Mail
    attempts: int  # made before this claim
    claimed_until: datetime  # the claim's end as written: ``release_mails`` gives back only this claim
    unconfirmed: int = 0  # attempts whose data the server took without confirming it


class KeyConflict(Exception):
    """A concurrent transaction activated a key for the same email first (the unique index)."""


# PostgreSQL's clock, in the form the timestamp columns hold (``utcnow``).
_SERVER_NOW = pw.SQL("(now() AT TIME ZONE 'UTC')")


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
    # Who asked for the mail that carries the token: a digest of the client's address, so the
    # mail rate limits can count per client without the database holding addresses.
    client = pw.CharField(max_length=64, null=True)
    # The mailbox the email reaches (``keys.mailbox``): the per-address mail limit counts by it.
    mailbox = pw.CharField(max_length=254, null=True)

    class Meta:
        table_name = "verification_token"
        indexes = (
            (("email", "created_at"), False),
            (("client", "created_at"), False),
            (("mailbox", "created_at"), False),
        )


class OutboxMail(_Model):
    recipient = pw.CharField(max_length=254)
    subject = pw.CharField(max_length=200)
    # Bodies carry keys and links: sealed with SECRET_KEY (service.sealing), wiped once the mail
    # is delivered or given up.
    text_body = pw.TextField(null=True)
    html_body = pw.TextField(null=True)
    created_at = pw.DateTimeField(default=utcnow)
    attempts = pw.IntegerField(default=0)
    next_attempt_at = pw.DateTimeField(default=utcnow, index=True)
    sent_at = pw.DateTimeField(null=True)
    failed_at = pw.DateTimeField(null=True)  # given up: refused permanently
    last_error = pw.TextField(null=True)
    # Of the attempts, those whose data the server took without confirming it (None: none).
    unconfirmed = pw.IntegerField(null=True)

    class Meta:
        table_name = "outbox_mail"

    def claimed(self, until: datetime) -> ClaimedMail:
        mail = Mail(self.recipient, self.subject, self.text_body or "", self.html_body or "")
        return ClaimedMail(self.id, mail, self.attempts, until, self.unconfirmed or 0)


MODELS = (ApiKey, Token, OutboxMail)


class Store:
    """Queries over one pooled database. Peewee binds models globally: one store per process."""

    def __init__(
        self,
        url: str,
        max_connections: int,
        connect_timeout_s: float = 3.0,
        statement_timeout_s: float = 3.0,
        may_be_away: bool = False,
    ) -> None:
        self._url = url
        self._max_connections = max_connections
        self.health = DatabaseHealth()
        self.answered = False  # whether the database answered the start's check
        self._timeouts = (connect_timeout_s, statement_timeout_s)
        self._may_be_away = may_be_away
        self.db: pw.Database | None = None  # opened by start
        self._active_key_sql = ""  # written by start, in the database's dialect
        self._active_key_flags: tuple = ()
        self._restoring = threading.Lock()
        self._next_restore = 0.0  # time.monotonic() before which a failed restore is not tried again

    def start(self) -> Store:
        """Open the pool and create what is missing (``IF NOT EXISTS`` for every table and index).

        A database that cannot be reached fails the start (in one sentence: ``startup``), unless
        it ``may_be_away``: then the breaker opens, and the store serves once the probe finds the
        database back (a worker replaced during an outage; its supervisor's start checked the
        database and made the tables, and a table found missing later is made again). A database
        that refuses the settings (a role, password or database changed since) fails it still:
        the supervisor tries again later, and the health checks fail once no worker serves."""
        self.db = open_database(self._url, self._max_connections, self.health, *self._timeouts)
        try:
            self.db.probe()
            self.answered = True
        except Exception as exc:
            if not self._may_be_away or misconfigured(exc) or not unavailable(exc):
                raise
            # The breaker opens; or, with no connection to spare (``crowded``), only this check
            # is refused, and the tables are left to the supervisor's start that made them.
            self.health.failed(exc)
        _proxy.initialize(self.db)
        # The key lookup runs on every denoising request: peewee writes its SQL once, in the
        # database's own dialect, and each request only executes it.
        self._active_key_sql, params = (
            ApiKey.select(ApiKey.id)
            .where((ApiKey.key_hash == "") & (ApiKey.is_active == True))  # noqa: E712
            .sql()
        )
        self._active_key_flags = tuple(params[1:])  # the key's digest goes first
        self.db.on_schema_lost = self._restore_schema
        if self.answered:
            self.create_tables()
        return self

    def _restore_schema(self) -> None:
        """The tables went away under the service (the database dropped and made again, or
        replaced by an empty one): make them again, as a restart would, on a thread of its own
        (the request that found out holds a failed transaction) and once at a time. Until then
        requests get 503; the keys, tokens and mails the lost tables held are gone."""
        if not self._restoring.acquire(blocking=False):
            return
        if time.monotonic() < self._next_restore:  # the last try failed: one a while, not one a request
            self._restoring.release()
            return

        def restore() -> None:
            try:
                if self.create_tables():  # else another thread or replica has made them meanwhile
                    log.error(
                        "The database had lost the service's tables (dropped or replaced): made them again; "
                        "the keys, tokens and mails it held before are gone"
                    )
            except Exception as exc:  # a statement that finds them missing later tries again
                self._next_restore = time.monotonic() + RESTORE_RETRY_S
                log.error("Cannot make the tables again (next try in %g s): %s", RESTORE_RETRY_S, first_line(exc))
            finally:
                self._restoring.release()

        threading.Thread(target=restore, name="schema-restore", daemon=True).start()

    def create_tables(self) -> bool:
        """Idempotent: ``IF NOT EXISTS`` for every table and index, and the columns that later
        versions added to existing tables (all nullable).

        Only when something is missing: ``CREATE INDEX IF NOT EXISTS`` locks its table before it
        looks, so a process starting beside replicas that serve held every table against their
        writes until it committed, and a start once met another replica's transaction in a
        deadlock. The check reads the catalog, which locks no table. True when it made something.
        """
        with self.db.connection_context():
            if self._schema_complete():
                return False
            with self.db.atomic():
                if self.is_postgres:
                    self.db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                if self._schema_complete():  # another process made it meanwhile
                    return False
                self._create_missing()
                return True

    def _schema_complete(self) -> bool:
        tables = set(self.db.get_tables())
        for model in MODELS:
            table = model._meta.table_name
            if table not in tables:
                return False
            columns = {column.name for column in self.db.get_columns(table)}
            indexes = {index.name for index in self.db.get_indexes(table)}
            if any(f.column_name not in columns for f in model._meta.sorted_fields):
                return False
            if any(index._name not in indexes for index in model._meta.fields_to_index()):
                return False
        return True

    def _create_missing(self) -> None:
        self.db.create_tables(MODELS, safe=True)
        migrator = SchemaMigrator.from_database(self.db)
        for model in MODELS:
            present = {column.name for column in self.db.get_columns(model._meta.table_name)}
            missing = [f for f in model._meta.sorted_fields if f.column_name not in present]
            if missing:
                migrate(*(migrator.add_column(model._meta.table_name, f.column_name, f) for f in missing))
                log.info("Added %s to %s", ", ".join(f.column_name for f in missing), model._meta.table_name)
        self.db.create_tables(MODELS, safe=True)  # indexes on the columns just added

    @property
    def is_postgres(self) -> bool:
        """PostgreSQL: it has NOTIFY, advisory locks and ``SKIP LOCKED``; SQLite has none of them."""
        return isinstance(self.db, pw.PostgresqlDatabase)

    def listen(self, channel: str) -> psycopg2.extensions.connection:
        """A connection of its own, outside the pool (it stays in LISTEN for good), subscribed to
        ``channel``; notifications arrive on it as their transactions commit."""
        conn = psycopg2.connect(**{**LISTEN_CONNECT, **postgres_params(self._url)})
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'LISTEN "{channel}"')
        except psycopg2.Error:
            conn.close()
            raise
        return conn

    def ping(self) -> bool:
        """Whether the database answers now, within the statement timeout (at once when the
        breaker knows it is away)."""
        try:
            with self.db.connection_context():
                self.db.execute_sql(self.db.probe_sql)
        except (DatabaseUnavailable, pw.PeeweeException):
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
        count = (
            ApiKey.update(is_active=False, deactivated_at=now)
            .where((ApiKey.email == email) & (ApiKey.is_active == True))  # noqa: E712
            .execute()
        )
        if count and self.is_postgres:
            # Queued in this transaction: the listeners hear it when (and only if) it commits.
            self.db.execute_sql("SELECT pg_notify(%s, '')", (KEYS_CHANNEL,))
        return count

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
    def add_token(
        self,
        token_hash: str,
        kind: str,
        email: str,
        now: datetime,
        ttl: timedelta,
        client: str | None = None,
        mailbox: str | None = None,
    ) -> None:
        Token.create(
            token_hash=token_hash,
            kind=kind,
            email=email,
            created_at=now,
            expires_at=now + ttl,
            client=client,
            mailbox=mailbox,
        )

    def lock_names(self, *names: str) -> None:
        """Serialise the transactions about the same names (an email, a client) until this one
        ends: a mail request's count and insert, a verification's updates of the email's tokens
        and keys. SQLite's write lock, taken at BEGIN, already does."""
        if self.is_postgres:
            for name in sorted(names):
                self.db.execute_sql("SELECT pg_advisory_xact_lock(hashtext(%s))", (name,))

    def mail_requests_since(
        self, since: datetime, mailbox: str | None = None, client: str | None = None
    ) -> tuple[int, datetime | None]:
        """How many tokens were mailed since ``since`` to this mailbox or for this client, and the oldest's time."""
        if mailbox is None:
            where = Token.client == client
        else:  # rows written before the mailbox column, by an older version, have only the email
            where = (Token.mailbox == mailbox) | (Token.mailbox.is_null() & (Token.email == mailbox))
        count, oldest = (
            Token.select(pw.fn.COUNT(Token.id), pw.fn.MIN(Token.created_at))
            .where(where & (Token.created_at > since))
            .scalar(as_tuple=True)
        )
        if isinstance(oldest, str):  # SQLite hands aggregates back as text
            oldest = datetime.fromisoformat(oldest)
        return count, oldest

    def find_token(self, token_hash: str) -> TokenRecord | None:
        row = Token.get_or_none(Token.token_hash == token_hash)
        if row is None:
            return None
        return TokenRecord(row.id, row.kind, row.email, row.expires_at, row.used_at is not None)

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
            next_attempt_at=self._outbox_time(now),
        )

    def _outbox_time(self, now: datetime) -> datetime | pw.Node:
        """The time the outbox's claims and due times are written and compared at: on PostgreSQL
        the server's own clock, which every replica shares (by their own clocks, a replica whose
        clock was behind by more than ``CLAIM_LEASE`` took mails another was sending, and they
        went twice; one ahead queued mails due in the future); on SQLite, one machine's, ``now``."""
        return _SERVER_NOW if self.is_postgres else now

    def claim_due_mails(self, limit: int, now: datetime) -> list[ClaimedMail]:
        """Due mails this worker now owns for ``CLAIM_LEASE``: concurrent workers (threads or
        replicas) never claim the same mail, so each is sent once unless a worker dies between
        sending it and ``mark_sent`` (then it is sent again after the lease: SMTP offers no way
        to make delivery and the database write one step).
        """
        oldest = (OutboxMail.next_attempt_at, OutboxMail.id)
        now = self._outbox_time(now)
        with self.db.connection_context(), self.db.atomic():
            until = now + CLAIM_LEASE
            due = OutboxMail.sent_at.is_null() & OutboxMail.failed_at.is_null() & (OutboxMail.next_attempt_at <= now)
            if self.is_postgres:
                # One statement: rows another worker is claiming are skipped, not waited for.
                free = OutboxMail.select(OutboxMail.id).where(due).order_by(*oldest).limit(limit)
                lease = OutboxMail.update(next_attempt_at=until).where(
                    OutboxMail.id.in_(free.for_update("FOR UPDATE SKIP LOCKED"))
                )
                rows = sorted(lease.returning(OutboxMail).execute(), key=lambda mail: mail.id)
                return [row.claimed(row.next_attempt_at) for row in rows]  # the claim's end, as written
            # SQLite: the IMMEDIATE transaction already holds the write lock, so no other worker
            # is in between. The rows are read before the first update: updating while the
            # select's cursor was open upgraded a read snapshot to a write, which fails at once
            # ("database is locked") when another connection wrote in between.
            rows = list(OutboxMail.select().where(due).order_by(*oldest).limit(limit))
            OutboxMail.update(next_attempt_at=until).where(OutboxMail.id.in_([m.id for m in rows])).execute()
            return [row.claimed(until) for row in rows]

    def mark_sent(self, mail_id: int, now: datetime) -> None:
        with self.db.connection_context():
            OutboxMail.update(sent_at=now, text_body=None, html_body=None, last_error=None).where(
                OutboxMail.id == mail_id
            ).execute()

    def release_mails(self, claimed: list[ClaimedMail], now: datetime) -> None:
        """Give back this worker's claim on mails it has not tried (as ``claim_due_mails``
        returned them): due again now, for any worker. Not a claim another worker has made since
        this one's ended: the claim's end must still be the one this worker wrote."""
        with self.db.connection_context():
            for mail in claimed:
                OutboxMail.update(next_attempt_at=self._outbox_time(now)).where(
                    (OutboxMail.id == mail.id)
                    & (OutboxMail.next_attempt_at == mail.claimed_until)
                    & OutboxMail.sent_at.is_null()
                    & OutboxMail.failed_at.is_null()
                ).execute()

    def retry_mail(
        self, mail_id: int, attempts: int, delay_s: float, error: str, now: datetime, unconfirmed: int = 0
    ) -> None:
        with self.db.connection_context():
            OutboxMail.update(
                attempts=attempts,
                unconfirmed=unconfirmed,
                next_attempt_at=self._outbox_time(now) + timedelta(seconds=delay_s),
                last_error=error[:1000],
            ).where(OutboxMail.id == mail_id).execute()

    def give_up_mail(self, mail_id: int, attempts: int, error: str, now: datetime) -> None:
        """Kept as failed, with the reason; its bodies, which may carry a key, are wiped."""
        with self.db.connection_context():
            OutboxMail.update(
                attempts=attempts, failed_at=now, last_error=error[:1000], text_body=None, html_body=None
            ).where(OutboxMail.id == mail_id).execute()

    def purge(self, before: datetime) -> dict[str, int]:
        """Delete what no flow needs after ``before``: spent or expired tokens, delivered or
        given-up mails. Active and deactivated keys stay (they are digests)."""
        with self.db.connection_context(), self.db.atomic():
            tokens = Token.delete().where((Token.used_at < before) | (Token.expires_at < before)).execute()
            mails = OutboxMail.delete().where((OutboxMail.sent_at < before) | (OutboxMail.failed_at < before)).execute()
        return {"tokens": tokens, "mails": mails}

    def pending_mails(self) -> int:
        """Mails not yet delivered (due or waiting for a retry)."""
        with self.db.connection_context():
            return OutboxMail.select().where(OutboxMail.sent_at.is_null() & OutboxMail.failed_at.is_null()).count()

    def seconds_to_next_mail(self, now: datetime) -> float | None:
        """Seconds until the earliest undelivered mail is due (0 if overdue); None if none waits."""
        server_now = [_SERVER_NOW] if self.is_postgres else []  # read in the same query
        with self.db.connection_context():
            due, *server = (
                OutboxMail.select(pw.fn.MIN(OutboxMail.next_attempt_at), *server_now)
                .where(OutboxMail.sent_at.is_null() & OutboxMail.failed_at.is_null())
                .tuples()
                .get()
            )
        if due is None:
            return None
        now = server[0] if server else now
        if isinstance(due, str):  # SQLite hands aggregates back as text
            due = datetime.fromisoformat(due)
        return max(0.0, (due - now).total_seconds())
