"""Durable commands: one state machine, persisted in SQLite, delivered to devices through their sessions.

queued -> sent -> delivered -> succeeded | failed, plus expired (TTL passed before delivery),
timed_out (no result in time after delivery) and cancelled (only before delivery).

Memory is authoritative for unfinished commands. What must be durable before what:

- queued: committed before `submit` returns (the operator's "accepted") and before the device is offered it, so a
  device never runs a command a restarted hub has forgotten, and a retry with the same idempotency key finds it.
- sent, delivered: written behind by a worker thread (within `WRITE_BEHIND` seconds, or with the next commit). A
  crash may lose them; the command is then still queued or sent on disk and goes to the device again on its next
  session, which the device deduplicates by id: what a connection lost between send and acknowledgement does
  anyway. Subscribers see these states at once.
- succeeded, failed, expired, timed_out, cancelled: committed before anyone learns of them: `wait_final`, `get`,
  subscribers (`on_change`), `cancel`'s caller, the transition point.
- transition points (measurement `command`): a transition never waits for the ingest pipeline. Points wait in a
  bounded buffer that `run()` hands to the pipeline in order; what cannot be written (the buffer full, or the
  pipeline closed at shutdown) is counted in `points_lost` and logged, never dropped silently.

The two commits a promise waits for (queued, final) run on the trio thread, with whatever is queued behind them, in
one transaction: the writing connection never checkpoints, so such a commit appends to the WAL without an fsync
(about 0.1 ms). Checkpoints (the fsyncs), the write-behind and every read run in worker threads. Handing the
promised commits to a worker too was measured slower, not faster: with 1,000 devices streaming, the round trip
through a worker thread and the busy trio thread's GIL took 1.7 ms typical and 40-60 ms at p99, the commit itself
about 0.1 ms.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import trio

from device_client import protocol
from device_client.protocol import Command, ProtocolError
from hub.config import CommandsConfig
from hub.control_codes import COMMAND_FINAL_STATES, ControlError
from hub.lineproto import line

__all__ = [
    "FINAL_STATES",
    "STATES",
    "CommandError",
    "CommandRecord",
    "CommandService",
    "CommandStore",
]

log = logging.getLogger("hub.commands")

STATES = ("queued", "sent", "delivered", "succeeded", "failed", "expired", "timed_out", "cancelled")
FINAL_STATES = COMMAND_FINAL_STATES
#: Measurement of the transition points (tags device, name, state; fields command_id, age_ms).
COMMAND_MEASUREMENT = "command"

#: Seconds a non-final transition may wait in memory before it is committed (if no commit takes it sooner).
WRITE_BEHIND = 0.2
#: Final records kept in memory after their commit, for `get`, `wait_final` and late answers.
RECENT_FINALS = 1024
#: Transition points waiting for room in the pipeline; more are counted in `points_lost` and logged.
POINT_BUFFER = 10_000

#: A device session's way to put a command frame on its WebSocket (False if it could not take it now).
Sender = Callable[[Command], bool]


#: A command request refused: the control channel's own error, with its code (hub.control_codes).
CommandError = ControlError


@attrs.frozen
class CommandRecord:
    """Everything known about one command; replaced (never mutated) on each transition."""

    command_id: str
    device: str
    name: str
    args: dict[str, Any]
    state: str
    created: float
    updated: float
    expires: float  # TTL deadline for delivery (Unix s)
    timeout: float  # seconds for the result after delivery
    idempotency_key: str | None = None
    operator: str = ""
    result: Any = None
    error: str = ""
    delivered_at: float | None = None
    history: tuple[tuple[str, float], ...] = ()

    @property
    def final(self) -> bool:
        """No transition can follow."""
        return self.state in FINAL_STATES

    def deadline(self) -> float:
        """When the timer must look at this command next (inf for final ones)."""
        if self.state in ("queued", "sent"):
            return self.expires
        if self.state == "delivered" and self.delivered_at is not None:
            return self.delivered_at + self.timeout
        return math.inf

    def to(self, state: str, now: float, **changes: Any) -> CommandRecord:
        """The record after a transition to `state` at `now`."""
        return attrs.evolve(self, state=state, updated=now, history=(*self.history, (state, now)), **changes)

    def as_dict(self) -> dict[str, Any]:
        """The control channel's "command record"."""
        return {
            "command_id": self.command_id,
            "device": self.device,
            "name": self.name,
            "args": self.args,
            "state": self.state,
            "created": self.created,
            "updated": self.updated,
            "expires": self.expires,
            "timeout": self.timeout,
            "idempotency_key": self.idempotency_key,
            "operator": self.operator,
            "result": self.result,
            "error": self.error,
            "history": [{"state": s, "at": at} for s, at in self.history],
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


def _row(rec: CommandRecord) -> tuple[Any, ...]:
    return (
        rec.command_id,
        rec.device,
        rec.name,
        json.dumps(rec.args),
        rec.state,
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


def _record(row: tuple[Any, ...]) -> CommandRecord:
    return CommandRecord(
        command_id=row[0],
        device=row[1],
        name=row[2],
        args=json.loads(row[3]),
        state=row[4],
        created=row[5],
        updated=row[6],
        expires=row[7],
        timeout=row[8],
        idempotency_key=row[9],
        operator=row[10],
        result=None if row[11] is None else json.loads(row[11]),
        error=row[12],
        delivered_at=row[13],
        history=tuple((s, at) for s, at in json.loads(row[14])),
    )


_INSERT = f"INSERT OR REPLACE INTO commands ({_COLUMNS}) VALUES ({', '.join('?' * 15)})"


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
        states = ", ".join(f"'{s}'" for s in FINAL_STATES)
        return self._select(f"WHERE state NOT IN ({states}) ORDER BY created, rowid")

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

    def counts(self) -> dict[str, int]:
        self.flush()
        with self._reader_lock:
            rows = self._reader.execute("SELECT state, COUNT(*) FROM commands GROUP BY state").fetchall()
        return {state: n for state, n in rows}

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

    def _select(self, clause: str, params: Iterable[Any] = ()) -> list[CommandRecord]:
        self.flush()
        with self._reader_lock:
            rows = self._reader.execute(f"SELECT {_COLUMNS} FROM commands {clause}", tuple(params)).fetchall()
        return [_record(r) for r in rows]


class CommandService:
    """Accepts operator commands, hands them to device sessions, follows them to a final state.

    Start `run()` in a nursery: it times commands out, writes transitions behind and feeds transition points to
    the pipeline. At shutdown, `flush_points()` then `close_points()` before the pipeline's input closes; closing
    the store afterwards commits what is still queued.
    """

    def __init__(
        self,
        store: CommandStore,
        config: CommandsConfig,
        *,
        device_exists: Callable[[str], bool],
        write: Callable[[str, int, None], Awaitable[None]],
        on_change: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._config = config
        self._device_exists = device_exists
        self._write = write
        self._on_change = on_change
        self._clock = clock
        self._open: dict[str, CommandRecord] = {}  # unfinished, by id (insertion = creation order)
        self._open_ids: dict[str, dict[str, None]] = {}  # device -> ids of its unfinished commands, oldest first
        self._finishing: dict[str, CommandRecord] = {}  # final, commit failed: announced by the next one that works
        self._recent: OrderedDict[str, CommandRecord] = OrderedDict()  # final and committed, newest last
        self._keys: dict[tuple[str, str], str] = {}  # (device, idempotency key) -> id, for commands in memory
        self._counts = dict.fromkeys(STATES, 0)
        self._senders: dict[str, Sender] = {}
        self._final_events: dict[str, trio.Event] = {}
        self._wake = trio.Event()  # a deadline may have changed
        self._dirty = trio.Event()  # something was put: write it behind
        self._points: deque[str] = deque()  # transition points for the pipeline, in order
        self._points_ready = trio.Event()
        self._points_lock = trio.Lock()
        self._points_closed = False
        self._losing = 0  # points lost to a full buffer since the last successful hand-over
        self.points_lost = 0
        for rec in store.unfinished():
            self._add_open(rec)
            if rec.idempotency_key is not None:
                self._keys[(rec.device, rec.idempotency_key)] = rec.command_id
        self._counts.update(store.counts())
        if self._open:
            log.info("commands from the last run", extra={"kv": {"unfinished": len(self._open)}})

    # ------------------------------------------------------------------ operator side

    async def submit(
        self,
        device: str,
        name: str,
        args: dict[str, Any] | None = None,
        *,
        ttl: float | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        operator: str = "",
    ) -> CommandRecord:
        """Queue a command, committed to SQLite before it returns, and send it now if the device is online."""
        cfg = self._config
        if idempotency_key is not None:
            existing = await self._find_key(device, idempotency_key)
            if existing is not None:
                return existing
        # No await from here until the record is in memory: checks and creation are one step.
        if not self._device_exists(device):
            raise CommandError("not_found", f"no device {device!r}")
        try:
            protocol.check_command_name(name)
        except ProtocolError as exc:
            raise CommandError("bad_command", exc.detail) from None
        args = {} if args is None else args
        if not isinstance(args, dict) or protocol.json_size(args) > protocol.MAX_ARGS_BYTES:
            raise CommandError("bad_command", f"args must be an object of at most {protocol.MAX_ARGS_BYTES} bytes")
        ttl = cfg.default_ttl if ttl is None else ttl
        timeout = cfg.default_timeout if timeout is None else timeout
        if not 0 < ttl <= cfg.max_ttl:
            raise CommandError("bad_command", f"ttl must be in (0, {cfg.max_ttl:g}] seconds")
        if not 0 < timeout <= cfg.max_timeout:
            raise CommandError("bad_command", f"timeout must be in (0, {cfg.max_timeout:g}] seconds")
        if idempotency_key is not None and not 0 < len(idempotency_key) <= 128:
            raise CommandError("bad_command", "idempotency_key must be 1..128 characters")
        if len(self._open_ids.get(device, ())) >= cfg.max_queue:
            raise CommandError("queue_full", f"{device!r} already has {cfg.max_queue} unfinished commands")
        now = self._clock()
        rec = CommandRecord(
            command_id="c-" + secrets.token_hex(8),
            device=device,
            name=name,
            args=args,
            state="queued",
            created=now,
            updated=now,
            expires=now + ttl,
            timeout=timeout,
            idempotency_key=idempotency_key,
            operator=operator,
            history=(("queued", now),),
        )
        self._add_open(rec)
        if idempotency_key is not None:
            self._keys[(device, idempotency_key)] = rec.command_id
        self._counts["queued"] += 1
        self._put(rec)
        try:
            self._commit()
        except Exception:
            if self._store.discard(rec):  # never committed: not accepted, so it must not run later either
                self._remove_open(rec)
                if idempotency_key is not None:
                    del self._keys[(device, idempotency_key)]
                self._counts["queued"] -= 1
            raise
        self._offer(rec)
        self._announce(rec)
        return rec

    async def cancel(self, command_id: str) -> CommandRecord:
        """Cancel a command that has not been delivered."""
        rec = self._open.get(command_id)
        if rec is None:
            if await self.get(command_id) is None:
                raise CommandError("not_found", f"no command {command_id!r}")
            raise CommandError("invalid_state", f"command {command_id!r} is already final")
        if rec.state not in ("queued", "sent"):
            raise CommandError("invalid_state", f"command {command_id!r} is {rec.state}: too late to cancel")
        return self._transition(rec, "cancelled")

    async def get(self, command_id: str) -> CommandRecord | None:
        """The record as it is now: from memory for open and recently final commands, else from SQLite."""
        rec = self._open.get(command_id) or self._recent.get(command_id)
        if rec is not None:
            return rec
        return await trio.to_thread.run_sync(self._store.get, command_id)

    async def list(self, device: str | None = None, state: str | None = None, limit: int = 50) -> list[CommandRecord]:
        """Newest first."""
        return await trio.to_thread.run_sync(self._store.list, device, state, limit)

    def counts(self) -> dict[str, int]:
        """Commands by state (from memory; safe to call from a worker thread)."""
        return {state: n for state, n in list(self._counts.items()) if n}

    async def wait_final(self, command_id: str, timeout: float) -> CommandRecord:
        """The record once final (and committed), or as it is when `timeout` seconds have passed."""
        if command_id in self._open or command_id in self._finishing:
            event = self._final_events.setdefault(command_id, trio.Event())
            with trio.move_on_after(timeout):
                await event.wait()
        found = await self.get(command_id)
        if found is None:
            raise CommandError("not_found", f"no command {command_id!r}")
        return found

    # ------------------------------------------------------------------ device side

    def attach(self, device: str, sender: Sender) -> None:
        """A session of `device` is ready: re-send what it has not answered, in order, then new ones."""
        self._senders[device] = sender
        now = self._clock()
        open_ = self._open
        for command_id in list(self._open_ids.get(device, ())):  # this device's only: a connect is not O(fleet)
            rec = open_[command_id]
            if rec.deadline() > now and not sender(self._frame(rec)):
                break

    def detach(self, device: str, sender: Sender) -> None:
        if self._senders.get(device) is sender:
            del self._senders[device]

    def is_open(self, command_id: str) -> bool:
        """Whether the command still wants to reach its device (not final)."""
        return command_id in self._open

    async def on_sent(self, device: str, command_id: str) -> None:
        """The session wrote the command frame."""
        rec = self._open.get(command_id)
        if rec is not None and rec.device == device and rec.state == "queued":
            self._transition(rec, "sent")

    async def on_ack(self, device: str, command_id: str) -> bool:
        """The device acknowledged receipt. False: not a command this device was sent."""
        rec = self._open.get(command_id)
        if rec is None:
            return await self._known_final(device, command_id)
        if rec.device != device:
            return False
        if rec.state in ("queued", "sent"):
            self._transition(rec, "delivered", delivered_at=self._clock())
        return True

    async def on_result(self, device: str, command_id: str, ok: bool, result: Any, error: str) -> bool:
        """The device's result. False: not a command this device was sent."""
        rec = self._open.get(command_id)
        if rec is None:
            return await self._known_final(device, command_id)
        if rec.device != device or rec.state == "queued":
            return False
        if rec.delivered_at is None:
            rec = self._transition(rec, "delivered", delivered_at=self._clock())
        self._transition(rec, "succeeded" if ok else "failed", result=result, error="" if ok else error)
        return True

    async def _known_final(self, device: str, command_id: str) -> bool:
        # A late ack/result for a command already final (e.g. timed out): known, but it changes nothing.
        rec = await self.get(command_id)
        return rec is not None and rec.device == device

    async def _find_key(self, device: str, key: str) -> CommandRecord | None:
        """The command already submitted for `device` with idempotency `key`, or None."""
        command_id = self._keys.get((device, key))
        if command_id is None:
            stored = await trio.to_thread.run_sync(self._store.by_key, device, key)
            command_id = self._keys.get((device, key))  # submitted while SQLite was read
            if command_id is None:
                return stored
        return await self.get(command_id)

    def _frame(self, rec: CommandRecord) -> Command:
        return Command(id=rec.command_id, name=rec.name, args=rec.args, timeout=rec.timeout)

    def _offer(self, rec: CommandRecord) -> None:
        sender = self._senders.get(rec.device)
        if sender is not None:
            sender(self._frame(rec))

    # ------------------------------------------------------------------ timers, transitions, writing

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Expire and time out commands, write transitions behind, feed transition points; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_behind)
            nursery.start_soon(self._feed_points)
            task_status.started()
            await self._expire()

    async def _expire(self) -> None:
        while True:
            now = self._clock()
            due = [
                self._apply(rec, "expired" if rec.state in ("queued", "sent") else "timed_out")
                for rec in list(self._open.values())
                if rec.deadline() <= now
            ]
            if due:
                self._commit()  # one commit for every command due now
            next_deadline = min((r.deadline() for r in self._open.values()), default=math.inf)
            self._wake = trio.Event()
            with trio.move_on_after(max(0.0, min(next_deadline - self._clock(), 60.0))):
                await self._wake.wait()

    async def _write_behind(self) -> None:
        while True:
            await self._dirty.wait()
            await trio.sleep(WRITE_BEHIND)
            self._dirty = trio.Event()
            finishing = list(self._finishing.values())
            try:
                await trio.to_thread.run_sync(self._store.flush)
                self._announce_finished(finishing)
                await trio.to_thread.run_sync(self._store.checkpoint)
            except (sqlite3.Error, OSError):
                log.exception("command store: write failed; trying again", extra={"kv": {"queued": self._store.queued}})
                self._dirty.set()
                await trio.sleep(1.0)

    def _transition(self, rec: CommandRecord, state: str, **changes: Any) -> CommandRecord:
        """Move `rec` to `state`; a final state is committed, then announced, before this returns."""
        new = self._apply(rec, state, **changes)
        if new.final:
            self._commit()
        else:
            self._announce(new)
        return new

    def _apply(self, rec: CommandRecord, state: str, **changes: Any) -> CommandRecord:
        """The transition in memory, its write queued (no await: nothing can come between check and change)."""
        new = rec.to(state, self._clock(), **changes)
        self._counts[rec.state] -= 1
        self._counts[state] += 1
        if new.final:
            self._remove_open(new)
            self._finishing[new.command_id] = new
        else:
            self._open[new.command_id] = new
        self._put(new)
        return new

    def _add_open(self, rec: CommandRecord) -> None:
        self._open[rec.command_id] = rec
        self._open_ids.setdefault(rec.device, {})[rec.command_id] = None

    def _remove_open(self, rec: CommandRecord) -> None:
        del self._open[rec.command_id]
        ids = self._open_ids[rec.device]
        del ids[rec.command_id]
        if not ids:
            del self._open_ids[rec.device]

    def _put(self, rec: CommandRecord) -> None:
        self._store.put(rec)
        self._dirty.set()
        self._wake.set()  # its deadline may be the next one

    def _commit(self) -> None:
        """Commit everything put so far (on this thread: no fsync, see CommandStore), then announce the finals."""
        finishing = list(self._finishing.values())
        self._store.flush()
        self._announce_finished(finishing)

    def _announce_finished(self, finishing: list[CommandRecord]) -> None:
        """Announce final records that were put before a successful flush."""
        for rec in finishing:
            if self._finishing.pop(rec.command_id, None) is not None:  # not announced after another flush
                self._remember(rec)
                self._announce(rec)

    def _remember(self, rec: CommandRecord) -> None:
        self._recent[rec.command_id] = rec
        while len(self._recent) > RECENT_FINALS:
            _, old = self._recent.popitem(last=False)
            key = (old.device, old.idempotency_key or "")
            if old.idempotency_key is not None and self._keys.get(key) == old.command_id:
                del self._keys[key]

    def _announce(self, rec: CommandRecord) -> None:
        """Tell waiters, subscribers, the log and the database (a point) about a transition."""
        if rec.final:
            event = self._final_events.pop(rec.command_id, None)
            if event is not None:
                event.set()
        log.log(
            logging.INFO if rec.final else logging.DEBUG,
            "command " + rec.state,
            extra={"kv": {"command_id": rec.command_id, "device": rec.device, "name": rec.name}},
        )
        if self._on_change is not None:
            self._on_change(rec.as_dict())
        if self._points_closed:
            self._lose(1, "pipeline closed")
        elif len(self._points) >= POINT_BUFFER:
            if not self._losing:
                log.warning("command points buffer full: points are being lost", extra={"kv": {"buffer": POINT_BUFFER}})
            self._losing += 1
            self.points_lost += 1
        else:
            text = line(
                COMMAND_MEASUREMENT,
                {"device": rec.device, "name": rec.name, "state": rec.state},
                {"command_id": rec.command_id, "age_ms": {"int": int((rec.updated - rec.created) * 1000)}},
                int(rec.updated * 1000),
            )
            self._points.append(text + "\n")
            self._points_ready.set()

    # ------------------------------------------------------------------ transition points

    async def _feed_points(self) -> None:
        while True:
            await self._points_ready.wait()
            self._points_ready = trio.Event()
            await self.flush_points()

    async def flush_points(self) -> None:
        """Hand every buffered transition point to the pipeline, in order (waits for room in it)."""
        async with self._points_lock:
            while self._points and not self._points_closed:
                n = len(self._points)
                try:
                    await self._write("".join(self._points), n, None)
                except trio.ClosedResourceError:
                    self.close_points()
                    return
                for _ in range(n):
                    self._points.popleft()
                if self._losing:
                    log.warning("command points buffer has room again", extra={"kv": {"lost": self._losing}})
                    self._losing = 0

    def close_points(self) -> None:
        """The pipeline takes no more: count and log the points still buffered, and those that come later."""
        self._points_closed = True
        if self._points:
            self._lose(len(self._points), "pipeline closed")
            self._points.clear()

    def _lose(self, n: int, reason: str) -> None:
        self.points_lost += n
        log.warning("command points not written", extra={"kv": {"points": n, "reason": reason}})
