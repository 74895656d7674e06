"""Hub metrics (snapshots, points, Prometheus exposition, health) and the HTTP listener over real sockets."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from device_client.protocol import ErrorCode
from hub.config import CommandsConfig
from hub.fleet import CommandService, DeviceStatus, Presence
from hub.fleet._commands import STATES, CommandStore
from hub.ingest import FileSink, InfluxV1Sink, Mark, Pipeline, PipelineConfig, Sink, Spool
from hub.ops import HubMetrics, health
from hub.stats import Stats
from hub.web import serve_asgi, web_app
from tests.ports import refused_port
from tests.servers import InfluxDB1, ScriptedWriteServer
from tests.waiting import eventually
from tests.wire import exchange, get_request

TS = 1_700_000_000_000
FAST = PipelineConfig(max_lines=50, max_delay=0.02, write_attempts=1, backoff_initial=0.05, backoff_max=0.2)


class Hub:
    """The live objects HubMetrics reads, all real: stats, presence, command service, pipeline over a sink."""

    def __init__(self, tmp: Path, sink: Sink, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.stats = Stats()
        self.sink = sink
        self.spool = Spool(tmp / "spool", 10_000_000)
        self.pipeline = Pipeline(sink, self.spool, FAST, self.stats, self._durable)
        self.submitted: list[str] = []
        self.presence = Presence(self._record)
        self.store = CommandStore(tmp / "commands.sqlite3")
        self.commands = CommandService(self.store, CommandsConfig(), device_exists=self._exists, write=self._record)
        self.metrics = HubMetrics(
            self.stats, self.presence, self.commands, self.pipeline, sink, time.time() - 5, host="h1", clock=clock
        )

    async def _exists(self, name: str) -> bool:
        return True

    async def _durable(self, marks: list[Mark]) -> None:
        pass

    async def _record(self, text: str, n: int, mark: None = None) -> None:
        self.submitted.append(text)

    def close(self) -> None:
        self.store.close()
        self.spool.close()
        self.sink.close()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    h = Hub(tmp_path, FileSink(tmp_path / "lines"))
    yield h
    h.close()


def prometheus(metrics: HubMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render_prometheus()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


# ---------------------------------------------------------------------------- snapshots and points


async def test_snapshot_reads_every_source(hub: Hub) -> None:
    s = hub.stats
    s.connections, s.connects, s.refused, s.messages_in = 3, 7, 2, 40
    s.points_in, s.points_spooled, s.points_replayed, s.points_dropped = 1000, 30, 20, 1
    s.write_errors, s.write_retries, s.acks_sent, s.resends, s.spool_full = 4, 3, 39, 1, 1
    s.count_error(ErrorCode.BAD_JSON)
    s.count_error(ErrorCode.BAD_JSON)
    s.count_error("some_new_code")
    await hub.presence.online("a", 1, firmware="f", model="m", interval=10)
    await hub.presence.online("b", 1, firmware="f", model="m", interval=10)
    await hub.presence.online("c", 1, firmware="f", model="m", interval=10)
    await hub.presence.offline("c", 1, "disconnected")
    hub.presence.status["b"] = DeviceStatus("late", 1, time.time(), "no_data")
    await hub.commands.submit("a", "ping")
    await hub.commands.submit("b", "ping")

    snap = hub.metrics.snapshot()
    assert {k: snap[k] for k in ("connections", "connects", "handshakes_refused", "messages_in")} == {
        "connections": 3,
        "connects": 7,
        "handshakes_refused": 2,
        "messages_in": 40,
    }
    assert (snap["devices_online"], snap["devices_late"], snap["devices_offline"]) == (1, 1, 1)
    assert (snap["points_in"], snap["points_spooled"], snap["points_replayed"], snap["points_dropped"]) == (
        1000,
        30,
        20,
        1,
    )
    assert (snap["write_errors"], snap["write_retries"], snap["acks_sent"], snap["resends"]) == (4, 3, 39, 1)
    assert snap["protocol_errors"]["bad_json"] == 2 and snap["protocol_errors"]["some_new_code"] == 1
    assert snap["protocol_errors"]["bad_field"] == 0  # every known code, even before it happens
    assert snap["commands"] == {**dict.fromkeys(STATES, 0), "queued": 2}
    assert snap["command_points_lost"] == 0
    hub.commands.points_lost = 3  # as after a full transition-point buffer
    assert hub.metrics.snapshot()["command_points_lost"] == 3
    assert (snap["spool_records"], snap["spool_bytes"], snap["queued"], snap["sink_up"]) == (0, 0, 0, 1)
    assert 5 <= snap["uptime_s"] < 3600


async def test_interval_figures_run_from_snapshot_to_snapshot(tmp_path: Path) -> None:
    now = [100.0]
    h = Hub(tmp_path, FileSink(tmp_path / "lines"), clock=lambda: now[0])
    try:
        s = h.stats
        s.points_in = 500
        s.points_written, s.batches_written = 400, 2
        s.count_write(0.010, 100)
        s.count_write(0.030, 300)
        now[0] += 10
        first = h.metrics.snapshot()
        assert first["interval_s"] == 10.0
        assert (first["points_in_per_s"], first["points_written_per_s"]) == (50.0, 40.0)
        assert first["write_ms_avg"] == pytest.approx(20.0)
        assert first["write_ms_max"] == pytest.approx(30.0) and first["write_ms_last"] == pytest.approx(30.0)
        assert (first["batch_lines_avg"], first["batch_lines_max"]) == (200.0, 300)

        h.metrics.render_prometheus()  # a scrape between snapshots changes no interval figure
        s.points_in += 40
        s.points_written, s.batches_written = 450, 3
        s.count_write(0.002, 50)
        now[0] += 4
        second = h.metrics.snapshot()
        assert (second["points_in_per_s"], second["points_written_per_s"]) == (10.0, 12.5)
        assert second["write_ms_avg"] == pytest.approx(2.0) and second["write_ms_max"] == pytest.approx(2.0)
        assert (second["batch_lines_avg"], second["batch_lines_max"]) == (50.0, 50)

        now[0] += 5
        idle = h.metrics.snapshot()
        assert (idle["points_in_per_s"], idle["write_ms_avg"], idle["write_ms_max"], idle["batch_lines_max"]) == (
            0.0,
            0.0,
            0.0,
            0,
        )
        assert idle["write_ms_last"] == pytest.approx(2.0)  # "last" is not an interval figure
    finally:
        h.close()


async def test_pipeline_records_write_latency_and_batch_sizes(hub: Hub) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.pipeline.run)
        await hub.pipeline.submit("".join(f"m,device=d f={i} {TS + i}\n" for i in range(30)), 30)
        await eventually(lambda: hub.stats.points_written == 30)
        await hub.pipeline.submit(f"m,device=d f=1 {TS + 99}\n", 1)
        await eventually(lambda: hub.stats.points_written == 31)
        hub.pipeline.close_input()
    s = hub.stats
    assert s.batches_written == 2
    assert s.write_seconds_sum > 0 and 0 < s.write_seconds_last <= s.write_seconds_peak <= s.write_seconds_sum
    snap = hub.metrics.snapshot()
    assert (snap["batch_lines_max"], snap["batch_lines_avg"]) == (30, 15.5)
    assert snap["write_ms_avg"] == pytest.approx(s.write_seconds_sum / 2 * 1000)


def parse_line(text: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """Measurement, tags and raw field values of a line without escapes."""
    series, fields, ts = text.split(" ")
    measurement, *tags = series.split(",")
    assert ts.isdigit()
    return measurement, dict(t.split("=") for t in tags), dict(f.split("=") for f in fields.split(","))


async def test_lines_have_stable_types_and_every_error_code_and_state(hub: Hub) -> None:
    hub.stats.count_error(ErrorCode.BAD_TIME)
    await hub.commands.submit("a", "ping")
    text = hub.metrics.lines(TS)
    assert text.endswith("\n")
    first, *rest = (parse_line(t) for t in text.splitlines())
    measurement, tags, fields = first
    assert (measurement, tags) == ("hub", {"host": "h1"})
    assert fields["points_in"] == "0i" and fields["sink_up"] == "1i" and fields["devices_online"] == "0i"
    assert fields["points_in_per_s"] == "0.0" and fields["write_ms_avg"] == "0.0"
    ints = {k for k, v in fields.items() if v.endswith("i")}
    floats = set(fields) - ints
    assert {"uptime_s", "points_in_per_s", "points_written_per_s", "write_ms_last", "write_ms_max"} <= floats
    errors = {t["code"]: f["count"] for m, t, f in rest if m == "hub_errors"}
    commands = {t["state"]: f["count"] for m, t, f in rest if m == "hub_commands"}
    assert all(t["host"] == "h1" for _, t, _ in rest)
    assert errors["bad_time"] == "1i" and set(errors) >= {"bad_json", "bad_field", "too_many_errors"}
    assert commands == {**{state: "0i" for state in STATES}, "queued": "1i"}
    assert len(rest) == len(errors) + len(commands)


async def test_lines_are_accepted_by_influxdb_snapshot_after_snapshot(hub: Hub, influxdb1: InfluxDB1) -> None:
    # InfluxDB fixes a field's type on first write: a later snapshot with other values must still fit.
    influxdb1.query("CREATE DATABASE m")
    sink = InfluxV1Sink(influxdb1.url, "m")
    try:
        sink.write(hub.metrics.lines(TS))
        hub.stats.points_in, hub.stats.points_written, hub.stats.batches_written = 10, 10, 1
        hub.stats.count_write(0.25, 10)
        hub.stats.count_error(ErrorCode.BAD_NAME)
        sink.write(hub.metrics.lines(TS + 1000))
    finally:
        sink.close()
    rows = influxdb1.rows("SELECT * FROM hub", "m")
    assert [r["points_in"] for r in rows] == [0, 10]
    assert rows[1]["write_ms_max"] == 250.0 and rows[1]["host"] == "h1"
    counts = influxdb1.rows("SELECT last(count) FROM hub_errors WHERE code = 'bad_name'", "m")
    assert counts[0]["last"] == 1


async def test_write_loop_submits_every_interval_and_stops_when_closed(hub: Hub, autojump_clock: Any) -> None:
    calls: list[tuple[str, int, None]] = []

    async def submit(text: str, n: int, mark: None) -> None:
        if len(calls) == 3:
            raise trio.ClosedResourceError
        calls.append((text, n, mark))

    with pytest.raises(ValueError):
        await hub.metrics.write_loop(submit, 0)
    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        await nursery.start(hub.metrics.write_loop, submit, 5.0)
    assert trio.current_time() - started == pytest.approx(20.0)  # the fourth submit found the pipeline closed
    assert len(calls) == 3
    for text, n, mark in calls:
        assert text.startswith("hub,host=h1 ") and n == text.count("\n") > len(STATES)
        assert mark is None


# ---------------------------------------------------------------------------- Prometheus


async def test_prometheus_exposition(hub: Hub) -> None:
    s = hub.stats
    s.points_in, s.points_written, s.batches_written, s.connections = 1234, 1200, 4, 2
    s.count_write(0.5, 300)
    s.count_error(ErrorCode.BAD_FIELD)
    await hub.presence.online("a", 1, firmware="f", model="m", interval=0)
    await hub.commands.submit("a", "ping")
    got = prometheus(hub.metrics)
    assert got[("hub_points_in_total", ())] == 1234
    assert got[("hub_points_written_total", ())] == 1200
    assert got[("hub_connections", ())] == 2
    assert got[("hub_sink_up", ())] == 1
    assert got[("hub_devices", (("state", "online"),))] == 1
    assert got[("hub_devices", (("state", "offline"),))] == 0
    assert got[("hub_protocol_errors_total", (("code", "bad_field"),))] == 1
    assert got[("hub_protocol_errors_total", (("code", "bad_json"),))] == 0
    assert got[("hub_commands", (("state", "queued"),))] == 1
    assert got[("hub_write_duration_seconds_count", ())] == 4
    assert got[("hub_write_duration_seconds_sum", ())] == 0.5
    assert got[("hub_write_duration_last_seconds", ())] == 0.5
    assert got[("hub_write_batch_lines_sum", ())] == 1200
    assert got[("hub_uptime_seconds", ())] >= 5
    assert hub.stats.write_seconds_peak == 0.5  # a scrape resets nothing


# ---------------------------------------------------------------------------- health


async def test_health_up_then_unreachable(hub: Hub, tmp_path: Path) -> None:
    status, content_type, body = await trio.to_thread.run_sync(health, hub.pipeline, hub.sink)
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == {
        "status": "ok",
        "sink": "up",
        "sink_reachable": True,
        "last_write_ok": True,
        "spool_records": 0,
        "spool_bytes": 0,
    }
    down = Hub(tmp_path / "down", InfluxV1Sink(f"http://127.0.0.1:{refused_port()}", "db"))
    try:
        status, _, body = await trio.to_thread.run_sync(down.metrics.health_route)
    finally:
        down.close()
    assert status == 503
    assert json.loads(body)["status"] == "unavailable" and json.loads(body)["sink"] == "down"


async def test_health_503_after_failed_writes_though_ping_answers(tmp_path: Path) -> None:
    with ScriptedWriteServer(lambda path, text: (503, {}, b"busy")) as server:
        h = Hub(tmp_path, InfluxV1Sink(server.url, "db"))
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(h.pipeline.run)
                await h.pipeline.submit(f"m,device=d f=1 {TS}\n", 1)
                await eventually(lambda: h.stats.points_spooled == 1)
                status, _, body = await trio.to_thread.run_sync(health, h.pipeline, h.sink)
                assert h.metrics.current()["sink_up"] == 0
                nursery.cancel_scope.cancel()
        finally:
            h.close()
    doc = json.loads(body)
    assert status == 503
    assert doc["sink_reachable"] is True and doc["last_write_ok"] is False and doc["sink"] == "down"
    assert doc["spool_records"] == 1 and doc["spool_bytes"] > 0


# ---------------------------------------------------------------------------- the HTTP listener


@asynccontextmanager
async def listener(routes: dict[str, Any]) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_asgi, web_app(pages=routes), "127.0.0.1", 0)
        yield port
        nursery.cancel_scope.cancel()


async def test_http_listener_routes_and_errors(hub: Hub) -> None:
    def boom() -> tuple[int, str, bytes]:
        raise RuntimeError("route bug")

    routes = {**hub.metrics.routes(), "/boom": boom}
    async with listener(routes) as port:
        status, headers, body = await exchange(port, get_request("/metrics"))
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        assert headers["cache-control"] == "no-store" and int(headers["content-length"]) == len(body)
        assert "hub_points_in_total 0.0" in body.decode()

        status, headers, body = await exchange(port, get_request("/healthz?verbose=1"))
        assert status == 200 and headers["content-type"] == "application/json"
        assert json.loads(body)["status"] == "ok"

        assert (await exchange(port, get_request("/nope")))[0] == 404
        post = b"POST /metrics HTTP/1.1\r\nHost: hub\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"
        status, headers, _ = await exchange(port, post)
        assert status == 405 and "GET" in headers["allow"]
        assert (await exchange(port, b"this is not http\r\n\r\n"))[0] == 400
        status, _, body = await exchange(port, get_request("/boom"))
        assert status == 500 and b"route bug" not in body
        assert (await exchange(port, get_request("/metrics")))[0] == 200  # still serving after all of that


async def test_http_listener_limits_the_request_head() -> None:
    routes = {"/x": lambda: (200, "text/plain", b"x")}
    async with listener(routes) as port:
        status, _, _ = await exchange(port, get_request("/x", "X-Big: " + "a" * 200_000 + "\r\n"))
        assert status in (400, 431)
        assert (await exchange(port, get_request("/x", "X-Ok: " + "a" * 500 + "\r\n")))[0] == 200


async def test_http_listener_reports_its_port_and_a_taken_one_fails_at_start() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_asgi, web_app(), "127.0.0.1", 0)  # port 0: any free one, reported back
        assert port != 0
        assert (await exchange(port, get_request("/")))[0] == 404
        with pytest.raises(OSError):
            await nursery.start(serve_asgi, web_app(), "127.0.0.1", port)
        nursery.cancel_scope.cancel()
