"""The outage scenario: devices stream at a steady rate while the database hangs, then while it is down.

- **hung**: VictoriaMetrics is stopped with SIGSTOP for `HANG_S` seconds (it accepts connections and answers
  nothing): the longest time a batch waited for its ack, counted from when it was due to be sent.
- **down**: VictoriaMetrics is stopped (SIGTERM) for `DOWN_S` seconds and started again: how long after it answered
  the hub noticed (its first replayed write), the replay rate, and the time until the spool was drained.

Both runs stream `RATE` points/s from `DEVICES` devices through `device_client`, in this process, to a fresh hub,
and check in the database that every acked point is there once the spool is drained. Used by `bench.run` as the
`outage` scenario.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import trio

from bench.procs import ChildError, HubProcess
from bench.wire import BASE_TS, points_for
from device_client import DeviceClient

if TYPE_CHECKING:
    from bench.run import Bench, Table

__all__ = ["TABLE", "run"]

DEVICES = 10
POINTS = 10  # per batch
RATE = 500  # points/s from all devices together
WARMUP_S = 5.0
HANG_S = 45.0
DOWN_S = 60.0
AFTER_S = 10.0  # streaming after the hang (at least; until the spool is drained), before the devices stop
DRAIN_LIMIT_S = 300.0  # longest wait for the spool to drain after the database's return

TABLE = [
    ("case", "case"),
    ("outage s", "outage_s"),
    ("points/s", "rate"),
    ("max ack s", "max_ack_wait_s"),
    ("p99 ack s", "p99_ack_wait_s"),
    ("noticed s", "noticed_s"),
    ("replay pts/s", "replay_points_per_s"),
    ("drained s", "drained_s"),
    ("spooled", "points_spooled"),
    ("acked", "acked_points"),
    ("in DB", "db_points"),
    ("verified", "db_verified"),
]

_TS = re.compile(r"\bts=(\S+)")


class _Fleet:
    """`DEVICES` clients sending `POINTS`-point batches on a fixed schedule; every batch's wait for its ack."""

    def __init__(self, port: int, tokens: list[str], measurement: str) -> None:
        url = f"ws://127.0.0.1:{port}/v1/device"
        self.clients = [DeviceClient(url, t, backoff_initial=0.05, backoff_max=0.5) for t in tokens]
        self.measurement = measurement
        self.interval = len(tokens) * POINTS / RATE
        self.waits: list[tuple[float, float]] = []  # (when the batch was due, seconds until its ack)
        self.stop = trio.Event()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect every device, report ready, stream until `stop`, then wait for the last acks."""
        async with trio.open_nursery() as nursery:
            for i, client in enumerate(self.clients):
                await nursery.start(self._device, client, i)
            task_status.started()

    async def _device(self, client: DeviceClient, index: int, task_status: trio.TaskStatus[None]) -> None:
        send, receive = trio.open_memory_channel[tuple[int, float]](math.inf)
        async with client:
            await client.wait_connected()
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, client, receive)
                async with send:
                    start = trio.current_time() + index * self.interval / len(self.clients)
                    k = 0
                    while not self.stop.is_set():
                        due = start + k * self.interval
                        await trio.sleep_until(due)
                        seq = await client.send_batch(points_for(self.measurement, BASE_TS + k * POINTS, POINTS))
                        send.send_nowait((seq, due))
                        k += 1

    async def _watch(self, client: DeviceClient, receive: trio.MemoryReceiveChannel[tuple[int, float]]) -> None:
        async with receive:
            async for seq, due in receive:
                await client.wait_acked(seq)
                now = trio.current_time()
                self.waits.append((due, now - due))

    @property
    def acked_points(self) -> int:
        return sum(c.stats.points_acked for c in self.clients)


def _log_times(hub: HubProcess, text: str, after: float) -> list[float]:
    """Unix times of the hub's log lines holding `text`, at or after `after`."""
    out = []
    for line in hub.log_path.read_text(errors="replace").splitlines():
        found = _TS.search(line)
        if text in line and found:
            when = datetime.fromisoformat(found.group(1).replace("Z", "+00:00")).timestamp()
            if when >= after:
                out.append(when)
    return out


def _counter(hub: HubProcess, name: str) -> float | None:
    """A counter from the hub's /metrics (`hub_<name>_total` or `hub_<name>`), None if unreadable."""
    port = hub.metrics_port()
    if port is None:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    except OSError:
        return None
    found = re.search(rf"^hub_{name}(?:_total)? (\S+)$", body, re.MULTILINE)
    return float(found.group(1)) if found else None


async def _until(condition: Callable[[], bool], limit: float, what: str) -> None:
    with trio.move_on_after(limit):
        while not condition():
            await trio.sleep(0.1)
        return
    raise ChildError(f"outage: {what} not within {limit:.0f} s")


async def _stream_around(bench: Bench, label: str, outage: Callable[[HubProcess], Any]) -> dict[str, Any]:
    """A fresh hub and fleet; `outage(hub)` runs while the fleet streams; then the fleet stops and is checked."""
    measurement = bench.measurement(label)
    async with bench.target("hub", label) as target:
        assert target.hub is not None
        fleet = _Fleet(target.port, bench.tokens[:DEVICES], measurement)
        async with trio.open_nursery() as nursery:
            await nursery.start(fleet.run)
            await trio.sleep(WARMUP_S)
            row = await outage(target.hub)
            fleet.stop.set()
            nursery.cancel_scope.deadline = trio.current_time() + 120  # the last acks, or give up on them
        row["points_spooled"] = await trio.to_thread.run_sync(_counter, target.hub, "points_spooled")
    waits = sorted(w for _, w in fleet.waits)
    acked = fleet.acked_points
    row.update(
        {
            "rate": RATE,
            "devices": DEVICES,
            "batches": len(waits),
            "max_ack_wait_s": waits[-1] if waits else None,
            "p99_ack_wait_s": waits[max(0, math.ceil(0.99 * len(waits)) - 1)] if waits else None,
            "acked_points": acked,
        }
    )
    row.update(await bench.verify(measurement, acked, drained=len(fleet.waits) == _sent(fleet)))
    return row


def _sent(fleet: _Fleet) -> int:
    return sum(c.last_seq for c in fleet.clients)


async def _hung(bench: Bench) -> dict[str, Any]:
    async def hang(hub: HubProcess) -> dict[str, Any]:
        pid = bench.vm.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            await trio.sleep(HANG_S)
        finally:
            os.kill(pid, signal.SIGCONT)
        resumed = time.time()
        await _until(lambda: bool(_log_times(hub, "spool drained", resumed)), DRAIN_LIMIT_S, "spool drained")
        done = _log_times(hub, "spool drained", resumed)[0]
        await trio.sleep(max(0.0, AFTER_S - (time.time() - resumed)))
        return {"case": "hung (SIGSTOP)", "outage_s": HANG_S, "drained_s": done - resumed}

    return await _stream_around(bench, "outage_hung", hang)


async def _down(bench: Bench) -> dict[str, Any]:
    async def down(hub: HubProcess) -> dict[str, Any]:
        await trio.to_thread.run_sync(bench.vm.stop)
        await trio.sleep(DOWN_S)
        await trio.to_thread.run_sync(bench.vm.start)
        up = time.time()  # /health answered: the database is back

        def drained() -> bool:
            return bool(_log_times(hub, "spool drained", up))

        await _until(drained, DRAIN_LIMIT_S, "spool drained")
        back = _log_times(hub, "sink back", up)[0]
        done = _log_times(hub, "spool drained", up)[0]
        replayed = await trio.to_thread.run_sync(_counter, hub, "points_replayed")
        return {
            "case": "down (SIGTERM)",
            "outage_s": DOWN_S,
            "noticed_s": back - up,
            "drained_s": done - up,
            "points_replayed": replayed,
            # "sink back" is logged after the first replayed write: that write's time is not in the span.
            "replay_points_per_s": replayed / (done - back) if replayed and done > back else None,
        }

    return await _stream_around(bench, "outage_down", down)


async def run(bench: Bench, table: Table) -> dict[str, Any]:
    """Both cases, one row each."""
    rows = []
    for case in (_hung, _down):
        row = await bench._guarded(case, bench)
        rows.append(row)
        table.row(row)
    return {"runs": rows, "devices": DEVICES, "points_per_batch": POINTS, "rate": RATE}
