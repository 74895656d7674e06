"""The device registry: names, hashed tokens, session epochs and last acked sequences, in one SQLite file."""

from __future__ import annotations

import builtins
import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import attrs

__all__ = [
    "NAME_RE",
    "OPERATOR_TOKEN_PREFIX",
    "REGISTRY_FILE",
    "ROLES",
    "BadName",
    "BadRole",
    "DeviceExists",
    "DeviceRecord",
    "OperatorExists",
    "OperatorRecord",
    "Registry",
    "RegistryError",
    "UnknownDevice",
    "UnknownOperator",
    "registry_path",
    "role_allows",
]

#: Device names. No "." in a name: a token is "<name>.<secret>".
NAME_RE = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
#: The registry's file name inside the hub's data directory.
REGISTRY_FILE = "registry.sqlite3"
#: Longer tokens are refused without a lookup (a real one is at most 64 + 1 + 43 characters).
MAX_TOKEN_LEN = 200
#: Operator tokens are "op.<name>.<secret>". Device names hold no ".", so no operator token can pass for a
#: device token (its name part "op.<name>" is never a device name), and a device token never starts with "op.".
OPERATOR_TOKEN_PREFIX = "op."
#: Operator roles, least to most privileged: each may do everything the ones before it may.
ROLES = ("viewer", "operator", "admin")

_NAME = re.compile(NAME_RE)
# Compared against when the name is unknown, so a miss costs the same hash + compare as a hit.
_DUMMY_DIGEST = hashlib.sha256(b"no such device").hexdigest()
_BAD_NAME_TEXT = "use 1-64 of A-Z a-z 0-9 _ -, starting with a letter or digit"
_BUSY_TIMEOUT_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    name       TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    created    REAL NOT NULL,
    revoked    INTEGER NOT NULL DEFAULT 0,
    epoch      INTEGER NOT NULL DEFAULT 0,
    acked_seq  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS operators (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    revoked    INTEGER NOT NULL DEFAULT 0,
    created    REAL NOT NULL
);
"""


class RegistryError(Exception):
    """A registry operation was refused."""


class DeviceExists(RegistryError):
    """`add` of a name that is already registered."""


class UnknownDevice(RegistryError):
    """The named device is not registered."""


class BadName(RegistryError):
    """The name does not match `NAME_RE`."""


class OperatorExists(RegistryError):
    """`add_operator` of a name that is already taken (also by a revoked operator: names are never reused)."""


class UnknownOperator(RegistryError):
    """The named operator does not exist."""


class BadRole(RegistryError):
    """The role is not one of `ROLES`."""


@attrs.frozen
class DeviceRecord:
    """One registered device (the token hash is never exposed)."""

    name: str
    created: float  # seconds since the Unix epoch
    revoked: bool
    epoch: int  # bumped by every accepted session
    acked_seq: int  # highest sequence the hub has made durable


@attrs.frozen
class OperatorRecord:
    """One operator of the control channel (the token hash is never exposed)."""

    name: str
    role: str  # one of ROLES
    created: float  # seconds since the Unix epoch
    revoked: bool


def role_allows(role: str, needed: str) -> bool:
    """Whether `role` includes the rights of `needed` (viewer < operator < admin); unknown roles allow nothing."""
    return role in ROLES and needed in ROLES and ROLES.index(role) >= ROLES.index(needed)


def registry_path(data_dir: str | os.PathLike[str]) -> Path:
    """The registry file inside a hub data directory."""
    return Path(data_dir) / REGISTRY_FILE


def _digest(secret: str) -> str:
    # The secret is 256 random bits (token_urlsafe(32)), so guessing is hopeless without any stretching:
    # a plain SHA-256 is right here, a slow password KDF (bcrypt, scrypt) would only slow every handshake.
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


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
        except BaseException:
            self._db.close()
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

    def add(self, name: str) -> str:
        """Register a new device; return its token ``"<name>.<secret>"`` (only its hash is stored)."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise BadName(f"bad device name {name!r}: {_BAD_NAME_TEXT}")
        secret = secrets.token_urlsafe(32)
        try:
            with self._lock, self._db:
                self._db.execute(
                    "INSERT INTO devices (name, token_hash, created) VALUES (?, ?, ?)",
                    (name, _digest(secret), time.time()),
                )
        except sqlite3.IntegrityError:
            raise DeviceExists(f"device {name!r} already exists") from None
        return f"{name}.{secret}"

    def rotate(self, name: str) -> str:
        """Give an existing device a new token (the old one stops working) and un-revoke it."""
        secret = secrets.token_urlsafe(32)
        with self._lock, self._db:
            cur = self._db.execute(
                "UPDATE devices SET token_hash = ?, revoked = 0 WHERE name = ?", (_digest(secret), name)
            )
        if cur.rowcount == 0:
            raise UnknownDevice(f"unknown device {name!r}")
        return f"{name}.{secret}"

    def revoke(self, name: str) -> None:
        """Refuse the device's token from now on (already open sessions are the hub's business)."""
        with self._lock, self._db:
            cur = self._db.execute("UPDATE devices SET revoked = 1 WHERE name = ?", (name,))
        if cur.rowcount == 0:
            raise UnknownDevice(f"unknown device {name!r}")

    def get(self, name: str) -> DeviceRecord | None:
        """The device's record, or None if it is not registered."""
        with self._lock:
            row = self._db.execute(
                "SELECT name, created, revoked, epoch, acked_seq FROM devices WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None else _record(row)

    def list(self) -> list[DeviceRecord]:
        """All devices, sorted by name."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, created, revoked, epoch, acked_seq FROM devices ORDER BY name"
            ).fetchall()
        return [_record(row) for row in rows]

    # -- the hub's calls

    def revoked_names(self) -> set[str]:
        """Names of all revoked devices (the hub closes their open sessions)."""
        with self._lock:
            rows = self._db.execute("SELECT name FROM devices WHERE revoked = 1").fetchall()
        return {row[0] for row in rows}

    def authenticate(self, token: str) -> str | None:
        """The name of the device the token belongs to; None for unknown, wrong, revoked or malformed."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LEN or not token.isascii():
            return None
        name, dot, secret = token.rpartition(".")
        if not dot:
            return None
        with self._lock:
            row = self._db.execute("SELECT token_hash, revoked FROM devices WHERE name = ?", (name,)).fetchone()
        stored, revoked = (_DUMMY_DIGEST, True) if row is None else (row[0], bool(row[1]))
        # Same hash + constant-time compare whether or not the name exists: timing reveals no names.
        match = hmac.compare_digest(_digest(secret), stored)
        return name if match and not revoked else None

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
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise BadName(f"bad operator name {name!r}: {_BAD_NAME_TEXT}")
        if role not in ROLES:
            raise BadRole(f"bad role {role!r}: use {', '.join(ROLES)}")
        secret = secrets.token_urlsafe(32)
        try:
            with self._lock, self._db:
                self._db.execute(
                    "INSERT INTO operators (name, role, token_hash, created) VALUES (?, ?, ?, ?)",
                    (name, role, _digest(secret), time.time()),
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
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LEN or not token.isascii():
            return None
        if not token.startswith(OPERATOR_TOKEN_PREFIX):
            return None
        name, dot, secret = token[len(OPERATOR_TOKEN_PREFIX) :].rpartition(".")
        if not dot:
            return None
        with self._lock:
            row = self._db.execute("SELECT token_hash, revoked, role FROM operators WHERE name = ?", (name,)).fetchone()
        stored, revoked, role = (_DUMMY_DIGEST, True, "") if row is None else (row[0], bool(row[1]), row[2])
        # Same hash + constant-time compare whether or not the name exists: timing reveals no names.
        match = hmac.compare_digest(_digest(secret), stored)
        return (name, role) if match and not revoked else None


def _record(row: tuple[str, float, int, int, int]) -> DeviceRecord:
    name, created, revoked, epoch, acked_seq = row
    return DeviceRecord(name=name, created=created, revoked=bool(revoked), epoch=epoch, acked_seq=acked_seq)
