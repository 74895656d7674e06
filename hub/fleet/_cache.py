"""What a handshake needs of the registry, remembered from Redis so that handshakes go on while it is unreachable.

A bounded LRU of devices and operators (token hash, revoked flag, role; a device's epoch and acked seq), each entry
trusted only for `ttl` seconds after its token hash and revoked flag were last read from Redis. Sans-I/O: callers
pass the time (`time.monotonic()`), so tests drive it with plain values.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Literal

import attrs

__all__ = ["CachedAccount", "RegistryCache"]

Kind = Literal["device", "operator"]


@attrs.define
class CachedAccount:
    """One device or operator as last read from Redis (and, for a device, its sessions since)."""

    token_hash: str
    revoked: bool
    read_at: float  # monotonic time the token hash and the revoked flag were last read
    role: str = ""  # operators
    epoch: int | None = None  # devices: the last epoch known (read, or handed out during an outage)
    acked: int = 0  # devices: the highest acked seq known (read, or saved by this hub)


class RegistryCache:
    """The LRU of `CachedAccount` by (kind, name), at most `max_entries`, each trusted for `ttl` seconds.

    Epochs handed out while Redis was unreachable are kept apart (`pending_epochs`), outside the bound, until they
    are written: an entry pushed out of the LRU must not lose its bump.
    """

    def __init__(self, max_entries: int, ttl: float) -> None:
        if max_entries < 1 or ttl <= 0:
            raise ValueError("a cache needs max_entries >= 1 and ttl > 0")
        self.max_entries = max_entries
        self.ttl = ttl
        self._entries: OrderedDict[tuple[Kind, str], CachedAccount] = OrderedDict()
        self._pending: dict[str, int] = {}  # device -> epoch handed out without Redis, not yet written

    def __len__(self) -> int:
        return len(self._entries)

    # -- what Redis said

    def saw(self, kind: Kind, name: str, token_hash: str | None, revoked: bool, now: float, role: str = "") -> None:
        """Redis answered with the account's token hash and revoked flag (None: no such account)."""
        key = (kind, name)
        if token_hash is None:
            self._entries.pop(key, None)
            return
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = CachedAccount(token_hash, revoked, now, role)
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        else:
            entry.token_hash, entry.revoked, entry.read_at, entry.role = token_hash, revoked, now, role
            self._entries.move_to_end(key)

    def saw_session(self, name: str, epoch: int, acked: int) -> None:
        """Redis gave the device's epoch and acked seq (a new session, or a read of its record)."""
        entry = self._entries.get(("device", name))
        if entry is not None:
            entry.epoch = max(epoch, entry.epoch or 0)
            entry.acked = max(acked, entry.acked)

    def saw_acked(self, updates: Mapping[str, int]) -> None:
        """This hub made these acked seqs durable (whether or not Redis has them yet)."""
        entries = self._entries
        for name, seq in updates.items():
            entry = entries.get(("device", name))
            if entry is not None and seq > entry.acked:
                entry.acked = seq

    def saw_revoked(self, kind: Kind, names: Iterable[str]) -> None:
        """These accounts are revoked (a revocation by this hub, or the revoked set read from Redis).

        The flag is only ever set here: an account un-revoked by `rotate` has a new token this cache does not know.
        """
        entries = self._entries
        for name in names:
            entry = entries.get((kind, name))
            if entry is not None:
                entry.revoked = True

    def forget(self, kind: Kind, name: str) -> None:
        """Drop what is known of the account (its token was rotated)."""
        self._entries.pop((kind, name), None)

    # -- answers while Redis is unreachable

    def account(self, kind: Kind, name: str, now: float) -> CachedAccount | None:
        """The account if it was read from Redis within `ttl` seconds; None: unknown here, or too old to trust."""
        entry = self._entries.get((kind, name))
        if entry is None or now - entry.read_at > self.ttl:
            return None
        self._entries.move_to_end((kind, name))
        return entry

    def begin_session(self, name: str, now: float) -> tuple[int, int] | None:
        """``(epoch, acked_seq)`` for a session opened without Redis: the next epoch, remembered until written.

        None when the device is not trusted (unknown here, too old, revoked) or its epoch was never read.
        """
        entry = self.account("device", name, now)
        if entry is None or entry.revoked or entry.epoch is None:
            return None
        entry.epoch += 1
        self._pending[name] = entry.epoch
        return entry.epoch, entry.acked

    # -- epochs to write once Redis is back

    def pending_epochs(self) -> dict[str, int]:
        """Device -> epoch handed out without Redis and not yet written (a copy)."""
        return dict(self._pending)

    def epoch_floor(self, name: str) -> int:
        """The epoch the device's next session must exceed because of an unwritten bump (0: none)."""
        return self._pending.get(name, 0)

    def epochs_written(self, written: Mapping[str, int]) -> None:
        """Redis now holds at least these epochs: forget bumps they cover (a newer one stays pending)."""
        pending = self._pending
        for name, epoch in written.items():
            if pending.get(name, epoch + 1) <= epoch:
                del pending[name]
