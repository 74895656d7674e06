"""The device endpoint: handshake checks before the upgrade, then one session per device."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from device_client import protocol
from device_client.protocol import (
    CloseCode,
    Command,
    CommandAck,
    CommandResult,
    ErrorCode,
    Hello,
    ProtocolError,
    Telemetry,
    Welcome,
)
from hub import _wire
from hub.commands import CommandService
from hub.config import HubConfig
from hub.edge import Identity, Ticket
from hub.ledger import DeviceLedger, Ledgers
from hub.lineproto import LineBuilder
from hub.pipeline import Pipeline
from hub.presence import Presence
from hub.ratelimit import DeviceRate, Rate, Throttle, Verdict
from hub.registry import Registry
from hub.stats import Stats
from hub.subscriptions import Broadcaster

__all__ = ["DeviceServer", "DeviceSession"]

log = logging.getLogger("hub.session")

#: Protocol errors are counted over this many seconds when deciding to close a session.
ERROR_WINDOW = 60.0
#: Seconds between checks of the registry for devices revoked while connected.
REVOKE_CHECK_EVERY = 2.0
#: Longest wait for a peer to answer our close frame.
CLOSE_TIMEOUT = 2.0
#: A device is idle after max(server.idle_timeout, this x the reporting interval it declared) without a message.
IDLE_FACTOR = 3.0
#: Error code of the notice that a device exceeds its rates (sent without a seq: nothing is refused).
RATE_LIMITED = ErrorCode.RATE_LIMITED
#: Names of a session's tasks (a shared string: trio would otherwise build one per task).
OUTBOUND_TASK = "device-outbound"
PING_TASK = "device-ping"
#: Error detail for a text message that is not valid UTF-8 (refused as `bad_json`, with its seq when readable).
BAD_UTF8_DETAIL = "text is not valid UTF-8"


class DeviceServer:
    """The /v1/device endpoint: authenticates devices and runs a `DeviceSession` per device."""

    path = protocol.DEVICE_PATH
    name = "device"
    credential = "device token"
    bearer_required = True

    def __init__(
        self,
        config: HubConfig,
        registry: Registry,
        ledgers: Ledgers,
        pipeline: Pipeline,
        presence: Presence,
        stats: Stats,
        commands: CommandService,
        broadcaster: Broadcaster,
    ) -> None:
        self.config = config
        self.commands = commands
        self.broadcaster = broadcaster
        self.registry = registry
        self.ledgers = ledgers
        self.pipeline = pipeline
        self.presence = presence
        self.stats = stats
        self.sessions: dict[str, DeviceSession] = {}
        self.closing = False
        self._device_locks: dict[str, trio.Lock] = {}
        self._rates: dict[str, DeviceRate] = {}  # per device, kept across sessions
        self._inflight: dict[str, list[int]] = {}  # per device: submitted telemetry seqs not yet known durable
        self._ping_queue: deque[tuple[float, DeviceSession]] = deque()  # (when, session): due times only grow
        self._ping_added = trio.Event()  # set when a session joins an empty ping queue
        self._scope = trio.CancelScope()
        self._tasks: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ping sessions and close those of revoked devices, until `stop_reading` (or cancelled)."""
        with self._scope:
            async with trio.open_nursery() as tasks:
                self._tasks = tasks
                try:
                    tasks.start_soon(self._close_revoked)
                    tasks.start_soon(self._pinger)
                    task_status.started()
                    await trio.sleep_forever()
                finally:
                    self._tasks = None

    # ------------------------------------------------------------------ the endpoint (see hub.edge)

    def refuse_origin(self, origin: bytes | None) -> tuple[str, str] | None:
        """Devices are not browsers: any Origin header is refused (this blocks cross-site WebSocket hijacking)."""
        if origin is None:
            return None
        return "origin_present", "browsers may not connect to the device endpoint"

    async def authenticate(self, token: str) -> Identity | None:
        """The device a token belongs to (checked on the loop: one indexed read and one hash)."""
        name = self.registry.authenticate(token)
        return None if name is None else Identity(name, "device")

    async def serve(self, ws: WebSocketConnection, identity: Identity | None, remote: str, ticket: Ticket) -> None:
        """Run the session of an authenticated device."""
        assert identity is not None  # bearer_required
        await DeviceSession(self, ws, identity.name, remote, ticket).run()

    # ------------------------------------------------------------------ sessions

    async def _close_revoked(self) -> None:
        """Close the sessions of devices revoked while connected (`hub device revoke` runs in another process)."""
        while True:
            await trio.sleep(REVOKE_CHECK_EVERY)
            revoked = await trio.to_thread.run_sync(self.registry.revoked_names)
            for name in revoked & self.sessions.keys():
                self.revoke(name)

    def schedule_ping(self, session: DeviceSession) -> None:
        """Ping `session` one ping interval from now (then every interval while it lives)."""
        queue = self._ping_queue
        queue.append((trio.current_time() + self.config.presence.ping_interval, session))
        if len(queue) == 1:
            self._ping_added.set()

    async def _pinger(self) -> None:
        """Start each session's ping when due: one task for all (a sleeping task per session costs memory)."""
        queue = self._ping_queue
        while True:
            if not queue:
                self._ping_added = trio.Event()
                await self._ping_added.wait()
                continue
            due, session = queue[0]
            if due > trio.current_time():
                await trio.sleep_until(due)
                continue
            queue.popleft()
            if session.ping_due():
                self.schedule_ping(session)

    def revoke(self, name: str) -> None:
        """Close the open session of a device whose token was just revoked (4003)."""
        session = self.sessions.get(name)
        if session is not None and self._tasks is not None:
            log.warning("device revoked: closing its session", extra=session._kv(reason="revoked"))
            self._tasks.start_soon(partial(session.close, CloseCode.REVOKED, "token revoked", reason="revoked"))

    def stop_reading(self) -> None:
        """Shutdown: refuse new sessions, stop pinging and every session from reading more telemetry."""
        self.closing = True
        self._scope.cancel()
        for session in list(self.sessions.values()):
            session.stop_reading()

    async def close_all(self, code: int, reason: str) -> None:
        """Send each session its last ack and close it with `code`."""
        async with trio.open_nursery() as nursery:
            for session in list(self.sessions.values()):
                nursery.start_soon(session.close, code, reason)

    def device_rate(self, name: str) -> DeviceRate:
        """The message and point buckets of device `name` (one pair per device, shared by its sessions)."""
        rate = self._rates.get(name)
        if rate is None:
            cfg = self.config.server
            messages, points = Rate(cfg.message_rate, cfg.message_burst), Rate(cfg.point_rate, cfg.point_burst)
            rate = self._rates[name] = DeviceRate(messages, points, trio.current_time())
        return rate

    def inflight(self, name: str) -> list[int]:
        """Seqs of device `name` handed to the pipeline and maybe not durable yet, oldest first (the window)."""
        seqs = self._inflight.get(name)
        if seqs is None:
            seqs = self._inflight[name] = []
        return seqs

    @contextlib.asynccontextmanager
    async def device_lock(self, name: str) -> AsyncIterator[None]:
        """Hold the lock that orders session hand-over for one device (kept only while in use)."""
        lock = self._device_locks.get(name)
        if lock is None:
            lock = self._device_locks[name] = trio.Lock()
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting and self._device_locks.get(name) is lock:
                del self._device_locks[name]


def _telemetry_seq(text: str) -> int | None:
    """The seq of a telemetry message that failed to decode, when it can be read (None otherwise)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if type(obj) is not dict or obj.get("type") != "telemetry":
        return None
    seq = obj.get("seq")
    return seq if type(seq) is int and 0 < seq <= protocol.INT64_MAX else None


def _drop_durable(inflight: list[int], durable: int) -> None:
    """Remove the leading seqs that are durable now from a device's in-flight list."""
    n = 0
    for seq in inflight:
        if seq > durable:
            break
        n += 1
    if n:
        del inflight[:n]


class DeviceSession:
    """One authenticated device connection: hello/welcome, telemetry in, acks and pings out."""

    def __init__(
        self, server: DeviceServer, ws: WebSocketConnection, name: str, remote: str, ticket: Ticket | None = None
    ) -> None:
        self.server = server
        self._ticket = ticket  # our place among the handshakes in progress, given up once welcomed
        self.ws = ws
        self.name = name
        self.remote = remote
        self.epoch = 0
        self.reason = "closed"
        self.ledger: DeviceLedger | None = None
        self._last_ack = 0
        self._errors: list[float] = []  # times of recent refused messages
        self._builder = LineBuilder(name)
        self._throttle = Throttle(server.device_rate(name), server.config.server.throttle_close_after)
        self._inflight = server.inflight(name)
        self._interval = 0.0  # the reporting interval declared in hello
        self._holds = 0  # > 0 while the session deliberately reads nothing (window, rate, pipeline backpressure)
        self._hold_end = -math.inf  # when the latest hold ended
        self._commands: list[Command] = []  # offered by the command service, not yet sent
        self._parked: trio.lowlevel.Task | None = None  # the outbound task, while it waits for work
        self._nursery: trio.Nursery | None = None  # the session's own tasks, while they run
        self._pinging = False
        self._reader_scope = trio.CancelScope()
        self._scope = trio.CancelScope()
        self._done = trio.Event()

    def _kv(self, **extra: Any) -> dict[str, Any]:
        return {"kv": {"device": self.name, "epoch": self.epoch, "remote": self.remote, **extra}}

    async def run(self) -> None:
        """Serve the session until the peer leaves, it is replaced, or the hub closes it."""
        try:
            with self._scope:
                hello = await self._receive_hello()
                if hello is None:
                    return
                if not await self._start(hello):
                    return
                try:
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        try:
                            nursery.start_soon(self._outbound, name=OUTBOUND_TASK)
                            self.ledger.listener = self
                            self.server.schedule_ping(self)
                            self.server.commands.attach(self.name, self._offer_command)
                            with self._reader_scope:
                                await self._read()
                            if not self.server.closing:
                                nursery.cancel_scope.cancel()
                        finally:
                            self._nursery = None  # before the nursery closes: no ping may start in it from now
                finally:
                    if self.ledger.listener is self:
                        self.ledger.listener = None
                    self.server.commands.detach(self.name, self._offer_command)
                    if self.epoch:
                        with trio.CancelScope(shield=True):
                            await self.server.presence.offline(self.name, self.epoch, self.reason)
        except ConnectionClosed:
            pass  # gone during the handshake phase: nothing to clean up
        except Exception:
            log.exception("device session failed", extra=self._kv())
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self.ws.aclose(CloseCode.INTERNAL, "internal error")
        finally:
            if self.server.sessions.get(self.name) is self:
                del self.server.sessions[self.name]
                self.server.stats.connections -= 1
            self._done.set()
            if self.ws.closed is not None and self.ws.closed.code == CloseCode.TOO_BIG:
                # Once the session is over (offline, replaceable): trio-websocket left the TCP connection open.
                await _wire.close_stream(self.ws, CLOSE_TIMEOUT)

    async def _receive_hello(self) -> Hello | None:
        cfg = self.server.config.server
        with trio.move_on_after(cfg.hello_timeout):
            try:
                text = await self.ws.get_message()
            except ConnectionClosed:
                await self._closed_by_peer_or_wire()
                return None
            if type(text) is str and _wire.has_bad_utf8(text):
                await self._close_with_error(ErrorCode.BAD_JSON, BAD_UTF8_DETAIL)
                return None
            try:
                msg = protocol.decode(text, self.server.config.limits)
            except ProtocolError as exc:
                await self._close_with_error(exc.code, exc.detail)
                return None
            if not isinstance(msg, Hello):
                await self._close_with_error(ErrorCode.NOT_READY, "the first message must be hello")
                return None
            if msg.proto != protocol.PROTOCOL_VERSION:
                await self._close_with_error(
                    ErrorCode.UNSUPPORTED_VERSION, f"this hub speaks proto {protocol.PROTOCOL_VERSION}"
                )
                return None
            self._interval = msg.interval
            return msg
        await self._close_with_error(ErrorCode.NOT_READY, "no hello in time")
        return None

    async def _close_with_error(self, code: str, detail: str) -> None:
        log.warning("device refused", extra=self._kv(reason=code))
        self.server.stats.count_error(code)
        with trio.move_on_after(CLOSE_TIMEOUT):
            with contextlib.suppress(ConnectionClosed):
                await self.ws.send_message(protocol.encode(protocol.Error(code, detail)))
            await self.ws.aclose(CloseCode.POLICY, code)

    async def _start(self, hello: Hello) -> bool:
        server = self.server
        async with server.device_lock(self.name):
            old = server.sessions.get(self.name)
            if old is not None:
                await old.close(CloseCode.REPLACED, "replaced by a new connection", reason="replaced")
            if server.closing:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self.ws.aclose(CloseCode.GOING_AWAY, "hub shutting down")
                return False
            self.epoch, acked = server.registry.begin_session(self.name)
            self.ledger = server.ledgers.get(self.name, acked)
            server.sessions[self.name] = self
            server.stats.connections += 1
            server.stats.connects += 1
        cfg = server.config
        self._last_ack = self.ledger.durable
        welcome = Welcome(
            device=self.name,
            ack=self.ledger.durable,
            epoch=self.epoch,
            window=cfg.server.window,
            max_points=cfg.limits.max_points,
            ping_interval=cfg.presence.ping_interval,
        )
        await self.ws.send_message(protocol.encode(welcome))
        if self._ticket is not None:
            self._ticket.admitted()
            self._ticket = None
        await server.presence.online(
            self.name, self.epoch, firmware=hello.firmware, model=hello.model, interval=hello.interval
        )
        log.info("device connected", extra=self._kv(firmware=hello.firmware, model=hello.model))
        return True

    # ------------------------------------------------------------------ streaming

    async def _read(self) -> None:
        try:
            await self._read_loop()
        except ConnectionClosed:
            if self.reason == "closed":
                self.reason = "disconnected"

    def idle_timeout(self) -> float:
        """Seconds without any message after which this session is closed as idle (inf: never)."""
        idle = self.server.config.server.idle_timeout
        return max(idle, IDLE_FACTOR * self._interval) if idle > 0 else math.inf

    async def _read_loop(self) -> None:
        stats = self.server.stats
        idle = self.idle_timeout()
        get_message = self.ws.get_message
        with trio.CancelScope() as waiting:  # one scope for the session: its deadline is moved, not re-made
            while True:
                waiting.deadline = trio.current_time() + idle
                try:
                    text = await get_message()
                except ConnectionClosed:
                    await self._closed_by_peer_or_wire()
                    return
                waiting.deadline = math.inf  # the idle clock stops while the hub works (or holds the device back)
                stats.messages_in += 1
                points = await self._dispatch(text)
                verdict = self._throttle.charge(1, points, trio.current_time())
                if verdict.delay and not await self._throttled(verdict):
                    return
        self.reason = "idle"
        log.info("device idle: closing", extra=self._kv(reason="idle", seconds=idle))
        await self._end(CloseCode.GOING_AWAY, "idle timeout")

    async def _closed_by_peer_or_wire(self) -> None:
        """The connection closed while reading: say why if the hub closed it (too big, unparsable frames)."""
        reason = self.ws.closed
        code = reason.code if reason is not None else None
        failure = _wire.parse_failure(self.ws)
        why = "disconnected"
        if failure is not None:
            why = _wire.PARSE_FAILURE_REASONS.get(failure[0], "protocol_error")
            self.server.stats.count_error(why)
            log.warning(
                "unparsable frame: connection closed",
                extra=self._kv(reason=why, code=failure[0], detail=failure[1][:200]),
            )
        elif code == CloseCode.TOO_BIG:
            why = "too_big"
            limit = self.server.config.server.max_message_bytes
            log.warning("message too big: connection closed", extra=self._kv(reason=why, limit=limit))
        if self.reason == "closed":
            self.reason = why

    async def _dispatch(self, text: str | bytes) -> int:
        """Act on one message from the device; the number of points it brought (for the rate limit)."""
        if isinstance(text, bytes):
            await self._refuse(ProtocolError(ErrorCode.BAD_FRAME, "binary frames are not accepted"))
            return 0
        if _wire.has_bad_utf8(text):
            await self._refuse(ProtocolError(ErrorCode.BAD_JSON, BAD_UTF8_DETAIL, _telemetry_seq(text)))
            return 0
        try:
            msg = protocol.decode(text, self.server.config.limits)
        except ProtocolError as exc:
            await self._refuse(exc)
            return 0
        kind = type(msg)
        if kind is Telemetry:
            await self._telemetry(msg)
            return len(msg.points)
        if kind is CommandAck or kind is CommandResult:
            await self._command_answer(msg)
        elif kind is Hello:
            await self._refuse(ProtocolError(ErrorCode.NOT_READY, "hello was already received"))
        else:
            detail = "devices send hello, telemetry, command_ack and command_result only"
            await self._refuse(ProtocolError(ErrorCode.BAD_MESSAGE, detail))
        return 0

    async def _throttled(self, verdict: Verdict) -> bool:
        """Slow down a device over its rates (tell it once per episode); False once it is closed for good."""
        cfg = self.server.config.server
        if verdict.persistent:
            self.reason = RATE_LIMITED
            log.warning(
                "device keeps exceeding its rates: closing",
                extra=self._kv(reason=RATE_LIMITED, seconds=cfg.throttle_close_after),
            )
            await self._end(CloseCode.TRY_LATER, "rate limit exceeded")
            return False
        if verdict.started:
            stats = self.server.stats
            stats.throttled += 1
            stats.count_error(RATE_LIMITED)
            log.info("device throttled", extra=self._kv(reason=RATE_LIMITED, wait=round(verdict.delay, 3)))
            detail = (
                f"over {cfg.message_rate:g} messages/s or {cfg.point_rate:g} points/s: "
                "the hub reads from this connection more slowly; nothing was refused"
            )
            await self.ws.send_message(protocol.encode(protocol.Error(RATE_LIMITED, detail)))
        with self._holding():
            await trio.sleep(verdict.delay)
        return True

    @contextlib.contextmanager
    def _holding(self) -> Iterator[None]:
        """Mark a deliberate pause in reading: pongs cannot be read meanwhile, so pings do not count."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            self._hold_end = trio.current_time()

    async def _make_room(self) -> None:
        """Read nothing more until fewer than `server.window` batches of this device wait for their ack."""
        ledger = self.ledger
        assert ledger is not None
        inflight = self._inflight
        window = self.server.config.server.window
        _drop_durable(inflight, ledger.durable)
        if len(inflight) < window:
            return
        self.server.stats.window_waits += 1
        log.debug("window full: waiting for acks", extra=self._kv(inflight=len(inflight)))
        with self._holding():
            while len(inflight) >= window:
                await ledger.wait_beyond(inflight[0] - 1)
                _drop_durable(inflight, ledger.durable)

    async def _submit(self, text: str, n: int, seq: int) -> None:
        """Hand batch `seq` to the pipeline once the window has room for it (both may make this session wait)."""
        ledger = self.ledger
        assert ledger is not None
        inflight = self._inflight
        if len(inflight) >= self.server.config.server.window:
            await self._make_room()
        pipeline = self.server.pipeline
        if not pipeline.try_submit(text, n, (ledger, seq)):
            with self._holding():
                await pipeline.submit(text, n, (ledger, seq))
        ledger.submitted = seq
        inflight.append(seq)

    async def _end(self, code: int, text: str) -> None:
        """Close from inside the session: wait briefly for the acks in flight, send the last one, close with `code`."""
        ledger = self.ledger
        with trio.move_on_after(CLOSE_TIMEOUT):
            if ledger is not None and self._inflight:
                with self._holding():
                    await ledger.wait_beyond(self._inflight[-1] - 1)
            if ledger is not None and ledger.durable > self._last_ack:
                with contextlib.suppress(ConnectionClosed):
                    await self._send_ack(ledger.durable)
            await self.ws.aclose(code, text)

    async def _telemetry(self, msg: Telemetry) -> None:
        ledger = self.ledger
        assert ledger is not None
        stats = self.server.stats
        seq = msg.seq
        if seq <= ledger.submitted:
            stats.resends += 1
            if seq <= ledger.durable:
                await self._send_ack(ledger.durable)
            return  # still in the pipeline: its ack follows when it is durable
        points = msg.points
        n = len(points)
        await self._submit(self._builder.lines(points), n, seq)
        stats.points_in += n
        ledger.last_seen = time.time()
        latest = ledger.latest
        for p in points:
            latest[p["measurement"]] = p
        server = self.server
        if server.broadcaster.has_telemetry_subscribers(self.name):
            server.broadcaster.telemetry(self.name, points)
        status = server.presence.status.get(self.name)
        if status is not None and status.state == "late":
            await server.presence.seen(self.name)

    async def _command_answer(self, msg: CommandAck | CommandResult) -> None:
        commands = self.server.commands
        if type(msg) is CommandAck:
            known = await commands.on_ack(self.name, msg.id)
        else:
            known = await commands.on_result(self.name, msg.id, msg.ok, msg.result, msg.error)
        if not known:
            detail = f"command {msg.id!r} was not sent to this device"
            await self._refuse(ProtocolError(ErrorCode.UNKNOWN_COMMAND, detail))

    def _offer_command(self, command: Command) -> bool:
        if len(self._commands) >= 2 * self.server.config.commands.max_queue:
            log.warning("command queue of the session full", extra=self._kv(command_id=command.id))
            return False
        self._commands.append(command)
        self._unpark()
        return True

    def durable_advanced(self) -> None:
        """The ledger's news that more is durable: the outbound task sends the ack."""
        self._unpark()

    def _unpark(self) -> None:
        task = self._parked
        if task is not None:
            self._parked = None
            trio.lowlevel.reschedule(task)

    def _abort_park(self, _raise_cancel: Any) -> trio.lowlevel.Abort:
        self._parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def _outbound(self) -> None:
        """Send command frames and acks as they become due; one task per session does both."""
        ledger = self.ledger
        assert ledger is not None
        commands = self.server.commands
        pending = self._commands
        try:
            while True:
                if pending:  # commands first: an ack a moment later costs nothing, a command's latency is seen
                    command = pending.pop(0)
                    if commands.is_open(command.id):
                        await self.ws.send_message(protocol.encode(command))
                        await commands.on_sent(self.name, command.id)
                elif ledger.durable > self._last_ack:
                    await self._send_ack(ledger.durable)
                else:
                    self._parked = trio.lowlevel.current_task()
                    await trio.lowlevel.wait_task_rescheduled(self._abort_park)
        except ConnectionClosed:
            self._scope.cancel()

    async def _refuse(self, exc: ProtocolError) -> None:
        """Answer one refused message with an error frame; close the session if they keep coming."""
        stats = self.server.stats
        stats.count_error(exc.code)
        log.info("message refused", extra=self._kv(reason=exc.code, seq=exc.seq))
        await self.ws.send_message(protocol.encode(protocol.Error(exc.code, exc.detail[:200], exc.seq)))
        ledger = self.ledger
        if exc.seq is not None and ledger is not None and exc.seq > ledger.submitted:
            # A refused batch is resolved: let the cumulative ack pass over it, in order.
            await self._submit("", 0, exc.seq)
        now = trio.current_time()
        errors = self._errors
        errors.append(now)
        while errors[0] < now - ERROR_WINDOW:
            del errors[0]
        if len(errors) > self.server.config.server.max_errors:
            self.reason = ErrorCode.TOO_MANY_ERRORS
            await self._close_with_error(ErrorCode.TOO_MANY_ERRORS, "too many refused messages")
            self._scope.cancel()

    async def _send_ack(self, seq: int) -> None:
        self._last_ack = max(self._last_ack, seq)
        await self.ws.send_message(protocol.encode_ack(seq))
        self.server.stats.acks_sent += 1

    def ping_due(self) -> bool:
        """Start a ping now unless one is still out; False once the session has ended (no more pings)."""
        nursery = self._nursery
        if nursery is None:
            return False
        if not self._pinging:
            self._pinging = True
            nursery.start_soon(self._ping, name=PING_TASK)
        return True

    async def _ping(self) -> None:
        cfg = self.server.config.presence
        try:
            started = trio.current_time()
            with trio.move_on_after(cfg.ping_timeout) as timeout:
                await self.ws.ping()
            if timeout.cancelled_caught and (self._holds or self._hold_end >= started):
                # Backpressure, not a dead device: its pong sits unread behind the telemetry we did not take.
                log.info("no pong while ingest is held back; keeping the device", extra=self._kv())
                return
            if timeout.cancelled_caught:
                self.reason = "ping_timeout"
                log.warning("device stopped answering pings", extra=self._kv(reason="ping_timeout"))
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self.ws.aclose(CloseCode.POLICY, "ping timeout")
                self._scope.cancel()
        except ConnectionClosed:
            self._scope.cancel()
        finally:
            self._pinging = False

    def stop_reading(self) -> None:
        """Stop taking telemetry (hub shutdown); acks keep flowing until `close`."""
        self._reader_scope.cancel()

    async def close(self, code: int, text: str, *, reason: str = "hub_shutdown") -> None:
        """Send the last ack due, close the WebSocket with `code`, and wait for the session to end."""
        if self.reason == "closed":
            self.reason = reason
        ledger = self.ledger
        with trio.move_on_after(CLOSE_TIMEOUT):
            if ledger is not None and ledger.durable > self._last_ack:
                with contextlib.suppress(ConnectionClosed):
                    await self._send_ack(ledger.durable)
            await self.ws.aclose(code, text)
        self._scope.cancel()
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self._done.wait()
