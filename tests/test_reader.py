"""The msgspec telemetry reader takes exactly what the reference `decode` accepts, with the same points and lines."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_client.protocol import (
    DEFAULT_LIMITS,
    INT64_MAX,
    INT64_MIN,
    MAX_TS_MS,
    MIN_TS_MS,
    ErrorCode,
    Limits,
    ProtocolError,
    Telemetry,
    decode,
)
from hub.devices._session import Book, HubConnection, Refused
from hub.ingest import Batch, LineBuilder, TelemetryReader, lines_compiled
from tests.test_properties_db import hostile_points

pytest.importorskip("msgspec")

DEVICE = "dev-1"
TS = 1_700_000_000_000
SMALL = Limits(max_points=3, max_fields=2, max_tags=2, max_name_len=6, max_tag_value_len=5, max_string_len=8)
_readers: dict[tuple[Limits, bool], TelemetryReader] = {}
NATIVE = (True, False)  # the line loop in C (hub/ingest/_fastlines.c) and in Python: both are held to the reference


def reader(limits: Limits, native: bool = True) -> TelemetryReader:
    # One reader per limits across examples: its caches carry names from one example to the next, as in a session.
    r = _readers.get((limits, native))
    if r is None:
        r = _readers[limits, native] = TelemetryReader(DEVICE, limits, native=native)
    return r


def test_the_line_loop_in_c_is_built() -> None:
    # setup.py compiles it where a C compiler is at hand (CI installs one): a test run without it fails here.
    assert lines_compiled()
    assert TelemetryReader(DEVICE, DEFAULT_LIMITS).native  # and sessions use it by default


def frame(points: Any, seq: Any = 7, ascii_only: bool = True, spaced: bool = False, **extra: Any) -> str:
    body = {"type": "telemetry", "seq": seq, "points": points, **extra}
    separators = (", ", ": ") if spaced else (",", ":")
    return json.dumps(body, ensure_ascii=ascii_only, separators=separators)


def same_as_reference(text: str, limits: Limits = DEFAULT_LIMITS) -> Batch | None:
    """Read `text` both ways; the reader takes it iff `decode` accepts it, and then with the same points and lines."""
    try:
        ref: Telemetry | None = decode(text, limits)  # type: ignore[assignment]
        assert type(ref) is Telemetry
    except ProtocolError:
        ref = None
    batch, python = (reader(limits, native).read(text) for native in NATIVE)
    if ref is None:
        assert batch is None and python is None
        return None
    assert batch is not None and python is not None, "the reader left an accepted batch to the reference"
    assert batch.lines == python.lines
    assert batch.seq == ref.seq
    assert batch.points() == ref.points
    assert batch.lines == LineBuilder(DEVICE).lines(ref.points)
    assert batch.latest() == {p["measurement"]: p for p in ref.points}
    return batch


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    st.lists(hostile_points(), min_size=1, max_size=6),
    st.booleans(),
    st.booleans(),
    st.sampled_from([DEFAULT_LIMITS, SMALL]),
)
def test_reader_decides_as_the_reference(
    points: list[dict[str, Any]], ascii_only: bool, spaced: bool, limits: Limits
) -> None:
    same_as_reference(frame(points, ascii_only=ascii_only, spaced=spaced), limits)


_OK = {"measurement": "m", "ts": TS, "fields": {"v": 1.5}}


def _with(**changes: Any) -> dict[str, Any]:
    return {**_OK, **changes}


# Each rule of docs/protocol.md's telemetry validation, broken once: the reader leaves it to `decode`, whose code holds.
REFUSED = [
    (frame([_with(measurement="")]), ErrorCode.BAD_NAME),
    (frame([_with(measurement="time")]), ErrorCode.BAD_NAME),
    (frame([_with(measurement="_m")]), ErrorCode.BAD_NAME),
    (frame([_with(measurement="#m")]), ErrorCode.BAD_NAME),
    (frame([_with(measurement="a\\b")]), ErrorCode.BAD_NAME),
    (frame([_with(measurement="a\u200bb")]), ErrorCode.BAD_NAME),
    (frame([_with(measurement="m" * 129)]), ErrorCode.BAD_NAME),
    (frame([_with(measurement=1)]), ErrorCode.BAD_NAME),
    (frame([_with(fields={"time": 1.0})]), ErrorCode.BAD_NAME),
    (frame([_with(fields={"_f": 1.0})]), ErrorCode.BAD_NAME),
    (frame([_with(fields={"f\n": 1.0})]), ErrorCode.BAD_NAME),
    (frame([_with(tags={"device": "x"})]), ErrorCode.RESERVED_TAG),
    (frame([_with(tags={"_t": "x"})]), ErrorCode.BAD_NAME),
    (frame([_with(tags={"t": ""})]), ErrorCode.BAD_TAG),
    (frame([_with(tags={"t": "a\\"})]), ErrorCode.BAD_TAG),
    (frame([_with(tags={"t": "\x7f"})]), ErrorCode.BAD_TAG),
    (frame([_with(tags={"t": 1})]), ErrorCode.BAD_TAG),
    (frame([_with(tags={"t": "v" * 257})]), ErrorCode.BAD_TAG),
    (frame([_with(tags={f"t{i}": "v" for i in range(33)})]), ErrorCode.BAD_POINT),
    (frame([_with(tags=[])]), ErrorCode.BAD_POINT),
    (frame([_with(ts=MIN_TS_MS - 1)]), ErrorCode.BAD_TIME),
    (frame([_with(ts=MAX_TS_MS + 1)]), ErrorCode.BAD_TIME),
    (frame([_with(ts=float(TS))]), ErrorCode.BAD_TIME),
    (frame([_with(ts=True)]), ErrorCode.BAD_TIME),
    (frame([{k: v for k, v in _OK.items() if k != "ts"}]), ErrorCode.BAD_TIME),
    (frame([_with(fields={})]), ErrorCode.BAD_POINT),
    (frame([_with(fields={f"f{i}": 1.0 for i in range(101)})]), ErrorCode.BAD_POINT),
    (frame([_with(extra=1)]), ErrorCode.BAD_POINT),
    (frame([1]), ErrorCode.BAD_POINT),
    (frame([_with(fields={"v": float("nan")})]), ErrorCode.BAD_JSON),
    (frame([_with(fields={"v": float("inf")})]), ErrorCode.BAD_JSON),
    (frame([_with(fields={"v": 1.0})]).replace("1.0", "1e400"), ErrorCode.BAD_FIELD),
    (frame([_with(fields={"v": INT64_MAX + 1})]), ErrorCode.BAD_FIELD),
    (frame([_with(fields={"v": INT64_MIN - 1})]), ErrorCode.BAD_FIELD),
    (frame([_with(fields={"v": 10**30})]), ErrorCode.BAD_FIELD),
    (frame([_with(fields={"v": {"int": INT64_MAX + 1}})]), ErrorCode.BAD_FIELD),
    (frame([_with(fields={"v": {"int": 1.0}})]), ErrorCode.BAD_FIELD),
    (frame([_with(fields={"v": {"int": True}})]), ErrorCode.BAD_FIELD),
    (frame([_with(fields={"v": {"int": 1, "x": 2}})]), ErrorCode.BAD_FIELD),
    (frame([_with(fields={"v": {}})]), ErrorCode.BAD_FIELD),
    (frame([_with(fields={"v": None})]), ErrorCode.BAD_FIELD),
    (frame([_with(fields={"v": [1.0]})]), ErrorCode.BAD_FIELD),
    (frame([_with(fields={"v": "a\nb"})]), ErrorCode.BAD_FIELD),
    (frame([_with(fields={"v": "a\rb"})]), ErrorCode.BAD_FIELD),
    (frame([_with(fields={"v": "\ud800"})]), ErrorCode.BAD_FIELD),
    (frame([_with(fields={"v": "s" * 4097})]), ErrorCode.BAD_FIELD),
    (frame([_OK] * 5001), ErrorCode.TOO_MANY_POINTS),
    (frame([]), ErrorCode.BAD_MESSAGE),
    (frame(None), ErrorCode.BAD_MESSAGE),
    (frame([_OK], seq=0), ErrorCode.BAD_SEQ),
    (frame([_OK], seq=INT64_MAX + 1), ErrorCode.BAD_SEQ),
    (frame([_OK], seq=True), ErrorCode.BAD_SEQ),
    (frame([_OK], seq="7"), ErrorCode.BAD_SEQ),
    ('{"type":"telemetry","seq":7,"points":[' + json.dumps(_OK) + "]", ErrorCode.BAD_JSON),
    (frame([_OK], deep=[[[]]]).replace("[[[]]]", "[" * 5000 + "]" * 5000), ErrorCode.BAD_JSON),
]


@pytest.mark.parametrize(("text", "code"), REFUSED, ids=[f"{i}-{code}" for i, (_, code) in enumerate(REFUSED)])
def test_refused_batches_are_left_to_the_reference(text: str, code: ErrorCode) -> None:
    assert all(reader(DEFAULT_LIMITS, native).read(text) is None for native in NATIVE)
    with pytest.raises(ProtocolError) as info:
        decode(text)
    assert info.value.code == code


@pytest.mark.parametrize(
    "points",
    [
        [_with(fields={"v": 1.5, "n": {"int": INT64_MIN}, "p": INT64_MAX, "b": True, "s": 'q"\\\t'})],
        [_with(fields={"v": -0.0, "w": 5e-324, "x": 1.7976931348623157e308, "y": 1e16, "z": 0})],
        [_with(tags=None), _with(tags={}), _with(tags={"b": "2", "a": "1"}), _with(tags={"a": "1", "b": "2"})],
        [_with(measurement="a b,c", tags={"k=v": "x,y z"}, fields={"f=g h": "s"})],
        [_with(measurement="😀", tags={"中文": "שלום"}, fields={"e\u0301": "\x00"})],
        [_with(fields={"v": "s" * 4096}, tags={"t": "v" * 256}, measurement="m" * 128)],
        [_with(ts=MIN_TS_MS), _with(ts=MAX_TS_MS)],
    ],
)
def test_accepted_batches_match_the_reference(points: list[dict[str, Any]]) -> None:
    assert same_as_reference(frame(points)) is not None
    assert same_as_reference(frame(points, ascii_only=False, spaced=True)) is not None


def test_series_change_within_a_batch() -> None:
    # The C loop reuses the previous point's prefix while measurement and tags stay the same: every change counts.
    points = [
        _with(measurement="a", tags={"t": "1"}),
        _with(measurement="b", tags={"t": "1"}),
        _with(measurement="b", tags={"t": "2"}),
        _with(measurement="b", tags={"t": "2"}),
        _with(measurement="a", tags={"t": "2"}),
        _with(measurement="a"),
        _with(measurement="a", tags=None),
        _with(measurement="a", tags={"t": "1"}),
    ]
    batch = same_as_reference(frame(points))
    assert batch is not None
    assert [line.split(" ")[0] for line in batch.lines.splitlines()] == [
        "a,device=dev-1,t=1",
        "b,device=dev-1,t=1",
        "b,device=dev-1,t=2",
        "b,device=dev-1,t=2",
        "a,device=dev-1,t=2",
        "a,device=dev-1",
        "a,device=dev-1",
        "a,device=dev-1,t=1",
    ]


def test_a_full_batch_of_long_lines() -> None:
    # 5,000 points of 100 fields with long strings: the C loop's buffer grows many times over.
    fields = {f"f{i}": "x" * 40 + '"\\' if i % 2 else float(i) / 7 for i in range(100)}
    points = [_with(ts=TS + i, fields=fields, tags={"t": str(i % 3)}) for i in range(5000)]
    batch = same_as_reference(frame(points))
    assert batch is not None and batch.n == 5000 and len(batch.lines) > 5000 * 100 * 20


def test_a_refused_string_after_good_points_refuses_the_batch() -> None:
    text = frame([_OK] * 3 + [_with(fields={"v": 1.0, "s": "a\nb"})])
    assert all(reader(DEFAULT_LIMITS, native).read(text) is None for native in NATIVE)
    with pytest.raises(ProtocolError):
        decode(text)


def test_duplicate_keys_keep_the_last_as_json_does() -> None:
    text = (
        '{"type":"telemetry","type":"telemetry","seq":1,"seq":2,"points":[{"measurement":"a","measurement":"b",'
        '"ts":1700000000000,"fields":{"v":"s","v":1.5,"n":{"int":1,"int":2}},"tags":{"t":"1"},"tags":{"t":"2"}}]}'
    )
    batch = same_as_reference(text)
    assert batch is not None
    assert batch.lines == "b,device=dev-1,t=2 v=1.5,n=2i 1700000000000\n"


def test_other_messages_and_unknown_keys_go_to_the_reference() -> None:
    r = reader(DEFAULT_LIMITS)
    assert r.read('{"type":"command_ack","id":"c1"}') is None
    assert r.read(frame([_OK], extra=1)) is None
    assert isinstance(decode(frame([_OK], extra=1)), Telemetry)  # accepted there, the slower way


def test_a_name_refused_once_is_refused_again() -> None:
    # Only names that passed enter the caches: the second sight of a bad one is refused the same way.
    for text in (frame([_OK, _with(tags={"device": "x"})]), frame([_OK, _with(fields={"_f": 1.0})])):
        for _ in range(2):
            assert all(reader(DEFAULT_LIMITS, native).read(text) is None for native in NATIVE)


class _Book:
    durable = 0
    submitted = 0


def test_hub_connection_with_the_reader_answers_as_without() -> None:
    texts = [frame([_OK], seq=1), frame([_with(measurement="_x")], seq=2), frame([_OK], seq=1), "nonsense"]
    plain, fast = HubConnection(), HubConnection(read=TelemetryReader(DEVICE, DEFAULT_LIMITS).read)
    for conn in (plain, fast):
        conn.receive('{"type":"hello","proto":1}', 0.0)
        book: Book = _Book()
        conn.welcome(DEVICE, 1, book, [], ping_interval=20.0, max_message_bytes=1 << 20)
    for i, text in enumerate(texts):
        a, b = plain.receive(text, float(i)), fast.receive(text, float(i))
        if i == 0:
            assert type(a) is Telemetry and type(b) is Batch and a.points == b.points()
            plain.submitted(1)
            fast.submitted(1)
            continue
        assert type(a) is type(b)
        if isinstance(a, Refused):
            assert isinstance(b, Refused)
            assert (a.error.code, a.error.seq, a.frame) == (b.error.code, b.error.seq, b.frame)
        else:
            assert a == b


_NUMBER = st.from_regex(r"-?(0|[1-9][0-9]{0,24})(\.[0-9]{1,40})?([eE][+-]?[0-9]{1,3})?", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(st.lists(_NUMBER, min_size=1, max_size=4))
def test_number_literals_read_as_the_reference_reads_them(literals: list[str]) -> None:
    # Long, inexact and huge literals: the same float or int (or the same refusal) as json and orjson give.
    fields = ",".join(f'"f{i}":{literal}' for i, literal in enumerate(literals))
    text = f'{{"type":"telemetry","seq":1,"points":[{{"measurement":"m","ts":{TS},"fields":{{{fields}}}}}]}}'
    same_as_reference(text)
