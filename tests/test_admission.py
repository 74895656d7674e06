"""Admission: handshakes in progress are bounded in total and per address; past that, 503/429 + Retry-After."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed

from device_client.protocol import CloseCode
from hub.app import HubHandle
from hub.control import CONTROL_PATH
from hub.edge._admission import MIN_RATE, RATE_WINDOW, Admission
from hub.edge._listener import http_answer
from hub.ratelimit import Rate, TokenBucket
from tests.hubtools import add_devices, add_operators, connect, hello, hub_config, start_hub, stream_batches
from tests.waiting import eventually
from tests.wire import (
    closed_by_peer,
    exchange,
    get_request,
    open_tcp,
    read_head,
    read_to_close,
    upgrade,
    upgrade_request,
)

# ---------------------------------------------------------------------------- the pure object

UNBOUNDED = Rate(per_second=1e9, burst=1e9)  # no per-address answer budget: tests of the queue alone


def test_total_bound_refuses_with_503_and_counts_nothing() -> None:
    a = Admission(max_pending=2)
    assert a.enter("10.0.0.1", 0.0) is None
    assert a.enter("10.0.0.2", 0.0) is None
    refusal = a.enter("10.0.0.3", 0.0)
    assert refusal is not None and (refusal.status, refusal.reason) == (503, "busy")
    assert refusal.retry_after >= 1
    assert (a.pending, a.refused) == (2, 1)
    a.leave("10.0.0.1", 0.1, completed=True)
    assert a.enter("10.0.0.3", 0.1) is None
    assert a.pending == 2


def test_per_address_bound_refuses_with_429_while_other_addresses_get_in() -> None:
    a = Admission(max_pending=10, max_pending_per_address=2)
    assert a.enter("nat", 0.0) is None
    assert a.enter("nat", 0.0) is None
    refusal = a.enter("nat", 0.0)
    assert refusal is not None and (refusal.status, refusal.reason) == (429, "address_busy")
    assert a.enter("other", 0.0) is None
    a.leave("nat", 0.0, completed=False)
    assert a.enter("nat", 0.0) is None


def test_zero_per_address_means_no_per_address_bound() -> None:
    a = Admission(max_pending=5, max_pending_per_address=0)
    assert all(a.enter("one", 0.0) is None for _ in range(5))
    assert a.enter("one", 0.0) is not None  # the total bound still holds


def test_refused_clients_are_spread_over_time_not_sent_back_as_one_wave() -> None:
    a = Admission(max_pending=1)
    a.enter("x", 0.0)
    afters = [r.retry_after for r in (a.enter("y", 0.0) for _ in range(int(3 * a.rate))) if r is not None]
    assert afters == sorted(afters)  # first come, first served
    assert afters[0] == 1 and afters[-1] == 3  # 3 x rate refusals fill three one-second slots
    assert {afters.count(s) for s in (1, 2, 3)} == {int(a.rate)}


def test_retry_after_follows_the_measured_completion_rate() -> None:
    a = Admission(max_pending=4, address_answers=UNBOUNDED)
    now = 0.0
    for _ in range(1000):  # a busy hub completing 400 handshakes a second, for 10 s
        for _ in range(4):
            a.enter("x", now)
        now += 0.01
        for _ in range(4):
            a.leave("x", now, completed=True)
        for _ in range(4):
            a.enter("x", now)  # back at the bound
        for _ in range(4):
            a.leave("x", now, completed=False)
    assert 390 <= a.rate <= 410
    for _ in range(4):
        a.enter("x", now)
    refusals = [a.enter("y", now) for _ in range(int(a.rate) * 2)]
    assert max(r.retry_after for r in refusals if r is not None) == 2


def test_one_window_of_few_completions_does_not_halve_the_rate() -> None:
    a = Admission(max_pending=4, address_answers=UNBOUNDED)
    now = 0.0

    def second(completions: int) -> None:  # a busy second: every place taken, newcomers refused
        nonlocal now
        for _ in range(completions):
            a.enter("x", now)
            a.leave("x", now, completed=True)
        for _ in range(4):
            a.enter("x", now)
        a.enter("y", now)  # refused: the window measures capacity
        for _ in range(4):
            a.leave("x", now, completed=False)
        now += RATE_WINDOW

    for _ in range(10):
        second(400)
    assert 390 <= a.rate <= 410
    second(1)  # a collection, or handshakes finishing together a moment later
    second(400)
    assert a.rate >= 300  # halving it (the estimate before) told every client refused meanwhile to wait twice as long


def test_rate_never_falls_below_its_floor_and_bad_bounds_are_refused() -> None:
    a = Admission(max_pending=1)
    a.enter("x", 0.0)
    a.leave("x", 0.0, completed=True)
    a.enter("x", 100.0)
    a.leave("x", 100.0, completed=True)  # one handshake in 100 s of quiet says nothing about capacity
    assert a.rate >= MIN_RATE
    with pytest.raises(ValueError):
        Admission(max_pending=0)
    with pytest.raises(ValueError):
        Admission(max_pending=1, max_pending_per_address=-1)


def test_http_answer_has_a_reason_phrase_and_a_length() -> None:
    answer = http_answer(503, "busy\n", [(b"retry-after", b"3")])
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"\r\nretry-after: 3" in head and b"\r\ncontent-length: 5" in head and b"connection: close" in head
    assert body == b"busy\n"


# ---------------------------------------------------------------------------- a real hub


async def until_pending(hub: HubHandle, n: int) -> None:
    """Wait until the hub counts `n` connections in their handshake (sockets the test opened and keeps silent)."""
    await eventually(lambda: hub.edge.admission.pending >= n, 10)


async def _refused(port: int, source: str = "127.0.0.1") -> tuple[int, dict[str, str]]:
    """Connect, send an upgrade request, read the answer until the hub closes; its status and headers."""
    status, headers, stream = await upgrade(port, "/v1/device", source=source)
    async with stream:
        assert await closed_by_peer(stream)
    return status, headers


async def test_past_max_handshakes_a_connection_gets_503_unread_and_devices_get_in_later(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    config = hub_config(
        tmp_path,
        **{"server.max_handshakes": 2, "server.handshake_timeout": 1.0, "server.evict_slow_handshake_after": 3600.0},
    )
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        silent = [await open_tcp(hub.port) for _ in range(2)]  # accepted, never say a word: in progress
        await until_pending(hub, 2)
        status, headers = await _refused(hub.port)
        assert status == 503
        assert int(headers["retry-after"]) >= 1
        assert hub.stats.admission_refused == 1 and hub.stats.refused == 1
        for stream in silent:  # the handshake timeout frees their places
            assert await closed_by_peer(stream)
            await stream.aclose()
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws)
            await stream_batches(ws, 1, 3)
        assert hub.edge.admission.pending == 0
        hub.stop()


async def test_503_answer_is_a_complete_http_response_with_reason_phrase(tmp_path: Path) -> None:
    config = hub_config(
        tmp_path,
        **{"server.max_handshakes": 1, "server.handshake_timeout": 30.0, "server.evict_slow_handshake_after": 3600.0},
    )
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with await open_tcp(hub.port):
            await until_pending(hub, 1)
            stream = await open_tcp(hub.port)
            async with stream:
                answer = await read_to_close(stream)  # the hub answers without reading
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert len(body) == int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
        hub.stop()


async def test_one_address_past_its_bound_gets_429_while_other_addresses_connect(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    config = hub_config(
        tmp_path,
        **{
            "server.max_handshakes_per_address": 2,
            "server.handshake_timeout": 30.0,
            "server.evict_slow_handshake_after": 3600.0,
        },
    )
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        silent = [await open_tcp(hub.port, "127.0.0.7") for _ in range(2)]
        await until_pending(hub, 2)
        status, headers = await _refused(hub.port, "127.0.0.7")
        assert status == 429 and int(headers["retry-after"]) >= 1
        async with connect(hub, tokens["d1"]) as ws:  # from 127.0.0.1
            await hello(ws)
            await stream_batches(ws, 1, 2)
        for stream in silent:
            await stream.aclose()
        hub.stop()


async def test_welcomed_devices_and_operators_do_not_hold_a_place(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, *(f"d{i}" for i in range(4)))
    ops = add_operators(tmp_path, alice="viewer")
    config = hub_config(tmp_path, **{"server.max_handshakes": 1})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with connect(hub, ops["alice"], path=CONTROL_PATH) as ctl:
            await ctl.get_message()
            async with connect(hub, tokens["d0"]) as w0:
                await hello(w0)  # from here on it is a session, not a handshake
                async with connect(hub, tokens["d1"]) as w1:
                    await hello(w1)
                    async with connect(hub, tokens["d2"]) as w2:
                        await hello(w2)
                        assert hub.edge.admission.pending == 0
        assert hub.stats.admission_refused == 0
        assert not math.isnan(hub.edge.admission.rate)
        hub.stop()


async def test_refused_handshakes_show_in_metrics(tmp_path: Path) -> None:
    config = hub_config(
        tmp_path,
        **{"server.max_handshakes": 1, "server.handshake_timeout": 30.0, "server.evict_slow_handshake_after": 3600.0},
    )
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with await open_tcp(hub.port):
            await until_pending(hub, 1)
            for _ in range(3):
                status, _headers = await _refused(hub.port)
                assert status == 503
        assert hub.metrics_port is not None
        status, _headers, body = await exchange(hub.metrics_port, get_request("/metrics"))
        assert status == 200
        assert b"hub_handshakes_busy_total 3.0" in body and b"hub_handshakes_unanswered_total 0.0" in body
        hub.stop()


async def test_device_client_comes_back_after_retry_after_and_gets_in(tmp_path: Path) -> None:
    from device_client import DeviceClient

    tokens = add_devices(tmp_path, "d1")
    config = hub_config(
        tmp_path,
        **{"server.max_handshakes": 1, "server.handshake_timeout": 30.0, "server.evict_slow_handshake_after": 3600.0},
    )
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        silent = await open_tcp(hub.port)
        await until_pending(hub, 1)
        url = f"ws://127.0.0.1:{hub.port}/v1/device"
        async with DeviceClient(url, tokens["d1"], outbox_path=tmp_path / "outbox.sqlite3") as client:
            await eventually(lambda: hub.stats.admission_refused != 0, 30)
            assert not client.stats.connected
            await silent.aclose()  # the place is free: the client's next try after Retry-After gets in
            with trio.fail_after(30):
                await client.wait_connected()
            await client.send("environment", {"temperature": 21.5})
            with trio.fail_after(30):
                await client.flush()
        assert hub.stats.points_in == 1
        hub.stop()


def test_refused_addresses_share_the_rate_equally_and_each_queue_is_its_own() -> None:
    a = Admission(max_pending=1, address_answers=UNBOUNDED)  # rate: 50/s assumed before any handshake completed
    a.enter("x", 0.0)
    nat = [a.enter("nat", 0.0) for _ in range(50)]  # 50 devices behind one address, refused at once
    assert [r.retry_after for r in nat if r is not None] == [1] * 50  # the whole rate: 50 in the next second
    site = [a.enter("site", 0.0) for _ in range(50)]  # another address: now two share the rate
    assert max(r.retry_after for r in site if r is not None) == 2
    assert a.enter("nat", 0.0).retry_after == 2  # type: ignore[union-attr]  # so does the first address, from now


def test_one_address_hammering_does_not_push_back_the_others() -> None:
    a = Admission(max_pending=4, max_pending_per_address=1, answers_per_second=1e9, address_answers=UNBOUNDED)
    a.enter("attacker", 0.0)
    hammering = [a.enter("attacker", 0.0) for _ in range(10_000)]
    assert all(r is not None and r.status == 429 for r in hammering)
    assert max(r.retry_after for r in hammering if r is not None) == 60  # its own queue is long ...
    for address in ("b", "c", "d"):
        assert a.enter(address, 0.0) is None
    refusal = a.enter("e", 0.0)
    assert refusal is not None and (refusal.status, refusal.retry_after) == (503, 1)  # ... nobody else's is


async def test_past_the_answer_budget_refused_connections_are_closed_unanswered(tmp_path: Path) -> None:
    config = hub_config(
        tmp_path,
        **{"server.max_handshakes": 1, "server.handshake_timeout": 30.0, "server.evict_slow_handshake_after": 3600.0},
    )
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        hub.edge.admission._answers = TokenBucket(Rate(1.0, 1.0), trio.current_time())  # one answer a second
        async with await open_tcp(hub.port):
            await until_pending(hub, 1)
            answers = []
            for _ in range(20):  # a client that reconnects at once, again and again
                async with await open_tcp(hub.port) as stream:
                    answers.append(await read_to_close(stream))  # empty if reset: closed with our request unread
        answered = [a for a in answers if a]
        assert answered and all(a.startswith(b"HTTP/1.1 503 ") for a in answered)
        assert hub.stats.admission_unanswered == len(answers) - len(answered) > 0
        assert hub.stats.admission_refused == 20
        hub.stop()


async def test_after_stop_accepting_the_port_refuses_connections(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    config = hub_config(tmp_path)
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws)
            hub.edge.stop_accepting()

            async def refused() -> bool:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", hub.port)
                except OSError:
                    return True
                await stream.aclose()
                return False

            await eventually(refused, 10)  # the listening socket is closed, not merely left unserved
            assert hub.server.sessions  # the open session stays until the shutdown closes it
        hub.stop()


async def test_a_session_the_hub_ends_closes_its_socket_even_while_the_peer_keeps_sending(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    config = hub_config(tmp_path, **{"server.max_message_bytes": 65536})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with connect(hub, tokens["d1"]) as ws:
            await hello(ws)
            with pytest.raises(ConnectionClosed) as closed, trio.fail_after(60):  # a hang, not a slow machine
                await ws.send_message(
                    "x" * 10_000_000
                )  # the hub stops reading at 64 KiB: only a closed socket ends this
                await ws.get_message()
            assert closed.value.reason is not None and closed.value.reason.code == CloseCode.TOO_BIG
        hub.stop()


def test_refusals_past_the_answer_budget_hold_no_place_in_the_queue() -> None:
    a = Admission(max_pending=1, answers_per_second=10, address_answers=UNBOUNDED)
    a.enter("x", 0.0)
    answered = [a.enter("y", 0.0) for _ in range(10)]
    assert all(r is not None and r.answered and r.retry_after >= 1 for r in answered)
    silent = [a.enter("y", 0.0) for _ in range(1000)]  # a client ignoring Retry-After, at full speed
    assert all(r is not None and not r.answered for r in silent)
    assert (a.refused, a.unanswered) == (1010, 1000)
    later = a.enter("z", 1.0)  # the budget refills; the queue did not grow with the unanswered
    assert later is not None and later.answered and later.retry_after == 1


def test_each_address_has_an_answer_budget_of_its_own_so_a_fleet_of_sites_is_answered() -> None:
    """One address past its burst is closed unanswered; every other address (a site's devices) still gets slots."""
    a = Admission(max_pending=1, address_answers=Rate(per_second=10, burst=100))
    a.enter("x", 0.0)
    for site in range(20):  # a surge: 20 sites with 100 devices each, all refused at once
        refusals = [a.enter(f"10.0.{site}.1", 0.0) for _ in range(100)]
        assert all(r is not None and r.answered for r in refusals)
    assert a.unanswered == 0
    hammer = [a.enter("10.0.0.1", 0.0) for _ in range(1000)]  # one of them reconnecting at full speed
    assert all(r is not None and not r.answered for r in hammer)
    again = a.enter("10.0.0.1", 0.1)  # its budget refills at its own pace
    assert again is not None and again.answered
    newcomer = a.enter("10.9.9.9", 0.1)
    assert newcomer is not None and newcomer.answered
    assert newcomer.retry_after == 1  # its address's own queue: an equal share of the rate, not behind the sites


def test_retry_after_is_capped_however_long_the_queue() -> None:
    a = Admission(max_pending=1, answers_per_second=1e9, address_answers=UNBOUNDED)
    a.enter("x", 0.0)
    refusals = [a.enter("y", 0.0) for _ in range(100_000)]
    assert max(r.retry_after for r in refusals if r is not None) == 60


async def test_with_every_place_taken_by_silent_sockets_a_device_evicts_the_oldest_and_gets_in(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    config = hub_config(tmp_path, **{"server.max_handshakes": 2, "server.handshake_timeout": 60.0})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        silent = [await open_tcp(hub.port) for _ in range(2)]  # a slowloris holding every place
        await until_pending(hub, 2)
        await trio.sleep(1.1)  # older than evict_slow_handshake_after: slow, not merely new
        async with connect(hub, tokens["d1"]) as ws:  # before: 503 until the handshake timeout (60 s)
            await hello(ws)
            await stream_batches(ws, 1, 2)
        assert hub.edge.admission.evicted == 1 and hub.stats.admission_refused == 0
        assert await closed_by_peer(silent[0])  # the oldest was closed to make room
        for stream in silent:
            await stream.aclose()
        hub.stop()


async def test_a_request_head_trickled_in_pieces_split_inside_its_end_is_answered(tmp_path: Path) -> None:
    """The listener reads the head into its own buffer first: its end is found across reads."""
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        request = upgrade_request("/v1/device", {"Authorization": f"Bearer {tokens['d1']}"})
        stream = await open_tcp(hub.port)
        for piece in (request[:10], request[10:-3], request[-3:-1], request[-1:]):  # "\r\n\r\n" split 1 + 2 + 1
            await stream.send_all(piece)
            await until_pending(hub, 1)  # still waiting for the rest of the head
            await trio.sleep(0.05)  # so the pieces arrive as separate reads
        status, _headers = await read_head(stream)
        assert status == 101
        await stream.aclose()
        hub.stop()
