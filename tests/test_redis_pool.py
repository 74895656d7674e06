"""hub.fleet's Redis connection pool: callers that give up (cancelled) strand no free connection and no slot.

The first two drive the pool to where coredis 6.9's own `ConnectionPool` hangs for good (hub/fleet/_redis_pool.py),
with a real redis-server; the third uses a real socket that never answers, as a hung Redis.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import coredis
import trio

from hub.fleet._redis_pool import Pool
from tests.servers import Redis
from tests.waiting import eventually


@asynccontextmanager
async def _client(url: str, size: int) -> AsyncIterator[coredis.Redis[str]]:
    pool = Pool.from_url(url, decode_responses=True, max_connections=size, connect_timeout=30, stream_timeout=30)
    client: coredis.Redis[str] = coredis.Redis(connection_pool=pool, decode_responses=True)
    async with client:
        yield client


def _free(client: coredis.Redis[Any]) -> int:
    """Slots free in the client's pool (connections, or room to make one)."""
    return len(client.connection_pool._available_connections)


async def _get(client: coredis.Redis[str], key: str) -> None:
    await client.get(key)


async def _hold(client: coredis.Redis[str], key: str) -> None:
    """Lease a connection until something is pushed to `key` (a pipeline keeps its connection until answered)."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.blpop([key], timeout=0)


async def test_callers_cancelled_while_the_pool_is_empty_do_not_strand_a_free_connection(redis_server: Redis) -> None:
    async with _client(redis_server.url, 2) as client, _client(redis_server.url, 1) as other:
        await client.ping()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_hold, client, "k")
            nursery.start_soon(_hold, client, "k")
            await eventually(lambda: _free(client) == 0, what="both connections leased")
            for _ in range(5):  # callers that give up waiting, as handshakes past their patience do
                with trio.move_on_after(0.05):
                    await client.get("x")
            with trio.fail_after(10):
                async with trio.open_nursery() as waiting:
                    waiting.start_soon(_get, client, "x")  # a patient caller, waiting when the leases come back
                    await trio.sleep(0.1)
                    await other.lpush("k", ["a", "b"])  # both leases end
        assert _free(client) == 2


async def test_a_connection_that_dies_while_leased_leaves_room_for_a_new_one(redis_server: Redis) -> None:
    async with _client(redis_server.url, 1) as client, _client(redis_server.url, 1) as admin:
        await client.ping()
        async with trio.open_nursery() as nursery:

            async def hold_until_killed() -> None:
                with contextlib.suppress(coredis.exceptions.ConnectionError):  # killed under it
                    await _hold(client, "never")

            nursery.start_soon(hold_until_killed)
            await eventually(lambda: _free(client) == 0, what="the only connection leased")
            await admin.client_kill(type_=coredis.PureToken.NORMAL, skipme=True)
        with trio.fail_after(10):
            assert await client.set("x", "1")
            assert await client.get("x") == "1"


async def test_a_caller_cancelled_while_its_connection_is_being_made_gives_the_slot_back() -> None:
    accepted: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:
        # A server that accepts and never answers (a hung Redis): making a connection waits for its handshake.
        serve = functools.partial(trio.serve_tcp, host="127.0.0.1")
        listeners = await nursery.start(serve, functools.partial(_keep, accepted=accepted), 0)
        port = listeners[0].socket.getsockname()[1]
        async with _client(f"redis://127.0.0.1:{port}", 1) as client:
            for attempt in (1, 2, 3):
                with trio.move_on_after(0.2):
                    await client.get("x")
                await eventually(functools.partial(_made, accepted, attempt), what=f"connection attempt {attempt}")
            assert _free(client) == 1
        nursery.cancel_scope.cancel()


def _made(accepted: list[trio.SocketStream], attempts: int) -> bool:
    return len(accepted) == attempts


async def _keep(stream: trio.SocketStream, accepted: list[trio.SocketStream]) -> None:
    accepted.append(stream)
    await trio.sleep_forever()
