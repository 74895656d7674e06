"""TCP sockets several hub processes share: bound with SO_REUSEPORT, so the kernel spreads connections among them."""

from __future__ import annotations

import errno
import socket

import trio

__all__ = ["bind_shared", "open_shared_listeners"]

#: The listen backlog asked for; Linux caps it at net.core.somaxconn, as trio's own listeners do.
BACKLOG = 0xFFFF


async def bind_shared(host: str, port: int) -> list[trio.socket.SocketType]:
    """Sockets bound with SO_REUSEPORT to every address of `host` on `port`, not listening.

    With port 0 every address gets the port the first one got. A bound socket that never listens takes no
    connections but holds the port for this user's processes: the supervisor keeps one while workers come and go.
    """
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[trio.socket.SocketType] = []
    try:
        for family, kind, proto, _, address in infos:
            try:
                sock = trio.socket.socket(family, kind, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT and len(infos) > 1:
                    continue  # an IPv6 address on a machine without IPv6: the others will do
                raise
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            await sock.bind(address)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(errno.EAFNOSUPPORT, f"no address of {host!r} can be bound on this machine")
    return sockets


async def open_shared_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """`trio.open_tcp_listeners` with SO_REUSEPORT: other processes of this user may listen on the same port."""
    sockets = await bind_shared(host, port)
    for sock in sockets:
        sock.listen(BACKLOG)
    return [trio.SocketListener(sock) for sock in sockets]
