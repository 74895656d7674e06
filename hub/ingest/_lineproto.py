"""InfluxDB line protocol built directly as strings (ms timestamps), with a per-session prefix cache."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from device_client.protocol import FieldValue, Point

__all__ = ["LineBuilder", "escape_key", "escape_measurement", "format_fields", "line", "series_prefix"]

_PREFIX_CACHE_MAX = 256


def escape_measurement(name: str) -> str:
    """A measurement name with `,` and space escaped."""
    if "," in name or " " in name:
        return name.replace(",", "\\,").replace(" ", "\\ ")
    return name


def escape_key(name: str) -> str:
    """A tag key, tag value or field key with `,`, `=` and space escaped."""
    if "," in name or "=" in name or " " in name:
        return name.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")
    return name


def _string_value(value: str) -> str:
    if "\\" in value or '"' in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{value}"'


def _value(value: Any) -> str:
    # Untyped: dispatches on type(value) held in a local (mypy cannot narrow through it).
    # Order matters: bool is an int subclass, and plain ints are floats on the wire.
    t = type(value)
    if t is float:
        if not math.isfinite(value):
            raise ValueError(f"line protocol has no literal for {value!r}")
        return repr(value)
    if t is bool:
        return "true" if value else "false"
    if t is int:
        return str(value)  # unsuffixed: InfluxDB reads it as a float
    if t is str:
        return _string_value(value)
    if t is dict:
        return f"{value['int']}i"
    raise TypeError(f"unsupported field value {value!r}")


def format_fields(fields: Mapping[str, FieldValue]) -> str:
    """The `k=v,k=v` field set of one point, in input order."""
    parts = []
    for key, value in fields.items():
        if type(value) is float and math.isfinite(value):
            parts.append(f"{escape_key(key)}={value!r}")
        else:
            parts.append(f"{escape_key(key)}={_value(value)}")
    return ",".join(parts)


def series_prefix(measurement: str, tags: dict[str, str], device: str | None) -> str:
    """The escaped `measurement,tag=v,...` part, with the `device` tag added and tags sorted by key.

    Tags with an empty value are left out (InfluxDB refuses them). `device=None` adds no tag.
    """
    items = dict(tags)
    if device is not None:
        items["device"] = device
    parts = [escape_measurement(measurement)]
    for key in sorted(items):
        value = items[key]
        if value:
            parts.append(f"{escape_key(key)}={escape_key(value)}")
    return ",".join(parts)


def line(measurement: str, tags: dict[str, str], fields: Mapping[str, FieldValue], ts_ms: int) -> str:
    """One line (without the trailing newline) for cold paths such as presence and hub metrics.

    Field values follow the wire convention: a plain int is written as a float,
    `{"int": n}` as an integer. Tags are sorted; no `device` tag is added.
    """
    if not fields:
        raise ValueError("a line needs at least one field")
    return f"{series_prefix(measurement, tags, None)} {format_fields(fields)} {ts_ms}"


class LineBuilder:
    """Builds line protocol for one device session, caching the measurement+tags prefix."""

    def __init__(self, device: str, cache_size: int = _PREFIX_CACHE_MAX) -> None:
        self.device = device
        self._cache_size = cache_size
        self._prefixes: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        self._field_keys: dict[str, str] = {}

    def lines(self, points: list[Point]) -> str:
        """The whole batch of validated points: one line each, each ending with `\\n`."""
        value: Any  # a FieldValue, dispatched on type(value) held in a local (mypy cannot narrow through it)
        prefixes = self._prefixes
        field_keys = self._field_keys
        out: list[str] = []
        append = out.append
        for p in points:
            tags = p["tags"]
            measurement = p["measurement"]
            key = (measurement, tuple(tags.items()))
            prefix = prefixes.get(key)
            if prefix is None:
                if len(prefixes) >= self._cache_size:
                    prefixes.clear()
                prefix = prefixes[key] = series_prefix(measurement, tags, self.device)
            parts = []
            for name, value in p["fields"].items():
                ek = field_keys.get(name)
                if ek is None:
                    if len(field_keys) >= self._cache_size:
                        field_keys.clear()
                    ek = field_keys[name] = escape_key(name) + "="
                t = type(value)
                if t is float:
                    parts.append(ek + repr(value))
                elif t is dict:
                    parts.append(f"{ek}{value['int']}i")
                elif t is int:
                    parts.append(ek + str(value))
                else:
                    parts.append(ek + _value(value))
            append(f"{prefix} {','.join(parts)} {p['ts']}\n")
        return "".join(out)
