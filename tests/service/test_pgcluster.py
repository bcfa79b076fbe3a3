"""The fault-test cluster itself: it answers, stops, freezes and comes back."""

from __future__ import annotations

import psycopg2
import pytest


def query(url: str, timeout_s: int = 2) -> int:
    with psycopg2.connect(url, connect_timeout=timeout_s) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        return cur.fetchone()[0]


def test_cluster_stops_freezes_and_restarts(pg_cluster):
    assert query(pg_cluster.url) == 1
    pg_cluster.freeze()
    with pytest.raises(psycopg2.OperationalError):
        query(pg_cluster.url, timeout_s=1)  # accepted by the kernel, never answered
    pg_cluster.thaw()
    assert query(pg_cluster.url) == 1
    pg_cluster.stop()
    with pytest.raises(psycopg2.OperationalError):
        query(pg_cluster.url)
    pg_cluster.start()
    assert query(pg_cluster.url) == 1
