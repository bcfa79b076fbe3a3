"""Mail bodies sealed with a secret that never enters the database.

A mail that carries a key or a link waits in the outbox until the mail server takes it; sealed,
a copy of the database at that moment grants nothing. Fernet (AES-128-CBC with HMAC-SHA256,
from ``cryptography``) authenticates as well as encrypts, so a tampered body fails to open
instead of sending garbage. Several secrets: the first seals, every one opens (rotation).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from service.messages import Mail

log = logging.getLogger(__name__)


class CannotOpen(Exception):
    """A sealed body that none of the secrets opens (the secret was changed, or it was altered)."""


def _fernet(secret: str) -> Fernet:
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(secret.encode()).digest()))


class Sealer:
    def __init__(self, secrets_: list[str]) -> None:
        if not secrets_:
            raise ValueError("at least one secret is needed")
        self._box = MultiFernet([_fernet(s) for s in secrets_])
        self._first = secrets_[0].encode()

    def digest(self, text: str) -> str:
        """A keyed digest (HMAC-SHA256 with the sealing secret): countable, not reversible
        without the secret, even for something as guessable as an IPv4 address."""
        return hmac.new(self._first, text.encode(), hashlib.sha256).hexdigest()[:32]

    def seal(self, mail: Mail) -> Mail:
        return Mail(mail.recipient, mail.subject, self._seal(mail.text), self._seal(mail.html))

    def open(self, mail: Mail) -> Mail:
        try:
            return Mail(mail.recipient, mail.subject, self._open(mail.text), self._open(mail.html))
        except InvalidToken:
            raise CannotOpen("the mail body cannot be opened with SECRET_KEY (changed since it was queued?)") from None

    def _seal(self, text: str) -> str:
        return self._box.encrypt(text.encode()).decode()

    def _open(self, token: str) -> str:
        return self._box.decrypt(token.encode()).decode()


def split_secrets(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def secret_beside(database: Path) -> str:
    """The secret kept in ``<database>.secret`` (mode 0600), made on first use, so that a local
    run needs no configuration and a restart can still open the mails it queued."""
    path = database.with_name(database.name + ".secret")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    log.warning("SECRET_KEY is not set: generated one into %s (keep it with the database)", path)
    return path.read_text().strip()
