"""Sampling profiles of the hub process with py-spy (the `bench` extra), summarised as top self and total entries."""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["format_top", "py_spy", "record", "summarise"]


def py_spy() -> str | None:
    """The py-spy executable (next to this Python first), or None if it is not installed."""
    local = Path(sys.executable).with_name("py-spy")
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path, rate: int = 100, gil: bool = False) -> subprocess.Popen[bytes]:
    """Start sampling `pid` for `seconds` into `out` (collapsed stacks, thread names first); returns the process.

    `gil`: only samples of the thread holding the GIL (py-spy `--gil`), so the threads' shares are their GIL shares.
    """
    exe = py_spy()
    if exe is None:
        raise FileNotFoundError("py-spy is not installed: pip install -e '.[bench]'")
    args = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(rate)]
    args += ["--format", "raw", "--threads", "--output", str(out), *(["--gil"] if gil else [])]
    log = out.with_suffix(".log").open("wb")
    try:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        log.close()


def _frame_name(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)": lines of one function are summed.
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0] if ":" in where else where.rstrip(")")
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({short})" if where else name


#: Leaf frames where a thread waits rather than works (py-spy's own idle detection misses these).
IDLE_LEAVES = frozenset({"WorkerThread._work (_core/_thread_cache.py)"})


def summarise(raw: Path, top: int = 25) -> dict[str, Any]:
    """Top entries by self and total (inclusive) samples, over all threads and for the trio (main) thread.

    Percentages are of all working samples (idle ones left out), so they add up across threads.
    """
    self_counts: collections.Counter[str] = collections.Counter()
    main_self: collections.Counter[str] = collections.Counter()
    main_total: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    samples = idle = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread, frames = (frames[0], frames[1:]) if frames[0].startswith(("thread ", "process ")) else ("", frames)
        if not frames:
            continue
        names = [_frame_name(f) for f in frames]
        if names[-1] in IDLE_LEAVES:
            idle += count
            continue
        samples += count
        kind = "main" if "MainThread" in thread else "worker"
        threads[kind] += count
        self_counts[names[-1]] += count
        if kind == "main":
            main_self[names[-1]] += count
            for name in set(names):
                main_total[name] += count

    def rows(counter: collections.Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "samples": n, "percent": round(100.0 * n / samples, 1) if samples else 0.0}
            for name, n in counter.most_common(top)
        ]

    return {
        "samples": samples,
        "idle_samples": idle,
        "threads": dict(threads.most_common()),
        "top_self": rows(self_counts),
        "top_self_main": rows(main_self),
        "top_total_main": rows(main_total),
    }


def format_top(summary: dict[str, Any], key: str = "top_self", count: int = 15) -> str:
    """A few lines of a summary's top list, for the console."""
    return "\n".join(f"{row['percent']:6.1f}%  {row['function']}" for row in summary.get(key, [])[:count])
