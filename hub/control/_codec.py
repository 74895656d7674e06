"""The control channel's codec (docs/control.md): one table of requests, and the frames both ends send. No I/O.

`REQUESTS` maps each request type to its `RequestSpec`: the request class (a frozen attrs class whose fields are the
request's arguments, with the checks the hub makes on them), the least role allowed to make it, and the shape of its
reply. The hub decodes with `read_frame` -> `lookup` -> `RequestSpec.decode` (or all three: `decode_request`) and
answers with `encode_reply` / `encode_error`; `ControlClient` builds request objects and sends `encode_request`;
`hubctl request TYPE K=V...` reaches any type in the table. A refusal is a `ControlError` (`hub.control_codes`).

Adding a request: one `RequestSpec` entry in `REQUESTS` (with its class here), one handler in
`hub/control/_operations.py` (`@_handles(TheClass)`; `_server.py` for one bound to a session), and its row in
docs/control.md (a REST route: hub/web/_rest.py `ENDPOINTS` and docs/rest.md). `ControlClient.call(TheClass(...))`
and `hubctl request` can use it at once; a typed `ControlClient` method is a one-line convenience.
"""

from __future__ import annotations

import builtins
import enum
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, NoReturn, TypeAlias, TypedDict

import attrs
import msgspec

from device_client.protocol import JSON
from hub.control_codes import ANSWERS, TOPICS, Answer, ControlError, ErrorCode
from hub.edge import has_bad_utf8
from hub.fleet import (
    COMMAND_STATES,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_RATE,
    DEVICE_STATES,
    JOB_DEVICE_STATES,
    JOB_STATES,
    BadLabel,
    CommandRecordDict,
    DeviceDetail,
    DeviceOutcomeDict,
    DeviceSummary,
    JobRecordDict,
    Rollout,
    TwinDict,
    check_label_key,
    check_labels,
    parse_action,
    parse_selector,
)

__all__ = [
    "ANSWERS",
    "DEFAULT_LIMIT",
    "DEFAULT_WAIT_TIMEOUT",
    "MAX_LIMIT",
    "MAX_WAIT_TIMEOUT",
    "REQUESTS",
    "TOPICS",
    "Answer",
    "CancelCommand",
    "Command",
    "Commands",
    "ControlError",
    "Device",
    "DeviceAdd",
    "DeviceLabel",
    "DeviceLabels",
    "DeviceRevoke",
    "DeviceRotate",
    "Devices",
    "ErrorCode",
    "Frame",
    "Job",
    "JobCancel",
    "JobCreate",
    "JobDetail",
    "Jobs",
    "Ping",
    "Reply",
    "Request",
    "RequestSpec",
    "SendCommand",
    "Status",
    "Subscribe",
    "Twin",
    "TwinSet",
    "Unsubscribe",
    "decode_auth",
    "decode_request",
    "encode_auth",
    "encode_auth_invalid",
    "encode_auth_ok",
    "encode_auth_required",
    "encode_dropped",
    "encode_error",
    "encode_event",
    "encode_reply",
    "encode_request",
    "lookup",
    "read_frame",
    "spec_for",
]

#: Default and largest `limit` of `commands`.
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
#: Default and largest `wait_timeout` of `send_command`, in seconds.
DEFAULT_WAIT_TIMEOUT = 30.0
MAX_WAIT_TIMEOUT = 3600.0

_Validator: TypeAlias = Callable[[object, "attrs.Attribute[Any]", object], None]


# ---------------------------------------------------------------------------- field checks


def _typed(
    *kinds: type, optional: bool = False, code: ErrorCode = ErrorCode.BAD_REQUEST, message: str = ""
) -> _Validator:
    """The value is one of `kinds` (a bool is never taken for a number), or None when `optional`."""

    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is None and optional:
            return
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ControlError(code, message or f"{attribute.name!r} has the wrong type")

    return check


def _one_of(choices: Sequence[str]) -> _Validator:
    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is not None and value not in choices:
            raise ControlError(ErrorCode.BAD_REQUEST, f"{attribute.name} must be one of {', '.join(choices)}")

    return check


def _seconds(value: object) -> object:
    """An integer number of seconds as a float (the hub's records show floats); anything else as it is."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # a JSON integer of hundreds of digits: out of any range, not an internal error
            return math.inf if value > 0 else -math.inf
    return value


def _names(value: object) -> object:
    return tuple(value) if isinstance(value, list | tuple) else value


def _limit_range(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= MAX_LIMIT:
        raise ControlError(ErrorCode.BAD_REQUEST, f"limit must be 1..{MAX_LIMIT}")


def _wait_range(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0 < value <= MAX_WAIT_TIMEOUT:
        raise ControlError(ErrorCode.BAD_REQUEST, f"wait_timeout must be in (0, {MAX_WAIT_TIMEOUT:g}] seconds")


def _device_list(_: object, attribute: attrs.Attribute[Any], value: tuple[object, ...] | None) -> None:
    if value is not None and (not value or not all(isinstance(d, str) for d in value)):
        raise ControlError(ErrorCode.BAD_REQUEST, "devices must be a non-empty list of names (or null for all)")


def _labels(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        try:
            check_labels(value)
        except BadLabel as exc:
            raise ControlError(ErrorCode.BAD_LABEL, f"{attribute.name}: {exc}") from None


def _label_keys(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        if not isinstance(value, tuple) or not all(isinstance(key, str) for key in value):
            raise ControlError(ErrorCode.BAD_REQUEST, f"{attribute.name} must be a list of label keys")
        try:
            for key in value:
                check_label_key(key)
        except BadLabel as exc:
            raise ControlError(ErrorCode.BAD_LABEL, f"{attribute.name}: {exc}") from None


def _selector(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        try:
            parse_selector(value)
        except BadLabel as exc:
            raise ControlError(ErrorCode.BAD_LABEL, str(exc)) from None


# These return attrs.field's declaration, typed as attrs types it, so the annotated attribute keeps its own type.
def _name() -> Any:
    return attrs.field(validator=_typed(str))


def _optional_str(*more: _Validator) -> Any:
    return attrs.field(default=None, validator=[_typed(str, optional=True), *more])


def _optional_selector() -> Any:
    return _optional_str(_selector)


def _optional_seconds() -> Any:
    return attrs.field(default=None, converter=_seconds, validator=_typed(int, float, optional=True))


# ---------------------------------------------------------------------------- requests
# One frozen class per request type; fields are its arguments, checked in the order they are declared. A field with a
# default is optional on the wire: missing or null means the default.


@attrs.frozen
class Request:
    """Base of the request classes."""


@attrs.frozen
class Ping(Request):
    """An application-level ping; answered with a `pong` frame."""


@attrs.frozen
class Status(Request):
    """The hub's figures."""


@attrs.frozen(kw_only=True)
class Devices(Request):
    """Device summaries, optionally only those in `state` (online, late, offline, never) and those whose labels match
    `selector` (hub.fleet.parse_selector)."""

    state: str | None = _optional_str(_one_of(DEVICE_STATES))
    selector: str | None = _optional_selector()


@attrs.frozen(kw_only=True)
class Device(Request):
    """One device: its summary, latest values and recent commands."""

    name: str = _name()


@attrs.frozen(kw_only=True)
class Commands(Request):
    """Command records, newest first."""

    device: str | None = _optional_str()
    state: str | None = _optional_str(_one_of(COMMAND_STATES))
    limit: int = attrs.field(default=DEFAULT_LIMIT, validator=[_typed(int), _limit_range])


@attrs.frozen(kw_only=True)
class Command(Request):
    """One command record."""

    command_id: str = _name()


@attrs.frozen(kw_only=True)
class SendCommand(Request):
    """Queue command `name` for `device`; with `wait`, the reply comes once it is final (or at `wait_timeout`).

    Its name, `args` size, `ttl`, `timeout` and `idempotency_key` length are checked by the command service, against
    the hub's configuration. (`wait` is declared, so checked, first: as the hub always has.)
    """

    wait: bool = attrs.field(default=False, validator=_typed(bool))
    device: str = _name()
    name: str = _name()
    args: dict[str, JSON] | None = attrs.field(
        default=None,
        validator=_typed(dict, optional=True, code=ErrorCode.BAD_COMMAND, message="args must be an object"),
    )
    ttl: float | None = _optional_seconds()
    timeout: float | None = _optional_seconds()
    idempotency_key: str | None = _optional_str()
    wait_timeout: float = attrs.field(
        default=DEFAULT_WAIT_TIMEOUT, converter=_seconds, validator=[_typed(int, float), _wait_range]
    )


@attrs.frozen(kw_only=True)
class CancelCommand(Request):
    """Cancel a command still queued or sent."""

    command_id: str = _name()


@attrs.frozen(kw_only=True)
class Subscribe(Request):
    """Push the events of `topic` for `devices` (None: all) whose labels match `selector` when the subscription is
    made (None: any labels)."""

    topic: str = attrs.field(validator=[_typed(str), _one_of(TOPICS)])
    devices: tuple[str, ...] | None = attrs.field(
        default=None, converter=_names, validator=[_typed(tuple, optional=True), _device_list]
    )
    selector: str | None = _optional_selector()


@attrs.frozen(kw_only=True)
class Unsubscribe(Request):
    """End one of this session's subscriptions."""

    subscription: int = attrs.field(validator=_typed(int))


@attrs.frozen(kw_only=True)
class DeviceAdd(Request):
    """Register a device, with `labels` (key -> value) if given; the reply holds its token."""

    name: str = _name()
    labels: dict[str, str] | None = attrs.field(default=None, validator=[_typed(dict, optional=True), _labels])


@attrs.frozen(kw_only=True)
class DeviceLabel(Request):
    """Remove the label keys `remove` of a device, then set the labels `set`; the reply holds its labels now."""

    name: str = _name()
    set: dict[str, str] | None = attrs.field(default=None, validator=[_typed(dict, optional=True), _labels])
    remove: tuple[str, ...] | None = attrs.field(default=None, converter=_names, validator=_label_keys)

    def __attrs_post_init__(self) -> None:
        if not self.set and not self.remove:
            raise ControlError(ErrorCode.BAD_REQUEST, "give labels to set, keys to remove, or both")


@attrs.frozen(kw_only=True)
class DeviceRevoke(Request):
    """Revoke a device's token; its open session is closed with 4003."""

    name: str = _name()


@attrs.frozen(kw_only=True)
class DeviceRotate(Request):
    """Give a device a new token; the reply holds it."""

    name: str = _name()


@attrs.frozen(kw_only=True)
class Twin(Request):
    """A device's twin: desired and reported documents with their versions, the applied version, the delta."""

    device: str = _name()


@attrs.frozen(kw_only=True)
class TwinSet(Request):
    """Merge `patch` (a JSON merge patch, RFC 7386) into the device's desired document; with `if_version`, only if
    the desired document is at that version now (else `version_conflict`). The reply is the twin after it."""

    device: str = _name()
    patch: dict[str, JSON] = attrs.field(validator=_typed(dict, message="patch must be a JSON object"))
    if_version: int | None = attrs.field(default=None, validator=_typed(int, optional=True))


def _action(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    parse_action(value)


def _offset_range(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ControlError(ErrorCode.BAD_REQUEST, "offset must be 0 or more")


@attrs.frozen(kw_only=True)
class JobCreate(Request):
    """Apply `action` to every device `selector` matches now: at most `rate` devices started per second and
    `max_in_flight` at once; abort when more than `abort_percent` % of the outcomes so far failed (docs/control.md,
    "Jobs")."""

    selector: str = attrs.field(validator=[_typed(str), _selector])
    action: dict[str, JSON] = attrs.field(validator=[_typed(dict, message="action must be an object"), _action])
    rate: float = attrs.field(default=DEFAULT_RATE, converter=_seconds, validator=_typed(int, float))
    max_in_flight: int = attrs.field(default=DEFAULT_MAX_IN_FLIGHT, validator=_typed(int))
    abort_percent: float | None = _optional_seconds()

    def __attrs_post_init__(self) -> None:
        self.rollout()  # checks the three together, as the job keeps them

    def rollout(self) -> Rollout:
        """The job's rollout; ControlError(bad_request) if a value is out of range."""
        return Rollout(self.rate, self.max_in_flight, self.abort_percent)


@attrs.frozen(kw_only=True)
class Jobs(Request):
    """Job records, newest first."""

    state: str | None = _optional_str(_one_of(JOB_STATES))
    limit: int = attrs.field(default=DEFAULT_LIMIT, validator=[_typed(int), _limit_range])


@attrs.frozen(kw_only=True)
class Job(Request):
    """One job: its record with progress counts, and up to `limit` of its devices from `offset` (in rollout order),
    only those in `state` if given."""

    job_id: str = _name()
    state: str | None = _optional_str(_one_of(JOB_DEVICE_STATES))
    limit: int = attrs.field(default=DEFAULT_LIMIT, validator=[_typed(int), _limit_range])
    offset: int = attrs.field(default=0, validator=[_typed(int), _offset_range])


@attrs.frozen(kw_only=True)
class JobCancel(Request):
    """Cancel a running job: pending devices are cancelled, commands still queued or sent are cancelled."""

    job_id: str = _name()


class JobDetail(JobRecordDict):
    """The `job` reply: the job record and a page of its devices."""

    devices: list[DeviceOutcomeDict]
    offset: int


class IngestCounts(TypedDict):
    """The `status` reply's ingest figures."""

    points_in: int
    points_written: int
    points_spooled: int
    points_replayed: int
    points_dropped: int
    spool_bytes: int
    sink_up: bool


class HubStatus(TypedDict):
    """The `status` reply: the hub's figures."""

    version: str
    uptime: float
    connections: int
    devices: dict[str, int]  # online, late, offline (devices seen since the hub started), registered
    ingest: IngestCounts
    commands: dict[str, int]  # state -> count, only states that have commands
    control_sessions: int


class Subscribed(TypedDict):
    """The `subscribe` reply."""

    subscription: int


class NewToken(TypedDict):
    """The `device_add` and `device_rotate` reply (the token is shown only this once)."""

    name: str
    token: str


class DeviceLabels(TypedDict):
    """The `device_label` reply: the device's labels after the change."""

    name: str
    labels: dict[str, str]


class Empty(TypedDict):
    """The `unsubscribe` and `device_revoke` reply: ``{}``."""


#: A successful request's `result`, by its `Reply` (None for a pong).
Result: TypeAlias = (
    HubStatus
    | list[DeviceSummary]
    | DeviceDetail
    | list[CommandRecordDict]
    | CommandRecordDict
    | Subscribed
    | NewToken
    | DeviceLabels
    | TwinDict
    | Empty
    | JobRecordDict
    | list[JobRecordDict]
    | JobDetail
    | None
)


class Reply(enum.Enum):
    """The shape of a request's answer when it succeeds (docs/control.md, "Requests and replies")."""

    PONG = "a pong frame, not a result"
    STATUS = "the hub's figures"
    SUMMARIES = "a list of device summaries"
    DETAIL = "a device summary with latest and commands"
    RECORDS = "a list of command records"
    RECORD = "a command record"
    SUBSCRIPTION = '{"subscription": S}'
    TOKEN = '{"name", "token"}'
    LABELS = '{"name", "labels"}'
    TWIN = "a device twin"
    EMPTY = "{}"
    JOB = "a job record"
    JOBS = "a list of job records"
    JOB_DETAIL = "a job record with a page of its devices"

    @property
    def json_type(self) -> type | None:
        """The JSON type of the `result` (list or dict); None for a pong, which has none."""
        if self is Reply.PONG:
            return None
        return list if self in (Reply.SUMMARIES, Reply.RECORDS, Reply.JOBS) else dict


_MISSING: Final = object()


@attrs.frozen
class RequestSpec:
    """One request type: its class, the least role that may make it, the shape of its reply."""

    type: str
    request: builtins.type[Request]
    role: str  # viewer < operator < admin (hub.fleet.ROLES)
    reply: Reply

    def decode(self, body: Mapping[str, object]) -> Request:
        """The request from the JSON object `body`; ControlError (bad_request, bad_command) if an argument is bad."""
        given = {}
        for field in attrs.fields(self.request):
            value = body.get(field.name, _MISSING)
            if value is _MISSING or (value is None and field.default is not attrs.NOTHING):
                if field.default is attrs.NOTHING:
                    raise ControlError(ErrorCode.BAD_REQUEST, f"missing {field.name!r}")
                continue
            given[field.name] = value
        return self.request(**given)


def _table(specs: Iterable[RequestSpec]) -> dict[str, RequestSpec]:
    table: dict[str, RequestSpec] = {}
    for spec in specs:
        assert spec.type not in table and spec.request not in {s.request for s in table.values()}, spec
        table[spec.type] = spec
    return table


#: Every request type of the control channel.
REQUESTS: Mapping[str, RequestSpec] = _table(
    [
        RequestSpec("ping", Ping, "viewer", Reply.PONG),
        RequestSpec("status", Status, "viewer", Reply.STATUS),
        RequestSpec("devices", Devices, "viewer", Reply.SUMMARIES),
        RequestSpec("device", Device, "viewer", Reply.DETAIL),
        RequestSpec("commands", Commands, "viewer", Reply.RECORDS),
        RequestSpec("command", Command, "viewer", Reply.RECORD),
        RequestSpec("send_command", SendCommand, "operator", Reply.RECORD),
        RequestSpec("cancel_command", CancelCommand, "operator", Reply.RECORD),
        RequestSpec("subscribe", Subscribe, "viewer", Reply.SUBSCRIPTION),
        RequestSpec("unsubscribe", Unsubscribe, "viewer", Reply.EMPTY),
        RequestSpec("device_add", DeviceAdd, "admin", Reply.TOKEN),
        RequestSpec("device_revoke", DeviceRevoke, "admin", Reply.EMPTY),
        RequestSpec("device_rotate", DeviceRotate, "admin", Reply.TOKEN),
        RequestSpec("device_label", DeviceLabel, "admin", Reply.LABELS),
        RequestSpec("twin", Twin, "viewer", Reply.TWIN),
        RequestSpec("twin_set", TwinSet, "operator", Reply.TWIN),
        RequestSpec("job_create", JobCreate, "operator", Reply.JOB),
        RequestSpec("jobs", Jobs, "viewer", Reply.JOBS),
        RequestSpec("job", Job, "viewer", Reply.JOB_DETAIL),
        RequestSpec("job_cancel", JobCancel, "operator", Reply.JOB),
    ]
)
_BY_CLASS: Mapping[type[Request], RequestSpec] = {spec.request: spec for spec in REQUESTS.values()}


def spec_for(request: Request | type[Request]) -> RequestSpec:
    """The table entry of a request (or request class)."""
    return _BY_CLASS[request if isinstance(request, type) else type(request)]


# ---------------------------------------------------------------------------- decoding (hub side)


@attrs.frozen
class Frame:
    """A request frame whose `id` could be read; `type` is as sent (`lookup` checks it), `body` the whole object."""

    id: int
    type: object
    body: Mapping[str, object]


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


_DECODER = msgspec.json.Decoder()


def _loads(text: str) -> object:
    """`json.loads` refusing NaN and Infinity. msgspec's decoder reads in C what it can (the same values as json,
    integers of any size included); json reads what it refuses (lone surrogates, 1e400, NaN), as it always did."""
    try:
        return _DECODER.decode(text)
    except msgspec.DecodeError:
        return json.loads(text, parse_constant=_reject_constant)


def read_frame(text: str | bytes) -> Frame:
    """The frame's integer `id`, `type` and body; ControlError(bad_request) if there is no integer `id` to answer."""
    if isinstance(text, bytes):
        raise ControlError(ErrorCode.BAD_REQUEST, "binary frames are not accepted")
    if has_bad_utf8(text):
        raise ControlError(ErrorCode.BAD_REQUEST, "text is not valid UTF-8")
    try:
        body = _loads(text)
    except (ValueError, RecursionError):
        raise ControlError(ErrorCode.BAD_REQUEST, "not valid JSON") from None
    if not isinstance(body, dict):
        raise ControlError(ErrorCode.BAD_REQUEST, "a request is a JSON object")
    req_id = body.get("id")
    if type(req_id) is not int:
        raise ControlError(ErrorCode.BAD_REQUEST, "a request needs an integer 'id'")
    return Frame(req_id, body.get("type"), body)


def lookup(frame: Frame) -> RequestSpec:
    """The table entry of the frame's type; ControlError (bad_request: no type, unknown_type: not in the table)."""
    kind = frame.type
    if not isinstance(kind, str):
        raise ControlError(ErrorCode.BAD_REQUEST, "missing 'type'")
    spec = REQUESTS.get(kind)
    if spec is None:
        raise ControlError(ErrorCode.UNKNOWN_TYPE, f"no request type {kind[:40]!r}")
    return spec


def decode_request(text: str | bytes) -> tuple[int, Request]:
    """The id and the request of one frame; ControlError for anything the hub refuses before a handler runs.

    (The hub itself takes these steps one at a time, to check the rate and the role in between.)
    """
    frame = read_frame(text)
    return frame.id, lookup(frame).decode(frame.body)


def decode_auth(text: str | bytes) -> str | None:
    """The token of a first-message `{"type": "auth", "token": ...}`; None for anything else."""
    if isinstance(text, str) and has_bad_utf8(text):
        return None  # no token then: nothing to look up
    try:
        msg = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    if isinstance(msg, dict) and msg.get("type") == "auth" and isinstance(msg.get("token"), str):
        return str(msg["token"])
    return None


# ---------------------------------------------------------------------------- encoding


def _dumps(obj: Mapping[str, object]) -> str:
    # json's, not msgspec's: msgspec writes NaN and infinities as null, where the control channel refuses them.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _given(attribute: attrs.Attribute[Any], value: object) -> bool:
    return bool(value != attribute.default)


def encode_request(req_id: int, request: Request) -> str:
    """The frame of `request` with id `req_id`; arguments at their default are left out."""
    args = attrs.asdict(request, filter=_given)
    return _dumps({"id": req_id, "type": spec_for(request).type, **args})


def encode_reply(req_id: int, request: Request, result: Result) -> str:
    """The success answer to `request`: a `pong` frame, or a `result` frame carrying `result`."""
    if spec_for(request).reply is Reply.PONG:
        return _dumps({"type": "pong", "id": req_id})
    return _dumps({"id": req_id, "type": "result", "success": True, "result": result})


def encode_error(req_id: int | None, error: ControlError) -> str:
    """The error answer to the request `req_id` (None when the frame had no integer id)."""
    return _dumps(
        {"id": req_id, "type": "result", "success": False, "error": {"code": error.code, "message": error.message}}
    )


def encode_event(subscription: int, event: Mapping[str, object]) -> str:
    """A pushed event of `subscription`."""
    return _dumps({"type": "event", "subscription": subscription, "event": event})


def encode_dropped(subscription: int, dropped: int, coalesced: int) -> str:
    """The notice that `subscription` lost events (both counts cumulative)."""
    return _dumps({"type": "dropped", "subscription": subscription, "dropped": dropped, "coalesced": coalesced})


def encode_auth_required() -> str:
    """The hub's first frame when the upgrade carried no Authorization header."""
    return _dumps({"type": "auth_required"})


def encode_auth(token: str) -> str:
    """The client's first-message authentication."""
    return _dumps({"type": "auth", "token": token})


def encode_auth_ok(operator: str, role: str) -> str:
    """The hub's answer to a good token."""
    return _dumps({"type": "auth_ok", "operator": operator, "role": role})


def encode_auth_invalid(message: str) -> str:
    """The hub's answer to a bad first message (then it closes with 1008)."""
    return _dumps({"type": "auth_invalid", "message": message})
