"""End to end: device clients -> real hub (InfluxDB 1.x write API) -> real InfluxDB 1.6, read back with InfluxQL.

InfluxDB keeps every field type, so these points carry floats, integers, booleans and strings, and tags that need
escaping; every acked point must come back exactly, through a database outage in the middle of the stream.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from device_client import DeviceClient
from tests.hubtools import BASE_TS, add_devices, hub_config, start_hub, url
from tests.servers import InfluxDB1
from tests.waiting import eventually
from tests.wire import http_get

pytestmark = pytest.mark.e2e

DB = "telemetry"


def batch(device_index: int, seq: int, size: int) -> list[dict[str, Any]]:
    """`size` points of one batch: distinct device timestamps, every field type, values derived from them."""
    out = []
    for i in range(size):
        n = seq * size + i
        out.append(
            {
                "measurement": "e2e run",
                "ts": BASE_TS + n * 10 + device_index,
                "fields": {
                    "value": n + device_index / 100,
                    "n": {"int": n},
                    "whole": float(n),  # InfluxQL shows 3.0 as 3: still a float field
                    "ok": n % 3 == 0,
                    "note": f'say "hi", a=b \\ #{n}',
                },
                "tags": {"site": "lab 2,b=c"},
            }
        )
    return out


def expected(devices: int, batches: int, size: int) -> dict[tuple[str, int], dict[str, Any]]:
    """What InfluxDB must hold: (device, ts) -> row (fields and tags as InfluxQL returns them)."""
    out = {}
    for d in range(devices):
        for seq in range(batches):
            for p in batch(d, seq, size):
                f = p["fields"]
                out[(f"dev{d}", p["ts"])] = {
                    "value": f["value"],
                    "n": f["n"]["int"],
                    "whole": f["whole"],
                    "ok": f["ok"],
                    "note": f["note"],
                    "site": "lab 2,b=c",
                }
    return out


def check_database(db: InfluxDB1, devices: int, batches: int, size: int) -> None:
    """Every point is in InfluxDB with its timestamp, tags and field values of the right types."""
    want = expected(devices, batches, size)
    rows = db.rows('SELECT * FROM "e2e run"', DB)
    got = {(r.pop("device"), r.pop("time")): r for r in rows}
    assert len(rows) == len(got)
    missing = sorted(set(want) - set(got))
    assert not missing, f"{len(missing)} acked points missing, e.g. {missing[:5]}"
    assert set(got) == set(want)
    for key, row in want.items():
        assert got[key] == row, key
    types = {r["fieldKey"]: r["fieldType"] for r in db.rows('SHOW FIELD KEYS FROM "e2e run"', DB)}
    assert types == {"value": "float", "n": "integer", "whole": "float", "ok": "boolean", "note": "string"}


def clients(hub_url: str, tokens: dict[str, str], n: int) -> list[DeviceClient]:
    return [
        DeviceClient(hub_url, tokens[f"dev{d}"], backoff_initial=0.05, backoff_max=0.5, model="e2e") for d in range(n)
    ]


def start_fleet(nursery: trio.Nursery, fleet: list[DeviceClient], batches: int, size: int, pause: float) -> None:
    """One task per client: open it, send its batches, wait until every one is acked."""

    async def run(client: DeviceClient, d: int) -> None:
        async with client:
            for seq in range(batches):
                await client.send_batch(batch(d, seq, size))
                await trio.sleep(pause)
            with trio.fail_after(120):
                await client.wait_acked()

    for d, client in enumerate(fleet):
        nursery.start_soon(run, client, d)


async def eventually_status(address: str, status: int, timeout: float = 60.0) -> bytes:
    """Poll a URL (in a thread) until it answers `status`; its body."""
    answers: list[tuple[int, bytes]] = []

    async def answered() -> bool:
        answers.append(await trio.to_thread.run_sync(http_get, address))
        return answers[-1][0] == status

    await eventually(answered, timeout, what=f"{address} to answer {status}", poll=0.1)
    return answers[-1][1]


async def test_database_outage_mid_stream_loses_no_acked_point(tmp_path: Path, influxdb1: InfluxDB1) -> None:
    devices, batches, size = 4, 50, 10
    influxdb1.query(f"CREATE DATABASE {DB}")
    tokens = add_devices(tmp_path / "hub", *(f"dev{d}" for d in range(devices)))
    config = hub_config(
        tmp_path / "hub",
        **{
            "influx.url": influxdb1.url,
            "influx.api": "v1",
            "influx.database": DB,
            "batch.write_attempts": 2,
            "batch.backoff_max": 0.5,
        },
    )
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        healthz = f"http://127.0.0.1:{hub.metrics_port}/healthz"
        assert "InfluxDB 1.x" in hub.sink.description
        async with trio.open_nursery() as fleet:
            fleet_clients = clients(url(hub), tokens, devices)
            start_fleet(fleet, fleet_clients, batches, size, pause=0.02)
            await eventually(lambda: hub.stats.points_written >= devices * size * 5, 60)
            assert json.loads(await eventually_status(healthz, 200))["sink"] == "up"
            influxdb1.stop()
            await eventually(lambda: hub.stats.points_spooled >= devices * size * 5, 60)
            spooled_while_down = hub.stats.points_spooled
            down = json.loads(await eventually_status(healthz, 503))
            assert down["sink"] == "down" and down["spool_records"] > 0
            influxdb1.start()
        # Every batch was acked: before and after the outage by the database, during it by the spool.
        assert sum(c.stats.points_acked for c in fleet_clients) == devices * batches * size

        # The spool empty and the sink up, as /healthz says: waited for as one condition (replayed points are counted
        # before their records leave the spool, so "replayed >= spooled" alone can come a moment too early).
        async def drained() -> bool:
            status, body = await trio.to_thread.run_sync(http_get, healthz)
            return status == 200 and json.loads(body)["spool_records"] == 0

        await eventually(drained, 60, what="the spool replayed and the sink up", poll=0.1)
        assert hub.stats.points_replayed >= hub.stats.points_spooled
        hub.stop()
    assert spooled_while_down > 0
    check_database(influxdb1, devices, batches, size)


async def test_hub_metrics_land_in_influxdb_and_on_the_http_listener(tmp_path: Path, influxdb1: InfluxDB1) -> None:
    influxdb1.query(f"CREATE DATABASE {DB}")
    tokens = add_devices(tmp_path / "hub", "dev0", "dev1")
    config = hub_config(
        tmp_path / "hub",
        **{
            "influx.url": influxdb1.url,
            "influx.api": "v1",
            "influx.database": DB,
            "metrics.interval": 0.2,
        },
    )
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with trio.open_nursery() as fleet:
            start_fleet(fleet, clients(url(hub), tokens, 2), batches=5, size=20, pause=0.0)

        def all_counted() -> bool:
            rows = influxdb1.rows('SELECT last("points_in") AS "n" FROM "hub"', DB)
            return bool(rows) and rows[0]["n"] >= 200

        await eventually(all_counted, 60, poll=0.1)
        body = await eventually_status(f"http://127.0.0.1:{hub.metrics_port}/metrics", 200)
        hub.stop()
    text = body.decode()
    assert "hub_points_in_total 200.0" in text
    assert 'hub_devices{state="offline"} 2.0' in text
    assert influxdb1.rows('SELECT last("count") FROM "hub_commands" WHERE "state" = \'queued\'', DB)[0]["last"] == 0
