"""DeviceClient against a small real WebSocket hub on loopback that speaks the device protocol."""

from __future__ import annotations

import contextlib
import itertools
import math
import socket
from functools import partial
from typing import Any

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from device_client import DeviceClient, OutboxFull, ProtocolError, backoff_delay, device_url
from device_client.protocol import (
    DEVICE_PATH,
    Ack,
    CloseCode,
    Command,
    CommandAck,
    CommandResult,
    Error,
    ErrorCode,
    Hello,
    Telemetry,
    Welcome,
    decode,
    encode,
)

TS = 1_700_000_000_000
FAST = {"backoff_initial": 0.01, "backoff_max": 0.05}


@attrs.define
class Plan:
    """How the fake hub treats one connection."""

    durable: bool = True  # keep the batches (and so re-ack them later)
    ack: bool = True  # send acks
    close_after: int | None = None  # close after this many telemetry messages
    close_code: int = CloseCode.GOING_AWAY
    ping_every: float | None = None  # ping the device this often (seconds), as the real hub does
    hold: float | None = None  # close (with close_code) this many seconds after the welcome


@attrs.define
class Conn:
    """What the fake hub saw on one connection."""

    device: str
    headers: dict[bytes, bytes]
    hello: Hello | None = None
    received: list[int] = attrs.field(factory=list)
    max_inflight: int = 0
    ws: Any = None
    frames: list[str] = attrs.field(factory=list)  # message types after the hello, in order
    acks: list[str] = attrs.field(factory=list)  # command ids acked
    results: list[CommandResult] = attrs.field(factory=list)
    close_code: int | None = None  # how the connection ended (either side's close code)
    closed_at: float | None = None  # trio time at which the hub saw the connection end


@attrs.define
class FakeHub:
    """The hub side of the device contract, small and scriptable: welcome, cumulative acks, errors, closes."""

    tokens: dict[str, str] | None = None  # token -> device; None accepts any "<name>.<secret>"
    window: int = 8
    max_points: int = 5000
    refuse_status: int | None = None  # refuse every handshake with this HTTP status
    refuse_first: int = 0  # refuse this many handshakes with 503 first
    retry_after: bytes | None = None
    reject_seqs: set[int] = attrs.field(factory=set)
    plans: list[Plan] = attrs.field(factory=list)  # one per connection, then `default`
    default: Plan = attrs.field(factory=Plan)
    lazy_acks: bool = False  # ack only when `window` batches are unacked or after a quiet moment
    max_message_size: int = 1_048_576
    notice: str | None = None  # an informational error (no seq) sent right after the welcome
    url: str = ""
    epoch: int = 0
    attempts: list[float] = attrs.field(factory=list)
    conns: list[Conn] = attrs.field(factory=list)
    durable: dict[str, int] = attrs.field(factory=dict)
    points: dict[str, dict[int, list[dict[str, Any]]]] = attrs.field(factory=dict)
    errors_sent: int = 0
    pongs: int = 0
    # Commands as the real hub keeps them: sent on every session until a result comes (then dropped here).
    open_commands: dict[str, dict[str, Command]] = attrs.field(factory=dict)
    unknown_ids: set[str] = attrs.field(factory=set)  # answer acks/results of these ids with unknown_command

    async def start(self, nursery: trio.Nursery) -> str:
        server = await nursery.start(
            partial(
                serve_websocket,
                self.handler,
                "127.0.0.1",
                0,
                None,
                max_message_size=self.max_message_size,
                connect_timeout=5,
            )
        )
        self.url = f"ws://127.0.0.1:{server.port}{DEVICE_PATH}"
        return self.url

    def seqs(self, device: str) -> list[int]:
        return sorted(self.points.get(device, {}))

    def all_points(self, device: str) -> list[dict[str, Any]]:
        held = self.points.get(device, {})
        return [p for seq in sorted(held) for p in held[seq]]

    def live(self, device: str) -> Conn | None:
        """The device's open connection, if any."""
        for conn in reversed(self.conns):
            if conn.device == device and conn.ws is not None and conn.ws.closed is None:
                return conn
        return None

    async def command(self, device: str, cmd: Command) -> None:
        """Queue a command like the hub: sent now if the device is online, again on each session until answered."""
        self.open_commands.setdefault(device, {})[cmd.id] = cmd
        await self.send_raw(device, cmd)

    async def send_raw(self, device: str, cmd: Command) -> bool:
        """Send one command frame on the device's open connection (no bookkeeping); False when offline."""
        conn = self.live(device)
        if conn is None:
            return False
        with contextlib.suppress(ConnectionClosed):
            await conn.ws.send_message(encode(cmd))
            return True
        return False

    async def drop(self, device: str, code: int = CloseCode.GOING_AWAY) -> None:
        """Close the device's open connection from the hub side."""
        conn = self.live(device)
        assert conn is not None, f"{device} is not connected"
        await conn.ws.aclose(code)

    def results(self, cid: str) -> list[CommandResult]:
        """Every result received for command `cid`, over all connections."""
        return [r for conn in self.conns for r in conn.results if r.id == cid]

    async def handler(self, request: WebSocketRequest) -> None:
        self.attempts.append(trio.current_time())
        headers = dict(request.headers)
        if request.path != DEVICE_PATH:
            await request.reject(404)
            return
        if b"origin" in headers:
            await request.reject(403)
            return
        if self.refuse_first:
            self.refuse_first -= 1
            await request.reject(503)
            return
        if self.refuse_status is not None:
            extra = [(b"retry-after", self.retry_after)] if self.retry_after else []
            await request.reject(self.refuse_status, extra_headers=extra)
            return
        token = headers.get(b"authorization", b"").decode().removeprefix("Bearer ")
        device = self.tokens.get(token) if self.tokens is not None else token.split(".")[0]
        if not device or "." not in token:
            await request.reject(401)
            return
        ws = await request.accept()
        conn = Conn(device, headers, ws=ws)
        self.conns.append(conn)
        plan = self.plans.pop(0) if self.plans else self.default
        async with trio.open_nursery() as nursery:
            if plan.ping_every is not None:
                nursery.start_soon(self._pinger, ws, plan.ping_every)
            with contextlib.suppress(ConnectionClosed):  # the client went away: nothing to do
                await self._session(ws, conn, plan)
            nursery.cancel_scope.cancel()
        conn.close_code = ws.closed.code if ws.closed is not None else None
        conn.closed_at = trio.current_time()

    async def _pinger(self, ws: Any, every: float) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                with trio.fail_after(5):
                    await ws.ping()
                self.pongs += 1
                await trio.sleep(every)

    async def _session(self, ws: Any, conn: Conn, plan: Plan) -> None:
        hello = decode(await ws.get_message())
        assert isinstance(hello, Hello)
        conn.hello = hello
        self.epoch += 1
        device = conn.device
        welcome = Welcome(device, self.durable.get(device, 0), self.epoch, self.window, self.max_points, 30.0)
        await ws.send_message(encode(welcome))
        if self.notice is not None:
            await ws.send_message(encode(Error(self.notice, "just so you know")))
        for cmd in list(self.open_commands.get(device, {}).values()):
            await ws.send_message(encode(cmd))
        if plan.close_after == 0:
            await ws.aclose(plan.close_code)
            return
        if plan.hold is not None:
            with trio.move_on_after(plan.hold):
                await self._session_loop(ws, conn, plan)
            await ws.aclose(plan.close_code)
            return
        await self._session_loop(ws, conn, plan)

    async def _session_loop(self, ws: Any, conn: Conn, plan: Plan) -> None:
        device = conn.device
        unacked = 0
        while True:
            with trio.move_on_after(0.02 if self.lazy_acks and unacked else math.inf) as idle:
                text = await ws.get_message()
            if idle.cancelled_caught:
                if plan.ack:
                    await ws.send_message(encode(Ack(self.durable.get(device, 0))))
                    unacked = 0
                continue
            if await self._command_answer(ws, conn, text):
                continue
            unacked += 1
            conn.max_inflight = max(conn.max_inflight, unacked)
            await self._telemetry(ws, conn, plan, text)
            if plan.ack and (not self.lazy_acks or unacked >= self.window):
                if self.lazy_acks:
                    await ws.send_message(encode(Ack(self.durable.get(device, 0))))
                unacked = 0
            if plan.close_after is not None and len(conn.received) >= plan.close_after:
                await ws.aclose(plan.close_code)
                return

    async def _command_answer(self, ws: Any, conn: Conn, text: str) -> bool:
        """Record a command ack or result (True), or leave the frame to `_telemetry` (False)."""
        try:
            msg = decode(text)
        except ProtocolError:
            return False
        conn.frames.append(type(msg).__name__)
        if isinstance(msg, CommandAck):
            conn.acks.append(msg.id)
        elif isinstance(msg, CommandResult):
            conn.results.append(msg)
            self.open_commands.get(conn.device, {}).pop(msg.id, None)
        else:
            return False
        if msg.id in self.unknown_ids:
            self.errors_sent += 1
            await ws.send_message(encode(Error(ErrorCode.UNKNOWN_COMMAND, f"no command {msg.id!r} for this device")))
        return True

    async def _telemetry(self, ws: Any, conn: Conn, plan: Plan, text: str) -> None:
        device = conn.device
        try:
            msg = decode(text)
        except ProtocolError as exc:
            self.errors_sent += 1
            await ws.send_message(encode(Error(exc.code, exc.detail, exc.seq)))
            return
        assert isinstance(msg, Telemetry)
        conn.received.append(msg.seq)
        held = self.durable.get(device, 0)
        if msg.seq <= held:
            if plan.ack and not self.lazy_acks:
                await ws.send_message(encode(Ack(held)))
            return
        if msg.seq in self.reject_seqs:
            self.errors_sent += 1
            await ws.send_message(encode(Error(ErrorCode.BAD_FIELD, "refused by the test", msg.seq)))
        elif plan.durable:
            self.points.setdefault(device, {})[msg.seq] = msg.points
        if plan.durable:
            self.durable[device] = msg.seq
            if plan.ack and not self.lazy_acks:
                await ws.send_message(encode(Ack(msg.seq)))


@pytest.fixture
async def hub(nursery: trio.Nursery) -> FakeHub:
    h = FakeHub()
    await h.start(nursery)
    return h


def batch(n: int = 1, base: int = 0, **fields: Any) -> list[dict[str, Any]]:
    return [
        {"measurement": "m", "ts": TS + base + i, "fields": dict(fields or {"v": float(base + i)})} for i in range(n)
    ]


def closed_port_url() -> str:
    """A loopback URL where nothing listens (a port the kernel just handed out and took back)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"ws://127.0.0.1:{port}{DEVICE_PATH}"


async def eventually(predicate: Any, timeout: float = 10.0, poll: float = 0.005) -> None:
    """Wait until `predicate()` holds, checking every `poll` seconds, failing after `timeout`."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(poll)


# ---------------------------------------------------------------------------- sending and acks


async def test_send_batches_and_acks(hub: FakeHub) -> None:
    client = DeviceClient(
        hub.url, "dev1.s3cret", firmware="fw-1.2", model="th-100", interval=5, batch_points=4, linger=3600
    )
    async with client as c:
        for i in range(10):
            await c.send("environment", {"temperature": 20.5 + i, "count": i}, tags={"room": "a"}, ts=TS + i)
        await c.wait_acked()
        assert c.stats.connected and c.stats.epoch == 1
        assert c.stats.points_acked == 10 and c.stats.batches_acked == 3
        assert c.pending == 0 and c.buffered == 0
    assert not c.stats.connected
    conn = hub.conns[0]
    assert conn.hello == Hello(firmware="fw-1.2", model="th-100", interval=5.0)
    assert conn.headers[b"authorization"] == b"Bearer dev1.s3cret"
    assert b"origin" not in conn.headers
    assert [len(hub.points["dev1"][s]) for s in hub.seqs("dev1")] == [4, 4, 2]
    points = hub.all_points("dev1")
    assert points[3] == {
        "measurement": "environment",
        "ts": TS + 3,
        "fields": {"temperature": 23.5, "count": {"int": 3}},
        "tags": {"room": "a"},
    }


async def test_linger_sends_buffered_points_without_flush(hub: FakeHub) -> None:
    async with DeviceClient(hub.url, "dev1.s", linger=0.05) as c:
        for i in range(3):
            await c.send("m", {"v": 1.0}, ts=TS + i)
        await eventually(lambda: len(hub.all_points("dev1")) == 3)
        assert c.buffered == 0 and hub.seqs("dev1") == [1]


async def test_default_timestamp_is_the_device_clock(hub: FakeHub) -> None:
    import time

    before = int(time.time() * 1000)
    async with DeviceClient(hub.url, "dev1.s") as c:
        await c.send("m", {"v": 1.0})
        await c.wait_acked()
    after = int(time.time() * 1000)
    assert before <= hub.all_points("dev1")[0]["ts"] <= after


async def test_bad_points_fail_at_send() -> None:
    async with DeviceClient(closed_port_url(), "dev1.s", **FAST) as c:
        with pytest.raises(ProtocolError) as info:
            await c.send("m", {"v": float("nan")})
        assert info.value.code == ErrorCode.BAD_FIELD
        with pytest.raises(ProtocolError) as info:
            await c.send("m", {"v": 1.0}, tags={"device": "other"})
        assert info.value.code == ErrorCode.RESERVED_TAG
        with pytest.raises(ProtocolError) as info:
            await c.send("bad\nname", {"v": 1.0})
        assert info.value.code == ErrorCode.BAD_NAME
        with pytest.raises(ProtocolError) as info:
            await c.send_batch(batch(5001))
        assert info.value.code == ErrorCode.TOO_MANY_POINTS
        assert c.pending == 0 and c.buffered == 0


async def test_send_outside_the_context_is_an_error() -> None:
    c = DeviceClient("ws://127.0.0.1:9", "dev1.s")
    with pytest.raises(RuntimeError):
        await c.send("m", {"v": 1.0})


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        DeviceClient("http://127.0.0.1:9", "dev1.s")
    with pytest.raises(ValueError):
        DeviceClient("ws://127.0.0.1:9", "dev1 s")
    with pytest.raises(ValueError):
        DeviceClient("ws://127.0.0.1:9", "dev1.s", firmware="x" * 65)
    assert device_url("ws://h:1") == "ws://h:1/v1/device"
    assert device_url("wss://h/") == "wss://h/v1/device"
    assert device_url("ws://h:1/custom/path") == "ws://h:1/custom/path"


async def test_window_is_respected(nursery: trio.Nursery) -> None:
    hub = FakeHub(window=2, lazy_acks=True)
    await hub.start(nursery)
    async with DeviceClient(hub.url, "dev1.s") as c:
        for i in range(7):
            await c.send_batch(batch(1, base=i))
        await c.wait_acked()
        assert c.stats.batches_acked == 7
    assert hub.conns[0].max_inflight == 2
    assert hub.seqs("dev1") == list(range(1, 8))


async def test_outbox_full_blocks_or_raises(nursery: trio.Nursery) -> None:
    hub = FakeHub(plans=[Plan(durable=False, ack=False, close_after=2)])
    await hub.start(nursery)
    async with DeviceClient(hub.url, "dev1.s", outbox_limit=2, **FAST) as c:
        assert [await c.send_batch(batch(1, base=i)) for i in range(2)] == [1, 2]
        with pytest.raises(OutboxFull):
            await c.send_batch(batch(1, base=2), block=False)
        # Blocks until the hub (second connection) acks the first two.
        assert await c.send_batch(batch(1, base=2)) == 3
        assert c.stats.points_acked >= 1
        await c.wait_acked()
    assert hub.seqs("dev1") == [1, 2, 3]


async def test_send_without_blocking_raises_when_full(nursery: trio.Nursery) -> None:
    hub = FakeHub(default=Plan(durable=False, ack=False))
    await hub.start(nursery)
    async with DeviceClient(hub.url, "dev1.s", outbox_limit=1, batch_points=1, close_timeout=0) as c:
        await c.send("m", {"v": 1.0}, ts=TS)  # batch 1: the outbox is full now
        await c.send("m", {"v": 2.0}, ts=TS + 1, block=False)  # accepted into the buffer
        assert c.pending == 1 and c.buffered == 1
        with pytest.raises(OutboxFull):
            await c.send("m", {"v": 3.0}, ts=TS + 2, block=False)
        assert c.pending == 1 and c.buffered == 1


async def test_error_without_seq_is_only_logged(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    hub = FakeHub(notice="rate_limited")
    await hub.start(nursery)
    async with DeviceClient(hub.url, "dev1.s") as c:
        await c.send_batch(batch())
        await c.wait_acked()
        assert c.stats.connects == 1 and c.stats.rejected == 0
    assert any("rate_limited" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


# ---------------------------------------------------------------------------- resend and acks


async def test_replay_in_order_after_the_hub_drops_the_connection(nursery: trio.Nursery) -> None:
    hub = FakeHub(plans=[Plan(durable=False, ack=False, close_after=3)])
    await hub.start(nursery)
    async with DeviceClient(hub.url, "dev1.s", **FAST) as c:
        for i in range(5):
            await c.send_batch(batch(2, base=10 * i))
        await c.wait_acked()
        assert c.stats.reconnects == 1 and c.stats.epoch == 2
        assert c.stats.resent >= 3
    assert hub.conns[0].received == [1, 2, 3]
    assert hub.conns[1].received == [1, 2, 3, 4, 5]
    assert [p["ts"] for p in hub.all_points("dev1")] == [TS + 10 * i + j for i in range(5) for j in range(2)]


async def test_acked_batches_are_not_resent(nursery: trio.Nursery) -> None:
    hub = FakeHub(plans=[Plan(close_after=3)])
    await hub.start(nursery)
    async with DeviceClient(hub.url, "dev1.s", **FAST) as c:
        for i in range(5):
            await c.send_batch(batch(1, base=i))
        await c.wait_acked()
    assert hub.conns[0].received == [1, 2, 3]
    assert hub.conns[1].received == [4, 5]


async def test_welcome_ack_drops_what_the_hub_already_holds(nursery: trio.Nursery) -> None:
    # The hub made 1..3 durable but its acks never arrived: the Welcome tells the client.
    hub = FakeHub(plans=[Plan(ack=False, close_after=3)])
    await hub.start(nursery)
    async with DeviceClient(hub.url, "dev1.s", **FAST) as c:
        for i in range(5):
            await c.send_batch(batch(1, base=i))
        await c.wait_acked()
        assert c.stats.points_acked == 5
        assert await c.send_batch(batch(1, base=9)) == 6
        await c.wait_acked()
    assert hub.conns[1].received == [4, 5, 6]
    assert hub.seqs("dev1") == [1, 2, 3, 4, 5, 6]


async def test_new_batches_are_numbered_above_the_hubs_ack(nursery: trio.Nursery) -> None:
    hub = FakeHub()
    hub.durable["dev1"] = 41  # e.g. the device lost its outbox; the hub holds up to 41
    await hub.start(nursery)
    async with DeviceClient(hub.url, "dev1.s") as c:
        await c.wait_connected()
        assert await c.send_batch(batch()) == 42
        await c.wait_acked()
    assert hub.seqs("dev1") == [42]


async def test_rejected_batch_is_dropped_and_never_resent(nursery: trio.Nursery) -> None:
    hub = FakeHub(reject_seqs={2}, plans=[Plan(close_after=3)])
    await hub.start(nursery)
    refused: list[tuple[int, str, str]] = []
    async with DeviceClient(hub.url, "dev1.s", on_rejected=lambda *a: refused.append(a), **FAST) as c:
        for i in range(3):
            await c.send_batch(batch(1, base=i))
        await c.wait_acked()
        assert await c.send_batch(batch(1, base=3)) == 4
        await c.wait_acked()
        assert c.stats.rejected == 1 and c.stats.points_rejected == 1
        assert c.stats.batches_acked == 3
    assert refused == [(2, ErrorCode.BAD_FIELD, "refused by the test")]
    assert hub.seqs("dev1") == [1, 3, 4]
    assert [s for conn in hub.conns for s in conn.received].count(2) == 1


async def test_too_big_batch_is_found_and_dropped(nursery: trio.Nursery) -> None:
    hub = FakeHub(max_message_size=2000)
    await hub.start(nursery)
    refused: list[tuple[int, str, str]] = []
    async with DeviceClient(hub.url, "dev1.s", on_rejected=lambda *a: refused.append(a), **FAST) as c:
        await c.send_batch(batch(1, base=0))
        await c.send_batch(batch(1, base=1, s="x" * 3000))
        await c.send_batch(batch(1, base=2))
        await c.wait_acked()
    assert [r[:2] for r in refused] == [(2, "too_large")]
    assert hub.seqs("dev1") == [1, 3]


async def test_persisted_outbox_survives_a_client_restart(nursery: trio.Nursery, tmp_path) -> None:
    path = tmp_path / "outbox.sqlite3"
    hub = FakeHub(default=Plan(durable=False, ack=False))
    await hub.start(nursery)
    async with DeviceClient(hub.url, "dev1.s", outbox_path=path, close_timeout=0.2) as c:
        for i in range(3):
            await c.send_batch(batch(2, base=10 * i))
        await eventually(lambda: hub.conns and len(hub.conns[0].received) == 3)
    assert c.pending == 3  # not acked: kept on disk
    hub.default = Plan()
    async with DeviceClient(hub.url, "dev1.s", outbox_path=path) as c:
        assert c.pending == 3
        assert await c.send_batch(batch(1, base=99)) == 4
        await c.wait_acked()
        assert c.stats.resent == 3 and c.stats.points_acked == 7
    assert hub.conns[-1].received == [1, 2, 3, 4]
    assert [p["ts"] for p in hub.all_points("dev1")] == [TS, TS + 1, TS + 10, TS + 11, TS + 20, TS + 21, TS + 99]


async def test_cancelled_caller_still_delivers_on_close(hub: FakeHub) -> None:
    with trio.CancelScope() as scope:
        async with DeviceClient(hub.url, "dev1.s") as c:
            await c.send("m", {"v": 1.0}, ts=TS)
            scope.cancel()
            await trio.sleep_forever()
    assert hub.seqs("dev1") == [1]
    assert c.stats.points_acked == 1


async def test_pings_are_answered_and_close_is_clean(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    hub = FakeHub(default=Plan(ping_every=0.001))
    await hub.start(nursery)
    for _ in range(5):
        async with DeviceClient(hub.url, "dev1.s") as c:
            await eventually(lambda: hub.pongs >= 3)
            await c.send_batch(batch())
            await c.wait_acked()
        hub.pongs = 0
    assert [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")] == []
    assert all(conn.received for conn in hub.conns)


async def test_command_hook_stores_handlers() -> None:
    c = DeviceClient("ws://127.0.0.1:9", "dev1.s")

    @c.command("reboot")
    async def reboot(args: dict) -> dict:
        return {}

    assert c.commands == {"reboot": reboot}
    with pytest.raises(TypeError):
        c.command("sync")(lambda args: None)


# ---------------------------------------------------------------------------- backoff (virtual time)


def test_backoff_delay_ranges() -> None:
    for failures in range(12):
        d = backoff_delay(failures, 0.5, 30.0)
        assert 0 <= d <= min(30.0, 0.5 * 2**failures)
        assert 15.0 <= backoff_delay(failures, 0.5, 30.0, to_max=True) <= 30.0


async def test_401_backs_off_to_the_max(nursery: trio.Nursery, autojump_clock: Any) -> None:
    hub = FakeHub(tokens={"good.token": "good"})
    await hub.start(nursery)
    async with DeviceClient(hub.url, "bad.token", backoff_initial=0.5, backoff_max=30.0, close_timeout=1) as c:
        await eventually(lambda: len(hub.attempts) >= 4, timeout=1000, poll=0.25)
        assert not c.stats.connected and c.stats.connects == 0
        assert c.stats.connect_failures >= 3
    gaps = [b - a for a, b in itertools.pairwise(hub.attempts)]
    assert all(15.0 <= g <= 30.5 for g in gaps), gaps
    assert hub.conns == []


@pytest.mark.parametrize(
    ("code", "slow"),
    [
        (CloseCode.REPLACED, True),
        (CloseCode.REVOKED, True),
        (CloseCode.POLICY, True),
        (CloseCode.GOING_AWAY, False),
        (CloseCode.TRY_LATER, False),
        (CloseCode.INTERNAL, False),
    ],
)
async def test_close_codes_choose_the_backoff(
    nursery: trio.Nursery, autojump_clock: Any, code: int, slow: bool
) -> None:
    hub = FakeHub(plans=[Plan(close_after=0, close_code=code)])
    await hub.start(nursery)
    async with DeviceClient(hub.url, "dev1.s", backoff_initial=0.5, backoff_max=30.0) as c:
        await eventually(lambda: c.stats.connects == 2, timeout=1000, poll=0.25)
        assert c.stats.reconnects == 1
    gap = hub.attempts[1] - hub.attempts[0]
    if slow:
        assert 15.0 <= gap <= 30.5
    else:
        assert gap <= 1.0


async def test_a_long_session_resets_the_backoff(nursery: trio.Nursery, autojump_clock: Any) -> None:
    # Six refusals grow the backoff; a 20 s session then resets it: the next attempt comes within `initial`.
    hub = FakeHub(refuse_first=6, plans=[Plan(hold=20.0)])
    await hub.start(nursery)
    async with DeviceClient(hub.url, "dev1.s", backoff_initial=0.5, backoff_max=30.0) as c:
        await eventually(lambda: c.stats.connects == 2, timeout=1000, poll=0.25)
    assert len(hub.attempts) == 8
    assert hub.attempts[7] - hub.attempts[6] >= 20.0
    closed_at = hub.attempts[6] + 20.0
    assert hub.attempts[7] - closed_at <= 0.5 + 0.01


async def test_503_honours_retry_after(nursery: trio.Nursery, autojump_clock: Any) -> None:
    hub = FakeHub(refuse_status=503, retry_after=b"7")
    await hub.start(nursery)
    async with DeviceClient(hub.url, "dev1.s", backoff_initial=0.5, backoff_max=30.0):
        await eventually(lambda: len(hub.attempts) >= 3, timeout=1000, poll=0.25)
    gaps = [b - a for a, b in itertools.pairwise(hub.attempts)]
    assert all(7.0 <= g <= 7.6 for g in gaps), gaps


async def test_backoff_grows_while_the_hub_is_unreachable(autojump_clock: Any) -> None:
    # Nothing listens there: every attempt fails at once.
    async with DeviceClient(closed_port_url(), "dev1.s", backoff_initial=0.5, backoff_max=30.0, close_timeout=0) as c:
        await eventually(lambda: c.stats.connect_failures >= 12, timeout=10_000, poll=0.25)
        start = trio.current_time()
        await eventually(lambda: c.stats.connect_failures >= 22, timeout=10_000, poll=0.25)
        # Ten attempts at the 30 s cap average 15 s each; uncapped doubling would be far longer.
        assert 10 * 2 < trio.current_time() - start < 10 * 30
