"""Per-point CPU of the hub's telemetry path, in process: `python -m bench.perpoint` (issue 15, item 1).

Times, in CPU seconds per million points (`time.process_time`, so other load on the machine matters less), for the
frames the bench's lean generator sends (`bench.wire.telemetry_template`) at 1, 10 and 100 points per message:
the reference path (`protocol.decode`: orjson + validation in Python, then `LineBuilder.lines`), each of its two
halves, the bare JSON parsers, and the msgspec `TelemetryReader` (decode, checks and lines in one call) with its line
loop in Python and, where it was compiled, in C.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from functools import partial

from bench.wire import BASE_TS, telemetry_template
from device_client.protocol import DEFAULT_LIMITS, Telemetry, decode
from hub.ingest import LineBuilder, TelemetryReader, lines_compiled, reader_available

__all__ = ["least_cpu", "main", "measure"]


def least_cpu(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """The least CPU seconds of `repeats` runs of `calls` calls (the least is the one others disturbed least)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, time.process_time() - start)
    return best


def measure(points_per_message: int, points: int = 200_000, repeats: int = 3) -> dict[str, float]:
    """CPU s per million points of each step, for messages of `points_per_message` points."""
    text = (telemetry_template("m", points_per_message) % (1, *range(BASE_TS, BASE_TS + points_per_message))).decode()
    calls = max(1, points // points_per_message)
    mpt = calls * points_per_message / 1e6
    msg = decode(text)
    assert isinstance(msg, Telemetry)
    builder = LineBuilder("dev-1")
    rows: dict[str, Callable[[], object]] = {
        "decode+validate": lambda: decode(text),
        "lines": lambda: builder.lines(msg.points),
        "reference (both)": lambda: builder.lines(decode(text).points),  # type: ignore[union-attr]
    }
    try:
        import orjson

        rows["orjson.loads alone"] = lambda: orjson.loads(text)
    except ImportError:  # pragma: no cover - depends on the install
        pass
    if reader_available():
        import msgspec

        plain = msgspec.json.Decoder()
        rows["msgspec untyped alone"] = lambda: plain.decode(text)
        natives = (False, True) if lines_compiled() else (False,)
        for native in natives:
            reader = TelemetryReader("dev-1", DEFAULT_LIMITS, native=native)
            batch = reader.read(text)
            assert batch is not None and batch.lines == builder.lines(msg.points)
            rows[f"reader (msgspec, lines in {'C' if native else 'Python'})"] = partial(reader.read, text)
    return {name: least_cpu(fn, calls, repeats) / mpt for name, fn in rows.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.perpoint", description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=200_000, help="points per timed run (default 200000)")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure; the least is kept (default 3)")
    args = p.parse_args(argv)
    sizes = (1, 10, 100)
    before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results = {n: measure(n, args.points, args.repeats) for n in sizes}
    after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"CPU s per million points (least of {args.repeats}); load average before: {before}, after: {after}")
    names = list(results[sizes[0]])
    width = max(len(name) for name in names)
    print(f"{'step':<{width}}  " + "  ".join(f"{n:>6} pt/msg" for n in sizes))
    for name in names:
        print(f"{name:<{width}}  " + "  ".join(f"{results[n][name]:>13.2f}" for n in sizes))


if __name__ == "__main__":
    main()
