"""Device twins: each device's desired and reported documents, their versions, and the service that changes them.

`TwinRecord` is what a store keeps per device; `patch_twin` is the one rule for changing it (a merge patch on one
side, an optional `if_version`, the limits of `device_client.twin`), which both store backends apply inside their
atomic step. `TwinService` is the hub's door: operators set the desired side, device sessions report the other, and
every change goes to the device's session (wherever it is connected) and to the `twin` subscribers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypedDict

import attrs
import trio

from device_client.protocol import FieldValue, Point, is_field_key
from device_client.twin import check_document, check_patch, delta, merge_patch

if TYPE_CHECKING:
    from hub.fleet._store import RegistryStore

__all__ = [
    "REPORTED_MEASUREMENT",
    "Side",
    "TwinChange",
    "TwinDict",
    "TwinRecord",
    "TwinService",
    "VersionConflict",
    "patch_twin",
    "reported_point",
]

#: Which document of a twin.
Side: TypeAlias = Literal["desired", "reported"]
#: The measurement a device's reported document is written to at each change (numbers and booleans, flattened).
REPORTED_MEASUREMENT = "twin_reported"
#: Seconds between two reads of a twin while `wait_applied` waits (besides being woken by reports).
RECHECK = 5.0


class VersionConflict(Exception):
    """An `if_version` that is not the document's version now (`version`)."""

    def __init__(self, side: str, version: int, expected: int) -> None:
        super().__init__(f"the {side} document is at version {version}, not {expected}")
        self.version = version


class TwinDoc(TypedDict):
    """One side of a twin as operators see it."""

    version: int
    state: dict[str, Any]
    updated: float  # seconds since the epoch; 0 before the first change


class TwinDict(TypedDict):
    """A twin as operators see it (docs/control.md, "Device twin")."""

    device: str
    desired: TwinDoc
    reported: TwinDoc
    applied_version: int  # the desired version the device last said it applied
    delta: dict[str, Any]  # desired keys the reported document does not match yet


@attrs.frozen
class TwinRecord:
    """A device's twin as stored (a device that never had one has versions 0 and empty documents)."""

    desired: dict[str, Any] = attrs.Factory(dict)
    desired_version: int = 0
    reported: dict[str, Any] = attrs.Factory(dict)
    reported_version: int = 0
    applied_version: int = 0
    desired_at: float = 0.0
    reported_at: float = 0.0

    def to_dict(self, device: str) -> TwinDict:
        """The twin as operators see it, with its delta."""
        return {
            "device": device,
            "desired": {"version": self.desired_version, "state": self.desired, "updated": self.desired_at},
            "reported": {"version": self.reported_version, "state": self.reported, "updated": self.reported_at},
            "applied_version": self.applied_version,
            "delta": delta(self.desired, self.reported),
        }


def patch_twin(
    rec: TwinRecord, side: Side, patch: object, *, if_version: int | None = None, applied: int | None = None
) -> tuple[TwinRecord, bool]:
    """`rec` with `patch` merged into its `side` and the applied desired version set to `applied` (if given), and
    whether the document changed (its version then grows by one; a patch that changes nothing keeps it).

    Raises `TwinError` for a patch or result beyond the limits, `VersionConflict` when `if_version` is not the
    side's version."""
    patch = check_patch(patch)
    desired = side == "desired"
    version = rec.desired_version if desired else rec.reported_version
    if if_version is not None and if_version != version:
        raise VersionConflict(side, version, if_version)
    doc = rec.desired if desired else rec.reported
    new = merge_patch(doc, patch)
    changed = new != doc or _types(new) != _types(doc)
    if changed:
        check_document(new)
        now = time.time()
        if desired:
            rec = attrs.evolve(rec, desired=new, desired_version=version + 1, desired_at=now)
        else:
            rec = attrs.evolve(rec, reported=new, reported_version=version + 1, reported_at=now)
    if applied is not None and applied != rec.applied_version:
        rec = attrs.evolve(rec, applied_version=applied)
    return rec, changed


def _types(value: object) -> object:
    """The shape of `value` with scalar types (so True -> 1 or 1 -> 1.0 counts as a change, as JSON sees it)."""
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value)


def reported_point(doc: dict[str, Any], ts_ms: int) -> Point | None:
    """The point of a reported document: its numbers (as floats) and booleans, nested keys joined with ".";
    strings, arrays and keys that are not field names are left out. None when nothing is left."""
    fields: dict[str, FieldValue] = {}
    _flatten(doc, "", fields)
    if not fields:
        return None
    return {"measurement": REPORTED_MEASUREMENT, "ts": ts_ms, "fields": fields, "tags": {}}


def _flatten(doc: dict[str, Any], prefix: str, out: dict[str, FieldValue]) -> None:
    for key, value in doc.items():
        name = prefix + key
        if isinstance(value, dict):
            _flatten(value, name + ".", out)
        elif not is_field_key(name):
            continue
        elif isinstance(value, bool):
            out[name] = value
        elif isinstance(value, int | float) and math.isfinite(value):
            out[name] = float(value)


@attrs.frozen
class TwinChange:
    """A twin changed: `side`'s document is now at `version` after `patch` (`record` is the whole twin)."""

    device: str
    side: Side
    version: int
    patch: dict[str, Any]
    record: TwinRecord


class TwinService:
    """Reads and changes twins in the store, and tells whoever must know (see the module docstring).

    `on_change(change, local)` is called for every change made here (`local` True) or heard from another hub
    (`changed_elsewhere`, `local` False); the device's session, if it is here, gets desired changes through the
    callback it `attach`ed.
    """

    def __init__(self, store: RegistryStore, on_change: Callable[[TwinChange, bool], None] | None = None) -> None:
        self.store = store
        self.on_change = on_change
        self._sessions: dict[str, Callable[[TwinChange], None]] = {}
        self._applied: dict[str, trio.Event] = {}  # device -> set at its next report (`wait_applied`)

    async def get(self, device: str) -> TwinRecord:
        """The device's twin (UnknownDevice for an unregistered name)."""
        return await self.store.twin(device)

    async def set_desired(self, device: str, patch: object, *, if_version: int | None = None) -> TwinRecord:
        """Merge `patch` into the desired document (TwinError, VersionConflict, UnknownDevice)."""
        rec, changed = await self.store.patch_twin(device, "desired", patch, if_version=if_version)
        if changed:
            assert isinstance(patch, dict)
            self._changed(TwinChange(device, "desired", rec.desired_version, patch, rec), local=True)
        return rec

    async def report(self, device: str, patch: object, applied: int | None) -> tuple[TwinRecord, bool]:
        """A device's report: merge `patch` into its reported document, note the desired version it `applied`;
        the twin after it and whether the reported document changed."""
        rec, changed = await self.store.patch_twin(device, "reported", patch, applied=applied)
        if changed or applied is not None:
            assert isinstance(patch, dict)
            self._changed(TwinChange(device, "reported", rec.reported_version, patch, rec), local=True)
        return rec, changed

    async def wait_applied(self, device: str, version: int, timeout: float) -> TwinRecord | None:
        """Wait until the device says it applied desired `version` (or a later one); the twin then, None after
        `timeout` seconds. Woken by its reports here or on other hubs, and re-reads every `RECHECK` seconds anyway
        (a report whose news was lost on the bus)."""
        deadline = trio.current_time() + timeout
        while True:
            woken = self._applied.get(device)
            if woken is None:
                woken = self._applied[device] = trio.Event()
            rec = await self.store.twin(device)
            if rec.applied_version >= version:
                return rec
            now = trio.current_time()
            if now >= deadline:
                return None
            with trio.move_on_at(min(deadline, now + RECHECK)):
                await woken.wait()

    def attach(self, device: str, push: Callable[[TwinChange], None]) -> None:
        """The device's session here wants its desired changes (replacing any earlier session's wish)."""
        self._sessions[device] = push

    def detach(self, device: str, push: Callable[[TwinChange], None]) -> None:
        """The session is over (a newer session's wish stays)."""
        if self._sessions.get(device) is push:
            del self._sessions[device]

    def changed_elsewhere(self, change: TwinChange) -> None:
        """Another hub changed a twin (heard on the cluster's bus)."""
        self._changed(change, local=False)

    def _changed(self, change: TwinChange, *, local: bool) -> None:
        if change.side == "reported":
            woken = self._applied.pop(change.device, None)
            if woken is not None:
                woken.set()
        if change.side == "desired":
            push = self._sessions.get(change.device)
            if push is not None:
                push(change)
        if self.on_change is not None:
            self.on_change(change, local)
