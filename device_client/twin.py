"""Device twin documents, pure: JSON merge patches (RFC 7386), their limits, and the delta between desired and reported.

A twin is two JSON objects per device: `desired` (written by operators) and `reported` (written by the device), each
with a version that grows by one per change. Both are changed only by merge patches: a key set to null is removed, an
object merges into an object, anything else replaces. The hub and `device_client` import this module; it does no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = [
    "MAX_TWIN_BYTES",
    "MAX_TWIN_DEPTH",
    "TwinError",
    "check_document",
    "check_patch",
    "compose",
    "delta",
    "merge_patch",
    "twin_size",
]

#: Largest twin document (each of desired and reported), and largest patch, in bytes of compact JSON.
MAX_TWIN_BYTES = 16 * 1024
#: Deepest nesting of objects and arrays in a document or patch (``{"a": {"b": 1}}`` is 2 deep).
MAX_TWIN_DEPTH = 8


class TwinError(ValueError):
    """A patch or document refused: `reason` is ``"bad_patch"`` (not an object, too deep, not JSON) or
    ``"too_large"``; `detail` is safe to show."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def twin_size(doc: object) -> int:
    """Bytes of `doc` as compact JSON (the measure of `MAX_TWIN_BYTES`)."""
    return len(json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode())


def _depth(value: object, limit: int) -> int:
    """Nesting depth of `value`, counting no further than `limit` + 1."""
    if isinstance(value, dict):
        children = value.values()
    elif isinstance(value, list):
        children = value  # type: ignore[assignment]
    else:
        return 0
    if limit <= 0:
        return 1
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


def _check(value: object, what: str) -> None:
    if not isinstance(value, dict):
        raise TwinError("bad_patch", f"a {what} is a JSON object")
    if _depth(value, MAX_TWIN_DEPTH) > MAX_TWIN_DEPTH:
        raise TwinError("bad_patch", f"a {what} is at most {MAX_TWIN_DEPTH} levels deep")
    try:
        size = twin_size(value)
    except (TypeError, ValueError):
        raise TwinError("bad_patch", f"a {what} must be plain JSON (no NaN or Infinity)") from None
    if size > MAX_TWIN_BYTES:
        raise TwinError("too_large", f"a {what} is at most {MAX_TWIN_BYTES} bytes of JSON ({size})")


def check_patch(patch: object) -> dict[str, Any]:
    """`patch` if it is a merge patch within the limits; else `TwinError`."""
    _check(patch, "twin patch")
    assert isinstance(patch, dict)
    return patch


def check_document(doc: object) -> dict[str, Any]:
    """`doc` if it is a twin document within the limits; else `TwinError`."""
    _check(doc, "twin document")
    assert isinstance(doc, dict)
    return doc


def merge_patch(target: object, patch: object) -> Any:
    """RFC 7386: `target` with `patch` applied, as a new value (neither argument is changed)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def compose(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any] | None:
    """One merge patch that does what `first` then `second` do, to any document; None when no single patch can.

    That happens only where `first` sets a key to a non-object (or removes it) and `second` merges an object into it:
    applied in turn they replace whatever object was there, one patch could only merge into it.
    """
    out = dict(first)
    for key, value in second.items():
        before = out.get(key, _ABSENT)
        if isinstance(value, dict):
            if isinstance(before, dict):
                inner = compose(before, value)
                if inner is None:
                    return None
                out[key] = inner
                continue
            if before is not _ABSENT:
                return None
        out[key] = value
    return out


_ABSENT = object()


def _same(a: object, b: object) -> bool:
    """JSON equality: True is not 1, 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b if not _number(a) or not _number(b) else a == b


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def delta(desired: Mapping[str, Any], reported: Mapping[str, Any]) -> dict[str, Any]:
    """The desired keys the reported document does not match yet (objects compared key by key), with desired values."""
    out: dict[str, Any] = {}
    for key, want in desired.items():
        have = reported.get(key, _ABSENT)
        if isinstance(want, dict) and isinstance(have, dict):
            inner = delta(want, have)
            if inner:
                out[key] = inner
        elif have is _ABSENT or not _same(want, have):
            out[key] = want
    return out
