"""End to end: device clients -> real hub -> real VictoriaMetrics, through outages of the database and the hub.

VictoriaMetrics keeps numbers only and names series `<measurement>_<field>`, so the points here are numeric.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from device_client import DeviceClient
from tests.hubproc import HubProcess
from tests.hubtools import BASE_TS, add_devices, hub_config, start_hub, url
from tests.servers import VictoriaMetrics
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

SERIES = '{__name__=~"e2e_.*"}'


class ExactVictoria(VictoriaMetrics):
    """VictoriaMetrics without deduplication, so a point written twice shows up twice."""

    def _args(self) -> list[str]:
        return [a for a in super()._args() if not a.startswith("-dedup")]


@pytest.fixture
def exact_victoria(tmp_path: Path):
    server = ExactVictoria(tmp_path / "victoria-exact")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def batch(device_index: int, seq: int, size: int) -> list[dict[str, Any]]:
    """`size` points of one batch: distinct device timestamps, values derived from them."""
    out = []
    for i in range(size):
        n = seq * size + i
        out.append(
            {
                "measurement": "e2e",
                "ts": BASE_TS + n * 10 + device_index,
                "fields": {"value": n + device_index / 100, "n": n},
                "tags": {"site": "lab"},
            }
        )
    return out


def expected(devices: int, batches: int, size: int) -> dict[tuple[str, str], dict[int, float]]:
    """Samples the database must hold: (series name, device) -> {ts: value}."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for d in range(devices):
        for seq in range(batches):
            for p in batch(d, seq, size):
                out.setdefault(("e2e_value", f"dev{d}"), {})[p["ts"]] = p["fields"]["value"]
                out.setdefault(("e2e_n", f"dev{d}"), {})[p["ts"]] = float(p["fields"]["n"])
    return out


def check_database(db: VictoriaMetrics, devices: int, batches: int, size: int, *, exactly_once: bool) -> None:
    """Every point is in the database with its tags, timestamp and value (and only once if asked)."""
    want = expected(devices, batches, size)
    total = sum(len(v) for v in want.values())
    series = db.wait_for_count(SERIES, total, timeout=60)
    got: dict[tuple[str, str], Counter[tuple[int, float]]] = {}
    for s in series:
        metric = s["metric"]
        assert metric.get("site") == "lab", metric
        key = (metric["__name__"], metric["device"])
        got.setdefault(key, Counter()).update(zip(s["timestamps"], s["values"], strict=True))
    assert set(got) == set(want)
    for key, samples in want.items():
        assert set(got[key]) == set(samples.items()), key
        if exactly_once:
            dupes = {k: c for k, c in got[key].items() if c > 1}
            assert not dupes, f"{key}: written more than once: {list(dupes)[:5]}"


async def stream(client: DeviceClient, device_index: int, batches: int, size: int, pause: float = 0.0) -> None:
    """Send every batch of one device, then wait until all of them are acked."""
    for seq in range(batches):
        await client.send_batch(batch(device_index, seq, size))
        if pause:
            await trio.sleep(pause)
    with trio.fail_after(120):
        await client.wait_acked()


def clients(hub_url: str, tokens: dict[str, str], n: int) -> list[DeviceClient]:
    return [
        DeviceClient(hub_url, tokens[f"dev{d}"], backoff_initial=0.05, backoff_max=0.5, model="e2e") for d in range(n)
    ]


def start_fleet(nursery: trio.Nursery, fleet: list[DeviceClient], batches: int, size: int, pause: float = 0.0) -> None:
    """One task per client: open it, stream its batches, wait for every ack."""

    async def run(client: DeviceClient, d: int) -> None:
        async with client:
            await stream(client, d, batches, size, pause)

    for d, client in enumerate(fleet):
        nursery.start_soon(run, client, d)


async def test_fleet_streams_every_point_into_victoria(tmp_path: Path, exact_victoria: VictoriaMetrics) -> None:
    devices, batches, size = 6, 25, 20
    tokens = add_devices(tmp_path / "hub", *(f"dev{d}" for d in range(devices)))
    config = hub_config(tmp_path / "hub", **{"influx.url": exact_victoria.url})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with trio.open_nursery() as fleet:
            start_fleet(fleet, clients(url(hub), tokens, devices), batches, size)
        hub.stop()
    assert hub.stats.points_written >= devices * batches * size  # plus the presence points
    check_database(exact_victoria, devices, batches, size, exactly_once=True)
    assert hub.stats.points_spooled == 0


async def test_database_outage_mid_stream_loses_nothing_and_writes_once(
    tmp_path: Path, exact_victoria: VictoriaMetrics
) -> None:
    devices, batches, size = 4, 60, 10
    tokens = add_devices(tmp_path / "hub", *(f"dev{d}" for d in range(devices)))
    config = hub_config(
        tmp_path / "hub",
        **{"influx.url": exact_victoria.url, "batch.write_attempts": 2, "batch.backoff_max": 0.5},
    )
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with trio.open_nursery() as fleet:
            start_fleet(fleet, clients(url(hub), tokens, devices), batches, size, pause=0.02)
            await eventually(lambda: hub.stats.points_written >= devices * size * 5, 60)
            exact_victoria.stop()
            await eventually(lambda: hub.stats.points_spooled >= devices * size * 5, 60)
            spooled_while_down = hub.stats.points_spooled
            exact_victoria.start()
        # Every batch is acked: before the outage by the database, during it by the spool.
        await eventually(lambda: hub.stats.points_replayed >= hub.stats.points_spooled, 60)
        hub.stop()
    assert spooled_while_down > 0
    check_database(exact_victoria, devices, batches, size, exactly_once=True)


@contextmanager
def hung(db: VictoriaMetrics) -> Iterator[None]:
    """The database process stopped (SIGSTOP): connections are accepted by the kernel, nothing is answered."""
    pid = db._proc.pid  # type: ignore[union-attr]  # tests/servers.py has no pause/resume of its own
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_hung_database_keeps_acks_flowing_from_the_spool(tmp_path: Path, victoria: VictoriaMetrics) -> None:
    devices, batches, size = 4, 40, 10
    tokens = add_devices(tmp_path / "hub", *(f"dev{d}" for d in range(devices)))
    config = hub_config(
        tmp_path / "hub",
        # The sink's timeout never fires here: only spool_after can turn the hung writes into acks.
        **{"influx.url": victoria.url, "influx.timeout": 3600.0, "batch.spool_after": 0.5},
    )

    async def send(client: DeviceClient, d: int, seqs: range) -> None:
        for seq in seqs:
            await client.send_batch(batch(d, seq, size))
            await trio.sleep(0.02)  # pacing: the batches spread over the outage
        await client.wait_acked()

    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        fleet = clients(url(hub), tokens, devices)
        async with trio.open_nursery() as opened:
            for client in fleet:
                await opened.start(_opened, client)
            with trio.fail_after(60):
                async with trio.open_nursery() as phase:  # written to the database
                    for d, client in enumerate(fleet):
                        phase.start_soon(send, client, d, range(10))
            with hung(victoria):
                with trio.fail_after(60):  # before the fix: no ack until 3 x the sink timeout
                    async with trio.open_nursery() as phase:
                        for d, client in enumerate(fleet):
                            phase.start_soon(send, client, d, range(10, batches))
                assert hub.stats.points_spooled >= devices * size * (batches - 10)
            await eventually(lambda: hub.stats.points_replayed >= hub.stats.points_spooled, 60)
            opened.cancel_scope.cancel()
        hub.stop()
    # Deduplicated (as InfluxDB overwrites): every point is there; a write applied late was written twice.
    check_database(victoria, devices, batches, size, exactly_once=True)


async def _opened(client: DeviceClient, task_status: trio.TaskStatus[None]) -> None:
    async with client:
        await client.wait_connected()
        task_status.started()
        await trio.sleep_forever()


async def test_hub_killed_mid_stream_loses_nothing_acked(tmp_path: Path, victoria: VictoriaMetrics) -> None:
    devices, batches, size = 4, 60, 10
    tokens = add_devices(tmp_path / "hub", *(f"dev{d}" for d in range(devices)))
    hub = HubProcess(tmp_path / "hub", "--influx-url", victoria.url, "--batch-max-delay", "0.02")
    hub.start()
    try:
        acked_before_kill = 0
        async with trio.open_nursery() as fleet:
            fleet_clients = clients(hub.url, tokens, devices)
            start_fleet(fleet, fleet_clients, batches, size, pause=0.02)
            await eventually(lambda: sum(c.stats.points_acked for c in fleet_clients) >= devices * size * 10, 60)
            hub.kill()
            acked_before_kill = sum(c.stats.points_acked for c in fleet_clients)
            await trio.sleep(0.5)  # devices keep queueing into their outboxes while the hub is gone
            hub.start()
        assert all(c.stats.reconnects >= 1 for c in fleet_clients)
        assert acked_before_kill > 0
    finally:
        hub.kill()
    # With deduplication on (as InfluxDB overwrites a point with the same series and time), the database holds
    # exactly the points sent: nothing acked before the kill was lost, and the resent rest arrived.
    check_database(victoria, devices, batches, size, exactly_once=True)


async def test_compressed_and_plain_devices_on_one_hub_deliver_the_same_points(
    tmp_path: Path, exact_victoria: VictoriaMetrics
) -> None:
    # Issue 14 item 5: dev0 sends deflated binary frames (the default), dev1 plain text (compress=False).
    devices, batches, size = 2, 20, 25
    tokens = add_devices(tmp_path / "hub", "dev0", "dev1")
    config = hub_config(tmp_path / "hub", **{"influx.url": exact_victoria.url})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        fleet = [
            DeviceClient(url(hub), tokens["dev0"], backoff_initial=0.05, backoff_max=0.5),
            DeviceClient(url(hub), tokens["dev1"], backoff_initial=0.05, backoff_max=0.5, compress=False),
        ]
        async with trio.open_nursery() as running:
            start_fleet(running, fleet, batches, size)
        hub.stop()
    zipped, plain = (client.stats for client in fleet)
    assert (zipped.compressed_sent, zipped.batches_acked, zipped.rejected) == (batches, batches, 0)
    assert (plain.compressed_sent, plain.batches_acked, plain.rejected) == (0, batches, 0)
    assert hub.stats.points_in == devices * batches * size and not hub.stats.protocol_errors
    check_database(exact_victoria, devices, batches, size, exactly_once=True)
