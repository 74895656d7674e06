"""The device endpoint: handshake checks before the upgrade, then one session per device."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
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
    Desired,
    ErrorCode,
    Hello,
    ProtocolError,
    Report,
    ReportAck,
    Telemetry,
    encode_ack,
)
from device_client.twin import TwinError
from hub.config import HubConfig
from hub.devices._session import Close, HubConnection, Refused, Resent
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
    CommandService,
    DeviceLedger,
    Ledgers,
    Presence,
    RegistryStore,
    StoreUnavailable,
    TwinChange,
    TwinRecord,
    TwinService,
    reported_point,
)
from hub.ingest import Batch, LineBuilder, Pipeline, TelemetryReader, reader_available
from hub.ratelimit import DeviceRate, Rate, Throttle, Verdict
from hub.stats import Stats

__all__ = ["DeviceServer", "DeviceSession"]

log = logging.getLogger("hub.session")

#: Seconds between checks of the registry for devices revoked while connected.
REVOKE_CHECK_EVERY = 2.0
#: Longest wait for a peer to answer our close frame.
CLOSE_TIMEOUT = 2.0
#: A device is idle after max(server.idle_timeout, this x the reporting interval it declared) without a message.
IDLE_FACTOR = 3.0
#: The idle clock runs up to this share longer than the idle time: a device is closed between 1 and 1.125 times it
#: after its last message (the clock is moved once per eighth of it, not once per message).
IDLE_SLACK = 0.125
#: Error code of the notice that a device exceeds its rates (sent without a seq: nothing is refused).
RATE_LIMITED = ErrorCode.RATE_LIMITED.value
#: Names of a session's tasks (a shared string: trio would otherwise build one per task).
OUTBOUND_TASK = "device-outbound"
PING_TASK = "device-ping"


class DeviceServer:
    """The /v1/device endpoint: authenticates devices and runs a `DeviceSession` per device."""

    path = protocol.DEVICE_PATH
    name = "device"
    credential = "device token"
    bearer_required = True

    def __init__(
        self,
        config: HubConfig,
        registry: RegistryStore,
        ledgers: Ledgers,
        pipeline: Pipeline,
        presence: Presence,
        stats: Stats,
        commands: CommandService,
        broadcaster: Broadcaster,
        twins: TwinService,
    ) -> None:
        self.config = config
        self.commands = commands
        self.twins = twins
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

    def refuse_origin(self, origin: bytes | None, host: bytes | None) -> tuple[str, str] | None:
        """Devices are not browsers: any Origin header is refused (this blocks cross-site WebSocket hijacking)."""
        if origin is None:
            return None
        return "origin_present", "browsers may not connect to the device endpoint"

    async def authenticate(self, token: str) -> Identity | None:
        """The device a token belongs to (SQLite: checked on the loop, one indexed read and one hash)."""
        try:
            name = await self.registry.authenticate(token)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc
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
            try:
                revoked = await self.registry.revoked_names()
            except StoreUnavailable as exc:  # Redis away: try again next time
                log.warning("cannot read revoked devices", extra={"kv": {"error": str(exc)}})
                continue
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

    def session_epoch(self, name: str) -> int | None:
        """The epoch of the device's session here, if it has one."""
        session = self.sessions.get(name)
        return None if session is None else session.epoch

    def superseded(self, name: str, epoch: int) -> None:
        """A session `epoch` of the device started on another hub: close an older one here (4000, replaced)."""
        session = self.sessions.get(name)
        if session is not None and session.epoch < epoch and self._tasks is not None:
            log.info("device connected to another hub: closing its session here", extra=session._kv(reason="replaced"))
            self._tasks.start_soon(
                partial(session.close, CloseCode.REPLACED, "replaced by a new connection", reason="replaced")
            )

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


class DeviceSession:
    """One authenticated device connection: drives its `HubConnection` with the WebSocket, the pipeline and trio."""

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
        cfg = server.config
        self.conn = HubConnection(
            cfg.limits,
            window=cfg.server.window,
            max_errors=cfg.server.max_errors,
            max_offers=2 * cfg.commands.max_queue,
            read=TelemetryReader(name, cfg.limits).read if reader_available() else None,
            compression=cfg.server.compression,
            ack_interval=cfg.server.ack_interval,
        )
        self._builder = LineBuilder(name)  # for the frames the reader leaves to `decode`
        self._throttle = Throttle(server.device_rate(name), cfg.server.throttle_close_after)
        self._holds = 0  # > 0 while the session deliberately reads nothing (window, rate, pipeline backpressure)
        self._hold_end = -math.inf  # when the latest hold ended
        self._parked: trio.lowlevel.Task | None = None  # the outbound task, while it waits for work
        self._parked_until = math.inf  # ... or until a held-back ack is due (`HubConnection.ack_held`)
        # The outbound task runs only while there is work now and then: started by the first work, it ends when a
        # ping finds it waited a whole ping interval (an idle device costs no task of its own).
        self._sending = False  # the outbound task exists
        self._sent_since_ping = False  # it sent something since the last ping
        self._retire = False  # it is to end once it finds nothing to send
        self._nursery: trio.Nursery | None = None  # the session's own tasks, while they run
        self._pinging = False
        self._reader_scope = trio.CancelScope()
        self._reading_stopped = False  # `stop_reading` was called (so a cancelled read is no idle timeout)
        self._scope = trio.CancelScope()
        self._done = trio.Event()

    def _kv(self, **extra: object) -> dict[str, dict[str, object]]:
        return {"kv": {"device": self.name, "epoch": self.epoch, "remote": self.remote, **extra}}

    async def run(self) -> None:
        """Serve the session until the peer leaves, it is replaced, or the hub closes it."""
        try:
            with self._scope:
                hello = await self._receive_hello()
                if hello is None or not await self._start(hello):
                    return
            if self._scope.cancelled_caught:
                return
            ledger = self.ledger
            assert ledger is not None  # `_start` opened it
            try:
                async with trio.open_nursery() as nursery:
                    # From here the nursery's scope is the session's (a live scope costs each connection memory);
                    # no checkpoint since the one above: a cancel asked meanwhile is carried over, not lost.
                    asked, self._scope = self._scope, nursery.cancel_scope
                    if asked.cancel_called:
                        self._scope.cancel()
                    self._nursery = nursery
                    try:
                        ledger.listener = self
                        self.server.schedule_ping(self)
                        self.server.commands.attach(self.name, self._offer_command)
                        if self.conn.desired_sent is not None:
                            self.server.twins.attach(self.name, self._push_desired)
                            nursery.start_soon(self._sync_twin)  # a slow store does not hold telemetry back
                        await self._read()
                        if not self.server.closing:
                            nursery.cancel_scope.cancel()
                        else:  # shutdown: acks still go out (the outbound task starts on demand) until `close`
                            await trio.sleep_forever()
                    finally:
                        self._nursery = None  # before the nursery closes: no ping may start in it from now
            finally:
                if ledger.listener is self:
                    ledger.listener = None
                self.server.commands.detach(self.name, self._offer_command)
                self.server.twins.detach(self.name, self._push_desired)
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
            self.conn.connection_lost()
            if self.server.sessions.get(self.name) is self:
                del self.server.sessions[self.name]
                self.server.stats.connections -= 1
            self._done.set()
            if self.ws.closed is not None and self.ws.closed.code == CloseCode.TOO_BIG:
                # Once the session is over (offline, replaceable): trio-websocket left the TCP connection open.
                await close_stream(self.ws, CLOSE_TIMEOUT)

    async def _receive_hello(self) -> Hello | None:
        with trio.move_on_after(self.server.config.server.hello_timeout):
            try:
                text = await self.ws.get_message()
            except ConnectionClosed:
                await self._closed_by_peer_or_wire()
                return None
            event = self.conn.receive(text, trio.current_time())
            if isinstance(event, Hello):
                return event
            assert isinstance(event, Refused) and event.close is not None
            await self._close(event.close)
            return None
        await self._close(self.conn.hello_timed_out())
        return None

    async def _close(self, close: Close) -> None:
        """Close as the session decided: count and log its error, send its error frame, close with its code."""
        if close.error is not None:
            log.warning("device refused", extra=self._kv(reason=close.error.value))
            self.server.stats.count_error(close.error.value)
        with trio.move_on_after(CLOSE_TIMEOUT):
            if close.frame is not None:
                with contextlib.suppress(ConnectionClosed):
                    await self.ws.send_message(close.frame)
            await self.ws.aclose(close.code, close.reason)

    async def _start(self, hello: Hello) -> bool:
        server = self.server
        cfg = server.config
        async with server.device_lock(self.name):
            old = server.sessions.get(self.name)
            if old is not None:
                await old.close(CloseCode.REPLACED, "replaced by a new connection", reason="replaced")
            # Before the check of `closing`: with a remote registry this awaits, and shutdown may begin meanwhile.
            try:
                self.epoch, acked = await server.registry.begin_session(self.name)
            except StoreUnavailable as exc:  # no epoch without the state store: the device comes back later
                log.warning("session not started: no state store", extra=self._kv(error=str(exc)))
                self.conn.close()
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self.ws.aclose(CloseCode.TRY_LATER, "state store unavailable; retry later")
                return False
            if server.closing:
                self.conn.close()
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self.ws.aclose(CloseCode.GOING_AWAY, "hub shutting down")
                return False
            self.ledger = server.ledgers.get(self.name, acked)
            server.sessions[self.name] = self
            server.stats.connections += 1
            server.stats.connects += 1
            # Before any checkpoint: a close from another task finds the session open.
            welcome = self.conn.welcome(
                self.name,
                self.epoch,
                self.ledger,
                server.inflight(self.name),
                ping_interval=cfg.presence.ping_interval,
                max_message_bytes=cfg.server.max_message_bytes,
            )
        if self._ticket is not None:
            # Before the send: a device that got its welcome may open its next connection at once (a fleet behind
            # one address, keeping to its handshake bound), and must find this place free, not be refused 429.
            self._ticket.admitted()
            self._ticket = None
        await self.ws.send_message(welcome)
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
        interval = self.conn.hello.interval if self.conn.hello is not None else 0.0
        return max(idle, IDLE_FACTOR * interval) if idle > 0 else math.inf

    def _idle_rearm(self) -> float:
        """How far ahead the idle clock is set when it is moved: the idle time and its slack (`IDLE_SLACK`)."""
        return self.idle_timeout() * (1 + IDLE_SLACK)

    async def _read_loop(self) -> None:
        stats = self.server.stats
        idle = self.idle_timeout()
        rearm = self._idle_rearm()
        # One scope for reading, all session long: `stop_reading` cancels it, its deadline is the idle clock (moved,
        # never re-made: a live scope costs its session memory). It is moved on only when less than `idle` is left
        # (a move costs about 1.5 us; one per message was 4-6% of the loop under load); holds stop it (`_holding`).
        # The session reads its socket itself (`DirectReader`): a message costs one scheduling round, not two.
        with self._reader_scope as waiting, DirectReader(self.ws) as reader:
            waiting.deadline = trio.current_time() + rearm
            while True:
                now = trio.current_time()
                if waiting.deadline < now + idle:
                    waiting.deadline = now + rearm
                try:
                    text = await reader.next()
                except ConnectionClosed:
                    await self._closed_by_peer_or_wire()
                    return
                stats.messages_in += 1
                if type(text) is bytes:  # compressed telemetry (or a refused binary frame)
                    stats.compressed_in += 1
                    stats.compressed_bytes_in += len(text)
                points = await self._dispatch(text)
                verdict = self._throttle.charge(1, points, trio.current_time())
                if verdict.delay and not await self._throttled(verdict):
                    return
        if self._reading_stopped:
            return
        self.reason = "idle"
        log.info("device idle: closing", extra=self._kv(reason="idle", seconds=idle))
        await self._end(CloseCode.GOING_AWAY, "idle timeout")

    async def _closed_by_peer_or_wire(self) -> None:
        """The connection closed while reading: say why if the hub closed it (too big, unparsable frames)."""
        reason = self.ws.closed
        code = reason.code if reason is not None else None
        failure = parse_failure(self.ws)
        why = "disconnected"
        if failure is not None:
            why = PARSE_FAILURE_REASONS.get(failure[0], "protocol_error")
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
        event = self.conn.receive(text, trio.current_time())
        if type(event) is Batch:
            await self._batch(event)
            return event.n
        if type(event) is Telemetry:
            await self._telemetry(event)
            return len(event.points)
        await _ON_EVENT[type(event)](self, event)
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
        """Mark a deliberate pause in reading: pongs cannot be read meanwhile, so pings do not count; no idle clock."""
        self._holds += 1
        reading = self._reader_scope
        reading.deadline = math.inf
        try:
            yield
        finally:
            self._holds -= 1
            self._hold_end = now = trio.current_time()
            if self._holds == 0:
                reading.deadline = now + self._idle_rearm()

    async def _make_room(self) -> None:
        """Read nothing more until fewer than `server.window` batches of this device wait for their ack."""
        ledger = self.ledger
        assert ledger is not None
        conn = self.conn
        self.server.stats.window_waits += 1
        log.debug("window full: waiting for acks", extra=self._kv(inflight=conn.window))
        with self._holding():
            while conn.window_full():
                oldest = conn.oldest_inflight
                assert oldest is not None
                await ledger.wait_beyond(oldest - 1)

    async def _submit(self, text: str, n: int, seq: int) -> None:
        """Hand batch `seq` to the pipeline once the window has room for it (both may make this session wait)."""
        ledger = self.ledger
        assert ledger is not None
        if self.conn.window_full():
            await self._make_room()
        pipeline = self.server.pipeline
        if not pipeline.try_submit(text, n, (ledger, seq)):
            with self._holding():
                await pipeline.submit(text, n, (ledger, seq))
        self.conn.submitted(seq)

    async def _end(self, code: int, text: str) -> None:
        """Close from inside the session: wait briefly for the acks in flight, send the last one, close with `code`."""
        ledger = self.ledger
        conn = self.conn
        conn.close()
        with trio.move_on_after(CLOSE_TIMEOUT):
            newest = conn.newest_inflight
            if ledger is not None and newest is not None:
                with self._holding():
                    await ledger.wait_beyond(newest - 1)
            ack = conn.ack_due()
            if ack is not None:
                with contextlib.suppress(ConnectionClosed):
                    await self._send_ack(ack)
            await self.ws.aclose(code, text)

    async def _batch(self, batch: Batch) -> None:
        """New telemetry the reader took: its lines are built, its points made dicts only where they are kept."""
        ledger = self.ledger
        assert ledger is not None
        n = batch.n
        await self._submit(batch.lines, n, batch.seq)
        self.server.stats.points_in += n
        ledger.last_seen = time.time()
        ledger.latest.update(batch.latest())
        server = self.server
        if server.broadcaster.has_telemetry_subscribers(self.name):
            server.broadcaster.telemetry(self.name, batch.points())
        await self._seen()

    async def _telemetry(self, msg: Telemetry) -> None:
        ledger = self.ledger
        assert ledger is not None
        points = msg.points
        n = len(points)
        await self._submit(self._builder.lines(points), n, msg.seq)
        self.server.stats.points_in += n
        ledger.last_seen = time.time()
        latest = ledger.latest
        for p in points:
            latest[p["measurement"]] = p
        server = self.server
        if server.broadcaster.has_telemetry_subscribers(self.name):
            server.broadcaster.telemetry(self.name, points)
        await self._seen()

    async def _seen(self) -> None:
        server = self.server
        status = server.presence.status.get(self.name)
        if status is not None and status.state == "late":
            await server.presence.seen(self.name)

    async def _resent(self, event: Resent) -> None:
        self.server.stats.resends += 1
        if event.ack is not None:
            await self._send_ack(event.ack)

    async def _command_answer(self, msg: CommandAck | CommandResult) -> None:
        commands = self.server.commands
        if type(msg) is CommandAck:
            known = await commands.on_ack(self.name, msg.id)
        else:
            assert isinstance(msg, CommandResult)
            known = await commands.on_result(self.name, msg.id, msg.ok, msg.result, msg.error)
        if not known:
            detail = f"command {msg.id!r} was not sent to this device"
            await self._refused(self.conn.refuse(ProtocolError(ErrorCode.UNKNOWN_COMMAND, detail), trio.current_time()))

    async def _refused(self, event: Refused) -> None:
        """Answer one refused message with its error frame; close the session if the session says so."""
        exc = event.error
        self.server.stats.count_error(exc.code.value)
        log.info("message refused", extra=self._kv(reason=exc.code.value, seq=exc.seq))
        if event.frame is not None:
            await self.ws.send_message(event.frame)
        if event.resolve is not None:
            # A refused batch is resolved: let the cumulative ack pass over it, in order.
            await self._submit("", 0, event.resolve)
        if event.close is not None:
            if event.close.error is not None:
                self.reason = event.close.error.value
            elif exc.code is ErrorCode.TOO_LARGE:  # a compressed frame inflating past the limit: as a big text frame
                self.reason = "too_big"
                limit = self.server.config.server.max_message_bytes
                log.warning(
                    "compressed message too big: connection closed", extra=self._kv(reason="too_big", limit=limit)
                )
            await self._close(event.close)
            self._scope.cancel()

    # ------------------------------------------------------------------ twin

    async def _sync_twin(self) -> None:
        """The device uses the twin: send the desired document if its hello named another version, note the one it
        applied."""
        hello = self.conn.hello
        assert hello is not None and hello.desired_version is not None
        twins = self.server.twins
        try:
            rec = await twins.get(self.name)
            untouched = self.conn.desired_sent == hello.desired_version  # no change was pushed since the attach
            if untouched and rec.desired_version and rec.desired_version != hello.desired_version:
                self._push_desired(TwinChange(self.name, "desired", rec.desired_version, {}, rec), whole=True)
            if rec.applied_version != hello.desired_version:
                await twins.report(self.name, {}, hello.desired_version)
        except StoreUnavailable as exc:  # the device gets its document at its next connection, or the next change
            log.warning("twin not read: no state store", extra=self._kv(error=str(exc)))

    def _push_desired(self, change: TwinChange, *, whole: bool = False) -> None:
        """The desired document changed (or the device needs it whole): queue it for the outbound task."""
        if self.conn.offer_desired(change.version, change.record.desired, change.patch, whole=whole):
            self._unpark()

    async def _report(self, msg: Report) -> None:
        """A twin report: store it, write the reported document as a point, ack it (or refuse it: bad_report)."""
        server = self.server
        try:
            rec, changed = await server.twins.report(self.name, msg.patch, msg.desired_version)
        except TwinError as exc:
            error = ProtocolError(ErrorCode.BAD_REPORT, exc.detail)
            await self._refused(self.conn.refuse(error, trio.current_time(), report=msg.id))
            return
        except StoreUnavailable as exc:  # no ack: the device sends the report again on its next connection
            log.warning("twin report not stored: no state store", extra=self._kv(error=str(exc)))
            return
        if changed:
            await self._reported(rec, msg.patch)
        await self.ws.send_message(protocol.encode(ReportAck(msg.id, rec.reported_version)))

    async def _reported(self, rec: TwinRecord, patch: Mapping[str, object]) -> None:
        """A reported document changed: presence takes a new interval at once; the document goes in as a point
        (held back like telemetry while the pipeline is full)."""
        server = self.server
        interval = patch.get("interval")
        if isinstance(interval, int | float) and not isinstance(interval, bool) and 0 <= interval <= 604_800:
            server.presence.set_interval(self.name, self.epoch, float(interval))
        point = reported_point(rec.reported, int(rec.reported_at * 1000))
        if point is None:
            return
        text = self._builder.lines([point])
        if not server.pipeline.try_submit(text, 1):
            with self._holding():
                await server.pipeline.submit(text, 1)

    def _offer_command(self, command: Command) -> bool:
        """The command service's `Sender`: write the frame now if it may go out at once (`send_now`: no round of
        the outbound task), else queue it for the outbound task."""
        nursery = self._nursery
        if (
            nursery is not None
            and self.conn.may_send_at_once()
            and send_now(self.ws, protocol.encode(command), nursery)
        ):
            self._sent_since_ping = True
            self.server.commands.on_sent(self.name, command.id)
            return True
        if not self.conn.offer(command):
            log.warning("command queue of the session full", extra=self._kv(command_id=command.id))
            return False
        self._unpark()
        return True

    def durable_advanced(self) -> None:
        """The ledger's news that more is durable: the ack goes out now, written here when it may go out at once
        (`send_now`: one write instead of a step of the outbound task), else the outbound task sends it (at once,
        or when it is due)."""
        nursery = self._nursery
        if nursery is not None:
            now = trio.current_time()
            seq = self.conn.ack_at_once(now)
            if seq is not None and send_now(self.ws, encode_ack(seq), nursery):
                self.conn.ack_written(seq, now)
                self._sent_since_ping = True
                self.server.stats.acks_sent += 1
                return
        if (
            self._parked is not None
            and self._parked_until < math.inf
            and self.conn.ack_held(trio.current_time()) is not None
        ):
            return  # the outbound task wakes for a held-back ack anyway, and sends the newest one then
        self._unpark()

    def _unpark(self) -> None:
        """Work for the outbound task: wake it, or start it."""
        task = self._parked
        if task is not None:
            self._parked = None
            trio.lowlevel.reschedule(task)
        elif not self._sending and self._nursery is not None:
            self._sending = True
            self._nursery.start_soon(self._outbound, name=OUTBOUND_TASK)

    def _abort_park(self, _raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def _outbound(self) -> None:
        """Send command frames and acks as they become due; one task per session does both, while there is work."""
        commands = self.server.commands
        conn = self.conn
        try:
            while True:
                now = trio.current_time()
                item = conn.next_outbound(now)
                if item is None:
                    held = conn.ack_held(now)
                    if self._retire and held is None:  # a whole ping interval without work (see `ping_due`)
                        return
                    self._parked = trio.lowlevel.current_task()
                    if held is None:
                        await trio.lowlevel.wait_task_rescheduled(self._abort_park)
                        continue
                    self._parked_until = held
                    try:
                        with trio.move_on_at(held):
                            await trio.lowlevel.wait_task_rescheduled(self._abort_park)
                    finally:
                        self._parked_until = math.inf
                    continue
                self._sent_since_ping = True
                if isinstance(item, str):
                    await self._send_ack(item)
                elif isinstance(item, Desired):
                    await self.ws.send_message(protocol.encode(item))
                elif commands.is_open(item.id):
                    await self.ws.send_message(protocol.encode(item))
                    commands.on_sent(self.name, item.id)
        except ConnectionClosed:
            self._scope.cancel()
        finally:
            self._sending = self._retire = False

    async def _send_ack(self, text: str) -> None:
        await self.ws.send_message(text)
        self.server.stats.acks_sent += 1

    def ping_due(self) -> bool:
        """Start a ping now unless one is still out; False once the session has ended (no more pings)."""
        nursery = self._nursery
        if nursery is None:
            return False
        parked = self._parked
        if parked is not None and not self._sent_since_ping:  # idle for a ping interval: let the task go
            self._retire = True
            self._parked = None
            trio.lowlevel.reschedule(parked)
        self._sent_since_ping = False
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
                self.conn.close()
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self.ws.aclose(CloseCode.POLICY, "ping timeout")
                self._scope.cancel()
        except ConnectionClosed:
            self._scope.cancel()
        finally:
            self._pinging = False

    def stop_reading(self) -> None:
        """Stop taking telemetry (hub shutdown); acks keep flowing until `close`."""
        self._reading_stopped = True
        self._reader_scope.cancel()

    async def close(self, code: int, text: str, *, reason: str = "hub_shutdown") -> None:
        """Send the last ack due, close the WebSocket with `code`, and wait for the session to end."""
        if self.reason == "closed":
            self.reason = reason
        conn = self.conn
        conn.close()
        with trio.move_on_after(CLOSE_TIMEOUT):
            ack = conn.ack_due()
            if ack is not None:
                with contextlib.suppress(ConnectionClosed):
                    await self._send_ack(ack)
            await self.ws.aclose(code, text)
        self._scope.cancel()
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self._done.wait()


#: What the session does with each event of its `HubConnection` (new telemetry takes the fast path in `_dispatch`).
#: The event argument is untyped: each handler takes the event class it is registered for.
_ON_EVENT: dict[type, Callable[[DeviceSession, Any], Awaitable[None]]] = {
    Resent: DeviceSession._resent,
    CommandAck: DeviceSession._command_answer,
    CommandResult: DeviceSession._command_answer,
    Report: DeviceSession._report,
    Refused: DeviceSession._refused,
}
