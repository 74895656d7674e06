"""Device SDK for the telemetry hub: connect, stream points, get acks, answer commands (see README.md)."""

from device_client.client import (
    ClientStats,
    CommandContext,
    CommandHandler,
    DesiredHandler,
    DeviceClient,
    InsecureURLError,
    TLSHandshakeError,
    backoff_delay,
    device_url,
)
from device_client.outbox import CommandLog, Entry, Outbox, OutboxFull, PendingReport, TwinLog
from device_client.protocol import (
    JSON,
    MAX_RESULT_BYTES,
    CloseCode,
    ErrorCode,
    FieldValue,
    Limits,
    Point,
    ProtocolError,
    int_value,
)
from device_client.session import DeviceConnection, SessionState

__all__ = [
    "JSON",
    "MAX_RESULT_BYTES",
    "ClientStats",
    "CloseCode",
    "CommandContext",
    "CommandHandler",
    "CommandLog",
    "DesiredHandler",
    "DeviceClient",
    "DeviceConnection",
    "Entry",
    "ErrorCode",
    "FieldValue",
    "InsecureURLError",
    "Limits",
    "Outbox",
    "OutboxFull",
    "PendingReport",
    "Point",
    "ProtocolError",
    "SessionState",
    "TLSHandshakeError",
    "TwinLog",
    "backoff_delay",
    "device_url",
    "int_value",
]
