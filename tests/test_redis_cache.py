"""Handshakes through a Redis outage: the registry cache of `RedisStore` on a real Redis that is stopped and
restarted, first through the store, then through a whole hub."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from device_client import protocol
from hub.config import StateConfig
from hub.fleet import StoreUnavailable, open_registry_store
from hub.fleet import _redis_store as redis_store
from hub.fleet._redis_store import CACHE_FIRST_FOR, CACHE_PATIENCE
from tests.hubtools import connect, control, hello, hub_config, start_hub, stream_batches, telemetry_lines
from tests.servers import Redis
from tests.waiting import eventually
from tests.wire import upgrade


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    """A Redis whose data survives a restart (the test stops and starts it; stopped at teardown)."""
    server = Redis(tmp_path / "redis", persistent=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _state(redis: Redis, **options: object) -> StateConfig:
    return StateConfig(backend="redis", url=redis.url, **options)  # type: ignore[arg-type]


def _hget(redis: Redis, key: str, field: str) -> int:
    """An integer field of a hash in Redis (0 when missing)."""
    reply = redis.command(b"HGET", key.encode(), field.encode())
    return int(reply.split(b"\r\n")[1]) if reply.startswith(b"$") and not reply.startswith(b"$-1") else 0


async def _stop(redis: Redis) -> None:
    await trio.to_thread.run_sync(redis.stop)


async def _start(redis: Redis) -> None:
    await trio.to_thread.run_sync(redis.start)


# ---------------------------------------------------------------------------- the store


async def test_devices_and_operators_read_before_an_outage_are_answered_during_it(redis: Redis, tmp_path: Path) -> None:
    async with open_registry_store(_state(redis), tmp_path) as store:
        token = await store.add("d1")
        never_read = await store.add("d2")
        operator = await store.add_operator("alice", "admin")
        assert await store.authenticate(token) == "d1"
        assert await store.begin_session("d1") == (1, 0)
        await store.save_acked({"d1": 5})
        assert await store.authenticate_operator(operator) == ("alice", "admin")
        await _stop(redis)

        assert await store.authenticate(token) == "d1"
        assert await store.authenticate("d1." + never_read.partition(".")[2]) is None  # the same compare
        assert await store.begin_session("d1") == (2, 5)
        with pytest.raises(StoreUnavailable):
            await store.save_acked({"d1": 9})  # not written; but the next session starts from it
        assert await store.begin_session("d1") == (3, 9)
        assert await store.authenticate_operator(operator) == ("alice", "admin")
        with pytest.raises(StoreUnavailable):  # unknown here: never "unknown device"
            await store.authenticate(never_read)
        with pytest.raises(StoreUnavailable):
            await store.authenticate("ghost.secret")
        with pytest.raises(StoreUnavailable):
            await store.begin_session("d2")

        await _start(redis)
        await store.revoked_names()  # each hub polls it every 2 s: the bumps are written then
        assert _hget(redis, "hub:device:d1", "epoch") == 3
        await trio.sleep(1.1)  # past the second in which the cache answers first
        assert await store.begin_session("d1") == (4, 5)  # Redis again: acked seq 9 is the ledger's to save
        assert await store.authenticate(never_read) == "d2"


async def test_an_epoch_handed_out_during_the_outage_is_never_handed_out_again(redis: Redis, tmp_path: Path) -> None:
    async with open_registry_store(_state(redis), tmp_path) as store:
        token = await store.add("d1")
        assert await store.authenticate(token) == "d1"
        assert await store.begin_session("d1") == (1, 0)
        await _stop(redis)
        assert await store.begin_session("d1") == (2, 0)
        await _start(redis)
        await trio.sleep(1.1)
        assert await store.begin_session("d1") == (3, 0)  # Redis held 1: the pending bump is its floor
        assert _hget(redis, "hub:device:d1", "epoch") == 3


async def test_an_entry_older_than_cache_ttl_is_not_trusted(redis: Redis, tmp_path: Path) -> None:
    async with open_registry_store(_state(redis, cache_ttl=0.3), tmp_path) as store:
        token = await store.add("d1")
        operator = await store.add_operator("alice", "viewer")
        assert await store.authenticate(token) == "d1"
        assert await store.authenticate_operator(operator) == ("alice", "viewer")
        await store.begin_session("d1")
        await trio.sleep(0.4)
        await _stop(redis)
        with pytest.raises(StoreUnavailable):
            await store.authenticate(token)
        with pytest.raises(StoreUnavailable):
            await store.begin_session("d1")
        with pytest.raises(StoreUnavailable):
            await store.authenticate_operator(operator)


async def test_cache_ttl_0_is_no_cache(redis: Redis, tmp_path: Path) -> None:
    async with open_registry_store(_state(redis, cache_ttl=0.0), tmp_path) as store:
        token = await store.add("d1")
        assert await store.authenticate(token) == "d1"
        await _stop(redis)
        with pytest.raises(StoreUnavailable):
            await store.authenticate(token)


async def test_revocations_seen_before_the_outage_are_kept(redis: Redis, tmp_path: Path) -> None:
    async with (
        open_registry_store(_state(redis), tmp_path / "a") as store,
        open_registry_store(_state(redis), tmp_path / "b") as other_hub,
    ):
        tokens = {name: await store.add(name) for name in ("d1", "d2")}
        operator = await store.add_operator("alice", "admin")
        for token in tokens.values():
            await store.authenticate(token)
        await store.authenticate_operator(operator)
        await store.begin_session("d1")
        await store.revoke("d1")  # by this hub
        await other_hub.revoke("d2")  # by another: this one learns it from its poll
        await other_hub.revoke_operator("alice")
        assert await store.revoked_names() == {"d1", "d2"}
        assert await store.revoked_operators() == {"alice"}
        await _stop(redis)
        assert await store.authenticate(tokens["d1"]) is None
        assert await store.authenticate(tokens["d2"]) is None
        assert await store.authenticate_operator(operator) is None
        with pytest.raises(StoreUnavailable):
            await store.begin_session("d1")


async def test_a_rotated_token_is_forgotten(redis: Redis, tmp_path: Path) -> None:
    async with open_registry_store(_state(redis), tmp_path) as store:
        old = await store.add("d1")
        assert await store.authenticate(old) == "d1"
        new = await store.rotate("d1")
        await _stop(redis)
        for token in (old, new):
            with pytest.raises(StoreUnavailable):
                await store.authenticate(token)


async def test_a_redis_that_hangs_holds_a_handshake_briefly(
    redis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store, "HANDSHAKE_PATIENCE", 0.5)  # 5 s in earnest
    async with open_registry_store(_state(redis), tmp_path) as store:
        token = await store.add("d1")
        unknown = await store.add("d2")
        operator = await store.add_operator("alice", "operator")
        assert await store.authenticate(token) == "d1"
        assert await store.authenticate_operator(operator) == ("alice", "operator")
        assert await store.begin_session("d1") == (1, 0)
        redis.pause()  # connections open, nothing answered: the client alone would wait 3 x 10 s
        try:
            with trio.fail_after(CACHE_PATIENCE + 5):
                assert await store.authenticate(token) == "d1"
            with trio.fail_after(0.5):  # and then the cache answers first
                assert await store.begin_session("d1") == (2, 0)
                assert await store.authenticate_operator(operator) == ("alice", "operator")
            with trio.fail_after(3), pytest.raises(StoreUnavailable, match="no answer within"):
                await store.authenticate(unknown)  # not in the cache: told to retry, not held for 30 s
        finally:
            redis.resume()
        await trio.sleep(CACHE_FIRST_FOR + 0.1)
        assert await store.begin_session("d1") == (3, 0)  # Redis again, its replies still in order
        assert await store.authenticate(token) == "d1"
        assert _hget(redis, "hub:device:d1", "epoch") == 3


# ---------------------------------------------------------------------------- a hub


async def test_a_known_device_reconnects_and_streams_while_redis_is_away(redis: Redis, tmp_path: Path) -> None:
    async with open_registry_store(_state(redis), tmp_path / "cli") as cli:
        token = await cli.add("d1")
        unknown = await cli.add("d2")  # registered, but this hub never read it
        operator = await cli.add_operator("alice", "admin")
    config = hub_config(tmp_path / "hub", **{"state.backend": "redis", "state.url": redis.url})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with control(hub, operator) as ctl:
            await ctl.ok("devices")
        async with connect(hub, token) as ws:
            assert (await hello(ws)).epoch == 1
            await stream_batches(ws, 1, 2)
        await eventually(lambda: _hget(redis, "hub:device:d1", "acked_seq") == 2, timeout=10, poll=0.1)
        await _stop(redis)

        async with connect(hub, token) as ws:
            welcome = await hello(ws)
            assert (welcome.ack, welcome.epoch) == (2, 2)
            await stream_batches(ws, 3, 4)  # acked: durable in the sink
        status, headers, stream = await upgrade(
            hub.port, protocol.DEVICE_PATH, headers={"Authorization": f"Bearer {unknown}"}
        )
        await stream.aclose()
        assert status == 503
        assert int(headers["retry-after"]) >= 1
        async with control(hub, operator) as ctl:  # authenticated from the cache; the registry itself is away
            assert await ctl.error("devices") == "unavailable"

        await _start(redis)
        await eventually(lambda: _hget(redis, "hub:device:d1", "acked_seq") == 6, timeout=15, poll=0.1)
        await eventually(lambda: _hget(redis, "hub:device:d1", "epoch") == 2, timeout=15, poll=0.1)
        async with connect(hub, token) as ws:
            assert (await hello(ws)).epoch == 3
        hub.stop()
    lines = telemetry_lines(tmp_path / "hub")
    assert len(lines) == 6 * 3  # every acked point, once
    assert len(set(lines)) == len(lines)


async def test_a_device_revoked_while_cached_is_refused_during_the_outage(redis: Redis, tmp_path: Path) -> None:
    async with open_registry_store(_state(redis), tmp_path / "cli") as cli:
        token = await cli.add("d1")
    config = hub_config(tmp_path / "hub", **{"state.backend": "redis", "state.url": redis.url})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with connect(hub, token) as ws:
            await hello(ws)
        async with open_registry_store(_state(redis), tmp_path / "cli") as cli:
            await cli.revoke("d1")  # elsewhere: the hub learns it from its revocation poll (every 2 s)
        await trio.sleep(2.5)
        await _stop(redis)
        status, _, stream = await upgrade(hub.port, protocol.DEVICE_PATH, headers={"Authorization": f"Bearer {token}"})
        await stream.aclose()
        assert status == 401
        hub.stop()


async def test_a_hub_with_a_short_cache_ttl_sends_the_device_away(redis: Redis, tmp_path: Path) -> None:
    async with open_registry_store(_state(redis), tmp_path / "cli") as cli:
        token = await cli.add("d1")
    overrides = {"state.backend": "redis", "state.url": redis.url, "state.cache_ttl": 0.3}
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path / "hub", **overrides))
        async with connect(hub, token) as ws:
            await hello(ws)
        await trio.sleep(0.5)
        await _stop(redis)
        status, headers, stream = await upgrade(
            hub.port, protocol.DEVICE_PATH, headers={"Authorization": f"Bearer {token}"}
        )
        await stream.aclose()
        assert status == 503 and int(headers["retry-after"]) >= 1
        hub.stop()
