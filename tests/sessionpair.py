"""Two pure session ends joined in memory (like h11's `ConnectionPair`): the protocol's rules without sockets or trio.

Nothing moves unless a test says so: `to_hub` carries what the device would write now, `to_device` what the hub
would; `now` is the hub's clock. The pair plays the drivers' part: new batches go straight into the "pipeline"
(`book.submitted`), and `make_durable` stands for the sink.
"""

from __future__ import annotations

from typing import Any

import attrs

from device_client.outbox import CommandLog, Outbox
from device_client.protocol import DEFAULT_LIMITS, Hello, Limits, Telemetry, Welcome, encode
from device_client.session import DeviceConnection, DeviceEvent, SessionEnd, SessionState, Welcomed
from hub.devices import HubConnection, HubEvent, Refused, Resent

DEVICE = "d1"
TS = 1_764_000_000_000


@attrs.define
class MemoryBook:
    """The device's sequence numbers on the hub side (what `hub.fleet.DeviceLedger` holds)."""

    durable: int = 0
    submitted: int = 0


def point(i: int = 0, **fields: Any) -> dict[str, Any]:
    """One point of measurement `m`, at `TS + i` milliseconds."""
    return {"measurement": "m", "ts": TS + i, "fields": fields or {"v": float(i)}, "tags": {}}


class SessionPair:
    """A `DeviceConnection` and a `HubConnection` joined in memory; a new hub end for every connection."""

    def __init__(
        self,
        *,
        hub_limits: Limits = DEFAULT_LIMITS,
        window: int = 4,
        max_errors: int = 10,
        max_message_bytes: int = 262_144,
        outbox: Outbox | None = None,
        compression: bool = True,
    ) -> None:
        self.outbox = Outbox() if outbox is None else outbox
        self.log = CommandLog()
        self.device = DeviceConnection(self.outbox, self.log, name=DEVICE)
        self.book = MemoryBook()
        self.inflight: list[int] = []
        self._hub_args: dict[str, Any] = {"window": window, "max_errors": max_errors, "compression": compression}
        self.hub_limits = hub_limits
        self.max_message_bytes = max_message_bytes
        self.hub = self._new_hub()
        self.now = 0.0
        self.epoch = 0
        self.for_device: list[str] = []  # frames the hub answered with at once (acks of resends, errors)

    def _new_hub(self) -> HubConnection:
        return HubConnection(self.hub_limits, **self._hub_args)

    def connect(self, hello: Hello | None = None) -> Welcome:
        """A new connection: hello, then welcome."""
        if self.hub.state is not SessionState.HELLO:
            self.hub = self._new_hub()
        text = self.device.connect(Hello() if hello is None else hello)
        assert isinstance(self.hub.receive(text, self.now), Hello)
        self.epoch += 1
        welcome = self.hub.welcome(
            DEVICE,
            self.epoch,
            self.book,
            self.inflight,
            ping_interval=10.0,
            max_message_bytes=self.max_message_bytes,
        )
        event = self.device.receive(welcome)
        assert isinstance(event, Welcomed), event
        return event.welcome

    def queue(self, n: int = 1, points: int = 1) -> list[int]:
        """`n` new batches in the outbox; their seqs."""
        return [self.outbox.add([point(i) for i in range(points)]) for _ in range(n)]

    def device_frames(self) -> list[str | bytes]:
        """Everything the device would write now (bytes: a compressed frame), each confirmed as written."""
        out: list[str | bytes] = []
        while True:
            frame = self.device.next_frame()
            if frame is None or isinstance(frame, SessionEnd):
                return out
            out.append(frame)
            self.device.frame_written()

    def to_hub(self, frames: list[str | bytes] | None = None) -> list[HubEvent]:
        """Carry `frames` (default: what the device would write now) to the hub, acting on each as its driver would."""
        events = []
        for text in self.device_frames() if frames is None else frames:
            event = self.hub.receive(text, self.now)
            if type(event) is Telemetry:
                assert not self.hub.window_full(), "the device sent past the window"
                self.hub.submitted(event.seq)
            elif isinstance(event, Resent) and event.ack is not None:
                self.for_device.append(event.ack)
            elif isinstance(event, Refused):
                if event.frame is not None:
                    self.for_device.append(event.frame)
                if event.resolve is not None:
                    self.hub.submitted(event.resolve)
            events.append(event)
        return events

    def make_durable(self, seq: int | None = None) -> None:
        """The sink wrote every batch up to `seq` (default: all submitted)."""
        self.book.durable = self.book.submitted if seq is None else seq

    def hub_frames(self) -> list[str]:
        """Everything the hub would write now: answers of its reader, then commands and acks of its outbound task."""
        out, self.for_device = self.for_device, []
        while (item := self.hub.next_outbound()) is not None:
            out.append(item if isinstance(item, str) else encode(item))
        return out

    def to_device(self, frames: list[str] | None = None) -> list[DeviceEvent]:
        """Carry `frames` (default: what the hub would write now) to the device."""
        return [self.device.receive(text) for text in (self.hub_frames() if frames is None else frames)]

    def drop(self) -> SessionEnd:
        """The connection is gone (no close frame) for both ends."""
        self.hub.connection_lost()
        return self.device.connection_lost()
