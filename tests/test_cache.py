"""The registry cache (`RegistryCache`) with plain values: what it trusts, for how long, how many, and the epochs it
hands out while Redis is unreachable."""

from __future__ import annotations

import pytest

from hub.fleet._cache import RegistryCache


def test_an_account_read_is_trusted_for_ttl_seconds() -> None:
    cache = RegistryCache(10, ttl=300)
    cache.saw("device", "d1", "hash1", False, now=1000.0)
    entry = cache.account("device", "d1", now=1300.0)
    assert entry is not None and (entry.token_hash, entry.revoked) == ("hash1", False)
    assert cache.account("device", "d1", now=1300.5) is None  # too old to trust
    assert cache.account("device", "d2", now=1000.0) is None  # never read
    assert cache.account("operator", "d1", now=1000.0) is None  # devices and operators apart
    cache.saw("device", "d1", "hash1", False, now=1400.0)  # read again: trusted again
    assert cache.account("device", "d1", now=1600.0) is not None


def test_an_operator_keeps_its_role() -> None:
    cache = RegistryCache(10, ttl=60)
    cache.saw("operator", "alice", "h", False, now=0.0, role="admin")
    entry = cache.account("operator", "alice", now=1.0)
    assert entry is not None and entry.role == "admin"


def test_a_name_redis_does_not_know_is_forgotten() -> None:
    cache = RegistryCache(10, ttl=60)
    cache.saw("device", "d1", "h", False, now=0.0)
    cache.saw("device", "d1", None, True, now=1.0)
    assert cache.account("device", "d1", now=1.0) is None
    assert len(cache) == 0


def test_the_least_recently_used_entry_goes_first() -> None:
    cache = RegistryCache(2, ttl=60)
    cache.saw("device", "a", "h", False, now=0.0)
    cache.saw("device", "b", "h", False, now=0.0)
    assert cache.account("device", "a", now=1.0) is not None  # a used: b is now the oldest
    cache.saw("device", "c", "h", False, now=2.0)
    assert len(cache) == 2
    assert cache.account("device", "b", now=2.0) is None
    assert cache.account("device", "a", now=2.0) is not None
    assert cache.account("device", "c", now=2.0) is not None


def test_revocations_stick_and_a_rotation_forgets() -> None:
    cache = RegistryCache(10, ttl=60)
    for name in ("d1", "d2", "d3"):
        cache.saw("device", name, "h", False, now=0.0)
    cache.saw_revoked("device", {"d1", "unknown"})
    cache.saw_revoked("operator", {"d2"})  # another kind: no effect on the device
    entry = cache.account("device", "d1", now=1.0)
    assert entry is not None and entry.revoked
    entry = cache.account("device", "d2", now=1.0)
    assert entry is not None and not entry.revoked
    assert cache.begin_session("d1", now=1.0) is None  # revoked: no session either
    cache.forget("device", "d3")
    assert cache.account("device", "d3", now=1.0) is None


def test_a_session_without_redis_takes_the_next_epoch_and_the_best_acked_seq() -> None:
    cache = RegistryCache(10, ttl=60)
    cache.saw("device", "d1", "h", False, now=0.0)
    assert cache.begin_session("d1", now=1.0) is None  # no epoch read yet
    cache.saw_session("d1", epoch=4, acked=10)
    cache.saw_acked({"d1": 17, "other": 3})
    cache.saw_acked({"d1": 12})  # never lowered
    assert cache.begin_session("d1", now=1.0) == (5, 17)
    assert cache.begin_session("d1", now=2.0) == (6, 17)
    assert cache.pending_epochs() == {"d1": 6}
    assert cache.epoch_floor("d1") == 6 and cache.epoch_floor("d2") == 0
    assert cache.begin_session("d1", now=61.0) is None  # too old


def test_pending_epochs_survive_eviction_and_are_forgotten_once_written() -> None:
    cache = RegistryCache(1, ttl=60)
    cache.saw("device", "d1", "h", False, now=0.0)
    cache.saw_session("d1", epoch=1, acked=0)
    assert cache.begin_session("d1", now=0.0) == (2, 0)
    cache.saw("device", "d2", "h", False, now=0.0)  # pushes d1 out
    assert cache.account("device", "d1", now=0.0) is None
    assert cache.pending_epochs() == {"d1": 2}
    cache.epochs_written({"d1": 1})  # Redis holds less: still pending
    assert cache.pending_epochs() == {"d1": 2}
    cache.epochs_written({"d1": 3})
    assert cache.pending_epochs() == {}


@pytest.mark.parametrize(("size", "ttl"), [(0, 60.0), (10, 0.0)])
def test_a_cache_needs_room_and_trust(size: int, ttl: float) -> None:
    with pytest.raises(ValueError):
        RegistryCache(size, ttl)
