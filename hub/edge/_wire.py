"""Per-connection fixes to how trio-websocket 0.12 and wsproto 1.3 treat a peer's malformed frames; faster paths.

Unpatched, a text frame that is not UTF-8, or any frame wsproto cannot parse, makes wsproto report a close the peer
never sent; trio-websocket then closes the TCP connection without a close frame (the peer sees 1006). `guard` fixes
both for one connection: invalid UTF-8 reaches the session as text it can refuse (`has_bad_utf8`) while the session
stays open, and any other parse failure is answered with a real close frame (`CloseCode.PROTOCOL_ERROR`).

`guard` also reads whole data frames itself (`Guard._frames`) and lets a frame to send take a free send lock at
once (`SendLock`). `send_now` spares a scheduling round: it writes a message from the step of the task that made it
(a command for a device, the reply to an operator) when the connection can take it at once; `Guard.take` reads the
frames a session reads from its socket itself (hub/edge/_direct.py).

Where hub/edge/_unmask.c was compiled, importing this module puts `Masker` in place of wsproto's `XorMaskerSimple`
for the whole process (wsproto makes one per masked frame and has no hook for it): payloads are
unmasked in one C call instead of four `bytes.translate` passes and their copies.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import re
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, cast

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import WSConnection, frame_protocol
from wsproto.connection import Connection, ConnectionState
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Event, TextMessage
from wsproto.frame_protocol import Frame, MessageDecoder, Opcode

if TYPE_CHECKING:
    from hub.edge._direct import SocketShare

try:  # compiled by setup.py where a C compiler is at hand
    from hub.edge._unmask import unmask
except ImportError:  # pragma: no cover - depends on the install
    unmask = None  # type: ignore[assignment]

__all__ = [
    "PARSE_FAILURE_REASONS",
    "Guard",
    "Masker",
    "SendLock",
    "close_stream",
    "forget_request",
    "guard",
    "has_bad_utf8",
    "parse_failure",
    "send_now",
]

#: Close reasons the hub sends when it cannot parse the peer's frames, by close code (stable: documented).
PARSE_FAILURE_REASONS = {1002: "protocol_error", 1007: "bad_utf8"}

_utf8 = codecs.getincrementaldecoder("utf-8")

#: The longest data frame the fast path reads itself (a frame of 126..65535 bytes has a two-byte length).
FAST_MAX_PAYLOAD = 65535

# Invalid UTF-8 bytes arrive as U+DC80..U+DCFF (surrogateescape); no valid UTF-8 text can hold a lone surrogate.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def has_bad_utf8(text: str) -> bool:
    """True if a text message was not valid UTF-8 on the wire (it holds a lone surrogate)."""
    return not text.isascii() and _LONE_SURROGATE.search(text) is not None


class Masker:
    """wsproto's `XorMaskerSimple` in C: XORs payload pieces with a frame's masking key, each where the last ended."""

    __slots__ = ("_key", "_offset")

    def __init__(self, masking_key: bytes | bytearray) -> None:
        self._key = bytes(masking_key)
        self._offset = 0

    def process(self, data: bytes | bytearray) -> bytearray:
        out = unmask(data, self._key, self._offset)
        self._offset = (self._offset + len(data)) & 3
        return out


if unmask is not None:
    frame_protocol.XorMaskerSimple = Masker  # type: ignore[misc,assignment]


class _TolerantText(MessageDecoder):
    """wsproto 1.3's `MessageDecoder.process_frame`, decoding text with errors="surrogateescape" instead of failing.

    A failed decode would end the connection: wsproto's frame parser cannot go on after it.
    """

    def process_frame(self, frame: Frame) -> Frame:
        if self.opcode is None and frame.opcode is Opcode.TEXT:
            if frame.frame_finished and frame.message_finished:  # a whole message in one frame, the usual case
                payload = cast(bytes, frame.payload)
                return Frame(Opcode.TEXT, payload.decode("utf-8", "surrogateescape"), True, True)
            self.opcode = Opcode.TEXT
            self.decoder = _utf8(errors="surrogateescape")
        elif self.opcode is not Opcode.TEXT or frame.opcode is not Opcode.CONTINUATION:
            return super().process_frame(frame)  # binary messages, and the opcode errors wsproto reports
        assert self.decoder is not None
        finished = frame.frame_finished and frame.message_finished
        payload = cast(bytes, frame.payload)  # a text frame's payload (wsproto types it for every opcode)
        out = Frame(Opcode.TEXT, self.decoder.decode(payload, finished), frame.frame_finished, finished)
        if finished:
            self.opcode = None
            self.decoder = None
        return out


class Guard:
    """Stands in for one connection's `WSConnection` (trio-websocket's `_wsproto`); see the module docstring.

    Once the upgrade is sent it keeps wsproto's `Connection` (the frames) alone: the handshake's objects (h11's
    connection and buffers, the request), about 3 KB a connection, are then garbage."""

    __slots__ = (
        "_buf",
        "_conn",
        "_deliver",
        "_inner",
        "_max_payload",
        "_pending",
        "_share",
        "_unsent",
        "client",
        "failure",
    )

    def __init__(
        self,
        inner: WSConnection,
        max_payload: int = 0,
        deliver: trio.MemorySendChannel[str | bytes] | None = None,
    ) -> None:
        self._inner: WSConnection | None = inner  # until the upgrade
        self._conn: Connection | None = None  # from the upgrade on
        self._pending: Sequence[Event] = ()  # handshake events not read when it was let go (none, in practice)
        self.client = inner.client
        #: (code, wsproto's description) once the peer's frames could not be parsed, else None.
        self.failure: tuple[int, str] | None = None
        # The fast path (`_frames`): whole masked data frames of at most `_max_payload` bytes are read here, what
        # they leave in `_buf` waits for the rest of its frame; everything else goes to wsproto. 0: never.
        self._max_payload = max_payload if unmask is not None and not inner.client else 0
        self._buf: bytes | bytearray = b""
        # The connection's message channel: a message the fast path reads goes straight into it (`send_nowait`)
        # while it has room, instead of being yielded for trio-websocket's reader to pass on (an event, a handler,
        # and two scheduling rounds of its reader task per message). None: every message is yielded.
        self._deliver = deliver
        # The part of a frame `send_now` could not write: it goes out ahead of the next frame sent (`send`).
        self._unsent = b""
        # The connection's `SocketShare` while a session reads its socket itself (`DirectReader` sets it): a close
        # frame sent gives the socket back to trio-websocket's reader, which must read the peer's close.
        self._share: SocketShare | None = None

    def at_frame_start(self) -> bool:
        """True if the next bytes that come start a frame the fast path may read (`take`): the upgrade done, the fast
        path on, and nothing of a frame or message held by wsproto."""
        conn = self._conn
        return conn is not None and self._max_payload > 0 and not self._pending and _at_frame_start(conn)

    def take(self, data: bytes, deliver: Callable[[str | bytes], object]) -> bytes:
        """The fast path for a session that reads the socket itself, at a frame start: the messages of the whole data
        frames in `data` (after what waits in `_buf`) go to `deliver`; returns what must go to trio-websocket's reader
        as it came (from the first frame this path does not take; b"" if none)."""
        conn = self._conn
        assert conn is not None
        buf = self._buf
        self._buf = data if not buf else buf + data
        spill: list[bytes] = []
        for _event in self._frames(conn, deliver, spill):  # `deliver` never refuses: nothing is yielded
            pass
        return spill[0] if spill else b""

    @property
    def state(self) -> ConnectionState:
        if self._conn is not None:
            return self._conn.state
        assert self._inner is not None
        return self._inner.state

    def receive_data(self, data: bytes | None) -> None:
        conn = self._conn
        if conn is not None:
            if data and self._max_payload and _at_frame_start(conn):
                buf = self._buf
                if not buf:
                    self._buf = data
                elif type(buf) is bytearray:
                    buf += data  # the start of a frame waiting for its rest
                else:
                    self._buf = buf + data
                return
            if self._buf:  # wsproto takes over mid-stream: what is buffered comes first
                conn.receive_data(bytes(self._buf))
                self._buf = b""
            conn.receive_data(data)
        else:
            assert self._inner is not None
            self._inner.receive_data(data)

    def send(self, event: Event) -> bytes:
        conn = self._conn
        if conn is not None:
            if type(event) is CloseConnection and self._share is not None:
                self._share.give_back()  # the close handshake needs trio-websocket's reader
            if (
                isinstance(event, TextMessage | BytesMessage)
                and event.message_finished
                and self._max_payload
                and _at_message_start(conn)
            ):
                data = _data_frame(event.data)  # as wsproto would frame it
            else:
                data = conn.send(event)
            if self._unsent:
                data, self._unsent = self._unsent + data, b""
            return data
        inner = self._inner
        assert inner is not None
        data = inner.send(event)
        conn = inner.connection
        if type(event) is AcceptConnection and conn is not None:
            # The frame parser exists from here on, and has parsed nothing yet (that happens in `events`).
            conn._proto._message_decoder = _TolerantText()
            if conn._proto.extensions:
                self._max_payload = 0  # frames an extension changes (none is offered) are wsproto's to read
            self._pending = tuple(inner.handshake.events())
            self._conn, self._inner = conn, None
        return data

    def events(self) -> Generator[Event, None, None]:
        if self._conn is None:
            assert self._inner is not None
            source: Iterable[Event] = self._inner.events()  # goes on to the frames' events after the upgrade
        elif self._pending:
            pending, self._pending = self._pending, ()
            source = itertools.chain(pending, self._frames(self._conn), self._conn.events())
        else:
            if self._buf:
                yield from self._frames(self._conn)
            source = self._conn.events()  # every message after the upgrade: no wrapper
        for event in source:
            conn = self._conn
            if type(event) is CloseConnection and conn is not None and conn.state is ConnectionState.OPEN:
                # Not a close frame (that would have moved the state on): wsproto failed to parse a frame and
                # cannot read more. Present it as the peer's close, so that trio-websocket answers it with a close
                # frame carrying this code and a stable reason, then closes the TCP connection.
                self.failure = (event.code, event.reason or "")  # wsproto gives its parse error's text
                conn._state = ConnectionState.REMOTE_CLOSING
                event = CloseConnection(event.code, PARSE_FAILURE_REASONS.get(event.code, "protocol_error"))
            yield event

    def _frames(
        self, conn: Connection, deliver: Callable[[str | bytes], object] | None = None, spill: list[bytes] | None = None
    ) -> Iterator[Event]:
        """The messages of the whole data frames in `_buf` (delivered, or yielded as wsproto would give them); the
        first frame this path does not take (control, fragment, extension bits, longer than `_max_payload`) and all
        after it go to wsproto (or, given `spill`, into it, for trio-websocket's reader: see `take`).

        Taken: FIN set, RSV clear, opcode text or binary, masked, the length in its shortest form: a frame wsproto
        reads in one piece, and as wsproto would read it (text decoded as `_TolerantText` decodes it)."""
        buf, self._buf = self._buf, b""
        end = len(buf)
        pos = 0
        limit = self._max_payload
        if deliver is None and self._deliver is not None:
            deliver = self._deliver.send_nowait
        while end - pos >= 6:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if (b0 != 0x81 and b0 != 0x82) or b1 < 0x80:
                break  # not a whole masked data frame without extension bits: wsproto's
            size = b1 & 0x7F
            start = pos + 6
            if size == 126:
                start = pos + 8
                if end < start:
                    self._buf = bytearray(buf[pos:])
                    return
                size = (buf[pos + 2] << 8) | buf[pos + 3]
                if size < 126:
                    break  # not the shortest form: wsproto refuses it
            elif size == 127:
                break  # 64 KiB and more: wsproto's (it streams what it reads)
            if size > limit:
                break
            stop = start + size
            if stop > end:
                self._buf = bytearray(buf[pos:])  # the rest of this frame has not come yet
                return
            payload = unmask(memoryview(buf)[start:stop], buf[start - 4 : start], 0)
            pos = stop
            message: str | bytes = payload.decode("utf-8", "surrogateescape") if b0 == 0x81 else bytes(payload)
            if deliver is not None:
                try:
                    deliver(message)
                    continue
                except trio.WouldBlock:
                    pass  # the reader waits for room, as it would for any message: backpressure is unchanged
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    continue  # nobody reads any more: trio-websocket drops the message the same way
            if type(message) is str:
                yield TextMessage(message, True, True)
            else:
                yield BytesMessage(cast(bytes, message), True, True)
        rest = end - pos
        if rest and rest < 6 and buf[pos] in (0x81, 0x82) and (rest < 2 or buf[pos + 1] >= 0x80):
            self._buf = bytearray(buf[pos:])  # a header cut short: it may start a frame this path takes
        elif rest and spill is not None:
            spill.append(bytes(buf[pos:]))
        elif rest:
            conn.receive_data(bytes(buf[pos:]))


def _at_message_start(conn: Connection) -> bool:
    """True if a whole message may go out as one frame now: the connection open, no message of ours half sent."""
    return conn.state is ConnectionState.OPEN and conn._proto._outbound_opcode is None


def _data_frame(message: str | bytes | bytearray) -> bytes:
    """A server's unmasked frame of one whole message, as wsproto's `FrameProtocol.send_data` makes it."""
    if isinstance(message, str):
        first, data = 0x81, message.encode()
    else:
        first, data = 0x82, bytes(message)
    n = len(data)
    if n < 126:
        return bytes((first, n)) + data
    if n < 65536:
        return bytes((first, 126, n >> 8, n & 0xFF)) + data
    return bytes((first, 127)) + n.to_bytes(8, "big") + data


def _at_frame_start(conn: Connection) -> bool:
    """True if wsproto holds no part of a frame or message (so bytes that come next start a frame)."""
    proto = conn._proto
    decoder = proto._frame_decoder
    return (
        conn.state is ConnectionState.OPEN
        and decoder.header is None
        and not decoder.buffer.buffer
        and proto._message_decoder.opcode is None
        and not conn._events
    )


class SendLock:
    """Stands in for trio-websocket's send lock (a `StrictFIFOLock`): a free lock is taken without a scheduling round.

    Every message the hub sends takes the lock first, and trio's `acquire` yields to the scheduler even when the lock
    is free: the frame then waited one whole round of the loop (under load, every other ready session's work) before
    its bytes went out. Here a free lock is taken at once, so the bytes go out in the sender's own step (`send_all`
    still checkpoints, before and after its write). Senders that find it taken wait first come, first served, and
    the lock passes straight to the next one. The queue is made on first contention: an idle connection holds two
    slots instead of a lock, its parking lot and that lot's ordered dict (about 340 bytes)."""

    __slots__ = ("_held", "_waiting")

    def __init__(self) -> None:
        self._held = False
        self._waiting: trio.lowlevel.ParkingLot | None = None

    async def __aenter__(self) -> None:
        if not self._held:
            self._held = True
            return
        waiting = self._waiting
        if waiting is None:
            waiting = self._waiting = trio.lowlevel.ParkingLot()
        await waiting.park()  # woken by `__aexit__`, which hands the lock over (it stays held)

    async def __aexit__(self, *exc_info: object) -> None:
        waiting = self._waiting
        if waiting:
            waiting.unpark()
        else:
            self._held = False


def guard(request: WebSocketRequest) -> Guard:
    """Guard the connection of `request`; call it before `request.accept()`."""
    connection = request._connection  # trio-websocket has no public hook for its wsproto object
    wire = Guard(
        connection._wsproto,
        min(connection._max_message_size, FAST_MAX_PAYLOAD),
        connection._send_channel,
    )
    connection._wsproto = wire  # type: ignore[assignment]  # Guard stands in for WSConnection (duck-typed)
    connection._stream_lock = SendLock()  # type: ignore[assignment]  # duck-typed too
    return wire


def forget_request(request: WebSocketRequest) -> None:
    """After the upgrade: keep only the request's host and path. trio-websocket holds the request for the whole
    connection; its headers and proposals are of no more use (about 1.2 KB a connection).

    Emptied in place: trio-websocket's reader task also holds the event, as the last one it handled, and with
    messages going straight into the channel (`Guard._frames`) an idle device's reader may never handle another."""
    event = request._event
    for name in ("extra_headers", "extensions", "subprotocols"):
        object.__setattr__(event, name, ())  # a frozen dataclass, referenced by trio-websocket only


def send_now(ws: WebSocketConnection, message: str, nursery: trio.Nursery) -> bool:
    """Write a whole text message on `ws` in the caller's own step, without awaiting; False if nothing was written
    (then send it the usual way, `send_message`).

    For a frame that one task makes for a connection another task serves (a command for a device, the reply to an
    operator, an ack once a write is durable): handed to the connection's own task, it waited a scheduling round
    (under load, every other ready session's work) before its bytes went out. Only tried when the frame may go out
    now as `send_message` would write it: the connection open and ours alone (send lock free, no message half sent),
    plain TCP (not TLS), the guard framing whole messages. The socket takes what its buffer has room for; what it
    could not take goes out ahead of the connection's next frame, and a task started in `nursery` makes one at once
    (`_flush_unsent`)."""
    wire: object = ws._wsproto
    lock: object = ws._stream_lock
    stream = ws._stream
    if (
        type(wire) is not Guard
        or type(lock) is not SendLock
        or lock._held
        or wire._unsent
        or not wire._max_payload
        or wire._conn is None
        or not _at_message_start(wire._conn)
        or ws._close_reason is not None
        or type(stream) is not trio.SocketStream
    ):
        return False
    frame = _data_frame(message)
    try:
        written = stream.socket._sock.send(frame)  # type: ignore[attr-defined]  # trio's socket wraps a stdlib one
    except OSError:  # the buffer full (BlockingIOError), or the connection broken: `send_message` will tell
        return False
    if written < len(frame):
        wire._unsent = frame[written:]
        nursery.start_soon(_flush_unsent, ws)
    return True


async def _flush_unsent(ws: WebSocketConnection) -> None:
    """Send what `send_now` left of a frame, ahead of a pong (unsolicited pongs are allowed and ignored, RFC 6455
    5.5.3); nothing if the connection has closed meanwhile."""
    with contextlib.suppress(ConnectionClosed):
        await ws.pong()


def parse_failure(ws: WebSocketConnection) -> tuple[int, str] | None:
    """(close code, wsproto's description) if the hub closed `ws` because it could not parse the peer's frames."""
    wire: object = ws._wsproto
    return wire.failure if type(wire) is Guard else None


async def close_stream(ws: WebSocketConnection, timeout: float) -> None:
    """After trio-websocket sent a close frame on its own (1009): wait up to `timeout` s for the peer's, then hang up.

    trio-websocket 0.12 leaves the TCP connection to the peer then: one that never answers would hold it forever.
    """
    with trio.move_on_after(timeout):
        await ws._close_handshake.wait()
    await ws._close_stream()
