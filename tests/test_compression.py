"""Compressed telemetry (issue 14, item 4): the pure deflate/inflate, hello/welcome negotiation, the hub session's rules
for binary frames, and a real hub over loopback."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from bench import compression as bench
from device_client import DeviceClient, compression
from device_client.compression import DEFLATE_D1, SCHEMES, ZDICT, choose, deflate, inflate
from device_client.protocol import (
    Ack,
    CloseCode,
    CommandAck,
    Error,
    ErrorCode,
    Hello,
    ProtocolError,
    Telemetry,
    Welcome,
    decode,
    encode,
)
from device_client.session import Rejected, SessionState
from hub.devices import Refused
from tests.hubtools import (
    add_devices,
    connect,
    hello,
    hub_config,
    points,
    receive,
    start_hub,
    telemetry_lines,
    url,
)
from tests.sessionpair import SessionPair, point
from tests.waiting import eventually

LIMIT = 4096


def _telemetry_text(seq: int = 1, n: int = 3) -> str:
    return encode(Telemetry(seq, [point(i) for i in range(n)]))  # type: ignore[misc]


def _raw_deflate(data: bytes, level: int = 6) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, ZDICT)
    return c.compress(data) + c.flush()


class _Spy:
    """zlib's decompressobj, recording how many bytes each `decompress` call gave out."""

    outputs: list[int] = []

    def __init__(self, *args: Any, **kw: Any) -> None:
        self._inner = _REAL_DECOMPRESSOBJ(*args, **kw)

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        out = self._inner.decompress(data, max_length)
        _Spy.outputs.append(len(out))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


_REAL_DECOMPRESSOBJ = zlib.decompressobj


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    _Spy.outputs = []
    monkeypatch.setattr(compression.zlib, "decompressobj", _Spy)
    return _Spy.outputs


# ---------------------------------------------------------------------------- pure


def test_deflate_and_inflate_round_trip() -> None:
    for text in ["{}", _telemetry_text(n=1), _telemetry_text(n=100), '{"s":"héllo ☃"}']:
        frame = deflate(text)
        assert inflate(frame, LIMIT * 100) == text.encode()
    big = _telemetry_text(n=100)
    assert len(deflate(big)) < len(big) / 5


def test_a_message_of_exactly_the_limit_passes_one_byte_more_does_not() -> None:
    text = '{"pad":"' + "x" * (LIMIT - 10) + '"}'
    assert len(text) == LIMIT
    assert inflate(deflate(text), LIMIT) == text.encode()
    with pytest.raises(ProtocolError) as exc:
        inflate(deflate(text + " "), LIMIT)
    assert exc.value.code == ErrorCode.TOO_LARGE


@pytest.mark.parametrize("size", [1 << 20, 64 << 20])
def test_a_bomb_is_refused_after_inflating_limit_plus_one_bytes(spy: list[int], size: int) -> None:
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, ZDICT)
    chunk = bytes(1 << 20)
    frame = b"".join(c.compress(chunk) for _ in range(size >> 20)) + c.flush()
    assert len(frame) < size // 500
    with pytest.raises(ProtocolError) as exc:
        inflate(frame, LIMIT)
    assert exc.value.code == ErrorCode.TOO_LARGE
    assert spy == [LIMIT + 1]  # one call, bounded: the rest of the bomb is never inflated


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\xff\xfe garbage", "does not inflate"),
        (deflate(_telemetry_text())[:-3], "truncated"),
        (deflate(_telemetry_text()) + b"trailing", "after the end"),
        (b"", "truncated"),
        (zlib.compress(_telemetry_text().encode()), "does not inflate"),  # zlib-wrapped, not raw deflate
    ],
)
def test_what_does_not_inflate_to_one_whole_stream_is_bad_json(data: bytes, why: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        inflate(data, LIMIT)
    assert exc.value.code == ErrorCode.BAD_JSON and why in exc.value.detail


def test_a_stream_made_without_the_dictionary_inflates_too() -> None:
    # The dictionary only primes the window: a device too small for it may deflate without.
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    plain = c.compress(_telemetry_text().encode()) + c.flush()
    assert inflate(plain, LIMIT) == _telemetry_text().encode()


def test_any_window_and_level_of_the_device_inflates() -> None:
    text = _telemetry_text(n=50).encode()
    for wbits, mem_level, level in [(9, 1, 1), (10, 2, 6), (15, 9, 9)]:
        c = zlib.compressobj(level, zlib.DEFLATED, -wbits, mem_level, zlib.Z_DEFAULT_STRATEGY, ZDICT)
        assert inflate(c.compress(text) + c.flush(), LIMIT * 10) == text


def test_device_client_deflate_is_byte_identical_to_the_measured_scheme() -> None:
    # The figures of docs/benchmarks.md ("zjson+dict") hold for what device_client sends.
    scheme = next(s for s in bench.schemes() if s.name == "zjson+dict")
    _, make = bench.WORKLOADS["power"]
    for n in (1, 10, 100):
        encoder = scheme.encoder()
        for seq, pts in enumerate(make(n, n * 3), 1):
            text = encode(Telemetry(seq, pts))  # type: ignore[arg-type]
            assert deflate(text) == encoder(seq, pts)
    assert bench.ZDICT is ZDICT


def test_choose_takes_the_first_known_scheme_offered() -> None:
    assert choose(["zstd", DEFLATE_D1]) == DEFLATE_D1
    assert choose(["deflate-d2"]) is None
    assert choose([]) is None


# ---------------------------------------------------------------------------- messages


def test_hello_and_welcome_carry_the_offer_and_the_choice() -> None:
    offer = Hello(firmware="f", compress=SCHEMES)
    text = encode(offer)
    assert json.loads(text)["compress"] == [DEFLATE_D1]
    assert decode(text) == offer
    assert "compress" not in json.loads(encode(Hello()))  # what older devices send
    assert decode('{"type":"hello","proto":1}') == Hello()
    welcome = Welcome("d", 0, 1, 4, 10, 5.0, compress=DEFLATE_D1)
    assert json.loads(encode(welcome))["compress"] == DEFLATE_D1
    assert decode(encode(welcome)) == welcome
    plain = Welcome("d", 0, 1, 4, 10, 5.0)
    assert "compress" not in json.loads(encode(plain))
    assert decode(encode(plain)).compress is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"hello","proto":1,"compress":"deflate-d1"}',
        '{"type":"hello","proto":1,"compress":[1]}',
        '{"type":"hello","proto":1,"compress":null}',
        '{"type":"hello","proto":1,"compress":["' + "x" * 33 + '"]}',
        '{"type":"hello","proto":1,"compress":' + json.dumps(["a"] * 9) + "}",
        '{"type":"welcome","device":"d","ack":0,"epoch":1,"window":1,"max_points":1,"ping_interval":1,"proto":1,'
        '"compress":["deflate-d1"]}',
    ],
)
def test_bad_compress_fields_are_bad_messages(text: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        decode(text)
    assert exc.value.code == ErrorCode.BAD_MESSAGE


# ---------------------------------------------------------------------------- the two session ends


def test_negotiated_telemetry_goes_deflated_and_is_acked() -> None:
    pair = SessionPair()
    welcome = pair.connect(Hello(compress=SCHEMES))
    assert welcome.compress == DEFLATE_D1 and pair.hub.compress == DEFLATE_D1
    pair.queue(3, points=5)
    frames = pair.device_frames()
    assert all(type(f) is bytes for f in frames)
    events = pair.to_hub(frames)
    assert [type(e) for e in events] == [Telemetry] * 3
    assert [len(e.points) for e in events] == [5, 5, 5]  # type: ignore[union-attr]
    pair.make_durable()
    pair.to_device()
    assert len(pair.outbox) == 0 and pair.device.stats.compressed_sent == 3


@pytest.mark.parametrize("case", ["hub_off", "not_offered", "unknown_scheme"])
def test_without_agreement_telemetry_goes_as_text_and_binary_is_bad_frame(case: str) -> None:
    pair = SessionPair(compression=case != "hub_off")
    offer = {"hub_off": SCHEMES, "not_offered": (), "unknown_scheme": ("deflate-d9",)}[case]
    welcome = pair.connect(Hello(compress=offer))
    assert welcome.compress is None and pair.device.compress is None
    pair.queue()
    (frame,) = pair.device_frames()
    assert type(frame) is str
    (refused,) = pair.to_hub([deflate(_telemetry_text(seq=2))])
    assert isinstance(refused, Refused) and refused.error.code == ErrorCode.BAD_FRAME and refused.close is None


def test_the_device_ignores_a_scheme_it_did_not_offer() -> None:
    pair = SessionPair()
    pair.device.connect(Hello())
    pair.device.receive(encode(Welcome("d1", 0, 1, 4, 10, 5.0, compress=DEFLATE_D1)))
    assert pair.device.compress is None
    pair.queue()
    assert [type(f) for f in pair.device_frames()] == [str]


def test_a_bomb_closes_with_1009_before_any_parse() -> None:
    pair = SessionPair(max_message_bytes=LIMIT)
    pair.connect(Hello(compress=SCHEMES))
    bomb = _raw_deflate(bytes(1 << 20), 9)
    (refused,) = pair.to_hub([bomb])
    assert isinstance(refused, Refused) and refused.error.code == ErrorCode.TOO_LARGE
    assert refused.frame is None  # as for an oversized text frame: no error frame, the close says it
    assert refused.close is not None and refused.close.code == CloseCode.TOO_BIG
    assert pair.hub.state is SessionState.CLOSING


def test_a_compressed_text_over_the_limit_is_too_large_like_a_text_frame() -> None:
    pair = SessionPair(max_message_bytes=LIMIT)
    pair.connect(Hello(compress=SCHEMES))
    big = encode(Telemetry(1, [point(i) for i in range(200)]))  # type: ignore[misc]
    assert len(big) > LIMIT
    (refused,) = pair.to_hub([deflate(big)])
    assert isinstance(refused, Refused) and refused.close is not None and refused.close.code == CloseCode.TOO_BIG


def test_a_frame_that_does_not_inflate_is_bad_json_and_the_session_stays_open() -> None:
    pair = SessionPair()
    pair.connect(Hello(compress=SCHEMES))
    garbage, truncated = pair.to_hub([b"\x00\x01garbage", deflate(_telemetry_text(seq=1))[:-4]])
    for refused in (garbage, truncated):
        assert isinstance(refused, Refused) and refused.error.code == ErrorCode.BAD_JSON and refused.close is None
        assert refused.frame is not None and decode(refused.frame) == Error("bad_json", refused.error.detail)
    assert pair.hub.state is SessionState.OPEN
    pair.queue()
    assert [type(e) for e in pair.to_hub()] == [Telemetry]


def test_bad_inflates_count_against_the_error_budget() -> None:
    pair = SessionPair(max_errors=2)
    pair.connect(Hello(compress=SCHEMES))
    events = pair.to_hub([b"x", b"y", b"z"])
    assert [e.close for e in events[:2]] == [None, None]  # type: ignore[union-attr]
    close = events[2].close  # type: ignore[union-attr]
    assert close is not None and (close.code, close.error) == (CloseCode.POLICY, ErrorCode.TOO_MANY_ERRORS)


def test_invalid_utf8_inside_is_bad_json_with_its_seq_as_in_a_text_frame() -> None:
    pair = SessionPair()
    pair.connect(Hello(compress=SCHEMES))
    data = b'{"type":"telemetry","seq":1,"points":[{"measurement":"\xff","ts":1764000000000,"fields":{"v":1.0}}]}'
    pair.queue()  # seq 1 in the device's outbox: the refusal names it
    pair.device_frames()
    (refused,) = pair.to_hub([_raw_deflate(data)])
    assert isinstance(refused, Refused) and (refused.error.code, refused.error.seq) == (ErrorCode.BAD_JSON, 1)
    assert refused.error.detail == "text is not valid UTF-8" and refused.close is None
    (rejected,) = pair.to_device()
    assert isinstance(rejected, Rejected) and (rejected.seq, rejected.code) == (1, ErrorCode.BAD_JSON)


def test_only_telemetry_may_be_compressed() -> None:
    pair = SessionPair()
    pair.connect(Hello(compress=SCHEMES))
    ack, command_ack = pair.to_hub([deflate(encode(Ack(1))), deflate(encode(CommandAck("c1")))])
    for refused in (ack, command_ack):
        assert isinstance(refused, Refused) and refused.error.code == ErrorCode.BAD_FRAME


def test_invalid_points_inside_are_refused_as_in_a_text_frame() -> None:
    pair = SessionPair()
    pair.connect(Hello(compress=SCHEMES))
    text = json.dumps({"type": "telemetry", "seq": 4, "points": [{"measurement": "m", "ts": 5, "fields": {"v": 1}}]})
    (refused,) = pair.to_hub([deflate(text)])
    assert isinstance(refused, Refused) and (refused.error.code, refused.resolve) == (ErrorCode.BAD_TIME, 4)


def test_a_reconnect_to_a_hub_without_compression_resends_as_text() -> None:
    pair = SessionPair()
    pair.connect(Hello(compress=SCHEMES))
    pair.queue(2)
    assert [type(f) for f in pair.device_frames()] == [bytes, bytes]  # lost with the connection: never acked
    pair.drop()
    pair._hub_args["compression"] = False
    pair.connect(Hello(compress=SCHEMES))
    events = pair.to_hub()
    assert [type(e) for e in events] == [Telemetry, Telemetry]
    pair.make_durable()
    pair.to_device()
    assert len(pair.outbox) == 0
    pair.drop()
    pair._hub_args["compression"] = True
    pair.connect(Hello(compress=SCHEMES))
    pair.queue()
    assert [type(f) for f in pair.device_frames()] == [bytes]


def test_the_size_check_of_a_batch_is_on_its_inflated_bytes() -> None:
    # The outbox checks the JSON text, which `encode` writes in ASCII: characters are the bytes the hub inflates.
    pair = SessionPair(max_message_bytes=LIMIT)
    pair.connect(Hello(compress=SCHEMES))
    assert pair.outbox.max_message == LIMIT
    with pytest.raises(ProtocolError) as exc:
        pair.outbox.add([point(0, s="é" * 1000)])  # 1000 characters, 6000 bytes of JSON (\u00e9)
    assert exc.value.code == ErrorCode.TOO_LARGE
    pair.outbox.add([point(0, s="é" * 600)])
    (frame,) = pair.device_frames()
    assert type(frame) is bytes and len(inflate(frame, LIMIT)) <= LIMIT
    assert [type(e) for e in pair.to_hub([frame])] == [Telemetry]


# ---------------------------------------------------------------------------- a real hub over loopback


async def test_a_real_hub_takes_compressed_frames_and_closes_1009_on_a_bomb(tmp_path: Path) -> None:
    data_dir = tmp_path / "hub"
    tokens = add_devices(data_dir, "zip", "plain", "bomb")
    config = hub_config(data_dir, **{"server.max_message_bytes": LIMIT * 4})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with connect(hub, tokens["zip"]) as ws:
            assert (await hello(ws, compress=SCHEMES)).compress == DEFLATE_D1
            await ws.send_message(deflate(encode(Telemetry(1, points(20)))))  # type: ignore[arg-type]
            await ws.send_message(b"not deflate")
            assert await receive(ws) == Error("bad_json", "compressed frame does not inflate")
            assert await receive(ws) == Ack(1)
        async with connect(hub, tokens["plain"]) as ws:
            assert (await hello(ws)).compress is None
            await ws.send_message(deflate(encode(Telemetry(1, points(20)))))  # type: ignore[arg-type]
            assert await receive(ws) == Error("bad_frame", "binary frames are not accepted")
        async with connect(hub, tokens["bomb"]) as ws:
            await hello(ws, compress=SCHEMES)
            bomb = _raw_deflate(bytes(8 << 20), 9)
            assert len(bomb) < LIMIT * 4  # within the frame limit: only inflating finds it
            await ws.send_message(bomb)
            with pytest.raises(ConnectionClosed) as closed, trio.fail_after(10):
                await ws.get_message()
            assert closed.value.reason.code == CloseCode.TOO_BIG
        await eventually(lambda: hub.presence.status["bomb"].state == "offline")
        assert hub.presence.status["bomb"].reason == "too_big"
        hub.stop()
    assert len(telemetry_lines(data_dir)) == 20
    assert hub.stats.protocol_errors == {"bad_json": 1, "bad_frame": 1, "too_large": 1}
    assert hub.stats.compressed_in == 4 and hub.stats.compressed_bytes_in > len(bomb)


@pytest.mark.parametrize("hub_compression", [True, False])
async def test_device_client_compresses_when_the_hub_offers_it_else_sends_text(
    tmp_path: Path, hub_compression: bool
) -> None:
    data_dir = tmp_path / "hub"
    tokens = add_devices(data_dir, "d")
    config = hub_config(data_dir, **{"server.compression": hub_compression})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with DeviceClient(url(hub), tokens["d"], backoff_initial=0.05) as client:
            for k in range(5):
                await client.send_batch(points(10, start=k * 10))
            with trio.fail_after(30):
                await client.wait_acked()
        hub.stop()
    stats = client.stats
    assert (stats.batches_acked, stats.rejected) == (5, 0)
    assert stats.compressed_sent == (5 if hub_compression else 0)
    assert len(telemetry_lines(data_dir)) == 50 and not hub.stats.protocol_errors
