"""Pre-encoded device-protocol frames for the lean load generator (pure: no I/O)."""

from __future__ import annotations

__all__ = [
    "ACK_PREFIX",
    "BASE_TS",
    "COMMAND_RESULT_PREFIX",
    "FIELDS_PER_POINT",
    "client_frame",
    "parse_ack",
    "points_for",
    "telemetry_template",
]

#: Device timestamps of every run start here (2023-11-14); point k of a device in a run has ts BASE_TS + k.
BASE_TS = 1_700_000_000_000
#: Fields in each generated point: VictoriaMetrics stores each as its own series (`<measurement>_value`, `_n`).
FIELDS_PER_POINT = 2
#: What `protocol.encode(Ack(seq))` starts with: acks are recognised without a JSON parse.
ACK_PREFIX = '{"type":"ack","seq":'
#: What `protocol.encode(CommandResult(...))` starts with (the baseline relay forwards these).
COMMAND_RESULT_PREFIX = '{"type":"command_result"'
#: How every telemetry message of `telemetry_template` begins; its seq follows.
TELEMETRY_PREFIX = '{"type":"telemetry","seq":'

_VALUE = 21.537  # not a short literal: float formatting costs what it costs for real readings


def _point_json(measurement: str) -> str:
    # One realistic point: a float reading, an integer counter, one tag; `%d` is its timestamp.
    return (
        '{"measurement":"' + measurement + '","ts":%d,"fields":{"value":' + repr(_VALUE) + ',"n":{"int":7}},'
        '"tags":{"site":"s1"}}'
    )


def telemetry_template(measurement: str, points: int) -> bytes:
    """A telemetry message with `%d` placeholders: seq first, then one timestamp per point.

    `template % (seq, ts0, ts0 + 1, ...)` is the message: the only per-message work is one bytes format.
    """
    body = ",".join([_point_json(measurement)] * points)
    return ('{"type":"telemetry","seq":%d,"points":[' + body + "]}").encode()


def points_for(measurement: str, first_ts: int, count: int) -> list[dict[str, object]]:
    """The same points as `telemetry_template` carries, as the dicts `device_client` sends."""
    return [
        {"measurement": measurement, "ts": first_ts + i, "fields": {"value": _VALUE, "n": 7}, "tags": {"site": "s1"}}
        for i in range(count)
    ]


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final WebSocket frame from a client, masked with the all-zero key (so the payload is sent as is).

    A server unmasks every frame the same way whatever the key, so its cost is unchanged; the generator
    saves the XOR pass that `wsproto` would spend on random keys.
    """
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + b"\x00\x00\x00\x00" + payload


def parse_ack(text: str) -> int | None:
    """The seq of an `ack` message, or None if `text` is another message."""
    if text.startswith(ACK_PREFIX) and text.endswith("}"):
        try:
            return int(text[len(ACK_PREFIX) : -1])
        except ValueError:
            return None
    return None
