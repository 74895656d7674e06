"""The trio device client: keeps a WebSocket to the hub, batches points, resends them until acked."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import ipaddress
import logging
import os
import random
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, TypeAlias, TypeVar

import attrs
import trio
import trio_websocket
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected, HandshakeError

from device_client.compression import SCHEMES
from device_client.outbox import (
    DEFAULT_MAX_MESSAGE,
    TOO_LARGE,
    CommandLog,
    Outbox,
    OutboxFull,
    TwinLog,
    check_points,
)
from device_client.protocol import (
    DEFAULT_LIMITS,
    DEVICE_PATH,
    JSON,
    MAX_ERROR_LEN,
    MAX_RESULT_BYTES,
    PROTOCOL_VERSION,
    Command,
    CommandResult,
    ErrorCode,
    FieldValue,
    Hello,
    Limits,
    Point,
    ProtocolError,
    check_command_name,
    json_size,
)
from device_client.session import (
    CULPRIT_CLOSES,
    Acked,
    ClientStats,
    CloseVerdict,
    CommandReceived,
    DesiredChanged,
    DeviceConnection,
    DeviceEvent,
    HubError,
    Ignored,
    PeerClosed,
    Rejected,
    ReportAcked,
    ReportRefused,
    SessionEnd,
    SessionState,
    Welcomed,
)
from device_client.twin import TwinError, check_patch

__all__ = [
    "STABLE_SESSION",
    "ClientStats",
    "CommandContext",
    "CommandHandler",
    "DesiredHandler",
    "DeviceClient",
    "InsecureURLError",
    "TLSHandshakeError",
    "backoff_delay",
    "client_ssl_context",
    "device_url",
    "is_loopback",
    "tls_handshake_errors",
]

log = logging.getLogger("device_client")

#: A session that lasted this long (seconds) resets the reconnect backoff.
STABLE_SESSION = 10.0
#: Longest Retry-After (seconds) honoured from a 429/503 answer.
MAX_RETRY_AFTER = 3600.0

#: Most command acks and results waiting to be written; the reader waits for room beyond it.
MAX_OUTGOING = 1000

#: A command handler: ``async def handler(args)`` or ``async def handler(args, ctx)``, returning a JSON value.
CommandHandler: TypeAlias = Callable[..., Awaitable[JSON]]
_Handler = TypeVar("_Handler", bound=CommandHandler)
#: A desired-document handler: ``async def handler(desired)``, returning a patch to report with it, or None.
DesiredHandler: TypeAlias = Callable[[dict[str, JSON]], Awaitable[Mapping[str, JSON] | None]]


@attrs.frozen
class CommandContext:
    """What a command handler may want besides its args: the command and the client running it."""

    client: DeviceClient = attrs.field(repr=False)
    id: str
    name: str
    timeout: float  # seconds the hub waits for the result after the ack

    def reconnect(self, delay: float = 0.0) -> None:
        """Once this command's result is written, close the connection and reconnect after `delay` s.

        For a `reboot`: the hub gets the result first. The outbox and the command log are
        kept. If the connection drops before the result is written, the result goes out
        on the next connection, and that one is closed after it.
        """
        if delay < 0:
            raise ValueError("delay must not be negative")
        self.client._connection().reconnect_after(self.id, delay)


class InsecureURLError(ValueError):
    """A plain ws:// URL to a host that is not loopback, refused before any connection attempt."""


class TLSHandshakeError(HandshakeError):
    """The TLS handshake failed; `verify_failed` when the hub's certificate was not accepted."""

    def __init__(self, message: str, *, verify_failed: bool) -> None:
        super().__init__(message)
        self.verify_failed = verify_failed

    def __str__(self) -> str:
        return str(self.args[0])


def is_loopback(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1 (also IPv4-mapped): traffic that never leaves the machine."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


@attrs.define(eq=False)
class _TLSWatch:
    """Where a failed TLS handshake is reported to the task that is connecting."""

    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    error: ssl.SSLError | None = None


# Set by the connecting task, inherited (as a copy holding the same watch) by trio-websocket's reader task.
_tls_watch: contextvars.ContextVar[_TLSWatch | None] = contextvars.ContextVar("device_client_tls", default=None)


class _WatchedSSLObject(ssl.SSLObject):
    """An SSLObject that reports a failed handshake to the `_TLSWatch` of its context.

    trio-websocket turns a failed TLS handshake into a silent wait for the connect timeout
    (python-trio/trio-websocket#199); this gets the real reason to the caller at once.
    """

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            watch = _tls_watch.get()
            if watch is not None and watch.error is None:
                watch.error = exc
                watch.scope.cancel()
            raise


@functools.lru_cache(maxsize=16)
def _verifying_context(ca_file: str | None) -> ssl.SSLContext:
    # One context per CA file, shared by every client of the process (a fleet simulator runs thousands);
    # a CA file changed on disk is read again only by a new process.
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except OSError as exc:  # ssl.SSLError too: not PEM, no certificate in it
        reason = exc.strerror if not isinstance(exc, ssl.SSLError) else (exc.reason or str(exc))
        raise ValueError(f"cannot load the CA file {ca_file}: {reason or exc}") from None
    context.sslobject_class = _WatchedSSLObject
    return context


def client_ssl_context(
    url: str, *, ca_file: str | os.PathLike[str] | None = None, allow_insecure: bool = False
) -> ssl.SSLContext | None:
    """The SSL context for connecting to `url`, checked before any network traffic.

    wss://: a context that verifies the hub's certificate and host name against the
    system CAs, or only against the CAs in `ca_file` (PEM). ws://: None, allowed only
    to a loopback host unless `allow_insecure`; otherwise `InsecureURLError`.
    ValueError for a `ca_file` that does not load, or one given with a ws:// URL.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "wss":
        return _verifying_context(None if ca_file is None else os.fspath(ca_file))
    if ca_file is not None:
        raise ValueError(f"a CA file is for wss:// URLs; {url!r} is plain ws://")
    host = parts.hostname or ""
    if not allow_insecure and not is_loopback(host):
        raise InsecureURLError(
            f"refusing plain ws:// to {host!r}: the token and all data would cross the network unencrypted; "
            "use wss:// (or allow plain ws:// explicitly, on a network you trust)"
        )
    return None


def _describe_tls_error(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the hub's certificate was not accepted: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "the connection was closed during the handshake"
    return str(exc.reason or exc)


@contextlib.contextmanager
def tls_handshake_errors(url: str) -> Iterator[None]:
    """Around a trio-websocket connect with a context from `client_ssl_context`: raise `TLSHandshakeError`
    as soon as the TLS handshake fails, instead of waiting for the connect timeout."""
    watch = _TLSWatch()
    token = _tls_watch.set(watch)
    try:
        with watch.scope:
            try:
                yield
            except Exception:
                if watch.error is None:
                    raise
    finally:
        _tls_watch.reset(token)
    if watch.error is not None:
        parts = urllib.parse.urlsplit(url)
        where = f"{parts.hostname}:{parts.port or 443}"
        raise TLSHandshakeError(
            f"TLS handshake with {where} failed: {_describe_tls_error(watch.error)}",
            verify_failed=isinstance(watch.error, ssl.SSLCertVerificationError),
        ) from watch.error


@contextlib.asynccontextmanager
async def _open_websocket(
    url: str,
    headers: list[tuple[bytes, bytes]],
    connect_timeout: float,
    disconnect_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """Like `trio_websocket.open_websocket_url`, but a handshake timeout really ends the attempt.

    trio-websocket's own version waits, after its connect timeout, until the peer closes the socket:
    a listener that accepts TCP and says nothing would hold the device far past `connect_timeout`.
    """
    try:
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(connect_timeout), tls_handshake_errors(url):
                    ws = await trio_websocket.connect_websocket_url(
                        nursery, url, ssl_context=ssl_context, extra_headers=headers
                    )
            except trio.TooSlowError:
                nursery.cancel_scope.cancel()
                raise trio_websocket.ConnectionTimeout from None
            except TLSHandshakeError:
                nursery.cancel_scope.cancel()
                raise
            except OSError as exc:
                nursery.cancel_scope.cancel()
                raise HandshakeError from exc
            try:
                yield ws
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(disconnect_timeout):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # One real error (e.g. ConnectionRejected from the library's reader task) comes out as itself.
        real = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
        if len(real) == 1:
            raise real[0] from None
        raise


def backoff_delay(failures: int, initial: float, maximum: float, *, to_max: bool = False) -> float:
    """Seconds to wait before reconnect attempt number `failures` (0-based), with full jitter.

    Normally `uniform(0, min(maximum, initial * 2**failures))`; with `to_max`,
    `uniform(maximum / 2, maximum)` so that a refused device never retries fast.
    """
    if to_max:
        return random.uniform(maximum / 2, maximum)
    return random.uniform(0, min(maximum, initial * 2 ** min(failures, 62)))


def device_url(url: str) -> str:
    """The device endpoint URL: `ws://host:port` alone gets the path `/v1/device`."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"hub URL must be ws://HOST[:PORT][/v1/device] or wss://..., not {url!r}")
    if parts.path in ("", "/"):
        parts = parts._replace(path=DEVICE_PATH)
    return urllib.parse.urlunsplit(parts)


def _retry_after(headers: tuple[tuple[bytes, bytes], ...]) -> float | None:
    for name, value in headers:
        if name.lower() == b"retry-after":
            try:
                seconds = float(value.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                return None  # an HTTP date: fall back to our own backoff
            return min(max(seconds, 0.0), MAX_RETRY_AFTER)
    return None


class DeviceClient:
    """A device's connection to the hub: `send` points, they are delivered at least once; run the hub's commands.

    Use as ``async with DeviceClient(url, token) as client:``. Points are buffered and
    turned into numbered batches kept in an outbox (in memory, or an SQLite file with
    `outbox_path`) until the hub acks them; after any disconnect the client reconnects
    with jittered exponential backoff and resends what is not acked, in order. When the
    outbox is full, `send` and `send_batch` wait (pass ``block=False`` to get `OutboxFull`).
    Handlers registered with `command` answer the hub's commands, each id at most once.
    With `twin` (the default), the client keeps the device twin: `desired` is the latest desired document the hub
    sent (kept in the outbox file), a handler registered with `on_desired` applies each one, and `report` merges a
    patch into the reported document, resent after reconnects until the hub acknowledges it.
    A wss:// hub's certificate is verified against the system CAs, or only `ca_file`;
    plain ws:// is refused (`InsecureURLError`) to hosts that are not loopback unless
    `allow_insecure`. Telemetry goes compressed (deflated binary frames) on every connection whose hub accepts
    it; `compress=False` never offers it.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        firmware: str = "",
        model: str = "",
        interval: float = 0.0,
        outbox_path: str | os.PathLike[str] | None = None,
        outbox_limit: int = 1000,
        outbox_bytes: int | None = None,
        batch_points: int = 500,
        max_message: int = DEFAULT_MAX_MESSAGE,
        linger: float = 0.05,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        connect_timeout: float = 10.0,
        close_timeout: float = 10.0,
        on_rejected: Callable[[int, str, str], None] | None = None,
        command_log_limit: int = 1000,
        ca_file: str | os.PathLike[str] | None = None,
        allow_insecure: bool = False,
        twin: bool = True,
        compress: bool = True,
    ) -> None:
        if not token or not token.isascii() or not token.isprintable() or " " in token:
            raise ValueError("token must be printable ASCII without spaces")
        if len(firmware) > 64 or len(model) > 64:
            raise ValueError("firmware and model are at most 64 characters")
        if not 0 <= interval <= 7 * 86_400:
            raise ValueError("interval must be 0..604800 seconds")
        if batch_points < 1:
            raise ValueError("batch_points must be at least 1")
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        if command_log_limit < 1:
            raise ValueError("command_log_limit must be at least 1")
        self.url = device_url(url)
        self._ssl_context = client_ssl_context(self.url, ca_file=ca_file, allow_insecure=allow_insecure)
        self._name = token.split(".", 1)[0]
        if self._ssl_context is None and not is_loopback(urllib.parse.urlsplit(self.url).hostname or ""):
            log.warning("%s: plain ws:// to %s: the token and telemetry travel unencrypted", self._name, self.url)
        self._headers = [(b"authorization", b"Bearer " + token.encode("ascii"))]
        offer: tuple[str, ...] = SCHEMES if compress else ()  # offered in every hello, used when the hub accepts it
        self._hello = Hello(
            firmware=firmware, model=model, interval=float(interval), proto=PROTOCOL_VERSION, compress=offer
        )
        self._outbox_path = outbox_path
        self._outbox_limit = outbox_limit
        self._outbox_bytes = outbox_bytes
        self._max_message = max_message
        self._batch_points = batch_points
        self._linger = linger
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._connect_timeout = connect_timeout
        self._disconnect_timeout = min(5.0, connect_timeout)
        self._close_timeout = close_timeout
        self._on_rejected = on_rejected
        self._commands: dict[str, CommandHandler] = {}
        self._with_context: dict[str, bool] = {}
        self._command_log_limit = command_log_limit
        self._log: CommandLog | None = None
        self._use_twin = twin
        self._twin: TwinLog | None = None
        self._on_desired: DesiredHandler | None = None
        self._desired_lock = trio.Lock()  # desired documents are applied one at a time, in order
        self._tasks: trio.Nursery | None = None
        self.stats = ClientStats()
        self._outbox: Outbox | None = None
        self._conn: DeviceConnection | None = None  # the session rules; made with the outbox in __aenter__
        self._buffer: list[Point] = []
        self._buffer_since = 0.0
        self._buffered = trio.Event()
        self._changed = trio.Event()
        self._flush_lock = trio.Lock()
        self._stop = trio.Event()
        self._loop_done = trio.Event()
        self._running = False
        self._last_session_stable = False
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._main_scope = trio.CancelScope(shield=True)

    # ------------------------------------------------------------------ lifetime

    async def __aenter__(self) -> DeviceClient:
        if self._nursery_manager is not None:
            raise RuntimeError("a DeviceClient can be entered only once")
        self._outbox = Outbox(
            self._outbox_path,
            max_batches=self._outbox_limit,
            max_bytes=self._outbox_bytes,
            max_message=self._max_message,
        )
        try:
            self._log = CommandLog(self._outbox_path, limit=self._command_log_limit)
            self._twin = TwinLog(self._outbox_path) if self._use_twin else None
        except BaseException:
            self._outbox.close()
            if self._log is not None:
                self._log.close()
            raise
        # Results finished before a restart and never written are the first answers to send.
        self._conn = DeviceConnection(self._outbox, self._log, self.stats, name=self._name, twin=self._twin)
        for entry in self._outbox.unreadable:
            detail = "the stored batch is not valid UTF-8 (outbox file damaged)"
            self._on_rejected_event(self._conn.discard(entry, ErrorCode.BAD_JSON, detail))
        self._nursery_manager = trio.open_nursery()
        nursery = await self._nursery_manager.__aenter__()
        self._running = True
        nursery.start_soon(self._main)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        try:
            with trio.CancelScope(shield=True):
                if exc is None or isinstance(exc, Exception | trio.Cancelled):
                    await self._drain()
                self._stop.set()
                with trio.move_on_after(self._disconnect_timeout + 1.0):
                    await self._loop_done.wait()
            self._main_scope.cancel()
            assert self._nursery_manager is not None  # set by __aenter__
            await self._nursery_manager.__aexit__(None, None, None)
        finally:
            self._running = False
            self._main_scope.cancel()
            assert self._outbox is not None and self._log is not None
            self._outbox.close()
            self._log.close()
            if self._twin is not None:
                self._twin.close()
        return False

    async def _main(self) -> None:
        # Shielded so that a cancelled caller still gets its graceful close in __aexit__,
        # which always cancels this scope.
        try:
            with self._main_scope:
                async with trio.open_nursery() as nursery:
                    self._tasks = nursery  # command handlers run here, across connections
                    nursery.start_soon(self._linger_loop)
                    nursery.start_soon(self._connection_loop)
        finally:
            self._running = False
            self._notify()

    async def _drain(self) -> None:
        if not self._running:
            return
        assert self._outbox is not None
        with trio.move_on_after(self._close_timeout):
            await self._flush(block=True)
            while (self._outbox or self._connection().results_waiting) and self._running:
                await self._changed.wait()
        where = "kept in the outbox file" if self._outbox_path is not None else "lost"
        if self._outbox or self._buffer:
            log.warning(
                "%s: closing with %d batches not acked and %d points buffered (%s)",
                self._name,
                len(self._outbox),
                len(self._buffer),
                where,
            )
        results = self._connection().results_waiting
        if results:
            log.warning("%s: closing with %d command results not sent (%s)", self._name, results, where)

    # ------------------------------------------------------------------ public API

    @property
    def device(self) -> str:
        """The device name (from the token until the hub's Welcome confirms it)."""
        return self._name

    @property
    def pending(self) -> int:
        """Batches in the outbox, not acked yet."""
        return len(self._outbox) if self._outbox is not None else 0

    @property
    def buffered(self) -> int:
        """Points sent with `send` and not yet turned into a batch."""
        return len(self._buffer)

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest batch (or the hub's ack, if higher)."""
        return self._outbox.last_seq if self._outbox is not None else 0

    @property
    def limits(self) -> Limits:
        """The limits points are checked against: the hub's once it has welcomed this client, else the defaults."""
        return self._conn.limits if self._conn is not None else DEFAULT_LIMITS

    async def send(
        self,
        measurement: str,
        fields: Mapping[str, FieldValue],
        *,
        tags: Mapping[str, str] | None = None,
        ts: int | None = None,
        block: bool = True,
    ) -> None:
        """Buffer one point; it is sent in a batch after `linger` seconds or `batch_points` points.

        `ts` is ms since the epoch (default: now by this device's clock). Python ints become
        integer fields, floats float fields. Raises `ProtocolError` for a point the hub
        would refuse. Waits while the outbox is full, or raises `OutboxFull` with ``block=False``.
        """
        self._check_open()
        point: Point = {
            "measurement": measurement,
            "ts": int(time.time() * 1000) if ts is None else ts,
            "fields": dict(fields),
            "tags": dict(tags) if tags else {},
        }
        check_points([point], self.limits)
        while len(self._buffer) >= self._batch_size():
            await self._flush(block)
        if not self._buffer:
            self._buffer_since = trio.current_time()
            self._buffered.set()
        self._buffer.append(point)
        if len(self._buffer) >= self._batch_size() and (block or not self._flush_lock.locked()):
            # On OutboxFull the point stays buffered; the linger task queues it once there is room.
            with contextlib.suppress(OutboxFull):
                await self._flush(block)

    async def send_batch(self, points: list[Point], *, block: bool = True) -> int:
        """Queue `points` as one batch now and return its sequence number.

        Each point is ``{"measurement", "ts", "fields", "tags"?}``; at most the hub's
        `max_points`. Raises `ProtocolError` for bad points; waits for room in the
        outbox, or raises `OutboxFull` with ``block=False``.
        """
        self._check_open()
        assert self._outbox is not None
        check_points(points, self.limits)
        if self._outbox.full:
            if not block:
                raise OutboxFull(f"{len(self._outbox)} batches wait for an ack")
            await self._wait_room()
        return self._queue(points)

    async def flush(self) -> None:
        """Turn the buffered points into batches now (waits for room in the outbox)."""
        self._check_open()
        await self._flush(block=True)

    async def wait_acked(self, seq: int | None = None) -> None:
        """Wait until batch `seq` and all before it are acked or rejected (default: all so far)."""
        self._check_open()
        assert self._outbox is not None
        if seq is None:
            await self._flush(block=True)
            seq = self._outbox.last_seq
        while self._outbox.pending_upto(seq):
            self._check_open()
            await self._changed.wait()

    async def wait_connected(self) -> None:
        """Wait until the hub has welcomed the current connection."""
        self._check_open()
        while not self.stats.connected:
            self._check_open()
            await self._changed.wait()

    @property
    def interval(self) -> float:
        """The reporting interval (seconds) declared in `hello`; a new value is declared on the next connection."""
        return self._hello.interval

    @interval.setter
    def interval(self, seconds: float) -> None:
        if not 0 <= seconds <= 7 * 86_400:
            raise ValueError("interval must be 0..604800 seconds")
        self._hello = attrs.evolve(self._hello, interval=float(seconds))

    def command(self, name: str) -> Callable[[_Handler], _Handler]:
        """Decorator registering the async handler of the hub's command `name` (replacing an earlier one).

        The handler is ``async def handler(args: dict) -> JSON`` or
        ``async def handler(args: dict, ctx: CommandContext) -> JSON``. It runs in its own
        task, once per command id; its return value (JSON, at most `MAX_RESULT_BYTES`)
        is the result, an exception makes the command fail with ``str(exc)``.
        """
        try:
            check_command_name(name)
        except ProtocolError as exc:
            raise ValueError(exc.detail) from None

        def register(handler: _Handler) -> _Handler:
            fn: Callable[..., object] = handler  # checked under another name: the check would narrow `handler`
            if not inspect.iscoroutinefunction(fn):
                raise TypeError("a command handler must be an async function")
            self._with_context[name] = _takes_context(handler)
            self._commands[name] = handler
            return handler

        return register

    # ------------------------------------------------------------------ twin

    @property
    def desired(self) -> dict[str, JSON]:
        """The latest desired twin document the hub sent (``{}`` before the first); kept across restarts."""
        return dict(self._twin_log().desired)

    @property
    def desired_version(self) -> int:
        """The version of `desired` (0 before the first)."""
        return self._twin_log().desired_version

    @property
    def reports_pending(self) -> int:
        """Twin reports the hub has not acknowledged yet."""
        return len(self._twin_log().pending)

    def on_desired(self, handler: DesiredHandler) -> DesiredHandler:
        """Decorator registering ``async def handler(desired: dict) -> dict | None``, run for each new desired document
        (one at a time; a document superseded meanwhile is skipped). What it returns is reported with the version
        applied; an exception leaves the version unapplied (operators see it in the delta) and is logged."""
        fn: Callable[..., object] = handler
        if not inspect.iscoroutinefunction(fn):
            raise TypeError("a desired handler must be an async function")
        self._on_desired = handler
        return handler

    async def report(self, patch: Mapping[str, JSON]) -> int:
        """Merge `patch` (a JSON merge patch: null removes a key) into the reported twin document; the report's id.

        Kept with the twin (on disk with `outbox_path`) and sent, again after reconnects, until the hub acknowledges
        it; returns once it is queued. ValueError for a patch that is not an object, too large or too deep."""
        self._check_open()
        try:
            checked = check_patch(dict(patch))
        except TwinError as exc:
            raise ValueError(exc.detail) from None
        report = self._connection().report(checked)
        self._notify()
        await trio.lowlevel.checkpoint()
        return report.id

    async def wait_reported(self) -> None:
        """Wait until the hub has acknowledged every twin report queued so far."""
        self._check_open()
        target = self._twin_log().newest_id
        while any(r.id <= target for r in self._twin_log().pending):
            self._check_open()
            await self._changed.wait()

    def _twin_log(self) -> TwinLog:
        if self._twin is None:
            raise RuntimeError("this client keeps no twin (twin=False), or is not running")
        return self._twin

    async def _apply_desired(self, event: DesiredChanged) -> None:
        async with self._desired_lock:
            twin = self._twin_log()
            if twin.desired_version != event.version:
                return  # superseded while an earlier one was applied
            patch: Mapping[str, JSON] | None = None
            handler = self._on_desired
            if handler is not None:
                try:
                    patch = await handler(dict(event.desired))
                except Exception:
                    log.exception("%s: the desired handler failed on version %d", self._name, event.version)
                    return
            try:
                checked = check_patch(dict(patch or {}))
            except TwinError as exc:
                log.error("%s: the desired handler returned a bad report (%s): reporting none", self._name, exc)
                checked = {}
            self._connection().report(checked, event.version)
            self._notify()

    @property
    def commands(self) -> dict[str, CommandHandler]:
        """The registered command handlers by name."""
        return dict(self._commands)

    def reconnect(self, delay: float = 0.0) -> None:
        """Close the current connection once the command answers queued so far are written; reconnect after `delay` s.

        The outbox and the command log are kept, so nothing is lost. Does nothing while
        not connected (a reconnect is under way anyway). From a command handler, use
        `CommandContext.reconnect` instead, so that its own result goes out first.
        """
        self._check_open()
        if delay < 0:
            raise ValueError("delay must not be negative")
        if not self.stats.connected:
            log.debug("%s: reconnect requested while not connected: nothing to do", self._name)
            return
        self._connection().request_reconnect(delay)
        self._notify()

    # ------------------------------------------------------------------ buffering

    def _connection(self) -> DeviceConnection:
        assert self._conn is not None, "the session exists from __aenter__ on"
        return self._conn

    def _check_open(self) -> None:
        if not self._running:
            raise RuntimeError("use `async with DeviceClient(...)`; this client is not running")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _batch_size(self) -> int:
        return min(self._batch_points, self.limits.max_points)

    def _queue(self, points: list[Point]) -> int:
        assert self._outbox is not None
        seq = self._outbox.add(points, limits=None)
        self.stats.batches_queued += 1
        self.stats.points_queued += len(points)
        self._notify()
        return seq

    async def _wait_room(self) -> None:
        assert self._outbox is not None
        while self._outbox.full:
            self._check_open()
            await self._changed.wait()

    async def _flush(self, block: bool) -> None:
        assert self._outbox is not None
        if not block and self._flush_lock.locked():
            raise OutboxFull("another flush waits for room in the outbox")
        async with self._flush_lock:
            while self._buffer:
                if self._outbox.full:
                    if not block:
                        raise OutboxFull(f"{len(self._outbox)} batches wait for an ack")
                    await self._wait_room()
                    continue
                n = self._batch_size()
                while True:
                    try:
                        self._queue(self._buffer[:n])
                        break
                    except ProtocolError as exc:
                        if exc.code != TOO_LARGE:
                            raise
                        if n == 1:
                            log.error("%s: dropping a point too large for any message: %s", self._name, exc)
                            break
                        n //= 2
                del self._buffer[:n]
                self._buffer_since = trio.current_time()

    async def _linger_loop(self) -> None:
        while True:
            if not self._buffer:
                self._buffered = trio.Event()
                await self._buffered.wait()
                continue
            deadline = self._buffer_since + self._linger
            if trio.current_time() < deadline:
                await trio.sleep_until(deadline)
                continue
            await self._flush(block=True)

    # ------------------------------------------------------------------ connection

    async def _connection_loop(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                end = await self._session()
                if self._stop.is_set():
                    return
                if end.planned:
                    failures, delay = 0, end.retry_after or 0.0
                else:
                    if self._last_session_stable:
                        failures = 0
                    if end.retry_after is not None:
                        delay = end.retry_after + random.uniform(0, self._backoff_initial)
                    else:
                        delay = backoff_delay(failures, self._backoff_initial, self._backoff_max, to_max=end.to_max)
                    failures += 1
                log.debug("%s: reconnecting in %.2f s", self._name, delay)
                with trio.move_on_after(delay):
                    await self._stop.wait()
        finally:
            self._loop_done.set()

    async def _session(self) -> SessionEnd:
        conn = self._connection()
        hello = conn.connect(self._hello)
        self._last_session_stable = False
        try:
            async with _open_websocket(
                self.url, self._headers, self._connect_timeout, self._disconnect_timeout, self._ssl_context
            ) as ws:
                await self._converse(ws, hello)
        except ConnectionRejected as exc:
            self.stats.connect_failures += 1
            conn.set_end(self._rejected(exc))
        except TLSHandshakeError as exc:
            self.stats.connect_failures += 1
            if exc.verify_failed:
                log.error("%s: %s; retrying slowly", self._name, exc)
                conn.set_end(SessionEnd(to_max=True))
            else:
                log.warning("%s: %s", self._name, exc)
        except HandshakeError as exc:  # includes connect and disconnect timeouts
            if conn.end is None:
                self.stats.connect_failures += 1
                log.info("%s: cannot connect to %s: %r", self._name, self.url, exc.__cause__ or exc)
        except ConnectionClosed as exc:  # closed before or right after the Welcome
            self._on_close(exc.reason)
        except trio.TooSlowError:
            self.stats.connect_failures += 1
            log.warning("%s: no welcome from the hub within %s s", self._name, self._connect_timeout)
        except ProtocolError as exc:
            self.stats.connect_failures += 1
            log.warning("%s: the hub sent an invalid message: %s", self._name, exc)
        except OSError as exc:
            self.stats.connect_failures += 1
            log.info("%s: connection failed: %r", self._name, exc)
        except Exception:
            if self._stop.is_set():  # e.g. trio-websocket #184: a ping racing our own close
                log.debug("%s: error while closing", self._name, exc_info=True)
            else:
                log.exception("%s: connection failed unexpectedly", self._name)
            conn.set_end(SessionEnd(to_max=True))
        finally:
            end = conn.connection_lost()
            self._notify()
        return end

    def _on_close(self, reason: CloseReason | None) -> None:
        # Reader and sender may both see the close: the session end judges it once.
        code, text = (reason.code, reason.reason) if reason is not None else (1006, None)
        closed = self._connection().peer_closed(code, text)
        if closed is not None:
            _CLOSE_LOGS[closed.verdict](self, closed)

    async def _converse(self, ws: trio_websocket.WebSocketConnection, hello: str) -> None:
        await ws.send_message(hello)
        conn = self._connection()
        with trio.fail_after(self._connect_timeout):
            while conn.state is SessionState.HELLO:
                self._on_event(conn.receive(await ws.get_message()))
        welcomed = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, ws, nursery.cancel_scope)
                nursery.start_soon(self._sender, ws, nursery.cancel_scope)
                nursery.start_soon(self._stopper, nursery.cancel_scope)
        finally:
            self._last_session_stable = trio.current_time() - welcomed >= STABLE_SESSION

    async def _stopper(self, scope: trio.CancelScope) -> None:
        await self._stop.wait()
        scope.cancel()

    async def _reader(self, ws: trio_websocket.WebSocketConnection, scope: trio.CancelScope) -> None:
        # Always receiving: trio-websocket answers the hub's pings only while its queue drains.
        conn = self._connection()
        try:
            while True:
                event = conn.receive(await ws.get_message())
                self._on_event(event)
                if type(event) is CommandReceived:
                    while conn.answers_waiting >= MAX_OUTGOING:
                        await self._changed.wait()
        except ConnectionClosed as exc:
            self._on_close(exc.reason)
        scope.cancel()

    async def _sender(self, ws: trio_websocket.WebSocketConnection, scope: trio.CancelScope) -> None:
        conn = self._connection()
        try:
            while True:
                changed = self._changed
                frame = conn.next_frame()
                if frame is None:
                    await changed.wait()
                elif isinstance(frame, str | bytes):
                    await ws.send_message(frame)
                    if conn.frame_written():
                        self._notify()
                else:
                    log.info(
                        "%s: closing the connection on request; reconnecting in %.2f s", self._name, frame.retry_after
                    )
                    break
        except ConnectionClosed as exc:
            self._on_close(ws.closed or exc.reason)
        scope.cancel()

    # ------------------------------------------------------------------ what the session end reports

    def _on_event(self, event: DeviceEvent) -> None:
        _EVENT_HANDLERS[type(event)](self, event)
        self._notify()

    def _on_welcomed(self, event: Welcomed) -> None:
        welcome = event.welcome
        if welcome.proto != PROTOCOL_VERSION:
            log.warning("%s: hub speaks protocol %d, we speak %d", self._name, welcome.proto, PROTOCOL_VERSION)
        self._name = self._connection().device
        log.info(
            "%s: connected to %s (epoch %d); hub holds up to seq %d; %d batches to send",
            self._name,
            self.url,
            welcome.epoch,
            welcome.ack,
            len(self._connection().outbox),
        )

    def _on_acked(self, event: Acked) -> None:
        pass  # counted by the session end; waiters wake on the notification

    def _on_rejected_event(self, event: Rejected) -> None:
        entry = event.entry
        if entry is None:
            log.info("%s: hub refused batch %d, which is no longer pending (%s)", self._name, event.seq, event.code)
            return
        log.warning(
            "%s: batch %d (%d points) dropped for good: %s %s",
            self._name,
            event.seq,
            entry.points,
            event.code,
            event.detail,
        )
        self._notify()
        if self._on_rejected is not None:
            try:
                self._on_rejected(event.seq, event.code, event.detail)
            except Exception:
                log.exception("%s: the on_rejected callback failed", self._name)

    def _on_hub_error(self, event: HubError) -> None:
        if event.code == ErrorCode.UNKNOWN_COMMAND:
            log.warning("%s: the hub does not know a command we answered; answer dropped: %s", self._name, event.detail)
        else:
            log.warning("%s: hub error %s: %s", self._name, event.code, event.detail)

    def _on_command(self, event: CommandReceived) -> None:
        cmd = event.command
        if event.run:
            assert self._tasks is not None
            log.info("%s: command %s %s received", self._name, cmd.id, cmd.name)
            self._tasks.start_soon(self._run_command, cmd, name=f"command {cmd.name} {cmd.id}")
            return
        log.info(
            "%s: command %s %s received again: %s",
            self._name,
            cmd.id,
            cmd.name,
            "answering with its result" if event.answered else "still running",
        )

    def _on_desired_changed(self, event: DesiredChanged) -> None:
        assert self._tasks is not None
        log.info("%s: desired twin document version %d received", self._name, event.version)
        self._tasks.start_soon(self._apply_desired, event, name=f"desired {event.version}")

    def _on_report_acked(self, event: ReportAcked) -> None:
        pass  # waiters wake on the notification

    def _on_report_refused(self, event: ReportRefused) -> None:
        log.error("%s: the hub refused a twin report for good: %s %s", self._name, event.code, event.detail)

    def _on_ignored(self, event: Ignored) -> None:
        log.warning("%s: %s", self._name, event.why)

    def _log_replaced(self, closed: PeerClosed) -> None:
        log.warning("%s: replaced by another connection with the same token; backing off", self._name)

    def _log_refused(self, closed: PeerClosed) -> None:
        log.error("%s: hub closed the connection (%d %s); retrying slowly", self._name, closed.code, closed.reason)

    def _log_probe(self, closed: PeerClosed) -> None:
        why = CULPRIT_CLOSES[closed.code][1]
        log.error(
            "%s: connection closed with %d (%s %s); resending batches %s one at a time",
            self._name,
            closed.code,
            why,
            closed.reason,
            list(closed.inflight),
        )

    def _log_dropped(self, closed: PeerClosed) -> None:
        why = CULPRIT_CLOSES[closed.code][1]
        seq = closed.inflight[0]
        log.error(
            "%s: batch %d makes the connection close with %d (%s): dropping it", self._name, seq, closed.code, why
        )
        assert closed.dropped is not None
        self._on_rejected_event(closed.dropped)

    def _log_wire_bug(self, closed: PeerClosed) -> None:
        log.error(
            "%s: the hub could not parse our frames (1002 %s), a WebSocket library bug", self._name, closed.reason
        )

    def _log_closed(self, closed: PeerClosed) -> None:
        log.info("%s: connection closed (%d %s)", self._name, closed.code, closed.reason)

    def _rejected(self, exc: ConnectionRejected) -> SessionEnd:
        status = exc.status_code
        if status == 401:
            log.error("%s: hub refused the token (401); retrying slowly", self._name)
            return SessionEnd(to_max=True)
        if status == 403:
            log.error("%s: hub forbids this connection (403); retrying slowly", self._name)
            return SessionEnd(to_max=True)
        if status in (429, 503):
            after = _retry_after(exc.headers)
            log.info("%s: hub is busy (%d), retry after %s s", self._name, status, after)
            return SessionEnd(retry_after=after)
        log.warning("%s: hub refused the connection with HTTP %d", self._name, status)
        return SessionEnd()

    # ------------------------------------------------------------------ commands

    async def _run_command(self, cmd: Command) -> None:
        done = False
        try:
            try:
                result = await self._call_handler(cmd)
            except Exception:  # a bug of ours, not the handler's: still answer, never kill the client
                log.exception("%s: command %s %s: internal error", self._name, cmd.id, cmd.name)
                result = CommandResult(cmd.id, False, error="internal error on the device")
            done = True
        finally:
            if not done:  # cancelled because the client closes: no result, the hub times it out
                self._connection().command_abandoned(cmd.id)
                log.info("%s: command %s %s cancelled, no result", self._name, cmd.id, cmd.name)
        self._finish(cmd, result)

    async def _call_handler(self, cmd: Command) -> CommandResult:
        handler = self._commands.get(cmd.name)
        if handler is None:
            log.warning("%s: unknown command %r (%s)", self._name, cmd.name, cmd.id)
            return CommandResult(cmd.id, False, error=f"unknown command {cmd.name!r}")
        args = dict(cmd.args)
        try:
            if self._with_context[cmd.name]:
                value = await handler(args, CommandContext(self, cmd.id, cmd.name, cmd.timeout))
            else:
                value = await handler(args)
        except Exception as exc:
            log.warning(
                "%s: command %s %s failed: %r",
                self._name,
                cmd.id,
                cmd.name,
                exc,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            return CommandResult(cmd.id, False, error=(str(exc) or type(exc).__name__)[:MAX_ERROR_LEN])
        try:
            size = json_size(value)
        except (TypeError, ValueError) as exc:
            log.warning("%s: command %s %s returned a result that is not JSON: %r", self._name, cmd.id, cmd.name, exc)
            return CommandResult(cmd.id, False, error="result is not JSON")
        if size > MAX_RESULT_BYTES:
            log.warning("%s: command %s %s returned %d bytes of result: too large", self._name, cmd.id, cmd.name, size)
            return CommandResult(cmd.id, False, error="result too large")
        return CommandResult(cmd.id, True, value)

    def _finish(self, cmd: Command, result: CommandResult) -> None:
        self._connection().command_finished(result)
        log.info("%s: command %s %s %s", self._name, cmd.id, cmd.name, "succeeded" if result.ok else "failed")
        self._notify()


#: What the driver does with each report of the session end: one entry per event type.
#: (The event argument is untyped: each handler takes the event class it is registered for.)
_EVENT_HANDLERS: dict[type, Callable[[DeviceClient, Any], None]] = {
    Welcomed: DeviceClient._on_welcomed,
    Acked: DeviceClient._on_acked,
    Rejected: DeviceClient._on_rejected_event,
    HubError: DeviceClient._on_hub_error,
    CommandReceived: DeviceClient._on_command,
    DesiredChanged: DeviceClient._on_desired_changed,
    ReportAcked: DeviceClient._on_report_acked,
    ReportRefused: DeviceClient._on_report_refused,
    Ignored: DeviceClient._on_ignored,
}

#: How each verdict on a close by the hub is logged.
_CLOSE_LOGS: dict[CloseVerdict, Callable[[DeviceClient, PeerClosed], None]] = {
    CloseVerdict.REPLACED: DeviceClient._log_replaced,
    CloseVerdict.REFUSED: DeviceClient._log_refused,
    CloseVerdict.PROBE: DeviceClient._log_probe,
    CloseVerdict.DROPPED: DeviceClient._log_dropped,
    CloseVerdict.WIRE_BUG: DeviceClient._log_wire_bug,
    CloseVerdict.CLOSED: DeviceClient._log_closed,
}


def _takes_context(handler: Callable[..., object]) -> bool:
    """True for ``handler(args, ctx)``, False for ``handler(args)``; TypeError for other shapes."""
    params = list(inspect.signature(handler).parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params if p.default is p.empty and p.kind is not p.VAR_KEYWORD]
    if not positional or len(required) > 2 or len(required) > len(positional):
        raise TypeError("a command handler takes (args) or (args, ctx)")
    return len(positional) >= 2
