"""The device registry over SQLite: names, hashed tokens, labels, session epochs, last acked sequences and twins,
in one file.

A registry file made before labels existed gets the `labels` column when it is first opened (`_migrate`).
"""

from __future__ import annotations

import builtins
import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from hub.fleet._accounts import (
    OPERATOR_TOKEN_PREFIX,
    DeviceExists,
    DeviceRecord,
    OperatorExists,
    OperatorRecord,
    UnknownDevice,
    UnknownOperator,
    check_name,
    check_role,
    device_token_parts,
    new_secret,
    operator_token_parts,
    token_matches,
)
from hub.fleet._labels import apply_labels, check_label_key, check_labels
from hub.fleet._twins import Side, TwinRecord, patch_twin

__all__ = ["REGISTRY_FILE", "Registry", "registry_path"]

#: The registry's file name inside the hub's data directory.
REGISTRY_FILE = "registry.sqlite3"
_BUSY_TIMEOUT_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    name       TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    created    REAL NOT NULL,
    revoked    INTEGER NOT NULL DEFAULT 0,
    epoch      INTEGER NOT NULL DEFAULT 0,
    acked_seq  INTEGER NOT NULL DEFAULT 0,
    labels     TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS twins (
    name             TEXT PRIMARY KEY,
    desired          TEXT NOT NULL DEFAULT '{}',
    desired_version  INTEGER NOT NULL DEFAULT 0,
    desired_at       REAL NOT NULL DEFAULT 0,
    reported         TEXT NOT NULL DEFAULT '{}',
    reported_version INTEGER NOT NULL DEFAULT 0,
    reported_at      REAL NOT NULL DEFAULT 0,
    applied_version  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS operators (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    revoked    INTEGER NOT NULL DEFAULT 0,
    created    REAL NOT NULL
);
"""


def registry_path(data_dir: str | os.PathLike[str]) -> Path:
    """The registry file inside a hub data directory."""
    return Path(data_dir) / REGISTRY_FILE


class Registry:
    """Devices and their tokens in a SQLite file; safe to share between the trio thread and worker threads.

    Several processes may open the same file (WAL mode, busy timeout).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: we open transactions ourselves (BEGIN IMMEDIATE for read-modify-write, so a
        # writer in another process makes us wait on the busy timeout instead of failing a lock upgrade).
        self._db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            self._db.execute("PRAGMA journal_mode = WAL")
            # In WAL mode, NORMAL makes every commit survive a crash of this process (the commit is in the
            # WAL file, handed to the OS); only an OS crash or power cut may roll back the last commits, and
            # the file stays consistent. Points themselves are durable in the sink or the spool either way.
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.executescript(_SCHEMA)
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        """Add the columns a registry file made by an older hub lacks (another process may add them first)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(devices)")}
        if "labels" not in columns:
            try:
                self._db.execute("ALTER TABLE devices ADD COLUMN labels TEXT NOT NULL DEFAULT '{}'")
            except sqlite3.OperationalError:
                if "labels" not in {row[1] for row in self._db.execute("PRAGMA table_info(devices)")}:
                    raise

    # -- lifecycle

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- operator commands

    def add(self, name: str, labels: Mapping[str, str] | None = None) -> str:
        """Register a new device with `labels`; return its token ``"<name>.<secret>"`` (only its hash is stored)."""
        check_name(name, "device")
        text = _labels_json(check_labels(labels or {}))
        secret, digest = new_secret()
        try:
            with self._lock, self._db:
                self._db.execute(
                    "INSERT INTO devices (name, token_hash, created, labels) VALUES (?, ?, ?, ?)",
                    (name, digest, time.time(), text),
                )
        except sqlite3.IntegrityError:
            raise DeviceExists(f"device {name!r} already exists") from None
        return f"{name}.{secret}"

    def rotate(self, name: str) -> str:
        """Give an existing device a new token (the old one stops working) and un-revoke it."""
        secret, digest = new_secret()
        with self._lock, self._db:
            cur = self._db.execute("UPDATE devices SET token_hash = ?, revoked = 0 WHERE name = ?", (digest, name))
        if cur.rowcount == 0:
            raise UnknownDevice(f"unknown device {name!r}")
        return f"{name}.{secret}"

    def revoke(self, name: str) -> None:
        """Refuse the device's token from now on (already open sessions are the hub's business)."""
        with self._lock, self._db:
            cur = self._db.execute("UPDATE devices SET revoked = 1 WHERE name = ?", (name,))
        if cur.rowcount == 0:
            raise UnknownDevice(f"unknown device {name!r}")

    def set_labels(self, name: str, set_: Mapping[str, str], remove: builtins.list[str]) -> dict[str, str]:
        """Remove the keys `remove`, then set `set_`; return the device's labels now (BadLabel, UnknownDevice)."""
        set_ = check_labels(set_)
        for key in remove:
            check_label_key(key)
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT labels FROM devices WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise UnknownDevice(f"unknown device {name!r}")
            labels = apply_labels(json.loads(row[0]), set_, remove)
            self._db.execute("UPDATE devices SET labels = ? WHERE name = ?", (_labels_json(labels), name))
        return labels

    def get(self, name: str) -> DeviceRecord | None:
        """The device's record, or None if it is not registered."""
        with self._lock:
            row = self._db.execute(
                "SELECT name, created, revoked, epoch, acked_seq, labels FROM devices WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None else _record(row)

    def list(self) -> list[DeviceRecord]:
        """All devices, sorted by name."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, created, revoked, epoch, acked_seq, labels FROM devices ORDER BY name"
            ).fetchall()
        return [_record(row) for row in rows]

    # -- twins

    def twin(self, name: str) -> TwinRecord:
        """The device's twin (UnknownDevice for an unregistered name)."""
        with self._lock:
            return self._twin(name)

    def _twin(self, name: str) -> TwinRecord:
        row = self._db.execute(
            "SELECT t.desired, t.desired_version, t.reported, t.reported_version, t.applied_version, t.desired_at,"
            " t.reported_at, d.name FROM devices d LEFT JOIN twins t ON t.name = d.name WHERE d.name = ?",
            (name,),
        ).fetchone()
        if row is None:
            raise UnknownDevice(f"unknown device {name!r}")
        if row[0] is None:
            return TwinRecord()
        desired, dv, reported, rv, applied, desired_at, reported_at, _ = row
        return TwinRecord(json.loads(desired), dv, json.loads(reported), rv, applied, desired_at, reported_at)

    def patch_twin(
        self, name: str, side: Side, patch: object, if_version: int | None = None, applied: int | None = None
    ) -> tuple[TwinRecord, bool]:
        """`hub.fleet.patch_twin` on the device's stored twin, in one transaction; the twin after it, and whether
        the document changed."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            old = self._twin(name)
            rec, changed = patch_twin(old, side, patch, if_version=if_version, applied=applied)
            if rec != old:
                self._db.execute(
                    "INSERT OR REPLACE INTO twins (name, desired, desired_version, desired_at, reported,"
                    " reported_version, reported_at, applied_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        _json(rec.desired),
                        rec.desired_version,
                        rec.desired_at,
                        _json(rec.reported),
                        rec.reported_version,
                        rec.reported_at,
                        rec.applied_version,
                    ),
                )
        return rec, changed

    # -- the hub's calls

    def revoked_names(self) -> set[str]:
        """Names of all revoked devices (the hub closes their open sessions)."""
        with self._lock:
            rows = self._db.execute("SELECT name FROM devices WHERE revoked = 1").fetchall()
        return {row[0] for row in rows}

    def authenticate(self, token: str) -> str | None:
        """The name of the device the token belongs to; None for unknown, wrong, revoked or malformed."""
        parts = device_token_parts(token)
        if parts is None:
            return None
        name, secret = parts
        with self._lock:
            row = self._db.execute("SELECT token_hash, revoked FROM devices WHERE name = ?", (name,)).fetchone()
        stored, revoked = (None, True) if row is None else (row[0], bool(row[1]))
        return name if token_matches(secret, stored) and not revoked else None

    def begin_session(self, name: str) -> tuple[int, int]:
        """Bump the device's session epoch; return ``(epoch, acked_seq)``."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE devices SET epoch = epoch + 1 WHERE name = ?", (name,))
            row = self._db.execute("SELECT epoch, acked_seq FROM devices WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownDevice(f"unknown device {name!r}")
        return int(row[0]), int(row[1])

    def save_acked(self, updates: Mapping[str, int]) -> None:
        """Raise each device's acked sequence to the given one (never lowers it), committed on return.

        Names not in the registry are ignored.
        """
        if not updates:
            return
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "UPDATE devices SET acked_seq = MAX(acked_seq, ?) WHERE name = ?",
                [(int(seq), name) for name, seq in updates.items()],
            )

    # -- operators of the control channel

    def add_operator(self, name: str, role: str) -> str:
        """Create an operator; return its token ``"op.<name>.<secret>"`` (only its hash is stored)."""
        check_name(name, "operator")
        check_role(role)
        secret, digest = new_secret()
        try:
            with self._lock, self._db:
                self._db.execute(
                    "INSERT INTO operators (name, role, token_hash, created) VALUES (?, ?, ?, ?)",
                    (name, role, digest, time.time()),
                )
        except sqlite3.IntegrityError:
            raise OperatorExists(f"operator {name!r} already exists") from None
        return f"{OPERATOR_TOKEN_PREFIX}{name}.{secret}"

    def list_operators(self) -> builtins.list[OperatorRecord]:
        """All operators (revoked ones too), sorted by name."""
        with self._lock:
            rows = self._db.execute("SELECT name, role, created, revoked FROM operators ORDER BY name").fetchall()
        return [OperatorRecord(name=n, role=r, created=c, revoked=bool(v)) for n, r, c, v in rows]

    def revoke_operator(self, name: str) -> None:
        """Refuse the operator's token from now on; the hub closes its open sessions (4003)."""
        with self._lock, self._db:
            cur = self._db.execute("UPDATE operators SET revoked = 1 WHERE name = ?", (name,))
        if cur.rowcount == 0:
            raise UnknownOperator(f"unknown operator {name!r}")

    def revoked_operators(self) -> set[str]:
        """Names of all revoked operators (the hub closes their open sessions)."""
        with self._lock:
            rows = self._db.execute("SELECT name FROM operators WHERE revoked = 1").fetchall()
        return {row[0] for row in rows}

    def authenticate_operator(self, token: str) -> tuple[str, str] | None:
        """``(name, role)`` of the operator the token belongs to; None for unknown, wrong, revoked or malformed."""
        parts = operator_token_parts(token)
        if parts is None:
            return None
        name, secret = parts
        with self._lock:
            row = self._db.execute("SELECT token_hash, revoked, role FROM operators WHERE name = ?", (name,)).fetchone()
        stored, revoked, role = (None, True, "") if row is None else (row[0], bool(row[1]), row[2])
        return (name, role) if token_matches(secret, stored) and not revoked else None


def _record(row: tuple[str, float, int, int, int, str]) -> DeviceRecord:
    name, created, revoked, epoch, acked_seq, labels = row
    return DeviceRecord(
        name=name, created=created, revoked=bool(revoked), epoch=epoch, acked_seq=acked_seq, labels=json.loads(labels)
    )


def _json(doc: object) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _labels_json(labels: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(labels.items())), separators=(",", ":"))
