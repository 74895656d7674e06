"""The load generator process: many device connections, lean (wsproto, pre-encoded frames) or through `device_client`.

Run by `bench.run` as `python -m bench.gen SPEC.json`. It connects its devices and reports `ready`, then obeys
one command per stdin line: `go` (start sending), `drop` (reset every connection at once and reconnect), `status`
(report `status`: devices welcomed now, the last welcome's time), `stop` (stop sending, wait for the last acks,
report `result`), `exit`. With `ports`, device i connects to `ports[i % len]` first and, whenever its connection
ends or fails without being asked to, moves on to another of them (the failover scenario). Sending also stops by
itself after `duration` seconds; the whole process ends itself after `max_seconds`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import random
import resource
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, RejectConnection, Request, TextMessage
from wsproto.utilities import ProtocolError as WSProtocolError

from bench.jsonl import emit, raise_fd_limit, stdin_lines
from bench.wire import BASE_TS, client_frame, parse_ack, points_for, telemetry_template
from device_client import protocol
from hub.gctune import ALLOCATION_THRESHOLDS, tune_gc

__all__ = ["GenSpec", "LeanFleet", "SdkFleet", "main"]

#: Failed attempts in a row before a device counts as failed to connect (a refusal with a Retry-After is none).
CONNECT_ATTEMPTS = 3
#: A send blocked this long means the connection is stuck: it is reset (and the device reconnects).
SEND_STALL = 60.0
_RECV = 65536
_LINGER_RESET = struct.pack("ii", 1, 0)


@attrs.frozen
class GenSpec:
    """What one generator process does (written by the harness as JSON)."""

    host: str
    port: int
    tokens: tuple[str, ...]
    measurement: str
    points: int = 10  # points per telemetry message
    duration: float = 10.0  # seconds of sending after `go`; 0: until `stop`
    interval: float = 0.0  # seconds between messages of one device; 0: as fast as the ack window allows
    acks: bool = True  # False: the transport baseline, which never acks (no window, nothing to resend)
    client: str = "lean"  # "lean" or "sdk" (device_client)
    path: str = protocol.DEVICE_PATH
    local_address: str | None = None  # source address, to spread connections over 127.0.0.x
    local_addresses: tuple[str, ...] = ()  # if set: device i connects from local_addresses[i % len] instead
    ports: tuple[int, ...] = ()  # if set: device i starts on ports[i % len] and moves on after a loss (lean only)
    # Handshakes in progress at once. One generator is one source address, and the hub takes at most 64 handshakes
    # from one address at a time (server.max_handshakes_per_address): more would measure its refusals instead.
    connect_concurrency: int = 64
    connect_timeout: float = 30.0
    connect_attempts: int = CONNECT_ATTEMPTS  # failed attempts in a row before a device counts as failed
    ack_latency: bool = False  # time each message from its send to its ack (reported as percentiles)
    ready_deadline: float = 0.0  # report `ready` after this many seconds even if devices are still connecting
    drain_timeout: float = 30.0  # after sending stops: longest wait for the last acks
    max_seconds: float = 900.0

    @classmethod
    def load(cls, path: str) -> GenSpec:
        """Read a spec file."""
        data = json.loads(Path(path).read_text())
        data["tokens"] = tuple(data["tokens"])
        data["local_addresses"] = tuple(data.get("local_addresses", ()))
        data["ports"] = tuple(data.get("ports", ()))
        return cls(**data)


class _Device:
    """Connection and sequence state of one lean device."""

    __slots__ = (
        "acked",
        "back",
        "changed",
        "dropped",
        "index",
        "lock",
        "parts",
        "port",
        "retry_after",
        "scope",
        "sending",
        "sending_done",
        "seq",
        "settled",
        "source",
        "step",
        "stream",
        "token",
        "unacked",
        "welcomed",
        "window",
        "ws",
    )

    def __init__(self, token: str) -> None:
        self.token = token
        self.stream: trio.SocketStream | None = None
        self.ws: WSConnection | None = None
        self.seq = 0  # last seq used
        self.acked = 0
        self.index = 0  # messages made in this run: timestamps follow from it
        self.unacked: collections.deque[tuple[int, bytes, float]] = collections.deque()  # (seq, frame, sent at)
        self.changed = trio.Event()
        self.lock = trio.Lock()
        self.welcomed = trio.Event()
        self.window = 16
        self.parts: list[str] = []
        self.scope = trio.CancelScope()
        self.dropped = False
        self.back = False  # dropped by `drop` and not welcomed again yet
        self.sending_done = False
        self.sending = False  # its sender runs (it is welcomed)
        self.settled = False  # welcomed once, or failed for good: counted for `ready`
        self.retry_after: float | None = None  # the hub's Retry-After on the last refused handshake
        self.source: str | None = None  # the local address it connects from
        self.port = 0  # the port it connects to
        self.step = 1  # with several ports: how far it moves on after a loss


class _Refused(Exception):
    """The hub answered the upgrade with an HTTP error (and maybe a Retry-After in seconds)."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(str(status))
        self.retry_after = retry_after


def _retry_after(headers: Any) -> float | None:
    for name, value in headers:
        if name.lower() == b"retry-after":
            with contextlib.suppress(ValueError):
                return float(value)
    return None


class _Fleet:
    """What both generator kinds share: commands from stdin, counters, the result."""

    def __init__(self, spec: GenSpec) -> None:
        self.spec = spec
        self.go = trio.Event()
        self.exit = trio.Event()
        self.send_deadline = math.inf
        self.sender_scopes: set[trio.CancelScope] = set()
        self.settled = 0  # devices welcomed once or failed for good
        self.connected = 0
        self.failed = 0
        self.t_first = math.inf
        self.t_ready = 0.0
        self.ready_sent = False
        self.senders_done = 0
        self.all_sent = trio.Event()
        self.sent_msgs = 0
        self.acked_msgs = 0
        self.acked_points = 0
        self.t_go = 0.0
        self.t_sent = 0.0
        self.t_last_ack = 0.0
        self.errors: collections.Counter[str] = collections.Counter()
        self.lost = 0  # connections that ended without us asking
        self.refusals = 0  # handshakes answered with an HTTP error (e.g. 503 + Retry-After)
        self.latencies: list[float] = []  # seconds from send to ack, when the spec asks for them
        self.resent = 0
        self.commands = 0
        self.cpu_go = 0.0
        self.welcomed_now = 0  # devices with a live, welcomed connection
        self.t_welcome = 0.0  # the latest welcome

    def settle(self, ok: bool) -> None:
        """Count a device as connected (`ok`) or failed for good; emit `ready` after the last one."""
        self.settled += 1
        if ok:
            self.connected += 1
            self.t_ready = max(self.t_ready, time.monotonic())
        else:
            self.failed += 1
        if self.settled == len(self.spec.tokens) and not self.ready_sent:
            self._emit_ready(gave_up=False)

    def _emit_ready(self, *, gave_up: bool) -> None:
        self.ready_sent = True
        emit(
            "ready",
            devices=len(self.spec.tokens),
            connected=self.connected,
            failed=self.failed,
            gave_up=gave_up,  # the spec's ready_deadline passed with devices still trying
            t_first=self.t_first,
            t_ready=self.t_ready if not gave_up else time.monotonic(),
            refusals=self.refusals,
            errors=dict(self.errors),
            cpu_s=_cpu_self(),
        )

    async def ready_deadline(self) -> None:
        """Report `ready` with the counts so far once `spec.ready_deadline` seconds have passed (0: never)."""
        if self.spec.ready_deadline > 0:
            await trio.sleep(self.spec.ready_deadline)
            if not self.ready_sent:
                self._emit_ready(gave_up=True)

    def sender_done(self) -> None:
        """Count a device that will send no more; the last one ends the sending phase."""
        self.senders_done += 1
        if self.senders_done == len(self.spec.tokens):
            self.t_sent = time.monotonic()
            self.all_sent.set()

    def start(self) -> None:
        """`go`: start sending, for `duration` seconds if set."""
        if self.go.is_set():
            return
        self.t_go = time.monotonic()
        self.cpu_go = _cpu_self()
        if self.spec.duration > 0:
            self.send_deadline = trio.current_time() + self.spec.duration
        self.go.set()
        emit("started", t=self.t_go)

    def stop(self) -> None:
        """`stop`: send nothing more (what is in flight is still acked)."""
        self.send_deadline = trio.current_time()
        for scope in list(self.sender_scopes):
            scope.cancel()

    def counts(self) -> dict[str, int]:
        """Counters for `result`: acked_msgs, acked_points, outstanding (unacked messages), lost, resent, commands."""
        raise NotImplementedError

    async def drained(self) -> None:
        """Return once every sent message is acked."""
        raise NotImplementedError

    async def report(self) -> None:
        """Once every sender is done, wait (bounded) for the last acks and emit `result`."""
        await self.go.wait()
        await self.all_sent.wait()
        if self.spec.acks:
            with trio.move_on_after(self.spec.drain_timeout):
                await self.drained()
        counts = self.counts()
        emit(
            "result",
            devices=len(self.spec.tokens),
            connected=self.connected,
            failed=self.failed,
            points=self.spec.points,
            sent_msgs=self.sent_msgs,
            sent_points=self.sent_msgs * self.spec.points,
            drained=counts["outstanding"] == 0 or not self.spec.acks,
            t_go=self.t_go,
            t_sent=self.t_sent,
            t_last_ack=self.t_last_ack,
            errors=dict(self.errors),
            cpu_s=_cpu_self() - self.cpu_go,
            ack_latency=_latency_summary(self.latencies) if self.spec.ack_latency else None,
            **counts,
        )

    async def control(self) -> None:
        """Obey stdin commands until `exit` or EOF."""
        async for line in stdin_lines():
            if line == "go":
                self.start()
            elif line == "stop":
                self.stop()
            elif line == "drop":
                self.drop()
            elif line == "status":
                self.status()
            elif line == "exit":
                break
            else:
                emit("error", detail=f"unknown command {line!r}")
        self.exit.set()

    def drop(self) -> None:
        """`drop`: reset every connection at once."""
        emit("error", detail="drop is not supported by this generator")

    def status(self) -> None:
        """`status`: devices welcomed now (and when the last was), connections lost so far."""
        emit("status", t=time.monotonic(), welcomed_now=self.welcomed_now, t_welcome=self.t_welcome, lost=self.lost)


class LeanFleet(_Fleet):
    """Devices that speak the protocol with wsproto directly: pre-encoded frames, cumulative ack tracking."""

    def __init__(self, spec: GenSpec) -> None:
        super().__init__(spec)
        self.devices = [_Device(t) for t in spec.tokens]
        sources = spec.local_addresses or (spec.local_address,)
        self.ports = spec.ports or (spec.port,)
        for i, dev in enumerate(self.devices):
            dev.source = sources[i % len(sources)]
            dev.port = self.ports[i % len(self.ports)]
            if len(self.ports) > 1:  # the devices of one port spread over the others
                dev.step = 1 + (i // len(self.ports)) % (len(self.ports) - 1)
        self.limiter = trio.CapacityLimiter(spec.connect_concurrency)
        self.template = telemetry_template(spec.measurement, spec.points)
        self.hello = client_frame(protocol.encode(protocol.Hello(firmware="bench", model="lean")).encode())
        self.n_outstanding = 0
        self.no_outstanding = trio.Event()
        self.t_drop = 0.0
        self.to_come_back = 0
        self.t_back = 0.0

    def counts(self) -> dict[str, int]:
        """Counters for `result`."""
        return {
            "acked_msgs": self.acked_msgs,
            "acked_points": self.acked_points,
            "outstanding": self.n_outstanding,
            "lost": self.lost,
            "resent": self.resent,
            "commands": self.commands,
        }

    async def drained(self) -> None:
        """Return once every sent message is acked."""
        while self.n_outstanding:
            self.no_outstanding = trio.Event()
            await self.no_outstanding.wait()

    async def run_until_exit(self) -> None:
        """Run every device until `exit` (or stdin closes)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.control)
            for dev in self.devices:
                nursery.start_soon(self._device_main, dev)
            nursery.start_soon(self.report)
            nursery.start_soon(self.ready_deadline)
            await self.exit.wait()
            nursery.cancel_scope.cancel()

    # ---------------------------------------------------------------- connections

    def _next_port(self, dev: _Device) -> None:
        """Move on to another port."""
        dev.port = self.ports[(self.ports.index(dev.port) + dev.step) % len(self.ports)]

    async def _device_main(self, dev: _Device) -> None:
        failures = 0
        attempts = self.spec.connect_attempts
        while True:
            ok = False
            dev.retry_after = None
            try:
                ok = await self._session(dev)
            finally:
                if dev.stream is not None:
                    dev.stream.socket.close()
                    dev.stream = None
                if dev.welcomed.is_set():
                    self.welcomed_now -= 1
            if not dev.dropped and self.spec.ports:
                self._next_port(dev)
            if dev.dropped:
                dev.dropped = False
                continue  # a storm: reconnect at once, as a fleet whose network came back does
            if ok:
                self.lost += 1
                failures = 0
            elif dev.retry_after is None:  # refused with a Retry-After: the hub said when to come back, not a failure
                failures += 1
                if failures >= attempts:
                    if not dev.settled:
                        dev.settled = True
                        self.settle(False)
                        if not dev.sending_done:
                            dev.sending_done = True
                            self.sender_done()
                        return
                    failures = attempts - 1
            if dev.retry_after is not None:  # as device_client does: the hub's word, plus a little jitter
                await trio.sleep(dev.retry_after + random.uniform(0, 0.5))
            else:
                await trio.sleep(random.uniform(0, min(30.0, 0.2 * 2**failures)))

    async def _session(self, dev: _Device) -> bool:
        """One connection: handshake, hello, then read (and send) until it ends; whether it was welcomed."""
        spec = self.spec
        dev.welcomed = trio.Event()
        dev.parts = []
        self.t_first = min(self.t_first, time.monotonic())
        await self.limiter.acquire()
        held = True
        try:
            with trio.move_on_after(spec.connect_timeout) as timeout:
                try:
                    dev.stream = await trio.open_tcp_stream(spec.host, dev.port, local_address=dev.source)
                    dev.ws = WSConnection(ConnectionType.CLIENT)
                    auth = [(b"authorization", b"Bearer " + dev.token.encode())]
                    request = Request(host=f"{spec.host}:{dev.port}", target=spec.path, extra_headers=auth)
                    await dev.stream.send_all(dev.ws.send(request))
                    await self._accepted(dev)
                    await dev.stream.send_all(self.hello)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, WSProtocolError) as exc:
                    self.errors[f"connect:{type(exc).__name__}"] += 1
                    return False
                except _Refused as exc:
                    self.errors[f"http:{exc}"] += 1
                    self.refusals += 1
                    dev.retry_after = exc.retry_after
                    return False
            if timeout.cancelled_caught:
                self.errors["connect:timeout"] += 1
                return False
            async with trio.open_nursery() as nursery:
                dev.scope = nursery.cancel_scope
                nursery.start_soon(self._reader, dev)
                with trio.move_on_at(timeout.deadline):
                    await dev.welcomed.wait()
                self.limiter.release()
                held = False
                if not dev.welcomed.is_set():
                    self.errors["connect:no_welcome"] += 1
                    nursery.cancel_scope.cancel()
                    return False
                nursery.start_soon(self._sender, dev)
            return True
        finally:
            if held:
                self.limiter.release()

    async def _accepted(self, dev: _Device) -> None:
        assert dev.stream is not None and dev.ws is not None
        while True:
            data = await dev.stream.receive_some(_RECV)
            if not data:
                raise trio.BrokenResourceError("closed during the handshake")
            dev.ws.receive_data(data)
            for event in dev.ws.events():
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    raise _Refused(event.status_code, _retry_after(event.headers))

    def stop(self) -> None:
        """`stop`; a device between connections (no sender running) is done sending too."""
        super().stop()
        for dev in self.devices:
            if not dev.sending and not dev.sending_done:
                dev.sending_done = True
                self.sender_done()

    def drop(self) -> None:
        """Reset every open connection at once (RST, no close handshake); devices reconnect immediately."""
        self.t_drop = time.monotonic()
        count = 0
        for dev in self.devices:
            if dev.stream is not None and dev.welcomed.is_set():
                dev.dropped = dev.back = True
                count += 1
                sock = dev.stream.socket
                with contextlib.suppress(OSError):  # already gone: closing is all that is left
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                sock.close()
        self.to_come_back = count
        emit("dropped", t=self.t_drop, count=count, cpu_s=_cpu_self())
        if not count:
            emit("reconnected", t_drop=self.t_drop, t_back=self.t_drop, cpu_s=_cpu_self())

    # ---------------------------------------------------------------- reading

    async def _reader(self, dev: _Device) -> None:
        stream, ws = dev.stream, dev.ws
        assert stream is not None and ws is not None
        try:
            while True:
                data = await stream.receive_some(_RECV)
                if not data:
                    return
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, TextMessage):
                        if event.message_finished and not dev.parts:
                            await self._on_text(dev, event.data)
                        else:
                            dev.parts.append(event.data)
                            if event.message_finished:
                                text, dev.parts = "".join(dev.parts), []
                                await self._on_text(dev, text)
                    elif isinstance(event, Ping):
                        await self._send(dev, ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        self.errors[f"closed:{event.code}"] += 1
                        await self._send(dev, ws.send(event.response()))
                        return
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, WSProtocolError):
            return
        finally:
            dev.scope.cancel()

    async def _on_text(self, dev: _Device, text: str) -> None:
        seq = parse_ack(text)
        if seq is not None:
            self._on_ack(dev, seq)
            return
        msg = json.loads(text)
        kind = msg.get("type")
        if kind == "welcome":
            await self._on_welcome(dev, msg)
        elif kind == "command":
            cid = msg["id"]
            answer = client_frame(protocol.encode(protocol.CommandAck(cid)).encode()) + client_frame(
                protocol.encode(protocol.CommandResult(cid, True, {"pong": True})).encode()
            )
            await self._send(dev, answer)
            self.commands += 1
        elif kind == "error":
            self.errors[f"error:{msg.get('code')}"] += 1

    def _on_ack(self, dev: _Device, seq: int) -> None:
        if seq <= dev.acked:
            return
        dev.acked = seq
        done = 0
        unacked = dev.unacked
        now = time.monotonic()
        record = self.latencies.append if self.spec.ack_latency else None
        while unacked and unacked[0][0] <= seq:
            _seq, _frame, sent = unacked.popleft()
            if record is not None:
                record(now - sent)
            done += 1
        if done:
            self.acked_msgs += done
            self.acked_points += done * self.spec.points
            self.n_outstanding -= done
            self.t_last_ack = time.monotonic()
            if not self.n_outstanding:
                self.no_outstanding.set()
        dev.changed.set()
        dev.changed = trio.Event()

    async def _on_welcome(self, dev: _Device, msg: dict[str, Any]) -> None:
        dev.window = int(msg["window"])
        ack = int(msg["ack"])
        self._on_ack(dev, ack)
        dev.seq = max(dev.seq, ack)
        for _seq, frame, _sent in list(dev.unacked):
            await self._send(dev, frame)
            self.resent += 1
        dev.welcomed.set()
        self.welcomed_now += 1
        self.t_welcome = time.monotonic()
        if not dev.settled:
            dev.settled = True
            self.settle(True)
        if dev.back:
            dev.back = False
            self.to_come_back -= 1
            self.t_back = max(self.t_back, time.monotonic())
            if not self.to_come_back:
                emit("reconnected", t_drop=self.t_drop, t_back=self.t_back, cpu_s=_cpu_self())

    # ---------------------------------------------------------------- sending

    async def _send(self, dev: _Device, data: bytes) -> None:
        stream = dev.stream
        if stream is None:
            raise trio.ClosedResourceError("not connected")
        # Never cancelled once called: a frame counted as sent is sent, and a partial frame would corrupt the
        # connection for the resends. Senders are cancelled at their own checkpoints instead.
        with trio.CancelScope(shield=True):
            async with dev.lock:
                with trio.move_on_after(SEND_STALL) as stall:
                    await stream.send_all(data)
            if stall.cancelled_caught:
                self.errors["send:stalled"] += 1
                stream.socket.close()
                raise trio.BrokenResourceError("send stalled")

    async def _sender(self, dev: _Device) -> None:
        await self.go.wait()
        if dev.sending_done:
            return
        spec = self.spec
        template, ppm, acks, interval = self.template, spec.points, spec.acks, spec.interval
        with trio.CancelScope(deadline=self.send_deadline) as scope:
            self.sender_scopes.add(scope)
            dev.sending = True
            try:
                next_at = trio.current_time() + (random.uniform(0, interval) if interval else 0.0)
                while True:
                    await trio.lowlevel.checkpoint()  # where a deadline or `stop` ends the loop
                    if acks:
                        while len(dev.unacked) >= dev.window:
                            await dev.changed.wait()
                    if interval:
                        await trio.sleep_until(next_at)
                        next_at += interval
                    dev.seq += 1
                    ts0 = BASE_TS + dev.index * ppm
                    dev.index += 1
                    frame = client_frame(template % (dev.seq, *range(ts0, ts0 + ppm)))
                    if acks:
                        dev.unacked.append((dev.seq, frame, time.monotonic()))
                        self.n_outstanding += 1
                    self.sent_msgs += 1
                    try:
                        await self._send(dev, frame)
                    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                        dev.scope.cancel()  # the reader ends too; the frame is resent after the reconnect
                        await trio.sleep_forever()
            finally:
                self.sender_scopes.discard(scope)
                dev.sending = False
        if scope.cancelled_caught:
            dev.sending_done = True
            self.sender_done()


def _latency_summary(seconds: list[float]) -> dict[str, float | int]:
    """Count, p50, p99 and max of ack latencies, in milliseconds."""
    ms = sorted(x * 1000 for x in seconds)
    if not ms:
        return {"count": 0}

    def at(q: float) -> float:
        return ms[max(0, math.ceil(q * len(ms)) - 1)]

    return {"count": len(ms), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": ms[-1]}


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class SdkFleet(_Fleet):
    """Devices built on `device_client.DeviceClient`: the SDK's own batching, outbox, acks and commands."""

    def __init__(self, spec: GenSpec) -> None:
        super().__init__(spec)
        self.clients: list[Any] = []

    def counts(self) -> dict[str, int]:
        """Counters for `result`, from the clients' own statistics."""
        acked_points = sum(c.stats.points_acked for c in self.clients)
        return {
            "acked_msgs": sum(c.stats.batches_acked for c in self.clients),
            "acked_points": acked_points,
            "outstanding": sum(c.pending for c in self.clients),
            "lost": sum(c.stats.reconnects for c in self.clients),
            "resent": sum(c.stats.resent for c in self.clients),
            "commands": sum(c.stats.commands_run for c in self.clients),
        }

    async def drained(self) -> None:
        """Return once every client has its batches acked (the SDK reports no ack times: this is the last)."""
        async with trio.open_nursery() as nursery:
            for client in self.clients:
                nursery.start_soon(client.wait_acked)
        self.t_last_ack = time.monotonic()

    async def run_until_exit(self) -> None:
        """Run every device until `exit` (or stdin closes)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.control)
            for token in self.spec.tokens:
                nursery.start_soon(self._device, token)
            nursery.start_soon(self.report)
            await self.exit.wait()
            nursery.cancel_scope.cancel()

    async def _device(self, token: str) -> None:
        from device_client import DeviceClient

        spec = self.spec
        url = f"ws://{spec.host}:{spec.port}{spec.path}"
        client = DeviceClient(
            url,
            token,
            firmware="bench",
            model="sdk",
            batch_points=spec.points,
            outbox_limit=64,
            backoff_initial=0.1,
            backoff_max=2.0,
            connect_timeout=spec.connect_timeout,
            close_timeout=1.0,
        )

        @client.command("ping")
        async def ping(args: dict[str, Any]) -> dict[str, Any]:
            return {"pong": True}

        self.clients.append(client)
        self.t_first = min(self.t_first, time.monotonic())
        async with client:
            with trio.move_on_after(spec.connect_timeout) as timeout:
                await client.wait_connected()
            self.settle(not timeout.cancelled_caught)
            await self.go.wait()
            if timeout.cancelled_caught:
                self.sender_done()
                await self.exit.wait()
                return
            index = 0
            with trio.CancelScope(deadline=self.send_deadline) as scope:
                self.sender_scopes.add(scope)
                try:
                    while True:
                        ts0 = BASE_TS + index * spec.points
                        index += 1
                        await client.send_batch(points_for(spec.measurement, ts0, spec.points))
                        self.sent_msgs += 1
                        if spec.interval:
                            await trio.sleep(spec.interval)
                finally:
                    self.sender_scopes.discard(scope)
            self.sender_done()
            await self.exit.wait()


async def _main(spec: GenSpec) -> None:
    fleet: LeanFleet | SdkFleet = SdkFleet(spec) if spec.client == "sdk" else LeanFleet(spec)
    with trio.move_on_after(spec.max_seconds):
        await fleet.run_until_exit()


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m bench.gen SPEC.json`."""
    args = sys.argv[1:] if argv is None else argv
    raise_fd_limit()
    tune_gc(ALLOCATION_THRESHOLDS)  # the harness adds no collector pauses of its own to what it measures
    spec = GenSpec.load(args[0])
    trio.run(_main, spec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
