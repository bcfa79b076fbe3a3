"""``WEB_WORKERS`` processes serving one listening socket, under a supervising parent.

One Python process spends its CPU per request in waitress, Falcon and JSON under one GIL; several
processes use every core for it. The parent binds the socket and starts each worker as a fresh
interpreter (``python -m service.workers INTERFACE FD READY_FD OCCUPANCY_FD SLOT SUPERVISOR``)
that inherits it: the worker loads its own model (nothing of onnxruntime crosses a fork) and
serves with waitress, the kernel handing each connection to whichever worker accepts it first.
Each worker also gets a slot of the occupancy file (``service.occupancy``), where the workers
tell each other whether they are running the model, that a key was deactivated, and that they
are alive (the heartbeat), and where the supervisor tells them to stop; a replacement takes the slot of the worker
it replaces. A worker whose supervisor has gone (killed with -9: nothing would replace the
workers, and they would keep the port from a new supervisor) drains and exits
(``connections.Server``).

The parent checks what it can before any worker starts (configuration, model against its
manifest, database: ``python -m service.startup``, in a process of its own), so those failures
still print one sentence and exit 1. A worker that dies before it is ready on the first start
stops the service the same way; one that dies later is started again, after a delay that
doubles while workers keep failing young (so a worker that cannot start does not spin; one that
drained and exited 0 is replaced after the shortest delay). A serving worker whose loop shows no
sign of life for ``WORKER_TIMEOUT_SECONDS`` (``occupancy`` heartbeats: frozen, or hung) is killed,
and so replaced, as is one not ready ``WORKER_START_TIMEOUT_SECONDS`` after its start. SIGTERM, SIGHUP or Ctrl-C: the
parent marks the service as stopping in the occupancy file and sends SIGTERM to every worker;
each drains as a single process does, the first closing the shared socket's door, and the
parent exits 0 when they all have.

Metrics: the parent gives the workers a fresh ``PROMETHEUS_MULTIPROC_DIR`` in ``/dev/shm`` where it
can (``files.memory_root``; removed at exit, or by the next start after a kill:
``files.scratch_folder``), marks dead workers there, and serves
``METRICS_PORT`` itself when one is set.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from service.config import Config
from service.files import memory_root, remade_folder, scratch_folder
from service.metrics import MULTIPROC_ENV, MetricsPort, merged_registry
from service.occupancy import Occupancy, announce_stopping, clear_slot, create_file, last_beat
from service.process import cannot_listen, configured, refuse, stop_signals

log = logging.getLogger("service.workers")

# The supervisor starts each worker from the code on disk. Bump this when what passes between
# them changes (the arguments, the occupancy file's layout): a worker started by a supervisor of
# another version (the code replaced under a running service) then says so and exits, instead of
# misreading what it was given.
INTERFACE = "3"
POLL_S = 0.2
RESTART_DELAY_S = (0.5, 30.0)  # first and longest delay before a dead worker is started again
YOUNG_S = 30.0  # a worker that dies younger than this doubles the next delay
# How long workers may take to stop after SIGTERM beyond their drain (SHUTDOWN_GRACE_SECONDS):
# closing the runtime (the last writes, the mail under way, the model) before they are killed.
CLOSE_S = 5.0
# A supervisor loop that comes round this late (it sleeps POLL_S) was paused with the machine.
PAUSED_S = 2.0


@dataclass
class _Worker:
    process: subprocess.Popen
    ready_fd: int
    slot: int
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    ready_since: float = 0.0  # when the supervisor saw it ready (time.monotonic)
    killed: bool = False  # by the supervisor, as hung

    def late(self, now: float, start_s: float) -> bool:
        """Not ready ``start_s`` after its start (``WORKER_START_TIMEOUT_SECONDS``; 0: never)."""
        return bool(start_s) and now - self.started > start_s and not self.poll_ready()

    def poll_ready(self) -> bool:
        if not self.ready:
            with suppress(BlockingIOError):
                self.ready = os.read(self.ready_fd, 1) == b"1"
            if self.ready:
                self.ready_since = time.monotonic()
        return self.ready

    def close(self) -> None:
        os.close(self.ready_fd)


class Supervisor:
    """Starts the workers, keeps their number up, and stops them on SIGTERM or SIGINT."""

    def __init__(
        self, config: Config, listener: socket.socket, env: dict[str, str], occupancy_fd: int, lock_fd: int | None
    ) -> None:
        self._config = config
        self._listener = listener
        self._env = env
        self._occupancy_fd = occupancy_fd
        self._lock_fd = lock_fd  # held by the workers too: the metrics folder is theirs while they run
        self._workers: list[_Worker] = []
        self._stopping = False
        self._delay_s = RESTART_DELAY_S[0]
        self._restart_at: list[tuple[float, int]] = []  # when, and the slot of the worker that died
        self._last_check = time.monotonic()  # of hung workers (_kill_hung)
        self._folder_lost = False  # the metrics folder was removed, and could not be made again

    def run(self) -> int:
        for signum in (signal.SIGINT, *stop_signals()):
            signal.signal(signum, self._stop)
        try:
            for slot in range(self._config.web_workers):
                self._workers.append(self._spawn(slot))
        except OSError as exc:  # out of processes or memory: a limit of the container
            problem = f"cannot start worker process {len(self._workers) + 1} of {self._config.web_workers} ({exc})."
        else:
            problem = self._first_start_failure()
        if problem:
            self._stop()
            self._reap_all()
            return refuse(problem)
        if not self._stopping:
            log.info(
                "Serving on http://%s:%s with %d workers of %d threads",
                self._config.host,
                self._listener.getsockname()[1],
                len(self._workers),
                self._config.web_threads,
            )
        while not self._stopping:
            self._kill_hung()
            self._keep_metrics_folder()  # before a replacement starts and counts there
            self._replace_dead()
            time.sleep(POLL_S)
        return self._reap_all()

    def _spawn(self, slot: int) -> _Worker:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        fds = (self._listener.fileno(), write_fd, self._occupancy_fd)
        held = () if self._lock_fd is None else (self._lock_fd,)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "service.workers", INTERFACE, *map(str, fds), str(slot), str(os.getpid())],
                pass_fds=fds + held,
                env=self._env,
            )
        except OSError:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return _Worker(process, read_fd, slot)

    def _first_start_failure(self) -> str | None:
        """Wait until every worker serves; what went wrong if one exited before it did. (Its
        own sentence, such as a database refusal, is already on stderr; a kill left none.)"""
        start_s = self._config.worker_start_timeout_s
        while not self._stopping:
            failed = next((w for w in self._workers if w.process.poll() is not None and not w.poll_ready()), None)
            if failed is not None:
                return f"worker {failed.process.pid} exited with {failed.process.returncode} before it was ready."
            now = time.monotonic()
            stuck = next((w for w in self._workers if w.late(now, start_s)), None)
            if stuck is not None:
                stuck.process.kill()
                return f"worker {stuck.process.pid} was not ready {start_s:g} s after its start (frozen or hung)."
            if all(w.poll_ready() for w in self._workers):
                return None
            time.sleep(POLL_S / 4)
        return None

    def _kill_hung(self) -> None:
        """Kill a serving worker whose loop has shown no sign of life for WORKER_TIMEOUT_SECONDS:
        frozen (SIGSTOP) or hung, it holds its connections and serves none of them; killed, its
        clients' connections fail at once and ``_replace_dead`` starts another. So is a starting
        worker not ready WORKER_START_TIMEOUT_SECONDS after its start: one stuck on its way (a
        name lookup that never ends) was a worker less, for good, and said nothing."""
        timeout_s, start_s = self._config.worker_timeout_s, self._config.worker_start_timeout_s
        if not (timeout_s or start_s):
            return
        now, last = time.monotonic(), self._last_check
        self._last_check = now
        if now - last > PAUSED_S:  # the whole machine stood still (docker pause, a VM suspended):
            for worker in self._workers:  # its silence, or its start, counts from now
                worker.ready_since, worker.started = (now, worker.started) if worker.ready else (0.0, now)
            return
        for worker in self._workers:
            if worker.killed or worker.process.poll() is not None:
                continue
            if worker.late(now, start_s):
                why = f"is not ready {start_s:g} s after its start"
            elif (
                timeout_s
                and worker.poll_ready()
                and now - max(worker.ready_since, last_beat(self._occupancy_fd, worker.slot)) > timeout_s
            ):
                why = f"has shown no sign of life for over {timeout_s:g} s"
            else:
                continue
            log.error("Worker %d %s (frozen or hung); killing it", worker.process.pid, why)
            worker.process.kill()
            worker.killed = True

    def _replace_dead(self) -> None:
        now = time.monotonic()
        for worker in [w for w in self._workers if w.process.poll() is not None]:
            self._workers.remove(worker)
            worker.close()
            self._forget(worker.process.pid)
            clear_slot(self._occupancy_fd, worker.slot)  # its runs died with it
            # A worker that crashed young doubles the delay; one that drained and exited 0 (sent
            # SIGTERM on its own) is simply replaced.
            young = now - worker.started < YOUNG_S and worker.process.returncode != 0
            self._delay_s = self._longer_delay() if young else RESTART_DELAY_S[0]
            serving = any(w.process.poll() is None and w.poll_ready() for w in self._workers)
            log.log(
                logging.WARNING if serving else logging.ERROR,
                "Worker %d exited with %s; starting another in %.1f s%s",
                worker.process.pid,
                worker.process.returncode,
                self._delay_s,
                "" if serving else " (no worker serves meanwhile: connections wait in the socket)",
            )
            self._restart_at.append((now + self._delay_s, worker.slot))
        for due in [d for d in self._restart_at if d[0] <= now]:
            self._restart_at.remove(due)
            try:
                self._workers.append(self._spawn(due[1]))
            except OSError as exc:  # out of processes or memory for now: try again, later each time
                self._delay_s = self._longer_delay()
                log.error("Cannot start a worker (%s); trying again in %.1f s", exc, self._delay_s)
                self._restart_at.append((now + self._delay_s, due[1]))

    def _keep_metrics_folder(self) -> None:
        """Makes the metrics folder again if it was removed (systemd-logind's ``RemoveIPC``
        empties ``/dev/shm`` when the service's user logs out): scrapes answer again, and workers
        started from then on count there. The running workers' values already counted are lost,
        and most of what they count until they are restarted (their open files are gone)."""
        folder = self._env.get(MULTIPROC_ENV)
        if folder is None or os.path.isdir(folder):
            return
        try:
            lock_fd = remade_folder(Path(folder))
        except OSError as exc:  # the name taken meanwhile, or no room
            if not self._folder_lost:
                log.error("The metrics folder %s was removed and cannot be made again (%s)", folder, exc)
            self._folder_lost = True
            return
        # The old descriptor stays open: scratch_folder closes it at exit, and it locks nothing now.
        self._lock_fd, self._folder_lost = lock_fd, False
        log.error(
            "The metrics folder %s was removed: made again. The counts start afresh, and the running "
            "workers' count fully again once they are restarted (restart the service)",
            folder,
        )

    def _longer_delay(self) -> float:
        return min(RESTART_DELAY_S[1], self._delay_s * 2)

    def _forget(self, pid: int) -> None:
        if MULTIPROC_ENV in self._env:
            mark_process_dead(pid, self._env[MULTIPROC_ENV])

    def _stop(self, signum: int | None = None, frame: object = None) -> None:
        """Tell the workers the service stops, then SIGTERM them: the first to drain accepts the
        connections queued in the socket and shuts it (``connections.Server.close_door``). With
        no worker serving, nobody would: the socket is shut here, new connections refused."""
        self._stopping = True
        announce_stopping(self._occupancy_fd)
        serving = False
        for worker in self._workers:
            if worker.process.poll() is None:
                serving = worker.poll_ready() or serving
                worker.process.send_signal(signal.SIGTERM)
        if not serving:
            self._shut_listener()

    def _shut_listener(self) -> None:
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RD)

    def _reap_all(self) -> int:
        """Wait for every worker to drain (killing those that take too long); 0 if all stopped cleanly."""
        allowed_s = self._config.shutdown_grace_s + CLOSE_S
        deadline = time.monotonic() + allowed_s
        code = 0
        for worker in self._workers:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("Worker %d did not stop within %.0f s; killing it", worker.process.pid, allowed_s)
                worker.process.kill()
                worker.process.wait()
            # Ended by SIGTERM's default action: it was still starting, before it could serve.
            code = code or worker.process.returncode not in (0, -signal.SIGTERM)
            worker.close()
            self._forget(worker.process.pid)
        self._shut_listener()  # the workers have (unless none was serving, or one was killed)
        log.info("Stopped")
        return int(code)


def supervise(config: Config) -> int:
    """The parent: check what can be checked, bind, run the workers; the exit code of the service.

    The checks run in a process of their own (``service.startup``), which prints the sentence of
    a failed one: the supervisor then never holds the database driver and the rest, and stays
    small beside the workers (docs/performance.md, "Memory")."""
    if subprocess.run([sys.executable, "-m", "service.startup"], check=False).returncode:
        return 1
    try:
        listener = socket.create_server((config.host, config.port), backlog=2048)
    except OSError as exc:
        return cannot_listen(config.host, config.port, exc)
    with ExitStack() as stack:
        stack.callback(listener.close)
        occupancy = stack.enter_context(create_file(config.web_workers))
        env = dict(os.environ)
        lock_fd = None
        if config.metrics:
            # Not the "heartify-metrics-" of earlier versions, whose folders were not locked: a
            # start must not take a live one of theirs for abandoned.
            path, lock_fd = stack.enter_context(scratch_folder("heartify-prometheus-", memory_root()))
            folder = env[MULTIPROC_ENV] = str(path)
            if config.metrics_port:
                metrics_port = MetricsPort(config.host, config.metrics_port, merged_registry(folder))
                stack.callback(metrics_port.close)
                try:
                    metrics_port.start()
                except OSError as exc:
                    return cannot_listen(config.host, config.metrics_port, exc)
        return Supervisor(config, listener, env, occupancy.fileno(), lock_fd).run()


def worker(listen_fd: int, ready_fd: int, occupancy_fd: int, slot: int, supervisor: int) -> int:
    """A worker: serve on the inherited socket, in ``slot`` of the occupancy file, while the
    process ``supervisor`` is its parent; write to ``ready_fd`` once serving."""
    # Ctrl-C and a closed terminal reach the whole group: the parent stops the workers in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = configured()
    if config is None:
        return 1
    listener = socket.socket(fileno=listen_fd)

    def ready() -> None:
        with suppress(BrokenPipeError):  # the supervisor is gone: the server notices it and drains
            os.write(ready_fd, b"1")
        os.close(ready_fd)

    # Here, not at the top: the supervisor never loads onnxruntime, nor the web stack.
    from service.connections import Parent
    from service.server import serve

    occupancy = Occupancy(occupancy_fd, slot)
    return serve(config, listener, ready, occupancy, Parent(supervisor, occupancy.stopping, occupancy.beat))


def main(argv: list[str]) -> int:
    if len(argv) != 6 or argv[0] != INTERFACE:
        return refuse(
            "this worker's code is not its supervisor's (the service was replaced on disk while it ran): restart the service."
        )
    return worker(*map(int, argv[1:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
