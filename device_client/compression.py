"""Compressed telemetry, pure and standard library only: raw deflate with the protocol's preset dictionary.

A device offers `SCHEMES` in `hello`; once the `welcome` names one, it may send each telemetry message as a binary
frame holding `deflate(text)`. The hub reads it with `inflate`, which refuses a decompression bomb after at most
`limit + 1` bytes of output. Nothing is kept between messages (a fresh zlib object each time), so an idle connection
holds no compression state. The rules are in docs/protocol.md ("Compressed telemetry").
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from device_client.protocol import ErrorCode, ProtocolError

__all__ = ["DEFLATE_D1", "SCHEMES", "ZDICT", "choose", "deflate", "inflate"]

#: Raw deflate (RFC 1951) of the message's UTF-8 JSON with preset dictionary `ZDICT`, version 1 of it.
DEFLATE_D1 = "deflate-d1"
#: The schemes this side knows, most preferred first.
SCHEMES = (DEFLATE_D1,)

#: The preset dictionary of version 1: the protocol's common strings (deflate prefers recent matches: the commonest come
#: last). Never change it: a new dictionary is a new scheme name.
ZDICT = (
    b'"int":{"int":"tags":{}},"tags":{"site":"}}]}"fields":{"value":'
    b'"measurement":"},{"measurement":"{"type":"telemetry","seq":,"points":[{"measurement":"'
)

_WBITS = -15  # raw deflate, 32 KiB window: the inflater reads a stream made with any smaller window too
_LEVEL = 6


def choose(offered: Sequence[str], known: Sequence[str] = SCHEMES) -> str | None:
    """The first scheme of `known` that the peer `offered`, or None."""
    return next((scheme for scheme in known if scheme in offered), None)


def deflate(text: str) -> bytes:
    """The payload of a compressed frame: `text` as UTF-8, raw-deflated at level 6 with `ZDICT`."""
    c = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS, 8, zlib.Z_DEFAULT_STRATEGY, ZDICT)
    return c.compress(text.encode()) + c.flush()


def inflate(data: bytes, limit: int) -> bytes:
    """The bytes a compressed frame holds, at most `limit` of them.

    Raises `ProtocolError`: `too_large` when more than `limit` bytes would come out (found after inflating at most
    `limit + 1`: a bomb is never inflated whole), `bad_json` when `data` is not one complete raw deflate stream
    (corrupt, truncated, or with bytes after its end).
    """
    d = zlib.decompressobj(_WBITS, zdict=ZDICT)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error:
        raise ProtocolError(ErrorCode.BAD_JSON, "compressed frame does not inflate") from None
    if len(out) > limit or d.unconsumed_tail:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"inflates to more than {limit} bytes")
    if not d.eof:
        raise ProtocolError(ErrorCode.BAD_JSON, "compressed frame is truncated")
    if d.unused_data:
        raise ProtocolError(ErrorCode.BAD_JSON, "bytes after the end of the compressed stream")
    return out
