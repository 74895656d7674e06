"""Durable commands: one state machine, persisted in SQLite, delivered to devices through their sessions.

queued -> sent -> delivered -> succeeded | failed, plus expired (TTL passed before delivery),
timed_out (no result in time after delivery) and cancelled (only before delivery).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import trio

from device_client import protocol
from device_client.protocol import Command, ProtocolError
from hub.config import CommandsConfig
from hub.control_codes import COMMAND_FINAL_STATES
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

#: A device session's way to put a command frame on its WebSocket (False if it could not take it now).
Sender = Callable[[Command], bool]


class CommandError(Exception):
    """A command request refused; `code` is one of the control channel's error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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


class CommandStore:
    """Command records in SQLite. WAL with synchronous=NORMAL: a committed transition survives a process crash."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def save(self, rec: CommandRecord) -> None:
        """Insert or replace one record (committed on return)."""
        marks = ", ".join("?" * 15)
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO commands ({_COLUMNS}) VALUES ({marks})", _row(rec))

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
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM commands GROUP BY state").fetchall()
        return {state: n for state, n in rows}

    def _select(self, clause: str, params: Iterable[Any] = ()) -> list[CommandRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM commands {clause}", tuple(params)).fetchall()
        return [_record(r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CommandService:
    """Accepts operator commands, hands them to device sessions, follows them to a final state."""

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
        self._senders: dict[str, Sender] = {}
        self._final_events: dict[str, trio.Event] = {}
        self._wake = trio.Event()
        self.points_closed = False
        for rec in store.unfinished():
            self._open[rec.command_id] = rec
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
        """Queue a command (persisted before return) and send it now if the device is online."""
        cfg = self._config
        if idempotency_key is not None:
            existing = self._store.by_key(device, idempotency_key)
            if existing is not None:
                return existing
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
        if sum(1 for r in self._open.values() if r.device == device) >= cfg.max_queue:
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
        self._store.save(rec)
        self._open[rec.command_id] = rec
        # Offer before the first await: a session attaching meanwhile would otherwise get it twice.
        self._offer(rec)
        await self._changed(rec)
        return rec

    async def cancel(self, command_id: str) -> CommandRecord:
        """Cancel a command that has not been delivered."""
        rec = self._open.get(command_id)
        if rec is None:
            if self._store.get(command_id) is None:
                raise CommandError("not_found", f"no command {command_id!r}")
            raise CommandError("invalid_state", f"command {command_id!r} is already final")
        if rec.state not in ("queued", "sent"):
            raise CommandError("invalid_state", f"command {command_id!r} is {rec.state}: too late to cancel")
        return await self._transition(rec, "cancelled")

    def get(self, command_id: str) -> CommandRecord | None:
        return self._open.get(command_id) or self._store.get(command_id)

    def list(self, device: str | None = None, state: str | None = None, limit: int = 50) -> list[CommandRecord]:
        """Newest first."""
        return self._store.list(device, state, limit)

    def counts(self) -> dict[str, int]:
        """Commands by state."""
        return self._store.counts()

    async def wait_final(self, command_id: str, timeout: float) -> CommandRecord:
        """The record once final, or as it is when `timeout` seconds have passed."""
        rec = self._open.get(command_id)
        if rec is not None:
            event = self._final_events.setdefault(command_id, trio.Event())
            with trio.move_on_after(timeout):
                await event.wait()
        found = self.get(command_id)
        if found is None:
            raise CommandError("not_found", f"no command {command_id!r}")
        return found

    # ------------------------------------------------------------------ device side

    def attach(self, device: str, sender: Sender) -> None:
        """A session of `device` is ready: re-send what it has not answered, in order, then new ones."""
        self._senders[device] = sender
        now = self._clock()
        for rec in list(self._open.values()):
            if rec.device == device and rec.deadline() > now and not sender(self._frame(rec)):
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
            await self._transition(rec, "sent")

    async def on_ack(self, device: str, command_id: str) -> bool:
        """The device acknowledged receipt. False: not a command this device was sent."""
        rec = self._open.get(command_id)
        if rec is None:
            return self._known_final(device, command_id)
        if rec.device != device:
            return False
        if rec.state in ("queued", "sent"):
            await self._transition(rec, "delivered", delivered_at=self._clock())
        return True

    async def on_result(self, device: str, command_id: str, ok: bool, result: Any, error: str) -> bool:
        """The device's result. False: not a command this device was sent."""
        rec = self._open.get(command_id)
        if rec is None:
            return self._known_final(device, command_id)
        if rec.device != device or rec.state == "queued":
            return False
        if rec.delivered_at is None:
            rec = await self._transition(rec, "delivered", delivered_at=self._clock())
        await self._transition(rec, "succeeded" if ok else "failed", result=result, error="" if ok else error)
        return True

    def _known_final(self, device: str, command_id: str) -> bool:
        # A late ack/result for a command already final (e.g. timed out): known, but it changes nothing.
        rec = self._store.get(command_id)
        return rec is not None and rec.device == device

    def _frame(self, rec: CommandRecord) -> Command:
        return Command(id=rec.command_id, name=rec.name, args=rec.args, timeout=rec.timeout)

    def _offer(self, rec: CommandRecord) -> None:
        sender = self._senders.get(rec.device)
        if sender is not None:
            sender(self._frame(rec))

    # ------------------------------------------------------------------ timers and transitions

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Expire and time out commands when their deadlines pass; runs until cancelled."""
        task_status.started()
        while True:
            now = self._clock()
            for command_id in list(self._open):
                rec = self._open.get(command_id)  # fresh: an earlier transition's await may have changed it
                if rec is not None and rec.deadline() <= now:
                    await self._transition(rec, "expired" if rec.state in ("queued", "sent") else "timed_out")
            next_deadline = min((r.deadline() for r in self._open.values()), default=math.inf)
            self._wake = trio.Event()
            with trio.move_on_after(max(0.0, min(next_deadline - self._clock(), 60.0))):
                await self._wake.wait()

    async def _transition(self, rec: CommandRecord, state: str, **changes: Any) -> CommandRecord:
        now = self._clock()
        new = rec.to(state, now, **changes)
        self._store.save(new)
        if new.final:
            self._open.pop(new.command_id, None)
            event = self._final_events.pop(new.command_id, None)
            if event is not None:
                event.set()
        else:
            self._open[new.command_id] = new
        log.info(
            "command " + state,
            extra={"kv": {"command_id": new.command_id, "device": new.device, "name": new.name}},
        )
        await self._changed(new)
        return new

    async def _changed(self, rec: CommandRecord) -> None:
        self._wake.set()
        if self._on_change is not None:
            self._on_change(rec.as_dict())
        if self.points_closed:
            return
        text = line(
            COMMAND_MEASUREMENT,
            {"device": rec.device, "name": rec.name, "state": rec.state},
            {"command_id": rec.command_id, "age_ms": {"int": int((rec.updated - rec.created) * 1000)}},
            int(rec.updated * 1000),
        )
        try:
            await self._write(text + "\n", 1, None)
        except trio.ClosedResourceError:
            # Shutdown closed the pipeline while this point waited for room (the record itself is in SQLite).
            log.debug("command point not written: pipeline closed", extra={"kv": {"command_id": rec.command_id}})
