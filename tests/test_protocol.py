"""Unit and property tests of the pure wire-protocol codec in `device_client.protocol`."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_client import protocol
from device_client.protocol import (
    DEFAULT_LIMITS,
    INT64_MAX,
    INT64_MIN,
    MAX_TS_MS,
    MIN_TS_MS,
    Ack,
    Command,
    Error,
    ErrorCode,
    Hello,
    Limits,
    ProtocolError,
    Telemetry,
    Welcome,
    decode,
    encode,
    encode_ack,
    int_value,
    validate_points,
)

TS = 1_700_000_000_000


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()  # a table value meaning "leave this key out"
ERROR_CODES = {v for k, v in vars(ErrorCode).items() if k.isupper()}
MESSAGE_TYPES = (Hello, Welcome, Telemetry, Ack, Error)
# Deterministic examples, no wall-clock deadline, no example database written into the repo.
PROPERTY = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def point(**keys: Any) -> dict[str, Any]:
    """A valid point, with `keys` replaced (or removed when given `MISSING`)."""
    p: dict[str, Any] = {"measurement": "m", "ts": TS, "fields": {"f": 1.0}}
    p.update(keys)
    return {k: v for k, v in p.items() if v is not MISSING}


def telemetry(*points: Any, seq: Any = 1) -> str:
    body: dict[str, Any] = {"type": "telemetry", "points": list(points)}
    if seq is not MISSING:
        body["seq"] = seq
    return json.dumps(body)


def refused(text: str | bytes, limits: Limits | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(text) if limits is None else decode(text, limits)
    return info.value


# ---------------------------------------------------------------------------- round trips

ROUND_TRIP = [
    Hello(),
    Hello(firmware="fw-1.2.3", model="esp32-c3", interval=15.5, proto=1),
    Hello(firmware="é" * 64, model="m" * 64, interval=604_800.0),
    Welcome(device="dev-1", ack=0, epoch=3, window=8, max_points=5000, ping_interval=20.0),
    Welcome(device="dev-2", ack=2**63 - 1, epoch=1, window=1, max_points=1, ping_interval=0.5, proto=1),
    Welcome("dev-3", 0, 1, 64, 5000, 10.0, max_fields=5, max_tags=2, max_name_len=9, max_message_bytes=1024),
    Ack(1),
    Ack(INT64_MAX),
    Error(ErrorCode.BAD_FIELD, "field 'x' has a line break", seq=42),
    Error(ErrorCode.BAD_JSON, "not valid JSON"),
    Error(ErrorCode.INTERNAL),
    Command("c-1", "ping", {}, 30.0),
    Command("c-2", "set", {"level": [1, {"deep": 2.5, "s": "é"}], "off": None, "on": True}, 0.5),
]


@pytest.mark.parametrize("msg", ROUND_TRIP, ids=repr)
def test_round_trip_text_and_bytes(msg: Any) -> None:
    text = encode(msg)
    assert isinstance(text, str)
    assert decode(text) == msg
    assert type(decode(text)) is type(msg)
    assert decode(text.encode()) == msg


def test_encode_is_compact_json_with_type() -> None:
    text = encode(Ack(7))
    assert text == '{"type":"ack","seq":7}'


def test_command_frame_is_compact_and_refuses_what_json_cannot_say() -> None:
    assert encode(Command("c-1", "ping", {"n": 1}, 30.0)) == (
        '{"type":"command","id":"c-1","name":"ping","args":{"n":1},"timeout":30.0}'
    )
    with pytest.raises(ValueError, match="JSON compliant"):
        encode(Command("c-1", "set", {"x": float("nan")}, 30.0))


def test_error_without_seq_has_no_seq_key() -> None:
    assert "seq" not in json.loads(encode(Error(ErrorCode.BAD_JSON, "x")))
    assert json.loads(encode(Error(ErrorCode.BAD_SEQ, "x", seq=3)))["seq"] == 3


@pytest.mark.parametrize("seq", ["x", 1.5, None, True], ids=repr)
def test_error_frame_with_unreadable_seq_decodes_with_seq_none(seq: Any) -> None:
    msg = decode(json.dumps({"type": "error", "code": "bad_point", "seq": seq}))
    assert msg == Error("bad_point", "", None)


def test_telemetry_round_trip_and_int_mapping() -> None:
    fields = {
        "i": 5,
        "neg": -2,
        "big": INT64_MAX,
        "b": True,
        "off": False,
        "f": 1.5,
        "two": 2.0,
        "s": 'quote " back \\ tab \t',
        "e": int_value(3),
    }
    points = [point(fields=fields, tags={"room": "kitchen 1", "x": "_y"}), point(measurement="cpu", ts=MIN_TS_MS)]
    text = encode(Telemetry(9, points))
    wire = json.loads(text)["points"][0]["fields"]
    assert wire == {
        "i": {"int": 5},
        "neg": {"int": -2},
        "big": {"int": INT64_MAX},
        "b": True,
        "off": False,
        "f": 1.5,
        "two": 2.0,
        "s": fields["s"],
        "e": {"int": 3},
    }
    assert type(wire["b"]) is bool and type(wire["off"]) is bool
    assert type(wire["f"]) is float and type(wire["two"]) is float
    assert fields["i"] == 5  # encode leaves the caller's points alone
    msg = decode(text)
    assert isinstance(msg, Telemetry) and msg.seq == 9
    assert msg.points == [
        {**points[0], "fields": wire},
        {**points[1], "tags": {}},
    ]
    assert type(msg.points[0]["fields"]["two"]) is float
    assert decode(text.encode()).points == msg.points


def test_plain_json_integer_field_is_accepted_as_is() -> None:
    # A plain JSON integer means a float; the codec keeps it a Python int for the line builder.
    msg = decode(telemetry(point(fields={"f": 3, "g": INT64_MAX, "h": INT64_MIN})))
    assert isinstance(msg, Telemetry)
    assert msg.points[0]["fields"] == {"f": 3, "g": INT64_MAX, "h": INT64_MIN}


def test_validate_points_checks_in_place() -> None:
    points = [point(), point(tags=None), point(tags={"a": "b"})]
    assert validate_points(points) is points
    assert [p["tags"] for p in points] == [{}, {}, {"a": "b"}]


@pytest.mark.parametrize(
    "fields",
    [
        {"s": "x" * 4096},
        {"s": ""},
        {"s": "nul \x00 and tab \t are allowed in strings"},
        {"i": int_value(INT64_MIN)},
        {"i": int_value(INT64_MAX)},
        {"f": -0.0, "g": 1.7976931348623157e308, "h": 5e-324},
        {f"k{i}": 1.0 for i in range(100)},
    ],
    ids=["string_4096", "empty_string", "controls_in_string", "int64_min", "int64_max", "extreme_floats", "100_fields"],
)
def test_boundary_fields_accepted(fields: dict[str, Any]) -> None:
    msg = decode(telemetry(point(fields=fields)))
    assert isinstance(msg, Telemetry)
    assert msg.points[0]["fields"] == fields


@pytest.mark.parametrize(
    "p",
    [
        point(ts=MIN_TS_MS),
        point(ts=MAX_TS_MS),
        point(measurement="m" * 128, fields={"k" * 128: 1.0}, tags={"t" * 128: "v" * 256}),
        point(measurement='temp, room=1 "x"', tags={"a b,c=d": "e f,g=h"}),
        point(tags={f"t{i}": "v" for i in range(32)}),
        point(measurement="température", tags={"ort": "Zürich"}),
    ],
    ids=["min_ts", "max_ts", "max_lengths", "line_protocol_specials", "32_tags", "unicode"],
)
def test_boundary_points_accepted(p: dict[str, Any]) -> None:
    msg = decode(telemetry(p))
    assert isinstance(msg, Telemetry)
    assert msg.points == [{"tags": {}, **p}]


# ---------------------------------------------------------------------------- refusals

BAD_JSON = [
    pytest.param("garbage", id="garbage"),
    pytest.param("", id="empty"),
    pytest.param('{"type":"ack","seq":1', id="truncated"),
    pytest.param('{"type":"ack","seq":1} x', id="trailing"),
    pytest.param("NaN", id="nan"),
    pytest.param("Infinity", id="infinity"),
    pytest.param("-Infinity", id="minus_infinity"),
    pytest.param('{"type":"ack","seq":NaN}', id="nan_in_object"),
    pytest.param(telemetry(point(fields={"f": float("inf")})), id="infinity_in_field"),
    pytest.param(telemetry(point(fields={"f": float("-inf")})), id="minus_infinity_in_field"),
    pytest.param(telemetry(point(fields={"f": float("nan")})), id="nan_in_field"),
    pytest.param("[" * 100_000, id="deep_lists"),
    pytest.param('{"a":' * 100_000, id="deep_objects"),
    pytest.param("[" * 100_000 + "]" * 100_000, id="deep_closed_lists"),
    pytest.param("1" * 5000, id="huge_integer_literal"),
    pytest.param(b'{"type":"ack","seq":1,"x":"\xff"}', id="invalid_utf8"),
    pytest.param(b"\xc3\x28", id="invalid_utf8_pair"),
    pytest.param(b"\xff\xfe\xfa", id="invalid_bytes"),
    pytest.param('\ufeff{"type":"ack","seq":1}', id="bom_in_text"),
]


@pytest.mark.parametrize("text", BAD_JSON)
def test_bad_json(text: str | bytes) -> None:
    exc = refused(text)
    assert exc.code == ErrorCode.BAD_JSON
    assert exc.seq is None


BAD_MESSAGE = [
    pytest.param("[]", id="list"),
    pytest.param("1", id="number"),
    pytest.param('"hello"', id="string"),
    pytest.param("null", id="null"),
    pytest.param("true", id="true"),
    pytest.param("{}", id="missing_type"),
    pytest.param('{"type":"nope"}', id="unknown_type"),
    pytest.param('{"type":"HELLO","proto":1}', id="type_case"),
    pytest.param('{"type":1}', id="type_not_string"),
    pytest.param('{"type":null}', id="type_null"),
    pytest.param('{"type":["hello"]}', id="type_list"),
    pytest.param('{"type":"hello"}', id="hello_missing_proto"),
    pytest.param('{"type":"hello","proto":"1"}', id="hello_proto_string"),
    pytest.param('{"type":"hello","proto":1.0}', id="hello_proto_float"),
    pytest.param('{"type":"hello","proto":true}', id="hello_proto_bool"),
    pytest.param('{"type":"hello","proto":1,"interval":true}', id="hello_interval_bool"),
    pytest.param('{"type":"hello","proto":1,"interval":"5"}', id="hello_interval_string"),
    pytest.param('{"type":"hello","proto":1,"interval":null}', id="hello_interval_null"),
    pytest.param('{"type":"hello","proto":1,"interval":-1}', id="hello_interval_negative"),
    pytest.param('{"type":"hello","proto":1,"interval":-0.001}', id="hello_interval_negative_float"),
    pytest.param('{"type":"hello","proto":1,"interval":604801}', id="hello_interval_over_a_week"),
    pytest.param('{"type":"hello","proto":1,"interval":604800.5}', id="hello_interval_float_over"),
    pytest.param('{"type":"hello","proto":1,"firmware":1}', id="hello_firmware_number"),
    pytest.param('{"type":"hello","proto":1,"model":null}', id="hello_model_null"),
    pytest.param(json.dumps({"type": "hello", "proto": 1, "firmware": "f" * 65}), id="hello_firmware_too_long"),
    pytest.param(json.dumps({"type": "hello", "proto": 1, "model": "m" * 65}), id="hello_model_too_long"),
    pytest.param('{"type":"welcome"}', id="welcome_empty"),
    pytest.param(
        '{"type":"welcome","device":"d","ack":0,"epoch":1,"window":1,"max_points":1,"ping_interval":1,"proto":1,'
        '"max_tags":"2"}',
        id="welcome_limit_string",
    ),
    pytest.param(
        '{"type":"welcome","device":1,"ack":0,"epoch":1,"window":1,"max_points":1,"ping_interval":1,"proto":1}',
        id="welcome_device_number",
    ),
    pytest.param(
        '{"type":"welcome","device":"d","ack":true,"epoch":1,"window":1,"max_points":1,"ping_interval":1,"proto":1}',
        id="welcome_ack_bool",
    ),
    pytest.param(
        '{"type":"welcome","device":"d","ack":0,"epoch":1,"window":1.0,"max_points":1,"ping_interval":1,"proto":1}',
        id="welcome_window_float",
    ),
    pytest.param(
        '{"type":"welcome","device":"d","ack":0,"epoch":1,"window":1,"max_points":1,"ping_interval":"1","proto":1}',
        id="welcome_ping_interval_string",
    ),
    pytest.param('{"type":"error"}', id="error_missing_code"),
    pytest.param('{"type":"error","code":7}', id="error_code_number"),
    pytest.param('{"type":"error","code":"x","detail":[]}', id="error_detail_list"),
    pytest.param('{"type":"telemetry","seq":1}', id="telemetry_missing_points"),
    pytest.param('{"type":"telemetry","seq":1,"points":[]}', id="telemetry_empty_points"),
    pytest.param('{"type":"telemetry","seq":1,"points":{}}', id="telemetry_points_object"),
    pytest.param('{"type":"telemetry","seq":1,"points":null}', id="telemetry_points_null"),
]


@pytest.mark.parametrize("text", BAD_MESSAGE)
def test_bad_message(text: str) -> None:
    assert refused(text).code == ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize("seq", [MISSING, 0, -1, INT64_MIN, 1.0, 1.5, "1", True, None, [1], 2**63, 2**64], ids=repr)
@pytest.mark.parametrize("kind", ["telemetry", "ack"])
def test_bad_seq(kind: str, seq: Any) -> None:
    body: dict[str, Any] = {"type": kind, "points": [point()]}
    if seq is not MISSING:
        body["seq"] = seq
    exc = refused(json.dumps(body))
    assert exc.code == ErrorCode.BAD_SEQ
    assert exc.seq is None


def test_seq_upper_bound_accepted() -> None:
    msg = decode(telemetry(point(), seq=INT64_MAX))
    assert isinstance(msg, Telemetry) and msg.seq == INT64_MAX


def test_too_many_points_default_limit() -> None:
    assert isinstance(decode(telemetry(*[point()] * 5000)), Telemetry)
    exc = refused(telemetry(*[point()] * 5001, seq=12))
    assert (exc.code, exc.seq) == (ErrorCode.TOO_MANY_POINTS, 12)


POINT_ERRORS = [
    # bad_point
    (ErrorCode.BAD_POINT, 1),
    (ErrorCode.BAD_POINT, "m f=1"),
    (ErrorCode.BAD_POINT, None),
    (ErrorCode.BAD_POINT, [point()]),
    (ErrorCode.BAD_POINT, point(fields=MISSING)),
    (ErrorCode.BAD_POINT, point(fields={})),
    (ErrorCode.BAD_POINT, point(fields=None)),
    (ErrorCode.BAD_POINT, point(fields=[["f", 1.0]])),
    (ErrorCode.BAD_POINT, point(fields={f"k{i}": 1.0 for i in range(101)})),
    (ErrorCode.BAD_POINT, point(tags={f"t{i}": "v" for i in range(33)})),
    (ErrorCode.BAD_POINT, point(tags=[])),
    (ErrorCode.BAD_POINT, point(tags=["a", "b"])),
    (ErrorCode.BAD_POINT, point(tags="a=b")),
    (ErrorCode.BAD_POINT, point(tags=1)),
    (ErrorCode.BAD_POINT, point(extra=1)),
    (ErrorCode.BAD_POINT, point(tags={}, time=TS)),
    (ErrorCode.BAD_POINT, point(device="d")),
    # bad_name: measurement
    (ErrorCode.BAD_NAME, point(measurement=MISSING)),
    (ErrorCode.BAD_NAME, point(measurement="")),
    (ErrorCode.BAD_NAME, point(measurement="m" * 129)),
    (ErrorCode.BAD_NAME, point(measurement="_m")),
    (ErrorCode.BAD_NAME, point(measurement="#m")),  # a comment line to InfluxDB: lost without an error
    (ErrorCode.BAD_NAME, point(measurement="time")),
    (ErrorCode.BAD_NAME, point(fields={"time": 1.0})),
    (ErrorCode.BAD_NAME, point(tags={"time": "x"})),
    (ErrorCode.BAD_NAME, point(measurement="a\nb")),
    (ErrorCode.BAD_NAME, point(measurement="a\tb")),
    (ErrorCode.BAD_NAME, point(measurement="a\x00b")),
    (ErrorCode.BAD_NAME, point(measurement="a\rb")),
    (ErrorCode.BAD_NAME, point(measurement="a\x7fb")),
    (ErrorCode.BAD_NAME, point(measurement="a\u2028b")),
    (ErrorCode.BAD_NAME, point(measurement="a\\b")),
    (ErrorCode.BAD_NAME, point(measurement="\\")),
    (ErrorCode.BAD_NAME, point(measurement="a\ud800b")),
    (ErrorCode.BAD_NAME, point(measurement=1)),
    (ErrorCode.BAD_NAME, point(measurement=None)),
    (ErrorCode.BAD_NAME, point(measurement=["m"])),
    (ErrorCode.BAD_NAME, point(measurement=True)),
    # bad_name: field and tag keys
    (ErrorCode.BAD_NAME, point(fields={"": 1.0})),
    (ErrorCode.BAD_NAME, point(fields={"k" * 129: 1.0})),
    (ErrorCode.BAD_NAME, point(fields={"_f": 1.0})),
    (ErrorCode.BAD_NAME, point(fields={"a\nb": 1.0})),
    (ErrorCode.BAD_NAME, point(fields={"a\tb": 1.0})),
    (ErrorCode.BAD_NAME, point(fields={"a\\b": 1.0})),
    (ErrorCode.BAD_NAME, point(tags={"": "v"})),
    (ErrorCode.BAD_NAME, point(tags={"t" * 129: "v"})),
    (ErrorCode.BAD_NAME, point(tags={"_t": "v"})),
    (ErrorCode.BAD_NAME, point(tags={"a\x00b": "v"})),
    (ErrorCode.BAD_NAME, point(tags={"a\\b": "v"})),
    # reserved_tag
    (ErrorCode.RESERVED_TAG, point(tags={"device": "other-device"})),
    (ErrorCode.RESERVED_TAG, point(tags={"room": "a", "device": "x"})),
    # bad_tag
    (ErrorCode.BAD_TAG, point(tags={"t": ""})),
    (ErrorCode.BAD_TAG, point(tags={"t": "v" * 257})),
    (ErrorCode.BAD_TAG, point(tags={"t": "a\nb"})),
    (ErrorCode.BAD_TAG, point(tags={"t": "a\rb"})),
    (ErrorCode.BAD_TAG, point(tags={"t": "a\tb"})),
    (ErrorCode.BAD_TAG, point(tags={"t": "a\x00b"})),
    (ErrorCode.BAD_TAG, point(tags={"t": "a\\b"})),
    (ErrorCode.BAD_TAG, point(tags={"t": "trailing\\"})),
    (ErrorCode.BAD_TAG, point(tags={"t": "a\ud800b"})),
    (ErrorCode.BAD_TAG, point(tags={"t": 1})),
    (ErrorCode.BAD_TAG, point(tags={"t": 1.5})),
    (ErrorCode.BAD_TAG, point(tags={"t": True})),
    (ErrorCode.BAD_TAG, point(tags={"t": None})),
    (ErrorCode.BAD_TAG, point(tags={"t": ["v"]})),
    (ErrorCode.BAD_TAG, point(tags={"t": {"v": 1}})),
    # bad_field
    (ErrorCode.BAD_FIELD, point(fields={"f": None})),
    (ErrorCode.BAD_FIELD, point(fields={"f": []})),
    (ErrorCode.BAD_FIELD, point(fields={"f": [1.0]})),
    (ErrorCode.BAD_FIELD, point(fields={"f": {}})),
    (ErrorCode.BAD_FIELD, point(fields={"f": {"a": 1.0}})),
    (ErrorCode.BAD_FIELD, point(fields={"f": {"int": {"int": 1}}})),
    (ErrorCode.BAD_FIELD, point(fields={"f": {"int": 1.5}})),
    (ErrorCode.BAD_FIELD, point(fields={"f": {"int": 1.0}})),
    (ErrorCode.BAD_FIELD, point(fields={"f": {"int": "1"}})),
    (ErrorCode.BAD_FIELD, point(fields={"f": {"int": True}})),
    (ErrorCode.BAD_FIELD, point(fields={"f": {"int": None}})),
    (ErrorCode.BAD_FIELD, point(fields={"f": {"int": 1, "x": 2}})),
    (ErrorCode.BAD_FIELD, point(fields={"f": {"int": 2**63}})),
    (ErrorCode.BAD_FIELD, point(fields={"f": {"int": -(2**63) - 1}})),
    (ErrorCode.BAD_FIELD, point(fields={"f": 2**63})),
    (ErrorCode.BAD_FIELD, point(fields={"f": -(2**63) - 1})),
    (ErrorCode.BAD_FIELD, point(fields={"f": 10**30})),
    (ErrorCode.BAD_FIELD, point(fields={"f": "s" * 4097})),
    (ErrorCode.BAD_FIELD, point(fields={"f": "a\nb"})),
    (ErrorCode.BAD_FIELD, point(fields={"f": "a\rb"})),
    (ErrorCode.BAD_FIELD, point(fields={"ok": 1.0, "f": "\n"})),
    # bad_time
    (ErrorCode.BAD_TIME, point(ts=MISSING)),
    (ErrorCode.BAD_TIME, point(ts=None)),
    (ErrorCode.BAD_TIME, point(ts=float(TS))),
    (ErrorCode.BAD_TIME, point(ts=TS + 0.5)),
    (ErrorCode.BAD_TIME, point(ts=str(TS))),
    (ErrorCode.BAD_TIME, point(ts=True)),
    (ErrorCode.BAD_TIME, point(ts=[TS])),
    (ErrorCode.BAD_TIME, point(ts=0)),
    (ErrorCode.BAD_TIME, point(ts=-TS)),
    (ErrorCode.BAD_TIME, point(ts=MIN_TS_MS - 1)),
    (ErrorCode.BAD_TIME, point(ts=MAX_TS_MS + 1)),
    (ErrorCode.BAD_TIME, point(ts=TS * 1000)),
    (ErrorCode.BAD_TIME, point(ts=2**64)),
]


@pytest.mark.parametrize(("code", "bad"), POINT_ERRORS, ids=[f"{c}-{i}" for i, (c, _) in enumerate(POINT_ERRORS)])
def test_bad_point_is_refused_with_code_and_seq(code: str, bad: Any) -> None:
    exc = refused(telemetry(point(), bad, seq=77))
    assert exc.code == code
    assert exc.seq == 77
    with pytest.raises(ProtocolError) as info:
        validate_points(json.loads(json.dumps([bad])))
    assert info.value.code == code


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "1E999", "123456789e9999"])
def test_number_literal_overflowing_to_infinity_is_refused(literal: str) -> None:
    # Python's json turns an out-of-range number literal into inf without calling parse_constant;
    # line protocol cannot carry inf, so the hub must refuse it at the edge.
    text = telemetry(point(fields={"f": "LITERAL"}), seq=5).replace('"LITERAL"', literal)
    exc = refused(text)
    assert exc.code in {ErrorCode.BAD_JSON, ErrorCode.BAD_FIELD}


@pytest.mark.parametrize("value", ["\ud800", "a\udfffb", "\udc80"], ids=repr)
def test_string_field_with_lone_surrogate_is_refused(value: str) -> None:
    # A lone surrogate cannot be encoded as UTF-8, so no line-protocol body could carry it.
    exc = refused(telemetry(point(fields={"s": value})))  # json.dumps escapes it as "\ud800"
    assert exc.code in {ErrorCode.BAD_JSON, ErrorCode.BAD_FIELD}


def test_welcome_with_huge_integer_is_a_protocol_error() -> None:
    body = {
        "type": "welcome",
        "device": "d",
        "ack": 0,
        "epoch": 1,
        "window": 1,
        "max_points": 1,
        "ping_interval": 10**400,
        "proto": 1,
    }
    text = json.dumps(body)
    assert refused(text).code in ERROR_CODES


def test_validate_points_refuses_non_string_keys_and_non_lists() -> None:
    for points, code in [
        ([point(fields={1: 1.0})], ErrorCode.BAD_NAME),
        ([point(tags={None: "v"})], ErrorCode.BAD_NAME),
        ((point(),), ErrorCode.BAD_MESSAGE),
        (None, ErrorCode.BAD_MESSAGE),
        ([], ErrorCode.BAD_MESSAGE),
    ]:
        with pytest.raises(ProtocolError) as info:
            validate_points(points)
        assert info.value.code == code, points


def test_seq_is_none_for_errors_outside_telemetry() -> None:
    assert refused('{"type":"ack","seq":0}').seq is None
    assert refused('{"type":"hello","proto":1,"interval":-5}').seq is None
    assert refused("{").seq is None
    exc = refused('{"type":"telemetry","seq":3,"points":[]}')
    assert (exc.code, exc.seq) == (ErrorCode.BAD_MESSAGE, 3)


# ---------------------------------------------------------------------------- limits

SMALL = Limits(max_points=2, max_fields=2, max_tags=1, max_name_len=4, max_tag_value_len=3, max_string_len=5)

LIMIT_CASES = [
    ([point()] * 2, [point()] * 3, ErrorCode.TOO_MANY_POINTS),
    ([point(fields={"a": 1.0, "b": 2.0})], [point(fields={"a": 1.0, "b": 2.0, "c": 3.0})], ErrorCode.BAD_POINT),
    ([point(tags={"a": "b"})], [point(tags={"a": "b", "c": "d"})], ErrorCode.BAD_POINT),
    ([point(measurement="mmmm")], [point(measurement="mmmmm")], ErrorCode.BAD_NAME),
    ([point(fields={"ffff": 1.0})], [point(fields={"fffff": 1.0})], ErrorCode.BAD_NAME),
    ([point(tags={"tttt": "v"})], [point(tags={"ttttt": "v"})], ErrorCode.BAD_NAME),
    ([point(tags={"t": "vvv"})], [point(tags={"t": "vvvv"})], ErrorCode.BAD_TAG),
    ([point(fields={"s": "sssss"})], [point(fields={"s": "ssssss"})], ErrorCode.BAD_FIELD),
]


@pytest.mark.parametrize(
    ("at_limit", "over_limit", "code"),
    LIMIT_CASES,
    ids=["points", "fields", "tags", "measurement_len", "field_key_len", "tag_key_len", "tag_value_len", "string_len"],
)
def test_custom_limits_are_honoured(at_limit: list[Any], over_limit: list[Any], code: str) -> None:
    text_ok = json.dumps({"type": "telemetry", "seq": 1, "points": at_limit})
    text_bad = json.dumps({"type": "telemetry", "seq": 1, "points": over_limit})
    assert isinstance(decode(text_ok, SMALL), Telemetry)
    assert isinstance(decode(text_bad), Telemetry)  # the default limits allow it
    assert refused(text_bad, SMALL).code == code
    with pytest.raises(ProtocolError) as info:
        validate_points(json.loads(text_bad)["points"], SMALL)
    assert info.value.code == code


# ---------------------------------------------------------------------------- detail stays short

HUGE = "x" * 10_000

HUGE_INPUTS = [
    pytest.param(telemetry(point(measurement=HUGE)), id="measurement_10k"),
    pytest.param(telemetry(point(fields={HUGE: 1.0})), id="field_key_10k"),
    pytest.param(telemetry(point(tags={HUGE: "v"})), id="tag_key_10k"),
    pytest.param(telemetry(point(tags={"t": HUGE})), id="tag_value_10k"),
    pytest.param(telemetry(point(fields={"f": HUGE})), id="string_field_10k"),
    pytest.param(telemetry(point(fields={"f": HUGE + "\n"})), id="string_field_10k_newline"),
    pytest.param(telemetry(point(ts=HUGE)), id="ts_10k"),
    pytest.param(telemetry(point(), seq=HUGE), id="seq_10k"),
    pytest.param(json.dumps({"type": HUGE}), id="type_10k"),
    pytest.param(json.dumps({"type": "hello", "proto": 1, "firmware": HUGE}), id="firmware_10k"),
    pytest.param(json.dumps({HUGE: 1}), id="object_key_10k"),
    pytest.param(HUGE, id="garbage_10k"),
    pytest.param(telemetry(point(measurement="_" + "x" * 127)), id="underscore_name_128"),
    pytest.param(telemetry(point(measurement="\x00" * 128)), id="nul_name_128"),
    pytest.param(telemetry(point(fields={"\x01" * 128: 1.0})), id="control_field_key_128"),
    pytest.param(telemetry(point(tags={"\U000e0001" * 128: "v"})), id="astral_control_tag_key_128"),
]


@pytest.mark.parametrize("text", HUGE_INPUTS)
def test_detail_is_bounded(text: str) -> None:
    exc = refused(text)
    assert len(exc.detail) < 300, exc.detail[:80]
    assert len(str(exc)) < 330
    assert "x" * 129 not in exc.detail


# ---------------------------------------------------------------------------- properties

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
KEYS = [
    "type",
    "seq",
    "points",
    "proto",
    "interval",
    "firmware",
    "model",
    "device",
    "ack",
    "epoch",
    "window",
    "max_points",
    "ping_interval",
    "code",
    "detail",
    "measurement",
    "ts",
    "fields",
    "tags",
    "int",
]
point_like = st.dictionaries(st.sampled_from(["measurement", "ts", "fields", "tags", "x"]), json_values, max_size=5)
message_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["hello", "welcome", "telemetry", "ack", "error", "other"])},
    optional={k: json_values for k in KEYS[1:]} | {"points": st.lists(point_like | json_values, max_size=3)},
)


def _decodes_or_refuses(text: str | bytes) -> None:
    try:
        msg = decode(text)
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES
        assert exc.seq is None or type(exc.seq) is int
    else:
        assert isinstance(msg, MESSAGE_TYPES)


@PROPERTY
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_decode_arbitrary_bytes_and_text(data: str | bytes) -> None:
    _decodes_or_refuses(data)


@PROPERTY
@given(json_values | message_like)
def test_decode_arbitrary_json(value: Any) -> None:
    text = json.dumps(value)  # allow_nan: NaN/Infinity appear as bare constants
    _decodes_or_refuses(text)
    _decodes_or_refuses(text.encode())


@st.composite
def _valid_message(draw: st.DrawFn) -> dict[str, Any]:
    """A valid message dict of any type, with one key replaced by an arbitrary value or removed."""
    kind = draw(st.sampled_from(["hello", "welcome", "telemetry", "ack", "error"]))
    body: dict[str, Any] = {
        "hello": {"type": "hello", "proto": 1, "interval": 5.0, "firmware": "f", "model": "m"},
        "welcome": {
            "type": "welcome",
            "device": "d",
            "ack": 0,
            "epoch": 1,
            "window": 1,
            "max_points": 9,
            "ping_interval": 2.0,
            "proto": 1,
        },
        "telemetry": {"type": "telemetry", "seq": 1, "points": [point(tags={"a": "b"})]},
        "ack": {"type": "ack", "seq": 1},
        "error": {"type": "error", "code": "c", "detail": "d", "seq": 1},
    }[kind]
    key = draw(st.sampled_from(sorted(body)))
    if draw(st.booleans()):
        del body[key]
    else:
        body[key] = draw(json_values | st.integers(min_value=-(2**1100), max_value=2**1100))
    return body


@PROPERTY
@given(_valid_message())
def test_decode_mutated_valid_messages(value: dict[str, Any]) -> None:
    _decodes_or_refuses(json.dumps(value))


_PRINTABLE = st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"), exclude_characters="\\")
names = st.text(_PRINTABLE, min_size=1, max_size=12).filter(
    lambda s: s.isprintable() and s[0] != "_" and s != "time"  # "time" is reserved by InfluxDB
)
tag_values = st.text(_PRINTABLE, min_size=1, max_size=20).filter(str.isprintable)
field_values = (
    st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
    | st.integers(INT64_MIN, INT64_MAX)
    | st.builds(int_value, st.integers(INT64_MIN, INT64_MAX))
    | st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"), max_size=30)
)
valid_points = st.fixed_dictionaries(
    {
        "measurement": names.filter(lambda s: s[0] != "#"),  # a line starting with '#' is a comment
        "ts": st.integers(MIN_TS_MS, MAX_TS_MS),
        "fields": st.dictionaries(names, field_values, min_size=1, max_size=6),
    },
    optional={"tags": st.dictionaries(names.filter(lambda s: s != "device"), tag_values, max_size=4)},
)


@PROPERTY
@given(st.integers(1, INT64_MAX), st.lists(valid_points, min_size=1, max_size=5))
def test_valid_points_round_trip(seq: int, points: list[dict[str, Any]]) -> None:
    expected = [
        {
            **p,
            "fields": {k: {"int": v} if type(v) is int else v for k, v in p["fields"].items()},
            "tags": p.get("tags", {}),
        }
        for p in points
    ]
    text = encode(Telemetry(seq, points))
    for wire in (text, text.encode()):
        msg = decode(wire)
        assert isinstance(msg, Telemetry)
        assert msg.seq == seq
        assert msg.points == expected
        for got, want in zip(msg.points, expected, strict=True):
            assert [type(v) for v in got["fields"].values()] == [type(v) for v in want["fields"].values()]


# ---------------------------------------------------------------------------- the orjson fast path


def _outcome(fn: Any, text: str | bytes) -> Any:
    try:
        return ("ok", fn(text))
    except ProtocolError as exc:
        return ("refused", exc.code, exc.detail, exc.seq)


def _reference(text: str | bytes) -> Any:
    """What `decode` answers with the standard library's json alone (as on a device without orjson)."""
    return protocol._decode(protocol._parse(text), DEFAULT_LIMITS)


def test_the_hub_install_has_the_fast_parser() -> None:
    # The test extra installs orjson, so the comparisons below exercise the fast path, not json twice.
    assert protocol._fast_loads is not None


# Integers beyond 64 bits are what orjson reads differently (as floats); each must get json's answer.
BIG = [2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30, -(10**30)]
FAST_PATH_CASES = [
    *(telemetry(point(fields={"f": n})) for n in BIG),
    *(telemetry(point(fields={"f": {"int": n}})) for n in BIG),
    *(telemetry(point(ts=n)) for n in BIG),
    *(telemetry(point(), seq=n) for n in BIG),
    *(telemetry(point(tags={"t": n})) for n in BIG),
    telemetry(point(fields={"f": 1.8446744073709552e19, "g": -9.3e18, "h": 9.2e18})),
    telemetry(point(fields={"f": 1e400})),
    telemetry(point(fields={"f": "\ud800"})),
    json.dumps({"type": "command_result", "id": "c1", "ok": True, "result": {"n": 10**30}}),
    json.dumps({"type": "hello", "proto": 10**30}),
]


@pytest.mark.parametrize("text", FAST_PATH_CASES)
def test_fast_path_answers_as_json_does(text: str) -> None:
    assert _outcome(decode, text) == _outcome(_reference, text)
    assert _outcome(decode, text.encode()) == _outcome(_reference, text.encode())


@PROPERTY
@given(st.integers(1, INT64_MAX), st.lists(valid_points | point_like, min_size=1, max_size=4))
def test_fast_path_answers_as_json_does_for_any_points(seq: int, points: list[Any]) -> None:
    text = json.dumps({"type": "telemetry", "seq": seq, "points": points})
    assert _outcome(decode, text) == _outcome(_reference, text)


@PROPERTY
@given(json_values | message_like)
def test_fast_path_answers_as_json_does_for_any_message(value: Any) -> None:
    text = json.dumps(value)
    assert _outcome(decode, text) == _outcome(_reference, text)


@pytest.mark.parametrize("seq", [1, 7, 10**6, INT64_MAX])
def test_encode_ack_is_the_encoding_of_ack(seq: int) -> None:
    assert encode_ack(seq) == encode(Ack(seq)) == json.dumps({"type": "ack", "seq": seq}, separators=(",", ":"))
