"""The device twin end to end: real hubs on loopback (each state backend), real device clients, the control channel,
REST and hubctl's client; a change made while the device is offline, conflicts, limits, restarts and a cluster."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from device_client import DeviceClient
from device_client.protocol import Error, ErrorCode, Report, ReportAck, decode, encode
from device_client.twin import MAX_TWIN_BYTES, MAX_TWIN_DEPTH
from firmware_sim.fleet import run_fleet
from hub.app import HubHandle
from hub.config import StateConfig
from hub.control import CONTROL_PATH, ControlError
from hub.fleet import TwinService, open_registry_store
from hub.operator import open_control
from tests.hubtools import connect, control, hello, hub_config, start_hub, url, written_lines
from tests.servers import Redis
from tests.waiting import eventually

FAST = {"backoff_initial": 0.05, "backoff_max": 0.5}


def _overrides(state: StateConfig) -> dict[str, Any]:
    return {"state.backend": state.backend, "state.url": state.url}


async def _register(state: StateConfig, data: Path, *devices: str) -> tuple[dict[str, str], dict[str, str]]:
    async with open_registry_store(state, data) as store:
        tokens = {name: await store.add(name) for name in devices}
        ops = {role: await store.add_operator(role, role) for role in ("viewer", "operator", "admin")}
    return tokens, ops


def _applying(client: DeviceClient, seen: list[dict[str, Any]]) -> None:
    """A device that applies `interval`, `mode` and `net` and reports them back."""

    @client.on_desired
    async def apply(desired: dict[str, Any]) -> dict[str, Any]:
        seen.append(desired)
        return {key: desired.get(key) for key in ("interval", "mode", "net")}


async def test_a_change_made_offline_is_applied_on_connect_then_patches_follow(
    state_config: StateConfig, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    tokens, ops = await _register(state_config, data, "d1", "d2")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(data, **_overrides(state_config)))
        async with control(hub, ops["operator"]) as op, control(hub, ops["viewer"]) as viewer:
            sub = (await viewer.ok("subscribe", topic="twin", devices=["d1"]))["subscription"]
            twin = await op.ok("twin_set", device="d1", patch={"interval": 2, "mode": "eco"})
            assert twin["desired"]["version"] == 1 and twin["desired"]["state"] == {"interval": 2, "mode": "eco"}
            assert twin["delta"] == {"interval": 2, "mode": "eco"} and twin["applied_version"] == 0
            assert await op.error("twin_set", device="d1", patch={"mode": "x"}, if_version=0) == "version_conflict"
            assert (await op.ok("twin", device="d1"))["desired"]["state"]["mode"] == "eco"  # nothing changed
            (event,) = await viewer.events(sub, 1)
            assert event["device"] == "d1" and event["desired"]["version"] == 1

            seen: list[dict[str, Any]] = []
            client = DeviceClient(url(hub), tokens["d1"], outbox_path=tmp_path / "d1.sqlite3", **FAST)
            _applying(client, seen)
            async with client:

                async def in_sync(version: int) -> bool:
                    twin = await op.ok("twin", device="d1")
                    return twin["applied_version"] == version and twin["delta"] == {}

                await eventually(lambda: in_sync(1), poll=0.1, what="the device applied and reported version 1")
                assert seen == [{"interval": 2, "mode": "eco"}] and client.desired_version == 1
                # A reported interval is presence's at once (the hello declared none).
                assert hub.presence.status["d1"].interval == 2.0

                twin = await op.ok("twin_set", device="d1", patch={"mode": None, "net": {"apn": "iot"}}, if_version=1)
                assert twin["desired"]["version"] == 2
                await eventually(lambda: in_sync(2), poll=0.1, what="the device applied version 2")
                assert seen[-1] == {"interval": 2, "net": {"apn": "iot"}} and client.desired == seen[-1]
                twin = await op.ok("twin", device="d1")
                assert twin["reported"]["state"] == {"interval": 2, "net": {"apn": "iot"}}  # mode null: removed
                assert twin["reported"]["version"] == 2

                await client.report({"firmware": {"slot": "b"}, "rssi": -71})
                await client.wait_reported()
                twin = await op.ok("twin", device="d1")
                want = {"interval": 2, "net": {"apn": "iot"}, "firmware": {"slot": "b"}, "rssi": -71}
                assert twin["reported"]["state"] == want
                assert twin["reported"]["version"] == 3
                versions = [e["reported"]["version"] for e in await viewer.events(sub, 1)]
                assert versions[-1] >= 1

        hub.stop()
    # Each reported change is a point, numbers as floats, nested keys joined with ".".
    lines = [ln for ln in written_lines(data) if ln.startswith("twin_reported,")]
    assert any(ln.startswith("twin_reported,device=d1 interval=2") for ln in lines), lines
    assert any("rssi=-71" in ln for ln in lines), lines


async def test_limits_roles_and_unknown_devices_have_codes(state_config: StateConfig, tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens, ops = await _register(state_config, data, "d1")
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(MAX_TWIN_DEPTH):
        inner["a"] = {}
        inner = inner["a"]
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(data, **_overrides(state_config)))
        async with control(hub, ops["operator"]) as op, control(hub, ops["viewer"]) as viewer:
            assert await op.error("twin_set", device="d1", patch={"x": "y" * MAX_TWIN_BYTES}) == "too_large"
            assert await op.error("twin_set", device="d1", patch=deep) == "bad_patch"
            assert await op.error("twin_set", device="d1", patch=[1]) == "bad_request"
            assert await op.error("twin_set", device="d1") == "bad_request"
            assert await op.error("twin_set", device="ghost", patch={"a": 1}) == "not_found"
            assert await op.error("twin", device="ghost") == "not_found"
            assert await viewer.error("twin_set", device="d1", patch={"a": 1}) == "forbidden"
            # A document may grow past the limit only one patch at a time: each is refused when it would.
            await op.ok("twin_set", device="d1", patch={"a": "x" * (MAX_TWIN_BYTES // 2)})
            assert await op.error("twin_set", device="d1", patch={"b": "x" * (MAX_TWIN_BYTES // 2)}) == "too_large"
            assert (await viewer.ok("twin", device="d1"))["desired"]["version"] == 1

            # A device's report beyond the limits: an error frame naming it, the session goes on.
            async with connect(hub, tokens["d1"]) as ws:
                await hello(ws)
                await ws.send_message(encode(Report(1, {"x": "y" * MAX_TWIN_BYTES})))
                refused = decode(await ws.get_message())
                assert refused == Error(ErrorCode.BAD_REPORT, refused.detail, report=1), refused  # type: ignore[union-attr]
                await ws.send_message(encode(Report(2, {"ok": True})))
                assert decode(await ws.get_message()) == ReportAck(2, 1)
            assert (await viewer.ok("twin", device="d1"))["reported"]["state"] == {"ok": True}
        hub.stop()


async def test_twins_and_unacknowledged_reports_survive_restarts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    state = StateConfig()
    tokens, ops = await _register(state, data, "d1")
    outbox = tmp_path / "d1.sqlite3"
    seen: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        first = await start_hub(nursery, hub_config(data))
        async with control(first, ops["operator"]) as op:
            await op.ok("twin_set", device="d1", patch={"interval": 5})
        client = DeviceClient(url(first), tokens["d1"], outbox_path=outbox, **FAST)
        _applying(client, seen)
        async with client:
            await eventually(lambda: client.desired_version == 1 and client.reports_pending == 0)
            first.stop()
            await eventually(lambda: not client.stats.connected, what="the hub is gone")
            await client.report({"battery": 80})  # no hub: kept in the outbox file
            assert client.reports_pending == 1
        second = await start_hub(nursery, hub_config(data))
        async with control(second, ops["operator"]) as op:
            assert (await op.ok("twin", device="d1"))["desired"]["state"] == {"interval": 5}  # durable
            client = DeviceClient(url(second), tokens["d1"], outbox_path=outbox, **FAST)
            _applying(client, seen)
            async with client:
                assert client.desired == {"interval": 5} and client.reports_pending == 1  # from the file
                await client.wait_reported()
                twin = await op.ok("twin", device="d1")
                assert twin["reported"]["state"] == {"interval": 5, "battery": 80}
                assert twin["applied_version"] == 1
            assert len(seen) == 1  # version 1 was applied once: the hello said so and nothing was sent again
        second.stop()


async def test_rest_and_the_operator_client(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _, ops = await _register(StateConfig(), data, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(data))
        auth = {"authorization": f"Bearer {ops['operator']}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{hub.metrics_port}", timeout=20) as http:
            patched = await http.patch("/v1/devices/d1/twin", headers=auth, json={"patch": {"interval": 3}})
            assert patched.status_code == 200 and patched.json()["desired"]["version"] == 1
            conflict = await http.patch(
                "/v1/devices/d1/twin", headers=auth, json={"patch": {"interval": 4}, "if_version": 0}
            )
            assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "version_conflict"
            big = await http.patch("/v1/devices/d1/twin", headers=auth, json={"patch": {"x": "y" * MAX_TWIN_BYTES}})
            assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"
            got = await http.get("/v1/devices/d1/twin", headers={"authorization": f"Bearer {ops['viewer']}"})
            assert got.status_code == 200 and got.json()["delta"] == {"interval": 3}
            assert (await http.get("/v1/devices/ghost/twin", headers=auth)).status_code == 404
        async with open_control(f"ws://127.0.0.1:{hub.port}{CONTROL_PATH}", ops["operator"]) as ctl:
            twin = await ctl.twin_set("d1", {"interval": 4}, if_version=1)
            assert twin["desired"]["version"] == 2
            try:
                await ctl.twin_set("d1", {"interval": 5}, if_version=1)
            except ControlError as exc:
                assert exc.code == "version_conflict"
            else:
                raise AssertionError("a stale if_version was taken")
            assert (await ctl.twin("d1"))["desired"]["state"] == {"interval": 4}
        hub.stop()


async def test_a_change_on_one_hub_reaches_the_device_on_another(redis_server: Redis, tmp_path: Path) -> None:
    state = StateConfig(backend="redis", url=redis_server.url)
    tokens, ops = await _register(state, tmp_path / "reg", "d1")
    on_redis = _overrides(state)
    seen: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        a = await start_hub(nursery, hub_config(tmp_path / "a", **on_redis))
        b = await start_hub(nursery, hub_config(tmp_path / "b", **on_redis))
        client = DeviceClient(url(b), tokens["d1"], **FAST)
        _applying(client, seen)
        async with client, control(a, ops["operator"]) as op, control(a, ops["viewer"]) as viewer:
            await eventually(lambda: "d1" in b.server.sessions)
            sub = (await viewer.ok("subscribe", topic="twin"))["subscription"]
            await op.ok("twin_set", device="d1", patch={"interval": 7, "mode": "night"})

            async def applied() -> bool:
                twin = await op.ok("twin", device="d1")
                return twin["applied_version"] == 1 and twin["delta"] == {}

            await eventually(applied, poll=0.1, what="the device on hub b applied a change made on hub a")
            assert seen == [{"interval": 7, "mode": "night"}]
            # The device's report on hub b reached a twin subscriber on hub a.
            events = await viewer.events(sub, 1)
            while events[-1]["reported"]["version"] < 1:
                events = await viewer.events(sub, 1)
            assert events[-1]["reported"]["state"] == {"interval": 7, "mode": "night"}
        _stop(a, b)


def _stop(*hubs: HubHandle) -> None:
    for hub in hubs:
        hub.stop()


def test_a_report_frame_is_plain_json() -> None:
    assert json.loads(encode(Report(3, {"a": None}, 2))) == {
        "type": "report",
        "id": 3,
        "patch": {"a": None},
        "desired_version": 2,
    }


async def test_the_simulator_takes_its_interval_and_measurements_from_the_twin(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tokens, ops = await _register(StateConfig(), data, "sim-1")
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(data))
        # th-100 reports `environment` and `battery`; every 10 minutes until the twin says otherwise.
        fleet = partial(run_fleet, url(hub), [tokens["sim-1"]], interval=600.0, models=["th-100"], stop=stop)
        nursery.start_soon(partial(fleet, outbox_dir=tmp_path / "outboxes", client_options=FAST))
        async with control(hub, ops["operator"]) as op:
            await eventually(lambda: "sim-1" in hub.server.sessions)
            await op.ok("twin_set", device="sim-1", patch={"interval": 0.05, "measurements": {"battery": False}})

            async def applied() -> bool:
                twin = await op.ok("twin", device="sim-1")
                return twin["applied_version"] == 1 and twin["delta"] == {}

            await eventually(applied, poll=0.1, what="the simulator applied its desired document")
            twin = await op.ok("twin", device="sim-1")
            assert twin["reported"]["state"] == {"interval": 0.05, "measurements": {"battery": False}}
            assert hub.presence.status["sim-1"].interval == 0.05

            def counts() -> tuple[int, int]:
                lines = written_lines(data)
                return sum(ln.startswith("environment,") for ln in lines), sum(
                    ln.startswith("battery,") for ln in lines
                )

            await eventually(lambda: counts()[0] >= 10, what="reports every 0.05 s")
            _, battery = counts()
            assert battery <= 1  # at most one report went out before the twin turned battery off
            await op.ok("twin_set", device="sim-1", patch={"measurements": None})
            await eventually(lambda: counts()[1] > battery, what="battery reported again")
        stop.set()
        hub.stop()


async def test_wait_applied_wakes_on_the_report_and_gives_up_at_its_timeout(
    state_config: StateConfig, tmp_path: Path
) -> None:
    async with open_registry_store(state_config, tmp_path / "data") as store:
        await store.add("d1")
        twins = TwinService(store)
        rec = await twins.set_desired("d1", {"interval": 5})
        assert await twins.wait_applied("d1", rec.desired_version, 0.05) is None  # not applied: gives up
        got: list[Any] = []
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                got.append(await twins.wait_applied("d1", rec.desired_version, 30))

            nursery.start_soon(wait)
            await trio.sleep(0.05)
            await twins.report("d1", {"interval": 5}, 0)  # a report, but of an older version: waits on
            await trio.sleep(0.05)
            assert got == []
            with trio.fail_after(2):  # well before RECHECK: woken by the report
                await twins.report("d1", {}, rec.desired_version)
                while not got:
                    await trio.sleep(0.01)
        assert got[0].applied_version == rec.desired_version
