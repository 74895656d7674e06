"""The HTTP port (hub.web) of a real hub over real sockets: the REST API, its OpenAPI document, CORS, the console's
files and config.json, and the origins the control channel accepts."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from starlette.routing import Route

from device_client import protocol
from device_client.protocol import Command as DeviceCommand
from device_client.protocol import CommandAck, CommandResult
from hub.app import HubHandle
from hub.cli import _config, build_parser
from hub.config import ConfigError, StateConfig, check_origin
from hub.control import CONTROL_PATH, REQUESTS, spec_for
from hub.fleet import open_registry_store
from hub.web import ENDPOINTS, HTTP_CODES, MAX_WAITS, OPENAPI_PATH, STATUS, RestApi, openapi, serve_asgi, web_app
from tests.hubtools import add_devices, add_operators, connect, control, hello, hub_config, receive, start_hub
from tests.servers import Redis
from tests.test_tls import tls_hub
from tests.waiting import eventually
from tests.wire import open_tcp, read_head


@attrs.frozen
class Web:
    """A hub with operators of each role and two devices, and an HTTP client for its HTTP port."""

    hub: HubHandle
    http: httpx.AsyncClient
    ops: dict[str, str]
    devices: dict[str, str]

    def auth(self, who: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.ops[who]}"}

    async def get(self, path: str, who: str = "viewer", **kw: Any) -> httpx.Response:
        return await self.http.get(path, headers={**self.auth(who), **kw.pop("headers", {})}, **kw)

    async def post(self, path: str, who: str = "admin", **kw: Any) -> httpx.Response:
        return await self.http.post(path, headers={**self.auth(who), **kw.pop("headers", {})}, **kw)


@asynccontextmanager
async def web_hub(tmp_path: Path, **overrides: Any) -> AsyncIterator[Web]:
    ops = add_operators(tmp_path, admin="admin", operator="operator", viewer="viewer")
    devices = add_devices(tmp_path, "d1", "d2")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path, **overrides))
        base = f"http://127.0.0.1:{hub.metrics_port}"
        async with httpx.AsyncClient(base_url=base, timeout=20) as http:
            yield Web(hub, http, ops, devices)
        hub.stop()


def error(reply: httpx.Response) -> str:
    """The code of an error answer (its body is exactly {"error": {"code", "message"}})."""
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return str(body["error"]["code"])


# ---------------------------------------------------------------------------- the routes


async def test_status_and_devices(tmp_path: Path) -> None:
    async with web_hub(tmp_path) as web:
        status = (await web.get("/v1/status")).json()
        assert status["devices"]["registered"] == 2 and status["ingest"]["sink_up"] is True
        async with connect(web.hub, web.devices["d1"]) as ws:
            await hello(ws)
            names = [d["name"] for d in (await web.get("/v1/devices")).json()]
            assert names == ["d1", "d2"]
            online = (await web.get("/v1/devices", params={"state": "online"})).json()
            assert [d["name"] for d in online] == ["d1"]
            reply = await web.get("/v1/devices", params={"state": "asleep"})
            assert reply.status_code == 400 and error(reply) == "bad_request"
            detail = (await web.get("/v1/devices/d1")).json()
            assert detail["name"] == "d1" and detail["state"] == "online" and "latest" in detail
            assert "commands" in detail
        reply = await web.get("/v1/devices/nope")
        assert reply.status_code == 404 and error(reply) == "not_found"
        assert (await web.get("/v1/nothing-here")).status_code == 404


async def test_device_add_rotate_revoke_for_admins_only(tmp_path: Path) -> None:
    async with web_hub(tmp_path) as web:
        added = await web.post("/v1/devices", json={"name": "d9"})
        assert added.status_code == 201 and added.json()["name"] == "d9" and added.json()["token"]
        again = await web.post("/v1/devices", json={"name": "d9"})
        assert again.status_code == 409 and error(again) == "exists"
        bad = await web.post("/v1/devices", json={"name": "no spaces"})
        assert bad.status_code == 400 and error(bad) == "bad_request"
        for who in ("viewer", "operator"):
            refused = await web.post("/v1/devices", who, json={"name": "d10"})
            assert refused.status_code == 403 and error(refused) == "forbidden"
            assert (await web.post("/v1/devices/d9/revoke", who)).status_code == 403

        rotated = await web.post("/v1/devices/d9/rotate")
        assert rotated.status_code == 200 and rotated.json()["token"] != added.json()["token"]
        assert (await web.post("/v1/devices/nope/rotate")).status_code == 404
        # The old token is dead, the new one works, and after the revoke neither does.
        async with connect(web.hub, rotated.json()["token"]) as ws:
            await hello(ws)
            revoked = await web.post("/v1/devices/d9/revoke")
            assert revoked.status_code == 200 and revoked.json() == {}
            with trio.fail_after(10):
                while True:  # the device's open session is closed by the revoke
                    try:
                        await ws.get_message()
                    except Exception:
                        break
        assert (await web.post("/v1/devices/nope/revoke")).status_code == 404


async def test_labels_and_selectors(tmp_path: Path) -> None:
    async with web_hub(tmp_path) as web:
        added = await web.post("/v1/devices", json={"name": "b1", "labels": {"site": "berlin", "model": "th-100"}})
        assert added.status_code == 201
        bad = await web.post("/v1/devices", json={"name": "b2", "labels": {"site": "a b"}})
        assert bad.status_code == 422 and error(bad) == "bad_label"
        labelled = await web.post("/v1/devices/d1/labels", json={"set": {"site": "berlin"}})
        assert labelled.status_code == 200 and labelled.json() == {"name": "d1", "labels": {"site": "berlin"}}
        refused = await web.post("/v1/devices/d1/labels", "operator", json={"remove": ["site"]})
        assert refused.status_code == 403 and error(refused) == "forbidden"
        assert (await web.post("/v1/devices/nope/labels", json={"set": {"a": "b"}})).status_code == 404
        assert error(await web.post("/v1/devices/d1/labels", json={})) == "bad_request"

        async def selected(selector: str) -> list[str]:
            reply = await web.get("/v1/devices", params={"selector": selector})
            assert reply.status_code == 200, reply.text
            return [d["name"] for d in reply.json()]

        assert await selected("site=berlin") == ["b1", "d1"]
        assert await selected("site=berlin,model=th-100") == ["b1"]
        assert await selected("site!=berlin") == ["d2"]
        assert (await web.get("/v1/devices/b1")).json()["labels"] == {"model": "th-100", "site": "berlin"}
        reply = await web.get("/v1/devices", params={"selector": "site=="})
        assert reply.status_code == 422 and error(reply) == "bad_label"
        removed = await web.post("/v1/devices/b1/labels", json={"remove": ["model"], "set": {"rack": "r1"}})
        assert removed.json()["labels"] == {"rack": "r1", "site": "berlin"}


async def next_command(ws: Any) -> DeviceCommand:
    while True:
        msg = await receive(ws)
        if isinstance(msg, DeviceCommand):
            return msg


async def test_commands_send_idempotent_wait_and_cancel(tmp_path: Path) -> None:
    async with web_hub(tmp_path) as web:
        send = {"device": "d2", "name": "reboot", "args": {"delay": 1}}
        first = await web.post("/v1/commands", "operator", json=send, headers={"idempotency-key": "k-1"})
        assert first.status_code == 202 and first.json()["state"] == "queued"
        command_id = first.json()["command_id"]
        assert first.json()["idempotency_key"] == "k-1" and first.json()["operator"] == "operator"
        retried = await web.post("/v1/commands", "operator", json={**send, "idempotency_key": "k-1"})
        assert retried.json()["command_id"] == command_id  # a retried send is harmless
        mixed = await web.post(
            "/v1/commands", "operator", json={**send, "idempotency_key": "k-2"}, headers={"idempotency-key": "k-1"}
        )
        assert mixed.status_code == 400 and error(mixed) == "bad_request"

        assert (await web.get(f"/v1/commands/{command_id}")).json()["state"] == "queued"
        listed = (await web.get("/v1/commands", params={"device": "d2", "limit": "5"})).json()
        assert [c["command_id"] for c in listed] == [command_id]
        assert (await web.get("/v1/commands", params={"limit": "zero"})).status_code == 400
        assert (await web.get("/v1/commands/c-nope")).status_code == 404

        viewer = await web.post("/v1/commands", "viewer", json=send)
        assert viewer.status_code == 403 and error(viewer) == "forbidden"
        assert (await web.post(f"/v1/commands/{command_id}/cancel", "viewer")).status_code == 403
        cancelled = await web.post(f"/v1/commands/{command_id}/cancel", "operator")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        late = await web.post(f"/v1/commands/{command_id}/cancel", "operator")
        assert late.status_code == 409 and error(late) == "invalid_state"

        bad_args = await web.post("/v1/commands", "operator", json={**send, "args": [1]})
        assert bad_args.status_code == 422 and error(bad_args) == "bad_command"
        missing = await web.post("/v1/commands", "operator", json={"device": "d2"})
        assert missing.status_code == 400 and error(missing) == "bad_request"
        unknown = await web.post("/v1/commands", "operator", json={**send, "device": "ghost"})
        assert unknown.status_code == 404 and error(unknown) == "not_found"

        # With wait: the answer comes once the device has answered.
        async with connect(web.hub, web.devices["d1"]) as ws, trio.open_nursery() as nursery:
            await hello(ws)
            replies: list[httpx.Response] = []

            async def send_and_wait() -> None:
                body = {"device": "d1", "name": "echo", "args": {"x": 1}, "wait": True, "wait_timeout": 30}
                replies.append(await web.post("/v1/commands", "operator", json=body))

            nursery.start_soon(send_and_wait)
            cmd = await next_command(ws)
            await ws.send_message(protocol.encode(CommandAck(cmd.id)))
            await ws.send_message(protocol.encode(CommandResult(cmd.id, True, {"x": 1})))
        (waited,) = replies
        assert waited.status_code == 200 and waited.json()["state"] == "succeeded"
        assert waited.json()["result"] == {"x": 1} and waited.json()["command_id"] == cmd.id


async def test_bodies_tokens_and_rates(tmp_path: Path) -> None:
    overrides = {"control.max_message_bytes": 2048, "control.request_rate": 0.01, "control.request_burst": 12}
    async with web_hub(tmp_path, **overrides) as web:
        reply = await web.http.get("/v1/status")
        assert reply.status_code == 401 and error(reply) == "unauthorized"
        assert reply.headers["www-authenticate"].startswith("Bearer")
        reply = await web.http.get("/v1/status", headers={"authorization": "Bearer not-a-token"})
        assert reply.status_code == 401 and reply.headers["www-authenticate"].startswith("Bearer")
        reply = await web.http.get("/v1/status", headers={"authorization": f"Basic {web.ops['admin']}"})
        assert reply.status_code == 401

        big = await web.post("/v1/devices", content=b'{"name": "' + b"x" * 4096 + b'"}')
        assert big.status_code == 413 and error(big) == "too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
            for _ in range(8):
                yield b" " * 512

        streamed = await web.post("/v1/devices", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        for body in (b"not json", b"[1, 2]", b'{"name": NaN}'):
            reply = await web.post("/v1/devices", content=body, headers={"content-type": "application/json"})
            assert reply.status_code == 400 and error(reply) == "bad_request", body
        reply = await web.post("/v1/devices", content=b"name=x", headers={"content-type": "text/plain"})
        assert reply.status_code == 415

        # The operator's bucket is shared with its control sessions: 12 requests in all, then 429 on both doors.
        async with control(web.hub, web.ops["viewer"]) as ctl:
            for _ in range(6):
                await ctl.ok("status")
            for _ in range(6):
                assert (await web.get("/v1/status")).status_code == 200
            limited = await web.get("/v1/status")
            assert limited.status_code == 429 and error(limited) == "rate_limited"
            assert int(limited.headers["retry-after"]) >= 1
            assert await ctl.error("status") == "rate_limited"
        assert (await web.get("/v1/status", "admin")).status_code == 200  # another operator's bucket


async def test_cors_only_for_allowed_origins(tmp_path: Path) -> None:
    async with web_hub(tmp_path, **{"control.allowed_origins": ["https://ops.example.com"]}) as web:
        preflight = {"access-control-request-method": "POST", "access-control-request-headers": "authorization"}
        good = await web.http.options("/v1/commands", headers={"origin": "https://ops.example.com", **preflight})
        assert good.status_code == 200
        assert good.headers["access-control-allow-origin"] == "https://ops.example.com"
        assert "authorization" in good.headers["access-control-allow-headers"].lower()
        foreign = await web.http.options("/v1/commands", headers={"origin": "https://evil.example", **preflight})
        assert foreign.status_code == 400 and "access-control-allow-origin" not in foreign.headers

        got = await web.get("/v1/status", headers={"origin": "https://ops.example.com"})
        assert got.headers["access-control-allow-origin"] == "https://ops.example.com"
        got = await web.get("/v1/status", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in got.headers


# ---------------------------------------------------------------------------- OpenAPI


async def test_openapi_lists_every_route_and_routes_every_path(tmp_path: Path) -> None:
    async with web_hub(tmp_path) as web:
        served = (await web.http.get(OPENAPI_PATH)).json()
    assert served == openapi()
    documented = {(path, method.upper()) for path, item in served["paths"].items() for method in item}
    api = RestApi(web.hub.control, ws_port=lambda: 1, tls=False, openapi=openapi)
    routed = {(r.path, m) for r in api.routes() if isinstance(r, Route) for m in (r.methods or ()) if m != "HEAD"}
    assert documented == routed
    # Every control request that needs no session has its REST route, and each route's role is the table's.
    session_bound = {"ping", "subscribe", "unsubscribe"}
    assert {spec_for(e.request).type for e in ENDPOINTS} == set(REQUESTS) - session_bound
    for endpoint in ENDPOINTS:
        operation = served["paths"][endpoint.path][endpoint.method.lower()]
        assert operation["x-role"] == spec_for(endpoint.request).role
        assert str(endpoint.status) in operation["responses"]


def test_docs_list_every_route_and_error_code() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "rest.md").read_text(encoding="utf-8")
    for endpoint in ENDPOINTS:
        assert f"| `{endpoint.method} {endpoint.path}" in docs, endpoint.path
    for code, status in {**STATUS, **HTTP_CODES}.items():
        assert f"| `{code}` | {status} |" in docs, code


# ---------------------------------------------------------------------------- the console


async def test_console_files_config_and_headers(tmp_path: Path) -> None:
    console = tmp_path / "console"
    console.mkdir()
    (console / "index.html").write_text("<!doctype html><title>hub</title>")
    (console / "app.js").write_text("export {};")
    async with web_hub(tmp_path / "hub") as web, trio.open_nursery() as nursery:
        api = RestApi(web.hub.control, ws_port=lambda: web.hub.port, tls=False)
        port = await nursery.start(serve_asgi, web_app(api=api, console_dir=console), "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            page = await http.get("/")
            assert page.status_code == 200 and page.text.startswith("<!doctype html>")
            assert page.headers["content-type"].startswith("text/html")
            assert page.headers["cache-control"] == "no-cache"
            assert page.headers["x-content-type-options"] == "nosniff"
            csp = page.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "connect-src 'self' ws: wss:" in csp
            script = await http.get("/app.js")
            assert script.status_code == 200 and script.headers["x-content-type-options"] == "nosniff"
            assert (await http.get("/nope.js")).status_code == 404
            assert (await http.get("/../../etc/passwd")).status_code == 404

            config = await http.get("/console/config.json", headers={"host": "hub.example.net:9999"})
            assert config.json() == {"control_url": f"ws://hub.example.net:{web.hub.port}/v1/control"}
            config = await http.get("/console/config.json", headers={"host": "[::1]:9999"})
            assert config.json() == {"control_url": f"ws://[::1]:{web.hub.port}/v1/control"}
        nursery.cancel_scope.cancel()
        # The hub's own HTTP port serves the package's console directory (absent or not: no 500).
        assert (await web.http.get("/")).status_code in (200, 404)
        assert (await web.http.get("/console/config.json")).json()["control_url"].startswith("ws://127.0.0.1:")


async def test_the_http_port_closes_with_the_hub(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        port = hub.metrics_port
        assert port
        hub.stop()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


# ---------------------------------------------------------------------------- origins


@pytest.mark.parametrize(
    "entry",
    [
        "*",
        "null",
        "https://ops.example.com/",
        "https://ops.example.com/console",
        "HTTPS://ops.example.com",
        "https://Ops.Example.com",
        "https://ops.example.com:443",
        "ops.example.com",
        "ftp://ops.example.com",
        "https://ops.example.com?x=1",
        "https://user@ops.example.com",
    ],
)
def test_a_malformed_allowed_origin_is_one_clear_config_error(tmp_path: Path, entry: str) -> None:
    with pytest.raises(ConfigError) as refused:
        hub_config(tmp_path, **{"control.allowed_origins": [entry]})
    message = str(refused.value)
    assert "\n" not in message and message.startswith("control.allowed_origins: ") and repr(entry) in message


@pytest.mark.parametrize(
    "entry", ["https://ops.example.com", "http://localhost:8080", "http://127.0.0.1:9108", "https://[::1]:8443"]
)
def test_well_formed_origins_pass(entry: str) -> None:
    assert check_origin(entry) == entry


def test_allowed_origin_option_adds_to_the_config_file(tmp_path: Path) -> None:
    config_file = tmp_path / "hub.toml"
    config_file.write_text('[control]\nallowed_origins = ["https://a.example"]\n')
    parser = build_parser()
    args = parser.parse_args(
        [
            "serve",
            "--config",
            str(config_file),
            "--allowed-origin",
            "https://b.example",
            "--allowed-origin",
            "http://localhost:3000",
        ]
    )
    config = _config(args)
    assert config is not None
    assert config.control.allowed_origins == ("https://a.example", "https://b.example", "http://localhost:3000")
    args = parser.parse_args(["serve", "--allowed-origin", "https://b.example/"])
    assert _config(args) is None


def upgrade_bytes(host: str, origin: str) -> bytes:
    """A control-channel upgrade request with this Host and Origin (no token: first-message auth would follow)."""
    return (
        f"GET {CONTROL_PATH} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n\r\n"
    ).encode()


async def handshake_status(hub: HubHandle, origin: str, host: str | None = None) -> int:
    """The status of a control-channel upgrade with this Origin and Host (by default the hub's address)."""
    stream = await open_tcp(hub.port)
    async with stream:
        await stream.send_all(upgrade_bytes(host or f"127.0.0.1:{hub.port}", origin))
        status, _ = await read_head(stream)
        return status


async def test_the_consoles_own_origin_may_open_the_control_channel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hub.edge")
    async with web_hub(tmp_path) as web:
        hub = web.hub
        own = f"http://127.0.0.1:{hub.metrics_port}"
        # A page from http://127.0.0.1:<http port>/ opening ws://127.0.0.1:<ws port>/v1/control.
        async with control(hub, web.ops["viewer"], headers=[(b"origin", own.encode())]) as ctl:
            assert (await ctl.ok("status"))["devices"]["registered"] == 2
        assert (
            await handshake_status(hub, f"http://hub.example.net:{hub.metrics_port}", f"hub.example.net:{hub.port}")
            == 101
        )
        # The same host on another port, https without TLS, or another host: not the console.
        assert await handshake_status(hub, f"http://127.0.0.1:{hub.port}") == 403
        assert await handshake_status(hub, f"https://127.0.0.1:{hub.metrics_port}") == 403
        assert await handshake_status(hub, f"http://evil.example:{hub.metrics_port}", f"127.0.0.1:{hub.port}") == 403
    refused = [r for r in caplog.records if r.getMessage() == "handshake refused"]
    assert refused and all(r.kv["origin"].startswith(("http://", "https://")) for r in refused)  # type: ignore[attr-defined]
    assert {r.kv["origin"] for r in refused} >= {"http://evil.example:" + str(web.hub.metrics_port)}  # type: ignore[attr-defined]


async def test_with_tls_the_consoles_origin_is_https(tmp_path: Path) -> None:
    async with tls_hub(tmp_path) as hub:
        port, http_port = hub.handle.port, hub.handle.metrics_port
        context = ssl.create_default_context(cafile=str(hub.authority.ca_file))

        async def status(origin: str) -> int:
            stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
            async with stream:
                await stream.send_all(upgrade_bytes(f"127.0.0.1:{port}", origin))
                head = b""
                with trio.fail_after(10):
                    while b"\r\n" not in head:
                        head += await stream.receive_some(4096)
                return int(head.split(b" ")[1])

        assert await status(f"https://127.0.0.1:{http_port}") == 101
        assert await status(f"http://127.0.0.1:{http_port}") == 403
        async with httpx.AsyncClient(verify=context) as http:
            config = await http.get(f"https://127.0.0.1:{http_port}/console/config.json")
        assert config.json() == {"control_url": f"wss://127.0.0.1:{port}/v1/control"}


async def test_sends_with_wait_in_progress_are_bounded_per_operator(tmp_path: Path) -> None:
    async with web_hub(tmp_path) as web, trio.open_nursery() as nursery:
        body = {"device": "d2", "name": "sleep", "wait": True, "wait_timeout": 600}  # d2 is offline: they all wait
        for _ in range(MAX_WAITS):
            nursery.start_soon(partial(web.post, "/v1/commands", "operator", json=body))

        async def all_queued() -> bool:
            return len((await web.get("/v1/commands", params={"device": "d2"})).json()) == MAX_WAITS

        await eventually(all_queued, 20, what=f"{MAX_WAITS} commands waited on")
        refused = await web.post("/v1/commands", "operator", json=body)
        assert refused.status_code == 429 and error(refused) == "rate_limited" and "retry-after" in refused.headers
        unwaited = await web.post("/v1/commands", "operator", json={**body, "wait": False})
        assert unwaited.status_code == 202
        nursery.cancel_scope.cancel()


async def test_a_request_that_needs_an_unreachable_redis_answers_503_and_works_again_when_it_is_back(
    tmp_path: Path,
) -> None:
    redis = Redis(tmp_path / "redis", persistent=True)  # the registry must survive the restart
    redis.start()
    try:
        async with open_registry_store(StateConfig(backend="redis", url=redis.url), tmp_path / "unused") as store:
            token = await store.add_operator("alice", "viewer")
        config = hub_config(tmp_path / "hub", **{"state.backend": "redis", "state.url": redis.url})
        async with trio.open_nursery() as nursery:
            hub = await start_hub(nursery, config)
            headers = {"authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{hub.metrics_port}", timeout=30) as http:
                assert (await http.get("/v1/devices", headers=headers)).status_code == 200
                await trio.to_thread.run_sync(redis.stop)
                refused = await http.get("/v1/devices", headers=headers)  # the token is known from the cache
                assert (refused.status_code, error(refused)) == (503, "unavailable")
                assert int(refused.headers["retry-after"]) >= 1
                await trio.to_thread.run_sync(redis.start)
                assert (await http.get("/v1/devices", headers=headers)).status_code == 200
            hub.stop()
    finally:
        redis.stop()
