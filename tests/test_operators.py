"""Operators of the control channel: the registry table, roles, and `hub operator ...` on the command line."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from hub import cli
from hub.fleet import (
    ROLES,
    BadName,
    BadRole,
    OperatorExists,
    OperatorRecord,
    Registry,
    UnknownOperator,
    registry_path,
    role_allows,
)
from tests.hubproc import run_hub


@pytest.fixture
def reg(tmp_path: Path):
    with Registry(registry_path(tmp_path / "data")) as registry:
        yield registry


# ---------------------------------------------------------------------------- registry


def test_add_list_authenticate(reg: Registry) -> None:
    alice = reg.add_operator("alice", "operator")
    bob = reg.add_operator("bob", "viewer")
    assert alice.startswith("op.alice.") and bob.startswith("op.bob.")
    assert reg.authenticate_operator(alice) == ("alice", "operator")
    assert reg.authenticate_operator(bob) == ("bob", "viewer")
    listed = reg.list_operators()
    assert [(o.name, o.role, o.revoked) for o in listed] == [("alice", "operator", False), ("bob", "viewer", False)]
    assert all(isinstance(o, OperatorRecord) and o.created > 1.7e9 for o in listed)


def test_only_the_hash_is_stored(reg: Registry) -> None:
    token = reg.add_operator("alice", "admin")
    secret = token.rsplit(".", 1)[1]
    assert len(secret) >= 43
    db = sqlite3.connect(reg.path)
    try:
        [(stored,)] = db.execute("SELECT token_hash FROM operators").fetchall()
    finally:
        db.close()
    assert stored == hashlib.sha256(secret.encode()).hexdigest()
    data = b"".join(p.read_bytes() for p in reg.path.parent.iterdir() if p.name.startswith(reg.path.name))
    assert b"alice" in data and secret.encode() not in data


def test_device_and_operator_tokens_never_cross(reg: Registry) -> None:
    device = reg.add("alice")  # a device and an operator may share a name
    operator = reg.add_operator("alice", "admin")
    assert reg.authenticate(device) == "alice"
    assert reg.authenticate_operator(operator) == ("alice", "admin")
    assert reg.authenticate(operator) is None
    assert reg.authenticate_operator(device) is None
    assert reg.authenticate_operator("op." + device) is None  # the device's secret under the operator prefix
    # a device named like the prefix cannot exist: device names have no "."
    with pytest.raises(BadName):
        reg.add("op.alice")


@pytest.mark.parametrize(
    "token",
    ["", "op.", "op.alice", "op.alice.", "alice.secret", "op.nobody." + "x" * 43, "op.alice." + "x" * 300, "op.é.x"],
)
def test_authenticate_failures_return_none(reg: Registry, token: str) -> None:
    reg.add_operator("alice", "viewer")
    assert reg.authenticate_operator(token) is None


def test_wrong_secret_and_other_operators_secret(reg: Registry) -> None:
    alice = reg.add_operator("alice", "admin")
    bob = reg.add_operator("bob", "viewer")
    assert reg.authenticate_operator("op.alice." + bob.rsplit(".", 1)[1]) is None
    assert reg.authenticate_operator(alice[:-1]) is None
    assert reg.authenticate_operator(alice + "A") is None


def test_revoke(reg: Registry) -> None:
    token = reg.add_operator("alice", "admin")
    reg.add_operator("bob", "viewer")
    assert reg.revoked_operators() == set()
    reg.revoke_operator("alice")
    assert reg.authenticate_operator(token) is None
    assert reg.revoked_operators() == {"alice"}
    assert [(o.name, o.revoked) for o in reg.list_operators()] == [("alice", True), ("bob", False)]
    reg.revoke_operator("alice")  # again: no error
    with pytest.raises(UnknownOperator):
        reg.revoke_operator("ghost")
    # a name is never reused, so a revoked operator cannot come back by accident
    with pytest.raises(OperatorExists):
        reg.add_operator("alice", "admin")
    assert reg.revoked_names() == set()  # devices are untouched


def test_bad_name_and_role(reg: Registry) -> None:
    for name in ["", "a.b", "-a", "a b", "a" * 65, "é"]:
        with pytest.raises(BadName):
            reg.add_operator(name, "viewer")
    for role in ["", "root", "Admin", None]:
        with pytest.raises(BadRole):
            reg.add_operator("alice", role)  # type: ignore[arg-type]
    assert reg.list_operators() == []


def test_existing_registry_file_gets_the_table(tmp_path: Path) -> None:
    path = registry_path(tmp_path)
    db = sqlite3.connect(path)  # a registry file from before operators existed
    db.execute(
        "CREATE TABLE devices (name TEXT PRIMARY KEY, token_hash TEXT NOT NULL, created REAL NOT NULL,"
        " revoked INTEGER NOT NULL DEFAULT 0, epoch INTEGER NOT NULL DEFAULT 0, acked_seq INTEGER NOT NULL DEFAULT 0)"
    )
    db.execute("INSERT INTO devices (name, token_hash, created) VALUES ('d1', 'x', 1.0)")
    db.commit()
    db.close()
    with Registry(path) as reg:
        assert [r.name for r in reg.list()] == ["d1"]
        token = reg.add_operator("alice", "viewer")
        assert reg.authenticate_operator(token) == ("alice", "viewer")


def test_roles_are_ordered() -> None:
    assert ROLES == ("viewer", "operator", "admin")
    allowed = {(r, n) for r in ROLES for n in ROLES if role_allows(r, n)}
    assert allowed == {
        ("viewer", "viewer"),
        ("operator", "viewer"),
        ("operator", "operator"),
        ("admin", "viewer"),
        ("admin", "operator"),
        ("admin", "admin"),
    }
    assert not role_allows("", "viewer")
    assert not role_allows("root", "viewer")
    assert not role_allows("admin", "root")


# ---------------------------------------------------------------------------- command line


def test_operator_round_trip_in_a_subprocess(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    added = run_hub("operator", "add", "alice", "--role", "operator", "--data-dir", data, cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert token.startswith("op.alice.") and added.stdout == token + "\n"
    assert "not be shown again" in added.stderr and "operator" in added.stderr
    assert token not in added.stderr
    assert run_hub("operator", "add", "root", "--role", "admin", "--data-dir", data, cwd=tmp_path).returncode == 0

    with Registry(registry_path(data)) as hub_side:
        assert hub_side.authenticate_operator(token) == ("alice", "operator")

        listed = run_hub("operator", "list", "--data-dir", data, cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        rows = [line.split() for line in listed.stdout.splitlines()]
        assert rows[0] == ["NAME", "ROLE", "STATE", "CREATED"]
        assert [r[:3] for r in rows[1:]] == [["alice", "operator", "active"], ["root", "admin", "active"]]
        assert token not in listed.stdout

        revoked = run_hub("operator", "revoke", "alice", "--data-dir", data, cwd=tmp_path)
        assert revoked.returncode == 0, revoked.stderr
        assert hub_side.authenticate_operator(token) is None
        shown = json.loads(run_hub("operator", "list", "--json", "--data-dir", data, cwd=tmp_path).stdout)
        assert [(o["name"], o["role"], o["state"]) for o in shown] == [
            ("alice", "operator", "revoked"),
            ("root", "admin", "active"),
        ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["operator", "add", "alice", "--role", "viewer"], "already exists"),
        (["operator", "add", "bad.name", "--role", "viewer"], "bad operator name"),
        (["operator", "revoke", "ghost"], "unknown operator"),
    ],
)
def test_operator_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    with Registry(registry_path(tmp_path)) as reg:
        reg.add_operator("alice", "admin")
    assert cli.main([*argv, "--data-dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert message in err and err.startswith("hub: error:")
    assert out == ""


def test_operator_add_needs_a_known_role(tmp_path: Path) -> None:
    for argv in (["operator", "add", "alice"], ["operator", "add", "alice", "--role", "root"]):
        with pytest.raises(SystemExit) as exc:
            cli.main([*argv, "--data-dir", str(tmp_path)])
        assert exc.value.code == 2
    with Registry(registry_path(tmp_path)) as reg:
        assert reg.list_operators() == []


def test_empty_operator_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["operator", "list", "--json", "--data-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cli.main(["operator", "list", "--data-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.split() == ["NAME", "ROLE", "STATE", "CREATED"]
    assert "no operators" in err
