"""The hostile-client suite: every attack at once, each refused cleanly, while well-behaved devices stream.

The same attacks run against an in-process hub (to check its figures) and against `hub serve` in a subprocess
logging at debug level in kv and in JSON (to check that no token or secret ever reaches the log).
"""

from __future__ import annotations

import json
import re
import socket
import struct
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected
from wsproto.events import CloseConnection

from device_client import protocol
from device_client.protocol import DEVICE_PATH, Ack, CloseCode, CommandAck, CommandResult, Error, ErrorCode, Hello
from hub.control import CONTROL_PATH
from hub.fleet import Registry
from hub.ops import COMMANDS_MEASUREMENT, ERRORS_MEASUREMENT, HUB_MEASUREMENT
from tests.hubproc import HubProcess
from tests.hubtools import (
    BAD_MESSAGES,
    Ctl,
    add_devices,
    add_operators,
    connect,
    hello,
    hub_config,
    points,
    raw,
    receive,
    send_batch,
    start_hub,
    wait_ack,
)
from tests.hubtools import telemetry_lines as stored
from tests.waiting import eventually
from tests.wire import RawClient, closed_by_peer, open_tcp, upgrade, upgrade_request

GOOD = ("good0", "good1", "good2")
EVIL = ("evil_json", "evil_tags", "evil_big", "evil_frag", "evil_cmd", "evil_flood")
SIZE = 5  # points per good batch (= limits.max_points, so BAD_MESSAGES' six points are too many)
FLOOD_SOURCE = "127.0.0.2"  # the connection flood comes from its own address
PER_ADDRESS = 40

# Nothing here may hinge on how fast the machine is: the limits the attacks must hit are either far below what any
# attack sends (a request rate near zero: only the burst passes) or far above what a loaded machine needs (a hub busy
# with every attack at once may take seconds to read a well-formed upgrade, or to answer a ping).
HOSTILE = {
    "server": {
        "handshake_timeout": 5.0,
        "max_message_bytes": 65536,
        "max_errors": 50,
        "max_connections_per_address": PER_ADDRESS,
        "retry_after": 9,
    },
    "limits": {"max_points": SIZE},
    # No pings during the suite: trio-websocket 0.12's client raises in its reader on a ping that arrives after a
    # local close (trio-websocket #184), and open_websocket then leaks a Cancelled that silently cancels the suite.
    "presence": {"ping_interval": 3600.0, "ping_timeout": 600.0},
    "control": {
        "allowed_origins": ["https://ops.example.com"],
        "request_rate": 0.001,  # one request per 1,000 s beyond the burst: 40 pipelined pings overrun it, however slow
        "request_burst": 20,
        "auth_timeout": 60.0,  # the flood holds unauthenticated sessions for as long as it runs
    },
    "batch": {"max_delay": 0.02},
}


@attrs.define
class Target:
    """A running hub under attack, and what the attacks expect of it."""

    port: int
    data_dir: Path
    tokens: dict[str, str]
    ops: dict[str, str]
    revoked: str
    refusals: int = 0  # handshakes the attacks expect refused (HTTP answers and failed first-message auths)
    maybe_refused: int = 0  # handshakes reset so early that the hub may not even have read the request
    evil_points: int = 0  # points of evil devices the hub accepted (and must have stored)
    answers: list[str] = attrs.field(factory=list)  # what each attack saw, for the report of a failure

    @property
    def secrets(self) -> list[str]:
        """Every token used, and the secret part of each."""
        out = [*self.tokens.values(), *self.ops.values(), self.revoked]
        return out + [t.rsplit(".", 1)[1] for t in out]


def secret(token: str) -> str:
    return token.rsplit(".", 1)[1]


def device_tag(line: str) -> str | None:
    """The `device` tag of one line of line protocol, escapes undone (None if it has none)."""
    fields: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(line):
        c = line[i]
        if c == "\\":
            current.append(line[i + 1])
            i += 2
            continue
        if c in ", ":
            fields.append("".join(current))
            current = []
            if c == " ":
                break
        else:
            current.append("\x00" if c == "=" else c)  # an unescaped '=' separates a tag key from its value
        i += 1
    for tag in fields[1:]:
        key, sep, value = tag.partition("\x00")
        if sep and key == "device":
            return value
    return None


# ---------------------------------------------------------------------------- the attacks


async def rejected(t: Target, token: str | None, *, path: str = DEVICE_PATH, headers: list | None = None) -> int:
    """The HTTP status of a handshake the hub must refuse."""
    with pytest.raises(ConnectionRejected) as exc:
        async with connect(t, token, path=path, headers=headers):
            pass
    t.refusals += 1
    return exc.value.status_code


async def expect_error(ws: Any, code: str, seq: int | None = None) -> None:
    """The next error frame (acks before it are skipped: refused batches are acked too) is `code` for `seq`."""
    msg = await receive(ws)
    while isinstance(msg, Ack):
        msg = await receive(ws)
    assert isinstance(msg, Error) and (msg.code, msg.seq) == (code, seq), (code, seq, msg)


def telemetry(seq: int, point: dict[str, Any]) -> str:
    return raw({"type": "telemetry", "seq": seq, "points": [{"ts": 1_764_000_000_000 + seq, **point}]})


EXTRA_BAD = [
    ("[" * 30000 + "]" * 30000, ErrorCode.BAD_JSON, None),  # deep nesting, under the frame limit
    ('{"type": "telemetry", "seq": 1, "points": [{"x": Infinity}]}', ErrorCode.BAD_JSON, None),
    ('{"type": "telemetry", "seq": 1, "points": -Infinity}', ErrorCode.BAD_JSON, None),
    ('{"type": "telemetry", "seq": ' + "9" * 5000 + "}", ErrorCode.BAD_JSON, None),  # past Python's digit limit
    (raw({"type": "telemetry", "seq": 2**64, "points": []}), ErrorCode.BAD_SEQ, None),
    (raw({"type": "telemetry", "seq": "101", "points": []}), ErrorCode.BAD_SEQ, None),
    (telemetry(102, {"measurement": "m", "fields": {"x": 1.5}}).replace("1.5", "1e400"), ErrorCode.BAD_FIELD, 102),
    (telemetry(103, {"measurement": "m", "fields": {"x": 10**30}}), ErrorCode.BAD_FIELD, 103),
    (telemetry(104, {"measurement": "m", "fields": {"x": {"int": 2**63}}}), ErrorCode.BAD_FIELD, 104),
    (telemetry(105, {"measurement": "m", "fields": {"x": {"int": {"int": 1}}}}), ErrorCode.BAD_FIELD, 105),
    (telemetry(106, {"measurement": "m", "fields": {"x": "a" * 5000}}), ErrorCode.BAD_FIELD, 106),
    (telemetry(107, {"measurement": 7, "fields": {"x": 1}}), ErrorCode.BAD_NAME, 107),
    (telemetry(108, {"measurement": "m", "fields": [1, 2]}), ErrorCode.BAD_POINT, 108),
    (telemetry(109, {"measurement": "m", "fields": {"x": 1}, "tags": ["a"]}), ErrorCode.BAD_POINT, 109),
    (raw({"type": "telemetry", "seq": 110, "points": [{"measurement": "m", "ts": 1e12, "fields": {"x": 1}}]}),
     ErrorCode.BAD_TIME, 110),
    (raw({"type": "command_result", "id": 5, "ok": True}), ErrorCode.BAD_MESSAGE, None),
    (raw({"type": "welcome", "device": "good0", "ack": 0, "epoch": 1, "window": 1, "max_points": 1,
          "ping_interval": 1, "proto": 1}), ErrorCode.BAD_MESSAGE, None),
]  # fmt: skip


async def malformed_messages(t: Target) -> None:
    """Bad JSON, wrong types, NaN/Infinity, huge numbers, deep nesting, binary frames: each gets its error."""
    async with connect(t, t.tokens["evil_json"]) as ws:
        await hello(ws)
        for text, code, seq in [*BAD_MESSAGES, *EXTRA_BAD]:
            await ws.send_message(text)
            await expect_error(ws, code, seq)
        await send_batch(ws, 200, points(2, start=5000))  # the session goes on, and refused batches are resolved
        assert Ack(200) in await wait_ack(ws, 200)
    t.evil_points += 2
    t.answers.append("malformed: every message refused with its code")


INJECTED_TAGS = [
    {"room,device=good0": "x"},
    {"a b": "c d", "k=v": "x=y"},
    {"room": "lab,device=good0"},
    {"Device": "good0"},  # tag keys are case-sensitive: this is not the device tag
]


async def tag_injection(t: Target) -> None:
    """Spaces, commas and equals signs are escaped; line breaks and the `device` tag are refused."""
    async with connect(t, t.tokens["evil_tags"]) as ws:
        await hello(ws)
        for seq, tags in enumerate(INJECTED_TAGS, start=1):
            await ws.send_message(telemetry(seq, {"measurement": "m", "fields": {"x": 1.5}, "tags": tags}))
            assert await receive(ws) == Ack(seq)
        accepted = [
            {"measurement": "m,device=good0 x=1", "fields": {"x": 1.0}},
            {"measurement": "m", "fields": {"f=1,device=good0 y": 2.0}},
        ]
        for seq, point in enumerate(accepted, start=10):
            await ws.send_message(telemetry(seq, point))
            assert await receive(ws) == Ack(seq)
        refused = [
            ({"measurement": "m", "fields": {"x": 1}, "tags": {"device": "good0"}}, ErrorCode.RESERVED_TAG),
            ({"measurement": "m", "fields": {"x": 1}, "tags": {"k\ndevice": "good0"}}, ErrorCode.BAD_NAME),
            ({"measurement": "m", "fields": {"x": 1}, "tags": {"k": "v\nm,device=good0 x=1"}}, ErrorCode.BAD_TAG),
            ({"measurement": "m\nm,device=good0 x=1", "fields": {"x": 1}}, ErrorCode.BAD_NAME),
            ({"measurement": "m", "fields": {"x\n": 1}}, ErrorCode.BAD_NAME),
            ({"measurement": "m", "fields": {"s": "a\nm,device=good0 x=1"}}, ErrorCode.BAD_FIELD),
        ]
        for seq, (point, code) in enumerate(refused, start=20):
            await ws.send_message(telemetry(seq, point))
            await expect_error(ws, code, seq)
    t.evil_points += len(INJECTED_TAGS) + len(accepted)
    t.answers.append("tag injection: escaped or refused")


async def big_frame(t: Target) -> None:
    """A 10 MB frame: the connection is closed with 1009 after the first 64 KiB."""
    async with connect(t, t.tokens["evil_big"]) as ws:
        await hello(ws)
        with pytest.raises(ConnectionClosed) as closed:
            await ws.send_message("x" * 10_000_000)
            await receive(ws)
        assert closed.value.reason.code in (CloseCode.TOO_BIG, 1006)  # 1006: the reset beat the close frame
    t.answers.append("10 MB frame: closed")


async def fragment_flood(t: Target) -> None:
    """Tiny continuation frames: a message in 20,000 one-byte frames is served; one past the size limit is closed."""
    client = RawClient(await open_tcp(t.port))
    await client.handshake(DEVICE_PATH, t.tokens["evil_frag"])
    await client.send(client.fragments(protocol.encode(Hello()), size=3))
    assert isinstance(await client.message(), protocol.Welcome)
    text = telemetry(1, {"measurement": "frag", "fields": {"x": 1.0}})
    await client.send(client.fragments(text + " " * (20_000 - len(text))))
    assert await client.message() == Ack(1)
    t.evil_points += 1
    flood = client.fragments("x" * 70_000)
    for i in range(0, len(flood), 65536):
        if not await client.send(flood[i : i + 65536]):
            break
    while True:
        event = await client.event()
        if event is None or isinstance(event, CloseConnection):
            break
    assert event is None or event.code == CloseCode.TOO_BIG
    await client.stream.aclose()
    t.answers.append("fragment flood: served within the limit, closed past it")


async def stolen_and_forged_tokens(t: Target) -> None:
    """Another device's secret under my name, revoked and wrong tokens, tokens in the URL, on the wrong endpoint."""
    good, evil = t.tokens["good0"], t.tokens["evil_json"]
    assert await rejected(t, f"evil_json.{secret(good)}") == 401
    assert await rejected(t, f"good0.{secret(evil)}") == 401
    assert await rejected(t, t.revoked) == 401
    assert await rejected(t, "x" * 4000) == 401
    assert await rejected(t, None, headers=[(b"authorization", b"Bearer \xff\xfe")]) == 401
    assert await rejected(t, None, path=f"{DEVICE_PATH}?token={good}") == 401
    assert await rejected(t, None, path=f"{CONTROL_PATH}?access_token={t.ops['olivia']}") == 401
    assert await rejected(t, t.ops["olivia"]) == 401  # an operator token is no device token
    assert await rejected(t, good, path=CONTROL_PATH) == 401  # nor the other way round
    t.answers.append("forged tokens: 401")


async def cross_origin(t: Target) -> None:
    """Browsers (an Origin header) may not use the device endpoint, and only allowed origins the control one."""
    evil_origin = [(b"origin", b"https://evil.example")]
    assert await rejected(t, t.tokens["good1"], headers=evil_origin) == 403
    assert await rejected(t, t.tokens["good1"], headers=[(b"origin", b"https://ops.example.com")]) == 403
    assert await rejected(t, t.ops["olivia"], path=CONTROL_PATH, headers=evil_origin) == 403
    assert await rejected(t, None, path=CONTROL_PATH, headers=evil_origin) == 403
    t.answers.append("cross-origin: 403")


async def slowloris(t: Target) -> None:
    """A socket that says nothing and one that sends its upgrade a byte at a time are both dropped."""
    silent = await open_tcp(t.port)
    dribbler = await open_tcp(t.port)
    request = upgrade_request(DEVICE_PATH, {"Authorization": f"Bearer {t.tokens['good2']}"})
    sent = 0
    while sent < len(request):  # 1 byte per 200 ms would need > 40 s; the hub allows 5 s
        try:
            await dribbler.send_all(request[sent : sent + 1])
        except trio.BrokenResourceError:
            break
        sent += 1
        with trio.move_on_after(0.2):
            try:
                if not await dribbler.receive_some(4096):
                    break
            except trio.BrokenResourceError:
                break
    assert sent < len(request)
    assert await closed_by_peer(silent)
    t.answers.append("slowloris: dropped")


async def oversized_headers(t: Target) -> None:
    """An upgrade request with 100 KB of headers is answered 400 by the HTTP parser (or reset) and closed."""
    stream = await open_tcp(t.port)
    try:
        await stream.send_all(upgrade_request(DEVICE_PATH, {"X-Padding": "a" * 100_000}))
        head = await stream.receive_some(4096)
    except trio.BrokenResourceError:
        head = b""
    assert head == b"" or head.startswith(b"HTTP/1.1 400"), head
    assert await closed_by_peer(stream)
    t.answers.append("oversized headers: 400")


async def connection_flood(t: Target) -> None:
    """Many connections from one address: those over the per-address limit get 429 and are closed."""
    held = []
    statuses = []
    for _ in range(PER_ADDRESS + 10):
        status, headers, stream = await upgrade(t.port, CONTROL_PATH, source=FLOOD_SOURCE)
        statuses.append(status)
        if status == 101:
            held.append(stream)
        else:
            assert headers.get("retry-after") == "9"
            assert await closed_by_peer(stream)
    assert statuses == [101] * PER_ADDRESS + [429] * 10
    t.refusals += 10
    for stream in held:
        await stream.aclose()
    t.answers.append("connection flood: 429 past the limit")


async def reset_during_handshake(t: Target) -> None:
    """A client that sends a refused upgrade and resets the connection at once: the hub does not care."""
    for _ in range(20):
        stream = await open_tcp(t.port)
        await stream.send_all(upgrade_request(DEVICE_PATH, {"Authorization": "Bearer nobody.nothing"}))
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()  # RST, not FIN
    t.maybe_refused += 20
    t.answers.append("reset during the handshake: nothing")


async def forged_command_answers(t: Target) -> None:
    """Acks and results for commands never sent, or sent to another device, are refused and change nothing."""
    async with connect(t, t.tokens["evil_cmd"]) as ws, connect(t, t.ops["olivia"], path=CONTROL_PATH) as cws:
        await hello(ws)
        ctl = Ctl(cws)
        assert (await ctl.recv())["type"] == "auth_ok"
        await ws.send_message(protocol.encode(CommandAck("c-never-sent")))
        await expect_error(ws, ErrorCode.UNKNOWN_COMMAND)
        await ws.send_message(protocol.encode(CommandResult("c-never-sent", True, {"pwned": 1})))
        await expect_error(ws, ErrorCode.UNKNOWN_COMMAND)
        await ctl.ok("subscribe", topic="commands", devices=["good0"])  # events, not polls: requests are rate-limited
        record = await ctl.ok("send_command", device="good0", name="reboot")
        while record["state"] == "queued":
            frame = await ctl.push()
            if frame["type"] == "event" and frame["event"]["command_id"] == record["command_id"]:
                record = frame["event"]
        await ws.send_message(protocol.encode(CommandAck(record["command_id"])))
        await expect_error(ws, ErrorCode.UNKNOWN_COMMAND)
        await ws.send_message(protocol.encode(CommandResult(record["command_id"], False, None, "hijacked")))
        await expect_error(ws, ErrorCode.UNKNOWN_COMMAND)
        record = await ctl.ok("command", command_id=record["command_id"])
        assert record["state"] == "sent" and record["error"] in ("", None), record
    t.answers.append("forged command answers: unknown_command")


async def error_flood(t: Target) -> None:
    """A device that keeps sending garbage is closed with 1008 after `server.max_errors`."""
    async with connect(t, t.tokens["evil_flood"]) as ws:
        await hello(ws)
        codes = []
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(100):
                await ws.send_message("nope")
                codes.append((await receive(ws)).code)
        assert closed.value.reason.code == CloseCode.POLICY
        assert codes == [ErrorCode.BAD_JSON] * 51 + [ErrorCode.TOO_MANY_ERRORS]  # more than 50: closed
    t.answers.append("error flood: closed 1008")


async def operator_abuse(t: Target) -> None:
    """Bad operator tokens, first-message auth with garbage, forbidden requests, bad frames and a request flood."""
    assert await rejected(t, "op.mallory.not-the-secret", path=CONTROL_PATH) == 401
    async with connect(t, None, path=CONTROL_PATH) as ws:  # a browser-style session that sends a device token
        assert json.loads(await ws.get_message()) == {"type": "auth_required"}
        await ws.send_message(json.dumps({"type": "auth", "token": t.tokens["good1"]}))
        assert json.loads(await ws.get_message())["type"] == "auth_invalid"
    t.refusals += 1
    async with connect(t, t.ops["mallory"], path=CONTROL_PATH) as ws:
        ctl = Ctl(ws)
        assert (await ctl.recv())["type"] == "auth_ok"
        assert await ctl.error("send_command", device="good0", name="reboot") == "forbidden"
        assert await ctl.error("device_add", name="backdoor") == "forbidden"
        for frame in (b"\x00\x01", "[" * 30000, '{"id": NaN}', "{}"):
            await ws.send_message(frame)
            reply = await ctl.recv()
            assert (reply["id"], reply["error"]["code"]) == (None, "bad_request")
        for rid in range(100, 140):  # pipelined: twice the burst, and the bucket refills next to nothing meanwhile
            await ctl.send({"id": rid, "type": "ping"})
        replies = [await ctl.recv() for _ in range(40)]
        assert any(r.get("error", {}).get("code") == "rate_limited" for r in replies)
        assert sorted(r["id"] for r in replies) == list(range(100, 140))
    t.answers.append("operator abuse: refused")


ATTACKS = [
    malformed_messages,
    tag_injection,
    big_frame,
    fragment_flood,
    stolen_and_forged_tokens,
    cross_origin,
    slowloris,
    oversized_headers,
    connection_flood,
    reset_during_handshake,
    forged_command_answers,
    error_flood,
    operator_abuse,
]


# ---------------------------------------------------------------------------- the suite


async def good_device(t: Target, name: str, stop: trio.Event, acked: dict[str, int]) -> None:
    """Stream batches (about 20 a second) until `stop`, each one acked before the next."""
    async with connect(t, t.tokens[name]) as ws:
        await hello(ws, interval=1)
        seq = 0
        while not stop.is_set() or seq < 10:
            seq += 1
            await send_batch(ws, seq, points(SIZE, start=seq * 10))
            while True:
                msg = await receive(ws)  # commands an attacker tries to answer arrive here: left unanswered
                assert not isinstance(msg, Error), msg
                if msg == Ack(seq):
                    break
            acked[name] = seq
            await trio.sleep(0.05)  # pacing: a well-behaved device's rate


async def run_suite(t: Target) -> dict[str, int]:
    """Good devices stream while every attack runs; the acked batches of each good device."""
    acked: dict[str, int] = {}
    stop = trio.Event()
    done: list[str] = []
    scopes: list[trio.CancelScope] = []

    async def run(name: str, part: Any) -> None:
        """Run one attack or good device; a Cancelled that no scope of this suite asked for fails the test."""
        try:
            await part()
        except trio.Cancelled as exc:
            if not any(scope.cancel_called for scope in scopes):
                raise AssertionError(f"{name}: cancelled, but not by the suite (a client library leaked it)") from exc
            raise
        done.append(name)

    async with trio.open_nursery() as nursery:
        scopes.append(nursery.cancel_scope)
        for name in GOOD:
            nursery.start_soon(run, name, partial(good_device, t, name, stop, acked))
        with trio.fail_after(300) as guard:  # a guard against a hang, far beyond what a loaded machine needs
            scopes.append(guard)
            await eventually(lambda: len(acked) == len(GOOD), 300)
            async with trio.open_nursery() as attacks:
                scopes.append(attacks.cancel_scope)
                for attack in ATTACKS:
                    attacks.start_soon(run, attack.__name__, partial(attack, t))
        stop.set()
    missing = [attack.__name__ for attack in ATTACKS if attack.__name__ not in done]
    assert not missing and len(t.answers) == len(ATTACKS), (missing, t.answers)
    return acked


def check_stored(t: Target, acked: dict[str, int]) -> None:
    """Every acked point of the good devices is stored, under its own device and nothing else."""
    by_device: dict[str | None, int] = {}
    own = ("command", HUB_MEASUREMENT, ERRORS_MEASUREMENT, COMMANDS_MEASUREMENT)  # command transitions, hub figures
    lines = [ln for ln in stored(t.data_dir) if ln.split(",", 1)[0] not in own]
    for line in lines:
        device = device_tag(line)
        by_device[device] = by_device.get(device, 0) + 1
    for name in GOOD:
        assert by_device.get(name) == acked[name] * SIZE, (name, by_device)
    evil = sum(by_device.get(name, 0) for name in EVIL)
    assert evil == t.evil_points, by_device
    assert set(by_device) <= {*GOOD, *EVIL}, by_device


def make_target(data_dir: Path, port: int, tokens: dict[str, str], ops: dict[str, str]) -> Target:
    revoked = tokens.pop("revoked")
    return Target(port, data_dir, tokens, ops, revoked)


def prepare(data_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    tokens = add_devices(data_dir, *GOOD, *EVIL, "revoked")
    ops = add_operators(data_dir, olivia="operator", mallory="viewer")
    with Registry(data_dir / "registry.sqlite3") as registry:
        registry.revoke("revoked")
    return tokens, ops


async def test_every_attack_is_refused_while_good_devices_stream_and_are_stored(tmp_path: Path) -> None:
    tokens, ops = prepare(tmp_path)
    overrides = {f"{section}.{key}": value for section, opts in HOSTILE.items() for key, value in opts.items()}
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path, **overrides))
        t = make_target(tmp_path, hub.port, tokens, ops)
        acked = await run_suite(t)
        status = hub.presence.status
        # One session each, from start to end: never kicked, replaced or throttled away.
        assert [(status[name].epoch, status[name].reason) for name in GOOD] == [(1, "disconnected")] * len(GOOD)
        hub.stop()
    check_stored(t, acked)
    assert t.refusals <= hub.stats.refused <= t.refusals + t.maybe_refused
    assert status["evil_big"].reason == "too_big" and status["evil_frag"].reason == "too_big"
    assert status["evil_flood"].reason == ErrorCode.TOO_MANY_ERRORS
    assert {"revoked", "good2"}.isdisjoint(name for name in status if not status[name].epoch)
    errors = hub.stats.protocol_errors
    assert errors[ErrorCode.UNKNOWN_COMMAND] == 4 and errors[ErrorCode.RESERVED_TAG] == 2


KV_LINE = re.compile(r'^ts=\S+ level=(debug|info|warning|error|critical) logger=\S+ msg=("[^"]*"|\S+)( |$)')


def log_events(text: str, fmt: str) -> list[dict[str, str]]:
    """The hub's log as one dict per line (kv: only the keys the checks need)."""
    events = []
    for line in text.splitlines():
        if fmt == "json":
            events.append(json.loads(line))  # one event per line, each a JSON object
            continue
        assert KV_LINE.match(line), line
        pairs = re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', line)
        events.append({key: value.strip('"') for key, value in pairs})
    return events


@pytest.mark.parametrize("fmt", ["kv", "json"])
async def test_the_log_of_the_hostile_suite_holds_no_secret(tmp_path: Path, fmt: str) -> None:
    data_dir = tmp_path / "hub"
    tokens, ops = prepare(data_dir)
    config = tmp_path / "hub.toml"
    config.write_text(
        "".join(
            f"[{section}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in opts.items())
            for section, opts in HOSTILE.items()
        )
    )
    hub = HubProcess(data_dir, "--config", str(config), "--log-level", "debug", "--log-format", fmt)
    hub.start()
    try:
        t = make_target(data_dir, hub.port, tokens, ops)
        acked = await run_suite(t)
    finally:
        hub.kill()
    check_stored(t, acked)
    text = hub.log()
    for value in t.secrets:
        assert value not in text, f"a secret is in the {fmt} log"
    events = log_events(text, fmt)
    refusals = [
        e for e in events if e["msg"] in ("message refused", "device refused", "message too big: connection closed")
    ]
    assert len(refusals) >= len(BAD_MESSAGES) + len(EXTRA_BAD) + 2
    for event in refusals:
        assert {"device", "epoch", "reason"} <= event.keys() and event["device"].startswith("evil_"), event
    handshakes = [e for e in events if e["msg"] == "handshake refused"]
    expected = t.refusals - 1  # the failed first-message auth is logged on its own
    assert expected <= len(handshakes) <= expected + t.maybe_refused
    assert {e["reason"] for e in handshakes} >= {
        "bad_credentials",
        "token_in_url",
        "origin_present",
        "origin_not_allowed",
        "too_many_from_address",
    }
    assert all(e["remote"] for e in handshakes)


async def status_line(port: int, request: bytes) -> bytes:
    """The first line of the hub's answer to `request`."""
    stream = await open_tcp(port)
    try:
        await stream.send_all(request)
        head = b""
        with trio.fail_after(30):
            while b"\r\n" not in head and (chunk := await stream.receive_some(4096)):
                head += chunk
        return head.split(b"\r\n", 1)[0]
    finally:
        await stream.aclose()


async def test_refusals_carry_a_reason_phrase(tmp_path: Path) -> None:
    """`HTTP/1.1 403 Forbidden`, not `HTTP/1.1 403 `, on the WebSocket endpoints. (The HTTP port is Hypercorn's, which
    sends an empty reason phrase, as RFC 9112 allows: clients go by the status code.)"""
    tokens = add_devices(tmp_path, "d1")
    config = hub_config(tmp_path, **{"server.max_connections_per_address": 1})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        auth = {"Authorization": f"Bearer {tokens['d1']}"}
        refusals = {
            upgrade_request(DEVICE_PATH): b"401 Unauthorized",
            upgrade_request(DEVICE_PATH, {**auth, "Origin": "https://evil.example"}): b"403 Forbidden",
            upgrade_request(CONTROL_PATH, {"Origin": "https://evil.example"}): b"403 Forbidden",
            upgrade_request("/nowhere", auth): b"404 Not Found",
        }
        for request, expected in refusals.items():
            assert await status_line(hub.port, request) == b"HTTP/1.1 " + expected
        async with connect(hub, tokens["d1"]):  # the one connection this address may have
            assert await status_line(hub.port, upgrade_request(DEVICE_PATH, auth)) == b"HTTP/1.1 429 Too Many Requests"
        get = b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
        assert (await status_line(hub.metrics_port, get)).startswith(b"HTTP/1.1 404")
        hub.stop()
