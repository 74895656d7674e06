"""Telemetry frames read straight into line protocol: msgspec checks shape, types and ranges in one C pass.

`device_client.protocol.decode` stays the reference. A frame this reader does not take (`read` returns None) goes
there, which accepts it or refuses it with its code; a frame the reader takes, the reference accepts with the same
points, and the lines are `LineBuilder`'s (tests/test_reader.py holds both to it). Names, tag sets and field keys are
checked by the reference's own rules the first time a session meets them: after that they cost one cache lookup.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Literal

import attrs

from device_client.protocol import (
    INT64_MAX,
    INT64_MIN,
    MAX_TS_MS,
    MIN_TS_MS,
    Limits,
    Point,
    ProtocolError,
    validate_points,
)
from hub.ingest._lineproto import _string_value, escape_key, series_prefix

try:  # a hub dependency; without it every frame takes the reference path
    import msgspec
except ImportError:  # pragma: no cover - depends on the install
    msgspec = None  # type: ignore[assignment]

try:  # compiled by setup.py where a C compiler is at hand; else the same loop in Python
    from hub.ingest import _fastlines
except ImportError:  # pragma: no cover - depends on the install
    _fastlines = None  # type: ignore[assignment]

__all__ = ["Batch", "TelemetryReader", "available", "compiled", "message_type"]

_CACHE_MAX = 256
_FLOAT_MAX = sys.float_info.max


def available() -> bool:
    """True if msgspec is installed (else there is no fast path: `decode` reads every frame)."""
    return msgspec is not None


def compiled() -> bool:
    """True if the line loop in C (hub/ingest/_fastlines.c) was built: readers use it by default."""
    return _fastlines is not None


def message_type(limits: Limits) -> Any:
    """The msgspec type of a telemetry message under `limits`: every rule but the names' (checked per cache miss)."""
    meta, raw = msgspec.Meta, msgspec.Raw
    name = Annotated[str, meta(min_length=1, max_length=limits.max_name_len)]
    int64 = Annotated[int, meta(ge=INT64_MIN, le=INT64_MAX)]
    # A plain JSON integer is a float field kept as an int, as the reference keeps it; `{"int": n}` stays that dict.
    value = (
        int64
        | Annotated[float, meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)]
        | bool
        | Annotated[str, meta(max_length=limits.max_string_len)]
        | Annotated[dict[Literal["int"], int64], meta(min_length=1)]
    )
    point = msgspec.defstruct(
        "_Point",
        [
            ("measurement", name),
            ("ts", Annotated[int, meta(ge=MIN_TS_MS, le=MAX_TS_MS)]),
            ("fields", Annotated[dict[name, value], meta(min_length=1, max_length=limits.max_fields)]),
            ("tags", raw, raw()),  # the raw JSON text: the key of the series cache, parsed on a miss only
        ],
        forbid_unknown_fields=True,
        gc=False,
    )
    # Unknown top-level keys send the frame to the reference too: it is the one that knows how deep JSON may nest.
    return msgspec.defstruct(
        "_Telemetry",
        [
            ("type", Literal["telemetry"]),
            ("seq", Annotated[int, meta(gt=0, le=INT64_MAX)]),
            ("points", Annotated[list[point], meta(min_length=1, max_length=limits.max_points)]),  # type: ignore[valid-type]
        ],
        forbid_unknown_fields=True,
        gc=False,
    )


_decoders: dict[Limits, Any] = {}


def _decoder(limits: Limits) -> Any:
    dec = _decoders.get(limits)
    if dec is None:
        dec = _decoders[limits] = msgspec.json.Decoder(message_type(limits))
    return dec


def _tags(raw: Any) -> Any:
    # The tags of a point as the reference holds them: missing or null is {}; anything else as JSON says.
    text = bytes(raw)
    if not text:
        return {}
    tags = msgspec.json.decode(text)
    return {} if tags is None else tags


@attrs.define(slots=True)  # not frozen: one is made per message, and a frozen class's __init__ costs three times more
class Batch:
    """A telemetry batch the reader took: its `seq`, its points as `lines` of line protocol, and the points."""

    seq: int
    lines: str
    raw_points: list[Any] = attrs.field(eq=False, repr=False)  # msgspec structs: `points()` for the reference form

    @property
    def n(self) -> int:
        return len(self.raw_points)

    def points(self) -> list[Point]:
        """The points as `decode` gives them (plain dicts, `tags` always present)."""
        return [_point(p) for p in self.raw_points]

    def latest(self) -> dict[str, Point]:
        """The last point of each measurement in the batch."""
        last = {p.measurement: p for p in self.raw_points}
        return {measurement: _point(p) for measurement, p in last.items()}


def _point(p: Any) -> Point:
    return {"measurement": p.measurement, "ts": p.ts, "fields": p.fields, "tags": _tags(p.tags)}


class _Refused(Exception):
    """The reader does not take this frame (the reference decides it)."""


class TelemetryReader:
    """Reads one device session's telemetry frames into line protocol, with its series and field-key caches."""

    __slots__ = ("_cache_size", "_decode", "_field_keys", "_last", "_prefixes", "device", "limits", "native")

    def __init__(self, device: str, limits: Limits, cache_size: int = _CACHE_MAX, native: bool | None = None) -> None:
        """`native`: build lines in C (the default where it was compiled) or in Python (False); True requires C."""
        self.device = device
        self.limits = limits
        self._decode = _decoder(limits).decode
        self._cache_size = cache_size
        self._prefixes: dict[tuple[str, bytes], str] = {}
        self._field_keys: dict[str, str] = {}
        self._last: list[Any] | None = None  # the C loop's last series, kept from one batch to the next
        if native is None:
            native = _fastlines is not None
        if native and _fastlines is None:
            raise RuntimeError("hub.ingest._fastlines was not compiled (see setup.py)")
        self.native = native

    def read(self, text: str | bytes) -> Batch | None:
        """The batch in `text`, or None if the reference decoder must decide it (not telemetry, or refused)."""
        try:
            msg = self._decode(text)
            points = msg.points
            return Batch(msg.seq, self._native_lines(points) if self.native else self._python_lines(points), points)
        except (ValueError, OverflowError, RecursionError, ProtocolError, _Refused):
            # msgspec's errors are ValueErrors, and so is the UnicodeEncodeError of a lone surrogate; an int the C
            # loop cannot hold (msgspec's range checks make it none) would be an OverflowError: the reference decides.
            return None

    def _prefix(self, measurement: str, raw: bytes) -> str:
        tags = msgspec.json.decode(raw) if raw else None
        probe = {"measurement": measurement, "ts": MIN_TS_MS, "fields": {"f": 0.0}, "tags": tags}
        validate_points([probe], self.limits)  # the reference's rules for the measurement and the tag set
        if len(self._prefixes) >= self._cache_size:
            self._prefixes.clear()
        prefix = self._prefixes[measurement, raw] = series_prefix(measurement, tags or {}, self.device)
        return prefix

    def _field_key(self, name: str) -> str:
        validate_points([{"measurement": "m", "ts": MIN_TS_MS, "fields": {name: 0.0}}], self.limits)
        if len(self._field_keys) >= self._cache_size:
            self._field_keys.clear()
        ek = self._field_keys[name] = escape_key(name) + "="
        return ek

    def _native_lines(self, points: list[Any]) -> str:
        last = self._last
        if last is None:  # made on the first batch: an idle device's reader holds no list
            last = self._last = [None, None, None]
        text = _fastlines.build(points, self._prefixes, self._field_keys, self._prefix, self._field_key, last)
        if text is None:
            raise _Refused  # a line break in a string value
        return text

    def _python_lines(self, points: list[Any]) -> str:
        value: Any  # a field value, dispatched on type(value) held in a local (mypy cannot narrow through it)
        prefixes = self._prefixes
        field_keys = self._field_keys
        out: list[str] = []
        append = out.append
        for p in points:
            measurement = p.measurement
            key = (measurement, bytes(p.tags))
            prefix = prefixes.get(key)
            if prefix is None:
                prefix = self._prefix(*key)
            parts = []
            for name, value in p.fields.items():
                ek = field_keys.get(name)
                if ek is None:
                    ek = self._field_key(name)
                t = type(value)
                if t is float:
                    parts.append(ek + repr(value))
                elif t is dict:
                    parts.append(f"{ek}{value['int']}i")
                elif t is int:
                    parts.append(ek + str(value))  # unsuffixed: InfluxDB reads it as a float
                elif t is bool:
                    parts.append(ek + ("true" if value else "false"))
                else:
                    if "\n" in value or "\r" in value:
                        raise _Refused
                    parts.append(ek + _string_value(value))
            append(f"{prefix} {','.join(parts)} {p.ts}\n")
        return "".join(out)
