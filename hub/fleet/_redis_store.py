"""`RegistryStore` on Redis (coredis): the registry and the acked seqs shared by every hub process that uses it.

Keys, under a prefix P (default "hub"): a hash per device ``P:device:<name>`` (token_hash, created, revoked, epoch,
acked_seq) and per operator ``P:operator:<name>`` (role, token_hash, created, revoked); the sets ``P:devices`` and
``P:operators`` (every name, for listing) and ``P:devices:revoked`` and ``P:operators:revoked``.

Every read-modify-write is a small Lua script: Redis runs a script alone, so create-if-absent, bump-and-read and
raise-only are atomic across hubs in one round trip, where WATCH/MULTI would need a dedicated connection and a retry
loop whenever two hubs touch the same device.
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
from hub.fleet._store import StoreUnavailable

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
# KEYS: the device's hash. Returns {epoch, acked_seq}, or nil for an unknown device.
_BEGIN_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
return {epoch, tonumber(redis.call('HGET', KEYS[1], 'acked_seq'))}
"""
# KEYS: device hashes; ARGV: their new seqs. Raises only; a missing hash (unknown device) is left missing.
_SAVE_ACKED = """
for i, key in ipairs(KEYS) do
    local current = redis.call('HGET', key, 'acked_seq')
    if current and tonumber(ARGV[i]) > tonumber(current) then redis.call('HSET', key, 'acked_seq', ARGV[i]) end
end
return 0
"""

_DEVICE_FIELDS = ("created", "revoked", "epoch", "acked_seq")
_OPERATOR_FIELDS = ("role", "created", "revoked")
_UNREACHABLE = (
    coredis.exceptions.ConnectionError,
    coredis.exceptions.AuthenticationError,
    coredis.exceptions.AuthorizationError,
    OSError,  # TimeoutError included
)


class RedisStore:
    """`RegistryStore` on one Redis (or Valkey) server; any number of hub processes may share it."""

    def __init__(self, client: coredis.Redis[str], prefix: str, where: str) -> None:
        self._client = client
        self._where = where  # the URL without credentials, for error messages
        self._devices = f"{prefix}:devices"
        self._revoked_devices = f"{prefix}:devices:revoked"
        self._operators = f"{prefix}:operators"
        self._revoked_operators = f"{prefix}:operators:revoked"
        self._device_prefix = f"{prefix}:device:"
        self._operator_prefix = f"{prefix}:operator:"
        self._bus = f"{prefix}:bus"  # the hubs' broadcast channel (hub.cluster): revocations are announced there
        self._create = client.register_script(_CREATE)
        self._set_revoked = client.register_script(_SET_REVOKED)
        self._begin_session = client.register_script(_BEGIN_SESSION)
        self._save_acked = client.register_script(_SAVE_ACKED)

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

    async def add(self, name: str) -> str:
        check_name(name, "device")
        secret, digest = new_secret()
        fields = ["token_hash", digest, "created", repr(time.time()), "revoked", "0", "epoch", "0", "acked_seq", "0"]
        with self._reachable():
            created: object = await self._create(keys=[self._device_prefix + name, self._devices], args=[name, *fields])
        if not created:
            raise DeviceExists(f"device {name!r} already exists")
        return f"{name}.{secret}"

    async def rotate(self, name: str) -> str:
        secret, digest = new_secret()
        with self._reachable():
            found: object = await self._set_revoked(
                keys=[self._device_prefix + name, self._revoked_devices], args=[name, "0", "token_hash", digest]
            )
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
        if not found:
            raise UnknownDevice(f"unknown device {name!r}")

    async def _announce_revoked(self, what: str, name: str) -> None:
        """Tell the hubs at once (they also poll the revoked sets, so a lost announcement costs seconds)."""
        await self._client.publish(self._bus, json.dumps({"k": "revoke", "what": what, "name": name}))

    async def get(self, name: str) -> DeviceRecord | None:
        with self._reachable():
            values = await self._client.hmget(self._device_prefix + name, _DEVICE_FIELDS)
        return _device(name, values)

    async def list(self) -> builtins.list[DeviceRecord]:
        names, rows = await self._hashes(self._devices, self._device_prefix, _DEVICE_FIELDS)
        records = (_device(name, values) for name, values in zip(names, rows, strict=True))
        return [r for r in records if r is not None]

    async def revoked_names(self) -> set[str]:
        with self._reachable():
            return set(await self._client.smembers(self._revoked_devices))

    async def authenticate(self, token: str) -> str | None:
        parts = device_token_parts(token)
        if parts is None:
            return None
        name, secret = parts
        with self._reachable():
            stored, revoked = await self._client.hmget(self._device_prefix + name, ["token_hash", "revoked"])
        return name if token_matches(secret, stored) and revoked == "0" else None

    async def begin_session(self, name: str) -> tuple[int, int]:
        with self._reachable():
            reply: object = await self._begin_session(keys=[self._device_prefix + name])
        if reply is None:
            raise UnknownDevice(f"unknown device {name!r}")
        assert isinstance(reply, list), reply
        epoch, acked = reply
        return int(epoch), int(acked)

    async def save_acked(self, updates: Mapping[str, int]) -> None:
        items = [(self._device_prefix + name, str(int(seq))) for name, seq in updates.items()]
        with self._reachable():
            for start in range(0, len(items), SAVE_CHUNK):
                chunk = items[start : start + SAVE_CHUNK]
                await self._save_acked(keys=[key for key, _ in chunk], args=[seq for _, seq in chunk])

    # -- operators

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
        if not found:
            raise UnknownOperator(f"unknown operator {name!r}")

    async def revoked_operators(self) -> set[str]:
        with self._reachable():
            return set(await self._client.smembers(self._revoked_operators))

    async def authenticate_operator(self, token: str) -> tuple[str, str] | None:
        parts = operator_token_parts(token)
        if parts is None:
            return None
        name, secret = parts
        with self._reachable():
            stored, revoked, role = await self._client.hmget(
                self._operator_prefix + name, ["token_hash", "revoked", "role"]
            )
        return (name, str(role)) if token_matches(secret, stored) and revoked == "0" else None

    async def aclose(self) -> None:
        """Nothing to do: `open_redis_store` closes the client's connections."""


def _device(name: str, values: tuple[str | None, ...]) -> DeviceRecord | None:
    created, revoked, epoch, acked_seq = values
    if created is None:
        return None
    return DeviceRecord(
        name=name, created=float(created), revoked=revoked == "1", epoch=int(epoch or 0), acked_seq=int(acked_seq or 0)
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
    url: str, prefix: str, *, password: str = "", ca_file: str = ""
) -> AsyncIterator[RedisStore]:
    """A `RedisStore` on `url` (redis://, rediss:// or unix://) once Redis answers; its connections closed on exit.

    Raises `StoreUnavailable` when Redis cannot be reached or refuses the password.
    """
    client = coredis.Redis.from_url(
        url,
        decode_responses=True,
        password=password or None,  # one in the URL (HUB_REDIS_URL) wins
        ssl_context=_ssl_context(url, ca_file),
        connect_timeout=CONNECT_TIMEOUT,
        stream_timeout=REPLY_TIMEOUT,
    )
    async with client:
        store = RedisStore(client, prefix, _where(url))
        await store.ping()
        yield store
