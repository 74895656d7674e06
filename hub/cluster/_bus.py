"""The bus between hubs: Redis pub/sub for events, a heartbeat per hub, and the scripts that keep presence true.

Each hub process has an id for its life (`hub_id`: host, pid and a random tag) and:

- reads two channels on one connection: the broadcast channel ``P:bus`` and its own ``P:bus:<hub_id>``; a lost
  connection is opened again (with backoff), and `on_connected` runs after every (re)subscription, so the hub can
  say again what the others may have missed;
- publishes through one queue, in order, in pipelined batches (`broadcast`, `send`, `mirror_command` never block);
  while Redis is away the queue waits (bounded: past `OUT_MAX` the oldest are dropped and counted);
- beats every `HEARTBEAT_EVERY` seconds: its expiry in the sorted set ``P:hubs`` moves `HUB_TTL` ahead. The same
  script finds hubs whose expiry has passed (killed, or cut off) and hands this hub the devices whose presence
  still names one of them, each exactly once across the cluster: they are offline with reason ``hub_lost``. A hub
  reaps only once it has itself been beating for `HUB_TTL`, so after a Redis outage (when every expiry has passed)
  the live hubs have that long to beat again before anyone is taken for dead; and a hub that finds itself
  rejoining (`rejoined`) says its devices' presence again.

Presence is written by `claim_presence`, one script: it applies only if the session epoch is not older than the
stored one (a replaced session's late "offline" is refused), keeps the per-hub device sets the reaper reads, and
publishes the event in the same step.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import coredis
import coredis.exceptions
import orjson
import trio
from coredis.retry import NoRetryPolicy

from hub.cluster._messages import BadMessage, Kind, Message, decode, encode

__all__ = ["HEARTBEAT_EVERY", "HUB_TTL", "Bus", "LostDevice", "unreachable"]

log = logging.getLogger("hub.bus")

#: Seconds between heartbeats; a hub not heard of for HUB_TTL seconds is lost. 5 s was too short: with 10,000
#: devices failing over (bench `failover`), a busy surviving hub's heartbeat came late past it and the hub was taken
#: for lost while its devices streamed.
HEARTBEAT_EVERY = 1.0
HUB_TTL = 15.0
#: Messages waiting to be published; beyond this the oldest are dropped (counted in `dropped`).
OUT_MAX = 100_000
#: Messages published in one pipelined round trip.
OUT_BATCH = 500
#: Backoff while Redis is away (seconds, doubling).
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0
#: Command records mirrored for other hubs' reads are kept this long after their last change (seconds).
COMMAND_KEEP = 7 * 24 * 3600
#: Newest command ids kept per device and overall in the mirror's indexes.
COMMAND_INDEX_MAX = 10_000

UNREACHABLE = (
    coredis.exceptions.ConnectionError,
    coredis.exceptions.AuthenticationError,
    coredis.exceptions.AuthorizationError,
    OSError,
)

# KEYS: the device's presence hash, its new hub's device set, the broadcast channel.
# ARGV: name, hub, epoch, state, summary JSON, message, prefix of the hub device sets. 1: applied, 0: superseded.
_CLAIM = """
local current = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if tonumber(ARGV[3]) < current then return 0 end
local old = redis.call('HGET', KEYS[1], 'hub')
redis.call('HSET', KEYS[1], 'hub', ARGV[2], 'epoch', ARGV[3], 'state', ARGV[4], 'summary', ARGV[5])
if old and old ~= ARGV[2] then redis.call('SREM', ARGV[7] .. old, ARGV[1]) end
if ARGV[4] == 'offline' then redis.call('SREM', KEYS[2], ARGV[1]) else redis.call('SADD', KEYS[2], ARGV[1]) end
redis.call('PUBLISH', KEYS[3], ARGV[6])
return 1
"""
# KEYS: the hubs' expiry zset, the hash of when each joined. ARGV: this hub, ttl, key prefix.
# Returns {rejoined, now, then hub, name, epoch, summary for every device of a lost hub still shown as on it}.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[2])
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
local rejoined = 0
if (not known) or tonumber(known) < now then
    rejoined = 1
    redis.call('HSET', KEYS[2], ARGV[1], tostring(now))
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
local out = {tostring(rejoined), tostring(now)}
local since = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or tostring(now))
if now - since < ttl then return out end
for _, hub in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
    redis.call('ZREM', KEYS[1], hub)
    redis.call('HDEL', KEYS[2], hub)
    local set = ARGV[3] .. ':hubdevices:' .. hub
    for _, name in ipairs(redis.call('SMEMBERS', set)) do
        local p = redis.call('HMGET', ARGV[3] .. ':presence:' .. name, 'hub', 'epoch', 'state', 'summary')
        if p[1] == hub and p[3] ~= 'offline' then
            table.insert(out, hub)
            table.insert(out, name)
            table.insert(out, p[2])
            table.insert(out, p[4])
        end
    end
    redis.call('DEL', set, ARGV[3] .. ':watch:' .. hub)
end
return out
"""


def unreachable(exc: BaseException) -> BaseException | None:
    """The connection failure `exc` is, or the first one of its group if that holds nothing else; else None."""
    if isinstance(exc, UNREACHABLE):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        leaves = [unreachable(sub) for sub in exc.exceptions]
        if leaves and all(leaf is not None for leaf in leaves):
            return leaves[0]
    return None


@attrs.frozen
class LostDevice:
    """A device whose presence still named a hub that is gone: it is offline (`hub_lost`) unless it came back."""

    hub: str
    name: str
    epoch: int
    summary: str  # the summary JSON its hub last wrote


#: Handlers of received messages, by kind (awaited one after another, in the order the messages came).
Handler = Callable[[Message], Awaitable[None]]


class Bus:
    """One hub's connection to the others (see the module's docstring)."""

    def __init__(self, client: coredis.Redis[str], prefix: str, hub_id: str, *, hub_ttl: float = HUB_TTL) -> None:
        self.client = client
        self.prefix = prefix
        self.hub_id = hub_id
        self.hub_ttl = hub_ttl
        self.broadcast_channel = f"{prefix}:bus"
        self.direct_channel = self.channel_of(hub_id)
        self._hubs = f"{prefix}:hubs"
        self._joined = f"{prefix}:hubs:joined"
        self._claim = client.register_script(_CLAIM)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._handlers: dict[Kind, Handler] = {}
        self._out: deque[tuple[Any, ...]] = deque()
        self._out_ready = trio.Event()
        self.on_connected: Callable[[], Awaitable[None]] | None = None
        self.on_lost: Callable[[list[LostDevice]], Awaitable[None]] | None = None
        self.on_rejoined: Callable[[], Awaitable[None]] | None = None
        self.connected = False
        self.published: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self.dropped = 0
        self.bad = 0

    def channel_of(self, hub_id: str) -> str:
        """The direct channel of hub `hub_id`."""
        return f"{self.prefix}:bus:{hub_id}"

    def key(self, *parts: str) -> str:
        """A key under the prefix: ``key("presence", name)`` is ``P:presence:<name>``."""
        return ":".join((self.prefix, *parts))

    def handle(self, kind: Kind, handler: Handler) -> None:
        """Run `handler` for every message of `kind` from another hub (or from anyone, for revocations)."""
        self._handlers[kind] = handler

    # ------------------------------------------------------------------ publishing

    def broadcast(self, kind: Kind, **fields: Any) -> None:
        """Publish to every hub (this one skips its own)."""
        self._put(("pub", self.broadcast_channel, encode(kind, **fields), kind.value))

    def send(self, hub_id: str, kind: Kind, **fields: Any) -> None:
        """Publish to hub `hub_id` only."""
        self._put(("pub", self.channel_of(hub_id), encode(kind, **fields), kind.value))

    def mirror_command(
        self, command_id: str, device: str, created: float, record_json: str, message: str, *, new: bool
    ) -> None:
        """Store a command record for other hubs' reads (and index it, when `new`), then broadcast its change."""
        self._put(("cmd", command_id, device, created if new else None, record_json, message))

    def _put(self, item: tuple[Any, ...]) -> None:
        out = self._out
        if len(out) >= OUT_MAX:
            out.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.warning("bus queue full: oldest messages dropped", extra={"kv": {"dropped": self.dropped}})
        out.append(item)
        self._out_ready.set()

    async def _send_loop(self) -> None:
        out = self._out
        backoff = BACKOFF_INITIAL
        while True:
            if not out:
                self._out_ready = trio.Event()
                await self._out_ready.wait()
                continue
            batch = [out[i] for i in range(min(len(out), OUT_BATCH))]
            try:
                await self._publish(batch)
            except UNREACHABLE as exc:
                log.warning("bus: cannot publish, will retry", extra={"kv": {"waiting": len(out), "error": str(exc)}})
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_INITIAL
            for item in batch:
                if out and out[0] is item:  # not dropped meanwhile
                    out.popleft()
                if item[0] == "pub":
                    self.published[item[3]] += 1
                else:
                    self.published[Kind.COMMAND.value] += 1

    async def _publish(self, batch: list[tuple[Any, ...]]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for item in batch:
                if item[0] == "pub":
                    pipe.publish(item[1], item[2])
                    continue
                _, command_id, device, created, record_json, message = item
                pipe.set(self.key("command", command_id), record_json, ex=COMMAND_KEEP)
                if created is not None:  # a new command: its place in the indexes (later changes keep it)
                    for index in (self.key("commands", device), self.key("commands")):
                        pipe.zadd(index, {command_id: created})
                        pipe.zremrangebyrank(index, 0, -COMMAND_INDEX_MAX - 1)
                        pipe.expire(index, COMMAND_KEEP)
                pipe.publish(self.broadcast_channel, message)

    # ------------------------------------------------------------------ presence

    def claim_presence(
        self, name: str, epoch: int, state: str, summary: dict[str, Any], hub: str, *, client: Any = None
    ) -> Awaitable[int]:
        """Write a device's presence (as of session `epoch`, on `hub`) and publish it, in one script (on `client`,
        a pipeline, if given). Resolves to 1, or to 0 if a newer session's presence is stored."""
        message = encode(Kind.PRESENCE, hub=hub, device=name, epoch=epoch, state=state, summary=summary)
        return self._claim(
            keys=[self.key("presence", name), self.key("hubdevices", hub), self.broadcast_channel],
            args=[name, hub, epoch, state, orjson.dumps(summary).decode(), message, self.key("hubdevices", "")],
            client=client,
        )

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive, publish and beat until cancelled; started once subscribed (or once trying, if Redis is away)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._receive_loop)
            nursery.start_soon(self._send_loop)
            nursery.start_soon(self._beat_loop)
            task_status.started()

    async def leave(self) -> None:
        """At a graceful stop: leave the hubs' set at once (the others need not wait for the expiry)."""
        try:
            await self.client.zrem(self._hubs, [self.hub_id])
            await self.client.hdel(self._joined, [self.hub_id])
        except UNREACHABLE as exc:
            log.warning("bus: could not leave the hubs' set", extra={"kv": {"error": str(exc)}})

    async def _receive_loop(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        backoff = BACKOFF_INITIAL
        started = False
        while True:
            try:
                async with self.client.pubsub(
                    channels=[self.broadcast_channel, self.direct_channel],
                    ignore_subscribe_messages=True,
                    retry_policy=NoRetryPolicy(),
                ) as pubsub:
                    self.connected = True
                    backoff = BACKOFF_INITIAL
                    if not started:
                        started = True
                        task_status.started()
                    if self.on_connected is not None:
                        await self.on_connected()
                    async for message in pubsub:
                        await self._dispatch(message["data"])
                raise coredis.exceptions.ConnectionError("subscription ended")
            except Exception as error:  # coredis raises a lost connection inside an exception group
                exc = unreachable(error)
                if exc is None:
                    raise
                if self.connected:
                    log.warning("bus: connection lost, reconnecting", extra={"kv": {"error": str(exc)}})
                self.connected = False
                if not started:
                    started = True
                    task_status.started()  # the hub runs without the bus meanwhile: it reconnects by itself
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _dispatch(self, data: Any) -> None:
        try:
            kind, msg = decode(data)
        except BadMessage as exc:
            self.bad += 1
            log.warning("bus: message skipped", extra={"kv": {"error": str(exc)}})
            return
        if msg.get("hub") == self.hub_id:
            return  # our own broadcast, back to us
        self.received[kind.value] += 1
        handler = self._handlers.get(kind)
        if handler is not None:
            await handler(msg)

    async def _beat_loop(self) -> None:
        while True:
            try:
                reply: list[Any] = await self._heartbeat(
                    keys=[self._hubs, self._joined], args=[self.hub_id, self.hub_ttl, self.prefix]
                )
            except UNREACHABLE as exc:
                log.warning("bus: heartbeat failed", extra={"kv": {"error": str(exc)}})
            else:
                await self._beaten([str(x) for x in reply])
            await trio.sleep(HEARTBEAT_EVERY)

    async def _beaten(self, reply: list[str]) -> None:
        if reply[0] == "1" and self.on_rejoined is not None:
            await self.on_rejoined()
        rest = reply[2:]
        lost = [
            LostDevice(rest[i], rest[i + 1], int(rest[i + 2] or 0), rest[i + 3] or "{}") for i in range(0, len(rest), 4)
        ]
        if lost:
            log.warning(
                "hubs lost", extra={"kv": {"hubs": ",".join(sorted({d.hub for d in lost})), "devices": len(lost)}}
            )
            if self.on_lost is not None:
                await self.on_lost(lost)
