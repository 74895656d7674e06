"""The listener's pieces below the hub: refusals answered at accept and held until the client hangs up, and the
kernel's accept queue read back (Linux)."""

from __future__ import annotations

import select
import socket
import sys

import pytest
import trio

from hub.edge._admission import Refusal
from hub.edge._listener import REFUSAL_LINGER, RUN_AHEAD_DEPTH, _accept_queue_long, _Lingering
from tests.waiting import eventually
from tests.wire import upgrade_request

REFUSAL = Refusal(503, "busy", 3)


def _pair() -> tuple[socket.socket, socket.socket]:
    """(hub's end, client's end) of a connected TCP pair on loopback."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
    return conn, client


def _read_to_close(client: socket.socket) -> bytes:
    client.settimeout(10)
    data = b""
    while chunk := client.recv(4096):  # raises ConnectionResetError on a RST
        data += chunk
    return data


async def test_a_refused_client_whose_request_has_arrived_gets_the_answer_and_is_closed_at_once() -> None:
    lingering = _Lingering()
    conn, client = _pair()
    with client:
        client.sendall(upgrade_request("/v1/device"))
        await eventually(lambda: _readable(conn), 10)
        lingering.refuse(conn, REFUSAL, trio.current_time())
        assert conn.fileno() == -1 and not lingering._held  # closed, not held: nothing left to read
        answer = _read_to_close(client)  # the answer, then end of file (no reset)
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"retry-after: 3\r\n" in answer


async def test_a_refused_client_still_sending_is_answered_and_held_until_it_hangs_up() -> None:
    lingering = _Lingering()
    conn, client = _pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lingering.run)
        with client:
            client.sendall(upgrade_request("/v1/device")[:10])  # a slow client: part of its request
            await eventually(lambda: _readable(conn), 10)
            lingering.refuse(conn, REFUSAL, trio.current_time())
            assert lingering._held  # closing now, with more of the request to come, could reset the answer away
            client.settimeout(10)
            assert client.recv(4096).startswith(b"HTTP/1.1 503 ")
            client.sendall(b"more of the request")
            await trio.sleep(0.05)  # the lingering task reads and drops it, and keeps the socket
            assert lingering._held
        await eventually(lambda: not lingering._held, 10)  # the client hung up
        assert conn.fileno() == -1
        nursery.cancel_scope.cancel()


async def test_a_refused_client_that_never_hangs_up_is_closed_after_the_linger(autojump_clock: trio.abc.Clock) -> None:
    lingering = _Lingering()
    conn, client = _pair()
    with client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lingering.run)
            lingering.refuse(conn, REFUSAL, trio.current_time())
            await trio.sleep(REFUSAL_LINGER / 2)  # the clock jumps: the linger is not over yet
            assert lingering._held
            await trio.sleep(REFUSAL_LINGER)
            assert not lingering._held and conn.fileno() == -1
            nursery.cancel_scope.cancel()
        assert _read_to_close(client).startswith(b"HTTP/1.1 503 ")


async def test_held_sockets_are_closed_when_the_listener_stops() -> None:
    lingering = _Lingering()
    pairs = [_pair() for _ in range(3)]
    with trio.move_on_after(0.05):  # the listener's scope ends while they are held
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lingering.run)
            for conn, _client in pairs:
                lingering.refuse(conn, REFUSAL, trio.current_time())
    assert all(conn.fileno() == -1 for conn, _client in pairs)
    for _conn, client in pairs:
        client.close()


@pytest.mark.skipif(sys.platform != "linux", reason="TCP_INFO of a listening socket is Linux's")
def test_the_accept_queue_counts_as_long_from_run_ahead_depth() -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=4 * RUN_AHEAD_DEPTH) as listener:
        address = listener.getsockname()
        clients = [socket.create_connection(address) for _ in range(RUN_AHEAD_DEPTH - 1)]
        assert not _accept_queue_long(listener)
        clients.append(socket.create_connection(address))
        assert _accept_queue_long(listener)
        listener.accept()[0].close()
        assert not _accept_queue_long(listener)
        for client in clients:
            client.close()


def _readable(conn: socket.socket) -> bool:
    return bool(select.select([conn], [], [], 0)[0])
