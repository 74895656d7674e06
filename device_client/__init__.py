"""Device SDK for the telemetry hub: connect, stream points, get acks (see README.md)."""

from device_client.client import ClientStats, DeviceClient, backoff_delay, device_url
from device_client.outbox import Entry, Outbox, OutboxFull
from device_client.protocol import CloseCode, ErrorCode, Limits, ProtocolError, int_value

__all__ = [
    "ClientStats",
    "CloseCode",
    "DeviceClient",
    "Entry",
    "ErrorCode",
    "Limits",
    "Outbox",
    "OutboxFull",
    "ProtocolError",
    "backoff_delay",
    "device_url",
    "int_value",
]
