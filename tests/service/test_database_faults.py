"""A database that goes away: clear 503s with Retry-After, one log line per outage, keys this
process verified keep denoising, nothing lost, and recovery without a restart. PostgreSQL
faults use a cluster of the test's own (stopped, or frozen with SIGSTOP); SQLite is locked,
corrupted, deleted, replaced, or on a disk that fills up."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from functools import partial

import falcon.testing
import peewee
import psycopg2
import pytest

from service import database, store
from service.app import create_app, upload_gate
from service.database import unwritable
from service.keys import digest
from service.messages import Mail
from service.store import ApiKey, OutboxMail, Store, utcnow

from .conftest import fill, issue_key, verify_link, wait_until

DENOISE = "/api/v1/denoising"
WINDOW = {"ecg_signal": [float(i % 50) for i in range(1300)]}
UNAVAILABLE = {"error": "Service temporarily unavailable: the database does not answer. Try again later."}

pytestmark = pytest.mark.slow


def denoise(client, key: str):
    return client.simulate_post(DENOISE, json=WINDOW, headers={"x-api-key": key})


def assert_unavailable(result) -> None:
    assert result.status_code == 503, result.text
    assert result.json == UNAVAILABLE
    assert int(result.headers["retry-after"]) > 0


def outage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "service.database"]


def test_postgres_stopped_and_restarted(pg_cluster, runtime_with, smtp, caplog):
    caplog.set_level(logging.INFO)
    rt = runtime_with(pg_cluster.url, key_cache_s=0.2, last_used_flush_s=0.1)
    client = falcon.testing.TestClient(create_app(rt.deps))
    key = issue_key(rt.store, "steady@example.org")
    assert denoise(client, key).status_code == 200  # now verified by this process
    assert client.simulate_post("/api/v1/api-keys/generation", json={"email": "before@example.org"}).status_code == 200
    token = verify_link(smtp.mailbox.wait_for(1)[0]).split("token=")[1]
    # Another address's new key deactivates nothing: it emptied the cache, and the outage
    # fallback of every key with it.
    assert client.simulate_get("/api/v1/api-keys/verify", params={"token": token}).status_code == 200
    smtp.mailbox.wait_for(2)

    pg_cluster.stop()
    time.sleep(0.3)  # the key's cache entry expires: it must be read again, and cannot be
    started = time.monotonic()
    assert client.simulate_get("/readyz").status_code == 503
    assert time.monotonic() - started < 2
    gate = upload_gate(rt.deps.keys, rt.store.release)  # a large upload's, from its headers
    refusal = gate("unknown-key")
    assert (refusal.code, refusal.message, refusal.headers) == (503, UNAVAILABLE["error"], (("Retry-After", "5"),))
    assert gate(key) is None  # verified here before: its upload is let in
    for _ in range(20):
        assert_unavailable(denoise(client, "unknown-key"))
        assert_unavailable(client.simulate_post("/api/v1/api-keys/generation", json={"email": "during@example.org"}))
        assert_unavailable(client.simulate_get("/api/v1/api-keys/verify", params={"token": "x" * 43}))
        assert denoise(client, key).status_code == 200
    lines = outage_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith("Database unavailable")
    assert not [r for r in caplog.records if r.exc_info]  # no traceback, for any request

    pg_cluster.start()
    wait_until(lambda: client.simulate_get("/readyz").status_code == 200, 10, "readiness after the restart")
    assert outage_lines(caplog)[-1].startswith("Database available again")
    assert denoise(client, key).status_code == 200
    assert client.simulate_post("/api/v1/api-keys/generation", json={"email": "after@example.org"}).status_code == 200
    assert sorted(m["To"] for m in smtp.mailbox.wait_for(3)) == ["after@example.org", *["before@example.org"] * 2]

    def last_used():
        with rt.store.db.connection_context():
            return ApiKey.get(ApiKey.key_hash == digest(key)).last_used

    wait_until(last_used, 10, "the deferred last_used write")  # touched during the outage, written after


def test_postgres_hung_answers_in_bounded_time_and_cached_keys_keep_working(pg_cluster, runtime_with):
    rt = runtime_with(pg_cluster.url, db_connect_timeout_s=1, db_statement_timeout_s=1)
    client = falcon.testing.TestClient(create_app(rt.deps))
    key = issue_key(rt.store, "cached@example.org")
    assert denoise(client, key).status_code == 200

    pg_cluster.freeze()
    try:
        started = time.monotonic()
        assert client.simulate_get("/readyz").status_code == 503
        assert time.monotonic() - started < 5

        def timed(call) -> tuple[int, float]:
            begin = time.monotonic()
            status = call().status_code
            return status, time.monotonic() - begin

        with ThreadPoolExecutor(8) as pool:
            strangers = [pool.submit(timed, partial(denoise, client, f"unknown-{i}")) for i in range(6)]
            cached = [timed(lambda: denoise(client, key)) for _ in range(5)]
            answers = [f.result(timeout=30) for f in strangers]
        assert [status for status, _ in cached] == [200] * 5
        assert all(status == 503 and seconds < 15 for status, seconds in answers), answers
    finally:
        pg_cluster.thaw()
    wait_until(lambda: client.simulate_get("/readyz").status_code == 200, 10, "readiness after the thaw")
    assert denoise(client, issue_key(rt.store, "new@example.org")).status_code == 200


def test_sqlite_locked_gives_the_same_503_and_recovers(tmp_path, runtime_with, smtp, caplog):
    """A write lock held by another process (a sqlite3 shell): the write that waited past its
    busy timeout gets the 503, and no more; it opened the breaker for every request."""
    url = f"sqlite:///{tmp_path / 'locked.db'}"
    rt = runtime_with(url, db_statement_timeout_s=0.3)
    client = falcon.testing.TestClient(create_app(rt.deps))
    holder = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert_unavailable(client.simulate_post("/api/v1/api-keys/generation", json={"email": "wait@example.org"}))
        assert rt.store.health.available and client.simulate_get("/readyz").status_code == 200
        assert [line.split(" (")[0] for line in outage_lines(caplog)] == ["Database is busy"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    wait_until(lambda: client.simulate_get("/readyz").status_code == 200, 10, "readiness after the lock")
    assert client.simulate_post("/api/v1/api-keys/generation", json={"email": "wait@example.org"}).status_code == 200
    assert smtp.mailbox.wait_for(1)[0]["To"] == "wait@example.org"
    with rt.store.db.connection_context():
        assert OutboxMail.select().count() == 1  # the refused request queued nothing


@pytest.mark.postgres
def test_a_table_locked_by_another_session_refuses_what_needs_it_and_no_more(postgres_url, runtime_with, caplog):
    """A migration or a long transaction holding a lock: each statement that waited past its
    timeout opened the breaker, so every request was refused (readiness and unknown keys too),
    and the log had two lines per timed-out statement."""
    rt = runtime_with(postgres_url, db_statement_timeout_s=0.5)
    client = falcon.testing.TestClient(create_app(rt.deps))
    schema = postgres_url.rsplit("%3D", 1)[1]
    holder = psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user="postgres")
    try:
        with holder.cursor() as cur:
            cur.execute(f'LOCK TABLE "{schema}".verification_token IN ACCESS EXCLUSIVE MODE')
        for n in range(3):
            result = client.simulate_post("/api/v1/api-keys/generation", json={"email": f"locked{n}@example.org"})
            assert_unavailable(result)
        assert rt.store.health.available
        assert client.simulate_get("/readyz").status_code == 200
        assert denoise(client, "an unknown key").status_code == 401  # api_key is not locked
    finally:
        holder.rollback()
        holder.close()
    assert len(outage_lines(caplog)) == 1  # "Database is busy …", once a minute
    result = client.simulate_post("/api/v1/api-keys/generation", json={"email": "locked0@example.org"})
    assert result.status_code == 200


@pytest.mark.postgres
def test_a_pooled_connection_the_server_closed_while_idle_is_not_handed_out(postgres_url, runtime_with):
    """PostgreSQL's idle_session_timeout (or a proxy's idle timeout) under the pool's minute: the
    next request on the closed connection got a 503, and the breaker opened for everyone."""
    rt = runtime_with(postgres_url + "%20-c%20idle_session_timeout%3D500", key_cache_s=0)
    client = falcon.testing.TestClient(create_app(rt.deps))
    key = issue_key(rt.store, "idle@example.org")
    for _ in range(2):
        assert denoise(client, key).status_code == 200
        time.sleep(1.0)  # the server closes the pooled connection meanwhile
    assert rt.store.health.available


def test_a_corrupted_sqlite_file_gives_503_not_500(tmp_path, runtime_with):
    """Not a database any more (a disk fault, a careless copy): requests that need it get the same
    503, a key this process had checked keeps denoising, and the replica is not ready."""
    path = tmp_path / "corrupt.db"
    rt = runtime_with(f"sqlite:///{path}", key_cache_s=600)
    client = falcon.testing.TestClient(create_app(rt.deps))
    key = issue_key(rt.store, "kept@example.org")
    assert denoise(client, key).status_code == 200
    rt.store.db.close_all()
    path.write_bytes(b"not a database" * 4096)
    for wal in tmp_path.glob("corrupt.db-*"):
        wal.unlink()
    assert_unavailable(client.simulate_post("/api/v1/api-keys/generation", json={"email": "new@example.org"}))
    assert_unavailable(denoise(client, "an unknown key"))
    assert denoise(client, key).status_code == 200
    assert client.simulate_get("/readyz").status_code == 503  # the balancer takes the replica out


@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_a_sqlite_file_deleted_or_replaced_under_the_service_is_refused(tmp_path, runtime_with, change):
    """Deleted: open connections would write keys to the unlinked file, lost at the next start,
    and new ones would create an empty database. Replaced (a restore under the running service):
    two databases mixed. Both get the 503 until a restart; keys already checked keep denoising."""
    path = tmp_path / "served.db"
    rt = runtime_with(f"sqlite:///{path}", key_cache_s=600)
    client = falcon.testing.TestClient(create_app(rt.deps))
    key = issue_key(rt.store, "kept@example.org")
    assert denoise(client, key).status_code == 200
    if change == "deleted":
        for file in tmp_path.glob("served.db*"):
            file.unlink()
    else:
        with sqlite3.connect(path) as source, sqlite3.connect(tmp_path / "restored.db") as copy:
            source.backup(copy)
        (tmp_path / "restored.db").replace(path)
    assert_unavailable(client.simulate_post("/api/v1/api-keys/generation", json={"email": "new@example.org"}))
    assert_unavailable(denoise(client, "an unknown key"))
    assert denoise(client, key).status_code == 200
    time.sleep(1.5)  # the probe has tried again meanwhile
    assert client.simulate_get("/readyz").status_code == 503
    assert path.exists() == (change == "replaced")  # no empty database made at the path


def test_a_full_disk_refuses_writes_once_logged_and_reads_go_on(small_disk, tmp_path, runtime_with, smtp, caplog):
    """Writes get the 503 and one log line that says why; the database still answers reads, so
    keys are still looked up, the replica stays ready, and no outage flaps open and shut."""
    rt = runtime_with(f"sqlite:///{small_disk / 'full.db'}", outbox_dir=str(tmp_path / "outbox"))
    client = falcon.testing.TestClient(create_app(rt.deps))
    key = issue_key(rt.store, "reads@example.org")
    filler = fill(small_disk)
    for n in range(5):
        assert_unavailable(client.simulate_post("/api/v1/api-keys/generation", json={"email": f"full{n}@example.org"}))
        assert denoise(client, key).status_code == 200  # looked up: this key was never cached
        assert client.simulate_get("/readyz").status_code == 200
        rt.deps.keys.forget_cached()
    lines = outage_lines(caplog)
    assert len(lines) == 1 and "Database cannot write (database or disk is full)" in lines[0], lines
    filler.unlink()
    assert client.simulate_post("/api/v1/api-keys/generation", json={"email": "full@example.org"}).status_code == 200
    assert [m["To"] for m in smtp.mailbox.wait_for(1)] == ["full@example.org"]  # the refused ones queued nothing
    with rt.store.db.connection_context():
        assert OutboxMail.select().count() == 1


def test_a_database_failure_right_after_a_delivery_neither_repeats_it_nor_holds_the_batch(tmp_path, runtime_with, smtp):
    """The mail server took a mail, then the database could not record it: it was sent again when
    its claim ended (2 minutes), and the rest of the batch waited as long. Now the delivery is
    recorded, and the rest sent, as soon as the database answers."""
    path = tmp_path / "outbox.db"
    rt = runtime_with(f"sqlite:///{path}", db_statement_timeout_s=0.3, mail_retry_min_s=0.2)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    locked = threading.Event()

    def lock_the_database(message) -> None:  # in the SMTP server, before it answers 250
        if not locked.is_set():
            holder.execute("BEGIN EXCLUSIVE")
            locked.set()

    smtp.mailbox.on_message = lock_the_database
    store, seal = rt.store, rt.sealer.seal
    with store.db.connection_context(), store.transaction():
        for n in range(4):
            store.enqueue_mail(seal(Mail(f"batch{n}@example.org", "Batch", "text", "<p>html</p>")), utcnow())
    rt.outbox.wake()
    assert locked.wait(10)
    time.sleep(1.5)  # the outbox fails to record the delivery, and tries again meanwhile
    assert len(smtp.mailbox.messages) == 1  # the batch stopped with the database
    holder.execute("ROLLBACK")
    smtp.mailbox.wait_for(4, timeout_s=20)  # within seconds, not at the end of the 2-minute claims
    wait_until(lambda: unsent(store) == 0, 10, "every mail recorded as sent")
    time.sleep(1)
    assert sorted(m["To"] for m in smtp.mailbox.messages) == [f"batch{n}@example.org" for n in range(4)]
    holder.close()


def test_a_database_failure_while_a_failed_delivery_is_recorded_does_not_hold_the_mail(tmp_path, runtime_with, smtp):
    """The mail server refused a mail for now, and the database could not record the retry: the
    mail kept its claim and went out two minutes later. Now it is given back with the untried."""
    path = tmp_path / "retry.db"
    rt = runtime_with(f"sqlite:///{path}", db_statement_timeout_s=0.3, mail_retry_min_s=0.2)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    class LockingRefusal(dict):  # in the SMTP server, before it answers 451
        def __getitem__(self, address: str) -> str:
            holder.execute("BEGIN EXCLUSIVE")
            smtp.mailbox.refuse = {}
            return super().__getitem__(address)

    smtp.mailbox.refuse = LockingRefusal({"later@example.org": "451 4.3.0 Try again later"})
    with rt.store.db.connection_context(), rt.store.transaction():
        rt.store.enqueue_mail(rt.sealer.seal(Mail("later@example.org", "Later", "text", "<p>html</p>")), utcnow())
    rt.outbox.wake()
    wait_until(lambda: not smtp.mailbox.refuse, 10, "the refusal")
    time.sleep(1.0)  # the outbox fails to record the retry
    holder.execute("ROLLBACK")
    smtp.mailbox.wait_for(1, timeout_s=15)  # within seconds, not at the end of the 2-minute claim
    holder.close()


def unsent(store: Store) -> int:
    with store.db.connection_context():
        return OutboxMail.select().where(OutboxMail.sent_at.is_null()).count()


def test_a_row_the_schema_refuses_gives_503_not_500(tmp_path, runtime_with, smtp, caplog):
    """A schema from another version (a NOT NULL column this one never fills, here a trigger that
    refuses the row) made every generation a 500, and a key conflict of a verification."""
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    rt = runtime_with(url)
    client = falcon.testing.TestClient(create_app(rt.deps))
    refuse = "CREATE TRIGGER refuse BEFORE INSERT ON {} BEGIN SELECT RAISE(ABORT, 'newer schema'); END"
    with sqlite3.connect(tmp_path / "schema.db") as db:
        db.execute(refuse.format("verification_token"))
    assert_unavailable(client.simulate_post("/api/v1/api-keys/generation", json={"email": "later@example.org"}))
    assert any("refused a row" in line for line in outage_lines(caplog))
    with sqlite3.connect(tmp_path / "schema.db") as db:
        db.execute("DROP TRIGGER refuse")
        db.execute(refuse.format("api_key"))
    assert client.simulate_post("/api/v1/api-keys/generation", json={"email": "later@example.org"}).status_code == 200
    link = verify_link(smtp.mailbox.wait_for(1)[0])
    assert_unavailable(client.simulate_get("/api/v1/api-keys/verify", params={"token": link.split("token=")[1]}))
    with sqlite3.connect(tmp_path / "schema.db") as db:
        db.execute("DROP TRIGGER refuse")
    assert client.simulate_get("/api/v1/api-keys/verify", params={"token": link.split("token=")[1]}).status_code == 200


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_column_renamed_under_the_service_gives_503_not_500(backend, request, tmp_path, runtime_with, caplog):
    """A 500 with a traceback at every request on PostgreSQL; on SQLite an outage for everyone,
    the breaker opened and closed again at each request. The rest of the service goes on."""
    url = f"sqlite:///{tmp_path / 'renamed.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    rt = runtime_with(url)
    client = falcon.testing.TestClient(create_app(rt.deps))
    key = issue_key(rt.store, "kept@example.org")
    rename = "ALTER TABLE verification_token RENAME COLUMN {} TO {}"

    def by_hand(sql: str) -> None:  # as an operator would, on a connection of their own
        if backend == "sqlite":
            with closing(sqlite3.connect(tmp_path / "renamed.db")) as db:
                db.execute(sql)
                db.commit()
        else:
            with closing(psycopg2.connect(url)) as db, db.cursor() as cur:
                cur.execute(sql)
                db.commit()

    by_hand(rename.format("client", "client_address"))
    assert_unavailable(client.simulate_post("/api/v1/api-keys/generation", json={"email": "renamed@example.org"}))
    assert any("lacks a column" in line for line in outage_lines(caplog))
    assert not any("unavailable" in line for line in outage_lines(caplog))  # no outage: the breaker stays closed
    window = {"ecg_signal": [float(i % 50) for i in range(1300)]}
    assert client.simulate_post("/api/v1/denoising", json=window, headers={"x-api-key": key}).status_code == 200
    by_hand(rename.format("client_address", "client"))
    assert client.simulate_post("/api/v1/api-keys/generation", json={"email": "renamed@example.org"}).status_code == 200


def test_an_id_sequence_behind_its_table_gives_503_not_500(postgres_url, runtime_with, caplog):
    """Data restored or copied without its sequences (pg_restore into a database the service had
    written, a logical replica after a failover): each insert met a duplicate primary key, and
    answered 500 with a traceback, one per row already there."""
    rt = runtime_with(postgres_url)
    client = falcon.testing.TestClient(create_app(rt.deps))
    assert client.simulate_post("/api/v1/api-keys/generation", json={"email": "first@example.org"}).status_code == 200
    with rt.store.db.connection_context():
        for table in ("verification_token", "outbox_mail"):
            rt.store.db.execute_sql(f"ALTER SEQUENCE {table}_id_seq RESTART WITH 1")
    assert_unavailable(client.simulate_post("/api/v1/api-keys/generation", json={"email": "second@example.org"}))
    assert any("id sequence behind its table" in line for line in outage_lines(caplog))
    again = [
        client.simulate_post("/api/v1/api-keys/generation", json={"email": "second@example.org"}) for _ in range(2)
    ]
    assert [answer.status_code for answer in again] == [503, 200]  # each failed insert moved a sequence on


def test_a_session_the_server_ends_for_idling_in_a_transaction_is_no_outage(postgres_url):
    """With idle_in_transaction_session_timeout set low on the server, each such end opened the
    breaker for everyone (and a ROLLBACK on the closed connection took its place in the log)."""
    options = "options=-c%20idle_in_transaction_session_timeout%3D100%20-c%20search_path"
    store = Store(postgres_url.replace("options=-c%20search_path", options), max_connections=2).start()
    try:
        with pytest.raises(database.DatabaseUnavailable), store.db.connection_context(), store.db.atomic():
            store.db.execute_sql("SELECT 1")
            time.sleep(0.4)  # the server ends the session
            store.db.execute_sql("SELECT 1")
        assert store.health.available  # this request's 503 only
        assert store.ping()
    finally:
        store.close()


def test_database_file_is_private(tmp_path, runtime_with):
    runtime_with(f"sqlite:///{tmp_path / 'private.db'}")
    assert (tmp_path / "private.db").stat().st_mode & 0o777 == 0o600


def test_probes_borrow_no_pooled_connection(tmp_path):
    """The probe that runs while the database is away opens a connection of its own: however
    often it runs, the pool keeps every connection for the requests."""
    store = Store(f"sqlite:///{tmp_path / 'probe.db'}", max_connections=1).start()
    try:
        for _ in range(5):
            store.db.probe()
        issue_key(store, "pool@example.org")  # needs the pool's one connection
    finally:
        store.close()


@pytest.mark.parametrize(
    "message, wrong_settings",
    [
        ('connection to server at "db", port 5432 failed: FATAL:  database "x" does not exist', True),
        ('connection to server at "db", port 5432 failed: FATAL:  password authentication failed for user "u"', True),
        ('connection to server at "db", port 5432 failed: fe_sendauth: no password supplied', True),
        ('connection to server at "db", port 5432 failed: Connection refused', False),
        ('connection to server at "db", port 5432 failed: FATAL:  the database system is starting up', False),
        ("database connect timed out after 3 s", False),
        ('connection to server at "db", port 5432 failed: FATAL:  pg_hba.conf rejects connection for host', True),
    ],
)
def test_which_connection_errors_are_settings_and_not_an_outage(message, wrong_settings):
    assert database.misconfigured(peewee.OperationalError(message)) is wrong_settings


def test_a_store_that_may_start_with_the_database_away_still_refuses_wrong_settings(pg_cluster):
    """A worker replaced during an outage starts with the breaker open and serves once the
    database is back; but one whose database refuses its settings (a role, password or database
    changed since the service started) must not serve 503s for ever: it fails, as a start does."""
    pg_cluster.stop()
    away = Store(pg_cluster.url, max_connections=2, connect_timeout_s=1, may_be_away=True).start()
    probe = database.DatabaseProbe(lambda: away.db, away.health).start()
    try:
        assert not away.health.available
        pg_cluster.start()

        def served() -> bool:  # its tables are made at the first statement that misses them
            try:
                return bool(issue_key(away, "back@example.org"))
            except database.DatabaseUnavailable:
                return False

        wait_until(served, 20, "a key stored once the database is back")
    finally:
        probe.close()
        away.close()
    with pytest.raises(peewee.OperationalError, match="does not exist"):
        Store(pg_cluster.url.rsplit("/", 1)[0] + "/no_such_db", max_connections=1, may_be_away=True).start()


@pytest.mark.parametrize(
    "name, writes_only",
    [
        ("SQLITE_FULL", True),
        ("SQLITE_READONLY", True),
        ("SQLITE_READONLY_DIRECTORY", True),  # a read-only folder: WAL files cannot be made
        ("SQLITE_CANTOPEN", False),
        ("SQLITE_IOERR_READ", False),
        ("SQLITE_IOERR_WRITE", True),  # an immutable file: each write opened and closed the breaker
    ],
)
def test_which_sqlite_errors_only_refuse_writes(name, writes_only):
    driver = sqlite3.OperationalError("some text")
    driver.sqlite_errorname = name
    try:
        try:
            raise driver
        except sqlite3.OperationalError as exc:
            raise peewee.OperationalError(*exc.args) from None  # as peewee wraps it: context kept
    except peewee.OperationalError as wrapped:
        assert wrapped.__context__ is driver
        assert unwritable(wrapped) is writes_only


@pytest.mark.parametrize(
    "database_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_tables_lost_under_the_service_are_made_again(database_url, runtime_with, smtp, caplog):
    """The database dropped and made again, or replaced by an empty one: each statement failed
    with a 500 until a restart, while /readyz said 200. The service makes its tables again, as a
    restart would; meanwhile requests get the 503."""
    rt = runtime_with(database_url)
    client = falcon.testing.TestClient(create_app(rt.deps))
    key = issue_key(rt.store, "lost@example.org")
    assert denoise(client, key).status_code == 200
    with rt.store.db.connection_context():
        for table in ("api_key", "verification_token", "outbox_mail"):
            rt.store.db.execute_sql(f"DROP TABLE {table}")
    rt.deps.keys.forget_cached()
    assert_unavailable(client.simulate_post("/api/v1/api-keys/generation", json={"email": "again@example.org"}))
    wait_until(
        lambda: (
            client.simulate_post("/api/v1/api-keys/generation", json={"email": "again@example.org"}).status_code == 200
        ),
        10,
        "the tables made again",
    )
    assert denoise(client, key).status_code == 401  # it went with its table
    assert smtp.mailbox.wait_for(1)[0]["To"] == "again@example.org"
    assert any("had lost the service's tables" in r.getMessage() for r in caplog.records)


@pytest.fixture
def limited_url(postgres_url: str) -> Iterator[tuple[str, Callable[[str], None]]]:
    """The test schema through a role of its own, which owns its tables but may lose the right to
    make new ones; and a way to run SQL as the superuser."""
    role = f"hf_role_{uuid.uuid4().hex[:12]}"
    schema = postgres_url.rsplit("%3D", 1)[1]
    admin = psycopg2.connect(postgres_url)
    admin.autocommit = True

    def run(sql: str) -> None:
        with admin.cursor() as cur:
            cur.execute(sql.format(role=role, schema=schema))

    run('CREATE ROLE "{role}" LOGIN')
    run('GRANT USAGE, CREATE ON SCHEMA "{schema}" TO "{role}"')
    try:
        yield postgres_url.replace("//postgres@", f"//{role}@", 1), run
    finally:
        run('DROP OWNED BY "{role}"')
        run('DROP ROLE "{role}"')
        admin.close()


@pytest.mark.postgres
def test_tables_that_cannot_be_made_again_are_tried_again_now_and_then(limited_url, runtime_with, monkeypatch, caplog):
    """A role without the right to create tables: every request that found them missing started
    another try, and logged another error."""
    monkeypatch.setattr(store, "RESTORE_RETRY_S", 3.0)
    url, run = limited_url
    rt = runtime_with(url)
    client = falcon.testing.TestClient(create_app(rt.deps))
    emails = (f"n{i}@example.org" for i in range(100))

    def generation() -> falcon.testing.Result:
        return client.simulate_post("/api/v1/api-keys/generation", json={"email": next(emails)})

    assert generation().status_code == 200
    run('DROP TABLE "{schema}".api_key, "{schema}".verification_token, "{schema}".outbox_mail')
    run('REVOKE CREATE ON SCHEMA "{schema}" FROM "{role}"')
    rt.deps.keys.forget_cached()
    for _ in range(10):
        assert_unavailable(generation())
        time.sleep(0.05)
    tries = lambda: sum("Cannot make the tables again" in r.getMessage() for r in caplog.records)  # noqa: E731
    wait_until(lambda: tries() >= 1, 10, "a try")
    assert tries() == 1
    run('GRANT CREATE ON SCHEMA "{schema}" TO "{role}"')
    wait_until(lambda: generation().status_code == 200, 15, "the tables made again, at a later try")


def test_postgres_out_of_connections_refuses_only_what_needs_a_new_one(pg_cluster, runtime_with):
    """Every slot of the server taken by other clients: the one request that needed a connection
    more got the 503, and that opened the breaker: every request was refused, the pool's idle
    connections closed, and the probe, needing a new one too, could not close it again."""
    rt = runtime_with(pg_cluster.url, key_cache_s=0)
    client = falcon.testing.TestClient(create_app(rt.deps))
    key = issue_key(rt.store, "crowded@example.org")
    assert denoise(client, key).status_code == 200
    lent, give_back = threading.Event(), threading.Event()

    def hold() -> None:  # one connection lent elsewhere, given back later
        with rt.store.db.connection_context():
            lent.set()
            give_back.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert lent.wait(10)
    rt.store.db.close_idle()  # the next request needs a new connection
    others = []
    with ExitStack() as stack:
        for _ in range(200):
            try:
                others.append(stack.enter_context(closing(psycopg2.connect(pg_cluster.url))))
            except psycopg2.OperationalError as exc:
                assert "too many clients" in str(exc) or "slots are reserved" in str(exc)
                break
        assert_unavailable(denoise(client, key))
        give_back.set()
        holder.join(10)
        assert denoise(client, key).status_code == 200  # on the connection given back
        assert client.simulate_get("/readyz").status_code == 200
    assert others  # the server had slots for other clients until it had none


def test_a_worker_replaced_while_postgres_has_no_connection_to_spare_starts(pg_cluster):
    """Its start made the tables, which needs a connection: it exited, and the supervisor tried
    again with a growing delay, the service one worker short long after slots were free again."""
    Store(pg_cluster.url, max_connections=1).start().close()  # the supervisor's start made the tables
    others = []
    with ExitStack() as stack:
        for _ in range(200):
            try:
                others.append(stack.enter_context(closing(psycopg2.connect(pg_cluster.url))))
            except psycopg2.OperationalError:
                break
        store = Store(pg_cluster.url, max_connections=2, connect_timeout_s=1, may_be_away=True).start()
    try:
        assert others and store.health.available
        assert store.pending_mails() == 0  # the slots given back: it serves
    finally:
        store.close()


def test_a_pool_with_every_connection_lent_refuses_only_the_request_that_waited(sqlite_url, runtime_with):
    """Every connection of this process's own pool lent (a thread holding one longer than it
    should): the request that waited in vain opened the breaker, as an outage does, and every
    other request, those on connections already lent included, was refused until the probe."""
    rt = runtime_with(sqlite_url, key_cache_s=0)
    client = falcon.testing.TestClient(create_app(rt.deps))
    key = issue_key(rt.store, "lent@example.org")
    rt.store.db.close_idle()
    rt.store.db._wait_timeout = 0.2  # POOL_WAIT_S, shortened: the wait is not what is tested
    lent, give_back = threading.Event(), threading.Event()
    holders = []

    def hold() -> None:
        with rt.store.db.connection_context():
            lent.set()
            give_back.wait(10)

    try:
        while len(holders) < rt.store.db._max_connections:
            lent.clear()
            holders.append(threading.Thread(target=hold))
            holders[-1].start()
            assert lent.wait(10)
        assert_unavailable(denoise(client, key))
        assert rt.store.health.available  # no breaker: the database answers the connections lent
    finally:
        give_back.set()
        for holder in holders:
            holder.join(10)
    assert denoise(client, key).status_code == 200


def test_a_read_only_postgres_refuses_writes_with_503_and_reads_go_on(pg_cluster, runtime_with):
    """A standby after a failover, or default_transaction_read_only: writes got a 500."""
    rt = runtime_with(pg_cluster.url)
    client = falcon.testing.TestClient(create_app(rt.deps))
    key = issue_key(rt.store, "ro@example.org")

    def read_only(on: bool) -> None:
        admin = psycopg2.connect(pg_cluster.url)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f"ALTER SYSTEM {'SET default_transaction_read_only = on' if on else 'RESET ALL'}")
            cur.execute("SELECT pg_reload_conf()")
        admin.close()

    def generation() -> falcon.testing.Result:
        return client.simulate_post("/api/v1/api-keys/generation", json={"email": "ro@example.net"})

    read_only(True)
    try:
        assert_unavailable(wait_until(lambda: (r := generation()).status_code != 200 and r, 10, "read-only"))
        assert denoise(client, key).status_code == 200  # reads go on
        assert client.simulate_get("/readyz").status_code == 200
    finally:
        read_only(False)
    wait_until(lambda: generation().status_code == 200, 10, "writes again")


@pytest.mark.postgres
def test_pooled_postgres_connections_are_opened_anew_once_old(postgres_url, runtime_with, monkeypatch):
    """After a failover, connections to the old primary (a standby now, refusing every write)
    stayed in the pool for good."""
    monkeypatch.setattr(database, "RENEW_AFTER_S", 0.3)
    rt = runtime_with(postgres_url)

    def backend() -> int:
        with rt.store.db.connection_context():
            return rt.store.db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]

    before = {backend() for _ in range(3)}
    time.sleep(0.5)
    assert backend() not in before
