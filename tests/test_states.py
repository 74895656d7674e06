"""The command and presence state machines as tables: every legal transition, illegal ones raise, derived sets."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from typing import Any

import pytest

from hub.fleet import CommandEvent, CommandState, PresenceEvent, PresenceState
from hub.fleet import _command_states as cs
from hub.fleet import _presence_states as ps

# The machines as docs/control.md and docs/protocol.md describe them, written out edge by edge.
COMMAND_EDGES = {
    ("queued", CommandEvent.SEND): "sent",
    ("queued", CommandEvent.ACK): "delivered",
    ("queued", CommandEvent.EXPIRE): "expired",
    ("queued", CommandEvent.CANCEL): "cancelled",
    ("sent", CommandEvent.ACK): "delivered",
    ("sent", CommandEvent.EXPIRE): "expired",
    ("sent", CommandEvent.CANCEL): "cancelled",
    ("delivered", CommandEvent.SUCCEED): "succeeded",
    ("delivered", CommandEvent.FAIL): "failed",
    ("delivered", CommandEvent.TIME_OUT): "timed_out",
}
PRESENCE_EDGES = {
    ("never", PresenceEvent.CONNECT): "online",
    ("online", PresenceEvent.CONNECT): "online",
    ("online", PresenceEvent.SILENT): "late",
    ("online", PresenceEvent.DISCONNECT): "offline",
    ("late", PresenceEvent.CONNECT): "online",
    ("late", PresenceEvent.DATA): "online",
    ("late", PresenceEvent.DISCONNECT): "offline",
    ("offline", PresenceEvent.CONNECT): "online",
}


def test_command_states_keep_their_wire_and_database_spelling() -> None:
    assert [s.value for s in cs.STATES] == [
        "queued",
        "sent",
        "delivered",
        "succeeded",
        "failed",
        "expired",
        "timed_out",
        "cancelled",
    ]
    assert CommandState("timed_out") is CommandState.TIMED_OUT
    assert CommandState.TIMED_OUT == "timed_out" and f"{CommandState.TIMED_OUT}" == "timed_out"
    assert {"timed_out": 1}[CommandState.TIMED_OUT] == 1  # same hash as the string: dicts keyed either way agree
    assert json.dumps({"state": CommandState.EXPIRED}) == '{"state": "expired"}'


@pytest.mark.parametrize(("state", "event"), list(COMMAND_EDGES))
def test_every_legal_command_transition(state: str, event: CommandEvent) -> None:
    assert cs.allows(CommandState(state), event)
    assert cs.next_state(CommandState(state), event) is CommandState(COMMAND_EDGES[state, event])


@pytest.mark.parametrize(
    ("state", "event"),
    [(s, e) for s, e in itertools.product(CommandState, CommandEvent) if (s.value, e) not in COMMAND_EDGES],
)
def test_every_other_command_transition_raises(state: CommandState, event: CommandEvent) -> None:
    assert not cs.allows(state, event)
    with pytest.raises(cs.IllegalTransition) as err:
        cs.next_state(state, event)
    assert (err.value.state, err.value.event) == (state, event)


def test_the_command_table_is_the_documented_machine() -> None:
    table = {(s.value, e): t.value for s, out in cs.TRANSITIONS.items() for e, t in out.items()}
    assert table == COMMAND_EDGES
    assert set(cs.TRANSITIONS) == set(CommandState)


def test_command_sets_derive_from_the_table() -> None:
    assert {s.value for s in cs.FINAL_STATES} == {"succeeded", "failed", "expired", "timed_out", "cancelled"}
    assert {s.value for s in cs.TTL_STATES} == {"queued", "sent"}
    assert cs.TIMER_EVENTS == {
        CommandState.QUEUED: CommandEvent.EXPIRE,
        CommandState.SENT: CommandEvent.EXPIRE,
        CommandState.DELIVERED: CommandEvent.TIME_OUT,
    }
    # Every unfinished command has exactly one timer, and a final one none.
    assert set(cs.TIMER_EVENTS) == set(CommandState) - cs.FINAL_STATES


def _reachable(transitions: Mapping[Any, Mapping[Any, Any]], start: Any) -> set[Any]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in transitions[todo.pop()].values():
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_command_state_is_reachable_and_every_command_can_finish() -> None:
    assert _reachable(cs.TRANSITIONS, CommandState.QUEUED) == set(CommandState)
    for state in CommandState:
        assert _reachable(cs.TRANSITIONS, state) & cs.FINAL_STATES


def test_presence_states_keep_their_wire_spelling() -> None:
    assert [s.value for s in ps.STATES] == ["online", "late", "offline", "never"]
    assert ps.SEEN_STATES == ("online", "late", "offline")
    assert {s.value for s in ps.CONNECTED_STATES} == {"online", "late"}
    assert ps.INITIAL_STATE is PresenceState.NEVER
    assert _reachable(ps.TRANSITIONS, ps.INITIAL_STATE) == set(PresenceState)


@pytest.mark.parametrize(("state", "event"), list(PRESENCE_EDGES))
def test_every_legal_presence_transition(state: str, event: PresenceEvent) -> None:
    assert ps.allows(PresenceState(state), event)
    assert ps.next_state(PresenceState(state), event) is PresenceState(PRESENCE_EDGES[state, event])


@pytest.mark.parametrize(
    ("state", "event"),
    [(s, e) for s, e in itertools.product(PresenceState, PresenceEvent) if (s.value, e) not in PRESENCE_EDGES],
)
def test_every_other_presence_transition_raises(state: PresenceState, event: PresenceEvent) -> None:
    assert not ps.allows(state, event)
    with pytest.raises(ps.IllegalTransition) as err:
        ps.next_state(state, event)
    assert (err.value.state, err.value.event) == (state, event)


def test_the_presence_table_is_the_documented_machine() -> None:
    table = {(s.value, e): t.value for s, out in ps.TRANSITIONS.items() for e, t in out.items()}
    assert table == PRESENCE_EDGES
    assert set(ps.TRANSITIONS) == set(PresenceState)
