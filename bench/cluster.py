"""Scenarios of many hubs on one Redis (issue 12): ingest with `--workers`, commands across hubs, failover.

- **workers**: the same lean ingest loads against SQLite (one process, as `ingest` runs it), then Redis with
  `--workers 1` and `--workers 2`, interleaved; CPU of every hub process (supervisor and workers) per million points,
  Redis's CPU apart.
- **cluster-commands**: two `hub serve` on their own ports and data directories, one Redis; the devices stream on
  hub B, an operator sends commands one after another on hub A (across the bus) and then on hub B (same hub); beside
  them, in the same repetition, the `commands` scenario's single SQLite hub and the transport relay.
- **failover**: devices spread over several hubs on one Redis stream; one hub is killed with SIGKILL; its devices
  move on to the other hubs' ports; time until all are welcomed again, and acked points missing from VictoriaMetrics.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from bench.procs import ChildError, HubProcess, RedisServer, cpu_seconds, descendants

__all__ = ["TABLES", "ClusterScenarios"]

#: Devices one generator process holds in the failover (as in the storm).
FAILOVER_PER_GENERATOR = 2500
#: Longest wait for the killed hub's devices to be welcomed elsewhere.
FAILOVER_LIMIT_S = 120.0
#: Longest wait for the surviving hubs' spools to drain into the database before the count.
SPOOL_LIMIT_S = 180.0

TABLES: dict[str, list[tuple[str, str]]] = {
    "workers": [
        ("state", "state"),
        ("workers", "workers"),
        ("devices", "devices"),
        ("pts/msg", "points_per_message"),
        ("points/s", "points_per_s"),
        ("CPU s/Mpt", "cpu_s_per_mpoint"),
        ("x SQLite", "cpu_ratio_to_sqlite"),
        ("CPU %", "cpu_percent"),
        ("Redis s/Mpt", "redis_cpu_s_per_mpoint"),
        ("gen CPU %", "generator_cpu_percent"),
        ("points", "points"),
        ("verified", "db_verified"),
    ],
    "cluster-commands": [
        ("run", "run"),
        ("target", "target"),
        ("devices", "devices"),
        ("ok", "succeeded"),
        ("p50 ms", "p50_ms"),
        ("p95 ms", "p95_ms"),
        ("p99 ms", "p99_ms"),
        ("max ms", "max_ms"),
        ("verified", "db_verified"),
        ("hops p50/p99 ms", "hops_ms"),
    ],
    "failover": [
        ("hubs", "hubs"),
        ("devices", "devices"),
        ("on killed", "on_killed_hub"),
        ("all back s", "back_s"),
        ("lost conns", "connections_lost"),
        ("acked", "acked_points"),
        ("in DB", "db_points"),
        ("lost", "points_lost"),
        ("spool left", "spool_records_left"),
        ("verified", "db_verified"),
    ],
}

_WORKERS_READY = re.compile(r'msg="workers ready"')


def _percentiles(seconds: Sequence[float]) -> dict[str, Any]:
    from bench.run import _percentile

    ms = sorted(x * 1000 for x in seconds)
    return {
        "succeeded": len(ms),
        "p50_ms": _percentile(ms, 50),
        "p95_ms": _percentile(ms, 95),
        "p99_ms": _percentile(ms, 99),
        "max_ms": ms[-1] if ms else None,
        "mean_ms": statistics.fmean(ms) if ms else None,
    }


class ClusterScenarios:
    """Mixed into `bench.run.Bench`: uses its plan, VictoriaMetrics, generators, ingest and command runs."""

    plan: Any
    work: Path
    overrides: dict[str, Any]
    vm: Any
    _runs: int

    # -------------------------------------------------------------- Redis and hubs on it

    @asynccontextmanager
    async def redis(self, label: str, devices: int) -> AsyncIterator[tuple[RedisServer, list[str], str]]:
        """A fresh Redis with `devices` devices and an operator registered: it, their tokens, the operator's."""
        from hub.config import StateConfig
        from hub.fleet import open_registry_store

        self._runs += 1
        redis = RedisServer(self.work / f"redis-{self._runs:02d}-{label}")
        redis.start()
        try:
            tokens = [""] * devices
            async with open_registry_store(StateConfig(backend="redis", url=redis.url), redis.directory) as store:

                async def add(start: int) -> None:
                    for i in range(start, devices, 32):
                        tokens[i] = await store.add(f"bench-{i:05d}")

                async with trio.open_nursery() as nursery:
                    for start in range(32):
                        nursery.start_soon(add, start)
                operator = await store.add_operator("bench", "operator")
            yield redis, tokens, operator
        finally:
            redis.stop()

    def start_redis_hub(self, label: str, redis: RedisServer, workers: int = 1) -> HubProcess:
        """A fresh hub (`--workers N` if N > 1) on `redis`, writing to VictoriaMetrics; every worker ready."""
        self._runs += 1
        data_dir = self.work / f"hub-{self._runs:02d}-{label}"
        overrides = {
            **self.overrides,
            "influx.url": self.vm.url,
            "influx.org": "bench",
            "influx.bucket": "bench",
            "state.backend": "redis",
            "state.url": redis.url,
        }
        extra = (*self.plan.hub_args, "--workers", str(workers)) if workers > 1 else self.plan.hub_args
        hub = HubProcess(data_dir, overrides, extra)
        hub.start()
        if workers > 1:
            deadline = time.monotonic() + 60
            while not _WORKERS_READY.search(hub.log_tail(100_000)):
                if time.monotonic() > deadline:
                    hub.stop()
                    raise ChildError(f"--workers {workers}: not ready within 60 s: {hub.log_tail()}")
                time.sleep(0.1)
        return hub

    async def stop_hub(self, hub: HubProcess) -> None:
        """Stop a hub once its sessions are closed (bounded)."""
        await trio.to_thread.run_sync(hub.wait_disconnected, 30.0, abandon_on_cancel=True)
        hub.stop()

    # -------------------------------------------------------------- workers

    async def workers(self, table: Any) -> dict[str, Any]:
        """CPU per million points: SQLite one process, Redis `--workers 1`, `--workers 2`, same loads, interleaved."""
        from bench.run import Target

        plan = self.plan
        rows: list[dict[str, Any]] = []
        for round_ in range(plan.workers_rounds):
            for devices, points in plan.workers_ingest:
                sqlite_cpu = None
                for workers in (0, *plan.workers):  # 0: SQLite, one process
                    if workers == 0:
                        hub = self.start_hub("workers-sqlite")  # type: ignore[attr-defined]
                        try:
                            t = Target("hub", hub.pid, hub.port, hub=hub)
                            ingest = self._ingest_hub  # type: ignore[attr-defined]
                            row = await self._guarded(ingest, t, "lean", devices, points)  # type: ignore[attr-defined]
                        finally:
                            await self.stop_hub(hub)
                        row.update(state="sqlite", workers=1)
                        sqlite_cpu = row.get("cpu_s_per_mpoint")
                    else:
                        async with self.redis(f"workers{workers}", devices) as (redis, tokens, _op):
                            hub = self.start_redis_hub(f"workers{workers}", redis, workers)
                            try:
                                t = Target("hub", hub.pid, hub.port, hub=hub)
                                row = await self._guarded(  # type: ignore[attr-defined]
                                    self._ingest_hub,  # type: ignore[attr-defined]
                                    t,
                                    "lean",
                                    devices,
                                    points,
                                    tokens,
                                    redis.pid,
                                )
                                row["processes"] = 1 + len(descendants(hub.pid))
                            finally:
                                await self.stop_hub(hub)
                        row.update(state="redis", workers=workers)
                        if sqlite_cpu and row.get("cpu_s_per_mpoint"):
                            row["cpu_ratio_to_sqlite"] = row["cpu_s_per_mpoint"] / sqlite_cpu
                    row["round"] = round_ + 1
                    rows.append(row)
                    table.row(row)
        return {"runs": rows}

    # -------------------------------------------------------------- commands across hubs

    async def cluster_commands(self, table: Any) -> dict[str, Any]:
        """Command round trips operator on hub A -> device on hub B (and on B itself), next to one hub and the relay."""
        rows: list[dict[str, Any]] = []
        for run in range(1, self.plan.cluster_runs + 1):
            for row in await self._guarded_rows(self._cluster_commands):
                row["run"] = run
                rows.append(row)
                table.row(row)
            for target in ("hub", "transport"):  # the `commands` scenario's: one SQLite hub, the bare relay
                row = await self._guarded(self._commands, target)  # type: ignore[attr-defined]
                row["run"] = run
                row["target"] = "one hub" if target == "hub" else "relay"  # SQLite, no cluster; the bare transport
                rows.append(row)
                table.row(row)
        return {"runs": rows}

    async def _guarded_rows(self, fn: Any) -> list[dict[str, Any]]:
        try:
            rows: list[dict[str, Any]] = await fn()
            return rows
        except ChildError as exc:
            return [{"error": str(exc)[:2000]}]

    async def _cluster_commands(self) -> list[dict[str, Any]]:
        from bench.run import DRAIN_TIMEOUT, _merge

        plan = self.plan
        n = plan.command_devices
        label = f"xcmd_{n}"
        measurement = self.measurement(label)  # type: ignore[attr-defined]
        async with self.redis(label, n) as (redis, tokens, operator):
            hub_a = self.start_redis_hub("xcmd-a", redis)
            hub_b = self.start_redis_hub("xcmd-b", redis)
            try:
                gens = await self.generators(  # type: ignore[attr-defined]
                    label,
                    hub_b.port,
                    tokens[:n],
                    n,
                    measurement=measurement,
                    points=plan.command_points,
                    interval=plan.command_interval,
                    duration=0,
                    drain_timeout=DRAIN_TIMEOUT,
                )
                try:
                    await self.ready(gens, n)  # type: ignore[attr-defined]
                    await self.go(gens)  # type: ignore[attr-defined]
                    await trio.sleep(min(2.0, plan.command_interval * 2))
                    names = [token.rpartition(".")[0] for token in tokens[:n]]
                    cpu0 = cpu_seconds(hub_a.pid), cpu_seconds(hub_b.pid), cpu_seconds(redis.pid)
                    cross_hops: dict[str, list[float]] = {}
                    same_hops: dict[str, list[float]] = {}
                    cross, cross_fail = await self._hub_commands(  # type: ignore[attr-defined]
                        hub_a.port, names, operator, cross_hops
                    )
                    cpu1 = cpu_seconds(hub_a.pid), cpu_seconds(hub_b.pid), cpu_seconds(redis.pid)
                    same, same_fail = await self._hub_commands(  # type: ignore[attr-defined]
                        hub_b.port, names, operator, same_hops
                    )
                    for g in gens:
                        await g.send("stop")
                    results = [await g.expect("result", DRAIN_TIMEOUT + 60) for g in gens]
                finally:
                    await self.close_all(gens)  # type: ignore[attr-defined]
            finally:
                await self.stop_hub(hub_a)
                await self.stop_hub(hub_b)
        from bench.run import hop_figures

        r = _merge(results)
        check = await self.verify(measurement, r["acked_points"], r["drained"])  # type: ignore[attr-defined]
        common = {"devices": n, "commands": plan.commands, "stream_points_per_s": n * plan.command_points}
        return [
            {
                "target": "cross-hub",  # operator on hub A, devices on hub B
                **common,
                **_percentiles(cross),
                "hops_ms": hop_figures(cross_hops),
                "failures": cross_fail,
                "cpu_s": {"hub_a": cpu1[0] - cpu0[0], "hub_b": cpu1[1] - cpu0[1], "redis": cpu1[2] - cpu0[2]},
                "generator": r,
                **check,
            },
            {
                "target": "same hub",
                **common,
                **_percentiles(same),
                "hops_ms": hop_figures(same_hops),
                "failures": same_fail,
            },
        ]

    # -------------------------------------------------------------- failover

    async def failover(self, table: Any) -> dict[str, Any]:
        """Devices over several hubs on one Redis; one hub SIGKILLed: time until its devices are back, points lost."""
        row = await self._guarded(self._failover)  # type: ignore[attr-defined]
        table.row(row)
        return {"runs": [row]}

    async def _failover(self) -> dict[str, Any]:
        from bench.run import DRAIN_TIMEOUT, _merge

        plan = self.plan
        n, k = plan.failover_devices, plan.failover_hubs
        label = f"failover_{n}"
        measurement = self.measurement(label)  # type: ignore[attr-defined]
        async with self.redis(label, n) as (redis, tokens, _operator):
            hubs = [self.start_redis_hub(f"failover-{i}", redis) for i in range(k)]
            ports = tuple(h.port for h in hubs)
            try:
                gens = await self.generators(  # type: ignore[attr-defined]
                    label,
                    ports[0],
                    tokens[:n],
                    FAILOVER_PER_GENERATOR,
                    measurement=measurement,
                    points=plan.failover_points,
                    interval=plan.failover_interval,
                    duration=0,
                    ports=ports,
                    drain_timeout=DRAIN_TIMEOUT,
                )
                try:
                    await self.ready(gens, n)  # type: ignore[attr-defined]
                    await self.go(gens)  # type: ignore[attr-defined]
                    await trio.sleep(plan.failover_interval + 1)
                    victim = hubs[0]
                    on_victim = victim.connections()
                    t_kill = time.monotonic()
                    victim.kill()
                    back_at, lost, before = await self._all_welcomed(gens, n, on_victim or 1)
                    await trio.sleep(plan.failover_interval + 1)  # streaming on, after all are back
                    for g in gens:
                        await g.send("stop")
                    results = [await g.expect("result", DRAIN_TIMEOUT + 60) for g in gens]
                finally:
                    await self.close_all(gens)  # type: ignore[attr-defined]
                # What a hub acked into its spool (its sink too slow) reaches the database only when replayed.
                spool_left = await self._spools_drained(hubs[1:])
                r = _merge(results)
                check = await self.verify(measurement, r["acked_points"], r["drained"])  # type: ignore[attr-defined]
            finally:
                for hub in hubs[1:]:
                    await self.stop_hub(hub)
                hubs[0].stop()
        row = {
            "hubs": k,
            "devices": n,
            "on_killed_hub": on_victim,
            "welcomed_first_poll": before,  # devices welcomed at the first poll after the kill
            "back_s": back_at - t_kill if back_at else None,
            "connections_lost": lost,
            "sent_points": r["sent_points"],
            "acked_points": r["acked_points"],
            "resent_messages": r["resent"],
            "drained": r["drained"],
            "stream_points_per_s": n * plan.failover_points / plan.failover_interval,
            "spool_records_left": spool_left,
            "generator": r,
            **check,
        }
        return row

    async def _spools_drained(self, hubs: Sequence[HubProcess]) -> int | None:
        """Wait (at most SPOOL_LIMIT_S) until the hubs' spools are empty; batches left in them (None: unknown)."""
        deadline = time.monotonic() + SPOOL_LIMIT_S
        while True:
            left = [await trio.to_thread.run_sync(h.metric, "hub_spool_records") for h in hubs]
            if any(x is None for x in left):
                return None
            total = int(sum(x or 0 for x in left))
            if total == 0 or time.monotonic() > deadline:
                return total
            await trio.sleep(1.0)

    async def _all_welcomed(self, gens: Sequence[Any], n: int, losses: int) -> tuple[float | None, int, int]:
        """Poll the generators until at least `losses` connections were lost and all `n` devices are welcomed again:
        the time of the last welcome (None if not within FAILOVER_LIMIT_S), connections lost, devices welcomed at the
        first poll."""
        first: int | None = None
        deadline = time.monotonic() + FAILOVER_LIMIT_S
        while True:
            statuses = []
            for g in gens:
                await g.send("status")
                statuses.append(await g.expect("status", 30))
            welcomed = sum(s["welcomed_now"] for s in statuses)
            lost = sum(s["lost"] for s in statuses)
            if first is None:
                first = welcomed
            if welcomed == n and lost >= losses:
                return max(s["t_welcome"] for s in statuses), lost, first
            if time.monotonic() > deadline:
                return None, lost, first
            await trio.sleep(0.1)
