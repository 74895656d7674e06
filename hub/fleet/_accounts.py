"""Devices and operators as both registry backends know them: names, roles, records, errors, and the token logic
(format, hash, constant-time check) they share."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

import attrs

__all__ = [
    "MAX_TOKEN_LEN",
    "NAME_RE",
    "OPERATOR_TOKEN_PREFIX",
    "ROLES",
    "BadName",
    "BadRole",
    "DeviceExists",
    "DeviceRecord",
    "OperatorExists",
    "OperatorRecord",
    "RegistryError",
    "UnknownDevice",
    "UnknownOperator",
    "check_name",
    "check_role",
    "device_token_parts",
    "new_secret",
    "operator_token_parts",
    "role_allows",
    "secret_digest",
    "token_matches",
]

#: Device names. No "." in a name: a token is "<name>.<secret>".
NAME_RE = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
#: Longer tokens are refused without a lookup (a real one is at most 64 + 1 + 43 characters).
MAX_TOKEN_LEN = 200
#: Operator tokens are "op.<name>.<secret>". Device names hold no ".", so no operator token can pass for a
#: device token (its name part "op.<name>" is never a device name), and a device token never starts with "op.".
OPERATOR_TOKEN_PREFIX = "op."
#: Operator roles, least to most privileged: each may do everything the ones before it may.
ROLES = ("viewer", "operator", "admin")

_NAME = re.compile(NAME_RE)
# Compared against when the name is unknown, so a miss costs the same hash + compare as a hit.
_DUMMY_DIGEST = hashlib.sha256(b"no such device").hexdigest()
_BAD_NAME_TEXT = "use 1-64 of A-Z a-z 0-9 _ -, starting with a letter or digit"


class RegistryError(Exception):
    """A registry operation was refused."""


class DeviceExists(RegistryError):
    """`add` of a name that is already registered."""


class UnknownDevice(RegistryError):
    """The named device is not registered."""


class BadName(RegistryError):
    """The name does not match `NAME_RE`."""


class OperatorExists(RegistryError):
    """`add_operator` of a name that is already taken (also by a revoked operator: names are never reused)."""


class UnknownOperator(RegistryError):
    """The named operator does not exist."""


class BadRole(RegistryError):
    """The role is not one of `ROLES`."""


@attrs.frozen
class DeviceRecord:
    """One registered device (the token hash is never exposed)."""

    name: str
    created: float  # seconds since the Unix epoch
    revoked: bool
    epoch: int  # bumped by every accepted session
    acked_seq: int  # highest sequence the hub has made durable
    labels: dict[str, str] = attrs.field(factory=dict, hash=False)  # key -> value, sorted by key (hub.fleet._labels)


@attrs.frozen
class OperatorRecord:
    """One operator of the control channel (the token hash is never exposed)."""

    name: str
    role: str  # one of ROLES
    created: float  # seconds since the Unix epoch
    revoked: bool


def role_allows(role: str, needed: str) -> bool:
    """Whether `role` includes the rights of `needed` (viewer < operator < admin); unknown roles allow nothing."""
    return role in ROLES and needed in ROLES and ROLES.index(role) >= ROLES.index(needed)


def check_name(name: object, what: str) -> None:
    """Raise `BadName` unless `name` is a valid device or operator name (`what` says which)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadName(f"bad {what} name {name!r}: {_BAD_NAME_TEXT}")


def check_role(role: object) -> None:
    """Raise `BadRole` unless `role` is one of `ROLES`."""
    if role not in ROLES:
        raise BadRole(f"bad role {role!r}: use {', '.join(ROLES)}")


def new_secret() -> tuple[str, str]:
    """A fresh token secret and the digest stored for it: ``(secret, digest)``."""
    secret = secrets.token_urlsafe(32)
    return secret, secret_digest(secret)


def secret_digest(secret: str) -> str:
    """What the registry stores of a token's secret."""
    # The secret is 256 random bits (token_urlsafe(32)), so guessing is hopeless without any stretching:
    # a plain SHA-256 is right here, a slow password KDF (bcrypt, scrypt) would only slow every handshake.
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _plausible(token: object) -> bool:
    return isinstance(token, str) and len(token) <= MAX_TOKEN_LEN and token.isascii()


def device_token_parts(token: object) -> tuple[str, str] | None:
    """``(name, secret)`` of a device token ``"<name>.<secret>"``; None when it cannot be one."""
    if not _plausible(token):
        return None
    assert isinstance(token, str)
    name, dot, secret = token.rpartition(".")
    return (name, secret) if dot else None


def operator_token_parts(token: object) -> tuple[str, str] | None:
    """``(name, secret)`` of an operator token ``"op.<name>.<secret>"``; None when it cannot be one."""
    if not _plausible(token):
        return None
    assert isinstance(token, str)
    if not token.startswith(OPERATOR_TOKEN_PREFIX):
        return None
    name, dot, secret = token[len(OPERATOR_TOKEN_PREFIX) :].rpartition(".")
    return (name, secret) if dot else None


def token_matches(secret: str, stored: str | None) -> bool:
    """Whether `secret` hashes to the `stored` digest (None: unknown name, always False).

    The same hash and constant-time compare run whether or not the name exists: timing reveals no names.
    """
    match = hmac.compare_digest(secret_digest(secret), _DUMMY_DIGEST if stored is None else stored)
    return match and stored is not None
