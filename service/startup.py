"""What a start checks before the model loads: the model file against its manifest, and the database.

Every expected start-up failure becomes a ``StartupError`` whose message is one sentence, which
``__main__`` prints instead of a traceback. Kept apart from ``runtime`` (and free of onnxruntime).
The supervisor of several workers runs these checks as ``python -m service.startup``, in a
process of their own, so that it never holds the database driver and the rest itself.
"""

from __future__ import annotations

import sys

import peewee as pw

from service.config import Config, ConfigError, sqlite_path
from service.database import DatabaseUnavailable, redact
from service.logs import first_line
from service.model import check_model, model_version
from service.process import StartupError, configured, refuse
from service.sealing import secret_beside, split_secrets
from service.store import Store

# Pooled connections beyond the request threads: the mail worker, the last_used flusher, the
# housekeeping purge, the upload gate and a rare schema restore (the probe and the PostgreSQL
# listener open their own).
BACKGROUND_CONNECTIONS = 5


def start_store(config: Config, may_be_away: bool = False) -> Store:
    """The store, or one sentence when the database cannot be used (unless it ``may_be_away``:
    ``Store.start``)."""
    store = Store(
        config.database_url,
        max_connections=config.web_threads + BACKGROUND_CONNECTIONS,
        connect_timeout_s=config.db_connect_timeout_s,
        statement_timeout_s=config.db_statement_timeout_s,
        may_be_away=may_be_away,
    )
    try:
        return store.start()
    except (pw.PeeweeException, DatabaseUnavailable) as exc:
        store.close()
        raise StartupError(f"Database {redact(config.database_url)} cannot be used: {first_line(exc)}") from None


def mail_secrets(config: Config) -> list[str]:
    """SECRET_KEY, or on SQLite a secret kept beside the database file; PostgreSQL serves
    replicas that must share one, so there it has to be set."""
    if config.secret_key and split_secrets(config.secret_key):
        return split_secrets(config.secret_key)
    path = sqlite_path(config.database_url)
    if path is None:
        raise StartupError(
            "SECRET_KEY must be set with PostgreSQL (every replica needs the same one), e.g. the output of "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'."
        )
    if not path.parent.is_dir():
        raise StartupError(f"DATABASE_URL names a file in {path.parent}, which is not a folder.")
    try:
        return [secret_beside(path)]
    except OSError as exc:
        raise StartupError(
            f"SECRET_KEY is not set and {path}.secret cannot be written beside the database ({exc.strerror or exc})."
        ) from None


def check(config: Config) -> None:
    """Everything a start can check before its model loads; ``StartupError`` when one fails."""
    model_version(config)
    check_model(config)
    # SECRET_KEY is set before anything is written to a shared database, or the local one exists
    # before the workers race for it.
    mail_secrets(config)
    start_store(config).close()  # the database answers and has its tables


def main() -> int:
    """``python -m service.startup``: the checks, 0; or one sentence on stderr, 1."""
    config = configured()
    if config is None:
        return 1
    try:
        check(config)
    except (ConfigError, StartupError) as exc:
        return refuse(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
