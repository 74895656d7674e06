"""Fleet jobs as values, and the rollout's decisions as pure functions. No I/O.

A job's action (`CommandSpec`, `DesiredSpec`: `parse_action`), its rollout (`Rollout`: rate, in-flight limit, abort
threshold), its record (`JobRecord`) and each device's outcome (`DeviceOutcome`); `decide` says what the runner
(_job_runner.py) does next. docs/control.md, "Jobs".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypeAlias, TypedDict

import attrs

from device_client import protocol
from device_client.protocol import JSON, ProtocolError
from device_client.twin import TwinError, check_patch
from hub.control_codes import ControlError, ErrorCode, twin_error
from hub.fleet._job_states import (
    DEVICE_FINAL_STATES,
    DEVICE_STATES,
    JOB_FINAL_STATES,
    DeviceEvent,
    DeviceState,
    JobEvent,
    JobState,
    next_device_state,
    next_job_state,
)

__all__ = [
    "ABORT_MIN_OUTCOMES",
    "ACTIONS",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_RATE",
    "MAX_IN_FLIGHT",
    "MAX_JOB_DEVICES",
    "MAX_RATE",
    "Abort",
    "Action",
    "CommandSpec",
    "Decision",
    "DesiredSpec",
    "DeviceOutcome",
    "DeviceOutcomeDict",
    "Finish",
    "JobRecord",
    "JobRecordDict",
    "Rollout",
    "Start",
    "Wait",
    "abort_due",
    "decide",
    "parse_action",
]

#: Devices started per second by default, and at most.
DEFAULT_RATE = 10.0
MAX_RATE = 1000.0
#: Devices in flight at once by default, and at most.
DEFAULT_MAX_IN_FLIGHT = 10
MAX_IN_FLIGHT = 1000
#: Devices one job may target.
MAX_JOB_DEVICES = 100_000
#: Seconds a device of a desired-state job has to apply it, by default and at most.
DESIRED_TIMEOUT = 3600.0
MAX_DESIRED_TIMEOUT = 7 * 86_400.0
#: Outcomes needed before the abort threshold is checked (fewer when the job has fewer devices).
ABORT_MIN_OUTCOMES = 10
#: The action types a job may carry.
ACTIONS = ("command", "desired")


def _bad(message: str) -> ControlError:
    return ControlError(ErrorCode.BAD_REQUEST, message)


def _optional_seconds(action: Mapping[str, object], key: str) -> float | None:
    value = action.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ControlError(ErrorCode.BAD_COMMAND, f"action.{key} must be a positive number of seconds")
    return float(value)


@attrs.frozen
class CommandSpec:
    """Send command `name` with `args` to each device (`ttl`, `timeout`: the command service's, None: its default)."""

    name: str
    args: dict[str, JSON] = attrs.field(factory=dict)
    ttl: float | None = None
    timeout: float | None = None

    def as_dict(self) -> dict[str, JSON]:
        return {"type": "command", "name": self.name, "args": self.args, "ttl": self.ttl, "timeout": self.timeout}


@attrs.frozen
class DesiredSpec:
    """Merge `patch` (RFC 7386) into each device's desired state (the device twin); a device succeeds once it says it
    applied that version, fails if it has not within `timeout` seconds (None: `DESIRED_TIMEOUT`)."""

    patch: dict[str, JSON]
    timeout: float | None = None

    def as_dict(self) -> dict[str, JSON]:
        return {"type": "desired", "patch": self.patch, "timeout": self.timeout}


Action: TypeAlias = CommandSpec | DesiredSpec


def parse_action(action: object) -> Action:
    """The action of a `job_create`'s `action` object; ControlError (bad_request, bad_command) if it is malformed.

    ``{"type": "command", "name": N, "args": {...}, "ttl": S, "timeout": S}`` or
    ``{"type": "desired", "patch": {...}}``.
    The command service checks ttl and timeout against its limits when the job sends each command.
    """
    if not isinstance(action, Mapping):
        raise _bad("action must be an object with a 'type'")
    kind = action.get("type")
    if kind not in ACTIONS:
        raise _bad(f"action type must be one of {', '.join(ACTIONS)}")
    if kind == "desired":
        unknown = set(action) - {"type", "patch", "timeout"}
        if unknown:
            raise _bad(f"unknown action fields: {', '.join(sorted(map(str, unknown)))}")
        patch = action.get("patch")
        if not isinstance(patch, dict) or not patch:
            raise _bad("a desired action needs 'patch': a non-empty JSON object (a merge patch)")
        try:
            check_patch(patch)
        except TwinError as exc:
            raise twin_error(exc) from None
        timeout = _optional_seconds(action, "timeout")
        if timeout is not None and timeout > MAX_DESIRED_TIMEOUT:
            raise ControlError(ErrorCode.BAD_COMMAND, f"action.timeout is at most {MAX_DESIRED_TIMEOUT:g} seconds")
        return DesiredSpec(patch, timeout)
    unknown = set(action) - {"type", "name", "args", "ttl", "timeout"}
    if unknown:
        raise _bad(f"unknown action fields: {', '.join(sorted(map(str, unknown)))}")
    try:
        name = protocol.check_command_name(action.get("name"))
    except ProtocolError as exc:
        raise ControlError(ErrorCode.BAD_COMMAND, exc.detail) from None
    args = action.get("args")
    args = {} if args is None else args
    if not isinstance(args, dict) or protocol.json_size(args) > protocol.MAX_ARGS_BYTES:
        raise ControlError(ErrorCode.BAD_COMMAND, f"args must be an object of at most {protocol.MAX_ARGS_BYTES} bytes")
    return CommandSpec(name, args, _optional_seconds(action, "ttl"), _optional_seconds(action, "timeout"))


def _rate(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0 < value <= MAX_RATE:
        raise _bad(f"rate must be in (0, {MAX_RATE:g}] devices per second")


def _in_flight(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= MAX_IN_FLIGHT:
        raise _bad(f"max_in_flight must be 1..{MAX_IN_FLIGHT}")


def _percent(_: object, attribute: attrs.Attribute[float | None], value: float | None) -> None:
    if value is not None and not 0 <= value <= 100:
        raise _bad("abort_percent must be in [0, 100]")


@attrs.frozen
class Rollout:
    """How fast a job goes: devices started per second, devices in flight at once, and when it gives up.

    `abort_percent`: the job aborts when more than this percentage of the outcomes so far are failures, checked
    once `min(ABORT_MIN_OUTCOMES, total)` devices have an outcome (None: never).
    """

    rate: float = attrs.field(default=DEFAULT_RATE, validator=_rate)
    max_in_flight: int = attrs.field(default=DEFAULT_MAX_IN_FLIGHT, validator=_in_flight)
    abort_percent: float | None = attrs.field(default=None, validator=_percent)

    @property
    def interval(self) -> float:
        """Seconds between two starts."""
        return 1.0 / self.rate


def abort_due(rollout: Rollout, counts: Mapping[DeviceState, int], total: int) -> bool:
    """Whether the failed outcomes passed the threshold: failed / (succeeded + failed) > abort_percent %, once at
    least `min(ABORT_MIN_OUTCOMES, total)` devices succeeded or failed."""
    if rollout.abort_percent is None:
        return False
    failed = counts.get(DeviceState.FAILED, 0)
    finished = failed + counts.get(DeviceState.SUCCEEDED, 0)
    if finished == 0 or finished < min(ABORT_MIN_OUTCOMES, total):
        return False
    return failed * 100 > rollout.abort_percent * finished


@attrs.frozen
class Start:
    """Start the next pending device now; the one after it not before `now + rollout.interval`."""


@attrs.frozen
class Wait:
    """Nothing to start now: wait for an outcome or a cancel, or until `until` (trio time; inf: no timer)."""

    until: float = math.inf


@attrs.frozen
class Abort:
    """The failures passed the threshold: stop the job (JobEvent.ABORT)."""


@attrs.frozen
class Finish:
    """Every device has its outcome: end the job with `event` (FINISH when running, SETTLE when stopping)."""

    event: JobEvent


Decision: TypeAlias = Start | Wait | Abort | Finish


def decide(
    state: JobState, rollout: Rollout, counts: Mapping[DeviceState, int], total: int, now: float, not_before: float
) -> Decision:
    """What a job's runner does next, given its state, its counts by device state and (trio time) `now` and when
    the next start may come (`not_before`). Must not be called for a final job."""
    assert state not in JOB_FINAL_STATES, state
    in_flight = counts.get(DeviceState.RUNNING, 0)
    pending = counts.get(DeviceState.PENDING, 0)
    if state is JobState.RUNNING:
        if abort_due(rollout, counts, total):
            return Abort()
        if pending and in_flight < rollout.max_in_flight:
            return Start() if now >= not_before else Wait(not_before)
        if not pending and not in_flight:
            return Finish(JobEvent.FINISH)
        return Wait()
    if not in_flight:  # cancelling, aborting: pending devices were already cancelled or skipped
        return Finish(JobEvent.SETTLE)
    return Wait()


class JobRecordDict(TypedDict):
    """The control channel's "job record" (docs/control.md, "Jobs"): `JobRecord.as_dict`."""

    job_id: str
    selector: str
    action: dict[str, JSON]
    rate: float
    max_in_flight: int
    abort_percent: float | None
    state: str
    created: float
    updated: float
    operator: str
    total: int
    counts: dict[str, int]
    reason: str


class DeviceOutcomeDict(TypedDict):
    """One device of a job as the `job` reply lists it."""

    device: str
    state: str
    started: float | None
    finished: float | None
    ref: str
    error: str


@attrs.frozen
class JobRecord:
    """A job as stored; replaced (never mutated) on each transition. `counts` is by device state."""

    job_id: str
    selector: str
    action: Action
    rollout: Rollout
    state: JobState
    created: float
    updated: float
    total: int
    counts: Mapping[DeviceState, int]
    operator: str = ""
    reason: str = ""  # why it stopped: who cancelled it, or the failures that aborted it

    @property
    def final(self) -> bool:
        return self.state in JOB_FINAL_STATES

    def after(self, event: JobEvent, now: float, reason: str = "") -> JobRecord:
        """The record after `event`; raises `IllegalTransition` if its state does not take it."""
        return attrs.evolve(self, state=next_job_state(self.state, event), updated=now, reason=reason or self.reason)

    def as_dict(self) -> JobRecordDict:
        return {
            "job_id": self.job_id,
            "selector": self.selector,
            "action": self.action.as_dict(),
            "rate": self.rollout.rate,
            "max_in_flight": self.rollout.max_in_flight,
            "abort_percent": self.rollout.abort_percent,
            "state": self.state.value,
            "created": self.created,
            "updated": self.updated,
            "operator": self.operator,
            "total": self.total,
            "counts": {s.value: self.counts.get(s, 0) for s in DEVICE_STATES},
            "reason": self.reason,
        }


@attrs.frozen
class DeviceOutcome:
    """One device in one job: its state, when it started and finished (Unix s), the action's reference (for a
    command: its id) and the error of a failure."""

    device: str
    state: DeviceState = DeviceState.PENDING
    started: float | None = None
    finished: float | None = None
    ref: str = ""
    error: str = ""

    @property
    def final(self) -> bool:
        return self.state in DEVICE_FINAL_STATES

    def after(self, event: DeviceEvent, now: float, *, ref: str | None = None, error: str = "") -> DeviceOutcome:
        """The outcome after `event`; raises `IllegalTransition` if its state does not take it."""
        state = next_device_state(self.state, event)
        started = now if event is DeviceEvent.START else self.started
        finished = now if state in DEVICE_FINAL_STATES else None
        return attrs.evolve(
            self, state=state, started=started, finished=finished, ref=self.ref if ref is None else ref, error=error
        )

    def as_dict(self) -> DeviceOutcomeDict:
        return {
            "device": self.device,
            "state": self.state.value,
            "started": self.started,
            "finished": self.finished,
            "ref": self.ref,
            "error": self.error,
        }
