"""Command records and their SQLite table: the persistence of the command service (hub/fleet/_commands.py).

A record is a frozen value, replaced on each transition (`CommandRecord.after`, which follows the table in
hub/fleet/_command_states.py). Times in a record are Unix seconds: they are stored and shown; the service's timers run
on trio's clock and only start from them.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from io import FileIO
from pathlib import Path
from typing import TypeAlias, TypedDict, Unpack

import attrs
import orjson

from device_client.protocol import JSON
from hub.fleet._command_states import FINAL_STATES, TIMER_EVENTS, CommandEvent, CommandState, next_state

__all__ = [
    "JOURNAL_SUFFIX",
    "CommandHistoryEntry",
    "CommandRecord",
    "CommandRecordDict",
    "CommandStore",
    "RecordChanges",
    "journal_files",
    "stored",
]

log = logging.getLogger("hub.commands")

#: A journal file is the database's path with this and a sequence number: commands.sqlite3.journal-12.
JOURNAL_SUFFIX = ".journal-"


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


def _journal_line(rec: CommandRecord) -> bytes:
    """A record as one journal line (`as_dict` in JSON; json's where orjson cannot hold an integer exactly)."""
    record = rec.as_dict()
    try:
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # orjson.JSONEncodeError: an integer of more than 64 bits in args or result
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def journal_files(path: Path) -> list[Path]:
    """The journal files beside the database at `path`, oldest first."""
    prefix = path.name + JOURNAL_SUFFIX
    found = [p for p in path.parent.glob(prefix + "*") if p.name[len(prefix) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(prefix) :]))


def _replay(files: Sequence[Path]) -> dict[str, CommandRecord]:
    """The newest version of each record in `files` (oldest first); lines that do not read are skipped and logged."""
    records: dict[str, CommandRecord] = {}
    for file in files:
        try:
            lines = file.read_bytes().split(b"\n")
        except FileNotFoundError:  # moved into SQLite meanwhile (`stored` reads while a store syncs)
            continue
        bad = 0
        for line in lines:
            if not line:
                continue
            try:
                rec = CommandRecord.from_dict(json.loads(line))
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            records[rec.command_id] = rec
        if bad:
            # Only a write cut short by a power loss leaves one (the last line): what it held is lost.
            log.warning("command journal: unreadable lines skipped", extra={"kv": {"file": file.name, "lines": bad}})
    return records


def stored(path: Path, command_id: str) -> CommandRecord | None:
    """The record of `command_id` a store opened on `path` now would find, read without changing anything: what is
    durable, even while a store is writing. The journals are read before SQLite (a journal a sync removes meanwhile
    is in SQLite by then); the newest version is the one with the longer history."""
    journaled = _replay(journal_files(path)).get(command_id)
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        row = db.execute(f"SELECT {_COLUMNS} FROM commands WHERE command_id = ?", (command_id,)).fetchone()
    found = None if row is None else _record(row)
    if journaled is None or (found is not None and len(found.history) > len(journaled.history)):
        return found
    return journaled


class CommandStore:
    """Command records: an append-only journal in front of SQLite (WAL, synchronous=NORMAL).

    `put` queues a record's newest version in memory. `flush` makes every record put before it survive a crash of
    the process: it appends them to the journal file, one write and no fsync, no SQLite and no lock shared with a
    reader, so it may run on the trio thread (a SQLite commit there cost 7-8 writes, 6 file locks and 60-100 us).
    `sync` moves what was flushed into SQLite in one transaction and starts a new journal file; `checkpoint` copies
    SQLite's WAL into the database file (the fsync). Those and the reads block on SQLite: call them from a worker
    thread. Reads see every record put before them (they sync first). Opening the store replays the journal files a
    process that stopped without `close` left behind, oldest first; a journal's last line cut short (the machine
    lost power in a write) is skipped and logged. A flushed record is as durable as a SQLite commit with
    synchronous=NORMAL: it survives the process, not the machine's power.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the journal and `_journaled`: flushes and the start of a sync
        self._queue_lock = threading.Lock()  # only `_queued`: `put` never waits for a write
        self._sync_lock = threading.Lock()  # the writing connection; syncs happen one after another
        self._queued: dict[str, CommandRecord] = {}  # newest version not yet flushed, by id
        self._journaled: dict[str, CommandRecord] = {}  # flushed, not yet in SQLite, by id
        self._retired: list[Path] = []  # journal files whose records are not all in SQLite yet
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(_SCHEMA)
        self._reader_lock = threading.Lock()
        self._reader = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._reader.execute("PRAGMA busy_timeout=5000")
        left = journal_files(self.path)
        self._write_sqlite(_replay(left))
        for old in left:
            old.unlink()
        self._journal_seq = int(left[-1].name.rpartition("-")[2]) + 1 if left else 1
        self._journal, self._journal_size = self._open_journal(self._journal_seq)

    @property
    def queued(self) -> int:
        """Records put and not yet flushed."""
        return len(self._queued)

    def put(self, rec: CommandRecord) -> None:
        """Queue `rec` (replacing an older queued version of it) for the next `flush`; never blocks on a write."""
        with self._queue_lock:
            self._queued[rec.command_id] = rec

    def flush(self) -> int:
        """Journal every record put before this call (durable when it returns); the number of records written."""
        with self._lock:
            return self._flush_locked()

    def discard(self, rec: CommandRecord) -> bool:
        """Unqueue `rec` if it is still queued (never flushed): True if it was."""
        with self._queue_lock:
            if self._queued.get(rec.command_id) is not rec:
                return False
            del self._queued[rec.command_id]
            return True

    def sync(self) -> int:
        """Flush, then move every journaled record into SQLite (one transaction) and start a new journal file; the
        number of records moved. Blocks on SQLite: a worker thread's."""
        with self._sync_lock:
            with self._lock:
                self._flush_locked()
                if not self._journaled:
                    return 0
            fresh = self._open_journal(self._journal_seq + 1)  # outside `_lock`: a flush need not wait for it
            with self._lock:  # what was flushed meanwhile is in the old file, and in the batch
                batch, self._journaled = self._journaled, {}
                old = self._journal
                self._journal, self._journal_size = fresh
                self._journal_seq += 1
            old.close()
            self._retired.append(Path(old.name))
            try:
                self._write_sqlite(batch)
            except BaseException:
                with self._lock:  # back, under what was journaled since (newer versions)
                    self._journaled = {**batch, **self._journaled}
                raise
            retired, self._retired = self._retired, []
            for done in retired:
                done.unlink(missing_ok=True)
            return len(batch)

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
        self.sync()
        with self._reader_lock:
            rows = self._reader.execute("SELECT state, COUNT(*) FROM commands GROUP BY state").fetchall()
        return {CommandState(state): n for state, n in rows}

    def close(self) -> None:
        """Move what is queued into SQLite, then close (a journal left by a failure is replayed at the next open)."""
        try:
            self.sync()
        finally:
            self._journal.close()
            if self._journal_size == 0 and not self._journaled:
                self._journal_path(self._journal_seq).unlink(missing_ok=True)
            with self._sync_lock, self._reader_lock:
                self._reader.close()
                self._db.close()

    def _journal_path(self, seq: int) -> Path:
        return self.path.with_name(f"{self.path.name}{JOURNAL_SUFFIX}{seq}")

    def _open_journal(self, seq: int) -> tuple[FileIO, int]:
        journal = FileIO(self._journal_path(seq), "a")
        return journal, journal.seek(0, os.SEEK_END)

    def _flush_locked(self) -> int:
        with self._queue_lock:
            batch = list(self._queued.values())
        if not batch:
            return 0
        data = b"".join(map(_journal_line, batch))
        journal, start = self._journal, self._journal_size
        try:
            written = 0
            while written < len(data):
                written += journal.write(data[written:]) or 0
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(journal.fileno(), start)  # no half line for the next flush to follow
            raise
        self._journal_size = start + written
        journaled = self._journaled
        with self._queue_lock:
            for rec in batch:
                journaled[rec.command_id] = rec
                if self._queued.get(rec.command_id) is rec:  # not replaced by a newer version meanwhile
                    del self._queued[rec.command_id]
        return len(batch)

    def _write_sqlite(self, batch: dict[str, CommandRecord]) -> None:
        if not batch:
            return
        self._db.execute("BEGIN")
        try:
            self._db.executemany(_INSERT, [_row(rec) for rec in batch.values()])
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _select(self, clause: str, params: Iterable[object] = ()) -> builtins.list[CommandRecord]:
        self.sync()
        with self._reader_lock:
            rows = self._reader.execute(f"SELECT {_COLUMNS} FROM commands {clause}", tuple(params)).fetchall()
        return [_record(r) for r in rows]
