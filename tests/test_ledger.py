"""Ledgers: acks follow durability (a write's spread over `ACK_SPREAD`); the registry learns the acked seqs
periodically and at shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from device_client.protocol import Point
from hub.fleet import DeviceLedger, Ledgers, Registry, SQLiteStore, StoreUnavailable, registry_path
from hub.fleet._ledger import ACK_CHUNK, ACK_SPREAD, ADVANCE_CHUNK, LATEST_CHUNK
from tests.waiting import eventually

OnDurable = Callable[[list[tuple[object, int]]], Awaitable[None]]


def _registry(tmp_path: Path, *names: str) -> Registry:
    registry = Registry(registry_path(tmp_path / "data"))
    for name in names:
        registry.add(name)
    return registry


def _stored(registry: Registry) -> dict[str, int]:
    return {r.name: r.acked_seq for r in registry.list()}


async def test_durable_marks_advance_ledgers_at_once_and_reach_the_registry_on_save(tmp_path: Path) -> None:
    with _registry(tmp_path, "d1", "d2") as registry:
        ledgers = Ledgers(SQLiteStore(registry))
        d1, d2 = ledgers.get("d1", 0), ledgers.get("d2", 0)
        on_durable = ledgers.on_durable_callback()
        await on_durable([(d1, 1), (d2, 4), (d1, 3), (d1, 2)])
        assert (d1.durable, d2.durable) == (3, 4)
        assert _stored(registry) == {"d1": 0, "d2": 0}  # not yet saved: acks did not wait for the registry
        await ledgers.save()
        assert _stored(registry) == {"d1": 3, "d2": 4}
        await on_durable([(d1, 2)])  # not beyond durable: nothing to save
        await ledgers.save()
        assert d1.durable == 3
        assert _stored(registry) == {"d1": 3, "d2": 4}


async def test_an_ack_sender_waiting_for_the_ledger_wakes_on_durable(tmp_path: Path) -> None:
    with _registry(tmp_path, "d1") as registry:
        ledgers = Ledgers(SQLiteStore(registry))
        ledger = ledgers.get("d1", 5)
        got: list[int] = []

        async def waiter() -> None:
            got.append(await ledger.wait_beyond(5))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            await ledgers.on_durable_callback()([(ledger, 7)])
        assert got == [7]


async def _until_stored(registry: Registry, expected: dict[str, int]) -> None:
    await eventually(lambda: _stored(registry) == expected, 30)  # a hang guard, not a timing assertion


async def test_save_loop_saves_periodically(tmp_path: Path) -> None:
    with _registry(tmp_path, "d1") as registry:
        ledgers = Ledgers(SQLiteStore(registry))
        ledger = ledgers.get("d1", 0)
        on_durable = ledgers.on_durable_callback()
        async with trio.open_nursery() as nursery:
            await nursery.start(ledgers.save_loop, 0.02)
            await on_durable([(ledger, 9)])
            await _until_stored(registry, {"d1": 9})
            await on_durable([(ledger, 12)])
            await _until_stored(registry, {"d1": 12})
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- latest values and last_seen


class _Recording(SQLiteStore):
    """A SQLite store that records each `save_latest` call, and fails them while `failing`."""

    def __init__(self, registry: Registry) -> None:
        super().__init__(registry)
        self.calls: list[dict[str, tuple[float, dict[str, Point]]]] = []
        self.failing = False

    async def save_latest(self, values: Mapping[str, tuple[float, dict[str, Point]]]) -> None:
        self.calls.append(dict(values))
        if self.failing:
            raise StoreUnavailable("cannot reach Redis at unix:///nowhere: refused")
        await super().save_latest(values)


def _point(measurement: str, ts: int) -> Point:
    return {"measurement": measurement, "ts": ts, "fields": {"v": 1.0}, "tags": {}}


def _telemetry(ledger: DeviceLedger, seen: float, *points: Point) -> None:
    """What a session does with a telemetry message (hub/devices/_server.py)."""
    ledger.last_seen = seen
    for p in points:
        ledger.latest[p["measurement"]] = p


async def test_latest_values_of_devices_with_new_data_are_saved_once(tmp_path: Path) -> None:
    with _registry(tmp_path, "d1", "d2", "d3") as registry:
        store = _Recording(registry)
        ledgers = Ledgers(store)
        d1, d2, d3 = (ledgers.get(name, 0) for name in ("d1", "d2", "d3"))
        on_durable = ledgers.on_durable_callback()
        _telemetry(d1, 100.0, _point("env", 1), _point("power", 2))
        _telemetry(d2, 101.0, _point("env", 3))
        _telemetry(d3, 99.0, _point("env", 0))  # nothing durable since: not saved
        await on_durable([(d1, 1), (d2, 1)])
        await ledgers.save()
        assert store.calls == [
            {
                "d1": (100.0, {"env": _point("env", 1), "power": _point("power", 2)}),
                "d2": (101.0, {"env": _point("env", 3)}),
            }
        ]
        await ledgers.save()  # nothing new: no call
        assert len(store.calls) == 1
        assert (await store.latest(["d1", "d3"])).keys() == {"d1"}


async def test_values_that_arrive_after_their_batch_was_durable_are_saved_next_time(tmp_path: Path) -> None:
    with _registry(tmp_path, "d1") as registry:
        store = _Recording(registry)
        ledgers = Ledgers(store)
        d1 = ledgers.get("d1", 0)
        _telemetry(d1, 100.0, _point("env", 1))
        await ledgers.on_durable_callback()([(d1, 1)])
        await ledgers.save()
        _telemetry(d1, 101.0, _point("env", 2))  # the session updated `latest` after the save
        await ledgers.save()
        assert await store.latest(["d1"]) == {"d1": (101.0, {"env": _point("env", 2)})}
        await ledgers.save()
        assert len(store.calls) == 2


async def test_a_failed_save_of_latest_values_is_dropped_and_counted(tmp_path: Path) -> None:
    with _registry(tmp_path, "d1") as registry:
        store = _Recording(registry)
        store.failing = True
        ledgers = Ledgers(store)
        d1 = ledgers.get("d1", 0)
        on_durable = ledgers.on_durable_callback()
        _telemetry(d1, 100.0, _point("env", 1))
        await on_durable([(d1, 1)])
        await ledgers.save()
        await ledgers.save()
        assert (len(store.calls), ledgers.latest_failures) == (1, 1)  # not retried: newer values come
        store.failing = False
        _telemetry(d1, 102.0, _point("env", 2))
        await on_durable([(d1, 2)])
        await ledgers.save()
        assert await store.latest(["d1"]) == {"d1": (102.0, {"env": _point("env", 2)})}


async def test_save_loop_saves_latest_values_after_the_acked_seqs(tmp_path: Path) -> None:
    with _registry(tmp_path, "d1") as registry:
        store = _Recording(registry)
        ledgers = Ledgers(store)
        d1 = ledgers.get("d1", 0)
        async with trio.open_nursery() as nursery:
            await nursery.start(ledgers.save_loop, 0.02)
            _telemetry(d1, 100.0, _point("env", 1))
            await ledgers.on_durable_callback()([(d1, 3)])
            await _until_stored(registry, {"d1": 3})
            await eventually(lambda: len(store.calls) == 1, 30)
            nursery.cancel_scope.cancel()


class _AcksInPlace(_Recording):
    """Saves acked seqs without yielding to the scheduler: a save's first checkpoint is then the latest values'."""

    async def save_acked(self, updates: Mapping[str, int]) -> None:
        self.registry.save_acked(updates)


async def test_latest_values_of_many_devices_are_copied_a_chunk_a_step(tmp_path: Path) -> None:
    names = [f"d{i}" for i in range(2 * LATEST_CHUNK + 50)]
    with _registry(tmp_path, *names) as registry:
        store = _AcksInPlace(registry)
        ledgers = Ledgers(store)
        devices = [ledgers.get(name, 0) for name in names]
        for i, ledger in enumerate(devices):
            _telemetry(ledger, 100.0, _point("env", i))
        await ledgers.on_durable_callback()([(ledger, 1) for ledger in devices])

        async def change_all() -> None:  # runs at one of the save's checkpoints between its chunks
            for ledger in devices:
                _telemetry(ledger, 101.0, _point("env", -1))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(change_all)
            await ledgers.save()
        first = store.calls[0]
        assert first.keys() == set(names)
        copied_before = [name for name, (seen, _) in first.items() if seen == 100.0]
        assert 0 < len(copied_before) < len(names) and len(copied_before) % LATEST_CHUNK == 0  # whole chunks
        await ledgers.save()  # what changed after its copy is saved now
        assert len(store.calls) == 2 and store.calls[1].keys() == set(copied_before)
        assert await store.latest(names) == {name: (101.0, {"env": _point("env", -1)}) for name in names}


async def test_the_acks_of_a_write_go_out_a_chunk_a_step(tmp_path: Path) -> None:
    names = [f"d{i}" for i in range(3 * ACK_CHUNK)]
    with _registry(tmp_path, *names) as registry:
        ledgers = Ledgers(SQLiteStore(registry))
        told: list[str] = []

        class Session:
            def __init__(self, name: str) -> None:
                self.name = name

            def durable_advanced(self) -> None:
                told.append(self.name)

        devices = [ledgers.get(name, 0) for name in names]
        for ledger in devices:
            ledger.listener = Session(ledger.name)
        told_before_other: list[int] = []

        async def other() -> None:  # another task: it runs between two chunks
            told_before_other.append(len(told))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await ledgers.on_durable_callback()([(ledger, 1) for ledger in devices])
        assert told == names  # every session told, in order
        assert len(told_before_other) == 1 and 0 < told_before_other[0] < len(names)
        assert told_before_other[0] % ACK_CHUNK == 0


class _Session:
    """A session as the ledger sees it: records when it was told, on trio's clock."""

    def __init__(self, name: str, told: list[tuple[str, float]]) -> None:
        self.name, self.told = name, told

    def durable_advanced(self) -> None:
        self.told.append((self.name, trio.current_time()))


@asynccontextmanager
async def _ack_loop_running(
    tmp_path: Path, names: list[str]
) -> AsyncIterator[tuple[list[DeviceLedger], list[tuple[str, float]], OnDurable]]:
    """Ledgers of `names`, each with a session that records when it was told; the ack loop runs inside."""
    with _registry(tmp_path, *names) as registry:
        ledgers = Ledgers(SQLiteStore(registry))
        told: list[tuple[str, float]] = []
        devices = [ledgers.get(name, 0) for name in names]
        for ledger in devices:
            ledger.listener = _Session(ledger.name, told)
        async with trio.open_nursery() as nursery:
            await nursery.start(ledgers.ack_loop)
            yield devices, told, ledgers.on_durable_callback()
            nursery.cancel_scope.cancel()


async def test_with_the_ack_loop_a_writes_acks_are_spread_and_durable_moves_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    names = [f"d{i}" for i in range(3 * ACK_CHUNK + 1)]  # four chunks: three gaps of ACK_SPREAD / 3
    async with _ack_loop_running(tmp_path, names) as (devices, told, on_durable):
        start = trio.current_time()
        await on_durable([(ledger, 1) for ledger in devices])
        assert [ledger.durable for ledger in devices] == [1] * len(names)  # before any session was told
        assert told == []  # the writer is not held up by the acks
        await eventually(lambda: len(told) == len(names), 30)
    assert [name for name, _ in told] == names  # in order
    at = [when - start for _, when in told]
    for chunk in range(4):
        expected = chunk * ACK_SPREAD / 3
        assert all(abs(t - expected) < 1e-6 for t in at[chunk * ACK_CHUNK : (chunk + 1) * ACK_CHUNK]), at


async def test_the_ack_loop_does_not_pause_while_a_later_write_waits(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    names = [f"d{i}" for i in range(4 * ACK_CHUNK)]
    async with _ack_loop_running(tmp_path, names) as (devices, told, on_durable):
        start = trio.current_time()
        await on_durable([(ledger, 1) for ledger in devices[: 2 * ACK_CHUNK]])
        await on_durable([(ledger, 1) for ledger in devices[2 * ACK_CHUNK :]])  # before the loop ran
        await eventually(lambda: len(told) == len(names), 30)
    assert [name for name, _ in told] == names
    first_write = [when - start for _, when in told[: 2 * ACK_CHUNK]]
    assert first_write == [0.0] * (2 * ACK_CHUNK)  # behind it another write waited: no pause
    assert told[-1][1] - start == ACK_SPREAD  # the last write's own chunks, one gap apart


async def test_a_cancelled_ack_loop_tells_every_session_left_and_on_durable_tells_them_itself(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    names = [f"d{i}" for i in range(3 * ACK_CHUNK)]
    async with _ack_loop_running(tmp_path, names) as (devices, told, on_durable):
        await on_durable([(ledger, 1) for ledger in devices])
        await trio.testing.wait_all_tasks_blocked()  # before the clock jumps: the loop sleeps after a chunk
        assert len(told) == ACK_CHUNK
    assert [name for name, _ in told] == names  # the rest at once, in order, as the loop ended
    told.clear()
    await on_durable([(ledger, 2) for ledger in devices])  # no loop: told within the call, a chunk a step
    assert [name for name, _ in told] == names


async def test_a_write_of_many_devices_advances_their_ledgers_a_chunk_a_step(tmp_path: Path) -> None:
    names = [f"d{i}" for i in range(2 * ADVANCE_CHUNK + 1)]
    with _registry(tmp_path) as registry:
        ledgers = Ledgers(SQLiteStore(registry))
        devices = [ledgers.get(name, 0) for name in names]
        durable_seen: list[int] = []

        async def other() -> None:  # another task: it runs between two chunks
            durable_seen.append(sum(ledger.durable for ledger in devices))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await ledgers.on_durable_callback()([(ledger, 1) for ledger in devices])
        assert [ledger.durable for ledger in devices] == [1] * len(names)
        assert len(durable_seen) == 1 and 0 < durable_seen[0] < len(names) and durable_seen[0] % ADVANCE_CHUNK == 0
