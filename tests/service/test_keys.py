"""The cache of active keys: what it spares the database, and how soon a deactivation reaches it,
on SQLite (the TTL) and PostgreSQL (a notification). Deactivations through the service itself are
in ``test_contract``; the listener itself in ``test_notifications``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from functools import partial

import falcon.testing
import pytest

from service.app import create_app
from service.database import DatabaseUnavailable
from service.keys import ActiveKeys, digest, mailbox
from service.runtime import Runtime
from service.store import Store, Token, utcnow

from .conftest import issue_key, wait_until

DENOISE = "/api/v1/denoising"
WINDOW = {"ecg_signal": [float(i % 50) for i in range(1300)]}


def deactivate_elsewhere(rt: Runtime, email: str) -> None:
    """What another service process on the same database does when a deactivation link is followed."""
    with rt.store.db.connection_context():
        assert rt.store.deactivate_keys(email, utcnow()) == 1


def test_a_key_deactivated_elsewhere_is_trusted_until_its_entry_expires(database_url, runtime_with):
    rt = runtime_with(database_url)
    key = issue_key(rt.store, "shared@example.org")
    now = [0.0]
    cache = ActiveKeys(30.0, clock=lambda: now[0])
    with rt.store.db.connection_context():
        key_id = cache.get(digest(key), rt.store.active_key_id)
    assert key_id is not None
    deactivate_elsewhere(rt, "shared@example.org")
    now[0] = 29.9
    with rt.store.db.connection_context():
        assert cache.get(digest(key), rt.store.active_key_id) == key_id
        now[0] = 30.0
        assert cache.get(digest(key), rt.store.active_key_id) is None


@pytest.mark.parametrize("cache_s, after", [(0.0, 401), (3600.0, 200)])
def test_on_sqlite_key_cache_setting_decides_when_the_service_sees_a_deactivation_made_elsewhere(
    sqlite_url, runtime_with, cache_s, after
):
    rt = runtime_with(sqlite_url, key_cache_s=cache_s)
    client = falcon.testing.TestClient(create_app(rt.deps))
    key = issue_key(rt.store, "elsewhere@example.org")
    assert client.simulate_post(DENOISE, json=WINDOW, headers={"x-api-key": key}).status_code == 200
    deactivate_elsewhere(rt, "elsewhere@example.org")
    assert client.simulate_post(DENOISE, json=WINDOW, headers={"x-api-key": key}).status_code == after


@pytest.mark.postgres
def test_on_postgresql_a_deactivation_made_elsewhere_is_refused_within_a_second_despite_the_cache(
    postgres_url, runtime_with
):
    rt = runtime_with(postgres_url, key_cache_s=3600.0)
    client = falcon.testing.TestClient(create_app(rt.deps))
    key = issue_key(rt.store, "notified@example.org")
    assert client.simulate_post(DENOISE, json=WINDOW, headers={"x-api-key": key}).status_code == 200
    deactivate_elsewhere(rt, "notified@example.org")
    refused = lambda: client.simulate_post(DENOISE, json=WINDOW, headers={"x-api-key": key}).status_code == 401
    wait_until(refused, timeout_s=1.0, what="the key refused")


def test_a_lookup_overtaken_by_a_deactivation_is_not_kept():
    """The deactivation commits while a request reads the key as still active: the request may pass,
    the next one must read the database again."""
    cache = ActiveKeys(30.0)

    def read_then_deactivated(key_hash: str) -> int:
        cache.forget()  # the deactivation lands between the read and the write-back
        return 7

    assert cache.get("h", read_then_deactivated) == 7
    assert cache.get("h", lambda key_hash: None) is None


def test_unknown_keys_are_not_kept():
    cache = ActiveKeys(30.0)
    lookups: list[str] = []

    def lookup(key_hash: str) -> int | None:
        lookups.append(key_hash)
        return None if key_hash == "unknown" else 1

    for _ in range(3):
        cache.get("unknown", lookup)
        cache.get("known", lookup)
    assert lookups == ["unknown", "known", "unknown", "unknown"]


def test_expired_entries_are_read_again_and_serve_through_an_outage():
    """After ``expire`` (the listener reconnected: deactivations may have been missed) a key is
    read again; while the database is away, the entry this process verified still serves."""
    cache = ActiveKeys(30.0)
    assert cache.get("h", lambda key_hash: 7) == 7
    cache.expire()
    reads: list[str] = []

    def away(key_hash: str) -> int:
        reads.append(key_hash)
        raise DatabaseUnavailable("down")

    assert cache.get("h", away) == 7 and reads == ["h"]
    with pytest.raises(DatabaseUnavailable):
        cache.get("never-seen", away)
    cache.forget()  # a deactivation: nothing is trusted any more
    with pytest.raises(DatabaseUnavailable):
        cache.get("h", away)


def test_while_deactivations_cannot_be_heard_every_use_reads_the_key():
    """The listener lost its connection (``suspend``): a key deactivated meanwhile by another
    replica must be refused at once, so nothing is served from the cache, except through an
    outage of the database itself; once it listens again (``resume``), keys are cached again."""
    cache = ActiveKeys(30.0)
    reads: list[str] = []
    answers = {"h": 7}

    def lookup(key_hash: str) -> int | None:
        reads.append(key_hash)
        if key_hash not in answers:
            raise DatabaseUnavailable("connection refused")
        return answers[key_hash]

    assert cache.get("h", lookup) == 7
    cache.suspend()
    assert [cache.get("h", lookup) for _ in range(2)] == [7, 7]
    assert len(reads) == 3
    answers["h"] = None  # deactivated through another replica
    assert cache.get("h", lookup) is None
    answers["h"] = 7
    assert cache.get("h", lookup) == 7 and len(reads) == 5
    del answers["h"]  # the database is away: the key this process verified still serves
    assert cache.get("h", lookup) == 7
    answers["h"] = 7
    cache.resume()
    assert [cache.get("h", lookup) for _ in range(3)] == [7, 7, 7]
    assert len(reads) == 7  # one fresh read, then the cache


def test_a_lookup_overtaken_by_a_reread_is_kept_only_as_the_outage_fallback():
    """The listener (re)connected while a request read the key: the answer may predate a lost
    deactivation, so the next use reads again; but while the database is away it still serves."""
    cache = ActiveKeys(30.0)

    def read_then_expired(key_hash: str) -> int:
        cache.expire()  # the listener's reconnection lands between the read and the write-back
        return 7

    def away(key_hash: str) -> int:
        raise DatabaseUnavailable("connection refused")

    assert cache.get("h", read_then_expired) == 7
    reads: list[str] = []
    assert cache.get("h", lambda key_hash: reads.append(key_hash) or 7) == 7 and reads == ["h"]
    cache.expire()
    assert cache.get("h", away) == 7


def test_a_key_found_deactivated_is_not_brought_back_by_an_outage():
    cache = ActiveKeys(30.0)
    answers: dict[str, int | None] = {"h": 7}

    def lookup(key_hash: str) -> int | None:
        if key_hash not in answers:
            raise DatabaseUnavailable("connection refused")
        return answers[key_hash]

    assert cache.get("h", lookup) == 7
    cache.expire()  # the next use reads the database again
    answers["h"] = None  # deactivated
    assert cache.get("h", lookup) is None
    del answers["h"]  # then the database goes away
    with pytest.raises(DatabaseUnavailable):
        cache.get("h", lookup)


def at_once(store: Store, *actions: Callable[[], object]) -> list[object]:
    """Each action in a thread of its own, started together: what each returned, or the name of
    what it raised."""
    go = threading.Barrier(len(actions))
    outcomes: list[object] = [None] * len(actions)

    def run(index: int) -> None:
        go.wait()
        try:
            outcomes[index] = actions[index]()
        except Exception as exc:
            outcomes[index] = type(exc).__name__
        finally:
            store.release()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(actions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcomes


def test_a_generation_request_racing_a_verification_leaves_no_link_beside_the_new_key(database_url, runtime_with):
    """The request checked for an active key before it took the email's lock: one that raced
    the verification of the email's last link mailed a new link after the key was issued, and a
    mail scanner that followed it replaced the key. Now either the request is refused (409), or
    its link was mailed first and the verification spent it."""
    rt = runtime_with(database_url, mail_limit_per_client=0, key_requests_per_min=0)
    keys, store = rt.deps.keys, rt.store
    for round_ in range(20):
        email, token = f"race{round_}@example.org", f"link-{round_}"
        with store.transaction():
            store.add_token(digest(token), "generation", email, utcnow(), timedelta(hours=1))
        store.release()
        verified, requested = at_once(store, partial(keys.verify, token), partial(keys.request_key, email, "client"))
        assert verified == ("generation", email) and requested in (None, "EmailTaken")
        with store.db.connection_context():
            left = Token.select().where((Token.email == email) & Token.used_at.is_null()).count()
        assert left == 0, f"round {round_}: a link beside the key issued"


@pytest.mark.parametrize(
    "email, box",
    [
        ("me+tag@example.org", "me@example.org"),
        ("me+a+b@example.org", "me@example.org"),
        ("me@example.org", "me@example.org"),
        ("+alice@example.org", "+alice@example.org"),  # no mailbox before the first +: it is part of the name
        ("+alice+x@example.org", "+alice@example.org"),
    ],
)
def test_the_mailbox_an_address_reaches(email, box):
    assert mailbox(email) == box
