"""An ASGI app on Hypercorn's trio worker in the caller's nursery: our sockets, the hub's TLS context."""

from __future__ import annotations

import logging
import socket
import ssl
from functools import partial
from typing import cast

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio import serve
from hypercorn.typing import Framework
from starlette.types import ASGIApp

__all__ = ["serve_asgi"]

log = logging.getLogger("hub.web")

#: Seconds a connection may stay idle (also: to send a whole request head), and to finish its TLS handshake.
KEEP_ALIVE = 5.0
HANDSHAKE_TIMEOUT = 5.0
#: Largest request head (request line and headers) in bytes; larger: 400.
MAX_HEAD_BYTES = 16 * 1024


#: Hypercorn's own log: its errors only (the hub logs where it listens, and with which options).
_SERVER_LOG = logging.getLogger("hub.web.server")
_SERVER_LOG.setLevel(logging.WARNING)


class _HubConfig(Config):
    """Hypercorn's configuration with the sockets we bound and the hub's SSL context (reloaded in place on SIGHUP).

    Hypercorn builds a new SSLContext from files at start; overriding `create_ssl_context` hands it ours, the one
    object `ServerTLS.reload` loads the new certificate into, so new handshakes get it at once.
    """

    def __init__(self, sockets: list[socket.socket], ssl_context: ssl.SSLContext | None) -> None:
        super().__init__()
        self._bound = sockets
        self._context = ssl_context
        self.accesslog = None
        self.errorlog = _SERVER_LOG
        self.keep_alive_timeout = KEEP_ALIVE
        self.h11_max_incomplete_size = MAX_HEAD_BYTES
        self.ssl_handshake_timeout = HANDSHAKE_TIMEOUT
        self.include_server_header = False

    def create_sockets(self) -> Sockets:
        if self._context is not None:
            return Sockets(list(self._bound), [], [])
        return Sockets([], list(self._bound), [])

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._context


async def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address of `host` (one port for all, also when `port` is 0); OSError as it comes."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, str]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, str(address[0])) in seen:
                continue
            seen.add((family, str(address[0])))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(128)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def serve_asgi(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on `host:port` (HTTPS with `ssl_context`) until cancelled; report the bound port once listening.

    A port that is taken raises OSError before `task_status.started`. Cancelling closes the listener and the
    connections (the hub cancels it at shutdown, after it stopped accepting devices).
    """
    sockets = await _bind(host, port)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve, cast(Framework, app), _HubConfig(sockets, ssl_context), shutdown_trigger=trio.sleep_forever
                )
            )
            task_status.started(sockets[0].getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
