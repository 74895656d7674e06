"""The presence state machine of a device: its states, the events that move it, and the one transition table."""

################################################################
# The presence state machine
################################################################
#
# The hub knows each device as one of four states (`PresenceState`); the strings are what the control channel
# shows in device summaries, so they never change.
#
#                      CONNECT (a newer session)
#                         .----.
#                         v    |
#   never --CONNECT--> online ------SILENT------> late
#                       ^  |  <--DATA, CONNECT--'  |
#               CONNECT |  | DISCONNECT            | DISCONNECT
#                       |  v                       |
#                     offline <--------------------'
#
# - never: registered, but not connected since the hub started (there is no status for it yet).
# - online: a session is open (CONNECT, which a newer session of an online device repeats).
# - late: connected, but no telemetry within the interval the device declared x `late_factor` + `late_grace`
#   (SILENT); its next telemetry (DATA) or a new session (CONNECT) makes it online again.
# - offline: the session ended (DISCONNECT), with a reason.
#
# `TRANSITIONS` says which events each state accepts and where they lead; an event a state does not accept raises
# `IllegalTransition`. The driver (_presence.py) asks `allows()` first for the events that are often moot: DATA
# from a device that is online anyway, DISCONNECT of a session already offline, SILENT of a device already late.
# Which session an event belongs to (the epoch that orders them) is the driver's check, not the table's.

from __future__ import annotations

import enum
from collections.abc import Mapping

__all__ = [
    "CONNECTED_STATES",
    "INITIAL_STATE",
    "SEEN_STATES",
    "STATES",
    "TRANSITIONS",
    "IllegalTransition",
    "PresenceEvent",
    "PresenceState",
    "allows",
    "next_state",
]


class PresenceState(enum.StrEnum):
    """Where a device is; the value is the wire spelling."""

    ONLINE = "online"
    LATE = "late"
    OFFLINE = "offline"
    NEVER = "never"


class PresenceEvent(enum.Enum):
    """What can happen to a device's presence."""

    CONNECT = "connect"  # a session finished its handshake
    DATA = "data"  # telemetry arrived
    SILENT = "silent"  # no telemetry within the declared interval (x factor + grace)
    DISCONNECT = "disconnect"  # the session ended


class IllegalTransition(Exception):
    """An event the device's presence state does not accept (a bug in the caller: check `allows` first)."""

    def __init__(self, state: PresenceState, event: PresenceEvent) -> None:
        super().__init__(f"a device {state.value} cannot take {event.value}")
        self.state = state
        self.event = event


_S = PresenceState
_E = PresenceEvent

#: state -> {event -> next state}: the whole machine.
TRANSITIONS: Mapping[PresenceState, Mapping[PresenceEvent, PresenceState]] = {
    _S.NEVER: {_E.CONNECT: _S.ONLINE},
    _S.ONLINE: {_E.CONNECT: _S.ONLINE, _E.SILENT: _S.LATE, _E.DISCONNECT: _S.OFFLINE},
    _S.LATE: {_E.CONNECT: _S.ONLINE, _E.DATA: _S.ONLINE, _E.DISCONNECT: _S.OFFLINE},
    _S.OFFLINE: {_E.CONNECT: _S.ONLINE},
}

#: The state of a device the hub has not seen since it started.
INITIAL_STATE = _S.NEVER
#: Every state, in the order reports list them.
STATES: tuple[PresenceState, ...] = tuple(PresenceState)
#: The states a seen device can be in (every state an event leads to), in the order reports list them.
SEEN_STATES: tuple[PresenceState, ...] = tuple(
    s for s in PresenceState if any(s in out.values() for out in TRANSITIONS.values())
)
#: States with a session open (a device that can disconnect).
CONNECTED_STATES: frozenset[PresenceState] = frozenset(s for s, out in TRANSITIONS.items() if _E.DISCONNECT in out)


def allows(state: PresenceState, event: PresenceEvent) -> bool:
    """Whether `event` moves a device in `state` (else it would raise `IllegalTransition`)."""
    return event in TRANSITIONS[state]


def next_state(state: PresenceState, event: PresenceEvent) -> PresenceState:
    """The state after `event`; raises `IllegalTransition` if `state` does not accept it."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(state, event) from None
