"""What a hostile client or a careless copy of the database cannot do: rate limits, links that
die with the key they issued, sealed mails, mails given up when refused for good, old rows
purged, and the HTTP headers every answer carries."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import smtplib
import socket
import sqlite3
import threading
import time
from datetime import datetime, timedelta
from functools import partial

import falcon.testing
import pytest

from service import mail
from service.app import create_app
from service.clients import parse_networks
from service.connections import create_server
from service.housekeeping import Housekeeping
from service.keys import KeyService, digest
from service.messages import Mail
from service.process import StartupError
from service.runtime import Runtime
from service.store import OutboxMail, Token, utcnow

from .conftest import SmtpServer, free_port, http, issue_key, key_in, make_config, smtp_env, verify_link, wait_until

GENERATION = "/api/v1/api-keys/generation"
DEACTIVATION = "/api/v1/api-keys/deactivation"
DENOISE = "/api/v1/denoising"
WINDOW = {"ecg_signal": [float(i % 50) for i in range(1300)]}


def client_of(rt: Runtime) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(rt.deps))


def dump(rt: Runtime) -> str:
    with rt.store.db.connection_context():
        return repr([list(model.select().tuples()) for model in (Token, OutboxMail)])


# -- rate limits --------------------------------------------------------------------------------
def assert_429(result, message: str) -> None:
    assert result.status_code == 429, result.text
    assert result.json == {"error": message}
    assert 0 < int(result.headers["retry-after"]) <= 3600


@pytest.mark.slow
def test_key_mails_per_email_are_limited_across_processes(database_url, runtime_with, service_process, smtp):
    """A service process and this test's runtime share one database, as replicas do: the count
    is the database's, whichever process took the requests."""
    first = client_of(runtime_with(database_url))
    second = service_process({"DATABASE_URL": database_url, **smtp_env(smtp.port)})
    assert first.simulate_post(GENERATION, json={"email": "flood@example.org"}).status_code == 200
    assert http("POST", f"{second.url}{GENERATION}", {"email": "flood@example.org"})[0] == 200
    assert first.simulate_post(GENERATION, json={"email": "Flood@Example.org"}).status_code == 200
    assert_429(
        first.simulate_post(GENERATION, json={"email": "flood@example.org"}),
        "Too many key mails for this email address. Try again later.",
    )
    status, body = http("POST", f"{second.url}{GENERATION}", {"email": "flood@example.org"})
    assert (status, body) == (429, {"error": "Too many key mails for this email address. Try again later."})
    assert len(smtp.mailbox.wait_for(3)) == 3
    assert first.simulate_post(GENERATION, json={"email": "other@example.org"}).status_code == 200


def test_key_mails_to_subaddresses_count_toward_their_mailbox(runtime_with, sqlite_url):
    """``me+a@`` and ``me+b@`` reach ``me@``'s inbox: tags do not multiply what it can be sent.
    A mail of an older version's (its row has no mailbox) counts for its address."""
    rt = runtime_with(sqlite_url, mail_limit_per_email=3)
    with rt.store.db.connection_context():
        rt.store.add_token(digest("older"), "generation", "victim@example.org", utcnow(), timedelta(hours=1))
    client = client_of(rt)
    for email in ("victim+a@example.org", "victim+b@example.org"):
        assert client.simulate_post(GENERATION, json={"email": email}).status_code == 200
    for email in ("victim@example.org", "Victim+C@example.org"):
        assert_429(
            client.simulate_post(GENERATION, json={"email": email}),
            "Too many key mails for this email address. Try again later.",
        )
    assert client.simulate_post(GENERATION, json={"email": "victim@example.net"}).status_code == 200


def test_key_mails_per_client_count_the_peer_unless_a_trusted_proxy_names_another(tmp_path, runtime_with, sqlite_url):
    first = runtime_with(sqlite_url, mail_limit_per_client=2)
    limited = client_of(first)
    forged = {"X-Forwarded-For": "203.0.113.9"}  # from an untrusted peer: ignored
    for n in range(2):
        assert limited.simulate_post(GENERATION, json={"email": f"a{n}@example.org"}, headers=forged).status_code == 200
    assert_429(
        limited.simulate_post(GENERATION, json={"email": "a9@example.org"}, headers=forged),
        "Too many key mail requests from this address. Try again later.",
    )
    first.close()  # one store per process at a time (service.store binds the models globally)
    behind_proxy = f"sqlite:///{tmp_path / 'proxied.db'}"  # a database of its own: one store per database
    proxied = runtime_with(behind_proxy, mail_limit_per_client=2, trusted_proxies=(_net("127.0.0.1"),))
    # Through waitress, which drops X-Forwarded-For unless told to pass it on.
    server = create_server(create_app(proxied.deps), dataclasses.replace(proxied.config, host="127.0.0.1", port=0))
    loop = threading.Thread(target=server.run, daemon=True)
    loop.start()
    url = f"http://127.0.0.1:{server.effective_port}{GENERATION}"
    try:
        for n in range(3):  # three different clients behind the proxy
            headers = {"X-Forwarded-For": f"198.51.100.{n}, 127.0.0.1"}
            assert http("POST", url, {"email": f"b{n}@example.org"}, headers)[0] == 200
        again = {"X-Forwarded-For": "198.51.100.0"}
        assert http("POST", url, {"email": "b8@example.org"}, again)[0] == 200
        assert http("POST", url, {"email": "b9@example.org"}, again)[0] == 429  # its third
    finally:
        server.drain(1)
        loop.join(10)


def test_key_requests_per_client_are_limited_whatever_their_answer(runtime_with, sqlite_url):
    """The 409 and 404 answers send no mail, and tell whether an address holds a key: counted
    too, a client cannot ask about addresses at full speed."""
    rt = runtime_with(sqlite_url, key_requests_per_min=3, mail_limit_per_client=0)
    client = client_of(rt)
    issue_key(rt.store, "holder@example.org")
    answers = [
        client.simulate_post(GENERATION, json={"email": "holder@example.org"}).status_code,
        client.simulate_post(DEACTIVATION, json={"email": "nobody@example.org"}).status_code,
        client.simulate_post(GENERATION, json={"email": "new@example.org"}).status_code,
    ]
    assert answers == [409, 404, 200]
    too_many = "Too many key requests from this address. Try again later."
    assert_429(client.simulate_post(DEACTIVATION, json={"email": "holder@example.org"}), too_many)
    other = {"X-Forwarded-For": "203.0.113.9"}  # from an untrusted peer: ignored, the same client
    assert_429(client.simulate_post(GENERATION, json={"email": "x@example.org"}, headers=other), too_many)


@pytest.mark.parametrize(
    "spellings",
    [
        ["2001:db8::1", "2001:0db8:0000::0001", "2001:db8::2"],  # one address twice, then its /64's next
        ["10.9.9.9", "::ffff:10.9.9.9", "10.9.9.9"],  # IPv4, and the same mapped into IPv6
        ["not an address", "also not", "again"],  # the proxy's word is not taken: its own address counts
        ["1.2.3.4:5678", "1.2.3.4", "[::ffff:1.2.3.4]:443"],  # the ports some proxies add
    ],
)
def test_the_per_client_limits_count_one_client_however_its_address_is_written(runtime_with, sqlite_url, spellings):
    """Each spelling of an address, each address of an IPv6 /64 (one subscriber's), and each
    string a proxy passed on was a client of its own, with limits of its own."""
    # The proxy written as an IPv6 block of IPv4 addresses, as a dual-stack listener sees it.
    rt = runtime_with(sqlite_url, key_requests_per_min=2, trusted_proxies=parse_networks("::ffff:127.0.0.0/104"))
    client = client_of(rt)
    answers = [
        client.simulate_post(DEACTIVATION, json={"email": "nobody@example.org"}, headers={"X-Forwarded-For": who})
        for who in spellings
    ]
    assert [answer.status_code for answer in answers] == [404, 404, 429]


def _net(address: str):
    import ipaddress

    return ipaddress.ip_network(address)


def test_denoising_is_limited_per_key(runtime_with, sqlite_url):
    rt = runtime_with(sqlite_url, denoise_rate_per_s=0.01, denoise_burst=3)
    client = client_of(rt)
    busy, calm = issue_key(rt.store, "busy@example.org"), issue_key(rt.store, "calm@example.org")
    assert [client.simulate_post(DENOISE, json=WINDOW, headers={"x-api-key": busy}).status_code for _ in range(3)] == [
        200
    ] * 3
    assert_429(
        client.simulate_post(DENOISE, json=WINDOW, headers={"x-api-key": busy}),
        "Too many requests for this API key. Slow down.",
    )
    assert client.simulate_post(DENOISE, json=WINDOW, headers={"x-api-key": calm}).status_code == 200


def test_limits_set_to_zero_are_off(runtime_with, sqlite_url):
    rt = runtime_with(
        sqlite_url, mail_limit_per_email=0, mail_limit_per_client=0, key_requests_per_min=0, denoise_rate_per_s=0
    )
    client = client_of(rt)
    assert all(
        client.simulate_post(GENERATION, json={"email": "many@example.org"}).status_code == 200 for _ in range(5)
    )
    key = issue_key(rt.store, "fast@example.org")
    assert all(
        client.simulate_post(DENOISE, json=WINDOW, headers={"x-api-key": key}).status_code == 200 for _ in range(5)
    )


# -- links and secrets --------------------------------------------------------------------------
def test_queued_mails_are_sealed_until_delivered(tmp_path, runtime_with, sqlite_url):
    """The mail server is down: the link and then the key wait in the outbox, and a copy of the
    database holds neither; once the server is back, both arrive readable."""
    port = free_port()
    rt = runtime_with(sqlite_url, smtp_port=port)
    client = client_of(rt)
    assert client.simulate_post(GENERATION, json={"email": "sealed@example.org"}).status_code == 200
    with rt.store.db.connection_context():
        (row,) = OutboxMail.select()
    assert "token=" not in (row.text_body + row.html_body) and "sealed" not in row.text_body
    server = SmtpServer(port).start()
    try:
        link = verify_link(server.mailbox.wait_for(1)[0])
        token = link.rsplit("=", 1)[1]
        assert token not in dump(rt) and digest(token) in dump(rt)
        assert client.simulate_get(link.replace("http://testserver", "")).status_code == 200
        key = key_in(server.mailbox.wait_for(2)[1])
        assert key not in dump(rt)
    finally:
        server.stop()


def test_without_secret_key_sqlite_gets_a_private_secret_file(tmp_path, runtime_with, caplog):
    caplog.set_level(logging.WARNING)
    url = f"sqlite:///{tmp_path / 'local.db'}"
    runtime_with(url, secret_key=None).close()
    secret = tmp_path / "local.db.secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_text().strip()) >= 32
    assert any("generated one into" in r.getMessage() for r in caplog.records)
    before = secret.read_text()
    runtime_with(url, secret_key=None)
    assert secret.read_text() == before  # kept: mails queued before a restart still open


@pytest.mark.postgres
def test_postgres_without_secret_key_does_not_start(tmp_path, postgres_url, engine):
    with pytest.raises(StartupError, match="SECRET_KEY must be set with PostgreSQL"):
        Runtime(make_config(tmp_path, postgres_url, secret_key=None), engine=engine).start()


def test_a_mail_this_secret_cannot_open_is_left_for_one_that_can(tmp_path, runtime_with, sqlite_url, smtp):
    """A replica with another SECRET_KEY (or one rotated the wrong way round) gave up each mail
    it could not open on its first try, and wiped it: mails, and keys, that the other replicas
    would have sent were lost."""
    old = runtime_with(sqlite_url, secret_key="old-secret", smtp_port=free_port())
    with old.store.db.connection_context():
        old.store.enqueue_mail(old.sealer.seal(Mail("x@example.org", "s", "t", "<p>h</p>")), utcnow())
    old.close()  # it may have tried it already, at a mail server that is not there
    other = runtime_with(sqlite_url, secret_key="other-secret")

    def row() -> OutboxMail:
        with other.store.db.connection_context():
            return OutboxMail.get()

    attempts = row().attempts
    other.outbox.wake()
    wait_until(lambda: "cannot be opened with SECRET_KEY" in (row().last_error or ""), what="the mail tried")
    left = row()
    assert left.failed_at is None and left.sent_at is None and left.text_body is not None
    assert left.attempts == attempts  # none spent
    other.close()
    rotated = runtime_with(sqlite_url, secret_key="newest, old-secret")  # rotation: old mails still open
    rotated.outbox.wake()
    assert smtp.mailbox.wait_for(1)[0]["To"] == "x@example.org"


# -- mail that cannot be delivered --------------------------------------------------------------
def test_a_permanent_refusal_is_given_up_and_a_transient_one_retried(runtime_with, sqlite_url, smtp, caplog):
    smtp.mailbox.refuse = {"gone@example.org": "550 5.1.1 No such user", "full@example.org": "452 4.2.2 Mailbox full"}
    rt = runtime_with(sqlite_url, mail_max_attempts=3)
    client = client_of(rt)
    for address in ("gone@example.org", "full@example.org", "fine@example.org"):
        assert client.simulate_post(GENERATION, json={"email": address}).status_code == 200
    assert smtp.mailbox.wait_for(1)[0]["To"] == "fine@example.org"

    def row(address: str) -> OutboxMail:
        with rt.store.db.connection_context():
            return OutboxMail.get(OutboxMail.recipient == address)

    wait_until(lambda: row("gone@example.org").failed_at is not None, what="the refused mail given up")
    gone = row("gone@example.org")
    assert gone.attempts == 3 and "550" in gone.last_error and gone.text_body is None
    assert any(r.levelno == logging.ERROR and "given up" in r.getMessage() for r in caplog.records)
    wait_until(lambda: row("full@example.org").attempts >= 4, what="the transient failure retried")
    assert row("full@example.org").failed_at is None and row("full@example.org").sent_at is None


@pytest.mark.parametrize(
    "exc, given_up",
    [
        (smtplib.SMTPRecipientsRefused({"gone@example.org": (550, b"5.1.1 No such user")}), True),
        (smtplib.SMTPDataError(554, b"5.6.0 Message rejected"), True),
        (smtplib.SMTPDataError(451, b"4.3.0 Try again later"), False),
        # The service's own settings: every queued mail was given up within seconds.
        (smtplib.SMTPSenderRefused(530, b"5.7.0 Authentication required", "no-reply@example.org"), False),
        (ConnectionResetError(), False),
    ],
)
def test_what_a_mail_server_refuses_for_good(exc, given_up):
    assert mail.permanent(exc) is given_up


def test_housekeeping_purges_what_is_past_retention(runtime_with, sqlite_url):
    rt = runtime_with(sqlite_url)
    rt.housekeeping.close()  # its pass at start must not race the one this test makes
    old, recent = utcnow() - timedelta(days=31), utcnow() - timedelta(days=1)
    store = rt.store
    with store.db.connection_context():
        for n, when in enumerate((old, recent)):
            store.add_token(digest(f"used{n}"), "generation", "a@example.org", when, timedelta(hours=24))
            store.use_token(Token.get(Token.token_hash == digest(f"used{n}")).id, when)
            store.enqueue_mail(rt.sealer.seal(Mail("a@example.org", "s", "t", "h")), when)
        store.add_token(digest("pending"), "generation", "a@example.org", utcnow(), timedelta(hours=24))
        OutboxMail.update(sent_at=OutboxMail.created_at).execute()
    removed = Housekeeping(store, timedelta(days=30)).purge()
    assert removed == {"tokens": 1, "mails": 1}
    with store.db.connection_context():
        assert Token.select().count() == 2 and OutboxMail.select().count() == 1


def sent_mail(store) -> OutboxMail | None:
    with store.db.connection_context():
        return OutboxMail.get_or_none(OutboxMail.sent_at.is_null(False))


def test_a_mail_server_slow_to_confirm_a_message_gets_it_once(runtime_with, sqlite_url, smtp):
    """The server had the whole message and confirmed it after SMTP_TIMEOUT_SECONDS: each
    attempt was taken for a failure, and the mail sent again and again."""
    smtp.mailbox.confirm_after_s = 1.5
    rt = runtime_with(sqlite_url, smtp_timeout_s=0.5, mail_retry_min_s=0.1, mail_retry_max_s=0.2)
    assert client_of(rt).simulate_post(GENERATION, json={"email": "slow@example.org"}).status_code == 200

    mail = wait_until(partial(sent_mail, rt.store), 20, "the mail recorded as delivered")
    assert mail.attempts == 0 and mail.last_error is None  # on the first try, never taken for a failure
    assert [m["To"] for m in smtp.mailbox.messages] == ["slow@example.org"]


def test_a_mail_server_that_never_confirms_in_time_gets_the_mail_a_bounded_number_of_times(
    runtime_with, sqlite_url, smtp, monkeypatch, caplog
):
    """Past the wait for the final reply, each attempt was a lost connection, retried for as
    long as it took: a server that always confirmed late got the same mail every few minutes,
    forever."""
    monkeypatch.setattr(mail, "FINAL_REPLY_S", 0.3)
    smtp.mailbox.confirm_after_s = 1.0
    rt = runtime_with(sqlite_url, smtp_timeout_s=0.2, mail_retry_min_s=0.05, mail_retry_max_s=0.1)
    assert client_of(rt).simulate_post(GENERATION, json={"email": "late@example.org"}).status_code == 200

    wait_until(partial(sent_mail, rt.store), 20, "the mail taken as delivered")
    time.sleep(0.5)  # what a further retry would have sent by now
    assert [m["To"] for m in smtp.mailbox.messages] == ["late@example.org"] * 3  # the outbox's attempts
    assert any("taken as delivered" in r.getMessage() for r in caplog.records)


class Tarpit:
    """A mail server that trickles a never-ending greeting, a line every 0.1 s (as spam tarpits
    do), until it recovers: then it passes each new connection on to the real one."""

    def __init__(self, real_port: int) -> None:
        self._real_port = real_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.recovered = threading.Event()
        self.connections = 0
        self._closed = threading.Event()

    def start(self) -> Tarpit:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def close(self) -> None:
        self._closed.set()
        self._listener.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._listener.accept()
                self.connections += 1
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            if not self.recovered.is_set():
                while not self._closed.wait(0.1):
                    conn.sendall(b"220-still here\r\n")
                return
            with socket.create_connection(("127.0.0.1", self._real_port)) as real:
                threading.Thread(target=_pipe, args=(real, conn), daemon=True).start()
                _pipe(conn, real)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def test_a_mail_server_that_trickles_its_replies_is_cut_off_and_gets_the_mail_once_it_recovers(
    runtime_with, sqlite_url, smtp, monkeypatch, caplog
):
    """SMTP_TIMEOUT_SECONDS bounds each read: a server that sent a line every 0.1 s never reached
    it, and held the outbox's thread for good. No mail went out, even once the server had
    recovered, and nothing was logged. Now the session is cut at the batch's deadline."""
    monkeypatch.setattr(mail, "CUT_AFTER_S", 2.0)
    monkeypatch.setattr(mail, "FINAL_REPLY_S", 0.2)  # a mail is begun while its end fits before the cut
    tarpit = Tarpit(smtp.port).start()
    try:
        rt = runtime_with(sqlite_url, smtp_port=tarpit.port, smtp_timeout_s=0.5, mail_retry_min_s=0.2)
        assert client_of(rt).simulate_post(GENERATION, json={"email": "tarpit@example.org"}).status_code == 200
        cut = "the connection was cut"
        wait_until(lambda: any(cut in r.getMessage() for r in caplog.records), 10, "the session cut")
        tarpit.recovered.set()
        wait_until(partial(sent_mail, rt.store), 10, "the mail delivered once the server recovered")
        assert [m["To"] for m in smtp.mailbox.messages] == ["tarpit@example.org"]
    finally:
        tarpit.close()


def test_only_unconfirmed_attempts_count_toward_taking_a_mail_as_delivered(
    runtime_with, sqlite_url, smtp, monkeypatch, caplog
):
    """Two attempts that never reached the server (cut in its greeting, say), then one whose data
    it took without confirming: the mail was taken as delivered, though the server had it once
    and was about to refuse it."""
    monkeypatch.setattr(mail, "FINAL_REPLY_S", 0.3)
    smtp.mailbox.confirm_after_s = 1.0
    rt = runtime_with(sqlite_url, smtp_timeout_s=0.2, mail_retry_min_s=60, mail_retry_max_s=60)
    store = rt.store
    with store.db.connection_context(), store.transaction():
        store.enqueue_mail(rt.sealer.seal(Mail("twice@example.org", "Key", "text", "<p>html</p>")), utcnow())
        OutboxMail.update(attempts=2).execute()  # as two failures before the server was reached
    rt.outbox.wake()
    smtp.mailbox.wait_for(1)

    def retried() -> OutboxMail | None:
        with store.db.connection_context():
            return OutboxMail.get_or_none(OutboxMail.last_error.is_null(False))

    row = wait_until(retried, 10, "the attempt recorded")
    assert (row.attempts, row.unconfirmed, row.sent_at) == (3, 1, None)  # due again, in a minute
    assert not any("taken as delivered" in r.getMessage() for r in caplog.records)


def test_a_stop_cuts_a_mail_server_that_trickles_and_gives_the_batch_back(runtime_with, sqlite_url, smtp):
    """A stop waited 35 s for a server that trickled its greeting, and left the batch claimed:
    the next process sent it two minutes later (a worker was killed first)."""
    tarpit = Tarpit(smtp.port).start()
    try:
        rt = runtime_with(sqlite_url, smtp_port=tarpit.port, smtp_timeout_s=0.5)
        store = rt.store
        with store.db.connection_context(), store.transaction():
            for n in range(3):
                store.enqueue_mail(rt.sealer.seal(Mail(f"held{n}@example.org", "Key", "text", "<p>html</p>")), utcnow())
        rt.outbox.wake()
        wait_until(lambda: tarpit.connections, 10, "the outbox connected")
        rt.outbox.stop()  # as SIGTERM does
        rt.outbox.close()
        with store.db.connection_context():
            rows = list(OutboxMail.select())
        assert [(r.attempts, r.sent_at, r.next_attempt_at <= utcnow()) for r in rows] == [(0, None, True)] * 3
    finally:
        tarpit.close()


@pytest.mark.slow
def test_a_stop_waits_for_the_mail_its_server_is_slow_to_confirm(runtime_with, sqlite_url, smtp):
    """A stop gave the outbox 10 s, less than the 30 s a server may take to confirm a mail: the
    mail stayed claimed, and went again after the restart. The mails of its batch behind it are
    not sent by the stopping process, and are due at once for the next."""
    smtp.mailbox.confirm_after_s = 11.0
    rt = runtime_with(sqlite_url)
    store, seal = rt.store, rt.sealer.seal
    with store.db.connection_context(), store.transaction():  # one batch of three
        for n in range(3):
            store.enqueue_mail(seal(Mail(f"batch{n}@example.org", "Batch", "text", "<p>html</p>")), utcnow())
    rt.outbox.wake()
    smtp.mailbox.wait_for(1)  # kept by the server, which confirms it 11 s later
    rt.outbox.stop()  # as SIGTERM does
    rt.close()
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as db:
        rows = db.execute("SELECT recipient, sent_at IS NOT NULL, next_attempt_at FROM outbox_mail ORDER BY id")
        mails = [(to, sent, datetime.fromisoformat(due) <= utcnow()) for to, sent, due in rows.fetchall()]
    assert [m["To"] for m in smtp.mailbox.messages] == ["batch0@example.org"]
    assert mails[0][:2] == ("batch0@example.org", 1)
    assert mails[1:] == [("batch1@example.org", 0, True), ("batch2@example.org", 0, True)]  # not claimed


@pytest.mark.parametrize("at", ["RCPT", "DATA"])
def test_a_recipient_whose_refusal_closes_the_connection_holds_back_no_other_mail(runtime, smtp, at):
    """On a 421 to RCPT smtplib closes the connection: the mails after it in the batch went out on
    a dead connection and failed with it, for as long as that recipient kept failing. A refusal
    of DATA leaves the transaction open: the next mail's MAIL FROM was refused as nested."""
    refusals = smtp.mailbox.refuse if at == "RCPT" else smtp.mailbox.refuse_data
    refusals["closing@example.org"] = "421 Too busy, closing" if at == "RCPT" else "451 Try again later"
    with runtime.store.db.connection_context():
        for address in ("closing@example.org", "first@example.org", "second@example.org"):
            runtime.store.enqueue_mail(runtime.sealer.seal(Mail(address, "s", "t", "h")), utcnow())
    runtime.outbox.wake()
    delivered = smtp.mailbox.wait_for(2)
    assert sorted(m["To"] for m in delivered) == ["first@example.org", "second@example.org"]
    with runtime.store.db.connection_context():
        tries = {m.recipient: m.attempts for m in OutboxMail.select()}
    assert tries["first@example.org"] == tries["second@example.org"] == 0  # sent at the first try


def test_a_mail_goes_to_the_stored_address_whatever_its_to_header_decodes_to(runtime, smtp):
    """An encoded word decodes to another mailbox in the To header; the envelope keeps the stored
    address (an outbox row from before addresses holding one were refused)."""
    runtime.store.enqueue_mail(runtime.sealer.seal(Mail("=?utf-8?q?victim?=@example.org", "s", "t", "h")), utcnow())
    runtime.outbox.wake()
    smtp.mailbox.wait_for(1)
    assert smtp.mailbox.rcpt_lines == ["TO:<=?utf-8?q?victim?=@example.org>"]


# -- HTTP hygiene -------------------------------------------------------------------------------
def test_every_answer_is_nosniff_and_only_the_openapi_document_may_be_cached(runtime, client, smtp):
    key = issue_key(runtime.store, "h@example.org")
    answers = {
        "ok": client.simulate_post(DENOISE, json=WINDOW, headers={"x-api-key": key}),
        "recording": client.simulate_post(DENOISE + "/record", json=WINDOW, headers={"x-api-key": key}),
        "bad": client.simulate_post(DENOISE, json={}, headers={"x-api-key": key}),
        "unauthorized": client.simulate_post(DENOISE, json=WINDOW),
        "missing": client.simulate_get("/nowhere"),
        "health": client.simulate_get("/healthz"),
        "mail": client.simulate_post(GENERATION, json={"email": "new@example.org"}),
    }
    assert all(a.headers["x-content-type-options"] == "nosniff" for a in answers.values())
    assert answers["recording"].status_code == 200
    for name in ("ok", "recording", "bad", "unauthorized", "missing", "health", "mail"):
        assert answers[name].headers["cache-control"] == "no-store", name
    assert "cache-control" not in client.simulate_get("/openapi.json").headers
    assert client.simulate_head("/openapi.json").status_code == 200
    page = client.simulate_get(verify_link(smtp.mailbox.wait_for(1)[0]).replace("http://testserver", ""))
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "DENY"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy and "unsafe" not in policy


def test_cors_is_off_by_default_and_allows_named_origins(runtime_with, sqlite_url):
    origin = {"Origin": "https://app.example.org"}
    closed_rt = runtime_with(sqlite_url)
    closed = client_of(closed_rt)
    assert "access-control-allow-origin" not in closed.simulate_get("/healthz", headers=origin).headers
    assert "vary" not in closed.simulate_get("/healthz", headers=origin).headers
    closed_rt.close()
    opened = client_of(runtime_with(sqlite_url, cors_allow_origins=("https://app.example.org",)))
    assert opened.simulate_get("/healthz", headers=origin).headers["access-control-allow-origin"] == origin["Origin"]
    other = opened.simulate_get("/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    assert other.headers["vary"] == "Origin"  # a shared cache keeps one answer per origin
    preflight = opened.simulate_options(
        DENOISE,
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key, content-type",
        },
    )
    assert preflight.status_code == 200
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
    anyone = client_of(runtime_with(sqlite_url, cors_allow_origins=("*",)))  # CORS_ALLOW_ORIGINS=*: it failed to start
    assert anyone.simulate_get("/healthz", headers=origin).headers["access-control-allow-origin"] == "*"


def test_one_access_line_per_request_with_its_id_and_no_secret(runtime, client, caplog):
    caplog.set_level(logging.INFO, logger="service.access")
    key = issue_key(runtime.store, "log@example.org")
    given = client.simulate_post(DENOISE, json=WINDOW, headers={"x-api-key": key, "X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = client.simulate_get("/api/v1/api-keys/verify", params={"token": "secret-token-value"})
    hostile = client.simulate_get("/healthz", headers={"X-Request-ID": "x" * 500})
    assert len(made.headers["x-request-id"]) >= 16 and hostile.headers["x-request-id"] != "x" * 500
    lines = [r.getMessage() for r in caplog.records if r.name == "service.access"]
    assert len(lines) == 3
    assert lines[0].startswith("POST /api/v1/denoising 200 ") and "id=abc-123" in lines[0]
    assert lines[1].startswith("GET /api/v1/api-keys/verify 400 ")
    assert not any(key in line or "secret-token-value" in line for line in lines)


def test_the_app_takes_its_clock_and_request_ids_from_its_dependencies(runtime, caplog):
    caplog.set_level(logging.INFO, logger="service.access")
    ticks = iter([100.0, 100.0, 100.25, 100.25])  # in and out, the access log's and the metrics'
    deps = dataclasses.replace(runtime.deps, clock=lambda: next(ticks), new_id=lambda: "req-1")
    answer = falcon.testing.TestClient(create_app(deps)).simulate_get("/healthz")
    assert answer.headers["x-request-id"] == "req-1"
    [line] = [r.getMessage() for r in caplog.records if r.name == "service.access"]
    assert line.startswith("GET /healthz 200 250.0ms id=req-1 ")


@pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")  # the point: a method of 10 000 characters
def test_a_path_cannot_forge_log_lines_or_send_terminal_escapes(client, caplog):
    caplog.set_level(logging.INFO, logger="service.access")
    forged = "/x\n2026-11-30 13:00:00,000 ERROR service.mail: Mail 99 given up\x1b[31m\x00\u2028"
    assert client.simulate_get(forged).status_code == 404
    [line] = [r.getMessage() for r in caplog.records if r.name == "service.access"]
    assert line.startswith(
        "GET /x\\n2026-11-30 13:00:00,000 ERROR service.mail: Mail 99 given up\\x1b[31m\\x00\\u2028 404 "
    )
    assert line.isprintable()
    caplog.clear()
    client.simulate_request("Q" * 10_000, "/healthz")  # a method is any token: it was logged whole
    [line] = [r.getMessage() for r in caplog.records if r.name == "service.access"]
    assert line.startswith("Q" * 200 + " /healthz 400 ") and len(line) < 400


class BrokenKeys:
    """The key flows, with a bug in verification."""

    def __init__(self, keys: KeyService) -> None:
        self._keys = keys

    def __getattr__(self, name: str) -> object:
        return getattr(self._keys, name)

    def verify(self, token: str | None) -> tuple[str, str]:
        raise RuntimeError("a bug")


def test_a_bug_answers_json_500_and_its_log_holds_no_query_string(runtime, caplog, capsys):
    """Falcon's own handler printed the whole URL of a failed request to stderr: a verification
    link's token, still valid for a day, since the request failed."""
    client = falcon.testing.TestClient(
        create_app(dataclasses.replace(runtime.deps, keys=BrokenKeys(runtime.deps.keys)))
    )
    answer = client.simulate_get("/api/v1/api-keys/verify", query_string="token=secret-token-value")
    assert answer.status_code == 500 and answer.json == {"error": "Internal server error"}
    [record] = [r for r in caplog.records if r.getMessage().startswith("Unexpected error")]
    assert record.getMessage().startswith("Unexpected error on GET /api/v1/api-keys/verify (id=")
    assert record.exc_info is not None  # the traceback, for whoever fixes it
    assert "secret-token-value" not in caplog.text + capsys.readouterr().err
