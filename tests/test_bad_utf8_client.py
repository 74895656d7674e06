"""`device_client` and batches no hub can take as text: a damaged outbox row, a close with 1007 from the path."""

from __future__ import annotations

import logging
import sqlite3
from functools import partial
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from device_client import DeviceClient
from device_client.outbox import Outbox
from device_client.protocol import DEVICE_PATH, Ack, ErrorCode, Hello, Telemetry, Welcome, decode, encode
from tests.hubtools import add_devices, hub_config, points, start_hub, url
from tests.hubtools import telemetry_lines as stored

FAST = {"backoff_initial": 0.01, "backoff_max": 0.05}


def damage(path: Path, seq: int) -> None:
    """Put bytes that are not UTF-8 into the stored text of batch `seq` (as a disk error or another writer might)."""
    with sqlite3.connect(path) as db:
        (text,) = db.execute("SELECT text FROM entries WHERE seq = ?", (seq,)).fetchone()
        bad = text.encode().replace(b"lab 2", b"lab \xff\xfe")
        db.execute("UPDATE entries SET text = CAST(? AS TEXT) WHERE seq = ?", (bad, seq))


def test_an_outbox_row_that_is_not_utf8_is_set_aside_at_open(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as outbox:
        for i in range(3):
            outbox.add(points(1, start=i))
    damage(path, 2)
    with Outbox(path) as outbox:
        assert [e.seq for e in outbox.entries()] == [1, 3]
        assert [e.seq for e in outbox.unreadable] == [2]
        assert outbox.add(points(1, start=9)) == 4  # its number is never used again
    with Outbox(path) as outbox:  # dropped from the file, not found again
        assert [e.seq for e in outbox.entries()] == [1, 3, 4] and outbox.unreadable == []


async def test_a_device_with_a_damaged_outbox_row_drops_it_and_the_rest_is_acked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="device_client")
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as outbox:
        for i in range(4):
            outbox.add(points(2, start=10 * i))
    damage(path, 2)
    tokens = add_devices(tmp_path / "hub", "d1")
    refused: list[tuple[int, str, str]] = []
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path / "hub"))
        on_rejected = lambda *a: refused.append(a)  # noqa: E731
        async with DeviceClient(url(hub), tokens["d1"], outbox_path=path, on_rejected=on_rejected) as c:
            await c.wait_acked()
            assert c.pending == 0
            assert (c.stats.rejected, c.stats.points_rejected, c.stats.batches_acked) == (1, 2, 3)
        hub.stop()
    assert [r[:2] for r in refused] == [(2, ErrorCode.BAD_JSON)]
    assert len(stored(tmp_path / "hub")) == 6
    assert any("batch 2 (2 points) dropped for good" in r.getMessage() for r in caplog.records)


async def stand_in_hub(bad_seq: int, seen: list[int], request: WebSocketRequest) -> None:
    """A hub stand-in (or a proxy in front of one) that closes with 1007 when it meets batch `bad_seq`."""
    ws = await request.accept()
    try:
        assert isinstance(decode(await ws.get_message()), Hello)
        await ws.send_message(encode(Welcome("d1", 0, 1, 8, 5000, 10.0)))
        while True:
            msg = decode(await ws.get_message())
            assert isinstance(msg, Telemetry)
            seen.append(msg.seq)
            if msg.seq == bad_seq:
                await ws.aclose(1007, "bad_utf8")  # not UTF-8: the code RFC 6455 gives it
                return
            await ws.send_message(encode(Ack(msg.seq)))
    except ConnectionClosed:
        pass


async def test_a_close_with_1007_finds_the_batch_that_causes_it_and_drops_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="device_client")
    seen: list[int] = []
    refused: list[tuple[int, str, str]] = []
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_websocket, partial(stand_in_hub, 3, seen), "127.0.0.1", 0, None))
        hub_url = f"ws://127.0.0.1:{server.port}{DEVICE_PATH}"
        on_rejected = lambda *a: refused.append(a)  # noqa: E731
        async with DeviceClient(hub_url, "d1.s", on_rejected=on_rejected, close_timeout=1, **FAST) as c:
            for i in range(5):
                await c.send_batch(points(1, start=i))
            with trio.fail_after(30):
                await c.wait_acked()
            assert (c.stats.rejected, c.stats.batches_acked) == (1, 4)
        nursery.cancel_scope.cancel()
    assert [r[:2] for r in refused] == [(3, ErrorCode.BAD_JSON)]
    assert seen.count(3) == 2  # once among others, once alone: then dropped
    assert seen[-2:] == [4, 5]
    assert any("batch 3 makes the connection close with 1007" in r.getMessage() for r in caplog.records)
