"""A trio client of the hub's operator control channel (`/v1/control`, spec in docs/control.md).

Needs only trio, trio-websocket and attrs, like `hubctl`, which is built on it::

    async with open_control("wss://hub:8765/v1/control", token) as hub:
        devices = await hub.devices(state="online")
        detail = await hub.call(Device(name="sensor-7"))  # any request of hub.control.REQUESTS
        async with hub.subscribe("telemetry", ["sensor-7"]) as events:
            async for item in events:  # Event or Dropped
                ...

Every error it raises is a `ClientError`; a refused request is a `RequestFailed`, which is also the control wire's
`ControlError` (hub/control_codes.py) with its `code`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar, cast

import attrs
import trio
import trio_websocket
import wsproto.utilities
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected, HandshakeError

from device_client.client import InsecureURLError, TLSHandshakeError, client_ssl_context, tls_handshake_errors
from device_client.protocol import JSON
from hub.control import (
    DEFAULT_WAIT_TIMEOUT,
    CancelCommand,
    Command,
    Commands,
    ControlError,
    Device,
    DeviceAdd,
    DeviceLabel,
    DeviceLabels,
    DeviceRevoke,
    DeviceRotate,
    Devices,
    ErrorCode,
    HubStatus,
    Job,
    JobCancel,
    JobCreate,
    JobDetail,
    Jobs,
    NewToken,
    Ping,
    Request,
    SendCommand,
    Status,
    Subscribe,
    Twin,
    TwinSet,
    Unsubscribe,
    encode_auth,
    encode_request,
    spec_for,
)
from hub.control_codes import TOPICS as CONTROL_TOPICS
from hub.fleet import (
    COMMAND_FINAL_STATES,
    CommandRecordDict,
    DeviceDetail,
    DeviceSummary,
    JobRecordDict,
    TwinDict,
)

__all__ = [
    "CONTROL_PATH",
    "FINAL_STATES",
    "HUB_WAIT_TIMEOUT",
    "TOPICS",
    "AuthRefused",
    "ClientError",
    "ConnectFailed",
    "ControlClient",
    "Disconnected",
    "Dropped",
    "ErrorCode",
    "Event",
    "InsecureURLError",
    "ReplyTimeout",
    "RequestFailed",
    "Subscription",
    "control_url",
    "open_control",
]

log = logging.getLogger("hub.control_client")

CONTROL_PATH = "/v1/control"
TOPICS = CONTROL_TOPICS
#: Command states after which nothing changes any more.
FINAL_STATES = COMMAND_FINAL_STATES
#: The hub's `wait_timeout` of `send_command` when none is given (docs/control.md).
HUB_WAIT_TIMEOUT = DEFAULT_WAIT_TIMEOUT
#: Largest frame accepted from the hub: `commands` with limit 1000 and 16 KiB args and results is large.
MAX_REPLY_BYTES = 64 * 1024 * 1024

_R = TypeVar("_R", bound=Request)


class ClientError(Exception):
    """Base of every error this module raises."""


class ConnectFailed(ClientError):
    """The connection could not be opened: network error, timeout, or an HTTP refusal (`status`, if any)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthRefused(ConnectFailed):
    """The hub refused the token (401 before the upgrade, `auth_invalid`, or a close with 1008/4003)."""


#: Closes the hub makes when it cannot read what this client sent (docs/control.md), explained.
_FRAME_CLOSES = {
    1002: "the hub could not parse a WebSocket frame from this client (a client library bug)",
    1007: "the hub received text from this client that is not valid UTF-8",
}


class Disconnected(ClientError):
    """The connection ended while in use; `code` and `reason` are the WebSocket close code and text."""

    def __init__(self, code: int | None, reason: str | None = None) -> None:
        text = f"connection closed ({code}{' ' + reason if reason else ''})" if code else "connection lost"
        if code in _FRAME_CLOSES:
            text += f": {_FRAME_CLOSES[code]}"
        super().__init__(text)
        self.code = code
        self.reason = reason


class ReplyTimeout(ClientError):
    """The hub did not answer a request in time."""


class RequestFailed(ClientError, ControlError):
    """The hub refused request `request` (a type), or the codec did before it was sent: `code` (an `ErrorCode`) says
    why, `message` is for humans."""

    def __init__(self, code: str, message: str, request: str = "") -> None:
        try:
            ControlError.__init__(self, code, message)
        except ValueError:  # a code this client does not know (from a newer hub): kept as the hub sent it
            Exception.__init__(self, f"{code}: {message}" if message else code)
            self.code = code
            self.message = message
        self.request = request


@attrs.frozen
class Event:
    """One pushed event of subscription `subscription` (a point, a device summary or a command record)."""

    subscription: int
    topic: str
    event: dict[str, JSON] = attrs.field(eq=False)  # as the hub sent it: see docs/control.md for its shape


@attrs.frozen
class Dropped:
    """The hub lost events of a slow subscription; both counts are cumulative."""

    subscription: int
    topic: str
    dropped: int
    coalesced: int


def control_url(url: str) -> str:
    """The control endpoint URL: `ws://host:port` alone gets the path `/v1/control`.

    Raises ValueError for other schemes, a missing host, or a token in the query string.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"control URL must be ws://HOST[:PORT][{CONTROL_PATH}] or wss://..., not {url!r}")
    if "token" in parts.query.lower():
        raise ValueError("never put a token in the URL (it lands in logs): give it in the Authorization header")
    if parts.path in ("", "/"):
        parts = parts._replace(path=CONTROL_PATH)
    return urllib.parse.urlunsplit(parts)


@attrs.define(eq=False)
class _Pending:
    """A request waiting for its reply."""

    kind: str
    on_success: Callable[[JSON], None] | None = None
    done: trio.Event = attrs.field(factory=trio.Event)
    reply: dict[str, JSON] | None = None


@attrs.define(eq=False)
class _Route:
    """Where the events of one subscription go."""

    topic: str
    send: trio.MemorySendChannel[Event | Dropped]


class Subscription:
    """The events of one subscription, as an async iterator of `Event` and `Dropped`.

    Iteration ends with `Disconnected` if the connection ends. A consumer slower than the
    events makes the client stop reading; the hub then coalesces and drops (reported by `Dropped`).
    """

    def __init__(
        self, sid: int, topic: str, receive: trio.MemoryReceiveChannel[Event | Dropped], client: ControlClient
    ) -> None:
        self.id = sid
        self.topic = topic
        self._receive = receive
        self._client = client

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event | Dropped:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if (closed := self._client.closed) is not None:
                raise closed from None
            raise StopAsyncIteration from None


class ControlClient:
    """An authenticated control connection; create it with `open_control`."""

    def __init__(
        self, ws: trio_websocket.WebSocketConnection, *, reply_timeout: float, operator: str, role: str
    ) -> None:
        self.operator = operator
        self.role = role
        self.reply_timeout = reply_timeout
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._routes: dict[int, _Route] = {}
        self._close_reason: CloseReason | None = None
        self._lost_connection = False
        self._progress = 0  # frames read plus waits on a full subscription buffer: signs of life for the keepalive

    @property
    def closed(self) -> Disconnected | None:
        """Why the connection ended (a fresh error to raise), or None while it is open."""
        if not self._lost_connection:
            return None
        reason = self._close_reason
        return Disconnected(reason.code, reason.reason) if reason is not None else Disconnected(None)

    # ------------------------------------------------------------------ requests

    async def call(self, request: Request, *, timeout: float | None = None) -> JSON:
        """Send `request` (one of hub.control.REQUESTS) and return its `result` (None for a ping).

        Raises `RequestFailed` for an error reply, `ReplyTimeout` after `timeout` (default:
        `reply_timeout`, plus `wait_timeout` for a `send_command` with `wait`) seconds, `Disconnected` if the
        connection ends first.
        """
        if timeout is None and isinstance(request, SendCommand) and request.wait:
            # A waiting request legitimately takes up to wait_timeout (the hub's default is 30 s) before its reply.
            timeout = self.reply_timeout + request.wait_timeout
        return await self._request(spec_for(request).type, lambda rid: encode_request(rid, request), timeout)

    async def request(self, kind: str, args: Mapping[str, JSON] | None = None, *, timeout: float | None = None) -> JSON:
        """Like `call`, but request `kind` with `args` as they are, unchecked: for a type this client does not know."""

        def frame(rid: int) -> str:
            return json.dumps({"id": rid, "type": kind, **(args or {})}, allow_nan=False)

        return await self._request(kind, frame, timeout)

    async def _request(
        self,
        kind: str,
        frame: Callable[[int], str],
        timeout: float | None,
        on_success: Callable[[JSON], None] | None = None,
    ) -> JSON:
        if (closed := self.closed) is not None:
            raise closed
        limit = self.reply_timeout if timeout is None else timeout
        rid = next(self._ids)
        pending = _Pending(kind, on_success)
        self._pending[rid] = pending
        try:
            try:
                await self._ws.send_message(frame(rid))
            except ConnectionClosed as exc:
                raise self._lost(exc.reason) from None
            with trio.move_on_after(limit):
                await pending.done.wait()
        finally:
            del self._pending[rid]
        reply = pending.reply
        if reply is None:
            if (closed := self.closed) is not None:
                raise closed
            raise ReplyTimeout(f"no reply to {kind!r} within {limit} s")
        if reply.get("type") == "pong" or reply.get("success") is True:
            return reply.get("result")
        error = reply.get("error")
        if not isinstance(error, dict):
            error = {}
        raise RequestFailed(str(error.get("code") or "internal"), str(error.get("message") or ""), kind)

    async def ping(self) -> float:
        """Round-trip time of an application-level ping, in seconds."""
        start = trio.current_time()
        await self.call(Ping())
        return trio.current_time() - start

    # The typed requests trust the hub to answer in the shape docs/control.md gives (the casts say so).

    async def status(self) -> HubStatus:
        """The hub's figures (see docs/control.md)."""
        return cast(HubStatus, await self.call(Status()))

    async def devices(self, state: str | None = None, selector: str | None = None) -> list[DeviceSummary]:
        """Device summaries sorted by name, optionally only those in `state` (online, late, offline, never) and
        those whose labels match `selector` (docs/control.md, "Labels and selectors")."""
        return cast(list[DeviceSummary], await self.call(_build(Devices, state=state, selector=selector)))

    async def device_label(
        self, name: str, set: Mapping[str, str] | None = None, remove: Sequence[str] | None = None
    ) -> DeviceLabels:
        """Remove the label keys `remove` of device `name`, then set the labels `set` (admins only); its labels now."""
        request = _build(
            DeviceLabel,
            name=name,
            set=None if set is None else dict(set),
            remove=None if remove is None else list(remove),
        )
        return cast(DeviceLabels, await self.call(request))

    async def device_add(self, name: str, labels: Mapping[str, str] | None = None) -> NewToken:
        """Register device `name` (admins only), with `labels` if given; its token, shown only this once."""
        request = _build(DeviceAdd, name=name, labels=None if labels is None else dict(labels))
        return cast(NewToken, await self.call(request))

    async def device_revoke(self, name: str) -> None:
        """Revoke device `name`'s token (admins only); the hub closes its open session."""
        await self.call(DeviceRevoke(name=name))

    async def device_rotate(self, name: str) -> NewToken:
        """Give device `name` a new token (admins only; the old one stops working); shown only this once."""
        return cast(NewToken, await self.call(DeviceRotate(name=name)))

    async def twin(self, device: str) -> TwinDict:
        """The device's twin: desired and reported documents with versions, applied version, delta."""
        return cast(TwinDict, await self.call(_build(Twin, device=device)))

    async def twin_set(self, device: str, patch: Mapping[str, JSON], if_version: int | None = None) -> TwinDict:
        """Merge `patch` into the device's desired document (operators); `if_version`: only at that version."""
        return cast(TwinDict, await self.call(_build(TwinSet, device=device, patch=dict(patch), if_version=if_version)))

    async def device(self, name: str) -> DeviceDetail:
        """One device: its summary plus `latest` values and its 20 most recent `commands`."""
        return cast(DeviceDetail, await self.call(_build(Device, name=name)))

    async def commands(
        self, device: str | None = None, state: str | None = None, limit: int | None = None
    ) -> list[CommandRecordDict]:
        """Command records, newest first."""
        return cast(list[CommandRecordDict], await self.call(_build(Commands, device=device, state=state, limit=limit)))

    async def command(self, command_id: str) -> CommandRecordDict:
        """One command record."""
        return cast(CommandRecordDict, await self.call(_build(Command, command_id=command_id)))

    async def send_command(
        self,
        device: str,
        name: str,
        args: dict[str, JSON] | None = None,
        *,
        ttl: float | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
        wait_timeout: float | None = None,
    ) -> CommandRecordDict:
        """Queue command `name` for `device`; its record. With `wait`, the record once final (or at `wait_timeout`)."""
        request = _build(
            SendCommand,
            device=device,
            name=name,
            args=args,
            ttl=ttl,
            timeout=timeout,
            idempotency_key=idempotency_key,
            wait=wait,
            wait_timeout=wait_timeout,
        )
        return cast(CommandRecordDict, await self.call(request))

    async def cancel_command(self, command_id: str) -> CommandRecordDict:
        """Cancel a command still queued or sent; its record, now cancelled."""
        return cast(CommandRecordDict, await self.call(_build(CancelCommand, command_id=command_id)))

    async def job_create(
        self,
        selector: str,
        action: Mapping[str, JSON],
        *,
        rate: float | None = None,
        max_in_flight: int | None = None,
        abort_percent: float | None = None,
    ) -> JobRecordDict:
        """Start a job (operators): `action` on every device `selector` matches now; its record."""
        request = _build(
            JobCreate,
            selector=selector,
            action=dict(action),
            rate=rate,
            max_in_flight=max_in_flight,
            abort_percent=abort_percent,
        )
        return cast(JobRecordDict, await self.call(request))

    async def jobs(self, state: str | None = None, limit: int | None = None) -> list[JobRecordDict]:
        """Job records, newest first."""
        return cast(list[JobRecordDict], await self.call(_build(Jobs, state=state, limit=limit)))

    async def job(
        self, job_id: str, *, state: str | None = None, limit: int | None = None, offset: int | None = None
    ) -> JobDetail:
        """One job: its record with progress counts and a page of its devices."""
        request = _build(Job, job_id=job_id, state=state, limit=limit, offset=offset)
        return cast(JobDetail, await self.call(request))

    async def job_cancel(self, job_id: str) -> JobRecordDict:
        """Cancel a running job (operators); its record, now cancelling or cancelled."""
        return cast(JobRecordDict, await self.call(_build(JobCancel, job_id=job_id)))

    @asynccontextmanager
    async def subscribe(
        self, topic: str, devices: Sequence[str] | None = None, *, selector: str | None = None, buffer: int = 256
    ) -> AsyncIterator[Subscription]:
        """Subscribe to `topic` (telemetry, presence, commands) of `devices` (None: all) whose labels match
        `selector` when the subscription is made (None: any); unsubscribe on exit."""
        send, receive = trio.open_memory_channel[Event | Dropped](buffer)

        def route(result: JSON) -> None:
            # Runs in the reader before it reads the next frame, so no event can arrive unrouted.
            if (sid := _subscription_id(result)) is not None:
                self._routes[sid] = _Route(topic, send)

        request = _build(Subscribe, topic=topic, devices=None if devices is None else list(devices), selector=selector)
        async with receive:
            result = await self._request("subscribe", lambda rid: encode_request(rid, request), None, route)
            sid = _subscription_id(result)
            if sid is None:
                raise ClientError(f"the hub's reply to subscribe has no subscription id: {result!r:.200}")
            try:
                yield Subscription(sid, topic, receive, self)
            finally:
                self._routes.pop(sid, None)
                send.close()  # sync: an await here would skip the unsubscribe when cancelled
                if not self._lost_connection:
                    await self._unsubscribe(sid)

    async def _unsubscribe(self, sid: int) -> None:
        # Shielded: leaving a subscription because of a cancellation must still end it at the hub.
        with trio.CancelScope(shield=True), trio.move_on_after(min(self.reply_timeout, 5.0)):
            try:
                await self.call(Unsubscribe(subscription=sid))
            except ClientError as exc:
                log.warning("unsubscribe %d failed: %s", sid, exc)

    # ------------------------------------------------------------------ background tasks

    async def _read(self) -> None:
        """Dispatch every frame from the hub until the connection ends."""
        try:
            while True:
                text = await self._ws.get_message()
                self._progress += 1
                try:
                    msg = json.loads(text)
                except ValueError:
                    log.warning("ignoring a frame from the hub that is not JSON: %.80r", text)
                    continue
                if not isinstance(msg, dict):
                    log.warning("ignoring a frame from the hub that is not an object: %.80r", text)
                    continue
                await self._dispatch(msg)
        except ConnectionClosed as exc:
            self._lost(exc.reason)
        except Exception:
            log.exception("control client reader failed")
            self._lost(None)
            raise

    async def _dispatch(self, msg: dict[str, JSON]) -> None:
        kind = msg.get("type")
        if kind in ("result", "pong"):
            rid = msg.get("id")
            pending = self._pending.get(rid) if type(rid) is int else None
            if pending is None:
                if msg.get("success") is False:
                    log.warning("error reply to no open request (id %r): %r", msg.get("id"), msg.get("error"))
                else:
                    log.debug("reply to a request nobody waits for: %r", msg.get("id"))
                return
            if pending.on_success is not None and msg.get("success") is True:
                pending.on_success(msg.get("result"))
            pending.reply = msg
            pending.done.set()
        elif kind in ("event", "dropped"):
            sid = msg.get("subscription")
            if type(sid) is not int or (route := self._routes.get(sid)) is None:
                log.debug("%s for subscription %r, which is not (or no longer) open", kind, sid)
                return
            if kind == "event":
                event = msg.get("event")
                item: Event | Dropped = Event(sid, route.topic, event if isinstance(event, dict) else {})
            else:
                item = Dropped(sid, route.topic, _count(msg.get("dropped")), _count(msg.get("coalesced")))
            # A subscriber that has just left closed its channel: drop the item, its unsubscribe is on the way.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                try:
                    route.send.send_nowait(item)
                except trio.WouldBlock:
                    self._progress += 1
                    await route.send.send(item)
        else:
            log.warning("ignoring a frame of unknown type %r from the hub", kind)

    async def _keepalive(self, interval: float, timeout: float) -> None:
        """WebSocket-ping the hub every `interval` s; close the connection if a pong takes over `timeout` s."""
        while True:
            await trio.sleep(interval)
            progress = self._progress
            with trio.move_on_after(timeout) as scope:
                try:
                    await self._ws.ping()
                except ConnectionClosed:
                    return  # closed meanwhile (by us or the hub): the reader reports how it ended
            # The pong may sit behind frames still being read, or behind a reader waiting on a slow
            # subscriber: only a hub that sent nothing at all in `timeout` seconds is presumed gone.
            if scope.cancelled_caught and progress == self._progress and not self._reader_waiting():
                log.warning("the hub did not answer a ping within %s s", timeout)
                self._lost(CloseReason(1006, "no pong from the hub"))
                with trio.move_on_after(timeout):
                    await self._ws.aclose()
                return

    def _reader_waiting(self) -> bool:
        return any(route.send.statistics().tasks_waiting_send for route in self._routes.values())

    def _lost(self, reason: CloseReason | None) -> Disconnected:
        """Record why the connection ended and wake every waiter; the error to raise."""
        if not self._lost_connection:
            self._lost_connection = True
            self._close_reason = reason
            for pending in self._pending.values():
                pending.done.set()
            for route in self._routes.values():
                route.send.close()
        closed = self.closed
        assert closed is not None
        return closed


def _subscription_id(result: JSON) -> int | None:
    sid = result.get("subscription") if isinstance(result, dict) else None
    return sid if type(sid) is int else None


def _count(value: JSON) -> int:
    """A count in a frame from the hub; 0 if it is missing or not an integer."""
    return value if type(value) is int else 0


def _build(kind: type[_R], **fields: object) -> _R:
    """Request `kind` with the `fields` that are not None; one the codec refuses raises `RequestFailed` at once,
    with the code and message the hub would have answered."""
    try:
        return kind(**{k: v for k, v in fields.items() if v is not None})
    except ControlError as exc:
        raise RequestFailed(exc.code, exc.message, spec_for(kind).type) from None


@contextlib.contextmanager
def _one_error() -> Iterator[None]:
    """Raise the single non-Cancelled exception of a nursery's group as itself, with its own context."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        errors = [exc for exc in leaves if not isinstance(exc, trio.Cancelled)]
        if len(errors) > 1 or not leaves:
            raise
        exc = (errors or leaves)[0]
        context = exc.__context__
        try:
            raise exc
        finally:
            exc.__context__ = context


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


async def _authenticate(ws: trio_websocket.WebSocketConnection, token: str) -> tuple[str, str]:
    """Wait for `auth_ok`; answer an `auth_required`. The operator name and role."""
    while True:
        try:
            msg = json.loads(await ws.get_message())
        except ValueError:
            raise ConnectFailed("the hub sent a frame that is not JSON during authentication") from None
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "auth_ok":
            return str(msg.get("operator", "")), str(msg.get("role", ""))
        if kind == "auth_required":
            await ws.send_message(encode_auth(token))
        elif kind == "auth_invalid":
            raise AuthRefused(f"the hub refused the token: {msg.get('message') or 'auth_invalid'}")
        else:
            raise ConnectFailed(f"expected auth_ok from the hub, got {kind!r}")


def _refusal(exc: ConnectionRejected, url: str) -> ConnectFailed:
    status = exc.status_code
    body = (exc.body or b"").decode("utf-8", "replace").strip()[:200]
    detail = f" ({body})" if body else ""
    if status == 401:
        return AuthRefused(f"the hub refused the token (HTTP 401){detail}", status)
    if status == 403:
        return AuthRefused(f"the hub forbids this connection (HTTP 403){detail}", status)
    if status == 404:
        return ConnectFailed(f"no control endpoint at {url} (HTTP 404)", status)
    return ConnectFailed(f"the hub refused the connection (HTTP {status}){detail}", status)


def _closed_early(reason: CloseReason | None) -> ConnectFailed:
    code = reason.code if reason is not None else None
    text = f"{code} {reason.reason or ''}".strip() if reason is not None else "no close frame"
    if code in (1008, 4003):
        return AuthRefused(f"the hub closed the connection during authentication ({text})")
    return ConnectFailed(f"the hub closed the connection during authentication ({text})")


@asynccontextmanager
async def open_control(
    url: str,
    token: str,
    *,
    connect_timeout: float = 10.0,
    reply_timeout: float = 30.0,
    ping_interval: float | None = 20.0,
    ping_timeout: float = 10.0,
    ca_file: str | os.PathLike[str] | None = None,
    allow_insecure: bool = False,
) -> AsyncIterator[ControlClient]:
    """Connect to the control endpoint at `url` with operator `token` (sent in the Authorization header).

    Raises `AuthRefused` for a refused token, `ConnectFailed` for any other failure to connect
    (within `connect_timeout` seconds, authentication included; a certificate not accepted
    included), ValueError for a bad URL, token or `ca_file`. With `ping_interval`, a hub that
    stops answering pings ends the connection (`Disconnected`) instead of leaving a request or
    a subscription hanging forever. A wss:// hub's certificate is verified against the system
    CAs, or only `ca_file`; plain ws:// to a host that is not loopback raises `InsecureURLError`
    (a ValueError) before any connection attempt, unless `allow_insecure`.
    """
    url = control_url(url)
    ssl_context = client_ssl_context(url, ca_file=ca_file, allow_insecure=allow_insecure)
    if not token or not token.isascii() or not token.isprintable():
        raise ValueError("an operator token is non-empty printable ASCII")
    headers = [(b"authorization", f"Bearer {token}".encode("ascii"))]
    connected = closing = False
    # Not trio_websocket.open_websocket_url: when its connect times out (or is interrupted) it waits for
    # its reader task until the peer closes the socket, so a hub that accepts TCP and then says nothing
    # would hold us far beyond connect_timeout. Here the nursery is ours, and cancelled on every way out.
    try:
        with _one_error():
            async with trio.open_nursery() as nursery:
                try:
                    with trio.fail_after(connect_timeout):
                        with tls_handshake_errors(url):
                            ws = await trio_websocket.connect_websocket_url(
                                nursery,
                                url,
                                ssl_context=ssl_context,
                                extra_headers=headers,
                                max_message_size=MAX_REPLY_BYTES,
                            )
                        try:
                            operator, role = await _authenticate(ws, token)
                        except ConnectionClosed as exc:
                            raise _closed_early(exc.reason) from None
                except trio.TooSlowError:
                    raise ConnectFailed(f"no answer from {url} within {connect_timeout} s") from None
                except TLSHandshakeError as exc:
                    raise ConnectFailed(f"cannot connect to {url}: {exc}") from exc
                except OSError as exc:
                    raise ConnectFailed(f"cannot connect to {url}: {exc}") from None
                connected = True
                client = ControlClient(ws, reply_timeout=reply_timeout, operator=operator, role=role)
                nursery.start_soon(client._read)
                if ping_interval:
                    nursery.start_soon(client._keepalive, ping_interval, ping_timeout)
                try:
                    yield client
                finally:
                    closing = True
                    with trio.CancelScope(shield=True), trio.move_on_after(min(connect_timeout, 5.0)):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
    except ConnectionRejected as exc:  # raised by trio-websocket's reader task during the handshake
        if connected:
            raise
        raise _refusal(exc, url) from None
    except HandshakeError as exc:
        if connected:
            raise
        raise ConnectFailed(f"cannot connect to {url}: {exc!r}") from None
    except wsproto.utilities.LocalProtocolError:
        # trio-websocket #184: a ping that arrives after our own close makes its reader fail. Harmless then.
        if not closing:
            raise
        log.debug("ignoring a protocol error while closing", exc_info=True)
