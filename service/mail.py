"""How mails are sent: SMTP or a folder, and the outbox worker that delivers the outbox table.

Every mail is first written to the outbox table in the same transaction as the key or token it
carries (see ``keys``); the worker here delivers it, retrying with backoff until the mail server
takes it, so a server that is down at request time still gets the mail once it is back.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from service.background import Loop
from service.files import atomic_write
from service.messages import compose

if TYPE_CHECKING:
    from service.store import OutboxMail, Store

log = logging.getLogger(__name__)

# Mails claimed per step; the worker comes straight back while more are due.
CLAIM_BATCH = 20
# Upper bound on an idle worker's sleep, so mails left by a crashed replica are picked up.
IDLE_POLL_S = 60.0


Send = Callable[[EmailMessage], None]


class Sender(Protocol):
    """Opens a delivery session; the yielded callable sends one message."""

    def session(self) -> AbstractContextManager[Send]: ...


class SmtpSender:
    """Delivers through an SMTP server; one connection per batch of due mails."""

    def __init__(
        self, host: str, port: int, security: str, user: str | None, password: str | None, timeout_s: float
    ) -> None:
        self._host, self._port, self._security = host, port, security
        self._user, self._password, self._timeout_s = user, password, timeout_s

    @contextmanager
    def session(self) -> Iterator[Send]:
        context = ssl.create_default_context()
        if self._security == "ssl":
            client = smtplib.SMTP_SSL(self._host, self._port, timeout=self._timeout_s, context=context)
        else:
            client = smtplib.SMTP(self._host, self._port, timeout=self._timeout_s)
        try:
            if self._security == "starttls":
                client.starttls(context=context)
            if self._user:
                client.login(self._user, self._password or "")
            yield client.send_message
        finally:
            try:
                client.quit()
            except (OSError, smtplib.SMTPException):
                client.close()


class FolderSender:
    """No mail server configured: each mail goes to the log and to ``<folder>/<id>.eml``."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder

    @contextmanager
    def session(self) -> Iterator[Send]:
        self._folder.mkdir(parents=True, exist_ok=True)
        yield self._write

    def _write(self, message: EmailMessage) -> None:
        """Written atomically, so whoever watches the folder for ``*.eml`` never reads half a
        mail; readable by this user only, since key mails carry keys."""
        path = self._folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.eml"
        atomic_write(path, message.as_bytes(), mode=0o600)
        text = message.get_body(("plain",))
        log.info(
            "Mail to %s (no SMTP_HOST; saved as %s)\nSubject: %s\n\n%s",
            message["To"],
            path,
            message["Subject"],
            text.get_content() if text else "",
        )


class Outbox:
    """Delivers the outbox table in the background, with exponential backoff per mail."""

    def __init__(
        self,
        store: Store,
        sender: Sender,
        from_address: str,
        retry_min_s: float,
        retry_max_s: float,
        on_pending: Callable[[int], None] | None = None,
    ) -> None:
        self._store = store
        self._on_pending = on_pending  # told how many mails wait after each step (service.metrics)
        self._sender = sender
        self._from = from_address
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._loop = Loop("mail-outbox", self._step, error_delay_s=retry_min_s)

    def start(self) -> None:
        self._loop.start()

    def wake(self) -> None:
        """Called after a transaction that queued a mail commits: deliver it now."""
        self._loop.wake()

    def close(self) -> None:
        self._loop.close()

    def _step(self) -> float:
        due = self._store.claim_due_mails(CLAIM_BATCH)
        if due:
            self._deliver(due)
        if self._on_pending is not None:
            self._on_pending(self._store.pending_mails())
        wait = self._store.seconds_to_next_mail()
        return IDLE_POLL_S if wait is None else min(wait, IDLE_POLL_S)

    def _deliver(self, due: list[OutboxMail]) -> None:
        done: set[int] = set()
        try:
            with self._sender.session() as send:
                for row in due:
                    try:
                        send(compose(row.as_mail(), self._from))
                    except Exception as exc:  # whatever one mail raises must not hold back the others
                        self._retry_later(row, exc)
                    else:
                        self._store.mark_sent(row.id)
                        log.info("Mail %d to %s delivered", row.id, row.recipient)
                    done.add(row.id)
        except (OSError, smtplib.SMTPException) as exc:  # no session, or it broke when closing
            for row in due:
                if row.id not in done:
                    self._retry_later(row, exc)

    def _retry_later(self, row: OutboxMail, exc: Exception) -> None:
        attempts = row.attempts + 1
        delay = min(self._retry_max_s, self._retry_min_s * 2 ** (attempts - 1))
        error = f"{type(exc).__name__}: {exc}"
        log.warning(
            "Mail %d to %s not delivered (attempt %d, %s); retrying in %.3g s",
            row.id,
            row.recipient,
            attempts,
            error,
            delay,
        )
        self._store.retry_mail(row.id, attempts, delay, error)
