"""The job state machines: a job's states and a device's outcome in a job, each with its one transition table."""

################################################################
# The job state machines
################################################################
#
# A job applies one action (a command, later a desired-state patch) to every device its selector matched when it
# was created. Two small machines describe it; the strings are what the control channel, REST and SQLite carry, so
# they never change.
#
# The job:
#
#   running --FINISH--> completed      (every device has an outcome)
#      |------CANCEL--> cancelling --SETTLE--> cancelled
#      '------ABORT---> aborting ----SETTLE--> aborted      (more than abort_percent % of the outcomes failed)
#
# cancelling and aborting start no device; they last until the devices in flight have an outcome (the runner asks
# the action to stop them: a command still queued or sent is cancelled, one already delivered runs to its end).
#
# A device of a job:
#
#   pending --START--> running --SUCCEED--> succeeded
#      |                  |------FAIL-----> failed
#      |                  '------CANCEL---> cancelled   (its run was stopped by the job's cancel or abort)
#      |------CANCEL--> cancelled     (the job was cancelled before it started)
#      '------SKIP----> skipped       (the job was aborted before it started)
#
# An event a state does not accept raises `IllegalTransition`; the driver (_job_runner.py) asks `allows()` first
# where an event may come too late. Final states are derived from the tables.

from __future__ import annotations

import enum
from collections.abc import Mapping

__all__ = [
    "DEVICE_FINAL_STATES",
    "DEVICE_STATES",
    "DEVICE_TRANSITIONS",
    "JOB_ACTIVE_STATES",
    "JOB_FINAL_STATES",
    "JOB_STATES",
    "JOB_TRANSITIONS",
    "DeviceEvent",
    "DeviceState",
    "IllegalTransition",
    "JobEvent",
    "JobState",
    "device_allows",
    "job_allows",
    "next_device_state",
    "next_job_state",
]


class JobState(enum.StrEnum):
    """Where a job is; the value is the wire and database spelling."""

    RUNNING = "running"  # starting devices, at its rate and in-flight limit
    CANCELLING = "cancelling"  # cancelled by an operator: waiting for the devices in flight
    ABORTING = "aborting"  # past its abort threshold: waiting for the devices in flight
    COMPLETED = "completed"  # every device has an outcome
    CANCELLED = "cancelled"
    ABORTED = "aborted"


class JobEvent(enum.Enum):
    """What can happen to a job."""

    FINISH = "finish"  # the last device has its outcome
    CANCEL = "cancel"  # an operator's job_cancel
    ABORT = "abort"  # the failed outcomes passed the threshold
    SETTLE = "settle"  # the last device in flight of a stopping job has its outcome


class DeviceState(enum.StrEnum):
    """A device's outcome in a job; the value is the wire and database spelling."""

    PENDING = "pending"  # not started yet
    RUNNING = "running"  # its action is in flight (for a command: submitted, not final)
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"  # the job was cancelled (or aborted) before this device finished
    SKIPPED = "skipped"  # the job was aborted before this device started


class DeviceEvent(enum.Enum):
    """What can happen to a device of a job."""

    START = "start"
    SUCCEED = "succeed"
    FAIL = "fail"
    CANCEL = "cancel"
    SKIP = "skip"


class IllegalTransition(Exception):
    """An event a job's or device's state does not accept (a bug in the caller: check `*_allows` first)."""

    def __init__(self, state: enum.Enum, event: enum.Enum) -> None:
        super().__init__(f"a {state.value} job or device cannot take {event.value}")
        self.state = state
        self.event = event


_J = JobState
_JE = JobEvent
_D = DeviceState
_DE = DeviceEvent

#: job state -> {event -> next state}: the whole job machine.
JOB_TRANSITIONS: Mapping[JobState, Mapping[JobEvent, JobState]] = {
    _J.RUNNING: {_JE.FINISH: _J.COMPLETED, _JE.CANCEL: _J.CANCELLING, _JE.ABORT: _J.ABORTING},
    _J.CANCELLING: {_JE.SETTLE: _J.CANCELLED},
    _J.ABORTING: {_JE.SETTLE: _J.ABORTED},
    _J.COMPLETED: {},
    _J.CANCELLED: {},
    _J.ABORTED: {},
}

#: device state -> {event -> next state}: the whole per-device machine.
DEVICE_TRANSITIONS: Mapping[DeviceState, Mapping[DeviceEvent, DeviceState]] = {
    _D.PENDING: {_DE.START: _D.RUNNING, _DE.CANCEL: _D.CANCELLED, _DE.SKIP: _D.SKIPPED},
    _D.RUNNING: {_DE.SUCCEED: _D.SUCCEEDED, _DE.FAIL: _D.FAILED, _DE.CANCEL: _D.CANCELLED},
    _D.SUCCEEDED: {},
    _D.FAILED: {},
    _D.CANCELLED: {},
    _D.SKIPPED: {},
}

#: Every job state, in the order of the machine.
JOB_STATES: tuple[JobState, ...] = tuple(JobState)
#: Job states after which nothing changes.
JOB_FINAL_STATES: frozenset[JobState] = frozenset(s for s, out in JOB_TRANSITIONS.items() if not out)
#: Job states the runner drives (and resumes after a restart).
JOB_ACTIVE_STATES: frozenset[JobState] = frozenset(JobState) - JOB_FINAL_STATES
#: Every device state, in the order of the machine (as progress counts list them).
DEVICE_STATES: tuple[DeviceState, ...] = tuple(DeviceState)
#: Device states after which nothing changes: the device has its outcome.
DEVICE_FINAL_STATES: frozenset[DeviceState] = frozenset(s for s, out in DEVICE_TRANSITIONS.items() if not out)


def job_allows(state: JobState, event: JobEvent) -> bool:
    """Whether `event` moves a job in `state`."""
    return event in JOB_TRANSITIONS[state]


def next_job_state(state: JobState, event: JobEvent) -> JobState:
    """The job's state after `event`; raises `IllegalTransition` if `state` does not accept it."""
    try:
        return JOB_TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(state, event) from None


def device_allows(state: DeviceState, event: DeviceEvent) -> bool:
    """Whether `event` moves a device of a job in `state`."""
    return event in DEVICE_TRANSITIONS[state]


def next_device_state(state: DeviceState, event: DeviceEvent) -> DeviceState:
    """The device's state after `event`; raises `IllegalTransition` if `state` does not accept it."""
    try:
        return DEVICE_TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(state, event) from None
