"""Device SDK for the telemetry hub: connect, stream points, get acks, answer commands (see README.md)."""

from device_client.client import (
    ClientStats,
    CommandContext,
    DeviceClient,
    InsecureURLError,
    TLSHandshakeError,
    backoff_delay,
    device_url,
)
from device_client.outbox import CommandLog, Entry, Outbox, OutboxFull
from device_client.protocol import MAX_RESULT_BYTES, CloseCode, ErrorCode, Limits, ProtocolError, int_value
from device_client.session import DeviceConnection, SessionState

__all__ = [
    "MAX_RESULT_BYTES",
    "ClientStats",
    "CloseCode",
    "CommandContext",
    "CommandLog",
    "DeviceClient",
    "DeviceConnection",
    "Entry",
    "ErrorCode",
    "InsecureURLError",
    "Limits",
    "Outbox",
    "OutboxFull",
    "ProtocolError",
    "SessionState",
    "TLSHandshakeError",
    "backoff_delay",
    "device_url",
    "int_value",
]
