"""Device presence: online/offline state with reason and session epoch, written as points."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import attrs

from hub.lineproto import line

__all__ = ["DeviceStatus", "Presence"]

log = logging.getLogger("hub.presence")

#: Measurement of presence points: tags device, reason; fields online (1/0), epoch.
STATUS_MEASUREMENT = "device_status"


@attrs.frozen
class DeviceStatus:
    """What the hub knows of one device's presence."""

    online: bool
    epoch: int
    since: float  # Unix time of the last transition
    reason: str
    firmware: str = ""
    model: str = ""
    interval: float = 0.0


class Presence:
    """Keeps each device's status and writes every transition into the pipeline.

    Transitions of an older session epoch than the current one are ignored, so a replaced
    session's late "offline" never overrides its successor's "online".
    """

    def __init__(self, submit: Callable[[str, int, None], Awaitable[None]]) -> None:
        self._submit = submit
        self._last_ts: dict[str, int] = {}
        self.status: dict[str, DeviceStatus] = {}
        self.closed = False

    def online_count(self) -> int:
        """Devices online now."""
        return sum(1 for s in self.status.values() if s.online)

    async def online(self, name: str, epoch: int, *, firmware: str, model: str, interval: float) -> None:
        """Mark `name` online under session `epoch`."""
        current = self.status.get(name)
        if current is not None and current.epoch > epoch:
            return
        self.status[name] = DeviceStatus(True, epoch, time.time(), "connected", firmware, model, interval)
        await self._write(name, epoch, True, "connected")

    async def offline(self, name: str, epoch: int, reason: str) -> None:
        """Mark `name` offline if `epoch` is still its current session."""
        current = self.status.get(name)
        if current is None or current.epoch != epoch or not current.online:
            return
        self.status[name] = attrs.evolve(current, online=False, since=time.time(), reason=reason)
        await self._write(name, epoch, False, reason)

    async def _write(self, name: str, epoch: int, online: bool, reason: str) -> None:
        log.info(
            "device online" if online else "device offline",
            extra={"kv": {"device": name, "epoch": epoch, "reason": reason}},
        )
        if self.closed:
            return
        # Strictly increasing per device, so two transitions in one millisecond keep their order.
        ts = max(int(time.time() * 1000), self._last_ts.get(name, 0) + 1)
        self._last_ts[name] = ts
        text = line(
            STATUS_MEASUREMENT,
            {"device": name, "reason": reason},
            {"online": {"int": int(online)}, "epoch": {"int": epoch}},
            ts,
        )
        await self._submit(text + "\n", 1, None)
