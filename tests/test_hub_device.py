"""The device endpoint over real loopback WebSockets: handshake, telemetry and acks, every refusal."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from device_client import protocol
from device_client.protocol import Ack, CloseCode, Error, ErrorCode
from hub.fleet import Registry
from tests.hubtools import (
    BAD_MESSAGES,
    BASE_TS,
    add_devices,
    connect,
    hello,
    hub_config,
    points,
    raw,
    receive,
    send_batch,
    start_hub,
    status_lines,
    telemetry_lines,
    wait_ack,
)
from tests.servers import ScriptedWriteServer
from tests.waiting import eventually


async def test_stream_ack_and_resend(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        async with connect(hub, tokens["d1"]) as ws:
            welcome = await hello(ws, firmware="1.0", model="th-100", interval=5)
            assert (welcome.device, welcome.ack, welcome.epoch) == ("d1", 0, 1)
            for seq in (1, 2, 3):
                await send_batch(ws, seq, points(4, start=seq * 10))
            await wait_ack(ws, 3)
            lines = telemetry_lines(tmp_path)
            assert len(lines) == 12  # acked means durable: the lines are already on disk
            assert all(ln.startswith("environment,device=d1,room=lab\\ 2 ") for ln in lines)
            # Field order kept; a Python int travels as {"int": n} and is written as an integer.
            assert lines[0] == f"environment,device=d1,room=lab\\ 2 temperature=20.0,count=0i {BASE_TS + 10}"

            await send_batch(ws, 2, points(4, start=20))  # a resend of an acked batch
            msg = await receive(ws)
            assert msg == Ack(3)
            assert len(telemetry_lines(tmp_path)) == 12  # re-acked, not written again
        hub.stop()
    assert hub.stats.resends == 1


async def test_last_ack_and_epoch_survive_restart(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    config = hub_config(tmp_path)
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws)
            for seq in range(1, 6):
                await send_batch(ws, seq, points(2, start=seq * 10))
            await wait_ack(ws, 5)
        hub.stop()
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with connect(hub, tokens["d1"]) as ws:
            welcome = await hello(ws)
            assert (welcome.ack, welcome.epoch) == (5, 2)
            await send_batch(ws, 4, points(2, start=40))
            assert await receive(ws) == Ack(5)
            await send_batch(ws, 6, points(2, start=60))
            await wait_ack(ws, 6)
        hub.stop()
    assert len(telemetry_lines(tmp_path)) == 12


@pytest.mark.parametrize(
    ("path", "headers", "token", "status"),
    [
        ("/v1/device", [], None, 401),
        ("/v1/device", [(b"authorization", b"Basic ZDE6eA==")], None, 401),
        ("/v1/device", [], "garbage", 401),
        ("/v1/device", [], "nobody.secret", 401),
        ("/v1/device", [], "WRONG_SECRET", 401),
        ("/v1/device", [], "REVOKED", 401),
        ("/v1/device?token=QUERY", [], None, 401),
        ("/v1/device", [(b"origin", b"https://evil.example")], "GOOD", 403),
        ("/v1/other", [], "GOOD", 404),
    ],
)
async def test_handshake_refusals(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, path: str, headers: list, token: str | None, status: int
) -> None:
    tokens = add_devices(tmp_path, "d1", "gone")
    with Registry(tmp_path / "registry.sqlite3") as registry:
        registry.revoke("gone")
    real = {"GOOD": tokens["d1"], "WRONG_SECRET": "d1.not-the-secret", "REVOKED": tokens["gone"]}
    token = real.get(token, token) if token else None
    path = path.replace("QUERY", tokens["d1"])
    caplog.set_level(logging.DEBUG)
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        with pytest.raises(ConnectionRejected) as refused:
            async with connect(hub, token, path=path, headers=headers):
                pass
        assert refused.value.status_code == status
        # The hub carries on serving good devices.
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws)
        hub.stop()
    assert hub.stats.refused == 1
    secret = tokens["d1"].split(".", 1)[1]
    # Never logged by the hub, not even when sent in the URL (the test's own client logs its URL).
    server_side = [r.getMessage() for r in caplog.records if not r.getMessage().startswith("Connecting to ws")]
    assert server_side and not any(secret in m for m in server_side)


async def test_every_refused_message_gets_its_error_and_the_session_goes_on(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "bad", "good")
    config = hub_config(tmp_path, **{"limits.max_points": 5, "server.max_errors": 100})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with connect(hub, tokens["good"]) as good, connect(hub, tokens["bad"]) as bad:
            await hello(good)
            await hello(bad)
            await send_batch(bad, 1, points(2))
            await wait_ack(bad, 1)
            good_seq = 0
            for text, code, seq in BAD_MESSAGES:
                good_seq += 1
                await send_batch(good, good_seq, points(2, start=good_seq * 10))
                await bad.send_message(text)
                msg = await receive(bad)
                while isinstance(msg, Ack):  # a refused batch is acked too: its ack may come between errors
                    msg = await receive(bad)
                assert isinstance(msg, Error), (text, msg)
                assert (msg.code, msg.seq) == (code, seq), text
                assert len(msg.detail) <= 200
            await wait_ack(good, good_seq)
            # A refused batch is resolved: the cumulative ack passes over it.
            await send_batch(bad, 70, points(2, start=700))
            seen = await wait_ack(bad, 70)
            assert Ack(70) in seen
        hub.stop()
    lines = telemetry_lines(tmp_path)
    assert len([ln for ln in lines if ",device=good," in ln]) == 2 * good_seq
    assert len([ln for ln in lines if ",device=bad," in ln]) == 4
    assert not any("device=other" in ln for ln in lines)
    assert hub.stats.protocol_errors[ErrorCode.BAD_FIELD] == 1


async def test_refused_last_batch_is_still_acked(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws)
            await send_batch(ws, 1, [{"measurement": "m", "ts": 5, "fields": {"x": 1.0}}])
            msg = await receive(ws)
            assert isinstance(msg, Error) and (msg.code, msg.seq) == (ErrorCode.BAD_TIME, 1)
            assert await receive(ws) == Ack(1)
        hub.stop()


async def test_too_many_errors_closes_with_1008(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path, **{"server.max_errors": 3}))
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws)
            codes = []
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(10):
                    await ws.send_message("nope")
                    msg = await receive(ws)
                    codes.append(msg.code)
            assert closed.value.reason.code == CloseCode.POLICY
            assert codes == [ErrorCode.BAD_JSON] * 4 + [ErrorCode.TOO_MANY_ERRORS]
        hub.stop()


async def test_oversized_frame_closes_with_1009_and_others_carry_on(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "big", "ok")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path, **{"server.max_message_bytes": 4096}))
        async with connect(hub, tokens["ok"]) as ok:
            await hello(ok)
            async with connect(hub, tokens["big"]) as big:
                await hello(big)
                await send_batch(big, 1, points(100))
                with pytest.raises(ConnectionClosed) as closed:
                    await receive(big)
                assert closed.value.reason.code == CloseCode.TOO_BIG
            await send_batch(ok, 1, points(3))
            await wait_ack(ok, 1)
        hub.stop()
    assert any(",reason=too_big " in ln for ln in status_lines(tmp_path))


async def test_hello_must_come_first(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        async with connect(hub, tokens["d1"]) as ws:
            await send_batch(ws, 1, points(1))
            assert (await receive(ws)).code == ErrorCode.NOT_READY
            with pytest.raises(ConnectionClosed) as closed:
                await receive(ws)
            assert closed.value.reason.code == CloseCode.POLICY
        async with connect(hub, tokens["d1"]) as ws:
            await ws.send_message(raw({"type": "hello", "proto": 2}))
            assert (await receive(ws)).code == ErrorCode.UNSUPPORTED_VERSION
        hub.stop()


async def test_silent_device_is_dropped_after_hello_timeout(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path, **{"server.hello_timeout": 0.3}))
        async with connect(hub, tokens["d1"]) as ws:
            msg = await receive(ws)
            assert msg == Error(ErrorCode.NOT_READY, "no hello in time")
            with pytest.raises(ConnectionClosed):
                await receive(ws)
        hub.stop()


async def test_second_connection_replaces_the_first(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        async with connect(hub, tokens["d1"]) as first:
            await hello(first)
            await send_batch(first, 1, points(2))
            await wait_ack(first, 1)
            async with connect(hub, tokens["d1"]) as second:
                welcome = await hello(second)
                assert (welcome.epoch, welcome.ack) == (2, 1)
                with pytest.raises(ConnectionClosed) as closed:
                    await receive(first)
                assert closed.value.reason.code == CloseCode.REPLACED
                await send_batch(second, 2, points(2, start=10))
                await wait_ack(second, 2)
                status = hub.presence.status["d1"]
                assert (status.online, status.epoch) == (True, 2)
        hub.stop()
    lines = status_lines(tmp_path)
    # Online(1), offline(1, replaced), online(2), in that order of timestamps.
    events = sorted((int(ln.rsplit(" ", 1)[1]), ln) for ln in lines)
    assert [("reason=replaced" in ln, "online=1i" in ln) for _, ln in events][:3] == [
        (False, True),
        (True, False),
        (False, True),
    ]


async def test_graceful_stop_sends_last_acks_then_1001(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        # A long batching delay: batches are still in memory when the stop begins.
        config = hub_config(tmp_path, **{"batch.max_delay": 30.0, "batch.flush_when_idle": False})
        hub = await start_hub(nursery, config)
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws)
            for seq in (1, 2, 3):
                await send_batch(ws, seq, points(5, start=seq * 10))
            await eventually(lambda: hub.stats.points_in >= 15, 10)
            hub.stop()
            seen = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    seen.append(await receive(ws))
            assert closed.value.reason.code == CloseCode.GOING_AWAY
            assert seen[-1] == Ack(3)
    assert len(telemetry_lines(tmp_path)) == 15
    assert any("reason=hub_shutdown" in ln and "online=0i" in ln for ln in status_lines(tmp_path))


async def test_unanswered_pings_mark_the_device_offline(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "mute", "ok")
    config = hub_config(tmp_path, **{"presence.ping_interval": 0.2, "presence.ping_timeout": 0.3})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        # A client whose library stops reading (queue of 1 full): it no longer answers pings.
        async with connect(hub, tokens["ok"]) as ok, connect(hub, tokens["mute"], message_queue_size=1) as mute:
            await hello(ok)
            await mute.send_message(protocol.encode(protocol.Hello()))
            await send_batch(mute, 1, points(1))
            await eventually(lambda: "mute" in hub.presence.status and not hub.presence.status["mute"].online, 20)
            assert hub.presence.status["mute"].reason == "ping_timeout"
            assert hub.presence.status["ok"].online  # the well-behaved device answers and stays
        hub.stop()
    assert any(",device=mute,reason=ping_timeout " in ln and "online=0i" in ln for ln in status_lines(tmp_path))


async def test_revoking_a_connected_device_closes_it_with_4003(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1", "d2")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        async with connect(hub, tokens["d1"]) as ws, connect(hub, tokens["d2"]) as other:
            await hello(ws)
            await hello(other)
            with Registry(tmp_path / "registry.sqlite3") as registry:  # as `hub device revoke d1` does
                registry.revoke("d1")
            with pytest.raises(ConnectionClosed) as closed:
                await receive(ws)
            assert closed.value.reason.code == CloseCode.REVOKED
            await send_batch(other, 1, points(1))
            await wait_ack(other, 1)
        with pytest.raises(ConnectionRejected) as refused:
            async with connect(hub, tokens["d1"]):
                pass
        assert refused.value.status_code == 401
        hub.stop()
    assert any(",device=d1,reason=revoked " in ln for ln in status_lines(tmp_path))


async def test_plain_http_request_gets_400(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        stream = await trio.open_tcp_stream("127.0.0.1", hub.port)
        await stream.send_all(b"GET /v1/device HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(10):
            answer = await stream.receive_some(4096)
        assert answer.startswith(b"HTTP/1.1 400")
        await stream.aclose()
        hub.stop()


async def test_backpressure_is_not_mistaken_for_a_dead_device(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """While the database holds ingest back, a device's pong waits unread: the hub must not drop the device."""
    release = threading.Event()

    def slow(path: str, body: str) -> tuple[int, dict[str, str], bytes]:
        release.wait(60)  # the database takes its time with every write until the test lets it go
        return 204, {}, b""

    tokens = add_devices(tmp_path, "d1")
    caplog.set_level(logging.INFO, logger="hub.session")
    with ScriptedWriteServer(slow) as db:
        config = hub_config(
            tmp_path,
            **{
                "influx.url": db.url,
                "presence.ping_interval": 0.1,
                "presence.ping_timeout": 0.2,
                "batch.max_lines": 1,
                "batch.queue_items": 1,
            },
        )
        async with trio.open_nursery() as nursery:
            hub = await start_hub(nursery, config)
            async with connect(hub, tokens["d1"]) as ws:
                await hello(ws)
                for seq in range(1, 11):
                    await send_batch(ws, seq, points(1, start=seq))
                await eventually(lambda: caplog.text.count("no pong while ingest is held back") >= 3, 30)
                assert hub.presence.status["d1"].online
                release.set()
                await wait_ack(ws, 10)
            hub.stop()
    assert "device stopped answering pings" not in caplog.text
