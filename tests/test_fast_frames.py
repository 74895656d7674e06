"""The hub's own reading of whole data frames (hub/edge/_wire.py `Guard`) gives what wsproto alone gives.

A byte stream of frames a client sends (text and binary of every length form, fragments, pings, a close, and frames
wsproto refuses), cut at random points and fed piece by piece as trio-websocket feeds it, must come out as the same
messages, control events and parse failures through the guard (fast path) as through a plain wsproto connection.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import WebSocketConnection, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Message, Ping, Request, TextMessage

from hub.edge._wire import (
    FAST_MAX_PAYLOAD,
    Guard,
    SendLock,
    _TolerantText,
    send_now,
)
from tests.wire import guarded_server


def _pair() -> tuple[WSConnection, WSConnection]:
    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="h", target="/")))
    return client, server


def guarded(max_payload: int = FAST_MAX_PAYLOAD) -> Guard:
    client, server = _pair()
    guard = Guard(server, max_payload)
    assert [type(e) for e in guard.events()] == [Request]
    client.receive_data(guard.send(AcceptConnection()))
    return guard


def plain() -> WSConnection:
    client, server = _pair()
    assert [type(e) for e in server.events()] == [Request]
    client.receive_data(server.send(AcceptConnection()))
    assert server.connection is not None
    server.connection._proto._message_decoder = _TolerantText()  # the same text decoding as the guard's
    return server


def read(conn: Any, stream: bytes, cuts: list[int]) -> list[tuple[Any, ...]]:
    """What a reader sees: whole messages (parts joined), pings, closes; events drained after every piece."""
    out: list[tuple[Any, ...]] = []
    parts: list[Any] = []
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    for a, b in itertools.pairwise(bounds):
        if a == b:
            continue
        conn.receive_data(stream[a:b])
        for event in conn.events():
            if isinstance(event, Message):
                parts.append(event.data)
                if event.message_finished:
                    joined = "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
                    out.append((type(event).__name__, joined))
                    parts = []
            elif isinstance(event, CloseConnection):
                out.append(("close", event.code))
                return out
            else:
                out.append((type(event).__name__, bytes(getattr(event, "payload", b""))))
    return out


def frames(client: WSConnection, kinds: list[tuple[str, int]]) -> bytes:
    out = b""
    for kind, n in kinds:
        if kind == "text":
            out += client.send(TextMessage("é" * (n // 2) + "a" * (n % 2)))
        elif kind == "bytes":
            out += client.send(BytesMessage(bytes(i % 251 for i in range(n))))
        elif kind == "fragments":
            out += client.send(TextMessage("x" * n, message_finished=False))
            out += client.send(TextMessage("yz", message_finished=True))
        elif kind == "ping":
            out += client.send(Ping(b"p" * min(n, 125)))
        elif kind == "bad_utf8":  # invalid UTF-8 in a text frame: the hub refuses it as text, the session stays
            out += _masked(0x81, b"ok \xff\xfe end"[: max(n, 4)])
        elif kind == "long_form":  # a 2-byte length for a short payload: wsproto refuses it (1002)
            out += bytes([0x81, 0x80 | 126, 0, 3]) + b"\0\0\0\0" + b"abc"
        elif kind == "unmasked":  # a client frame without a mask: refused
            out += bytes([0x81, 3]) + b"abc"
        elif kind == "rsv":  # an extension bit nobody agreed: refused
            out += _masked(0xC1, b"abc")
    return out


def _masked(b0: int, payload: bytes) -> bytes:
    key = b"\x11\x22\x33\x44"
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([b0, 0x80 | len(payload)]) + key + body


SIZES = st.sampled_from([0, 1, 5, 125, 126, 127, 1000, 65535, 65536, 70000])
KINDS = st.lists(
    st.tuples(
        st.sampled_from(["text", "text", "bytes", "fragments", "ping", "bad_utf8", "long_form", "unmasked", "rsv"]),
        SIZES,
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(KINDS, st.lists(st.integers(0, 1 << 20), max_size=12), st.booleans())
def test_the_guard_reads_as_wsproto_reads(kinds: list[tuple[str, int]], cuts: list[int], close: bool) -> None:
    stream = frames(_client(), kinds)
    if close:
        stream += _client().send(CloseConnection(1000, "bye"))
    assert read(guarded(), stream, cuts) == read(plain(), stream, cuts)


def _client() -> WSConnection:
    client, server = _pair()
    client.receive_data(server.send(AcceptConnection()))
    assert [type(e) for e in client.events()] == [AcceptConnection]
    return client


def test_small_frames_take_the_fast_path() -> None:
    guard = guarded()
    client = _client()
    stream = b"".join(client.send(TextMessage(f"m{i}")) for i in range(3)) + client.send(BytesMessage(b"\x00\x01"))
    guard.receive_data(stream[:-3])
    assert guard._buf  # waiting here, not in wsproto: the last frame's rest has not come
    first = list(guard.events())
    guard.receive_data(stream[-3:])
    assert [(type(e), e.data) for e in [*first, *guard.events()]] == [
        (TextMessage, "m0"),
        (TextMessage, "m1"),
        (TextMessage, "m2"),
        (BytesMessage, b"\x00\x01"),
    ]
    conn = guard._conn
    assert conn is not None and not conn._proto._frame_decoder.buffer.buffer  # wsproto saw none of it


def test_a_ping_between_messages_goes_through_wsproto_and_back() -> None:
    guard = guarded()
    client = _client()
    guard.receive_data(client.send(TextMessage("a")) + client.send(Ping(b"p")) + client.send(TextMessage("b")))
    assert [type(e) for e in guard.events()] == [TextMessage, Ping, TextMessage]
    guard.receive_data(client.send(TextMessage("c")))
    assert guard._buf  # wsproto is done with its part: the next frame is read here again
    assert [(type(e), e.data) for e in guard.events()] == [(TextMessage, "c")]


def test_without_a_limit_wsproto_reads_everything() -> None:
    guard = guarded(max_payload=0)
    guard.receive_data(_client().send(TextMessage("a")))
    assert not guard._buf
    assert [e.data for e in guard.events() if isinstance(e, TextMessage)] == ["a"]


async def test_a_free_send_lock_is_taken_without_a_scheduling_round() -> None:
    lock = SendLock()
    with trio.testing.assert_no_checkpoints():
        async with lock:
            pass


async def test_a_held_send_lock_serves_its_waiters_in_order() -> None:
    lock = SendLock()
    order: list[int] = []

    async def send(i: int) -> None:
        async with lock:
            order.append(i)
            await trio.sleep(0.01)  # holds it across a checkpoint, as send_all does

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(send, i)
            await trio.testing.wait_all_tasks_blocked()  # each queues behind the one before
    assert order == [0, 1, 2, 3, 4]
    with trio.testing.assert_no_checkpoints():
        async with lock:  # free again
            pass


async def test_a_send_lock_waiter_cancelled_leaves_the_queue() -> None:
    lock = SendLock()
    order: list[str] = []
    cancelled = trio.CancelScope()

    async def send(name: str) -> None:
        async with lock:
            order.append(name)
            await trio.sleep(0.01)

    async def cancelled_send() -> None:
        with cancelled:
            await send("cancelled")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, "first")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(cancelled_send)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(send, "last")
        await trio.testing.wait_all_tasks_blocked()
        cancelled.cancel()  # while it waits behind "first"
    assert order == ["first", "last"]
    with trio.testing.assert_no_checkpoints():
        async with lock:
            pass


def test_messages_go_straight_into_the_channel_while_it_has_room() -> None:
    send, receive = trio.open_memory_channel[str | bytes](2)
    client, server = _pair()
    guard = Guard(server, FAST_MAX_PAYLOAD, send)
    assert [type(e) for e in guard.events()] == [Request]
    client.receive_data(guard.send(AcceptConnection()))
    client = _client()
    stream = b"".join(client.send(TextMessage(f"m{i}")) for i in range(4)) + client.send(Ping(b"p"))
    guard.receive_data(stream)
    events = guard.events()
    third = next(events)  # m0 and m1 filled the channel: m2 is handed to the reader, which waits for room
    assert (type(third), third.data) == (TextMessage, "m2")
    assert [receive.receive_nowait(), receive.receive_nowait()] == ["m0", "m1"]
    rest = list(events)  # room again: m3 goes straight in; the ping is wsproto's, after it
    assert [type(e) for e in rest] == [Ping]
    assert receive.receive_nowait() == "m3"
    receive.close()
    guard.receive_data(client.send(TextMessage("dropped")))
    assert list(guard.events()) == []  # nobody reads: dropped, as trio-websocket drops it


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=3), st.binary(max_size=3), SIZES), min_size=1, max_size=6))
def test_frames_the_guard_sends_are_wsprotos(messages: list[Any]) -> None:
    guard, reference = guarded(), plain()
    for message in messages:
        if isinstance(message, int):
            message = "é" * message if message % 2 else b"\x01" * message
        event = TextMessage(message) if isinstance(message, str) else BytesMessage(message)
        assert guard.send(event) == reference.send(event)
    # A message sent in parts, and frames after it, stay wsproto's own.
    for event in (TextMessage("a", message_finished=False), TextMessage("b"), BytesMessage(b"c"), Ping(b"p")):
        assert guard.send(event) == reference.send(event)


@asynccontextmanager
async def _served(handler: Any) -> AsyncIterator[WebSocketConnection]:
    """A client connected to a guarded server connection that `handler(ws)` serves."""
    async with (
        guarded_server(handler) as port,
        open_websocket_url(f"ws://127.0.0.1:{port}/", max_message_size=1 << 20) as client,
    ):
        yield client


async def test_send_now_writes_a_whole_message_in_the_callers_step() -> None:
    results: list[bool] = []

    async def handler(ws: WebSocketConnection) -> None:
        async with trio.open_nursery() as nursery:
            with trio.testing.assert_no_checkpoints():
                results.append(send_now(ws, "first", nursery))
            await ws.send_message("second")  # after it, as written
            async with ws._stream_lock:  # held by another sender: not now
                results.append(send_now(ws, "never", nursery))
            await ws.send_message("third")
            await trio.testing.wait_all_tasks_blocked()
            assert not nursery.child_tasks  # written whole: nothing to finish
            await trio.sleep_forever()

    async with _served(handler) as client:
        assert [await client.get_message() for _ in range(3)] == ["first", "second", "third"]
        assert results == [True, False]


async def test_what_the_socket_cannot_take_goes_out_ahead_of_the_next_frame() -> None:
    big = "x" * 1_000_000  # more than a fresh connection's buffers hold, while the client cannot read
    results: list[bool] = []

    async def handler(ws: WebSocketConnection) -> None:
        # A small send buffer (no autotuning then): the socket cannot take the megabyte in one call on any machine.
        ws._stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        async with trio.open_nursery() as nursery:
            results.append(send_now(ws, big, nursery))  # in part: the rest, and a pong for it, from a task
            results.append(send_now(ws, "not while a frame is half out", nursery))
            assert len(nursery.child_tasks) == 1
        await ws.send_message("after")
        await trio.sleep_forever()

    async with _served(handler) as client:
        assert await client.get_message() == big
        assert await client.get_message() == "after"
        assert results == [True, False]
