"""The benchmark harness: `python -m bench [--quick]` runs every scenario, prints tables and writes a JSON file.

Processes: VictoriaMetrics (the sink), `hub serve` (a fresh one per scenario), the transport baseline
(`bench.baseline`) and load generators (`bench.gen`), all on loopback. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import attrs
import trio

from bench import cluster, outage, profile
from bench.cluster import ClusterScenarios
from bench.edge import EdgeScenarios
from bench.gen import GenSpec
from bench.jsonl import raise_fd_limit
from bench.procs import (
    Child,
    ChildError,
    HubProcess,
    VictoriaMetrics,
    cpu_seconds,
    descendants,
    hub_limit_overrides,
    rss_bytes,
    sched_threads,
    tree_cpu_seconds,
)
from bench.wire import FIELDS_PER_POINT

__all__ = ["Plan", "build_parser", "main", "plan_from_args", "run_bench"]

SCENARIOS = (
    "ingest",
    "connections",
    "surge",
    "slowloris",
    "commands",
    "storm",
    "profile",
    "outage",
    "workers",
    "cluster-commands",
    "failover",
)
#: Devices one generator process holds in the connection and storm scenarios (fds, and one core each).
IDLE_PER_GENERATOR = 5000
STORM_PER_GENERATOR = 2500
#: Generators bind 127.0.0.FIRST.. so that many connections and TIME_WAITs do not exhaust one address's ports.
FIRST_SOURCE = 2
LAST_SOURCE = 250
DRAIN_TIMEOUT = 30.0
VERIFY_TIMEOUT = 60.0


@attrs.frozen
class Plan:
    """What one harness run does."""

    quick: bool = False
    scenarios: tuple[str, ...] = SCENARIOS
    duration: float = 10.0  # seconds of sending per ingest run
    ingest: tuple[tuple[int, int], ...] = tuple((d, p) for d in (1, 100, 1000) for p in (1, 10, 100))
    sdk: tuple[tuple[int, int], ...] = ((100, 10), (100, 100))  # (devices, points) through device_client
    connections: tuple[int, ...] = (1000, 5000, 15000)
    command_devices: int = 1000
    commands: int = 500
    # The commands go to this many of the streaming devices, simulated in a generator process of their own (0: all
    # in one process, as before 2026-12-05). A device is a machine of its own: it never waits for 999 others' acks.
    command_targets: int = 10
    # Seconds from one command's answer to the next command (0: one after another). Back to back, the command path
    # is half the hub's work in the window; spaced out, a command meets the stream as an operator's would.
    command_gap: float = 0.0
    # Also run the relay acking each telemetry message as it arrives (a third row, "transport+acks"): the relay of
    # record acks nothing, so its streaming devices' generator has no acks to read either.
    relay_acks: bool = False
    command_interval: float = 1.0  # the command scenario's streaming: one message per device per interval ...
    command_points: int = 10  # ... of this many points
    storm_devices: int = 5000
    storm_interval: float = 5.0
    storm_points: int = 10
    profile_devices: int = 1000
    profile_points: int = 10
    profile_seconds: float = 15.0
    profile_gil: bool = False  # py-spy --gil: only samples of the thread holding the GIL (who holds it, how long)
    surge_devices: int = 15000  # connecting all at once
    surge_busy: bool = True  # also with a CPU hog beside them
    surge_targets: tuple[str, ...] = ("hub", "transport")
    slow_sockets: int = 2000  # sockets trickling their upgrade request beside good devices ...
    slow_sources: tuple[int, ...] = (1, 50)  # ... from this many addresses (one run each)
    slow_gap: float = 2.0  # ... a byte every this many seconds
    slow_seconds: float = 20.0  # the good devices' streaming time in each run
    workers_ingest: tuple[tuple[int, int], ...] = ((100, 100), (1000, 10))  # loads of the workers scenario ...
    workers: tuple[int, ...] = (1, 2)  # ... on Redis with these `--workers` (beside SQLite, one process)
    workers_rounds: int = 1  # ... each combination this many times, interleaved
    cluster_runs: int = 3  # cluster-commands: repetitions (command_devices stream, `commands` sent each)
    failover_devices: int = 10000
    failover_hubs: int = 3
    failover_interval: float = 5.0  # one message per device per interval ...
    failover_points: int = 10  # ... of this many points
    hub_args: tuple[str, ...] = ()


QUICK = Plan(
    quick=True,
    scenarios=("ingest", "connections", "commands", "storm"),
    duration=3.0,
    ingest=((1, 100), (100, 10)),
    sdk=((100, 10),),
    connections=(1000,),
    command_devices=1000,
    commands=100,
    storm_devices=1000,
    profile_seconds=5.0,
    surge_devices=2000,
    surge_busy=False,
    slow_sockets=300,
    slow_sources=(1,),
    workers_ingest=((100, 100),),
    cluster_runs=1,
    failover_devices=1000,
)


def _combos(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for item in text.split(","):
        if item.strip():
            devices, _, points = item.strip().partition("x")
            out.append((int(devices), int(points)))
    return tuple(out)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names_of(known: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated subset of `known`."""

    def names(text: str) -> tuple[str, ...]:
        got = tuple(x.strip() for x in text.split(",") if x.strip())
        unknown = set(got) - set(known)
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown: {', '.join(sorted(unknown))}; known: {', '.join(known)}")
        return got

    return names


_names = _names_of(SCENARIOS)


def build_parser() -> argparse.ArgumentParser:
    """The harness's command line."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the hub against VictoriaMetrics and a bare trio-websocket server, on loopback.",
    )
    p.add_argument("--quick", action="store_true", help="a short run: fewer combinations, smaller fleets, 3 s runs")
    p.add_argument("--scenarios", type=_names, help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--duration", type=float, help="seconds of sending per ingest run (default 10, quick 3)")
    p.add_argument("--ingest", type=_combos, metavar="DxP,...", help="lean ingest runs: devices x points/message")
    p.add_argument("--sdk", type=_combos, metavar="DxP,...", help="ingest runs through device_client ('' for none)")
    p.add_argument("--connections", type=_ints, metavar="N,...", help="idle fleet sizes")
    p.add_argument("--command-devices", type=int, metavar="N", help="streaming devices in the command scenario")
    p.add_argument("--commands", type=int, metavar="N", help="commands sent, one after another (see --command-gap)")
    p.add_argument(
        "--command-targets",
        type=int,
        metavar="N",
        help="commanded devices, simulated in a process of their own (default 10; 0: one process for all)",
    )
    p.add_argument(
        "--command-gap",
        type=float,
        metavar="S",
        help="seconds from one command's answer to the next command (default 0: one after another)",
    )
    p.add_argument(
        "--relay-acks",
        action="store_true",
        help="commands: also run the relay acking each telemetry message on arrival (a third row)",
    )
    p.add_argument("--storm-devices", type=int, metavar="N", help="devices in the reconnect storm")
    p.add_argument("--surge-devices", type=int, metavar="N", help="devices connecting at once in the surge")
    p.add_argument("--slow-sockets", type=int, metavar="N", help="slow-handshake sockets beside good devices")
    p.add_argument("--slow-sources", type=_ints, metavar="N,...", help="addresses the slow sockets come from (1,50)")
    p.add_argument("--surge-targets", type=_names_of(("hub", "transport")), help="hub,transport (default both)")
    p.add_argument(
        "--surge-busy", choices=("yes", "no"), help="also run the surge beside a CPU hog (default yes, quick no)"
    )
    p.add_argument("--profile", type=_combos, metavar="DxP", help="load while profiling (default 1000x10)")
    p.add_argument("--profile-seconds", type=float, metavar="S", help="py-spy sampling time")
    p.add_argument("--profile-gil", action="store_true", help="sample only the thread holding the GIL (py-spy --gil)")
    p.add_argument("--workers-ingest", type=_combos, metavar="DxP,...", help="loads of the workers scenario")
    p.add_argument("--workers", type=_ints, metavar="N,...", help="--workers counts on Redis (default 1,2)")
    p.add_argument("--workers-rounds", type=int, metavar="N", help="times each workers combination runs")
    p.add_argument("--cluster-runs", type=int, metavar="N", help="repetitions of cluster-commands (default 3)")
    p.add_argument("--failover-devices", type=int, metavar="N", help="devices over the failover's hubs")
    p.add_argument("--hub-arg", action="append", default=[], metavar="ARG", help="extra `hub serve` argument")
    p.add_argument("--out", type=Path, help="results file (default var/bench/results-<time>.json)")
    p.add_argument("--work-dir", type=Path, help="keep data and logs here (default: a temporary directory)")
    return p


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The plan the command line asks for."""
    plan = QUICK if args.quick else Plan()
    changes: dict[str, Any] = {}
    for key in (
        "scenarios",
        "duration",
        "ingest",
        "sdk",
        "connections",
        "command_devices",
        "commands",
        "command_targets",
        "command_gap",
    ):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    for key in ("storm_devices", "surge_devices", "slow_sockets", "slow_sources", "surge_targets", "workers_ingest"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    for key in ("workers", "workers_rounds", "cluster_runs", "failover_devices"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    if args.surge_busy is not None:
        changes["surge_busy"] = args.surge_busy == "yes"
    if args.profile_seconds is not None:
        changes["profile_seconds"] = args.profile_seconds
    if args.profile_gil:
        changes["profile_gil"] = True
    if args.relay_acks:
        changes["relay_acks"] = True
    if args.profile:
        changes["profile_devices"], changes["profile_points"] = args.profile[0]
    if args.hub_arg:
        changes["hub_args"] = tuple(args.hub_arg)
    return attrs.evolve(plan, **changes)


# ---------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    versions = {}
    for dist in ("trio", "trio-websocket", "wsproto", "influxdb-client", "py-spy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "git_commit": commit,
        "git_dirty": dirty,
        "load_avg_at_start": os.getloadavg(),
    }


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


# ---------------------------------------------------------------------------- tables


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


TABLES: dict[str, list[tuple[str, str]]] = {
    "ingest": [
        ("target", "target"),
        ("client", "client"),
        ("devices", "devices"),
        ("pts/msg", "points_per_message"),
        ("points/s", "points_per_s"),
        ("msgs/s", "messages_per_s"),
        ("x transport", "ratio_to_transport"),
        ("CPU s/Mpt", "cpu_s_per_mpoint"),
        ("CPU %", "cpu_percent"),
        ("gen CPU %", "generator_cpu_percent"),
        ("points", "points"),
        ("in DB", "db_points"),
        ("verified", "db_verified"),
    ],
    "connections": [
        ("target", "target"),
        ("devices", "devices"),
        ("connected", "connected"),
        ("connect s", "connect_s"),
        ("server CPU s", "server_cpu_s"),
        ("RSS MiB", "rss_mib"),
        ("KiB/conn", "kib_per_connection"),
    ],
    "surge": [
        ("target", "target"),
        ("busy", "busy"),
        ("devices", "devices"),
        ("connected", "connected"),
        ("all in s", "connect_s"),
        ("cut off", "gave_up"),
        ("timeouts", "timeouts"),
        ("refusals", "refusals"),
        ("server CPU s", "server_cpu_s"),
    ],
    "slowloris": [
        ("slow socks", "sockets"),
        ("addresses", "sources"),
        ("acked msgs", "acked_msgs"),
        ("ack p50 ms", "p50_ms"),
        ("ack p99 ms", "p99_ms"),
        ("ack max ms", "max_ms"),
        ("closed", "closed_by_hub"),
        ("server CPU s", "server_cpu_s"),
        ("RSS +MiB", "rss_growth_mib"),
    ],
    "commands": [
        ("target", "target"),
        ("devices", "devices"),
        ("targets", "targets"),
        ("commands", "commands"),
        ("ok", "succeeded"),
        ("p50 ms", "p50_ms"),
        ("p95 ms", "p95_ms"),
        ("p99 ms", "p99_ms"),
        ("max ms", "max_ms"),
        ("stream pts/s", "stream_points_per_s"),
        ("hops p50/p99 ms", "hops_ms"),
        ("slowest: its hops ms", "slowest_ms"),
        ("cores / run-queue wait us per slice", "sched_cell"),
    ],
    "storm": [
        ("target", "target"),
        ("devices", "devices"),
        ("dropped", "dropped"),
        ("all back s", "back_s"),
        ("server CPU s", "server_cpu_s"),
        ("gen CPU s", "generator_cpu_s"),
        ("acked", "acked_points"),
        ("in DB", "db_points"),
        ("lost", "points_lost"),
        ("verified", "db_verified"),
    ],
    "profile": [
        ("devices", "devices"),
        ("pts/msg", "points_per_message"),
        ("points/s", "points_per_s"),
        ("samples", "samples"),
        ("main thr %", "main_thread_percent"),
    ],
    "outage": outage.TABLE,
    **cluster.TABLES,
}


class Table:
    """Prints rows of one scenario as they come."""

    def __init__(self, name: str) -> None:
        self.columns = TABLES[name]
        self.widths = [max(12, len(h) + 1) for h, _ in self.columns]
        print(f"\n== {name}")
        print("".join(_cell(h, w) for (h, _), w in zip(self.columns, self.widths, strict=True)), flush=True)

    def row(self, values: dict[str, Any]) -> None:
        """Print one row."""
        if "error" in values:
            print(f"   error: {values['error']}", flush=True)
            return
        cells = [_fmt(values.get(key)) for _, key in self.columns]
        print("".join(_cell(c, w) for c, w in zip(cells, self.widths, strict=True)), flush=True)


def _cell(text: str, width: int) -> str:
    """`text` right-aligned in `width`, with a space before it however long it is (cells never run together)."""
    return text.rjust(width) if len(text) < width else " " + text


# ---------------------------------------------------------------------------- the bench


#: A command's steps, as `hops_ms` names them: the request reaching its hub (queued), the frame written to the device
#: (sent), the device's ack back (delivered), its result back (succeeded), and the reply reaching the operator.
HOPS = ("request", "to device", "ack", "result", "reply")


def hop_figures(hops: dict[str, list[float]]) -> str:
    """Each hop's p50/p99 in ms, in one cell: ``request 0.4/1.2 · to device ...``."""
    cells = []
    for hop in HOPS:
        ms = sorted(x * 1000 for x in hops.get(hop, ()))
        if ms:
            cells.append(f"{hop} {_percentile(ms, 50):.2g}/{_percentile(ms, 99):.2g}")
    return " · ".join(cells)


def slowest_figure(hops: dict[str, list[float]]) -> str | None:
    """The slowest command and its hops in ms, in one cell: ``12 = request 0.2 · to device 0.1 · ack 11 · ...``, from
    what `_hub_commands` keeps beside the hops (under "slowest": its time, then its steps); None without it."""
    slowest = hops.get("slowest", [])
    if len(slowest) < 2:
        return None
    took, *steps = slowest
    cells = [f"{hop} {step * 1000:.2g}" for hop, step in zip(HOPS, steps, strict=False)]
    return f"{took * 1000:.3g} = " + " · ".join(cells)


#: `sched_threads` of a role's processes: by (process id, thread id).
SchedWindow = dict[str, dict[tuple[int, int], tuple[float, float, int]]]


def sched_window(roles: dict[str, list[int]]) -> SchedWindow:
    """`sched_threads` of each role's processes (a process gone meanwhile counts nothing)."""
    out: SchedWindow = {}
    for role, pids in roles.items():
        threads = out[role] = {}
        for pid in pids:
            with contextlib.suppress(OSError):
                threads.update(((pid, tid), figures) for tid, figures in sched_threads(pid).items())
    return out


def sched_figures(before: SchedWindow, after: SchedWindow, seconds: float) -> dict[str, dict[str, float]]:
    """Each role's share of the machine over a window of `seconds` (two `sched_window`s): the CPUs it used (`cores`),
    and how long its threads waited in a run queue for one, per second (`wait_ms_per_s`) and per timeslice
    (`wait_us_per_slice`): whether the processes a command passes through got a CPU when they had work.

    Counted thread by thread: one that ended in the window drops out (a sum over the live threads would go down), one
    that started in it (or took an ended one's id) counts from zero."""
    out = {}
    for role, threads in after.items():
        earlier = before.get(role, {})
        run = wait = 0.0
        slices = 0
        for key, (run1, wait1, slices1) in threads.items():
            run0, wait0, slices0 = earlier.get(key, (0.0, 0.0, 0))
            if run1 < run0 or wait1 < wait0 or slices1 < slices0:  # not the same thread
                run0, wait0, slices0 = 0.0, 0.0, 0
            run, wait, slices = run + run1 - run0, wait + wait1 - wait0, slices + slices1 - slices0
        out[role] = {
            "cores": run / seconds,
            "wait_ms_per_s": wait / seconds * 1000,
            "wait_us_per_slice": wait / slices * 1e6 if slices > 0 else 0.0,
        }
    return out


def sched_cell(figures: dict[str, dict[str, float]]) -> str:
    """`sched_figures` in one cell: ``hub 0.52/56 · fleet 0.25/85 · ...`` (cores / µs waited per timeslice)."""
    return " · ".join(f"{role} {f['cores']:.2f}/{f['wait_us_per_slice']:.0f}" for role, f in figures.items())


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@attrs.define
class Target:
    """What the load goes to in one run: a hub or the transport baseline."""

    kind: str  # "hub" or "transport"
    pid: int
    port: int
    hub: HubProcess | None = None
    baseline: Child | None = None


class Bench(EdgeScenarios, ClusterScenarios):
    """One harness run: VictoriaMetrics for all of it, a fresh hub (or baseline server) per scenario."""

    def __init__(self, plan: Plan, work: Path) -> None:
        self.plan = plan
        self.work = work
        self.logs = work / "logs"
        self.vm = VictoriaMetrics(work / "victoria-metrics")
        self.overrides = hub_limit_overrides()
        self.tokens: list[str] = []
        self.operator_token = ""
        self._runs = 0
        self._source = FIRST_SOURCE

    # -------------------------------------------------------------- setup

    def register(self, devices: int) -> None:
        """Register `devices` devices and an operator once, in a registry file each hub starts from."""
        from hub.fleet import Registry

        path = self.work / "registry-template" / "registry.sqlite3"
        path.parent.mkdir(parents=True, exist_ok=True)
        with Registry(path) as registry:
            self.tokens = [registry.add(f"bench-{i:05d}") for i in range(devices)]
            self.operator_token = registry.add_operator("bench", "operator")
        for suffix in ("-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)

    def start_hub(self, label: str) -> HubProcess:
        """A fresh hub writing to VictoriaMetrics, with the registered devices."""
        self._runs += 1
        data_dir = self.work / f"hub-{self._runs:02d}-{label}"
        data_dir.mkdir(parents=True)
        shutil.copy(self.work / "registry-template" / "registry.sqlite3", data_dir / "registry.sqlite3")
        overrides = {
            **self.overrides,
            "influx.url": self.vm.url,
            "influx.org": "bench",
            "influx.bucket": "bench",
        }
        hub = HubProcess(data_dir, overrides, self.plan.hub_args)
        hub.start()
        return hub

    async def start_baseline(self, label: str, *, ack: bool = False) -> tuple[Child, int]:
        """A fresh transport-baseline server (acking each telemetry message with `ack`); it and its port."""
        self._runs += 1
        args = ["bench.baseline", "--ack"] if ack else ["bench.baseline"]
        child = await Child.start(f"baseline-{self._runs:02d}-{label}", args, self.logs)
        port = (await child.expect("listening", 20))["port"]
        return child, int(port)

    @asynccontextmanager
    async def target(self, kind: str, label: str, *, ack: bool = False) -> AsyncIterator[Target]:
        """A fresh hub (`kind` "hub") or transport baseline (`kind` "transport", acking telemetry with `ack`), stopped
        on exit."""
        if kind == "hub":
            hub = self.start_hub(label)
            target = Target(kind, hub.pid, hub.port, hub=hub)
        else:
            child, port = await self.start_baseline(label, ack=ack)
            target = Target(kind, child.pid, port, baseline=child)
        try:
            yield target
        finally:
            if target.hub is not None:
                await trio.to_thread.run_sync(target.hub.wait_disconnected, abandon_on_cancel=True)
                target.hub.stop()
            if target.baseline is not None:
                await target.baseline.close()

    def measurement(self, label: str) -> str:
        """A measurement name of its own for each run, so its points are counted apart."""
        self._runs += 1
        return f"b{self._runs:02d}_{label}"

    async def generators(
        self, label: str, port: int, tokens: Sequence[str], per_process: int, **spec: Any
    ) -> list[Child]:
        """Start generator processes for `tokens` (at most `per_process` devices each, each from its own address)."""
        children = []
        for index in range(0, len(tokens), per_process):
            chunk = tokens[index : index + per_process]
            source = f"127.0.0.{self._source}"
            self._source = FIRST_SOURCE if self._source >= LAST_SOURCE else self._source + 1
            gen = GenSpec(host="127.0.0.1", port=port, tokens=tuple(chunk), local_address=source, **spec)
            name = f"gen-{self._runs:02d}-{label}-{index // per_process}"
            spec_path = self.logs / f"{name}.json"
            self.logs.mkdir(parents=True, exist_ok=True)
            spec_path.write_text(json.dumps(attrs.asdict(gen)))
            children.append(await Child.start(name, ["bench.gen", str(spec_path)], self.logs))
        return children

    async def ready(self, gens: Sequence[Child], devices: int) -> list[dict[str, Any]]:
        """Wait until every generator has connected its devices; their `ready` events."""
        timeout = 60 + devices / 50
        return [await g.expect("ready", timeout) for g in gens]

    async def go(self, gens: Sequence[Child]) -> None:
        """Tell every generator to start sending."""
        for g in gens:
            await g.send("go")

    async def close_all(self, gens: Sequence[Child]) -> None:
        """Tell every generator to exit and wait for them."""
        async with trio.open_nursery() as nursery:
            for g in gens:
                nursery.start_soon(g.close)

    async def verify(self, measurement: str, acked_points: int, drained: bool) -> dict[str, Any]:
        """Poll VictoriaMetrics until it holds every acked point of `measurement` (bounded); the counts."""
        expected = acked_points * FIELDS_PER_POINT
        regex = f"{measurement}_(value|n)"
        deadline = trio.current_time() + VERIFY_TIMEOUT
        samples = 0
        while True:
            samples = await trio.to_thread.run_sync(self.vm.count, regex)
            if samples >= expected or trio.current_time() > deadline:
                break
            await trio.sleep(0.5)
        db_points = samples // FIELDS_PER_POINT
        lost = max(0, acked_points - db_points)
        # Drained: every sent point was acked, so the database must hold exactly those. Not drained: points in
        # flight may or may not be there, but every acked one must be.
        verified = lost == 0 and (db_points == acked_points if drained else True)
        return {"db_points": db_points, "points_lost": lost, "db_verified": verified}

    # -------------------------------------------------------------- ingest

    async def ingest(self, table: Table) -> dict[str, Any]:
        """Points/s acked after durable write, against the transport baseline at the same load."""
        plan = self.plan
        rows: list[dict[str, Any]] = []
        runs = [("lean", d, p) for d, p in plan.ingest] + [("sdk", d, p) for d, p in plan.sdk]
        baseline_rate: dict[tuple[int, int], float] = {}
        async with self.target("hub", "ingest") as hub, self.target("transport", "ingest") as transport:
            for client, devices, points in runs:
                row = await self._guarded(self._ingest_hub, hub, client, devices, points)
                base = None
                if client == "lean" or (devices, points) not in baseline_rate:
                    base = await self._guarded(self._ingest_baseline, transport, devices, points)
                    if "points_per_s" in base:
                        baseline_rate[(devices, points)] = base["points_per_s"]
                rate = baseline_rate.get((devices, points))
                if "points_per_s" in row and rate:
                    row["transport_points_per_s"] = rate
                    row["ratio_to_transport"] = row["points_per_s"] / rate
                rows.append(row)
                table.row(row)
                if base is not None:
                    rows.append(base)
                    table.row(base)
        assert hub.hub is not None
        return {"runs": rows, "hub_overrides": hub.hub.overrides}

    async def _guarded(self, fn: Callable[..., Awaitable[dict[str, Any]]], *args: Any) -> dict[str, Any]:
        try:
            return await fn(*args)
        except ChildError as exc:
            return {"error": str(exc)[:2000], "args": [a for a in args if isinstance(a, int | str)]}

    async def _ingest_hub(
        self,
        hub: Target,
        client: str,
        devices: int,
        points: int,
        tokens: Sequence[str] | None = None,
        redis_pid: int | None = None,
    ) -> dict[str, Any]:
        """One ingest run against a hub (with `tokens` if not the template registry's; Redis's CPU if given)."""
        plan = self.plan
        measurement = self.measurement(f"{client}_{devices}x{points}")
        gens = await self.generators(
            measurement,
            hub.port,
            (self.tokens if tokens is None else tokens)[:devices],
            devices,
            measurement=measurement,
            points=points,
            duration=plan.duration,
            client=client,
            drain_timeout=DRAIN_TIMEOUT,
        )
        try:
            readies = await self.ready(gens, devices)
            # The hub and any processes it started (the workers of `--workers N`).
            cpu0, vm0 = tree_cpu_seconds(hub.pid), cpu_seconds(self.vm.pid)
            redis0 = cpu_seconds(redis_pid) if redis_pid else 0.0
            await self.go(gens)
            results = [await g.expect("result", plan.duration + DRAIN_TIMEOUT + 60) for g in gens]
            cpu1, vm1 = tree_cpu_seconds(hub.pid), cpu_seconds(self.vm.pid)
            redis1 = cpu_seconds(redis_pid) if redis_pid else 0.0
        finally:
            await self.close_all(gens)
        r = _merge(results)
        elapsed = max(r["t_last_ack"] - r["t_go"], 1e-9)
        hub_cpu = cpu1 - cpu0
        row = {
            "target": "hub",
            "client": client,
            "devices": devices,
            "connected": sum(x["connected"] for x in readies),
            "points_per_message": points,
            "measurement": measurement,
            "duration_s": plan.duration,
            "elapsed_s": elapsed,
            "sent_points": r["sent_points"],
            "points": r["acked_points"],
            "messages": r["acked_msgs"],
            "points_per_s": r["acked_points"] / elapsed,
            "messages_per_s": r["acked_msgs"] / elapsed,
            "drained": r["drained"],
            "cpu_s": hub_cpu,
            "cpu_percent": 100 * hub_cpu / elapsed,  # CPU over the measured window: go to the last ack
            "cpu_s_per_mpoint": hub_cpu / r["acked_points"] * 1e6 if r["acked_points"] else None,
            "vm_cpu_percent": 100 * (vm1 - vm0) / elapsed,
            "redis_cpu_s": redis1 - redis0 if redis_pid else None,
            "redis_cpu_s_per_mpoint": (redis1 - redis0) / r["acked_points"] * 1e6
            if redis_pid and r["acked_points"]
            else None,
            "generator_cpu_percent": 100 * r["cpu_s"] / elapsed,
            "generator": r,
        }
        row.update(await self.verify(measurement, r["acked_points"], r["drained"]))
        return row

    async def _ingest_baseline(self, transport: Target, devices: int, points: int) -> dict[str, Any]:
        plan = self.plan
        label = f"base_{devices}x{points}"
        gens = await self.generators(
            label,
            transport.port,
            self.tokens[:devices],
            devices,
            measurement="baseline",
            points=points,
            duration=plan.duration,
            acks=False,
        )
        baseline = transport.baseline
        assert baseline is not None
        try:
            await self.ready(gens, devices)
            await baseline.send("reset")
            cpu0 = cpu_seconds(baseline.pid)
            await self.go(gens)
            results = [await g.expect("result", plan.duration + 60) for g in gens]
            sent = sum(x["sent_msgs"] for x in results)
            report: dict[str, Any] = {}
            with trio.move_on_after(20):
                while True:
                    await baseline.send("report")
                    report = await baseline.expect("report", 10)
                    if report["messages"] >= sent:
                        break
                    await trio.sleep(0.1)
            cpu1 = cpu_seconds(baseline.pid)
        finally:
            await self.close_all(gens)
        r = _merge(results)
        messages = report.get("messages", 0)
        elapsed = max(report.get("t_last", 0) - report.get("t_first", 0), 1e-9)
        received = messages * points
        cpu = cpu1 - cpu0
        return {
            "target": "transport",
            "client": "lean",
            "devices": devices,
            "points_per_message": points,
            "elapsed_s": elapsed,
            "sent_points": r["sent_points"],
            "points": received,
            "messages": messages,
            "points_per_s": received / elapsed,
            "messages_per_s": messages / elapsed,
            "cpu_s": cpu,
            "cpu_percent": 100 * cpu / elapsed,
            "cpu_s_per_mpoint": cpu / received * 1e6 if received else None,
            "generator_cpu_percent": 100 * r["cpu_s"] / elapsed,
            "complete": messages >= r["sent_msgs"],
        }

    # -------------------------------------------------------------- connections

    async def connections(self, table: Table) -> dict[str, Any]:
        """Idle devices held: RSS per connection and time to connect them all, hub and bare transport."""
        rows = []
        for n in self.plan.connections:
            rows += await self._on_both_targets(table, self._connections, n)
        return {"runs": rows}

    async def _connections(self, target: str, n: int) -> dict[str, Any]:
        label = f"idle_{n}"
        async with self.target(target, label) as t:
            await trio.sleep(1.0)
            rss0, cpu0 = rss_bytes(t.pid), cpu_seconds(t.pid)
            gens = await self.generators(
                label, t.port, self.tokens[:n], IDLE_PER_GENERATOR, measurement="idle", points=1, duration=0
            )
            try:
                readies = await self.ready(gens, n)
                cpu1 = cpu_seconds(t.pid)
                await trio.sleep(2.0)  # let the last sessions settle (presence points, command offers)
                rss1 = rss_bytes(t.pid)
            finally:
                await self.close_all(gens)
        connected = sum(x["connected"] for x in readies)
        return {
            "target": target,
            "devices": n,
            "connected": connected,
            "failed": sum(x["failed"] for x in readies),
            "connect_s": max(x["t_ready"] for x in readies) - min(x["t_first"] for x in readies),
            "rss_before_mib": rss0 / 2**20,
            "rss_mib": rss1 / 2**20,
            "kib_per_connection": (rss1 - rss0) / 1024 / connected if connected else None,
            "server_cpu_s": cpu1 - cpu0,  # while the devices connected
            "generator_cpu_s": sum(x["cpu_s"] for x in readies),  # their whole lives, start-up included
            "generators": len(gens),
            "errors": _merge_counts(x.get("errors", {}) for x in readies),
        }

    # -------------------------------------------------------------- commands

    async def commands(self, table: Table) -> dict[str, Any]:
        """Round-trip latency operator -> device -> operator while the devices stream."""
        runs = await self._on_both_targets(table, self._commands)
        if self.plan.relay_acks:
            row = await self._guarded(self._commands, "transport", True)
            table.row(row)
            runs.append(row)
        return {"runs": runs}

    async def _commands(self, target: str, acking: bool = False) -> dict[str, Any]:
        """One target's row; `acking`: the transport acks each telemetry message (`--relay-acks`)."""
        plan = self.plan
        n = plan.command_devices
        # The commanded devices stream like the rest, from a process of their own: in one process with all the
        # others, a command waited whenever a write's acks for ~50 other devices had just come in (2-5 ms of the
        # generator's loop), a cost of simulating a fleet in one process that no real device pays.
        apart = min(plan.command_targets, n)
        label = f"cmd_{n}"
        measurement = self.measurement(label)
        async with self.target(target, label, ack=acking) as t:
            stream = {
                "measurement": measurement,
                "points": plan.command_points,
                "interval": plan.command_interval,
                "duration": 0,
                "acks": target == "hub" or acking,
                "drain_timeout": DRAIN_TIMEOUT,
            }
            fleet = await self.generators(label, t.port, self.tokens[: n - apart], n, **stream)
            commanded = []
            if apart:
                commanded = await self.generators(f"{label}_targets", t.port, self.tokens[n - apart : n], n, **stream)
            gens = fleet + commanded
            try:
                await self.ready(gens, n)
                await self.go(gens)
                await trio.sleep(min(2.0, plan.command_interval * 2))
                names = [token.rpartition(".")[0] for token in self.tokens[n - apart if apart else 0 : n]]
                hops: dict[str, list[float]] = {}
                # What the processes a command passes through got of the machine while the commands ran.
                roles = {
                    "hub" if target == "hub" else "relay": [t.pid, *descendants(t.pid)],
                    "fleet": [g.pid for g in fleet],
                    "commanded": [g.pid for g in commanded],
                    "operator": [os.getpid()],
                }
                if target == "hub":
                    roles["database"] = [self.vm.pid]
                sched0, started = sched_window(roles), time.monotonic()
                if target == "hub":
                    latencies, failures = await self._hub_commands(t.port, names, self.operator_token, hops)
                else:
                    latencies, failures = await self._relay_commands(t.port, names)
                sched = sched_figures(sched0, sched_window(roles), time.monotonic() - started)
                for g in gens:
                    await g.send("stop")
                results = [await g.expect("result", DRAIN_TIMEOUT + 60) for g in gens]
            finally:
                await self.close_all(gens)
        r = _merge(results)
        ms = sorted(x * 1000 for x in latencies)
        row = {
            "target": "transport+acks" if acking else target,
            "devices": n,
            "targets": f"{apart} apart" if apart else "all",
            "commands": plan.commands,
            "command_gap_s": plan.command_gap,
            "succeeded": len(ms),
            "failures": failures,
            "p50_ms": _percentile(ms, 50),
            "p95_ms": _percentile(ms, 95),
            "p99_ms": _percentile(ms, 99),
            "max_ms": ms[-1] if ms else None,
            "mean_ms": statistics.fmean(ms) if ms else None,
            "stream_points_per_s": n * plan.command_points / plan.command_interval,
            "hops_ms": hop_figures(hops) if hops else None,
            "slowest_ms": slowest_figure(hops) if hops else None,
            "sched": sched,
            "sched_cell": sched_cell(sched),
            "generator": r,
        }
        if target == "hub":
            row.update(await self.verify(measurement, r["acked_points"], r["drained"]))
        return row

    async def _hub_commands(
        self, port: int, names: list[str], operator_token: str, hops: dict[str, list[float]] | None = None
    ) -> tuple[list[float], dict[str, int]]:
        """`plan.commands` ping commands one after another through the hub at `port` (after 5 not counted).

        With `hops`, each succeeded command's time between its steps is added to it (`HOPS`, from its history's
        wall-clock times, each taken when the hub that owns it recorded the step; this machine's one clock).
        """
        from hub.operator import ClientError, open_control

        latencies: list[float] = []
        failures: dict[str, int] = {}
        warmup = 5
        async with open_control(f"ws://127.0.0.1:{port}/v1/control", operator_token) as control:
            for i in range(warmup + self.plan.commands):
                if i and self.plan.command_gap:
                    await trio.sleep(self.plan.command_gap)
                device = names[(i * 7919) % len(names)]
                started, wall = time.perf_counter(), time.time()
                try:
                    record = await control.send_command(device, "ping", {}, wait=True, wait_timeout=10)
                except ClientError as exc:
                    failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                    continue
                took = time.perf_counter() - started
                state = record.get("state")
                if state != "succeeded":
                    failures[str(state)] = failures.get(str(state), 0) + 1
                elif i >= warmup:
                    latencies.append(took)
                    if hops is not None:
                        at = [wall, *(float(h["at"]) for h in record["history"]), wall + took]
                        steps = [end - start for start, end in itertools.pairwise(at)]
                        for hop, step in zip(HOPS, steps, strict=False):
                            hops.setdefault(hop, []).append(step)
                        if took > hops.get("slowest", [0.0])[0]:
                            hops["slowest"] = [took, *steps[: len(HOPS)]]
        return latencies, failures

    async def _relay_commands(self, port: int, names: list[str]) -> tuple[list[float], dict[str, int]]:
        from trio_websocket import open_websocket_url

        latencies: list[float] = []
        failures: dict[str, int] = {}
        warmup = 5
        async with open_websocket_url(f"ws://127.0.0.1:{port}/relay") as ws:
            for i in range(warmup + self.plan.commands):
                if i and self.plan.command_gap:
                    await trio.sleep(self.plan.command_gap)
                device = names[(i * 7919) % len(names)]
                started = time.perf_counter()
                await ws.send_message(json.dumps({"device": device, "id": f"c{i}"}))
                with trio.move_on_after(10) as timeout:
                    answer = json.loads(await ws.get_message())
                took = time.perf_counter() - started
                if timeout.cancelled_caught:
                    failures["timeout"] = failures.get("timeout", 0) + 1
                    break  # a late answer would be taken for the next command's
                if not answer.get("ok"):
                    failures["error"] = failures.get("error", 0) + 1
                elif i >= warmup:
                    latencies.append(took)
        return latencies, failures

    # -------------------------------------------------------------- reconnect storm

    async def storm(self, table: Table) -> dict[str, Any]:
        """Drop every connection at once; time until all are back, and points lost (must be 0)."""
        return {"runs": await self._on_both_targets(table, self._storm)}

    async def _on_both_targets(self, table: Table, run: Any, *args: Any) -> list[dict[str, Any]]:
        """`run(target, *args)` against the hub, then the bare transport; each row printed as it finishes."""
        rows = []
        for target in ("hub", "transport"):
            row = await self._guarded(run, target, *args)
            rows.append(row)
            table.row(row)
        return rows

    async def _storm(self, target: str) -> dict[str, Any]:
        plan = self.plan
        n = plan.storm_devices
        label = f"storm_{n}"
        measurement = self.measurement(label)
        async with self.target(target, label) as t:
            gens = await self.generators(
                label,
                t.port,
                self.tokens[:n],
                STORM_PER_GENERATOR,
                measurement=measurement,
                points=plan.storm_points,
                interval=plan.storm_interval,
                duration=0,
                acks=target == "hub",
                drain_timeout=DRAIN_TIMEOUT,
            )
            try:
                await self.ready(gens, n)
                await self.go(gens)
                await trio.sleep(min(3.0, plan.storm_interval))
                cpu0 = cpu_seconds(t.pid)
                for g in gens:
                    await g.send("drop")
                dropped = [await g.expect("dropped", 30) for g in gens]
                back = [await g.expect("reconnected", 120 + n / 20) for g in gens]
                cpu1 = cpu_seconds(t.pid)
                await trio.sleep(min(3.0, plan.storm_interval))
                for g in gens:
                    await g.send("stop")
                results = [await g.expect("result", DRAIN_TIMEOUT + 60) for g in gens]
            finally:
                await self.close_all(gens)
        r = _merge(results)
        row = {
            "target": target,
            "devices": n,
            "dropped": sum(x["count"] for x in dropped),
            "back_s": max(x["t_back"] for x in back) - min(x["t"] for x in dropped),
            "server_cpu_s": cpu1 - cpu0,  # from the drop until all were back
            "generator_cpu_s": sum(b["cpu_s"] - d["cpu_s"] for b, d in zip(back, dropped, strict=True)),
            "sent_points": r["sent_points"],
            "acked_points": r["acked_points"],
            "resent_messages": r["resent"],
            "drained": r["drained"],
            "generators": len(gens),
            "generator": r,
        }
        if target == "hub":
            row.update(await self.verify(measurement, r["acked_points"], r["drained"]))
        return row

    # -------------------------------------------------------------- outage

    async def outage(self, table: Table) -> dict[str, Any]:
        """A hung database, then a dead one, while devices stream: ack waits, return noticed, replay (bench.outage)."""
        return await outage.run(self, table)

    # -------------------------------------------------------------- profile

    async def profile(self, table: Table) -> dict[str, Any]:
        """py-spy samples of the hub during a lean ingest run."""
        if profile.py_spy() is None:
            row = {"error": "py-spy is not installed (pip install -e '.[bench]'): no profile"}
            table.row(row)
            return row
        row = await self._guarded(self._profile)
        table.row(row)
        if "top_self" in row:
            print("top self (all threads):\n" + profile.format_top(row, "top_self"), flush=True)
        return row

    async def _profile(self) -> dict[str, Any]:
        plan = self.plan
        devices, points = plan.profile_devices, plan.profile_points
        measurement = self.measurement(f"profile_{devices}x{points}")
        raw = self.work / "profile-hub.txt"
        async with self.target("hub", "profile") as t:
            gens = await self.generators(
                measurement,
                t.port,
                self.tokens[:devices],
                devices,
                measurement=measurement,
                points=points,
                duration=plan.profile_seconds + 2,
                drain_timeout=DRAIN_TIMEOUT,
            )
            try:
                await self.ready(gens, devices)
                await self.go(gens)
                await trio.sleep(1.0)
                spy = profile.record(t.pid, plan.profile_seconds, raw, gil=plan.profile_gil)
                try:
                    results = [await g.expect("result", plan.profile_seconds + DRAIN_TIMEOUT + 60) for g in gens]
                    with trio.move_on_after(30):
                        while spy.poll() is None:
                            await trio.sleep(0.2)
                finally:
                    if spy.poll() is None:
                        spy.kill()
                        spy.wait()
            finally:
                await self.close_all(gens)
        r = _merge(results)
        elapsed = max(r["t_last_ack"] - r["t_go"], 1e-9)
        if not raw.exists():
            raise ChildError(f"py-spy wrote nothing: {raw.with_suffix('.log').read_text(errors='replace')[-1000:]}")
        summary = profile.summarise(raw)
        samples = summary["samples"]
        return {
            "devices": devices,
            "points_per_message": points,
            "points_per_s": r["acked_points"] / elapsed,
            "seconds": plan.profile_seconds,
            "gil": plan.profile_gil,
            "raw_file": str(raw),
            "main_thread_percent": 100 * summary["threads"].get("main", 0) / samples if samples else None,
            **summary,
        }


def _merge(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several generators' `result` events as one."""
    out: dict[str, Any] = {}
    for r in results:
        for key, value in r.items():
            if key == "event":
                continue
            if key in ("t_go",):
                out[key] = min(out.get(key, value), value)
            elif key in ("t_sent", "t_last_ack"):
                out[key] = max(out.get(key, value), value)
            elif key == "drained":
                out[key] = out.get(key, True) and value
            elif key == "errors":
                out[key] = _merge_counts([out.get(key, {}), value])
            elif key == "points":
                out[key] = value
            elif isinstance(value, int | float):
                out[key] = out.get(key, 0) + value
    return out


def _merge_counts(counts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


async def run_bench(plan: Plan, work: Path, out: Path) -> dict[str, Any]:
    """Run the plan; the results (also written to `out` after every scenario)."""
    bench = Bench(plan, work)
    results: dict[str, Any] = {
        "schema": 1,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": plan.quick,
        "plan": attrs.asdict(plan),
        "machine": machine(),
        "hub_overrides": bench.overrides,
        "scenarios": {},
    }
    needed = max(
        [d for d, _ in plan.ingest + plan.sdk]
        + list(plan.connections)
        + [plan.command_devices, plan.storm_devices, plan.profile_devices, plan.surge_devices]
        + [d for d, _ in plan.workers_ingest]
    )
    bench.register(needed)
    bench.vm.start()
    results["machine"]["victoria_metrics"] = bench.vm.version()
    try:
        for name in plan.scenarios:
            table = Table(name)
            started = time.monotonic()
            try:
                results["scenarios"][name] = await getattr(bench, name.replace("-", "_"))(table)
            except ChildError as exc:
                results["scenarios"][name] = {"error": str(exc)[:2000]}
                table.row(results["scenarios"][name])
            results["scenarios"][name]["wall_s"] = time.monotonic() - started
            _write(out, results)
    finally:
        bench.vm.stop()
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    _write(out, results)
    return results


def _write(out: Path, results: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(out)


def _errors(results: dict[str, Any]) -> list[str]:
    out = []
    for name, scenario in results["scenarios"].items():
        if "error" in scenario:
            out.append(f"{name}: {scenario['error'][:200]}")
        for row in scenario.get("runs", []):
            if "error" in row:
                out.append(f"{name}: {row['error'][:200]}")
            elif row.get("db_verified") is False:
                out.append(f"{name}: database count check failed for {row.get('measurement', row.get('target'))}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the harness; exit code 0 when every run finished and every database check passed."""
    args = build_parser().parse_args(argv)
    plan = plan_from_args(args)
    raise_fd_limit()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("var/bench") / f"results-{stamp}.json"
    with contextlib.ExitStack() as stack:
        if args.work_dir is not None:
            work = args.work_dir
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hub-bench-")))
        results = trio.run(run_bench, plan, work, out)
        raw = work / "profile-hub.txt"
        if raw.exists():
            kept = out.with_name(out.stem + "-profile.txt")
            shutil.copy(raw, kept)
            results["scenarios"]["profile"]["raw_file"] = str(kept)
            _write(out, results)
    print(f"\nresults: {out}")
    errors = _errors(results)
    for line in errors:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if errors else 0
