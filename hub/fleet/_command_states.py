"""The command state machine: its states, the events that move it, and the one table of legal transitions."""

################################################################
# The command state machine
################################################################
#
# Every command an operator sends follows one small machine. Each state is a value of `CommandState`; the strings
# are what the control channel, the `command` points and SQLite carry, so they never change.
#
#   queued --> sent --> delivered --> succeeded
#      |         |          |------> failed
#      |         |          '------> timed_out   (no result within `timeout` after delivery)
#      |         '-----------------> expired     (TTL passed before the device acknowledged it)
#      '---------------------------> expired / cancelled     (cancel: only while queued or sent)
#
# What moves a command is an event (`CommandEvent`): the device's session wrote the frame (SEND), the device
# acknowledged it (ACK) or answered (SUCCEED / FAIL), a timer ran out (EXPIRE before delivery, TIME_OUT after it),
# or an operator cancelled it (CANCEL). `TRANSITIONS` says, for each state, which events it accepts and where each
# one leads; an event a state does not accept is an error (`IllegalTransition`), never a silent no-op. The driver
# (hub/fleet/_commands.py) asks `allows()` first where an event may legitimately come too late, e.g. a second ack.
#
# Two details of the table are deliberate:
# - ACK is accepted while still queued: the device may acknowledge a frame before its session has reported it
#   written.
# - Only the delivery-side states have a TTL and can be cancelled; once the device has the command, only its
#   result or the timeout end it.
#
# Everything else here is derived from the table, so a new state or edge changes one line: the final states (no
# event leads out), the states in which the TTL runs, and which timer event applies in which state.

from __future__ import annotations

import enum
from collections.abc import Mapping

__all__ = [
    "FINAL_STATES",
    "STATES",
    "TIMER_EVENTS",
    "TRANSITIONS",
    "TTL_STATES",
    "CommandEvent",
    "CommandState",
    "IllegalTransition",
    "allows",
    "next_state",
]


class CommandState(enum.StrEnum):
    """Where a command is; the value is the wire and database spelling."""

    QUEUED = "queued"  # stored, waiting for the device to be online
    SENT = "sent"  # written to the device's connection
    DELIVERED = "delivered"  # the device acknowledged it
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"  # the TTL passed before delivery
    TIMED_OUT = "timed_out"  # no result within `timeout` after delivery
    CANCELLED = "cancelled"


class CommandEvent(enum.Enum):
    """What can happen to a command."""

    SEND = "send"  # the device's session wrote the command frame
    ACK = "ack"  # the device's command_ack
    SUCCEED = "succeed"  # the device's command_result, ok
    FAIL = "fail"  # the device's command_result, not ok
    EXPIRE = "expire"  # the TTL passed
    TIME_OUT = "time_out"  # `timeout` seconds passed since delivery
    CANCEL = "cancel"  # an operator's cancel_command


class IllegalTransition(Exception):
    """An event the command's state does not accept (a bug in the caller: check `allows` first)."""

    def __init__(self, state: CommandState, event: CommandEvent) -> None:
        super().__init__(f"a {state.value} command cannot take {event.value}")
        self.state = state
        self.event = event


_S = CommandState
_E = CommandEvent

#: state -> {event -> next state}: the whole machine.
TRANSITIONS: Mapping[CommandState, Mapping[CommandEvent, CommandState]] = {
    _S.QUEUED: {_E.SEND: _S.SENT, _E.ACK: _S.DELIVERED, _E.EXPIRE: _S.EXPIRED, _E.CANCEL: _S.CANCELLED},
    _S.SENT: {_E.ACK: _S.DELIVERED, _E.EXPIRE: _S.EXPIRED, _E.CANCEL: _S.CANCELLED},
    _S.DELIVERED: {_E.SUCCEED: _S.SUCCEEDED, _E.FAIL: _S.FAILED, _E.TIME_OUT: _S.TIMED_OUT},
    _S.SUCCEEDED: {},
    _S.FAILED: {},
    _S.EXPIRED: {},
    _S.TIMED_OUT: {},
    _S.CANCELLED: {},
}

#: Every state, in the order of the machine (as reports list them).
STATES: tuple[CommandState, ...] = tuple(CommandState)
#: States after which nothing changes.
FINAL_STATES: frozenset[CommandState] = frozenset(s for s, out in TRANSITIONS.items() if not out)
#: States in which the TTL runs (the command has not reached the device yet): `expires` matters.
TTL_STATES: frozenset[CommandState] = frozenset(s for s, out in TRANSITIONS.items() if _E.EXPIRE in out)
#: The event each unfinished state's timer fires: EXPIRE before delivery, TIME_OUT after it.
TIMER_EVENTS: Mapping[CommandState, CommandEvent] = {
    s: e for s, out in TRANSITIONS.items() for e in (_E.EXPIRE, _E.TIME_OUT) if e in out
}


def allows(state: CommandState, event: CommandEvent) -> bool:
    """Whether `event` moves a command in `state` (else it would raise `IllegalTransition`)."""
    return event in TRANSITIONS[state]


def next_state(state: CommandState, event: CommandEvent) -> CommandState:
    """The state after `event`; raises `IllegalTransition` if `state` does not accept it."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(state, event) from None
