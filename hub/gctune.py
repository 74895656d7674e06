"""The cyclic garbage collector's settings for a long-running process: the hub's, and the bench's load generator and
relay, which must not add pauses of their own to what they measure (a shared leaf: imports no part of the hub)."""

from __future__ import annotations

import gc

__all__ = ["GC_THRESHOLDS", "tune_gc"]

#: Cyclic-GC thresholds (Python's are 700, 10, 10). Most of the hub's garbage is freed by reference counting; with the
#: defaults, collections of the older generations (every live session object scanned) paused the loop for up to 38 ms
#: (generation 1) and 149 ms (generation 2) at 1,000 streaming devices, the tail of the command round trip. A young
#: collection's pause grows with what it scans, mostly young survivors: the coroutines, wait objects and scopes of
#: each session waiting on its socket since its last message. At 20,000 (with 20, 100) young collections scanned up
#: to 51,000 objects and paused 14-19 ms; at 5,000 the most was 6.7-9.5 ms in five 2,000-command runs at 1,000 devices,
#: p50 and p99 unchanged. The older generations' thresholds keep their collections as rare as before (generation 1
#: after 400,000 net allocations: 80 x 5,000 = 20 x 20,000). The bench's load generator paused 3-9 ms every 0.3 s
#: (generation 0) and 35-40 ms once a run (generation 2) at 1,000 devices with the defaults.
GC_THRESHOLDS = (5_000, 80, 100)


def tune_gc() -> None:
    """Freeze what start-up allocated (never garbage: modules, configuration) and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
