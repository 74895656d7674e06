"""Several hubs on one Redis make one fleet (hub.cluster): commands reach a device on any hub, subscriptions see
every hub, telemetry crosses the bus only for watched devices, one live session per device, revocations close
sessions everywhere, and a hub killed with SIGKILL has its devices marked offline (`hub_lost`) by the others."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from device_client import DeviceClient
from device_client.protocol import CloseCode
from hub.app import HubHandle
from hub.config import StateConfig
from hub.fleet import open_registry_store
from tests.hubproc import HubProcess
from tests.hubtools import connect, control, hello, hub_config, points, start_hub, url
from tests.servers import Redis
from tests.waiting import eventually
from tests.wire import http_get


async def _register(redis: Redis, *devices: str) -> tuple[dict[str, str], str]:
    """Device tokens, and an admin operator's token, in the Redis every hub of the test shares."""
    async with open_registry_store(StateConfig(backend="redis", url=redis.url), "unused") as store:
        tokens = {name: await store.add(name) for name in devices}
        return tokens, await store.add_operator("alice", "admin")


@asynccontextmanager
async def _hubs(redis: Redis, tmp_path: Path, n: int, **overrides: Any) -> AsyncIterator[list[HubHandle]]:
    """`n` hubs in this process, each with its own data directory, all on `redis`."""
    on_redis = {"state.backend": "redis", "state.url": redis.url, **overrides}
    async with trio.open_nursery() as nursery:
        hubs = [await start_hub(nursery, hub_config(tmp_path / f"hub{i}", **on_redis)) for i in range(n)]
        yield hubs
        for hub in hubs:
            hub.stop()


def _client(hub: HubHandle, token: str) -> DeviceClient:
    client = DeviceClient(url(hub), token, backoff_initial=0.05, backoff_max=0.5)

    @client.command("echo")
    async def echo(args: dict[str, Any]) -> Any:
        return {"echo": args}

    return client


async def _close_code(ws: WebSocketConnection) -> int | None:
    """Read until the hub closes `ws`; its close code."""
    with trio.fail_after(10):
        while True:
            try:
                await ws.get_message()
            except ConnectionClosed as closed:
                return closed.reason.code


async def _online_on(hub: HubHandle, name: str) -> None:
    await eventually(lambda: name in hub.server.sessions and name in hub.presence.status)


async def test_a_command_sent_on_one_hub_runs_on_a_device_connected_to_another(
    redis_server: Redis, tmp_path: Path
) -> None:
    tokens, operator = await _register(redis_server, "d1")
    async with (
        _hubs(redis_server, tmp_path, 3) as (a, b, c),
        _client(b, tokens["d1"]),
        control(c, operator) as watcher,
        control(a, operator) as ctl,
    ):
        await _online_on(b, "d1")
        sub = (await watcher.ok("subscribe", topic="commands"))["subscription"]
        record = await ctl.ok("send_command", device="d1", name="echo", args={"x": 1}, wait=True, wait_timeout=20)
        assert record["state"] == "succeeded", record
        assert record["result"] == {"echo": {"x": 1}}
        # The owner's states reached an operator on a third hub, in order. As docs/control.md has it, a state may be
        # replaced by a newer one of the same command still waiting to be sent (coalesced), never the last one: the
        # device's ack and result come in one packet, and "delivered" and "succeeded" can reach the watcher's hub
        # before its sender runs. None is lost: what is missing was coalesced.
        states: list[str] = []
        while "succeeded" not in states:
            states += [e["state"] for e in await watcher.events(sub, 1)]
        every = ["queued", "sent", "delivered", "succeeded"]
        assert states == [s for s in every if s in states], states
        assert c.broadcaster.totals() == {"dropped": 0, "coalesced": len(every) - len(states)}
        # Any hub reads the record (mirrored in Redis) and lists it.
        assert (await watcher.ok("command", command_id=record["command_id"]))["state"] == "succeeded"
        listed = await watcher.ok("commands", device="d1")
        assert [r["command_id"] for r in listed] == [record["command_id"]]


async def test_a_queued_command_is_offered_when_its_device_connects_to_another_hub(
    redis_server: Redis, tmp_path: Path
) -> None:
    tokens, operator = await _register(redis_server, "d1")
    async with _hubs(redis_server, tmp_path, 2) as (a, b), control(a, operator) as ctl:
        queued = await ctl.ok("send_command", device="d1", name="echo", args={"n": 7})
        assert queued["state"] == "queued"
        async with _client(b, tokens["d1"]):
            done = await ctl.ok("send_command", device="d1", name="echo", args={"n": 8}, wait=True, wait_timeout=20)
            assert done["state"] == "succeeded"

            async def first_done() -> bool:
                return (await ctl.ok("command", command_id=queued["command_id"]))["state"] == "succeeded"

            await eventually(first_done)
        # A cancel from the hub that does not own the command is answered by its owner.
        async with control(b, operator) as other:
            later = await ctl.ok("send_command", device="d1", name="echo", args={})
            assert (await other.ok("cancel_command", command_id=later["command_id"]))["state"] == "cancelled"
            assert await other.error("cancel_command", command_id=done["command_id"]) == "invalid_state"


async def test_subscriptions_see_every_hub_and_telemetry_crosses_only_when_watched(
    redis_server: Redis, tmp_path: Path
) -> None:
    tokens, operator = await _register(redis_server, "d1", "d2")
    async with _hubs(redis_server, tmp_path, 2) as (a, b):
        assert a.cluster is not None and b.cluster is not None
        async with _client(b, tokens["d1"]) as d1, control(a, operator) as ctl:
            async with _client(b, tokens["d2"]) as d2:
                await d1.send_batch(points(5))
                await d2.send_batch(points(5))
                await d1.wait_acked()
                await d2.wait_acked()
                assert b.cluster.bus.published["telemetry"] == 0  # nobody watches: no bus traffic per point
                presence = (await ctl.ok("subscribe", topic="presence"))["subscription"]
                telemetry = (await ctl.ok("subscribe", topic="telemetry", devices=["d1"]))["subscription"]
                await eventually(lambda: b.cluster is not None and b.cluster._relay is not None)
                await d1.send_batch(points(3, start=100))
                await d2.send_batch(points(3, start=100))
                await d1.wait_acked()
                await d2.wait_acked()
                events = await ctl.events(telemetry, 1)
                assert events[0]["device"] == "d1"
                assert events[0]["fields"]["temperature"] == points(3, start=100)[2]["fields"]["temperature"]
                # d2 is not watched: none of its points crossed the bus (d1's: coalesced per measurement).
                assert 1 <= b.cluster.telemetry_relayed <= 3
                status, body = await trio.to_thread.run_sync(http_get, f"http://127.0.0.1:{b.metrics_port}/metrics")
                assert status == 200
                assert 'hub_bus_published_total{kind="telemetry"}' in body.decode()
                assert "hub_bus_connected 1.0" in body.decode()
            # A device's presence on hub B reaches a presence subscriber on hub A.
            summary = (await ctl.events(presence, 1))[0]
            assert (summary["name"], summary["state"], summary["reason"]) == ("d2", "offline", "disconnected")
            # `devices` on hub A lists B's devices with their state, last_seen and latest values.
            listed = {d["name"]: d for d in await ctl.ok("devices")}
            assert listed["d1"]["state"] == "online" and listed["d2"]["state"] == "offline"

            async def latest_saved() -> bool:
                detail = await ctl.ok("device", name="d1")
                return "environment" in detail["latest"] and detail["last_seen"] is not None

            await eventually(latest_saved)


async def test_a_device_reconnecting_to_another_hub_replaces_its_old_session_without_going_offline(
    redis_server: Redis, tmp_path: Path
) -> None:
    tokens, operator = await _register(redis_server, "d1")
    async with _hubs(redis_server, tmp_path, 3) as (a, b, c), control(c, operator) as ctl:
        presence = (await ctl.ok("subscribe", topic="presence", devices=["d1"]))["subscription"]
        async with connect(a, tokens["d1"]) as old:
            first = await hello(old)
            async with connect(b, tokens["d1"]) as new:
                second = await hello(new)
                assert second.epoch == first.epoch + 1
                assert await _close_code(old) == CloseCode.REPLACED  # hub A closes its older session
                await eventually(lambda: "d1" not in a.server.sessions)
                events = await ctl.events(presence, 2)
                assert [(e["state"], e["epoch"]) for e in events] == [
                    ("online", first.epoch),
                    ("online", second.epoch),
                ]
                assert (await ctl.ok("device", name="d1"))["state"] == "online"
                assert "d1" not in a.presence.status  # the replaced session's end is not news anywhere
                assert not [p for p in ctl.pushes if p.get("subscription") == presence]


async def test_revoking_a_device_on_one_hub_closes_its_session_on_another(redis_server: Redis, tmp_path: Path) -> None:
    tokens, operator = await _register(redis_server, "d1")
    async with _hubs(redis_server, tmp_path, 2) as (a, b), connect(b, tokens["d1"]) as ws:
        await hello(ws)
        async with control(a, operator) as ctl:
            await ctl.ok("device_revoke", name="d1")
        assert await _close_code(ws) == CloseCode.REVOKED
        assert b.cluster is not None and b.cluster.bus.received["revoke"] >= 1  # told at once, not found by polling


async def test_presence_lost_from_redis_is_said_again_by_the_hub_holding_the_session(
    redis_server: Redis, tmp_path: Path
) -> None:
    tokens, operator = await _register(redis_server, "d1")
    async with _hubs(redis_server, tmp_path, 2) as (a, b), _client(b, tokens["d1"]), control(a, operator) as ctl:
        await _online_on(b, "d1")
        assert (await ctl.ok("device", name="d1"))["state"] == "online"
        # What a Redis restarted without those keys (an old snapshot, a flush of volatile keys) has lost.
        assert redis_server.command(b"DEL", b"hub:hubs", b"hub:hubs:joined", b"hub:presence:d1").startswith(b":")

        async def shown_online_again() -> bool:
            return bool((await ctl.ok("device", name="d1"))["state"] == "online")

        await eventually(lambda: redis_server.command(b"EXISTS", b"hub:presence:d1") == b":1\r\n", what="re-claimed")
        await eventually(shown_online_again)


async def test_the_devices_of_a_hub_killed_with_sigkill_go_offline_hub_lost_then_online_elsewhere(
    redis_server: Redis, tmp_path: Path
) -> None:
    names = [f"d{i}" for i in range(4)]
    tokens, operator = await _register(redis_server, *names)
    config = tmp_path / "killed.toml"
    hub_ttl = 5.0  # shorter than the default 15 s, so the test waits less for the loss to be noticed
    config.write_text(f'[state]\nbackend = "redis"\nurl = "{redis_server.url}"\nhub_ttl = {hub_ttl}\n')
    doomed = HubProcess(tmp_path / "killed", "--config", str(config), "--log-level", "info")
    await trio.to_thread.run_sync(doomed.start)
    try:
        async with (
            _hubs(redis_server, tmp_path, 1, **{"state.hub_ttl": hub_ttl}) as (survivor,),
            control(survivor, operator) as ctl,
        ):
            presence = (await ctl.ok("subscribe", topic="presence"))["subscription"]
            clients = [DeviceClient(doomed.url, tokens[n], backoff_initial=0.05, backoff_max=0.5) for n in names]

            @clients[0].command("echo")
            async def never_answers(args: dict[str, Any]) -> Any:
                await trio.sleep_forever()  # acked at once, no result before its hub dies

            async with trio.open_nursery() as nursery:
                for client in clients:
                    await nursery.start(_hold, client)
                for client in clients:
                    await client.send_batch(points(4))
                    await client.wait_acked()
                online = await ctl.events(presence, len(names))
                assert {(e["name"], e["state"]) for e in online} == {(n, "online") for n in names}
                # A command owned by the survivor, delivered to d0 through the hub about to die.
                in_flight = await ctl.ok("send_command", device="d0", name="echo", args={"k": 1})

                async def delivered() -> bool:
                    return (await ctl.ok("command", command_id=in_flight["command_id"]))["state"] == "delivered"

                await eventually(delivered)
                doomed.signal(signal.SIGKILL)
                # The heartbeat's bound, with room for a busy machine.
                lost = await ctl.events(presence, len(names), timeout=hub_ttl * 4 + 10)
                assert {(e["name"], e["state"], e["reason"]) for e in lost} == {
                    (n, "offline", "hub_lost") for n in names
                }
                nursery.cancel_scope.cancel()
            # The devices come back on the surviving hub: online again there.
            async with trio.open_nursery() as nursery:
                for name in names:
                    await nursery.start(_hold, _client(survivor, tokens[name]))
                back = await ctl.events(presence, len(names))
                assert {(e["name"], e["state"]) for e in back} == {(n, "online") for n in names}
                # The in-flight command is offered again on d0's new hub, and answered there.
                done = await ctl.ok("send_command", device="d0", name="echo", args={"k": 2}, wait=True, wait_timeout=20)
                assert done["state"] == "succeeded"
                again = await ctl.ok("command", command_id=in_flight["command_id"])
                assert (again["state"], again["result"]) == ("succeeded", {"echo": {"k": 1}}), again
                nursery.cancel_scope.cancel()
    finally:
        doomed.kill()


async def _hold(client: DeviceClient, task_status: trio.TaskStatus[DeviceClient]) -> None:
    async with client:
        task_status.started(client)
        await trio.sleep_forever()
