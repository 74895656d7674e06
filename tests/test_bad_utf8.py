"""Frames no WebSocket library sends, over real sockets: invalid UTF-8 is refused and the session goes on;
frames that cannot be parsed at all get a close frame with a code and a stable reason, never a bare TCP close."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
from wsproto.events import AcceptConnection, CloseConnection, Pong, Request, TextMessage

from device_client import protocol
from device_client.protocol import DEVICE_PATH, Ack, CloseCode, Error, ErrorCode, Hello
from hub.control import CONTROL_PATH
from tests.hubtools import (
    add_devices,
    add_operators,
    connect,
    hello,
    hub_config,
    points,
    send_batch,
    start_hub,
    status_lines,
    wait_ack,
)
from tests.hubtools import telemetry_lines as stored
from tests.wire import RawClient, open_tcp

MASK = b"\x37\xfa\x21\x3d"
TEXT, BINARY, CLOSE, PING = 0x1, 0x2, 0x8, 0x9


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0) -> bytes:
    """One client frame built by hand, so that it may break any rule."""
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def telemetry_bytes(seq: int, room: bytes) -> bytes:
    """A telemetry batch whose tag value is `room`, raw bytes (maybe not UTF-8)."""
    point = {"measurement": "environment", "ts": 1_764_000_000_000 + seq, "fields": {"t": 1.5}, "tags": {"room": "@"}}
    text = json.dumps({"type": "telemetry", "seq": seq, "points": [point]}).encode()
    return text.replace(b'"@"', b'"' + room + b'"')


class Raw(RawClient):
    """The raw WebSocket client, for hand-made frames: text messages as text, close frames, the TCP close."""

    @classmethod
    async def open(cls, port: int, path: str, token: str) -> Raw:
        raw = cls(await open_tcp(port))
        await raw.handshake(path, token)
        return raw

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(self.conn.send(TextMessage(data=text)))

    async def message(self) -> Any:  # type: ignore[override]
        """The next text message, as text (pings are answered on the way)."""
        event = await self.event()
        assert isinstance(event, TextMessage), event
        return event.data

    async def close_frame(self) -> CloseConnection:
        """Skip messages until the hub's close frame (fails on a TCP close without one)."""
        while True:
            event = await self.event()
            assert event is not None, "the hub closed the TCP connection without a close frame"
            if isinstance(event, CloseConnection):
                return event

    async def eof(self) -> None:
        """Wait until the hub closes the TCP connection, answering nothing."""
        with trio.fail_after(15):
            while True:
                try:
                    if not await self.stream.receive_some(65536):
                        return
                except trio.BrokenResourceError:
                    return


async def device_message(raw: Raw) -> protocol.Message:
    return protocol.decode(await raw.message())


async def device_error(raw: Raw) -> Error:
    """The next error frame (acks before it are skipped)."""
    while True:
        msg = await device_message(raw)
        if not isinstance(msg, Ack):
            assert isinstance(msg, Error), msg
            return msg


async def acked(raw: Raw, seq: int) -> None:
    while True:
        msg = await device_message(raw)
        if isinstance(msg, Ack) and msg.seq >= seq:
            return


# ---------------------------------------------------------------------------- device endpoint


async def test_invalid_utf8_in_telemetry_is_refused_by_seq_and_the_session_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hub.session")
    tokens = add_devices(tmp_path, "bad", "good")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        async with connect(hub, tokens["good"]) as good:
            await hello(good)
            await send_batch(good, 1, points(2))
            raw = await Raw.open(hub.port, DEVICE_PATH, tokens["bad"])
            await raw.send_text(protocol.encode(Hello()))
            assert isinstance(await device_message(raw), protocol.Welcome)
            for seq in (1, 2):
                await raw.stream.send_all(frame(TEXT, telemetry_bytes(seq, b"lab")))
            await acked(raw, 2)  # what came before is durable and acked
            await raw.stream.send_all(frame(TEXT, telemetry_bytes(3, b"lab \xff\xfe")))
            error = await device_error(raw)
            assert (error.code, error.seq) == (ErrorCode.BAD_JSON, 3)
            assert "UTF-8" in error.detail
            # The session is open: later batches are taken, and the cumulative ack passes over the refused one.
            await raw.stream.send_all(frame(TEXT, telemetry_bytes(4, "lab °C".encode())))
            await acked(raw, 4)
            # Not attributable (the seq is unreadable): an error without a seq; the session still goes on.
            await raw.stream.send_all(frame(TEXT, b'{"type": "telemetry", "seq": \xc3\x28}'))
            error = await device_error(raw)
            assert (error.code, error.seq) == (ErrorCode.BAD_JSON, None)
            await raw.stream.send_all(frame(TEXT, telemetry_bytes(5, b"lab")))
            await acked(raw, 5)
            await send_batch(good, 2, points(2, start=10))
            await wait_ack(good, 2)
        hub.stop()
    lines = stored(tmp_path)
    assert len([ln for ln in lines if ",device=bad," in ln]) == 4  # batches 1, 2, 4 and 5; never 3
    assert any("lab °C" in ln.replace("\\ ", " ") for ln in lines)
    assert len([ln for ln in lines if ",device=good," in ln]) == 4
    assert hub.stats.protocol_errors[ErrorCode.BAD_JSON] == 2
    refused = [r for r in caplog.records if r.getMessage() == "message refused"]
    assert [r.kv["reason"] for r in refused] == [ErrorCode.BAD_JSON] * 2
    assert all(r.levelno == logging.INFO and r.kv["device"] == "bad" for r in refused)


async def test_invalid_utf8_across_fragments_is_refused_and_a_split_character_is_not(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        raw = await Raw.open(hub.port, DEVICE_PATH, tokens["d1"])
        await raw.send_text(protocol.encode(Hello()))
        assert isinstance(await device_message(raw), protocol.Welcome)
        good = telemetry_bytes(1, "°".encode())  # the two bytes of ° go in two frames
        cut = good.index(b"\xc2") + 1
        await raw.stream.send_all(frame(TEXT, good[:cut], fin=False) + frame(0x0, good[cut:]))
        await acked(raw, 1)
        bad = telemetry_bytes(2, b"\xe2\x82")  # a character cut short at the end of the message
        cut = bad.index(b"\xe2") + 1
        await raw.stream.send_all(frame(TEXT, bad[:cut], fin=False) + frame(0x0, bad[cut:]))
        error = await device_error(raw)
        assert (error.code, error.seq) == (ErrorCode.BAD_JSON, 2)
        # Binary frames keep their own answer (their bytes are never decoded).
        await raw.stream.send_all(frame(BINARY, b"\xff\xfe", fin=False) + frame(0x0, b"\xff"))
        assert (await device_error(raw)).code == ErrorCode.BAD_FRAME
        await raw.stream.send_all(frame(TEXT, telemetry_bytes(3, b"x")))
        await acked(raw, 3)
        hub.stop()
    assert len(stored(tmp_path)) == 2


async def test_invalid_utf8_counts_towards_max_errors(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path, **{"server.max_errors": 2}))
        raw = await Raw.open(hub.port, DEVICE_PATH, tokens["d1"])
        await raw.send_text(protocol.encode(Hello()))
        assert isinstance(await device_message(raw), protocol.Welcome)
        for _ in range(3):
            await raw.stream.send_all(frame(TEXT, b"\xff"))
        codes = [(await device_error(raw)).code for _ in range(4)]
        assert codes == [ErrorCode.BAD_JSON] * 3 + [ErrorCode.TOO_MANY_ERRORS]
        close = await raw.close_frame()
        assert close.code == CloseCode.POLICY
        hub.stop()


async def test_invalid_utf8_instead_of_hello_is_refused_with_a_close_frame(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        raw = await Raw.open(hub.port, DEVICE_PATH, tokens["d1"])
        await raw.stream.send_all(frame(TEXT, b'{"type": "hello", "proto": 1, "firmware": "\xff"}'))
        error = await device_error(raw)
        assert error.code == ErrorCode.BAD_JSON
        assert (await raw.close_frame()).code == CloseCode.POLICY
        hub.stop()
    assert hub.stats.protocol_errors[ErrorCode.BAD_JSON] == 1


UNPARSABLE = {
    "reserved opcode": (frame(0x3, b"x"), 1002, "protocol_error"),
    "unmasked frame": (frame(TEXT, b"{}", masked=False), 1002, "protocol_error"),
    "reserved bit": (frame(TEXT, b"{}", rsv=0x40), 1002, "protocol_error"),
    "fragmented ping": (frame(PING, b"p", fin=False), 1002, "protocol_error"),
    "continuation first": (frame(0x0, b"{}"), 1002, "protocol_error"),
    "new message inside another": (frame(TEXT, b"{", fin=False) + frame(TEXT, b"}"), 1002, "protocol_error"),
    "close reason not UTF-8": (frame(CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007, "bad_utf8"),
}


@pytest.mark.parametrize("path", [DEVICE_PATH, CONTROL_PATH])
@pytest.mark.parametrize("name", list(UNPARSABLE))
async def test_an_unparsable_frame_gets_a_close_frame_with_code_and_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, path: str
) -> None:
    data, code, reason = UNPARSABLE[name]
    caplog.set_level(logging.INFO)
    tokens = add_devices(tmp_path, "d1", "ok")
    tokens.update(add_operators(tmp_path, op="admin"))
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        async with connect(hub, tokens["ok"]) as ok:
            await hello(ok)
            if path == DEVICE_PATH:
                raw = await Raw.open(hub.port, path, tokens["d1"])
                await raw.send_text(protocol.encode(Hello()))
                assert isinstance(await device_message(raw), protocol.Welcome)
            else:
                raw = await Raw.open(hub.port, path, tokens["op"])
                assert json.loads(await raw.message())["type"] == "auth_ok"
            await raw.stream.send_all(data)
            close = await raw.close_frame()
            assert (close.code, close.reason) == (code, reason)
            await raw.eof()  # and the hub hangs up
            await send_batch(ok, 1, points(1))
            await wait_ack(ok, 1)  # others carry on
        hub.stop()
    message = (
        "unparsable frame: connection closed" if path == DEVICE_PATH else "unparsable control frame: connection closed"
    )
    logged = [r for r in caplog.records if r.getMessage() == message]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING
    assert (logged[0].kv["reason"], logged[0].kv["code"]) == (reason, code)
    if path == DEVICE_PATH:
        assert hub.stats.protocol_errors[reason] == 1
        assert any(f"reason={reason}" in ln for ln in status_lines(tmp_path))


@pytest.mark.parametrize("path", [DEVICE_PATH, CONTROL_PATH])
async def test_a_frame_over_the_limit_gets_1009_and_a_silent_peer_is_hung_up_on(tmp_path: Path, path: str) -> None:
    tokens = add_devices(tmp_path, "d1")
    tokens.update(add_operators(tmp_path, op="admin"))
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path, **{"server.max_message_bytes": 1024}))
        if path == DEVICE_PATH:
            raw = await Raw.open(hub.port, path, tokens["d1"])
            await raw.send_text(protocol.encode(Hello()))
            assert isinstance(await device_message(raw), protocol.Welcome)
        else:
            raw = await Raw.open(hub.port, path, tokens["op"])
            assert json.loads(await raw.message())["type"] == "auth_ok"
        # A frame announced as 1 MB, of which only 2 KiB come: past the limit, and nothing left unread.
        head = frame(TEXT, b"x" * 70000)[:14]
        assert head[1] == 0x80 | 127
        head = head[:2] + struct.pack("!Q", 1_000_000) + MASK
        await raw.stream.send_all(head + bytes(b ^ MASK[i % 4] for i, b in enumerate(b"x" * 2048)))
        close = await raw.close_frame()
        assert close.code == CloseCode.TOO_BIG
        await raw.eof()  # we never answer the close frame: the hub hangs up anyway
        hub.stop()


# ---------------------------------------------------------------------------- control endpoint


async def test_invalid_utf8_on_the_control_channel_is_a_bad_request_and_the_session_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hub.control")
    ops = add_operators(tmp_path, op="admin")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        raw = await Raw.open(hub.port, CONTROL_PATH, ops["op"])
        assert json.loads(await raw.message())["type"] == "auth_ok"
        await raw.stream.send_all(frame(TEXT, b'{"id": 1, "type": "device_add", "name": "x\xff"}'))
        reply = json.loads(await raw.message())
        assert reply["id"] is None and reply["success"] is False
        assert reply["error"]["code"] == "bad_request" and "UTF-8" in reply["error"]["message"]
        await raw.send_text(json.dumps({"id": 2, "type": "ping"}))
        assert json.loads(await raw.message()) == {"type": "pong", "id": 2}
        hub.stop()
    refused = [r for r in caplog.records if r.getMessage() == "request refused"]
    assert [r.kv["reason"] for r in refused] == ["bad_request"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_invalid_utf8_as_the_control_auth_message_is_auth_invalid(tmp_path: Path) -> None:
    add_operators(tmp_path, op="admin")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        raw = Raw(await open_tcp(hub.port))
        await raw.stream.send_all(raw.conn.send(Request(host="127.0.0.1", target=CONTROL_PATH)))
        assert isinstance(await raw.event(), AcceptConnection)
        assert json.loads(await raw.message())["type"] == "auth_required"
        await raw.stream.send_all(frame(TEXT, b'{"type": "auth", "token": "\xff"}'))
        assert json.loads(await raw.message())["type"] == "auth_invalid"
        assert (await raw.close_frame()).code == CloseCode.POLICY
        hub.stop()


async def test_pings_still_work_after_a_refused_frame(tmp_path: Path) -> None:
    """The tolerant decoder leaves control frames to wsproto: a ping after a bad frame is answered."""
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path))
        raw = await Raw.open(hub.port, DEVICE_PATH, tokens["d1"])
        await raw.send_text(protocol.encode(Hello()))
        assert isinstance(await device_message(raw), protocol.Welcome)
        await raw.stream.send_all(frame(TEXT, b"\x80") + frame(PING, b"hi"))
        seen: list[Any] = []
        while len(seen) < 2:  # the pong may come first: the library answers it while the session reads
            event = await raw.event()
            if isinstance(event, Pong):
                seen.append(event.payload)
            elif isinstance(event, TextMessage):
                seen.append(protocol.decode(event.data))
        assert b"hi" in seen and Error(ErrorCode.BAD_JSON, "text is not valid UTF-8") in seen
        hub.stop()
