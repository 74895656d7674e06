"""`hub serve --workers N`: a supervisor that runs N hub processes on one port and keeps them running.

Each worker is a whole hub (`hub serve --worker-id K`) listening with SO_REUSEPORT on the port the supervisor holds
(bound, never listening: the kernel spreads connections among the workers, and the port stays ours while one is
replaced). A worker reports ready with one JSON line on a pipe; one that dies is started again under the same id
(its data directory, so its spool is replayed) after a backoff. SIGTERM/SIGINT go to every worker as SIGTERM (each
shuts down gracefully, as one hub does), SIGHUP as SIGHUP (TLS reload). `/metrics` and `/healthz` on the configured
port merge the workers' own, which listen on loopback ports of their choosing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import attrs
import trio

from hub.config import HubConfig
from hub.edge import ServerTLS, bind_shared
from hub.ops._scrape import fetch, merge_health, merge_metrics
from hub.web import serve_asgi, web_app

__all__ = ["WorkerCommand", "Workers", "WorkersError", "run_workers", "supervise"]

log = logging.getLogger("hub.workers")

#: (worker id, port, ready fd) -> the command line of that worker.
WorkerCommand = Callable[[int, int, int], Sequence[str]]

#: The supervisor's lock in the data directory (the workers' directories are worker-0, worker-1, ... beside it).
LOCK_FILE = "workers.lock"
#: Longest wait for a worker to report ready (it opens its stores, Redis, its listeners).
START_TIMEOUT = 60.0
#: Restart backoff: the first wait, its ceiling, and how long a worker must have run for the next to be the first.
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0
#: Time the workers get to stop beyond twice server.shutdown_grace (their bounds on the last command points and on
#: the drain), covering their final registry save (at most 10 s).
STOP_MARGIN = 15.0


class WorkersError(Exception):
    """The workers could not start: the port could not be had, or a worker exited before it was first ready."""


@attrs.define(eq=False)
class _Worker:
    id: int
    process: trio.Process | None = None
    pid: int | None = None
    metrics_port: int | None = None  # its own /metrics, on loopback: known once it is ready
    restarts: int = 0
    returncode: int | None = None  # of its latest process


@attrs.define(eq=False)
class Workers:
    """The supervisor's view of its workers: reported through `task_status` once every one is ready."""

    port: int
    workers: list[_Worker]
    metrics_port: int | None = None
    stopping: bool = False
    _stop: trio.Event = attrs.field(factory=trio.Event)

    def pids(self) -> dict[int, int | None]:
        """The process id of each worker, by worker id (None while it is being replaced)."""
        return {w.id: w.pid for w in self.workers}

    def signal(self, signum: int) -> None:
        """Send `signum` to every running worker."""
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signum)

    def stop(self) -> None:
        """Stop every worker gracefully (SIGTERM), and restart none."""
        self.stopping = True
        self._stop.set()
        self.signal(signal.SIGTERM)

    # ------------------------------------------------------------------ one /metrics, one /healthz

    def _ports(self) -> dict[int, int | None]:
        return {w.id: w.metrics_port if w.pid is not None else None for w in list(self.workers)}

    def metrics_route(self) -> tuple[int, str, bytes]:
        """`GET /metrics`: every worker's figures, labelled `worker`, and the supervisor's."""
        texts: dict[int, str | None] = {}
        for worker, port in self._ports().items():
            answer = fetch(port, "/metrics") if port is not None else None
            texts[worker] = answer[1].decode() if answer is not None and answer[0] == 200 else None
        restarts = {w.id: w.restarts for w in self.workers}
        running = sum(1 for w in self.workers if w.pid is not None)
        body, content_type = merge_metrics(texts, restarts, running)
        return 200, content_type, body

    def health_route(self) -> tuple[int, str, bytes]:
        """`GET /healthz`: 200 if every worker is up and healthy, else 503; each worker's answer in the body."""
        return merge_health({w: fetch(p, "/healthz") if p is not None else None for w, p in self._ports().items()})

    # ------------------------------------------------------------------ running them

    async def _run_worker(
        self, worker: _Worker, command: WorkerCommand, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run worker `worker.id` until the supervisor stops; report once it first is ready."""
        backoff = BACKOFF_INITIAL
        first: trio.TaskStatus[None] | None = task_status
        while True:
            started_at = trio.current_time()
            returncode = await self._run_once(worker, command, first)
            first = None
            if self._stop.is_set():
                return
            ran = trio.current_time() - started_at
            backoff = BACKOFF_INITIAL if ran >= STABLE_AFTER else backoff
            kv = {"worker": worker.id, "returncode": returncode, "restart_in": backoff}
            log.error("worker died; restarting it", extra={"kv": kv})
            with trio.move_on_after(backoff):
                await self._stop.wait()
            if self._stop.is_set():
                return
            backoff = min(backoff * 2, BACKOFF_MAX)
            worker.restarts += 1

    async def _run_once(self, worker: _Worker, command: WorkerCommand, first: trio.TaskStatus[None] | None) -> int:
        """Start the worker, wait for its ready line, then for its end; its exit code. At the first start (`first`:
        reported once it is ready), a worker that does not come up raises `WorkersError`."""
        read_fd, write_fd = os.pipe()
        ready = trio.lowlevel.FdStream(read_fd)
        async with ready, trio.open_nursery() as nursery:
            try:
                process: trio.Process = await nursery.start(
                    partial(
                        trio.run_process,
                        list(command(worker.id, self.port, write_fd)),
                        check=False,
                        stdin=subprocess.PIPE,  # never written: its end tells the worker the supervisor is gone
                        pass_fds=(write_fd,),
                        deliver_cancel=_kill,
                    )
                )
            finally:
                os.close(write_fd)  # the worker holds the only write end: its exit ends our read
            worker.process = process
            if self.stopping:  # the signal went out before this process existed
                process.send_signal(signal.SIGTERM)
            report = await _read_ready(ready)
            if report is None and not self._stop.is_set():
                process.kill()  # if it is still there: it had START_TIMEOUT
                await process.wait()
                if first is not None:
                    raise WorkersError(f"worker {worker.id} exited with {process.returncode} before it was ready")
            elif report is not None:
                worker.pid = process.pid
                worker.metrics_port = report.get("metrics_port")
                kv = {"worker": worker.id, "pid": process.pid, "port": report.get("port")}
                log.info("worker ready", extra={"kv": kv})
                if self._stop.is_set():  # it may have been starting, and ignoring signals, when the stop went out
                    process.send_signal(signal.SIGTERM)
                if first is not None:
                    first.started()
            worker.returncode = await process.wait()
        worker.pid = worker.metrics_port = None
        worker.process = None
        return worker.returncode

    async def run(
        self,
        config: HubConfig,
        command: WorkerCommand,
        *,
        tls: ServerTLS | None = None,
        task_status: trio.TaskStatus[Workers] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start every worker and the merged `/metrics` (HTTPS with `tls`); report once all are ready; return once all
        have stopped (after `stop`, each within the deadline, or killed)."""
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as processes:
                for worker in self.workers:  # one after the other: each worker's start costs CPU the others need
                    await processes.start(self._run_worker, worker, command)
                m = config.metrics
                if m.http_enabled:
                    app = web_app(pages={"/metrics": self.metrics_route, "/healthz": self.health_route})
                    context = None if tls is None else tls.context
                    self.metrics_port = await nursery.start(
                        partial(serve_asgi, app, m.http_host, m.http_port, ssl_context=context)
                    )
                    log.info("metrics listening", extra={"kv": {"host": m.http_host, "port": self.metrics_port}})
                log.info("workers ready", extra={"kv": {"workers": len(self.workers), "port": self.port}})
                grace = 2 * config.server.shutdown_grace + STOP_MARGIN
                nursery.start_soon(self._kill_late, processes.cancel_scope, grace)
                task_status.started(self)
            nursery.cancel_scope.cancel()  # the metrics listener and the deadline
        log.info("workers stopped", extra={"kv": {"returncodes": self.returncodes()}})

    async def _kill_late(self, processes: trio.CancelScope, grace: float) -> None:
        await self._stop.wait()
        await trio.sleep(grace)
        log.error("workers did not stop in time: killing them", extra={"kv": {"pids": self.pids()}})
        processes.cancel()  # each running worker is killed (`_kill`)

    def returncodes(self) -> dict[int, int | None]:
        """Each worker's latest exit code, by worker id (None: never exited)."""
        return {w.id: w.returncode for w in self.workers}


async def _kill(process: trio.Process) -> None:
    process.kill()


async def _read_ready(stream: trio.lowlevel.FdStream) -> dict[str, int] | None:
    """The worker's ready report, or None if it closed the pipe (exited) without one or took too long."""
    data = b""
    with trio.move_on_after(START_TIMEOUT):
        while chunk := await stream.receive_some():
            data += chunk
    try:
        report = json.loads(data) if data.endswith(b"\n") else None
    except ValueError:
        report = None
    return report if isinstance(report, dict) else None


async def supervise(
    config: HubConfig,
    count: int,
    command: WorkerCommand,
    *,
    task_status: trio.TaskStatus[Workers] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `count` workers until SIGINT/SIGTERM (forwarded as SIGTERM; a second one kills them); forward SIGHUP."""
    with _data_dir_lock(config.storage.path):
        host, port = config.server.host, config.server.port
        try:
            held = await bind_shared(host, port)  # the port, ours until we exit
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise WorkersError(
                f"cannot listen on {host}:{port} for devices and operators: {reason}; "
                "choose another port with --port (0: any free port)"
            ) from None
        await _supervise(config, count, command, held, task_status)


@contextlib.contextmanager
def _data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Hold DATA_DIR/workers.lock: a second supervisor would share the port (SO_REUSEPORT lets it) and the spools."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkersError(f"another hub serve --workers runs on the data directory {data_dir} ({path})") from None
        yield


async def _supervise(
    config: HubConfig,
    count: int,
    command: WorkerCommand,
    held: list[trio.socket.SocketType],
    task_status: trio.TaskStatus[Workers],
) -> None:
    try:
        workers = Workers(held[0].getsockname()[1], [_Worker(k) for k in range(count)])
        tls = ServerTLS.from_config(config.tls)  # the machine's /metrics and /healthz: HTTPS like the workers' port
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:

                async def run(task_status: trio.TaskStatus[Workers]) -> None:
                    await workers.run(config, command, tls=tls, task_status=task_status)
                    nursery.cancel_scope.cancel()  # every worker has stopped: so does the signal loop

                await nursery.start(run)
                task_status.started(workers)
                async for signum in signals:
                    log.info("signal received", extra={"kv": {"signal": signal.Signals(signum).name}})
                    if signum == signal.SIGHUP:
                        workers.signal(signal.SIGHUP)
                        if tls is not None:
                            tls.reload()
                    elif workers.stopping:
                        log.warning("second signal: killing the workers")
                        nursery.cancel_scope.cancel()
                    else:
                        workers.stop()
    finally:
        for sock in held:
            sock.close()


def run_workers(config: HubConfig, count: int, command: WorkerCommand) -> int:
    """Entry point of `hub serve --workers N`; the exit code: 0 once every worker has stopped cleanly, else 1."""
    outcome: list[Workers] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            outcome.append(await nursery.start(supervise, config, count, command))

    try:
        trio.run(main)
    except (WorkersError, BaseExceptionGroup) as exc:
        error = _sole(exc)
        if error is None:
            raise
        print(f"hub: error: {error}", file=sys.stderr)
        return 1
    codes = outcome[0].returncodes().values() if outcome else ()
    return 0 if all(code == 0 for code in codes) else 1


def _sole(exc: BaseException) -> WorkersError | None:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, WorkersError) else None
