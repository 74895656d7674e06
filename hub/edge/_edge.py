"""The hub's edge: one listener for every WebSocket endpoint, the handshake checks they share, and the refusals.

Each connection goes through the same steps, in this order, before an endpoint sees it:

    admission (listener: handshakes in progress)        503 / 429 + Retry-After, before a byte is read
    connection limits (open connections, per address)   503 / 429 + Retry-After
    path -> endpoint                                    404
    credentials in the URL                              401 token_in_url
    Origin (the endpoint's policy)                      403
    shutting down                                       503
    Authorization: Bearer (the endpoint authenticates)  401 bad_credentials

then the upgrade is accepted and the endpoint's `serve` gets the open WebSocket, the identity (None when the
endpoint allows a session without a Bearer header: it authenticates in its first message) and the admission ticket.
Endpoints know nothing of each other or of this module's counting.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import ssl
from typing import Protocol

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from hub.config import ServerConfig
from hub.edge import _wire
from hub.edge._admission import Admission, Refusal
from hub.edge._listener import Ticket, serve_listener, with_reason_phrase
from hub.stats import Stats

__all__ = ["Edge", "Endpoint", "Identity", "Ticket", "Unavailable", "reject", "remote_of"]

log = logging.getLogger("hub.edge")

#: Longest wait for a peer to answer our close frame.
CLOSE_TIMEOUT = 2.0
#: File descriptors kept for the hub's own files (registry, spool, sink files, logs) besides connections.
FD_RESERVE = 100


class Unavailable(Exception):
    """Raised by `Endpoint.authenticate` when the credentials cannot be checked now (the state store is away)."""


@attrs.frozen
class Identity:
    """Who a connection authenticated as: a device (role "device") or an operator (its role)."""

    name: str
    role: str


def _host_header(request: WebSocketRequest) -> bytes | None:
    """The request's Host header: wsproto takes it out of the headers into its Request event's `host`."""
    host = getattr(getattr(request, "_event", None), "host", None)
    return host.encode("utf-8", "replace") if isinstance(host, str) and host else None


class Endpoint(Protocol):
    """A WebSocket endpoint served behind the edge."""

    #: The URL path it serves, and its name in logs.
    path: str
    name: str
    #: What its Bearer token is called in a 401's body ("device token").
    credential: str
    #: Whether a connection without an Authorization header is refused (401) before the upgrade.
    bearer_required: bool

    def refuse_origin(self, origin: bytes | None, host: bytes | None) -> tuple[str, str] | None:
        """`(reason, body)` of a 403 for this Origin header (None: the header is absent), or None to let it in.

        `host` is the request's Host header (a browser's page may come from this hub's own HTTP port).
        """
        ...

    async def authenticate(self, token: str) -> Identity | None:
        """The identity a Bearer token belongs to; None for unknown, wrong, revoked or malformed.

        Raises `Unavailable` when it cannot tell now: the handshake is answered 503 with a `Retry-After`.
        """
        ...

    async def serve(self, ws: WebSocketConnection, identity: Identity | None, remote: str, ticket: Ticket) -> None:
        """Serve one accepted connection until it ends; punch `ticket` once it is a session. Must not raise."""
        ...


def remote_of(request_or_ws: WebSocketRequest | WebSocketConnection) -> str:
    """`address:port` of the peer, or "gone" once the peer has reset the connection."""
    try:
        remote = request_or_ws.remote
    except OSError:  # the peer reset the connection already: getpeername() fails
        return "gone"
    return remote if isinstance(remote, str) else f"{remote.address}:{remote.port}"


def _address(request: WebSocketRequest) -> str:
    """The peer's IP address (without the port): the key of the per-address connection limit."""
    try:
        remote = request.remote
    except OSError:  # the peer reset the connection already
        return "gone"
    return str(remote.address) if hasattr(remote, "address") else str(remote)


async def reject(request: WebSocketRequest, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """Answer the handshake with HTTP `status` and its reason phrase (`403 Forbidden`), then close the TCP connection.

    wsproto (1.3) writes the status line with no reason phrase (`HTTP/1.1 403 `) and offers no way to give one: this
    connection's wsproto `send` is wrapped to put it in. trio-websocket (0.12) leaves a rejected connection open until
    the client closes it: a refused client could hold its socket forever, past every connection limit.
    """
    wsproto = getattr(getattr(request, "_connection", None), "_wsproto", None)
    if wsproto is not None:
        send = wsproto.send
        wsproto.send = lambda event: with_reason_phrase(send(event), status)  # this connection only
    try:
        await request.reject(status, extra_headers=headers, body=body)
    finally:
        connection = getattr(request, "_connection", None)
        close_stream = getattr(connection, "_close_stream", None)
        if close_stream is not None:
            await close_stream()


def _check_fd_limit(max_connections: int) -> None:
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return
    if soft != resource.RLIM_INFINITY and max_connections > soft - FD_RESERVE:
        log.warning(
            "server.max_connections is above what the file-descriptor limit allows: raise `ulimit -n` or lower it",
            extra={"kv": {"max_connections": max_connections, "fd_limit": soft}},
        )


class Edge:
    """Listens on the hub's WebSocket port and hands each checked, accepted connection to its endpoint."""

    def __init__(self, config: ServerConfig, endpoints: list[Endpoint], stats: Stats) -> None:
        self.config = config
        self.stats = stats
        self.endpoints = {endpoint.path: endpoint for endpoint in endpoints}
        self.admission = Admission(config.max_handshakes, config.max_handshakes_per_address)
        self.closing = False
        self.open_connections = 0  # WebSocket connections being served: every endpoint, any stage
        self._by_address: dict[str, int] = {}
        self._listen_scope = trio.CancelScope()

    async def listen(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections until `stop_accepting`; return once every connection has ended. Reports the port.

        With `ssl_context` the listener speaks TLS (wss://); the context is read at each handshake. With
        `reuse_port` other processes may listen on the same port (SO_REUSEPORT), the kernel spreading connections.
        """
        cfg = self.config
        _check_fd_limit(cfg.max_connections)
        async with trio.open_nursery() as connections:

            async def accept_loop(task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
                with self._listen_scope:
                    await serve_listener(
                        self._handle,
                        cfg.host,
                        cfg.port,
                        ssl_context,
                        admission=self.admission,
                        handler_nursery=connections,
                        handshake_timeout=cfg.handshake_timeout,
                        close_timeout=CLOSE_TIMEOUT,
                        max_message_size=cfg.max_message_bytes,
                        evict_after=cfg.evict_slow_handshake_after,
                        on_refused=self._on_refused,
                        reuse_port=reuse_port,
                        task_status=task_status,
                    )

            sockets = await connections.start(accept_loop)
            port = sockets[0].socket.getsockname()[1]
            paths = sorted(self.endpoints)
            kv = {"host": cfg.host, "port": port, "tls": ssl_context is not None, "paths": paths}
            log.info("websocket endpoints listening", extra={"kv": kv})
            task_status.started(port)

    def stop_accepting(self) -> None:
        """Close the listening socket; handshakes still in progress are refused (503 shutting_down)."""
        self.closing = True
        self._listen_scope.cancel()

    # ------------------------------------------------------------------ refusals

    async def _refuse(
        self,
        request: WebSocketRequest,
        status: int,
        why: str,
        body: str,
        *,
        endpoint: str | None = None,
        retry_after: int | None = None,
        origin: str | None = None,
    ) -> None:
        self.stats.refused += 1
        kv = {"status": status, "reason": why, "remote": remote_of(request), "endpoint": endpoint}
        if origin is not None:
            kv["origin"] = origin
        log.warning("handshake refused", extra={"kv": kv})
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="hub"'))
        if retry_after is not None:
            headers.append((b"retry-after", str(retry_after).encode()))
        await reject(request, status, headers, body.encode() + b"\n")

    def _on_refused(self, address: str, refusal: Refusal) -> None:
        """A connection refused before its handshake (too many handshakes in progress): counted and logged."""
        stats = self.stats
        stats.refused += 1
        stats.admission_refused += 1
        if not refusal.answered:
            stats.admission_unanswered += 1
        # One line per refusal would be a log flood in a surge: the first, then every 1,000th.
        if self.admission.refused % 1000 == 1:
            log.warning(
                "handshake refused",
                extra={
                    "kv": {
                        "status": refusal.status,
                        "reason": refusal.reason,
                        "remote": address,
                        "retry_after": refusal.retry_after if refusal.answered else None,
                        "refused_so_far": self.admission.refused,
                        "unanswered_so_far": stats.admission_unanswered,
                    }
                },
            )

    # ------------------------------------------------------------------ handshake

    async def _handle(self, request: WebSocketRequest, ticket: Ticket) -> None:
        """Count the connection against the total and per-address limits, then check and serve it; never raises."""
        cfg = self.config
        address = _address(request)
        try:
            if self.open_connections >= cfg.max_connections:
                why, body = "too_many_connections", "the hub is at its connection limit; retry later"
                await self._refuse(request, 503, why, body, retry_after=cfg.retry_after)
                return
            per_address = cfg.max_connections_per_address
            if per_address and self._by_address.get(address, 0) >= per_address:
                why, body = "too_many_from_address", "too many connections from your address; retry later"
                await self._refuse(request, 429, why, body, retry_after=cfg.retry_after)
                return
            self.open_connections += 1
            self._by_address[address] = self._by_address.get(address, 0) + 1
            try:
                await self._check_and_serve(request, ticket)
            finally:
                self.open_connections -= 1
                left = self._by_address[address] - 1
                if left:
                    self._by_address[address] = left
                else:
                    del self._by_address[address]
        except ConnectionClosed:
            pass  # the client left during the handshake
        except Exception:
            # One connection's failure must never take the listener (and every other session) down with it.
            log.exception("handshake failed", extra={"kv": {"remote": remote_of(request)}})

    async def _check_and_serve(self, request: WebSocketRequest, ticket: Ticket) -> None:
        # The checks keep their locals (headers, credentials) in a frame of their own, gone before the session runs.
        admitted = await self._admit(request)
        if admitted is None:
            return
        endpoint, identity = admitted
        _wire.guard(request)
        ws = await request.accept()
        _wire.forget_request(request)
        await endpoint.serve(ws, identity, remote_of(request), ticket)

    async def _admit(self, request: WebSocketRequest) -> tuple[Endpoint, Identity | None] | None:
        """The endpoint of `request` and who it is, once every check before the upgrade passed; else None (the
        request was answered with its refusal)."""
        path, _, query = request.path.partition("?")
        endpoint = self.endpoints.get(path)
        if endpoint is None:
            served = ", ".join(sorted(self.endpoints))
            await self._refuse(request, 404, "unknown_path", f"no endpoint here; the hub serves {served}")
            return None
        name = endpoint.name
        if "token" in query.lower():
            # Never log the query string: it would put the credential in the logs.
            body = "credentials go in the Authorization header, not the URL"
            await self._refuse(request, 401, "token_in_url", body, endpoint=name)
            return None
        headers: dict[bytes, bytes] = {k.lower(): v for k, v in request.headers}
        refusal = endpoint.refuse_origin(headers.get(b"origin"), _host_header(request))
        if refusal is not None:
            origin = headers.get(b"origin", b"").decode("latin-1")[:200]
            await self._refuse(request, 403, *refusal, endpoint=name, origin=origin)
            return None
        if self.closing:
            await self._refuse(request, 503, "shutting_down", "hub shutting down; retry later", endpoint=name)
            return None
        auth = headers.get(b"authorization")
        identity = None
        if auth is not None or endpoint.bearer_required:
            token = None
            if auth is not None and auth[:7].lower() == b"bearer ":
                with contextlib.suppress(UnicodeDecodeError):
                    token = auth[7:].strip().decode("ascii")
            try:
                identity = None if token is None else await endpoint.authenticate(token)
            except Unavailable:  # the credentials cannot be checked now: come back, as after any 503
                body = "the hub cannot check credentials right now; retry later"
                retry_after = self.config.retry_after
                await self._refuse(request, 503, "state_unavailable", body, endpoint=name, retry_after=retry_after)
                return None
            if identity is None:
                body = f"missing, unknown or revoked {endpoint.credential}"
                await self._refuse(request, 401, "bad_credentials", body, endpoint=name)
                return None
        return endpoint, identity
