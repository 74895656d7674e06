"""WebSocket unmasking in C (hub/edge/_unmask.c) against RFC 6455's rule, byte by byte, over payloads read in pieces."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto import frame_protocol

from hub.edge._wire import Masker, unmask


def xor(data: bytes, key: bytes, offset: int = 0) -> bytes:
    """RFC 6455 section 5.3: octet i of the payload XOR octet (i mod 4) of the key."""
    return bytes(b ^ key[(offset + i) % 4] for i, b in enumerate(data))


def test_compiled_and_in_place() -> None:
    # setup.py compiles it where a C compiler is at hand (CI installs one): a test run without it fails here.
    assert unmask is not None
    assert frame_protocol.XorMaskerSimple is Masker


@given(st.binary(min_size=4, max_size=4), st.lists(st.binary(max_size=70), max_size=6))
def test_pieces_continue_where_the_last_ended(key: bytes, pieces: list[bytes]) -> None:
    masker = Masker(bytearray(key))
    out = b"".join(masker.process(piece) for piece in pieces)
    assert out == xor(b"".join(pieces), key)


@given(st.binary(min_size=4, max_size=4), st.binary(max_size=100), st.integers(0, 11))
def test_unmask_from_any_offset(key: bytes, data: bytes, offset: int) -> None:
    out = unmask(data, key, offset)
    assert type(out) is bytearray and out == xor(data, key, offset)
    assert unmask(out, key, offset) == data


def test_large_payload() -> None:
    data = bytes(range(256)) * 4099  # not a multiple of 8: the word loop and the byte tail
    assert unmask(data, b"\x01\x80\xff\x10", 3) == xor(data, b"\x01\x80\xff\x10", 3)


@pytest.mark.parametrize(("key", "offset"), [(b"abc", 0), (b"abcde", 0), (b"abcd", -1)])
def test_bad_arguments(key: bytes, offset: int) -> None:
    with pytest.raises(ValueError, match="4 bytes"):
        unmask(b"x", key, offset)


def test_a_masked_frame_round_trips_through_wsproto() -> None:
    # A client's masked text frame (wsproto masks it with Masker too) parsed by a server-side decoder.
    client = frame_protocol.FrameProtocol(client=True, extensions=[])
    server = frame_protocol.FrameProtocol(client=False, extensions=[])
    text = "héllo " * 1000
    server.receive_bytes(client.send_data(text, fin=True))
    frames = list(server.received_frames())
    assert "".join(str(f.payload) for f in frames) == text
