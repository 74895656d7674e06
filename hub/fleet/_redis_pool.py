"""A coredis connection pool whose waiters may be cancelled and whose slots cannot leak.

coredis 6.9's `ConnectionPool` keeps its free connections in a stack whose `get` loses a wake-up when a waiter is
cancelled: the next connection handed back wakes the cancelled waiter's stale event, and the live waiter behind it
(holding the stack's lock, every other caller queued on that lock) sleeps with connections free. A hub cancels Redis
calls all the time (handshakes wait `HANDSHAKE_PATIENCE` at most), so under a reconnect surge, once the pool ran
empty, every Redis call of the process stopped for good while Redis sat idle (`tests/test_redis_pool.py` shows it
with two connections). It also loses a slot for good when a leased connection dies before it is handed back.

`Pool` replaces the stack and the two methods around it; everything else (connections, multiplexing, pipelines,
pub/sub) is coredis's own.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import anyio
import anyio.lowlevel
import coredis
from anyio.abc import TaskStatus
from coredis.connection import BaseConnection

__all__ = ["Pool"]


class _Waiter:
    """One caller waiting for a slot; `slot` is what it was handed."""

    __slots__ = ("event", "handed", "slot")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.handed = False
        self.slot: BaseConnection | None = None


class _Slots:
    """The pool's slots: a free connection, or None for room to make one. Most recently used first (a stack).

    A slot handed back goes straight to the longest waiter, so a waiter that gives up can neither swallow a
    wake-up nor strand a slot: it hands on what it was given.
    """

    def __init__(self, size: int) -> None:
        self._free: deque[BaseConnection | None] = deque([None] * size)
        self._waiters: deque[_Waiter] = deque()

    def __len__(self) -> int:
        return len(self._free)

    def __contains__(self, item: object) -> bool:
        return item in self._free

    def remove(self, item: BaseConnection) -> None:
        self._free.remove(item)

    async def get(self) -> BaseConnection | None:
        if self._free and not self._waiters:
            await anyio.lowlevel.checkpoint_if_cancelled()
            slot = self._free.pop()
            await anyio.lowlevel.cancel_shielded_checkpoint()
            return slot
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.handed:
                self._hand(waiter.slot, newest=waiter.slot is not None)  # given one while cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise
        return waiter.slot

    def put_nowait(self, item: BaseConnection | None) -> None:
        """Hand back a slot, to be the next one taken."""
        self._hand(item, newest=True)

    def append_nowait(self, item: BaseConnection | None) -> None:
        """Hand back a slot, to be the last one taken (an empty one: a new connection costs a handshake)."""
        self._hand(item, newest=False)

    def _hand(self, item: BaseConnection | None, *, newest: bool) -> None:
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.slot, waiter.handed = item, True
            waiter.event.set()
        elif newest:
            self._free.append(item)
        else:
            self._free.appendleft(item)


class Pool(coredis.ConnectionPool):  # type: ignore[type-arg]
    """coredis's pool for one Redis server, with `_Slots` in place of its stack (see the module's docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._available_connections = _Slots(self.max_connections)  # type: ignore[assignment]

    async def get_connection(self, **_: Any) -> Any:
        """A free connection, or a new one; the slot is handed back if making it fails or is cancelled."""
        slot = await self._available_connections.get()
        try:
            if slot is not None and slot.reusable:
                connection = slot
            else:
                if slot is not None:
                    slot.invalidate()
                connection = await self._construct_connection()
                error = await self.task_group.start(self._run, connection)
                if error is not None:
                    raise error
                self._online_connections.add(connection)
                self.statistics.connection_created(connection)
        except BaseException:
            self._available_connections.append_nowait(None)
            raise
        self.statistics.connection_leased(connection)
        return connection

    def release(self, connection: Any) -> None:
        """Hand a leased connection back; one that died while leased leaves room for a new one."""
        self.statistics.connection_released(connection)
        if connection.usable:
            self._available_connections.put_nowait(connection)
        else:
            self._online_connections.discard(connection)
            self._available_connections.append_nowait(None)

    async def _run(self, connection: BaseConnection, *, task_status: TaskStatus[Exception | None]) -> None:
        try:
            await connection.run(task_status=task_status)
        except coredis.exceptions.RedisError as error:
            task_status.started(error)  # the connection could not be made: get_connection raises it
        finally:
            self._online_connections.discard(connection)
            if connection in self._available_connections:  # died while free: its slot stays, empty
                self._available_connections.remove(connection)
                self._available_connections.append_nowait(None)
