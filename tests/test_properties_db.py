"""Property tests: every telemetry input is refused with a defined code, or round-trips through real InfluxDB 1.6."""

# Hypothesis generates batches of hostile points (line-protocol and InfluxQL metacharacters, unicode, names and values
# at the limits, extreme floats, int64 bounds), with now and then one defect. Each point is validated alone and the
# batch is decoded as one frame; the points the protocol accepts become line protocol through `LineBuilder`, go to
# InfluxDB in one write, and must come back the same: measurement, tags plus `device`, field values and types,
# timestamp. Each example writes into a database of its own, and its points never give one field two types: InfluxDB
# refuses a type conflict within one write (all of it) or with stored data (those points).

from __future__ import annotations

import itertools
import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from device_client.protocol import (
    DEFAULT_LIMITS,
    INT64_MAX,
    INT64_MIN,
    MAX_TS_MS,
    MIN_TS_MS,
    ErrorCode,
    ProtocolError,
    Telemetry,
    decode,
    validate_points,
)
from hub.fleet import NAME_RE
from hub.ingest import LineBuilder
from tests.servers import InfluxDB1, http_post

pytestmark = pytest.mark.e2e

LIMITS = DEFAULT_LIMITS
ERROR_CODES = {v for k, v in vars(ErrorCode).items() if k.isupper()}
TS = 1_700_000_000_000
SEQ = 7
_DB_NUMBERS = itertools.count()

# ---------------------------------------------------------------------------- strategies

# Characters the protocol should accept in names and values, weighted towards what line protocol and InfluxQL treat
# specially. No backslash and no control or separator characters other than the ASCII space: those are defects.
_SPECIAL = st.sampled_from([*" ,=\"'#:;.{}[]()<>*/+-?!|&%$@^~`", "e\u0301", "😀", "☀", "中文", "שלום", "ﷺ", "\ufffd"])
_PRINTABLE = st.characters(categories=("L", "M", "N", "P", "S"), exclude_characters="\\") | st.just(" ")
_PIECE = _SPECIAL | _PRINTABLE


def _repeat(chunk: str, n: int) -> str:
    """`chunk` repeated and cut to exactly `n` characters (long strings from few hypothesis choices)."""
    return (chunk * (n // len(chunk) + 1))[:n]


def _text(piece: st.SearchStrategy[str], limit: int, min_size: int = 1) -> st.SearchStrategy[str]:
    """Mostly short texts of `piece`s; sometimes only spaces, or exactly at (or one under) `limit` characters."""
    short = st.lists(piece, min_size=min_size, max_size=8).map("".join).filter(lambda s: len(s) <= limit)
    spaces = st.integers(1, 3).map(lambda n: " " * n)
    chunk = st.lists(piece, min_size=1, max_size=3).map("".join)
    at_limit = st.builds(_repeat, chunk, st.sampled_from([limit - 1, limit]))
    return st.one_of(short, short, short, short, short, spaces, at_limit, at_limit)


_NAMES = _text(_PIECE, LIMITS.max_name_len)
_SHORT_NAMES = st.lists(_PIECE, min_size=1, max_size=8).map("".join)
_TAG_VALUES = _text(_PIECE, LIMITS.max_tag_value_len)
# String field values may hold anything but line breaks and lone surrogates: tabs, NUL, quotes, backslashes.
_STRING_PIECE = st.sampled_from(
    ['"', "\\", '\\"', '"\\', "\t", "\x00", "\x7f", "\u2028", " ", "=", ",", "😀", "e\u0301"]
) | st.characters(exclude_categories=("Cs",), exclude_characters="\r\n")
_STRINGS = _text(_STRING_PIECE, LIMITS.max_string_len, min_size=0)
_FLOATS = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [
        0.0,
        -0.0,
        5e-324,  # smallest subnormal
        -5e-324,
        2.225073858507201e-308,  # largest subnormal
        2.2250738585072014e-308,  # smallest normal
        1.7976931348623157e308,
        -1.7976931348623157e308,
        1e-7,
        1e16,
        1e21,
        1e22,
        0.1,
        9.223372036854776e18,
        -9.223372036854776e18,
    ]
)
_INTS = st.integers(INT64_MIN, INT64_MAX) | st.sampled_from(
    [INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1, 0, -1, 2**53, 2**53 + 1, -(2**53) - 1]
)
_VALUES = st.one_of(
    _FLOATS,
    st.booleans(),
    _INTS,  # a plain JSON integer: a float field
    _INTS.map(lambda n: {"int": n}),
    _STRINGS,
)
_TIMESTAMPS = st.integers(MIN_TS_MS, MAX_TS_MS) | st.sampled_from([MIN_TS_MS, MAX_TS_MS, TS])

# Defects: inputs the protocol must refuse (or, where a general text happens to be fine, accept and round-trip).
_ANY_TEXT = st.text(max_size=12)
_BAD_NAMES = _ANY_TEXT | st.sampled_from(
    [
        "",
        "time",
        "_x",
        "a\\b",
        "\\",
        "a\nb",
        "a\tb",
        "\x00",
        "\u200b",  # zero-width space (Cf)
        "a\u00a0b",  # no-break space (Zs)
        "\u2028",
        "👩\u200d👩\u200d👧",  # emoji joined with ZWJ (Cf)
        "\ud800",
        "\ufeff",
        "x" * (LIMITS.max_name_len + 1),
        "😀" * (LIMITS.max_name_len + 1),
    ]
)
_SHORT_STRINGS = st.lists(_STRING_PIECE, max_size=6).map("".join)
_BAD_VALUES = st.one_of(
    st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    st.sampled_from([2**63, -(2**63) - 1, 10**30]),
    st.sampled_from([{"int": 2**63}, {"int": INT64_MIN - 1}, {"int": 1.0}, {"int": True}, {"int": "1"}]),
    st.sampled_from([{"int": 1, "x": 2}, {"float": 1.0}, {}, [], [1.0], None]),
    # A line break or a lone surrogate anywhere in a string, or one character too many.
    st.builds(
        "".join,
        st.tuples(_SHORT_STRINGS, st.sampled_from(["\n", "\r", "\r\n", "\ud800", "\udfff"]), _SHORT_STRINGS),
    ),
    st.builds(_repeat, _SHORT_STRINGS.filter(bool), st.just(LIMITS.max_string_len + 1)),
)
_BAD_TAG_VALUES = _ANY_TEXT | st.sampled_from(
    ["", "a\\", "a\nb", "\x7f", "\u200b", "\ud800", 1, None, True, "v" * (LIMITS.max_tag_value_len + 1)]
)
_BAD_TS = st.sampled_from([MIN_TS_MS - 1, MAX_TS_MS + 1, 0, -TS, float(TS), str(TS), None, True, TS * 1000, 2**64])


def _at_limit(draw: st.DrawFn) -> bool:
    return draw(st.integers(0, 19)) == 13  # one time in twenty; not 0, which hypothesis favours


def _entries(draw: st.DrawFn, values: st.SearchStrategy[Any], limit: int, low: int, high: int) -> dict[str, Any]:
    """`low`..`high` entries with hostile keys, or sometimes exactly `limit` of them built from few choices."""
    if _at_limit(draw):
        base = draw(_SHORT_NAMES)
        cycle = draw(st.lists(values, min_size=1, max_size=4))
        return {f"{base}{i}": cycle[i % len(cycle)] for i in range(limit)}
    return draw(st.dictionaries(_NAMES, values, min_size=low, max_size=high))


@st.composite
def hostile_points(draw: st.DrawFn) -> dict[str, Any]:
    """A point from the accepted space, made hostile; about one in eight carries one defect."""
    fields = _entries(draw, _VALUES, LIMITS.max_fields, 1, 6)
    p: dict[str, Any] = {"measurement": draw(_NAMES), "ts": draw(_TIMESTAMPS), "fields": fields}
    tags = _entries(draw, _TAG_VALUES, LIMITS.max_tags, 0, 4)
    if tags or draw(st.booleans()):
        p["tags"] = tags
    if draw(st.integers(0, 7)) == 5:  # not 0: hypothesis favours 0 and shrinks towards it
        defect = draw(st.sampled_from(["measurement", "field_key", "value", "tag_key", "tag_value", "ts", "shape"]))
        if defect == "measurement":
            p["measurement"] = draw(_BAD_NAMES | st.just("#" + p["measurement"]))
        elif defect == "field_key":
            fields[draw(_BAD_NAMES)] = 1.0
        elif defect == "value":
            fields[draw(_NAMES)] = draw(_BAD_VALUES)
        elif defect == "tag_key":
            p["tags"] = {**tags, draw(_BAD_NAMES | st.just("device")): "v"}
        elif defect == "tag_value":
            p["tags"] = {**tags, draw(_NAMES): draw(_BAD_TAG_VALUES)}
        elif defect == "ts":
            p["ts"] = draw(_BAD_TS)
        else:
            key = draw(st.sampled_from(["measurement", "ts", "fields", "tags", "extra"]))
            p[key] = draw(st.sampled_from([None, 1, "x", [], {}, {"a": 1.0}]))
    return p


def _measurement_key(p: dict[str, Any]) -> str:
    return repr(p.get("measurement"))


_DEVICES = st.from_regex(NAME_RE, fullmatch=True)
_BATCHES = st.integers(1, 40).flatmap(
    lambda n: st.lists(hostile_points(), min_size=n, max_size=n, unique_by=_measurement_key)
)

# ---------------------------------------------------------------------------- reading InfluxDB back exactly


class _Number(str):
    """A JSON number kept as its text: InfluxQL prints the float 3.0 as `3` and -0.0 as `-0`."""


def _query(server: InfluxDB1, db: str, influxql: str) -> list[dict[str, Any]]:
    """The results of one or more `;`-separated statements, numbers kept as `_Number` text."""
    params = {"q": influxql, "db": db, "epoch": "ms"}
    status, body = http_post(
        f"{server.url}/query",
        urllib.parse.urlencode(params).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    reply = json.loads(body, parse_int=_Number, parse_float=_Number)
    assert status == 200 and "error" not in reply, f"HTTP {status}: {body[:500]!r}"
    results = reply["results"]
    for r in results:
        assert "error" not in r, f"{influxql[:300]!r}: {r['error']}"
    return results


def _quote(identifier: str) -> str:
    """An InfluxQL double-quoted identifier (names never hold backslashes or line breaks)."""
    return '"' + identifier.replace('"', '\\"') + '"'


def _expected_value(value: Any) -> tuple[str, Any]:
    t = type(value)
    if t is bool:
        return ("boolean", value)
    if t is str:
        return ("string", value)
    if t is dict:
        return ("integer", value["int"])
    return ("float", repr(float(value)))  # repr tells -0.0 from 0.0; a plain int means a float


def _stored_value(kind: str, raw: Any) -> tuple[str, Any]:
    if kind == "float" and type(raw) is _Number:
        return (kind, repr(float(raw)))
    if kind == "integer" and type(raw) is _Number:
        return (kind, int(raw))
    if (kind == "boolean" and type(raw) is bool) or (kind == "string" and type(raw) is str):
        return (kind, raw)
    return (f"{kind}?", raw)  # a type the column does not claim: never equal to an expected value


Row = tuple[str, tuple[tuple[str, str], ...], int]  # measurement, sorted tags, timestamp


def _expected(points: list[dict[str, Any]], device: str) -> dict[Row, dict[str, tuple[str, Any]]]:
    out = {}
    for p in points:
        row = (p["measurement"], tuple(sorted({**p["tags"], "device": device}.items())), p["ts"])
        assert row not in out, f"the test generated two points for {row}"
        out[row] = {k: _expected_value(v) for k, v in p["fields"].items()}
    return out


def _stored(series: dict[str, Any], field_types: dict[str, str]) -> dict[Row, dict[str, tuple[str, Any]]]:
    # GROUP BY * lists every tag key of the measurement on each series, "" where a series has none.
    tags = tuple(sorted((k, v) for k, v in series.get("tags", {}).items() if v != ""))
    out = {}
    for values in series["values"]:
        columns = dict(zip(series["columns"], values, strict=True))
        row = (series["name"], tags, int(columns.pop("time")))
        out[row] = {k: _stored_value(field_types.get(k, "?"), v) for k, v in columns.items() if v is not None}
    return out


def assert_round_trip(server: InfluxDB1, device: str, points: list[dict[str, Any]], cache_size: int = 256) -> None:
    """Write validated `points` as one batch into a fresh database; InfluxQL must read back exactly them.

    Points must not share measurement, tags and timestamp (InfluxDB would merge them), nor give one field key of
    a measurement two types (InfluxDB refuses a type conflict).
    """
    db = f"props{next(_DB_NUMBERS)}"
    server.query(f'CREATE DATABASE "{db}" WITH DURATION INF SHARD DURATION 5200w')  # two shards for 2000..2100
    try:
        builder = LineBuilder(device, cache_size)
        body = builder.lines(points)
        assert builder.lines(points) == body  # the cached prefixes and keys build the same text
        status, reply = server.write(body, db)
        assert status == 204, f"InfluxDB refused the batch: HTTP {status} {reply[:500]!r}"
        measurements = sorted({p["measurement"] for p in points})
        statements = ["SHOW FIELD KEYS", *(f"SELECT * FROM {_quote(m)} GROUP BY *" for m in measurements)]
        results = _query(server, db, ";".join(statements))
        field_types = {s["name"]: dict(s["values"]) for s in results[0].get("series", [])}
        assert sorted(field_types) == measurements
        stored: dict[Row, dict[str, tuple[str, Any]]] = {}
        for m, result in zip(measurements, results[1:], strict=True):
            for series in result.get("series", []):
                assert series["name"] == m
                stored.update(_stored(series, field_types[m]))
        assert stored == _expected(points, device)
    finally:
        server.query(f'DROP DATABASE "{db}"')


# ---------------------------------------------------------------------------- fixtures and explicit examples


@pytest.fixture(scope="module")
def influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB1]:
    """One InfluxDB 1.6 for the module; each example uses a database of its own."""
    server = InfluxDB1(tmp_path_factory.mktemp("props") / "influxdb1")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _p(measurement: str, fields: dict[str, Any], tags: dict[str, Any] | None = None, ts: int = TS) -> dict[str, Any]:
    p = {"measurement": measurement, "ts": ts, "fields": fields}
    if tags is not None:
        p["tags"] = tags
    return p


N, V, S = LIMITS.max_name_len, LIMITS.max_tag_value_len, LIMITS.max_string_len
# Every hostile case the issue names, accepted by the protocol: each must come back exactly.
HOSTILE_ACCEPTED = [
    _p(" ", {" ": 1.0}, {" ": " "}),
    _p("  lead", {" lead": 1.0}, {" lead": "  lead", "trail ": "trail  "}),
    _p("trail  ", {"trail ": "trail "}, {"only spaces": "   "}),
    _p("a,b=c d", {"a,b=c d": 1.5, "x=": {"int": 1}}, {"a,b=c d": "a,b=c d", "=": "=", ",": ","}),
    _p("\"quoted\" 'single'", {'"': '"', "'": "'"}, {'"k"': '"v"', "'k'": "'v'"}),
    _p("m#", {"#": 1.0, "#f": True}, {"#": "#", "#t": "#v"}),
    _p("😀 emoji ☀", {"😀": "😀" * S}, {"😀": "😀" * V}),
    _p("e\u0301 中文 שלום ﷺ", {"é": "e\u0301"}, {"中文": "שלום"}),
    _p("😀" * N, {"😀" * N: 1.0, "f" * N: "x" * S}, {"😀" * N: "😀" * V, "t" * N: "v" * V}),
    _p(
        "floats",
        {
            "zero": 0.0,
            "neg_zero": -0.0,
            "min_subnormal": 5e-324,
            "neg_min_subnormal": -5e-324,
            "max_subnormal": 2.225073858507201e-308,
            "min_normal": 2.2250738585072014e-308,
            "max": 1.7976931348623157e308,
            "min": -1.7976931348623157e308,
            "tiny": 1e-7,
            "big": 1e22,
            "tenth": 0.1,
        },
    ),
    _p(
        "ints",
        {
            "i_min": {"int": INT64_MIN},
            "i_max": {"int": INT64_MAX},
            "i_zero": {"int": 0},
            "plain_min": INT64_MIN,
            "plain_max": INT64_MAX,
            "plain_2_53_plus_1": 2**53 + 1,
        },
    ),
    _p(
        "strings",
        {
            "empty": "",
            "backslash_end": "a\\",
            "backslashes": "\\\\",
            "quote_escape": '\\"',
            "controls": "\x00\t\x7f\x1b",
            "separators": "\u2028\u2029\u00a0\u200b",
            "line_protocol": 'm,t=v f=1 1\\ "x"',
        },
    ),
    _p("device field", {"device": "a field named device"}, {"dup": "tag"}),
    _p("dup", {"dup": 1.0}, {"dup": "tag and field share a key"}),
    _p("bounds min", {"v": 1.0}, ts=MIN_TS_MS),
    _p("bounds max", {"v": 1.0}, ts=MAX_TS_MS),
    _p(
        "many",
        {f"f{i} ,=": float(i) for i in range(LIMITS.max_fields)},
        {f"t{i} =,": "v" for i in range(LIMITS.max_tags)},
    ),
    # The widest point: every name, value and count at its limit, in 4-byte UTF-8 (about 1.7 MB of line protocol).
    _p(
        "\U0001f601" * N,
        {"\U0001f600" * (N - 1) + chr(0x1F600 + i): chr(0x1F600 + i) * S for i in range(LIMITS.max_fields)},
        {"\U0001f600" * (N - 1) + chr(0x1F600 + i): "\U0001f600" * V for i in range(LIMITS.max_tags)},
        ts=MAX_TS_MS - 1,
    ),
]
HOSTILE_REFUSED = [
    _p("#comment", {"v": 1.0}),
    _p("time", {"v": 1.0}),
    _p("m", {"time": 1.0}),
    _p("m", {"v": 1.0}, {"device": "spoofed"}),
    _p("m", {"v": 1.0}, {"t": "a\nb"}),
    _p("m", {"v": 1.0}, {"a,b\\": "v"}),
    _p("m", {"v": "line\nbreak"}),
    _p("m", {"v": "x" * (S + 1)}),
    _p("m", {"v": float("nan")}),
    _p("m", {"v": 2**63}),
    _p("m", {"v": {"int": INT64_MIN - 1}}),
    _p("m\u200b", {"v": 1.0}),
    _p("m", {"v": 1.0}, ts=MAX_TS_MS + 1),
]

# ---------------------------------------------------------------------------- the property


def _accepted_alone(p: dict[str, Any]) -> list[dict[str, Any]]:
    """`p` validated on its own (as the hub would see it after JSON), or [] with a defined code."""
    try:
        return validate_points(json.loads(json.dumps([p])))
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES, exc
        return []


@settings(
    max_examples=120,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(points=_BATCHES, device=_DEVICES)
@example(points=HOSTILE_ACCEPTED, device="dev-1")
@example(points=[HOSTILE_ACCEPTED[0], *HOSTILE_REFUSED], device="0")
def test_points_are_refused_with_a_code_or_round_trip_through_influxdb(
    influx: InfluxDB1, points: list[dict[str, Any]], device: str
) -> None:
    accepted = [q for p in points for q in _accepted_alone(p)]
    frame = json.dumps({"type": "telemetry", "seq": SEQ, "points": points})  # NaN and Infinity as bare constants
    try:
        msg = decode(frame)
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES, exc
        assert exc.seq == SEQ or exc.code == ErrorCode.BAD_JSON
        assert len(accepted) < len(points), "the batch was refused though each point passes alone"
    else:
        assert isinstance(msg, Telemetry) and msg.seq == SEQ
        assert msg.points == accepted
    if accepted:
        assert_round_trip(influx, device, accepted)


def test_explicit_hostile_examples_are_sorted_as_intended() -> None:
    # The explicit examples above are meant to reach the database (or not): keep them honest.
    assert all(_accepted_alone(p) for p in HOSTILE_ACCEPTED)
    assert not any(_accepted_alone(p) for p in HOSTILE_REFUSED)


# ---------------------------------------------------------------------------- many series of one measurement

_KINDS = {
    "float": _FLOATS | _INTS,  # a plain JSON integer is a float too
    "integer": _INTS.map(lambda n: {"int": n}),
    "boolean": st.booleans(),
    "string": _STRINGS,
}


@st.composite
def one_measurement_batches(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Points of one hostile measurement: a few tag sets, distinct timestamps, each field key keeping one type."""
    measurement = draw(_NAMES)
    schema = draw(st.dictionaries(_NAMES, st.sampled_from(sorted(_KINDS)), min_size=1, max_size=6))
    tag_sets = draw(st.lists(st.dictionaries(_NAMES, _TAG_VALUES, max_size=3), min_size=1, max_size=4))
    n = draw(st.integers(1, 30))
    points = []
    for ts in draw(st.lists(_TIMESTAMPS, min_size=n, max_size=n, unique=True)):
        keys = draw(st.lists(st.sampled_from(sorted(schema)), min_size=1, max_size=len(schema), unique=True))
        fields = {k: draw(_KINDS[schema[k]]) for k in keys}
        points.append({"measurement": measurement, "ts": ts, "fields": fields, "tags": draw(st.sampled_from(tag_sets))})
    return points


@settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(points=one_measurement_batches(), cache_size=st.integers(1, 3), device=_DEVICES)
def test_many_series_of_one_measurement_round_trip(
    influx: InfluxDB1, points: list[dict[str, Any]], cache_size: int, device: str
) -> None:
    # Several series and rows per measurement, fields missing from some rows, and a prefix cache small enough
    # to be cleared mid-batch.
    accepted = [q for p in points for q in _accepted_alone(p)]
    if accepted:
        assert_round_trip(influx, device, accepted, cache_size)
