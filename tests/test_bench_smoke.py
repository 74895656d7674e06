"""The benchmark harness at toy scale: real hub, VictoriaMetrics, baseline server and generator processes.

No timing is asserted: only that every scenario runs, the results file has its keys, and the database holds
exactly the acked points.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from bench import profile
from bench.procs import sched_threads
from bench.run import HOPS, Plan, run_bench, sched_cell, sched_figures
from bench.wire import client_frame, parse_ack, telemetry_template
from device_client import protocol


def test_pre_encoded_frames_are_what_the_hub_decodes() -> None:
    template = telemetry_template("m", 3)
    text = (template % (7, 1_700_000_000_000, 1_700_000_000_001, 1_700_000_000_002)).decode()
    msg = protocol.decode(text)
    assert isinstance(msg, protocol.Telemetry)
    assert msg.seq == 7
    assert [p["ts"] for p in msg.points] == [1_700_000_000_000, 1_700_000_000_001, 1_700_000_000_002]
    assert msg.points[0]["fields"] == {"value": 21.537, "n": {"int": 7}}

    # The zero-key masked frame parses on a real wsproto server connection, as in the hub.
    server = WSConnection(ConnectionType.SERVER)
    client = WSConnection(ConnectionType.CLIENT)
    server.receive_data(client.send(Request(host="h", target="/v1/device")))
    assert isinstance(next(iter(server.events())), Request)
    client.receive_data(server.send(AcceptConnection()))
    big = "x" * 70_000  # the 8-byte length form
    server.receive_data(client_frame(text.encode()) + client_frame(big.encode()))
    texts = [e.data for e in server.events() if isinstance(e, TextMessage)]
    assert "".join(texts) == text + big

    assert parse_ack(protocol.encode(protocol.Ack(123))) == 123
    assert parse_ack(protocol.encode(protocol.Error("bad_json"))) is None


def test_profile_summary_counts_self_and_total(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "thread (1): MainThread;run (a/app.py:1);decode (b/protocol.py:5) 30\n"
        "thread (1): MainThread;run (a/app.py:1);lines (c/lineproto.py:9) 10\n"
        "thread (2): Trio thread 0;write (d/sinks.py:3) 60\n"
        "thread (3): Trio thread 1;WorkerThread._work (trio/_core/_thread_cache.py:1) 500\n"
    )
    summary = profile.summarise(raw)
    assert summary["samples"] == 100
    assert summary["idle_samples"] == 500  # a thread-cache worker waiting for work
    assert summary["top_self"][0] == {"function": "write (d/sinks.py)", "samples": 60, "percent": 60.0}
    assert summary["threads"] == {"worker": 60, "main": 40}
    totals = {row["function"]: row["samples"] for row in summary["top_total_main"]}
    assert totals["run (a/app.py)"] == 40


def test_sched_threads_counts_this_thread_on_a_cpu() -> None:
    me = threading.get_native_id()
    run0, wait0, slices0 = sched_threads(os.getpid())[me]
    spent = time.thread_time() + 0.05
    while time.thread_time() < spent:  # 50 ms of this thread's CPU, however busy the machine is
        pass
    run1, wait1, slices1 = sched_threads(os.getpid())[me]
    assert run1 - run0 >= 0.049
    assert wait1 >= wait0 and slices1 >= slices0  # no switch at all on an idle CPU: no new slice


def test_sched_figures_per_role_thread_by_thread() -> None:
    before = {
        "hub": {(1, 1): (1.0, 0.5, 100), (1, 2): (9.0, 9.0, 900)},  # thread 2 ends in the window: it drops out
        "fleet": {(2, 2): (2.0, 0.0, 10)},
        "relay": {(3, 7): (5.0, 1.0, 500)},
    }
    after = {
        "hub": {(1, 1): (1.5, 0.6, 300)},
        "fleet": {(2, 2): (2.2, 0.0, 10)},
        "operator": {(4, 4): (0.1, 0.01, 50)},  # started in the window: from zero
        "relay": {(3, 7): (0.2, 0.02, 10)},  # a new thread that took an ended one's id: from zero too
    }
    figures = sched_figures(before, after, 2.0)
    assert figures["hub"] == pytest.approx({"cores": 0.25, "wait_ms_per_s": 50.0, "wait_us_per_slice": 500.0})
    assert figures["fleet"] == pytest.approx({"cores": 0.1, "wait_ms_per_s": 0.0, "wait_us_per_slice": 0.0})
    assert figures["operator"]["wait_us_per_slice"] == pytest.approx(200.0)
    assert figures["relay"] == pytest.approx({"cores": 0.1, "wait_ms_per_s": 10.0, "wait_us_per_slice": 2000.0})
    assert sched_cell(figures) == "hub 0.25/500 · fleet 0.10/0 · operator 0.05/200 · relay 0.10/2000"


@pytest.mark.e2e
async def test_harness_smoke_run(tmp_path: Path) -> None:
    plan = Plan(
        quick=True,
        scenarios=("ingest", "connections", "commands", "storm"),
        duration=1.0,
        ingest=((5, 10),),
        sdk=((5, 10),),
        connections=(50,),
        command_devices=20,
        commands=10,
        command_targets=3,
        command_gap=0.01,
        relay_acks=True,
        command_interval=0.5,
        storm_devices=30,
        storm_interval=1.0,
        storm_points=5,
    )
    out = tmp_path / "results.json"
    returned = await run_bench(plan, tmp_path / "work", out)
    results = json.loads(out.read_text())
    assert results["scenarios"].keys() == returned["scenarios"].keys() == set(plan.scenarios)
    assert {"machine", "plan", "hub_overrides", "started", "finished"} <= results.keys()

    ingest = results["scenarios"]["ingest"]["runs"]
    assert [(r["target"], r["client"]) for r in ingest] == [("hub", "lean"), ("transport", "lean"), ("hub", "sdk")]
    for row in ingest:
        assert "error" not in row, row
        assert row["points"] > 0 and row["points_per_s"] > 0 and row["cpu_s_per_mpoint"] is not None
        if row["target"] == "hub":
            assert row["db_verified"] is True and row["drained"] is True
            assert row["db_points"] == row["points"] == row["sent_points"]
            assert row["ratio_to_transport"] > 0

    connections = results["scenarios"]["connections"]["runs"]
    assert [r["target"] for r in connections] == ["hub", "transport"]
    for row in connections:
        assert row["connected"] == 50 and row["kib_per_connection"] is not None

    commands = results["scenarios"]["commands"]["runs"]
    assert [r["target"] for r in commands] == ["hub", "transport", "transport+acks"]
    assert commands[1]["generator"]["acked_points"] == 0  # the relay of record acks nothing...
    assert commands[2]["generator"]["acked_points"] > 0  # ...with --relay-acks, every telemetry message
    assert commands[2]["generator"]["drained"] is True
    for row in commands:
        assert row["succeeded"] == 10, row
        assert row["targets"] == "3 apart"  # the commanded devices' own generator answered every command
        assert row["command_gap_s"] == 0.01
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert commands[0]["db_verified"] is True  # both generators' points: 20 devices streamed
    _assert_hops(commands[0])
    assert commands[1]["hops_ms"] is None  # the relay: no steps to time
    roles = {"fleet", "commanded", "operator"}
    assert commands[0]["sched"].keys() == roles | {"hub", "database"}
    assert commands[1]["sched"].keys() == roles | {"relay"}
    assert commands[2]["sched"].keys() == roles | {"relay"}
    for row, target in zip(commands, ("hub", "relay", "relay"), strict=True):
        assert row["sched"][target]["cores"] > 0 and row["sched"]["operator"]["cores"] > 0  # both had commands to do
        assert all(f["wait_us_per_slice"] >= 0 for f in row["sched"].values())
    slowest, _, its_hops = commands[0]["slowest_ms"].partition(" = ")
    assert float(slowest) == pytest.approx(commands[0]["max_ms"], rel=0.01)  # the max, and where its time went
    names = [cell.rpartition(" ")[0] for cell in its_hops.split(" · ")]
    assert len(names) >= 4 and names == list(HOPS)[: len(names)]  # a command whose ack overtook "sent" has four

    storm = results["scenarios"]["storm"]["runs"]
    hub_storm = storm[0]
    assert hub_storm["target"] == "hub" and hub_storm["dropped"] == 30
    assert hub_storm["acked_points"] > 0 and hub_storm["points_lost"] == 0 and hub_storm["db_verified"] is True
    assert storm[1]["target"] == "transport" and storm[1]["dropped"] == 30


@pytest.mark.e2e
async def test_edge_scenarios_smoke_run(tmp_path: Path) -> None:
    plan = Plan(
        quick=True,
        scenarios=("surge", "slowloris"),
        surge_devices=60,
        surge_busy=False,
        slow_sockets=20,
        slow_sources=(1,),
        slow_gap=0.5,
        slow_seconds=2.0,
    )
    out = tmp_path / "results.json"
    await run_bench(plan, tmp_path / "work", out)
    results = json.loads(out.read_text())

    surge = results["scenarios"]["surge"]["runs"]
    assert [r["target"] for r in surge] == ["hub", "transport"]
    for row in surge:
        assert "error" not in row, row
        assert row["connected"] == 60 and row["failed"] == 0 and row["connect_s"] > 0

    slow = results["scenarios"]["slowloris"]["runs"]
    assert [(r["sockets"], r["sources"]) for r in slow] == [(0, 1), (20, 1)]
    for row in slow:
        assert "error" not in row, row
        assert row["acked_msgs"] > 0 and row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert slow[1]["attack_opened"] >= 20


@pytest.mark.e2e
async def test_cluster_scenarios_smoke_run(tmp_path: Path) -> None:
    plan = Plan(
        quick=True,
        scenarios=("workers", "cluster-commands", "failover"),
        duration=1.0,
        workers_ingest=((5, 10),),
        workers=(1, 2),
        command_devices=20,
        commands=10,
        command_interval=0.5,
        cluster_runs=1,
        failover_devices=30,
        failover_interval=1.0,
        failover_points=5,
    )
    out = tmp_path / "results.json"
    await run_bench(plan, tmp_path / "work", out)
    results = json.loads(out.read_text())
    assert results["scenarios"].keys() == set(plan.scenarios)

    workers = results["scenarios"]["workers"]["runs"]
    assert [(r["state"], r["workers"]) for r in workers] == [("sqlite", 1), ("redis", 1), ("redis", 2)]
    for row in workers:
        assert "error" not in row, row
        assert row["db_verified"] is True and row["points"] == row["sent_points"] > 0
        assert row["cpu_s_per_mpoint"] is not None
    assert [r["processes"] for r in workers[1:]] == [1, 3]  # --workers 2: the supervisor and two workers
    assert workers[1]["redis_cpu_s"] is not None and workers[2]["cpu_ratio_to_sqlite"] > 0

    commands = results["scenarios"]["cluster-commands"]["runs"]
    assert [r["target"] for r in commands] == ["cross-hub", "same hub", "one hub", "relay"]
    for row in commands:
        assert "error" not in row, row
        assert row["succeeded"] == 10 and row["run"] == 1, row
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert commands[0]["db_verified"] is True
    for row in commands[:3]:  # the hub rows
        _assert_hops(row)

    (failover,) = results["scenarios"]["failover"]["runs"]
    assert "error" not in failover, failover
    assert failover["hubs"] == 3 and failover["devices"] == 30 and failover["on_killed_hub"] == 10
    assert failover["back_s"] is not None and failover["connections_lost"] >= 10
    assert failover["acked_points"] > 0 and failover["points_lost"] == 0 and failover["db_verified"] is True
    assert failover["spool_records_left"] == 0


def _assert_hops(row: dict[str, Any]) -> None:
    """Each step of a command timed, from request to reply, in order."""
    assert [cell.rpartition(" ")[0] for cell in row["hops_ms"].split(" · ")] == list(HOPS), row["hops_ms"]
