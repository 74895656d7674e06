"""The registry and the per-device ledger behind one async interface (`RegistryStore`), and its SQLite backend.

The Redis backend is in `_redis_store`; `open_registry_store` opens the one the `[state]` section names.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Protocol

import trio

from device_client.protocol import Point
from hub.config import StateConfig
from hub.fleet._accounts import DeviceRecord, OperatorRecord
from hub.fleet._registry import Registry, registry_path
from hub.fleet._twins import Side, TwinRecord

__all__ = ["RegistryStore", "SQLiteStore", "StoreUnavailable", "open_registry_store"]


#: Devices whose latest values the in-process store merges in one step of the loop.
MERGE_CHUNK = 200


class StoreUnavailable(Exception):
    """The state backend cannot be reached (Redis down, refused, wrong password)."""


class RegistryStore(Protocol):
    """Devices (with their labels), operators, their tokens, and each device's session epoch and acked seq; shared by
    every hub process that opens the same backend. Refusals raise the `RegistryError` family, an unreachable backend
    `StoreUnavailable`."""

    async def add(self, name: str, labels: Mapping[str, str] | None = None) -> str:
        """Register a new device with `labels` (BadLabel if bad); return its token ``"<name>.<secret>"`` (only its
        hash is stored)."""
        ...

    async def set_labels(self, name: str, set_: Mapping[str, str], remove: builtins.list[str]) -> dict[str, str]:
        """Remove the label keys `remove`, then set `set_`, in one atomic step; return the device's labels now.

        BadLabel for a malformed label or past `MAX_LABELS`, UnknownDevice for an unregistered name."""
        ...

    async def rotate(self, name: str) -> str:
        """Give an existing device a new token (the old one stops working) and un-revoke it."""
        ...

    async def revoke(self, name: str) -> None:
        """Refuse the device's token from now on (already open sessions are the hub's business)."""
        ...

    async def get(self, name: str) -> DeviceRecord | None:
        """The device's record, or None if it is not registered."""
        ...

    async def list(self) -> builtins.list[DeviceRecord]:
        """All devices, sorted by name."""
        ...

    async def revoked_names(self) -> set[str]:
        """Names of all revoked devices (the hub closes their open sessions)."""
        ...

    async def authenticate(self, token: str) -> str | None:
        """The name of the device the token belongs to; None for unknown, wrong, revoked or malformed."""
        ...

    async def begin_session(self, name: str) -> tuple[int, int]:
        """Bump the device's session epoch; return ``(epoch, acked_seq)``, both from one atomic step."""
        ...

    async def save_acked(self, updates: Mapping[str, int]) -> None:
        """Raise each device's acked seq to the given one (never lowers it; unknown names are ignored)."""
        ...

    async def save_latest(self, values: Mapping[str, tuple[float, dict[str, Point]]]) -> None:
        """Store each device's ``(last_seen, latest points by measurement)`` for every hub to read.

        A device's measurements are merged with those stored; a save whose `last_seen` is older than the stored one
        (its previous hub saving late) is skipped.
        """
        ...

    async def latest(self, names: builtins.list[str]) -> dict[str, tuple[float, dict[str, Point]]]:
        """``(last_seen, latest points by measurement)`` of those `names` that have any, in one round trip."""
        ...

    async def twin(self, name: str) -> TwinRecord:
        """The device's twin (UnknownDevice for an unregistered name)."""
        ...

    async def patch_twin(
        self, name: str, side: Side, patch: object, *, if_version: int | None = None, applied: int | None = None
    ) -> tuple[TwinRecord, bool]:
        """`hub.fleet.patch_twin` on the device's twin in one atomic step; the twin after it, and whether the
        document changed (TwinError, VersionConflict, UnknownDevice)."""
        ...

    async def add_operator(self, name: str, role: str) -> str:
        """Create an operator; return its token ``"op.<name>.<secret>"`` (names are never reused)."""
        ...

    async def list_operators(self) -> builtins.list[OperatorRecord]:
        """All operators (revoked ones too), sorted by name."""
        ...

    async def revoke_operator(self, name: str) -> None:
        """Refuse the operator's token from now on."""
        ...

    async def revoked_operators(self) -> set[str]:
        """Names of all revoked operators."""
        ...

    async def authenticate_operator(self, token: str) -> tuple[str, str] | None:
        """``(name, role)`` of the operator the token belongs to; None for unknown, wrong, revoked or malformed."""
        ...

    async def aclose(self) -> None:
        """Release the backend's connections or files."""
        ...


class SQLiteStore:
    """`RegistryStore` over the SQLite `Registry` file of one data directory.

    The handshake's calls (`authenticate`, `begin_session`), `get` and `twin` are one indexed read or update each and
    run on the trio thread, as they always did; the rest run in a worker thread, where a busy file may make them wait.
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        # In memory only: one process holds every ledger anyway, and a point per device per second is no write to
        # put on the registry file. Lost at restart, like the ledgers' own `latest`.
        self._latest: dict[str, tuple[float, dict[str, Point]]] = {}

    async def add(self, name: str, labels: Mapping[str, str] | None = None) -> str:
        return await trio.to_thread.run_sync(self.registry.add, name, labels)

    async def set_labels(self, name: str, set_: Mapping[str, str], remove: builtins.list[str]) -> dict[str, str]:
        return await trio.to_thread.run_sync(self.registry.set_labels, name, set_, remove)

    async def rotate(self, name: str) -> str:
        return await trio.to_thread.run_sync(self.registry.rotate, name)

    async def revoke(self, name: str) -> None:
        await trio.to_thread.run_sync(self.registry.revoke, name)

    async def get(self, name: str) -> DeviceRecord | None:
        return self.registry.get(name)

    async def list(self) -> builtins.list[DeviceRecord]:
        return await trio.to_thread.run_sync(self.registry.list)

    async def revoked_names(self) -> set[str]:
        return await trio.to_thread.run_sync(self.registry.revoked_names)

    async def authenticate(self, token: str) -> str | None:
        return self.registry.authenticate(token)

    async def begin_session(self, name: str) -> tuple[int, int]:
        return self.registry.begin_session(name)

    async def save_acked(self, updates: Mapping[str, int]) -> None:
        await trio.to_thread.run_sync(self.registry.save_acked, updates)

    async def save_latest(self, values: Mapping[str, tuple[float, dict[str, Point]]]) -> None:
        stored = self._latest
        for i, (name, (last_seen, points)) in enumerate(values.items()):
            if i and not i % MERGE_CHUNK:
                await trio.lowlevel.checkpoint()  # 1,000 devices merged in one step held the loop for 2.4 ms
            old = stored.get(name)
            if old is None:
                stored[name] = last_seen, dict(points)
            elif last_seen >= old[0]:
                stored[name] = last_seen, {**old[1], **points}

    async def latest(self, names: builtins.list[str]) -> dict[str, tuple[float, dict[str, Point]]]:
        stored = self._latest
        return {name: (found[0], dict(found[1])) for name in names if (found := stored.get(name)) is not None}

    async def twin(self, name: str) -> TwinRecord:
        return self.registry.twin(name)  # one indexed read, on the loop like `get` (each twin device's connect)

    async def patch_twin(
        self, name: str, side: Side, patch: object, *, if_version: int | None = None, applied: int | None = None
    ) -> tuple[TwinRecord, bool]:
        return await trio.to_thread.run_sync(self.registry.patch_twin, name, side, patch, if_version, applied)

    async def add_operator(self, name: str, role: str) -> str:
        return await trio.to_thread.run_sync(self.registry.add_operator, name, role)

    async def list_operators(self) -> builtins.list[OperatorRecord]:
        return await trio.to_thread.run_sync(self.registry.list_operators)

    async def revoke_operator(self, name: str) -> None:
        await trio.to_thread.run_sync(self.registry.revoke_operator, name)

    async def revoked_operators(self) -> set[str]:
        return await trio.to_thread.run_sync(self.registry.revoked_operators)

    async def authenticate_operator(self, token: str) -> tuple[str, str] | None:
        return await trio.to_thread.run_sync(self.registry.authenticate_operator, token)

    async def aclose(self) -> None:
        self.registry.close()


@asynccontextmanager
async def open_registry_store(state: StateConfig, data_dir: str | os.PathLike[str]) -> AsyncIterator[RegistryStore]:
    """The store `state` names (SQLite: the registry file in `data_dir`), closed on exit.

    Raises `StoreUnavailable` when Redis cannot be reached.
    """
    if state.backend == "redis":
        from hub.fleet._redis_store import open_redis_store  # coredis is needed only for this backend

        async with open_redis_store(
            state.url,
            state.prefix,
            password=state.password,
            ca_file=state.ca_file,
            cache_devices=state.cache_devices,
            cache_ttl=state.cache_ttl,
        ) as redis_store:
            yield redis_store
        return
    store = SQLiteStore(Registry(registry_path(data_dir)))
    try:
        yield store
    finally:
        await store.aclose()
