"""Run a fleet of simulated devices in one process, each a `DeviceClient` with its own clock and interval.

Every device answers the commands of `firmware_sim.commands` (reboot, set_interval,
set_config, ping, fail, echo).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from device_client import DeviceClient
from firmware_sim.commands import SimState, apply_desired, register_commands, register_twin
from firmware_sim.sensors import MODELS, make_device

__all__ = ["FleetTotals", "device_seed", "run_fleet"]


@attrs.frozen
class FleetTotals:
    """Aggregate progress of a fleet."""

    devices: int
    connected: int = 0
    points_sent: int = 0  # points handed to the device clients
    points_acked: int = 0
    batches_acked: int = 0
    pending: int = 0  # batches not acked yet
    buffered: int = 0  # points not yet in a batch
    reconnects: int = 0
    connect_failures: int = 0
    rejected: int = 0  # batches the hub refused for good
    commands: int = 0  # commands run by the devices (repeats of an id not counted)
    elapsed: float = 0.0


def device_seed(seed: int, index: int) -> int:
    """The seed of device number `index` in a fleet seeded with `seed`."""
    return seed * 1_000_003 + index


def _totals(devices: int, clients: Sequence[DeviceClient], elapsed: float) -> FleetTotals:
    total = FleetTotals(devices=devices, elapsed=elapsed)
    counts: dict[str, int] = {}
    for c in clients:
        s = c.stats
        for key, value in (
            ("connected", int(s.connected)),
            ("points_sent", s.points_queued),
            ("points_acked", s.points_acked),
            ("batches_acked", s.batches_acked),
            ("pending", c.pending),
            ("buffered", c.buffered),
            ("reconnects", s.reconnects),
            ("connect_failures", s.connect_failures),
            ("rejected", s.rejected),
            ("commands", s.commands_run),
        ):
            counts[key] = counts.get(key, 0) + value
    return attrs.evolve(total, **counts)


async def run_fleet(
    hub_url: str,
    tokens: Sequence[str],
    *,
    interval: float = 10.0,
    models: Sequence[str] = tuple(MODELS),
    duration: float | None = None,
    seed: int = 0,
    progress: Callable[[FleetTotals], None] | None = None,
    progress_every: float = 1.0,
    outbox_dir: str | os.PathLike[str] | None = None,
    clock_skew: float = 2.0,
    close_timeout: float = 10.0,
    stop: trio.Event | None = None,
    client_options: dict[str, Any] | None = None,
) -> FleetTotals:
    """Run one simulated device per token until `duration` seconds pass or `stop` is set; return the totals.

    Device i has model ``models[i % len(models)]``, a reporting interval of `interval` seconds jittered by ±10 % per
    report, a start staggered within the first interval, and a clock off by up to ±`clock_skew` seconds (its
    timestamps come from that clock). Each answers the hub's commands (`firmware_sim.commands`); `set_interval`
    changes its interval, and so does its twin's desired `interval` (`measurements` turns measurements off). On the
    end (or cancellation) every device flushes and waits up to `close_timeout` for acks. `progress` gets the totals
    every `progress_every` seconds and at the end.
    """
    if not tokens:
        raise ValueError("no tokens: a fleet needs at least one device")
    if interval <= 0:
        raise ValueError("interval must be positive")
    for model in models:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    names = [t.split(".", 1)[0] for t in tokens]
    if len(set(names)) != len(names):
        raise ValueError("two tokens name the same device")
    if outbox_dir is not None:
        Path(outbox_dir).mkdir(parents=True, exist_ok=True)
    stop = stop if stop is not None else trio.Event()
    started = trio.current_time()
    end = started + duration if duration is not None else float("inf")
    clients: list[DeviceClient] = []
    scopes: list[trio.CancelScope] = []

    def report() -> FleetTotals:
        totals = _totals(len(tokens), clients, trio.current_time() - started)
        if progress is not None:
            progress(totals)
        return totals

    # Clients are built before any task starts, so a bad URL or token raises here, not in a task.
    sims = [make_device(models[i % len(models)], device_seed(seed, i)) for i in range(len(tokens))]
    for index, (token, sim) in enumerate(zip(tokens, sims, strict=True)):
        outbox = Path(outbox_dir) / f"{names[index]}.outbox.sqlite3" if outbox_dir is not None else None
        clients.append(
            DeviceClient(
                hub_url,
                token,
                firmware=sim.firmware,
                model=sim.model,
                interval=interval,
                outbox_path=outbox,
                close_timeout=close_timeout,
                **(client_options or {}),
            )
        )

    async def device(index: int) -> None:
        rng = random.Random(device_seed(seed, index) ^ 0x5EED)
        state = SimState(interval, clock_offset_ms=rng.uniform(-clock_skew, clock_skew) * 1000.0)
        sim, client = sims[index], clients[index]
        register_commands(client, state)
        register_twin(client, state)
        async with client:
            if client.desired:  # kept in the outbox file: the device starts as it was configured
                apply_desired(state, client.desired)
                client.interval = state.interval
            with trio.CancelScope(deadline=end) as scope:
                scopes.append(scope)
                if stop.is_set():
                    scope.cancel()
                last_report: float | None = None
                next_report = trio.current_time() + rng.uniform(0.0, interval)
                while True:
                    changed = state.interval_changed
                    with trio.move_on_at(next_report):
                        await changed.wait()
                    if changed.is_set():  # set_interval: the next report is one new interval after the last
                        since = trio.current_time() if last_report is None else last_report
                        next_report = since + state.interval * rng.uniform(0.9, 1.1)
                        continue
                    ts = state.now_ms()
                    for p in sim.read(ts):
                        if p["measurement"] in state.disabled:
                            continue
                        await client.send(p["measurement"], p["fields"], tags=p["tags"], ts=ts)
                    last_report = next_report
                    next_report += state.interval * rng.uniform(0.9, 1.1)

    async def stopper() -> None:
        await stop.wait()
        for scope in scopes:
            scope.cancel()

    async def reporter() -> None:
        while True:
            await trio.sleep(progress_every)
            report()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stopper)
            if progress is not None:
                nursery.start_soon(reporter)
            async with trio.open_nursery() as devices:
                for index in range(len(tokens)):
                    devices.start_soon(device, index)
            nursery.cancel_scope.cancel()
    finally:
        totals = report()
    return totals
