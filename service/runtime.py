"""Builds the production collaborators from a ``Config``, starts them, and stops them.

Every expected start-up failure (model, manifest, database) becomes a ``StartupError``
(``service.startup``) whose message is one sentence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack, closing
from datetime import datetime, timedelta
from typing import Protocol, TypeVar

from service.app import Deps
from service.batcher import Batcher
from service.config import Config
from service.database import DatabaseProbe, redact
from service.engine import Engine
from service.housekeeping import Housekeeping
from service.keys import KeyService, MailLimits, new_secret
from service.mail import FolderSender, Outbox, Sender, SmtpSender
from service.manifest import model_labels
from service.metrics import Metrics
from service.model import model_version, start_engine
from service.notifications import Listener
from service.occupancy import Occupancy
from service.ratelimit import TokenBuckets
from service.sealing import Sealer
from service.startup import mail_secrets, start_store
from service.store import KEYS_CHANNEL, Store, utcnow
from service.usage import LastUsed

log = logging.getLogger(__name__)
Clock = Callable[[], datetime]


def start_metrics(config: Config, version: int) -> Metrics:
    metrics = Metrics()
    metrics.model(version, *model_labels(config.model_path, config.manifest))
    return metrics


def mail_sender(config: Config) -> Sender:
    if config.smtp_host:
        return SmtpSender(
            config.smtp_host,
            config.mail_port,
            config.smtp_security,
            config.smtp_user,
            config.smtp_password,
            config.smtp_timeout_s,
        )
    log.warning("SMTP_HOST is not set: mails go to the log and to %s/ (fine for a local run only)", config.outbox_dir)
    return FolderSender(config.outbox_dir)


class Component(Protocol):
    def start(self) -> object: ...
    def close(self) -> None: ...


C = TypeVar("C", bound=Component)


def _run(stack: ExitStack, component: C) -> C:
    """``component`` started, and closed when ``stack`` closes (even if its start failed half-way)."""
    stack.callback(component.close)
    component.start()
    return component


def batcher(config: Config, engine: Engine, occupancy: Occupancy, metrics: Metrics | None) -> Batcher:
    return Batcher(
        engine,
        config.batch_max_size,
        config.batch_max_wait_ms / 1000,
        config.batch_workers,
        occupancy=occupancy,
        observer=metrics.inference if metrics else None,
    )


def outbox(config: Config, store: Store, sealer: Sealer, metrics: Metrics | None, clock: Clock) -> Outbox:
    return Outbox(
        store,
        mail_sender(config),
        sealer,
        config.sender_email,
        config.mail_retry_min_s,
        config.mail_retry_max_s,
        config.mail_max_attempts,
        on_pending=metrics.pending_mails if metrics else None,
        on_failure=metrics.mail_failure if metrics else None,
        clock=clock,
    )


def key_service(
    config: Config,
    store: Store,
    outbox: Outbox,
    usage: LastUsed,
    sealer: Sealer,
    siblings: Occupancy,
    clock: Clock,
    new_secret: Callable[[], str],
) -> KeyService:
    return KeyService(
        store,
        outbox,
        usage,
        sealer,
        config.public_url,
        config.key_cache_s,
        MailLimits(config.mail_limit_per_email, config.mail_limit_per_client),
        TokenBuckets(config.denoise_rate_per_s, config.denoise_burst) if config.denoise_rate_per_s else None,
        _per_minute(config.key_requests_per_min),
        clock=clock,
        new_secret=new_secret,
        siblings=siblings,
    )


def _per_minute(requests: int) -> TokenBuckets | None:
    """Buckets of ``requests`` refilled over a minute; None for 0, no limit."""
    return TokenBuckets(requests / 60, requests) if requests else None


class Runtime:
    """The running collaborators. ``start`` (or ``with``) starts them in order and ``close`` stops
    them in reverse; a start that fails stops what had already started.

    ``engine`` may be given already started (the tests share one per model file); the runtime
    then neither starts nor closes it. ``clock`` (the time tokens, mails, last use and retention are
    stamped with; on PostgreSQL the outbox's due times are the server's) and ``new_secret`` (keys
    and tokens) go to every collaborator that needs them. ``occupancy``: a worker's slot among the worker processes
    (``service.workers``); without one the process is alone on the machine. A worker starts with
    the database away (``Store.start``): its supervisor checked it at the service's start, and
    a worker replaced during an outage must serve the outage's answers, not leave its
    connections unanswered.
    """

    def __init__(
        self,
        config: Config,
        engine: Engine | None = None,
        occupancy: Occupancy | None = None,
        clock: Clock = utcnow,
        new_secret: Callable[[], str] = new_secret,
    ) -> None:
        self.config = config
        self._clock = clock
        self._new_secret = new_secret
        self._engine = engine
        self._worker = occupancy is not None
        self._occupancy = occupancy or Occupancy()
        self._stack = ExitStack()
        self.store: Store
        self.outbox: Outbox
        self.usage: LastUsed
        self.batcher: Batcher
        self.sealer: Sealer
        self.housekeeping: Housekeeping
        self.deps: Deps

    def start(self) -> Runtime:
        config = self.config
        with ExitStack() as stack:
            version = model_version(config)
            _run(stack, self._occupancy)
            engine = self._engine or stack.enter_context(closing(start_engine(config)))
            self.sealer = Sealer(mail_secrets(config))  # before the store writes its tables
            self.store = stack.enter_context(closing(start_store(config, may_be_away=self._worker)))
            _run(stack, DatabaseProbe(lambda: self.store.db, self.store.health))
            metrics = start_metrics(config, version) if config.metrics else None
            self.batcher = _run(stack, batcher(config, engine, self._occupancy, metrics))
            self.outbox = _run(stack, outbox(config, self.store, self.sealer, metrics, self._clock))
            self.usage = _run(stack, LastUsed(self.store, config.last_used_flush_s, self._clock))
            retention = timedelta(days=config.retention_days)
            self.housekeeping = _run(stack, Housekeeping(self.store, retention, self._clock))
            keys = key_service(
                config,
                self.store,
                self.outbox,
                self.usage,
                self.sealer,
                self._occupancy,
                clock=self._clock,
                new_secret=self._new_secret,
            )
            if self.store.is_postgres:  # other processes hear of deactivations at once
                listener = Listener(
                    lambda: self.store.listen(KEYS_CHANNEL),
                    keys.forget_cached,
                    keys.revalidate_cached,
                    keys.stop_caching,
                )
                _run(stack, listener)
            self.deps = Deps(
                config=config, keys=keys, store=self.store, batcher=self.batcher, model_version=version, metrics=metrics
            )
            self._stack = stack.pop_all()
        log.info(
            "Model %s (version %d, %d onnxruntime threads per run, %d alone) ready; database %s %s",
            config.model_path.name,
            version,
            engine.threads,
            engine.lone_threads,
            redact(config.database_url),
            "ready" if self.store.answered else "not answering yet",
        )
        return self

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Runtime:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
