"""The cyclic garbage collector's settings for a long-running process: the hub's, and the bench's load generator and
relay, which must not add pauses of their own to what they measure (a shared leaf: imports no part of the hub)."""

from __future__ import annotations

import gc

import trio

__all__ = ["ALLOCATION_THRESHOLDS", "COLLECT_EVERY", "GC_THRESHOLDS", "collect_on_time", "due_generation", "tune_gc"]

#: Cyclic-GC thresholds (Python's are 700, 10, 10). Most of the hub's garbage is freed by reference counting; with the
#: defaults, collections of the older generations (every live session object scanned) paused the loop for up to 38 ms
#: (generation 1) and 149 ms (generation 2) at 1,000 streaming devices, the tail of the command round trip. A young
#: collection's pause grows with what it scans, mostly young survivors: the coroutines, wait objects and scopes of
#: each session waiting on its socket since its last message (20,000: 51,000 objects, 14-19 ms; 5,000: 6.7-9.5 ms).
#: The hub's young collections also come on a timer (`collect_on_time`, ten a second), which resets the allocation
#: count, so generation 1 is collected after 600 young collections (once a minute), generation 2 after 100 of those;
#: 5,000 still triggers one between two ticks in a burst of allocations.
GC_THRESHOLDS = (5_000, 600, 100)
#: For a process that collects on allocations alone (no `collect_on_time`): the bench's load generator and relay.
#: Generation 1 after 80 young collections: 400,000 net allocations, as rare as at 20,000 x 20. The generator paused
#: 3-9 ms every 0.3 s (generation 0) and 35-40 ms once a run (generation 2) at 1,000 devices with Python's defaults.
ALLOCATION_THRESHOLDS = (5_000, 80, 100)

#: Seconds between the collections `collect_on_time` makes. What a young collection scans is mostly survivors: each
#: session's waits since its last message. They die when its next message comes, already in an older generation, and
#: that death lowers the allocation count again, so the count reached the threshold only every 0.3-1.5 s at 1,000
#: streaming devices, with 8,000-17,000 objects to scan (2-13 ms, a fifth to a half of the slowest commands). On a
#: 0.1 s timer a young collection scans what 0.1 s left behind.
COLLECT_EVERY = 0.1


def tune_gc(thresholds: tuple[int, int, int] = GC_THRESHOLDS) -> None:
    """Freeze what start-up allocated (never garbage: modules, configuration) and collect less often: `thresholds`
    (`GC_THRESHOLDS` with `collect_on_time` running, `ALLOCATION_THRESHOLDS` without it)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)


def due_generation(counts: tuple[int, int, int], thresholds: tuple[int, int, int]) -> int:
    """The oldest generation a collection made now should reach (`gc.get_count()`, `gc.get_threshold()`): one whose
    count of younger collections is over its threshold, as the allocation trigger picks it; else 0."""
    _, collected_0, collected_1 = counts
    _, every_1, every_2 = thresholds
    if collected_1 > every_2:
        return 2
    return 1 if collected_0 > every_1 else 0


async def collect_on_time(
    every: float = COLLECT_EVERY, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Collect every `every` seconds (the young generation, an older one in its turn: `due_generation`), so that no
    young collection has more than `every` seconds of survivors to scan; runs until cancelled. The thresholds still
    trigger collections between two (a burst of allocations)."""
    task_status.started()
    while True:
        await trio.sleep(every)
        gc.collect(due_generation(gc.get_count(), gc.get_threshold()))
