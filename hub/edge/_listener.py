"""The hub's TCP listener: admission before any WebSocket work, then trio-websocket's handshake per connection.

trio-websocket's own `serve_websocket` starts the HTTP/WebSocket machinery (a connection object, a reader task,
buffers) for every accepted socket, however many arrive at once and however slowly they speak. This listener
asks `Admission` first: a connection past the bounds gets a short HTTP answer (503 or 429 with `Retry-After`)
and is closed without the handshake ever starting (past the admission's answer budget, closed without an answer);
an admitted one is handed to the handler with a `Ticket` it punches once the connection is a session (or the
handshake ends otherwise).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import trio
from trio_websocket import WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.utilities import RemoteProtocolError

from hub.edge._admission import Admission, Refusal
from hub.edge._sockets import open_shared_listeners

__all__ = ["Handler", "Ticket", "http_answer", "reason_phrase", "serve_listener", "with_reason_phrase"]

log = logging.getLogger("hub.listener")

#: Longest wait for a refused client to read its answer and hang up before the socket is closed anyway.
REFUSAL_LINGER = 1.0
#: How often those held sockets are looked at where there is no epoll; with it, how many of those with something to
#: read are looked at in one turn.
LINGER_POLL = 0.1
LINGER_BATCH = 256
#: accept() errors that mean "out of file descriptors or memory for now", and how long to pause on them.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_PAUSE = 0.1
#: struct tcp_info of a listening socket (Linux): after 8 one-byte fields and 4 u32s, tcpi_unacked is the length of
#: its accept queue and tcpi_sacked the queue's bound.
TCP_INFO = getattr(socket, "TCP_INFO", 11)
_TCP_INFO_QUEUE = struct.Struct("24xII")
#: Largest request head read before it goes to the HTTP parser (h11's own bound), and the size of each read.
MAX_REQUEST_HEAD = 16 * 1024
HEAD_READ_SIZE = 4096
#: Longest the accept loop runs before other tasks get their turn, while the kernel's accept queue is short (s).
ACCEPT_SLICE = 0.002
#: When the other tasks' turn took `LONG_TURN` or more (a surge: up to a second) and the kernel's accept queue holds
#: `RUN_AHEAD_DEPTH` or more, the loop runs on, slice after slice, up to `ACCEPT_BURST` connections: a queue served
#: 2 ms per long turn keeps its clients waiting past their connect timeout (and, once full, drops new SYNs, which are
#: resent after 1 s, 3 s...). A loop that turns quickly comes back to the queue within milliseconds anyway.
LONG_TURN = 0.02
RUN_AHEAD_DEPTH = 64
ACCEPT_BURST = 256


class Ticket:
    """One admitted connection's place among the handshakes in progress; `admitted()` gives it up once welcomed."""

    __slots__ = ("_admission", "_done", "address", "scope", "since")

    def __init__(self, admission: Admission, address: str) -> None:
        self._admission = admission
        self.address = address
        self._done = False
        self.since = trio.current_time()
        self.scope: trio.CancelScope | None = None  # the wait for the request head, while it lasts

    def admitted(self) -> None:
        """The handshake is over and the connection is a session: it no longer counts as in progress."""
        self._leave(completed=True)

    def _leave(self, *, completed: bool) -> None:
        if not self._done:
            self._done = True
            self._admission.leave(self.address, trio.current_time(), completed=completed)


Handler = Callable[[WebSocketRequest, Ticket], Awaitable[None]]


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of an HTTP status (b"Forbidden" for 403); empty for a code it does not know."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def with_reason_phrase(data: bytes, status: int) -> bytes:
    """`data` with the reason phrase put into its status line, if it starts with one that has none (`HTTP/1.1 403 `)."""
    bare = b"HTTP/1.1 %d \r\n" % status
    if not data.startswith(bare):
        return data
    return b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status)) + data[len(bare) :]


def http_answer(status: int, body: str, headers: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """A complete `Connection: close` HTTP/1.1 answer with a reason phrase and a plain-text body."""
    data = body.encode()
    lines = [b"HTTP/1.1 %d %s" % (status, reason_phrase(status))]
    for name, value in [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(data)).encode()),
        (b"connection", b"close"),
        *(headers or []),
    ]:
        lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n" + data


def _refusal_answer(refusal: Refusal) -> bytes:
    body = (
        "the hub is busy with other connections; retry after the given seconds\n"
        if refusal.status == 503
        else "too many connections in progress from your address; retry after the given seconds\n"
    )
    return http_answer(refusal.status, body, [(b"retry-after", str(refusal.retry_after).encode())])


async def _refuse(stream: trio.abc.Stream, refusal: Refusal) -> None:
    """Answer without reading the request, then hang up once the client has (bounded). For TLS connections."""
    with trio.move_on_after(REFUSAL_LINGER):
        try:
            await stream.send_all(_refusal_answer(refusal))
            while await stream.receive_some(4096):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client is gone: nothing more to say
    await trio.aclose_forcefully(stream)


class _Lingering:
    """Plain-TCP refusals: answered at accept, then held until their client hangs up (at most `REFUSAL_LINGER`).

    Closing with the request unread in our buffer would send a RST, which can destroy the answer before the
    client reads it. A client whose whole request has arrived by the time it is refused (as in a surge) has nothing
    more to send: its socket is closed at once, after the answer. Any other is held, drained until the client's
    end of file. One task for all of them, not a task each, woken by the sockets that have something to read
    (epoll; where there is none, every held socket is looked at every `LINGER_POLL`).
    """

    def __init__(self) -> None:
        self._held: dict[int, socket.socket] = {}  # by file descriptor
        self._deadlines: collections.deque[tuple[float, socket.socket]] = collections.deque()  # oldest first
        self._events = select.epoll() if hasattr(select, "epoll") else None
        self._added = trio.Event()

    def refuse(self, conn: socket.socket, refusal: Refusal, now: float) -> None:
        """Send the answer now, and our end of file; the socket is closed once the client has closed its end."""
        answer = _refusal_answer(refusal)
        try:
            conn.setblocking(False)
            tail = _drain(conn)
            if conn.send(answer) == len(answer):  # a fresh socket's send buffer takes a few hundred bytes at once
                if tail is None or tail == b"\r\n\r\n":
                    conn.close()  # nothing more to read (a whole request, or the client's end): answer, FIN, no RST
                    return
                conn.shutdown(socket.SHUT_WR)
                self._hold(conn, now + REFUSAL_LINGER)
                return
        except OSError:
            pass  # reset already
        conn.close()

    def _hold(self, conn: socket.socket, deadline: float) -> None:
        fd = conn.fileno()
        if self._events is not None:
            self._events.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        self._held[fd] = conn
        self._deadlines.append((deadline, conn))
        self._added.set()

    def _release(self, fd: int) -> None:
        conn = self._held.pop(fd)
        if self._events is not None:
            with contextlib.suppress(OSError):
                self._events.unregister(fd)
        conn.close()

    async def run(self) -> None:
        """Close each held socket once its client has hung up or its time is up; close them all when cancelled."""
        try:
            while True:
                if not self._deadlines:
                    self._added = trio.Event()
                    await self._added.wait()
                with trio.move_on_at(self._deadlines[0][0]):
                    if self._events is not None:
                        await trio.lowlevel.wait_readable(self._events.fileno())
                    else:
                        await trio.sleep(LINGER_POLL)
                if self._events is not None:
                    ready = [fd for fd, _ in self._events.poll(0, LINGER_BATCH)]
                else:
                    ready = list(self._held)
                for fd in ready:
                    conn = self._held.get(fd)
                    if conn is not None and _drain(conn) is None:
                        self._release(fd)
                now = trio.current_time()
                deadlines = self._deadlines
                while deadlines and deadlines[0][0] <= now:
                    _deadline, conn = deadlines.popleft()
                    fd = conn.fileno()  # -1 once closed
                    if self._held.get(fd) is conn:
                        self._release(fd)
        finally:
            for fd in list(self._held):
                self._release(fd)
            self._deadlines.clear()
            if self._events is not None:
                self._events.close()


def _drain(conn: socket.socket) -> bytes | None:
    """Read and drop what the client has sent; the last 4 bytes of it (b"" for none), None once it has hung up."""
    tail = b""
    try:
        while data := conn.recv(4096):
            tail = (tail + data)[-4:]
    except BlockingIOError:
        return tail
    except OSError:
        return None
    return None


def _accept_queue_long(listener: socket.socket) -> bool:
    """Whether the kernel's queue of connections waiting for accept() holds `RUN_AHEAD_DEPTH` or more.

    Linux reports a listening socket's queue length (and its bound) in TCP_INFO, as `ss -lt` shows them (Recv-Q,
    Send-Q); where it does not, False: the loop then always yields after a slice.
    """
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _TCP_INFO_QUEUE.size)
    except (OSError, AttributeError):
        return False
    if len(info) < _TCP_INFO_QUEUE.size:
        return False
    queued, _bound = _TCP_INFO_QUEUE.unpack_from(info)
    return bool(queued >= RUN_AHEAD_DEPTH)


async def _read_head(stream: trio.abc.Stream) -> bytes | None:
    """The bytes received up to the end of the HTTP request head (and any after it in the same read).

    None when the peer hangs up first. Past `MAX_REQUEST_HEAD` bytes without an end, what was read is returned
    as it is: the HTTP parser then refuses it (400), as it would have without this buffer.
    """
    head = bytearray()
    try:
        while True:
            data = await stream.receive_some(HEAD_READ_SIZE)
            if not data:
                return None
            start = max(0, len(head) - 3)
            head += data
            if head.find(b"\r\n\r\n", start) >= 0 or len(head) > MAX_REQUEST_HEAD:
                return bytes(head)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return None


async def serve_listener(
    handler: Handler,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    *,
    admission: Admission,
    handler_nursery: trio.Nursery,
    handshake_timeout: float,
    close_timeout: float,
    max_message_size: int,
    evict_after: float = 1.0,
    on_refused: Callable[[str, Refusal], None] | None = None,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections until cancelled; report the TCP listeners once they listen.

    With every handshake place taken, a newcomer evicts the oldest connection that has held a place `evict_after`
    seconds without sending its whole request head (a slow or silent client) instead of being refused: slow sockets
    cannot lock out new devices, whose requests come at once.

    With `ssl_context` each connection speaks TLS (wss://); the context is read at each handshake, so a
    reloaded certificate applies to new connections. With `reuse_port` the port is shared with other processes
    (SO_REUSEPORT: the hub's workers).
    """
    if reuse_port:
        sockets = await open_shared_listeners(host, port)
    else:
        sockets = await trio.open_tcp_listeners(port, host=host)

    async def accept_loop(listener: trio.SocketListener) -> None:
        # The decision is taken here, before a task exists: a refusal past the answer budget costs an accept and a
        # close, so a client that reconnects as fast as it can (ignoring Retry-After) buys little of the hub's time.
        # And the backlog is drained in bursts: accepting one connection per turn of a busy loop leaves a surge
        # waiting in the kernel's queue, unseen and unanswered, until the clients time out.
        sock = listener.socket
        raw = socket.socket(fileno=os.dup(sock.fileno()))  # the same listening socket, for accept() without a turn
        raw.setblocking(False)
        with raw:
            async with listener:  # closed when the loop ends: no more connections queue in the kernel
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    # In slices: a long run of admissions and refusals holds up every session's next step (an ack
                    # waits several turns of the loop). A slice that ends with connections still queued is followed
                    # by a checkpoint, not by a wait: the queue is served every turn until it is empty.
                    long_turn = False
                    while True:
                        try:
                            drained = accept_slice(raw, long_turn)
                        except OSError as exc:
                            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                                raise
                            log.error(
                                "accept failed (%s): pausing the listener for %.1f s",
                                os.strerror(exc.errno),
                                ACCEPT_PAUSE,
                            )
                            await trio.sleep(ACCEPT_PAUSE)
                            break
                        if drained:
                            break
                        yielded = time.perf_counter()
                        await trio.lowlevel.checkpoint()
                        long_turn = time.perf_counter() - yielded >= LONG_TURN

    def accept_slice(raw: socket.socket, long_turn: bool) -> bool:
        """Accept and decide for `ACCEPT_SLICE` (longer after a long turn while the kernel's queue is long); True once
        the queue is empty."""
        slice_end = time.perf_counter() + ACCEPT_SLICE
        for _ in range(ACCEPT_BURST):
            try:
                conn, peer = raw.accept()
            except BlockingIOError:
                return True
            admit(conn, str(peer[0]))
            now = time.perf_counter()
            if now >= slice_end:
                if not (long_turn and _accept_queue_long(raw)):
                    return False
                slice_end = now + ACCEPT_SLICE
        return False

    waiting_head: dict[Ticket, None] = {}  # admitted, request head not complete yet: oldest first

    def evict_slowest(now: float) -> None:
        for ticket in waiting_head:
            if now - ticket.since < evict_after:
                return
            del waiting_head[ticket]
            ticket._leave(completed=False)  # its place is free now; its task closes the connection
            if ticket.scope is not None:
                ticket.scope.cancel()
            admission.evicted += 1
            return

    def admit(conn: socket.socket, address: str) -> None:
        now = trio.current_time()
        if admission.pending >= admission.max_pending:
            evict_slowest(now)
        refusal = admission.enter(address, now)
        if refusal is not None:
            if on_refused is not None:
                on_refused(address, refusal)
            if not refusal.answered:
                conn.close()  # before any trio object exists: a client hammering the port costs an accept and this
                return
            if ssl_context is None:
                lingering.refuse(conn, refusal, now)
                return
        stream: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_side=True, https_compatible=True)
        if refusal is None:
            handler_nursery.start_soon(serve_admitted, stream, Ticket(admission, address))
        else:
            handler_nursery.start_soon(_refuse, stream, refusal)  # TLS: the answer needs the TLS handshake

    async def serve_admitted(stream: trio.abc.Stream, ticket: Ticket) -> None:
        try:
            await _serve_admitted(stream, ticket)
        finally:
            waiting_head.pop(ticket, None)
            ticket._leave(completed=False)
            # Whatever trio-websocket left open (after a 1009 it waits for the peer's close frame forever): the
            # connection is over, so is the socket, as trio.serve_listeners would have it.
            await trio.aclose_forcefully(stream)

    async def _serve_admitted(stream: trio.abc.Stream, ticket: Ticket) -> None:
        # The request head is read into a buffer of our own first: a slow or silent client costs a task and a few
        # hundred bytes, not trio-websocket's connection object, reader task and parsers, and evicting it costs
        # as little. The head then goes to trio-websocket's wsproto, as its own `_reader_task` would feed it.
        deadline = trio.current_time() + handshake_timeout
        ticket.scope = trio.CancelScope(deadline=deadline)
        waiting_head[ticket] = None
        head = None
        with ticket.scope:
            head = await _read_head(stream)
        waiting_head.pop(ticket, None)
        ticket.scope = None
        if head is None:  # hung up, timed out or evicted before the request was complete
            return
        connection = WebSocketConnection(stream, WSConnection(ConnectionType.SERVER), max_message_size=max_message_size)
        try:
            connection._wsproto.receive_data(head)
        except RemoteProtocolError as exc:  # what trio-websocket's reader does with a bad request: 400, close
            with trio.move_on_after(close_timeout):
                if exc.event_hint is not None:
                    await connection._send(exc.event_hint)
            return
        head = None  # this frame lives as long as the connection: no copy of the request head with it

        handshake = trio.CancelScope(deadline=deadline)  # the rest of it: the request's event, normally at once

        async def read() -> None:
            try:
                await connection._reader_task()
            finally:
                handshake.cancel()  # gone (or the session is over, and this scope with it)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            with handshake:
                request = await connection._get_request()
            if handshake.cancelled_caught:
                nursery.cancel_scope.cancel()
                await trio.aclose_forcefully(stream)
                return
            try:
                await handler(request, ticket)
            finally:
                ticket._leave(completed=False)  # the handshake phase is over however the handler ended
                with trio.move_on_after(close_timeout):
                    await connection.aclose()  # also ends the reader task, even when cancelled

    lingering = _Lingering()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lingering.run)
        for listener in sockets:
            nursery.start_soon(accept_loop, listener)
        task_status.started(sockets)
