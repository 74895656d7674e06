"""The command service without sockets, on trio's mock clock: TTL, result timeout, restarts, the table's rules."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from device_client.protocol import Command
from hub.config import CommandsConfig
from hub.fleet import CommandError, CommandEvent, CommandRecord, CommandService, CommandState, CommandStore
from hub.fleet._command_states import IllegalTransition

#: Unix time when trio's mock clock reads 0.
EPOCH = 1_700_000_000.0


def wall() -> float:
    """A wall clock that moves with trio's (mock) clock, so records' Unix times are exact in these tests."""
    return EPOCH + trio.current_time()


class Device:
    """A device session's side of the service: the frames it was offered."""

    def __init__(self) -> None:
        self.offered: list[Command] = []

    def __call__(self, command: Command) -> bool:
        self.offered.append(command)
        return True

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.offered]


@asynccontextmanager
async def service(store: CommandStore, clock: Callable[[], float] = wall) -> AsyncIterator[CommandService]:
    """A running service over `store` for devices d1 and d2."""

    async def write(text: str, n: int, mark: None) -> None:
        pass

    async def device_exists(name: str) -> bool:
        return name in ("d1", "d2")

    svc = CommandService(store, CommandsConfig(), device_exists=device_exists, write=write, clock=clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        yield svc
        nursery.cancel_scope.cancel()


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = CommandStore(tmp_path / "commands.sqlite3")
    yield s
    s.close()


def states(rec: CommandRecord) -> list[str]:
    return [state for state, _ in rec.history]


async def record(svc: CommandService, command_id: str) -> CommandRecord:
    rec = await svc.get(command_id)
    assert rec is not None
    return rec


async def state_at(svc: CommandService, command_id: str, when: float) -> str:
    """The command's state once trio's clock reads `when`."""
    await trio.sleep_until(when)
    return (await record(svc, command_id)).state


async def test_ttl_expires_a_queued_command_on_the_second(store: CommandStore, autojump_clock: Any) -> None:
    async with service(store, clock=time.time) as svc:  # the real wall clock: the TTL runs on trio's
        t0 = trio.current_time()
        rec = await svc.submit("d1", "reboot", ttl=3600)
        assert rec.expires == pytest.approx(time.time() + 3600, abs=5)  # records keep Unix times
        assert await state_at(svc, rec.command_id, t0 + 3599.9) == "queued"
        final = await svc.wait_final(rec.command_id, 7200)
        assert trio.current_time() - t0 == pytest.approx(3600)
        assert states(final) == ["queued", "expired"]
        assert final.updated < rec.expires  # an hour of trio time took the wall clock no time at all


async def test_a_device_connecting_after_the_ttl_never_gets_the_command(
    store: CommandStore, autojump_clock: Any
) -> None:
    async with service(store) as svc:
        stale = await svc.submit("d1", "too_late", ttl=10)
        fresh = await svc.submit("d1", "in_time", ttl=3600)
        await trio.sleep(11)
        assert (await record(svc, stale.command_id)).state == "expired"
        device = Device()
        svc.attach("d1", device)
        assert device.ids == [fresh.command_id]


async def test_a_sent_command_expires_at_its_ttl_unless_acknowledged(store: CommandStore, autojump_clock: Any) -> None:
    async with service(store) as svc:
        t0 = trio.current_time()
        device = Device()
        svc.attach("d1", device)
        unacked = await svc.submit("d1", "a", ttl=30, timeout=300)
        acked = await svc.submit("d1", "b", ttl=30, timeout=300)
        for rec in (unacked, acked):
            svc.on_sent("d1", rec.command_id)
        assert device.ids == [unacked.command_id, acked.command_id]
        await trio.sleep(20)
        assert await svc.on_ack("d1", acked.command_id)
        assert await state_at(svc, unacked.command_id, t0 + 29.9) == "sent"
        assert await state_at(svc, unacked.command_id, t0 + 30.1) == "expired"
        assert (await record(svc, acked.command_id)).state == "delivered"  # delivered: the TTL no longer applies


async def test_the_result_timeout_counts_from_delivery(store: CommandStore, autojump_clock: Any) -> None:
    async with service(store) as svc:
        svc.attach("d1", Device())
        rec = await svc.submit("d1", "slow", ttl=3600, timeout=30)
        svc.on_sent("d1", rec.command_id)
        await trio.sleep(100)  # sent, not acknowledged: only the TTL runs
        t_ack = trio.current_time()
        assert await svc.on_ack("d1", rec.command_id)
        assert (await record(svc, rec.command_id)).delivered_at == wall()
        assert await state_at(svc, rec.command_id, t_ack + 29.9) == "delivered"
        final = await svc.wait_final(rec.command_id, 3600)
        assert trio.current_time() - t_ack == pytest.approx(30)
        assert states(final) == ["queued", "sent", "delivered", "timed_out"]
        # A late answer is known (no error for the device) and changes nothing.
        assert await svc.on_result("d1", rec.command_id, True, "late", "")
        assert await svc.on_ack("d1", rec.command_id)
        assert (await record(svc, rec.command_id)).state == "timed_out"


async def test_wait_final_gives_up_on_trio_time(store: CommandStore, autojump_clock: Any) -> None:
    async with service(store) as svc:
        rec = await svc.submit("d1", "x", ttl=3600)
        t0 = trio.current_time()
        assert (await svc.wait_final(rec.command_id, 5)).state == "queued"
        assert trio.current_time() - t0 == pytest.approx(5)


async def test_a_restart_resumes_every_timer_from_the_records(tmp_path: Path, autojump_clock: Any) -> None:
    path = tmp_path / "commands.sqlite3"
    first = CommandStore(path)
    try:
        async with service(first) as svc:
            t0 = trio.current_time()
            queued = await svc.submit("d2", "offline", ttl=100)
            svc.attach("d1", Device())
            delivered = await svc.submit("d1", "running", ttl=3600, timeout=50)
            await trio.sleep(10)
            await svc.on_ack("d1", delivered.command_id)
    finally:
        first.close()  # commits the write-behind ("delivered")
    await trio.sleep_until(t0 + 40)  # the hub is down for 30 s

    second = CommandStore(path)
    try:
        async with service(second) as svc:
            assert (await record(svc, queued.command_id)).state == "queued"
            assert (await record(svc, delivered.command_id)).state == "delivered"
            assert await state_at(svc, delivered.command_id, t0 + 59.9) == "delivered"  # acked at 10, timeout 50
            assert await state_at(svc, delivered.command_id, t0 + 60.1) == "timed_out"
            assert await state_at(svc, queued.command_id, t0 + 99.9) == "queued"  # submitted at 0, TTL 100
            assert await state_at(svc, queued.command_id, t0 + 100.1) == "expired"
    finally:
        second.close()


async def test_cancel_only_where_the_table_allows_it(store: CommandStore, autojump_clock: Any) -> None:
    async with service(store) as svc:
        with pytest.raises(CommandError) as err:
            await svc.cancel("c-nope")
        assert err.value.code == "not_found"
        device = Device()
        queued = await svc.submit("d2", "a")
        assert (await svc.cancel(queued.command_id)).state == "cancelled"
        svc.attach("d1", device)
        sent = await svc.submit("d1", "b")
        svc.on_sent("d1", sent.command_id)
        assert (await svc.cancel(sent.command_id)).state == "cancelled"
        delivered = await svc.submit("d1", "c")
        await svc.on_ack("d1", delivered.command_id)
        for command_id in (queued.command_id, delivered.command_id):
            with pytest.raises(CommandError) as err:
                await svc.cancel(command_id)
            assert err.value.code == "invalid_state"
        assert svc.counts() == {"cancelled": 2, "delivered": 1}


async def test_answers_follow_the_table(store: CommandStore, autojump_clock: Any) -> None:
    async with service(store) as svc:
        never_sent = await svc.submit("d2", "a")
        assert not await svc.on_result("d2", never_sent.command_id, True, None, "")  # queued: nothing to answer
        assert not await svc.on_ack("d1", never_sent.command_id)  # another device's
        svc.attach("d1", Device())
        sent = await svc.submit("d1", "b")
        svc.on_sent("d1", sent.command_id)
        assert await svc.on_result("d1", sent.command_id, False, None, "it broke")  # the result implies the ack
        final = await record(svc, sent.command_id)
        assert (states(final), final.error) == (["queued", "sent", "delivered", "failed"], "it broke")
        early = await svc.submit("d1", "c")
        assert await svc.on_ack("d1", early.command_id)  # an ack may overtake the session's "written"
        svc.on_sent("d1", early.command_id)  # too late to matter
        assert states(await record(svc, early.command_id)) == ["queued", "delivered"]


def test_a_record_moves_only_along_the_table() -> None:
    rec = CommandRecord("c-1", "d1", "x", {}, CommandState.QUEUED, 0.0, 0.0, 60.0, 30.0)
    done = rec.after(CommandEvent.ACK, 1.0, delivered_at=1.0).after(CommandEvent.SUCCEED, 2.0, result=7)
    assert (done.state, done.final, done.history) == ("succeeded", True, (("delivered", 1.0), ("succeeded", 2.0)))
    assert rec.deadline() == 60.0 and done.deadline() == float("inf")
    assert rec.after(CommandEvent.ACK, 1.0, delivered_at=1.0).deadline() == 31.0
    with pytest.raises(IllegalTransition):
        done.after(CommandEvent.CANCEL, 3.0)
    with pytest.raises(IllegalTransition):
        rec.after(CommandEvent.SUCCEED, 3.0)  # a result needs delivery first
    assert rec.as_dict()["state"] == "queued" and type(rec.as_dict()["state"]) is str


def test_every_transition_reads_back_from_sqlite_as_it_was_made(tmp_path: Path) -> None:
    # A transition rewrites only the columns it can change (an upsert): all it changes must reach the file.
    path = tmp_path / "commands.sqlite3"
    queued = CommandRecord("c", "d1", "x", {"n": 1}, CommandState.QUEUED, 1.0, 1.0, 61.0, 30.0, "k", "op")
    paths: list[list[tuple[CommandEvent, dict[str, Any]]]] = [
        [(CommandEvent.SEND, {}), (CommandEvent.ACK, {"delivered_at": 3.0}), (CommandEvent.SUCCEED, {"result": [7]})],
        [(CommandEvent.ACK, {"delivered_at": 2.0}), (CommandEvent.FAIL, {"result": None, "error": "it broke"})],
        [(CommandEvent.SEND, {}), (CommandEvent.CANCEL, {})],
        [(CommandEvent.EXPIRE, {})],
    ]
    finals = []
    store = CommandStore(path)
    try:
        for i, steps in enumerate(paths):
            rec = attrs.evolve(queued, command_id=f"c-{i}", idempotency_key=f"k{i}")
            store.put(rec)
            store.flush()
            for at, (event, changes) in enumerate(steps, start=2):
                rec = rec.after(event, float(at), **changes)
                store.put(rec)
                store.flush()
                assert store.get(rec.command_id) == rec
            finals.append(rec)
    finally:
        store.close()
    reopened = CommandStore(path)
    try:
        assert reopened.list(limit=10) == finals[::-1]  # newest first
        assert [reopened.by_key("d1", f"k{i}") for i in range(len(paths))] == finals
    finally:
        reopened.close()


async def test_a_final_hook_runs_once_after_the_commit_and_before_waiters_wake(
    store: CommandStore, autojump_clock: Any
) -> None:
    seen: list[tuple[str, str | None]] = []  # (state given, state in SQLite then)
    async with service(store) as svc:
        svc.attach("d1", Device())
        rec = await svc.submit("d1", "x")
        waiter_woke = trio.Event()

        async def waiter() -> None:
            await svc.wait_final(rec.command_id, 100)
            assert len(seen) == 1  # the hook ran first
            waiter_woke.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()

            def hook(final: CommandRecord) -> None:
                seen.append((final.state, store.get(final.command_id).state))  # type: ignore[union-attr]

            assert svc.when_final(rec.command_id, hook)
            svc.on_sent("d1", rec.command_id)
            assert await svc.on_result("d1", rec.command_id, True, 1, "")
            assert seen == [("succeeded", "succeeded")]  # called in the step that made it final, committed
        assert waiter_woke.is_set()
        assert not svc.when_final(rec.command_id, hook)  # final already: nothing will call it
        other = await svc.submit("d1", "y")
        assert svc.when_final(other.command_id, hook)
        svc.when_final(other.command_id, None)  # forgotten
        await svc.cancel(other.command_id)
        assert seen == [("succeeded", "succeeded")]


async def test_timers_fire_in_deadline_order_and_finished_ones_do_not_pile_up(
    store: CommandStore, autojump_clock: Any
) -> None:
    async with service(store) as svc:
        t0 = trio.current_time()
        ttls = [17, 3, 45, 8, 30, 1, 22, 12]
        recs = {ttl: await svc.submit("d2", f"t{ttl}", ttl=ttl) for ttl in ttls}
        for ttl in sorted(ttls):
            assert await state_at(svc, recs[ttl].command_id, t0 + ttl - 0.01) == "queued"
            assert await state_at(svc, recs[ttl].command_id, t0 + ttl + 0.01) == "expired"
        device = Device()
        svc.attach("d1", device)
        for i in range(2000):  # each leaves a deadline behind (its TTL's), long after it is final
            rec = await svc.submit("d1", "quick", ttl=3600)
            svc.on_sent("d1", rec.command_id)
            assert await svc.on_result("d1", rec.command_id, True, i, "")
        assert len(svc._timers) <= 2 * len(svc._due) + 64  # rebuilt from the live deadlines as it grew
        late = await svc.submit("d1", "late", ttl=5)
        assert await state_at(svc, late.command_id, trio.current_time() + 5.01) == "expired"


async def test_commands_that_come_and_go_do_not_wake_the_timer_task(store: CommandStore, autojump_clock: Any) -> None:
    # Their deadlines are seconds to an hour away, and the timer task wakes at least every TIMER_TICK anyway: no
    # command's transitions wake it (they did, twice a command, when no other command was open: a task step each).
    async with service(store) as svc:
        device = Device()
        svc.attach("d1", device)
        first = await svc.submit("d1", "first")
        await trio.sleep(0.5)  # the timer task has seen the first deadline
        wake, t = svc._wake, trio.current_time()
        for i in range(200):
            rec = await svc.submit("d1", "quick")
            svc.on_sent("d1", rec.command_id)
            assert await svc.on_result("d1", rec.command_id, True, i, "")
        assert trio.current_time() == t  # no tick came meanwhile
        assert svc._wake is wake and not wake.is_set()
        late = await svc.submit("d2", "late", ttl=0.25)  # sooner than the next tick: it still wakes the task
        assert await state_at(svc, late.command_id, t + 0.26) == "expired"
        assert (await record(svc, first.command_id)).state == "queued"  # open all along: its hour-long TTL
