"""A real hub in-process for tests: its configuration, registered devices and operators, start-up, and device and
control WebSocket clients talking to it over loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from device_client import protocol
from device_client.protocol import ErrorCode, Hello, Telemetry, Welcome
from hub.app import HubHandle, serve
from hub.config import HubConfig, load_config
from hub.control import CONTROL_PATH
from hub.fleet import Registry

BASE_TS = 1_764_000_000_000


def hub_config(data_dir: Path, **overrides: Any) -> HubConfig:
    """A test configuration: any free port, data in `data_dir`, quick batching."""
    values: dict[str, Any] = {
        "server.port": 0,
        "storage.data_dir": str(data_dir),
        "batch.max_delay": 0.02,
        "metrics.http_port": 0,
    }
    values.update(overrides)
    return load_config(None, env={}, overrides=values)


def add_devices(data_dir: Path, *names: str) -> dict[str, str]:
    """Register devices in the hub's registry file; their tokens by name."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with Registry(data_dir / "registry.sqlite3") as registry:
        return {name: registry.add(name) for name in names}


def add_operators(data_dir: Path, **roles: str) -> dict[str, str]:
    """Create operators (name=role) in the hub's registry; their tokens by name."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with Registry(data_dir / "registry.sqlite3") as registry:
        return {name: registry.add_operator(name, role) for name, role in roles.items()}


async def start_hub(nursery: trio.Nursery, config: HubConfig, **kwargs: Any) -> HubHandle:
    """Start `serve` in `nursery` and return its handle once devices can connect."""
    return await nursery.start(lambda task_status: serve(config, task_status=task_status, **kwargs))


def url(handle: HubHandle, path: str = protocol.DEVICE_PATH) -> str:
    """The hub's WebSocket URL for `path` (the device endpoint by default)."""
    return f"ws://127.0.0.1:{handle.port}{path}"


@asynccontextmanager
async def connect(
    handle: HubHandle, token: str | None, *, path: str = protocol.DEVICE_PATH, headers: list | None = None, **kw: Any
) -> AsyncIterator[WebSocketConnection]:
    """A raw WebSocket client to the hub, with the token in the Authorization header."""
    extra = list(headers or [])
    if token is not None:
        extra.append((b"authorization", f"Bearer {token}".encode()))
    async with open_websocket_url(url(handle, path), extra_headers=extra, **kw) as ws:
        yield ws


async def receive(ws: WebSocketConnection) -> protocol.Message:
    """The next message from the hub, decoded (fails the test after 10 s)."""
    with trio.fail_after(10):
        return protocol.decode(await ws.get_message())


async def hello(ws: WebSocketConnection, **kw: Any) -> Welcome:
    """Send hello and return the welcome."""
    await ws.send_message(protocol.encode(Hello(**kw)))
    msg = await receive(ws)
    assert isinstance(msg, Welcome), msg
    return msg


def points(n: int, *, start: int = 0, measurement: str = "environment") -> list[dict[str, Any]]:
    """`n` distinct points, one millisecond apart."""
    return [
        {
            "measurement": measurement,
            "ts": BASE_TS + start + i,
            "fields": {"temperature": 20.0 + i / 10, "count": i},
            "tags": {"room": "lab 2"},
        }
        for i in range(n)
    ]


async def send_batch(ws: WebSocketConnection, seq: int, pts: list[dict[str, Any]]) -> None:
    """Send one telemetry batch (no wait for its ack)."""
    await ws.send_message(protocol.encode(Telemetry(seq, pts)))


async def wait_ack(ws: WebSocketConnection, seq: int) -> list[protocol.Message]:
    """Read messages until an ack covering `seq`; return everything read."""
    seen = []
    while True:
        msg = await receive(ws)
        seen.append(msg)
        if isinstance(msg, protocol.Ack) and msg.seq >= seq:
            return seen


async def stream_batches(ws: WebSocketConnection, first: int, n: int, size: int = 3) -> None:
    """Send `n` batches from seq `first` and wait for all their acks."""
    for seq in range(first, first + n):
        await send_batch(ws, seq, points(size, start=seq * 10))
    await wait_ack(ws, first + n - 1)


def raw(obj: Any) -> str:
    """JSON text of any value, for hand-made (bad) messages."""
    return json.dumps(obj)


#: Messages a device session must refuse, each with its error code and seq (hub limits: max_points 5).
BAD_MESSAGES = [
    ("not json", ErrorCode.BAD_JSON, None),
    (
        '{"type": "telemetry", "seq": 50, "points": [{"measurement": "m", "ts": 1764000000000, "fields": {"x": NaN}}]}',
        ErrorCode.BAD_JSON,
        None,
    ),
    ("[1, 2]", ErrorCode.BAD_MESSAGE, None),
    (raw({"type": "shout"}), ErrorCode.BAD_MESSAGE, None),
    (raw({"type": "ack", "seq": 3}), ErrorCode.BAD_MESSAGE, None),
    (raw({"type": "hello", "proto": 1}), ErrorCode.NOT_READY, None),
    (raw({"type": "telemetry", "seq": -1, "points": []}), ErrorCode.BAD_SEQ, None),
    (raw({"type": "telemetry", "seq": 60, "points": [1]}), ErrorCode.BAD_POINT, 60),
    (
        raw(
            {
                "type": "telemetry",
                "seq": 61,
                "points": [{"measurement": "m", "ts": 1764000000000, "fields": {"x": 1}, "tags": {"device": "other"}}],
            }
        ),
        ErrorCode.RESERVED_TAG,
        61,
    ),
    (
        raw(
            {
                "type": "telemetry",
                "seq": 62,
                "points": [{"measurement": "m\nx", "ts": 1764000000000, "fields": {"x": 1}}],
            }
        ),
        ErrorCode.BAD_NAME,
        62,
    ),
    (
        raw(
            {
                "type": "telemetry",
                "seq": 63,
                "points": [{"measurement": "m", "ts": 1764000000000, "fields": {"x": [1]}}],
            }
        ),
        ErrorCode.BAD_FIELD,
        63,
    ),
    (
        raw(
            {
                "type": "telemetry",
                "seq": 64,
                "points": [{"measurement": "m", "ts": 1764000000000, "fields": {"x": 1}, "tags": {"k": ""}}],
            }
        ),
        ErrorCode.BAD_TAG,
        64,
    ),
    (
        raw({"type": "telemetry", "seq": 65, "points": [{"measurement": "m", "ts": 17, "fields": {"x": 1}}]}),
        ErrorCode.BAD_TIME,
        65,
    ),
    (raw({"type": "telemetry", "seq": 66, "points": points(6)}), ErrorCode.TOO_MANY_POINTS, 66),
    (b"\x00binary", ErrorCode.BAD_FRAME, None),
]


def written_lines(data_dir: Path) -> list[str]:
    """Every line the embedded file sink wrote, in file order (not the comment lines of each file's header)."""
    out: list[str] = []
    for path in sorted((data_dir / "lines").glob("*.lp")):
        out.extend(ln for ln in path.read_text().splitlines() if not ln.startswith("#"))
    return out


def telemetry_lines(data_dir: Path) -> list[str]:
    """The written lines of device telemetry (not the hub's `device_status` lines)."""
    return [ln for ln in written_lines(data_dir) if not ln.startswith("device_status")]


def status_lines(data_dir: Path) -> list[str]:
    """The written `device_status` lines."""
    return [ln for ln in written_lines(data_dir) if ln.startswith("device_status")]


# ---------------------------------------------------------------------------- the control channel


class Ctl:
    """A raw control-channel client: numbered requests, replies matched by id, pushes kept in order."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.pushes: list[dict[str, Any]] = []
        self._id = 0

    async def recv(self, timeout: float = 10) -> dict[str, Any]:
        with trio.fail_after(timeout):
            return json.loads(await self.ws.get_message())

    async def send(self, obj: Any) -> None:
        await self.ws.send_message(obj if isinstance(obj, str) else json.dumps(obj))

    async def reply(self, rid: Any) -> dict[str, Any]:
        """Read until the reply with id `rid`; keep pushes seen meanwhile."""
        while True:
            frame = await self.recv()
            if frame.get("type") in ("result", "pong") and frame.get("id") == rid:
                return frame
            self.pushes.append(frame)

    async def call(self, kind: str, **args: Any) -> dict[str, Any]:
        self._id += 1
        await self.send({"id": self._id, "type": kind, **args})
        return await self.reply(self._id)

    async def ok(self, kind: str, **args: Any) -> Any:
        frame = await self.call(kind, **args)
        assert frame["success"] is True, frame
        return frame["result"]

    async def error(self, kind: str, **args: Any) -> str:
        frame = await self.call(kind, **args)
        assert frame["success"] is False, frame
        assert set(frame["error"]) == {"code", "message"}
        return frame["error"]["code"]

    async def push(self) -> dict[str, Any]:
        """The next event or dropped notice."""
        if self.pushes:
            return self.pushes.pop(0)
        frame = await self.recv()
        assert frame["type"] in ("event", "dropped"), frame
        return frame

    async def events(self, sub: int, n: int, timeout: float = 10) -> list[dict[str, Any]]:
        """The next `n` events of subscription `sub`, each within `timeout` (other pushes kept in order)."""
        out = []
        kept = []
        for frame in self.pushes:
            if len(out) < n and frame["type"] == "event" and frame["subscription"] == sub:
                out.append(frame["event"])
            else:
                kept.append(frame)
        self.pushes = kept
        while len(out) < n:
            frame = await self.recv(timeout)
            assert frame["type"] in ("event", "dropped"), frame
            if frame["type"] == "event" and frame["subscription"] == sub:
                out.append(frame["event"])
            else:
                self.pushes.append(frame)
        return out


@asynccontextmanager
async def control(
    hub: HubHandle, token: str | None, *, path: str = CONTROL_PATH, headers: list | None = None, **kw: Any
) -> AsyncIterator[Ctl]:
    """An authenticated control session (header auth when `token` is given)."""
    async with connect(hub, token, path=path, headers=headers, **kw) as ws:
        ctl = Ctl(ws)
        first = await ctl.recv()
        assert first["type"] == "auth_ok", first
        yield ctl
