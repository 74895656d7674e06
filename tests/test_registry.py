"""Tests of the device registry on a real SQLite file."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path

import pytest

from hub.fleet import BadName, DeviceExists, DeviceRecord, Registry, UnknownDevice, registry_path


@pytest.fixture
def reg(tmp_path: Path):
    with Registry(registry_path(tmp_path / "data")) as registry:
        yield registry


def _column(path: Path, sql: str) -> list:
    db = sqlite3.connect(path)
    try:
        return [row[0] for row in db.execute(sql)]
    finally:
        db.close()


def test_add_get_list(reg: Registry) -> None:
    token_b = reg.add("beta")
    token_a = reg.add("alpha-1_x")
    assert token_a.startswith("alpha-1_x.") and token_b.startswith("beta.")
    assert token_a != token_b
    rec = reg.get("beta")
    assert isinstance(rec, DeviceRecord)
    assert (rec.name, rec.revoked, rec.epoch, rec.acked_seq) == ("beta", False, 0, 0)
    assert rec.created > 1.7e9
    assert [r.name for r in reg.list()] == ["alpha-1_x", "beta"]
    assert reg.get("gamma") is None


def test_creates_parent_directory_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "registry.sqlite3"
    with Registry(path) as registry:
        registry.add("d1")
    assert path.exists()
    assert _column(path, "PRAGMA journal_mode") == ["wal"]


def test_only_the_hash_is_stored(reg: Registry) -> None:
    token = reg.add("d1")
    secret = token.rsplit(".", 1)[1]
    assert len(secret) >= 43  # 32 random bytes, url-safe base64
    assert _column(reg.path, "SELECT token_hash FROM devices") == [hashlib.sha256(secret.encode()).hexdigest()]
    stored = b"".join(p.read_bytes() for p in reg.path.parent.iterdir() if p.name.startswith(reg.path.name))
    assert b"d1" in stored  # the name is there, so the scan does read the data
    assert secret.encode() not in stored


@pytest.mark.parametrize(
    "token",
    [
        "",
        "d1",  # no dot
        "d1.",
        ".secret",
        "nobody.secret",
        "d1." + "x" * 43,
        "d1." + "x" * 300,  # too long
        "d1.sécret",  # not ASCII
    ],
)
def test_authenticate_failures_return_none(reg: Registry, token: str) -> None:
    reg.add("d1")
    assert reg.authenticate(token) is None


def test_authenticate(reg: Registry) -> None:
    t1, t2 = reg.add("d1"), reg.add("d2")
    assert reg.authenticate(t1) == "d1"
    assert reg.authenticate(t2) == "d2"
    # d2's secret under d1's name, and a truncated or extended secret
    assert reg.authenticate("d1." + t2.rsplit(".", 1)[1]) is None
    assert reg.authenticate(t1[:-1]) is None
    assert reg.authenticate(t1 + "A") is None
    assert reg.authenticate(t1 + ".x") is None  # splits on the last dot


def test_revoke_and_rotate(reg: Registry) -> None:
    old = reg.add("d1")
    reg.revoke("d1")
    assert reg.get("d1").revoked is True
    assert reg.authenticate(old) is None
    reg.revoke("d1")  # again: no error
    new = reg.rotate("d1")
    assert new != old and new.startswith("d1.")
    assert reg.get("d1").revoked is False
    assert reg.authenticate(new) == "d1"
    assert reg.authenticate(old) is None
    newer = reg.rotate("d1")  # rotating an active device also retires the previous token
    assert reg.authenticate(new) is None
    assert reg.authenticate(newer) == "d1"


def test_unknown_device_errors(reg: Registry) -> None:
    with pytest.raises(UnknownDevice):
        reg.revoke("ghost")
    with pytest.raises(UnknownDevice):
        reg.rotate("ghost")
    with pytest.raises(UnknownDevice):
        reg.begin_session("ghost")
    assert reg.list() == []


@pytest.mark.parametrize("name", ["", "a.b", "-a", "_a", "a b", "a/b", "é", "a" * 65, "a\n"])
def test_bad_names_refused(reg: Registry, name: str) -> None:
    with pytest.raises(BadName):
        reg.add(name)
    assert reg.list() == []


def test_longest_name_accepted(reg: Registry) -> None:
    token = reg.add("a" * 64)
    assert reg.authenticate(token) == "a" * 64


def test_duplicate_add(reg: Registry) -> None:
    token = reg.add("d1")
    with pytest.raises(DeviceExists):
        reg.add("d1")
    assert reg.authenticate(token) == "d1"  # the first token still works


def test_begin_session_bumps_epoch(reg: Registry) -> None:
    reg.add("d1")
    reg.add("d2")
    assert reg.begin_session("d1") == (1, 0)
    assert reg.begin_session("d1") == (2, 0)
    reg.save_acked({"d1": 7})
    assert reg.begin_session("d1") == (3, 7)
    assert reg.get("d2").epoch == 0


def test_save_acked_max_and_survives_reopen(tmp_path: Path) -> None:
    path = registry_path(tmp_path)
    with Registry(path) as reg:
        reg.add("d1")
        reg.add("d2")
        reg.save_acked({"d1": 10, "d2": 3})
        reg.save_acked({"d1": 5})  # lower: ignored
        reg.save_acked({"d2": 4, "ghost": 99})  # unknown names ignored
        reg.save_acked({})
        # committed on return: a separate connection sees it at once
        assert _column(path, "SELECT acked_seq FROM devices ORDER BY name") == [10, 4]
    with Registry(path) as reg:
        assert [(r.name, r.acked_seq) for r in reg.list()] == [("d1", 10), ("d2", 4)]
        assert reg.begin_session("d1") == (1, 10)


def test_two_registries_on_one_file(tmp_path: Path) -> None:
    path = registry_path(tmp_path)
    with Registry(path) as hub_side, Registry(path) as cli_side:
        token = cli_side.add("d1")
        assert hub_side.authenticate(token) == "d1"
        hub_side.begin_session("d1")
        hub_side.save_acked({"d1": 5})
        cli_side.revoke("d1")
        assert hub_side.authenticate(token) is None
        assert cli_side.get("d1").acked_seq == 5


def test_threads_share_one_registry(reg: Registry) -> None:
    names = [f"d{i}" for i in range(4)]
    tokens = [reg.add(n) for n in names]
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            for seq in range(1, 201):
                reg.save_acked({name: seq + offset for name in names})
        except BaseException as exc:  # collected and re-checked in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for _ in range(100):
        for name, token in zip(names, tokens, strict=True):
            assert reg.authenticate(token) == name
    for t in threads:
        t.join()
    assert errors == []
    assert {r.acked_seq for r in reg.list()} == {202}


def test_a_registry_from_before_labels_is_migrated(tmp_path: Path) -> None:
    path = registry_path(tmp_path / "data")
    path.parent.mkdir(parents=True)
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE devices (name TEXT PRIMARY KEY, token_hash TEXT NOT NULL, created REAL NOT NULL,
            revoked INTEGER NOT NULL DEFAULT 0, epoch INTEGER NOT NULL DEFAULT 0, acked_seq INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE operators (name TEXT PRIMARY KEY, role TEXT NOT NULL, token_hash TEXT NOT NULL,
            revoked INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
        """
    )
    digest = hashlib.sha256(b"secret").hexdigest()
    old.execute("INSERT INTO devices (name, token_hash, created, acked_seq) VALUES ('d1', ?, 1.7e9, 42)", (digest,))
    old.commit()
    old.close()
    with Registry(path) as reg, Registry(path) as second:  # the second opening finds the column there
        assert reg.get("d1") == DeviceRecord(name="d1", created=1.7e9, revoked=False, epoch=0, acked_seq=42)
        assert reg.authenticate("d1.secret") == "d1"
        assert reg.set_labels("d1", {"site": "berlin"}, []) == {"site": "berlin"}
        record = second.get("d1")
        assert record is not None and record.labels == {"site": "berlin"}
        reg.add("d2", {"model": "th-100"})
        assert [r.labels for r in second.list()] == [{"site": "berlin"}, {"model": "th-100"}]
