"""The registry store (`RegistryStore`): the same behaviour over SQLite and over a real Redis, and what only
Redis adds: several hubs sharing one registry atomically."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from device_client.protocol import Point
from hub.config import StateConfig
from hub.fleet import (
    MAX_LABELS,
    BadLabel,
    BadName,
    BadRole,
    DeviceExists,
    OperatorExists,
    RegistryStore,
    StoreUnavailable,
    UnknownDevice,
    UnknownOperator,
    open_registry_store,
)
from tests.servers import Redis

# ---------------------------------------------------------------------------- both backends (`registry_store`)


async def test_add_get_and_list_sorted(registry_store: RegistryStore) -> None:
    for name in ("zeta", "alpha", "mid-1"):
        token = await registry_store.add(name)
        assert token.startswith(f"{name}.") and len(token) > len(name) + 40
    record = await registry_store.get("alpha")
    assert record is not None
    assert (record.name, record.revoked, record.epoch, record.acked_seq) == ("alpha", False, 0, 0)
    assert record.created > 1.7e9
    assert await registry_store.get("nobody") is None
    assert [r.name for r in await registry_store.list()] == ["alpha", "mid-1", "zeta"]


async def test_duplicate_and_bad_names_are_refused(registry_store: RegistryStore) -> None:
    await registry_store.add("d1")
    with pytest.raises(DeviceExists):
        await registry_store.add("d1")
    await registry_store.revoke("d1")
    with pytest.raises(DeviceExists):  # a revoked name stays taken
        await registry_store.add("d1")
    for bad in ("", "-x", "a.b", "a b", "x" * 65, "é"):
        with pytest.raises(BadName):
            await registry_store.add(bad)
    assert [r.name for r in await registry_store.list()] == ["d1"]


@pytest.mark.parametrize("token", ["", "no-dot", ".", "d1.", "x" * 300, "d1.sécret", "op.d1.x", "d1.x.y"])
async def test_malformed_tokens_authenticate_nobody(registry_store: RegistryStore, token: str) -> None:
    await registry_store.add("d1")
    assert await registry_store.authenticate(token) is None


async def test_authenticate_good_wrong_unknown_revoked(registry_store: RegistryStore) -> None:
    token = await registry_store.add("d1")
    other = await registry_store.add("d2")
    assert await registry_store.authenticate(token) == "d1"
    assert await registry_store.authenticate(other) == "d2"
    secret = token.partition(".")[2]
    assert await registry_store.authenticate("d1." + other.partition(".")[2]) is None  # another device's secret
    assert await registry_store.authenticate("d1." + secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert await registry_store.authenticate("ghost." + secret) is None
    await registry_store.revoke("d1")
    assert await registry_store.authenticate(token) is None
    assert await registry_store.revoked_names() == {"d1"}
    record = await registry_store.get("d1")
    assert record is not None and record.revoked


async def test_rotate_replaces_the_token_and_unrevokes(registry_store: RegistryStore) -> None:
    old = await registry_store.add("d1")
    await registry_store.revoke("d1")
    new = await registry_store.rotate("d1")
    assert new != old and new.startswith("d1.")
    assert await registry_store.authenticate(new) == "d1"
    assert await registry_store.authenticate(old) is None
    assert await registry_store.revoked_names() == set()
    with pytest.raises(UnknownDevice):
        await registry_store.rotate("ghost")
    with pytest.raises(UnknownDevice):
        await registry_store.revoke("ghost")
    assert await registry_store.get("ghost") is None  # neither created it


async def test_begin_session_bumps_the_epoch_and_returns_the_acked_seq(registry_store: RegistryStore) -> None:
    await registry_store.add("d1")
    assert await registry_store.begin_session("d1") == (1, 0)
    await registry_store.save_acked({"d1": 42})
    assert await registry_store.begin_session("d1") == (2, 42)
    record = await registry_store.get("d1")
    assert record is not None and (record.epoch, record.acked_seq) == (2, 42)
    with pytest.raises(UnknownDevice):
        await registry_store.begin_session("ghost")


async def test_save_acked_never_lowers_and_ignores_unknown_names(registry_store: RegistryStore) -> None:
    await registry_store.add("d1")
    await registry_store.add("d2")
    await registry_store.save_acked({"d1": 10, "d2": 3, "ghost": 7})
    await registry_store.save_acked({"d1": 4, "d2": 5})
    await registry_store.save_acked({})
    assert {r.name: r.acked_seq for r in await registry_store.list()} == {"d1": 10, "d2": 5}
    assert await registry_store.get("ghost") is None


async def test_many_devices_save_in_one_call(registry_store: RegistryStore) -> None:
    names = [f"d{i:04d}" for i in range(1200)]  # more than one Redis script call's worth
    for name in names:
        await registry_store.add(name)
    await registry_store.save_acked({name: i + 1 for i, name in enumerate(names)})
    assert [r.acked_seq for r in await registry_store.list()] == list(range(1, 1201))


async def test_operators_add_authenticate_roles_and_revoke(registry_store: RegistryStore) -> None:
    tokens = {name: await registry_store.add_operator(name, role) for name, role in
              (("carol", "admin"), ("alice", "viewer"), ("bob", "operator"))}  # fmt: skip
    assert all(token.startswith(f"op.{name}.") for name, token in tokens.items())
    assert await registry_store.authenticate_operator(tokens["alice"]) == ("alice", "viewer")
    assert await registry_store.authenticate_operator(tokens["carol"]) == ("carol", "admin")
    listed = await registry_store.list_operators()
    assert [(o.name, o.role, o.revoked) for o in listed] == [
        ("alice", "viewer", False),
        ("bob", "operator", False),
        ("carol", "admin", False),
    ]
    await registry_store.revoke_operator("bob")
    assert await registry_store.authenticate_operator(tokens["bob"]) is None
    assert await registry_store.revoked_operators() == {"bob"}
    assert [o.revoked for o in await registry_store.list_operators()] == [False, True, False]
    with pytest.raises(UnknownOperator):
        await registry_store.revoke_operator("ghost")


async def test_operator_names_are_never_reused_and_roles_checked(registry_store: RegistryStore) -> None:
    await registry_store.add_operator("alice", "viewer")
    with pytest.raises(OperatorExists):
        await registry_store.add_operator("alice", "admin")
    await registry_store.revoke_operator("alice")
    with pytest.raises(OperatorExists):
        await registry_store.add_operator("alice", "admin")
    with pytest.raises(BadRole):
        await registry_store.add_operator("bob", "root")
    with pytest.raises(BadName):
        await registry_store.add_operator("b.b", "viewer")
    assert [o.name for o in await registry_store.list_operators()] == ["alice"]


async def test_device_and_operator_tokens_never_cross(registry_store: RegistryStore) -> None:
    device = await registry_store.add("alice")
    operator = await registry_store.add_operator("alice", "admin")
    assert await registry_store.authenticate(operator) is None
    assert await registry_store.authenticate_operator(device) is None
    assert await registry_store.authenticate_operator("op.ghost." + operator.rpartition(".")[2]) is None
    assert await registry_store.authenticate_operator("op.alice") is None


def _pt(measurement: str, ts: int, **fields: object) -> Point:
    return {"measurement": measurement, "ts": ts, "fields": dict(fields), "tags": {"room": "lab 2"}}  # type: ignore[typeddict-item]


async def test_latest_values_are_saved_merged_and_read_in_bulk(registry_store: RegistryStore) -> None:
    assert await registry_store.latest(["d1"]) == {}
    assert await registry_store.latest([]) == {}
    env = _pt("env", 1_764_000_000_123, temperature=21.123456789012345, door=False, status="ok", boots={"int": 2**62})
    power = _pt("power", 1_764_000_000_200, watts=0.1)
    await registry_store.save_latest({"d1": (1_764_000_001.25, {"env": env, "power": power}), "d2": (5.0, {})})
    assert await registry_store.latest(["d1", "d2", "ghost"]) == {
        "d1": (1_764_000_001.25, {"env": env, "power": power}),  # exactly: floats, ints, bools, strings
        "d2": (5.0, {}),
    }
    newer = _pt("env", 1_764_000_002_000, temperature=22.0)
    await registry_store.save_latest({"d1": (1_764_000_002.5, {"env": newer})})  # another hub: only env since
    assert await registry_store.latest(["d1"]) == {"d1": (1_764_000_002.5, {"env": newer, "power": power})}
    await registry_store.save_latest({"d1": (1_764_000_001.75, {"env": env})})  # an older hub's late save
    assert await registry_store.latest(["d1"]) == {"d1": (1_764_000_002.5, {"env": newer, "power": power})}


async def test_latest_values_of_many_devices_in_one_call(registry_store: RegistryStore) -> None:
    values = {f"d{i}": (float(i), {"env": _pt("env", i, v=float(i))}) for i in range(1200)}
    await registry_store.save_latest(values)
    names = [f"d{i}" for i in range(0, 1300, 7)]
    assert await registry_store.latest(names) == {name: values[name] for name in names if name in values}


# ---------------------------------------------------------------------------- Redis: many hubs, one registry


def _redis(server: Redis, prefix: str = "hub") -> StateConfig:
    return StateConfig(backend="redis", url=server.url, prefix=prefix)


async def test_two_hubs_share_the_registry(redis_server: Redis, tmp_path: Path) -> None:
    async with (
        open_registry_store(_redis(redis_server), tmp_path / "a") as hub_a,
        open_registry_store(_redis(redis_server), tmp_path / "b") as hub_b,
    ):
        token = await hub_a.add("d1")
        assert await hub_b.authenticate(token) == "d1"
        assert await hub_a.begin_session("d1") == (1, 0)
        await hub_a.save_acked({"d1": 9})
        assert await hub_b.begin_session("d1") == (2, 9)  # the device moved to hub B
        await hub_b.save_acked({"d1": 12})
        await hub_a.save_acked({"d1": 10})  # hub A's late save does not lower it
        record = await hub_a.get("d1")
        assert record is not None and (record.epoch, record.acked_seq) == (2, 12)
        await hub_b.revoke("d1")
        assert await hub_a.authenticate(token) is None
        assert await hub_a.revoked_names() == {"d1"}
        operator = await hub_b.add_operator("alice", "admin")
        assert await hub_a.authenticate_operator(operator) == ("alice", "admin")
        with pytest.raises(OperatorExists):
            await hub_a.add_operator("alice", "viewer")


async def test_concurrent_sessions_and_adds_on_two_hubs_are_atomic(redis_server: Redis, tmp_path: Path) -> None:
    epochs: list[int] = []
    won: list[str] = []
    async with (
        open_registry_store(_redis(redis_server), tmp_path / "a") as hub_a,
        open_registry_store(_redis(redis_server), tmp_path / "b") as hub_b,
    ):
        await hub_a.add("d1")

        async def connect(hub: RegistryStore) -> None:
            epochs.append((await hub.begin_session("d1"))[0])

        async def add(hub: RegistryStore, who: str) -> None:
            try:
                await hub.add("race")
            except DeviceExists:
                return
            won.append(who)

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(connect, hub_a if i % 2 else hub_b)
            for i in range(10):
                nursery.start_soon(add, hub_a if i % 2 else hub_b, f"add-{i}")
    assert sorted(epochs) == list(range(1, 41))  # every session got its own epoch
    assert len(won) == 1


async def test_prefixes_keep_fleets_apart(redis_server: Redis, tmp_path: Path) -> None:
    async with (
        open_registry_store(_redis(redis_server, "east"), tmp_path) as east,
        open_registry_store(_redis(redis_server, "west"), tmp_path) as west,
    ):
        token = await east.add("d1")
        assert await west.authenticate(token) is None
        assert await west.list() == []
        await west.add("d1")  # the same name in another fleet


async def test_key_layout(redis_server: Redis, tmp_path: Path) -> None:
    async with open_registry_store(_redis(redis_server), tmp_path) as store:
        await store.add("d1")
        await store.add_operator("alice", "viewer")
        await store.revoke("d1")
        await store.revoke_operator("alice")
    keys = redis_server.command(b"KEYS", b"*")
    for key in (b"hub:device:d1", b"hub:devices", b"hub:devices:revoked", b"hub:operator:alice", b"hub:operators",
                b"hub:operators:revoked"):  # fmt: skip
        assert key in keys
    device = redis_server.command(b"HGETALL", b"hub:device:d1")
    for field in (b"token_hash", b"created", b"revoked", b"epoch", b"acked_seq"):
        assert b"\r\n" + field + b"\r\n" in device
    assert redis_server.command(b"HGET", b"hub:operator:alice", b"role") == b"$6\r\nviewer\r\n"


async def test_latest_values_key_layout_and_two_hubs(redis_server: Redis, tmp_path: Path) -> None:
    async with (
        open_registry_store(_redis(redis_server), tmp_path / "a") as hub_a,
        open_registry_store(_redis(redis_server), tmp_path / "b") as hub_b,
    ):
        point: Point = {"measurement": "env", "ts": 1, "fields": {"t": 1.5}, "tags": {}}
        await hub_a.save_latest({"d1": (10.5, {"env": point})})
        assert await hub_b.latest(["d1"]) == {"d1": (10.5, {"env": point})}
    assert redis_server.command(b"HGET", b"hub:latest:d1", b"last_seen") == b"$4\r\n10.5\r\n"
    stored = redis_server.command(b"HGET", b"hub:latest:d1", b"m:env")
    assert stored.split(b"\r\n")[1] == b'{"measurement":"env","ts":1,"fields":{"t":1.5},"tags":{}}'


async def test_an_unreachable_redis_is_one_clear_error(tmp_path: Path) -> None:
    state = StateConfig(backend="redis", url=f"unix://{tmp_path}/nothing.sock")
    with pytest.raises(BaseException) as caught:
        async with open_registry_store(state, tmp_path):
            pass
    error = caught.value
    while isinstance(error, BaseExceptionGroup):
        (error,) = error.exceptions
    assert isinstance(error, StoreUnavailable)
    assert str(error).startswith(f"cannot reach Redis at unix://{tmp_path}/nothing.sock: ")


# ---------------------------------------------------------------------------- labels (both backends)


async def test_labels_at_add_set_remove_and_list(registry_store: RegistryStore) -> None:
    await registry_store.add("d1", {"site": "berlin", "model": "th-100"})
    await registry_store.add("d2")
    record = await registry_store.get("d1")
    assert record is not None and record.labels == {"model": "th-100", "site": "berlin"}
    assert list(record.labels) == ["model", "site"]  # sorted by key
    assert await registry_store.set_labels("d2", {"site": "paris"}, []) == {"site": "paris"}
    labels = await registry_store.set_labels("d1", {"site": "paris", "rack": "r1"}, ["model", "absent"])
    assert labels == {"rack": "r1", "site": "paris"}
    assert await registry_store.set_labels("d1", {}, []) == labels  # nothing to change: the labels as they are
    assert {r.name: r.labels for r in await registry_store.list()} == {"d1": labels, "d2": {"site": "paris"}}
    assert await registry_store.set_labels("d1", {}, ["rack", "site"]) == {}
    record = await registry_store.get("d1")
    assert record is not None and record.labels == {}


async def test_bad_labels_are_refused_and_change_nothing(registry_store: RegistryStore) -> None:
    with pytest.raises(BadLabel):
        await registry_store.add("d1", {"bad key": "v"})
    assert await registry_store.get("d1") is None  # not added without its labels
    await registry_store.add("d1", {f"k{i}": "v" for i in range(MAX_LABELS)})
    with pytest.raises(BadLabel, match=f"at most {MAX_LABELS}"):
        await registry_store.set_labels("d1", {"one": "more"}, [])
    with pytest.raises(BadLabel):
        await registry_store.set_labels("d1", {"k0": "bad value"}, [])
    with pytest.raises(BadLabel):
        await registry_store.set_labels("d1", {}, ["bad key"])
    record = await registry_store.get("d1")
    assert record is not None and record.labels == {f"k{i}": "v" for i in range(MAX_LABELS)}
    assert await registry_store.set_labels("d1", {"one": "more"}, ["k0"]) == {
        **{f"k{i}": "v" for i in range(1, MAX_LABELS)},
        "one": "more",
    }
    with pytest.raises(UnknownDevice):
        await registry_store.set_labels("nobody", {"site": "x"}, [])


async def test_labels_survive_reopening(state_config: StateConfig, tmp_path: Path) -> None:
    async with open_registry_store(state_config, tmp_path / "data") as store:
        await store.add("d1", {"site": "berlin"})
        await store.revoke("d1")
        await store.rotate("d1")  # rotating and revoking keep the labels
    async with open_registry_store(state_config, tmp_path / "data") as store:
        record = await store.get("d1")
        assert record is not None and record.labels == {"site": "berlin"}


async def test_redis_labels_layout_and_a_device_from_before_labels(redis_server: Redis, tmp_path: Path) -> None:
    async with open_registry_store(_redis(redis_server), tmp_path) as store:
        await store.add("d1", {"site": "berlin"})
        await store.add("old")
        assert redis_server.command(b"HGET", b"hub:device:d1", b"labels") == b'$17\r\n{"site":"berlin"}\r\n'
        redis_server.command(b"HDEL", b"hub:device:old", b"labels")  # as an older hub stored it
        record = await store.get("old")
        assert record is not None and record.labels == {}
        assert await store.set_labels("old", {"b": "2", "a": "1"}, ["c"]) == {"a": "1", "b": "2"}
        assert redis_server.command(b"HGET", b"hub:device:old", b"labels") == b'$17\r\n{"a":"1","b":"2"}\r\n'
        assert {r.name: r.labels for r in await store.list()} == {"d1": {"site": "berlin"}, "old": {"a": "1", "b": "2"}}
