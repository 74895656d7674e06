"""The hub's own figures: snapshots, `hub*` line-protocol points, Prometheus exposition and the health answer."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, NotRequired, TypedDict

import trio

from device_client.protocol import ErrorCode, FieldValue
from hub.edge import PARSE_FAILURE_REASONS
from hub.fleet import COMMAND_STATES, SEEN_STATES
from hub.ingest import Sink, line
from hub.stats import Stats
from hub.web import Page

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from hub.fleet import CommandService, Presence
    from hub.ingest import Pipeline

__all__ = ["COMMANDS_MEASUREMENT", "ERRORS_MEASUREMENT", "HUB_MEASUREMENT", "HubMetrics", "health"]

log = logging.getLogger("hub.metrics")

#: Measurements of the hub's own points: figures, errors by `code`, commands by `state` (all tagged `host`).
HUB_MEASUREMENT = "hub"
ERRORS_MEASUREMENT = "hub_errors"
COMMANDS_MEASUREMENT = "hub_commands"

# Fields of the `hub` point, in order. Their types never change (InfluxDB fixes a field's type on first write):
# counts and gauges are integers, rates, durations and averages floats.
_INT_FIELDS: Final = (
    "connections",
    "connects",
    "handshakes_refused",
    "handshakes_busy",
    "handshakes_unanswered",
    "devices_online",
    "devices_late",
    "devices_offline",
    "messages_in",
    "compressed_in",
    "compressed_bytes_in",
    "points_in",
    "points_written",
    "points_spooled",
    "points_replayed",
    "points_dropped",
    "batches_written",
    "batch_lines_max",
    "spool_bytes",
    "spool_records",
    "spool_full",
    "queued",
    "write_errors",
    "write_retries",
    "acks_sent",
    "resends",
    "throttled",
    "window_waits",
    "requests_rate_limited",
    "sink_up",
)
_FLOAT_FIELDS: Final = (
    "uptime_s",
    "points_in_per_s",
    "points_written_per_s",
    "write_ms_last",
    "write_ms_avg",
    "write_ms_max",
    "batch_lines_avg",
)
#: Every protocol error code, reported (with 0) even before it occurs, so graphs have no gaps.
#: (With the reasons of the closes for unparsable frames, which count as errors too.)
_ERROR_CODES = tuple(
    sorted(
        {v for k, v in vars(ErrorCode).items() if k.isupper() and isinstance(v, str)}
        | set(PARSE_FAILURE_REASONS.values())
    )
)


class Snapshot(TypedDict):
    """The hub's figures: `HubMetrics.current()`, and from `snapshot()` also those of the interval (NotRequired)."""

    uptime_s: float
    connections: int
    connects: int
    handshakes_refused: int
    handshakes_busy: int
    handshakes_unanswered: int
    devices_online: int
    devices_late: int
    devices_offline: int
    messages_in: int
    compressed_in: int
    compressed_bytes_in: int
    points_in: int
    points_written: int
    points_spooled: int
    points_replayed: int
    points_dropped: int
    batches_written: int
    write_seconds_sum: float
    write_ms_last: float
    spool_bytes: int
    spool_records: int
    spool_full: int
    queued: int
    write_errors: int
    write_retries: int
    acks_sent: int
    resends: int
    throttled: int
    window_waits: int
    requests_rate_limited: int
    sink_up: int
    protocol_errors: dict[str, int]  # by error code, every code (0 until it occurs)
    commands: dict[str, int]  # by state, every state
    command_points_lost: int
    interval_s: NotRequired[float]
    points_in_per_s: NotRequired[float]
    points_written_per_s: NotRequired[float]
    write_ms_avg: NotRequired[float]
    write_ms_max: NotRequired[float]
    batch_lines_avg: NotRequired[float]
    batch_lines_max: NotRequired[int]


class HubMetrics:
    """Reads the hub's live objects into snapshots; the interval figures run from one `snapshot()` to the next.

    `snapshot()` advances the interval (rates, average and peak write latency, batch sizes) and is meant
    for one consumer, `write_loop`. The Prometheus exposition reads only cumulative counters and gauges,
    never advances anything, and is safe to call from a worker thread.
    """

    def __init__(
        self,
        stats: Stats,
        presence: Presence,
        commands: CommandService | None,
        pipeline: Pipeline,
        sink: Sink,
        started_at: float,
        *,
        host: str | None = None,
        hub_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stats = stats
        self.presence = presence
        self.commands = commands
        self.pipeline = pipeline
        self.sink = sink
        self.started_at = started_at  # Unix time the hub started
        self.host = host or socket.gethostname()
        self.hub_id = hub_id  # a worker's `<host>-<K>`: its points' `hub` tag (one hub process: no such tag)
        self._clock = clock
        self._prev_at = clock()
        self._prev = self._cumulative()
        self._registry: CollectorRegistry | None = None
        #: In a cluster of hubs: the bus's figures (`Cluster.figures`), exposed on /metrics.
        self.cluster_figures: Callable[[], Mapping[str, Any]] | None = None

    # ------------------------------------------------------------------ reading

    def _cumulative(self) -> tuple[int, int, int, float]:
        s = self.stats
        return s.points_in, s.points_written, s.batches_written, s.write_seconds_sum

    def _devices(self) -> dict[str, int]:
        # A copy first: this may run in a worker thread while the trio thread changes the dict.
        out: dict[str, int] = dict.fromkeys(SEEN_STATES, 0)
        for status in list(dict(self.presence.status).values()):
            out[status.state] = out.get(status.state, 0) + 1
        return out

    def _commands(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(COMMAND_STATES, 0)
        if self.commands is not None:
            counts.update(self.commands.counts())
        return counts

    def _errors(self) -> dict[str, int]:
        errors = dict.fromkeys(_ERROR_CODES, 0)
        errors.update(dict(self.stats.protocol_errors))
        return errors

    def current(self) -> Snapshot:
        """Cumulative counters and gauges as they are now (no interval figures; changes nothing)."""
        s = self.stats
        devices = self._devices()
        return {
            "uptime_s": max(0.0, time.time() - self.started_at),
            "connections": s.connections,
            "connects": s.connects,
            "handshakes_refused": s.refused,
            "handshakes_busy": s.admission_refused,
            "handshakes_unanswered": s.admission_unanswered,
            "devices_online": devices["online"],
            "devices_late": devices["late"],
            "devices_offline": devices["offline"],
            "messages_in": s.messages_in,
            "compressed_in": s.compressed_in,
            "compressed_bytes_in": s.compressed_bytes_in,
            "points_in": s.points_in,
            "points_written": s.points_written,
            "points_spooled": s.points_spooled,
            "points_replayed": s.points_replayed,
            "points_dropped": s.points_dropped,
            "batches_written": s.batches_written,
            "write_seconds_sum": s.write_seconds_sum,
            "write_ms_last": s.write_seconds_last * 1000.0,
            "spool_bytes": self.pipeline.spool_bytes,
            "spool_records": self.pipeline.spool_depth,
            "spool_full": s.spool_full,
            "queued": self.pipeline.queued,
            "write_errors": s.write_errors,
            "write_retries": s.write_retries,
            "acks_sent": s.acks_sent,
            "resends": s.resends,
            "throttled": s.throttled,
            "window_waits": s.window_waits,
            "requests_rate_limited": s.requests_rate_limited,
            "sink_up": int(self.pipeline.sink_up),
            "protocol_errors": self._errors(),
            "commands": self._commands(),
            "command_points_lost": self.commands.points_lost if self.commands is not None else 0,
        }

    def snapshot(self) -> Snapshot:
        """`current()` plus the figures of the interval since the previous snapshot, which this one ends.

        Interval figures: `points_in_per_s`, `points_written_per_s`, `write_ms_avg`, `write_ms_max`,
        `batch_lines_avg`, `batch_lines_max` (0 when nothing was written in the interval).
        """
        now = self._clock()
        snap = self.current()
        s = self.stats
        points_in, written, batches, seconds = cumulative = self._cumulative()
        prev_in, prev_written, prev_batches, prev_seconds = self._prev
        elapsed = now - self._prev_at
        n_batches = batches - prev_batches
        snap["interval_s"] = elapsed
        snap["points_in_per_s"] = (points_in - prev_in) / elapsed if elapsed > 0 else 0.0
        snap["points_written_per_s"] = (written - prev_written) / elapsed if elapsed > 0 else 0.0
        snap["write_ms_avg"] = (seconds - prev_seconds) / n_batches * 1000.0 if n_batches > 0 else 0.0
        snap["write_ms_max"] = s.write_seconds_peak * 1000.0
        snap["batch_lines_avg"] = (written - prev_written) / n_batches if n_batches > 0 else 0.0
        snap["batch_lines_max"] = s.batch_lines_peak
        s.write_seconds_peak = 0.0
        s.batch_lines_peak = 0
        self._prev, self._prev_at = cumulative, now
        return snap

    # ------------------------------------------------------------------ points

    def lines(self, ts_ms: int, snapshot: Snapshot | None = None) -> str:
        """Line protocol of a snapshot (a new one if not given): `hub`, `hub_errors`, `hub_commands` at `ts_ms`.

        Every line ends with `\\n` and carries the tag `host` (and `hub`, the worker's id, when there are several).
        """
        snap = self.snapshot() if snapshot is None else snapshot
        host = {"host": self.host} if self.hub_id is None else {"host": self.host, "hub": self.hub_id}
        fields: dict[str, FieldValue] = {key: {"int": int(snap[key])} for key in _INT_FIELDS}
        fields.update((key, float(snap[key])) for key in _FLOAT_FIELDS)
        out = [line(HUB_MEASUREMENT, host, fields, ts_ms)]
        for code, count in sorted(snap["protocol_errors"].items()):
            out.append(line(ERRORS_MEASUREMENT, {**host, "code": code}, {"count": {"int": count}}, ts_ms))
        for state, count in sorted(snap["commands"].items()):
            out.append(line(COMMANDS_MEASUREMENT, {**host, "state": state}, {"count": {"int": count}}, ts_ms))
        return "\n".join(out) + "\n"

    async def write_loop(
        self,
        submit: Callable[[str, int, None], Awaitable[None]],
        interval: float,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Every `interval` seconds, submit the lines of a new snapshot; returns when the pipeline is closed."""
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        task_status.started()
        next_at = trio.current_time() + interval
        while True:
            await trio.sleep_until(next_at)
            next_at = max(next_at + interval, trio.current_time())  # after a stall: no burst of catch-up points
            text = self.lines(int(time.time() * 1000))
            try:
                await submit(text, text.count("\n"), None)
            except trio.ClosedResourceError:
                log.info("metrics: the pipeline is closed, no more hub points")
                return

    # ------------------------------------------------------------------ HTTP routes

    def render_prometheus(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of the current figures, and its content type."""
        # Imported here: prometheus-client comes with the `hub` extra, the hub's points need none of it.
        from prometheus_client.exposition import choose_encoder
        from prometheus_client.registry import CollectorRegistry

        if self._registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_HubCollector(self))
            self._registry = registry
        encoder, content_type = choose_encoder("")
        return encoder(self._registry), content_type

    def metrics_route(self) -> tuple[int, str, bytes]:
        """`GET /metrics`: 200 with the Prometheus exposition."""
        body, content_type = self.render_prometheus()
        return 200, content_type, body

    def health_route(self) -> tuple[int, str, bytes]:
        """`GET /healthz`: see `health`."""
        return health(self.pipeline, self.sink)

    def routes(self) -> dict[str, Page]:
        """The routes to mount on the HTTP listener: `/metrics` and `/healthz`."""
        return {"/metrics": self.metrics_route, "/healthz": self.health_route}


def health(pipeline: Pipeline, sink: Sink) -> tuple[int, str, bytes]:
    """200 with `{"status": "ok", "sink": "up", ...}` if the last write succeeded and `sink.check()` passes,
    else 503 with the same keys. Blocks for the check (up to a few seconds): call it from a worker thread.
    """
    try:
        reachable = bool(sink.check())
    except Exception:
        log.exception("health: checking the sink failed")
        reachable = False
    writing = pipeline.sink_up
    ok = reachable and writing
    doc = {
        "status": "ok" if ok else "unavailable",
        "sink": "up" if ok else "down",
        "sink_reachable": reachable,
        "last_write_ok": writing,
        "spool_records": pipeline.spool_depth,
        "spool_bytes": pipeline.spool_bytes,
    }
    return (200 if ok else 503), "application/json", json.dumps(doc).encode()


#: The figures the Prometheus collector reads by name (mypy checks each against `Snapshot`).
_Collected = Literal[
    "connects",
    "handshakes_refused",
    "handshakes_busy",
    "handshakes_unanswered",
    "messages_in",
    "compressed_in",
    "compressed_bytes_in",
    "points_in",
    "points_written",
    "points_spooled",
    "points_replayed",
    "points_dropped",
    "batches_written",
    "write_errors",
    "write_retries",
    "spool_full",
    "acks_sent",
    "resends",
    "throttled",
    "window_waits",
    "requests_rate_limited",
    "command_points_lost",
    "connections",
    "spool_bytes",
    "spool_records",
    "queued",
    "sink_up",
    "uptime_s",
]


class _HubCollector:
    """A Prometheus collector: metric families over `HubMetrics.current()`."""

    _COUNTERS: Final[tuple[tuple[_Collected, str, str], ...]] = (
        ("connects", "hub_connects", "Device sessions accepted."),
        ("handshakes_refused", "hub_handshakes_refused", "Device handshakes refused before the upgrade."),
        (
            "handshakes_busy",
            "hub_handshakes_busy",
            "Connections refused unread (503/429 + Retry-After): too many handshakes in progress.",
        ),
        (
            "handshakes_unanswered",
            "hub_handshakes_unanswered",
            "Of those, closed without an answer: past the hub's budget of refusal answers per second.",
        ),
        ("messages_in", "hub_messages_in", "Messages received from devices."),
        (
            "compressed_in",
            "hub_compressed_messages_in",
            "Of those, binary frames: compressed telemetry (accepted or refused).",
        ),
        ("compressed_bytes_in", "hub_compressed_bytes_in", "Payload bytes of compressed frames, before inflating."),
        ("points_in", "hub_points_in", "Points accepted into the pipeline."),
        ("points_written", "hub_points_written", "Points written to the sink, replays included."),
        ("points_spooled", "hub_points_spooled", "Points appended to the on-disk spool."),
        ("points_replayed", "hub_points_replayed", "Points written to the sink from the spool."),
        ("points_dropped", "hub_points_dropped", "Lines the database refused and the hub dropped."),
        ("batches_written", "hub_batches_written", "Successful sink writes."),
        ("write_errors", "hub_write_errors", "Failed sink write attempts."),
        ("write_retries", "hub_write_retries", "Sink write retries."),
        ("spool_full", "hub_spool_full", "Times the spool was full and ingest waited."),
        ("acks_sent", "hub_acks_sent", "Acks sent to devices."),
        ("resends", "hub_resends", "Telemetry messages whose sequence number the hub already had."),
        ("throttled", "hub_throttled", "Times a device was slowed down for exceeding its message or point rate."),
        ("window_waits", "hub_window_waits", "Times the hub paused reading a device that had a full window in flight."),
        ("requests_rate_limited", "hub_requests_rate_limited", "Control requests refused over the operator's rate."),
        ("command_points_lost", "hub_command_points_lost", "Command transition points that could not be written."),
    )
    _GAUGES: Final[tuple[tuple[_Collected, str, str], ...]] = (
        ("connections", "hub_connections", "Open device sessions."),
        ("spool_bytes", "hub_spool_bytes", "Bytes waiting in the spool."),
        ("spool_records", "hub_spool_records", "Batches waiting in the spool."),
        ("queued", "hub_pipeline_queued", "Items submitted to the pipeline and not yet batched."),
        ("sink_up", "hub_sink_up", "1 if the last sink write succeeded, else 0."),
        ("uptime_s", "hub_uptime_seconds", "Seconds since the hub started."),
    )

    def __init__(self, metrics: HubMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

        snap = self._metrics.current()
        for key, name, doc in self._COUNTERS:
            yield CounterMetricFamily(name, doc, value=snap[key])
        errors = CounterMetricFamily("hub_protocol_errors", "Refused device input by error code.", labels=["code"])
        for code, count in sorted(snap["protocol_errors"].items()):
            errors.add_metric([code], count)
        yield errors
        for key, name, doc in self._GAUGES:
            yield GaugeMetricFamily(name, doc, value=snap[key])
        devices = GaugeMetricFamily("hub_devices", "Devices seen since the hub started, by state.", labels=["state"])
        by_state = {"online": snap["devices_online"], "late": snap["devices_late"], "offline": snap["devices_offline"]}
        for state in SEEN_STATES:
            devices.add_metric([state.value], by_state[state])
        yield devices
        commands = GaugeMetricFamily("hub_commands", "Commands in the command store, by state.", labels=["state"])
        for command_state, count in snap["commands"].items():
            commands.add_metric([command_state], count)
        yield commands
        if self._metrics.cluster_figures is not None:
            yield from _cluster_metrics(self._metrics.cluster_figures())
        yield SummaryMetricFamily(
            "hub_write_duration_seconds",
            "Duration of successful sink writes.",
            count_value=snap["batches_written"],
            sum_value=snap["write_seconds_sum"],
        )
        yield GaugeMetricFamily(
            "hub_write_duration_last_seconds",
            "Duration of the latest successful sink write.",
            value=snap["write_ms_last"] / 1000.0,
        )
        yield SummaryMetricFamily(
            "hub_write_batch_lines",
            "Lines per successful sink write.",
            count_value=snap["batches_written"],
            sum_value=snap["points_written"],
        )


def _cluster_metrics(f: Mapping[str, Any]) -> Iterator[Metric]:
    """/metrics of a hub in a cluster, from `Cluster.figures()`."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    yield GaugeMetricFamily("hub_bus_connected", "1 while subscribed to the bus in Redis.", value=f["connected"])
    for name, doc, counts in (
        ("hub_bus_published", "Bus messages published, by kind.", f["published"]),
        ("hub_bus_received", "Bus messages received from other hubs, by kind.", f["received"]),
    ):
        family = CounterMetricFamily(name, doc, labels=["kind"])
        for kind, n in sorted(counts.items()):
            family.add_metric([kind], n)
        yield family
    yield CounterMetricFamily("hub_bus_dropped", "Bus messages dropped: the queue was full.", value=f["dropped"])
    yield CounterMetricFamily(
        "hub_cluster_claims_refused",
        "Presence transitions refused because a newer session of the device lives on another hub.",
        value=f["claims_refused"],
    )
    yield CounterMetricFamily(
        "hub_cluster_telemetry_relayed", "Points relayed to other hubs' watchers.", value=f["telemetry_relayed"]
    )
