"""Tests of the control-channel client library: against scripted peers on loopback, then a real hub."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from hub.control import ControlError, Device, Devices
from hub.fleet import Registry
from hub.operator import (
    AuthRefused,
    ClientError,
    ConnectFailed,
    Disconnected,
    Dropped,
    ErrorCode,
    Event,
    ReplyTimeout,
    RequestFailed,
    control_url,
    open_control,
)
from tests.hubtools import add_devices, hub_config, start_hub
from tests.ports import refused_port
from tests.waiting import eventually

TOKEN = "op.alice.s3cret"

Handler = Callable[[WebSocketConnection], Awaitable[None]]


# ---------------------------------------------------------------------------- scripted peers


@asynccontextmanager
async def peer(session: Handler, *, auth: str = "header", status: int = 401) -> AsyncIterator[str]:
    """A WebSocket server on loopback that authenticates like the hub, then runs `session`; its URL.

    auth: "header" (the Authorization header, else `status` before the upgrade), "message"
    (auth_required, then the auth frame), or "accept" (no auth_ok at all: `session` decides).
    """

    async def handler(request: WebSocketRequest) -> None:
        headers = dict(request.headers)
        if auth == "header" and headers.get(b"authorization") != f"Bearer {TOKEN}".encode():
            await request.reject(status, body=b"bad token")
            return
        ws = await request.accept()
        if auth == "header":
            await ws.send_message(json.dumps({"type": "auth_ok", "operator": "alice", "role": "operator"}))
        elif auth == "message":
            await ws.send_message(json.dumps({"type": "auth_required"}))
            msg = json.loads(await ws.get_message())
            if msg != {"type": "auth", "token": TOKEN}:
                await ws.send_message(json.dumps({"type": "auth_invalid", "message": "unknown token"}))
                await ws.aclose(1008, "authentication failed")
                return
            await ws.send_message(json.dumps({"type": "auth_ok", "operator": "alice", "role": "viewer"}))
        await session(ws)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_websocket, handler, "127.0.0.1", 0, None))
        yield f"ws://127.0.0.1:{server.port}/v1/control"
        nursery.cancel_scope.cancel()


async def requests(ws: WebSocketConnection) -> AsyncIterator[dict[str, Any]]:
    """The decoded frames a peer receives, until the client closes."""
    try:
        while True:
            yield json.loads(await ws.get_message())
    except ConnectionClosed:
        return


def ok(req: dict[str, Any], result: Any) -> str:
    return json.dumps({"id": req["id"], "type": "result", "success": True, "result": result})


async def echo_session(ws: WebSocketConnection) -> None:
    """Answers every request with its own arguments; `ping` with a pong."""
    async for req in requests(ws):
        if req["type"] == "ping":
            await ws.send_message(json.dumps({"type": "pong", "id": req["id"]}))
        else:
            await ws.send_message(ok(req, req))


# ---------------------------------------------------------------------------- URL


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("ws://hub:8765", "ws://hub:8765/v1/control"),
        ("ws://hub:8765/", "ws://hub:8765/v1/control"),
        ("wss://hub.example/v1/control", "wss://hub.example/v1/control"),
        ("ws://10.0.0.1:9000/custom/path", "ws://10.0.0.1:9000/custom/path"),
    ],
)
def test_control_url(given: str, expected: str) -> None:
    assert control_url(given) == expected


@pytest.mark.parametrize("bad", ["http://hub:8765", "hub:8765", "ws://", "ws://hub/v1/control?token=abc"])
def test_control_url_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        control_url(bad)


# ---------------------------------------------------------------------------- connecting


async def test_header_auth_and_requests() -> None:
    async with peer(echo_session) as url, open_control(url, TOKEN) as hub:
        assert (hub.operator, hub.role) == ("alice", "operator")
        assert await hub.devices() == {"id": 1, "type": "devices"}
        assert await hub.devices("online") == {"id": 2, "type": "devices", "state": "online"}
        assert await hub.commands("s-1", limit=5) == {"id": 3, "type": "commands", "device": "s-1", "limit": 5}
        sent = await hub.send_command("s-1", "reboot", {"n": 5}, ttl=60, idempotency_key="k", wait=True)
        assert sent == {
            "id": 4,
            "type": "send_command",
            "device": "s-1",
            "name": "reboot",
            "args": {"n": 5},
            "ttl": 60,
            "idempotency_key": "k",
            "wait": True,
        }
        assert await hub.ping() >= 0


async def test_first_message_auth() -> None:
    async with peer(echo_session, auth="message") as url, open_control(url, TOKEN) as hub:
        assert hub.role == "viewer"
        assert (await hub.status())["type"] == "status"


async def test_bad_token_is_auth_refused_with_401() -> None:
    async with peer(echo_session) as url:
        with pytest.raises(AuthRefused) as info:
            async with open_control(url, "op.alice.wrong"):
                pytest.fail("connected with a bad token")
    assert info.value.status == 401


async def test_auth_invalid_is_auth_refused() -> None:
    async with peer(echo_session, auth="message") as url:
        with pytest.raises(AuthRefused, match="unknown token"):
            async with open_control(url, "op.alice.wrong"):
                pytest.fail("connected with a bad token")


async def test_close_during_auth_is_auth_refused() -> None:
    async def close_1008(ws: WebSocketConnection) -> None:
        await ws.aclose(1008, "authentication timed out")

    async with peer(close_1008, auth="accept") as url:
        with pytest.raises(AuthRefused, match="1008"):
            async with open_control(url, TOKEN):
                pytest.fail("connected without auth_ok")


async def test_other_http_refusal_is_connect_failed_not_auth() -> None:
    async with peer(echo_session, status=404) as url:
        with pytest.raises(ConnectFailed) as info:
            async with open_control(url, "op.alice.wrong"):
                pytest.fail("connected")
    assert info.value.status == 404
    assert not isinstance(info.value, AuthRefused)


async def test_nothing_listening_is_connect_failed() -> None:
    with pytest.raises(ConnectFailed, match="cannot connect"):
        async with open_control(f"ws://127.0.0.1:{refused_port()}", TOKEN):
            pytest.fail("connected to nothing")


async def test_a_peer_that_accepts_tcp_and_says_nothing_times_out() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        sock.listen(1)  # the kernel completes the TCP handshake; nobody ever answers the upgrade
        port = sock.getsockname()[1]
        with trio.fail_after(10), pytest.raises(ConnectFailed, match=r"within 0\.3 s"):
            async with open_control(f"ws://127.0.0.1:{port}", TOKEN, connect_timeout=0.3):
                pytest.fail("connected")


async def test_no_auth_ok_in_time_is_connect_failed() -> None:
    async with peer(lambda ws: trio.sleep_forever(), auth="accept") as url:
        with trio.fail_after(10), pytest.raises(ConnectFailed, match=r"within 0\.3 s"):
            async with open_control(url, TOKEN, connect_timeout=0.3):
                pytest.fail("connected without auth_ok")


def test_bad_token_text_is_refused_before_connecting() -> None:
    async def attempt() -> None:
        async with open_control("ws://127.0.0.1:1", "op.a.b\r\nX-Evil: 1"):
            pytest.fail("connected")

    with pytest.raises(ValueError, match="printable"):
        trio.run(attempt)


async def test_an_error_in_the_body_propagates_as_itself() -> None:
    async with peer(echo_session) as url:
        with pytest.raises(KeyError):
            async with open_control(url, TOKEN):
                raise KeyError("mine")


# ---------------------------------------------------------------------------- requests and replies


async def test_replies_are_matched_by_id_in_any_order() -> None:
    async def reversed_session(ws: WebSocketConnection) -> None:
        first = json.loads(await ws.get_message())
        second = json.loads(await ws.get_message())
        await ws.send_message(ok(second, second["name"]))
        await ws.send_message(ok(first, first["name"]))
        async for _ in requests(ws):
            pass

    got: dict[str, Any] = {}
    async with peer(reversed_session) as url, open_control(url, TOKEN) as hub:

        async def ask(name: str) -> None:
            got[name] = await hub.device(name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "a")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(ask, "b")
    assert got == {"a": "a", "b": "b"}


async def test_error_reply_raises_request_failed_with_code() -> None:
    async def refusing(ws: WebSocketConnection) -> None:
        async for req in requests(ws):
            error = {"code": ErrorCode.NOT_FOUND, "message": f"no command {req['command_id']!r}"}
            await ws.send_message(json.dumps({"id": req["id"], "type": "result", "success": False, "error": error}))

    async with peer(refusing) as url, open_control(url, TOKEN) as hub:
        with pytest.raises(RequestFailed) as info:
            await hub.cancel_command("c-9")
        assert (info.value.code, info.value.message, info.value.request) == (
            "not_found",
            "no command 'c-9'",
            "cancel_command",
        )
        with pytest.raises(RequestFailed):  # the connection stays usable
            await hub.command("c-10")


async def test_call_sends_request_objects_and_the_codec_refuses_before_sending() -> None:
    async with peer(echo_session) as url, open_control(url, TOKEN) as hub:
        assert await hub.call(Device(name="d1")) == {"id": 1, "type": "device", "name": "d1"}
        assert await hub.call(Devices()) == {"id": 2, "type": "devices"}
        assert await hub.request("future_request", {"x": 1}) == {"id": 3, "type": "future_request", "x": 1}
        with pytest.raises(RequestFailed) as info:
            await hub.devices(state="asleep")  # what the hub would answer, without asking it
        assert (info.value.code, info.value.request) == (ErrorCode.BAD_REQUEST, "devices")
        assert "state must be one of" in info.value.message
        assert isinstance(info.value, ControlError) and isinstance(info.value, ClientError)
        assert await hub.devices() == {"id": 4, "type": "devices"}  # nothing was sent for the refused one


async def test_an_error_code_this_client_does_not_know_is_kept() -> None:
    async def newer_hub(ws: WebSocketConnection) -> None:
        async for req in requests(ws):
            error = {"code": "maintenance", "message": "come back later"}
            await ws.send_message(json.dumps({"id": req["id"], "type": "result", "success": False, "error": error}))

    async with peer(newer_hub) as url, open_control(url, TOKEN) as hub:
        with pytest.raises(RequestFailed) as info:
            await hub.status()
        assert (info.value.code, info.value.message, str(info.value)) == (
            "maintenance",
            "come back later",
            "maintenance: come back later",
        )


async def test_no_reply_in_time_is_reply_timeout() -> None:
    async def silent(ws: WebSocketConnection) -> None:
        async for _ in requests(ws):
            pass

    async with peer(silent) as url, open_control(url, TOKEN, reply_timeout=0.2) as hub:
        with pytest.raises(ReplyTimeout, match="status"):
            await hub.status()


async def test_close_while_waiting_is_disconnected_with_the_close_code() -> None:
    async def going_away(ws: WebSocketConnection) -> None:
        await ws.get_message()
        await ws.aclose(1001, "hub shutting down")

    async with peer(going_away) as url, open_control(url, TOKEN) as hub:
        with pytest.raises(Disconnected) as info:
            await hub.status()
        assert (info.value.code, info.value.reason) == (1001, "hub shutting down")
        assert hub.closed is not None
        with pytest.raises(Disconnected):  # and every later request fails at once
            await hub.devices()


async def test_a_hub_that_stops_answering_pings_is_detected() -> None:
    # A peer that never reads: once two frames fill its queue (size 1), its reader stops, pongs included.
    async def deaf(ws: WebSocketConnection) -> None:
        await trio.sleep_forever()

    errors: list[Exception] = []
    async with (
        peer(deaf) as url,
        open_control(url, TOKEN, reply_timeout=3600, ping_interval=0.05, ping_timeout=0.2) as hub,
        trio.open_nursery() as nursery,
    ):

        async def ask() -> None:
            try:
                await hub.status()
            except Disconnected as exc:
                errors.append(exc)

        for _ in range(3):
            nursery.start_soon(ask)
    assert len(errors) == 3
    assert all(exc.code == 1006 and exc.reason == "no pong from the hub" for exc in errors)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- subscriptions


def event_frame(sid: int, n: int) -> str:
    return json.dumps({"type": "event", "subscription": sid, "event": {"device": "s-1", "n": n}})


async def test_subscription_gets_events_sent_right_after_the_reply_and_dropped_reports() -> None:
    seen: list[dict[str, Any]] = []

    async def pushing(ws: WebSocketConnection) -> None:
        async for req in requests(ws):
            seen.append(req)
            if req["type"] == "subscribe":
                # Reply and events in one burst: the client must route them all.
                await ws.send_message(ok(req, {"subscription": 7}))
                await ws.send_message(event_frame(7, 1))
                await ws.send_message(json.dumps({"type": "dropped", "subscription": 7, "dropped": 3, "coalesced": 9}))
                await ws.send_message(event_frame(7, 2))
                await ws.send_message(event_frame(8, 99))  # not ours: ignored
            else:
                await ws.send_message(ok(req, {}))

    async with peer(pushing) as url, open_control(url, TOKEN) as hub:
        async with hub.subscribe("telemetry", ["s-1"]) as events:
            assert events.id == 7
            with trio.fail_after(10):
                items = [await events.__anext__() for _ in range(3)]
        await hub.ping()  # the unsubscribe was answered before this
    assert items == [
        Event(7, "telemetry", {"device": "s-1", "n": 1}),
        Dropped(7, "telemetry", 3, 9),
        Event(7, "telemetry", {"device": "s-1", "n": 2}),
    ]
    assert items[0].event == {"device": "s-1", "n": 1}
    assert [r["type"] for r in seen] == ["subscribe", "unsubscribe", "ping"]
    assert seen[0] == {"id": 1, "type": "subscribe", "topic": "telemetry", "devices": ["s-1"]}
    assert seen[1] == {"id": 2, "type": "unsubscribe", "subscription": 7}


async def test_frames_with_ids_or_counts_of_the_wrong_type_are_ignored_not_fatal() -> None:
    async def garbling(ws: WebSocketConnection) -> None:
        async for req in requests(ws):
            if req["type"] == "subscribe":
                await ws.send_message(ok(req, {"subscription": 7}))
                await ws.send_message(json.dumps({"type": "event", "subscription": [7], "event": {}}))
                await ws.send_message(json.dumps({"type": "dropped", "subscription": 7, "dropped": "x"}))
                await ws.send_message(json.dumps({"type": "event", "subscription": 7, "event": [1]}))
            else:
                await ws.send_message(json.dumps({"type": "result", "id": [req["id"]], "success": True}))
                await ws.send_message(ok(req, {}))

    async with peer(garbling) as url, open_control(url, TOKEN) as hub:
        async with hub.subscribe("telemetry") as events:
            with trio.fail_after(10):
                items = [await events.__anext__() for _ in range(2)]
        await hub.ping()  # the reader survived the unhashable ids
    assert items == [Dropped(7, "telemetry", 0, 0), Event(7, "telemetry", {})]


async def test_a_slow_subscriber_holds_events_back_without_loss_or_false_keepalive_alarm() -> None:
    count = 200

    async def flood(ws: WebSocketConnection) -> None:
        async for req in requests(ws):
            await ws.send_message(ok(req, {"subscription": 1} if req["type"] == "subscribe" else {}))
            if req["type"] == "subscribe":
                for n in range(count):
                    await ws.send_message(event_frame(1, n))

    async with (
        peer(flood) as url,
        open_control(url, TOKEN, ping_interval=0.02, ping_timeout=0.2) as hub,
        hub.subscribe("telemetry", buffer=4) as events,
    ):
        # Pings go unanswered while the reader waits for us; that must not count as a dead hub.
        await trio.sleep(0.5)
        got = []
        with trio.fail_after(10):
            async for item in events:
                assert isinstance(item, Event)
                got.append(item.event["n"])
                if len(got) == count:
                    break
        assert got == list(range(count))
        assert hub.closed is None
        await hub.ping()


async def test_subscription_iteration_ends_with_disconnected() -> None:
    async def one_then_close(ws: WebSocketConnection) -> None:
        req = json.loads(await ws.get_message())
        await ws.send_message(ok(req, {"subscription": 2}))
        await ws.send_message(event_frame(2, 1))
        await ws.aclose(1001, "hub shutting down")

    async with peer(one_then_close) as url, open_control(url, TOKEN) as hub:
        got = []
        with pytest.raises(Disconnected) as info:
            async with hub.subscribe("presence") as events:
                async for item in events:
                    got.append(item)
        assert info.value.code == 1001
        assert got == [Event(2, "presence", {"device": "s-1", "n": 1})]


async def test_subscribe_error_is_request_failed() -> None:
    async def too_many(ws: WebSocketConnection) -> None:
        async for req in requests(ws):
            error = {"code": "too_many_subscriptions", "message": "at most 16"}
            await ws.send_message(json.dumps({"id": req["id"], "type": "result", "success": False, "error": error}))

    async with peer(too_many) as url, open_control(url, TOKEN) as hub:
        with pytest.raises(RequestFailed) as info:
            async with hub.subscribe("commands"):
                pytest.fail("subscribed")
        assert info.value.code == ErrorCode.TOO_MANY_SUBSCRIPTIONS


# ---------------------------------------------------------------------------- against a real hub


async def test_against_a_real_hub(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    add_devices(data, "boiler-1")
    with Registry(data / "registry.sqlite3") as registry:
        token = registry.add_operator("alice", "operator")
        admin = registry.add_operator("adam", "admin")
        registry.add("spare")
    async with trio.open_nursery() as nursery:
        handle = await start_hub(nursery, hub_config(data))
        with trio.fail_after(30):
            async with open_control(f"ws://127.0.0.1:{handle.port}", token) as hub:
                assert (hub.operator, hub.role) == ("alice", "operator")
                await hub.ping()
                assert [d["name"] for d in await hub.devices()] == ["boiler-1", "spare"]
                with pytest.raises(RequestFailed) as info:
                    await hub.device("nope")
                assert info.value.code == ErrorCode.NOT_FOUND
                with pytest.raises(RequestFailed) as info:
                    await hub.device_label("boiler-1", {"site": "berlin"})
                assert info.value.code == ErrorCode.FORBIDDEN
                with pytest.raises(RequestFailed) as info:  # refused before it is sent, as the hub would
                    await hub.devices(selector="site==x")
                assert info.value.code == ErrorCode.BAD_LABEL
                async with open_control(f"ws://127.0.0.1:{handle.port}", admin) as admin_hub:
                    labelled = await admin_hub.device_label("boiler-1", {"site": "berlin", "x": "1"}, remove=["y"])
                    assert labelled == {"name": "boiler-1", "labels": {"site": "berlin", "x": "1"}}
                    assert (await admin_hub.device_label("boiler-1", remove=["x"]))["labels"] == {"site": "berlin"}
                assert [d["name"] for d in await hub.devices(selector="site=berlin")] == ["boiler-1"]
                async with hub.subscribe("commands", selector="site=berlin") as events:
                    record = await hub.send_command("boiler-1", "reboot", {"delay": 5}, ttl=60)
                    assert record["state"] == "queued"
                    await hub.cancel_command(record["command_id"])
                    states = []
                    async for item in events:
                        assert isinstance(item, Event) and item.event["command_id"] == record["command_id"]
                        states.append(item.event["state"])
                        if item.event["state"] == "cancelled":
                            break
                # Events coalesce by command id, so "queued" may have been replaced by "cancelled".
                assert states in (["queued", "cancelled"], ["cancelled"])
                assert (await hub.command(record["command_id"]))["state"] == "cancelled"
        handle.stop()


async def test_a_keepalive_ping_racing_the_close_is_not_an_error() -> None:
    # The keepalive may ping just as the connection closes (ours at exit, or the hub's): that ping's
    # ConnectionClosed is the end of the keepalive, not an error out of `open_control`.
    async def close_at_once(ws: WebSocketConnection) -> None:
        await ws.aclose(1000, "bye")

    for _ in range(30):
        async with peer(close_at_once) as url, open_control(url, TOKEN, ping_interval=0.0005, ping_timeout=5) as hub:
            await eventually(lambda: hub.closed is not None, 10, poll=0.0005)
