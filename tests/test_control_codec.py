"""The control channel's codec and error family, with plain values and strings (no hub, no sockets)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import attrs
import pytest

from device_client.protocol import CloseCode
from hub.control import (
    ANSWERS,
    DEFAULT_LIMIT,
    DEFAULT_WAIT_TIMEOUT,
    MAX_LIMIT,
    MAX_WAIT_TIMEOUT,
    REQUESTS,
    CancelCommand,
    Command,
    Commands,
    ControlError,
    Device,
    DeviceAdd,
    DeviceLabel,
    DeviceRevoke,
    DeviceRotate,
    Devices,
    ErrorCode,
    Job,
    JobCancel,
    JobCreate,
    Jobs,
    Ping,
    Reply,
    Request,
    SendCommand,
    Status,
    Subscribe,
    Twin,
    TwinSet,
    Unsubscribe,
    decode_auth,
    decode_request,
    encode_auth,
    encode_auth_invalid,
    encode_auth_ok,
    encode_auth_required,
    encode_dropped,
    encode_error,
    encode_event,
    encode_reply,
    encode_request,
    lookup,
    read_frame,
    spec_for,
)
from hub.fleet import ROLES

DOCS = (Path(__file__).parent.parent / "docs" / "control.md").read_text(encoding="utf-8")

# One frame per request type, as a client sends it, and the request it decodes to.
EXAMPLES: dict[str, tuple[str, Request]] = {
    "ping": ('{"id":1,"type":"ping"}', Ping()),
    "status": ('{"id":1,"type":"status"}', Status()),
    "devices": (
        '{"id":1,"type":"devices","state":"late","selector":"site=berlin,model!=x,beta"}',
        Devices(state="late", selector="site=berlin,model!=x,beta"),
    ),
    "device": ('{"id":1,"type":"device","name":"sensor-7"}', Device(name="sensor-7")),
    "commands": (
        '{"id":1,"type":"commands","device":"d1","state":"queued","limit":5}',
        Commands(device="d1", state="queued", limit=5),
    ),
    "command": ('{"id":1,"type":"command","command_id":"c-1"}', Command(command_id="c-1")),
    "send_command": (
        '{"id":1,"type":"send_command","wait":true,"device":"d1","name":"set_mode","args":{"mode":"eco"},'
        '"ttl":60.0,"timeout":5.5,"idempotency_key":"k1","wait_timeout":10.0}',
        SendCommand(
            device="d1",
            name="set_mode",
            args={"mode": "eco"},
            ttl=60,
            timeout=5.5,
            idempotency_key="k1",
            wait=True,
            wait_timeout=10,
        ),
    ),
    "cancel_command": ('{"id":1,"type":"cancel_command","command_id":"c-1"}', CancelCommand(command_id="c-1")),
    "subscribe": (
        '{"id":1,"type":"subscribe","topic":"telemetry","devices":["d1","d2"],"selector":"site=berlin"}',
        Subscribe(topic="telemetry", devices=["d1", "d2"], selector="site=berlin"),
    ),
    "unsubscribe": ('{"id":1,"type":"unsubscribe","subscription":3}', Unsubscribe(subscription=3)),
    "device_add": (
        '{"id":1,"type":"device_add","name":"d9","labels":{"site":"berlin"}}',
        DeviceAdd(name="d9", labels={"site": "berlin"}),
    ),
    "twin": ('{"id":1,"type":"twin","device":"d9"}', Twin(device="d9")),
    "twin_set": (
        '{"id":1,"type":"twin_set","device":"d9","patch":{"interval":30,"alarm":null},"if_version":4}',
        TwinSet(device="d9", patch={"interval": 30, "alarm": None}, if_version=4),
    ),
    "device_label": (
        '{"id":1,"type":"device_label","name":"d9","set":{"site":"paris","rack":"r1"},"remove":["model"]}',
        DeviceLabel(name="d9", set={"site": "paris", "rack": "r1"}, remove=["model"]),
    ),
    "device_revoke": ('{"id":1,"type":"device_revoke","name":"d9"}', DeviceRevoke(name="d9")),
    "device_rotate": ('{"id":1,"type":"device_rotate","name":"d9"}', DeviceRotate(name="d9")),
    "job_create": (
        '{"id":1,"type":"job_create","selector":"site=berlin","action":{"type":"command","name":"reboot"},'
        '"rate":2.5,"max_in_flight":4,"abort_percent":20.0}',
        JobCreate(
            selector="site=berlin",
            action={"type": "command", "name": "reboot"},
            rate=2.5,
            max_in_flight=4,
            abort_percent=20,
        ),
    ),
    "jobs": ('{"id":1,"type":"jobs","state":"running","limit":5}', Jobs(state="running", limit=5)),
    "job": (
        '{"id":1,"type":"job","job_id":"j-1","state":"failed","limit":10,"offset":20}',
        Job(job_id="j-1", state="failed", limit=10, offset=20),
    ),
    "job_cancel": ('{"id":1,"type":"job_cancel","job_id":"j-1"}', JobCancel(job_id="j-1")),
}


def test_every_request_type_has_an_example() -> None:
    assert set(EXAMPLES) == set(REQUESTS)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_every_request_type_decodes_and_encodes(kind: str) -> None:
    text, request = EXAMPLES[kind]
    assert decode_request(text) == (1, request)
    assert encode_request(1, request) == text
    assert spec_for(request) is REQUESTS[kind] and spec_for(type(request)) is REQUESTS[kind]
    assert REQUESTS[kind].type == kind


def test_optional_arguments_missing_or_null_take_their_defaults_and_are_not_sent() -> None:
    assert decode_request('{"id":2,"type":"commands"}') == (2, Commands())
    assert Commands() == Commands(device=None, state=None, limit=DEFAULT_LIMIT)
    nulls = (
        '{"id":2,"type":"send_command","device":"d","name":"n","args":null,"ttl":null,"wait":null,"wait_timeout":null}'
    )
    _, request = decode_request(nulls)
    assert request == SendCommand(device="d", name="n")
    assert isinstance(request, SendCommand) and (request.wait, request.wait_timeout) == (False, DEFAULT_WAIT_TIMEOUT)
    assert encode_request(3, request) == '{"id":3,"type":"send_command","device":"d","name":"n"}'
    assert encode_request(4, Devices()) == '{"id":4,"type":"devices"}'
    assert encode_request(5, Subscribe(topic="presence")) == '{"id":5,"type":"subscribe","topic":"presence"}'
    assert encode_request(6, SendCommand(device="d", name="n", args={})) == (
        '{"id":6,"type":"send_command","device":"d","name":"n","args":{}}'  # an empty object is an argument
    )


def test_seconds_are_floats_and_unknown_keys_are_ignored() -> None:
    _, request = decode_request('{"id":1,"type":"send_command","device":"d","name":"n","ttl":60,"extra":[1]}')
    assert isinstance(request, SendCommand) and type(request.ttl) is float and request.ttl == 60.0
    # An integer too large for a float is out of any range (the service answers bad_command), not an internal error.
    _, request = decode_request('{"id":1,"type":"send_command","device":"d","name":"n","ttl":1' + "0" * 400 + "}")
    assert isinstance(request, SendCommand) and request.ttl == math.inf
    _, request = decode_request('{"id":1,"type":"send_command","device":"d","name":"n","timeout":-1' + "0" * 400 + "}")
    assert isinstance(request, SendCommand) and request.timeout == -math.inf


# What the hub refuses before a handler runs: (frame, code, message).
REFUSED: list[tuple[str | bytes, ErrorCode, str]] = [
    (b'{"id":1,"type":"status"}', ErrorCode.BAD_REQUEST, "binary frames are not accepted"),
    ('{"id":1,"type":"status","x":"\udcff"}', ErrorCode.BAD_REQUEST, "text is not valid UTF-8"),
    ("not json", ErrorCode.BAD_REQUEST, "not valid JSON"),
    ('{"id":1,"type":"status","x":NaN}', ErrorCode.BAD_REQUEST, "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, ErrorCode.BAD_REQUEST, "not valid JSON"),
    ("[1]", ErrorCode.BAD_REQUEST, "a request is a JSON object"),
    ('{"type":"status"}', ErrorCode.BAD_REQUEST, "a request needs an integer 'id'"),
    ('{"id":"1","type":"status"}', ErrorCode.BAD_REQUEST, "a request needs an integer 'id'"),
    ('{"id":true,"type":"status"}', ErrorCode.BAD_REQUEST, "a request needs an integer 'id'"),
    ('{"id":1.0,"type":"status"}', ErrorCode.BAD_REQUEST, "a request needs an integer 'id'"),
    ('{"id":1}', ErrorCode.BAD_REQUEST, "missing 'type'"),
    ('{"id":1,"type":7}', ErrorCode.BAD_REQUEST, "missing 'type'"),
    ('{"id":1,"type":"reboot_the_world"}', ErrorCode.UNKNOWN_TYPE, "no request type 'reboot_the_world'"),
    ('{"id":1,"type":"auth","token":"x"}', ErrorCode.UNKNOWN_TYPE, "no request type 'auth'"),
    ('{"id":1,"type":"' + "x" * 100 + '"}', ErrorCode.UNKNOWN_TYPE, f"no request type {'x' * 40!r}"),
    ('{"id":1,"type":"device"}', ErrorCode.BAD_REQUEST, "missing 'name'"),
    ('{"id":1,"type":"device","name":null}', ErrorCode.BAD_REQUEST, "'name' has the wrong type"),
    ('{"id":1,"type":"device","name":5}', ErrorCode.BAD_REQUEST, "'name' has the wrong type"),
    ('{"id":1,"type":"devices","state":"sleeping"}', ErrorCode.BAD_REQUEST, "state must be one of"),
    ('{"id":1,"type":"devices","state":1}', ErrorCode.BAD_REQUEST, "'state' has the wrong type"),
    ('{"id":1,"type":"commands","state":"done"}', ErrorCode.BAD_REQUEST, "state must be one of queued, sent"),
    ('{"id":1,"type":"commands","limit":0}', ErrorCode.BAD_REQUEST, "limit must be 1..1000"),
    ('{"id":1,"type":"commands","limit":1001}', ErrorCode.BAD_REQUEST, "limit must be 1..1000"),
    ('{"id":1,"type":"commands","limit":5.0}', ErrorCode.BAD_REQUEST, "'limit' has the wrong type"),
    ('{"id":1,"type":"commands","limit":true}', ErrorCode.BAD_REQUEST, "'limit' has the wrong type"),
    ('{"id":1,"type":"command"}', ErrorCode.BAD_REQUEST, "missing 'command_id'"),
    ('{"id":1,"type":"send_command","device":"d"}', ErrorCode.BAD_REQUEST, "missing 'name'"),
    ('{"id":1,"type":"send_command","device":"d","name":"x","args":[1]}', ErrorCode.BAD_COMMAND, "args must be an"),
    ('{"id":1,"type":"send_command","device":"d","name":"x","ttl":"1h"}', ErrorCode.BAD_REQUEST, "'ttl' has the"),
    ('{"id":1,"type":"send_command","device":"d","name":"x","ttl":true}', ErrorCode.BAD_REQUEST, "'ttl' has the"),
    ('{"id":1,"type":"send_command","device":"d","name":"x","wait":"yes"}', ErrorCode.BAD_REQUEST, "'wait' has"),
    ('{"id":1,"type":"send_command","device":"d","name":"x","wait_timeout":0}', ErrorCode.BAD_REQUEST, "wait_timeo"),
    ('{"id":1,"type":"send_command","device":"d","name":"x","wait_timeout":3601}', ErrorCode.BAD_REQUEST, "(0, 3600]"),
    # `wait` is checked first, then the arguments in order: the first bad one answers.
    ('{"id":1,"type":"send_command","wait":1,"args":[]}', ErrorCode.BAD_REQUEST, "missing 'device'"),
    ('{"id":1,"type":"send_command","device":"d","name":"x","wait":1,"args":[]}', ErrorCode.BAD_REQUEST, "'wait'"),
    ('{"id":1,"type":"send_command","device":"d","name":"x","args":[],"ttl":"x"}', ErrorCode.BAD_COMMAND, "args"),
    ('{"id":1,"type":"subscribe"}', ErrorCode.BAD_REQUEST, "missing 'topic'"),
    ('{"id":1,"type":"subscribe","topic":"weather"}', ErrorCode.BAD_REQUEST, "topic must be one of"),
    ('{"id":1,"type":"subscribe","topic":"telemetry","devices":"d1"}', ErrorCode.BAD_REQUEST, "'devices' has the"),
    ('{"id":1,"type":"subscribe","topic":"telemetry","devices":[1]}', ErrorCode.BAD_REQUEST, "non-empty list"),
    ('{"id":1,"type":"subscribe","topic":"telemetry","devices":[]}', ErrorCode.BAD_REQUEST, "non-empty list"),
    ('{"id":1,"type":"unsubscribe"}', ErrorCode.BAD_REQUEST, "missing 'subscription'"),
    ('{"id":1,"type":"unsubscribe","subscription":"3"}', ErrorCode.BAD_REQUEST, "'subscription' has the wrong"),
    ('{"id":1,"type":"device_add"}', ErrorCode.BAD_REQUEST, "missing 'name'"),
    ('{"id":1,"type":"device_add","name":"d","labels":["a"]}', ErrorCode.BAD_REQUEST, "'labels' has the wrong"),
    ('{"id":1,"type":"device_add","name":"d","labels":{"a b":"c"}}', ErrorCode.BAD_LABEL, "labels: bad label key"),
    ('{"id":1,"type":"device_add","name":"d","labels":{"a":""}}', ErrorCode.BAD_LABEL, "bad value '' of label 'a'"),
    ('{"id":1,"type":"device_add","name":"d","labels":{"a":7}}', ErrorCode.BAD_LABEL, "bad value 7 of label"),
    ('{"id":1,"type":"devices","selector":"site="}', ErrorCode.BAD_LABEL, "bad value ''"),
    ('{"id":1,"type":"devices","selector":""}', ErrorCode.BAD_LABEL, "a selector is"),
    ('{"id":1,"type":"devices","selector":["a"]}', ErrorCode.BAD_REQUEST, "'selector' has the wrong type"),
    ('{"id":1,"type":"subscribe","topic":"presence","selector":"a,,b"}', ErrorCode.BAD_LABEL, "bad label key ''"),
    ('{"id":1,"type":"device_label","name":"d"}', ErrorCode.BAD_REQUEST, "give labels to set, keys to remove"),
    ('{"id":1,"type":"device_label","name":"d","set":{},"remove":[]}', ErrorCode.BAD_REQUEST, "give labels to"),
    ('{"id":1,"type":"device_label","name":"d","set":{"k":"a b"}}', ErrorCode.BAD_LABEL, "set: bad value"),
    ('{"id":1,"type":"device_label","name":"d","remove":"k"}', ErrorCode.BAD_REQUEST, "a list of label keys"),
    ('{"id":1,"type":"device_label","name":"d","remove":[1]}', ErrorCode.BAD_REQUEST, "a list of label keys"),
    ('{"id":1,"type":"device_label","name":"d","remove":["k!"]}', ErrorCode.BAD_LABEL, "remove: bad label key"),
]


@pytest.mark.parametrize(("text", "code", "message"), REFUSED)
def test_bad_frames_get_the_documented_code(text: str | bytes, code: ErrorCode, message: str) -> None:
    with pytest.raises(ControlError) as info:
        decode_request(text)
    assert info.value.code is code
    assert message in info.value.message


@pytest.mark.parametrize(
    "args",
    [
        '{"n":123456789012345678901234567890,"m":-9223372036854775809}',  # integers past 64 bits, exact
        '{"x":1.0000000000000002,"y":1e-320,"z":0.1e1,"big":1e400}',  # floats as json reads them (1e400: inf)
        '{"s":"\\ud800 alone","t":"\\u00e9\\ud83d\\ude00","a":1,"a":2}',  # a lone surrogate; the last key wins
        '{"deep":' + "[" * 200 + "]" * 200 + "}",
    ],
)
def test_requests_read_as_json_reads_them(args: str) -> None:
    # The C decoder reads what it can, json what it refuses: either way the values are json's.
    text = '{"id":1,"type":"send_command","device":"d","name":"n","args":' + args + "}"
    assert read_frame(text).body == json.loads(text)


def test_the_id_is_read_before_anything_else_is_checked() -> None:
    frame = read_frame('{"id":7,"type":"nope","name":5}')
    assert (frame.id, frame.type) == (7, "nope")
    with pytest.raises(ControlError) as info:
        lookup(frame)
    assert info.value.code is ErrorCode.UNKNOWN_TYPE
    frame = read_frame('{"id":8,"type":"device"}')
    assert lookup(frame) is REQUESTS["device"]
    with pytest.raises(ControlError):
        REQUESTS["device"].decode(frame.body)


def test_request_classes_check_their_fields_when_built_too() -> None:
    with pytest.raises(ControlError) as info:
        Devices(state="sleeping")
    assert info.value.code is ErrorCode.BAD_REQUEST
    with pytest.raises(ControlError) as info:
        SendCommand(device="d", name="n", args=[1])  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.BAD_COMMAND
    assert Subscribe(topic="commands", devices=("a",)).devices == ("a",)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Device(name="a").name = "b"  # type: ignore[misc]


# ---------------------------------------------------------------------------- answers


def test_replies_errors_and_pushes_are_exact_frames() -> None:
    assert encode_reply(7, Ping(), None) == '{"type":"pong","id":7}'
    assert encode_reply(7, Device(name="d"), {"name": "d"}) == (
        '{"id":7,"type":"result","success":true,"result":{"name":"d"}}'
    )
    assert encode_reply(8, Devices(), []) == '{"id":8,"type":"result","success":true,"result":[]}'
    assert encode_error(7, ControlError(ErrorCode.NOT_FOUND, "no device 'd'")) == (
        '{"id":7,"type":"result","success":false,"error":{"code":"not_found","message":"no device \'d\'"}}'
    )
    assert json.loads(encode_error(None, ControlError("bad_request", "not valid JSON")))["id"] is None
    assert encode_event(3, {"device": "d"}) == '{"type":"event","subscription":3,"event":{"device":"d"}}'
    assert encode_dropped(3, 120, 4000) == '{"type":"dropped","subscription":3,"dropped":120,"coalesced":4000}'
    with pytest.raises(ValueError):
        encode_event(3, {"v": math.nan})  # never NaN on the wire


def test_auth_frames() -> None:
    assert encode_auth_required() == '{"type":"auth_required"}'
    assert encode_auth_ok("alice", "operator") == '{"type":"auth_ok","operator":"alice","role":"operator"}'
    assert encode_auth_invalid("no") == '{"type":"auth_invalid","message":"no"}'
    assert decode_auth(encode_auth("op.a.s")) == "op.a.s"
    assert decode_auth(b'{"type": "auth", "token": "op.a.s"}') == "op.a.s"
    for bad in ['{"type":"auth"}', '{"type":"auth","token":5}', '{"type":"hello","token":"t"}', "[]", "{", "\udcff"]:
        assert decode_auth(bad) is None
    assert decode_auth(b"\xff") is None


def test_control_error_family() -> None:
    error = ControlError("not_found", "no command 'c-1'")
    assert error.code is ErrorCode.NOT_FOUND and error.code == "not_found"
    assert str(error) == "not_found: no command 'c-1'" and str(ControlError(ErrorCode.EXISTS)) == "exists"
    with pytest.raises(ValueError):
        ControlError("no_such_code", "x")  # a typo fails where it is made, never reaches the wire
    assert set(ANSWERS) == set(ErrorCode)
    assert {c for c, a in ANSWERS.items() if a.bad_frame} == {ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_TYPE}
    assert {c: a.close for c, a in ANSWERS.items() if a.close is not None} == {ErrorCode.INTERNAL: CloseCode.INTERNAL}
    assert ControlError(ErrorCode.RATE_LIMITED).answer.quiet


# ---------------------------------------------------------------------------- the table against its spec


def test_roles_and_reply_shapes() -> None:
    assert {spec.role for spec in REQUESTS.values()} <= set(ROLES)
    assert REQUESTS["ping"].reply is Reply.PONG and Reply.PONG.json_type is None
    assert REQUESTS["devices"].reply.json_type is list and REQUESTS["status"].reply.json_type is dict


def _section(title: str) -> str:
    return DOCS.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_docs_roles_table_matches_the_request_table() -> None:
    allowed: dict[str, set[str]] = {}
    rows = re.findall(r"^\| `(\w+)` \| (.+) \|$", _section("Roles"), re.MULTILINE)
    for role, text in rows:
        allowed[role] = set(re.findall(r"`(\w+)`", text))
    assert list(allowed) == list(ROLES)
    cumulative: set[str] = set()
    for role in ROLES:
        cumulative |= allowed[role]
        assert cumulative == {k for k, spec in REQUESTS.items() if ROLES.index(spec.role) <= ROLES.index(role)}, role


def test_docs_arguments_match_the_request_classes() -> None:
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", _section("Requests and replies"), re.MULTILINE)
    assert rows
    for kind, column in rows:
        column = re.sub(r"\([^)]*\)", "", column)  # without the notes on values
        documented = {name: optional == "?" for name, optional in re.findall(r"`(\w+)`(\??)", column)}
        fields = {f.name: f.default is not attrs.NOTHING for f in attrs.fields(REQUESTS[kind].request)}
        assert documented == fields, kind
    assert f"`limit`? (default {DEFAULT_LIMIT}, at most {MAX_LIMIT})" in DOCS
    assert f"`wait_timeout`? (s, default {DEFAULT_WAIT_TIMEOUT:g}, at most {MAX_WAIT_TIMEOUT:g})" in DOCS


def test_docs_requests_and_error_codes_match_the_tables() -> None:
    requests = re.findall(r"^\| `(\w+)` \|", _section("Requests and replies"), re.MULTILINE)
    assert requests == list(REQUESTS)  # the same types, in the same order
    codes = re.findall(r"^\| `(\w+)` \|", _section("Error codes"), re.MULTILINE)
    assert codes == [code.value for code in ErrorCode]
