"""The command service: accepts operator commands, offers them to device sessions, times them out, announces them.

The state machine is hub/fleet/_command_states.py (queued -> sent -> delivered -> succeeded | failed, plus expired,
timed_out and cancelled); the records and their SQLite table are hub/fleet/_command_store.py.

Timers run on trio's clock (so tests can run them on a mock clock): a command's TTL and result timeout start from
the wall-clock times in its record (`expires`, `delivered_at`) when it enters the state, or when the service starts
after a restart, and then count in trio time.

Memory is authoritative for unfinished commands. What must be durable before what:

- queued: committed before `submit` returns (the operator's "accepted") and before the device is offered it, so a
  device never runs a command a restarted hub has forgotten, and a retry with the same idempotency key finds it.
- sent, delivered: written behind (within `WRITE_BEHIND` seconds, or with the next commit). A
  crash may lose them; the command is then still queued or sent on disk and goes to the device again on its next
  session, which the device deduplicates by id: what a connection lost between send and acknowledgement does
  anyway. Subscribers see these states at once.
- succeeded, failed, expired, timed_out, cancelled: committed before anyone learns of them: `wait_final`, `get`,
  subscribers (`on_change`), `cancel`'s caller, the transition point.
- transition points (measurement `command`): a transition never waits for the ingest pipeline. Points wait in a
  bounded buffer that `run()` hands to the pipeline in order; what cannot be written (the buffer full, or the
  pipeline closed at shutdown) is counted in `points_lost` and logged, never dropped silently.

The two commits a promise waits for (queued, final) run on the trio thread, with whatever is queued behind them:
`CommandStore.flush` appends them to the store's journal, one write of a few hundred bytes (about 5 us in a loop),
where a SQLite commit took 7-8 writes, 6 file locks and 60-100 us with the hub's caches cold. The write-behind moves
the journal into SQLite (`sync`) and checkpoints it (the fsyncs) in worker threads, as every read runs. Handing the
promised commits to a worker was measured slower, not faster: with 1,000 devices streaming, the round trip through
a worker thread and the busy trio thread's GIL took 1.7 ms typical and 40-60 ms at p99.
"""

from __future__ import annotations

import builtins
import heapq
import itertools
import logging
import math
import random
import sqlite3
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Protocol, Unpack

import trio

from device_client import protocol
from device_client.protocol import JSON, Command, ProtocolError
from hub.config import CommandsConfig
from hub.control_codes import ControlError
from hub.fleet._command_states import FINAL_STATES, STATES, TIMER_EVENTS, CommandEvent, CommandState, allows
from hub.fleet._command_store import CommandRecord, CommandStore, RecordChanges
from hub.ingest import line

# FINAL_STATES, STATES (_command_states.py), CommandRecord and CommandStore (_command_store.py) are re-exported; outside
# the fleet, callers use hub.fleet (COMMAND_FINAL_STATES, COMMAND_STATES, ...).
__all__ = [
    "FINAL_STATES",
    "STATES",
    "CommandError",
    "CommandRecord",
    "CommandService",
    "CommandStore",
    "Elsewhere",
    "Relay",
    "Sender",
]

log = logging.getLogger("hub.commands")

#: Measurement of the transition points (tags device, name, state; fields command_id, age_ms).
COMMAND_MEASUREMENT = "command"

#: Seconds a non-final transition may wait in memory before it is committed (if no commit takes it sooner).
WRITE_BEHIND = 0.2
#: The longest the timer task sleeps (s): a deadline further away than that never wakes it. Commands come and go in
#: milliseconds while their deadlines are seconds to hours away; with no bound the task slept for good whenever no
#: command was open, and each new command's deadlines woke it (twice a command, a task step each).
TIMER_TICK = 1.0
#: Final records kept in memory after their commit, for `get`, `wait_final` and late answers.
RECENT_FINALS = 1024
#: Transition points waiting for room in the pipeline; more are counted in `points_lost` and logged.
POINT_BUFFER = 10_000
#: Seconds the transition points of a moment gather before their lines are built and handed to the pipeline (in
#: `POINT_CHUNK`s): off the path of the command that made them, one task step for many.
POINT_DELAY = 0.02
POINT_CHUNK = 500

#: Command ids: 64 random bits, from a generator seeded from the OS once (an id names a command; it grants nothing,
#: so it needs no secret: `secrets` asked the kernel for 8 bytes per command, 2.5-3 % of the hub's CPU in a run).
_ids = random.Random()

#: A device session's way to put a command frame on its WebSocket (False if it could not take it now).
Sender = Callable[[Command], bool]
#: How a hub holding a device passes the device's answers to a command owned by another hub: the event ("sent",
#: "ack" or "result") and, for a result, ``{"ok", "result", "error"}``.
Relay = Callable[[str, dict[str, JSON]], None]


class Elsewhere(Protocol):
    """The other hubs of a cluster (hub.cluster), as the command service of one of them needs them."""

    async def locate(self, device: str) -> Sender | None:
        """A sender to the hub that holds `device`'s session now, or None if none does."""
        ...

    async def get(self, command_id: str) -> CommandRecord | None:
        """A command owned by any hub, as last published."""
        ...

    async def list(self, device: str | None, state: str | None, limit: int) -> builtins.list[CommandRecord]:
        """Commands of every hub, newest first."""
        ...

    async def cancel(self, command_id: str) -> CommandRecord | None:
        """Cancel a command another hub owns (raises `CommandError` as its owner does); None if none owns it."""
        ...

    async def wait_final(self, command_id: str, timeout: float) -> CommandRecord | None:
        """Wait for another hub's command to be final (bounded); None if no hub knows it."""
        ...


#: A command request refused: the control channel's own error, with its code (hub.control_codes).
CommandError = ControlError


class CommandService:
    """Accepts operator commands, hands them to device sessions, follows them to a final state.

    Start `run()` in a nursery: it times commands out, writes transitions behind and feeds transition points to
    the pipeline. At shutdown, `flush_points()` then `close_points()` before the pipeline's input closes; closing
    the store afterwards commits what is still queued. `clock` gives the Unix time written into records; the TTL
    and result timeouts run on trio's clock.
    """

    def __init__(
        self,
        store: CommandStore,
        config: CommandsConfig,
        *,
        device_exists: Callable[[str], Awaitable[bool]],
        write: Callable[[str, int, None], Awaitable[None]],
        on_change: Callable[[CommandRecord], None] | None = None,
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
        self._counts: dict[CommandState, int] = dict.fromkeys(STATES, 0)
        self._senders: dict[str, Sender] = {}
        self._remote_senders: dict[str, Sender] = {}  # devices held by another hub (a subset of `_senders`)
        self._foreign: dict[str, tuple[str, Relay]] = {}  # id -> (device, relay): other hubs' commands sent here
        self.elsewhere: Elsewhere | None = None  # the other hubs, when this one is part of a cluster
        self._final_events: dict[str, trio.Event] = {}
        self._final_hooks: dict[str, Callable[[CommandRecord], None]] = {}  # id -> called once final (`when_final`)
        self._due: dict[str, float] = {}  # unfinished id -> when its state's timer fires, on trio's clock
        # The same deadlines as a heap of (when, id), for `_expire`; an entry whose time is no longer the id's in
        # `_due` (its state moved on, or it is final) is stale, and skipped when it comes up.
        self._timers: list[tuple[float, str]] = []
        self._timer_at = math.inf  # when `_expire` wakes next unless woken
        self._wake = trio.Event()  # a deadline earlier than `_timer_at` was set
        self._dirty = trio.Event()  # something was put: write it behind
        self._points: deque[CommandRecord] = deque()  # transitions whose points go to the pipeline, in order
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
        args: dict[str, JSON] | None = None,
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
        # Devices are never deleted: one that exists now still exists after the awaits below. One connected here,
        # or found connected to another hub, exists: the registry is asked only about the others. Where the device
        # is must be the last await before the record is in memory (a move announced later finds it open).
        remote = None
        if device not in self._senders:
            if self.elsewhere is not None:
                remote = await self.elsewhere.locate(device)
            if remote is None and device not in self._senders:
                if not await self._device_exists(device):
                    raise CommandError("not_found", f"no device {device!r}")
                if self.elsewhere is not None and device not in self._senders:
                    remote = await self.elsewhere.locate(device)  # again: it may have connected elsewhere meanwhile
        # No await from here until the record is in memory: checks and creation are one step.
        try:
            protocol.check_command_name(name)
        except ProtocolError as exc:
            raise CommandError("bad_command", exc.detail) from None
        args = {} if args is None else args
        if not isinstance(args, dict) or (args and protocol.json_size(args) > protocol.MAX_ARGS_BYTES):
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
            command_id=f"c-{_ids.getrandbits(64):016x}",
            device=device,
            name=name,
            args=args,
            state=CommandState.QUEUED,
            created=now,
            updated=now,
            expires=now + ttl,
            timeout=timeout,
            idempotency_key=idempotency_key,
            operator=operator,
            history=((CommandState.QUEUED, now),),
        )
        self._add_open(rec)
        self._set_due(rec.command_id, trio.current_time() + ttl)
        if idempotency_key is not None:
            self._keys[(device, idempotency_key)] = rec.command_id
        self._counts[CommandState.QUEUED] += 1
        self._put(rec)
        try:
            self._commit()
        except Exception:
            if self._store.discard(rec):  # never committed: not accepted, so it must not run later either
                self._remove_open(rec)
                if idempotency_key is not None:
                    del self._keys[(device, idempotency_key)]
                self._counts[CommandState.QUEUED] -= 1
            raise
        self._announce(rec)  # before it is offered: a session may write it, and announce it sent, at once
        if remote is not None and device not in self._senders:
            self.attach_remote(device, remote)  # offers this one with any older ones
        else:
            self._offer(rec)
        return rec

    async def cancel(self, command_id: str) -> CommandRecord:
        """Cancel a command that has not been delivered."""
        rec = self._open.get(command_id)
        elsewhere = self.elsewhere
        if (
            rec is None
            and elsewhere is not None
            and command_id not in self._finishing
            and await trio.to_thread.run_sync(self._store.get, command_id) is None
        ):
            remote = await elsewhere.cancel(command_id)  # another hub's, or None
            if remote is not None:
                return remote
        if rec is None:
            if await self.get(command_id) is None:
                raise CommandError("not_found", f"no command {command_id!r}")
            raise CommandError("invalid_state", f"command {command_id!r} is already final")
        if not allows(rec.state, CommandEvent.CANCEL):
            raise CommandError("invalid_state", f"command {command_id!r} is {rec.state}: too late to cancel")
        return self._transition(rec, CommandEvent.CANCEL)

    async def get(self, command_id: str) -> CommandRecord | None:
        """The record as it is now: from memory for open and recently final commands, else from SQLite."""
        rec = self._open.get(command_id) or self._recent.get(command_id)
        if rec is not None:
            return rec
        rec = await trio.to_thread.run_sync(self._store.get, command_id)
        if rec is None and self.elsewhere is not None:
            rec = await self.elsewhere.get(command_id)
        return rec

    async def list(self, device: str | None = None, state: str | None = None, limit: int = 50) -> list[CommandRecord]:
        """Newest first (in a cluster, every hub's)."""
        local = await trio.to_thread.run_sync(self._store.list, device, state, limit)
        if self.elsewhere is None:
            return local
        by_id = {rec.command_id: rec for rec in await self.elsewhere.list(device, state, limit)}
        by_id.update((rec.command_id, rec) for rec in local)  # ours are the freshest of our own
        return sorted(by_id.values(), key=lambda rec: rec.created, reverse=True)[:limit]

    def counts(self) -> dict[str, int]:
        """Commands by state (from memory; safe to call from a worker thread)."""
        return {state: n for state, n in list(self._counts.items()) if n}

    def when_final(self, command_id: str, hook: Callable[[CommandRecord], None] | None) -> bool:
        """Call `hook` with the record once the command is final and committed, before `wait_final`'s waiters wake
        (they do a scheduling round later); None forgets the hook. False if the command is not unfinished here (final
        already, or another hub's): nothing will be called."""
        if hook is None:
            self._final_hooks.pop(command_id, None)
            return False
        if command_id not in self._open and command_id not in self._finishing:
            return False
        self._final_hooks[command_id] = hook
        return True

    async def wait_final(self, command_id: str, timeout: float) -> CommandRecord:
        """The record once final (and committed), or as it is when `timeout` seconds have passed."""
        if command_id in self._open or command_id in self._finishing:
            event = self._final_events.setdefault(command_id, trio.Event())
            with trio.move_on_after(timeout):
                await event.wait()
        elif self.elsewhere is not None and command_id not in self._recent:
            remote = await self.elsewhere.wait_final(command_id, timeout)
            if remote is not None:
                return remote
        found = await self.get(command_id)
        if found is None:
            raise CommandError("not_found", f"no command {command_id!r}")
        return found

    # ------------------------------------------------------------------ device side

    def attach(self, device: str, sender: Sender) -> None:
        """A session of `device` is ready: re-send what it has not answered, in order, then new ones."""
        self._remote_senders.pop(device, None)
        self._senders[device] = sender
        self._offer_open(device, sender)

    def attach_remote(self, device: str, sender: Sender) -> None:
        """`device`'s session is on another hub now (the caller checked it is newer than any session here): offer
        its open commands there."""
        self._remote_senders[device] = self._senders[device] = sender
        self._offer_open(device, sender)

    def detach_remote(self, device: str) -> None:
        """`device`'s session on another hub has ended."""
        if self._remote_senders.pop(device, None) is not None:
            del self._senders[device]

    def has_open(self, device: str) -> bool:
        """Whether `device` has unfinished commands owned here."""
        return device in self._open_ids

    def offer_foreign(self, device: str, frame: Command, relay: Relay) -> bool:
        """Send another hub's command to `device`'s session here; `relay` carries the answers back. False: no
        session of `device` here."""
        sender = self._senders.get(device)
        if sender is None or device in self._remote_senders:
            return False
        self._foreign[frame.id] = (device, relay)
        sender(frame)
        return True

    def _offer_open(self, device: str, sender: Sender) -> None:
        now = trio.current_time()
        open_ = self._open
        for command_id in list(self._open_ids.get(device, ())):  # this device's only: a connect is not O(fleet)
            rec = open_[command_id]
            if self._due_at(rec) > now and not sender(self._frame(rec)):
                break

    def detach(self, device: str, sender: Sender) -> None:
        if self._senders.get(device) is sender:
            del self._senders[device]
            for command_id in [i for i, (d, _) in self._foreign.items() if d == device]:
                del self._foreign[command_id]  # their owners offer them again where the device comes back

    def is_open(self, command_id: str) -> bool:
        """Whether the command still wants to reach its device (not final)."""
        return command_id in self._open or command_id in self._foreign

    def _relayed(self, device: str, command_id: str, event: str, answer: dict[str, JSON] | None = None) -> bool:
        """Pass a device's answer to another hub's command to its owner; False if it is not one."""
        found = self._foreign.get(command_id)
        if found is None or found[0] != device:
            return False
        if event == "result":
            del self._foreign[command_id]
        found[1](event, answer or {})
        return True

    def on_sent(self, device: str, command_id: str) -> None:
        """The session wrote the command frame (from within its `Sender`, or later)."""
        if self._relayed(device, command_id, "sent"):
            return
        rec = self._open.get(command_id)
        if rec is not None and rec.device == device and allows(rec.state, CommandEvent.SEND):
            self._transition(rec, CommandEvent.SEND)

    async def on_ack(self, device: str, command_id: str) -> bool:
        """The device acknowledged receipt. False: not a command this device was sent."""
        if self._relayed(device, command_id, "ack"):
            return True
        rec = self._open.get(command_id)
        if rec is None:
            return await self._known_final(device, command_id)
        if rec.device != device:
            return False
        if allows(rec.state, CommandEvent.ACK):  # else a repeated ack: nothing changes
            self._transition(rec, CommandEvent.ACK)
        return True

    async def on_result(self, device: str, command_id: str, ok: bool, result: JSON, error: str) -> bool:
        """The device's result. False: not a command this device was sent."""
        if self._relayed(device, command_id, "result", {"ok": ok, "result": result, "error": error}):
            return True
        rec = self._open.get(command_id)
        if rec is None:
            return await self._known_final(device, command_id)
        if rec.device != device or rec.state is CommandState.QUEUED:  # never sent: not this device's to answer
            return False
        if allows(rec.state, CommandEvent.ACK):  # the result stands for the ack that did not come
            rec = self._transition(rec, CommandEvent.ACK)
        event = CommandEvent.SUCCEED if ok else CommandEvent.FAIL
        self._transition(rec, event, result=result, error="" if ok else error)
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
        for rec in self._open.values():  # the commands of the last run: their timers start from their records now
            self._due_at(rec)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_behind)
            nursery.start_soon(self._feed_points)
            task_status.started()
            await self._expire()

    async def _expire(self) -> None:
        due_at, timers = self._due, self._timers  # every unfinished command has its deadline once `run` started
        while True:
            now = trio.current_time()
            fired = False
            while timers and timers[0][0] <= now:
                at, command_id = heapq.heappop(timers)
                rec = self._open.get(command_id)
                if rec is not None and due_at.get(command_id) == at:
                    self._apply(rec, TIMER_EVENTS[rec.state])  # final: its deadline goes
                    fired = True
            if fired:
                self._commit()  # one commit for every command due now
            while timers and due_at.get(timers[0][1]) != timers[0][0]:
                heapq.heappop(timers)  # stale
            self._timer_at = min(timers[0][0] if timers else math.inf, now + TIMER_TICK)
            self._wake = trio.Event()
            with trio.move_on_at(self._timer_at):
                await self._wake.wait()

    def _set_due(self, command_id: str, at: float) -> None:
        """Set the command's timer to fire at `at` (trio's clock); wake `_expire` only if that is sooner than it
        would wake anyway, at most `TIMER_TICK` ahead (a transition costs no wake-up, and no pass over every
        unfinished command)."""
        self._due[command_id] = at
        timers = self._timers
        heapq.heappush(timers, (at, command_id))
        if len(timers) > 2 * len(self._due) + 64:  # mostly stale (finished commands' deadlines): start afresh
            timers[:] = [(when, cid) for cid, when in self._due.items()]
            heapq.heapify(timers)
        if at < self._timer_at:
            self._wake.set()

    def _due_at(self, rec: CommandRecord) -> float:
        """When `rec`'s timer fires on trio's clock; for a command of the last run, counted from its record now."""
        due = self._due.get(rec.command_id)
        if due is None:
            due = trio.current_time() + (rec.deadline() - self._clock())
            self._set_due(rec.command_id, due)
        return due

    async def _write_behind(self) -> None:
        while True:
            await self._dirty.wait()
            await trio.sleep(WRITE_BEHIND)
            self._dirty = trio.Event()
            try:
                self._commit()
                await trio.to_thread.run_sync(self._store.sync)
                await trio.to_thread.run_sync(self._store.checkpoint)
            except (sqlite3.Error, OSError):
                log.exception("command store: write failed; trying again", extra={"kv": {"queued": self._store.queued}})
                self._dirty.set()
                await trio.sleep(1.0)

    def _transition(self, rec: CommandRecord, event: CommandEvent, **changes: Unpack[RecordChanges]) -> CommandRecord:
        """Apply `event` to `rec`; a final state is committed, then announced, before this returns."""
        new = self._apply(rec, event, **changes)
        if new.final:
            self._commit()
        else:
            self._announce(new)
        return new

    def _apply(self, rec: CommandRecord, event: CommandEvent, **changes: Unpack[RecordChanges]) -> CommandRecord:
        """The transition in memory, its write queued (no await: nothing can come between check and change).

        Raises `IllegalTransition` (changing nothing) if `rec`'s state does not take `event`."""
        now = self._clock()
        if event is CommandEvent.ACK:
            changes["delivered_at"] = now
        new = rec.after(event, now, **changes)
        self._counts[rec.state] -= 1
        self._counts[new.state] += 1
        if new.final:
            self._remove_open(new)
            self._finishing[new.command_id] = new
        else:
            self._open[new.command_id] = new
            if TIMER_EVENTS[new.state] is not TIMER_EVENTS[rec.state]:  # the result timeout starts at delivery
                self._set_due(new.command_id, trio.current_time() + (new.deadline() - now))
        self._put(new)
        return new

    def _add_open(self, rec: CommandRecord) -> None:
        self._open[rec.command_id] = rec
        self._open_ids.setdefault(rec.device, {})[rec.command_id] = None

    def _remove_open(self, rec: CommandRecord) -> None:
        del self._open[rec.command_id]
        self._due.pop(rec.command_id, None)
        ids = self._open_ids[rec.device]
        del ids[rec.command_id]
        if not ids:
            del self._open_ids[rec.device]

    def _put(self, rec: CommandRecord) -> None:
        self._store.put(rec)
        self._dirty.set()

    def _commit(self) -> None:
        """Commit everything put so far (the store's journal: one write), then announce the finals."""
        finishing = list(self._finishing.values())
        self._store.flush()
        self._announce_finished(finishing)

    def _announce_finished(self, finishing: builtins.list[CommandRecord]) -> None:
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
        """Tell waiters, subscribers, the log and the database (a point) about a transition. The log says at info
        level how a command ended unless it succeeded (the record says who sent it; every transition is a point and
        an event): no info line for a command that went well."""
        if rec.final:
            hook = self._final_hooks.pop(rec.command_id, None)
            if hook is not None:
                try:
                    hook(rec)
                except Exception:  # a waiter's failure: the record is final whatever it does
                    log.exception("command final hook failed", extra={"kv": {"command_id": rec.command_id}})
            event = self._final_events.pop(rec.command_id, None)
            if event is not None:
                event.set()
        log.log(
            logging.INFO if rec.final and rec.state is not CommandState.SUCCEEDED else logging.DEBUG,
            "command " + rec.state,
            extra={"kv": {"command_id": rec.command_id, "device": rec.device, "name": rec.name}},
        )
        if self._on_change is not None:
            self._on_change(rec)
        if self._points_closed:
            self._lose(1, "pipeline closed")
        elif len(self._points) >= POINT_BUFFER:
            if not self._losing:
                log.warning("command points buffer full: points are being lost", extra={"kv": {"buffer": POINT_BUFFER}})
            self._losing += 1
            self.points_lost += 1
        else:
            self._points.append(rec)
            self._points_ready.set()

    # ------------------------------------------------------------------ transition points

    async def _feed_points(self) -> None:
        while True:
            await self._points_ready.wait()
            await trio.sleep(POINT_DELAY)
            self._points_ready = trio.Event()
            await self.flush_points()

    async def flush_points(self) -> None:
        """Hand every buffered transition point to the pipeline, in order (waits for room in it)."""
        async with self._points_lock:
            while self._points and not self._points_closed:
                n = min(len(self._points), POINT_CHUNK)
                try:
                    await self._write("".join(map(_point_line, itertools.islice(self._points, n))), n, None)
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


def _point_line(rec: CommandRecord) -> str:
    """A transition's point (line protocol, with its newline)."""
    return (
        line(
            COMMAND_MEASUREMENT,
            {"device": rec.device, "name": rec.name, "state": rec.state},
            {"command_id": rec.command_id, "age_ms": {"int": int((rec.updated - rec.created) * 1000)}},
            int(rec.updated * 1000),
        )
        + "\n"
    )
