"""`RegistryStore` on Redis (coredis): the registry and the acked seqs shared by every hub process that uses it.

Keys, under a prefix P (default "hub"): a hash per device ``P:device:<name>`` (token_hash, created, revoked, epoch,
acked_seq, labels: a JSON object, missing in devices added before labels existed) and per operator
``P:operator:<name>`` (role, token_hash, created, revoked); the sets ``P:devices`` and ``P:operators`` (every name,
for listing) and ``P:devices:revoked`` and ``P:operators:revoked``; a hash per device ``P:latest:<name>``
(last_seen, and "m:<measurement>" -> its newest point as JSON); a hash per device ``P:twin:<name>`` (desired and
reported as JSON, their versions and times, applied_version), changed by a compare-and-set script.

Every read-modify-write is a small Lua script: Redis runs a script alone, so create-if-absent, bump-and-read and
raise-only are atomic across hubs in one round trip, where WATCH/MULTI would need a dedicated connection and a retry
loop whenever two hubs touch the same device.

With a `RegistryCache`, handshakes (authenticate, begin_session, authenticate_operator) go on from what was read
before while Redis is unreachable (docs/scaling.md).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

import coredis
import coredis.exceptions
import orjson
import trio

from device_client.protocol import Point
from hub.fleet._accounts import (
    OPERATOR_TOKEN_PREFIX,
    DeviceExists,
    DeviceRecord,
    OperatorExists,
    OperatorRecord,
    UnknownDevice,
    UnknownOperator,
    check_name,
    check_role,
    device_token_parts,
    new_secret,
    operator_token_parts,
    token_matches,
)
from hub.fleet._cache import CachedAccount, Kind, RegistryCache
from hub.fleet._labels import MAX_LABELS, BadLabel, check_label_key, check_labels
from hub.fleet._redis_pool import Pool
from hub.fleet._store import StoreUnavailable
from hub.fleet._twins import Side, TwinRecord, patch_twin

__all__ = ["RedisStore", "open_redis_store"]

#: Seconds to connect to Redis, and to wait for one reply.
CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 10.0
#: Devices per `save_acked` script call (each call holds Redis for its length).
SAVE_CHUNK = 500

# KEYS: the record's hash, the set of names. ARGV: the name, then the hash's fields and values.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""
# KEYS: the record's hash, the set of revoked names. ARGV: the name, "1" (revoke) or "0", then more fields to set.
_SET_REVOKED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'revoked', ARGV[2], unpack(ARGV, 3))
if ARGV[2] == '1' then redis.call('SADD', KEYS[2], ARGV[1]) else redis.call('SREM', KEYS[2], ARGV[1]) end
return 1
"""
# KEYS: the device's hash. ARGV: the most labels a device may have, the JSON object of labels to set, then the keys to
# remove. Returns {1, labels JSON} (sorted by key), {2, count} past the most, {0} for an unknown device.
_SET_LABELS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local labels = cjson.decode(redis.call('HGET', KEYS[1], 'labels') or '{}')
for i = 3, #ARGV do labels[ARGV[i]] = nil end
for key, value in pairs(cjson.decode(ARGV[2])) do labels[key] = value end
local keys = {}
for key in pairs(labels) do keys[#keys + 1] = key end
if #keys > tonumber(ARGV[1]) then return {2, #keys} end
table.sort(keys)
local parts = {}
for i, key in ipairs(keys) do parts[i] = cjson.encode(key) .. ':' .. cjson.encode(labels[key]) end
local text = '{' .. table.concat(parts, ',') .. '}'
redis.call('HSET', KEYS[1], 'labels', text)
return {1, text}
"""
# KEYS: the device's hash. ARGV: an epoch the new one must exceed (one this hub handed out while Redis was away).
# Returns {epoch, acked_seq, token_hash, revoked}, or nil for an unknown device.
_BEGIN_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
if epoch <= tonumber(ARGV[1]) then
    epoch = tonumber(ARGV[1]) + 1
    redis.call('HSET', KEYS[1], 'epoch', epoch)
end
local rest = redis.call('HMGET', KEYS[1], 'acked_seq', 'token_hash', 'revoked')
return {epoch, tonumber(rest[1]), rest[2], rest[3]}
"""
# KEYS: device hashes; ARGV: epochs. Raises only (epochs handed out while Redis was away); a missing hash stays missing.
_RAISE_EPOCHS = """
for i, key in ipairs(KEYS) do
    local current = redis.call('HGET', key, 'epoch')
    if current and tonumber(ARGV[i]) > tonumber(current) then redis.call('HSET', key, 'epoch', ARGV[i]) end
end
return 0
"""
# KEYS: device hashes; ARGV: their new seqs. Raises only; a missing hash (unknown device) is left missing.
_SAVE_ACKED = """
for i, key in ipairs(KEYS) do
    local current = redis.call('HGET', key, 'acked_seq')
    if current and tonumber(ARGV[i]) > tonumber(current) then redis.call('HSET', key, 'acked_seq', ARGV[i]) end
end
return 0
"""

# KEYS: latest-value hashes. ARGV, two for each: last_seen, then its fields and values ("m:<measurement>", the JSON
# point) joined by NUL (in neither a name nor JSON text): two arguments a device, where the client's cost is.
# A save older than what the hash holds (a device's previous hub saving late) is skipped whole.
_SAVE_LATEST = """
for i, key in ipairs(KEYS) do
    local seen, packed = ARGV[2 * i - 1], ARGV[2 * i]
    local current = redis.call('HGET', key, 'last_seen')
    if not current or tonumber(seen) >= tonumber(current) then
        local args, pos = {'last_seen', seen}, 1
        while pos <= #packed do
            local stop = string.find(packed, '\\0', pos, true) or (#packed + 1)
            args[#args + 1] = string.sub(packed, pos, stop - 1)
            pos = stop + 1
        end
        redis.call('HSET', key, unpack(args))
    end
end
return 0
"""

# KEYS: the device's hash, its twin's hash. ARGV: the twin's desired_version, reported_version and applied_version as
# read, then the fields and values to set. Returns 0 for an unknown device, 2 if the twin changed since it was read.
_SET_TWIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local now = redis.call('HMGET', KEYS[2], 'desired_version', 'reported_version', 'applied_version')
for i = 1, 3 do if (now[i] or '0') ~= ARGV[i] then return 2 end end
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
return 1
"""
_TWIN_FIELDS = (
    "desired",
    "desired_version",
    "reported",
    "reported_version",
    "applied_version",
    "desired_at",
    "reported_at",
)
#: Compare-and-set tries of a twin change before giving up (each lost try means another hub changed it meanwhile).
TWIN_TRIES = 50

_DEVICE_FIELDS = ("created", "revoked", "epoch", "acked_seq", "labels")
_OPERATOR_FIELDS = ("role", "created", "revoked")
#: Seconds after a failed read during which the cache answers what it can without asking Redis first.
CACHE_FIRST_FOR = 1.0
#: Seconds a handshake's read waits for Redis when the cache could answer instead (a Redis that hangs, rather than
#: refuses, would otherwise hold each such handshake for the client's timeouts: 3 tries of REPLY_TIMEOUT).
CACHE_PATIENCE = 1.0
#: ... and when it cannot: a handshake is not held longer than this by a Redis that hangs (then 503, retry later).
HANDSHAKE_PATIENCE = 5.0
_LATEST_PREFIX = "m:"
_UNREACHABLE = (
    coredis.exceptions.ConnectionError,
    coredis.exceptions.AuthenticationError,
    coredis.exceptions.AuthorizationError,
    OSError,  # TimeoutError included
)


class RedisStore:
    """`RegistryStore` on one Redis (or Valkey) server; any number of hub processes may share it."""

    def __init__(self, client: coredis.Redis[str], prefix: str, where: str, cache: RegistryCache | None = None) -> None:
        self._client = client
        self._cache = cache  # None: every read needs Redis
        self._cache_first_until = 0.0  # monotonic time until which the cache answers first (see CACHE_FIRST_FOR)
        self._where = where  # the URL without credentials, for error messages
        self._devices = f"{prefix}:devices"
        self._revoked_devices = f"{prefix}:devices:revoked"
        self._operators = f"{prefix}:operators"
        self._revoked_operators = f"{prefix}:operators:revoked"
        self._device_prefix = f"{prefix}:device:"
        self._operator_prefix = f"{prefix}:operator:"
        self._bus = f"{prefix}:bus"  # the hubs' broadcast channel (hub.cluster): revocations are announced there
        self._latest_prefix = f"{prefix}:latest:"
        self._create = client.register_script(_CREATE)
        self._set_revoked = client.register_script(_SET_REVOKED)
        self._begin_session = client.register_script(_BEGIN_SESSION)
        self._save_acked = client.register_script(_SAVE_ACKED)
        self._raise_epochs = client.register_script(_RAISE_EPOCHS)
        self._save_latest = client.register_script(_SAVE_LATEST)
        self._set_labels = client.register_script(_SET_LABELS)
        self._set_twin = client.register_script(_SET_TWIN)
        self._twin_prefix = f"{prefix}:twin:"

    @property
    def client(self) -> coredis.Redis[str]:
        """The Redis client (the hubs' bus shares its connection pool)."""
        return self._client

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        """Turn the client's connection failures into `StoreUnavailable`."""
        try:
            yield
        except _UNREACHABLE as exc:
            raise StoreUnavailable(f"cannot reach Redis at {self._where}: {exc}") from exc

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless Redis answers."""
        with self._reachable():
            await self._client.ping()

    # -- devices

    async def _hashes(
        self, names_key: str, prefix: str, fields: Sequence[str]
    ) -> tuple[builtins.list[str], builtins.list[tuple[str | None, ...]]]:
        """Every name in the set `names_key`, sorted, and the `fields` of its hash (one pipelined round trip)."""
        with self._reachable():
            names = sorted(await self._client.smembers(names_key))
            async with self._client.pipeline(transaction=False) as pipe:
                replies = [pipe.hmget(prefix + name, fields) for name in names]
            return names, [await reply for reply in replies]

    async def add(self, name: str, labels: Mapping[str, str] | None = None) -> str:
        check_name(name, "device")
        text = json.dumps(dict(sorted(check_labels(labels or {}).items())), separators=(",", ":"))
        secret, digest = new_secret()
        fields = ["token_hash", digest, "created", repr(time.time()), "revoked", "0", "epoch", "0", "acked_seq", "0"]
        fields += ["labels", text]
        with self._reachable():
            created: object = await self._create(keys=[self._device_prefix + name, self._devices], args=[name, *fields])
        if not created:
            raise DeviceExists(f"device {name!r} already exists")
        return f"{name}.{secret}"

    async def set_labels(self, name: str, set_: Mapping[str, str], remove: builtins.list[str]) -> dict[str, str]:
        set_ = check_labels(set_)
        for key in remove:
            check_label_key(key)
        with self._reachable():
            reply: object = await self._set_labels(
                keys=[self._device_prefix + name], args=[str(MAX_LABELS), json.dumps(set_), *remove]
            )
        assert isinstance(reply, list), reply
        if reply[0] == 0:
            raise UnknownDevice(f"unknown device {name!r}")
        if reply[0] == 2:
            raise BadLabel(f"at most {MAX_LABELS} labels per device (this would make {reply[1]})")
        labels: dict[str, str] = json.loads(reply[1])
        return labels

    async def rotate(self, name: str) -> str:
        secret, digest = new_secret()
        with self._reachable():
            found: object = await self._set_revoked(
                keys=[self._device_prefix + name, self._revoked_devices], args=[name, "0", "token_hash", digest]
            )
        if self._cache is not None:
            self._cache.forget("device", name)
        if not found:
            raise UnknownDevice(f"unknown device {name!r}")
        return f"{name}.{secret}"

    async def revoke(self, name: str) -> None:
        with self._reachable():
            found: object = await self._set_revoked(
                keys=[self._device_prefix + name, self._revoked_devices], args=[name, "1"]
            )
            if found:
                await self._announce_revoked("device", name)
        if self._cache is not None:
            self._cache.saw_revoked("device", [name])
        if not found:
            raise UnknownDevice(f"unknown device {name!r}")

    async def _announce_revoked(self, what: str, name: str) -> None:
        """Tell the hubs at once (they also poll the revoked sets, so a lost announcement costs seconds)."""
        await self._client.publish(self._bus, json.dumps({"k": "revoke", "what": what, "name": name}))

    async def get(self, name: str) -> DeviceRecord | None:
        with self._reachable():
            *values, token_hash = await self._client.hmget(self._device_prefix + name, [*_DEVICE_FIELDS, "token_hash"])
        record = _device(name, tuple(values))
        if self._cache is not None:
            self._cache.saw("device", name, token_hash, record is None or record.revoked, time.monotonic())
            if record is not None:
                self._cache.saw_session(name, record.epoch, record.acked_seq)
        return record

    async def list(self) -> builtins.list[DeviceRecord]:
        names, rows = await self._hashes(self._devices, self._device_prefix, _DEVICE_FIELDS)
        records = (_device(name, values) for name, values in zip(names, rows, strict=True))
        return [r for r in records if r is not None]

    async def revoked_names(self) -> set[str]:
        await self._write_pending_epochs()  # polled every few seconds by each hub: the time to catch up
        with self._reachable():
            names = set(await self._client.smembers(self._revoked_devices))
        if self._cache is not None:
            self._cache.saw_revoked("device", names)
        return names

    async def authenticate(self, token: str) -> str | None:
        parts = device_token_parts(token)
        if parts is None:
            return None
        name, secret = parts
        stored, revoked, _ = await self._account("device", name)
        return name if token_matches(secret, stored) and not revoked else None

    async def begin_session(self, name: str) -> tuple[int, int]:
        cache = self._cache
        if cache is not None and self._cached("device", name, None) is not None:
            opened = cache.begin_session(name, time.monotonic())
            if opened is not None:
                return opened
        floor = 0 if cache is None else cache.epoch_floor(name)
        reply: object = None
        answered, failure = False, None
        with trio.move_on_after(self._patience("device", name)):
            try:
                with self._reachable():
                    reply = await self._begin_session(keys=[self._device_prefix + name], args=[str(floor)])
                answered = True
            except StoreUnavailable as exc:
                failure = exc
        if not answered:
            failure = failure or self._slow()
            self._cached("device", name, failure)  # raises unless the cache trusts the device
            opened = None if cache is None else cache.begin_session(name, time.monotonic())
            if opened is None:
                raise failure
            return opened
        if reply is None:
            if cache is not None:
                cache.forget("device", name)
            raise UnknownDevice(f"unknown device {name!r}")
        assert isinstance(reply, list), reply
        epoch, acked, token_hash, revoked = int(reply[0]), int(reply[1]), reply[2], reply[3]
        if cache is not None:
            cache.saw("device", name, token_hash, revoked != "0", time.monotonic())
            cache.saw_session(name, epoch, acked)
            cache.epochs_written({name: epoch})
        return epoch, acked

    async def save_acked(self, updates: Mapping[str, int]) -> None:
        if self._cache is not None:
            self._cache.saw_acked(updates)  # first: a session opened during an outage starts from them
        await self._write_pending_epochs()
        items = [(self._device_prefix + name, str(int(seq))) for name, seq in updates.items()]
        with self._reachable():
            for start in range(0, len(items), SAVE_CHUNK):
                chunk = items[start : start + SAVE_CHUNK]
                await self._save_acked(keys=[key for key, _ in chunk], args=[seq for _, seq in chunk])

    async def _write_pending_epochs(self) -> None:
        """Write the epochs handed out while Redis was unreachable (each only raises what Redis holds)."""
        if self._cache is None:
            return
        pending = list(self._cache.pending_epochs().items())
        with self._reachable():
            for start in range(0, len(pending), SAVE_CHUNK):
                chunk = pending[start : start + SAVE_CHUNK]
                await self._raise_epochs(
                    keys=[self._device_prefix + name for name, _ in chunk], args=[str(epoch) for _, epoch in chunk]
                )
                self._cache.epochs_written(dict(chunk))

    # -- latest values

    async def save_latest(self, values: Mapping[str, tuple[float, dict[str, Point]]]) -> None:
        prefix = _LATEST_PREFIX
        items = [
            (
                self._latest_prefix + name,
                repr(float(last_seen)),
                "\0".join(f"{prefix}{measurement}\0{_json(point)}" for measurement, point in latest.items()),
            )
            for name, (last_seen, latest) in values.items()
        ]
        with self._reachable():
            for start in range(0, len(items), SAVE_CHUNK):
                chunk = items[start : start + SAVE_CHUNK]
                args = [arg for _, seen, packed in chunk for arg in (seen, packed)]
                await self._save_latest(keys=[key for key, _, _ in chunk], args=args)

    async def latest(self, names: builtins.list[str]) -> dict[str, tuple[float, dict[str, Point]]]:
        if not names:
            return {}
        with self._reachable():
            async with self._client.pipeline(transaction=False) as pipe:
                replies = [pipe.hgetall(self._latest_prefix + name) for name in names]
            found: dict[str, tuple[float, dict[str, Point]]] = {}
            for name, reply in zip(names, replies, strict=True):
                fields = await reply
                if "last_seen" in fields:
                    found[name] = (
                        float(fields["last_seen"]),
                        {
                            field.removeprefix(_LATEST_PREFIX): json.loads(value)
                            for field, value in fields.items()
                            if field.startswith(_LATEST_PREFIX)
                        },
                    )
            return found

    # -- operators

    # -- twins

    async def twin(self, name: str) -> TwinRecord:
        with self._reachable():
            async with self._client.pipeline(transaction=False) as pipe:
                exists = pipe.exists([self._device_prefix + name])
                values = pipe.hmget(self._twin_prefix + name, _TWIN_FIELDS)
            if not await exists:
                raise UnknownDevice(f"unknown device {name!r}")
            desired, dv, reported, rv, applied, desired_at, reported_at = await values
        return TwinRecord(
            json.loads(desired or "{}"),
            int(dv or 0),
            json.loads(reported or "{}"),
            int(rv or 0),
            int(applied or 0),
            float(desired_at or 0),
            float(reported_at or 0),
        )

    async def patch_twin(
        self, name: str, side: Side, patch: object, *, if_version: int | None = None, applied: int | None = None
    ) -> tuple[TwinRecord, bool]:
        keys = [self._device_prefix + name, self._twin_prefix + name]
        for _ in range(TWIN_TRIES):
            old = await self.twin(name)
            rec, changed = patch_twin(old, side, patch, if_version=if_version, applied=applied)
            if rec == old:
                return rec, changed
            seen = [str(old.desired_version), str(old.reported_version), str(old.applied_version)]
            fields = [
                *("desired", _json_text(rec.desired), "desired_version", str(rec.desired_version)),
                *("desired_at", repr(rec.desired_at), "reported", _json_text(rec.reported)),
                *("reported_version", str(rec.reported_version), "reported_at", repr(rec.reported_at)),
                *("applied_version", str(rec.applied_version)),
            ]
            with self._reachable():
                done: object = await self._set_twin(keys=keys, args=[*seen, *fields])
            if done == 0:
                raise UnknownDevice(f"unknown device {name!r}")
            if done == 1:
                return rec, changed
        raise StoreUnavailable(f"the twin of {name!r} kept changing under {TWIN_TRIES} tries")

    async def add_operator(self, name: str, role: str) -> str:
        check_name(name, "operator")
        check_role(role)
        secret, digest = new_secret()
        fields = ["role", role, "token_hash", digest, "created", repr(time.time()), "revoked", "0"]
        with self._reachable():
            created: object = await self._create(
                keys=[self._operator_prefix + name, self._operators], args=[name, *fields]
            )
        if not created:
            raise OperatorExists(f"operator {name!r} already exists")
        return f"{OPERATOR_TOKEN_PREFIX}{name}.{secret}"

    async def list_operators(self) -> builtins.list[OperatorRecord]:
        names, rows = await self._hashes(self._operators, self._operator_prefix, _OPERATOR_FIELDS)
        return [
            OperatorRecord(name=name, role=str(role), created=float(str(created)), revoked=revoked == "1")
            for name, (role, created, revoked) in zip(names, rows, strict=True)
            if role is not None
        ]

    async def revoke_operator(self, name: str) -> None:
        with self._reachable():
            found: object = await self._set_revoked(
                keys=[self._operator_prefix + name, self._revoked_operators], args=[name, "1"]
            )
            if found:
                await self._announce_revoked("operator", name)
        if self._cache is not None:
            self._cache.saw_revoked("operator", [name])
        if not found:
            raise UnknownOperator(f"unknown operator {name!r}")

    async def revoked_operators(self) -> set[str]:
        with self._reachable():
            names = set(await self._client.smembers(self._revoked_operators))
        if self._cache is not None:
            self._cache.saw_revoked("operator", names)
        return names

    async def authenticate_operator(self, token: str) -> tuple[str, str] | None:
        parts = operator_token_parts(token)
        if parts is None:
            return None
        name, secret = parts
        stored, revoked, role = await self._account("operator", name)
        return (name, role) if token_matches(secret, stored) and not revoked else None

    # -- the cache's part

    async def _account(self, kind: Kind, name: str) -> tuple[str | None, bool, str]:
        """``(token_hash, revoked, role)`` of a device or operator from Redis, or, when Redis fails or is slow, from
        the cache while it trusts the entry; raises `StoreUnavailable` when neither answers."""
        cached = self._cached(kind, name, None)
        if cached is None:
            key = (self._device_prefix if kind == "device" else self._operator_prefix) + name
            with trio.move_on_after(self._patience(kind, name)):
                try:
                    with self._reachable():
                        stored, revoked, role = await self._client.hmget(key, ["token_hash", "revoked", "role"])
                except StoreUnavailable as exc:
                    cached = self._cached(kind, name, exc)
                else:
                    is_revoked, role = revoked != "0", role or ""
                    if self._cache is not None:
                        self._cache.saw(kind, name, stored, is_revoked, time.monotonic(), role)
                    return stored, is_revoked, role
            if cached is None:  # no answer within the cache's patience
                cached = self._cached(kind, name, self._slow())
        assert cached is not None
        return cached.token_hash, cached.revoked, cached.role

    def _cached(self, kind: Kind, name: str, exc: StoreUnavailable | None) -> CachedAccount | None:
        """The cache's trusted entry once Redis failed (`exc`) or while it is asked first; re-raises `exc` if none."""
        if exc is not None:
            self._cache_first_until = time.monotonic() + CACHE_FIRST_FOR
        entry = None
        if self._cache is not None and (exc is not None or time.monotonic() < self._cache_first_until):
            entry = self._cache.account(kind, name, time.monotonic())
        if entry is None and exc is not None:
            raise exc
        return entry

    def _patience(self, kind: Kind, name: str) -> float:
        """Seconds a handshake's read waits for Redis: `CACHE_PATIENCE` when the cache could answer instead."""
        trusted = self._cache is not None and self._cache.account(kind, name, time.monotonic()) is not None
        return CACHE_PATIENCE if trusted else HANDSHAKE_PATIENCE

    def _slow(self) -> StoreUnavailable:
        return StoreUnavailable(f"cannot reach Redis at {self._where}: no answer within the handshake's patience")

    async def aclose(self) -> None:
        """Nothing to do: `open_redis_store` closes the client's connections."""


def _json_text(doc: object) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _json(point: Point) -> str:
    """A point as compact JSON (orjson, which the Redis backend's extra installs, is 10x faster than json)."""
    try:
        return orjson.dumps(point).decode()
    except (TypeError, orjson.JSONEncodeError):  # what orjson does not write (an integer beyond 64 bits): json does
        return json.dumps(point, separators=(",", ":"))


def _device(name: str, values: tuple[str | None, ...]) -> DeviceRecord | None:
    created, revoked, epoch, acked_seq, labels = values
    if created is None:
        return None
    return DeviceRecord(
        name=name,
        created=float(created),
        revoked=revoked == "1",
        epoch=int(epoch or 0),
        acked_seq=int(acked_seq or 0),
        labels=json.loads(labels or "{}"),
    )


def _ssl_context(url: str, ca_file: str) -> ssl.SSLContext | None:
    """For rediss://: verify the server's certificate and name (against `ca_file`, or the system's CAs)."""
    if urlsplit(url).scheme != "rediss":
        return None
    return ssl.create_default_context(cafile=ca_file or None)


def _where(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc, query="").geturl()


@contextlib.asynccontextmanager
async def open_redis_store(
    url: str, prefix: str, *, password: str = "", ca_file: str = "", cache_devices: int = 0, cache_ttl: float = 0.0
) -> AsyncIterator[RedisStore]:
    """A `RedisStore` on `url` (redis://, rediss:// or unix://) once Redis answers; its connections closed on exit.

    With `cache_devices` and `cache_ttl` both above 0, handshakes are answered from a `RegistryCache` of that size
    and trust while Redis is unreachable.

    Raises `StoreUnavailable` when Redis cannot be reached or refuses the password.
    """
    pool = Pool.from_url(
        url,
        decode_responses=True,
        password=password or None,  # one in the URL (HUB_REDIS_URL) wins
        ssl_context=_ssl_context(url, ca_file),
        connect_timeout=CONNECT_TIMEOUT,
        stream_timeout=REPLY_TIMEOUT,
    )
    client: coredis.Redis[str] = coredis.Redis(connection_pool=pool, decode_responses=True)
    async with client:
        cache = RegistryCache(cache_devices, cache_ttl) if cache_devices > 0 and cache_ttl > 0 else None
        store = RedisStore(client, prefix, _where(url), cache)
        await store.ping()
        yield store
