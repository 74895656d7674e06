"""Per-device sequence ledgers: what was handed to the pipeline, what is durable, who to ack."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from hub.registry import Registry

__all__ = ["DeviceLedger", "Ledgers"]


@attrs.define(eq=False)
class DeviceLedger:
    """Sequence state of one device, shared by its successive sessions.

    `durable` only grows, and only after the registry has stored it, so an ack sent from it
    survives a hub restart. `submitted` is the highest seq handed to the pipeline (or refused).
    """

    name: str
    durable: int
    submitted: int
    last_seen: float | None = None  # Unix time of the last telemetry message
    latest: dict[str, dict[str, Any]] = attrs.field(factory=dict)  # measurement -> its newest point
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def advance(self, seq: int) -> None:
        """Record that every batch up to `seq` is durable (or resolved) and wake ack senders."""
        if seq > self.durable:
            self.durable = seq
            self.submitted = max(self.submitted, seq)
            self._changed.set()
            self._changed = trio.Event()

    async def wait_beyond(self, seq: int) -> int:
        """Wait until `durable` exceeds `seq`; return the new value."""
        while self.durable <= seq:
            await self._changed.wait()
        return self.durable


class Ledgers:
    """All device ledgers of this hub process, and the pipeline's durability callback."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._by_name: dict[str, DeviceLedger] = {}

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
        """The pipeline's `on_durable`: store the new seqs in the registry, then let acks go out."""

        async def on_durable(marks: list[tuple[object, int]]) -> None:
            best: dict[DeviceLedger, int] = {}
            for ledger, seq in marks:
                assert isinstance(ledger, DeviceLedger)
                if seq > best.get(ledger, 0):
                    best[ledger] = seq
            if not best:
                return
            updates = {ledger.name: seq for ledger, seq in best.items()}
            await trio.to_thread.run_sync(self._registry.save_acked, updates)
            for ledger, seq in best.items():
                ledger.advance(seq)

        return on_durable
