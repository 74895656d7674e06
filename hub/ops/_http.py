"""A tiny HTTP/1.1 server on trio and h11 for `/metrics` and `/healthz`: GET only, one request per connection."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import partial

import h11
import trio

from hub.edge import reason_phrase

__all__ = ["Route", "serve_http"]

log = logging.getLogger("hub.http")

#: A route: returns status, content type and body; runs in a worker thread, so it may block.
Route = Callable[[], "tuple[int, str, bytes]"]

_READ_CHUNK = 4096


class _Refuse(Exception):
    """Answer with `status` and close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def serve_http(
    host: str,
    port: int,
    routes: Mapping[str, Route],
    *,
    max_request_bytes: int = 8192,
    request_timeout: float = 5.0,
    max_connections: int = 64,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `routes` (path -> callable returning (status, content type, body)) until cancelled.

    Reports the bound port through `task_status` (useful with `port=0`). Each route runs in a worker
    thread, so it may block (e.g. a health check against the database). A request larger than
    `max_request_bytes` is answered 431 (413 for a body), one not complete within `request_timeout`
    seconds 408, an unknown path 404, a method other than GET 405. Every connection is closed after
    its response; more than `max_connections` at once are answered 503.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("http listener on %s:%d: %s", host, bound, ", ".join(sorted(routes)))
    limit = trio.Semaphore(max_connections)
    handler = partial(_connection, dict(routes), limit, max_request_bytes, request_timeout)
    async with trio.open_nursery() as nursery:
        task_status.started(bound)
        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)


async def _connection(
    routes: dict[str, Route],
    limit: trio.Semaphore,
    max_request_bytes: int,
    request_timeout: float,
    stream: trio.SocketStream,
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_request_bytes)
    try:
        if limit.value == 0:
            await _answer(stream, conn, 503, "text/plain; charset=utf-8", b"too many connections\n")
            return
        async with limit:
            body_allowed = True
            try:
                with trio.fail_after(request_timeout):
                    request = await _read_request(stream, conn, max_request_bytes)
                if request.method == b"HEAD":  # h11 sends no body after HEAD; the 405 goes out bare
                    body_allowed = False
                status, content_type, body = await _dispatch(routes, request)
            except _Refuse as exc:
                status, content_type, body = exc.status, "text/plain; charset=utf-8", f"{exc.reason}\n".encode()
            except trio.TooSlowError:
                status, content_type, body = 408, "text/plain; charset=utf-8", b"request timeout\n"
            except h11.RemoteProtocolError as exc:
                status, content_type, body = exc.error_status_hint, "text/plain; charset=utf-8", b"bad request\n"
            extra = [(b"allow", b"GET")] if status == 405 else []
            with trio.move_on_after(request_timeout):  # a client that does not read gets no more time
                await _answer(stream, conn, status, content_type, body if body_allowed else b"", extra)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("http: connection ended early: %s", exc)
    except Exception:  # one bad connection must not take the listener down
        log.exception("http: connection failed")
    finally:
        await _close(stream)


async def _read_request(stream: trio.SocketStream, conn: h11.Connection, max_bytes: int) -> h11.Request:
    """The request line and headers; the body (if any) is not read: GET needs none."""
    received = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(_READ_CHUNK)
            received += len(data)
            if received > max_bytes and conn.their_state is h11.IDLE:
                raise _Refuse(431, "request header fields too large")
            conn.receive_data(data)  # b"" (EOF) makes h11 raise or return ConnectionClosed
            continue
        if isinstance(event, h11.Request):
            return event
        if isinstance(event, h11.ConnectionClosed):
            raise trio.BrokenResourceError("client closed before sending a request")
        raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}", error_status_hint=400)


async def _dispatch(routes: dict[str, Route], request: h11.Request) -> tuple[int, str, bytes]:
    target = request.target.decode("ascii", "replace")
    path = target.split("?", 1)[0]
    route = routes.get(path)
    if route is None:
        raise _Refuse(404, "not found")
    if request.method != b"GET":
        raise _Refuse(405, "method not allowed")
    length = next((v for k, v in request.headers if k == b"content-length"), b"0")
    if length != b"0" or any(k == b"transfer-encoding" for k, _ in request.headers):
        raise _Refuse(413, "a GET request takes no body")
    try:
        return await trio.to_thread.run_sync(route)
    except Exception:
        log.exception("http: route %s failed", path)
        return 500, "text/plain; charset=utf-8", b"internal error\n"


async def _answer(
    stream: trio.SocketStream,
    conn: h11.Connection,
    status: int,
    content_type: str,
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"connection", b"close"),
        *(extra or []),
    ]
    data = conn.send(h11.Response(status_code=status, headers=headers, reason=reason_phrase(status)))
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def _close(stream: trio.SocketStream) -> None:
    """Half-close, drain what the client still sends for a moment (so the answer is not lost to a reset), close."""
    with trio.move_on_after(1.0):
        try:
            await stream.send_eof()
            drained = 0
            while drained < 1 << 20 and (data := await stream.receive_some(_READ_CHUNK)):
                drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)
