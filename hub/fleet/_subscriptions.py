"""Live subscriptions of control sessions: a broadcaster and per-subscription coalescing buffers."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Generic, TypeAlias, TypedDict, TypeVar

from device_client.protocol import FieldValue, Point
from hub.control_codes import TOPICS as CONTROL_TOPICS

if TYPE_CHECKING:
    from hub.fleet._command_store import CommandRecordDict
    from hub.fleet._jobs import JobRecord, JobRecordDict
    from hub.fleet._summary import DeviceSummary
    from hub.fleet._twins import TwinDict

__all__ = [
    "TOPICS",
    "Broadcaster",
    "EventBuffer",
    "Subscription",
    "SubscriptionEvent",
    "SubscriptionItem",
    "TelemetryEvent",
    "plain_fields",
    "telemetry_event",
]

#: The topics a control session may subscribe to.
TOPICS = CONTROL_TOPICS

#: Events a subscription buffers by default (`control.buffer`).
DEFAULT_BUFFER = 1000

_T = TypeVar("_T")


class TelemetryEvent(TypedDict):
    """The event of one telemetry point (docs/control.md), integers plain."""

    device: str
    measurement: str
    ts: int
    fields: dict[str, FieldValue]
    tags: dict[str, str]


#: What a subscription buffers: ``(device, point)`` for telemetry and a `JobRecord` for jobs (their events are built
#: when sent), else the event.
SubscriptionItem: TypeAlias = "tuple[str, Point] | DeviceSummary | CommandRecordDict | TwinDict | JobRecord"
#: What a subscription pushes: a telemetry event, a device summary, a command record, a twin or a job record.
SubscriptionEvent: TypeAlias = "TelemetryEvent | DeviceSummary | CommandRecordDict | TwinDict | JobRecordDict"


class EventBuffer(Generic[_T]):
    """A bounded buffer of pending events, one per key, oldest first.

    `put` is O(1) and never blocks: an event whose key is already waiting replaces it in place
    (counted in `coalesced`); when the buffer is full of distinct keys, the oldest waiting
    event is dropped (counted in `dropped`). Both counters are cumulative.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.dropped = 0
        self.coalesced = 0
        self._reported = 0
        self._items: OrderedDict[Hashable, _T] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: Hashable, item: _T) -> None:
        """Add `item` under `key`: replace a waiting item of the same key, or drop the oldest if full."""
        items = self._items
        if key in items:
            items[key] = item  # keeps its place in the queue: a busy key cannot starve the others
            self.coalesced += 1
            return
        if len(items) >= self.capacity:
            items.popitem(last=False)
            self.dropped += 1
        items[key] = item

    def pop(self) -> _T:
        """The oldest waiting item (raises KeyError when empty)."""
        return self._items.popitem(last=False)[1]

    def take_notice(self) -> tuple[int, int] | None:
        """``(dropped, coalesced)`` if events were dropped since the last notice, else None."""
        if self.dropped == self._reported:
            return None
        self._reported = self.dropped
        return self.dropped, self.coalesced


def plain_fields(fields: dict[str, FieldValue]) -> dict[str, FieldValue]:
    """Field values as operators see them: an explicit integer ``{"int": n}`` becomes plain ``n``."""
    if not any(type(v) is dict for v in fields.values()):
        return fields
    return {k: v["int"] if type(v) is dict else v for k, v in fields.items()}


def telemetry_event(device: str, point: Point) -> TelemetryEvent:
    """The event of one telemetry point: ``{"device", "measurement", "ts", "fields", "tags"}``."""
    return {
        "device": device,
        "measurement": point["measurement"],
        "ts": point["ts"],
        "fields": plain_fields(point["fields"]),
        "tags": point.get("tags") or {},
    }


class Subscription:
    """One subscription of one control session: a topic, an optional device filter, a buffer.

    `notify` is the owning session's wake-up call (sync, O(1)); its sender drains `buffer`
    and turns each item into an event with `render`.
    """

    def __init__(
        self,
        sub_id: int,
        topic: str,
        devices: frozenset[str] | None,
        capacity: int,
        notify: Callable[[], None],
        *,
        relay: bool = False,
    ) -> None:
        if topic not in TOPICS:
            raise ValueError(f"unknown topic {topic!r}")
        self.id = sub_id
        self.topic = topic
        self.devices = devices
        self.buffer: EventBuffer[SubscriptionItem] = EventBuffer(capacity)
        self.notify = notify
        self.active = True
        self.relay = relay  # the cluster's: forwards telemetry other hubs watch (hub.cluster)

    def render(self, item: SubscriptionItem) -> SubscriptionEvent:
        """The event for a buffered item (telemetry items are ``(device, point)``, others are ready dicts)."""
        if isinstance(item, tuple):  # only telemetry items are tuples
            device, point = item
            return telemetry_event(device, point)
        if not isinstance(item, dict):  # only job items are records
            return item.as_dict()
        return item

    def wants(self, device: str) -> bool:
        """Whether events of `device` belong to this subscription."""
        return self.devices is None or device in self.devices


class Broadcaster:
    """Fans hub events out to control-channel subscribers; every publishing method is sync and never blocks.

    Publishing costs O(1) per event and subscriber: the event goes into each matching
    subscription's `EventBuffer` and the owning session is woken; its own sender task writes
    to the socket, so a slow client only ever loses its own events.
    """

    def __init__(self, buffer: int = DEFAULT_BUFFER) -> None:
        self.buffer = buffer
        self._next_id = 1
        self._subs: dict[int, Subscription] = {}
        self._telemetry_all: dict[int, Subscription] = {}
        self._telemetry_by_device: dict[str, dict[int, Subscription]] = {}
        self._presence: dict[int, Subscription] = {}
        self._commands: dict[int, Subscription] = {}
        self._twins: dict[int, Subscription] = {}
        self._jobs: dict[int, Subscription] = {}
        self._relays = 0  # relay subscriptions among the telemetry ones
        #: Called when the devices this hub's operators watch change (the cluster tells the other hubs).
        self.on_watch_change: Callable[[], None] | None = None

    # ------------------------------------------------------------------ subscribers

    def subscribe(
        self,
        topic: str,
        devices: Iterable[str] | None,
        notify: Callable[[], None],
        *,
        capacity: int | None = None,
        relay: bool = False,
    ) -> Subscription:
        """A new subscription to `topic` (for `devices`, or all when None); its id is unique in this hub.

        `relay`: the cluster's subscription to the telemetry other hubs watch; it gets no points that came from the
        bus and does not count as watching."""
        sub = Subscription(
            self._next_id,
            topic,
            None if devices is None else frozenset(devices),
            capacity or self.buffer,
            notify,
            relay=relay,
        )
        self._next_id += 1
        self._subs[sub.id] = sub
        if topic == "telemetry":
            if sub.devices is None:
                self._telemetry_all[sub.id] = sub
            else:
                for device in sub.devices:
                    self._telemetry_by_device.setdefault(device, {})[sub.id] = sub
            self._watch_changed(sub)
        elif topic == "presence":
            self._presence[sub.id] = sub
        elif topic == "twin":
            self._twins[sub.id] = sub
        elif topic == "jobs":
            self._jobs[sub.id] = sub
        else:
            self._commands[sub.id] = sub
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop delivering to `sub` (idempotent); its waiting events are discarded."""
        sub.active = False
        if self._subs.pop(sub.id, None) is None:
            return
        self._telemetry_all.pop(sub.id, None)
        self._presence.pop(sub.id, None)
        self._commands.pop(sub.id, None)
        self._twins.pop(sub.id, None)
        self._jobs.pop(sub.id, None)
        if sub.topic == "telemetry" and sub.devices is not None:
            for device in sub.devices:
                by_id = self._telemetry_by_device.get(device)
                if by_id is not None:
                    by_id.pop(sub.id, None)
                    if not by_id:
                        del self._telemetry_by_device[device]
        if sub.topic == "telemetry":
            self._watch_changed(sub, -1)

    def _watch_changed(self, sub: Subscription, sign: int = 1) -> None:
        if sub.relay:
            self._relays += sign
        elif self.on_watch_change is not None:
            self.on_watch_change()

    def watched(self) -> frozenset[str] | None:
        """The devices whose telemetry this hub's operators watch (None: all of them)."""
        if any(not sub.relay for sub in self._telemetry_all.values()):
            return None
        return frozenset(
            device for device, subs in self._telemetry_by_device.items() if any(not sub.relay for sub in subs.values())
        )

    @property
    def subscriptions(self) -> int:
        """Operators' subscriptions open in the whole hub (the cluster's relay is not one)."""
        return len(self._subs) - self._relays

    def totals(self) -> dict[str, int]:
        """Events dropped and coalesced so far over the open subscriptions."""
        subs = self._subs.values()
        return {
            "dropped": sum(s.buffer.dropped for s in subs),
            "coalesced": sum(s.buffer.coalesced for s in subs),
        }

    # ------------------------------------------------------------------ publishers

    def has_telemetry_subscribers(self, device: str) -> bool:
        """Whether anyone watches this device's telemetry (so the caller can skip building events)."""
        return bool(self._telemetry_all) or device in self._telemetry_by_device

    def telemetry(self, device: str, points: list[Point], *, relayed: bool = False) -> None:
        """Points just accepted from `device` (validated dicts; they are kept, never mutated); `relayed`: points
        another hub accepted (they go to no relay subscription)."""
        subs = list(self._telemetry_all.values())
        by_device = self._telemetry_by_device.get(device)
        if by_device:
            subs.extend(by_device.values())
        for sub in subs:
            if relayed and sub.relay:
                continue
            put = sub.buffer.put
            for point in points:
                put((device, point["measurement"]), (device, point))
            sub.notify()

    def has_presence_subscribers(self) -> bool:
        """Whether any subscription wants presence events (building a summary costs a registry read)."""
        return bool(self._presence)

    def presence(self, summary: DeviceSummary) -> None:
        """A device summary after a presence change (coalesced per device)."""
        device = summary["name"]
        for sub in self._presence.values():
            if sub.wants(device):
                sub.buffer.put(device, summary)
                sub.notify()

    def has_command_subscribers(self) -> bool:
        """Whether any subscription wants command events (so the caller can skip building them)."""
        return bool(self._commands)

    def command(self, record: CommandRecordDict) -> None:
        """A command record after a state change (coalesced per command id)."""
        device = record["device"]
        for sub in self._commands.values():
            if sub.wants(device):
                sub.buffer.put(record["command_id"], record)
                sub.notify()

    def has_twin_subscribers(self) -> bool:
        """Whether any subscription wants twin events (so the caller can skip building them)."""
        return bool(self._twins)

    def twin(self, twin: TwinDict) -> None:
        """A device's twin after a change (coalesced per device)."""
        device = twin["device"]
        for sub in self._twins.values():
            if sub.wants(device):
                sub.buffer.put(("twin", device), twin)
                sub.notify()

    def job(self, record: JobRecord) -> None:
        """A job record after a change of its state or counts (coalesced per job id; a job is not any one device's,
        so a subscription's device filter does not apply)."""
        for sub in self._jobs.values():
            sub.buffer.put(record.job_id, record)
            sub.notify()
