"""A session reading its own socket (hub/edge/_direct.py `DirectReader`), over real sockets.

Whatever a client sends - whole messages, pings, fragments, long frames, a close, a reset - the session sees the
same messages in the same order as through trio-websocket's own reader, control frames are answered as before, and
every close path (the peer's, the hub's from another task, the session leaving) completes without waiting out a
timeout.
"""

from __future__ import annotations

import random
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from hub.edge._direct import HANDOVER, DirectReader
from hub.edge._wire import FAST_MAX_PAYLOAD
from tests.waiting import eventually
from tests.wire import RawClient, guarded_server, open_tcp

Handler = Callable[[WebSocketConnection], Awaitable[None]]


@asynccontextmanager
async def served(handler: Handler) -> AsyncIterator[RawClient]:
    """A raw client connected to a guarded trio-websocket server connection that `handler(ws)` serves."""
    async with guarded_server(handler) as port:
        client = RawClient(await open_tcp(port))
        await client.handshake("/", "t")
        yield client


async def until_lent(reader: DirectReader) -> None:
    """Take nothing but `HANDOVER` until the socket is the session's (trio-websocket's reader parked behind it)."""
    with trio.fail_after(10):
        while reader._share is not None and not reader._share.lent:
            assert reader.get_nowait() is None
            await trio.sleep(0.01)


class Reading:
    """A session's reading through a `DirectReader`: every message in `got`, then ("closed", code)."""

    def __init__(self) -> None:
        self.got: list[object] = []
        self.reader: DirectReader | None = None

    async def run(self, ws: WebSocketConnection) -> None:
        with DirectReader(ws) as reader:
            assert reader._share is not None  # plain TCP and the guard's fast path: the session may read the socket
            self.reader = reader
            try:
                while True:
                    self.got.append(await reader.next())
            except ConnectionClosed as exc:
                self.got.append(("closed", exc.reason.code))

    def lent(self) -> bool:
        """The socket is the session's now (trio-websocket's reader has parked)."""
        return self.reader is not None and self.reader._share is not None and self.reader._share.lent

    def ended(self) -> bool:
        return bool(self.got) and isinstance(self.got[-1], tuple)


async def test_messages_come_in_order_from_the_sessions_own_reads() -> None:
    reading = Reading()
    got = reading.got
    async with served(reading.run) as client:
        await client.send(client.conn.send(TextMessage("first")))
        await eventually(reading.lent)  # after the first message the reader parked: the socket is the session's
        burst = b"".join(client.conn.send(TextMessage(f"m{i}")) for i in range(20)) + client.conn.send(
            BytesMessage(b"\x00\x01")
        )
        await client.send(burst)
        await eventually(lambda: len(got) == 22)
        await client.send(client.conn.send(CloseConnection(1000, "bye")))
        assert isinstance(await client.event(), CloseConnection)  # the close handshake completes
        await eventually(lambda: got[-1] == ("closed", 1000))
    assert got[:-1] == ["first", *(f"m{i}" for i in range(20)), b"\x00\x01"]


async def test_waiting_messages_are_taken_without_a_scheduling_round() -> None:
    taken: list[object] = []
    done = trio.Event()
    parked = trio.Event()
    go = trio.Event()

    async def handler(ws: WebSocketConnection) -> None:
        with DirectReader(ws) as reader:
            assert await reader.next() == "one"
            await until_lent(reader)
            parked.set()
            await go.wait()
            await eventually(lambda: reader._share is not None and _readable(ws))
            with trio.testing.assert_no_checkpoints():
                taken.extend([reader.get_nowait(), reader.get_nowait(), reader.get_nowait()])
        done.set()

    async with served(handler) as client:
        await client.send(client.conn.send(TextMessage("one")))
        with trio.fail_after(10):
            await parked.wait()
        await client.send(client.conn.send(TextMessage("two")) + client.conn.send(BytesMessage(b"three")))
        go.set()
        with trio.fail_after(10):
            await done.wait()
    assert taken == ["two", b"three", None]  # read from the socket in the session's step, in order; then nothing


def _readable(ws: WebSocketConnection) -> bool:
    import select

    sock = ws._stream.socket._sock  # type: ignore[attr-defined]
    return bool(select.select([sock], [], [], 0)[0])


async def test_pings_fragments_and_long_frames_between_messages() -> None:
    reading = Reading()
    got = reading.got
    async with served(reading.run) as client:
        await client.send(client.conn.send(TextMessage("first")))
        await eventually(reading.lent)
        long = "x" * (FAST_MAX_PAYLOAD + 10)  # a 64-bit length: trio-websocket's reader reads it
        data = (
            client.conn.send(TextMessage("a"))
            + client.conn.send(Ping(b"p1"))
            + client.conn.send(TextMessage("b"))
            + client.fragments("frag", size=2)
            + client.conn.send(TextMessage("c"))
            + client.conn.send(TextMessage(long))
            + client.conn.send(TextMessage("d"))
        )
        await client.send(data)
        pong = await client.event()
        assert isinstance(pong, Pong) and bytes(pong.payload) == b"p1"  # answered by trio-websocket's handler
        await eventually(lambda: len(got) == 7)
        await eventually(reading.lent)  # the reader handled what it was given, and handed the socket back
        await client.send(client.conn.send(TextMessage("after")))
        await eventually(lambda: len(got) == 8)
    assert got == ["first", "a", "b", "frag", "c", long, "d", "after"]


@pytest.mark.parametrize("seed", range(6))
async def test_any_frames_cut_anywhere_come_out_as_sent(seed: int) -> None:
    rng = random.Random(seed)
    reading = Reading()
    got = reading.got
    async with served(reading.run) as client:
        sent: list[object] = []
        data = b""
        for i in range(120):
            kind = rng.choice(["text", "text", "text", "bytes", "ping", "fragments", "long"])
            if kind == "ping":
                data += client.conn.send(Ping(b"%d" % i))
                continue
            if kind == "fragments":
                text = f"f{i}-" + "y" * rng.randrange(1, 20)
                data += client.fragments(text, size=rng.randrange(1, 6))
                sent.append(text)
            elif kind == "long":
                text = "z" * rng.choice([126, 1000, FAST_MAX_PAYLOAD, FAST_MAX_PAYLOAD + 1, 100_000])
                data += client.conn.send(TextMessage(text))
                sent.append(text)
            elif kind == "bytes":
                payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
                data += client.conn.send(BytesMessage(payload))
                sent.append(payload)
            else:
                text = f"t{i}" + "é" * rng.randrange(0, 200)
                data += client.conn.send(TextMessage(text))
                sent.append(text)
        pos = 0
        while pos < len(data):  # cut at random points, some pieces sent back to back, some after a pause
            step = rng.choice([1, 2, 5, 17, 300, 4096, 20_000])
            await client.send(data[pos : pos + step])
            pos += step
            if rng.random() < 0.3:
                await trio.sleep(0.001)
        await eventually(lambda: len(got) == len(sent), timeout=20)
        await client.send(client.conn.send(CloseConnection(1000)))
        await eventually(reading.ended)
    assert got[:-1] == sent
    assert got[-1] == ("closed", 1000)


async def test_the_hub_closing_from_another_task_completes_at_once() -> None:
    reading = Reading()
    got = reading.got
    closed = trio.Event()

    async def handler(ws: WebSocketConnection) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reading.run, ws)
            await eventually(lambda: len(got) == 2 and reading.lent())  # the session waits on the socket itself
            with trio.fail_after(5):  # the handshake's timeout (60 s) is not waited out
                await ws.aclose(1008, "revoked")
            closed.set()

    async with served(handler) as client:
        await client.send(client.conn.send(TextMessage("one")))
        await client.send(client.conn.send(TextMessage("two")))
        event = await client.event()
        assert isinstance(event, CloseConnection) and event.code == 1008
        await client.send(client.conn.send(event.response()))
        with trio.fail_after(5):
            await closed.wait()
        await eventually(reading.ended)
    assert got[:2] == ["one", "two"] and got[2][0] == "closed" and len(got) == 3  # type: ignore[index]


async def test_the_session_closing_while_it_holds_the_socket_completes_at_once() -> None:
    # As a device session does on a protocol error: it closes between two reads, the socket still its own. The close
    # frame sent gives the socket back (`Guard.send`): trio-websocket's reader must read the peer's close.
    closed = trio.Event()

    async def handler(ws: WebSocketConnection) -> None:
        with DirectReader(ws) as reader:
            assert await reader.next() == "one"
            await until_lent(reader)
            with trio.fail_after(5):  # the handshake's timeout (60 s) is not waited out
                await ws.aclose(1002, "bad message")
            closed.set()
            with pytest.raises(ConnectionClosed):
                await reader.next()

    async with served(handler) as client:
        await client.send(client.conn.send(TextMessage("one")))
        event = await client.event()
        assert isinstance(event, CloseConnection) and event.code == 1002
        await client.send(client.conn.send(event.response()))
        with trio.fail_after(5):
            await closed.wait()


async def test_a_reset_while_the_session_reads_ends_it() -> None:
    reading = Reading()
    got = reading.got
    async with served(reading.run) as client:
        await client.send(client.conn.send(TextMessage("one")))
        await client.send(client.conn.send(TextMessage("two")))
        await eventually(lambda: len(got) == 2 and reading.lent())
        client.stream.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.stream.socket.close()  # a reset, not a close handshake
        await eventually(reading.ended)
    assert got[:-1] == ["one", "two"]
    assert got[-1] == ("closed", 1006)


async def test_leaving_gives_the_socket_back() -> None:
    after: list[object] = []
    left = trio.Event()

    async def handler(ws: WebSocketConnection) -> None:
        with DirectReader(ws) as reader:
            assert await reader.next() == "one"
            await until_lent(reader)
        left.set()
        # trio-websocket's reader reads the socket again; a HANDOVER it left in the channel is skipped
        while True:
            message = await ws.get_message()
            if message is not HANDOVER:
                after.append(message)
            if len(after) == 2:
                return

    async with served(handler) as client:
        await client.send(client.conn.send(TextMessage("one")))
        with trio.fail_after(10):
            await left.wait()
        await client.send(client.conn.send(TextMessage("two")))
        await client.send(client.conn.send(Ping(b"still")))
        pong = await client.event()
        assert isinstance(pong, Pong)
        await client.send(client.conn.send(TextMessage("three")))
        await eventually(lambda: len(after) == 2)
    assert after == ["two", "three"]
