"""Opening the database, bounding every operation in time, and knowing when it is away.

A database that is down or hung must cost a request a clear 503, quickly, and never a thread
that waits without limit: connections and statements have deadlines (PostgreSQL through a
psycopg2 wait callback, which also covers a server that accepts bytes but never answers;
SQLite through its busy timeout), and ``DatabaseHealth`` is a circuit breaker that fails
requests at once while the database is known to be away. A probe (``DatabaseProbe``) closes it
again as soon as the database answers, so recovery needs no restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import peewee as pw
from playhouse.pool import MaxConnectionsExceeded, PooledPostgresqlDatabase, PooledSqliteDatabase

from service import polling
from service.background import Loop
from service.config import sqlite_path
from service.logs import first_line

log = logging.getLogger(__name__)

# A pooled request thread waits this long for a free connection before failing.
POOL_WAIT_S = 5
# A pooled PostgreSQL connection is opened again once this old: after a failover, connections
# to the old primary, now a standby that refuses every write, would otherwise stay for good.
RENEW_AFTER_S = 60
# What the driver raises when the database cannot be reached or does not answer in time.
UNAVAILABLE_ERRORS = (pw.OperationalError, pw.InterfaceError, MaxConnectionsExceeded)


def unavailable(exc: BaseException) -> bool:
    """The database cannot serve: unreachable, too slow, or unreadable. An unreadable SQLite file
    ("file is not a database", "database disk image is malformed") raises peewee's DatabaseError
    itself, whose subclasses (a key conflict, a faulty statement) are no outage."""
    return isinstance(exc, UNAVAILABLE_ERRORS) or type(exc) is pw.DatabaseError


# What PostgreSQL answers a connection whose settings are wrong, not one that comes too early:
# no such database or role, a refused password or address (psycopg2 gives them no SQLSTATE);
# and what libpq says itself when the server asks for a password the URL does not have.
_MISCONFIGURED = (
    "does not exist",
    "authentication failed",
    "no pg_hba.conf entry",
    "pg_hba.conf rejects",
    "permission denied",
)
_NO_PASSWORD = "fe_sendauth:"


def _driver(exc: BaseException) -> tuple[BaseException, str, str | None]:
    """The driver's error behind peewee's (raised while handling it), its SQLite error name ("" on
    PostgreSQL) and its SQLSTATE (None on SQLite, and for a refused connection)."""
    driver = exc.__context__ or exc
    return driver, getattr(driver, "sqlite_errorname", ""), getattr(driver, "pgcode", None)


def misconfigured(exc: BaseException) -> bool:
    """The database answered, and refused this connection's settings: waiting will not help."""
    text = str(_driver(exc)[0])
    return _NO_PASSWORD in text or ("FATAL:" in text and any(words in text for words in _MISCONFIGURED))


# SQLite's I/O errors in writing a file that still reads (made immutable, or its file system
# remounted read-only after disk errors); one that cannot be read is away.
WRITE_ERRORS = ("SQLITE_IOERR_WRITE", "SQLITE_IOERR_FSYNC", "SQLITE_IOERR_DIR_FSYNC", "SQLITE_IOERR_TRUNCATE")


def unwritable(exc: BaseException) -> bool:
    """The database answers but refuses writes: a full disk (SQLite's SQLITE_FULL, PostgreSQL's
    53100), a read-only file or an I/O error writing it. Reads go on, so this is no outage for
    the breaker."""
    _, name, code = _driver(exc)
    # Extended names too: SQLITE_READONLY_DIRECTORY, _CANTINIT… (a read-only folder, WAL files).
    # PostgreSQL: disk full (53100), or a read-only transaction (25006: a standby after a failover,
    # or default_transaction_read_only set).
    return name.startswith(("SQLITE_FULL", "SQLITE_READONLY", *WRITE_ERRORS)) or code in ("53100", "25006")


# What PostgreSQL answers a new connection when every slot is taken, or every slot its role or
# database may have (53300; psycopg2 gives a refused connection no SQLSTATE).
_CROWDED = ("too many clients", "remaining connection slots are reserved", "too many connections for")


def crowded(exc: BaseException) -> bool:
    """PostgreSQL, or this process's own pool, has no connection to spare: the database serves
    the connections already lent, so this is no outage (an open breaker would refuse them all,
    and its probe, which needs a new connection, would not get in either)."""
    if isinstance(exc, MaxConnectionsExceeded):
        return True
    if not isinstance(exc, pw.OperationalError):
        return False
    driver, _, code = _driver(exc)
    return code == "53300" or (code is None and any(text in str(driver) for text in _CROWDED))


# What a live server answers a statement that waited too long for a lock, or ran past
# statement_timeout: query_canceled, lock_not_available, deadlock_detected, serialization_failure.
_BUSY_CODES = ("57014", "55P03", "40P01", "40001")
# And a session it ended for idling in a transaction (idle_in_transaction_session_timeout set low
# on the server: each one opened and closed the breaker for everyone); libpq gives it no SQLSTATE.
_IDLE_IN_TRANSACTION = "terminating connection due to idle-in-transaction timeout"


def busy(exc: BaseException) -> bool:
    """The database answers, but this statement waited on a lock another session holds (or ran
    past DB_STATEMENT_TIMEOUT_SECONDS on the server): no outage. An open breaker refused every
    request, the tables that were not locked and /readyz's included, and each statement that
    timed out opened and closed it again, two log lines each."""
    if not isinstance(exc, pw.OperationalError):
        return False
    driver, name, code = _driver(exc)
    # SQLite's extended names too (SQLITE_BUSY_SNAPSHOT…)
    return code in _BUSY_CODES or name.startswith("SQLITE_BUSY") or _IDLE_IN_TRANSACTION in str(driver)


def duplicate(exc: BaseException) -> bool:
    """A unique index refused the row (SQLite's SQLITE_CONSTRAINT_UNIQUE, PostgreSQL's 23505)."""
    _, name, code = _driver(exc)
    return name == "SQLITE_CONSTRAINT_UNIQUE" or code == "23505"


# The one unique index a request may meet by design: two verifications of one email at once
# (``Store.add_key``, ``KeyService.verify``). PostgreSQL names the index, SQLite its column.
_ACTIVE_KEY = ("api_key_one_active_per_email", "api_key.email")


def active_key_conflict(exc: BaseException) -> bool:
    """Another transaction activated a key for the same email first."""
    return duplicate(exc) and any(name in str(_driver(exc)[0]) for name in _ACTIVE_KEY)


def refusal(exc: BaseException) -> str | None:
    """What the database refuses when it answers, but not this statement or connection: the
    request gets its 503, the others go on, and the log says so once a minute. None otherwise."""
    if unwritable(exc):
        return "cannot write"
    if crowded(exc):
        return "has no connection to spare"
    if busy(exc):
        return "is busy (a lock held, or a statement past its timeout)"
    if isinstance(exc, pw.IntegrityError) and not active_key_conflict(exc):
        # A schema this version does not know (a column it never fills), or an id sequence behind
        # its table (data restored or copied without it): after a rollback. A 500 each, before.
        return "refused a row (is its schema from another version, or an id sequence behind its table?)"
    if column_missing(exc):
        return "lacks a column (is its schema from another version?)"
    return None


def column_missing(exc: BaseException) -> bool:
    """A column the service uses is missing: renamed or dropped by hand, or a schema of another
    version. A 500 with a traceback on PostgreSQL (42703), and on SQLite an outage that opened
    and closed the breaker at each request."""
    driver, name, code = _driver(exc)
    text = str(driver)
    return code == "42703" or (name == "SQLITE_ERROR" and ("no such column" in text or "has no column named" in text))


def schema_lost(exc: BaseException) -> bool:
    """A table of the service is missing: the database was dropped and made again, or replaced."""
    driver, name, code = _driver(exc)
    undefined_table = code == "42P01"
    return undefined_table or (name == "SQLITE_ERROR" and str(driver).startswith("no such table"))


class DatabaseUnavailable(Exception):
    """The database is down, hung, locked or unwritable: the request gets a 503."""


# An outage is logged when it starts and ends, and reminded of this often in between.
REMIND_EVERY_S = 60.0
# While the breaker is open, the probe tries the database this often.
PROBE_EVERY_S = 1.0

# What background loops retry without logging: the breaker has logged the outage already.
QUIET_ERRORS = (DatabaseUnavailable, *UNAVAILABLE_ERRORS)


class DatabaseHealth:
    """Circuit breaker and outage log: one line when an outage starts, one when it ends, and a
    reminder every ``REMIND_EVERY_S`` in between, never a traceback per request."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._last_log = 0.0
        self._refused = 0
        self._last_refusal_log = -REMIND_EVERY_S  # the first refusal is logged at once
        self._refusals = 0
        self.on_failure: Callable[[], None] = lambda: None  # the probe's wake-up

    @property
    def available(self) -> bool:
        return self._down_since is None

    def check(self) -> None:
        """Fail at once while the database is known to be away (the probe tries for everyone)."""
        if self._down_since is not None:
            with self._lock:
                self._refused += 1
            raise DatabaseUnavailable("the database is unavailable")

    def failed(self, exc: BaseException, wake_probe: bool = True) -> None:
        """An error that means the database is away opens the breaker; one that means it refuses
        this request only (``refusal``: it cannot write, has no connection to spare, or refuses
        the row) is only logged: that request gets its 503, and the others (the key lookups of
        denoising, those that find a pooled connection) go on being served."""
        now = self._clock()
        reason = refusal(exc)
        if reason:
            self._refused_here(reason, exc, now)
            return
        with self._lock:
            if self._down_since is None:
                self._down_since, self._last_log, self._refused = now, now, 0
                log.error("Database unavailable (%s): requests that need it get 503 until it answers", first_line(exc))
            elif now - self._last_log >= REMIND_EVERY_S:
                self._last_log = now
                log.warning(
                    "Database still unavailable after %.0f s (%s); %d requests refused so far",
                    now - self._down_since,
                    first_line(exc),
                    self._refused,
                )
        if wake_probe:
            self.on_failure()

    def _refused_here(self, reason: str, exc: BaseException, now: float) -> None:
        """One line, then one per ``REMIND_EVERY_S`` while writes (or new connections) keep failing."""
        with self._lock:
            self._refusals += 1
            if now - self._last_refusal_log < REMIND_EVERY_S:
                return
            count, self._refusals, self._last_refusal_log = self._refusals, 0, now
        log.error(
            "Database %s (%s): %d request(s) refused since the last such line",
            reason,
            first_line(exc),
            count,
        )

    def succeeded(self) -> None:
        if self._down_since is None:  # the common case: no lock
            return
        with self._lock:
            if self._down_since is None:
                return
            log.warning(
                "Database available again after %.1f s; %d requests were refused meanwhile",
                self._clock() - self._down_since,
                self._refused,
            )
            self._down_since = None


class _Guarded:
    """Mixed into the pooled database classes: every connection and statement goes through the
    breaker, and the driver's unavailability errors become ``DatabaseUnavailable``."""

    health: DatabaseHealth
    probe_sql = "SELECT 1"  # what tells that the database answers

    def check_file(self) -> None:
        """Raise peewee's OperationalError if the database's file is not the one opened."""

    def on_schema_lost(self) -> None:
        """A statement found a table missing (``Store`` makes them again)."""

    def connect(self, reuse_if_open: bool = False) -> bool:
        self.health.check()
        with self._translated():
            self.check_file()
            return super().connect(reuse_if_open)  # type: ignore[misc]

    def _connect(self) -> object:
        """Runs under the database's lock: threads that queued on it while the first one found
        the database away fail at once instead of trying one after another."""
        self.health.check()
        return super()._connect()  # type: ignore[misc]

    def _failed(self, exc: BaseException) -> None:
        """Open the breaker, and drop the idle pooled connections: after an outage they are
        dead, and each would otherwise fail one request once the database is back."""
        self.health.failed(exc)
        if not refusal(exc):
            self.close_idle()  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """The driver's unavailability errors open the breaker and become ``DatabaseUnavailable``;
        so do missing tables, which ``on_schema_lost`` is told of, and what the database refuses
        (``refusal``), which opens no breaker."""
        try:
            yield
        except Exception as exc:
            if schema_lost(exc):
                self.on_schema_lost()
                raise DatabaseUnavailable(first_line(exc)) from exc
            if not (unavailable(exc) or refusal(exc)):
                raise
            self._failed(exc)
            raise DatabaseUnavailable(first_line(exc)) from exc

    def execute_sql(self, sql: str, params: tuple | None = None, *args: object, **kwargs: object) -> object:
        with self._translated():
            cursor = super().execute_sql(sql, params, *args, **kwargs)  # type: ignore[misc]
        self.health.succeeded()
        return cursor

    def commit(self) -> None:
        """Where SQLite writes a transaction's pages, so where a full disk shows."""
        with self._translated():
            super().commit()  # type: ignore[misc]

    def rollback(self) -> None:
        """Where a connection that broke during its transaction shows (PostgreSQL gone)."""
        with self._translated():
            super().rollback()  # type: ignore[misc]

    def probe(self) -> None:
        """``SELECT 1`` on a fresh connection, bypassing the breaker and the pool; raises peewee's
        errors when it fails."""
        self.check_file()
        with pw.__exception_wrapper__:
            conn = self._raw_connect()  # not the pool's _connect: that one counts the connection as lent
            try:
                cursor = conn.cursor()
                cursor.execute(self.probe_sql)
                cursor.fetchone()
            finally:
                conn.close()


class GuardedSqlite(_Guarded, PooledSqliteDatabase):
    _raw_connect = pw.SqliteDatabase._connect
    probe_sql = "PRAGMA schema_version"  # reads the file's header, which SELECT 1 does not
    identity: tuple[int, int] = (0, 0)  # the file's device and inode when the service opened it

    def rollback(self) -> None:
        """SQLite rolls a transaction back itself when its commit fails (a full disk, an I/O
        error): the ROLLBACK peewee sends then fails too ("no transaction is active"), and its
        error would replace the commit's, which says what happened."""
        conn = self._state.conn
        if conn is not None and not conn.in_transaction:
            return
        super().rollback()

    def check_file(self) -> None:
        """A file deleted while the service runs takes every later write with it (open
        connections write to the unlinked file, new ones would create an empty one); a file
        replaced under it (a restore) would mix two databases. Both refuse, until a restart
        opens what is at the path then. Checked at every checkout: one stat call."""
        try:
            stat = os.stat(self.database)
        except OSError as exc:
            raise pw.OperationalError(
                f"the SQLite file {self.database} is gone ({exc.strerror}); restore it and restart the service"
            ) from None
        if (stat.st_dev, stat.st_ino) != self.identity:
            raise pw.OperationalError(
                f"the SQLite file {self.database} was replaced while the service ran; restart the service to open it"
            )


class GuardedPostgres(_Guarded, PooledPostgresqlDatabase):
    _raw_connect = pw.PostgresqlDatabase._connect

    def rollback(self) -> None:
        """A connection the server closed (ending its session rolled the transaction back) has
        nothing to roll back: the ROLLBACK peewee sends fails ("connection already closed"), and
        its error, taken for an outage, replaced the one that said what happened."""
        conn = self._state.conn
        if conn is not None and conn.closed:
            return
        super().rollback()

    def _is_closed(self, conn: object) -> bool:
        """Without a round trip: peewee's own check sends ``SELECT 1`` for every checkout, under
        the database's lock, so a hung server held every thread for a deadline per idle
        connection. A connection the server closed while it idled in the pool (its
        ``idle_session_timeout``, a restart, a proxy's idle timeout) has something to read, its
        goodbye: an idle connection has nothing else (the listener has its own). Before, its
        first statement failed, and the breaker opened for everyone. One that died silently
        still fails its first statement, which opens the breaker and drops the idle ones."""
        from psycopg2 import extensions

        if conn.closed or conn.get_transaction_status() == extensions.TRANSACTION_STATUS_UNKNOWN:
            return True
        try:
            return bool(polling.ready([conn.fileno()], polling.READ, 0))
        except OSError:
            return True


# -- deadlines on PostgreSQL -------------------------------------------------------------------
_deadlines = {"connect": 3.0, "statement": 3.0}


def _wait_with_deadline(conn: object) -> None:
    """psycopg2's wait callback: drives every blocking call through ``poll`` with a deadline.

    A server stopped with SIGSTOP keeps its sockets open and the kernel acknowledges what is
    sent, so neither TCP timeouts nor the server's own ``statement_timeout`` end the wait; this
    does. psycopg2 then marks the connection broken, and the pool never hands it out again.
    """
    from psycopg2 import OperationalError, extensions

    kind = "connect" if conn.status == extensions.STATUS_SETUP else "statement"
    deadline = time.monotonic() + _deadlines[kind]
    while True:
        state = conn.poll()
        if state == extensions.POLL_OK:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise OperationalError(f"database {kind} timed out after {_deadlines[kind]:g} s")
        if state == extensions.POLL_READ:
            polling.ready([conn.fileno()], polling.READ, remaining)
        elif state == extensions.POLL_WRITE:
            polling.ready([conn.fileno()], polling.WRITE, remaining)
        else:
            raise OperationalError(f"unexpected poll state {state}")


def _bound_postgres(connect_s: float, statement_s: float) -> None:
    import psycopg2.extensions

    _deadlines.update(connect=connect_s, statement=statement_s)
    psycopg2.extensions.set_wait_callback(_wait_with_deadline)


def _create_private(path: str) -> None:
    """A new SQLite file is created readable by this user only; an existing one is narrowed."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    try:
        if os.stat(path).st_uid == os.getuid():
            os.chmod(path, 0o600)
    except OSError:
        pass


def postgres_params(url: str) -> dict[str, Any]:
    """psycopg2's connection arguments from a ``postgresql://`` URL; query parameters pass through."""
    parts = urlsplit(url)
    return {
        "database": unquote(parts.path.lstrip("/")) or "postgres",
        "host": parts.hostname or None,
        "port": parts.port,
        "user": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        **dict(parse_qsl(parts.query)),
    }


def open_database(
    url: str, max_connections: int, health: DatabaseHealth, connect_timeout_s: float, statement_timeout_s: float
) -> pw.Database:
    """``sqlite:///path`` (WAL) or ``postgresql://user:pw@host:port/db?param=…``, both pooled."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = str(sqlite_path(url))  # Config refuses a URL that names no file
        try:
            _create_private(path)
        except OSError as exc:
            raise pw.OperationalError(f"cannot create {path}: {exc.strerror or exc}") from None
        db: pw.Database = GuardedSqlite(
            path,
            max_connections=max_connections,
            timeout=POOL_WAIT_S,
            check_same_thread=False,  # pooled connections move between request threads
            lock_type="IMMEDIATE",  # take the write lock at BEGIN: no upgrade deadlocks
            pragmas={
                "journal_mode": "wal",
                "synchronous": "normal",
                "busy_timeout": int(statement_timeout_s * 1000),
                "foreign_keys": 1,
            },
        )
        stat = os.stat(path)
        db.identity = (stat.st_dev, stat.st_ino)
    elif parts.scheme in ("postgresql", "postgres"):
        params = postgres_params(url)
        server_timeout = f"-c statement_timeout={int(statement_timeout_s * 1000)}"
        params["options"] = f"{params['options']} {server_timeout}" if params.get("options") else server_timeout
        _bound_postgres(connect_timeout_s, statement_timeout_s + 0.5)  # the server's own timeout first
        db = GuardedPostgres(
            max_connections=max_connections, timeout=POOL_WAIT_S, stale_timeout=RENEW_AFTER_S, **params
        )
    else:  # Config refuses other schemes
        raise ValueError(f"not a database URL: {redact(url)}")
    db.health = health
    return db


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


class DatabaseProbe:
    """While the breaker is open, tries the database every ``PROBE_EVERY_S`` and closes the breaker
    when it answers; idle otherwise (woken by the breaker when an outage starts)."""

    def __init__(self, db_getter: Callable[[], pw.Database], health: DatabaseHealth) -> None:
        self._db = db_getter
        self._health = health
        self._loop = Loop("database-probe", self._step, error_delay_s=PROBE_EVERY_S)

    def start(self) -> DatabaseProbe:
        self._health.on_failure = self._loop.wake
        self._loop.start()
        return self

    def close(self) -> None:
        self._health.on_failure = lambda: None
        self._loop.close()

    def _step(self) -> float:
        if self._health.available:
            return 3600.0
        try:
            self._db().probe()
        except Exception as exc:  # whatever the driver raises, the database is still away
            self._health.failed(exc, wake_probe=False)
            return PROBE_EVERY_S
        self._health.succeeded()
        return 3600.0
