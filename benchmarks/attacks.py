"""Issue 18's attack and fault table, re-run: `python -m benchmarks.attacks` → results/attacks-MMDD.json.

Every row starts what it needs on loopback: `python -m service` processes (the shipped defaults
except what the row needs), aiosmtpd servers, and for the database faults a throwaway PostgreSQL
cluster (never the shared server on 5432). Load comes from client threads with a deadline, to
127.0.0.1 only. Per row it keeps the statuses per request kind and phase, the latencies where the
row is about time, the service's log lines and tracebacks during the fault, and whether a key or
a promised mail was lost. The two rows other engineers handle (slow headers, schemathesis) are
not here. Departures from the defaults, each for its row: on PostgreSQL KEY_CACHE_SECONDS=2 (the
verified keys' entries expire during the outage) and MAIL_LIMIT_PER_CLIENT=0 (one loopback client
asks for hundreds of keys); mail retries from 0.2 to 1 s where a row waits for them; no SECRET_KEY
where the generated `<db>.secret` is the point.
"""

from __future__ import annotations

import http.client
import re
import socket
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import orjson

from benchmarks.common import machine, markdown_table, save
from tests.pgcluster import PgCluster
from tests.service.conftest import (
    KEY,
    LINK,
    ServiceProcess,
    SmtpServer,
    free_port,
    key_in,
    smtp_env,
    text_of,
    verify_link,
    wait_until,
)

DENOISE, RECORD = "/api/v1/denoising", "/api/v1/denoising/record"
GENERATION = "/api/v1/api-keys/generation"
# ServiceProcess pins the test suite's small settings; empty values give the shipped defaults back.
DEFAULTS = {"WEB_THREADS": "", "ORT_LONE_THREADS": "", "BATCH_WORKERS": ""}
QUICK_RETRIES = {"MAIL_RETRY_MIN_SECONDS": "0.2", "MAIL_RETRY_MAX_SECONDS": "1"}
SIGNAL = np.sin(np.arange(1300) * 2 * np.pi * 1.2 / 130).round(4).tolist()
WINDOW = {"ecg_signal": SIGNAL}
ACCESS = re.compile(r" service\.access: (\S+) (\S+) (\d{3}) ([\d.]+)ms id=(\S+) client=(\S+)$")
TRACEBACK = "Traceback (most recent call last)"
SECRETS: set[str] = set()  # every key and link token mailed in this run: no log may hold one


# -- one request --------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int | str  # "timeout" or "refused"/"error" when no HTTP answer came
    seconds: float
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> dict:
        return orjson.loads(self.body)


def call(
    method: str,
    url: str,
    body: bytes | dict | None = None,
    headers: dict[str, str] | None = None,
    source: str = "127.0.0.1",
    timeout_s: float = 30.0,
) -> Answer:
    """One request on a fresh connection from ``source`` (another loopback address is another client)."""
    parts = urlsplit(url)
    if isinstance(body, dict | list):
        body, headers = orjson.dumps(body), {"Content-Type": "application/json", **(headers or {})}
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s, source_address=(source, 0))
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    started = time.perf_counter()
    try:
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return Answer(
            response.status, time.perf_counter() - started, {k.lower(): v for k, v in response.getheaders()}, data
        )
    except TimeoutError:
        return Answer("timeout", time.perf_counter() - started)
    except ConnectionRefusedError:
        return Answer("refused", time.perf_counter() - started)
    except OSError as exc:
        return Answer(f"error:{type(exc).__name__}", time.perf_counter() - started)
    finally:
        conn.close()


def tally(answers: list[Answer]) -> dict[str, int]:
    return dict(sorted(Counter(str(a.status) for a in answers).items()))


def ms(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {}
    return {"p50_ms": round(statistics.median(seconds) * 1000, 1), "max_ms": round(max(seconds) * 1000, 1)}


# -- what a row starts ---------------------------------------------------------------------------
class Service:
    """A ``python -m service`` process with its log, read by offsets to see what one phase wrote."""

    def __init__(self, folder: Path, name: str, env: dict[str, str]) -> None:
        self.log_path = folder / f"{name}.log"
        self.process = ServiceProcess({**DEFAULTS, "OUTBOX_DIR": str(folder / "outbox"), **env}, self.log_path)
        self.url = self.process.url

    def mark(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, mark: int = 0) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(mark)
            return log.read().decode(errors="replace")


def log_summary(text: str) -> dict:
    lines = text.splitlines()
    others = [line for line in lines if not ACCESS.search(line)]
    return {
        "lines": len(lines),
        "access_lines": len(lines) - len(others),
        "other_lines": len(others),
        "tracebacks": text.count(TRACEBACK),
        "bytes": len(text.encode()),
        "sample": [line[24:200] for line in others if " INFO " not in line][:6],
        "first_traceback": text[text.index(TRACEBACK) :].splitlines()[:40] if TRACEBACK in text else None,
    }


@contextmanager
def started(folder: Path, name: str, env: dict[str, str]) -> Iterator[Service]:
    service = Service(folder, name, env)
    service.process.start()
    try:
        yield service
    finally:
        service.process.stop()


@contextmanager
def smtp_server(port: int | None = None) -> Iterator[SmtpServer]:
    server = SmtpServer(port).start()
    try:
        yield server
    finally:
        server.stop()


def obtain_key(service: Service, smtp: SmtpServer, address: str) -> str:
    """The mailed flow over HTTP; the key is then verified once by a denoising request."""
    seen = len(smtp.mailbox.messages)
    assert call("POST", service.url + GENERATION, {"email": address}).status == 200
    assert call("GET", verify_link(smtp.mailbox.wait_for(seen + 1)[-1])).status == 200
    key = key_in(smtp.mailbox.wait_for(seen + 2)[-1])
    assert denoise(service, key).status == 200
    return key


def denoise(service: Service, key: str) -> Answer:
    return call("POST", service.url + DENOISE, WINDOW, {"x-api-key": key})


def recipients(smtp: SmtpServer) -> Counter:
    return Counter(m["To"] for m in smtp.mailbox.messages)


def remember_secrets(smtp: SmtpServer) -> None:
    for message in smtp.mailbox.messages:
        text = text_of(message)
        SECRETS.update({m.rsplit("=", 1)[1] for m in LINK.findall(text)} | set(KEY.findall(text)))


def undelivered(smtp: SmtpServer, promised: Counter, timeout_s: float = 30.0) -> list[str]:
    """The promised mails (200 answers) that have not arrived within ``timeout_s``."""

    def missing() -> list[str]:
        got = recipients(smtp)
        return sorted(address for address, n in promised.items() if got[address] < n)

    with suppress(AssertionError):
        wait_until(lambda: not missing(), timeout_s, "the promised mails")
    return missing()


def outbox_rows(url: str, addresses: list[str]) -> list[dict]:
    """What the database says about mails that did not arrive: leased, retrying, or gone."""
    import psycopg2

    query = (
        "SELECT t.email, t.created_at, m.id, m.attempts, m.created_at, m.next_attempt_at, m.sent_at, m.failed_at,"
        " m.last_error, now() FROM verification_token t LEFT JOIN outbox_mail m ON m.recipient = t.email WHERE t.email = ANY(%s)"
    )
    names = (
        "email",
        "token_at",
        "mail_id",
        "attempts",
        "mail_at",
        "next_attempt_at",
        "sent_at",
        "failed_at",
        "last_error",
        "now",
    )
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(query, (addresses[:10],))
        return [{n: str(v) for n, v in zip(names, row, strict=True)} for row in cur.fetchall()]


# -- bounded load --------------------------------------------------------------------------------
class Load:
    """Client threads, each repeating one kind of request (then pausing) until stopped or past its
    deadline; every answer is kept with its start time, so phases are cut afterwards."""

    def __init__(self, jobs: list[tuple[str, Callable[[], Answer], float]], deadline_s: float) -> None:
        self._jobs = jobs
        self._deadline = time.monotonic() + deadline_s
        self._stop = threading.Event()
        self.records: list[tuple[float, str, Answer]] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=job, daemon=True) for job in jobs]

    def _run(self, kind: str, request: Callable[[], Answer], pause_s: float) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            at = time.monotonic()
            answer = request()
            with self._lock:
                self.records.append((at, kind, answer))
            self._stop.wait(pause_s)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def phase(self, start: float, end: float) -> dict[str, dict]:
        """Per kind: statuses and latency of the requests that started in [start, end)."""
        by_kind: dict[str, list[Answer]] = defaultdict(list)
        for at, kind, answer in self.records:
            if start <= at < end:
                by_kind[kind].append(answer)
        return {kind: {"statuses": tally(a), **ms([x.seconds for x in a])} for kind, a in sorted(by_kind.items())}

    def first(self, kind: str, status: int, after: float) -> float | None:
        return min((at for at, k, a in self.records if k == kind and a.status == status and at >= after), default=None)


class KeyRequests:
    """Generation requests for fresh addresses; remembers the ones promised a mail."""

    def __init__(self, service: Service, prefix: str, source: str = "127.0.0.1") -> None:
        self._service, self._prefix, self._source = service, prefix, source
        self._count = iter(range(10**9))
        self.promised: Counter = Counter()

    def __call__(self) -> Answer:
        address = f"{self._prefix}{next(self._count)}@example.org"
        answer = call("POST", self._service.url + GENERATION, {"email": address}, source=self._source)
        if answer.status == 200:
            self.promised[address] += 1
        return answer


def fault_load(service: Service, keys: list[str], key_requests: KeyRequests) -> list[tuple[str, Callable, float]]:
    """Six clients: two with unknown keys, two asking for keys, two denoising with verified keys
    (paced under the per-key rate limit, so what they see is the database, not the limit)."""
    unknown = lambda: denoise(service, uuid.uuid4().hex)  # noqa: E731
    cached = [lambda k=k: denoise(service, k) for k in keys]
    return [
        *[("unknown-key", unknown, 0.0)] * 2,
        *[("key-request", key_requests, 0.05)] * 2,
        *[("denoise-cached-key", c, 0.06) for c in cached],
    ]


def wait_ready(service: Service, timeout_s: float = 30.0) -> float:
    started_at = time.monotonic()
    wait_until(lambda: call("GET", service.url + "/readyz", timeout_s=5).status == 200, timeout_s, "/readyz")
    return time.monotonic() - started_at


# -- rows 2 and 3: PostgreSQL stopped, then frozen -----------------------------------------------
def quiet_port() -> int:
    """A free port below the kernel's ephemeral range: while the cluster is down, the thousands of
    client sockets of the load cannot take its port, so that it can listen there again."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in range(low - 1, low - 2000, -1):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError("no free port below the ephemeral range")


def restart(cluster: PgCluster, failures: list[str]) -> None:
    """``pg_ctl start``, retried; each failure is kept with the cluster's own reason."""
    for _ in range(5):
        try:
            cluster.start()
            return
        except RuntimeError as exc:
            lines = (cluster.folder / "log").read_text(errors="replace").splitlines()
            failures.append(f"{exc}: {[line for line in lines if 'FATAL' in line][-1:]}")
            time.sleep(1)
    raise RuntimeError(f"the cluster does not start again: {failures}")


def postgres_faults(folder: Path) -> dict[str, dict]:
    cluster = PgCluster()
    cluster.port = quiet_port()
    cluster.start()
    try:
        with smtp_server() as smtp:
            env = {
                "DATABASE_URL": cluster.url,
                **smtp_env(smtp.port),
                "KEY_CACHE_SECONDS": "2",  # expires during the outage: the verified keys must still work
                "MAIL_LIMIT_PER_CLIENT": "0",  # one loopback client asks for hundreds of keys here
                "KEY_REQUESTS_PER_MINUTE": "0",
            }
            with started(folder, "postgres", env) as service:
                keys = [obtain_key(service, smtp, f"steady{i}@example.org") for i in range(2)]
                requests = KeyRequests(service, "load")
                stopped = postgres_stopped(service, cluster, keys, requests)
                frozen = postgres_frozen(service, cluster, keys, requests)
                lost_keys = sum(denoise(service, k).status != 200 for k in keys)
                missing = undelivered(smtp, requests.promised)
                late = outbox_rows(cluster.url, missing)
                queued = [r for r in late if r["mail_id"] != "None" and r["sent_at"] == r["failed_at"] == "None"]
                for row in (stopped, frozen):
                    row.update(keys_lost=lost_keys, mails_promised=sum(requests.promised.values()))
                    row.update(mails_late=len(missing), mails_still_queued=len(queued), late_mails=late)
                    row["mails_lost"] = len(missing) - len(queued)
                remember_secrets(smtp)
                return {"postgres_stopped": stopped, "postgres_frozen": frozen}
    finally:
        cluster.close()


def faulted(
    service: Service, jobs: list, fault: Callable[[], None], mend: Callable[[], None], hold_s: float, during=None
) -> dict:
    """Load for 4 s, the fault for ``hold_s`` (``during`` starts with it, beside the load), mended, 5 s more."""
    extra: dict = {}
    side = threading.Thread(target=lambda: extra.update(during() if during else {}), daemon=True)
    with Load(jobs, deadline_s=hold_s + 60) as load:
        time.sleep(4)
        mark, t_fault = service.mark(), time.monotonic()
        fault()
        side.start()
        time.sleep(hold_s)
        t_mend = time.monotonic()
        mend()
        recovery_s = wait_ready(service)
        log = log_summary(service.log_since(mark))
        time.sleep(5)
        t_end = time.monotonic()
        side.join(60)
    first_key = load.first("key-request", 200, t_mend)
    return {
        "fault_s": round(t_mend - t_fault, 1),
        "before": load.phase(t_fault - 4, t_fault),
        "during": load.phase(t_fault, t_mend),
        "after": load.phase(t_mend, t_end),
        "readyz_after_mend_s": round(recovery_s, 2),
        "first_key_request_200_after_mend_s": round(first_key - t_mend, 2) if first_key else None,
        "log_during_fault": log,
        **extra,
    }


def postgres_stopped(service: Service, cluster: PgCluster, keys: list[str], requests: KeyRequests) -> dict:
    failures: list[str] = []
    row = faulted(service, fault_load(service, keys, requests), cluster.stop, lambda: restart(cluster, failures), 22)
    return {**row, "cluster_restart_failures": failures}


def postgres_frozen(service: Service, cluster: PgCluster, keys: list[str], requests: KeyRequests) -> dict:
    """SIGSTOP, as a hung server: /readyz is polled, and 20 unknown keys arrive at once as the
    freeze starts (before, 20 such requests took every web thread)."""
    readyz = lambda: call("GET", service.url + "/readyz")  # noqa: E731
    jobs = [*fault_load(service, keys, requests), ("readyz", readyz, 0.5)]

    def burst() -> dict:
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: denoise(service, uuid.uuid4().hex), range(20)))
        return {"burst_20_unknown_keys": {"statuses": tally(answers), **ms([a.seconds for a in answers])}}

    return faulted(service, jobs, cluster.freeze, cluster.thaw, 20, during=burst)


# -- row 4: mail floods ---------------------------------------------------------------------------
def floods(folder: Path) -> dict:
    """30 requests for one address (from 127.0.0.2), then 4 clients' worth of distinct addresses
    for 10 s from one client (127.0.0.3): each limit is met on its own."""
    with (
        smtp_server() as smtp,
        started(
            folder, "floods", {"DATABASE_URL": f"sqlite:///{folder / 'floods.db'}", **smtp_env(smtp.port)}
        ) as service,
    ):
        one = [
            call("POST", service.url + GENERATION, {"email": "victim@example.org"}, source="127.0.0.2")
            for _ in range(30)
        ]
        flood = KeyRequests(service, "flood", source="127.0.0.3")
        with Load([("key-request", flood, 0.0)] * 4, deadline_s=10) as load:
            time.sleep(10)
        answers = [a for _, _, a in load.records]
        promised = flood.promised + Counter({"victim@example.org": sum(a.status == 200 for a in one)})
        lost = len(undelivered(smtp, promised, 20))
        time.sleep(1)  # anything more than was promised would show up now
        refused = [a for a in one + answers if a.status == 429]
        remember_secrets(smtp)
        return {
            "one_address_30": {"order": [a.status for a in one], "statuses": tally(one)},
            "one_client_10s": {
                "requests": len(answers),
                "statuses": tally(answers),
                **ms([a.seconds for a in answers]),
            },
            "all_429_have_retry_after": all(int(a.headers.get("retry-after", 0)) > 0 for a in refused),
            "retry_after_s": sorted({int(a.headers.get("retry-after", 0)) for a in refused})[:3],
            "mails_promised": sum(promised.values()),
            "mails_sent": len(smtp.mailbox.messages),
            "mails_lost": lost,
        }


# -- row 6: the mail server down, the database copied --------------------------------------------
def mail_server_down(folder: Path) -> dict:
    """No SECRET_KEY (a local SQLite run generates one beside the file). The link mail waits: copy
    the file; the server comes up for the link, goes down again; the key mail waits: copy again;
    the service restarts, then the server comes up and the key must arrive."""
    port, db = free_port(), folder / "down.db"
    env = {"DATABASE_URL": f"sqlite:///{db}", **smtp_env(port), **QUICK_RETRIES, "SECRET_KEY": ""}
    snapshot = lambda: b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())  # noqa: E731
    with started(folder, "down", env) as service:
        asked = call("POST", service.url + GENERATION, {"email": "patient@example.org"}).status
        time.sleep(1)  # a few failed attempts
        link_copy = snapshot()
        with smtp_server(port) as smtp:
            link = verify_link(smtp.mailbox.wait_for(1)[0])
        clicked = call("GET", link).status
        time.sleep(1)
        key_copy = snapshot()
    with started(folder, "down-restarted", env) as service, smtp_server(port) as smtp:
        key = key_in(smtp.mailbox.wait_for(1, 30)[0])
        works = denoise(service, key).status
        remember_secrets(smtp)
    token = link.rsplit("=", 1)[1]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in sorted(folder.glob("down.db*"))}
    return {
        "statuses": {"generation": asked, "link": clicked, "key_after_restart": works},
        "in_copy_while_link_waits": {"token": token.encode() in link_copy, "link": b"token=" in link_copy},
        "in_copy_while_key_waits": {"key": key.encode() in key_copy, "text": b"Your API key" in key_copy},
        "key_mail_arrived_after_restart": True,
        "file_modes": modes,
    }


# -- rows 5, 7, 8, 9 and what must keep holding: one service -------------------------------------
def two_links(service: Service, smtp: SmtpServer) -> dict:
    seen, links = len(smtp.mailbox.messages), []
    for n in (1, 2):
        assert call("POST", service.url + GENERATION, {"email": "twice@example.org"}).status == 200
        links.append(verify_link(smtp.mailbox.wait_for(seen + n)[-1]))
    second = call("GET", links[1]).status
    key = key_in(smtp.mailbox.wait_for(seen + 3)[-1])
    first = call("GET", links[0])
    return {
        "link_2": second,
        "link_1_after": first.status,
        "link_1_error": first.json().get("error") if first.status != 200 else None,
        "key_2_denoises": denoise(service, key).status,
        "spent_link": links[0],
    }


def refused_recipient(service: Service, smtp: SmtpServer, db: Path) -> dict:
    smtp.mailbox.refuse = {"gone@example.org": "550 5.1.1 No such user"}
    mark, seen = service.mark(), len(smtp.mailbox.messages)
    statuses = [
        call("POST", service.url + GENERATION, {"email": a}).status for a in ("gone@example.org", "fine@example.org")
    ]
    arrived = [m["To"] for m in smtp.mailbox.wait_for(seen + 1)[seen:]]
    query = "SELECT attempts, failed_at, last_error, text_body IS NULL FROM outbox_mail WHERE recipient = ?"

    def row() -> tuple | None:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            found = conn.execute(query, ("gone@example.org",)).fetchone()
        return found if found and found[1] else None

    attempts, failed_at, error, wiped = wait_until(row, 20, "the refused mail given up")
    time.sleep(1)  # no further attempt may follow
    return {
        "statuses": statuses,
        "delivered": arrived,
        "attempts": attempts,
        "attempts_after_1s_more": row()[0],
        "failed_at_set": failed_at is not None,
        "last_error": error,
        "body_wiped": bool(wiped),
        "error_log_lines": [line[24:160] for line in service.log_since(mark).splitlines() if " ERROR " in line],
    }


SECURITY_HEADERS = ("x-content-type-options", "cache-control", "content-security-policy", "x-frame-options")
CORS_HEADERS = ("access-control-allow-origin", "access-control-allow-methods", "access-control-allow-headers")
ORIGIN = "https://app.example.org"


def shown(answer: Answer, names: tuple[str, ...]) -> dict:
    return {"status": answer.status, **{n: answer.headers.get(n) for n in names}}


def headers(service: Service, smtp: SmtpServer, key: str, cors: Service) -> dict:
    seen = len(smtp.mailbox.messages)
    asked = call("POST", service.url + GENERATION, {"email": "headers@example.org"})
    answers = {
        "denoise 200": denoise(service, key),
        "denoise 401": denoise(service, "not-a-key"),
        "key request 200": asked,
        "verify page": call("GET", verify_link(smtp.mailbox.wait_for(seen + 1)[-1])),
        "/openapi.json": call("GET", service.url + "/openapi.json"),
        "404": call("GET", service.url + "/nowhere"),
    }
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key, content-type",
    }
    return {
        **{
            name: {**shown(a, SECURITY_HEADERS), "x-request-id": "x-request-id" in a.headers}
            for name, a in answers.items()
        },
        "cors default, GET with Origin": shown(
            call("GET", service.url + "/healthz", headers={"Origin": ORIGIN}), CORS_HEADERS
        ),
        "cors default, preflight": shown(call("OPTIONS", service.url + DENOISE, headers=preflight), CORS_HEADERS),
        "cors allowed, preflight": shown(call("OPTIONS", cors.url + DENOISE, headers=preflight), CORS_HEADERS),
        "cors other origin, preflight": shown(
            call("OPTIONS", cors.url + DENOISE, headers={**preflight, "Origin": "https://evil.example"}), CORS_HEADERS
        ),
    }


def access_log(service: Service, key: str, spent_link: str) -> dict:
    """A known set of requests, each with its own X-Request-ID: one matching line each."""
    requests = [
        ("GET", service.url + "/healthz", None, {}),
        ("HEAD", service.url + "/readyz", None, {}),
        ("POST", service.url + DENOISE, WINDOW, {"x-api-key": key}),
        ("POST", service.url + DENOISE, WINDOW, {}),
        ("POST", service.url + DENOISE, b"{bad", {"x-api-key": key, "Content-Type": "application/json"}),
        ("GET", spent_link, None, {}),
        ("GET", service.url + "/nowhere?token=abc", None, {}),
        ("POST", service.url + GENERATION, {"email": "log@example.org"}, {}),
    ]
    mark, sent = service.mark(), {}
    for n, (method, url, body, extra) in enumerate(requests):
        rid = f"attack-{n}"
        sent[rid] = (method, urlsplit(url).path, call(method, url, body, {**extra, "X-Request-ID": rid}).status)
    time.sleep(0.3)
    lines = [m for line in service.log_since(mark).splitlines() if (m := ACCESS.search(line))]
    logged = Counter((m[5], (m[1], m[2], int(m[3]))) for m in lines)
    return {
        "requests": len(sent),
        "access_lines": sum(logged[(rid, what)] for rid, what in sent.items()),
        "one_exact_line_each": all(logged[(rid, what)] == 1 for rid, what in sent.items()),
        "query_strings_logged": sum("?" in m[2] for m in lines),
        "example": lines[2].group(0).strip() if len(lines) > 2 else None,
    }


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# Each body goes as JSON, except the form.
FORM = "application/x-www-form-urlencoded"
BAD_WINDOW_BODIES = {
    "empty": b"",
    "not JSON": b"hello",
    "truncated": b'{"ecg_signal": [1, 2',
    "invalid UTF-8": b'{"ecg_signal": "\xff\xfe"}',
    "array": b"[1, 2]",
    "null": b"null",
    "no field": b"{}",
    "string field": orjson.dumps({"ecg_signal": "1,2,3"}),
    "1299 values": orjson.dumps({"ecg_signal": SIGNAL[:-1]}),
    "NaN": b'{"ecg_signal": [NaN' + b", 0" * 1299 + b"]}",
    "1e999": b'{"ecg_signal": [1e999' + b", 0" * 1299 + b"]}",
    "strings": orjson.dumps({"ecg_signal": ["1"] * 1300}),
    "booleans": orjson.dumps({"ecg_signal": [True] * 1300}),
    "nested 100k": _nested(100_000),
    "nested field": b'{"ecg_signal": ' + _nested(100_000) + b"}",
    "3 MB": b'{"ecg_signal": [' + b"0," * 1_500_000 + b"0]}",
    "form": b"ecg_signal=1",
}
BAD_EMAIL_BODIES = {
    "not JSON": b"hello",
    "array": b"[]",
    "number": b'{"email": 5}',
    "list": b'{"email": ["a@example.org"]}',
    "two addresses": b'{"email": "a@example.org,b@example.org"}',
    "10k characters": orjson.dumps({"email": "a" * 10_000 + "@example.org"}),
    "nested 100k": _nested(100_000),
}


def bad_json(service: Service, key: str, repeats: int = 3) -> dict:
    """Each bad body a few times, paced under the key's rate limit; all must be 4xx."""
    results = {}
    for path, bodies, extra in ((DENOISE, BAD_WINDOW_BODIES, {"x-api-key": key}), (GENERATION, BAD_EMAIL_BODIES, {})):
        for name, body in bodies.items():
            kind = FORM if name == "form" else "application/json"
            answers = []
            for _ in range(repeats):
                answers.append(call("POST", service.url + path, body, {**extra, "Content-Type": kind}))
                time.sleep(0.05)
            results[f"{path} {name}"] = {"statuses": tally(answers), **ms([a.seconds for a in answers])}
    times = [s for r in results.values() for s in (r["p50_ms"], r["max_ms"])]
    return {
        "kinds": len(results),
        "not_4xx": {k: r["statuses"] for k, r in results.items() if any(not s.startswith("4") for s in r["statuses"])},
        "worst_max_ms": max(times),
        "median_of_p50_ms": statistics.median(r["p50_ms"] for r in results.values()),
        "per_kind": results,
    }


def sigterm_in_flight(service: Service, key: str) -> dict:
    """An hour of float32 at 130 Hz (seconds of work) is in flight when SIGTERM comes."""
    hour = np.tile(np.asarray(SIGNAL, "<f4"), 360)
    done: dict[str, Answer] = {}
    url = f"{service.url}{RECORD}?sampling_rate=130"
    headers = {"x-api-key": key, "Content-Type": "application/octet-stream"}
    record = threading.Thread(
        target=lambda: done.update(record=call("POST", url, hour.tobytes(), headers, timeout_s=120))
    )
    later = threading.Thread(
        target=lambda: (time.sleep(0.5), done.update(later=call("GET", service.url + "/healthz", timeout_s=5)))
    )
    record.start()
    time.sleep(1.5)
    signalled = time.monotonic()
    later.start()
    code = service.process.stop()
    exit_s = time.monotonic() - signalled
    record.join(120)
    later.join(10)
    answer = done["record"]
    return {
        "record_status": answer.status,
        "record_s": round(answer.seconds, 1),
        "samples_sent": hour.size,
        "samples_back": len(answer.body) // 4,
        "exit_code": code,
        "exit_after_sigterm_s": round(exit_s, 1),
        "record_error": answer.body[:300].decode(errors="replace") if answer.status != 200 else None,
        "new_request_after_sigterm": done["later"].status,
    }


def one_service_rows(folder: Path) -> dict:
    cors_env = {"DATABASE_URL": f"sqlite:///{folder / 'cors.db'}", "CORS_ALLOW_ORIGINS": ORIGIN}
    with smtp_server() as smtp:
        env = {"DATABASE_URL": f"sqlite:///{folder / 'main.db'}", **smtp_env(smtp.port), **QUICK_RETRIES}
        with started(folder, "main", env) as service, started(folder, "cors", cors_env) as cors:
            key = obtain_key(service, smtp, "main@example.org")
            rows = {"two_links": two_links(service, smtp)}
            rows["smtp_550"] = refused_recipient(service, smtp, folder / "main.db")
            rows["headers"] = headers(service, smtp, key, cors)
            rows["access_log"] = access_log(service, key, rows["two_links"].pop("spent_link"))
            rows["still_holding"] = {"bad_json": bad_json(service, key), "sigterm": sigterm_in_flight(service, key)}
        remember_secrets(smtp)
    return rows


# -- the table ------------------------------------------------------------------------------------
BEFORE = {
    "postgres_stopped": "500s: 3,039 unknown-key, 22 key-request, 589 denoise; +27 MB log, ~11,000 tracebacks",
    "postgres_frozen": "everything touching it hung, /readyz too; 20 took all web threads, cached-key denoise stopped",
    "floods": "30 of 30 mails sent; 4,232 key requests in 10 s all 200; no limit",
    "two_links": "#1 replaced the key #2 had just issued",
    "mail_server_down": "keys in plaintext in outbox_mail.text_body until delivery; SQLite file 0644",
    "smtp_550": "retried forever",
    "headers": "no nosniff, CSP, X-Frame-Options, no-store on key pages; no CORS",
    "access_log": "no line per request",
    "still_holding": "bad JSON 4xx < 5 ms; nothing lost; queued mails arrive across a restart; SIGTERM drains",
}


def statuses(phase: dict, kind: str) -> str:
    return " ".join(f"{n}×{s}" for s, n in phase.get(kind, {}).get("statuses", {}).items()) or "-"


def fault_text(row: dict) -> str:
    during, log = row["during"], row["log_during_fault"]
    kinds = "; ".join(f"{k} {statuses(during, k)}" for k in during if k != "readyz")
    return (
        f"during: {kinds}; log {log['lines']} lines ({log['other_lines']} not access), {log['tracebacks']} tracebacks;"
        f" /readyz 200 {row['readyz_after_mend_s']} s after; keys lost {row['keys_lost']}; of {row['mails_promised']}"
        f" mails promised (both rows), {row['mails_late']} not in 30 s ({row['mails_still_queued']} still queued),"
        f" {row['mails_lost']} lost"
    )


def after_text(name: str, row: dict) -> str:
    if name == "postgres_stopped":
        return fault_text(row)
    if name == "postgres_frozen":
        during, burst = row["during"], row["burst_20_unknown_keys"]
        cached, readyz = during.get("denoise-cached-key", {}), during.get("readyz", {})
        in_flight = max(v["max_ms"] for v in row["before"].values())
        return (
            f"in flight at the freeze: max {in_flight} ms; /readyz max {readyz.get('max_ms')} ms; 20 at once: {burst['statuses']} max {burst['max_ms']} ms;"
            f" cached-key denoise p50 {cached.get('p50_ms')} / max {cached.get('max_ms')} ms; " + fault_text(row)
        )
    if name == "floods":
        one, flood = row["one_address_30"]["statuses"], row["one_client_10s"]
        return (
            f"one address: {one}; one client 10 s: {flood['requests']} requests {flood['statuses']};"
            f" Retry-After on every 429: {row['all_429_have_retry_after']}; mails sent {row['mails_sent']}"
            f" of {row['mails_promised']} promised, lost {row['mails_lost']}"
        )
    if name == "two_links":
        return f"#2 {row['link_2']}, then #1 {row['link_1_after']} ({row['link_1_error']}); key #2 denoises {row['key_2_denoises']}"
    if name == "mail_server_down":
        return (
            f"copy while link waits: {row['in_copy_while_link_waits']}; while key waits: {row['in_copy_while_key_waits']};"
            f" key arrived after restart, works {row['statuses']['key_after_restart']}; modes {row['file_modes']}"
        )
    if name == "smtp_550":
        return (
            f"given up after {row['attempts']} attempts (still {row['attempts_after_1s_more']} 1 s later), failed_at"
            f" {row['failed_at_set']}, wiped {row['body_wiped']}, error {row['last_error']!r};"
            f" {len(row['error_log_lines'])} ERROR line(s); others delivered {row['delivered']}"
        )
    if name == "headers":
        pages = [k for k, v in row.items() if "status" in v and v.get("x-content-type-options") == "nosniff"]
        no_store = [k for k, v in row.items() if v.get("cache-control") == "no-store"]
        csp = [k for k, v in row.items() if v.get("content-security-policy")]
        ids = sum(v.get("x-request-id") is True for v in row.values())
        cors = row["cors allowed, preflight"]
        return (
            f"nosniff {len(pages)}/6; X-Request-ID {ids}/6; no-store on {no_store}; CSP+XFO on {csp}; CORS by default"
            f" {row['cors default, preflight']['access-control-allow-origin']}; allowed origin preflight"
            f" {cors['status']} {cors['access-control-allow-origin']}; other origin"
            f" {row['cors other origin, preflight']['access-control-allow-origin']}"
        )
    if name == "access_log":
        return (
            f"{row['access_lines']} lines for {row['requests']} requests (one each: {row['one_exact_line_each']}),"
            f" query strings {row['query_strings_logged']}; keys/tokens in logs {row['secrets_in_logs']}"
        )
    bad, term = row["bad_json"], row["sigterm"]
    return (
        f"{bad['kinds']} bad bodies: non-4xx {bad['not_4xx'] or 'none'}, p50 {bad['median_of_p50_ms']} ms, worst"
        f" {bad['worst_max_ms']} ms; SIGTERM mid-hour: {term['record_status']} with {term['samples_back']}/"
        f"{term['samples_sent']} samples, exit {term['exit_code']} in {term['exit_after_sigterm_s']} s"
    )


def shell(command: str) -> str:
    return subprocess.run(command, shell=True, capture_output=True, text=True).stdout.strip()


def main() -> None:
    began, uptime_before = time.monotonic(), shell("uptime")
    busy = shell("ps -eo pcpu,comm --sort=-pcpu | head -6")
    with tempfile.TemporaryDirectory(prefix="hf-attacks-") as tmp:
        folder = Path(tmp)
        rows = postgres_faults(folder)
        rows["floods"] = floods(folder)
        rows["mail_server_down"] = mail_server_down(folder)
        rows |= one_service_rows(folder)
        logs = {p.stem: p.read_text(errors="replace") for p in sorted(folder.glob("*.log"))}
    rows["access_log"]["secrets_in_logs"] = sum(secret in text for secret in SECRETS for text in logs.values())
    rows["access_log"]["secrets_checked"] = len(SECRETS)
    table = [{"row": name, "before": BEFORE[name], "after": after_text(name, row)} for name, row in rows.items()]
    payload = {
        "machine": machine(),
        "uptime_before": uptime_before,
        "uptime_after": shell("uptime"),
        "busy_before": busy,
        "run_s": round(time.monotonic() - began, 1),
        "logs": {name: log_summary(text) for name, text in logs.items()},
        "rows": rows,
        "table": table,
    }
    path = save(f"attacks-{datetime.now(UTC):%m%d}", payload)
    print(markdown_table(table, [("row", "tried"), ("before", "before"), ("after", "after")]))
    print(f"\n{payload['run_s']} s; before: {uptime_before}; after: {payload['uptime_after']}; → {path}")


if __name__ == "__main__":
    main()
