"""Three ``python -m service`` replicas on one PostgreSQL cluster, behind a real HAProxy with
health checks on ``/readyz``: a key works on every replica, a deactivation reaches the other
replicas' caches within a second (KEY_CACHE_SECONDS is 30, so the notification did it), 60 key
requests spread over the replicas give exactly 60 mails, and ``kill -9`` of a replica under load
fails no request beyond those it was serving.

One set of processes for the module (they take seconds to start); the kill comes last. The
figures are printed (``-s`` shows them) and recorded in docs/operations.md.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from http.client import HTTPException

import psycopg2
import pytest

from tests import haproxy, pgcluster
from tests.haproxy import HaProxy
from tests.pgcluster import PgCluster

from .conftest import ServiceProcess, SmtpServer, free_port, http, key_in, smtp_env, verify_link, wait_until

pytestmark = pytest.mark.slow

DENOISE = "/api/v1/denoising"
WINDOW = {"ecg_signal": [float(i % 50) for i in range(1300)]}
REPLICAS = 3


@dataclass
class Deployment:
    db: PgCluster
    smtp: SmtpServer
    replicas: list[ServiceProcess]
    balancer: HaProxy

    def mails_to(self, address: str, count: int = 1, timeout_s: float = 20.0) -> list:
        """The first ``count`` mails to ``address``, once they have arrived."""
        mine = lambda: [m for m in list(self.smtp.mailbox.messages) if m["To"] == address]
        wait_until(lambda: len(mine()) >= count, timeout_s, f"{count} mail(s) to {address}")
        return mine()[:count]

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with psycopg2.connect(self.db.url, connect_timeout=5) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()


def skip_unless_available() -> None:
    for reason in (haproxy.missing(), pgcluster.missing()):
        if reason:
            if os.environ.get("CI"):
                pytest.fail(f"{reason}; CI requires it")
            pytest.skip(reason)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    skip_unless_available()
    folder = tmp_path_factory.mktemp("replicas")
    with ExitStack() as stack:
        db = PgCluster()
        stack.callback(db.close)
        db.start()
        smtp = SmtpServer().start()
        stack.callback(smtp.stop)
        balancer_port = free_port()
        env = {
            "DATABASE_URL": db.url,
            "KEY_CACHE_SECONDS": "30",
            "BASE_URL": f"http://127.0.0.1:{balancer_port}",
            "MAIL_RETRY_MIN_SECONDS": "0.05",
            "MAIL_RETRY_MAX_SECONDS": "0.2",
            # Every request comes from this one test client: the per-client limits (20 mails an
            # hour, 30 key requests a minute) would stop the 60 generation requests; the
            # per-address limit still holds.
            "MAIL_LIMIT_PER_CLIENT": "0",
            "KEY_REQUESTS_PER_MINUTE": "0",
            "DENOISE_RATE_PER_SECOND": "0",
            **smtp_env(smtp.port),
        }
        replicas = [ServiceProcess(env, folder / f"replica-{n}.log") for n in range(1, REPLICAS + 1)]
        for replica in replicas:
            stack.callback(replica.stop)
        balancer = HaProxy(folder, balancer_port, {f"r{n}": r.port for n, r in enumerate(replicas, 1)})
        stack.callback(balancer.stop)
        balancer.start()
        # Started together on an empty database: they create the tables at the same moment.
        with ThreadPoolExecutor(REPLICAS) as pool:
            list(pool.map(ServiceProcess.start, replicas))
        balancer.wait_until_up()
        yield Deployment(db, smtp, replicas, balancer)


def denoise(url: str, key: str) -> int:
    return http("POST", f"{url}{DENOISE}", WINDOW, {"x-api-key": key})[0]


def obtain_key(deployment: Deployment, url: str, address: str) -> str:
    """The mailed flow through ``url``; the link in the mail points at the balancer."""
    assert http("POST", f"{url}/api/v1/api-keys/generation", {"email": address})[0] == 200
    link = verify_link(deployment.mails_to(address)[0])
    assert http("GET", link.replace(deployment.balancer.url, url))[0] == 200
    return key_in(deployment.mails_to(address, 2)[1])


def test_a_key_obtained_through_the_balancer_works_on_every_replica(deployment):
    key = obtain_key(deployment, deployment.balancer.url, "everywhere@example.org")
    assert [denoise(r.url, key) for r in deployment.replicas] == [200] * REPLICAS
    assert denoise(deployment.balancer.url, "not-a-key") == 401


def test_a_key_deactivated_through_one_replica_is_refused_by_the_others_within_a_second(deployment):
    first, *others = deployment.replicas
    address = "revoked@example.org"
    key = obtain_key(deployment, first.url, address)
    assert [denoise(r.url, key) for r in others] == [200] * len(others)  # now in their caches
    assert http("POST", f"{first.url}/api/v1/api-keys/deactivation", {"email": address})[0] == 200
    link = verify_link(deployment.mails_to(address, 3)[2])
    assert http("GET", link.replace(deployment.balancer.url, first.url))[0] == 200
    committed = time.monotonic()
    delays: dict[str, float] = {}
    while len(delays) < len(others) and time.monotonic() - committed < 5.0:
        for n, replica in enumerate(others, 2):
            if f"r{n}" not in delays and denoise(replica.url, key) == 401:
                delays[f"r{n}"] = time.monotonic() - committed
        time.sleep(0.01)
    print(f"\nrevocation: refused by {', '.join(f'{n} after {d * 1000:.0f} ms' for n, d in delays.items())}")
    assert sorted(delays) == [f"r{n}" for n in range(2, REPLICAS + 1)], f"still accepted after 5 s: {delays}"
    assert max(delays.values()) < 1.0


def test_60_key_requests_spread_over_the_replicas_give_exactly_60_mails(deployment):
    addresses = [f"spread{n}@example.org" for n in range(60)]

    def request(n: int) -> int:
        url = deployment.replicas[n % REPLICAS].url
        return http("POST", f"{url}/api/v1/api-keys/generation", {"email": addresses[n]})[0]

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(request, range(60))) == [200] * 60
    sent = lambda: deployment.query(
        "SELECT count(*) FROM outbox_mail WHERE recipient LIKE 'spread%%' AND sent_at IS NOT NULL"
    )[0][0]
    wait_until(lambda: sent() == 60, 20.0, "60 mails marked sent")
    time.sleep(0.5)  # a duplicate would be on its way by now
    received = Counter(m["To"] for m in list(deployment.smtp.mailbox.messages) if m["To"].startswith("spread"))
    by_replica = [len(re.findall(r"Mail \d+ to spread", r.log())) for r in deployment.replicas]
    print(f"\noutbox: {sum(received.values())} mails received for 60 requests; sent by replicas {by_replica}")
    assert received == Counter(addresses)
    assert sum(by_replica) == 60


def test_a_database_outage_leaves_the_replicas_serving_the_keys_they_cached(deployment):
    """Every replica's /readyz says 503 while the database is away, and the balancer took them all
    out: clients got HAProxy's HTML 503 even for keys that every replica had cached."""
    key = obtain_key(deployment, deployment.balancer.url, "outage@example.org")
    assert [denoise(r.url, key) for r in deployment.replicas] == [200] * REPLICAS  # cached on each
    deployment.db.stop()
    try:
        wait_until(lambda: all(s.startswith("DOWN") for s in deployment.balancer.states().values()), 10, "all out")
        assert [denoise(deployment.balancer.url, key) for _ in range(6)] == [200] * 6
        status, body = http("POST", f"{deployment.balancer.url}/api/v1/api-keys/generation", {"email": "o@example.org"})
        assert status == 503 and "error" in body  # the API's JSON answer, not the balancer's page
    finally:
        deployment.db.start()
    deployment.balancer.wait_until_up(30)


def test_kill_9_of_a_replica_under_load_fails_only_the_requests_it_was_serving(deployment):
    key = obtain_key(deployment, deployment.balancer.url, "load@example.org")
    victim = deployment.replicas[-1]
    results: list[tuple[float, float, int | str]] = []  # start, end, status or error
    stop = threading.Event()
    kill: list[float] = []  # when SIGKILL was sent, and when the process was gone

    def load() -> None:
        deadline = time.monotonic() + 10.0
        while not stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                outcome: int | str = denoise(deployment.balancer.url, key)
            except (OSError, HTTPException) as exc:  # an answer cut short: IncompleteRead
                outcome = type(exc).__name__
            results.append((started, time.monotonic(), outcome))
            time.sleep(0.02)  # bounded: enough requests in flight, less CPU taken from the others

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        kill.append(time.monotonic())
        victim.kill()
        kill.append(time.monotonic())
        down = wait_until(
            lambda: deployment.balancer.states()[f"r{REPLICAS}"].startswith("DOWN") and time.monotonic(),
            5.0,
            "HAProxy to mark the killed replica down",
        )
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(35)
    signalled, gone = kill
    failed = [r for r in results if r[2] != 200]
    # Until the process is gone its kernel still accepts connections, which then break.
    in_flight = [r for r in failed if r[0] < gone and r[1] > signalled]
    after = [r for r in results if r[0] > gone]
    print(
        f"\nkill -9: {len(results)} requests through the balancer, {len(failed)} failed, "
        f"{len(in_flight)} of them in flight on the killed replica ({[r[2] for r in in_flight]}; "
        f"the process took {(gone - signalled) * 1000:.0f} ms to go); marked down after "
        f"{(down - signalled) * 1000:.0f} ms; {len(after)} requests after, {sum(r[2] == 200 for r in after)} answered 200"
    )
    assert len(after) > 10
    assert failed == in_flight, [(round(r[0] - signalled, 3), round(r[1] - signalled, 3), r[2]) for r in failed]
