"""Ledgers: acks follow durability at once; the registry learns the acked seqs periodically and at shutdown."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from hub.fleet import Ledgers, Registry, SQLiteStore, registry_path
from tests.waiting import eventually


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
