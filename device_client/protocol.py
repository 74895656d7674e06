"""The device wire protocol: message types, limits, and a pure codec (no I/O).

Both the hub and `device_client` import this module. `decode` turns one WebSocket text
frame into a message or raises `ProtocolError(code, detail)`; `encode` turns a message
into the text to send. The spec for outside implementers is `docs/protocol.md`.

Telemetry points stay plain dicts on purpose (``{"measurement", "ts", "fields",
"tags"}``): the hub validates them in place and builds line protocol straight from
them, with no per-point object on the hot path.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, NotRequired, TypeAlias, TypedDict

import attrs

_fast_loads: Callable[[str | bytes], object] | None
try:  # the hub installs orjson (3-4x faster); a device need not: json alone decides the same way
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - depends on the install
    _fast_loads = None

__all__ = [
    "ANSWERS",
    "DEVICE_PATH",
    "HANDSHAKE_ANSWER",
    "JSON",
    "LIMIT_FIELDS",
    "PROTOCOL_VERSION",
    "Ack",
    "Answer",
    "CloseCode",
    "Desired",
    "Error",
    "ErrorCode",
    "FieldValue",
    "Hello",
    "Limits",
    "Message",
    "Point",
    "ProtocolError",
    "Report",
    "ReportAck",
    "Telemetry",
    "Welcome",
    "decode",
    "encode",
    "encode_ack",
    "int_value",
    "is_field_key",
    "validate_points",
]

PROTOCOL_VERSION = 1
DEVICE_PATH = "/v1/device"

#: Smallest and largest accepted point timestamps (ms since the Unix epoch): 2000-01-01 .. 2100-01-01.
MIN_TS_MS = 946_684_800_000
MAX_TS_MS = 4_102_444_800_000
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
RESERVED_TAGS = frozenset({"device"})

#: A JSON value (command args and results): what `json.loads` returns, or anything `json.dumps` writes the same way.
JSON: TypeAlias = Mapping[str, "JSON"] | Sequence["JSON"] | str | int | float | bool | None

#: A field value: float, bool, str, an integer field as on the wire (``{"int": n}``, see `int_value`), or a Python
#: int (the SDK sends it as ``{"int": n}``; in a decoded point it is a plain JSON integer, which means a float).
FieldValue: TypeAlias = float | int | bool | str | dict[str, int]


class Point(TypedDict):
    """A telemetry point, a plain dict on purpose (see the module docstring); `validate_points` checks one."""

    measurement: str
    ts: int  # ms since the Unix epoch
    fields: dict[str, FieldValue]
    tags: NotRequired[dict[str, str]]  # validation puts in {} when it is missing: a checked point always has it


class ErrorCode(enum.StrEnum):
    """Stable error codes carried by `Error` frames (see docs/protocol.md); each is a plain string on the wire."""

    BAD_JSON = "bad_json"  # not JSON, NaN/Infinity, too deeply nested
    BAD_MESSAGE = "bad_message"  # JSON, but not an object with a known "type" and right fields
    BAD_FRAME = "bad_frame"  # a binary frame where text is expected
    NOT_READY = "not_ready"  # telemetry before hello, or a second hello
    UNSUPPORTED_VERSION = "unsupported_version"
    TOO_MANY_POINTS = "too_many_points"
    BAD_POINT = "bad_point"  # a point is not an object with the right keys
    BAD_NAME = "bad_name"  # measurement, tag key or field key not allowed
    RESERVED_TAG = "reserved_tag"  # e.g. a "device" tag: the hub sets it
    BAD_TAG = "bad_tag"  # tag value not allowed
    BAD_FIELD = "bad_field"  # field value of a wrong type, out of range, or too long
    BAD_TIME = "bad_time"  # timestamp missing, not an integer, or out of range
    BAD_SEQ = "bad_seq"  # sequence number missing or out of range
    TOO_MANY_ERRORS = "too_many_errors"
    UNKNOWN_COMMAND = "unknown_command"  # a command ack/result for an id this device was not sent
    BAD_REPORT = "bad_report"  # a twin report refused (patch too large or too deep): dropped, the device goes on
    RATE_LIMITED = "rate_limited"  # informational: over the message/point rate, the hub slows its reading
    TOO_LARGE = "too_large"  # client side: a batch over the hub's frame limit (the hub closes with 1009)
    INTERNAL = "internal"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the hub uses (see docs/protocol.md)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # hub shutting down, or the session was idle too long: reconnect with backoff
    PROTOCOL_ERROR = 1002  # a frame the receiver could not parse (bad opcode, unmasked, bad fragments...)
    UNSUPPORTED_DATA = 1003
    INVALID_DATA = 1007  # a text frame (or close reason) that is not UTF-8; the hub itself answers those bad_json
    POLICY = 1008  # too many protocol errors, hello timeout
    TOO_BIG = 1009  # frame over the size limit
    INTERNAL = 1011
    TRY_LATER = 1013  # over the rate limit for too long: reconnect with backoff
    REPLACED = 4001  # another connection authenticated as the same device
    REVOKED = 4003  # the device's token was revoked while connected


class ProtocolError(Exception):
    """An input the protocol refuses; `code` is stable, `detail` is safe to show the peer.

    `ANSWERS[code]` says how the hub answers it; `seq` names the refused telemetry batch when it was readable.
    """

    def __init__(self, code: ErrorCode | str, detail: str = "", seq: int | None = None) -> None:
        super().__init__(f"{code}: {detail}" if detail else str(code))
        self.code = ErrorCode(code)
        self.detail = detail
        self.seq = seq


@attrs.frozen
class Answer:
    """How the hub answers a refused input: an error frame (`frame`), then a close with `close` unless None."""

    frame: bool = True
    close: CloseCode | None = None


_STAY_OPEN = Answer()

#: The answer to each error code once the session is open (the "session" column of docs/protocol.md's error table).
ANSWERS: dict[ErrorCode, Answer] = {
    **{code: _STAY_OPEN for code in ErrorCode},
    ErrorCode.UNSUPPORTED_VERSION: Answer(close=CloseCode.POLICY),
    ErrorCode.TOO_MANY_ERRORS: Answer(close=CloseCode.POLICY),
    # Found by the WebSocket layer, which closes by itself: no frame can be sent.
    ErrorCode.TOO_LARGE: Answer(frame=False, close=CloseCode.TOO_BIG),
    ErrorCode.INTERNAL: Answer(frame=False, close=CloseCode.INTERNAL),
}
#: Before the welcome, every refused input is answered with its error frame and a close.
HANDSHAKE_ANSWER = Answer(close=CloseCode.POLICY)


@attrs.frozen
class Limits:
    """Validation limits; the hub's are configurable and sent to the device in `Welcome` (same field names)."""

    max_points: int = 5000  # points per telemetry message
    max_fields: int = 100  # fields per point
    max_tags: int = 32  # tags per point
    max_name_len: int = 128  # measurement, tag key, field key
    max_tag_value_len: int = 256
    max_string_len: int = 4096  # string field value


DEFAULT_LIMITS = Limits()
#: The names of the `Limits` fields, each also a field of `Welcome`.
LIMIT_FIELDS = tuple(a.name for a in attrs.fields(Limits))

# ---------------------------------------------------------------------------- messages


@attrs.frozen
class Hello:
    """Device -> hub, first message: who the firmware is and how often it reports."""

    firmware: str = ""
    model: str = ""
    interval: float = 0.0  # declared reporting interval in seconds; 0 = not declared
    proto: int = PROTOCOL_VERSION
    #: The desired twin version the device has applied (0: none yet); None: the device does not use the twin.
    desired_version: int | None = None
    #: Compression schemes offered for telemetry, most preferred first (`device_client.compression`); () = none.
    compress: tuple[str, ...] = ()


@attrs.frozen
class Welcome:
    """Hub -> device, answer to `Hello`: identity, the last durable sequence, session terms, the hub's limits.

    The limits after `proto` are None from a hub that does not send them: the device keeps its own then.
    """

    device: str
    ack: int  # highest sequence the hub has made durable; number new batches above it
    epoch: int  # session epoch: increases with every accepted connection of this device
    window: int  # most unacked telemetry messages the device may have in flight
    max_points: int
    ping_interval: float
    proto: int = PROTOCOL_VERSION
    max_fields: int | None = None
    max_tags: int | None = None
    max_name_len: int | None = None
    max_tag_value_len: int | None = None
    max_string_len: int | None = None
    max_message_bytes: int | None = None  # largest telemetry message, in bytes of UTF-8 JSON
    compress: str | None = None  # the offered compression scheme the hub accepts; None: text frames only

    def limits(self, base: Limits = DEFAULT_LIMITS) -> Limits:
        """`base` with every limit this welcome carries (one missing, or not above 0, stays as in `base`)."""
        given = {name: getattr(self, name) for name in LIMIT_FIELDS}
        return attrs.evolve(base, **{name: value for name, value in given.items() if value is not None and value > 0})


@attrs.frozen
class Telemetry:
    """Device -> hub: one batch of points under a per-device sequence number."""

    seq: int
    points: list[Point] = attrs.field(eq=False)


@attrs.frozen
class Ack:
    """Hub -> device: every telemetry batch with sequence <= `seq` is durable."""

    seq: int


@attrs.frozen
class Error:
    """Hub -> device: an input was refused. `seq` names the refused batch, if any."""

    code: str
    detail: str = ""
    seq: int | None = None
    report: int | None = None  # the refused twin report's id, if any


@attrs.frozen
class Desired:
    """Hub -> device: the desired twin document at `version`: whole (`state`) or as a merge patch on `version` - 1.

    Exactly one of `state` and `patch` is set. Apply it, then `Report` with `desired_version` = `version`.
    """

    version: int
    state: dict[str, JSON] | None = None
    patch: dict[str, JSON] | None = None


@attrs.frozen
class Report:
    """Device -> hub: merge `patch` into the reported twin document; `desired_version` says what is applied.

    `id` grows with each new report; the same report may be sent again after a reconnect (merging is idempotent).
    """

    id: int
    patch: dict[str, JSON]
    desired_version: int | None = None


@attrs.frozen
class ReportAck:
    """Hub -> device: reports up to `id` are stored; the reported document is at `version`."""

    id: int
    version: int


@attrs.frozen
class Command:
    """Hub -> device: run command `name` with `args`; answer `CommandAck` at once, `CommandResult` when done.

    The same `id` may arrive again (after a reconnect or a hub restart): do not run it twice;
    answer the ack again, and the result again if it is known.
    """

    id: str
    name: str
    args: dict[str, JSON]
    timeout: float  # seconds the hub waits for the result after delivery


@attrs.frozen
class CommandAck:
    """Device -> hub: command `id` was received (it is now `delivered`)."""

    id: str


@attrs.frozen
class CommandResult:
    """Device -> hub: command `id` finished; `ok` false means it failed, with `error` saying why."""

    id: str
    ok: bool
    result: JSON = None  # at most MAX_RESULT_BYTES encoded
    error: str = ""


Message = (
    Hello | Welcome | Telemetry | Ack | Error | Command | CommandAck | CommandResult | Desired | Report | ReportAck
)

#: The optional limit fields of `Welcome`.
_WELCOME_LIMITS = (*(name for name in LIMIT_FIELDS if name != "max_points"), "max_message_bytes")

_TYPE_NAMES: dict[type, str] = {
    Hello: "hello",
    Welcome: "welcome",
    Telemetry: "telemetry",
    Ack: "ack",
    Error: "error",
    Command: "command",
    CommandAck: "command_ack",
    CommandResult: "command_result",
    Desired: "desired",
    Report: "report",
    ReportAck: "report_ack",
}

#: Longest command id, command name, and result error text.
MAX_ID_LEN = 64
MAX_COMMAND_NAME_LEN = 64
MAX_ERROR_LEN = 1024
#: Most compression schemes a hello may offer (each name at most 32 characters).
MAX_COMPRESS_OFFERS = 8
#: Largest encoded command `args` or `result` (bytes of JSON).
MAX_ARGS_BYTES = 16 * 1024
MAX_RESULT_BYTES = 16 * 1024

# ---------------------------------------------------------------------------- encoding


def int_value(n: int) -> dict[str, int]:
    """Wire form of an integer field value: plain JSON numbers are always floats."""
    return {"int": n}


def _wire_value(v: FieldValue) -> FieldValue:
    # Python ints become explicit integer fields; bool is an int subclass, keep it bool.
    if isinstance(v, int) and not isinstance(v, bool):
        return {"int": v}
    return v


def _wire_point(p: Point) -> Point:
    fields = p["fields"]
    if any(type(v) is int for v in fields.values()):
        p = {**p, "fields": {k: _wire_value(v) for k, v in fields.items()}}
    return p


def encode_ack(seq: int) -> str:
    """`encode(Ack(seq))`, without building the message (the hub sends one per device per durable batch)."""
    return f'{{"type":"ack","seq":{int(seq)}}}'


def encode(msg: Message) -> str:
    """The JSON text of one message, compact, ready for a WebSocket text frame."""
    if type(msg) is Ack:
        return encode_ack(msg.seq)
    if type(msg) is Command:  # the hub writes one per command: its fields as they are, no recursive copy
        body: dict[str, object] = {
            "type": "command",
            "id": msg.id,
            "name": msg.name,
            "args": msg.args,
            "timeout": msg.timeout,
        }
        return json.dumps(body, separators=(",", ":"), allow_nan=False)
    kind = _TYPE_NAMES[type(msg)]
    if isinstance(msg, Telemetry):
        body = {
            "type": kind,
            "seq": msg.seq,
            "points": [_wire_point(p) for p in msg.points],
        }
    else:
        body = {"type": kind, **attrs.asdict(msg)}
        if isinstance(msg, Error | Hello | Desired | Report | Welcome):
            body = {key: value for key, value in body.items() if value is not None}
            if isinstance(msg, Hello) and not msg.compress:
                del body["compress"]  # what a device that offers nothing has always sent
        elif isinstance(msg, CommandResult):
            if msg.ok:
                del body["error"]
            if msg.result is None:
                del body["result"]
    return json.dumps(body, separators=(",", ":"), allow_nan=False)


# ---------------------------------------------------------------------------- decoding


def _reject_constant(name: str) -> NoReturn:
    raise ProtocolError(ErrorCode.BAD_JSON, f"{name} is not allowed")


def _parse(text: str | bytes) -> dict[str, JSON]:
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError(ErrorCode.BAD_JSON, "nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(ErrorCode.BAD_JSON, "not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a message is a JSON object")
    return obj


def _get(obj: dict[str, JSON], key: str, kind: type | tuple[type, ...], default: object = ...) -> Any:
    # Untyped: the value is of `kind` (or `default`), which the caller's field declares.
    value = obj.get(key, default)
    if value is ...:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"missing {key!r}")
    if value is default:
        return value
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{key!r} has the wrong type")
    return value


def _float(value: float, key: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{key!r} out of range") from None


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _command_id(obj: dict[str, JSON]) -> str:
    cid = obj.get("id")
    if type(cid) is not str or not 0 < len(cid) <= MAX_ID_LEN or not cid.isprintable():
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"id must be a string of 1..{MAX_ID_LEN} printable characters")
    return cid


def check_command_name(name: object) -> str:
    """A command name: 1..64 of A-Z a-z 0-9 _ . - (raises `ProtocolError` otherwise)."""
    if (
        type(name) is not str
        or not 0 < len(name) <= MAX_COMMAND_NAME_LEN
        or not name.isascii()
        or not name.replace("_", "a").replace(".", "a").replace("-", "a").isalnum()
    ):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a command name is 1..64 of A-Z a-z 0-9 _ . -")
    return name


def json_size(value: object) -> int:
    """Bytes of `value` as compact JSON (for the args/result bounds)."""
    return len(json.dumps(value, separators=(",", ":"), allow_nan=False).encode())


def _version(obj: dict[str, JSON], key: str, least: int, default: object = ...) -> Any:
    """An integer from `least` to 2**63-1 under `key` (`default` when missing, if given)."""
    value = obj.get(key, default)
    if value is default and default is not ...:
        return value
    if type(value) is not int or not least <= value <= INT64_MAX:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{key!r} must be an integer from {least} to 2**63-1")
    return value


def _seq(obj: dict[str, JSON]) -> int:
    seq = obj.get("seq")
    if type(seq) is not int or not 0 < seq <= INT64_MAX:
        raise ProtocolError(ErrorCode.BAD_SEQ, "seq must be an integer from 1 to 2**63-1")
    return seq


def is_field_key(name: str, limits: Limits = DEFAULT_LIMITS) -> bool:
    """Whether `name` may be a field key (docs/protocol.md, "Names")."""
    try:
        _check_name(name, "field key", limits)
    except ProtocolError:
        return False
    return True


def _check_name(name: object, what: str, limits: Limits) -> str:
    """`name`, if it is a name the hub takes as `what`."""
    if type(name) is not str or not name:
        raise ProtocolError(ErrorCode.BAD_NAME, f"{what} must be a non-empty string")
    if len(name) > limits.max_name_len:
        raise ProtocolError(ErrorCode.BAD_NAME, f"{what} longer than {limits.max_name_len}")
    if name == "time":
        raise ProtocolError(ErrorCode.BAD_NAME, f"{what} 'time' is reserved by InfluxDB")
    if name[0] == "_":
        raise ProtocolError(ErrorCode.BAD_NAME, f"{what} {name[:20]!r} starts with '_' (reserved)")
    if not name.isprintable() or "\\" in name:
        raise ProtocolError(ErrorCode.BAD_NAME, f"{what} {name[:20]!r} has a control character or backslash")
    return name


def _check_tag_value(value: object, key: str, limits: Limits) -> None:
    if type(value) is not str or not value:
        raise ProtocolError(ErrorCode.BAD_TAG, f"tag {key!r} must be a non-empty string")
    if len(value) > limits.max_tag_value_len:
        raise ProtocolError(ErrorCode.BAD_TAG, f"tag {key!r} longer than {limits.max_tag_value_len}")
    if not value.isprintable() or "\\" in value:
        raise ProtocolError(ErrorCode.BAD_TAG, f"tag {key!r} has a control character or backslash")


def _check_field_value(value: Any, key: str, limits: Limits) -> None:
    # Untyped: dispatches on type(value) held in a local, as the hot loop in `_validate_points` does.
    t = type(value)
    if t is float:
        # parse_constant refuses NaN/Infinity literals; 1e400 still parses to inf.
        if not math.isfinite(value):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"field {key!r} is out of range")
        return
    if t is bool:
        return
    if t is int:
        if not INT64_MIN <= value <= INT64_MAX:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"field {key!r} out of range")
        return
    if t is str:
        if len(value) > limits.max_string_len:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"field {key!r} longer than {limits.max_string_len}")
        if "\n" in value or "\r" in value:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"field {key!r} has a line break")
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                raise ProtocolError(ErrorCode.BAD_FIELD, f"field {key!r} is not valid Unicode") from None
        return
    if t is dict and len(value) == 1 and type(value.get("int")) is int:
        if not INT64_MIN <= value["int"] <= INT64_MAX:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"field {key!r} outside the int64 range")
        return
    raise ProtocolError(ErrorCode.BAD_FIELD, f'field {key!r} must be a number, boolean, string or {{"int": n}}')


#: Accepted names and tag values remembered per `Limits` (the checks are pure): this many of each, then forgotten.
KNOWN_NAMES_MAX = 4096


#: orjson reads an integer literal beyond the 64-bit range as a float, always of at least this magnitude.
_INT_AS_FLOAT = 2.0**63


class _Inexact(Exception):
    """A value orjson may have changed (an integer beyond 64 bits read as a float): parse again with json."""


@attrs.define
class _Known:
    """Strings that already passed a check under one `Limits`, so repeated names cost a set lookup."""

    measurements: set[str] = attrs.Factory(set)
    field_keys: set[str] = attrs.Factory(set)
    tag_keys: set[str] = attrs.Factory(set)
    tag_values: set[str] = attrs.Factory(set)


_known_by_limits: dict[Limits, _Known] = {}


def _remember(known: set[str], value: str) -> None:
    if len(known) >= KNOWN_NAMES_MAX:
        known.clear()
    known.add(value)


def _check_measurement(measurement: object, limits: Limits) -> str:
    name = _check_name(measurement, "measurement", limits)
    if name[0] == "#":
        raise ProtocolError(ErrorCode.BAD_NAME, "a measurement may not start with '#' (a comment in line protocol)")
    return name


def _check_tag_key(key: str, limits: Limits) -> None:
    _check_name(key, "tag key", limits)
    if key in RESERVED_TAGS:
        raise ProtocolError(ErrorCode.RESERVED_TAG, f"tag {key!r} is set by the hub")


def validate_points(points: object, limits: Limits = DEFAULT_LIMITS) -> list[Point]:
    """Check a telemetry `points` list in place and return it, or raise `ProtocolError`.

    After this, each point has `measurement` (str), `ts` (int ms), `fields` (a non-empty
    dict of float | bool | str | int | {"int": n}) and `tags` (a dict, maybe empty).
    A plain JSON integer in `fields` means a float: see `int_value`.
    """
    return _validate_points(points, limits, exact=True)


def _validate_points(points: object, limits: Limits, *, exact: bool) -> list[Point]:
    # `exact=False`: the points came from orjson, which reads integers beyond 64 bits as floats; any value where
    # that could matter raises `_Inexact` instead of being judged.
    if type(points) is not list or not points:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "points must be a non-empty list")
    if len(points) > limits.max_points:
        raise ProtocolError(ErrorCode.TOO_MANY_POINTS, f"more than {limits.max_points} points")
    known = _known_by_limits.get(limits)
    if known is None:
        known = _known_by_limits[limits] = _Known()
    measurements, field_keys, tag_keys, tag_values = (
        known.measurements,
        known.field_keys,
        known.tag_keys,
        known.tag_values,
    )
    max_fields, isfinite = limits.max_fields, math.isfinite
    for p in points:
        if type(p) is not dict:
            raise ProtocolError(ErrorCode.BAD_POINT, "a point is a JSON object")
        measurement = p.get("measurement")
        if type(measurement) is not str or measurement not in measurements:
            _remember(measurements, _check_measurement(measurement, limits))
        ts = p.get("ts")
        if type(ts) is not int or not MIN_TS_MS <= ts <= MAX_TS_MS:
            raise ProtocolError(ErrorCode.BAD_TIME, "ts must be integer milliseconds between 2000 and 2100")
        fields = p.get("fields")
        if type(fields) is not dict or not fields:
            raise ProtocolError(ErrorCode.BAD_POINT, "fields must be a non-empty object")
        if len(fields) > max_fields:
            raise ProtocolError(ErrorCode.BAD_POINT, f"more than {max_fields} fields")
        for key, value in fields.items():
            if key not in field_keys:
                _check_name(key, "field key", limits)
                _remember(field_keys, key)
            if type(value) is float and isfinite(value) and (exact or -_INT_AS_FLOAT < value < _INT_AS_FLOAT):
                continue
            if not exact and (type(value) is float or (type(value) is dict and type(value.get("int")) is float)):
                raise _Inexact
            _check_field_value(value, key, limits)
        tags = p.get("tags")
        if tags is None:
            p["tags"] = {}
        elif type(tags) is not dict:
            raise ProtocolError(ErrorCode.BAD_POINT, "tags must be an object")
        elif tags:
            if len(tags) > limits.max_tags:
                raise ProtocolError(ErrorCode.BAD_POINT, f"more than {limits.max_tags} tags")
            for key, value in tags.items():
                if key not in tag_keys:
                    _check_tag_key(key, limits)
                    _remember(tag_keys, key)
                if type(value) is not str or value not in tag_values:
                    _check_tag_value(value, key, limits)
                    _remember(tag_values, value)
        if len(p) > 4 and not p.keys() <= {"measurement", "ts", "fields", "tags"}:
            raise ProtocolError(ErrorCode.BAD_POINT, "unknown key in point")
    return points


def decode(text: str | bytes, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse one text frame into a message; raise `ProtocolError` for anything refused.

    Telemetry points are validated with `limits`; a refused batch carries its `seq` on
    the error when the seq itself was readable.
    """
    if _fast_loads is not None:
        try:
            fast = _fast_loads(text)
        except ValueError:
            fast = None  # refused: the json parse below says how
        # Telemetry is the hot path; every other message is parsed by json (exact integers in command results).
        if type(fast) is dict and fast.get("type") == "telemetry":
            try:
                return _telemetry(fast, limits, exact=False)
            except _Inexact:
                pass
    return _decode(_parse(text), limits)


def _telemetry(obj: dict[str, JSON], limits: Limits, *, exact: bool) -> Telemetry:
    seq = _seq(obj)
    try:
        return Telemetry(seq, _validate_points(obj.get("points"), limits, exact=exact))
    except ProtocolError as exc:
        exc.seq = seq
        raise


def _decode(obj: dict[str, JSON], limits: Limits) -> Message:
    kind = obj.get("type")
    if kind == "telemetry":
        return _telemetry(obj, limits, exact=True)
    if kind == "ack":
        return Ack(_seq(obj))
    if kind == "hello":
        proto = _get(obj, "proto", int)
        interval = _get(obj, "interval", (int, float), 0.0)
        if not 0 <= interval <= 86_400 * 7:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "interval must be 0..604800 seconds")
        firmware = _get(obj, "firmware", str, "")
        model = _get(obj, "model", str, "")
        if len(firmware) > 64 or len(model) > 64:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "firmware and model are at most 64 characters")
        compress = _get(obj, "compress", list, [])
        if len(compress) > MAX_COMPRESS_OFFERS or not all(type(c) is str and len(c) <= 32 for c in compress):
            detail = f"compress must be a list of at most {MAX_COMPRESS_OFFERS} scheme names"
            raise ProtocolError(ErrorCode.BAD_MESSAGE, detail)
        desired_version = _version(obj, "desired_version", 0, None)
        return Hello(firmware, model, float(interval), proto, desired_version, tuple(compress))
    if kind == "welcome":
        return Welcome(
            device=_get(obj, "device", str),
            ack=_get(obj, "ack", int),
            epoch=_get(obj, "epoch", int),
            window=_get(obj, "window", int),
            max_points=_get(obj, "max_points", int),
            ping_interval=_float(_get(obj, "ping_interval", (int, float)), "ping_interval"),
            proto=_get(obj, "proto", int),
            **{key: _get(obj, key, int, None) for key in _WELCOME_LIMITS},
            compress=_get(obj, "compress", str, None),
        )
    if kind == "command_ack":
        return CommandAck(_command_id(obj))
    if kind == "command_result":
        cid = _command_id(obj)
        ok = _get(obj, "ok", bool)
        error = _get(obj, "error", str, "")[:MAX_ERROR_LEN]
        result = obj.get("result")
        if result is not None and json_size(result) > MAX_RESULT_BYTES:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"result larger than {MAX_RESULT_BYTES} bytes of JSON")
        return CommandResult(cid, ok, result, error)
    if kind == "command":
        args = _get(obj, "args", dict, None)
        return Command(
            id=_command_id(obj),
            name=check_command_name(obj.get("name")),
            args={} if args is None else args,
            timeout=_float(_get(obj, "timeout", (int, float)), "timeout"),
        )
    if kind == "error":
        seq, report = obj.get("seq"), obj.get("report")
        return Error(
            code=_get(obj, "code", str),
            detail=_get(obj, "detail", str, ""),
            seq=seq if type(seq) is int else None,
            report=report if type(report) is int else None,
        )
    if kind == "report":
        return Report(_version(obj, "id", 1), _get(obj, "patch", dict), _version(obj, "desired_version", 0, None))
    if kind == "report_ack":
        return ReportAck(_version(obj, "id", 1), _version(obj, "version", 0))
    if kind == "desired":
        state, patch = _get(obj, "state", dict, None), _get(obj, "patch", dict, None)
        if (state is None) == (patch is None):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "desired carries either 'state' or 'patch'")
        return Desired(_version(obj, "version", 1), state, patch)
    raise ProtocolError(ErrorCode.BAD_MESSAGE, "unknown or missing message type")
