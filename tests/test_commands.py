"""Durable commands through a real hub to real WebSocket devices: the whole state machine, restarts included.

The timers (TTL, result timeout) and the rules of the table run without sockets, on trio's mock clock, in
tests/test_command_service.py."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio
from trio_websocket import WebSocketConnection

import hub.fleet._commands as commands_module
from device_client import protocol
from device_client.protocol import Command, CommandAck, CommandResult, Error, ErrorCode
from hub.app import HubHandle
from hub.fleet import CommandError
from hub.fleet._command_store import stored
from hub.fleet._commands import FINAL_STATES, CommandStore
from tests.hubtools import (
    add_devices,
    connect,
    hello,
    hub_config,
    points,
    receive,
    send_batch,
    start_hub,
    status_lines,
    wait_ack,
    written_lines,
)
from tests.servers import ScriptedWriteServer
from tests.waiting import eventually


async def next_command(ws: WebSocketConnection) -> Command:
    while True:
        msg = await receive(ws)
        if isinstance(msg, Command):
            return msg


async def answer(ws: WebSocketConnection, cmd: Command, *, ok: bool = True, result: object = None) -> None:
    await ws.send_message(protocol.encode(CommandAck(cmd.id)))
    await ws.send_message(protocol.encode(CommandResult(cmd.id, ok, result, "" if ok else "it broke")))


async def until_state(hub: HubHandle, command_id: str, state: str) -> None:
    """Wait (10 s at most) until the hub has command `command_id` in `state`."""

    async def reached() -> bool:
        return (await hub.commands.get(command_id)).state == state

    await eventually(reached, 10, what=f"command {command_id} {state}")


def states(rec) -> list[str]:
    return [state for state, _ in rec.history]


def stored_state(path: Path, command_id: str) -> str | None:
    """The state that is durable for a command right now (SQLite and the store's journal, read from outside)."""
    rec = stored(path, command_id)
    return None if rec is None else rec.state


async def test_round_trip_and_transition_points(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws)
            rec = await hub.commands.submit("d1", "echo", {"x": 1}, operator="alice")
            cmd = await next_command(ws)
            assert (cmd.id, cmd.name, cmd.args, cmd.timeout) == (rec.command_id, "echo", {"x": 1}, 30.0)
            await answer(ws, cmd, result={"x": 1})
            final = await hub.commands.wait_final(rec.command_id, 10)
            assert final.state == "succeeded" and final.result == {"x": 1}
            assert states(final) == ["queued", "sent", "delivered", "succeeded"]

            failing = await hub.commands.submit("d1", "explode")
            await answer(ws, await next_command(ws), ok=False)
            final = await hub.commands.wait_final(failing.command_id, 10)
            assert (final.state, final.error) == ("failed", "it broke")
        hub.stop()
    lines = [ln for ln in written_lines(tmp_path) if ln.startswith("command,")]
    assert [ln.split(" ")[0] for ln in lines if "name=echo" in ln] == [
        f"command,device=d1,name=echo,state={s}" for s in ("queued", "sent", "delivered", "succeeded")
    ]
    assert all(f'command_id="{rec.command_id}"' in ln for ln in lines if "name=echo" in ln)


async def test_restart_keeps_every_unfinished_command_and_resumes(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1", "d2")
    config = hub_config(tmp_path)
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        queued = await hub.commands.submit("d2", "for_offline")  # d2 never connects before the restart
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws)
            sent = await hub.commands.submit("d1", "unacked")
            assert (await next_command(ws)).id == sent.command_id  # received, never acknowledged
            delivered = await hub.commands.submit("d1", "no_result_yet", timeout=300)
            cmd = await next_command(ws)
            await ws.send_message(protocol.encode(CommandAck(cmd.id)))
            await until_state(hub, delivered.command_id, "delivered")
            assert (await hub.commands.get(sent.command_id)).state == "sent"
        hub.stop()

    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        assert [(await hub.commands.get(c.command_id)).state for c in (queued, sent, delivered)] == [
            "queued",
            "sent",
            "delivered",
        ]
        async with connect(hub, tokens["d1"]) as ws, connect(hub, tokens["d2"]) as ws2:
            await hello(ws)
            # Both unanswered commands come again, in order; the device deduplicates by id.
            again = [await next_command(ws), await next_command(ws)]
            assert [c.id for c in again] == [sent.command_id, delivered.command_id]
            for cmd in again:
                await answer(ws, cmd)
            await hello(ws2)
            await answer(ws2, await next_command(ws2))
            for c in (queued, sent, delivered):
                assert (await hub.commands.wait_final(c.command_id, 10)).state == "succeeded"
        hub.stop()


async def test_cancel_only_before_delivery(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        doomed = await hub.commands.submit("d1", "never")
        assert (await hub.commands.cancel(doomed.command_id)).state == "cancelled"
        with pytest.raises(CommandError) as err:
            await hub.commands.cancel(doomed.command_id)
        assert err.value.code == "invalid_state"
        with pytest.raises(CommandError) as err:
            await hub.commands.cancel("c-nope")
        assert err.value.code == "not_found"
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws)
            live = await hub.commands.submit("d1", "live")
            cmd = await next_command(ws)
            assert cmd.id == live.command_id  # the cancelled one was not sent
            await ws.send_message(protocol.encode(CommandAck(cmd.id)))
            await until_state(hub, live.command_id, "delivered")
            with pytest.raises(CommandError) as err:
                await hub.commands.cancel(live.command_id)
            assert err.value.code == "invalid_state"
        hub.stop()


async def test_a_late_result_after_timed_out_is_known_to_the_device_session(tmp_path: Path) -> None:
    # The timers themselves are tested on trio's mock clock (tests/test_command_service.py); this is the wire.
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws)
            rec = await hub.commands.submit("d1", "slow", timeout=0.3)
            cmd = await next_command(ws)
            await ws.send_message(protocol.encode(CommandAck(cmd.id)))
            final = await hub.commands.wait_final(rec.command_id, 10)
            assert states(final) == ["queued", "sent", "delivered", "timed_out"]
            await ws.send_message(protocol.encode(CommandResult(cmd.id, True, "late")))
            await send_batch(ws, 1, points(1))
            seen = await wait_ack(ws, 1)
            assert not any(isinstance(m, Error) for m in seen)  # known command: no error, no change
            assert (await hub.commands.get(rec.command_id)).state == "timed_out"
        hub.stop()


async def test_idempotency_key_makes_a_retried_send_harmless(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        first = await hub.commands.submit("d1", "reboot", idempotency_key="op-42")
        second = await hub.commands.submit("d1", "reboot", idempotency_key="op-42")
        assert second.command_id == first.command_id
        other = await hub.commands.submit("d1", "reboot", idempotency_key="op-43")
        assert other.command_id != first.command_id
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws)
            got = [(await next_command(ws)).id, (await next_command(ws)).id]
            assert got == [first.command_id, other.command_id]
        assert len(await hub.commands.list("d1")) == 2
        hub.stop()


async def test_queue_bound_and_bad_requests(tmp_path: Path) -> None:
    add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path, **{"commands.max_queue": 2}))
        await hub.commands.submit("d1", "a")
        await hub.commands.submit("d1", "b")
        cases = [
            (("d1", "c"), {}, "queue_full"),
            (("ghost", "a"), {}, "not_found"),
            (("d1", "bad name"), {}, "bad_command"),
            (("d1", "a", ["not", "an", "object"]), {}, "bad_command"),
            (("d1", "a"), {"ttl": 10**9}, "bad_command"),
            (("d1", "a"), {"timeout": 0}, "bad_command"),
            (("d1", "a", {"blob": "x" * 20000}), {}, "bad_command"),
        ]
        for args, kwargs, code in cases:
            with pytest.raises(CommandError) as err:
                await hub.commands.submit(*args, **kwargs)
            assert err.value.code == code, (args, kwargs)
        hub.stop()


async def test_answers_for_commands_never_sent_or_of_another_device_are_refused(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1", "d2")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        theirs = await hub.commands.submit("d2", "private")
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws)
            for msg in (
                CommandResult("c-forged", True),
                CommandAck(theirs.command_id),
                CommandResult(theirs.command_id, True),
            ):
                await ws.send_message(protocol.encode(msg))
                reply = await receive(ws)
                assert isinstance(reply, Error) and reply.code == ErrorCode.UNKNOWN_COMMAND
        assert (await hub.commands.get(theirs.command_id)).state == "queued"
        hub.stop()


async def test_device_that_goes_quiet_is_late_then_online_again(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    config = hub_config(tmp_path, **{"presence.late_factor": 1.0, "presence.late_grace": 0.2})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws, interval=0.2)
            await eventually(lambda: hub.presence.status["d1"].state == "late", 20)
            await send_batch(ws, 1, points(1))
            await wait_ack(ws, 1)
            await eventually(lambda: hub.presence.status["d1"].state == "online", 20)
            assert hub.presence.status["d1"].reason == "data"
        hub.stop()
    lines = status_lines(tmp_path)
    assert any("reason=no_data" in ln and "late=1i" in ln and "online=1i" in ln for ln in lines)
    assert any("reason=data" in ln and "late=0i" in ln for ln in lines)


async def test_accepted_and_final_states_are_committed_before_anyone_learns_of_them(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1", "d2")
    config = hub_config(tmp_path)
    db_path = config.storage.path / "commands.sqlite3"
    published: list[tuple[str, str | None]] = []  # (state published, state in SQLite at that moment)
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)

        def notify() -> None:
            while len(sub.buffer):
                record = sub.buffer.pop()
                published.append((record["state"], stored_state(db_path, record["command_id"])))

        sub = hub.broadcaster.subscribe("commands", None, notify)
        offline = await hub.commands.submit("d2", "later")
        assert stored_state(db_path, offline.command_id) == "queued"
        assert (await hub.commands.cancel(offline.command_id)).state == "cancelled"
        assert stored_state(db_path, offline.command_id) == "cancelled"
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws)
            for ok in (True, False):
                rec = await hub.commands.submit("d1", "work")
                assert stored_state(db_path, rec.command_id) in ("queued", "sent")
                await answer(ws, await next_command(ws), ok=ok)
                final = await hub.commands.wait_final(rec.command_id, 10)
                assert final.state == ("succeeded" if ok else "failed")
                assert stored_state(db_path, rec.command_id) == final.state
        hub.stop()
    assert [state for state, _ in published] == [
        "queued",
        "cancelled",
        *["queued", "sent", "delivered", "succeeded"],
        *["queued", "sent", "delivered", "failed"],
    ]
    for state, in_sqlite in published:
        if state == "queued" or state in FINAL_STATES:
            assert in_sqlite == state


async def test_a_stopped_hub_leaves_every_transition_in_sqlite_in_order(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    config = hub_config(tmp_path)
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws)
            done = await hub.commands.submit("d1", "done")
            await answer(ws, await next_command(ws))
            await hub.commands.wait_final(done.command_id, 10)
            acked = await hub.commands.submit("d1", "acked", timeout=300)
            cmd = await next_command(ws)
            await ws.send_message(protocol.encode(CommandAck(cmd.id)))
            await until_state(hub, acked.command_id, "delivered")
        hub.stop()  # at once: "delivered" is still in memory, written behind; closing the store commits it
    store = CommandStore(config.storage.path / "commands.sqlite3")
    try:
        records = [store.get(done.command_id), store.get(acked.command_id)]
    finally:
        store.close()
    assert [states(r) for r in records] == [
        ["queued", "sent", "delivered", "succeeded"],
        ["queued", "sent", "delivered"],
    ]
    assert [r.state for r in records] == ["succeeded", "delivered"]
    for r in records:
        times = [at for _, at in r.history]
        assert times == sorted(times) and r.updated == times[-1]


async def test_a_full_pipeline_holds_back_no_transition_and_loses_no_point(tmp_path: Path) -> None:
    release = threading.Event()

    def slow(path: str, body: str) -> tuple[int, dict[str, str], bytes]:
        release.wait(60)  # the database holds every write until the test lets it go
        return 204, {}, b""

    tokens = add_devices(tmp_path, "d1", "streamer")
    with ScriptedWriteServer(slow) as db:
        config = hub_config(tmp_path, **{"influx.url": db.url, "batch.max_lines": 1, "batch.queue_items": 1})
        async with trio.open_nursery() as nursery:
            hub = await start_hub(nursery, config)
            pipeline = hub.server.pipeline
            async with connect(hub, tokens["d1"]) as ws, connect(hub, tokens["streamer"]) as streamer:
                await hello(ws)
                await hello(streamer)
                for seq in range(1, 11):
                    await send_batch(streamer, seq, points(1, start=seq))
                await eventually(lambda: pipeline.queued >= 1, 10)  # full: the next submit to the pipeline would wait
                with trio.fail_after(10):  # no transition waits for room in the pipeline
                    rec = await hub.commands.submit("d1", "ping")
                    await answer(ws, await next_command(ws))
                    final = await hub.commands.wait_final(rec.command_id, 10)
                assert states(final) == ["queued", "sent", "delivered", "succeeded"]
                assert pipeline.queued == 1  # still full: the points wait in the command service
                release.set()
            hub.stop()
    lines = [ln.split(" ")[0] for ln in db.accepted_lines() if ln.startswith("command,")]
    assert lines == [f"command,device=d1,name=ping,state={s}" for s in ("queued", "sent", "delivered", "succeeded")]
    assert hub.commands.points_lost == 0


async def test_transition_points_go_out_in_chunks_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The feeder builds the points' lines itself, POINT_CHUNK at a time: every one arrives, in transition order.
    monkeypatch.setattr(commands_module, "POINT_CHUNK", 3)
    tokens = add_devices(tmp_path, "d1")
    with ScriptedWriteServer(lambda path, body: (204, {}, b"")) as db:
        config = hub_config(tmp_path, **{"influx.url": db.url})
        async with trio.open_nursery() as nursery:
            hub = await start_hub(nursery, config)
            async with connect(hub, tokens["d1"]) as ws:
                await hello(ws)
                ids = []
                for i in range(4):
                    rec = await hub.commands.submit("d1", f"c{i}")
                    await answer(ws, await next_command(ws))
                    await hub.commands.wait_final(rec.command_id, 10)
                    ids.append(rec.command_id)
                await eventually(lambda: sum(ln.startswith("command,") for ln in db.accepted_lines()) == 16, 10)
            hub.stop()
    lines = [ln for ln in db.accepted_lines() if ln.startswith("command,")]
    expected = [(cid, s) for cid in ids for s in ("queued", "sent", "delivered", "succeeded")]
    assert [
        (ln.split('command_id="')[1].split('"')[0], ln.split("state=")[1].split(" ")[0]) for ln in lines
    ] == expected
    assert hub.commands.points_lost == 0
