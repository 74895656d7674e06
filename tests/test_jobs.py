"""Fleet jobs: state tables and rollout decisions with plain values, then real hubs with simulated devices."""

from __future__ import annotations

import itertools
import math
import signal
import statistics
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from firmware_sim import FleetTotals, run_fleet
from hub.app import HubHandle
from hub.config import StateConfig
from hub.control_codes import ControlError
from hub.fleet import (
    ABORT_MIN_OUTCOMES,
    ActionResult,
    CommandSpec,
    DesiredAction,
    DesiredSpec,
    DeviceEvent,
    DeviceOutcome,
    DeviceRecord,
    DeviceState,
    JobEvent,
    JobRecord,
    JobRunner,
    JobState,
    JobStore,
    Registry,
    Rollout,
    TwinService,
    open_registry_store,
    parse_action,
)
from hub.fleet._job_states import (  # the tables themselves: tests may read the private module
    DEVICE_FINAL_STATES,
    DEVICE_TRANSITIONS,
    JOB_FINAL_STATES,
    JOB_TRANSITIONS,
    IllegalTransition,
    next_device_state,
    next_job_state,
)
from hub.fleet._jobs import Abort, Finish, Start, Wait, abort_due, decide
from hub.operator import ControlClient, Event, open_control
from hub.operator.ctl import format_event
from tests.hubproc import HubProcess
from tests.hubtools import Ctl, add_operators, control, hub_config, start_hub
from tests.test_hubctl import Hub, device, hubctl
from tests.test_web import error, web_hub
from tests.waiting import eventually

_J, _D = JobState, DeviceState

# ---------------------------------------------------------------------------- the tables


def test_job_table() -> None:
    assert next_job_state(_J.RUNNING, JobEvent.FINISH) is _J.COMPLETED
    assert next_job_state(_J.RUNNING, JobEvent.CANCEL) is _J.CANCELLING
    assert next_job_state(_J.RUNNING, JobEvent.ABORT) is _J.ABORTING
    assert next_job_state(_J.CANCELLING, JobEvent.SETTLE) is _J.CANCELLED
    assert next_job_state(_J.ABORTING, JobEvent.SETTLE) is _J.ABORTED
    assert {_J.COMPLETED, _J.CANCELLED, _J.ABORTED} == JOB_FINAL_STATES
    for state in JOB_FINAL_STATES:
        for event in JobEvent:
            with pytest.raises(IllegalTransition):
                next_job_state(state, event)
    with pytest.raises(IllegalTransition):
        next_job_state(_J.CANCELLING, JobEvent.CANCEL)  # a second cancel is the caller's invalid_state
    assert set(JOB_TRANSITIONS) == set(JobState)


def test_device_table() -> None:
    assert next_device_state(_D.PENDING, DeviceEvent.START) is _D.RUNNING
    assert next_device_state(_D.PENDING, DeviceEvent.CANCEL) is _D.CANCELLED
    assert next_device_state(_D.PENDING, DeviceEvent.SKIP) is _D.SKIPPED
    assert next_device_state(_D.RUNNING, DeviceEvent.SUCCEED) is _D.SUCCEEDED
    assert next_device_state(_D.RUNNING, DeviceEvent.FAIL) is _D.FAILED
    assert next_device_state(_D.RUNNING, DeviceEvent.CANCEL) is _D.CANCELLED
    with pytest.raises(IllegalTransition):
        next_device_state(_D.RUNNING, DeviceEvent.SKIP)  # a started device has a real outcome
    with pytest.raises(IllegalTransition):
        next_device_state(_D.PENDING, DeviceEvent.SUCCEED)
    assert {_D.SUCCEEDED, _D.FAILED, _D.CANCELLED, _D.SKIPPED} == DEVICE_FINAL_STATES
    assert set(DEVICE_TRANSITIONS) == set(DeviceState)


def test_device_outcome_times() -> None:
    o = DeviceOutcome("d1").after(DeviceEvent.START, 10.0)
    assert (o.state, o.started, o.finished) == (_D.RUNNING, 10.0, None)
    o = o.after(DeviceEvent.FAIL, 12.5, error="expired")
    assert (o.state, o.started, o.finished, o.error, o.final) == (_D.FAILED, 10.0, 12.5, "expired", True)
    assert o.as_dict()["state"] == "failed"


# ---------------------------------------------------------------------------- the rollout's decisions


def counts(**by_state: int) -> dict[DeviceState, int]:
    return {DeviceState(k): v for k, v in by_state.items()}


def test_abort_threshold_is_checked_after_enough_outcomes() -> None:
    r = Rollout(abort_percent=20)
    assert not abort_due(r, counts(failed=9), 100)  # 9 outcomes < ABORT_MIN_OUTCOMES: not checked yet
    assert abort_due(r, counts(failed=ABORT_MIN_OUTCOMES), 100)
    assert not abort_due(r, counts(failed=2, succeeded=8), 100)  # exactly 20 %: not more than
    assert abort_due(r, counts(failed=3, succeeded=8), 100)
    assert abort_due(r, counts(failed=1, succeeded=2), 3)  # a small job: all its 3 outcomes count
    assert not abort_due(r, counts(failed=1, succeeded=1), 3)
    assert not abort_due(Rollout(), counts(failed=100), 100)  # no threshold
    assert abort_due(Rollout(abort_percent=0), counts(failed=1, succeeded=9), 100)  # any failure
    assert not abort_due(Rollout(abort_percent=0), counts(succeeded=10), 100)
    assert not abort_due(Rollout(abort_percent=100), counts(failed=10), 10)


def test_decisions_follow_rate_in_flight_and_state() -> None:
    r = Rollout(rate=2, max_in_flight=3, abort_percent=50)
    assert decide(_J.RUNNING, r, counts(pending=5), 5, now=0.0, not_before=-math.inf) == Start()
    assert decide(_J.RUNNING, r, counts(pending=4, running=1), 5, now=0.1, not_before=0.5) == Wait(0.5)
    assert decide(_J.RUNNING, r, counts(pending=2, running=3), 5, now=9.0, not_before=0.5) == Wait()
    assert decide(_J.RUNNING, r, counts(running=2, succeeded=3), 5, now=9.0, not_before=0.5) == Wait()
    assert decide(_J.RUNNING, r, counts(succeeded=3, failed=2), 5, 9.0, 0.5) == Finish(JobEvent.FINISH)
    assert decide(_J.RUNNING, r, counts(pending=10, failed=10), 20, 9.0, 0.5) == Abort()
    assert decide(_J.RUNNING, r, counts(pending=1, failed=4), 5, 9.0, 0.5) == Start()  # 4 outcomes of 5: too few
    assert decide(_J.CANCELLING, r, counts(running=1, cancelled=4), 5, 9.0, 0.5) == Wait()
    assert decide(_J.CANCELLING, r, counts(cancelled=5), 5, 9.0, 0.5) == Finish(JobEvent.SETTLE)
    assert decide(_J.ABORTING, r, counts(failed=3, skipped=2), 5, 9.0, 0.5) == Finish(JobEvent.SETTLE)
    assert r.interval == 0.5


def test_actions_and_rollouts_are_checked() -> None:
    assert parse_action({"type": "command", "name": "reboot"}) == CommandSpec("reboot")
    spec = parse_action({"type": "command", "name": "echo", "args": {"x": 1}, "ttl": 5, "timeout": 2})
    assert spec == CommandSpec("echo", {"x": 1}, 5.0, 2.0)
    assert parse_action(spec.as_dict()) == spec  # as stored
    assert parse_action({"type": "desired", "patch": {"interval": 5}}) == DesiredSpec({"interval": 5})
    desired = parse_action({"type": "desired", "patch": {"interval": 5}, "timeout": 30})
    assert desired == DesiredSpec({"interval": 5}, 30.0) and parse_action(desired.as_dict()) == desired
    for bad, code in [
        ("reboot", "bad_request"),
        ({"name": "reboot"}, "bad_request"),
        ({"type": "firmware"}, "bad_request"),
        ({"type": "command", "name": "x y"}, "bad_command"),
        ({"type": "command", "name": "x", "args": [1]}, "bad_command"),
        ({"type": "command", "name": "x", "ttl": 0}, "bad_command"),
        ({"type": "command", "name": "x", "colour": 1}, "bad_request"),
        ({"type": "desired", "patch": {}}, "bad_request"),
        ({"type": "desired", "patch": [1]}, "bad_request"),
        ({"type": "desired", "patch": {"a": 1}, "timeout": 0}, "bad_command"),
        ({"type": "desired", "patch": {"a": 1}, "timeout": 1e9}, "bad_command"),
        ({"type": "desired", "patch": {"a": 1}, "ttl": 5}, "bad_request"),
        ({"type": "desired", "patch": {"a": "x" * 20_000}}, "too_large"),
        ({"type": "desired", "patch": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}}, "bad_patch"),
    ]:
        with pytest.raises(ControlError) as caught:
            parse_action(bad)
        assert caught.value.code == code, bad
    for kw in [{"rate": 0}, {"rate": -1}, {"rate": 1e9}, {"max_in_flight": 0}, {"abort_percent": 101}]:
        with pytest.raises(ControlError):
            Rollout(**kw)


# ---------------------------------------------------------------------------- a real hub


def register(data_dir: Path, names: list[str], labels: Mapping[str, str]) -> list[str]:
    """Register devices with `labels`; their tokens in the order given."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with Registry(data_dir / "registry.sqlite3") as registry:
        return [registry.add(name, labels) for name in names]


@asynccontextmanager
async def fleet_of(hub_url: str, tokens: list[str]) -> AsyncIterator[None]:
    """Simulated devices (firmware_sim) connected to the hub while the block runs."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(run_fleet, hub_url, tokens, interval=30.0, stop=stop, close_timeout=2.0))
        try:
            yield
        finally:
            stop.set()


async def online(ctl: Ctl, n: int, selector: str) -> None:
    async def enough() -> bool:
        return len(await ctl.ok("devices", selector=selector, state="online")) >= n

    await eventually(enough, timeout=60, poll=0.1, what=f"{n} devices online")


async def finished(ctl: Ctl, job_id: str, timeout: float = 60) -> dict[str, Any]:
    """The job's record once it is final."""
    record: dict[str, Any] = {}

    async def final() -> bool:
        record.update(await ctl.ok("job", job_id=job_id, limit=1))
        return record["state"] in {s.value for s in JOB_FINAL_STATES}

    await eventually(final, timeout=timeout, poll=0.05, what=f"job {job_id} final")
    return record


async def all_devices(ctl: Ctl, job_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        page = (await ctl.ok("job", job_id=job_id, limit=100, offset=len(out)))["devices"]
        out.extend(page)
        if len(page) < 100:
            return out


async def job_commands(ctl: Ctl, job_id: str) -> list[dict[str, Any]]:
    records = await ctl.ok("commands", limit=1000)
    return [r for r in records if r["idempotency_key"] == f"job:{job_id}"]


def url(hub: HubHandle) -> str:
    return f"ws://127.0.0.1:{hub.port}/v1/device"


def nonzero(record: Mapping[str, Any]) -> dict[str, int]:
    return {k: v for k, v in record["counts"].items() if v}


async def test_job_across_200_devices_with_some_offline(tmp_path: Path) -> None:
    """190 simulated devices answer `echo`; 10 are offline, so their commands expire (ttl 3 s): exact counts, one
    command per device, the rate and the in-flight limit kept."""
    online_names = [f"th-{i:03d}" for i in range(190)]
    offline_names = [f"th-{i:03d}-off" for i in range(0, 190, 19)]  # interleaved in rollout (name) order
    tokens = register(tmp_path, online_names, {"site": "berlin", "model": "th-100"})
    register(tmp_path, offline_names, {"site": "berlin", "model": "th-100"})
    register(tmp_path, ["paris-1"], {"site": "paris", "model": "th-100"})  # not selected
    ops = add_operators(tmp_path, op="operator")
    rate, in_flight = 200.0, 40
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        async with fleet_of(url(hub), tokens), control(hub, ops["op"]) as ctl:
            await online(ctl, 190, "site=berlin")
            action = {"type": "command", "name": "echo", "args": {"job": True}, "ttl": 3}
            job = await ctl.ok(
                "job_create", selector="site=berlin,model=th-100", action=action, rate=rate, max_in_flight=in_flight
            )
            assert job["state"] == "running" and job["total"] == 200 and job["counts"]["pending"] == 200
            assert job["selector"] == "site=berlin,model=th-100" and job["operator"] == "op"
            listed = await ctl.ok("jobs")
            assert [j["job_id"] for j in listed] == [job["job_id"]]
            done = await finished(ctl, job["job_id"])
            assert done["state"] == "completed"
            assert nonzero(done) == {"succeeded": 190, "failed": 10}
            devices = await all_devices(ctl, job["job_id"])
            assert len(devices) == 200 and [d["device"] for d in devices] == sorted(online_names + offline_names)
            failed = {d["device"] for d in devices if d["state"] == "failed"}
            assert failed == set(offline_names)
            assert all(d["error"] == "expired" for d in devices if d["state"] == "failed")
            assert [d["device"] for d in (await ctl.ok("job", job_id=job["job_id"], state="failed"))["devices"]] == (
                sorted(offline_names)
            )
            commands = await job_commands(ctl, job["job_id"])
            assert sorted(c["device"] for c in commands) == sorted(online_names + offline_names)  # one each
            assert {d["ref"] for d in devices} == {c["command_id"] for c in commands}

            # Starts are 1/rate apart on the loop's clock (exactly so on the mock clock: test_runner_keeps_rate_...);
            # each recorded wall-clock start can come a preemption after its decision on a busy machine, which
            # shortens one gap and lengthens the one before: the span and the median hold, a single gap need not.
            starts = sorted(d["started"] for d in devices)
            gaps = [b - a for a, b in itertools.pairwise(starts)]
            assert starts[-1] - starts[0] >= (len(starts) - 1) / rate - 0.01
            assert statistics.median(gaps) >= 0.9 / rate
            for d in devices:  # devices in flight when each started, itself included
                running = sum(1 for o in devices if o["started"] <= d["started"] < o["finished"])
                assert running <= in_flight
        hub.stop()


async def test_a_desired_state_job_succeeds_where_devices_apply_it(tmp_path: Path) -> None:
    """30 simulated devices take their interval from the twin; 3 are offline and never apply it (timeout 2 s): each
    online device's twin is in sync, the offline ones keep the change for their next connection."""
    online_names = [f"th-{i:02d}" for i in range(30)]
    offline_names = ["th-05-off", "th-15-off", "th-25-off"]
    tokens = register(tmp_path, online_names, {"site": "berlin"})
    register(tmp_path, offline_names, {"site": "berlin"})
    ops = add_operators(tmp_path, op="operator")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        async with fleet_of(url(hub), tokens), control(hub, ops["op"]) as ctl:
            await online(ctl, 30, "site=berlin")
            action = {"type": "desired", "patch": {"interval": 20}, "timeout": 2}
            job = await ctl.ok("job_create", selector="site=berlin", action=action, rate=100, max_in_flight=10)
            assert job["action"] == action
            done = await finished(ctl, job["job_id"])
            assert done["state"] == "completed" and nonzero(done) == {"succeeded": 30, "failed": 3}
            devices = await all_devices(ctl, job["job_id"])
            failed = {d["device"]: d["error"] for d in devices if d["state"] == "failed"}
            assert set(failed) == set(offline_names)
            assert all(e.startswith("not applied within 2 s") for e in failed.values()), failed
            for name in online_names:
                twin = await ctl.ok("twin", device=name)
                assert twin["delta"] == {} and twin["reported"]["state"]["interval"] == 20, twin
                assert twin["desired"]["version"] == 1 and twin["applied_version"] == 1
            for name in offline_names:
                twin = await ctl.ok("twin", device=name)
                assert twin["desired"]["state"] == {"interval": 20} and twin["applied_version"] == 0
            # The same patch again: nothing changes, the devices are at that version already.
            again = await ctl.ok("job_create", selector="site=berlin", action=action, rate=100, max_in_flight=10)
            assert nonzero(await finished(ctl, again["job_id"])) == {"succeeded": 30, "failed": 3}
            assert (await ctl.ok("twin", device="th-00"))["desired"]["version"] == 1
        hub.stop()


async def test_abort_threshold_stops_the_job(tmp_path: Path) -> None:
    names = [f"s-{i:02d}" for i in range(20)]
    tokens = register(tmp_path, names, {"site": "lab"})
    ops = add_operators(tmp_path, op="operator")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        async with fleet_of(url(hub), tokens), control(hub, ops["op"]) as ctl:
            await online(ctl, 20, "site=lab")
            action = {"type": "command", "name": "fail", "args": {"message": "no"}}
            job = await ctl.ok(
                "job_create", selector="site=lab", action=action, rate=1000, max_in_flight=1, abort_percent=50
            )
            done = await finished(ctl, job["job_id"])
            # One in flight at a time: the 10th failure is the first outcome checked, and aborts before a next start.
            assert done["state"] == "aborted"
            assert nonzero(done) == {"failed": ABORT_MIN_OUTCOMES, "skipped": 20 - ABORT_MIN_OUTCOMES}
            assert "10 of 10 outcomes failed" in done["reason"]
            assert len(await job_commands(ctl, job["job_id"])) == ABORT_MIN_OUTCOMES
            failed = (await ctl.ok("job", job_id=job["job_id"], state="failed"))["devices"]
            assert all(d["error"] == "failed: no" for d in failed)
            assert await ctl.error("job_cancel", job_id=job["job_id"]) == "invalid_state"
        hub.stop()


async def test_cancel_cancels_pending_devices_and_queued_commands(tmp_path: Path) -> None:
    names = [f"off-{i:02d}" for i in range(12)]
    register(tmp_path, names, {"site": "far"})  # never connected: their commands stay queued
    ops = add_operators(tmp_path, op="operator", viewer="viewer")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        async with control(hub, ops["op"]) as ctl, control(hub, ops["viewer"]) as viewer:
            action = {"type": "command", "name": "reboot"}
            job = await ctl.ok("job_create", selector="site=far", action=action, rate=1000, max_in_flight=5)

            async def five_running() -> bool:
                return (await ctl.ok("job", job_id=job["job_id"]))["counts"]["running"] == 5

            await eventually(five_running, timeout=30)
            assert await viewer.error("job_cancel", job_id=job["job_id"]) == "forbidden"
            cancelled = await ctl.ok("job_cancel", job_id=job["job_id"])
            assert cancelled["state"] in ("cancelling", "cancelled") and cancelled["reason"] == "cancelled by op"
            done = await finished(ctl, job["job_id"])
            assert done["state"] == "cancelled" and nonzero(done) == {"cancelled": 12}
            commands = await job_commands(ctl, job["job_id"])
            assert len(commands) == 5 and {c["state"] for c in commands} == {"cancelled"}
            assert await ctl.error("job_cancel", job_id=job["job_id"]) == "invalid_state"
            assert await ctl.error("job_cancel", job_id="j-nothing") == "not_found"
            assert [j["state"] for j in await viewer.ok("jobs", state="cancelled")] == ["cancelled"]
            assert await viewer.ok("jobs", state="running") == []
        hub.stop()


async def test_job_requests_check_roles_and_input(tmp_path: Path) -> None:
    register(tmp_path, ["a1"], {"site": "a"})
    ops = add_operators(tmp_path, op="operator", viewer="viewer")
    cmd = {"type": "command", "name": "reboot"}
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        async with control(hub, ops["op"]) as ctl, control(hub, ops["viewer"]) as viewer:
            assert await viewer.error("job_create", selector="site=a", action=cmd) == "forbidden"
            for args, code in [
                ({"selector": "site=", "action": cmd}, "bad_label"),
                ({"selector": "", "action": cmd}, "bad_label"),
                ({"action": cmd}, "bad_request"),
                ({"selector": "site=a"}, "bad_request"),
                ({"selector": "site=a", "action": {"type": "firmware"}}, "bad_request"),
                ({"selector": "site=a", "action": "reboot"}, "bad_request"),
                ({"selector": "site=a", "action": {"type": "command", "name": "bad name"}}, "bad_command"),
                ({"selector": "site=a", "action": cmd, "rate": 0}, "bad_request"),
                ({"selector": "site=a", "action": cmd, "rate": "fast"}, "bad_request"),
                ({"selector": "site=a", "action": cmd, "max_in_flight": 0}, "bad_request"),
                ({"selector": "site=a", "action": cmd, "max_in_flight": 1.5}, "bad_request"),
                ({"selector": "site=a", "action": cmd, "abort_percent": 150}, "bad_request"),
                ({"selector": "site=nowhere", "action": cmd}, "not_found"),
                ({"selector": "site=a", "action": {"type": "desired", "patch": []}}, "bad_request"),
            ]:
                assert await ctl.error("job_create", **args) == code, args
            assert await viewer.error("job", job_id="j-none") == "not_found"
            assert await viewer.error("job", job_id="j-none", state="lost") == "bad_request"
            assert await viewer.error("jobs", state="lost") == "bad_request"
            assert await viewer.ok("jobs") == []
        hub.stop()


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_job_resumes_after_a_hub_restart(tmp_path: Path, stop: str) -> None:
    """A `hub serve` process stopped (gracefully, or killed) in the middle of a job, then started again: the job goes
    on where it was, and every device ran the job's command exactly once."""
    names = [f"r-{i:02d}" for i in range(30)]
    tokens = register(tmp_path, names, {"site": "restart"})
    ops = add_operators(tmp_path, op="operator")
    hub = HubProcess(tmp_path, "--log-level", "info")
    await trio.to_thread.run_sync(hub.start)
    totals: list[FleetTotals] = []
    fleet_stop = trio.Event()

    async def fleet() -> None:
        options = {"backoff_max": 0.5}
        totals.append(await run_fleet(hub.url, tokens, interval=30.0, stop=fleet_stop, client_options=options))

    def control_url() -> str:
        return f"ws://127.0.0.1:{hub.port}/v1/control"

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fleet)
            async with open_control(control_url(), ops["op"]) as ctl:
                await eventually(
                    lambda: _count_online(ctl, "site=restart", 30), timeout=60, poll=0.1, what="30 devices online"
                )
                action = {"type": "command", "name": "echo", "args": {"n": 1}}
                job = await ctl.job_create("site=restart", action, rate=5, max_in_flight=3)
                job_id = job["job_id"]

                async def some_done() -> bool:
                    return (await ctl.job(job_id, limit=1))["counts"]["succeeded"] >= 6

                await eventually(some_done, timeout=60, poll=0.05)
            if stop == "sigterm":
                hub.signal(signal.SIGTERM)
                assert await trio.to_thread.run_sync(hub.wait) == 0
            else:
                await trio.to_thread.run_sync(hub.kill)
            await trio.to_thread.run_sync(hub.start)
            async with open_control(control_url(), ops["op"]) as ctl:
                before = await ctl.job(job_id, limit=1)
                assert before["state"] == "running" and before["counts"]["succeeded"] < 30

                async def completed() -> bool:
                    return (await ctl.job(job_id, limit=1))["state"] == "completed"

                await eventually(completed, timeout=90, poll=0.1, what="the job completed after the restart")
                done = await ctl.job(job_id, limit=100)
                assert nonzero(done) == {"succeeded": 30}
                assert all(d["state"] == "succeeded" and d["ref"] for d in done["devices"])
                commands = [c for c in await ctl.commands(limit=1000) if c["idempotency_key"] == f"job:{job_id}"]
                assert sorted(c["device"] for c in commands) == names  # one command per device, no second one
                assert {c["command_id"] for c in commands} == {d["ref"] for d in done["devices"]}
                assert "job resumed" in hub.log()
            fleet_stop.set()
    finally:
        await trio.to_thread.run_sync(hub.kill)
    assert totals[0].commands == 30  # each device ran it once (a repeat would be answered from its log, not run)


async def _count_online(ctl: ControlClient, selector: str, n: int) -> bool:
    return len(await ctl.devices("online", selector)) >= n


async def test_jobs_over_rest(tmp_path: Path) -> None:
    async with web_hub(tmp_path) as web:
        for name in ("d1", "d2"):  # registered, never connected: their commands stay queued
            assert (await web.post(f"/v1/devices/{name}/labels", json={"set": {"site": "rest"}})).status_code == 200
        body = {"selector": "site=rest", "action": {"type": "command", "name": "reboot"}, "max_in_flight": 1}
        assert error(await web.post("/v1/jobs", "viewer", json=body)) == "forbidden"
        created = await web.post("/v1/jobs", "operator", json=body)
        assert created.status_code == 201, created.text
        job = created.json()
        assert job["state"] == "running" and job["total"] == 2 and job["max_in_flight"] == 1
        for bad, status, code in [
            ({**body, "selector": "site=="}, 422, "bad_label"),
            ({**body, "rate": 0}, 400, "bad_request"),
            ({**body, "action": {"type": "nope"}}, 400, "bad_request"),
            ({**body, "action": {"type": "command", "name": "no way"}}, 422, "bad_command"),
            ({**body, "selector": "site=none"}, 404, "not_found"),
            ({**body, "action": {"type": "desired", "patch": {"a": "x" * 20_000}}}, 413, "too_large"),
        ]:
            reply = await web.post("/v1/jobs", "operator", json=bad)
            assert (reply.status_code, error(reply)) == (status, code), bad
        listed = await web.get("/v1/jobs", params={"state": "running"})
        assert listed.status_code == 200 and [j["job_id"] for j in listed.json()] == [job["job_id"]]

        async def one_running() -> bool:
            shown = (await web.get(f"/v1/jobs/{job['job_id']}", params={"state": "running"})).json()
            return [d["device"] for d in shown["devices"]] == ["d1"]

        await eventually(one_running, timeout=30)
        assert error(await web.post(f"/v1/jobs/{job['job_id']}/cancel", "viewer")) == "forbidden"
        cancelled = await web.post(f"/v1/jobs/{job['job_id']}/cancel", "operator")
        assert cancelled.status_code == 200 and cancelled.json()["state"] in ("cancelling", "cancelled")

        async def settled() -> bool:
            return (await web.get(f"/v1/jobs/{job['job_id']}")).json()["state"] == "cancelled"

        await eventually(settled, timeout=30)
        shown = (await web.get(f"/v1/jobs/{job['job_id']}", params={"limit": 1, "offset": 1})).json()
        assert [d["device"] for d in shown["devices"]] == ["d2"] and shown["offset"] == 1
        assert shown["counts"]["cancelled"] == 2
        assert error(await web.post(f"/v1/jobs/{job['job_id']}/cancel", "operator")) == "invalid_state"
        assert error(await web.get("/v1/jobs/j-unknown")) == "not_found"
        assert error(await web.get("/v1/jobs", params={"limit": 0})) == "bad_request"


async def test_hubctl_job_create_list_show_cancel(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    tokens = dict(zip(["boiler-1", "sensor-2"], register(data, ["boiler-1", "sensor-2"], {"site": "ctl"}), strict=True))
    register(data, ["far-1"], {"site": "far"})  # never connects
    operators = add_operators(data, alice="operator", victor="viewer")
    async with trio.open_nursery() as nursery:
        handle = await start_hub(nursery, hub_config(data))
        hub = Hub(handle, data, tokens, operators["alice"], operators["victor"])
        async with device(hub, "boiler-1"), device(hub, "sensor-2"):
            run = await hubctl(hub, "job", "create", "--selector", "site=ctl", "--command", "echo", "--arg", "n=1",
                               "--rate", "100", "--wait")  # fmt: skip
            assert run.code == 0, run.err
            assert "completed: 2/2 done (2 succeeded), 0 running, 0 pending" in run.err  # the progress line
            assert run.out.splitlines()[1].split() == ["state", "completed"]
            assert {line.split()[0] for line in run.out.splitlines() if "succeeded" in line.split()[1:2]} == set(tokens)

            run = await hubctl(hub, "--json", "job", "list", token=hub.viewer)
            assert run.code == 0 and [j["state"] for j in run.json()] == ["completed"], run.err
            job_id = run.json()[0]["job_id"]
            run = await hubctl(hub, "job", "show", job_id, "--follow", token=hub.viewer)
            assert run.code == 0 and "2/2 done" in run.out, run.err
            run = await hubctl(hub, "job", "list", "--state", "completed", token=hub.viewer)
            assert run.code == 0 and run.out.split()[:3] == ["ID", "STATE", "DONE"] and job_id in run.out

            run = await hubctl(hub, "job", "create", "--selector", "site=ctl", "--command", "fail", "--wait")
            assert run.code == 4 and "2 failed" in run.err, run.err
            run = await hubctl(hub, "job", "create", "--selector", "site=ctl", "--command", "echo", token=hub.viewer)
            assert run.code == 1 and "forbidden" in run.err
            run = await hubctl(hub, "job", "cancel", job_id)
            assert run.code == 1 and "invalid_state" in run.err
            run = await hubctl(hub, "job", "create", "--selector", "site=ctl", "--command", "echo", "--rate", "0")
            assert run.code == 2 and "--rate" in run.err
            run = await hubctl(hub, "job", "create", "--selector", "site=", "--command", "echo")
            assert run.code == 1 and "bad_label" in run.err

            # A desired-state job: the device clients keep a twin and say when they applied it.
            desired = '{"mode": "eco"}'
            run = await hubctl(hub, "job", "create", "--selector", "site=ctl", "--desired", desired, "--wait")
            assert run.code == 0 and "2/2 done (2 succeeded)" in run.err, run.err
            run = await hubctl(hub, "--json", "twin", "get", "sensor-2", token=hub.viewer)
            assert run.json()["desired"]["state"] == {"mode": "eco"} and run.json()["applied_version"] == 1
            run = await hubctl(hub, "job", "create", "--selector", "site=ctl", "--desired", desired, "--command", "x")
            assert run.code == 2 and "not allowed with" in run.err
            run = await hubctl(hub, "job", "create", "--selector", "site=ctl", "--desired", desired, "--ttl", "5")
            assert run.code == 2 and "go with --command" in run.err
            run = await hubctl(hub, "job", "create", "--selector", "site=ctl", "--desired", "[1]")
            assert run.code == 2 and "JSON object" in run.err

            run = await hubctl(hub, "--json", "job", "create", "--selector", "site=far", "--command", "reboot")
            assert run.code == 0, run.err
            far = run.json()["job_id"]
            run = await hubctl(hub, "job", "cancel", far)
            assert run.code == 0 and f"job {far} cancel" in run.out, run.err
            run = await hubctl(hub, "job", "show", far, "--follow", "--state", "cancelled")
            assert run.code == 4 and "far-1" in run.out and "cancelled by alice" in run.out, run.err
        handle.stop()


async def test_jobs_topic_pushes_progress(tmp_path: Path) -> None:
    register(tmp_path, ["t-1", "t-2", "t-3"], {"site": "topic"})  # never connected: their commands stay queued
    ops = add_operators(tmp_path, op="operator", viewer="viewer")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        async with control(hub, ops["op"]) as ctl, control(hub, ops["viewer"]) as viewer:
            sub = (await viewer.ok("subscribe", topic="jobs"))["subscription"]
            action = {"type": "command", "name": "reboot"}
            job = await ctl.ok("job_create", selector="site=topic", action=action, max_in_flight=1)
            seen = [(await viewer.events(sub, 1))[0]]
            assert seen[0]["job_id"] == job["job_id"] and seen[0]["state"] == "running"
            await ctl.ok("job_cancel", job_id=job["job_id"])
            while seen[-1]["state"] != "cancelled":
                seen.append((await viewer.events(sub, 1, timeout=30))[0])
            assert nonzero(seen[-1]) == {"cancelled": 3} and seen[-1]["reason"] == "cancelled by op"
        hub.stop()


def test_watch_line_of_a_job_event() -> None:
    record = {"job_id": "j-1", "state": "running", "total": 10, "updated": 1_764_000_000.0}
    record["counts"] = {"pending": 5, "running": 2, "succeeded": 2, "failed": 1, "cancelled": 0, "skipped": 0}
    assert format_event(Event(3, "jobs", record), UTC) == (
        "2025-11-24 16:00:00.000  job j-1 running: 3/10 done (2 succeeded, 1 failed), 2 running, 5 pending"
    )


# ---------------------------------------------------------------------------- the runner on trio's mock clock


class FakeAction:
    """A `JobAction` that takes `seconds[device]` (trio time) per device and fails the devices in `failing`."""

    def __init__(self, seconds: Mapping[str, float], failing: frozenset[str] = frozenset()) -> None:
        self.seconds = seconds
        self.failing = failing
        self.starts: list[tuple[float, str, str]] = []  # (trio time, device, key)
        self.in_flight = 0
        self.peak = 0
        self.stopped: list[str] = []
        self._stop: dict[str, trio.Event] = {}

    async def start(self, device: str, key: str) -> str:
        self.starts.append((trio.current_time(), device, key))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self._stop[device] = trio.Event()
        return f"r-{device}"

    async def result(self, device: str, ref: str) -> ActionResult:
        with trio.move_on_after(self.seconds[device]):
            await self._stop[device].wait()
        self.in_flight -= 1
        if self._stop[device].is_set():
            return ActionResult(False, "stopped", stopped=True)
        return ActionResult(device not in self.failing, "" if device not in self.failing else "broken")

    async def stop(self, device: str, ref: str) -> None:
        self.stopped.append(device)
        self._stop[device].set()


def _records(names: list[str]) -> list[DeviceRecord]:
    return [DeviceRecord(name=n, created=0.0, revoked=False, epoch=0, acked_seq=0, labels={"g": "x"}) for n in names]


async def _runner(
    tmp_path: Path, action: FakeAction, names: list[str], nursery: trio.Nursery
) -> tuple[JobRunner, JobStore]:
    store = JobStore(tmp_path / "jobs.sqlite3")

    async def devices() -> list[DeviceRecord]:
        return _records(names)

    runner = JobRunner(store, None, devices=devices, desired=lambda spec, operator: action)  # type: ignore[arg-type]
    await nursery.start(runner.run)
    return runner, store


async def until_final(runner: JobRunner, job_id: str) -> JobRecord:
    while True:
        record = await runner.get(job_id)
        assert record is not None
        if record.final:
            return record
        await trio.sleep(0.01)


async def test_runner_keeps_rate_and_in_flight_on_the_mock_clock(tmp_path: Path, autojump_clock: Any) -> None:
    names = [f"d{i:02d}" for i in range(30)]
    action = FakeAction({n: 0.1 + (i % 7) * 0.3 for i, n in enumerate(names)}, failing=frozenset(names[::10]))
    async with trio.open_nursery() as nursery:
        runner, store = await _runner(tmp_path, action, names, nursery)
        desired = {"type": "desired", "patch": {"interval": 30}}  # the twin's plug: here the fake action
        job = await runner.create("g=x", desired, Rollout(rate=4, max_in_flight=3), "op")
        done = await until_final(runner, job.job_id)
        nursery.cancel_scope.cancel()
    assert done.state is JobState.COMPLETED
    assert {s: n for s, n in done.counts.items() if n} == {DeviceState.SUCCEEDED: 27, DeviceState.FAILED: 3}
    times = [t for t, _, _ in action.starts]
    assert [d for _, d, _ in action.starts] == names  # in rollout order, each once
    assert {k for _, _, k in action.starts} == {f"job:{job.job_id}"}
    assert min(b - a for a, b in itertools.pairwise(times)) >= 0.25 - 1e-9  # 4 per second
    assert action.peak == 3
    outcomes = store.devices(job.job_id, limit=100)
    assert [o.error for o in outcomes if o.state is DeviceState.FAILED] == ["broken"] * 3
    store.close()


async def test_runner_cancel_stops_devices_in_flight(tmp_path: Path, autojump_clock: Any) -> None:
    names = [f"d{i}" for i in range(10)]
    action = FakeAction(dict.fromkeys(names, math.inf))  # only a stop ends them
    async with trio.open_nursery() as nursery:
        runner, store = await _runner(tmp_path, action, names, nursery)
        job = await runner.create("g=x", {"type": "desired", "patch": {"a": 1}}, Rollout(rate=10, max_in_flight=4))
        while action.in_flight < 4:
            await trio.sleep(0.01)
        await trio.sleep(5)  # nothing more starts while four are in flight
        assert len(action.starts) == 4
        cancelled = await runner.cancel(job.job_id, "op")
        assert cancelled.state in (JobState.CANCELLING, JobState.CANCELLED)  # settled already if stops were quick
        assert cancelled.counts[DeviceState.PENDING] == 0 and cancelled.counts[DeviceState.CANCELLED] >= 6
        assert sorted(action.stopped) == names[:4]
        done = await until_final(runner, job.job_id)
        nursery.cancel_scope.cancel()
    assert done.state is JobState.CANCELLED and done.counts[DeviceState.CANCELLED] == 10
    assert done.reason == "cancelled by op"
    store.close()


async def test_a_job_whose_action_is_missing_is_not_resumed(tmp_path: Path, autojump_clock: Any) -> None:
    """A desired-state job stored by a hub with the twin's action, then a hub without it: the hub starts, the job
    waits on disk (logged), untouched."""
    names = ["d1", "d2"]
    async with trio.open_nursery() as nursery:
        runner, store = await _runner(tmp_path, FakeAction(dict.fromkeys(names, math.inf)), names, nursery)
        job = await runner.create("g=x", {"type": "desired", "patch": {"a": 1}}, Rollout(max_in_flight=1))
        nursery.cancel_scope.cancel()
    store.close()
    store = JobStore(tmp_path / "jobs.sqlite3")

    async def devices() -> list[DeviceRecord]:
        return _records(names)

    async with trio.open_nursery() as nursery:
        runner = JobRunner(store, None, devices=devices)  # type: ignore[arg-type]
        await nursery.start(runner.run)
        record = await runner.get(job.job_id)
        assert record is not None and record.state is JobState.RUNNING
        with pytest.raises(ControlError) as refused:
            await runner.cancel(job.job_id)
        assert refused.value.code == "invalid_state" and "not run by this hub" in refused.value.message
        nursery.cancel_scope.cancel()
    store.close()


async def test_a_stopped_desired_action_ends_stopped_and_keeps_its_change(tmp_path: Path) -> None:
    async with open_registry_store(StateConfig(), tmp_path) as store:
        await store.add("d1")
        twins = TwinService(store)
        action = DesiredAction(twins, DesiredSpec({"mode": "eco"}, 60.0), "op")
        ref = await action.start("d1", "job:j-1")
        assert ref == "1" and await action.start("d1", "job:j-1") == "1"  # started again: the same version
        results: list[ActionResult] = []
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                results.append(await action.result("d1", ref))

            nursery.start_soon(wait)
            await trio.sleep(0.05)
            await action.stop("d1", ref)
        assert results == [ActionResult(False, "stopped (the desired change stays in place)", stopped=True)]
        await action.stop("d1", ref)  # stopped before its wait began: it ends at once
        assert (await action.result("d1", ref)).stopped
        assert (await twins.get("d1")).desired == {"mode": "eco"}
        await twins.report("d1", {"mode": "eco"}, 1)
        assert await action.result("d1", ref) == ActionResult(True)
        with pytest.raises(ControlError) as caught:
            await action.start("ghost", "job:j-1")
        assert caught.value.code == "not_found"
