"""Unit tests of the broadcaster and the per-subscription coalescing buffers (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest

from hub.fleet import Broadcaster, EventBuffer, Subscription, telemetry_event
from hub.fleet._subscriptions import plain_fields


def _drain(buffer: EventBuffer) -> list[Any]:
    out = []
    while len(buffer):
        out.append(buffer.pop())
    return out


def _point(measurement: str, ts: int, **fields: Any) -> dict[str, Any]:
    return {"measurement": measurement, "ts": ts, "fields": fields or {"v": 1.0}, "tags": {}}


class Wakes:
    """Counts the wake-up calls of one subscriber."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


# ---------------------------------------------------------------------------- EventBuffer


def test_buffer_keeps_order_of_distinct_keys() -> None:
    buf = EventBuffer(10)
    for i in range(5):
        buf.put(i, f"e{i}")
    assert len(buf) == 5
    assert _drain(buf) == ["e0", "e1", "e2", "e3", "e4"]
    assert (buf.dropped, buf.coalesced) == (0, 0)
    assert buf.take_notice() is None
    with pytest.raises(KeyError):
        buf.pop()


def test_newer_event_replaces_waiting_one_in_place() -> None:
    buf = EventBuffer(10)
    buf.put("a", 1)
    buf.put("b", 1)
    buf.put("a", 2)  # replaces a's waiting event, keeps a's place ahead of b
    buf.put("a", 3)
    assert _drain(buf) == [3, 1]
    assert (buf.dropped, buf.coalesced) == (0, 2)
    assert buf.take_notice() is None  # coalescing alone sends no notice
    buf.put("a", 4)  # a was delivered: a fresh event, not a coalesced one
    assert buf.coalesced == 2
    assert _drain(buf) == [4]


def test_full_buffer_drops_the_oldest() -> None:
    buf = EventBuffer(3)
    for i in range(5):
        buf.put(i, i)
    assert len(buf) == 3
    assert buf.dropped == 2
    assert _drain(buf) == [2, 3, 4]


def test_notice_is_cumulative_and_only_after_new_drops() -> None:
    buf = EventBuffer(2)
    buf.put("a", 1)
    buf.put("a", 2)  # coalesced
    buf.put("b", 1)
    buf.put("c", 1)  # drops a
    assert buf.take_notice() == (1, 1)
    assert buf.take_notice() is None
    buf.put("c", 2)  # coalesced
    assert buf.take_notice() is None
    buf.put("d", 1)  # drops b
    buf.put("e", 1)  # drops c
    assert buf.take_notice() == (3, 2)
    assert _drain(buf) == [1, 1]


def test_buffer_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        EventBuffer(0)


def test_capacity_one() -> None:
    buf = EventBuffer(1)
    for i in range(100):
        buf.put(i % 7, i)
    assert len(buf) == 1
    assert buf.dropped + buf.coalesced == 99
    assert _drain(buf) == [99]


# ---------------------------------------------------------------------------- events


def test_plain_fields_unwraps_explicit_ints() -> None:
    fields = {"t": 20.5, "n": {"int": 7}, "ok": True, "s": "x", "f": 3}
    assert plain_fields(fields) == {"t": 20.5, "n": 7, "ok": True, "s": "x", "f": 3}
    assert fields["n"] == {"int": 7}  # the point itself is untouched
    same = {"t": 1.0}
    assert plain_fields(same) is same  # nothing to unwrap: no copy


def test_telemetry_event_shape() -> None:
    point = {"measurement": "env", "ts": 5, "fields": {"c": {"int": 2}}, "tags": {"room": "a"}}
    assert telemetry_event("d1", point) == {
        "device": "d1",
        "measurement": "env",
        "ts": 5,
        "fields": {"c": 2},
        "tags": {"room": "a"},
    }
    assert telemetry_event("d1", {"measurement": "m", "ts": 1, "fields": {"x": 1.0}})["tags"] == {}


# ---------------------------------------------------------------------------- Broadcaster


def test_no_subscribers_no_work() -> None:
    b = Broadcaster()
    assert not b.has_telemetry_subscribers("d1")
    b.telemetry("d1", [_point("m", 1)])
    b.presence({"name": "d1", "state": "online"})
    b.command({"command_id": "c-1", "device": "d1", "state": "queued"})
    assert b.subscriptions == 0


def test_telemetry_all_and_filtered() -> None:
    b = Broadcaster(buffer=100)
    wake_all, wake_d1 = Wakes(), Wakes()
    everything = b.subscribe("telemetry", None, wake_all)
    only_d1 = b.subscribe("telemetry", ["d1"], wake_d1)
    assert everything.id != only_d1.id
    assert b.has_telemetry_subscribers("d1") and b.has_telemetry_subscribers("d2")

    b.telemetry("d1", [_point("env", 1), _point("power", 1)])
    b.telemetry("d2", [_point("env", 2)])
    assert (wake_all.count, wake_d1.count) == (2, 1)
    assert [everything.render(i) for i in _drain(everything.buffer)] == [
        telemetry_event("d1", _point("env", 1)),
        telemetry_event("d1", _point("power", 1)),
        telemetry_event("d2", _point("env", 2)),
    ]
    assert [only_d1.render(i)["measurement"] for i in _drain(only_d1.buffer)] == ["env", "power"]

    b.unsubscribe(everything)
    assert b.has_telemetry_subscribers("d1") and not b.has_telemetry_subscribers("d2")
    b.unsubscribe(only_d1)
    b.unsubscribe(only_d1)  # idempotent
    assert not b.has_telemetry_subscribers("d1")
    assert b.subscriptions == 0
    assert not everything.active
    b.telemetry("d1", [_point("env", 3)])
    assert len(only_d1.buffer) == 0 and wake_d1.count == 1


def test_telemetry_coalesces_by_device_and_measurement() -> None:
    b = Broadcaster(buffer=100)
    sub = b.subscribe("telemetry", None, Wakes())
    b.telemetry("d1", [_point("env", ts) for ts in range(1, 51)])  # 50 points, one series
    b.telemetry("d2", [_point("env", 7)])
    events = [sub.render(i) for i in _drain(sub.buffer)]
    assert [(e["device"], e["ts"]) for e in events] == [("d1", 50), ("d2", 7)]
    assert (sub.buffer.coalesced, sub.buffer.dropped) == (49, 0)
    assert b.totals() == {"dropped": 0, "coalesced": 49}


def test_slow_subscriber_loses_only_its_own_events() -> None:
    b = Broadcaster()
    slow = b.subscribe("telemetry", None, Wakes(), capacity=5)
    fast = b.subscribe("telemetry", None, Wakes(), capacity=1000)
    for batch in range(10):
        b.telemetry("d1", [_point(f"m{i}", batch) for i in range(20)])  # 20 series
        _drain(fast.buffer)  # the fast one keeps up
    assert len(slow.buffer) == 5
    assert slow.buffer.dropped == 195
    assert fast.buffer.dropped == 0
    assert slow.buffer.take_notice() == (195, 0)
    # what is left is the newest of what was published
    assert [slow.render(i)["measurement"] for i in _drain(slow.buffer)] == ["m15", "m16", "m17", "m18", "m19"]


def test_presence_coalesces_by_device() -> None:
    b = Broadcaster()
    wake = Wakes()
    sub = b.subscribe("presence", None, wake)
    only = b.subscribe("presence", ["d2"], Wakes())
    b.presence({"name": "d1", "state": "online"})
    b.presence({"name": "d2", "state": "online"})
    b.presence({"name": "d1", "state": "offline"})
    assert wake.count == 3
    assert _drain(sub.buffer) == [{"name": "d1", "state": "offline"}, {"name": "d2", "state": "online"}]
    assert _drain(only.buffer) == [{"name": "d2", "state": "online"}]


def test_commands_coalesce_by_id_and_filter_by_device() -> None:
    b = Broadcaster()
    sub = b.subscribe("commands", None, Wakes())
    d2 = b.subscribe("commands", ["d2"], Wakes())
    b.command({"command_id": "c-1", "device": "d1", "state": "queued"})
    b.command({"command_id": "c-2", "device": "d2", "state": "queued"})
    b.command({"command_id": "c-1", "device": "d1", "state": "sent"})
    assert [(r["command_id"], r["state"]) for r in _drain(sub.buffer)] == [("c-1", "sent"), ("c-2", "queued")]
    assert [r["command_id"] for r in _drain(d2.buffer)] == ["c-2"]


def test_has_command_subscribers_follows_the_command_subscriptions() -> None:
    b = Broadcaster()
    tele = b.subscribe("telemetry", None, Wakes())
    assert not b.has_command_subscribers()  # the hub then builds no record dict for each transition
    cmds = b.subscribe("commands", ["d2"], Wakes())
    assert b.has_command_subscribers()
    b.unsubscribe(cmds)
    b.unsubscribe(tele)
    assert not b.has_command_subscribers()


def test_topics_do_not_mix() -> None:
    b = Broadcaster()
    tele = b.subscribe("telemetry", None, Wakes())
    pres = b.subscribe("presence", None, Wakes())
    cmds = b.subscribe("commands", None, Wakes())
    b.presence({"name": "d1", "state": "online"})
    assert (len(tele.buffer), len(pres.buffer), len(cmds.buffer)) == (0, 1, 0)
    b.unsubscribe(pres)
    b.presence({"name": "d1", "state": "offline"})
    assert b.subscriptions == 2


def test_unknown_topic_refused() -> None:
    with pytest.raises(ValueError):
        Broadcaster().subscribe("weather", None, Wakes())
    with pytest.raises(ValueError):
        Subscription(1, "weather", None, 10, Wakes())
