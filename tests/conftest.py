"""The suite runs on two processes (pytest-xdist, ``-n 2 --dist loadfile`` in pytest.ini): the
machines have two cores, and many tests wait on processes, sockets and databases rather than
compute. Each test file stays on one process, so that its module fixtures (services, PostgreSQL
clusters, HAProxy) start once.
"""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One compute thread per process, set before torch loads: two processes of two spinning
    # OpenMP threads each on two cores made the training tests several times slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
