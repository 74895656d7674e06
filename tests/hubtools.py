"""Helpers for tests that run a real hub in-process and talk to it over loopback WebSockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from device_client import protocol
from device_client.protocol import Hello, Telemetry, Welcome
from hub.app import HubHandle, serve
from hub.config import HubConfig, load_config
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


async def start_hub(nursery: trio.Nursery, config: HubConfig, **kwargs: Any) -> HubHandle:
    """Start `serve` in `nursery` and return its handle once devices can connect."""
    return await nursery.start(lambda task_status: serve(config, task_status=task_status, **kwargs))


def url(handle: HubHandle, path: str = protocol.DEVICE_PATH) -> str:
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
    await ws.send_message(protocol.encode(Telemetry(seq, pts)))


async def wait_ack(ws: WebSocketConnection, seq: int) -> list[protocol.Message]:
    """Read messages until an ack covering `seq`; return everything read."""
    seen = []
    while True:
        msg = await receive(ws)
        seen.append(msg)
        if isinstance(msg, protocol.Ack) and msg.seq >= seq:
            return seen


def written_lines(data_dir: Path) -> list[str]:
    """Every line the embedded file sink wrote, in file order (not the comment lines of each file's header)."""
    out: list[str] = []
    for path in sorted((data_dir / "lines").glob("*.lp")):
        out.extend(ln for ln in path.read_text().splitlines() if not ln.startswith("#"))
    return out


def telemetry_lines(data_dir: Path) -> list[str]:
    return [ln for ln in written_lines(data_dir) if not ln.startswith("device_status")]


def status_lines(data_dir: Path) -> list[str]:
    return [ln for ln in written_lines(data_dir) if ln.startswith("device_status")]


def raw(obj: Any) -> str:
    """JSON text of any value, for hand-made (bad) messages."""
    return json.dumps(obj)
