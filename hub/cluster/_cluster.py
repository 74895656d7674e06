"""One hub's part in a cluster of hubs on Redis: presence, commands, subscriptions and revocations across hubs.

The hub's own parts stay what they are for one process (Presence, CommandService, Broadcaster, the endpoints);
`Cluster` plugs into their seams:

- **Presence**: every transition of a session here is claimed in Redis first (`Presence.claim`, batched, in order);
  a claim refused because a newer session of the device started on another hub drops the transition (no
  "offline" point or event for the replaced session). Other hubs' transitions arrive as events: a newer session
  elsewhere closes this hub's older one (close code 4000, "replaced") and goes to this hub's presence subscribers.
  The devices of a hub that stopped beating are offline with reason ``hub_lost`` (the heartbeat in `Bus`).
- **Commands** stay owned, stored and timed by the hub that accepted them. A device whose session is on another
  hub gets its commands through that hub (an offer on its direct channel); the device's answers come back as
  relays and drive the owner's state machine. Records are mirrored in Redis for reads (`get`, `list`) from any
  hub, and every change is broadcast, so command subscriptions and `wait` work from any hub; a cancel is a call
  to the owner.
- **Telemetry** crosses the bus only for devices an operator on another hub watches: each hub writes the devices
  its subscriptions watch (``P:watch:<hub>``), and a relay subscription on every hub forwards the points of the
  devices the others watch (coalesced, like any subscription).
- **Revocations** are broadcast (by the hub or `hub device revoke`), so every hub closes those sessions at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, cast

import attrs
import orjson
import trio

from device_client.protocol import JSON, Command, Point
from hub.cluster._bus import UNREACHABLE, Bus, LostDevice
from hub.cluster._messages import Kind, Message
from hub.control_codes import ControlError
from hub.fleet import (
    COMMAND_FINAL_STATES,
    Broadcaster,
    CommandRecord,
    CommandRecordDict,
    CommandService,
    CommandState,
    DeviceStatus,
    Ledgers,
    Presence,
    PresenceState,
    Sender,
    StoreUnavailable,
    Subscription,
    TwinChange,
    TwinRecord,
    TwinService,
    device_summary,
)

__all__ = ["Cluster", "RemoteSender"]

log = logging.getLogger("hub.cluster")

#: Reads of a device's location at most, while presence messages about it keep arriving during the read.
LOCATE_TRIES = 3
#: Longest wait for Redis to take a presence claim before the transition is applied here only (and said again
#: once the bus is back).
CLAIM_TIMEOUT = 2.0
#: Claims sent in one pipelined round trip.
CLAIM_BATCH = 500
#: Longest wait for another hub to answer a call (a cancel).
CALL_TIMEOUT = 5.0
#: Seconds between reads of what the other hubs watch (besides every change they announce).
WATCH_REFRESH = 5.0
#: Ids read from the mirror's index for a filtered `list`, per record asked for.
LIST_OVERREAD = 4
_CONNECTED = frozenset({PresenceState.ONLINE.value, PresenceState.LATE.value})


@attrs.frozen
class RemoteSender:
    """A `Sender` to a device whose session is on another hub: the command goes there as an offer."""

    bus: Bus
    hub: str
    device: str
    epoch: int

    def __call__(self, frame: Command) -> bool:
        command = {"id": frame.id, "name": frame.name, "args": frame.args, "timeout": frame.timeout}
        self.bus.send(self.hub, Kind.OFFER, origin=self.bus.hub_id, device=self.device, command=command)
        return True


@attrs.define(eq=False)
class _Claim:
    name: str
    epoch: int
    state: str
    summary: dict[str, Any]
    hub: str
    done: trio.Event = attrs.field(factory=trio.Event)
    applied: bool = True


@attrs.define(eq=False)
class _Call:
    done: trio.Event = attrs.field(factory=trio.Event)
    reply: Message | None = None


class Cluster:
    """This hub's part in the cluster (see the module's docstring). Start `run` before the endpoints listen."""

    def __init__(
        self,
        bus: Bus,
        presence: Presence,
        commands: CommandService,
        broadcaster: Broadcaster,
        ledgers: Ledgers,
        *,
        session_epoch: Callable[[str], int | None],
        close_superseded: Callable[[str, int], None],
        revoke_device: Callable[[str], None],
        revoke_operator: Callable[[str], None],
        twins: TwinService | None = None,
    ) -> None:
        self.bus = bus
        self.hub_id = bus.hub_id
        self._presence = presence
        self._commands = commands
        self._broadcaster = broadcaster
        self._ledgers = ledgers
        self._session_epoch = session_epoch
        self._close_superseded = close_superseded
        self._revoke_device = revoke_device
        self._revoke_operator = revoke_operator
        self._twins = twins
        self._claims: deque[_Claim] = deque()
        self._running = False
        self._claims_ready = trio.Event()
        self._resync_due = False  # a claim could not reach Redis: say every local presence again when it can
        self._calls: dict[int, _Call] = {}
        self._next_rid = 1
        self._final_waiters: dict[str, trio.Event] = {}
        # device -> [`locate` calls reading it now, presence messages about it handled meanwhile]
        self._locating: dict[str, list[int]] = {}
        self._relay: Subscription | None = None  # telemetry of devices other hubs watch
        self._relay_ready = trio.Event()
        self._watch_changed = trio.Event()  # ours changed, or another hub said its own did
        self._own_watch: frozenset[str] | None = frozenset()
        self._own_watch_written = False
        self.claims_refused = 0
        self.telemetry_relayed = 0
        bus.handle(Kind.PRESENCE, self._on_presence)
        bus.handle(Kind.COMMAND, self._on_command)
        bus.handle(Kind.TELEMETRY, self._on_telemetry)
        bus.handle(Kind.WATCH, self._on_watch)
        bus.handle(Kind.REVOKE, self._on_revoke)
        bus.handle(Kind.TWIN, self._on_twin)
        bus.handle(Kind.OFFER, self._on_offer)
        bus.handle(Kind.RELAY, self._on_relay)
        bus.handle(Kind.CALL, self._on_call)
        bus.handle(Kind.REPLY, self._on_reply)
        bus.on_connected = self._resync
        bus.on_rejoined = self._resync
        bus.on_lost = self._on_lost
        presence.claim = self._claim
        commands.elsewhere = self
        broadcaster.on_watch_change = self._watch_changed.set

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the bus and this hub's cluster tasks until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._claim_loop)
                nursery.start_soon(self._relay_loop)
                nursery.start_soon(self._watch_loop)
                await nursery.start(self.bus.run)
                self._running = True
                task_status.started()
        finally:
            self._running = False  # sessions that end from now on (shutdown) are not claimed: the hub is leaving
            while self._claims:
                self._claims.popleft().done.set()

    def figures(self) -> dict[str, Any]:
        """Counters of the bus and the cluster, for /metrics (hub.ops.ClusterFigures)."""
        bus = self.bus
        return {
            "connected": int(bus.connected),
            "published": dict(bus.published),
            "received": dict(bus.received),
            "dropped": bus.dropped,
            "claims_refused": self.claims_refused,
            "telemetry_relayed": self.telemetry_relayed,
        }

    async def leave(self) -> None:
        """At a graceful stop, once the sessions are closed: leave the cluster's set of hubs."""
        await self.bus.leave()

    # ------------------------------------------------------------------ presence

    def summary(self, name: str, status: DeviceStatus) -> dict[str, Any]:
        """The device summary other hubs show for `status` (no registry read: revoked only if that closed it)."""
        summary = device_summary(name, None, status, self._ledgers.find(name))
        summary["revoked"] = status.reason == "revoked"
        return cast(dict[str, Any], summary)

    async def _claim(self, name: str, status: DeviceStatus) -> bool:
        if not self._running:
            return True
        claim = _Claim(name, status.epoch, status.state.value, self.summary(name, status), self.hub_id)
        self._claims.append(claim)
        self._claims_ready.set()
        await claim.done.wait()
        if not claim.applied:
            self.claims_refused += 1
        return claim.applied

    async def _claim_loop(self) -> None:
        claims = self._claims
        while True:
            if not claims:
                self._claims_ready = trio.Event()
                await self._claims_ready.wait()
                continue
            batch = [claims.popleft() for _ in range(min(len(claims), CLAIM_BATCH))]
            replies: list[bool] | None = None
            try:
                with trio.move_on_after(CLAIM_TIMEOUT):
                    try:
                        replies = await self._send_claims(batch)
                    except UNREACHABLE as exc:
                        log.warning("presence not stored in Redis, said again later", extra={"kv": {"error": str(exc)}})
                if replies is None:
                    self._resync_due = True  # applied here; every hub hears of it once Redis is back
            finally:  # also when cancelled (the hub stops): nobody may wait for an answer that will not come
                for i, claim in enumerate(batch):
                    claim.applied = True if replies is None else replies[i]
                    claim.done.set()

    async def _send_claims(self, batch: list[_Claim]) -> list[bool]:
        bus = self.bus
        async with bus.client.pipeline(transaction=False) as pipe:
            replies = [bus.claim_presence(c.name, c.epoch, c.state, c.summary, c.hub, client=pipe) for c in batch]
        return [bool(await reply) for reply in replies]

    async def _resync(self) -> None:
        """The bus is (back) in Redis: say every local session's presence again, and what this hub watches."""
        statuses = list(self._presence.status.items())
        if statuses:
            log.info("presence said again to the cluster", extra={"kv": {"devices": len(statuses)}})
        self._resync_due = False
        for name, status in statuses:
            if self._presence.status.get(name) is status:
                self._claims.append(
                    _Claim(name, status.epoch, status.state.value, self.summary(name, status), self.hub_id)
                )
        self._claims_ready.set()
        self._own_watch_written = False  # Redis may have lost it (restarted): write it again
        self._watch_changed.set()

    async def _on_presence(self, msg: Message) -> None:
        name, epoch, hub, state = msg["device"], msg["epoch"], msg["hub"], msg["state"]
        locating = self._locating.get(name)
        if locating is not None:
            locating[1] += 1
        local = self._session_epoch(name)
        newer_elsewhere = local is None or local < epoch
        if newer_elsewhere and hub != self.hub_id:
            self._presence.forget(name, epoch)
            if local is not None and state in _CONNECTED:
                self._close_superseded(name, epoch)
        if self._broadcaster.has_presence_subscribers():
            self._broadcaster.presence(cast(Any, msg["summary"]))
        if not newer_elsewhere:
            return
        if state in _CONNECTED and hub != self.hub_id:
            if self._commands.has_open(name):
                self._commands.attach_remote(name, RemoteSender(self.bus, hub, name, epoch))
        else:
            self._commands.detach_remote(name)

    async def _on_lost(self, lost: list[LostDevice]) -> None:
        """Hubs stopped beating: their devices that did not come back elsewhere are offline, reason hub_lost."""
        now = time.time()
        claims = []
        for device in lost:
            try:
                summary = orjson.loads(device.summary)
            except orjson.JSONDecodeError:
                summary = {}
            if not isinstance(summary, dict):
                summary = {}
            summary.update(name=device.name, state="offline", reason="hub_lost", since=now, epoch=device.epoch)
            claims.append(_Claim(device.name, device.epoch, "offline", summary, device.hub))
        self._claims.extend(claims)
        self._claims_ready.set()
        for claim in claims:
            await claim.done.wait()
            if not claim.applied:
                continue  # it came back on another hub meanwhile
            s = claim.summary
            status = DeviceStatus(
                PresenceState.OFFLINE,
                claim.epoch,
                now,
                "hub_lost",
                str(s.get("firmware") or ""),
                str(s.get("model") or ""),
                float(s.get("interval") or 0.0),
            )
            await self._presence.write_point(claim.name, status)

    async def statuses(self, names: list[str]) -> dict[str, DeviceStatus]:
        """The presence of `names` as the cluster knows it (devices never seen are left out). Raises
        `StoreUnavailable` when Redis is away."""
        bus = self.bus
        try:
            async with bus.client.pipeline(transaction=False) as pipe:
                replies = [pipe.hget(bus.key("presence", name), "summary") for name in names]
            texts = [await reply for reply in replies]
        except UNREACHABLE as exc:
            raise StoreUnavailable(f"cannot read the cluster's presence: {exc}") from exc
        out = {}
        for name, text in zip(names, texts, strict=True):
            if text is not None:
                status = _status(orjson.loads(text))
                if status is not None:
                    out[name] = status
        return out

    # ------------------------------------------------------------------ commands (the `Elsewhere` of CommandService)

    def command_changed(self, record: CommandRecordDict) -> None:
        """A command owned here changed: mirror it for the other hubs' reads and tell them."""
        record_json = orjson.dumps({**record, "hub": self.hub_id}).decode()
        message = orjson.dumps({"k": Kind.COMMAND.value, "hub": self.hub_id, "record": record}).decode()
        new = record["state"] == CommandState.QUEUED.value  # commands start queued; later states only update it
        self.bus.mirror_command(
            record["command_id"], record["device"], record["created"], record_json, message, new=new
        )

    async def locate(self, device: str) -> Sender | None:
        """Where `device` is connected, if on another hub. Read again (a few times at most) when a presence message
        about it was handled during the read: that message may be newer than what the read returned, and it found
        no command here to offer (the caller creates its command only after this returns)."""
        bus = self.bus
        key = bus.key("presence", device)
        locating = self._locating.setdefault(device, [0, 0])
        locating[0] += 1
        try:
            for _ in range(LOCATE_TRIES):
                seen = locating[1]
                hub, epoch, state = await bus.client.hmget(key, ["hub", "epoch", "state"])
                if locating[1] == seen:
                    break
        except UNREACHABLE as exc:
            log.warning(
                "cannot locate device: its command waits here", extra={"kv": {"device": device, "error": str(exc)}}
            )
            return None
        finally:
            locating[0] -= 1
            if not locating[0]:
                del self._locating[device]
        if hub is None or hub == self.hub_id or state not in _CONNECTED:
            return None
        return RemoteSender(bus, hub, device, int(epoch or 0))

    async def _mirrored(self, command_id: str) -> tuple[CommandRecord, str] | None:
        try:
            text = await self.bus.client.get(self.bus.key("command", command_id))
        except UNREACHABLE as exc:
            raise ControlError("unavailable", f"the cluster's state store is unreachable: {exc}") from exc
        if text is None:
            return None
        data = orjson.loads(text)
        return CommandRecord.from_dict(data), str(data.get("hub", ""))

    async def get(self, command_id: str) -> CommandRecord | None:
        found = await self._mirrored(command_id)
        return None if found is None else found[0]

    async def list(self, device: str | None, state: str | None, limit: int) -> list[CommandRecord]:
        bus = self.bus
        index = bus.key("commands", device) if device is not None else bus.key("commands")
        want = limit * LIST_OVERREAD if state is not None else limit
        try:
            ids = [str(i) for i in await bus.client.zrange(index, 0, max(want, 1) - 1, rev=True)]
            texts = await bus.client.mget([bus.key("command", i) for i in ids]) if ids else []
        except UNREACHABLE as exc:
            raise ControlError("unavailable", f"the cluster's state store is unreachable: {exc}") from exc
        out = []
        for text in texts:
            if text is None:
                continue
            rec = CommandRecord.from_dict(orjson.loads(text))
            if state is None or rec.state == state:
                out.append(rec)
        return out[:limit]

    async def cancel(self, command_id: str) -> CommandRecord | None:
        found = await self._mirrored(command_id)
        if found is None:
            return None
        rec, owner = found
        if owner == self.hub_id or not owner:
            return None
        if rec.final:
            raise ControlError("invalid_state", f"command {command_id!r} is already final")
        reply = await self._call(owner, "cancel", {"command_id": command_id})
        if not reply.get("ok"):
            raise ControlError(str(reply.get("code") or "unavailable"), str(reply.get("detail") or ""))
        return CommandRecord.from_dict(reply["value"])

    async def wait_final(self, command_id: str, timeout: float) -> CommandRecord | None:
        rec = await self.get(command_id)
        if rec is None or rec.final:
            return rec
        event = self._final_waiters.setdefault(command_id, trio.Event())
        with trio.move_on_after(timeout) as waiting:
            await event.wait()
        if waiting.cancelled_caught and self._final_waiters.get(command_id) is event:
            del self._final_waiters[command_id]
        return await self.get(command_id)

    async def _call(self, hub: str, op: str, args: dict[str, JSON]) -> Message:
        rid = self._next_rid
        self._next_rid += 1
        call = self._calls[rid] = _Call()
        try:
            self.bus.send(hub, Kind.CALL, origin=self.hub_id, rid=rid, op=op, args=args)
            with trio.move_on_after(CALL_TIMEOUT):
                await call.done.wait()
        finally:
            del self._calls[rid]
        if call.reply is None:
            raise ControlError("unavailable", f"hub {hub} did not answer within {CALL_TIMEOUT:g} s")
        return call.reply

    async def _on_command(self, msg: Message) -> None:
        record = msg["record"]
        self._broadcaster.command(cast(CommandRecordDict, record))
        if record.get("state") in COMMAND_FINAL_STATES:
            event = self._final_waiters.pop(str(record.get("command_id")), None)
            if event is not None:
                event.set()

    async def _on_offer(self, msg: Message) -> None:
        command, device, origin = msg["command"], msg["device"], msg["origin"]
        try:
            frame = Command(
                id=str(command["id"]),
                name=str(command["name"]),
                args=dict(command["args"]),
                timeout=float(command["timeout"]),
            )
        except (KeyError, TypeError, ValueError):
            log.warning("bus: bad command offer skipped", extra={"kv": {"origin": origin}})
            return
        bus = self.bus

        def relay(event: str, answer: dict[str, JSON]) -> None:
            bus.send(origin, Kind.RELAY, device=device, id=frame.id, event=event, **answer)

        if not self._commands.offer_foreign(device, frame, relay):
            log.debug("command offer for a device not here", extra={"kv": {"device": device, "origin": origin}})

    async def _on_relay(self, msg: Message) -> None:
        device, command_id, event = msg["device"], msg["id"], msg["event"]
        commands = self._commands
        if event == "sent":
            commands.on_sent(device, command_id)
        elif event == "ack":
            await commands.on_ack(device, command_id)
        elif event == "result":
            ok = bool(msg.get("ok"))
            await commands.on_result(device, command_id, ok, msg.get("result"), str(msg.get("error") or ""))

    async def _on_call(self, msg: Message) -> None:
        origin, rid, op, args = msg["origin"], msg["rid"], msg["op"], msg["args"]
        reply: dict[str, Any]
        if op == "cancel":
            try:
                rec = await self._commands.cancel(str(args.get("command_id")))
            except ControlError as exc:
                reply = {"ok": False, "code": exc.code, "detail": exc.message}
            else:
                reply = {"ok": True, "value": rec.as_dict()}
        else:
            reply = {"ok": False, "code": "bad_request", "detail": f"unknown call {op!r}"}
        self.bus.send(origin, Kind.REPLY, rid=rid, **reply)

    async def _on_reply(self, msg: Message) -> None:
        call = self._calls.get(msg["rid"])
        if call is not None:
            call.reply = msg
            call.done.set()

    # ------------------------------------------------------------------ telemetry

    async def _watch_loop(self) -> None:
        """Publish what this hub watches when it changes; follow what the others watch."""
        while True:
            with trio.move_on_after(WATCH_REFRESH):
                await self._watch_changed.wait()
            self._watch_changed = trio.Event()
            try:
                await self._write_own_watch()
                others = await self._read_watches()
            except UNREACHABLE as exc:
                log.debug("watch lists not exchanged", extra={"kv": {"error": str(exc)}})
                continue
            self._set_relay(others)

    async def _write_own_watch(self) -> None:
        watched = self._broadcaster.watched()
        if watched == self._own_watch and self._own_watch_written:
            return
        bus = self.bus
        key = bus.key("watch", self.hub_id)
        members = ["*"] if watched is None else sorted(watched)
        async with bus.client.pipeline(transaction=True) as pipe:
            pipe.delete([key])
            if members:
                pipe.sadd(key, members)
        self._own_watch = watched
        self._own_watch_written = True
        bus.broadcast(Kind.WATCH, hub=self.hub_id)

    async def _read_watches(self) -> frozenset[str] | None:
        """The devices other live hubs watch (None: all)."""
        bus = self.bus
        hubs = [h for h in await bus.client.zrange(bus.key("hubs"), 0, -1) if h != self.hub_id]
        if not hubs:
            return frozenset()
        async with bus.client.pipeline(transaction=False) as pipe:
            replies = [pipe.smembers(bus.key("watch", hub)) for hub in hubs]
        union: set[str] = set()
        for reply in replies:
            members = await reply
            if "*" in members:
                return None
            union |= members
        return frozenset(union)

    def _set_relay(self, devices: frozenset[str] | None) -> None:
        current = self._relay
        if current is not None and current.devices == devices:
            return
        if current is not None:
            self._broadcaster.unsubscribe(current)
            self._relay = None
        if devices is None or devices:
            self._relay = self._broadcaster.subscribe("telemetry", devices, self._relay_ready.set, relay=True)

    async def _relay_loop(self) -> None:
        while True:
            await self._relay_ready.wait()
            self._relay_ready = trio.Event()
            sub = self._relay
            if sub is None:
                continue
            by_device: dict[str, list[Point]] = {}
            buffer = sub.buffer
            while len(buffer):
                item = buffer.pop()
                assert isinstance(item, tuple)
                device, point = item
                by_device.setdefault(device, []).append(point)
            for device, points in by_device.items():
                self.bus.broadcast(Kind.TELEMETRY, hub=self.hub_id, device=device, points=points)
                self.telemetry_relayed += len(points)
            await trio.lowlevel.checkpoint()

    async def _on_telemetry(self, msg: Message) -> None:
        self._broadcaster.telemetry(msg["device"], cast(list[Point], msg["points"]), relayed=True)

    async def _on_watch(self, msg: Message) -> None:
        self._watch_changed.set()

    # ------------------------------------------------------------------ revocations

    async def _on_revoke(self, msg: Message) -> None:
        """Announced by the store (`RedisStore.revoke`, from any hub or `hub device revoke`)."""
        if msg["what"] == "device":
            self._revoke_device(msg["name"])
        elif msg["what"] == "operator":
            self._revoke_operator(msg["name"])

    # ------------------------------------------------------------------ twins

    def twin_changed(self, change: TwinChange) -> None:
        """A twin changed here: tell the other hubs (the device's hub sends a desired change to it)."""
        record = attrs.asdict(change.record)
        self.bus.broadcast(
            Kind.TWIN,
            hub=self.hub_id,
            device=change.device,
            side=change.side,
            version=change.version,
            patch=change.patch,
            record=record,
        )

    async def _on_twin(self, msg: Message) -> None:
        if self._twins is None or msg["side"] not in ("desired", "reported"):
            return
        try:
            record = TwinRecord(**msg["record"])
        except TypeError:
            log.warning("bad twin message on the bus", extra={"kv": {"device": msg["device"]}})
            return
        self._twins.changed_elsewhere(TwinChange(msg["device"], msg["side"], msg["version"], msg["patch"], record))


def _status(summary: Mapping[str, Any]) -> DeviceStatus | None:
    """A DeviceStatus from a summary another hub wrote (None if it is not one)."""
    try:
        return DeviceStatus(
            PresenceState(summary["state"]),
            int(summary.get("epoch") or 0),
            float(summary.get("since") or 0.0),
            str(summary.get("reason") or ""),
            str(summary.get("firmware") or ""),
            str(summary.get("model") or ""),
            float(summary.get("interval") or 0.0),
            -math.inf,
        )
    except (KeyError, TypeError, ValueError):
        return None
