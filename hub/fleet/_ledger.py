"""Per-device sequence ledgers: what was handed to the pipeline, what is durable, who to ack.

The registry keeps each device's acked seq across restarts. It is saved every `SAVE_EVERY` seconds and at shutdown,
not before each ack (a commit per batch was 7% of the hub's time): after a crash it may be behind the last ack sent,
so `welcome.ack` says less than the device knows. That is safe: the device keeps what it dropped dropped, resends
what is still in its outbox, and numbers new batches above the larger of the two (docs/protocol.md).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import attrs
import trio

from device_client.protocol import Point
from hub.fleet._store import RegistryStore, StoreUnavailable

__all__ = ["SAVE_EVERY", "DeviceLedger", "Ledgers"]

log = logging.getLogger("hub.ledger")

#: Seconds between saves of the acked seqs to the registry.
SAVE_EVERY = 1.0
#: Devices whose latest values are copied for a save in one step of the loop.
LATEST_CHUNK = 200
#: Devices whose ledgers advance (and whose acks go out) in one step of the loop, after a write.
ACK_CHUNK = 16


class Listener(Protocol):
    """What a ledger tells the device's session."""

    def durable_advanced(self) -> None:
        """`durable` grew: an ack is due."""


@attrs.define(eq=False)
class DeviceLedger:
    """Sequence state of one device, shared by its successive sessions.

    `durable` only grows, and only once every batch up to it is in the sink or the spool, so an ack sent
    from it never loses a point. `submitted` is the highest seq handed to the pipeline (or refused).
    """

    name: str
    durable: int
    submitted: int
    last_seen: float | None = None  # Unix time of the last telemetry message
    latest: dict[str, Point] = attrs.field(factory=dict)  # measurement -> its newest point
    listener: Listener | None = None  # the connected session: told of every advance (it sends the ack)
    latest_saved: float | None = None  # the `last_seen` of the latest values last handed to the store
    _changed: trio.Event | None = None  # made only while someone waits in `wait_beyond`

    def advance(self, seq: int) -> None:
        """Record that every batch up to `seq` is durable (or resolved); wake the session and any waiter."""
        if seq > self.durable:
            self.durable = seq
            self.submitted = max(self.submitted, seq)
            if self.listener is not None:
                self.listener.durable_advanced()
            if self._changed is not None:
                self._changed.set()
                self._changed = None

    async def wait_beyond(self, seq: int) -> int:
        """Wait until `durable` exceeds `seq`; return the new value."""
        while self.durable <= seq:
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()
        return self.durable


class Ledgers:
    """All device ledgers of this hub process, and the pipeline's durability callback."""

    def __init__(self, store: RegistryStore) -> None:
        self._store = store
        self._by_name: dict[str, DeviceLedger] = {}
        self._unsaved: dict[str, int] = {}  # device -> durable seq the registry does not have yet
        # Ledgers whose latest values may have changed since the last save: those with new durable data, and those
        # saved last time (telemetry updates `latest` after its batch is submitted, possibly after it is durable).
        self._latest_dirty: set[DeviceLedger] = set()
        self._latest_recent: set[DeviceLedger] = set()
        self.latest_failures = 0  # saves of latest values that failed (dropped: newer values come)

    def get(self, name: str, acked_seq: int) -> DeviceLedger:
        """The ledger of `name`, created from the registry's stored seq on first use."""
        ledger = self._by_name.get(name)
        if ledger is None:
            ledger = self._by_name[name] = DeviceLedger(name, acked_seq, acked_seq)
        return ledger

    def find(self, name: str) -> DeviceLedger | None:
        """The ledger of `name` if it connected since the hub started."""
        return self._by_name.get(name)

    def on_durable_callback(self) -> Callable[[list[tuple[object, int]]], Awaitable[None]]:
        """The pipeline's `on_durable`: let acks go out; the registry learns the new seqs at the next save."""

        async def on_durable(marks: list[tuple[object, int]]) -> None:
            best: dict[DeviceLedger, int] = {}
            for ledger, seq in marks:
                assert isinstance(ledger, DeviceLedger)
                if seq > best.get(ledger, 0):
                    best[ledger] = seq
            unsaved = self._unsaved
            advanced = 0
            for ledger, seq in best.items():
                if seq > ledger.durable:
                    ledger.advance(seq)  # its session writes the ack, or wakes its outbound task to
                    unsaved[ledger.name] = seq
                    advanced += 1
                    if not advanced % ACK_CHUNK:
                        await trio.lowlevel.checkpoint()  # a write's acks, a chunk a step: no long loop round
            self._latest_dirty.update(best)

        return on_durable

    async def save_loop(
        self, every: float = SAVE_EVERY, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Save the acked seqs, then the latest values that changed, every `every` seconds; runs until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(every)
            if self._unsaved:
                updates, self._unsaved = self._unsaved, {}
                try:
                    await self._store.save_acked(updates)
                except StoreUnavailable as exc:
                    log.warning("acked seqs not saved, kept for the next try", extra={"kv": {"error": str(exc)}})
                    self._keep(updates)
                    continue  # the store is away: no latest values either (dropped, newer ones come)
            await self._save_latest()

    async def _changed_latest(self) -> dict[str, tuple[float, dict[str, Point]]]:
        """``(last_seen, latest)`` of every device whose values changed since they were last handed to the store.

        Copied `LATEST_CHUNK` devices a step: in one step, 1,000 streaming devices held the loop for 1.6-2.6 ms.
        A device whose values change meanwhile is looked at again next time (it is among the recent ones)."""
        candidates = self._latest_dirty | self._latest_recent
        self._latest_dirty = set()
        recent: set[DeviceLedger] = set()
        values: dict[str, tuple[float, dict[str, Point]]] = {}
        for i, ledger in enumerate(candidates):
            if i and not i % LATEST_CHUNK:
                await trio.lowlevel.checkpoint()
            seen = ledger.last_seen
            if seen is not None and seen != ledger.latest_saved:
                values[ledger.name] = seen, dict(ledger.latest)
                ledger.latest_saved = seen
                recent.add(ledger)
        self._latest_recent = recent
        return values

    async def _save_latest(self) -> None:
        values = await self._changed_latest()
        if not values:
            return
        try:
            await self._store.save_latest(values)
        except StoreUnavailable as exc:
            self.latest_failures += 1
            log.debug("latest values not saved", extra={"kv": {"devices": len(values), "error": str(exc)}})

    def _keep(self, updates: Mapping[str, int]) -> None:
        """Put back seqs a save could not write (a newer one that arrived since wins)."""
        for name, seq in updates.items():
            if seq > self._unsaved.get(name, 0):
                self._unsaved[name] = seq

    async def save(self) -> None:
        """Save what `save_loop` has not yet (at shutdown, once the pipeline has drained)."""
        updates, self._unsaved = self._unsaved, {}
        if updates:
            try:
                await self._store.save_acked(updates)
            except StoreUnavailable as exc:
                # Safe, as after a crash: the welcome tells these devices less than they know (see above).
                log.error(
                    "acked seqs not saved at shutdown", extra={"kv": {"devices": len(updates), "error": str(exc)}}
                )
                return
        await self._save_latest()
