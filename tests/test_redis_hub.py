"""Hubs on the Redis state backend: `hub device ...` and `hub operator ...` against the same Redis, a real device
client acked through a hub, the acked seq and epoch carried from one hub to another, and one clear line when Redis
cannot be reached."""

from __future__ import annotations

import time
from pathlib import Path

import trio

from device_client import DeviceClient, protocol
from hub.config import StateConfig
from hub.fleet import open_registry_store
from tests.hubproc import run_hub
from tests.hubtools import (
    connect,
    control,
    hello,
    hub_config,
    points,
    send_batch,
    start_hub,
    stream_batches,
    url,
    wait_ack,
)
from tests.servers import Redis
from tests.waiting import eventually
from tests.wire import upgrade


def _config_file(tmp_path: Path, redis_url: str) -> Path:
    """A config file for the CLI: the Redis backend, and a data directory of its own (no SQLite registry shared)."""
    path = tmp_path / "cli.toml"
    path.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "cli-data"}"\n\n[state]\nbackend = "redis"\nurl = "{redis_url}"\n'
    )
    return path


def _cli(*args: str) -> str:
    """Run `hub ...`; its stdout (the test fails with its stderr unless it succeeds)."""
    done = run_hub(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_a_hub_accepts_a_device_added_with_the_cli_and_saves_its_acks_to_redis(
    redis_server: Redis, tmp_path: Path
) -> None:
    config_file = _config_file(tmp_path, redis_server.url)
    token = _cli("device", "add", "d1", "--config", str(config_file)).strip()
    operator = _cli("operator", "add", "alice", "--role", "admin", "--config", str(config_file)).strip()
    config = hub_config(tmp_path / "hub", **{"state.backend": "redis", "state.url": redis_server.url})
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        async with DeviceClient(url(hub), token, backoff_initial=0.05, backoff_max=0.5) as client:
            for seq in range(3):
                await client.send_batch(points(4, start=seq * 10))
            with trio.fail_after(30):
                await client.wait_acked()
        async with control(hub, operator) as ctl:
            assert [d["name"] for d in await ctl.ok("devices")] == ["d1"]
        hub.stop()
    assert hub.stats.points_written >= 12
    listed = _cli("device", "list", "--config", str(config_file))
    assert listed.splitlines()[1].split()[-2:] == ["1", "3"]  # epoch 1, acked seq 3: saved at shutdown
    assert not (tmp_path / "hub" / "registry.sqlite3").exists()
    assert not (tmp_path / "cli-data" / "registry.sqlite3").exists()


async def test_a_device_moving_to_another_hub_keeps_its_acked_seq_and_epoch(
    redis_server: Redis, tmp_path: Path
) -> None:
    config_file = _config_file(tmp_path, redis_server.url)
    token = _cli("device", "add", "d1", "--config", str(config_file)).strip()
    on_redis = {"state.backend": "redis", "state.url": redis_server.url}
    async with trio.open_nursery() as nursery:
        hub_b = await start_hub(nursery, hub_config(tmp_path / "b", **on_redis))
        async with trio.open_nursery() as nursery_a:
            hub_a = await start_hub(nursery_a, hub_config(tmp_path / "a", **on_redis))
            async with connect(hub_a, token) as ws:
                welcome = await hello(ws)
                assert (welcome.ack, welcome.epoch) == (0, 1)
                await stream_batches(ws, 1, 5)
            hub_a.stop()  # its final save writes acked seq 5 before its nursery ends
        async with connect(hub_b, token) as ws:
            welcome = await hello(ws)
            assert (welcome.ack, welcome.epoch) == (5, 2)
        hub_b.stop()


def test_the_cli_says_in_one_line_that_redis_is_unreachable(tmp_path: Path) -> None:
    where = f"unix://{tmp_path}/nothing.sock"
    config_file = _config_file(tmp_path, where)
    for args in (("device", "add", "d1"), ("device", "list"), ("operator", "list"), ("device", "add-sim", "2")):
        done = run_hub(*args, "--config", str(config_file))
        assert done.returncode == 1, args
        assert done.stdout == ""
        assert done.stderr.startswith(f"hub: error: cannot reach Redis at {where}: "), done.stderr
        assert len(done.stderr.splitlines()) == 1, done.stderr


def test_hub_serve_says_in_one_line_that_redis_is_unreachable(tmp_path: Path) -> None:
    where = f"unix://{tmp_path}/nothing.sock"
    done = run_hub(
        "serve", "--config", str(_config_file(tmp_path, where)), "--port", "0", "--metrics-port", "0",
        "--log-level", "error",
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(f"hub: error: cannot reach Redis at {where}: "), done.stderr
    assert "Traceback" not in done.stderr


async def test_while_redis_is_away_acks_go_on_and_handshakes_and_requests_are_told_to_retry(tmp_path: Path) -> None:
    redis = Redis(tmp_path / "redis", persistent=True)  # the registry must survive the restart
    redis.start()
    try:
        config_file = _config_file(tmp_path, redis.url)
        token = _cli("device", "add", "d1", "--config", str(config_file)).strip()
        second = _cli("device", "add", "d2", "--config", str(config_file)).strip()
        operator = _cli("operator", "add", "alice", "--role", "admin", "--config", str(config_file)).strip()
        config = hub_config(tmp_path / "hub", **{"state.backend": "redis", "state.url": redis.url})
        async with trio.open_nursery() as nursery:
            hub = await start_hub(nursery, config)
            async with connect(hub, token) as ws, control(hub, operator) as ctl:
                await hello(ws)
                await stream_batches(ws, 1, 2)
                await trio.to_thread.run_sync(redis.stop)

                await stream_batches(ws, 3, 5)  # acked: durability does not need Redis
                assert await ctl.error("devices") == "unavailable"
                assert await ctl.error("device", name="d1") == "unavailable"
                status, headers, stream = await upgrade(
                    hub.port, protocol.DEVICE_PATH, headers={"Authorization": f"Bearer {second}"}
                )
                await stream.aclose()
                assert status == 503
                assert int(headers["retry-after"]) >= 1

                await trio.to_thread.run_sync(redis.start)
                assert [d["name"] for d in await ctl.ok("devices")] == ["d1", "d2"]  # the same session
                async with connect(hub, second) as ws2:
                    assert (await hello(ws2)).epoch == 1
                await eventually(lambda: _acked_seq(redis, "d1") == 7, timeout=15, poll=0.1)  # saved once back
            hub.stop()
    finally:
        redis.stop()


def _acked_seq(redis: Redis, name: str) -> int:
    """The acked seq Redis holds for device `name` (0 when none)."""
    reply = redis.command(b"HGET", f"hub:device:{name}".encode(), b"acked_seq")
    return int(reply.split(b"\r\n")[1]) if reply.startswith(b"$") and not reply.startswith(b"$-1") else 0


async def test_latest_values_and_last_seen_reach_redis_for_every_hub(redis_server: Redis, tmp_path: Path) -> None:
    state = StateConfig(backend="redis", url=redis_server.url)
    async with open_registry_store(state, tmp_path / "other") as other_hub:
        token = await other_hub.add("d1")
        config = hub_config(tmp_path / "hub", **{"state.backend": "redis", "state.url": redis_server.url})
        async with trio.open_nursery() as nursery:
            hub = await start_hub(nursery, config)
            before = time.time()
            async with connect(hub, token) as ws:
                await hello(ws)
                await send_batch(ws, 1, points(2, start=0))
                await send_batch(ws, 2, points(1, start=100, measurement="power"))
                await wait_ack(ws, 2)
            for _ in range(100):  # saved within a second or so of the ack
                found = await other_hub.latest(["d1", "d2"])
                if "d1" in found and len(found["d1"][1]) == 2:
                    break
                await trio.sleep(0.1)
            last_seen, latest = found["d1"]
            assert before <= last_seen <= time.time()
            sent = {"environment": points(2, start=0)[1], "power": points(1, start=100, measurement="power")[0]}
            assert {m: (p["ts"], p["fields"]["temperature"]) for m, p in latest.items()} == {
                m: (p["ts"], p["fields"]["temperature"]) for m, p in sent.items()
            }
            assert latest["power"]["fields"]["count"] == {"int": 0}  # as on the wire
            hub.stop()
