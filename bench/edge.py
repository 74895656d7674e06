"""Scenarios at the hub's edge: a connection surge (everyone at once) and slow handshakes beside good devices."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import trio

from bench import profile
from bench.procs import Child, cpu_seconds, rss_bytes

__all__ = ["EdgeScenarios"]

#: Seconds of py-spy sampling of the hub at the start of the (idle-machine) surge: what each connect costs.
SURGE_PROFILE_SECONDS = 20.0
#: Devices one generator process connects in the surge.
SURGE_PER_GENERATOR = 5000
#: Source addresses the surge's devices come from (100 devices each at 15,000): a fleet, not one NAT.
SURGE_ADDRESSES = tuple(f"127.1.{i // 250}.{i % 250 + 1}" for i in range(150))
#: A surging device gives up an attempt after this long (device_client's default connect timeout is 10 s) and
#: tries again, with backoff or after the hub's Retry-After, until it is in.
SURGE_CONNECT_TIMEOUT = 10.0
SURGE_ATTEMPTS = 1000
#: A surge not complete after this long is reported as it stands (devices connected, devices left out).
SURGE_DEADLINE = 300.0
#: The good devices beside the slow-handshake attack: few, streaming steadily, every ack timed.
GOOD_DEVICES = 10
GOOD_INTERVAL = 0.05
GOOD_POINTS = 10


class EdgeScenarios:
    """Mixed into `bench.run.Bench`: uses its plan, targets, generators and source addresses."""

    plan: Any
    tokens: list[str]
    logs: Any

    # -------------------------------------------------------------- surge

    async def surge(self, table: Any) -> dict[str, Any]:
        """N devices connecting at the same moment: time until all are in, timeouts, refusals; hub and transport."""
        runs = []
        for busy in (False, True) if self.plan.surge_busy else (False,):
            for target in self.plan.surge_targets:
                row = await self._guarded(self._surge, target, busy)  # type: ignore[attr-defined]
                table.row(row)
                runs.append(row)
        return {"runs": runs}

    async def _surge(self, target: str, busy: bool) -> dict[str, Any]:
        n = self.plan.surge_devices
        label = f"surge_{n}" + ("_busy" if busy else "")
        hog = subprocess.Popen([sys.executable, "-c", "while 1: pass"]) if busy else None
        try:
            async with self.target(target, label) as t:  # type: ignore[attr-defined]
                await trio.sleep(1.0)
                rss0, cpu0 = rss_bytes(t.pid), cpu_seconds(t.pid)
                spy = None
                if target == "hub" and not busy and profile.py_spy() is not None:
                    self.logs.mkdir(parents=True, exist_ok=True)
                    raw = self.logs / f"profile-{label}.txt"
                    spy = profile.record(t.pid, SURGE_PROFILE_SECONDS, raw)
                gens = await self.generators(  # type: ignore[attr-defined]
                    label,
                    t.port,
                    self.tokens[:n],
                    SURGE_PER_GENERATOR,
                    measurement="surge",
                    points=1,
                    duration=0,
                    connect_concurrency=SURGE_PER_GENERATOR,
                    connect_timeout=SURGE_CONNECT_TIMEOUT,
                    connect_attempts=SURGE_ATTEMPTS,
                    local_addresses=SURGE_ADDRESSES,
                    ready_deadline=SURGE_DEADLINE,
                )
                try:
                    readies = [await g.expect("ready", SURGE_DEADLINE + 60) for g in gens]
                    cpu1, rss1 = cpu_seconds(t.pid), rss_bytes(t.pid)
                finally:
                    await self.close_all(gens)  # type: ignore[attr-defined]
                    if spy is not None:
                        await trio.to_thread.run_sync(spy.wait)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
        errors: dict[str, int] = {}
        for r in readies:
            for k, v in r.get("errors", {}).items():
                errors[k] = errors.get(k, 0) + v
        connected = sum(x["connected"] for x in readies)
        top = None
        if spy is not None and raw.exists():
            summary = profile.summarise(raw)
            top = {k: summary.get(k) for k in ("samples", "threads", "top_self", "top_total_main")}
            print("surge, hub profile, top self:\n" + profile.format_top(summary, "top_self", 12), flush=True)
        return {
            "target": target,
            "busy": busy,
            "devices": n,
            "connected": connected,
            "failed": sum(x["failed"] for x in readies),
            "connect_s": max(x["t_ready"] for x in readies) - min(x["t_first"] for x in readies),
            "gave_up": any(x.get("gave_up") for x in readies),  # connect_s is then the deadline, not the end
            "timeouts": errors.get("connect:timeout", 0),
            "refusals": sum(x.get("refusals", 0) for x in readies),
            "server_cpu_s": cpu1 - cpu0,
            "rss_mib": (rss1 - rss0) / 2**20,
            "errors": errors,
            "profile": top,
        }

    # -------------------------------------------------------------- slow handshakes

    async def slowloris(self, table: Any) -> dict[str, Any]:
        """Good devices' ack latency, alone and beside sockets that trickle their upgrade request."""
        runs = []
        for sockets, sources in ((0, 1), *((self.plan.slow_sockets, s) for s in self.plan.slow_sources)):
            row = await self._guarded(self._slowloris, sockets, sources)  # type: ignore[attr-defined]
            table.row(row)
            runs.append(row)
        return {"runs": runs}

    async def _slowloris(self, sockets: int, sources: int) -> dict[str, Any]:
        label = f"slow_{sockets}_{sources}"
        measurement = self.measurement(label)  # type: ignore[attr-defined]
        async with self.target("hub", label) as t:  # type: ignore[attr-defined]
            attacker = None
            rss0 = rss_bytes(t.pid)
            if sockets:
                addresses = [f"127.0.1.{i + 1}" for i in range(sources)]
                args = ["bench.slowloris", "127.0.0.1", str(t.port), str(sockets), str(self.plan.slow_gap), *addresses]
                attacker = await Child.start(f"slowloris-{label}", args, self.logs)
                await attacker.expect("ready", 120)
                await trio.sleep(2 * self.plan.slow_gap)  # the attack is in its steady state
            gens = await self.generators(  # type: ignore[attr-defined]
                label,
                t.port,
                self.tokens[:GOOD_DEVICES],
                GOOD_DEVICES,
                measurement=measurement,
                points=GOOD_POINTS,
                interval=GOOD_INTERVAL,
                duration=self.plan.slow_seconds,
                ack_latency=True,
                connect_attempts=20,
            )
            cpu0 = cpu_seconds(t.pid)
            try:
                await self.ready(gens, GOOD_DEVICES)  # type: ignore[attr-defined]
                await self.go(gens)  # type: ignore[attr-defined]
                results = [await g.expect("result", self.plan.slow_seconds + 120) for g in gens]
                cpu1, rss1 = cpu_seconds(t.pid), rss_bytes(t.pid)
            finally:
                await self.close_all(gens)  # type: ignore[attr-defined]
                attack: dict[str, Any] = {}
                if attacker is not None:
                    await attacker.send("exit")
                    attack = await attacker.expect("result", 60)
                    await attacker.close()
        latency = results[0]["ack_latency"]
        return {
            "sockets": sockets,
            "sources": sources,
            "acked_msgs": results[0]["acked_msgs"],
            "p50_ms": latency.get("p50_ms"),
            "p99_ms": latency.get("p99_ms"),
            "max_ms": latency.get("max_ms"),
            "attack_opened": attack.get("opened", 0),
            "closed_by_hub": attack.get("closed_by_server", 0),
            "answered": attack.get("answered", 0),
            "server_cpu_s": cpu1 - cpu0,
            "rss_growth_mib": (rss1 - rss0) / 2**20,
        }
