"""Raw wire helpers for tests: TCP streams, HTTP requests and answers, WebSocket upgrades and hand-made frames."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio
from trio_websocket import WebSocketConnection, WebSocketRequest, serve_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Event, Ping, Request, TextMessage

from device_client import protocol
from hub.edge._wire import guard

__all__ = [
    "RawClient",
    "closed_by_peer",
    "exchange",
    "get_request",
    "guarded_server",
    "http_get",
    "http_post",
    "open_tcp",
    "read_head",
    "read_to_close",
    "upgrade",
    "upgrade_request",
]

# ---------------------------------------------------------------------------- TCP and HTTP/1.1 by hand


@asynccontextmanager
async def guarded_server(handler: Callable[[WebSocketConnection], Awaitable[None]]) -> AsyncIterator[int]:
    """A trio-websocket server on loopback whose connections the hub's guard takes (hub/edge/_wire.py `guard`)
    before `handler(ws)` serves them; its port. Stopped on leaving."""
    async with trio.open_nursery() as nursery:

        async def accept(request: WebSocketRequest) -> None:
            guard(request)
            await handler(await request.accept())

        server = await nursery.start(serve_websocket, accept, "127.0.0.1", 0, None)
        yield server.port
        nursery.cancel_scope.cancel()


async def open_tcp(port: int, source: str = "127.0.0.1") -> trio.SocketStream:
    """A TCP connection to the hub from the local address `source` (any of 127.0.0.0/8)."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


def upgrade_request(path: str, headers: dict[str, str] | None = None) -> bytes:
    """The bytes of a WebSocket upgrade request for `path` with extra `headers`."""
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_head(stream: trio.SocketStream) -> tuple[int, dict[str, str]]:
    """Read an HTTP response head: its status and headers (lower-case names)."""
    head = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(4096)
            assert chunk, f"closed before a full response head: {head!r}"
            head += chunk
    status_line, *header_lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


async def upgrade(
    port: int, path: str, *, source: str = "127.0.0.1", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], trio.SocketStream]:
    """Send an upgrade request from `source`; the answer's status and headers, and the open stream."""
    stream = await open_tcp(port, source)
    await stream.send_all(upgrade_request(path, headers))
    status, answer = await read_head(stream)
    return status, answer, stream


async def closed_by_peer(stream: trio.SocketStream, within: float = 15.0) -> bool:
    """Read (and drop) whatever comes until the peer closes; True if it did within `within` seconds."""
    with trio.move_on_after(within):
        try:
            while await stream.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


async def read_to_close(stream: trio.abc.ReceiveStream, within: float = 10.0) -> bytes:
    """Everything the peer sends until it closes (a reset counts as a close); fails after `within` seconds."""
    data = b""
    with trio.fail_after(within):
        try:
            while chunk := await stream.receive_some(65536):
                data += chunk
        except trio.BrokenResourceError:
            pass
    return data


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes; status, headers, body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = await read_to_close(stream, 30)
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    return int(status_line.split(" ")[1]), headers, body


def get_request(path: str, extra: str = "") -> bytes:
    """The bytes of a GET request for `path` (`extra`: more header lines, each ending in CRLF)."""
    return f"GET {path} HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n{extra}\r\n".encode()


# ---------------------------------------------------------------------------- HTTP with urllib (blocking)


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """Status and body of a GET (HTTP errors are returned, not raised)."""
    return _http(urllib.request.Request(url), timeout)


def http_post(url: str, body: bytes, timeout: float = 10.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Status and body of a POST (HTTP errors are returned, not raised)."""
    return _http(urllib.request.Request(url, data=body, method="POST", headers=headers or {}), timeout)


def _http(req: urllib.request.Request, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ---------------------------------------------------------------------------- a raw WebSocket client


class RawClient:
    """WebSocket framing by hand (wsproto) over a TCP stream: for frames no well-behaved library sends."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = WSConnection(ConnectionType.CLIENT)
        self._events: deque[Event] = deque()

    async def handshake(self, path: str, token: str) -> None:
        headers = [(b"authorization", f"Bearer {token}".encode())]
        await self.stream.send_all(self.conn.send(Request(host="127.0.0.1", target=path, extra_headers=headers)))
        assert isinstance(await self.event(), AcceptConnection)

    async def event(self) -> Event | None:
        """The next event from the hub (pings are answered, not returned); None once the TCP connection is closed."""
        with trio.fail_after(15):
            while not self._events:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    return None
                self.conn.receive_data(data)
                for event in self.conn.events():
                    if isinstance(event, Ping):
                        await self.send(self.conn.send(event.response()))
                    else:
                        self._events.append(event)
        return self._events.popleft()

    async def message(self) -> protocol.Message:
        event = await self.event()
        assert isinstance(event, TextMessage), event
        return protocol.decode(event.data)

    async def send(self, data: bytes) -> bool:
        """Send raw bytes; False if the hub closed the connection meanwhile."""
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError:
            return False
        return True

    def fragments(self, text: str, size: int = 1) -> bytes:
        """`text` as one message cut into frames of `size` characters (a first frame, then continuations)."""
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        return b"".join(
            self.conn.send(TextMessage(data=p, message_finished=i == len(pieces) - 1)) for i, p in enumerate(pieces)
        )
