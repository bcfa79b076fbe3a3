"""The suite runs on three processes (pytest-xdist, ``-n 3 --dist loadfile`` in pytest.ini) on
machines of two cores: many slow tests wait on processes, sockets, timeouts and databases rather
than compute, and a third process overlaps those waits (docs/performance.md, "The test suite").
Each test file stays on one process, so that its module fixtures (services, PostgreSQL clusters,
HAProxy) start once.

The files that take longest are handed out first (``LONGEST_FIRST``, with
``--no-loadscope-reorder``), so that no process is left with a long file while the others have
finished; xdist's own order, by test count, started some of the longest last.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One compute thread per process, set before torch loads: two processes of two spinning
    # OpenMP threads each on two cores made the training tests several times slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The longest files, longest first (docs/performance.md, "The test suite"). A file not listed
# runs after these, in the order collected; the list only balances the processes.
LONGEST_FIRST = [
    "service/test_record.py",
    "service/test_supervisor.py",
    "service/test_end_to_end.py",
    "export/test_export.py",
    "service/test_connections.py",
    "export/test_training.py",
    "service/test_database_faults.py",
    "service/test_hardening.py",
    "export/test_evaluate.py",
    "service/test_contract.py",
    "service/test_slow_clients.py",
    "service/test_openapi_fuzz.py",
    "service/test_replicas.py",
    "service/test_container.py",
    "export/test_data.py",
    "service/test_workers.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {f"tests/{path}": n for n, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: order within a file kept
