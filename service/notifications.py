"""PostgreSQL notifications to this process: each one means "forget what you cached".

Replicas share one database but each caches the keys it found active (``keys.ActiveKeys``). The
transaction that deactivates a key also issues ``NOTIFY`` (``Store.deactivate_keys``); this
listener hears it on commit and clears the cache, so every replica refuses the key at once
instead of after ``KEY_CACHE_SECONDS``. Notifications sent while the listener is disconnected
are lost: from the moment it knows its connection is gone until it has a new one, the replica
reads every key on every use; on every (re)connection it marks the whole cache for reading again
(the entries stay as the fallback for an outage). The TTL stays as the last resort, for a
connection that breaks without the listener noticing.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

import psycopg2
import psycopg2.extensions

from service import polling
from service.logs import first_line

log = logging.getLogger(__name__)

Connect = Callable[[], psycopg2.extensions.connection]


class Listener:
    """Calls ``on_notice`` for each batch of notifications that arrives on the connections
    ``connect`` opens (already listening), ``on_connect`` after each successful connection, and
    ``on_disconnect`` when one breaks or cannot be opened.

    The thread sleeps in ``poll`` on the connection and on a socket pair that ``close`` writes
    to, so it costs nothing while idle and stops at once. A connection that breaks (server
    restart, network) is opened again after a delay that doubles up to ``backoff_max_s``.
    """

    def __init__(
        self,
        connect: Connect,
        on_notice: Callable[[], None],
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[], None] = lambda: None,
        backoff_min_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        self._connect = connect
        self._on_notice = on_notice
        self._on_connect = on_connect or on_notice
        self._on_disconnect = on_disconnect
        self._backoff_min_s = backoff_min_s
        self._backoff_max_s = backoff_max_s
        self._delay_s = backoff_min_s
        self._stopping = threading.Event()
        self._stop_reader, self._stop_writer = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="db-notifications", daemon=True)

    def start(self) -> Listener:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._stop_writer.send(b"x")
        if self._thread.is_alive():
            self._thread.join(10.0)
        self._stop_reader.close()
        self._stop_writer.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._listen()
            except Exception as exc:  # psycopg2's errors, OSError, and whatever else: never die
                self._on_disconnect()
                # Once per outage: the database's own outage log says the rest.
                log.log(
                    logging.WARNING if self._delay_s == self._backoff_min_s else logging.DEBUG,
                    "Listening for key deactivations failed (%s); trying again until it works",
                    first_line(exc),
                )
                if self._wait_for_stop(self._delay_s):
                    return
                self._delay_s = min(self._backoff_max_s, self._delay_s * 2)

    def _listen(self) -> None:
        """Until ``close``: one connection's notifications; raises when the connection breaks."""
        conn = self._connect()
        try:
            if self._delay_s > self._backoff_min_s:
                log.info("Listening for key deactivations again")
            self._delay_s = self._backoff_min_s
            self._on_connect()  # whatever was announced while nobody listened is lost
            while True:
                readable = polling.ready([conn.fileno(), self._stop_reader.fileno()], polling.READ)
                if self._stop_reader.fileno() in readable:
                    return
                conn.poll()
                if conn.notifies:
                    conn.notifies.clear()
                    self._on_notice()
        finally:
            conn.close()

    def _wait_for_stop(self, timeout_s: float) -> bool:
        return bool(polling.ready([self._stop_reader.fileno()], polling.READ, timeout_s))
