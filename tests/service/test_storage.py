"""What the database holds: digests only, no mail body after delivery, last_used written off the
hot path, and tables that can be created again; on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import resource
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import falcon.testing
import pytest
from aiosmtpd.controller import Controller

from service import mail
from service.app import create_app
from service.keys import digest
from service.messages import Mail
from service.sealing import Sealer
from service.store import ApiKey, KeyConflict, OutboxMail, Store, Token, utcnow

from .conftest import Mailbox, free_port, issue_key, key_in, obtain_key, verify_link, wait_until

WINDOW = {"ecg_signal": [float(i % 50) for i in range(1300)]}


@pytest.fixture
def runtime_on(database_url, runtime_with):
    return runtime_with(database_url)


def dump(store) -> str:
    """Every value of every row, as text."""
    with store.db.connection_context():
        return repr([list(model.select().tuples()) for model in (ApiKey, Token, OutboxMail)])


def test_database_holds_digests_only_and_no_delivered_body(runtime_on, smtp):
    client = falcon.testing.TestClient(create_app(runtime_on.deps))
    key = obtain_key(client, smtp, "secret@example.org")
    token = verify_link(smtp.mailbox.messages[0]).rsplit("=", 1)[1]
    store = runtime_on.store

    def delivered() -> bool:
        with store.db.connection_context():
            return not OutboxMail.select().where(OutboxMail.sent_at.is_null()).exists()

    wait_until(delivered, what="all mails marked sent")
    rows = dump(store)
    assert key not in rows and token not in rows
    assert digest(key) in rows and digest(token) in rows
    with store.db.connection_context():
        assert all(m.text_body is None and m.html_body is None for m in OutboxMail.select())


def test_a_mail_that_cannot_be_composed_does_not_hold_back_the_others(runtime_on, smtp):
    """A row queued before addresses were checked strictly (``john.doe@`` has no domain, and the
    mail library raises on it, not with an SMTP error) can never be sent: it is given up, with
    its error kept and its bodies wiped, and the others go out."""
    store, seal = runtime_on.store, runtime_on.sealer.seal
    with store.db.connection_context():
        store.enqueue_mail(seal(Mail("john.doe@", "Bad", "text", "<p>html</p>")), utcnow())
        for n in range(3):
            store.enqueue_mail(seal(Mail(f"good{n}@example.org", "Good", "text", "<p>html</p>")), utcnow())
    runtime_on.outbox.wake()
    assert sorted(m["To"] for m in smtp.mailbox.wait_for(3)) == [f"good{n}@example.org" for n in range(3)]

    def bad_row() -> OutboxMail:
        with store.db.connection_context():
            return OutboxMail.get(OutboxMail.recipient == "john.doe@")

    wait_until(lambda: bad_row().failed_at is not None, what="the bad mail given up")
    row = bad_row()
    assert row.sent_at is None and row.last_error and row.text_body is None and row.html_body is None
    assert 1 <= row.attempts <= 5


def test_last_used_is_recorded_in_memory_and_flushed(runtime_on, smtp):
    client = falcon.testing.TestClient(create_app(runtime_on.deps))
    key = issue_key(runtime_on.store, "busy@example.org")
    assert client.simulate_post("/api/v1/denoising", json=WINDOW, headers={"x-api-key": key}).status_code == 200

    def last_used():
        with runtime_on.store.db.connection_context():
            return ApiKey.get(ApiKey.key_hash == digest(key)).last_used

    assert last_used() is None  # nothing written by the request itself
    runtime_on.usage.flush()
    assert last_used() is not None


def test_creating_tables_again_is_harmless(runtime_on):
    runtime_on.store.create_tables()
    runtime_on.store.create_tables()
    assert runtime_on.store.ping()


def test_a_start_adds_the_columns_and_indexes_a_later_version_brought(sqlite_url, tmp_path):
    """A database made by an earlier version lacks a column and its index: the start adds both."""
    Store(sqlite_url, max_connections=1).start().close()
    connection = sqlite3.connect(tmp_path / "heartify.db")
    for column in ("client", "mailbox"):
        connection.execute(f"DROP INDEX token_{column}_created_at")
        connection.execute(f"ALTER TABLE verification_token DROP COLUMN {column}")
    connection.commit()
    connection.close()
    store = Store(sqlite_url, max_connections=1).start()
    try:
        with store.db.connection_context():
            assert {"client", "mailbox"} <= {c.name for c in store.db.get_columns("verification_token")}
            indexes = {i.name for i in store.db.get_indexes("verification_token")}
            assert {"token_client_created_at", "token_mailbox_created_at"} <= indexes
    finally:
        store.close()


@pytest.mark.postgres
def test_a_start_beside_a_serving_replica_locks_no_table(postgres_url, runtime_with):
    """With the schema complete, a later start (another replica, a restarted worker) only reads
    the catalog: it does not wait for a serving replica's open transaction, nor make it wait
    (CREATE INDEX IF NOT EXISTS locks its table before it looks; once it met such a transaction
    in a deadlock)."""
    import psycopg2

    store = runtime_with(postgres_url).store
    rival = psycopg2.connect(postgres_url)
    try:
        with rival.cursor() as cur:  # a replica's transaction under way, holding its table
            cur.execute(
                "INSERT INTO api_key (email, key_hash, is_active, created_at) "
                "VALUES ('busy@example.org', 'busy', true, now())"
            )
        store.create_tables()  # before: blocked until the statement timeout, then an error
        assert store.ping()
    finally:
        rival.rollback()
        rival.close()


def test_database_refuses_a_second_active_key_for_an_email(runtime_on):
    store = runtime_on.store
    with store.transaction():
        store.add_key("one@example.org", digest("first"), utcnow())
    with pytest.raises(KeyConflict), store.transaction():
        store.add_key("one@example.org", digest("second"), utcnow())
    with store.transaction():
        store.deactivate_keys("one@example.org", utcnow())
        store.add_key("one@example.org", digest("second"), utcnow())
    store.release()


@pytest.mark.postgres
def test_concurrent_activation_for_one_email_keeps_one_active_key(postgres_url, runtime_with, smtp):
    """Another transaction activates a key for the same email while a verification runs: the
    unique index on active keys makes the verification retry, and one active key remains."""
    import psycopg2

    rt = runtime_with(postgres_url)
    rival = psycopg2.connect(postgres_url)
    probe = psycopg2.connect(postgres_url)
    probe.autocommit = True
    try:
        client = falcon.testing.TestClient(create_app(rt.deps))
        client.simulate_post("/api/v1/api-keys/generation", json={"email": "race@example.org"})
        path = verify_link(smtp.mailbox.wait_for(1)[0]).replace("http://testserver", "")

        with rival.cursor() as cur:  # an open transaction holding the index entry
            cur.execute(
                "INSERT INTO api_key (email, key_hash, is_active, created_at) "
                "VALUES ('race@example.org', 'rival', true, now())"
            )
        results: list[int] = []
        verifier = threading.Thread(target=lambda: results.append(client.simulate_get(path).status_code))
        verifier.start()

        def blocked() -> bool:
            with probe.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'INSERT INTO \"api_key\"%'"
                )
                return cur.fetchone()[0] > 0

        wait_until(blocked, what="the verification to wait on the rival's index entry")
        rival.commit()
        verifier.join(30)
        assert results == [200]
        key = key_in(smtp.mailbox.wait_for(2)[1])
        with rt.store.db.connection_context():
            active = list(ApiKey.select().where((ApiKey.email == "race@example.org") & ApiKey.is_active))
        assert [k.key_hash for k in active] == [digest(key)]
    finally:
        rival.close()
        probe.close()


def mails_to(mailbox: Mailbox, address: str) -> list:
    return [m for m in list(mailbox.messages) if m["To"] == address]


@pytest.mark.postgres
def test_two_links_of_one_email_verified_at_once_give_one_key_and_one_400(postgres_url, runtime_with, smtp, caplog):
    """Each verification spends the email's other tokens: without a lock per email, the two
    transactions locked each other's rows in opposite orders, and PostgreSQL's deadlock got a 503."""
    rt = runtime_with(postgres_url, mail_limit_per_email=0, mail_limit_per_client=0, key_requests_per_min=0)
    client = falcon.testing.TestClient(create_app(rt.deps))
    start = threading.Barrier(2)

    def verify(path: str) -> int:
        start.wait(10)
        return client.simulate_get(path).status_code

    for round in range(4):  # the deadlock needs the two to interleave: several rounds
        address = f"twice{round}@example.org"
        for _ in range(2):
            assert client.simulate_post("/api/v1/api-keys/generation", json={"email": address}).status_code == 200
        links = wait_until(lambda a=address: len(m := mails_to(smtp.mailbox, a)) == 2 and m, what="both links")
        with ThreadPoolExecutor(2) as pool:
            paths = [verify_link(m).replace("http://testserver", "") for m in links]
            assert sorted(pool.map(verify, paths)) == [200, 400]
        with rt.store.db.connection_context():
            assert ApiKey.select().where((ApiKey.email == address) & ApiKey.is_active).count() == 1
    assert "Database unavailable" not in caplog.text


@pytest.fixture
def bare_store(database_url):
    """A store with no outbox worker of its own: the test's threads are the only workers."""
    store = Store(database_url, max_connections=8).start()
    yield store
    store.close()


SEALER = Sealer(["test-secret"])


def queue_mails(store: Store, count: int) -> None:
    with store.db.connection_context(), store.transaction():
        for n in range(count):
            store.enqueue_mail(SEALER.seal(Mail(f"queued{n}@example.org", "Queued", "text", "<p>html</p>")), utcnow())


def test_concurrent_workers_claim_every_mail_once(bare_store):
    queue_mails(bare_store, 60)
    claims: list[list[int]] = [[] for _ in range(6)]

    def work(mine: list[int]) -> None:
        for _ in range(60):  # bounded: a worker claims at least one mail per round or stops
            batch = bare_store.claim_due_mails(4, utcnow())
            if not batch:
                return
            mine.extend(mail.id for mail in batch)

    workers = [threading.Thread(target=work, args=(mine,)) for mine in claims]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    claimed = [mail_id for mine in claims for mail_id in mine]
    assert len(claimed) == 60 and len(set(claimed)) == 60
    assert bare_store.claim_due_mails(4, utcnow()) == []  # leased: nothing is due again before CLAIM_LEASE


def test_a_worker_gives_back_only_its_own_claims(bare_store):
    """After a database outage longer than a claim, another worker may have claimed the mails
    this one had not tried: giving them back then would let both send them."""
    queue_mails(bare_store, 2)
    first, second = bare_store.claim_due_mails(2, utcnow())
    with bare_store.db.connection_context():  # the claim on the first mail ended meanwhile
        OutboxMail.update(next_attempt_at=utcnow() - timedelta(seconds=1)).where(OutboxMail.id == first.id).execute()
    [taken] = bare_store.claim_due_mails(2, utcnow())  # another worker claims it
    assert taken.id == first.id
    bare_store.release_mails([first, second], utcnow())
    assert [mail.id for mail in bare_store.claim_due_mails(2, utcnow())] == [second.id]  # the other's claim holds


@pytest.mark.postgres
def test_a_worker_skips_mails_another_is_claiming_instead_of_waiting(postgres_url):
    import psycopg2

    store = Store(postgres_url, max_connections=2).start()
    rival = psycopg2.connect(postgres_url)
    try:
        queue_mails(store, 4)
        with rival.cursor() as cur:  # another worker, mid-claim: two rows locked
            cur.execute("SELECT id FROM outbox_mail ORDER BY id LIMIT 2 FOR UPDATE")
            locked = sorted(row[0] for row in cur.fetchall())
        with store.db.connection_context():
            store.db.execute_sql("SET lock_timeout = '2s'")  # the old claim would wait, then fail
            claimed = [mail.id for mail in store.claim_due_mails(10, utcnow())]
        assert len(claimed) == 2 and not set(claimed) & set(locked)
    finally:
        rival.close()
        store.close()


@pytest.mark.postgres
def test_claims_hold_by_the_databases_clock_whatever_the_replicas_clocks(postgres_url):
    """By its own clock, a replica 3 minutes behind wrote claims that had already ended for the
    others, which claimed and sent the same mails (15 deliveries for 10 mails); one ahead queued
    mails due minutes later."""
    store = Store(postgres_url, max_connections=2).start()
    behind, ahead = utcnow() - timedelta(minutes=3), utcnow() + timedelta(minutes=3)
    try:
        with store.db.connection_context():
            store.enqueue_mail(SEALER.seal(Mail("ahead@example.org", "s", "t", "h")), ahead)
        queue_mails(store, 2)
        claimed = store.claim_due_mails(10, behind)
        assert len(claimed) == 3  # the mail queued by the replica ahead is due at once
        assert store.claim_due_mails(10, utcnow()) == []  # the laggard's claims hold for the others
        store.release_mails(claimed, behind)
        assert len(store.claim_due_mails(10, utcnow())) == 3  # given back: its claims were found
    finally:
        store.close()


@pytest.mark.postgres
def test_database_connections_on_descriptors_past_1024_work(postgres_url):
    """The service raises its open-files limit and holds thousands of client connections, so a
    database connection opened then gets a descriptor past 1024, where select() raised
    ValueError: a 500, unseen by the breaker."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the open-files limit ({hard}) is too low to reach descriptor 1024")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    taken = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        store = Store(postgres_url, max_connections=2).start()
        try:
            for _ in range(2):  # a new connection, then the pooled one
                assert store.pending_mails() == 0
            with store.db.connection_context():
                assert store.db.connection().fileno() > 1024
        finally:
            store.close()
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# The worker's sending window and the server's time per mail: one mail fits in the window, with
# room for opening the session on a loaded machine; two do not.
SEND_WINDOW_S, SLOW_SMTP_S = 0.5, 1.0


class SlowMailbox(Mailbox):
    """A mail server that takes its time over each message."""

    async def handle_DATA(self, server, session, envelope) -> str:
        await asyncio.sleep(SLOW_SMTP_S)
        return await super().handle_DATA(server, session, envelope)


@pytest.mark.slow
def test_a_worker_on_a_slow_mail_server_leaves_the_rest_of_its_claim_to_the_lease(sqlite_url, monkeypatch):
    """Sending a claimed batch must end before the claim does, or another replica could claim and
    send the same mails: past ``SEND_WITHIN_S`` the worker leaves them, claimed and untried."""
    monkeypatch.setattr(mail, "SEND_WITHIN_S", SEND_WINDOW_S)
    mailbox, port = SlowMailbox(), free_port()
    server = Controller(mailbox, hostname="127.0.0.1", port=port)
    server.start()
    store = Store(sqlite_url, max_connections=2).start()
    sender = mail.SmtpSender("127.0.0.1", port, "none", None, None, timeout_s=5)
    outbox = mail.Outbox(store, sender, SEALER, "Heartify <no-reply@heartify.test>", retry_min_s=1, retry_max_s=1)

    def rows() -> list[OutboxMail]:
        with store.db.connection_context():
            return list(OutboxMail.select().order_by(OutboxMail.id))

    try:
        queue_mails(store, 3)
        outbox.start()
        wait_until(lambda: rows()[0].sent_at is not None, what="the first mail marked sent")
        outbox.close()
        assert len(mailbox.messages) == 1
        assert [row.sent_at is not None for row in rows()] == [True, False, False]
        assert [row.attempts for row in rows()] == [0, 0, 0]
        assert store.seconds_to_next_mail(utcnow()) > 60  # still claimed: no other worker takes them yet
    finally:
        outbox.close()
        server.stop()
        store.close()
