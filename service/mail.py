"""How mails are sent: SMTP or a folder, and the outbox worker that delivers the outbox table.

Every mail is first written to the outbox table in the same transaction as the key or token it
carries (see ``keys``); the worker here delivers it, retrying with backoff until the mail server
takes it, so a server that is down at request time still gets the mail once it is back.
"""

from __future__ import annotations

import contextlib
import logging
import smtplib
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from service.background import Loop
from service.database import QUIET_ERRORS
from service.files import atomic_write
from service.messages import compose
from service.sealing import CannotOpen, Sealer
from service.store import CLAIM_LEASE, utcnow

if TYPE_CHECKING:
    from service.store import ClaimedMail, Store

log = logging.getLogger(__name__)

# Mails claimed per step; the worker comes straight back while more are due.
CLAIM_BATCH = 20
# Upper bound on an idle worker's sleep, so mails left by a crashed replica are picked up.
IDLE_POLL_S = 60.0
# A worker stops sending its claimed batch this long after claiming it (slow mail server): the
# rest waits for the lease to end rather than risk another worker claiming it mid-send.
SEND_WITHIN_S = CLAIM_LEASE.total_seconds() / 2
# How long the server's reply after a message's data is awaited, if SMTP_TIMEOUT_SECONDS (every
# other step's) is shorter. A server that has the whole message but confirms it late has likely
# delivered it: given up after SMTP_TIMEOUT_SECONDS, the mail was sent again at each retry.
# RFC 5321 allows 10 minutes; a mail begun within the batch's time (above) then still ends
# within its claim, unless its other steps each take their whole SMTP_TIMEOUT_SECONDS too.
FINAL_REPLY_S = CLAIM_LEASE.total_seconds() / 4
# A batch's connection to the mail server is cut this long after its claim, whatever it is doing:
# smtplib's timeout bounds each read, and a server that trickles its replies (a tarpit) never
# reaches it. So a mail under way ends before its claim does (no other worker sends it meanwhile),
# and the outbox is never held for good. A mail begun within SEND_WITHIN_S has the rest.
CUT_AFTER_S = CLAIM_LEASE.total_seconds() * 5 / 6
# At the end of a stop, the mail being sent is waited for this long beyond FINAL_REPLY_S (its
# wait began before the stop), to record it as sent.
STOP_MARGIN_S = 5.0


Send = Callable[[EmailMessage, str], None]  # the message and its one recipient


class Sender(Protocol):
    """Opens a delivery session, whose connections ``cutter`` may cut; the yielded callable sends
    one message."""

    # The longest the end of one mail may take: the wait for the reply to its data, and a step.
    mail_wait_s: float

    def session(self, cutter: Cutter) -> AbstractContextManager[Send]: ...


class SessionLost(smtplib.SMTPServerDisconnected):
    """The server closed the connection and cannot be reached again: the batch ends here, and
    the mails not sent wait for the next one, as when the first connection fails."""


class Unconfirmed(smtplib.SMTPServerDisconnected):
    """The server took a message's whole data, and gave no reply within ``FINAL_REPLY_S`` (it did
    not hang up): it has likely delivered it. Retried as a lost connection is; once the mail has
    been tried the outbox's attempts in all, taken as delivered: a server that always confirmed
    late got the mail again forever."""


def _reset(client: smtplib.SMTP) -> None:
    """After a failed mail, a connection ready for the next one, or closed: a refusal of DATA
    leaves the transaction open (smtplib resets only after MAIL and RCPT refusals)."""
    if client.sock is not None:
        try:
            client.rset()
        except (OSError, smtplib.SMTPException):
            client.close()


class SmtpSender:
    """Delivers through an SMTP server; one connection per batch of due mails, opened again when
    the server has closed it (after a 421, a hang-up or a time-out on one recipient): one
    recipient's trouble must not fail the mails after it."""

    def __init__(
        self, host: str, port: int, security: str, user: str | None, password: str | None, timeout_s: float
    ) -> None:
        self._host, self._port, self._security = host, port, security
        self._user, self._password, self._timeout_s = user, password, timeout_s
        self.mail_wait_s = max(timeout_s, FINAL_REPLY_S) + timeout_s

    @contextmanager
    def session(self, cutter: Cutter) -> Iterator[Send]:
        client = cutter.open(self)

        def send(message: EmailMessage, recipient: str) -> None:
            nonlocal client
            if client.sock is None:  # closed after the last mail's failure
                try:
                    client = cutter.open(self)
                except (OSError, smtplib.SMTPException) as exc:
                    raise SessionLost(f"the mail server cannot be reached again ({exc})") from exc
            try:
                # The envelope names the stored address itself, never what the To header decodes to.
                client.send_message(message, to_addrs=[recipient])
            except Unconfirmed:
                raise  # this mail's outcome, whether the wait ended by time-out or by the cut
            except BaseException:
                _reset(client)
                cutter.check()
                raise

        try:
            yield send
        finally:
            try:
                if cutter.done:  # a QUIT to a server that trickles would hold a stop again
                    client.close()
                else:
                    client.quit()
            except (OSError, smtplib.SMTPException):
                client.close()

    def new_client(self) -> _PatientSmtp | _PatientSmtpSsl:
        """A client not yet connected (``connect`` reads the greeting): its socket can then be cut
        while the server greets it."""
        if self._security == "ssl":
            client: _PatientSmtp | _PatientSmtpSsl = _PatientSmtpSsl(
                timeout=self._timeout_s, context=ssl.create_default_context()
            )
        else:
            client = _PatientSmtp(timeout=self._timeout_s)
        client._host = self._host  # the name TLS checks: smtplib sets it only in a constructor that connects
        return client

    def greet(self, client: smtplib.SMTP) -> None:
        client.connect(self._host, self._port)
        if self._security == "starttls":
            client.starttls(context=ssl.create_default_context())
        if self._user:
            client.login(self._user, self._password or "")


class Cutter:
    """Cuts a batch's connection to the mail server at its deadline (``CUT_AFTER_S``), whatever it
    is doing, or when the outbox stops (``cut``)."""

    def __init__(self, deadline: float) -> None:
        self.done = False
        self._after_confirmation = False  # a stop waits for the server's word on a mail's data
        self._client: _PatientReply | None = None
        self._lock = threading.RLock()  # a second SIGTERM may arrive while the first cuts
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self.cut)
        self._timer.daemon = True

    def __enter__(self) -> Cutter:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()

    def cut(self, unless_confirming: bool = False) -> None:
        """Cut now; ``unless_confirming``: once the server's reply to a message's data has come,
        if it is awaited (the server has the mail: a stop waits for its word, ``FINAL_REPLY_S``)."""
        with self._lock:
            client = self._client
            if unless_confirming and client is not None and client.confirming:
                self._after_confirmation = True
                return
            self.done = True
        if client is not None:
            client.cut()

    def confirming(self, client: _PatientReply, awaited: bool) -> None:
        """``client`` begins (``awaited``) or ends the wait for the reply to a message's data; a
        cut held off meanwhile is made when it ends."""
        with self._lock:
            client.confirming = awaited
            held_off = not awaited and self._after_confirmation and not self.done
            self.done = self.done or held_off
        if held_off:
            client.cut()

    def open(self, sender: SmtpSender) -> _PatientSmtp | _PatientSmtpSsl:
        """A client of ``sender``'s, connected and its session set up, or the reason why not."""
        client = sender.new_client()
        client.cutter = self
        with self._lock:
            self._client = client
            if self.done:  # cut already: this one is cut from the start
                client.cut()
        try:
            sender.greet(client)
        except BaseException:
            client.close()
            self.check()
            raise
        return client

    def check(self) -> None:
        """After a failure: if the cut caused it, say so."""
        if self.done:
            raise SessionLost("the connection was cut (the mail server too slow by the batch's deadline, or a stop)")


class _PatientReply:
    """smtplib's client, waiting ``FINAL_REPLY_S`` (at least) for the reply to a message's data,
    and its usual timeout for every other reply."""

    timeout: float
    sock: Any
    _data_sent = False
    _cut_off = False
    confirming = False  # its reply to a message's data is awaited (set by its cutter)
    cutter: Cutter | None = None

    def cut(self) -> None:
        """From another thread: the reply awaited now, or any later, ends at once."""
        self._cut_off = True
        with contextlib.suppress(OSError, AttributeError):  # not connected yet, or closed meanwhile
            self.sock.shutdown(socket.SHUT_RDWR)

    def send(self, s: bytes | str) -> None:
        final = isinstance(s, bytes) and s.endswith(b"\r\n.\r\n")  # smtplib sends a message's data so
        if final:  # before its last bytes go: a stop from now on waits for the server's word
            self._confirming(True)
        try:
            super().send(s)  # type: ignore[misc]
        except BaseException:
            if final:
                self._confirming(False)
            raise
        self._data_sent = final

    def _confirming(self, awaited: bool) -> None:
        if self.cutter is None:
            self.confirming = awaited
        else:
            self.cutter.confirming(self, awaited)

    def getreply(self) -> tuple[int, bytes]:
        if self._cut_off:  # cut before this read began (while it connected, or right after its data)
            data_sent, self._data_sent = self._data_sent, False
            self.close()
            if data_sent:  # the server may have it whole
                self._confirming(False)
                raise Unconfirmed("the connection was cut right after the message's data")
            raise smtplib.SMTPServerDisconnected("the connection was cut")
        if not self._data_sent or self.sock is None:
            return super().getreply()  # type: ignore[misc]
        self._data_sent = False
        self.sock.settimeout(max(self.timeout, FINAL_REPLY_S))
        try:
            return super().getreply()  # type: ignore[misc]
        except smtplib.SMTPServerDisconnected as exc:
            if self._cut_off:
                raise Unconfirmed("no reply to the message's data by the batch's deadline") from exc
            if isinstance(exc.__context__, TimeoutError):  # smtplib's own raise, from the timeout
                raise Unconfirmed(str(exc)) from exc
            raise
        finally:
            self._confirming(False)
            if self.sock is not None:
                self.sock.settimeout(self.timeout)


class _PatientSmtp(_PatientReply, smtplib.SMTP):
    pass


class _PatientSmtpSsl(_PatientReply, smtplib.SMTP_SSL):
    pass


class FolderSender:
    """No mail server configured: each mail goes to the log and to ``<folder>/<time>-<random>.eml``."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder

    mail_wait_s = 0.0

    @contextmanager
    def session(self, cutter: Cutter) -> Iterator[Send]:
        self._folder.mkdir(parents=True, exist_ok=True)
        yield self._write

    def _write(self, message: EmailMessage, recipient: str) -> None:
        """Written atomically, so whoever watches the folder for ``*.eml`` never reads half a
        mail; readable by this user only, since key mails carry keys."""
        path = self._folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.eml"
        atomic_write(path, message.as_bytes(), mode=0o600)
        text = message.get_body(("plain",))
        log.info(
            "Mail to %s (no SMTP_HOST; saved as %s)\nSubject: %s\n\n%s",
            recipient,
            path,
            message["Subject"],
            text.get_content() if text else "",
        )


def permanent(exc: Exception) -> bool:
    """Whether sending this mail again cannot help: the server refused it with a 5xx reply, or
    the mail itself is at fault (it cannot be composed or addressed). A lost connection
    or a 4xx reply is transient, and so is a refused sender: "530 Authentication required" or
    "550 sender not allowed" is the service's settings at fault, not the mail, and giving up
    would drop every mail queued until they are mended."""
    if isinstance(exc, smtplib.SMTPSenderRefused):
        return False
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return all(code >= 500 for code, _ in exc.recipients.values())
    if isinstance(exc, smtplib.SMTPResponseException):
        return exc.smtp_code >= 500
    return not isinstance(exc, (OSError, smtplib.SMTPException))


class Outbox:
    """Delivers the outbox table in the background: transient failures are retried with
    exponential backoff for as long as it takes; a mail refused permanently is given up after
    ``max_attempts`` and kept as failed, with the reason."""

    def __init__(
        self,
        store: Store,
        sender: Sender,
        sealer: Sealer,
        from_address: str,
        retry_min_s: float,
        retry_max_s: float,
        max_attempts: int = 3,
        on_pending: Callable[[int], None] | None = None,
        on_failure: Callable[[str], None] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._clock = clock
        self._on_pending = on_pending  # told how many mails wait after each step (service.metrics)
        self._on_failure = on_failure or (lambda kind: None)  # "transient", "permanent", "given_up"
        self._sender = sender
        self._sealer = sealer
        self._from = from_address
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._max_attempts = max_attempts
        # What a database failure in the middle of a batch left (``_settle``): mails delivered but
        # not yet recorded as sent, and mails claimed but not tried.
        self._unrecorded: list[int] = []
        self._untried: list[ClaimedMail] = []
        self._cutter: Cutter | None = None  # the batch under way's
        self._loop = Loop("mail-outbox", self._step, error_delay_s=retry_min_s, quiet=QUIET_ERRORS)

    def start(self) -> Outbox:
        self._loop.start()
        return self

    def wake(self) -> None:
        """Called after a transaction that queued a mail commits: deliver it now."""
        self._loop.wake()

    def stop(self) -> None:
        """Sends no other mail, and gives the rest of the batch back. A mail whose data the server
        has ends (a server may take ``FINAL_REPLY_S`` to confirm it); any other step is cut. Called
        when a stop begins, so that the mail has the drain's time to end in (given up sooner, it
        stayed claimed, and went again after the restart)."""
        self._loop.stop()
        cutter = self._cutter
        if cutter is not None:
            cutter.cut(unless_confirming=True)

    def close(self) -> None:
        if not self._loop.close(FINAL_REPLY_S + STOP_MARGIN_S):
            log.warning(
                "Stopping while a mail is still being sent (a slow mail server, or a database that "
                "does not answer): it is sent again once its claim ends"
            )
        if self._unrecorded:  # the database failed after their delivery, and is not back yet
            log.warning(
                "Mail(s) %s delivered but not recorded as sent (the database failed): they will be "
                "sent again once their claim ends",
                ", ".join(map(str, self._unrecorded)),
            )

    def _step(self) -> float:
        self._settle()
        if self._loop.stopping:
            return 0.0
        claimed_at = time.monotonic()  # no later than the claim's own time
        due = self._store.claim_due_mails(CLAIM_BATCH, self._clock())
        self._publish_pending()  # before the batch too: a slow mail server may hold it 100 s
        if due:
            self._deliver(due, claimed_at)
            self._publish_pending()
        wait = self._store.seconds_to_next_mail(self._clock())
        return IDLE_POLL_S if wait is None else min(wait, IDLE_POLL_S)

    def _publish_pending(self) -> None:
        """How many mails wait, for ``heartify_outbox_pending``; quietly nothing when the
        database does not answer (its own lines say so)."""
        if self._on_pending is not None:
            with contextlib.suppress(QUIET_ERRORS):
                self._on_pending(self._store.pending_mails())

    def _settle(self) -> None:
        """Once the database answers again after it failed in the middle of a batch: record what
        was delivered (else it would be sent again when its claim ends), and give back the
        claim on what was not tried (else it would wait for its claim to end)."""
        while self._unrecorded:
            self._store.mark_sent(self._unrecorded[0], self._clock())
            log.info("Mail %d recorded as delivered", self._unrecorded.pop(0))
        if self._untried:
            self._store.release_mails(self._untried, self._clock())
            self._untried = []

    def _record_sent(self, mail_id: int) -> None:
        """A mail the server took: recorded, or by ``_settle`` once the database answers again."""
        self._unrecorded.append(mail_id)
        self._store.mark_sent(mail_id, self._clock())
        self._unrecorded.pop()

    def _deliver(self, due: list[ClaimedMail], claimed_at: float) -> None:
        done: set[int] = set()  # the mails whose outcome is recorded
        cut_at = claimed_at + CUT_AFTER_S
        # A mail is begun while its end fits before the cut, and within SEND_WITHIN_S.
        begin_by = min(claimed_at + SEND_WITHIN_S, cut_at - self._sender.mail_wait_s)
        try:
            with Cutter(cut_at) as cutter:
                self._cutter = cutter
                if self._loop.stopping:  # stopped as the batch was claimed: given back untried
                    self._store.release_mails(due, self._clock())
                    return
                try:
                    with self._sender.session(cutter) as send:
                        lost = self._send_each(send, due, done, begin_by)
                except (OSError, smtplib.SMTPException) as exc:  # no session, or it broke when closing
                    untried = [row for row in due if row.id not in done]
                    if cutter.done:  # cut before a mail was tried: due again at once, no attempt spent
                        log.warning("Mail server: %s; %d mail(s) due again", exc, len(untried))
                        self._store.release_mails(untried, self._clock())
                    else:
                        for row in untried:
                            self._failed(row, exc, permanent=False)
                    done.update(row.id for row in untried)
                    return
            if lost:  # the session broke on a mail: the ones after it were not tried
                self._store.release_mails([row for row in due if row.id not in done], self._clock())
        except Exception:  # the database failed: the batch stops, and _settle mends it (a mail
            # delivered but not recorded is recorded first, and then not given back)
            self._untried = [row for row in due if row.id not in done]
            raise
        finally:
            self._cutter = None

    def _send_each(self, send: Send, due: list[ClaimedMail], done: set[int], begin_by: float) -> bool:
        """Each mail of ``due`` in one session, its outcome recorded (and added to ``done``),
        while the outbox runs, the session lasts and until ``begin_by``; True if the session was
        lost (cut, or the server gone) on a mail."""
        for row in due:
            if self._loop.stopping:  # the rest are due again now, for whoever runs next
                self._store.release_mails([r for r in due if r.id not in done], self._clock())
                return False
            if time.monotonic() > begin_by:
                log.warning("Mail server slow: %d mail(s) left until their claim ends", len(due) - len(done))
                return False
            lost = not self._send(send, row)
            done.add(row.id)
            if lost:
                return True
        return False

    def _send(self, send: Send, row: ClaimedMail) -> bool:
        """One mail sent and its outcome recorded; False if the session was lost on it."""
        try:
            mail = self._sealer.open(row.mail)
        except CannotOpen as exc:
            self._leave(row, exc)
            return True
        try:
            send(compose(mail, self._from), mail.recipient)
        except SessionLost as exc:  # the batch ends after this mail
            self._failed(row, exc, permanent=False)
            return False
        except Exception as exc:  # whatever one mail raises must not hold back the others
            self._failed(row, exc, permanent(exc))
        else:
            self._record_sent(row.id)
            log.info("Mail %d to %s delivered", row.id, row.mail.recipient)
        return True

    def _leave(self, row: ClaimedMail, exc: CannotOpen) -> None:
        """A mail this process cannot open is left, whole and with no attempt spent, for one
        whose ``SECRET_KEY`` opens it: a replica set up with another secret, or rotated the wrong
        way round, gave up the other replicas' mails on its first try and wiped them, keys
        included. It is due again after the longest retry delay, so that the processes that cannot
        open it try it seldom, whichever claims it next."""
        log.warning(
            "Mail %d to %s left for a process whose SECRET_KEY opens it (%s); due again in %.3g s",
            row.id,
            row.mail.recipient,
            exc,
            self._retry_max_s,
        )
        self._store.retry_mail(
            row.id, row.attempts, self._retry_max_s, f"CannotOpen: {exc}", self._clock(), row.unconfirmed
        )

    def _failed(self, row: ClaimedMail, exc: Exception, permanent: bool) -> None:
        attempts = row.attempts + 1
        # Only attempts whose data the server took count toward taking a mail as delivered: a
        # mail cut twice in the greeting, then once unconfirmed, was taken as delivered unsent.
        unconfirmed = row.unconfirmed + isinstance(exc, Unconfirmed)
        error = f"{type(exc).__name__}: {exc}"
        self._on_failure("permanent" if permanent else "transient")
        if isinstance(exc, Unconfirmed) and unconfirmed >= self._max_attempts:
            log.error(
                "Mail %d to %s taken as delivered: the server took it whole %d times without confirming (%s)",
                row.id,
                row.mail.recipient,
                unconfirmed,
                error,
            )
            self._record_sent(row.id)
            return
        if permanent and attempts >= self._max_attempts:
            self._on_failure("given_up")
            log.error("Mail %d to %s given up after %d attempts: %s", row.id, row.mail.recipient, attempts, error)
            self._store.give_up_mail(row.id, attempts, error, self._clock())
            return
        delay = min(self._retry_max_s, self._retry_min_s * 2 ** (attempts - 1))
        log.warning(
            "Mail %d to %s not delivered (attempt %d, %s); retrying in %.3g s",
            row.id,
            row.mail.recipient,
            attempts,
            error,
            delay,
        )
        self._store.retry_mail(row.id, attempts, delay, error, self._clock(), unconfirmed)
