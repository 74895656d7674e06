"""Connection limits (503 total, 429 per address), slowloris handshakes, idle sessions and the in-flight window."""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from device_client.protocol import DEVICE_PATH, Ack, CloseCode
from hub.config import ConfigError, load_config
from hub.control import CONTROL_PATH
from tests.hubtools import (
    add_devices,
    add_operators,
    connect,
    hello,
    hub_config,
    points,
    receive,
    send_batch,
    start_hub,
    status_lines,
    stream_batches,
    telemetry_lines,
    wait_ack,
)
from tests.servers import ScriptedWriteServer
from tests.waiting import eventually
from tests.wire import closed_by_peer, open_tcp, upgrade, upgrade_request

# ---------------------------------------------------------------------------- configuration


def test_limit_options_load_and_zero_switches_off_what_it_may() -> None:
    config = load_config(
        None,
        env={},
        overrides={"server.max_connections_per_address": 0, "server.idle_timeout": 0, "control.request_rate": 2.5},
    )
    assert (config.server.max_connections_per_address, config.server.idle_timeout) == (0, 0.0)
    assert config.control.request_rate == 2.5
    for key in ("server.max_connections", "server.message_rate", "server.point_burst", "control.request_burst"):
        with pytest.raises(ConfigError, match=key.split(".")[1]):
            load_config(None, env={}, overrides={key: 0})
    with pytest.raises(ConfigError, match="idle_timeout"):
        load_config(None, env={}, overrides={"server.idle_timeout": -1})


# ---------------------------------------------------------------------------- connection limits


async def test_total_connection_limit_answers_503_with_retry_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = add_devices(tmp_path, "d1", "d2", "d3")
    ops = add_operators(tmp_path, alice="viewer")
    caplog.set_level(logging.INFO, logger="hub")
    config = hub_config(tmp_path, **{"server.max_connections": 3, "server.retry_after": 7})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with connect(hub, tokens["d1"]) as d1, connect(hub, ops["alice"], path=CONTROL_PATH) as ctl:
            await hello(d1)
            await ctl.get_message()  # auth_ok: operators count too
            async with connect(hub, tokens["d2"]) as d2:
                await hello(d2)
                with pytest.raises(ConnectionRejected) as refused:
                    async with connect(hub, tokens["d3"]):
                        pass
                assert refused.value.status_code == 503
                assert dict(refused.value.headers or [])[b"retry-after"] == b"7"
                await stream_batches(d1, 1, 2)  # the hub serves those it has
            await eventually(lambda: hub.edge.open_connections < 3, 10)
            async with connect(hub, tokens["d3"]) as d3:  # a place is free again
                await hello(d3)
                await stream_batches(d3, 1, 1)
        hub.stop()
    assert hub.stats.refused == 1
    [line] = [r for r in caplog.records if r.getMessage() == "handshake refused"]
    assert line.kv["reason"] == "too_many_connections" and line.kv["remote"].startswith("127.0.0.1:")


async def test_connections_per_address_answer_429_and_other_addresses_carry_on(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    config = hub_config(tmp_path, **{"server.max_connections_per_address": 2, "server.retry_after": 11})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        held = []
        for _ in range(2):  # browsers-to-be on the control channel: upgraded, not yet authenticated
            status, _, stream = await upgrade(hub.port, CONTROL_PATH, source="127.0.0.2")
            assert status == 101
            held.append(stream)
        status, headers, stream = await upgrade(hub.port, CONTROL_PATH, source="127.0.0.2")
        assert (status, headers["retry-after"]) == (429, "11")
        assert await closed_by_peer(stream)
        status, _, stream = await upgrade(hub.port, DEVICE_PATH, source="127.0.0.2")
        assert status == 429  # the limit counts every endpoint
        await stream.aclose()
        # Another address is not affected.
        async with connect(hub, tokens["d1"]) as d1:
            await hello(d1)
            await stream_batches(d1, 1, 2)
        for stream in held:
            await stream.aclose()
        await eventually(lambda: not hub.edge.open_connections, 10)
        status, _, stream = await upgrade(hub.port, CONTROL_PATH, source="127.0.0.2")
        assert status == 101
        await stream.aclose()
        hub.stop()
    assert hub.stats.refused == 2


async def test_no_per_address_limit_when_set_to_zero(tmp_path: Path) -> None:
    config = hub_config(tmp_path, **{"server.max_connections_per_address": 0, "server.max_connections": 5})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        held = []
        for _ in range(5):
            status, _, stream = await upgrade(hub.port, CONTROL_PATH, source="127.0.0.3")
            assert status == 101
            held.append(stream)
        status, _, refused = await upgrade(hub.port, CONTROL_PATH, source="127.0.0.4")
        assert status == 503  # only the total limit applies
        assert await closed_by_peer(refused)
        for stream in held:
            await stream.aclose()
        hub.stop()


# ---------------------------------------------------------------------------- slowloris


async def test_slowloris_handshakes_are_dropped_while_devices_stream(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "good", "slow")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path, **{"server.handshake_timeout": 0.5}))
        silent = await open_tcp(hub.port)
        request = upgrade_request(DEVICE_PATH, {"Authorization": f"Bearer {tokens['slow']}"})
        dribbler = await open_tcp(hub.port)
        sent = 0
        async with connect(hub, tokens["good"]) as good:
            await hello(good)
            seq = 0
            # One byte of a valid upgrade request every 50 ms would take over 10 s: the hub drops it long before.
            while sent < len(request):
                seq += 1
                await send_batch(good, seq, points(2, start=seq * 10))
                try:
                    await dribbler.send_all(request[sent : sent + 1])
                except trio.BrokenResourceError:
                    break
                sent += 1
                with trio.move_on_after(0.05):
                    if not await dribbler.receive_some(4096):
                        break
            assert sent < len(request)
            assert await closed_by_peer(silent)
            await wait_ack(good, seq)
        hub.stop()
    assert "slow" not in hub.presence.status  # never got past the handshake
    assert len([ln for ln in telemetry_lines(tmp_path) if ",device=good," in ln]) == 2 * seq


# ---------------------------------------------------------------------------- idle sessions


async def test_idle_device_is_closed_with_1001_and_marked_offline(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "quiet", "chatty", "slowpoke")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path, **{"server.idle_timeout": 1.0}))
        async with (
            connect(hub, tokens["quiet"]) as quiet,
            connect(hub, tokens["chatty"]) as chatty,
            connect(hub, tokens["slowpoke"]) as slowpoke,
        ):
            await hello(quiet)
            await hello(chatty, interval=0.1)
            await hello(slowpoke, interval=20)
            sessions = hub.server.sessions
            assert sessions["quiet"].idle_timeout() == 1.0
            assert sessions["slowpoke"].idle_timeout() == 60.0  # 3 x its declared interval
            seq = 0
            while hub.presence.status["quiet"].online:
                seq += 1
                await send_batch(chatty, seq, points(1, start=seq))
                assert await receive(chatty) == Ack(seq)
                await trio.sleep(0.1)  # pacing: chatty stays active while quiet goes idle
            assert hub.presence.status["quiet"].reason == "idle"
            with pytest.raises(ConnectionClosed) as closed:
                await receive(quiet)
            assert closed.value.reason.code == CloseCode.GOING_AWAY
            assert hub.presence.status["chatty"].online and hub.presence.status["slowpoke"].online
        hub.stop()
    assert any(",device=quiet,reason=idle " in ln for ln in status_lines(tmp_path))


async def test_idle_timeout_zero_never_closes(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path, **{"server.idle_timeout": 0}))
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws, interval=5)
            assert hub.server.sessions["d1"].idle_timeout() == math.inf
        hub.stop()


# ---------------------------------------------------------------------------- the in-flight window


async def test_a_device_over_its_window_is_read_only_as_acks_make_room(tmp_path: Path) -> None:
    """Nothing refused, nothing dropped: the hub stops reading until the pipeline catches up."""
    release = threading.Event()

    def gated(path: str, body: str) -> tuple[int, dict[str, str], bytes]:
        release.wait(60)
        return 204, {}, b""

    tokens = add_devices(tmp_path, "eager")
    with ScriptedWriteServer(gated) as db:
        config = hub_config(
            tmp_path, **{"influx.url": db.url, "server.window": 3, "batch.max_lines": 1, "batch.max_delay": 0}
        )
        async with trio.open_nursery() as nursery:
            hub = await start_hub(nursery, config)
            async with connect(hub, tokens["eager"]) as ws:
                assert (await hello(ws)).window == 3
                for seq in range(1, 11):  # ignores the window it was told
                    await send_batch(ws, seq, points(1, start=seq))
                await eventually(lambda: hub.stats.window_waits, 20)
                assert hub.stats.points_in == 3  # the rest waits in the socket, unread
                release.set()
                seen = await wait_ack(ws, 10)
                assert all(isinstance(msg, Ack) for msg in seen)
            hub.stop()
        lines = [ln for ln in db.accepted_lines() if ln.startswith("environment,")]
    assert len(lines) == 10
    assert hub.stats.protocol_errors == {}
