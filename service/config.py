"""Configuration from the environment: one frozen dataclass, read once at start.

Every variable has a default that works on a laptop (SQLite file, the shipped model, mails to the
log and an outbox folder), so ``python -m service`` needs no setup; ``.env.example`` lists them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from service.clients import Network, parse_networks
from service.cpus import usable_cpus

ROOT = Path(__file__).resolve().parent.parent
SMTP_SECURITY = ("starttls", "ssl", "none")
DEFAULT_SMTP_PORT = {"starttls": 587, "ssl": 465, "none": 25}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# waitress's loop visits every open connection on each turn, so each one slows every answer a
# little; beyond this many the cost outweighs the headroom (docs/performance.md, slow clients).
# service.connections lowers it where the open-files limit allows fewer.
MAX_CONNECTIONS = 2000
MAX_PORT = 65535


class ConfigError(ValueError):
    """A variable that cannot be used; the message is one sentence naming it."""


_FLAGS = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}


def _flag(raw: str) -> bool:
    try:
        return _FLAGS[raw.lower()]
    except KeyError:
        raise ValueError(raw) from None


def _number(raw: str) -> float:
    """A finite number: float() also reads "nan" and "inf", which no setting means."""
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _names(raw: str) -> tuple[str, ...]:
    return tuple(filter(None, (part.strip() for part in raw.split(","))))


_KINDS = {
    int: "an integer",
    _number: "a finite number",
    _flag: "on or off",
    parse_networks: "a comma-separated list of IP addresses or CIDR blocks",
}


def _env(
    name: str, parse: Callable[[str], Any] = str, low: float | None = None, high: float | None = None
) -> dict[str, Any]:
    return {"env": name, "parse": parse, "low": low, "high": high}


# Beyond these, a setting is a typo or a machine this service was not measured on; the defaults
# stay within them too.
MAX_WORKERS = 256
# modelVersion in the answers: an int to the Java clients of the old API; past 2**63 not even JSON
# that orjson writes (every answer was an empty 500).
MAX_MODEL_VERSION = 2**31 - 1
MAX_WEB_THREADS = 1024
# A worker's loop shows it is alive every second; a long JSON body holds it a while.
MIN_WORKER_TIMEOUT_S = 5.0


def per_worker_defaults(workers: int) -> dict[str, int]:
    """Thread defaults for one of ``workers`` processes (variables that are set win).

    Web threads are sized for the worker's share of the CPUs. Batch workers get twice that share,
    at most every CPU: a worker can then use more than its share while the others idle (on two
    CPUs a whole recording uses both), and under load from every worker the runs under way, each
    holding its activations in memory, stay at most twice the CPUs; the OS shares the cores
    between them, which measured no slower than one run per core (docs/performance.md).
    """
    cpus = usable_cpus()
    cores = max(1, cpus // workers)
    return {"web_threads": min(MAX_WEB_THREADS, max(8, 8 * cores)), "batch_workers": min(MAX_WORKERS, cpus, 2 * cores)}


def sqlite_path(url: str) -> Path | None:
    """The file a ``sqlite:///`` URL names; None for another database."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        return None
    return Path(unquote(parts.path[1:] if parts.path.startswith("/") else parts.path))


def default_workers() -> int:
    return min(MAX_WORKERS, usable_cpus())


@dataclass(frozen=True)
class Config:
    """Field metadata names the variable; ``from_env`` reads exactly those."""

    database_url: str = field(default="sqlite:///heartify.db", metadata=_env("DATABASE_URL"))
    model_path: Path = field(default=ROOT / "artifacts" / "attention_unet.onnx", metadata=_env("MODEL_PATH", Path))
    manifest_path: Path | None = field(default=None, metadata=_env("MANIFEST_PATH", Path))
    model_version: int | None = field(default=None, metadata=_env("MODEL_VERSION", int, 0, MAX_MODEL_VERSION))
    base_url: str | None = field(default=None, metadata=_env("BASE_URL"))
    host: str = field(default="127.0.0.1", metadata=_env("HOST"))
    port: int = field(default=8000, metadata=_env("PORT", int, 0, MAX_PORT))
    # Processes serving the one listening socket (service.workers), each with its own model: one
    # per core takes the GIL out of the way. 1 keeps a single process and no supervisor.
    web_workers: int = field(default_factory=default_workers, metadata=_env("WEB_WORKERS", int, 1, MAX_WORKERS))
    # Requests wait on the batcher while the model runs, so more threads than cores keep batches
    # full; a waiting thread costs little, and fewer threads than connections queue requests
    # inside waitress (which then logs a warning for each one).
    # 0 (the default): sized for the worker's share of the CPUs (per_worker_defaults).
    web_threads: int = field(default=0, metadata=_env("WEB_THREADS", int, 1, MAX_WEB_THREADS))
    # Slow clients (service.connections): open connections at most, how long a request's headers may
    # take from its first byte, and how long a connection may sit idle between requests.
    connection_limit: int = field(default=MAX_CONNECTIONS, metadata=_env("CONNECTION_LIMIT", int, 1))
    header_timeout_s: float = field(default=10.0, metadata=_env("HEADER_TIMEOUT_SECONDS", _number, 0.1))
    channel_timeout_s: float = field(default=75.0, metadata=_env("CHANNEL_TIMEOUT_SECONDS", _number, 0.1))
    # One single-threaded run per core beats one run spread over all cores: a run alternates
    # between parallel and serial stretches, and concurrent runs fill each other's gaps.
    ort_threads: int = field(default=1, metadata=_env("ORT_THREADS", int, 1, MAX_WORKERS))
    # A request that finds the whole service idle runs alone, at once; unset, on all usable CPUs.
    ort_lone_threads: int | None = field(default=None, metadata=_env("ORT_LONE_THREADS", int, 1, MAX_WORKERS))
    # Spinning onnxruntime threads answer sooner in-process, but in the service they take CPU
    # from the request threads, alone and under load (docs/performance.md): off by default.
    ort_spinning: bool = field(default=False, metadata=_env("ORT_SPINNING", _flag))
    # A lone run spins between its operators and stops when it returns: it only runs while no
    # worker runs anything else, so the spinning takes CPU from nobody.
    ort_lone_spinning: bool = field(default=True, metadata=_env("ORT_LONE_SPINNING", _flag))
    batch_max_size: int = field(default=8, metadata=_env("BATCH_MAX_SIZE", int, 1))
    # 0: a batch takes what queued while the previous one ran, and never holds a lone request back.
    batch_max_wait_ms: float = field(default=0.0, metadata=_env("BATCH_MAX_WAIT_MS", _number, 0))
    # Batches that run at once on the shared session (see service.batcher); 0 (the default), as
    # web_threads.
    batch_workers: int = field(default=0, metadata=_env("BATCH_WORKERS", int, 1, MAX_WORKERS))
    # How long a key found active is trusted without reading the database (service.keys);
    # 0 reads it on every request.
    key_cache_s: float = field(default=30.0, metadata=_env("KEY_CACHE_SECONDS", _number, 0))
    max_batch_windows: int = field(default=64, metadata=_env("MAX_BATCH_WINDOWS", int, 1))
    # Longest recording /denoising/record takes; its body limits follow from it (record_body_bytes).
    max_record_seconds: float = field(default=3600.0, metadata=_env("MAX_RECORD_SECONDS", _number, 2))
    # Recordings one worker reads and denoises at once; the others wait for a turn (up to
    # RECORD_WAIT_S, then 503). The longest one takes hundreds of MB while it runs
    # (docs/performance.md, Memory): this, times WEB_WORKERS, is what to leave room for.
    record_concurrency: int = field(default=1, metadata=_env("RECORD_CONCURRENCY", int, 1))
    smtp_host: str | None = field(default=None, metadata=_env("SMTP_HOST"))
    smtp_port: int | None = field(default=None, metadata=_env("SMTP_PORT", int, 1, MAX_PORT))
    smtp_user: str | None = field(default=None, metadata=_env("SMTP_USER"))
    smtp_password: str | None = field(default=None, repr=False, metadata=_env("SMTP_PASSWORD"))
    smtp_security: str = field(default="starttls", metadata=_env("SMTP_SECURITY", str.lower))
    # At most 30: a mail is begun only while its end (the wait for the reply to its data, 30 s or
    # this if longer, and one more step) fits in the batch's 100 s (service.mail); past 50, none was.
    smtp_timeout_s: float = field(default=10.0, metadata=_env("SMTP_TIMEOUT_SECONDS", _number, 0.1, 30))
    sender_email: str = field(default="Heartify <no-reply@heartify.local>", metadata=_env("SENDER_EMAIL"))
    outbox_dir: Path = field(default=Path("outbox"), metadata=_env("OUTBOX_DIR", Path))
    mail_retry_min_s: float = field(default=5.0, metadata=_env("MAIL_RETRY_MIN_SECONDS", _number, 0.01))
    mail_retry_max_s: float = field(default=300.0, metadata=_env("MAIL_RETRY_MAX_SECONDS", _number, 0.01))
    last_used_flush_s: float = field(default=30.0, metadata=_env("LAST_USED_FLUSH_SECONDS", _number, 0.01))
    log_level: str = field(default="INFO", metadata=_env("LOG_LEVEL", str.upper))
    # GET /metrics (Prometheus text format, no API key); METRICS_PORT > 0 serves it there instead.
    metrics: bool = field(default=True, metadata=_env("METRICS", _flag))
    metrics_port: int = field(default=0, metadata=_env("METRICS_PORT", int, 0, MAX_PORT))
    # -- hardening ----------------------------------------------------------------------------
    # Encrypts the mail bodies waiting in the outbox (they carry keys and links). Comma-separated:
    # the first encrypts, all decrypt (rotation). Unset on SQLite: generated into a 0600 file
    # beside the database; required on PostgreSQL, where every replica must share it.
    secret_key: str | None = field(default=None, repr=False, metadata=_env("SECRET_KEY"))
    # Reverse proxies whose X-Forwarded-For is believed (rate limits and the access log).
    trusted_proxies: tuple[Network, ...] = field(default=(), metadata=_env("TRUSTED_PROXIES", parse_networks))
    # Browser origins allowed to call the API (CORS); empty: none.
    cors_allow_origins: tuple[str, ...] = field(default=(), metadata=_env("CORS_ALLOW_ORIGINS", _names))
    # Key mails (generation and deactivation together) per hour; 0 = no limit. Counted in the
    # database, so they hold across processes and replicas.
    mail_limit_per_email: int = field(default=3, metadata=_env("MAIL_LIMIT_PER_EMAIL", int, 0))
    mail_limit_per_client: int = field(default=20, metadata=_env("MAIL_LIMIT_PER_CLIENT", int, 0))
    # Key requests (generation and deactivation, whatever their answer) per client address and
    # minute, in bursts of as many: a token bucket per process, checked before the database;
    # 0 = no limit. The answers that send no mail (409, 404) tell whether an address holds a key.
    key_requests_per_min: int = field(default=30, metadata=_env("KEY_REQUESTS_PER_MINUTE", int, 0))
    # Denoising requests per API key: a token bucket per process; 0 = no limit.
    denoise_rate_per_s: float = field(default=20.0, metadata=_env("DENOISE_RATE_PER_SECOND", _number, 0))
    denoise_burst: int = field(default=40, metadata=_env("DENOISE_BURST", int, 1))
    # Every database operation is bounded: a hung server costs a request this long at most.
    db_connect_timeout_s: float = field(default=3.0, metadata=_env("DB_CONNECT_TIMEOUT_SECONDS", _number, 1))
    db_statement_timeout_s: float = field(default=3.0, metadata=_env("DB_STATEMENT_TIMEOUT_SECONDS", _number, 0.1))
    # A mail refused permanently (SMTP 5xx) is given up after this many attempts.
    mail_max_attempts: int = field(default=3, metadata=_env("MAIL_MAX_ATTEMPTS", int, 1))
    # Spent or expired tokens, delivered or failed mails and old mail requests are deleted after this.
    retention_days: float = field(default=30.0, metadata=_env("RETENTION_DAYS", _number, 1))
    # SIGTERM: requests under way may finish for this long before the process stops.
    shutdown_grace_s: float = field(default=25.0, metadata=_env("SHUTDOWN_GRACE_SECONDS", _number, 0))
    # With several workers: one whose serving loop has shown no sign of life for this long
    # (frozen, or hung) is killed and replaced (service.workers); 0: never.
    worker_timeout_s: float = field(default=30.0, metadata=_env("WORKER_TIMEOUT_SECONDS", _number, 0))
    # With several workers: one not ready this long after its start (frozen, or stuck on its way)
    # is killed and replaced, or at the first start the start is refused; 0: never.
    worker_start_timeout_s: float = field(default=60.0, metadata=_env("WORKER_START_TIMEOUT_SECONDS", _number, 0))

    def __post_init__(self) -> None:
        if not 1 <= self.web_workers <= MAX_WORKERS:
            raise ConfigError(f"WEB_WORKERS must be from 1 to {MAX_WORKERS} (got {self.web_workers}).")
        share = per_worker_defaults(self.web_workers)
        for name in ("web_threads", "batch_workers"):
            if not getattr(self, name):
                object.__setattr__(self, name, share[name])  # frozen: set once, here
        if self.smtp_security not in SMTP_SECURITY:
            raise ConfigError(f"SMTP_SECURITY must be one of {', '.join(SMTP_SECURITY)} (got {self.smtp_security!r}).")
        if self.mail_max_attempts > 5:
            raise ConfigError(f"MAIL_MAX_ATTEMPTS must be at most 5 (got {self.mail_max_attempts}).")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)} (got {self.log_level!r}).")
        for name, value in (
            ("WORKER_TIMEOUT_SECONDS", self.worker_timeout_s),
            ("WORKER_START_TIMEOUT_SECONDS", self.worker_start_timeout_s),
        ):
            if 0 < value < MIN_WORKER_TIMEOUT_S:
                raise ConfigError(f"{name} must be 0 (off) or at least {MIN_WORKER_TIMEOUT_S:g} (got {value:g}).")
        if self.record_concurrency > self.recording_threads:
            raise ConfigError(
                f"RECORD_CONCURRENCY must be at most half of WEB_THREADS, {self.recording_threads} "
                f"(got {self.record_concurrency}): the other half serves windows and health checks."
            )
        if self.mail_retry_min_s > self.mail_retry_max_s:
            raise ConfigError(
                f"MAIL_RETRY_MIN_SECONDS must be at most MAIL_RETRY_MAX_SECONDS "
                f"(got {self.mail_retry_min_s:g} and {self.mail_retry_max_s:g})."
            )
        if self.metrics_port and self.metrics_port == self.port:
            raise ConfigError(f"METRICS_PORT must differ from PORT (both {self.port}); 0 serves /metrics on PORT.")
        try:
            database = urlsplit(self.database_url)
            _ = database.port  # read only when asked: a bad port or IPv6 host raises
        except ValueError:  # its message may quote part of the password: not shown
            raise ConfigError(
                "DATABASE_URL is not a valid URL: its port is not a number from 0 to 65535, or an IPv6 host "
                "lacks a bracket (percent-encode / ? # @ : in the password)."
            ) from None
        if database.scheme not in ("sqlite", "postgresql", "postgres"):
            raise ConfigError(
                f"DATABASE_URL must start with sqlite:/// or postgresql:// (got {database.scheme or 'no'} scheme)."
            )
        if str(sqlite_path(self.database_url)) in ("", ".", ":memory:"):
            raise ConfigError("DATABASE_URL must name an SQLite file, e.g. sqlite:///heartify.db.")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read every variable that is set and not empty; the rest keep their defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            meta = f.metadata
            raw = env.get(meta["env"], "").strip()
            if not raw:
                continue
            try:
                value = meta["parse"](raw)
            except ValueError:
                kind = _KINDS.get(meta["parse"], "a number")
                raise ConfigError(f"{meta['env']} must be {kind} (got {raw!r}).") from None
            if meta["low"] is not None and value < meta["low"]:
                raise ConfigError(f"{meta['env']} must be at least {meta['low']} (got {raw!r}).")
            if meta["high"] is not None and value > meta["high"]:
                raise ConfigError(f"{meta['env']} must be at most {meta['high']} (got {raw!r}).")
            values[f.name] = value
        config = cls(**values)
        if config.port == 0 and not config.base_url:
            raise ConfigError("PORT=0 (any free port) needs BASE_URL: the mailed links cannot name port 0.")
        return config

    @property
    def manifest(self) -> Path:
        """The manifest beside the model unless MANIFEST_PATH names another."""
        return self.manifest_path or self.model_path.parent / "manifest.json"

    @property
    def public_url(self) -> str:
        """Base of the links in mails: BASE_URL, else this server's own address."""
        return (self.base_url or f"http://localhost:{self.port}").rstrip("/")

    @property
    def cors_origins(self) -> str | tuple[str, ...]:
        """As Falcon's CORSMiddleware takes them: "*" (listed among others too) for every origin."""
        return "*" if "*" in self.cors_allow_origins else self.cors_allow_origins

    @property
    def mail_port(self) -> int:
        return self.smtp_port or DEFAULT_SMTP_PORT[self.smtp_security]

    # The two limits import what they need when asked: the supervisor of several workers reads its
    # Config, and stays small, without NumPy (docs/performance.md, "Memory").
    @property
    def max_body_bytes(self) -> int:
        """Largest request body worth reading: a full batch written with long numbers."""
        from service.contract import WINDOW

        return max(1 << 20, self.max_batch_windows * WINDOW * 32)

    def record_body_bytes(self, binary: bool) -> int:
        """Largest /denoising/record body: the longest recording at the highest rate, as float32
        (4 bytes a sample) or as JSON written with long numbers (32 bytes a sample)."""
        return max(1 << 20, self.max_record_samples * (4 if binary else 32))

    @property
    def recording_threads(self) -> int:
        """The most web threads recordings hold, running or waiting for a turn, and so the most
        large bodies a process receives at once: half, the rest serving windows and probes."""
        return max(1, self.web_threads // 2)

    @property
    def batch_turns(self) -> int:
        """The most batch requests of more than one model run (``BATCH_MAX_SIZE`` windows, 8 at
        least) a process runs at once, and as many may wait: a quarter of its web threads in all
        (recordings hold half at most; windows and probes keep the rest), two at least."""
        return max(2, self.web_threads // 8)

    @property
    def max_record_samples(self) -> int:
        """The most samples a recording may hold: ``MAX_RECORD_SECONDS`` at the highest rate."""
        from service.recording import MAX_RATE_HZ

        return int(self.max_record_seconds * MAX_RATE_HZ)
