"""The messages hubs send each other over the bus (Redis pub/sub): pure values, encoded as JSON text.

Two kinds of channel: the **broadcast** channel every hub reads (presence, command records, telemetry of watched
devices, watch lists changed, revocations, twin changes) and each hub's **direct** channel (command offers for a
device it holds, the device's answers relayed to the command's owner, calls and their replies). Every message is one
JSON object with its kind in ``"k"``; `decode` checks the kind and the types of the fields a receiver relies on and
raises `BadMessage` otherwise (a hub of another version, or anything else on the channel, is logged and skipped).
"""

from __future__ import annotations

import enum
from typing import Any, TypeAlias

import orjson

__all__ = [
    "REQUIRED",
    "BadMessage",
    "Kind",
    "Message",
    "decode",
    "encode",
]

#: A decoded message: a JSON object (its fields checked by `decode` for its kind).
Message: TypeAlias = dict[str, Any]


class Kind(enum.StrEnum):
    """What a bus message says."""

    # broadcast
    PRESENCE = "presence"  # hub, device, epoch, state, summary: a device's presence changed on `hub`
    COMMAND = "command"  # hub, record: a command record changed on its owner `hub`
    TELEMETRY = "telemetry"  # hub, device, points: points of a device someone watches
    WATCH = "watch"  # hub: the devices `hub` watches changed (read them from the store)
    REVOKE = "revoke"  # what ("device" or "operator"), name: close its sessions now
    TWIN = "twin"  # hub, device, side, version, patch, record: a device twin changed on `hub`
    # direct
    OFFER = "offer"  # origin, device, command: send this command to the device you hold
    RELAY = "relay"  # device, id, event ("sent", "ack", "result"), ok, result, error: the device's answer
    CALL = "call"  # origin, rid, op, args: run `op` for a hub that asked (its reply goes to `origin`)
    REPLY = "reply"  # rid, ok, value or code and detail


_STR, _INT, _DICT, _LIST, _BOOL = str, int, dict, list, bool
#: The fields each kind must have, with their types.
REQUIRED: dict[Kind, dict[str, type]] = {
    Kind.PRESENCE: {"hub": _STR, "device": _STR, "epoch": _INT, "state": _STR, "summary": _DICT},
    Kind.COMMAND: {"hub": _STR, "record": _DICT},
    Kind.TELEMETRY: {"hub": _STR, "device": _STR, "points": _LIST},
    Kind.WATCH: {"hub": _STR},
    Kind.REVOKE: {"what": _STR, "name": _STR},
    Kind.TWIN: {"hub": _STR, "device": _STR, "side": _STR, "version": _INT, "patch": _DICT, "record": _DICT},
    Kind.OFFER: {"origin": _STR, "device": _STR, "command": _DICT},
    Kind.RELAY: {"device": _STR, "id": _STR, "event": _STR},
    Kind.CALL: {"origin": _STR, "rid": _INT, "op": _STR, "args": _DICT},
    Kind.REPLY: {"rid": _INT, "ok": _BOOL},
}


class BadMessage(ValueError):
    """Text on a bus channel that is not a message this hub understands."""


def encode(kind: Kind, **fields: Any) -> str:
    """The JSON text of a message of `kind` with `fields`."""
    return orjson.dumps({"k": kind.value, **fields}).decode()


def decode(text: str | bytes) -> tuple[Kind, Message]:
    """The kind and fields of a bus message; raises `BadMessage` if it is not one (or lacks a field)."""
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BadMessage(f"not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise BadMessage("not a JSON object")
    try:
        kind = Kind(str(msg.get("k")))
    except ValueError:
        raise BadMessage(f"unknown kind {msg.get('k')!r}") from None
    for name, typ in REQUIRED[kind].items():
        value = msg.get(name)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise BadMessage(f"{kind} message without a valid {name!r}")
    return kind, msg
