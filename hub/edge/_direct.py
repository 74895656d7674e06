"""A session that reads its own socket: one scheduling round per message it receives instead of two.

trio-websocket reads each connection in a task of its own (`_reader_task`), which puts each message in a channel the
session's task waits on: every message crossed a round of the loop between the two tasks (under load, every other
ready task's work) - on a command's path twice, the operator's request and the device's answer. With `DirectReader`
the session, while it reads, waits on the socket itself and reads the whole data frames in its own step
(`Guard.take`). Everything else - pings, pongs, close frames, fragments, long frames, the end of the stream - it
hands, as the bytes that came, to trio-websocket's reader, which handles them as ever.

The socket changes hands through `SocketShare`, installed as the read of the plain-TCP stream trio-websocket reads:

- a `DirectReader` asks for it; trio-websocket's reader, at its next read, puts `HANDOVER` in the message channel
  (after every message it delivered) and parks;
- the session, taking `HANDOVER` from the channel, reads the socket; what it does not take it forwards: the parked
  reader returns it from its read, handles it, and parks again behind a new `HANDOVER`;
- a close frame sent (by any task: the handshake needs the reader), or the session done reading, gives the socket
  back for good.
"""

from __future__ import annotations

import contextlib
from typing import Final

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from hub.edge._wire import Guard

__all__ = ["HANDOVER", "READ_BURST", "DirectReader", "SocketShare"]

#: Messages a `DirectReader` takes in a row without a scheduling round (`next`) before it lets others run.
READ_BURST = 4
#: Bytes read from the socket at once (trio-websocket's reader reads as much).
RECEIVE_SIZE = 4096


class _Handover:
    """The channel item that tells the session the socket is its to read (`HANDOVER`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "HANDOVER"


HANDOVER: Final = _Handover()


class SocketShare:
    """Lets a session take the reading of a plain-TCP connection over from trio-websocket's reader (`DirectReader`).

    Installed as the stream's `receive_some` for as long as the session reads (trio's `SocketStream` cannot be
    subclassed); trio-websocket's reader alone calls it."""

    __slots__ = ("_channel", "_forward", "_parked", "lent", "stream", "waiting", "wanted")

    def __init__(self, stream: trio.SocketStream, channel: trio.MemorySendChannel[object]) -> None:
        self.stream = stream
        self._channel = channel  # the connection's messages (and `HANDOVER`)
        self.wanted = True  # the session reads the socket whenever the reader has parked
        self.lent = False  # the session holds the socket now (it took `HANDOVER` and has not forwarded since)
        self.waiting = False  # the session waits for the socket to be readable (the reader must not, meanwhile)
        self._forward: bytes | BaseException | None = None  # for the parked reader: what its read returns (raises)
        self._parked: trio.lowlevel.Task | None = None  # the reader, parked (no object made for it: idle devices)
        stream.receive_some = self.receive_some  # type: ignore[method-assign]  # this connection only

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """trio-websocket's reader's read: the socket's bytes, or what the session forwards."""
        while True:
            forward = self._forward
            if forward is not None:
                self._forward = None
                if type(forward) is bytes:
                    return forward
                raise forward  # type: ignore[misc]  # an error the session met reading
            if not self.wanted:
                return await trio.SocketStream.receive_some(self.stream, max_bytes)
            try:
                await self._channel.send(HANDOVER)  # after every message this reader delivered
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.wanted = False  # nobody reads the messages any more
                continue
            if self._forward is None and self.wanted:
                self._parked = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._unpark)

    def forward(self, data: bytes | BaseException) -> None:
        """The session hands `data` (bytes as they came, b"" at the end of the stream, or an error) to the reader,
        and the socket with it until the reader parks again."""
        self.lent = False
        self._forward = data
        self._wake_reader()

    def give_back(self) -> None:
        """The socket is the reader's for good (the connection closing, the session done reading); a session
        waiting for it to be readable hands it over when that wait ends (two tasks cannot wait on one socket)."""
        self.wanted = False
        if not self.waiting:
            self.release()

    def release(self) -> None:
        """The session no longer holds the socket: the reader reads it."""
        self.lent = False
        self._wake_reader()

    def _wake_reader(self) -> None:
        task = self._parked
        if task is not None:
            self._parked = None
            trio.lowlevel.reschedule(task)

    def _unpark(self, raise_cancel: object) -> trio.lowlevel.Abort:
        self._parked = None  # cancelled while parked: nobody wakes it again
        return trio.lowlevel.Abort.SUCCEEDED


class DirectReader:
    """A session's messages from its connection, read from the socket in the session's own task where it can be
    (plain TCP, the guard's fast path on), from trio-websocket's channel where not (TLS, say).

    Use it as a context manager around the session's reading: leaving gives the socket back. `next`, `get` and
    `get_nowait` raise `ConnectionClosed` as `get_message` does."""

    __slots__ = ("_burst", "_channel", "_guard", "_inbox", "_share", "_ws")

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        self._channel: trio.MemoryReceiveChannel[object] = ws._recv_channel
        self._inbox: list[str | bytes] = []  # messages read from the socket, oldest first
        self._burst = 0
        self._share: SocketShare | None = None
        self._guard: Guard | None = None
        stream: object = ws._stream
        guard: object = ws._wsproto
        if (
            type(stream) is trio.SocketStream
            and type(guard) is Guard
            and guard._max_payload
            and guard._share is None
            and ws._close_reason is None
        ):
            share = SocketShare(stream, ws._send_channel)  # type: ignore[arg-type]  # it also carries HANDOVER
            guard._share = share
            self._share, self._guard = share, guard

    def __enter__(self) -> DirectReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        share = self._share
        if share is not None:
            share.give_back()
            with contextlib.suppress(AttributeError):
                del share.stream.receive_some  # the class's again: no cycle between the stream and the share
            if self._guard is not None:
                self._guard._share = None

    async def next(self) -> str | bytes:
        """The next message: one that has come is taken at once, up to `READ_BURST` in a row; then this waits (and
        others run). Raises `Cancelled` if the caller's scope is cancelled, even with messages waiting."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._burst < READ_BURST:
            message = self.get_nowait()
            if message is not None:
                self._burst += 1
                return message
        self._burst = 0
        return await self.get()

    def get_nowait(self) -> str | bytes | None:
        """A message that has come (read from the socket if it is the session's and has bytes), else None."""
        inbox = self._inbox
        while not inbox:
            share = self._share
            if share is None or not share.lent:
                try:
                    message = self._channel.receive_nowait()
                except trio.WouldBlock:
                    return None
                except (trio.ClosedResourceError, trio.EndOfChannel):
                    raise ConnectionClosed(self._ws._close_reason) from None
                if message is HANDOVER:
                    self._take(share)
                    continue
                return message  # type: ignore[return-value]  # str or bytes
            try:
                data = share.stream.socket._sock.recv(RECEIVE_SIZE)  # type: ignore[attr-defined]  # the stdlib one
            except BlockingIOError:
                return None
            except OSError as exc:  # reset, or closed under us: the reader reports it as it would have
                share.forward(trio.BrokenResourceError(f"{type(exc).__name__}: {exc}"))
                continue
            self._read(share, data)
        return inbox.pop(0)

    async def get(self) -> str | bytes:
        """The next message, waiting for it if none has come (this always lets other tasks run first)."""
        if self._inbox:
            await trio.lowlevel.checkpoint()
            return self._inbox.pop(0)
        while True:
            share = self._share
            if share is None or not share.lent:
                try:
                    message = await self._channel.receive()
                except (trio.ClosedResourceError, trio.EndOfChannel):
                    raise ConnectionClosed(self._ws._close_reason) from None
                if message is not HANDOVER:
                    return message  # type: ignore[return-value]  # str or bytes
                self._take(share)
            else:
                share.waiting = True
                try:
                    await trio.lowlevel.wait_readable(share.stream.socket._sock)  # type: ignore[attr-defined]
                except (trio.ClosedResourceError, OSError, ValueError):
                    share.wanted = False  # closed under us: the reader finds out and ends the channel
                finally:
                    share.waiting = False
                if not share.wanted:  # given back meanwhile: the reader reads what came
                    share.release()
            message = self.get_nowait()
            if message is not None:
                return message

    @staticmethod
    def _take(share: SocketShare | None) -> None:
        """`HANDOVER` came: the socket is the session's, unless it was given back since."""
        if share is not None and share.wanted:
            share.lent = True

    def _read(self, share: SocketShare, data: bytes) -> None:
        """Bytes read from the socket: the whole data frames' messages go to the inbox, the rest to the reader."""
        guard = self._guard
        assert guard is not None
        if data and guard.at_frame_start():
            rest = guard.take(data, self._inbox.append)
            if rest:
                share.forward(rest)
        else:
            share.forward(data)  # the end of the stream (b""), or wsproto holds part of a frame or message
