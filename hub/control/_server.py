"""The operator control channel (/v1/control): handshake checks, auth, requests, roles, subscriptions."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from device_client.protocol import CloseCode
from hub.config import HubConfig
from hub.control._codec import (
    ControlError,
    Empty,
    ErrorCode,
    Ping,
    Request,
    Result,
    SendCommand,
    Subscribe,
    Subscribed,
    Unsubscribe,
    decode_auth,
    encode_auth_invalid,
    encode_auth_ok,
    encode_auth_required,
    encode_dropped,
    encode_error,
    encode_event,
    encode_reply,
    lookup,
    read_frame,
)
from hub.control._operations import Caller, Operations
from hub.edge import (
    PARSE_FAILURE_REASONS,
    DirectReader,
    Identity,
    Ticket,
    Unavailable,
    close_stream,
    parse_failure,
    send_now,
)
from hub.fleet import (
    Broadcaster,
    CommandRecord,
    CommandService,
    DeviceStatus,
    JobRunner,
    Ledgers,
    Presence,
    RegistryStore,
    StoreUnavailable,
    Subscription,
    TwinService,
    parse_selector,
)
from hub.ingest import Pipeline
from hub.ratelimit import Rate, TokenBucket
from hub.stats import Stats

__all__ = ["CONTROL_PATH", "ControlServer", "ControlSession", "ErrorCode"]

log = logging.getLogger("hub.control")

CONTROL_PATH = "/v1/control"
#: Seconds between checks of the registry for operators revoked while connected.
REVOKE_CHECK_EVERY = 2.0
#: Longest wait for a peer to answer our close frame.
CLOSE_TIMEOUT = 2.0
#: Bad frames are counted over this many seconds when deciding to close a session.
ERROR_WINDOW = 60.0
#: `send_command` requests with `wait` one session may have pending; more make its reader wait.
MAX_WAITS = 32


def split_host(header: str) -> str:
    """The host of a Host header, without its port (an IPv6 address keeps its brackets), in lower case."""
    if header.startswith("[") and "]" in header:
        return header[: header.index("]") + 1].lower()
    return header.rsplit(":", 1)[0].lower()


def _too_big(text: str | bytes, limit: int) -> bool:
    if len(text) > limit:
        return True
    # A str of n characters is at most 4n bytes of UTF-8: encode only when it might be over. (surrogateescape: the
    # bytes as received, also when they were not UTF-8.)
    return isinstance(text, str) and len(text) * 4 > limit and len(text.encode("utf-8", "surrogateescape")) > limit


_R = TypeVar("_R", bound=Request)
#: The request argument is untyped here: the table holds handlers of different request classes, each found by its
#: request's class.
_Handler = Callable[["ControlSession", Any], Awaitable[Result]]
#: Request class -> the `ControlSession` method that serves it (registered with `@_handles`): the requests bound to a
#: session. Every other request is served by `Operations` (hub.control._operations.HANDLERS), also for REST.
_SESSION_HANDLERS: dict[type[Request], _Handler] = {}


def _handles(kind: type[_R]) -> Callable[[Callable[[ControlSession, _R], Awaitable[Result]]], _Handler]:
    """Register the decorated method as the handler of requests of class `kind` (hub.control.REQUESTS)."""

    def register(handler: Callable[[ControlSession, _R], Awaitable[Result]]) -> _Handler:
        _SESSION_HANDLERS[kind] = handler
        return handler

    return register


class ClusterView(Protocol):
    """What the control channel asks of the other hubs in a cluster (hub.cluster.Cluster)."""

    async def statuses(self, names: list[str]) -> dict[str, DeviceStatus]:
        """The presence of `names` across the cluster (raises `StoreUnavailable` if it cannot be read)."""
        ...


class ControlServer:
    """The /v1/control endpoint: operator sessions (requests, subscriptions, commands)."""

    path = CONTROL_PATH
    name = "control"
    credential = "operator token"
    bearer_required = False

    def __init__(
        self,
        config: HubConfig,
        registry: RegistryStore,
        presence: Presence,
        ledgers: Ledgers,
        commands: CommandService,
        broadcaster: Broadcaster,
        stats: Stats,
        pipeline: Pipeline,
        revoke_device: Callable[[str], None],
        twins: TwinService | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.presence = presence
        self.ledgers = ledgers
        self.commands = commands
        self.broadcaster = broadcaster
        self.stats = stats
        self.pipeline = pipeline
        self.twins = TwinService(registry) if twins is None else twins
        self.revoke_device = revoke_device  # closes the device's open session (4003)
        self.started_at = time.time()
        self.closing = False
        self.console_port: int | None = None  # the HTTP port serving the console, once it listens
        self._sessions: set[ControlSession] = set()
        self._buckets: dict[str, TokenBucket] = {}  # per operator, shared by its sessions
        self._closers: trio.Nursery | None = None  # while `run` runs
        self.cluster: ClusterView | None = None  # the other hubs, in a cluster (hub.cluster)
        self.jobs: JobRunner | None = None  # this hub's fleet jobs, once its runner is set (hub.app)
        self.operations = Operations(self)  # each request, for this channel's sessions and for REST

    def bucket(self, operator: str) -> TokenBucket:
        """The request bucket of `operator` (`control.request_rate`, `control.request_burst`)."""
        bucket = self._buckets.get(operator)
        if bucket is None:
            cfg = self.config.control
            bucket = self._buckets[operator] = TokenBucket(
                Rate(cfg.request_rate, cfg.request_burst), trio.current_time()
            )
        return bucket

    @property
    def sessions(self) -> int:
        """Authenticated control sessions open now."""
        return len(self._sessions)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close the sessions of operators revoked while connected (4003); runs until cancelled."""
        async with trio.open_nursery() as closers:
            self._closers = closers
            task_status.started()
            while True:
                await trio.sleep(REVOKE_CHECK_EVERY)
                try:
                    revoked = await self.registry.revoked_operators()
                except StoreUnavailable as exc:  # Redis away: try again next time
                    log.warning("cannot read revoked operators", extra={"kv": {"error": str(exc)}})
                    continue
                except Exception:  # a busy or broken registry file: try again next time
                    log.exception("cannot read revoked operators")
                    continue
                for name in revoked:
                    self.revoke_operator(name)

    def revoke_operator(self, name: str) -> None:
        """Close the open sessions of an operator whose token was just revoked (4003)."""
        closers = self._closers
        if closers is None:
            return
        for session in list(self._sessions):
            if session.operator == name and not session.closing:
                log.warning("operator revoked: closing its session", extra=session.kv(reason="revoked"))
                closers.start_soon(session.close, CloseCode.REVOKED, "token revoked")

    async def close_all(self, code: int, reason: str) -> None:
        """Refuse new sessions and close every open one with `code` (1001 at hub shutdown)."""
        self.closing = True
        async with trio.open_nursery() as nursery:
            for session in list(self._sessions):
                nursery.start_soon(session.close, code, reason)

    # ------------------------------------------------------------------ the endpoint (see hub.edge)

    def refuse_origin(self, origin: bytes | None, host: bytes | None) -> tuple[str, str] | None:
        """Browsers may connect from the console's own origin and from `control.allowed_origins`; other clients send
        no Origin.

        The console's origin is that of a page from this hub's HTTP port: the host the browser asked for (the Host
        header, whose port is the WebSocket port), the HTTP port, https when TLS is configured.
        """
        if origin is None:
            return None
        text = origin.decode("latin-1")
        if text in self.config.control.allowed_origins or self._is_console(text, host):
            return None
        return "origin_not_allowed", "this Origin may not use the control channel"

    def _is_console(self, origin: str, host: bytes | None) -> bool:
        if self.console_port is None or host is None:
            return False
        scheme = "https" if self.config.tls.enabled else "http"
        hostname = split_host(host.decode("latin-1"))
        default = 443 if scheme == "https" else 80
        own = {f"{scheme}://{hostname}:{self.console_port}"}
        if self.console_port == default:
            own.add(f"{scheme}://{hostname}")
        return origin in own

    async def authenticate(self, token: str) -> Identity | None:
        """The operator a token belongs to (SQLite: in a worker thread, the file may be busy)."""
        try:
            found = await self.registry.authenticate_operator(token)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        return None if found is None else Identity(*found)

    async def serve(self, ws: WebSocketConnection, identity: Identity | None, remote: str, ticket: Ticket) -> None:
        """Serve an operator session (first-message auth when the handshake carried no Bearer header)."""
        ticket.admitted()  # operators have their own auth timeout; they do not hold a device's place
        await ControlSession(self, ws, remote).run(identity)

    def _joined(self, session: ControlSession) -> None:
        self._sessions.add(session)

    def _left(self, session: ControlSession) -> None:
        self._sessions.discard(session)


class _WaitedReply:
    """The reply to a `send_command` with `wait`, once the command is final or the wait is over.

    Written by whoever makes the command final, as soon as it is committed (`now`, a `CommandService.when_final`
    hook): a waiting task would only wake a scheduling round later. The session's one timer task (`_time_out_waits`)
    answers those still open at their deadline; a command the hook cannot follow (another hub's, or final already)
    gets a task of its own (`_wait_and_reply`)."""

    __slots__ = ("command_id", "done", "req", "req_id", "session")

    def __init__(self, session: ControlSession, req_id: int, req: SendCommand, command_id: str) -> None:
        self.session, self.req_id, self.req, self.command_id = session, req_id, req, command_id
        self.done = False

    def now(self, rec: CommandRecord) -> None:
        if not self.done:
            self.session._answer(self, encode_reply(self.req_id, self.req, rec.as_dict()))


class ControlSession:
    """One operator connection: auth, a reader that answers requests, a sender that drains subscriptions."""

    def __init__(self, server: ControlServer, ws: WebSocketConnection, remote: str) -> None:
        self.server = server
        self.ws = ws
        self.remote = remote
        self.operator = ""
        self.role = ""
        self.closing = False
        self._subs: dict[int, Subscription] = {}
        self._wake = trio.Event()
        self._errors: deque[float] = deque()
        self._limited = False  # the latest request was refused for the rate: log only the first of a run
        self.caller = Caller("", "", remote)
        self._waits = trio.Semaphore(MAX_WAITS)
        # Waited replies the command service's hook answers, by deadline (trio's clock); done ones leave lazily.
        self._deadlines: list[tuple[float, int, _WaitedReply]] = []
        self._order = itertools.count()
        self._timer_at: float | None = None  # when `_time_out_waits` wakes next, while it runs
        self._timer_wake = trio.Event()
        self._nursery: trio.Nursery | None = None  # the session's, while it serves requests
        self._scope = trio.CancelScope()
        self._done = trio.Event()

    def kv(self, **extra: object) -> dict[str, dict[str, object]]:
        """Log context of this session (never a token)."""
        return {"kv": {"operator": self.operator, "role": self.role, "remote": self.remote, **extra}}

    async def run(self, identity: Identity | None) -> None:
        """Serve the session until the peer leaves or the hub closes it; never raises."""
        server = self.server
        joined = False
        try:
            with self._scope:
                if identity is None:
                    identity = await self._first_message_auth()
                    if identity is None:
                        return
                self.operator, self.role = identity.name, identity.role
                self.caller = Caller(identity.name, identity.role, self.remote)
                if server.closing:  # authenticated after close_all took its list of sessions
                    await self._abort(CloseCode.GOING_AWAY, "hub shutting down")
                    return
                server._joined(self)
                joined = True
                await self._send(encode_auth_ok(self.operator, self.role))
                log.info("operator connected", extra=self.kv())
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._sender)
                    nursery.start_soon(self._keepalive)
                    await self._read(nursery)
                    nursery.cancel_scope.cancel()
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("control session failed", extra=self.kv())
            await self._abort(CloseCode.INTERNAL, "internal error")
        finally:
            self._nursery = None
            for sub in self._subs.values():
                server.broadcaster.unsubscribe(sub)
            self._subs.clear()
            if joined:
                server._left(self)
                log.info("operator disconnected", extra=self.kv())
            self._done.set()

    async def close(self, code: int, reason: str) -> None:
        """Close the WebSocket with `code` and wait for the session to end."""
        await self._abort(code, reason)
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self._done.wait()

    async def _abort(self, code: int, reason: str) -> None:
        self.closing = True
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self.ws.aclose(code, reason)
        self._scope.cancel()

    async def _send(self, text: str) -> None:
        await self.ws.send_message(text)

    # ------------------------------------------------------------------ authentication

    async def _first_message_auth(self) -> Identity | None:
        cfg = self.server.config.control
        await self._send(encode_auth_required())
        with trio.move_on_after(cfg.auth_timeout):
            try:
                text = await self.ws.get_message()
            except ConnectionClosed:
                await self._closed_while_reading()
                return None
            if _too_big(text, cfg.max_message_bytes):
                log.warning("control auth message too big", extra=self.kv(reason="too_big"))
                await self._abort(CloseCode.TOO_BIG, "message too big")
                return None
            token = decode_auth(text)
            try:
                found = None if token is None else await self.server.authenticate(token)
            except Unavailable:
                log.warning("operator not authenticated: no state store", extra=self.kv(reason="state_unavailable"))
                await self._abort(CloseCode.TRY_LATER, "cannot check credentials now; retry later")
                return None
            if found is not None:
                return found
            self.server.stats.refused += 1
            why = "bad_credentials" if token is not None else "not_auth"
            log.warning("operator authentication failed", extra=self.kv(reason=why))
            message = "unknown or revoked token" if token is not None else 'the first message must be {"type": "auth"}'
            with contextlib.suppress(ConnectionClosed):
                await self._send(encode_auth_invalid(message))
            await self._abort(CloseCode.POLICY, "authentication failed")
            return None
        self.server.stats.refused += 1
        log.warning("operator authentication timed out", extra=self.kv(reason="auth_timeout"))
        await self._abort(CloseCode.POLICY, "authentication timed out")
        return None

    # ------------------------------------------------------------------ reading and dispatch

    async def _read(self, nursery: trio.Nursery) -> None:
        limit = self.server.config.control.max_message_bytes
        try:
            with DirectReader(self.ws) as reader:  # the session reads its socket: one scheduling round a request
                while True:
                    text = await reader.next()
                    if _too_big(text, limit):
                        log.warning("control message too big", extra=self.kv(reason="too_big"))
                        await self._abort(CloseCode.TOO_BIG, "message too big")
                        return
                    await self._dispatch(text, nursery)
        except ConnectionClosed:
            await self._closed_while_reading()

    async def _closed_while_reading(self) -> None:
        """The connection closed under the reader: log it if the hub closed it (unparsable frames, too big)."""
        failure = parse_failure(self.ws)
        if failure is not None:
            why = PARSE_FAILURE_REASONS.get(failure[0], "protocol_error")
            log.warning(
                "unparsable control frame: connection closed",
                extra=self.kv(reason=why, code=failure[0], detail=failure[1][:200]),
            )
        elif self.ws.closed is not None and self.ws.closed.code == CloseCode.TOO_BIG and not self.closing:
            log.warning("control message too big", extra=self.kv(reason="too_big"))
            await close_stream(self.ws, CLOSE_TIMEOUT)

    async def _dispatch(self, text: str | bytes, nursery: trio.Nursery) -> None:
        """Answer one frame: its id, the operator's rate, its type, the role, its arguments, then its handler."""
        req_id: int | None = None
        kind: object = None
        try:
            frame = read_frame(text)
            req_id = frame.id
            self._check_rate()
            kind = frame.type
            spec = lookup(frame)
            Operations.check_role(self.caller, spec)
            request = spec.decode(frame.body)
            if isinstance(request, SendCommand) and request.wait:
                await self._submit_and_wait(frame.id, request, nursery)
                return
            handler = _SESSION_HANDLERS.get(spec.request)
            if handler is not None:
                result = await handler(self, request)
            else:
                result = await self.server.operations.run(self.caller, request)
        except ControlError as exc:
            await self._refuse_request(req_id, kind, exc)
            return
        except StoreUnavailable as exc:
            log.warning("control request without its state store", extra=self.kv(type=str(kind)[:40], error=str(exc)))
            error = ControlError(ErrorCode.UNAVAILABLE, "the hub cannot reach its state store; retry later")
            await self._refuse_request(req_id, kind, error)
            return
        except Exception:
            log.exception("control request failed", extra=self.kv(type=str(kind)[:40], id=req_id))
            await self._refuse_request(req_id, kind, ControlError(ErrorCode.INTERNAL, "internal error"))
            return
        await self._send(encode_reply(frame.id, request, result))

    async def _refuse_request(self, req_id: int | None, kind: object, error: ControlError) -> None:
        """Answer `error` and do what its code's answer says (hub.control_codes.ANSWERS)."""
        answer = error.answer
        if answer.close is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._send(encode_error(req_id, error))
            await self._abort(answer.close, error.message)
            return
        level = logging.DEBUG if answer.quiet else logging.INFO
        log.log(level, "request refused", extra=self.kv(reason=error.code, id=req_id, type=str(kind)[:40]))
        await self._send(encode_error(req_id, error))
        if answer.bad_frame:
            await self._count_bad_frame()

    def _check_rate(self) -> None:
        """Refuse the request (`rate_limited`) when the operator is over `control.request_rate`."""
        operations = self.server.operations
        if not operations.retry_after(self.operator):
            self._limited = False
            return
        if not self._limited:
            self._limited = True
            log.warning("operator over its request rate: refusing requests", extra=self.kv(reason="rate_limited"))
        raise operations.rate_error()

    async def _count_bad_frame(self) -> None:
        now = trio.current_time()
        errors = self._errors
        errors.append(now)
        while errors and errors[0] < now - ERROR_WINDOW:
            errors.popleft()
        if len(errors) > self.server.config.control.max_errors:
            log.warning("too many bad control frames: closing", extra=self.kv(reason="too_many_errors"))
            await self._abort(CloseCode.POLICY, "too many bad frames")

    # ------------------------------------------------------------------ requests

    @_handles(Ping)
    async def _ping(self, req: Ping) -> None:
        return None

    async def _submit_and_wait(self, req_id: int, req: SendCommand, nursery: trio.Nursery) -> None:
        """Submit the command; reply once it is final, or at the wait's timeout (at most `MAX_WAITS` open: the
        session reads no more requests until one is answered)."""
        record = await self.server.operations.submit_record(self.caller, req)
        # The hook goes in before anything awaits: the device's answer may be read in the next round.
        reply = _WaitedReply(self, req_id, req, record.command_id)
        commands = self.server.commands
        hooked = commands.when_final(record.command_id, reply.now)
        try:
            await self._waits.acquire()
        except BaseException:
            commands.when_final(record.command_id, None)
            raise
        if reply.done:  # answered while the session waited for room
            return
        if not hooked:
            nursery.start_soon(self._wait_and_reply, reply)
            return
        at = trio.current_time() + req.wait_timeout
        deadlines = self._deadlines
        if len(deadlines) > 2 * MAX_WAITS:  # mostly answered ones: keep the open
            deadlines[:] = [entry for entry in deadlines if not entry[2].done]
            heapq.heapify(deadlines)
        heapq.heappush(deadlines, (at, next(self._order), reply))
        if self._timer_at is None:
            self._timer_at = at
            nursery.start_soon(self._time_out_waits)
        elif at < self._timer_at:
            self._timer_wake.set()

    def _answer(self, reply: _WaitedReply, text: str) -> None:
        """Answer `reply` with the frame `text` (its record, or an error), once: written now when the connection takes
        it at once (`send_now`), else by a task."""
        if reply.done:
            return
        reply.done = True
        self._waits.release()
        nursery = self._nursery
        if nursery is not None and not send_now(self.ws, text, nursery):
            nursery.start_soon(self._send_answer, text)

    async def _send_answer(self, text: str) -> None:
        try:
            await self._send(text)
        except ConnectionClosed:
            self._scope.cancel()

    async def _time_out_waits(self) -> None:
        """Answer each waited reply still open at its deadline with the command as it is then; runs while any is
        open. At the session's end, the hooks of those still open go."""
        deadlines = self._deadlines
        commands = self.server.commands
        try:
            while deadlines:
                at, _, reply = deadlines[0]
                if reply.done:
                    heapq.heappop(deadlines)
                    continue
                if trio.current_time() < at:
                    self._timer_at = at
                    self._timer_wake = trio.Event()
                    with trio.move_on_at(at):
                        await self._timer_wake.wait()
                    continue
                heapq.heappop(deadlines)
                commands.when_final(reply.command_id, None)  # from here this task answers
                try:
                    record = await commands.wait_final(reply.command_id, 0.0)
                except ControlError as exc:
                    self._answer(reply, encode_error(reply.req_id, exc))
                    continue
                self._answer(reply, encode_reply(reply.req_id, reply.req, record.as_dict()))
        finally:
            self._timer_at = None
            for _, _, reply in deadlines:
                if not reply.done:
                    commands.when_final(reply.command_id, None)
            deadlines.clear()

    async def _wait_and_reply(self, reply: _WaitedReply) -> None:
        """Reply with the command's record once final (or at the wait's timeout), for a command the service's hook
        does not follow (another hub's, or final already)."""
        try:
            record = await self.server.operations.wait_final(reply.req, reply.command_id)
        except ControlError as exc:
            self._answer(reply, encode_error(reply.req_id, exc))
            return
        self._answer(reply, encode_reply(reply.req_id, reply.req, record))

    @_handles(Subscribe)
    async def _subscribe(self, req: Subscribe) -> Subscribed:
        cfg = self.server.config.control
        if len(self._subs) >= cfg.max_subscriptions:
            raise ControlError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS, f"at most {cfg.max_subscriptions} subscriptions per session"
            )
        devices: Iterable[str] | None = req.devices
        if req.selector is not None:
            # Resolved now: a device labelled later joins no open subscription (subscribe again for it).
            selector = parse_selector(req.selector)
            chosen = {r.name for r in await self.server.registry.list() if selector.matches(r.labels)}
            devices = chosen if req.devices is None else chosen.intersection(req.devices)
        sub = self.server.broadcaster.subscribe(req.topic, devices, self._notify, capacity=cfg.buffer)
        self._subs[sub.id] = sub
        log.debug("subscribed", extra=self.kv(subscription=sub.id, topic=req.topic))
        return {"subscription": sub.id}

    @_handles(Unsubscribe)
    async def _unsubscribe(self, req: Unsubscribe) -> Empty:
        sub = self._subs.pop(req.subscription, None)
        if sub is None:
            raise ControlError(ErrorCode.NOT_FOUND, f"no subscription {req.subscription}")
        self.server.broadcaster.unsubscribe(sub)
        return {}

    # ------------------------------------------------------------------ pushing events

    def _notify(self) -> None:
        self._wake.set()

    async def _sender(self) -> None:
        """Drain the subscriptions' buffers onto the socket, round robin; only this task waits on a slow client."""
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                busy = True
                while busy:
                    busy = False
                    for sub in list(self._subs.values()):
                        if not sub.active:
                            continue
                        buffer = sub.buffer
                        notice = buffer.take_notice()
                        if notice is not None:
                            dropped, coalesced = notice
                            await self._send(encode_dropped(sub.id, dropped, coalesced))
                        if sub.active and len(buffer):
                            event = sub.render(buffer.pop())
                            await self._send(encode_event(sub.id, event))
                            busy = True
        except ConnectionClosed:
            self._scope.cancel()

    async def _keepalive(self) -> None:
        cfg = self.server.config.presence
        try:
            while True:
                await trio.sleep(cfg.ping_interval)
                with trio.move_on_after(cfg.ping_timeout) as timeout:
                    await self.ws.ping()
                if timeout.cancelled_caught:
                    log.warning("operator stopped answering pings: closing", extra=self.kv(reason="ping_timeout"))
                    await self._abort(CloseCode.POLICY, "ping timeout")
                    return
        except ConnectionClosed:
            self._scope.cancel()
