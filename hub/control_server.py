"""The operator control channel (/v1/control): handshake checks, auth, requests, roles, subscriptions."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from device_client.protocol import CloseCode
from hub import _wire, fleet
from hub.commands import STATES as COMMAND_STATES
from hub.commands import CommandError, CommandService
from hub.config import HubConfig
from hub.control_codes import ErrorCode
from hub.device_server import reject
from hub.ledger import Ledgers
from hub.pipeline import Pipeline
from hub.presence import Presence
from hub.ratelimit import Rate, TokenBucket
from hub.registry import BadName, DeviceExists, Registry, UnknownDevice, role_allows
from hub.stats import Stats
from hub.subscriptions import TOPICS, Broadcaster, Subscription

if TYPE_CHECKING:
    from hub.device_server import DeviceServer

__all__ = ["CONTROL_PATH", "ControlServer", "ControlSession", "ErrorCode", "RequestError"]

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
#: Default and largest `wait_timeout` of `send_command`, in seconds.
DEFAULT_WAIT_TIMEOUT = 30.0
MAX_WAIT_TIMEOUT = 3600.0
#: Most recent commands shown in a `device` reply; default and largest `limit` of `commands`.
DETAIL_COMMANDS = 20
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000

try:
    VERSION = importlib.metadata.version("trio-telemetry-hub")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0+unknown"



#: Codes of frames that count as bad (towards `control.max_errors`).
_BAD_FRAME_CODES = frozenset({ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_TYPE})


class RequestError(Exception):
    """A request refused with a stable `code`; `message` is safe to show the operator."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@attrs.frozen
class _Identity:
    name: str
    role: str


def _remote(request_or_ws: WebSocketRequest | WebSocketConnection) -> str:
    try:
        remote = request_or_ws.remote
    except OSError:  # the peer reset the connection already: getpeername() fails
        return "gone"
    return f"{remote.address}:{remote.port}" if hasattr(remote, "address") else str(remote)


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _too_big(text: str | bytes, limit: int) -> bool:
    if len(text) > limit:
        return True
    # A str of n characters is at most 4n bytes of UTF-8: encode only when it might be over. (surrogateescape: the
    # bytes as received, also when they were not UTF-8.)
    return isinstance(text, str) and len(text) * 4 > limit and len(text.encode("utf-8", "surrogateescape")) > limit


_MISSING: Any = object()


def _arg(req: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """Argument `key` of type `kind` (bool is never taken for a number); missing: `default` or bad_request."""
    value = req.get(key, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise RequestError(ErrorCode.BAD_REQUEST, f"missing {key!r}")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise RequestError(ErrorCode.BAD_REQUEST, f"{key!r} has the wrong type")
    return value


def _number(req: dict[str, Any], key: str, default: Any = _MISSING) -> Any:
    value = _arg(req, key, (int, float), default)
    return value if value is None else float(value)


# request type -> least role allowed
_ROLES: dict[str, str] = {
    "ping": "viewer",
    "status": "viewer",
    "devices": "viewer",
    "device": "viewer",
    "commands": "viewer",
    "command": "viewer",
    "subscribe": "viewer",
    "unsubscribe": "viewer",
    "send_command": "operator",
    "cancel_command": "operator",
    "device_add": "admin",
    "device_revoke": "admin",
    "device_rotate": "admin",
}


class ControlServer:
    """Serves operator sessions on /v1/control (requests are routed here by the device listener)."""

    def __init__(
        self,
        config: HubConfig,
        registry: Registry,
        presence: Presence,
        ledgers: Ledgers,
        commands: CommandService,
        broadcaster: Broadcaster,
        stats: Stats,
        pipeline: Pipeline,
        device_server: DeviceServer,
    ) -> None:
        self.config = config
        self.registry = registry
        self.presence = presence
        self.ledgers = ledgers
        self.commands = commands
        self.broadcaster = broadcaster
        self.stats = stats
        self.pipeline = pipeline
        self.device_server = device_server
        self.started_at = time.time()
        self.closing = False
        self._sessions: set[ControlSession] = set()
        self._buckets: dict[str, TokenBucket] = {}  # per operator, shared by its sessions

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
            task_status.started()
            while True:
                await trio.sleep(REVOKE_CHECK_EVERY)
                try:
                    revoked = await trio.to_thread.run_sync(self.registry.revoked_operators)
                except Exception:  # a busy or broken registry file: try again next time
                    log.exception("cannot read revoked operators")
                    continue
                for session in list(self._sessions):
                    if session.operator in revoked and not session.closing:
                        log.warning("operator revoked: closing its session", extra=session.kv(reason="revoked"))
                        closers.start_soon(session.close, CloseCode.REVOKED, "token revoked")

    async def close_all(self, code: int, reason: str) -> None:
        """Refuse new sessions and close every open one with `code` (1001 at hub shutdown)."""
        self.closing = True
        async with trio.open_nursery() as nursery:
            for session in list(self._sessions):
                nursery.start_soon(session.close, code, reason)

    # ------------------------------------------------------------------ handshake

    async def _refuse(self, request: WebSocketRequest, status: int, why: str, body: str) -> None:
        self.stats.refused += 1
        kv = {"status": status, "reason": why, "remote": _remote(request)}
        log.warning("control handshake refused", extra={"kv": kv})
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="hub"'))
        await reject(request, status, headers, body.encode() + b"\n")

    async def handle(self, request: WebSocketRequest) -> None:
        """Check the handshake (token in URL 401, Origin 403, bad Authorization 401), then serve the session.

        Never raises: a failure is logged and ends this connection only.
        """
        try:
            await self._handle(request)
        except ConnectionClosed:
            pass  # the client left during the handshake
        except Exception:
            log.exception("control handshake failed", extra={"kv": {"remote": _remote(request)}})

    async def _handle(self, request: WebSocketRequest) -> None:
        _, _, query = request.path.partition("?")
        if "token" in query.lower():
            # Never log the query string: it would put the credential in the logs.
            await self._refuse(request, 401, "token_in_url", "credentials go in the Authorization header, not the URL")
            return
        headers: dict[bytes, bytes] = {k.lower(): v for k, v in request.headers}
        origin = headers.get(b"origin")
        if origin is not None and origin.decode("latin-1") not in self.config.control.allowed_origins:
            await self._refuse(request, 403, "origin_not_allowed", "this Origin may not use the control channel")
            return
        if self.closing:
            await self._refuse(request, 503, "shutting_down", "hub shutting down; retry later")
            return
        identity = None
        auth = headers.get(b"authorization")
        if auth is not None:
            token = None
            if auth[:7].lower() == b"bearer ":
                with contextlib.suppress(UnicodeDecodeError):
                    token = auth[7:].strip().decode("ascii")
            found = None if token is None else await trio.to_thread.run_sync(self.registry.authenticate_operator, token)
            if found is None:
                await self._refuse(request, 401, "bad_credentials", "missing, unknown or revoked operator token")
                return
            identity = _Identity(*found)
        _wire.guard(request)
        ws = await request.accept()
        await ControlSession(self, ws, _remote(request)).run(identity)

    def _joined(self, session: ControlSession) -> None:
        self._sessions.add(session)

    def _left(self, session: ControlSession) -> None:
        self._sessions.discard(session)


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
        self._bucket: TokenBucket | None = None  # the operator's request bucket, once authenticated
        self._limited = False  # the latest request was refused for the rate: log only the first of a run
        self._waits = trio.Semaphore(MAX_WAITS)
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "status": self._status,
            "devices": self._devices,
            "device": self._device,
            "commands": self._commands,
            "command": self._command,
            "send_command": self._send_command,
            "cancel_command": self._cancel_command,
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "device_add": self._device_add,
            "device_revoke": self._device_revoke,
            "device_rotate": self._device_rotate,
        }

    def kv(self, **extra: Any) -> dict[str, Any]:
        """Log context of this session (never a token)."""
        return {"kv": {"operator": self.operator, "role": self.role, "remote": self.remote, **extra}}

    async def run(self, identity: _Identity | None) -> None:
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
                self._bucket = server.bucket(self.operator)
                if server.closing:  # authenticated after close_all took its list of sessions
                    await self._abort(CloseCode.GOING_AWAY, "hub shutting down")
                    return
                server._joined(self)
                joined = True
                await self._send({"type": "auth_ok", "operator": self.operator, "role": self.role})
                log.info("operator connected", extra=self.kv())
                async with trio.open_nursery() as nursery:
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

    async def _send(self, obj: dict[str, Any]) -> None:
        await self.ws.send_message(_dumps(obj))

    # ------------------------------------------------------------------ authentication

    async def _first_message_auth(self) -> _Identity | None:
        cfg = self.server.config.control
        await self._send({"type": "auth_required"})
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
            token = None
            with contextlib.suppress(ValueError, RecursionError):
                bad_utf8 = isinstance(text, str) and _wire.has_bad_utf8(text)  # no token then: nothing to look up
                msg = None if bad_utf8 else json.loads(text, parse_constant=_reject_constant)
                if isinstance(msg, dict) and msg.get("type") == "auth" and isinstance(msg.get("token"), str):
                    token = msg["token"]
            found = (
                None
                if token is None
                else await trio.to_thread.run_sync(self.server.registry.authenticate_operator, token)
            )
            if found is not None:
                return _Identity(*found)
            self.server.stats.refused += 1
            why = "bad_credentials" if token is not None else "not_auth"
            log.warning("operator authentication failed", extra=self.kv(reason=why))
            message = "unknown or revoked token" if token is not None else 'the first message must be {"type": "auth"}'
            with contextlib.suppress(ConnectionClosed):
                await self._send({"type": "auth_invalid", "message": message})
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
            while True:
                text = await self.ws.get_message()
                if _too_big(text, limit):
                    log.warning("control message too big", extra=self.kv(reason="too_big"))
                    await self._abort(CloseCode.TOO_BIG, "message too big")
                    return
                await self._dispatch(text, nursery)
        except ConnectionClosed:
            await self._closed_while_reading()

    async def _closed_while_reading(self) -> None:
        """The connection closed under the reader: log it if the hub closed it (unparsable frames, too big)."""
        failure = _wire.parse_failure(self.ws)
        if failure is not None:
            why = _wire.PARSE_FAILURE_REASONS.get(failure[0], "protocol_error")
            log.warning(
                "unparsable control frame: connection closed",
                extra=self.kv(reason=why, code=failure[0], detail=failure[1][:200]),
            )
        elif self.ws.closed is not None and self.ws.closed.code == CloseCode.TOO_BIG and not self.closing:
            log.warning("control message too big", extra=self.kv(reason="too_big"))
            await _wire.close_stream(self.ws, CLOSE_TIMEOUT)

    def _parse(self, text: str | bytes) -> dict[str, Any]:
        if isinstance(text, bytes):
            raise RequestError(ErrorCode.BAD_REQUEST, "binary frames are not accepted")
        if _wire.has_bad_utf8(text):
            raise RequestError(ErrorCode.BAD_REQUEST, "text is not valid UTF-8")
        try:
            req = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise RequestError(ErrorCode.BAD_REQUEST, "not valid JSON") from None
        if not isinstance(req, dict):
            raise RequestError(ErrorCode.BAD_REQUEST, "a request is a JSON object")
        req_id = req.get("id")
        if type(req_id) is not int:
            raise RequestError(ErrorCode.BAD_REQUEST, "a request needs an integer 'id'")
        return req

    async def _dispatch(self, text: str | bytes, nursery: trio.Nursery) -> None:
        req_id: int | None = None
        kind: Any = None
        try:
            req = self._parse(text)
            req_id = req["id"]
            self._check_rate()
            kind = req.get("type")
            if not isinstance(kind, str):
                raise RequestError(ErrorCode.BAD_REQUEST, "missing 'type'")
            needed = _ROLES.get(kind)
            if needed is None:
                raise RequestError(ErrorCode.UNKNOWN_TYPE, f"no request type {kind[:40]!r}")
            if not role_allows(self.role, needed):
                raise RequestError(ErrorCode.FORBIDDEN, f"role {self.role!r} may not {kind}")
            if kind == "ping":
                await self._send({"type": "pong", "id": req_id})
                return
            if kind == "send_command" and _arg(req, "wait", bool, False):
                record, wait_timeout = await self._submit(req)
                await self._waits.acquire()
                nursery.start_soon(self._wait_and_reply, req_id, record["command_id"], wait_timeout)
                return
            result = await self._handlers[kind](req)
        except RequestError as exc:
            level = logging.DEBUG if exc.code == ErrorCode.RATE_LIMITED else logging.INFO
            log.log(level, "request refused", extra=self.kv(reason=exc.code, id=req_id, type=str(kind)[:40]))
            await self._reply_error(req_id, exc.code, exc.message)
            if exc.code in _BAD_FRAME_CODES:
                await self._count_bad_frame()
            return
        except Exception:
            log.exception("control request failed", extra=self.kv(type=str(kind)[:40], id=req_id))
            with contextlib.suppress(ConnectionClosed):
                await self._reply_error(req_id, ErrorCode.INTERNAL, "internal error")
            await self._abort(CloseCode.INTERNAL, "internal error")
            return
        await self._send({"id": req_id, "type": "result", "success": True, "result": result})

    def _check_rate(self) -> None:
        """Refuse the request (`rate_limited`) when the operator is over `control.request_rate`."""
        assert self._bucket is not None
        if self._bucket.try_take(1, trio.current_time()):
            self._limited = False
            return
        self.server.stats.requests_rate_limited += 1
        if not self._limited:
            self._limited = True
            log.warning("operator over its request rate: refusing requests", extra=self.kv(reason="rate_limited"))
        cfg = self.server.config.control
        raise RequestError(ErrorCode.RATE_LIMITED, f"more than {cfg.request_rate:g} requests/s: slow down")

    async def _reply_error(self, req_id: int | None, code: str, message: str) -> None:
        error = {"code": code, "message": message}
        await self._send({"id": req_id, "type": "result", "success": False, "error": error})

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

    async def _status(self, req: dict[str, Any]) -> dict[str, Any]:
        server = self.server
        stats = server.stats
        registered = len(await trio.to_thread.run_sync(server.registry.list))
        return {
            "version": VERSION,
            "uptime": round(time.time() - server.started_at, 3),
            "connections": stats.connections,
            "devices": {**fleet.state_counts(server.presence.status.values()), "registered": registered},
            "ingest": {
                "points_in": stats.points_in,
                "points_written": stats.points_written,
                "points_spooled": stats.points_spooled,
                "points_replayed": stats.points_replayed,
                "points_dropped": stats.points_dropped,
                "spool_bytes": stats.spool_bytes,
                "sink_up": server.pipeline.sink_up,
            },
            "commands": server.commands.counts(),
            "control_sessions": server.sessions,
        }

    async def _devices(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        state = _arg(req, "state", str, None)
        if state is not None and state not in fleet.STATES:
            raise RequestError(ErrorCode.BAD_REQUEST, f"state must be one of {', '.join(fleet.STATES)}")
        server = self.server
        records = await trio.to_thread.run_sync(server.registry.list)
        return fleet.list_summaries(records, server.presence.status, server.ledgers.find, state)

    async def _device(self, req: dict[str, Any]) -> dict[str, Any]:
        name = _arg(req, "name", str)
        server = self.server
        record = await trio.to_thread.run_sync(server.registry.get, name)
        status = server.presence.status.get(name)
        if record is None and status is None:
            raise RequestError(ErrorCode.NOT_FOUND, f"no device {name[:64]!r}")
        commands = [r.as_dict() for r in await server.commands.list(device=name, limit=DETAIL_COMMANDS)]
        return fleet.device_detail(name, record, status, server.ledgers.find(name), commands)

    async def _commands(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        device = _arg(req, "device", str, None)
        state = _arg(req, "state", str, None)
        limit = _arg(req, "limit", int, DEFAULT_LIMIT)
        if state is not None and state not in COMMAND_STATES:
            raise RequestError(ErrorCode.BAD_REQUEST, f"state must be one of {', '.join(COMMAND_STATES)}")
        if not 1 <= limit <= MAX_LIMIT:
            raise RequestError(ErrorCode.BAD_REQUEST, f"limit must be 1..{MAX_LIMIT}")
        return [r.as_dict() for r in await self.server.commands.list(device=device, state=state, limit=limit)]

    async def _command(self, req: dict[str, Any]) -> dict[str, Any]:
        command_id = _arg(req, "command_id", str)
        record = await self.server.commands.get(command_id)
        if record is None:
            raise RequestError(ErrorCode.NOT_FOUND, f"no command {command_id[:64]!r}")
        return record.as_dict()

    async def _submit(self, req: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """Check the arguments and submit; the command record and the `wait_timeout` asked for."""
        device = _arg(req, "device", str)
        name = _arg(req, "name", str)
        args = req.get("args")
        if args is not None and not isinstance(args, dict):
            raise RequestError(ErrorCode.BAD_COMMAND, "args must be an object")
        ttl = _number(req, "ttl", None)
        timeout = _number(req, "timeout", None)
        key = _arg(req, "idempotency_key", str, None)
        _arg(req, "wait", bool, False)
        wait_timeout = _number(req, "wait_timeout", DEFAULT_WAIT_TIMEOUT)
        if not 0 < wait_timeout <= MAX_WAIT_TIMEOUT:
            raise RequestError(ErrorCode.BAD_REQUEST, f"wait_timeout must be in (0, {MAX_WAIT_TIMEOUT:g}] seconds")
        try:
            record = await self.server.commands.submit(
                device, name, args, ttl=ttl, timeout=timeout, idempotency_key=key, operator=self.operator
            )
        except CommandError as exc:
            raise RequestError(exc.code, exc.message) from None
        log.info(
            "command submitted",
            extra=self.kv(command_id=record.command_id, device=device, name=name, state=record.state),
        )
        return record.as_dict(), wait_timeout

    async def _send_command(self, req: dict[str, Any]) -> dict[str, Any]:
        return (await self._submit(req))[0]

    async def _wait_and_reply(self, req_id: int, command_id: str, wait_timeout: float) -> None:
        try:
            try:
                record = await self.server.commands.wait_final(command_id, wait_timeout)
            except CommandError as exc:
                await self._reply_error(req_id, exc.code, exc.message)
                return
            await self._send({"id": req_id, "type": "result", "success": True, "result": record.as_dict()})
        except ConnectionClosed:
            self._scope.cancel()
        finally:
            self._waits.release()

    async def _cancel_command(self, req: dict[str, Any]) -> dict[str, Any]:
        command_id = _arg(req, "command_id", str)
        try:
            record = await self.server.commands.cancel(command_id)
        except CommandError as exc:
            raise RequestError(exc.code, exc.message) from None
        log.info("command cancelled by operator", extra=self.kv(command_id=command_id))
        return record.as_dict()

    async def _subscribe(self, req: dict[str, Any]) -> dict[str, Any]:
        topic = _arg(req, "topic", str)
        if topic not in TOPICS:
            raise RequestError(ErrorCode.BAD_REQUEST, f"topic must be one of {', '.join(TOPICS)}")
        devices = _arg(req, "devices", list, None)
        if devices is not None and (not devices or not all(isinstance(d, str) for d in devices)):
            raise RequestError(ErrorCode.BAD_REQUEST, "devices must be a non-empty list of names (or null for all)")
        cfg = self.server.config.control
        if len(self._subs) >= cfg.max_subscriptions:
            raise RequestError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS, f"at most {cfg.max_subscriptions} subscriptions per session"
            )
        sub = self.server.broadcaster.subscribe(topic, devices, self._notify, capacity=cfg.buffer)
        self._subs[sub.id] = sub
        log.debug("subscribed", extra=self.kv(subscription=sub.id, topic=topic))
        return {"subscription": sub.id}

    async def _unsubscribe(self, req: dict[str, Any]) -> dict[str, Any]:
        sub_id = _arg(req, "subscription", int)
        sub = self._subs.pop(sub_id, None)
        if sub is None:
            raise RequestError(ErrorCode.NOT_FOUND, f"no subscription {sub_id}")
        self.server.broadcaster.unsubscribe(sub)
        return {}

    async def _device_add(self, req: dict[str, Any]) -> dict[str, Any]:
        name = _arg(req, "name", str)
        try:
            token = await trio.to_thread.run_sync(self.server.registry.add, name)
        except BadName as exc:
            raise RequestError(ErrorCode.BAD_REQUEST, str(exc)) from None
        except DeviceExists:
            raise RequestError(ErrorCode.EXISTS, f"device {name!r} already exists") from None
        log.info("device added by operator", extra=self.kv(device=name))
        return {"name": name, "token": token}

    async def _device_revoke(self, req: dict[str, Any]) -> dict[str, Any]:
        name = _arg(req, "name", str)
        try:
            await trio.to_thread.run_sync(self.server.registry.revoke, name)
        except UnknownDevice:
            raise RequestError(ErrorCode.NOT_FOUND, f"no device {name[:64]!r}") from None
        log.info("device revoked by operator", extra=self.kv(device=name))
        self.server.device_server.revoke(name)
        return {}

    async def _device_rotate(self, req: dict[str, Any]) -> dict[str, Any]:
        name = _arg(req, "name", str)
        try:
            token = await trio.to_thread.run_sync(self.server.registry.rotate, name)
        except UnknownDevice:
            raise RequestError(ErrorCode.NOT_FOUND, f"no device {name[:64]!r}") from None
        log.info("device token rotated by operator", extra=self.kv(device=name))
        return {"name": name, "token": token}

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
                            await self._send(
                                {"type": "dropped", "subscription": sub.id, "dropped": dropped, "coalesced": coalesced}
                            )
                        if sub.active and len(buffer):
                            event = sub.render(buffer.pop())
                            await self._send({"type": "event", "subscription": sub.id, "event": event})
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
