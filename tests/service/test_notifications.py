"""The listener that turns PostgreSQL notifications into cache clears: it hears a committed
deactivation, not a rolled-back one, clears again whenever it (re)connects since notifications
sent meanwhile are lost, and keeps trying while the database refuses connections."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import psycopg2
import pytest

from service.notifications import Listener
from service.store import KEYS_CHANNEL, Store, utcnow

from .conftest import free_port, issue_key, wait_until

pytestmark = pytest.mark.postgres


class Notices:
    """What the listener calls: counts the calls, and each connection it opened or lost."""

    def __init__(self) -> None:
        self.count = 0
        self.lost = 0  # connections that broke or could not be opened
        self.connections: list[psycopg2.extensions.connection] = []
        self._lock = threading.Lock()

    def disconnected(self) -> None:
        with self._lock:
            self.lost += 1

    def __call__(self) -> None:
        with self._lock:
            self.count += 1

    def after(self, seen: int, timeout_s: float = 1.0) -> int:
        return wait_until(lambda: self.count > seen and self.count, timeout_s, "a notice")


def open_store(url: str) -> Iterator[Store]:
    store = Store(url, max_connections=2).start()
    yield store
    store.close()


@pytest.fixture
def store(postgres_url: str) -> Iterator[Store]:
    yield from open_store(postgres_url)


@pytest.fixture
def own_store(pg_cluster) -> Iterator[Store]:
    """On a server of its own: no other test run's notifications on the channel."""
    yield from open_store(pg_cluster.url)


@pytest.fixture
def listening() -> Iterator[Callable[..., tuple[Listener, Notices]]]:
    started: list[Listener] = []

    def start(store: Store, connect: Callable[[], psycopg2.extensions.connection] | None = None):
        notices = Notices()

        def opened() -> psycopg2.extensions.connection:
            conn = (connect or (lambda: store.listen(KEYS_CHANNEL)))()
            notices.connections.append(conn)
            return conn

        listener = Listener(
            opened, notices, on_disconnect=notices.disconnected, backoff_min_s=0.05, backoff_max_s=0.2
        ).start()
        started.append(listener)
        notices.after(0)  # connected and listening
        return listener, notices

    yield start
    for listener in started:
        listener.close()


def deactivate(store: Store, email: str, commit: bool = True) -> None:
    with store.db.connection_context(), store.db.atomic() as txn:
        assert store.deactivate_keys(email, utcnow()) == 1
        if not commit:
            txn.rollback()


@pytest.mark.slow
def test_a_committed_deactivation_is_heard_and_a_rolled_back_one_is_not(own_store, listening):
    _, notices = listening(own_store)
    issue_key(own_store, "rolled-back@example.org")
    seen = notices.count
    deactivate(own_store, "rolled-back@example.org", commit=False)
    time.sleep(0.3)
    assert notices.count == seen
    deactivate(own_store, "rolled-back@example.org")
    notices.after(seen)


def test_a_broken_connection_is_opened_again_and_the_cache_cleared(store, listening):
    _, notices = listening(store)
    seen = notices.count
    with store.db.connection_context():
        store.db.execute_sql("SELECT pg_terminate_backend(%s)", (notices.connections[-1].get_backend_pid(),))
    notices.after(seen, timeout_s=2.0)  # the clear that comes with the new connection
    assert len(notices.connections) == 2 and notices.lost == 1  # keys were read on every use meanwhile
    issue_key(store, "after-reconnect@example.org")
    seen = notices.count
    deactivate(store, "after-reconnect@example.org")
    notices.after(seen)


def test_a_database_that_refuses_connections_is_tried_again(store, listening):
    refused = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    attempts: list[str] = []

    def connect() -> psycopg2.extensions.connection:
        attempts.append("refused" if len(attempts) < 2 else "ok")
        return (Store(refused, 1) if len(attempts) <= 2 else store).listen(KEYS_CHANNEL)

    listener, notices = listening(store, connect)
    assert attempts == ["refused", "refused", "ok"] and notices.lost == 2
    started = time.monotonic()
    listener.close()
    assert time.monotonic() - started < 1.0
