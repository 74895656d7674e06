"""Command records and their SQLite table: the persistence of the command service (hub/fleet/_commands.py).

A record is a frozen value, replaced on each transition (`CommandRecord.after`, which follows the table in
hub/fleet/_command_states.py). Times in a record are Unix seconds: they are stored and shown; the service's timers run
on trio's clock and only start from them.
"""

from __future__ import annotations

import builtins
import json
import math
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TypeAlias, TypedDict, Unpack

import attrs

from device_client.protocol import JSON
from hub.fleet._command_states import FINAL_STATES, TIMER_EVENTS, CommandEvent, CommandState, next_state

__all__ = ["CommandHistoryEntry", "CommandRecord", "CommandRecordDict", "CommandStore", "RecordChanges"]


class RecordChanges(TypedDict, total=False):
    """What a transition may set besides the state: the result of a device, when it was delivered."""

    result: JSON
    error: str
    delivered_at: float


class CommandHistoryEntry(TypedDict):
    """One step of a command record's `history`: the state entered and when (Unix s)."""

    state: str
    at: float


class CommandRecordDict(TypedDict):
    """The control channel's "command record" (docs/control.md): `CommandRecord.as_dict`."""

    command_id: str
    device: str
    name: str
    args: dict[str, JSON]
    state: str
    created: float
    updated: float
    expires: float
    timeout: float
    idempotency_key: str | None
    operator: str
    result: JSON
    error: str
    history: list[CommandHistoryEntry]


@attrs.frozen
class CommandRecord:
    """Everything known about one command; replaced (never mutated) on each transition."""

    command_id: str
    device: str
    name: str
    args: dict[str, JSON]
    state: CommandState
    created: float
    updated: float
    expires: float  # TTL deadline for delivery (Unix s)
    timeout: float  # seconds for the result after delivery
    idempotency_key: str | None = None
    operator: str = ""
    result: JSON = None
    error: str = ""
    delivered_at: float | None = None
    history: tuple[tuple[CommandState, float], ...] = ()

    @property
    def final(self) -> bool:
        """No transition can follow."""
        return self.state in FINAL_STATES

    def deadline(self) -> float:
        """When the timer of this state fires (Unix s): TTL before delivery, result timeout after it; inf if final."""
        timer = TIMER_EVENTS.get(self.state)
        if timer is CommandEvent.EXPIRE:
            return self.expires
        if timer is CommandEvent.TIME_OUT and self.delivered_at is not None:
            return self.delivered_at + self.timeout
        return math.inf

    def after(self, event: CommandEvent, now: float, **changes: Unpack[RecordChanges]) -> CommandRecord:
        """The record after `event` at `now` (Unix s); raises `IllegalTransition` if its state does not take it."""
        state = next_state(self.state, event)
        return attrs.evolve(self, state=state, updated=now, history=(*self.history, (state, now)), **changes)

    @classmethod
    def from_dict(cls, d: CommandRecordDict) -> CommandRecord:
        """The record `as_dict` made (raises KeyError, ValueError or TypeError for anything else)."""
        history = tuple((CommandState(h["state"]), float(h["at"])) for h in d["history"])
        delivered = [at for state, at in history if state is CommandState.DELIVERED]
        return cls(
            command_id=str(d["command_id"]),
            device=str(d["device"]),
            name=str(d["name"]),
            args=dict(d["args"]),
            state=CommandState(d["state"]),
            created=float(d["created"]),
            updated=float(d["updated"]),
            expires=float(d["expires"]),
            timeout=float(d["timeout"]),
            idempotency_key=d["idempotency_key"],
            operator=str(d["operator"]),
            result=d["result"],
            error=str(d["error"]),
            delivered_at=delivered[0] if delivered else None,
            history=history,
        )

    def as_dict(self) -> CommandRecordDict:
        """The control channel's "command record"."""
        return {
            "command_id": self.command_id,
            "device": self.device,
            "name": self.name,
            "args": self.args,
            "state": self.state.value,
            "created": self.created,
            "updated": self.updated,
            "expires": self.expires,
            "timeout": self.timeout,
            "idempotency_key": self.idempotency_key,
            "operator": self.operator,
            "result": self.result,
            "error": self.error,
            "history": [{"state": s.value, "at": at} for s, at in self.history],
        }


_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    command_id      TEXT PRIMARY KEY,
    device          TEXT NOT NULL,
    name            TEXT NOT NULL,
    args            TEXT NOT NULL,
    state           TEXT NOT NULL,
    created         REAL NOT NULL,
    updated         REAL NOT NULL,
    expires         REAL NOT NULL,
    timeout         REAL NOT NULL,
    idempotency_key TEXT,
    operator        TEXT NOT NULL,
    result          TEXT,
    error           TEXT NOT NULL,
    delivered_at    REAL,
    history         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_device ON commands (device, created);
CREATE INDEX IF NOT EXISTS commands_state ON commands (state);
CREATE UNIQUE INDEX IF NOT EXISTS commands_idempotency ON commands (device, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
"""

_COLUMNS = (
    "command_id, device, name, args, state, created, updated, expires, timeout, idempotency_key, operator, "
    "result, error, delivered_at, history"
)


#: A `commands` row in `_COLUMNS` order (args, result and history as JSON text).
_Row: TypeAlias = tuple[
    str, str, str, str, str, float, float, float, float, str | None, str, str | None, str, float | None, str
]


def _row(rec: CommandRecord) -> _Row:
    return (
        rec.command_id,
        rec.device,
        rec.name,
        json.dumps(rec.args),
        rec.state.value,
        rec.created,
        rec.updated,
        rec.expires,
        rec.timeout,
        rec.idempotency_key,
        rec.operator,
        None if rec.result is None else json.dumps(rec.result),
        rec.error,
        rec.delivered_at,
        json.dumps(rec.history),
    )


def _record(row: _Row) -> CommandRecord:
    return CommandRecord(
        command_id=row[0],
        device=row[1],
        name=row[2],
        args=json.loads(row[3]),
        state=CommandState(row[4]),
        created=row[5],
        updated=row[6],
        expires=row[7],
        timeout=row[8],
        idempotency_key=row[9],
        operator=row[10],
        result=None if row[11] is None else json.loads(row[11]),
        error=row[12],
        delivered_at=row[13],
        history=tuple((CommandState(s), at) for s, at in json.loads(row[14])),
    )


_FINAL = ", ".join(f"'{s.value}'" for s in sorted(FINAL_STATES))
_UNFINISHED = f"WHERE state NOT IN ({_FINAL}) ORDER BY created, rowid"
#: The columns a transition changes (`CommandRecord.after`): the only ones an upsert rewrites, so that a transition
#: touches the row and the state index, not every index as a replace (a delete and an insert) would.
_CHANGING = ("state", "updated", "history", *RecordChanges.__annotations__)
_INSERT = (
    f"INSERT INTO commands ({_COLUMNS}) VALUES ({', '.join('?' * 15)}) ON CONFLICT (command_id) DO UPDATE SET "
    + ", ".join(f"{column} = excluded.{column}" for column in _CHANGING)
)


class CommandStore:
    """Command records in SQLite (WAL, synchronous=NORMAL: a committed record survives a process crash).

    `put` queues a record's newest version in memory; `flush` commits every record put before it, in one
    transaction. The writing connection never checkpoints, so `flush` never waits for an fsync: it may run on the
    trio thread. `checkpoint` and the reads use a second connection (WAL: they never hold up a commit) and block
    on SQLite: call them from a worker thread. Reads see every record put before them (they flush first).
    """

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the writing connection; commits happen one after another
        self._queue_lock = threading.Lock()  # only `_queued`: `put` never waits for SQLite
        self._queued: dict[str, CommandRecord] = {}  # newest version not yet committed, by id
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(_SCHEMA)
        self._reader_lock = threading.Lock()
        self._reader = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._reader.execute("PRAGMA busy_timeout=5000")

    @property
    def queued(self) -> int:
        """Records put and not yet committed."""
        return len(self._queued)

    def put(self, rec: CommandRecord) -> None:
        """Queue `rec` (replacing an older queued version of it) for the next `flush`; never blocks on SQLite."""
        with self._queue_lock:
            self._queued[rec.command_id] = rec

    def flush(self) -> int:
        """Commit every record put before this call; the number of rows written."""
        with self._lock:
            return self._flush_locked()

    def discard(self, rec: CommandRecord) -> bool:
        """Unqueue `rec` if it is still queued (never committed): True if it was."""
        with self._queue_lock:
            if self._queued.get(rec.command_id) is not rec:
                return False
            del self._queued[rec.command_id]
            return True

    def checkpoint(self) -> None:
        """Copy committed transactions from the WAL into the database file (PASSIVE: commits go on meanwhile)."""
        with self._reader_lock:
            self._reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def unfinished(self) -> list[CommandRecord]:
        """Every record not in a final state, oldest first."""
        return self._select(_UNFINISHED)

    def get(self, command_id: str) -> CommandRecord | None:
        found = self._select("WHERE command_id = ?", (command_id,))
        return found[0] if found else None

    def by_key(self, device: str, key: str) -> CommandRecord | None:
        found = self._select("WHERE device = ? AND idempotency_key = ?", (device, key))
        return found[0] if found else None

    def list(self, device: str | None = None, state: str | None = None, limit: int = 50) -> list[CommandRecord]:
        """Newest first."""
        where, params = [], []
        if device is not None:
            where.append("device = ?")
            params.append(device)
        if state is not None:
            where.append("state = ?")
            params.append(state)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        return self._select(f"{clause} ORDER BY created DESC, rowid DESC LIMIT ?", (*params, limit))

    def counts(self) -> dict[CommandState, int]:
        self.flush()
        with self._reader_lock:
            rows = self._reader.execute("SELECT state, COUNT(*) FROM commands GROUP BY state").fetchall()
        return {CommandState(state): n for state, n in rows}

    def close(self) -> None:
        """Commit what is queued, then close."""
        with self._lock, self._reader_lock:
            try:
                self._flush_locked()
            finally:
                self._reader.close()
                self._db.close()

    def _flush_locked(self) -> int:
        with self._queue_lock:
            batch = list(self._queued.values())
        if not batch:
            return 0
        self._db.execute("BEGIN")
        try:
            self._db.executemany(_INSERT, [_row(rec) for rec in batch])
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        with self._queue_lock:
            for rec in batch:
                if self._queued.get(rec.command_id) is rec:  # not replaced by a newer version meanwhile
                    del self._queued[rec.command_id]
        return len(batch)

    def _select(self, clause: str, params: Iterable[object] = ()) -> builtins.list[CommandRecord]:
        self.flush()
        with self._reader_lock:
            rows = self._reader.execute(f"SELECT {_COLUMNS} FROM commands {clause}", tuple(params)).fetchall()
        return [_record(r) for r in rows]
