"""Per-device sequence ledgers: what was handed to the pipeline, what is durable, who to ack.

The registry keeps each device's acked seq across restarts. It is saved every `SAVE_EVERY` seconds and at shutdown,
not before each ack (a commit per batch was 7% of the hub's time): after a crash it may be behind the last ack sent,
so `welcome.ack` says less than the device knows. That is safe: the device keeps what it dropped dropped, resends
what is still in its outbox, and numbers new batches above the larger of the two (docs/protocol.md).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import attrs
import trio

from device_client.protocol import Point
from hub.fleet._store import RegistryStore, StoreUnavailable

__all__ = ["ACK_SPREAD", "SAVE_EVERY", "DeviceLedger", "Ledgers"]

log = logging.getLogger("hub.ledger")

#: Seconds between saves of the acked seqs to the registry.
SAVE_EVERY = 1.0
#: Devices whose latest values are copied for a save in one step of the loop.
LATEST_CHUNK = 200
#: Devices told of a write (their acks go out) in one step of the loop.
ACK_CHUNK = 8
#: Seconds over which the acks of one write are spread, `ACK_CHUNK` devices at a time, while `ack_loop` runs and no
#: later write's acks wait. All at once, a write's acks to ~50 devices were a burst of loopback sends on the loop and
#: a burst of work for whatever reads them, on the same cores as the commands: spread over 20 ms, the command round
#: trip's p99 with 1,000 devices streaming fell by about a tenth in one sitting, within the runs' spread in another
#: (docs/benchmarks.md, issue 15 item 2, sixth sitting). `durable` itself moves at once: flow control, `wait_beyond`
#: and the last ack of a closing session never wait for the spread.
ACK_SPREAD = 0.02
#: Ledgers advanced in one step of the loop after a write (no I/O: a write of thousands of devices stays short steps).
ADVANCE_CHUNK = 1000


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

    def advance(self, seq: int) -> bool:
        """Record that every batch up to `seq` is durable (or resolved) and wake any waiter; the session learns it from
        `tell_listener`. False if `seq` is not beyond `durable`: nothing changed."""
        if seq <= self.durable:
            return False
        self.durable = seq
        self.submitted = max(self.submitted, seq)
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        return True

    def tell_listener(self) -> None:
        """Tell the connected session, if any, that more is durable (it sends the ack due, if one still is)."""
        if self.listener is not None:
            self.listener.durable_advanced()

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
        self._to_tell: deque[deque[DeviceLedger]] = deque()  # each write's advanced ledgers, for `ack_loop`
        self._to_tell_added = trio.Event()
        self._acking = False  # `ack_loop` runs: it tells the sessions; else `on_durable` does

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
            advanced: deque[DeviceLedger] = deque()
            for ledger, seq in best.items():
                if ledger.advance(seq):
                    unsaved[ledger.name] = seq
                    advanced.append(ledger)
                    if not len(advanced) % ADVANCE_CHUNK:
                        await trio.lowlevel.checkpoint()
            self._latest_dirty.update(best)
            if not advanced:
                return
            if self._acking:
                self._to_tell.append(advanced)
                self._to_tell_added.set()
            else:
                await self._tell(advanced, 0.0)

        return on_durable

    async def ack_loop(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tell the sessions of each write's devices that more is durable (they send the acks), spread over
        `ACK_SPREAD` seconds unless later writes' wait; runs until cancelled. Without it, `on_durable` tells them
        itself, a chunk a step."""
        self._acking = True
        try:
            task_status.started()
            while True:
                if not self._to_tell:
                    self._to_tell_added = trio.Event()
                    await self._to_tell_added.wait()
                    continue
                await self._tell(self._to_tell[0], ACK_SPREAD)
                self._to_tell.popleft()
        finally:
            self._acking = False
            for group in self._to_tell:  # cancelled (shutdown): the rest at once, without awaiting
                for ledger in group:
                    ledger.tell_listener()
            self._to_tell.clear()

    async def _tell(self, group: deque[DeviceLedger], spread: float) -> None:
        """Tell the sessions of `group` (emptied as they are told), `ACK_CHUNK` a step, the chunks `spread` seconds
        apart in all (no pause while another write's group waits)."""
        gap = spread / ((len(group) - 1) // ACK_CHUNK or 1)
        told = 0
        while group:
            if told and not told % ACK_CHUNK:
                if gap and len(self._to_tell) < 2:
                    await trio.sleep(gap)
                else:
                    await trio.lowlevel.checkpoint()
            group.popleft().tell_listener()
            told += 1

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
