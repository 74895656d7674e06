"""Device presence: online / late / offline with a reason and the session epoch, written as points.

The machine is _presence_states.py. `since` (shown to operators, and the points' time) is Unix time; how long a
device has been in its state is counted on trio's clock, so the late check runs on a mock clock in tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import attrs
import trio

from hub.fleet._presence_states import (
    CONNECTED_STATES,
    INITIAL_STATE,
    SEEN_STATES,
    PresenceEvent,
    PresenceState,
    allows,
    next_state,
)
from hub.ingest import line

__all__ = ["DeviceStatus", "Presence"]

log = logging.getLogger("hub.presence")

#: Measurement of presence points: tags device, reason; fields online (1/0), late (1/0), epoch.
STATUS_MEASUREMENT = "device_status"
#: Seconds between checks for late devices.
LATE_CHECK_EVERY = 1.0


@attrs.frozen
class DeviceStatus:
    """What the hub knows of one device's presence."""

    state: PresenceState = attrs.field(converter=PresenceState)  # online, late or offline (never has no status)
    epoch: int
    since: float  # Unix time of the last transition
    reason: str
    firmware: str = ""
    model: str = ""
    interval: float = 0.0
    changed_at: float = 0.0  # trio's clock at the last transition

    @property
    def online(self) -> bool:
        """Connected (online or late)."""
        return self.state in CONNECTED_STATES


class Presence:
    """Keeps each device's status and writes every transition into the pipeline.

    Transitions of an older session epoch than the current one are ignored, so a replaced
    session's late "offline" never overrides its successor's "online". In a cluster, `claim` (hub.cluster) is
    asked first: it stores the transition for every hub unless a newer session of the device, on any hub, has
    stored its own; then the transition is dropped here too.
    """

    def __init__(
        self,
        submit: Callable[[str, int, None], Awaitable[None]],
        *,
        late_factor: float = 1.5,
        late_grace: float = 2.0,
        on_change: Callable[[str], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._submit = submit
        self._late_factor = late_factor
        self._late_grace = late_grace
        self.on_change = on_change
        self.claim: Callable[[str, DeviceStatus], Awaitable[bool]] | None = None
        self._clock = clock  # Unix time, for `since`, the points and the age of `last_seen`
        self._last_ts: dict[str, int] = {}
        self.status: dict[str, DeviceStatus] = {}
        self.closed = False

    def counts(self) -> dict[str, int]:
        """Devices by state (online, late, offline) among those seen since the hub started."""
        out: dict[str, int] = dict.fromkeys(SEEN_STATES, 0)
        for s in self.status.values():
            out[s.state] += 1
        return out

    def online_count(self) -> int:
        """Devices connected now (online or late)."""
        return sum(1 for s in self.status.values() if s.online)

    async def online(self, name: str, epoch: int, *, firmware: str, model: str, interval: float) -> None:
        """Mark `name` online under session `epoch`."""
        current = self.status.get(name)
        if current is not None and current.epoch > epoch:
            return
        state = next_state(INITIAL_STATE if current is None else current.state, PresenceEvent.CONNECT)
        now = trio.current_time()
        await self._set(name, DeviceStatus(state, epoch, self._clock(), "connected", firmware, model, interval, now))

    async def offline(self, name: str, epoch: int, reason: str) -> None:
        """Mark `name` offline if `epoch` is still its current session."""
        current = self.status.get(name)
        if current is None or current.epoch != epoch or not allows(current.state, PresenceEvent.DISCONNECT):
            return
        await self._move(name, current, PresenceEvent.DISCONNECT, reason)

    def set_interval(self, name: str, epoch: int, interval: float) -> bool:
        """The device reports a new interval (its twin) under session `epoch`: late is judged by it from now on."""
        current = self.status.get(name)
        if current is None or current.epoch != epoch or not current.online:
            return False
        self.status[name] = attrs.evolve(current, interval=interval)
        return True

    async def seen(self, name: str) -> None:
        """Telemetry arrived: a late device is online again."""
        current = self.status.get(name)
        if current is not None and allows(current.state, PresenceEvent.DATA):
            await self._move(name, current, PresenceEvent.DATA, "data")

    async def watch_late(
        self,
        last_seen: Callable[[str], float | None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Mark devices late that declared an interval and sent nothing for interval x factor + grace.

        `last_seen(name)` is the Unix time of the device's last telemetry, or None."""
        task_status.started()
        while True:
            await trio.sleep(LATE_CHECK_EVERY)
            now, wall = trio.current_time(), self._clock()
            for name in list(self.status):
                status = self.status.get(name)  # as it is now: an earlier point may have waited for the pipeline
                if status is None or status.interval <= 0 or not allows(status.state, PresenceEvent.SILENT):
                    continue
                quiet = now - status.changed_at
                seen = last_seen(name)
                if seen is not None:
                    quiet = min(quiet, wall - seen)
                if quiet > status.interval * self._late_factor + self._late_grace:
                    await self._move(name, status, PresenceEvent.SILENT, "no_data")

    async def _move(self, name: str, current: DeviceStatus, event: PresenceEvent, reason: str) -> None:
        """`event` happened to `name` (raises `IllegalTransition` if its state does not take it)."""
        state = next_state(current.state, event)
        now = trio.current_time()
        await self._set(name, attrs.evolve(current, state=state, since=self._clock(), reason=reason, changed_at=now))

    def forget(self, name: str, epoch: int) -> bool:
        """A session `epoch` of `name` started on another hub: drop what is known here of older sessions (their
        end is not news). True if something was dropped."""
        current = self.status.get(name)
        if current is None or current.epoch >= epoch:
            return False
        del self.status[name]
        return True

    async def _set(self, name: str, status: DeviceStatus) -> None:
        self.status[name] = status  # first: a transition that follows while the claim is out starts from it
        if self.claim is not None and not await self.claim(name, status):
            log.info("device presence superseded", extra={"kv": {"device": name, "epoch": status.epoch}})
            if self.status.get(name) is status:
                del self.status[name]
            return
        log.info(
            "device " + status.state,
            extra={"kv": {"device": name, "epoch": status.epoch, "reason": status.reason}},
        )
        if self.on_change is not None:
            await self.on_change(name)
        await self.write_point(name, status)

    async def write_point(self, name: str, status: DeviceStatus) -> None:
        """Write a `device_status` point of `name` (also for a device whose hub was lost, by the hub that saw it)."""
        if self.closed:
            return
        # Strictly increasing per device, so two transitions in one millisecond keep their order.
        ts = max(int(self._clock() * 1000), self._last_ts.get(name, 0) + 1)
        self._last_ts[name] = ts
        fields = {
            "online": {"int": int(status.online)},
            "late": {"int": int(status.state is PresenceState.LATE)},
            "epoch": {"int": status.epoch},
        }
        text = line(STATUS_MEASUREMENT, {"device": name, "reason": status.reason}, fields, ts)
        try:
            await self._submit(text + "\n", 1, None)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            # Shutdown closed the pipeline while this point waited for room: the hub is stopping, drop it.
            log.debug("presence point not written: pipeline closed", extra={"kv": {"device": name}})
