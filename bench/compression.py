"""Compressed telemetry schemes measured, in process: `python -m bench.compression` (issue 14, item 4).

For batches of 1, 10 and 100 points per message (the bench's template points and the firmware simulator's sensors),
each candidate scheme's bytes per point on the wire (WebSocket frame header and client mask included), device encode
and hub decode CPU (seconds per million points, `time.process_time`, least of N runs), the hub memory it needs per
idle connection and while decoding, and the decompression-bomb defence (`decompressobj().decompress(data, max_length)`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from bench.perpoint import least_cpu
from bench.wire import BASE_TS, telemetry_template
from device_client.compression import DEFLATE_D1, SCHEMES, ZDICT, deflate
from device_client.protocol import (
    DEFAULT_LIMITS,
    MIN_TS_MS,
    Hello,
    Telemetry,
    _wire_point,
    decode,
    encode,
    validate_points,
)
from firmware_sim.sensors import make_device
from hub.devices import HubConnection
from hub.ingest import Batch, LineBuilder, TelemetryReader, reader_available, series_prefix, telemetry_type

try:
    import cbor2
except ImportError:  # pragma: no cover - depends on the install
    cbor2 = None
try:
    import msgspec
except ImportError:  # pragma: no cover - depends on the install
    msgspec = None  # type: ignore[assignment]

__all__ = ["MESSAGE_LIMIT", "ZDICT", "built", "main", "run"]

#: The hub's largest message (hub config `max_message_bytes`).
MESSAGE_LIMIT = 256 * 1024
SIZES = (1, 10, 100)
_TAIL = b"\x00\x00\xff\xff"  # RFC 7692: the empty stored block a sync flush ends with, stripped on the wire

Points = list[dict[str, Any]]


# ---------------------------------------------------------------------------- workloads


def _template_stream(n: int, total: int) -> Iterator[Points]:
    # The bench's generator frames: one float, one {"int": n} field and one tag, identical values, ts + 1 ms.
    template = telemetry_template("m", n)
    for k in range(max(1, total // n)):
        ts0 = BASE_TS + k * n
        msg = decode(template % (k + 1, *range(ts0, ts0 + n)))
        assert isinstance(msg, Telemetry)
        yield msg.points


def _sim_stream(model: str, measurement: str | None, n: int, total: int) -> Iterator[Points]:
    # A simulated device reporting every 10 s; `measurement` keeps only that one (else all of a report's points).
    device = make_device(model, seed=7)
    ts = BASE_TS
    pending: Points = []
    for _ in range(max(1, total // n)):
        while len(pending) < n:
            pending += [p for p in device.read(ts) if measurement is None or p["measurement"] == measurement]
            ts += 10_000
        yield [_wire_point(p) for p in pending[:n]]  # type: ignore[arg-type]
        pending = pending[n:]


#: name -> (what, stream of batches of n points)
WORKLOADS: dict[str, tuple[str, Callable[[int, int], Iterator[Points]]]] = {
    "template": ("bench/wire.py template: 2 fields (float, int), 1 tag, same values", _template_stream),
    "env": (
        "th-100 `environment`: 2 floats (temperature, humidity), no tag",
        lambda n, t: _sim_stream("th-100", "environment", n, t),
    ),
    "power": ("pm-10 `power`: 4 floats + 1 int counter", lambda n, t: _sim_stream("pm-10", "power", n, t)),
    "tracker": (
        "tracker: position (4), radio (2), battery (3) in turn",
        lambda n, t: _sim_stream("tracker", None, n, t),
    ),
}


# ---------------------------------------------------------------------------- schemes


def _body(seq: int, points: Points) -> dict[str, Any]:
    return {"type": "telemetry", "seq": seq, "points": points}


def _json(seq: int, points: Points) -> bytes:
    return encode(Telemetry(seq, points)).encode()  # type: ignore[arg-type]


def _deflate_once(data: bytes, wbits: int = 15, zdict: bytes | None = None, mem_level: int = 8) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -wbits, mem_level, zlib.Z_DEFAULT_STRATEGY, *((zdict,) if zdict else ()))
    return c.compress(data) + c.flush()


def inflate_limited(data: bytes, limit: int = MESSAGE_LIMIT, wbits: int = 15, zdict: bytes | None = None) -> bytes:
    """`data` inflated (raw deflate); ValueError if more than `limit` bytes come out (inflating limit + 1 at most)."""
    d = zlib.decompressobj(-wbits, *((zdict,) if zdict else ()))
    out = d.decompress(data, limit + 1)
    if len(out) > limit or d.unconsumed_tail:
        raise ValueError("too_large")
    return out


@attrs.frozen
class Scheme:
    """A wire encoding: per-connection encoder and decoder factories (a factory's product keeps any state)."""

    name: str
    what: str
    encoder: Callable[[], Callable[[int, Points], bytes]]
    to_points: Callable[[], Callable[[bytes], Points]]  # the hub's decode to plain dicts
    hub: Callable[[], Callable[[bytes], str]]  # the hub's decode to checked line protocol (its fast path)
    inflate: Callable[[], Callable[[bytes], bytes]] | None = None  # decompression alone
    state: str = "none"  # per-connection hub state: "none" or "inflater"
    wbits: int = 15


def _reader_lines(data: bytes, reader: TelemetryReader) -> str:
    batch = reader.read(data)
    assert batch is not None
    return batch.lines


def _reference_lines(points: Points) -> str:
    return LineBuilder("dev-1").lines(validate_points(points, DEFAULT_LIMITS))


def _json_points(data: bytes) -> Points:
    msg = decode(data)
    assert isinstance(msg, Telemetry)
    return msg.points  # type: ignore[return-value]


def _json_hub() -> Callable[[bytes], str]:
    if reader_available():
        reader = TelemetryReader("dev-1", DEFAULT_LIMITS)
        return lambda data: _reader_lines(data, reader)
    builder = LineBuilder("dev-1")
    return lambda data: builder.lines(_json_points(data))


def _pmd(wbits: int, takeover: bool) -> Scheme:
    # permessage-deflate (RFC 7692): raw deflate, each message sync-flushed and its 00 00 ff ff tail stripped.
    def encoder() -> Callable[[int, Points], bytes]:
        c = zlib.compressobj(6, zlib.DEFLATED, -wbits)

        def enc(seq: int, points: Points) -> bytes:
            nonlocal c
            if not takeover:
                c = zlib.compressobj(6, zlib.DEFLATED, -wbits)
            out = c.compress(_json(seq, points)) + c.flush(zlib.Z_SYNC_FLUSH)
            assert out.endswith(_TAIL)
            return out[:-4]

        return enc

    def inflate() -> Callable[[bytes], bytes]:
        d = zlib.decompressobj(-wbits)

        def inf(data: bytes) -> bytes:
            nonlocal d
            if not takeover:
                d = zlib.decompressobj(-wbits)
            out = d.decompress(data + _TAIL, MESSAGE_LIMIT + 1)
            if len(out) > MESSAGE_LIMIT or d.unconsumed_tail:
                raise ValueError("too_large")
            return out

        return inf

    def to_points() -> Callable[[bytes], Points]:
        inf = inflate()
        return lambda data: _json_points(inf(data))

    def hub() -> Callable[[bytes], str]:
        inf, lines = inflate(), _json_hub()
        return lambda data: lines(inf(data))

    kind = "context takeover" if takeover else "no context takeover"
    return Scheme(
        f"pmd-{'ctx' if takeover else 'noctx'}-w{wbits}",
        f"permessage-deflate, {kind}, window 2^{wbits}",
        encoder,
        to_points,
        hub,
        inflate,
        state="inflater" if takeover else "none",
        wbits=wbits,
    )


#: `ZDICT` with a fleet's own measurement and field names (here the simulator's): what a per-fleet dictionary adds.
ZDICT_FLEET = (
    b'"charging":false"snr":"rssi":"heading":"speed":"lat":"lon":"position""radio""energy":{"int":"power_factor":'
    b'"power":"current":"voltage":"percent":"battery""humidity":"temperature":"environment"' + ZDICT
)


def _zjson(zdict: bytes | None, name: str = "", wbits: int = 15, mem_level: int = 8) -> Scheme:
    def inf(data: bytes) -> bytes:
        return inflate_limited(data, zdict=zdict)

    def hub() -> Callable[[bytes], str]:
        lines = _json_hub()
        return lambda data: lines(inf(data))

    return Scheme(
        name or ("zjson+dict" if zdict else "zjson"),
        "deflated JSON per message, binary frame"
        + (f", preset dictionary ({len(zdict)} B)" if zdict else "")
        + ("" if (wbits, mem_level) == (15, 8) else f", device deflater window 2^{wbits}, memLevel {mem_level}"),
        lambda: lambda seq, points: _deflate_once(_json(seq, points), wbits, zdict, mem_level),
        lambda: lambda data: _json_points(inf(data)),
        hub,
        lambda: inf,
    )


def _cbor(deflate: bool) -> Scheme:
    def to_points() -> Callable[[bytes], Points]:
        if deflate:
            return lambda data: cbor2.loads(inflate_limited(data))["points"]  # type: ignore[no-any-return]
        return lambda data: cbor2.loads(data)["points"]  # type: ignore[no-any-return]

    def hub() -> Callable[[bytes], str]:
        # No C validator reads CBOR: the reference checks in Python (`validate_points`) then `LineBuilder`.
        tp = to_points()
        return lambda data: _reference_lines(tp(data))

    return Scheme(
        "cbor+deflate" if deflate else "cbor",
        "CBOR (cbor2), binary frame" + (", deflated per message" if deflate else ""),
        lambda: (
            (lambda seq, points: _deflate_once(cbor2.dumps(_body(seq, points))))
            if deflate
            else (lambda seq, points: cbor2.dumps(_body(seq, points)))
        ),
        to_points,
        hub,
        (lambda: inflate_limited) if deflate else None,
    )


def _msgpack_reader() -> TelemetryReader:
    class MsgpackReader(TelemetryReader):
        # The hub's reader with msgspec's msgpack decoder for the same typed struct; tags stay raw msgpack.
        __slots__ = ()

        def _prefix(self, measurement: str, raw: bytes) -> str:
            tags = msgspec.msgpack.decode(raw) if raw else None
            probe = {"measurement": measurement, "ts": MIN_TS_MS, "fields": {"f": 0.0}, "tags": tags}
            validate_points([probe], self.limits)
            prefix = self._prefixes[measurement, raw] = series_prefix(measurement, tags or {}, self.device)
            return prefix

    reader = MsgpackReader("dev-1", DEFAULT_LIMITS)
    reader._decode = msgspec.msgpack.Decoder(telemetry_type(DEFAULT_LIMITS)).decode
    return reader


def _msgpack(deflate: bool) -> Scheme:
    def unwrap(data: bytes) -> bytes:
        return inflate_limited(data) if deflate else data

    def hub() -> Callable[[bytes], str]:
        reader = _msgpack_reader()
        return lambda data: _reader_lines(unwrap(data), reader)

    return Scheme(
        "msgpack+deflate" if deflate else "msgpack",
        "msgpack (msgspec), binary frame" + (", deflated per message" if deflate else ""),
        lambda: (
            (lambda seq, points: _deflate_once(msgspec.msgpack.encode(_body(seq, points))))
            if deflate
            else (lambda seq, points: msgspec.msgpack.encode(_body(seq, points)))
        ),
        lambda: lambda data: msgspec.msgpack.decode(unwrap(data))["points"],  # type: ignore[no-any-return]
        hub,
        (lambda: inflate_limited) if deflate else None,
    )


def schemes(quick: bool = False) -> list[Scheme]:
    """Every candidate this install can measure (`quick`: the window sizes 9, 12 and 15 only)."""
    identity: Callable[[], Callable[[bytes], bytes]] | None = None
    out = [
        Scheme("json", "JSON text frame (today)", lambda: _json, lambda: _json_points, _json_hub, identity),
    ]
    windows = (9, 12, 15) if quick else tuple(range(9, 16))
    out += [_pmd(w, True) for w in windows]
    out += [_pmd(w, False) for w in windows]
    out += [
        _zjson(None),
        _zjson(ZDICT),
        _zjson(ZDICT, "zjson+dict-small", 10, 2),
        _zjson(ZDICT_FLEET, "zjson+fleetdict"),
    ]
    if cbor2 is not None:
        out += [_cbor(False), _cbor(True)]
    if msgspec is not None and reader_available():
        out += [_msgpack(False), _msgpack(True)]
    return out


# ---------------------------------------------------------------------------- measurements


def ws_header(payload: int) -> int:
    """Bytes a client frame adds to its payload: 2, 4 or 10 of header, plus the 4-byte mask."""
    return (2 if payload < 126 else 4 if payload < 65536 else 10) + 4


def _cpu(fn: Callable[[], object], points_per_call: int, points: int, repeats: int) -> float:
    """CPU seconds per million points of `fn`, which handles `points_per_call` points a call."""
    calls = max(1, points // points_per_call)
    return least_cpu(fn, calls, repeats) / (calls * points_per_call) * 1e6


def _roundtrip(scheme: Scheme, stream: list[Points]) -> tuple[list[bytes], bool]:
    enc = scheme.encoder()
    frames = [enc(seq, pts) for seq, pts in enumerate(stream, 1)]
    to_points, hub = scheme.to_points(), scheme.hub()
    ok = True
    for pts, frame in zip(stream, frames, strict=True):
        ok = ok and to_points(frame) == pts and hub(frame) == _reference_lines(pts)
    return frames, ok


def _sizes_and_cpu(
    scheme: Scheme, stream: list[Points], n: int, timed: bool, points: int, repeats: int
) -> dict[str, Any]:
    frames, ok = _roundtrip(scheme, stream)
    total = n * len(stream)
    row: dict[str, Any] = {
        "roundtrip": ok,
        "payload_per_point": sum(map(len, frames)) / total,
        "wire_per_point": sum(len(f) + ws_header(len(f)) for f in frames) / total,
    }
    if not timed:
        return row

    def encode_all() -> None:
        enc = scheme.encoder()
        for seq, pts in enumerate(stream, 1):
            enc(seq, pts)

    def decode_all(factory: Callable[[], Callable[[bytes], object]]) -> Callable[[], None]:
        def run() -> None:
            dec = factory()
            for f in frames:
                dec(f)

        return run

    row["encode_s_per_mpt"] = _cpu(encode_all, total, points, repeats)
    row["inflate_s_per_mpt"] = _cpu(decode_all(scheme.inflate), total, points, repeats) if scheme.inflate else 0.0
    row["to_dicts_s_per_mpt"] = _cpu(decode_all(scheme.to_points), total, points, repeats)
    row["hub_s_per_mpt"] = _cpu(decode_all(scheme.hub), total, points, repeats)
    return row


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _makers() -> dict[str, Callable[[], object]]:
    # name -> a maker of one object whose memory is measured: zlib's inflaters (hub) and deflaters (device).
    sample = _json(1, next(_sim_stream("pm-10", "power", 10, 10)))
    big = _json(1, next(_sim_stream("pm-10", "power", 300, 300)))  # ~47 KB: more than the largest window
    out: dict[str, Callable[[], object]] = {}
    for w in range(9, 16):
        frame = zlib.compressobj(6, zlib.DEFLATED, -w)
        data = frame.compress(big) + frame.flush(zlib.Z_SYNC_FLUSH)

        def used_inflater(w: int = w, data: bytes = data) -> object:
            d = zlib.decompressobj(-w)
            d.decompress(data)  # allocated on first use, and all of it touched once a window's worth went through
            return d

        out[f"inflater w{w} fresh"] = lambda w=w: zlib.decompressobj(-w)  # type: ignore[misc]
        out[f"inflater w{w} after a window of data"] = used_inflater
    for w, level in ((15, 8), (12, 8), (10, 2), (9, 1)):

        def used_deflater(w: int = w, level: int = level) -> object:
            c = zlib.compressobj(6, zlib.DEFLATED, -w, level)
            c.compress(sample)
            c.flush(zlib.Z_SYNC_FLUSH)
            return c

        out[f"deflater w{w} memLevel {level} after a message"] = used_deflater
    return out


def _probe_rss(name: str, count: int) -> float:
    """RSS growth per object (bytes) for `count` objects from `_makers()[name]`, in this (fresh) process."""
    make = _makers()[name]
    make()
    gc.collect()
    before = _rss_kib()
    objs = [make() for _ in range(count)]
    rss = (_rss_kib() - before) * 1024 / count
    del objs
    return rss


def memory(count: int, quick: bool = False) -> dict[str, dict[str, float]]:
    """Bytes each of `count` live objects holds: tracemalloc here, RSS growth in a fresh process per kind."""
    out: dict[str, dict[str, float]] = {}
    for name, make in _makers().items():
        if quick and " w15 " not in name:
            continue
        n = count if name.startswith("inflater") else max(1, count // 20)  # a deflater is up to 260 KB
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        objs = [make() for _ in range(n)]
        traced = (tracemalloc.get_traced_memory()[0] - base) / n
        tracemalloc.stop()
        del objs
        probe = [sys.executable, "-m", "bench.compression", "--probe-rss", name, str(n)]
        rss = float(subprocess.run(probe, check=True, capture_output=True, text=True).stdout)
        out[name] = {"count": n, "tracemalloc_bytes": traced, "rss_bytes": rss}
    return out


def _peak_while(fn: Callable[[], object]) -> int:
    gc.collect()
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def transient(scheme: Scheme, stream: list[Points]) -> int:
    """Peak bytes traced while the hub decodes one 100-point message to plain dicts (its result included)."""
    frames, _ = _roundtrip(scheme, stream[:2])
    dec = scheme.to_points()
    dec(frames[0])  # a scheme with context decodes the second message with the first one's window
    return _peak_while(lambda: dec(frames[1]))


def _zeros_frame(size: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    parts = [c.compress(chunk[: min(len(chunk), size - off)]) for off in range(0, size, len(chunk))]
    return b"".join(parts) + c.flush()


def bombs(sizes: list[int], limit: int = MESSAGE_LIMIT) -> list[dict[str, Any]]:
    """For frames of zeros that inflate to each size: frame bytes, bytes inflated before refusal, CPU to refuse."""
    rows = []
    for size in sizes:
        frame = _zeros_frame(size)
        d = zlib.decompressobj(-15)
        start = time.process_time()
        out = d.decompress(frame, limit + 1)
        refused = len(out) > limit or bool(d.unconsumed_tail)
        cpu = time.process_time() - start
        row = {
            "inflates_to": size,
            "frame_bytes": len(frame),
            "wire_bytes": len(frame) + ws_header(len(frame)),
            "refused": refused,
            "inflated_before_refusal": len(out),
            "refuse_cpu_us": cpu * 1e6,
            "peak_traced_bytes": _peak_while(lambda frame=frame: _refuses(frame, limit)),
        }
        if size <= 64 << 20:  # what inflating it all would cost (no limit)
            start = time.process_time()
            whole = zlib.decompressobj(-15).decompress(frame)
            row["full_inflate_cpu_us"] = (time.process_time() - start) * 1e6
            assert len(whole) == size
            del whole
        rows.append(row)
    return rows


def _refuses(data: bytes, limit: int) -> bool:
    # True if `inflate_limited` refuses `data`.
    try:
        inflate_limited(data, limit)
    except ValueError:
        return True
    return False


def run(quick: bool = False, points: int = 50_000, repeats: int = 3) -> dict[str, Any]:
    """The whole report as a dict (see `main` for its tables)."""
    load_start = os.getloadavg()
    total = 100 if quick else 1000  # points per measured stream: 1000 messages of 1 point, ..., 10 of 100
    if quick:
        points, repeats = 200, 1
    all_schemes = schemes(quick)
    timed_workloads = {"template", "power"} if not quick else {"template"}
    report: dict[str, Any] = {
        "quick": quick,
        "message_limit": MESSAGE_LIMIT,
        "cpu_points": points,
        "repeats": repeats,
        "schemes": {s.name: s.what for s in all_schemes},
        "workloads": {name: what for name, (what, _) in WORKLOADS.items()},
        "results": {},
    }
    for wname, (_, make) in WORKLOADS.items():
        report["results"][wname] = {}
        for n in SIZES:
            stream = list(make(n, max(total, n * 2)))
            timed = wname in timed_workloads
            report["results"][wname][str(n)] = {
                s.name: _sizes_and_cpu(s, stream, n, timed and s.wbits == 15, points, repeats) for s in all_schemes
            }
    stream100 = list(_sim_stream("pm-10", "power", 100, 200))
    report["transient_peak_bytes_100pt"] = {s.name: transient(s, stream100) for s in all_schemes if s.wbits in (9, 15)}
    report["memory"] = memory(200 if quick else 10_000, quick)
    report["bombs"] = bombs([1 << 20, 4 << 20] if quick else [1 << 20, 16 << 20, 64 << 20, 256 << 20])
    report["load_average"] = {"start": load_start, "end": os.getloadavg()}
    return report


# ---------------------------------------------------------------------------- as built


@attrs.define
class _Book:
    durable: int = 0
    submitted: int = 0  # stays 0: every message is new to the session


def _hub_session(compressed: bool) -> HubConnection:
    # The hub's session as `DeviceSession` makes it (with the reader when msgspec is there), welcomed.
    read = TelemetryReader("dev-1", DEFAULT_LIMITS).read if reader_available() else None
    conn = HubConnection(DEFAULT_LIMITS, read=read)
    conn.receive(encode(Hello(compress=SCHEMES if compressed else ())), 0.0)
    conn.welcome("dev-1", 1, _Book(), [], ping_interval=10.0, max_message_bytes=MESSAGE_LIMIT)
    assert conn.compress == (DEFLATE_D1 if compressed else None)
    return conn


def built(points: int = 50_000, repeats: int = 3, quick: bool = False) -> dict[str, Any]:
    """`device_client`'s frames, text and `deflate-d1`, through the hub's `HubConnection.receive` (issue 14, item 4).

    Per workload and batch size: wire bytes per point, the device's `deflate` and the hub's receive (inflate, reader,
    lines) in CPU seconds per million points.
    """
    total = 100 if quick else 1000
    out: dict[str, Any] = {}
    for wname in ("template",) if quick else ("template", "env", "power", "tracker"):
        _, make = WORKLOADS[wname]
        out[wname] = {}
        for n in SIZES:
            texts = [encode(Telemetry(seq, pts)) for seq, pts in enumerate(make(n, max(total, n * 2)), 1)]  # type: ignore[arg-type]
            count = n * len(texts)
            modes: dict[str, list[str] | list[bytes]] = {"text": texts, DEFLATE_D1: [deflate(t) for t in texts]}
            row: dict[str, float] = {}
            for mode, frames in modes.items():
                conn = _hub_session(mode != "text")

                def receive_all(conn: HubConnection = conn, frames: list[str] | list[bytes] = frames) -> None:
                    for frame in frames:
                        conn.receive(frame, 0.0)

                events = [conn.receive(frame, 0.0) for frame in frames]
                assert all(type(e) is Batch or type(e) is Telemetry for e in events), events[:1]
                sizes = [len(f) if type(f) is bytes else len(f.encode()) for f in frames]
                row[f"{mode}_wire_per_point"] = sum(b + ws_header(b) for b in sizes) / count
                row[f"{mode}_hub_s_per_mpt"] = _cpu(receive_all, count, points, repeats)
            row["deflate_s_per_mpt"] = _cpu(lambda texts=texts: [deflate(t) for t in texts], count, points, repeats)
            out[wname][str(n)] = row
    return out


def _print_built(report: dict[str, Any], repeats: int) -> None:
    print(f"As built: wire B/pt text -> {DEFLATE_D1}; hub receive CPU s/Mpt text -> {DEFLATE_D1} (least of {repeats});")
    print("device deflate CPU s/Mpt")
    for wname, by_n in report.items():
        for n, r in by_n.items():
            wire, hub = r[DEFLATE_D1 + "_wire_per_point"], r[DEFLATE_D1 + "_hub_s_per_mpt"]
            print(
                f"{wname:<9} {n:>3} pt: {r['text_wire_per_point']:7.1f} -> {wire:6.1f} B/pt"
                f"   hub {r['text_hub_s_per_mpt']:5.2f} -> {hub:5.2f}   deflate {r['deflate_s_per_mpt']:5.2f}"
            )


# ---------------------------------------------------------------------------- output


def _print(report: dict[str, Any]) -> None:
    la = report["load_average"]
    print(
        f"load average start {' '.join(f'{x:.2f}' for x in la['start'])}, end {' '.join(f'{x:.2f}' for x in la['end'])}"
    )
    for wname, by_n in report["results"].items():
        print(f"\n## {wname}: {report['workloads'][wname]}")
        print(f"{'scheme':<18} " + " ".join(f"{'B/pt ' + n + 'pt':>10}" for n in by_n) + "  round trip")
        for s in by_n[str(SIZES[0])]:
            ok = all(by_n[n][s]["roundtrip"] for n in by_n)
            print(
                f"{s:<18} "
                + " ".join(f"{by_n[n][s]['wire_per_point']:>10.1f}" for n in by_n)
                + f"  {'ok' if ok else 'FAILED'}"
            )
        timed = [s for s in by_n[str(SIZES[0])] if "hub_s_per_mpt" in by_n[str(SIZES[0])][s]]
        if timed:
            print(f"\nCPU s per million points (least of {report['repeats']}): encode / inflate / to dicts / hub lines")
            for s in timed:
                cell = (
                    "{encode_s_per_mpt:.2f} / {inflate_s_per_mpt:.2f} / {to_dicts_s_per_mpt:.2f} / {hub_s_per_mpt:.2f}"
                )
                cells = [cell.format(**by_n[n][s]) for n in by_n]
                print(f"{s:<18} " + "  |  ".join(cells))
    print("\n## memory per object (objects, tracemalloc bytes, RSS bytes)")
    for name, m in report["memory"].items():
        print(f"{name:<42} {m['count']:>6} {m['tracemalloc_bytes']:>10.0f} {m['rss_bytes']:>10.0f}")
    print("\n## peak traced bytes while decoding one 100-point pm-10 message to dicts")
    for name, b in report["transient_peak_bytes_100pt"].items():
        print(f"{name:<18} {b:>10}")
    print(f"\n## decompression bombs against the {report['message_limit']} B limit")
    for b in report["bombs"]:
        print(
            f"inflates to {b['inflates_to']:>11} frame {b['frame_bytes']:>7} B: refused={b['refused']} after "
            f"{b['inflated_before_refusal']} B, {b['refuse_cpu_us']:.0f} us, peak {b['peak_traced_bytes']} B"
            + (f"; inflating it all {b['full_inflate_cpu_us']:.0f} us" if "full_inflate_cpu_us" in b else "")
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.compression", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few seconds: fewer windows, tiny CPU runs and bombs")
    p.add_argument("--points", type=int, default=50_000, help="points per timed run (default 50000)")
    p.add_argument("--repeats", type=int, default=3, help="runs per CPU figure; the least is kept (default 3)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--built", action="store_true", help="only the scheme as built, through the hub's session code")
    p.add_argument("--probe-rss", nargs=2, metavar=("KIND", "COUNT"), help=argparse.SUPPRESS)  # run by `memory`
    args = p.parse_args(argv)
    if args.probe_rss:
        print(_probe_rss(args.probe_rss[0], int(args.probe_rss[1])))
        return
    if args.built:
        points, repeats = (200, 1) if args.quick else (args.points, args.repeats)
        report = built(points, repeats, args.quick)
        _print_built(report, repeats)
    else:
        report = run(args.quick, args.points, args.repeats)
        _print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
