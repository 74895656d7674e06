"""Ports for tests: always bound (port 0, read back) and held, never probed free and then bound."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["listening_port", "refused_port"]

#: Sockets that hold `refused_port` numbers for as long as the test process lives.
_HELD: list[socket.socket] = []


def refused_port() -> int:
    """A TCP port on 127.0.0.1 where every connection is refused, for as long as the test process lives.

    A socket bound to it that never listens holds it: the kernel refuses connections, and no server (ours or another
    process's) can bind it meanwhile. Servers for tests bind port 0 and report the port they got instead.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    return int(sock.getsockname()[1])


@contextmanager
def listening_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket listens on (and never accepts), while the block runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])
