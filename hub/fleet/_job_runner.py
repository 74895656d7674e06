"""The job runner: creates jobs, drives each through its devices at its rate, cancels, aborts, resumes after a restart.

The decisions are `hub.fleet._jobs.decide` (pure); the states are hub/fleet/_job_states.py; the store is
hub/fleet/_job_store.py. What a job does to one device is a `JobAction`: `CommandAction` sends a command through the
command service; `DesiredAction` changes each device's desired state (the device twin) and waits until the device
applied it, plugged in as the runner's `desired` factory.

What is durable when:
- a new job with its devices (all pending): committed before `create` returns;
- a cancel or an abort (the job's new state, its pending devices cancelled or skipped): committed before any device
  is stopped and before `cancel` returns, so a restart never starts a device of a stopped job;
- everything else (a device started, its outcome, the counts, the end of a job): written behind within
  `WRITE_BEHIND` seconds. A crash may lose them: the job is resumed with those devices still pending or running and
  runs them again with the same idempotency key (``job:<job_id>``), which finds the command sent before instead of
  sending a second one; its outcome is then the same command's.
"""

from __future__ import annotations

import builtins
import logging
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import trio

from device_client.twin import TwinError
from hub.control_codes import ControlError, ErrorCode, twin_error
from hub.fleet._accounts import DeviceRecord, UnknownDevice
from hub.fleet._command_states import CommandState
from hub.fleet._commands import CommandService
from hub.fleet._job_states import (
    DEVICE_STATES,
    DeviceEvent,
    DeviceState,
    JobEvent,
    JobState,
    device_allows,
)
from hub.fleet._job_store import JobStore
from hub.fleet._jobs import (
    DESIRED_TIMEOUT,
    MAX_JOB_DEVICES,
    Abort,
    CommandSpec,
    DesiredSpec,
    DeviceOutcome,
    Finish,
    JobRecord,
    Rollout,
    Start,
    parse_action,
)
from hub.fleet._jobs import decide as decide_next
from hub.fleet._labels import BadLabel, parse_selector
from hub.fleet._store import StoreUnavailable
from hub.fleet._twins import TwinService

__all__ = [
    "WRITE_BEHIND",
    "ActionResult",
    "CommandAction",
    "DesiredAction",
    "DesiredActionFactory",
    "JobAction",
    "JobRunner",
]

log = logging.getLogger("hub.jobs")

#: Seconds a device's change may wait in memory before it is committed.
WRITE_BEHIND = 0.2
#: Seconds between two tries of an action that could not reach the state store.
RETRY_EVERY = 1.0
#: Longest single wait for a command's final state (then it is asked again).
RESULT_WAIT = 600.0


@attrs.frozen
class ActionResult:
    """A device's outcome as its action reports it: `ok`, else `error`; `stopped` when `stop` ended it."""

    ok: bool
    error: str = ""
    stopped: bool = False


class JobAction(Protocol):
    """What a job does to one device, in three steps the runner drives (and drives again after a restart)."""

    async def start(self, device: str, key: str) -> str:
        """Begin on `device`; idempotent by `key` (the same key finds the same run). A reference to the run.

        Raises ControlError when the device cannot take it (its outcome is then failed with the error)."""
        ...

    async def result(self, device: str, ref: str) -> ActionResult:
        """Wait until the run `ref` has its outcome."""
        ...

    async def stop(self, device: str, ref: str) -> None:
        """Ask the run `ref` to stop (best effort: one too far along runs to its end)."""
        ...


#: Builds the action of a desired-state job: (its spec, the creating operator) -> the action. The device twin
#: provides it; without one, desired-state jobs are refused.
DesiredActionFactory = Callable[[DesiredSpec, str], JobAction]


class CommandAction:
    """Send a command to each device through the command service and follow it to its final state."""

    def __init__(self, commands: CommandService, spec: CommandSpec, operator: str) -> None:
        self._commands = commands
        self._spec = spec
        self._operator = operator

    async def start(self, device: str, key: str) -> str:
        spec = self._spec
        record = await self._commands.submit(
            device,
            spec.name,
            spec.args,
            ttl=spec.ttl,
            timeout=spec.timeout,
            idempotency_key=key,
            operator=self._operator,
        )
        return record.command_id

    async def result(self, device: str, ref: str) -> ActionResult:
        while True:
            record = await self._commands.wait_final(ref, RESULT_WAIT)
            if record.final:
                break
        if record.state is CommandState.SUCCEEDED:
            return ActionResult(True)
        error = f"{record.state}: {record.error}" if record.error else str(record.state)
        return ActionResult(False, error, stopped=record.state is CommandState.CANCELLED)

    async def stop(self, device: str, ref: str) -> None:
        try:
            await self._commands.cancel(ref)
        except ControlError as exc:  # already delivered or final: it ends by itself
            log.debug("job command not cancelled", extra={"kv": {"command_id": ref, "reason": exc.code}})


class DesiredAction:
    """Merge a patch into each device's desired state (the device twin) and wait until the device applied it.

    Started again after a restart, the same patch changes nothing more (a merge patch applied twice is applied once),
    so its version is the one to wait for. Stopping does not undo the change: the devices that have it keep it."""

    def __init__(self, twins: TwinService, spec: DesiredSpec, operator: str) -> None:
        self._twins = twins
        self._spec = spec
        self._operator = operator
        self._waiting: dict[str, trio.CancelScope] = {}  # device -> its `result` wait
        self._stopped: set[str] = set()  # stopped before its wait began

    async def start(self, device: str, key: str) -> str:
        try:
            rec = await self._twins.set_desired(device, self._spec.patch)
        except UnknownDevice:
            raise ControlError(ErrorCode.NOT_FOUND, f"no device {device[:64]!r}") from None
        except TwinError as exc:  # the device's document would be over the limits
            raise twin_error(exc) from None
        kv = {"device": device, "version": rec.desired_version, "operator": self._operator, "key": key}
        log.info("desired twin changed by a job", extra={"kv": kv})
        return str(rec.desired_version)

    async def result(self, device: str, ref: str) -> ActionResult:
        timeout = self._spec.timeout or DESIRED_TIMEOUT
        with trio.CancelScope() as waiting:
            if device in self._stopped:
                waiting.cancel()
            self._waiting[device] = waiting
            try:
                rec = await self._twins.wait_applied(device, int(ref), timeout)
            finally:
                del self._waiting[device]
                self._stopped.discard(device)
        if waiting.cancelled_caught:
            return ActionResult(False, "stopped (the desired change stays in place)", stopped=True)
        if rec is None:
            return ActionResult(False, f"not applied within {timeout:g} s (the desired change stays in place)")
        return ActionResult(True)

    async def stop(self, device: str, ref: str) -> None:
        waiting = self._waiting.get(device)
        if waiting is not None:
            waiting.cancel()
        else:
            self._stopped.add(device)


class _Active:
    """A job the runner drives: its record, its devices' outcomes, counts, and what wakes its driver."""

    def __init__(self, record: JobRecord, outcomes: builtins.list[DeviceOutcome], action: JobAction) -> None:
        self.record = record
        self.action = action
        self.outcomes = {o.device: o for o in outcomes}
        self.pending = deque(o.device for o in outcomes if o.state is DeviceState.PENDING)
        self.counts = dict.fromkeys(DEVICE_STATES, 0)
        for o in outcomes:
            self.counts[o.state] += 1
        self.changed = trio.Event()
        self.not_before = -float("inf")  # trio time of the next start

    def current(self) -> JobRecord:
        return attrs.evolve(self.record, counts=dict(self.counts))


class JobRunner:
    """Creates, drives, cancels and lists jobs. Start `run()` in a nursery after the command service's."""

    def __init__(
        self,
        store: JobStore,
        commands: CommandService,
        *,
        devices: Callable[[], Awaitable[builtins.list[DeviceRecord]]],
        desired: DesiredActionFactory | None = None,
        on_change: Callable[[JobRecord], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._commands = commands
        self._devices = devices
        self.desired = desired  # the device twin's action factory, once it exists
        self._on_change = on_change  # every new version of a job's record (hub: the `jobs` topic)
        self._clock = clock
        self._active: dict[str, _Active] = {}
        self._nursery: trio.Nursery | None = None
        self._dirty = trio.Event()

    # ------------------------------------------------------------------ operator side

    async def create(self, selector: str, action: object, rollout: Rollout, operator: str = "") -> JobRecord:
        """Resolve `selector` now, store the job with its devices, start it; its record. ControlError if refused."""
        if self._nursery is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "the job runner is not running")
        try:
            chosen = parse_selector(selector)
        except BadLabel as exc:
            raise ControlError(ErrorCode.BAD_LABEL, str(exc)) from None
        spec = parse_action(action)
        job_action = self._action(spec, operator)
        names = sorted(r.name for r in await self._devices() if not r.revoked and chosen.matches(r.labels))
        if not names:
            raise ControlError(ErrorCode.NOT_FOUND, f"no device matches {str(chosen)[:200]!r}")
        if len(names) > MAX_JOB_DEVICES:
            raise ControlError(ErrorCode.BAD_REQUEST, f"a job targets at most {MAX_JOB_DEVICES} devices")
        now = self._clock()
        record = JobRecord(
            job_id="j-" + secrets.token_hex(6),
            selector=str(chosen),
            action=spec,
            rollout=rollout,
            state=JobState.RUNNING,
            created=now,
            updated=now,
            total=len(names),
            counts={DeviceState.PENDING: len(names)},
            operator=operator,
        )
        await trio.to_thread.run_sync(self._store.create, record, names)
        self._begin(record, [DeviceOutcome(name) for name in names], job_action)
        if self._on_change is not None:
            self._on_change(record)
        log.info("job created", extra={"kv": {"job_id": record.job_id, "devices": len(names), "operator": operator}})
        return record

    async def cancel(self, job_id: str, operator: str = "") -> JobRecord:
        """Cancel a running job: pending devices are cancelled, devices in flight asked to stop; its record."""
        job = self._active.get(job_id)
        if job is None:
            stored = await self.get(job_id)
            if stored is None:
                raise ControlError(ErrorCode.NOT_FOUND, f"no job {job_id[:64]!r}")
            if not stored.final:  # not resumed (its action is missing here): see the hub's log
                raise ControlError(ErrorCode.INVALID_STATE, f"job {job_id[:64]!r} is not run by this hub")
            raise ControlError(ErrorCode.INVALID_STATE, f"job {job_id[:64]!r} is already finished")
        if job.record.state is not JobState.RUNNING:
            raise ControlError(ErrorCode.INVALID_STATE, f"job {job_id[:64]!r} is {job.record.state}: already stopping")
        await self._stop(job, JobEvent.CANCEL, f"cancelled by {operator}" if operator else "cancelled")
        return job.current()

    async def get(self, job_id: str) -> JobRecord | None:
        """The job as it is now (from memory while it runs)."""
        job = self._active.get(job_id)
        if job is not None:
            return job.current()
        return await trio.to_thread.run_sync(self._store.get, job_id)

    async def list(self, state: str | None = None, limit: int = 50) -> builtins.list[JobRecord]:
        """Jobs newest first."""
        stored = await trio.to_thread.run_sync(self._store.list, state, limit)
        out = []
        for record in stored:
            job = self._active.get(record.job_id)
            out.append(record if job is None else job.current())
        return out

    async def devices(
        self, job_id: str, state: str | None = None, limit: int = 100, offset: int = 0
    ) -> builtins.list[DeviceOutcome]:
        """A job's devices in rollout order (flushed first: as they are now)."""
        return await trio.to_thread.run_sync(self._store.devices, job_id, state, limit, offset)

    def _action(self, spec: CommandSpec | DesiredSpec, operator: str) -> JobAction:
        if isinstance(spec, CommandSpec):
            return CommandAction(self._commands, spec, operator)
        if self.desired is None:
            raise ControlError(ErrorCode.BAD_REQUEST, "desired-state jobs need the device twin, which this hub lacks")
        return self.desired(spec, operator)

    # ------------------------------------------------------------------ driving

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Resume the jobs of the last run, then drive jobs and write their changes behind, until cancelled."""
        resumed = await trio.to_thread.run_sync(self._store.active)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._write_behind)
            for record, outcomes in resumed:
                running = sum(o.state is DeviceState.RUNNING for o in outcomes)
                kv = {"job_id": record.job_id, "state": record.state, "running": running}
                try:
                    action = self._action(record.action, record.operator)
                except ControlError as exc:  # e.g. a desired-state job on a hub without the twin: it waits on disk
                    log.error("job not resumed", extra={"kv": {**kv, "reason": exc.message}})
                    continue
                log.info("job resumed", extra={"kv": kv})
                self._begin(record, outcomes, action)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def _begin(self, record: JobRecord, outcomes: builtins.list[DeviceOutcome], action: JobAction) -> None:
        assert self._nursery is not None
        job = _Active(record, outcomes, action)
        self._active[record.job_id] = job
        self._nursery.start_soon(self._drive, job)

    async def _drive(self, job: _Active) -> None:
        rollout = job.record.rollout
        async with trio.open_nursery() as devices:
            for outcome in list(job.outcomes.values()):
                if outcome.state is DeviceState.RUNNING:  # in flight when the hub stopped: the same key finds it
                    devices.start_soon(self._device, job, outcome.device)
            while True:
                now = trio.current_time()
                decision = decide_next(job.record.state, rollout, job.counts, job.record.total, now, job.not_before)
                if isinstance(decision, Start):
                    name = job.pending.popleft()
                    self._device_event(job, name, DeviceEvent.START)
                    job.not_before = now + rollout.interval
                    devices.start_soon(self._device, job, name)
                elif isinstance(decision, Abort):
                    failed = job.counts[DeviceState.FAILED]
                    done = failed + job.counts[DeviceState.SUCCEEDED]
                    reason = f"{failed} of {done} outcomes failed (more than {rollout.abort_percent:g} %)"
                    await self._stop(job, JobEvent.ABORT, reason)
                elif isinstance(decision, Finish):
                    self._job_event(job, decision.event)
                    break
                else:  # Wait: nothing happens between the decision and this reset (no await)
                    job.changed = trio.Event()
                    with trio.move_on_at(decision.until):
                        await job.changed.wait()
        del self._active[job.record.job_id]
        counts = {s.value: n for s, n in job.counts.items() if n}
        log.info("job " + job.record.state, extra={"kv": {"job_id": job.record.job_id, **counts}})

    async def _device(self, job: _Active, name: str) -> None:
        """Run the job's action on one device to its outcome."""
        key = f"job:{job.record.job_id}"
        while True:
            try:
                ref = await job.action.start(name, key)
                if job.outcomes[name].ref != ref:
                    self._put_device(job, attrs.evolve(job.outcomes[name], ref=ref))
                if job.record.state is not JobState.RUNNING:  # stopped while it was starting
                    await job.action.stop(name, ref)
                result = await job.action.result(name, ref)
                break
            except ControlError as exc:  # the device cannot take it: queue full, a limit the command breaks
                self._device_event(job, name, DeviceEvent.FAIL, error=f"{exc.code}: {exc.message}")
                return
            except (StoreUnavailable, sqlite3.Error, OSError) as exc:  # the same key finds the same run again
                kv = {"job_id": job.record.job_id, "device": name, "error": str(exc)}
                log.warning("job device waits for its stores", extra={"kv": kv})
                await trio.sleep(RETRY_EVERY)
        if result.ok:
            self._device_event(job, name, DeviceEvent.SUCCEED)
        elif result.stopped and job.record.state is not JobState.RUNNING:
            self._device_event(job, name, DeviceEvent.CANCEL, error=result.error)
        else:
            self._device_event(job, name, DeviceEvent.FAIL, error=result.error)

    async def _stop(self, job: _Active, event: JobEvent, reason: str) -> None:
        """Cancel or abort: no more starts, pending devices cancelled or skipped (committed), in-flight ones stopped."""
        self._job_event(job, event, reason)
        pending = DeviceEvent.CANCEL if event is JobEvent.CANCEL else DeviceEvent.SKIP
        while job.pending:
            self._device_event(job, job.pending.popleft(), pending)
        log.warning("job " + job.record.state, extra={"kv": {"job_id": job.record.job_id, "reason": reason}})
        await self._flush()
        for outcome in list(job.outcomes.values()):
            if outcome.state is DeviceState.RUNNING and outcome.ref:
                await job.action.stop(outcome.device, outcome.ref)

    def _job_event(self, job: _Active, event: JobEvent, reason: str = "") -> None:
        job.record = job.record.after(event, self._clock(), reason)
        self._put_job(job)

    def _device_event(self, job: _Active, name: str, event: DeviceEvent, *, error: str = "") -> None:
        old = job.outcomes[name]
        if not device_allows(old.state, event):  # e.g. an outcome after the hub's shutdown began
            return
        new = old.after(event, self._clock(), error=error)
        job.counts[old.state] -= 1
        job.counts[new.state] += 1
        self._put_device(job, new)
        self._put_job(job)

    def _put_job(self, job: _Active) -> None:
        record = job.current()
        self._store.put_job(record)
        self._dirty.set()
        job.changed.set()
        if self._on_change is not None:
            self._on_change(record)

    def _put_device(self, job: _Active, outcome: DeviceOutcome) -> None:
        job.outcomes[outcome.device] = outcome
        self._store.put_device(job.record.job_id, outcome)
        self._dirty.set()

    async def _flush(self) -> None:
        await trio.to_thread.run_sync(self._store.flush)

    async def _write_behind(self) -> None:
        while True:
            await self._dirty.wait()
            await trio.sleep(WRITE_BEHIND)
            self._dirty = trio.Event()
            try:
                await self._flush()
            except (sqlite3.Error, OSError):
                log.exception("job store: write failed; trying again", extra={"kv": {"queued": self._store.queued}})
                self._dirty.set()
                await trio.sleep(RETRY_EVERY)
