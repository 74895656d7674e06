"""The operator control channel over real loopback WebSockets against an in-process hub (docs/control.md)."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection, wrap_client_stream

from device_client import DeviceClient, protocol
from device_client.protocol import Command, CommandAck, CommandResult
from hub import fleet
from hub.app import HubHandle
from hub.control import CONTROL_PATH, REQUESTS, Reply
from hub.control._operations import HANDLERS
from hub.control._server import _SESSION_HANDLERS, MAX_WAITS
from hub.fleet import DeviceLedger, DeviceRecord, DeviceStatus, Registry
from tests.hubtools import (
    BASE_TS,
    Ctl,
    add_devices,
    add_operators,
    connect,
    control,
    hello,
    hub_config,
    points,
    send_batch,
    start_hub,
    url,
    wait_ack,
)
from tests.waiting import eventually
from tests.wire import upgrade

# ---------------------------------------------------------------------------- fleet (pure)


def _record(name: str = "d1", revoked: bool = False) -> DeviceRecord:
    return DeviceRecord(name=name, created=1000.0, revoked=revoked, epoch=3, acked_seq=9)


def _status(state: str = "online") -> DeviceStatus:
    return DeviceStatus(state, 4, 2000.0, "connected", "1.2", "th-100", 5.0)


def _ledger() -> DeviceLedger:
    ledger = DeviceLedger("d1", 9, 9)
    ledger.last_seen = 2500.0
    ledger.latest["power"] = {"measurement": "power", "ts": 7, "fields": {"w": 1.5, "n": {"int": 2}}, "tags": {}}
    ledger.latest["env"] = {"measurement": "env", "ts": 8, "fields": {"t": 20.0}, "tags": {"room": "a"}}
    return ledger


SUMMARY_KEYS = {
    "name",
    "state",
    "since",
    "reason",
    "last_seen",
    "epoch",
    "firmware",
    "model",
    "interval",
    "revoked",
    "labels",
}


def test_summary_of_a_connected_device() -> None:
    summary = fleet.device_summary("d1", _record(), _status("late"), _ledger())
    assert summary == {
        "name": "d1",
        "state": "late",
        "since": 2000.0,
        "reason": "connected",
        "last_seen": 2500.0,
        "epoch": 4,
        "firmware": "1.2",
        "model": "th-100",
        "interval": 5.0,
        "revoked": False,
        "labels": {},
    }
    json.dumps(summary)  # plain JSON values only


def test_summary_of_a_device_never_seen() -> None:
    summary = fleet.device_summary("d1", _record(revoked=True), None, None)
    assert set(summary) == SUMMARY_KEYS
    assert (summary["state"], summary["since"], summary["last_seen"], summary["epoch"]) == ("never", 1000.0, None, 3)
    assert summary["revoked"] is True
    bare = fleet.device_summary("ghost", None, None, None)
    assert (bare["state"], bare["since"], bare["revoked"]) == ("never", None, False)


def test_detail_adds_latest_with_plain_ints_and_commands() -> None:
    ledger = _ledger()
    detail = fleet.device_detail("d1", _record(), _status(), ledger, [{"command_id": "c-1"}])
    assert set(detail) == SUMMARY_KEYS | {"latest", "commands"}
    assert detail["latest"] == {
        "env": {"ts": 8, "fields": {"t": 20.0}, "tags": {"room": "a"}},
        "power": {"ts": 7, "fields": {"w": 1.5, "n": 2}, "tags": {}},
    }
    assert ledger.latest["power"]["fields"]["n"] == {"int": 2}  # the ledger's point is untouched
    assert detail["commands"] == [{"command_id": "c-1"}]
    assert fleet.device_detail("d1", _record(), None, None, [])["latest"] == {}


def test_list_and_filter_summaries() -> None:
    records = [_record("b"), _record("a"), _record("c")]
    statuses = {"a": _status("online"), "b": _status("offline"), "z": _status("late")}  # z: not in the registry
    ledgers = {"a": _ledger()}
    listed = fleet.list_summaries(records, statuses, ledgers.get)
    assert [(s["name"], s["state"]) for s in listed] == [
        ("a", "online"),
        ("b", "offline"),
        ("c", "never"),
        ("z", "late"),
    ]
    assert listed[0]["last_seen"] == 2500.0 and listed[1]["last_seen"] is None
    assert [s["name"] for s in fleet.list_summaries(records, statuses, ledgers.get, "offline")] == ["b"]
    assert [s["name"] for s in fleet.list_summaries(records, statuses, ledgers.get, "never")] == ["c"]
    assert fleet.state_counts(statuses.values()) == {"online": 1, "late": 1, "offline": 1}
    assert fleet.state_counts([]) == {"online": 0, "late": 0, "offline": 0}


# ---------------------------------------------------------------------------- helpers


async def start(nursery: trio.Nursery, tmp_path: Path, **overrides: Any) -> HubHandle:
    """A hub with its control channel, on any free port."""
    hub = await start_hub(nursery, hub_config(tmp_path, **overrides))
    assert hub.edge.endpoints[CONTROL_PATH] is hub.control
    return hub


async def device_state(ctl: Ctl, name: str, state: str) -> bool:
    """Whether the hub reports device `name` in presence state `state`."""
    return (await ctl.ok("device", name=name))["state"] == state


def assert_not_logged(caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    """No record of the hub's loggers (message, kv values or traceback) contains any of the `secrets`."""
    records = [r for r in caplog.records if r.name == "hub" or r.name.startswith("hub.")]
    assert records  # the check does see the hub's log
    for record in records:
        text = record.getMessage() + repr(getattr(record, "kv", None)) + (record.exc_text or "")
        for secret in secrets:
            assert secret.rsplit(".", 1)[1] not in text, record


async def close_code(ws: WebSocketConnection) -> int | None:
    """Read until the hub closes the connection; its close code."""
    with trio.fail_after(15):
        while True:
            try:
                await ws.get_message()
            except ConnectionClosed as exc:
                return exc.reason.code if exc.reason is not None else None


async def refused(hub: HubHandle, token: str | None, path: str = CONTROL_PATH, **kw: Any) -> int:
    with pytest.raises(ConnectionRejected) as exc:
        async with connect(hub, token, path=path, **kw):
            pass
    return exc.value.status_code


# ---------------------------------------------------------------------------- authentication


async def test_header_auth_and_ping(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, alice="operator")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        async with connect(hub, ops["alice"], path=CONTROL_PATH) as ws:
            ctl = Ctl(ws)
            assert await ctl.recv() == {"type": "auth_ok", "operator": "alice", "role": "operator"}
            await ctl.send({"id": 41, "type": "ping"})
            assert await ctl.recv() == {"type": "pong", "id": 41}
        hub.stop()


async def test_first_message_auth(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, bob="viewer")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        async with connect(hub, None, path=CONTROL_PATH) as ws:
            ctl = Ctl(ws)
            assert await ctl.recv() == {"type": "auth_required"}
            await ctl.send({"type": "auth", "token": ops["bob"]})
            assert await ctl.recv() == {"type": "auth_ok", "operator": "bob", "role": "viewer"}
            assert (await ctl.ok("status"))["control_sessions"] == 1
        hub.stop()


@pytest.mark.parametrize(
    "message",
    [
        {"type": "auth", "token": "op.bob.wrong"},
        {"type": "auth", "token": 7},
        {"type": "auth"},
        {"id": 1, "type": "status"},  # anything but auth first
        "not json",
    ],
)
async def test_first_message_auth_invalid(tmp_path: Path, message: Any) -> None:
    add_operators(tmp_path, bob="viewer")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        async with connect(hub, None, path=CONTROL_PATH) as ws:
            ctl = Ctl(ws)
            assert (await ctl.recv())["type"] == "auth_required"
            await ctl.send(message)
            answer = await ctl.recv()
            assert answer["type"] == "auth_invalid" and isinstance(answer["message"], str)
            assert await close_code(ws) == 1008
        hub.stop()


async def test_device_token_is_not_an_operator_token(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        assert await refused(hub, tokens["d1"]) == 401
        async with connect(hub, None, path=CONTROL_PATH) as ws:
            ctl = Ctl(ws)
            await ctl.recv()
            await ctl.send({"type": "auth", "token": tokens["d1"]})
            assert (await ctl.recv())["type"] == "auth_invalid"
            assert await close_code(ws) == 1008
        hub.stop()


async def test_first_message_auth_timeout(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path, **{"control.auth_timeout": 0.3})
        async with connect(hub, None, path=CONTROL_PATH) as ws:
            assert json.loads(await ws.get_message()) == {"type": "auth_required"}
            assert await close_code(ws) == 1008  # said nothing: closed, no auth_invalid frame
        hub.stop()


async def test_bad_header_credentials_refused_before_upgrade(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ops = add_operators(tmp_path, alice="admin", gone="admin")
    with Registry(tmp_path / "registry.sqlite3") as registry:
        registry.revoke_operator("gone")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        refused_before = hub.stats.refused
        assert await refused(hub, ops["alice"] + "x") == 401
        assert await refused(hub, ops["gone"]) == 401
        assert await refused(hub, None, headers=[(b"authorization", b"Basic " + ops["alice"].encode())]) == 401
        assert await refused(hub, None, headers=[(b"authorization", b"")]) == 401
        assert await refused(hub, None, headers=[(b"authorization", "Bearer op.alice.é".encode())]) == 401
        assert hub.stats.refused == refused_before + 5
        hub.stop()
    assert_not_logged(caplog, ops["alice"], ops["gone"])


async def test_token_in_query_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ops = add_operators(tmp_path, alice="admin")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        assert await refused(hub, None, path=f"{CONTROL_PATH}?token={ops['alice']}") == 401
        assert await refused(hub, ops["alice"], path=f"{CONTROL_PATH}?access_TOKEN=x") == 401
        async with control(hub, ops["alice"], path=f"{CONTROL_PATH}?v=1") as ctl:  # other queries are fine
            await ctl.ok("status")
        hub.stop()
    assert_not_logged(caplog, ops["alice"])


async def test_origin_checked(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, alice="viewer")
    good = [(b"origin", b"https://ops.example.com")]
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path, **{"control.allowed_origins": ["https://ops.example.com"]})
        assert await refused(hub, None, headers=[(b"origin", b"https://evil.example.com")]) == 403
        assert await refused(hub, ops["alice"], headers=[(b"origin", b"null")]) == 403
        assert await refused(hub, ops["alice"], headers=[(b"origin", b"https://ops.example.com.evil")]) == 403
        async with connect(hub, None, path=CONTROL_PATH, headers=good) as ws:  # a browser: first-message auth
            ctl = Ctl(ws)
            assert (await ctl.recv())["type"] == "auth_required"
            await ctl.send({"type": "auth", "token": ops["alice"]})
            assert (await ctl.recv())["type"] == "auth_ok"
        hub.stop()
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path / "default")  # no origins allowed by default
        assert await refused(hub, None, headers=good) == 403
        hub.stop()


async def test_revoked_operator_is_disconnected(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, alice="viewer", bob="viewer")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        async with control(hub, ops["alice"]) as alice, control(hub, ops["bob"]) as bob:
            with Registry(tmp_path / "registry.sqlite3") as registry:  # as `hub operator revoke` does
                registry.revoke_operator("alice")
            assert await close_code(alice.ws) == 4003
            assert (await bob.ok("status"))["control_sessions"] == 1
        assert await refused(hub, ops["alice"]) == 401
        hub.stop()


# ---------------------------------------------------------------------------- requests


async def test_roles(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, v="viewer", o="operator", a="admin")
    add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        async with control(hub, ops["v"]) as v, control(hub, ops["o"]) as o, control(hub, ops["a"]) as a:
            for kind in ("status", "devices", "commands"):
                await v.ok(kind)
            assert await v.error("send_command", device="d1", name="echo") == "forbidden"
            assert await v.error("cancel_command", command_id="c-x") == "forbidden"
            assert await v.error("device_add", name="d9") == "forbidden"
            sent = await o.ok("send_command", device="d1", name="echo")
            assert sent["operator"] == "o"
            assert (await o.ok("cancel_command", command_id=sent["command_id"]))["state"] == "cancelled"
            for kind in ("device_add", "device_revoke", "device_rotate"):
                assert await o.error(kind, name="d9") == "forbidden"
            assert (await a.ok("device_add", name="d9"))["name"] == "d9"
            assert (await a.ok("send_command", device="d9", name="echo"))["operator"] == "a"
            assert await v.error("device_add", name="d9") == "forbidden"  # forbidden before exists
        hub.stop()


async def test_bad_frames(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, v="viewer")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        async with control(hub, ops["v"]) as ctl:
            for frame in ("not json", "[1, 2]", '{"type": "status"}', '{"id": "7", "type": "status"}', "NaN"):
                await ctl.send(frame)
                answer = await ctl.reply(None)
                assert answer["success"] is False and answer["error"]["code"] == "bad_request", frame
            await ctl.ws.send_message(b'{"id": 1, "type": "status"}')  # binary
            assert (await ctl.reply(None))["error"]["code"] == "bad_request"
            await ctl.send('{"id": true, "type": "status"}')
            assert (await ctl.reply(None))["error"]["code"] == "bad_request"
            await ctl.send({"id": 5})
            assert (await ctl.reply(5))["error"]["code"] == "bad_request"
            assert await ctl.error("reboot_the_world") == "unknown_type"
            assert await ctl.error("auth", token="x") == "unknown_type"
            await ctl.ok("status")  # the session carries on
        hub.stop()


def test_every_request_type_has_a_handler() -> None:
    assert not set(HANDLERS) & set(_SESSION_HANDLERS)
    assert set(HANDLERS) | set(_SESSION_HANDLERS) == {spec.request for spec in REQUESTS.values()}


async def test_every_request_type_answers_with_the_reply_shape_of_the_table(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, a="admin")
    add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        async with control(hub, ops["a"]) as ctl:
            queued = (await ctl.ok("send_command", device="d1", name="x"))["command_id"]
            sub = (await ctl.ok("subscribe", topic="commands"))["subscription"]
            await ctl.ok("device_label", name="d1", set={"site": "x"})
            job = {"selector": "site=x", "action": {"type": "command", "name": "z"}}
            job_id = (await ctl.ok("job_create", **job))["job_id"]  # d1 is offline: the job stays running
            requests: dict[str, dict[str, Any]] = {
                "ping": {},
                "status": {},
                "devices": {},
                "device": {"name": "d1"},
                "commands": {},
                "command": {"command_id": queued},
                "send_command": {"device": "d1", "name": "y"},
                "cancel_command": {"command_id": queued},
                "subscribe": {"topic": "presence"},
                "unsubscribe": {"subscription": sub},
                "device_add": {"name": "d2"},
                "device_rotate": {"name": "d2"},
                "device_revoke": {"name": "d2"},
                "device_label": {"name": "d2", "set": {"site": "berlin"}},
                "twin": {"device": "d1"},
                "twin_set": {"device": "d1", "patch": {"interval": 5}},
                "job_create": job,
                "jobs": {},
                "job": {"job_id": job_id},
                "job_cancel": {"job_id": job_id},
            }
            assert set(requests) == set(REQUESTS)
            for kind, args in requests.items():
                reply = REQUESTS[kind].reply
                frame = await ctl.call(kind, **args)
                if reply is Reply.PONG:
                    assert frame == {"type": "pong", "id": ctl._id}
                else:
                    assert reply.json_type is not None
                    assert frame["success"] is True and isinstance(frame["result"], reply.json_type), frame
        hub.stop()


async def test_too_many_bad_frames_closes_1008(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, v="viewer")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path, **{"control.max_errors": 3})
        async with control(hub, ops["v"]) as ctl:
            for _ in range(3):
                assert await ctl.error("nope") == "unknown_type"
            await ctl.ok("status")  # good requests do not count
            await ctl.send("garbage")
            assert (await ctl.recv())["error"]["code"] == "bad_request"
            assert await close_code(ctl.ws) == 1008
        hub.stop()


async def test_too_big_frame_closes_1009(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, v="viewer")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path, **{"control.max_message_bytes": 1000})
        async with control(hub, ops["v"]) as ctl:
            await ctl.ok("devices", state="online", padding="x" * 900)  # under the limit
            await ctl.send({"id": 2, "type": "status", "padding": "é" * 600})  # 600 characters, 1200 bytes
            assert await close_code(ctl.ws) == 1009
        hub.stop()


async def test_status(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, v="viewer", o="operator")
    tokens = add_devices(tmp_path, "d1", "d2", "d3")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        async with control(hub, ops["v"]) as ctl, control(hub, ops["o"]) as op:
            await op.ok("send_command", device="d3", name="reboot")
            async with connect(hub, tokens["d1"]) as ws:
                await hello(ws)
                await send_batch(ws, 1, points(5))
                await wait_ack(ws, 1)
                status = await ctl.ok("status")
        hub.stop()
    assert set(status) == {
        "version",
        "uptime",
        "connections",
        "devices",
        "ingest",
        "commands",
        "control_sessions",
    }
    assert isinstance(status["version"], str) and status["uptime"] >= 0
    assert status["connections"] == 1
    assert status["devices"] == {"online": 1, "late": 0, "offline": 0, "registered": 3}
    ingest = status["ingest"]
    assert set(ingest) == {
        "points_in",
        "points_written",
        "points_spooled",
        "points_replayed",
        "points_dropped",
        "spool_bytes",
        "sink_up",
    }
    assert ingest["points_in"] == 5 and ingest["points_written"] >= 5 and ingest["sink_up"] is True
    assert status["commands"] == {"queued": 1}
    assert status["control_sessions"] == 2


async def test_devices_and_device(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, v="viewer")
    tokens = add_devices(tmp_path, "d2", "d1", "d3")
    with Registry(tmp_path / "registry.sqlite3") as registry:
        registry.revoke("d3")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        async with control(hub, ops["v"]) as ctl:
            async with connect(hub, tokens["d1"]) as ws:
                await hello(ws, firmware="2.0", model="th-100", interval=60)
                pts = points(3)
                pts.append({"measurement": "power", "ts": BASE_TS + 9, "fields": {"w": 3.5, "n": {"int": 4}}})
                await send_batch(ws, 1, pts)
                await wait_ack(ws, 1)
                listed = await ctl.ok("devices")
                assert [(d["name"], d["state"], d["revoked"]) for d in listed] == [
                    ("d1", "online", False),
                    ("d2", "never", False),
                    ("d3", "never", True),
                ]
                assert all(set(d) == SUMMARY_KEYS for d in listed)
                d1 = listed[0]
                assert (d1["firmware"], d1["model"], d1["interval"], d1["epoch"]) == ("2.0", "th-100", 60.0, 1)
                assert d1["last_seen"] is not None and d1["reason"] == "connected"
                assert [d["name"] for d in await ctl.ok("devices", state="online")] == ["d1"]
                assert await ctl.ok("devices", state="offline") == []

                detail = await ctl.ok("device", name="d1")
                assert set(detail) == SUMMARY_KEYS | {"latest", "commands"}
                assert detail["latest"] == {
                    "environment": {
                        "ts": BASE_TS + 2,
                        "fields": {"temperature": 20.2, "count": 2},
                        "tags": {"room": "lab 2"},
                    },
                    "power": {"ts": BASE_TS + 9, "fields": {"w": 3.5, "n": 4}, "tags": {}},
                }
                assert detail["commands"] == []
            await eventually(lambda: device_state(ctl, "d1", "offline"), 10)
            assert (await ctl.ok("device", name="d1"))["reason"] == "disconnected"
            assert [d["name"] for d in await ctl.ok("devices", state="offline")] == ["d1"]
            assert (await ctl.ok("device", name="d2"))["latest"] == {}

            assert await ctl.error("device", name="ghost") == "not_found"
            assert await ctl.error("device") == "bad_request"
            assert await ctl.error("device", name=5) == "bad_request"
            assert await ctl.error("devices", state="sleeping") == "bad_request"
            assert await ctl.error("devices", state=1) == "bad_request"
        hub.stop()


async def test_commands_requests(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, o="operator")
    add_devices(tmp_path, "d1", "d2")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path, **{"commands.max_queue": 3})
        async with control(hub, ops["o"]) as ctl:
            first = await ctl.ok("send_command", device="d1", name="set.rate-1_x", args={"hz": 2}, ttl=60, timeout=5)
            assert set(first) == {
                "command_id",
                "device",
                "name",
                "args",
                "state",
                "created",
                "updated",
                "expires",
                "timeout",
                "idempotency_key",
                "operator",
                "result",
                "error",
                "history",
            }
            assert (first["device"], first["name"], first["args"], first["state"]) == (
                "d1",
                "set.rate-1_x",
                {"hz": 2},
                "queued",
            )
            assert first["expires"] == pytest.approx(first["created"] + 60)
            assert first["timeout"] == 5 and first["operator"] == "o"
            assert [h["state"] for h in first["history"]] == ["queued"]
            second = await ctl.ok("send_command", device="d1", name="b", idempotency_key="k1")
            again = await ctl.ok("send_command", device="d1", name="b", idempotency_key="k1")
            assert again["command_id"] == second["command_id"]
            third = await ctl.ok("send_command", device="d2", name="c")
            await ctl.ok("send_command", device="d1", name="d")
            assert await ctl.error("send_command", device="d1", name="e") == "queue_full"

            listed = await ctl.ok("commands")
            assert [c["name"] for c in listed] == ["d", "c", "b", "set.rate-1_x"]  # newest first
            assert [c["name"] for c in await ctl.ok("commands", device="d1", limit=2)] == ["d", "b"]
            assert [c["name"] for c in await ctl.ok("commands", device="d2")] == ["c"]
            assert await ctl.ok("commands", state="succeeded") == []
            assert (await ctl.ok("command", command_id=third["command_id"]))["device"] == "d2"
            assert len((await ctl.ok("device", name="d1"))["commands"]) == 3

            cancelled = await ctl.ok("cancel_command", command_id=first["command_id"])
            assert cancelled["state"] == "cancelled"
            assert [h["state"] for h in cancelled["history"]] == ["queued", "cancelled"]
            assert await ctl.error("cancel_command", command_id=first["command_id"]) == "invalid_state"
            assert [c["name"] for c in await ctl.ok("commands", state="cancelled")] == ["set.rate-1_x"]

            assert await ctl.error("command", command_id="c-none") == "not_found"
            assert await ctl.error("cancel_command", command_id="c-none") == "not_found"
            assert await ctl.error("send_command", device="ghost", name="x") == "not_found"
            assert await ctl.error("send_command", device="d2", name="bad name!") == "bad_command"
            assert await ctl.error("send_command", device="d2", name="x", args=[1]) == "bad_command"
            assert await ctl.error("send_command", device="d2", name="x", args={"b": "x" * 20000}) == "bad_command"
            assert await ctl.error("send_command", device="d2", name="x", ttl=10**7) == "bad_command"
            assert await ctl.error("send_command", device="d2", name="x", timeout=0) == "bad_command"
            assert await ctl.error("send_command", device="d2") == "bad_request"
            assert await ctl.error("send_command", device="d2", name="x", ttl="1h") == "bad_request"
            assert await ctl.error("send_command", device="d2", name="x", ttl=True) == "bad_request"
            assert await ctl.error("send_command", device="d2", name="x", wait="yes") == "bad_request"
            assert await ctl.error("send_command", device="d2", name="x", wait=True, wait_timeout=-1) == "bad_request"
            assert await ctl.error("commands", limit=0) == "bad_request"
            assert await ctl.error("commands", limit=1001) == "bad_request"
            assert await ctl.error("commands", state="done") == "bad_request"
            assert await ctl.error("command") == "bad_request"
            # Integers too large for a float are out of range, not an internal error (which would close the session).
            assert await ctl.error("send_command", device="d2", name="x", ttl=10**400) == "bad_command"
            assert await ctl.error("send_command", device="d2", name="x", wait_timeout=10**400) == "bad_request"
            assert len(await ctl.ok("commands", limit=1000)) == 4  # none of the refused ones was stored
        hub.stop()


async def test_device_registry_requests(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ops = add_operators(tmp_path, a="admin")
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        async with control(hub, ops["a"]) as ctl:
            added = await ctl.ok("device_add", name="d2")
            assert added["name"] == "d2" and added["token"].startswith("d2.")
            async with connect(hub, added["token"]) as ws:
                assert (await hello(ws)).device == "d2"
            assert await ctl.error("device_add", name="d2") == "exists"
            assert await ctl.error("device_add", name="bad.name") == "bad_request"
            assert await ctl.error("device_add") == "bad_request"

            rotated = await ctl.ok("device_rotate", name="d2")
            assert rotated["name"] == "d2" and rotated["token"] != added["token"]
            assert await refused(hub, added["token"], path=protocol.DEVICE_PATH) == 401
            assert await ctl.error("device_rotate", name="ghost") == "not_found"

            async with connect(hub, tokens["d1"]) as ws:  # revoking closes the open session at once
                await hello(ws)
                assert await ctl.ok("device_revoke", name="d1") == {}
                assert await close_code(ws) == 4003
            assert await refused(hub, tokens["d1"], path=protocol.DEVICE_PATH) == 401
            assert await ctl.error("device_revoke", name="ghost") == "not_found"
            assert [(d["name"], d["revoked"]) for d in await ctl.ok("devices")] == [("d1", True), ("d2", False)]
        hub.stop()
    with Registry(tmp_path / "registry.sqlite3") as registry:
        assert registry.authenticate(rotated["token"]) == "d2"
    assert_not_logged(caplog, ops["a"], added["token"], rotated["token"], tokens["d1"])


# ---------------------------------------------------------------------------- commands with a device


async def next_command(ws: WebSocketConnection) -> Command:
    """The next command frame a raw device receives (acks in between are skipped)."""
    with trio.fail_after(10):
        while True:
            msg = protocol.decode(await ws.get_message())
            if isinstance(msg, Command):
                return msg


async def test_send_command_wait_with_device_client(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, o="operator")
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        client = DeviceClient(url(hub), tokens["d1"])

        @client.command("echo")
        async def echo(args: dict[str, Any]) -> Any:
            return {"echo": args}

        @client.command("fail")
        async def fail(args: dict[str, Any]) -> Any:
            raise RuntimeError("sensor unplugged")

        async with client, control(hub, ops["o"]) as ctl:
            await eventually(lambda: device_state(ctl, "d1", "online"), 10)
            done = await ctl.ok("send_command", device="d1", name="echo", args={"x": 1}, wait=True)
            assert done["state"] == "succeeded"
            assert done["result"] == {"echo": {"x": 1}}
            assert [h["state"] for h in done["history"]] == ["queued", "sent", "delivered", "succeeded"]
            failed = await ctl.ok("send_command", device="d1", name="fail", wait=True, wait_timeout=20)
            assert (failed["state"], failed["error"]) == ("failed", "sensor unplugged")
            unknown = await ctl.ok("send_command", device="d1", name="nope", wait=True)
            assert unknown["state"] == "failed" and "unknown command" in unknown["error"]
            assert (await ctl.ok("command", command_id=done["command_id"]))["state"] == "succeeded"
        hub.stop()


async def test_send_command_wait_with_raw_device(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, o="operator")
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        async with control(hub, ops["o"]) as ctl, connect(hub, tokens["d1"]) as dev:
            await hello(dev)
            # Two waits in flight on one session; the reader keeps answering meanwhile.
            await ctl.send({"id": 100, "type": "send_command", "device": "d1", "name": "slow", "wait": True})
            await ctl.send({"id": 101, "type": "send_command", "device": "d1", "name": "quick", "wait": True})
            slow, quick = await next_command(dev), await next_command(dev)
            assert (slow.name, quick.name) == ("slow", "quick")
            await dev.send_message(protocol.encode(CommandAck(quick.id)))
            await dev.send_message(protocol.encode(CommandAck(slow.id)))
            assert (await ctl.ok("command", command_id=slow.id))["state"] == "delivered"
            await dev.send_message(protocol.encode(CommandResult(quick.id, True, [1, 2])))
            reply = await ctl.reply(101)
            assert (reply["result"]["state"], reply["result"]["result"]) == ("succeeded", [1, 2])
            await dev.send_message(protocol.encode(CommandResult(slow.id, False, error="too slow")))
            reply = await ctl.reply(100)
            assert reply["success"] is True
            assert (reply["result"]["state"], reply["result"]["error"]) == ("failed", "too slow")

            # wait_timeout runs out first: success, with the state reached so far
            await ctl.send(
                {"id": 102, "type": "send_command", "device": "d1", "name": "x", "wait": True, "wait_timeout": 0.2}
            )
            pending = await next_command(dev)
            reply = await ctl.reply(102)
            assert reply["success"] is True and reply["result"]["command_id"] == pending.id
            assert reply["result"]["state"] in ("queued", "sent")
            await dev.send_message(protocol.encode(CommandResult(pending.id, True)))  # final after the wait ended
            await eventually(lambda: hub.commands.is_open(pending.id) is False, 10)
            assert (await ctl.call("ping"))["type"] == "pong"  # every frame sent before it has been read
            assert [f for f in ctl.pushes if f.get("type") == "result"] == []  # each wait answered once
        hub.stop()


async def test_wait_answered_by_the_final_transition_even_before_its_task_runs(tmp_path: Path) -> None:
    # The reply hook goes in as the command is submitted, not when the session's waiting task first runs: with every
    # wait slot taken (MAX_WAITS) the session holds before it starts that task, yet the reply comes when the command
    # is final, not when a slot frees (30 s later here).
    ops = add_operators(tmp_path, o="operator")
    tokens = add_devices(tmp_path, "d1", "d2")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        async with control(hub, ops["o"]) as ctl, connect(hub, tokens["d1"]) as dev:
            await hello(dev)
            for i in range(MAX_WAITS):  # d2 is offline: each of these waits 30 s
                frame = {"id": 200 + i, "type": "send_command", "device": "d2", "name": "x", "wait": True}
                await ctl.send({**frame, "wait_timeout": 30})
            await ctl.send({"id": 300, "type": "send_command", "device": "d1", "name": "now", "wait": True})
            command = await next_command(dev)
            await dev.send_message(protocol.encode(CommandAck(command.id)))
            await dev.send_message(protocol.encode(CommandResult(command.id, True, "done")))
            with trio.fail_after(10):
                reply = await ctl.reply(300)
            assert (reply["result"]["state"], reply["result"]["result"]) == ("succeeded", "done")
        hub.stop()


async def test_wait_reply_for_command_to_offline_device_times_out(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, o="operator")
    add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        async with control(hub, ops["o"]) as ctl:
            record = await ctl.ok("send_command", device="d1", name="x", wait=True, wait_timeout=0.1)
            assert record["state"] == "queued"
            record = await ctl.ok("send_command", device="d1", name="y", ttl=0.1, wait=True, wait_timeout=30)
            assert record["state"] == "expired"  # the TTL ran out before the wait did
        hub.stop()


async def test_waits_are_answered_in_deadline_order_and_a_closed_session_leaves_no_hook(tmp_path: Path) -> None:
    # One timer per session answers the waits still open at their deadlines: a short wait sent after a long one is
    # answered first (the timer wakes for it), and the long ones' hooks go with the session.
    ops = add_operators(tmp_path, o="operator")
    add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        async with control(hub, ops["o"]) as ctl:
            for rid in (1, 2):
                await ctl.send({"id": rid, "type": "send_command", "device": "d1", "name": "x", "wait": True})
            await ctl.send(
                {"id": 3, "type": "send_command", "device": "d1", "name": "y", "wait": True, "wait_timeout": 0.2}
            )
            reply = await ctl.recv(20)  # a hang guard: the others wait the default 30 s
            assert (reply["id"], reply["success"], reply["result"]["state"]) == (3, True, "queued")
            waiting = [rec.command_id for rec in await hub.commands.list(state="queued")]
            assert len(waiting) == 3
        assert hub.commands.when_final(waiting[0], lambda rec: None)  # still open: a hook may go in...
        hub.commands.when_final(waiting[0], None)
        await eventually(lambda: not hub.commands._final_hooks, 10)  # ...but the closed session's are gone
        hub.stop()


# ---------------------------------------------------------------------------- subscriptions


async def test_telemetry_subscriptions(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, v="viewer")
    tokens = add_devices(tmp_path, "d1", "d2")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        async with control(hub, ops["v"]) as ctl:
            only_d1 = (await ctl.ok("subscribe", topic="telemetry", devices=["d1"]))["subscription"]
            everything = (await ctl.ok("subscribe", topic="telemetry"))["subscription"]
            assert only_d1 != everything
            async with connect(hub, tokens["d1"]) as d1, connect(hub, tokens["d2"]) as d2:
                await hello(d1)
                await hello(d2)
                await send_batch(d2, 1, [{"measurement": "m", "ts": BASE_TS, "fields": {"v": 1.0}}])
                await wait_ack(d2, 1)
                point = {"measurement": "env", "ts": BASE_TS + 1, "fields": {"t": 21.5, "n": {"int": 3}}, "tags": {}}
                await send_batch(d1, 1, [point])
                await wait_ack(d1, 1)
                [event] = await ctl.events(only_d1, 1)
                assert event == {
                    "device": "d1",
                    "measurement": "env",
                    "ts": BASE_TS + 1,
                    "fields": {"t": 21.5, "n": 3},
                    "tags": {},
                }
                seen = await ctl.events(everything, 2)
                assert [(e["device"], e["measurement"]) for e in seen] == [("d2", "m"), ("d1", "env")]

                assert await ctl.ok("unsubscribe", subscription=only_d1) == {}
                assert all(p["subscription"] != only_d1 for p in ctl.pushes)
                await send_batch(d1, 2, [{**point, "ts": BASE_TS + 2}])
                await wait_ack(d1, 2)
                [event] = await ctl.events(everything, 1)
                assert event["ts"] == BASE_TS + 2
                await ctl.call("ping")  # a round trip after the event: anything pending has arrived
                assert all(p["subscription"] != only_d1 for p in ctl.pushes)
            assert await ctl.error("unsubscribe", subscription=only_d1) == "not_found"
            assert await ctl.error("unsubscribe", subscription=9999) == "not_found"
            assert await ctl.error("unsubscribe") == "bad_request"
        hub.stop()


async def test_presence_and_commands_subscriptions(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, o="operator")
    tokens = add_devices(tmp_path, "d1", "d2")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        async with control(hub, ops["o"]) as ctl:
            presence = (await ctl.ok("subscribe", topic="presence", devices=["d1"]))["subscription"]
            commands = (await ctl.ok("subscribe", topic="commands", devices=None))["subscription"]
            async with connect(hub, tokens["d2"]) as d2:
                await hello(d2)
                async with connect(hub, tokens["d1"]) as d1:
                    await hello(d1, firmware="3.1")
                    [online] = await ctl.events(presence, 1)
                    assert set(online) == SUMMARY_KEYS
                    assert (online["name"], online["state"], online["firmware"]) == ("d1", "online", "3.1")
                    record = await ctl.ok("send_command", device="d1", name="echo")
                    cmd = await next_command(d1)
                    await d1.send_message(protocol.encode(CommandAck(cmd.id)))
                    await d1.send_message(protocol.encode(CommandResult(cmd.id, True, "ok")))
                    states = []
                    while "succeeded" not in states:  # later states may coalesce over earlier ones
                        [event] = await ctl.events(commands, 1)
                        assert event["command_id"] == record["command_id"]
                        states.append(event["state"])
                    assert states == sorted(states, key=["queued", "sent", "delivered", "succeeded"].index)
                [offline] = await ctl.events(presence, 1)
                assert (offline["name"], offline["state"], offline["reason"]) == ("d1", "offline", "disconnected")
            await ctl.call("ping")
            # d2's presence changes never reached the d1-only subscription
            assert all(p["event"]["name"] == "d1" for p in ctl.pushes if p["subscription"] == presence)
        hub.stop()


async def test_subscription_limit_and_bad_subscribe(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, v="viewer", w="viewer")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path, **{"control.max_subscriptions": 2})
        async with control(hub, ops["v"]) as ctl, control(hub, ops["w"]) as other:
            first = (await ctl.ok("subscribe", topic="presence"))["subscription"]
            await ctl.ok("subscribe", topic="commands")
            assert await ctl.error("subscribe", topic="telemetry") == "too_many_subscriptions"
            await other.ok("subscribe", topic="telemetry")  # the limit is per session
            await ctl.ok("unsubscribe", subscription=first)
            await ctl.ok("subscribe", topic="telemetry")
            assert await other.error("unsubscribe", subscription=first) == "not_found"
            assert await other.error("subscribe", topic="weather") == "bad_request"
            assert await other.error("subscribe") == "bad_request"
            assert await other.error("subscribe", topic="telemetry", devices="d1") == "bad_request"
            assert await other.error("subscribe", topic="telemetry", devices=[1]) == "bad_request"
            assert await other.error("subscribe", topic="telemetry", devices=[]) == "bad_request"
        hub.stop()
    assert hub.broadcaster.subscriptions == 0  # closed sessions leave no subscription behind


def _big_points(batch: int, n: int) -> list[dict[str, Any]]:
    """`n` points of ~40 KB each, each its own series (so no event ever coalesces with another)."""
    fields = {f"blob{k}": "x" * 4000 for k in range(10)}
    return [{"measurement": f"m{batch}_{i}", "ts": BASE_TS + batch, "fields": fields} for i in range(n)]


async def test_stuck_subscriber_does_not_slow_ingest(tmp_path: Path) -> None:
    """Counts, never times: a subscriber that stops reading loses its own events, ingest loses nothing."""
    batches, per_batch = 40, 5  # 8 MB of events: more than the socket buffers on both sides hold
    ops = add_operators(tmp_path, v="viewer")
    tokens = add_devices(tmp_path, "d1")
    overrides = {"control.buffer": 20, "presence.ping_interval": 600.0}
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path, **overrides)

        async def stream(first_seq: int) -> int:
            acked = 0
            async with connect(hub, tokens["d1"]) as ws:
                await hello(ws)
                for seq in range(first_seq, first_seq + batches):
                    await send_batch(ws, seq, _big_points(seq, per_batch))
                    await wait_ack(ws, seq)
                    acked += 1
            return acked

        with trio.fail_after(60):
            assert await stream(1) == batches  # nobody watching

        # A subscriber with a tiny receive buffer that stops reading once subscribed.
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", hub.port))
        auth = [(b"authorization", f"Bearer {ops['v']}".encode())]
        async with trio.open_nursery() as client_tasks:
            ws = await wrap_client_stream(
                client_tasks,
                trio.SocketStream(sock),
                "127.0.0.1",
                CONTROL_PATH,
                extra_headers=auth,
                message_queue_size=1,
            )
            stuck = Ctl(ws)
            assert (await stuck.recv())["type"] == "auth_ok"
            sub = (await stuck.ok("subscribe", topic="telemetry"))["subscription"]

            with trio.fail_after(60):
                assert await stream(1 + batches) == batches  # every batch acked with the subscriber stuck

            # Now it reads: every published point was delivered, coalesced or dropped, and it was told.
            published = batches * per_batch
            delivered, notices = 0, []
            with trio.fail_after(30):
                while True:
                    totals = hub.broadcaster.totals()
                    if delivered + totals["dropped"] + totals["coalesced"] == published:
                        break
                    frame = await stuck.push()
                    assert frame["subscription"] == sub
                    if frame["type"] == "event":
                        delivered += 1
                    else:
                        notices.append(frame)
            assert totals["dropped"] > 0
            assert notices and notices[-1]["dropped"] == totals["dropped"]
            assert [n["dropped"] for n in notices] == sorted(n["dropped"] for n in notices)  # cumulative
            await ws.aclose()
            client_tasks.cancel_scope.cancel()
        hub.stop()
    assert hub.stats.points_in == 2 * batches * per_batch


async def test_hub_shutdown_closes_sessions_1001(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, v="viewer")
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path)
        async with control(hub, ops["v"]) as ctl:
            await ctl.ok("subscribe", topic="presence")
            hub.stop()
            assert await close_code(ctl.ws) == 1001


async def test_silent_client_is_dropped_by_keepalive(tmp_path: Path) -> None:
    ops = add_operators(tmp_path, v="viewer")
    overrides = {"presence.ping_interval": 0.2, "presence.ping_timeout": 0.2}
    async with trio.open_nursery() as nursery:
        hub = await start(nursery, tmp_path, **overrides)
        # A hand-made upgrade; afterwards nothing reads the socket, so no pong ever goes back.
        status, _, stream = await upgrade(hub.port, CONTROL_PATH, headers={"Authorization": f"Bearer {ops['v']}"})
        assert status == 101
        await eventually(lambda: hub.control.sessions == 1, 10)
        await eventually(lambda: hub.control.sessions == 0, 10)  # pinged, no pong: closed
        async with control(hub, ops["v"]) as ctl:  # an answering client stays
            for _ in range(3):
                await trio.sleep(0.3)  # the scenario: longer than a ping interval plus its timeout
                assert (await ctl.ok("status"))["control_sessions"] == 1
        await stream.aclose()
        hub.stop()
