"""Real collaborators for the service tests: the shipped model, SQLite files or a PostgreSQL
schema of their own, an aiosmtpd server that keeps what it receives, and ``python -m service``
subprocesses on free loopback ports.

The model is loaded once per test session (``engine``); each test gets its own database, mail
server and runtime around it, which start in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import falcon.testing
import orjson
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from service.app import create_app
from service.config import Config
from service.engine import Engine
from service.keys import digest, new_secret
from service.runtime import Runtime
from service.store import Store, utcnow
from tests import pgcluster
from tests.pgcluster import PgCluster

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "artifacts" / "attention_unet.onnx"
# For tests whose subject is not the model: each window costs about half the time.
INT8 = REPO / "artifacts" / "attention_unet.int8.onnx"
# The version the shipped manifest gives the model: what responses must carry by default.
SHIPPED_VERSION = orjson.loads((REPO / "artifacts" / "manifest.json").read_bytes())["model_version"]
MANIFEST = REPO / "artifacts" / "manifest.json"
PG = {"host": "127.0.0.1", "port": 5432, "dbname": "test", "user": "postgres"}
LINK = re.compile(r"https?://\S+/api/v1/api-keys/verify\?token=[A-Za-z0-9_-]+")
KEY = re.compile(r"Your API key: ([A-Za-z0-9_-]{43})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One request with the stdlib; returns the status and the JSON (or text) body."""
    data = orjson.dumps(body) if body is not None else None
    request = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={**({"Content-Type": "application/json"} if data is not None else {}), **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw, kind = response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        status, raw, kind = exc.code, exc.read(), exc.headers.get_content_type()
    return status, orjson.loads(raw) if raw and kind == "application/json" else raw.decode()


# -- mail ----------------------------------------------------------------------------------------
class Mailbox:
    """aiosmtpd handler that parses and keeps every message it receives; recipients in
    ``refuse`` get the reply given there (e.g. ``550 No such user``)."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.rcpt_lines: list[str] = []  # each RCPT command's argument, as sent
        self.refuse: dict[str, str] = {}
        self.refuse_data: dict[str, str] = {}  # the same, in reply to the DATA command itself
        self.on_message: Callable[[EmailMessage], None] = lambda message: None  # after it is kept
        self.confirm_after_s = 0.0  # how long the reply to a message's data waits, once it is kept
        self._lock = threading.Lock()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=policy.default)
        with self._lock:
            self.messages.append(message)
        self.on_message(message)
        await asyncio.sleep(self.confirm_after_s)
        return "250 OK"

    def wait_for(self, count: int, timeout_s: float = 20.0) -> list[EmailMessage]:
        wait_until(lambda: len(self.messages) >= count, timeout_s, f"{count} mail(s)")
        return self.messages[:count]


def text_of(message: EmailMessage) -> str:
    return message.get_body(("plain",)).get_content()


def verify_link(message: EmailMessage) -> str:
    return LINK.search(text_of(message)).group(0)


def key_in(message: EmailMessage) -> str:
    return KEY.search(text_of(message)).group(1)


class _RecordingSmtp(SMTP):
    """aiosmtpd's server, keeping each RCPT argument as the client sent it (aiosmtpd decodes
    what it hands the handler), and refusing the DATA command for ``Mailbox.refuse_data``."""

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.event_handler.rcpt_lines.append(arg or "")
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        recipients = self.envelope.rcpt_tos if self.envelope is not None else []
        refusal = self.event_handler.refuse_data.get(recipients[0]) if recipients else None
        if refusal:
            await self.push(refusal)
            return
        await super().smtp_DATA(arg)


class _Controller(Controller):
    def factory(self) -> SMTP:
        return _RecordingSmtp(self.handler, **self.SMTP_kwargs)


class SmtpServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.mailbox = Mailbox()
        self._controller = _Controller(self.mailbox, hostname="127.0.0.1", port=self.port)

    def start(self) -> SmtpServer:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer().start()
    yield server
    server.stop()


def smtp_env(port: int) -> dict[str, str]:
    return {
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(port),
        "SMTP_SECURITY": "none",
        "SENDER_EMAIL": "Heartify <no-reply@heartify.test>",
    }


# -- databases -----------------------------------------------------------------------------------
@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'heartify.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema in the ``test`` database, dropped afterwards; CI must have PostgreSQL."""
    import psycopg2

    try:
        admin = psycopg2.connect(connect_timeout=3, **PG)
    except psycopg2.OperationalError as exc:
        reason = f"PostgreSQL at {PG['host']}:{PG['port']}/{PG['dbname']} does not answer ({str(exc).strip()})"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI requires it")
        pytest.skip(reason)
    admin.autocommit = True
    schema = f"hf_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield (
            f"postgresql://{PG['user']}@{PG['host']}:{PG['port']}/{PG['dbname']}?options=-c%20search_path%3D{schema}"
        )
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_url")


# -- the service in this process -----------------------------------------------------------------
@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """The shipped model, loaded once for the whole session; lone runs use the batch session
    (the tests about the lone session build their own engine)."""
    shared = Engine(MODEL, threads=1, lone_threads=1, warm_batch=8).start()
    yield shared
    shared.close()


def make_config(tmp_path: Path, database_url: str, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "database_url": database_url,
        "model_path": MODEL,
        "outbox_dir": tmp_path / "outbox",
        "base_url": "http://testserver",
        "web_threads": 4,
        "ort_threads": 1,
        "mail_retry_min_s": 0.05,
        "mail_retry_max_s": 0.2,
        "last_used_flush_s": 3600.0,  # flushed explicitly by the tests that look at it
        "secret_key": "test-secret",
    }
    return Config(**{**values, **overrides})


def smtp_config(tmp_path: Path, database_url: str, smtp: SmtpServer, **overrides: Any) -> Config:
    mail = {"smtp_host": "127.0.0.1", "smtp_port": smtp.port, "smtp_security": "none"}
    return make_config(tmp_path, database_url, **{**mail, **overrides})


@pytest.fixture
def runtime_with(tmp_path: Path, engine: Engine, smtp: SmtpServer) -> Iterator[Callable[..., Runtime]]:
    """Starts production runtimes around the shared engine, mailing the test SMTP server; each
    is closed at the end of the test."""
    with ExitStack() as stack:

        def start(database_url: str, **overrides: Any) -> Runtime:
            config = smtp_config(tmp_path, database_url, smtp, **overrides)
            return stack.enter_context(Runtime(config, engine=engine))

        yield start


@pytest.fixture
def runtime(runtime_with: Callable[..., Runtime], sqlite_url: str) -> Runtime:
    """The production runtime on SQLite, mailing the test SMTP server."""
    return runtime_with(sqlite_url)


@pytest.fixture
def client(runtime: Runtime) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(runtime.deps))


def issue_key(store: Store, address: str) -> str:
    """A key put straight into the store, for tests about what a key is used for, not how it is
    obtained (that is ``obtain_key``)."""
    key = new_secret()
    with store.transaction():
        store.add_key(address, digest(key), utcnow())
    store.release()
    return key


def obtain_key(client: falcon.testing.TestClient, smtp: SmtpServer, address: str) -> str:
    """The whole mailed flow: request, follow the link, read the key from the second mail."""
    seen = len(smtp.mailbox.messages)
    assert client.simulate_post("/api/v1/api-keys/generation", json={"email": address}).status_code == 200
    link = verify_link(smtp.mailbox.wait_for(seen + 1)[-1])
    assert client.simulate_get(link.replace("http://testserver", "")).status_code == 200
    return key_in(smtp.mailbox.wait_for(seen + 2)[-1])


# -- engines that record their runs (the batcher's tests) ----------------------------------------
class CountingEngine:
    """The shared engine, recording the size of each run."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.runs: list[int] = []

    def run(self, batch, lone=False):
        self.runs.append(len(batch))
        return self._engine.run(batch, lone)


class ThreadRecordingEngine(CountingEngine):
    """The shared engine, recording which thread ran each batch and on which session; its first
    run can be made to fail."""

    def __init__(self, engine: Engine, fail_first: bool = False) -> None:
        super().__init__(engine)
        self.calls: list[tuple[int, bool]] = []
        self._fail = fail_first

    def run(self, batch, lone=False):
        self.calls.append((threading.get_ident(), lone))
        if self._fail:
            self._fail = False
            raise RuntimeError("the model broke")
        return super().run(batch, lone)


# -- the service as a process --------------------------------------------------------------------
class ServiceProcess:
    """``python -m service`` with a given environment (a None value leaves that variable out);
    ``start`` returns once /readyz is 200."""

    def __init__(
        self, env: dict[str, str | None], log_path: Path, python: str = sys.executable, cwd: Path = REPO
    ) -> None:
        self.port = int(env.get("PORT") or free_port())
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = {
            "PATH": os.environ.get("PATH", ""),
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "BASE_URL": self.url,
            "WEB_WORKERS": "1",
            "WEB_THREADS": "4",
            "ORT_THREADS": "1",
            "ORT_LONE_THREADS": "1",
            "BATCH_WORKERS": "1",
            "SECRET_KEY": "test-secret",
            "MODEL_PATH": str(INT8),  # the subject of these tests is not the model (those choose theirs)
            **env,
        }
        self._env = {name: value for name, value in self._env.items() if value is not None}
        self._log_path = log_path
        self._python = python
        self._cwd = cwd
        self._process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> ServiceProcess:
        with open(self._log_path, "ab") as log:
            self._process = subprocess.Popen(
                [self._python, "-m", "service"], cwd=self._cwd, env=self._env, stdout=log, stderr=subprocess.STDOUT
            )

        def ready() -> bool:
            if self._process.poll() is not None:
                raise AssertionError(f"service exited with {self._process.returncode}:\n{self.log()}")
            try:
                return http("GET", f"{self.url}/readyz")[0] == 200
            except OSError:
                return False

        wait_until(ready, timeout_s, "/readyz")
        return self

    def signal(self, signum: int) -> None:
        assert self._process is not None
        self._process.send_signal(signum)

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def wait(self, timeout_s: float = 30) -> int:
        assert self._process is not None
        return self._process.wait(timeout_s)

    def stop(self) -> int:
        assert self._process is not None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            self._process.wait(30)
        return self._process.returncode

    def kill(self) -> None:
        """SIGKILL: no shutdown at all, as when a machine or container dies."""
        assert self._process is not None
        self._process.kill()
        self._process.wait(10)

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")


@pytest.fixture
def service_process(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    started: list[ServiceProcess] = []

    def start(env: dict[str, str], **kwargs: Any) -> ServiceProcess:
        process = ServiceProcess(env, tmp_path / f"service-{len(started)}.log", **kwargs)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real file system of 2 MiB (tmpfs), for a disk that fills up; needs the right to mount."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte; the file that does it."""
    filler = disk / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as file:
        while True:
            file.write(bytes(1 << 16))
            file.flush()
    return filler


# -- a PostgreSQL cluster of the test's own, for fault tests ---------------------------------------
@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    """A throwaway cluster on a free port (never the shared server): stop, freeze and restart it."""
    reason = pgcluster.missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI requires it")
        pytest.skip(reason)
    cluster = PgCluster().start()
    yield cluster
    cluster.close()


def service_with_key(
    service_process: Callable[..., ServiceProcess], tmp_path: Path, env: dict[str, str], **kwargs: Any
) -> tuple[ServiceProcess, str]:
    """``python -m service`` on a SQLite file of its own (mails to an outbox folder) and a valid
    key put into that file from here; ``kwargs`` go to ``ServiceProcess``."""
    url = f"sqlite:///{tmp_path / 'served.db'}"
    service = service_process({"DATABASE_URL": url, "OUTBOX_DIR": str(tmp_path / "outbox"), **env}, **kwargs)
    store = Store(url, max_connections=1).start()
    try:
        return service, issue_key(store, "served@example.org")
    finally:
        store.close()
