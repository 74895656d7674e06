"""DeviceClient command handling against the small real hub of test_client: acks, results, dedup, reconnects."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio

from device_client import CommandContext, DeviceClient
from device_client.protocol import MAX_RESULT_BYTES, CloseCode, Command, CommandResult
from tests.servers import FAST, FakeHub, Plan, batch
from tests.waiting import eventually


def cmd(cid: str, name: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Command:
    return Command(cid, name, args or {}, timeout)


@pytest.fixture
async def hub(nursery: trio.Nursery) -> FakeHub:
    h = FakeHub()
    await h.start(nursery)
    return h


def add_handlers(client: DeviceClient, runs: list[str], gate: trio.Event | None = None) -> None:
    """`add` sums a and b; `slow` waits for `gate`; `boom` raises; `quiet` raises without a message."""

    @client.command("add")
    async def add(args: dict[str, Any]) -> dict[str, Any]:
        runs.append("add")
        return {"sum": args["a"] + args["b"]}

    @client.command("slow")
    async def slow(args: dict[str, Any]) -> str:
        runs.append("slow")
        assert gate is not None
        await gate.wait()
        return "done"

    @client.command("boom")
    async def boom(args: dict[str, Any]) -> None:
        runs.append("boom")
        raise ValueError("the sensor is on fire")

    @client.command("quiet")
    async def quiet(args: dict[str, Any]) -> None:
        runs.append("quiet")
        raise RuntimeError


# ---------------------------------------------------------------------------- ack, result, failures


async def test_ack_then_result(hub: FakeHub) -> None:
    runs: list[str] = []
    client = DeviceClient(hub.url, "dev1.s")
    add_handlers(client, runs)
    async with client as c:
        await c.wait_connected()
        await hub.command("dev1", cmd("c1", "add", {"a": 1, "b": 2.5}))
        await eventually(lambda: hub.results("c1"))
        assert c.stats.commands_received == 1 and c.stats.commands_run == 1
        assert c.stats.commands_succeeded == 1 and c.stats.results_sent == 1
    conn = hub.conns[0]
    assert conn.frames == ["CommandAck", "CommandResult"]
    assert conn.acks == ["c1"]
    assert conn.results == [CommandResult("c1", True, {"sum": 3.5})]
    assert runs == ["add"]
    assert hub.open_commands["dev1"] == {}


async def test_ack_comes_at_once_while_the_handler_runs(hub: FakeHub) -> None:
    gate = trio.Event()
    client = DeviceClient(hub.url, "dev1.s")
    add_handlers(client, [], gate)
    async with client as c:
        await c.wait_connected()
        await hub.command("dev1", cmd("c1", "slow"))
        await eventually(lambda: hub.conns[0].acks == ["c1"])
        # The reader is not blocked by the running handler: telemetry and another command go through.
        await c.send_batch(batch())
        await c.wait_acked()
        await hub.command("dev1", cmd("c2", "add", {"a": 1, "b": 1}))
        await eventually(lambda: hub.results("c2"))
        assert hub.results("c1") == []
        gate.set()
        await eventually(lambda: hub.results("c1"))
    assert hub.results("c1") == [CommandResult("c1", True, "done")]
    assert hub.conns[0].results[0].id == "c2"


async def test_unknown_command_fails(hub: FakeHub) -> None:
    async with DeviceClient(hub.url, "dev1.s") as c:
        await c.wait_connected()
        await hub.command("dev1", cmd("c1", "self-destruct"))
        await eventually(lambda: hub.results("c1"))
        assert c.stats.commands_failed == 1
    assert hub.conns[0].acks == ["c1"]
    assert hub.results("c1") == [CommandResult("c1", False, error="unknown command 'self-destruct'")]


async def test_raising_handler_fails_and_the_client_carries_on(hub: FakeHub) -> None:
    runs: list[str] = []
    client = DeviceClient(hub.url, "dev1.s")
    add_handlers(client, runs)
    async with client as c:
        await c.wait_connected()
        await hub.command("dev1", cmd("c1", "boom"))
        await hub.command("dev1", cmd("c2", "quiet"))
        await eventually(lambda: hub.results("c1") and hub.results("c2"))
        await hub.command("dev1", cmd("c3", "add", {"a": 2, "b": 3}))
        await c.send_batch(batch())
        await c.wait_acked()
        await eventually(lambda: hub.results("c3"))
        assert c.stats.commands_failed == 2 and c.stats.commands_succeeded == 1
        assert c.stats.connects == 1
    assert hub.results("c1") == [CommandResult("c1", False, error="the sensor is on fire")]
    assert hub.results("c2") == [CommandResult("c2", False, error="RuntimeError")]
    assert hub.results("c3") == [CommandResult("c3", True, {"sum": 5})]
    assert sorted(runs) == ["add", "boom", "quiet"]


async def test_results_too_large_or_not_json_fail(hub: FakeHub) -> None:
    client = DeviceClient(hub.url, "dev1.s")
    values = {
        "big": "x" * MAX_RESULT_BYTES,
        "fits": "x" * (MAX_RESULT_BYTES - 2),
        "set": {1, 2},
        "nan": float("nan"),
        "none": None,
    }

    @client.command("give")
    async def give(args: dict[str, Any]) -> Any:
        return values[args["what"]]

    async with client as c:
        await c.wait_connected()
        for what in values:
            await hub.command("dev1", cmd(what, "give", {"what": what}))
        await eventually(lambda: len(hub.conns[0].results) == len(values))
    assert hub.results("big") == [CommandResult("big", False, error="result too large")]
    assert hub.results("fits") == [CommandResult("fits", True, values["fits"])]
    assert hub.results("set") == [CommandResult("set", False, error="result is not JSON")]
    assert hub.results("nan") == [CommandResult("nan", False, error="result is not JSON")]
    assert hub.results("none") == [CommandResult("none", True, None)]


async def test_handler_with_a_context(hub: FakeHub) -> None:
    client = DeviceClient(hub.url, "dev1.s")
    seen: list[CommandContext] = []

    @client.command("whoami")
    async def whoami(args: dict[str, Any], ctx: CommandContext) -> dict[str, Any]:
        seen.append(ctx)
        return {"id": ctx.id, "name": ctx.name, "device": ctx.client.device}

    async with client as c:
        await c.wait_connected()
        await hub.command("dev1", cmd("c-7", "whoami", timeout=12.5))
        await eventually(lambda: hub.results("c-7"))
    assert hub.results("c-7") == [CommandResult("c-7", True, {"id": "c-7", "name": "whoami", "device": "dev1"})]
    assert seen[0].client is client and seen[0].timeout == 12.5


def test_registration_checks() -> None:
    c = DeviceClient("ws://127.0.0.1:9", "dev1.s")
    with pytest.raises(ValueError):
        c.command("no spaces")
    with pytest.raises(ValueError):
        c.command("")

    async def three(args: dict, ctx: Any, extra: Any) -> None: ...

    async def none() -> None: ...

    async def ctx_optional(args: dict, ctx: Any = None) -> None: ...

    with pytest.raises(TypeError):
        c.command("three")(three)
    with pytest.raises(TypeError):
        c.command("none")(none)
    with pytest.raises(TypeError):
        c.command("sync")(lambda args: None)
    c.command("ok.name-1")(ctx_optional)
    assert c.commands == {"ok.name-1": ctx_optional}


# ---------------------------------------------------------------------------- deduplication


async def test_resent_id_while_running_is_only_acked(hub: FakeHub) -> None:
    runs: list[str] = []
    gate = trio.Event()
    client = DeviceClient(hub.url, "dev1.s")
    add_handlers(client, runs, gate)
    async with client as c:
        await c.wait_connected()
        await hub.command("dev1", cmd("c1", "slow"))
        await eventually(lambda: hub.conns[0].acks == ["c1"])
        await hub.send_raw("dev1", cmd("c1", "slow"))
        await eventually(lambda: hub.conns[0].acks == ["c1", "c1"])
        assert hub.results("c1") == [] and c.stats.command_repeats == 1
        gate.set()
        await eventually(lambda: hub.results("c1"))
        # Finished now: a resend gets the ack and the same result again, and does not run it again.
        await hub.send_raw("dev1", cmd("c1", "slow"))
        await eventually(lambda: len(hub.results("c1")) == 2)
        assert c.stats.command_repeats == 2 and c.stats.commands_run == 1
    assert runs == ["slow"]
    assert hub.conns[0].acks == ["c1"] * 3
    assert hub.results("c1") == [CommandResult("c1", True, "done")] * 2
    assert hub.conns[0].frames == ["CommandAck", "CommandAck", "CommandResult", "CommandAck", "CommandResult"]


async def test_command_log_is_bounded(hub: FakeHub) -> None:
    runs: list[str] = []
    client = DeviceClient(hub.url, "dev1.s", command_log_limit=3)
    add_handlers(client, runs)
    async with client as c:
        await c.wait_connected()
        for i in range(5):
            await hub.command("dev1", cmd(f"c{i}", "add", {"a": i, "b": 0}))
            await eventually(lambda i=i: hub.results(f"c{i}"))
        await hub.send_raw("dev1", cmd("c4", "add", {"a": 4, "b": 0}))  # still remembered
        await hub.send_raw("dev1", cmd("c0", "add", {"a": 0, "b": 0}))  # forgotten: runs again
        await eventually(lambda: len(hub.results("c0")) == 2 and len(hub.results("c4")) == 2)
    assert runs == ["add"] * 6


# ---------------------------------------------------------------------------- disconnects and restarts


async def test_result_survives_a_disconnect_and_goes_first(hub: FakeHub) -> None:
    runs: list[str] = []
    gate = trio.Event()
    client = DeviceClient(hub.url, "dev1.s", **FAST)
    add_handlers(client, runs, gate)
    async with client as c:
        await c.wait_connected()
        await hub.command("dev1", cmd("c1", "slow"))
        await eventually(lambda: hub.conns[0].acks == ["c1"])
        hub.refuse_status = 503
        await hub.drop("dev1")
        await eventually(lambda: not c.stats.connected)
        gate.set()  # the handler finishes while the device is offline
        await eventually(lambda: c.stats.commands_succeeded == 1)
        await c.send_batch(batch())  # and some telemetry waits too
        hub.refuse_status = None
        await c.wait_acked()
        await eventually(lambda: hub.results("c1"))
    assert hub.conns[0].results == []
    second = hub.conns[1]
    assert second.results[0] == CommandResult("c1", True, "done")
    assert second.frames.index("CommandResult") < second.frames.index("Telemetry")
    assert runs == ["slow"]


async def test_handler_cancelled_at_close_gives_no_result(hub: FakeHub) -> None:
    gate = trio.Event()  # never set
    client = DeviceClient(hub.url, "dev1.s", close_timeout=0.5)
    add_handlers(client, [], gate)
    with trio.fail_after(10):
        async with client as c:
            await c.wait_connected()
            await hub.command("dev1", cmd("c1", "slow"))
            await eventually(lambda: hub.conns[0].acks == ["c1"])
    assert hub.results("c1") == []
    assert c.stats.commands_succeeded == c.stats.commands_failed == 0
    assert hub.conns[0].close_code == CloseCode.NORMAL


async def test_unknown_command_error_is_logged_and_the_result_dropped(
    hub: FakeHub, caplog: pytest.LogCaptureFixture
) -> None:
    hub.unknown_ids = {"c1"}
    runs: list[str] = []
    client = DeviceClient(hub.url, "dev1.s", **FAST)
    add_handlers(client, runs)
    async with client as c:
        await c.wait_connected()
        await hub.send_raw("dev1", cmd("c1", "add", {"a": 1, "b": 1}))  # the hub keeps no record of it
        await eventually(lambda: hub.errors_sent == 2)  # for the ack and for the result
        await hub.drop("dev1")
        await eventually(lambda: c.stats.connects == 2)
        await c.send_batch(batch())
        await c.wait_acked()
    assert hub.conns[1].frames == ["Telemetry"]  # the refused result is not sent again
    assert c.stats.results_sent == 1
    assert any("does not know a command" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


async def test_persisted_results_survive_a_client_restart(hub: FakeHub, tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    runs: list[str] = []
    first = DeviceClient(hub.url, "dev1.s", outbox_path=path)
    add_handlers(first, runs)
    async with first:
        await first.wait_connected()
        await hub.command("dev1", cmd("c1", "add", {"a": 1, "b": 2}))
        await eventually(lambda: hub.results("c1"))
    # The hub lost the result (say): it sends the command again to the rebooted device.
    second = DeviceClient(hub.url, "dev1.s", outbox_path=path)
    add_handlers(second, runs)
    async with second:
        await second.wait_connected()
        await hub.send_raw("dev1", cmd("c1", "add", {"a": 1, "b": 2}))
        await eventually(lambda: len(hub.results("c1")) == 2)
        assert second.stats.command_repeats == 1 and second.stats.commands_run == 0
    assert runs == ["add"]
    assert hub.conns[1].acks == ["c1"]
    assert hub.results("c1") == [CommandResult("c1", True, {"sum": 3})] * 2


async def test_unsent_result_is_sent_after_a_restart(
    hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.sqlite3"
    runs: list[str] = []
    gate = trio.Event()
    first = DeviceClient(hub.url, "dev1.s", outbox_path=path, close_timeout=0.2, **FAST)
    add_handlers(first, runs, gate)
    async with first:
        await first.wait_connected()
        await hub.command("dev1", cmd("c1", "slow"))
        await eventually(lambda: hub.conns[0].acks == ["c1"])
        hub.refuse_status = 503
        await hub.drop("dev1")
        await eventually(lambda: not first.stats.connected)
        gate.set()
        await eventually(lambda: first.stats.commands_succeeded == 1)
    assert any("command results not sent (kept in the outbox file)" in r.getMessage() for r in caplog.records)
    hub.refuse_status = None
    hub.open_commands["dev1"].clear()  # so only the device's own resend can bring the result
    second = DeviceClient(hub.url, "dev1.s", outbox_path=path)
    add_handlers(second, runs)
    async with second:
        await eventually(lambda: hub.results("c1"))
    assert hub.results("c1") == [CommandResult("c1", True, "done")]
    assert runs == ["slow"]
    # Written once: a third start has nothing to send.
    third = DeviceClient(hub.url, "dev1.s", outbox_path=path)
    async with third:
        await third.wait_connected()
        await third.send_batch(batch())
        await third.wait_acked()
    assert hub.conns[-1].frames == ["Telemetry"]


# ---------------------------------------------------------------------------- reconnect on request


async def test_reboot_handler_answers_then_reconnects_keeping_the_outbox(
    nursery: trio.Nursery, autojump_clock: Any
) -> None:
    hub = FakeHub(plans=[Plan(durable=False, ack=False)])
    await hub.start(nursery)
    client = DeviceClient(hub.url, "dev1.s", backoff_initial=30.0, backoff_max=60.0)

    @client.command("reboot")
    async def reboot(args: dict[str, Any], ctx: CommandContext) -> dict[str, Any]:
        ctx.reconnect(5.0)
        return {"rebooting": True}

    async with client as c:
        await c.wait_connected()
        for i in range(3):
            await c.send_batch(batch(1, base=i))
        await eventually(lambda: hub.conns[0].received == [1, 2, 3])
        await hub.command("dev1", cmd("r1", "reboot"))
        await c.wait_acked()
        assert c.stats.reconnects == 1 and c.stats.connect_failures == 0
        assert c.stats.command_repeats == 0
    first, second = hub.conns
    assert first.frames[-2:] == ["CommandAck", "CommandResult"]
    assert first.results == [CommandResult("r1", True, {"rebooting": True})]
    assert first.close_code == CloseCode.NORMAL
    assert first.closed_at is not None
    assert 5.0 <= hub.attempts[1] - first.closed_at <= 5.1  # the requested delay, not the backoff
    assert second.received == [1, 2, 3] and hub.seqs("dev1") == [1, 2, 3]
    assert second.results == []


async def test_client_reconnect(nursery: trio.Nursery, autojump_clock: Any) -> None:
    hub = FakeHub()
    await hub.start(nursery)
    async with DeviceClient(hub.url, "dev1.s", backoff_initial=30.0, backoff_max=60.0) as c:
        await c.wait_connected()
        c.reconnect(2.0)
        await eventually(lambda: c.stats.connects == 2, timeout=100)
        await c.send_batch(batch())
        await c.wait_acked()
        with pytest.raises(ValueError):
            c.reconnect(-1)
    first = hub.conns[0]
    assert first.close_code == CloseCode.NORMAL and first.closed_at is not None
    assert 2.0 <= hub.attempts[1] - first.closed_at <= 2.1
    assert c.stats.reconnects == 1 and c.stats.connect_failures == 0


async def test_reconnect_while_offline_does_nothing(hub: FakeHub) -> None:
    hub.refuse_status = 503
    async with DeviceClient(hub.url, "dev1.s", **FAST) as c:
        await eventually(lambda: c.stats.connect_failures >= 1)
        c.reconnect()  # nothing to close: the request is not kept for the next connection
        hub.refuse_status = None
        await c.wait_connected()
        await c.send_batch(batch())
        await c.wait_acked()
        assert hub.live("dev1") is hub.conns[0]
        assert c.stats.connects == 1
