"""What the database holds: digests only, no mail body after delivery, last_used written off the
hot path, and tables that can be created again; on SQLite and PostgreSQL."""
from __future__ import annotations

import falcon.testing
import pytest

from service.app import create_app
from service.keys import digest
from service.runtime import Runtime
from service.store import ApiKey, OutboxMail, Token

from .conftest import make_config, obtain_key, verify_link, wait_until

WINDOW = {"ecg_signal": [float(i % 50) for i in range(1300)]}


@pytest.fixture
def runtime_on(tmp_path, database_url, smtp):
    rt = Runtime(make_config(tmp_path, database_url, smtp_host="127.0.0.1", smtp_port=smtp.port,
                             smtp_security="none"))
    yield rt
    rt.close()


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


def test_last_used_is_recorded_in_memory_and_flushed(runtime_on, smtp):
    client = falcon.testing.TestClient(create_app(runtime_on.deps))
    key = obtain_key(client, smtp, "busy@example.org")
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
