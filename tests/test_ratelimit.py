"""Rate limits: the token buckets alone, then throttled devices and operators against a real hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from device_client import protocol
from device_client.protocol import Ack, CloseCode, Error
from hub.control import CONTROL_PATH
from hub.ratelimit import DeviceRate, Rate, Throttle, TokenBucket
from tests.hubtools import (
    Ctl,
    add_devices,
    add_operators,
    connect,
    hello,
    hub_config,
    points,
    send_batch,
    start_hub,
    status_lines,
)
from tests.hubtools import telemetry_lines as stored
from tests.waiting import eventually

# ---------------------------------------------------------------------------- pure buckets


def test_bucket_allows_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(Rate(per_second=8, burst=5), now=100.0)  # times in 1/8 s: exact in binary
    assert [bucket.try_take(1, 100.0) for _ in range(6)] == [True] * 5 + [False]
    assert not bucket.try_take(1, 100.0625)  # half a token came back
    assert bucket.try_take(1, 100.125)
    assert bucket.try_take(3, 100.5) and not bucket.try_take(1, 100.5)
    assert bucket.try_take(5, 1000.0) and not bucket.try_take(1, 1000.0)  # refills to the burst, never beyond


def test_take_runs_into_debt_and_says_how_long_to_wait() -> None:
    bucket = TokenBucket(Rate(per_second=100, burst=50), now=0.0)
    assert bucket.take(50, 0.0) == 0.0
    assert bucket.take(20, 0.0) == pytest.approx(0.2)  # 20 tokens owed at 100/s
    assert bucket.take(0, 0.1) == pytest.approx(0.1)  # half of the debt paid off
    assert bucket.take(0, 0.2) == 0.0


def test_rates_must_be_positive() -> None:
    with pytest.raises(ValueError, match="per_second"):
        Rate(per_second=0, burst=1)
    with pytest.raises(ValueError, match="burst"):
        Rate(per_second=1, burst=-1)


def test_device_rate_waits_for_the_slower_of_both_buckets() -> None:
    rate = DeviceRate(Rate(10, 10), Rate(1000, 1000), now=0.0)
    assert rate.charge(1, 1000, 0.0) == 0.0
    assert rate.charge(1, 500, 0.0) == pytest.approx(0.5)  # points are the limit here
    rate = DeviceRate(Rate(10, 2), Rate(1000, 1000), now=0.0)
    assert rate.charge(2, 0, 0.0) == 0.0
    assert rate.charge(1, 0, 0.0) == pytest.approx(0.1)  # messages are


def test_throttle_episodes_start_once_end_when_the_device_slows_and_turn_persistent() -> None:
    throttle = Throttle(DeviceRate(Rate(10, 2), Rate(1e6, 1e6), now=0.0), close_after=1.0)
    assert throttle.charge(1, 0, 0.0).delay == 0.0
    assert throttle.charge(1, 0, 0.0).delay == 0.0
    first = throttle.charge(1, 0, 0.0)
    assert (first.started, first.persistent, first.delay) == (True, False, pytest.approx(0.1))
    now = 0.1
    while True:  # a device that always has the next message ready: exactly the rate, always in debt
        verdict = throttle.charge(1, 0, now)
        assert verdict.delay > 0 and not verdict.started
        if verdict.persistent:
            break
        now += verdict.delay
    assert now > 1.0
    throttle = Throttle(DeviceRate(Rate(10, 1), Rate(1e6, 1e6), now=0.0), close_after=1.0)
    throttle.charge(1, 0, 0.0)
    assert throttle.charge(1, 0, 0.0).started
    assert throttle.charge(1, 0, 0.5).delay == 0.0  # it slowed down: the episode is over
    assert throttle.since is None
    assert throttle.charge(1, 0, 0.5).started  # a new one begins


# ---------------------------------------------------------------------------- devices


async def collect(ws: WebSocketConnection, last_seq: int, seen: list[Any]) -> None:
    """Read hub messages into `seen` until the ack of `last_seq` (or the hub closes)."""
    try:
        while True:
            msg = protocol.decode(await ws.get_message())
            seen.append(msg)
            if isinstance(msg, Ack) and msg.seq >= last_seq:
                return
    except ConnectionClosed as exc:
        seen.append(exc.reason)


async def test_a_flooding_device_is_slowed_down_and_never_delays_the_others(tmp_path: Path) -> None:
    good = [f"good{i}" for i in range(3)]
    tokens = add_devices(tmp_path, "flood", *good)
    flood_batches, good_batches, size = 60, 10, 4
    config = hub_config(tmp_path, **{"server.message_rate": 20.0, "server.message_burst": 10})
    events: list[str] = []
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)

        async def flooder(seen: list[Any]) -> None:
            async with connect(hub, tokens["flood"]) as ws:
                await hello(ws)
                async with trio.open_nursery() as inner:
                    inner.start_soon(collect, ws, flood_batches, seen)
                    for seq in range(1, flood_batches + 1):  # as fast as the hub takes them
                        await send_batch(ws, seq, points(size, start=seq * 10))
            events.append("flood done")

        async def well_behaved(name: str, seen: list[Any]) -> None:
            async with connect(hub, tokens[name]) as ws:
                await hello(ws)
                for seq in range(1, good_batches + 1):  # within its own burst: never throttled
                    await send_batch(ws, seq, points(size, start=seq * 10))
                await collect(ws, good_batches, seen)
            events.append(f"{name} done")

        flood_seen: list[Any] = []
        good_seen: dict[str, list[Any]] = {name: [] for name in good}
        async with trio.open_nursery() as devices:
            devices.start_soon(flooder, flood_seen)
            await eventually(lambda: hub.stats.throttled, 30)  # the flood is being held back before the others start
            for name in good:
                devices.start_soon(well_behaved, name, good_seen[name])
        hub.stop()
    # (60 - 10) messages at 20/s take the flooder at least 2.5 s: the others finished long before.
    assert events[-1] == "flood done", events
    errors = [m for m in flood_seen if isinstance(m, Error)]
    assert errors and all(e.code == "rate_limited" and e.seq is None for e in errors)  # a notice, nothing refused
    assert flood_seen[-1] == Ack(flood_batches)
    for name in good:
        assert not any(isinstance(m, Error) for m in good_seen[name])
        assert good_seen[name][-1] == Ack(good_batches)
    lines = stored(tmp_path)
    for name in good:
        assert len([ln for ln in lines if f",device={name}," in ln]) == good_batches * size
    assert len([ln for ln in lines if ",device=flood," in ln]) == flood_batches * size
    assert hub.stats.protocol_errors["rate_limited"] == hub.stats.throttled >= 1


async def test_a_device_that_keeps_exceeding_is_closed_with_1013_and_loses_nothing_acked(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "flood", "good")
    config = hub_config(
        tmp_path,
        **{
            "server.message_rate": 40.0,
            "server.message_burst": 5,
            "server.point_rate": 200.0,
            "server.point_burst": 100,
            "server.throttle_close_after": 0.5,
        },
    )
    seen: list[Any] = []
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with connect(hub, tokens["flood"]) as ws, connect(hub, tokens["good"]) as good:
            await hello(ws)
            await hello(good)
            sent = 0
            async with trio.open_nursery() as inner:
                inner.start_soon(collect, ws, 10**9, seen)
                try:
                    with trio.fail_after(60):
                        while True:
                            sent += 1
                            await send_batch(ws, sent, points(5, start=sent * 10))
                except ConnectionClosed:
                    pass
            await send_batch(good, 1, points(3))
            await collect(good, 1, [])
            # The session ends just after its close frame: wait for it, then stop the hub.
            await eventually(lambda: hub.presence.status["flood"].state == "offline", 10)
        hub.stop()
    close = seen[-1]
    assert close.code == CloseCode.TRY_LATER
    assert hub.presence.status["flood"].reason == "rate_limited"
    assert any(",device=flood,reason=rate_limited " in ln for ln in status_lines(tmp_path))
    acked = max(m.seq for m in seen if isinstance(m, Ack))
    assert 0 < acked < sent
    flood_lines = [ln for ln in stored(tmp_path) if ",device=flood," in ln]
    assert len(flood_lines) >= acked * 5  # every acked point is stored; the rest the device resends later
    assert len([ln for ln in stored(tmp_path) if ",device=good," in ln]) == 3


async def test_rate_buckets_are_not_refilled_by_reconnecting(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    config = hub_config(tmp_path, **{"server.message_rate": 0.5, "server.message_burst": 3})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws)
            for seq in (1, 2, 3):
                await send_batch(ws, seq, points(1, start=seq))
            await collect(ws, 3, [])
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws)
            await send_batch(ws, 4, points(1, start=4))
            seen: list[Any] = []
            await collect(ws, 4, seen)
            assert any(isinstance(m, Error) and m.code == "rate_limited" for m in seen)
        hub.stop()


# ---------------------------------------------------------------------------- operators


async def test_operator_requests_over_the_rate_get_rate_limited(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, alice="viewer", bob="viewer")
    config = hub_config(tmp_path, **{"control.request_rate": 0.5, "control.request_burst": 4})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with (
            connect(hub, ops["alice"], path=CONTROL_PATH) as one,
            connect(hub, ops["alice"], path=CONTROL_PATH) as two,
            connect(hub, ops["bob"], path=CONTROL_PATH) as other,
        ):
            alice, alice2, bob = Ctl(one), Ctl(two), Ctl(other)
            for ctl in (alice, alice2, bob):
                assert (await ctl.recv())["type"] == "auth_ok"
            for rid in range(1, 7):  # pipelined, as a script would
                await alice.send({"id": rid, "type": "ping"})
            replies = [await alice.recv() for _ in range(6)]
            assert [r["type"] for r in replies] == ["pong"] * 4 + ["result"] * 2
            assert [r["id"] for r in replies] == [1, 2, 3, 4, 5, 6]
            assert {r["error"]["code"] for r in replies[4:]} == {"rate_limited"}
            assert await alice2.error("status") == "rate_limited"  # one bucket per operator, not per session
            assert (await bob.call("ping"))["type"] == "pong"  # other operators are not affected
            await alice.send(json.dumps({"id": 9, "type": "status"}))
            assert (await alice.recv())["error"]["code"] == "rate_limited"
            assert hub.control.sessions == 3  # refusals for the rate do not close the session
        hub.stop()
    assert hub.stats.requests_rate_limited == 4
