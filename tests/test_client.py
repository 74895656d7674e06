"""DeviceClient against a small real WebSocket hub on loopback that speaks the device protocol."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio

from device_client import DeviceClient, OutboxFull, ProtocolError, backoff_delay, device_url
from device_client.protocol import (
    DEVICE_PATH,
    CloseCode,
    ErrorCode,
    Hello,
)
from tests.ports import refused_port
from tests.servers import FAST, TS, FakeHub, Plan, batch
from tests.waiting import eventually


@pytest.fixture
async def hub(nursery: trio.Nursery) -> FakeHub:
    h = FakeHub()
    await h.start(nursery)
    return h


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
    assert conn.hello == Hello(
        firmware="fw-1.2", model="th-100", interval=5.0, desired_version=0, compress=("deflate-d1",)
    )
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
    async with DeviceClient(f"ws://127.0.0.1:{refused_port()}{DEVICE_PATH}", "dev1.s", **FAST) as c:
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
    async with DeviceClient(
        f"ws://127.0.0.1:{refused_port()}{DEVICE_PATH}",
        "dev1.s",
        backoff_initial=0.5,
        backoff_max=30.0,
        close_timeout=0,
    ) as c:
        await eventually(lambda: c.stats.connect_failures >= 12, timeout=10_000, poll=0.25)
        start = trio.current_time()
        await eventually(lambda: c.stats.connect_failures >= 22, timeout=10_000, poll=0.25)
        # Ten attempts at the 30 s cap average 15 s each; uncapped doubling would be far longer.
        assert 10 * 2 < trio.current_time() - start < 10 * 30
