"""The hub process: one nursery tree from `serve` down, and `run` with signal handling."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING

import attrs
import trio

from device_client.protocol import CloseCode
from hub.config import HubConfig
from hub.control import ControlServer
from hub.devices import DeviceServer
from hub.edge import Edge, ServerTLS
from hub.fleet import (
    JOBS_FILE,
    Broadcaster,
    CommandRecord,
    CommandService,
    CommandStore,
    DesiredAction,
    JobRunner,
    JobStore,
    Ledgers,
    Presence,
    RegistryStore,
    StoreUnavailable,
    TwinChange,
    TwinService,
    device_summary,
    open_registry_store,
)
from hub.gctune import collect_on_time, tune_gc
from hub.ingest import FileSink, InfluxV1Sink, InfluxV2Sink, Pipeline, PipelineConfig, Sink, Spool
from hub.ops import HubMetrics
from hub.stats import Stats
from hub.web import RestApi, openapi, serve_asgi, web_app

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from hub.cluster import Cluster

__all__ = [
    "HubHandle",
    "ListenError",
    "listen_error",
    "make_sink",
    "registry_path",
    "reload_tls",
    "run",
    "serve",
    "start_error",
]

log = logging.getLogger("hub")

#: Seconds between "hub status" log lines.
STATUS_EVERY = 10.0
#: Longest wait at shutdown for the last acked seqs to reach the registry.
FINAL_SAVE_TIMEOUT = 10.0


@attrs.define(eq=False)
class HubHandle:
    """What `serve` reports once it listens: the port, live figures, and a way to stop it."""

    port: int
    stats: Stats
    presence: Presence
    server: DeviceServer
    sink: Sink
    commands: CommandService
    registry: RegistryStore  # SQLite or Redis ([state] backend)
    ledgers: Ledgers
    broadcaster: Broadcaster
    control: ControlServer
    edge: Edge
    metrics_port: int | None  # the HTTP listener (/metrics, /healthz, /v1 REST, the console), if enabled
    tls: ServerTLS | None = None  # the listener's certificate (wss://), reloadable; None: plain ws://
    cluster: Cluster | None = None  # this hub's part in a cluster of hubs on Redis
    _stop: trio.Event = attrs.field(factory=trio.Event)

    def stop(self) -> None:
        """Begin a graceful shutdown: stop accepting, drain and flush, close sessions."""
        self._stop.set()


class ListenError(Exception):
    """A listener could not open its socket (port taken, address not here, no permission)."""

    def __init__(self, what: str, host: str, port: int, reason: str, remedy: str) -> None:
        super().__init__(f"cannot listen on {host}:{port} for {what}: {reason}; {remedy}")
        self.host = host
        self.port = port


@contextlib.contextmanager
def _listening(what: str, host: str, port: int, port_option: str, host_option: str) -> Iterator[None]:
    """Turn an OSError while a listener starts (however deep in exception groups) into a `ListenError`."""
    try:
        yield
    except* OSError as group:
        first = _leaves(group)[0]
        assert isinstance(first, OSError)
        reason = (first.strerror or str(first)).lower()
        if isinstance(first, socket.gaierror) or first.errno == errno.EADDRNOTAVAIL:
            remedy = f"choose an address of this machine with {host_option}"
        else:
            remedy = f"choose another port with {port_option} (0: any free port)"
        raise ListenError(what, host, port, reason, remedy) from None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def listen_error(exc: BaseException) -> ListenError | None:
    """The `ListenError` that `exc` is, or that is all it holds (through exception groups); else None."""
    leaves = _leaves(exc)
    first = leaves[0]
    if isinstance(first, ListenError) and all(isinstance(leaf, ListenError) for leaf in leaves):
        return first
    return None


def start_error(exc: BaseException) -> ListenError | StoreUnavailable | None:
    """What stopped the hub at start, when `exc` is (or only holds) a `ListenError` or an unreachable registry."""
    error = listen_error(exc)
    if error is not None:
        return error
    leaves = _leaves(exc)
    first = leaves[0]
    if isinstance(first, StoreUnavailable) and all(isinstance(leaf, StoreUnavailable) for leaf in leaves):
        return first
    return None


def registry_path(config: HubConfig) -> str:
    """Where the device registry lives."""
    return str(config.storage.path / "registry.sqlite3")


def make_sink(config: HubConfig) -> Sink:
    """The configured InfluxDB v2-API sink, or the embedded line-protocol file sink."""
    influx = config.influx
    if influx.url and influx.api == "v1":
        return InfluxV1Sink(
            influx.url,
            influx.database,
            retention_policy=influx.retention_policy,
            username=influx.username,
            password=influx.password,
            timeout_s=influx.timeout,
            gzip=influx.gzip,
        )
    if influx.url:
        return InfluxV2Sink(
            influx.url, influx.token, influx.org, influx.bucket, timeout_s=influx.timeout, gzip=influx.gzip
        )
    storage = config.storage
    return FileSink(
        storage.path / "lines",
        max_bytes=storage.file_max_bytes,
        max_age_s=storage.file_max_age,
        database=influx.database,  # named in each file's header, for InfluxDB 1.x's `influx -import`
    )


def _pipeline_config(config: HubConfig) -> PipelineConfig:
    b = config.batch
    return PipelineConfig(
        max_lines=b.max_lines,
        max_delay=b.max_delay,
        queue_items=b.queue_items,
        write_attempts=b.write_attempts,
        flush_when_idle=b.flush_when_idle,
        early_flush_interval=b.early_flush_interval,
        backoff_initial=b.backoff_initial,
        backoff_max=b.backoff_max,
        spool_after=b.spool_after,
        probe_interval=b.probe_interval,
    )


async def _log_status(handle: HubHandle) -> None:
    while True:
        await trio.sleep(STATUS_EVERY)
        s = handle.stats
        log.info(
            "hub status",
            extra={
                "kv": {
                    "connections": s.connections,
                    "online": handle.presence.online_count(),
                    "points_in": s.points_in,
                    "written": s.points_written,
                    "spooled": s.points_spooled,
                    "replayed": s.points_replayed,
                    "dropped": s.points_dropped,
                    "spool_bytes": s.spool_bytes,
                }
            },
        )


def _last_seen(ledgers: Ledgers) -> Callable[[str], float | None]:
    def last_seen(name: str) -> float | None:
        ledger = ledgers.find(name)
        return None if ledger is None else ledger.last_seen

    return last_seen


async def serve(
    config: HubConfig,
    *,
    sink: Sink | None = None,
    worker: int | None = None,
    task_status: trio.TaskStatus[HubHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a hub until `HubHandle.stop()`; report the handle once devices can connect.

    `worker`: this hub is worker K of `hub serve --workers N` (its port shared, its points tagged `hub=<host>-K`).
    """
    config.storage.path.mkdir(parents=True, exist_ok=True)
    tls = ServerTLS.from_config(config.tls)  # first: bad TLS files stop the hub before it opens anything
    async with open_registry_store(config.state, config.storage.path) as registry:  # closed last
        await _serve(config, registry, tls, sink, worker, task_status)


async def _serve(
    config: HubConfig,
    registry: RegistryStore,
    tls: ServerTLS | None,
    sink: Sink | None,
    worker: int | None,
    task_status: trio.TaskStatus[HubHandle],
) -> None:
    sink = sink or make_sink(config)
    command_store = CommandStore(config.storage.path / "commands.sqlite3")
    job_store = JobStore(config.storage.path / JOBS_FILE)  # per hub, as commands are (docs/scaling.md)
    spool = Spool(config.storage.path / "spool", config.storage.spool_max_bytes)
    stats = Stats()
    ledgers = Ledgers(registry)
    try:
        broadcaster = Broadcaster()

        async def presence_changed(name: str) -> None:
            if not broadcaster.has_presence_subscribers():
                return  # nobody watches: no registry read per connect
            status = presence.status.get(name)  # before the read: the event reports this change
            try:
                record = await registry.get(name)
            except StoreUnavailable as exc:  # the event still goes out, without the registry's `revoked`
                log.warning("presence event without registry record", extra={"kv": {"device": name, "error": str(exc)}})
                record = None
            broadcaster.presence(device_summary(name, record, status, ledgers.find(name)))

        async def device_exists(name: str) -> bool:
            return await registry.get(name) is not None

        pipeline = Pipeline(sink, spool, _pipeline_config(config), stats, ledgers.on_durable_callback())
        presence = Presence(
            pipeline.submit,
            late_factor=config.presence.late_factor,
            late_grace=config.presence.late_grace,
            on_change=presence_changed,
        )
        cluster: Cluster | None = None

        def command_changed(rec: CommandRecord) -> None:
            if cluster is None and not broadcaster.has_command_subscribers():
                return  # nobody to tell: no record dict built (four a command)
            record = rec.as_dict()
            broadcaster.command(record)
            if cluster is not None:
                cluster.command_changed(record)

        commands = CommandService(
            command_store,
            config.commands,
            device_exists=device_exists,
            write=pipeline.submit,
            on_change=command_changed,
        )

        def twin_changed(change: TwinChange, local: bool) -> None:
            if broadcaster.has_twin_subscribers():
                broadcaster.twin(change.record.to_dict(change.device))
            if local and cluster is not None:
                cluster.twin_changed(change)

        twins = TwinService(registry, on_change=twin_changed)
        server = DeviceServer(config, registry, ledgers, pipeline, presence, stats, commands, broadcaster, twins)
        control = ControlServer(
            config,
            registry,
            presence,
            ledgers,
            commands,
            broadcaster,
            stats,
            pipeline,
            revoke_device=server.revoke,
            twins=twins,
        )
        cluster = _cluster(config, registry, presence, commands, broadcaster, ledgers, server, control, twins)
        jobs = JobRunner(
            job_store,
            commands,
            devices=registry.list,
            on_change=broadcaster.job,
            desired=lambda spec, operator: DesiredAction(twins, spec, operator),
        )
        control.jobs = jobs
        edge = Edge(config.server, [server, control], stats)
        hub_id = None if worker is None else f"{socket.gethostname()}-{worker}"
        metrics = HubMetrics(stats, presence, commands, pipeline, sink, started_at=time.time(), hub_id=hub_id)
        if cluster is not None:
            metrics.cluster_figures = cluster.figures
        ssl_context = tls.context if tls is not None else None
        # A worker's HTTP port is the loopback one its supervisor scrapes: plain; the supervisor's own serves TLS.
        http_context = ssl_context if worker is None else None
        ws_port: int | None = None  # known once the edge listens; the console's config.json tells browsers
        async with trio.open_nursery() as nursery:
            drained = trio.Event()

            async def run_pipeline(task_status: trio.TaskStatus[None]) -> None:
                await pipeline.run(task_status=task_status)
                drained.set()

            await nursery.start(run_pipeline)
            background = trio.CancelScope()

            async def run_background(task_status: trio.TaskStatus[int | None]) -> None:
                with background:
                    async with trio.open_nursery() as tasks:
                        await tasks.start(collect_on_time)  # young collections of 0.1 s of survivors, not seconds
                        if cluster is not None:
                            await tasks.start(cluster.run)
                        await tasks.start(commands.run)
                        await tasks.start(jobs.run)
                        await tasks.start(server.run)
                        await tasks.start(control.run)
                        await tasks.start(partial(metrics.write_loop, pipeline.submit, config.metrics.interval))
                        if config.metrics.http_enabled:
                            m = config.metrics
                            app = _web_app(config, metrics, control, tls, lambda: ws_port)
                            where = ("HTTP (/metrics, /healthz, /v1, the console)", m.http_host, m.http_port)
                            with _listening(*where, "--metrics-port", "--metrics-host"):
                                http_port = await tasks.start(
                                    partial(serve_asgi, app, m.http_host, m.http_port, ssl_context=http_context)
                                )
                            control.console_port = http_port
                            kv = {"host": m.http_host, "port": http_port, "tls": http_context is not None}
                            log.info("metrics listening", extra={"kv": kv})  # and /v1, the console
                        else:
                            http_port = None
                        await tasks.start(partial(presence.watch_late, _last_seen(ledgers)))
                        await tasks.start(ledgers.save_loop)
                        await tasks.start(ledgers.ack_loop)
                        task_status.started(http_port)

            metrics_port = await nursery.start(run_background)
            cfg = config.server
            with _listening("devices and operators", cfg.host, cfg.port, "--port", "--host"):
                port = await nursery.start(partial(edge.listen, ssl_context=ssl_context, reuse_port=worker is not None))
            ws_port = port
            handle = HubHandle(
                port,
                stats,
                presence,
                server,
                sink,
                commands,
                registry,
                ledgers,
                broadcaster,
                control,
                edge,
                metrics_port,
                tls=tls,
                cluster=cluster,
            )
            nursery.start_soon(_log_status, handle)
            task_status.started(handle)

            await handle._stop.wait()
            log.info("shutting down: no new connections, draining the pipeline")
            edge.stop_accepting()
            server.stop_reading()
            async with trio.open_nursery() as offline:  # in a cluster each is a claim in Redis: batched, not one by one
                for session in list(server.sessions.values()):
                    offline.start_soon(presence.offline, session.name, session.epoch, "hub_shutdown")
            background.cancel()
            presence.closed = True
            with trio.move_on_after(config.server.shutdown_grace):
                await commands.flush_points()  # transition points still buffered go ahead of the drain
            commands.close_points()
            pipeline.close_input()
            with trio.move_on_after(config.server.shutdown_grace) as grace:
                await drained.wait()
            if grace.cancelled_caught:
                log.error("pipeline did not drain in time; unacked batches will be resent by devices")
            async with trio.open_nursery() as closing:
                closing.start_soon(server.close_all, CloseCode.GOING_AWAY, "hub shutting down")
                closing.start_soon(control.close_all, CloseCode.GOING_AWAY, "hub shutting down")
            if cluster is not None:
                with trio.move_on_after(FINAL_SAVE_TIMEOUT):
                    await cluster.leave()
            nursery.cancel_scope.cancel()
        log.info("hub stopped", extra={"kv": {"written": stats.points_written, "spooled": stats.points_spooled}})
    finally:
        try:
            # Acks sent since the last periodic save (durable marks only: safe even when cancelled), bounded.
            with trio.CancelScope(shield=True), trio.move_on_after(FINAL_SAVE_TIMEOUT) as saving:
                await ledgers.save()
            if saving.cancelled_caught:
                log.error("acked seqs not saved in time; devices resend what the registry does not know")
        finally:
            spool.close()
            sink.close()
            command_store.close()
            job_store.close()


def _web_app(
    config: HubConfig,
    metrics: HubMetrics,
    control: ControlServer,
    tls: ServerTLS | None,
    ws_port: Callable[[], int | None],
) -> Starlette:
    """The HTTP port's app: /metrics, /healthz, the REST API over the control channel's operations, the console."""
    api = RestApi(control, ws_port=ws_port, tls=tls is not None, default_host=config.server.host, openapi=openapi)
    return web_app(pages=metrics.routes(), api=api, allowed_origins=config.control.allowed_origins)


def _cluster(
    config: HubConfig,
    registry: RegistryStore,
    presence: Presence,
    commands: CommandService,
    broadcaster: Broadcaster,
    ledgers: Ledgers,
    server: DeviceServer,
    control: ControlServer,
    twins: TwinService,
) -> Cluster | None:
    """This hub's part in a cluster, when its state is in Redis (shared with other hubs); else None."""
    client = getattr(registry, "client", None)
    if config.state.backend != "redis" or client is None:
        return None
    from hub.cluster import Bus, Cluster  # coredis is needed only for this backend

    hub_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
    cluster = Cluster(
        Bus(client, config.state.prefix, hub_id, hub_ttl=config.state.hub_ttl),
        presence,
        commands,
        broadcaster,
        ledgers,
        session_epoch=server.session_epoch,
        close_superseded=server.superseded,
        revoke_device=server.revoke,
        revoke_operator=control.revoke_operator,
        twins=twins,
    )
    control.cluster = cluster
    log.info("in a cluster of hubs", extra={"kv": {"hub_id": hub_id}})
    return cluster


def reload_tls(handle: HubHandle) -> bool:
    """SIGHUP: load the TLS certificate and key again for new connections; True if they were reloaded."""
    if handle.tls is None:
        log.info("nothing to reload: TLS is not configured")
        return False
    return handle.tls.reload()


async def serve_until_signal(
    config: HubConfig, on_ready: Callable[[HubHandle], None] | None = None, *, worker: int | None = None
) -> None:
    """`serve` until SIGINT or SIGTERM, then shut down gracefully (a second signal aborts); SIGHUP reloads TLS.

    A `worker` leaves SIGINT to its supervisor (which sends SIGTERM), ignores a second SIGTERM, and stops as
    gracefully when its standard input ends: the supervisor is gone.
    """
    stop_signals = (signal.SIGTERM,) if worker is not None else (signal.SIGINT, signal.SIGTERM)
    async with trio.open_nursery() as nursery:
        # Caught from before the listener opens (a SIGHUP right after startup must not kill the hub) until the
        # first SIGINT/SIGTERM; the handlers are then restored, so a second one aborts the graceful shutdown.
        with trio.open_signal_receiver(*stop_signals, signal.SIGHUP) as signals:
            handle: HubHandle = await nursery.start(partial(serve, config, worker=worker))
            if on_ready is not None:
                on_ready(handle)
            async with trio.open_nursery() as waiting:
                if worker is not None:
                    waiting.start_soon(_stop_without_supervisor, handle, waiting.cancel_scope)
                async for signum in signals:
                    log.info("signal received", extra={"kv": {"signal": signal.Signals(signum).name}})
                    if signum == signal.SIGHUP:
                        reload_tls(handle)
                        continue
                    handle.stop()
                    break
                waiting.cancel_scope.cancel()


async def _stop_without_supervisor(handle: HubHandle, waiting: trio.CancelScope) -> None:
    """A worker's stdin is a pipe from its supervisor: its end means the supervisor died. Stop gracefully."""
    stdin = trio.lowlevel.FdStream(os.dup(0))
    async with stdin:
        while await stdin.receive_some():
            pass  # the supervisor sends nothing; anything it did would be ignored
    log.warning("the supervisor is gone: shutting down")
    handle.stop()
    waiting.cancel()


def _report_ready(fd: int, worker: int | None, handle: HubHandle) -> None:
    report = {"worker": worker, "pid": os.getpid(), "port": handle.port, "metrics_port": handle.metrics_port}
    with open(fd, "w") as ready:
        ready.write(json.dumps(report) + "\n")


def run(config: HubConfig, *, worker: int | None = None, ready_fd: int | None = None) -> int:
    """Entry point of `hub serve`: run until a signal; the exit code (1: a listener or Redis could not be had).

    As worker K of `hub serve --workers N` (`worker`), the hub reports that it is ready by writing one JSON line
    (`worker`, `pid`, `port`, `metrics_port`) to `ready_fd` and closing it.
    """
    tune_gc()
    if worker is not None:
        # Ignored outside the signal receiver: a terminal's Ctrl-C, or systemd's SIGTERM to the whole cgroup, reaches
        # every worker as well as the supervisor, which passes SIGTERM on; a second one must not abort the graceful
        # shutdown (the supervisor kills a worker that overstays). A SIGHUP while starting loads nothing new.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
    on_ready = None if ready_fd is None else partial(_report_ready, ready_fd, worker)
    try:
        trio.run(partial(serve_until_signal, config, on_ready, worker=worker))
    except (ListenError, StoreUnavailable, BaseExceptionGroup) as exc:
        error = start_error(exc)
        if error is None:
            raise
        print(f"hub: error: {error}", file=sys.stderr)
        return 1
    return 0
