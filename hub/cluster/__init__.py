"""Many hubs, one fleet: the bus between hub processes (Redis pub/sub) and what crosses it (docs/scaling.md).

`_messages` (the bus messages, pure), `_bus` (channels, the publishing queue, heartbeats and the presence script),
`_cluster` (one hub's part: presence, commands, telemetry and revocations across hubs).
"""

from hub.cluster._bus import HEARTBEAT_EVERY, HUB_TTL, Bus, LostDevice
from hub.cluster._cluster import Cluster, RemoteSender
from hub.cluster._messages import BadMessage, Kind, decode, encode

__all__ = [
    "HEARTBEAT_EVERY",
    "HUB_TTL",
    "BadMessage",
    "Bus",
    "Cluster",
    "Kind",
    "LostDevice",
    "RemoteSender",
    "decode",
    "encode",
]
