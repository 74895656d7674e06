"""The hub process's garbage-collector settings."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import trio

from hub.gctune import ALLOCATION_THRESHOLDS, GC_THRESHOLDS, collect_on_time, due_generation, tune_gc


@pytest.mark.parametrize("thresholds", [GC_THRESHOLDS, ALLOCATION_THRESHOLDS])
def test_tune_gc_freezes_start_up_objects_and_raises_the_thresholds(thresholds: tuple[int, int, int]) -> None:
    before = gc.get_threshold()
    try:
        tune_gc(thresholds)
        assert gc.get_threshold() == thresholds
        assert gc.get_freeze_count() > 0  # start-up objects are out of every collection's way
        garbage: list[object] = []
        garbage.append(garbage)  # a cycle made after the freeze is still collected
        del garbage
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.parametrize(
    ("counts", "generation"),
    [
        ((9_999, 0, 0), 0),  # however many allocations: the timer's collection is a young one
        ((0, 600, 0), 0),  # generation 1 when its count is over its threshold, as CPython's trigger decides
        ((0, 601, 0), 1),
        ((0, 601, 100), 1),
        ((0, 0, 101), 2),  # generation 2 in its turn, even when generation 1's has not come
        ((0, 601, 101), 2),
    ],
)
def test_due_generation_is_the_oldest_over_its_threshold(counts: tuple[int, int, int], generation: int) -> None:
    assert due_generation(counts, (5_000, 600, 100)) == generation


class _Node:
    def __init__(self) -> None:
        self.other: object = self


@pytest.fixture
def no_allocation_trigger() -> Iterator[None]:
    """Thresholds no test reaches: only an explicit collection frees a cycle."""
    before = gc.get_threshold()
    gc.set_threshold(10**9, 10**9, 10**9)
    try:
        yield
    finally:
        gc.set_threshold(*before)


@pytest.mark.usefixtures("no_allocation_trigger")
async def test_collect_on_time_frees_cycles_without_the_allocation_trigger() -> None:
    node = _Node()
    gone = weakref.ref(node)
    del node
    assert gone() is not None  # a cycle: reference counting alone never frees it
    async with trio.open_nursery() as nursery:
        await nursery.start(collect_on_time, 0.01)
        with trio.fail_after(10):
            while gone() is not None:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
