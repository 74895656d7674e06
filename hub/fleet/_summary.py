"""Device summaries and details for operators: pure functions over registry, presence and ledger values."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, TypedDict

from device_client.protocol import FieldValue
from hub.fleet._command_store import CommandRecordDict
from hub.fleet._presence_states import INITIAL_STATE, SEEN_STATES, STATES
from hub.fleet._subscriptions import plain_fields

if TYPE_CHECKING:
    from hub.fleet._accounts import DeviceRecord
    from hub.fleet._labels import Selector
    from hub.fleet._ledger import DeviceLedger
    from hub.fleet._presence import DeviceStatus

__all__ = [
    "PRESENCE_STATES",
    "STATES",
    "DeviceDetail",
    "DeviceSummary",
    "LatestPoint",
    "device_detail",
    "device_summary",
    "latest_points",
    "list_summaries",
    "state_counts",
]

#: Presence states a connected-at-least-once device can be in. (`STATES`, every summary state, adds "never": a
#: registered device that has not connected since the hub started.)
PRESENCE_STATES = SEEN_STATES


class DeviceSummary(TypedDict):
    """The device summary of docs/control.md (a `devices` reply item, a presence event)."""

    name: str
    state: str  # a PresenceState, or "never"
    since: float | None
    reason: str
    last_seen: float | None
    epoch: int
    firmware: str
    model: str
    interval: float
    revoked: bool
    labels: dict[str, str]  # key -> value, sorted by key (hub.fleet._labels)


class LatestPoint(TypedDict):
    """The newest point of one measurement in a device detail, integers plain."""

    ts: int
    fields: dict[str, FieldValue]
    tags: dict[str, str]


class DeviceDetail(DeviceSummary):
    """The `device` reply: the summary plus `latest` (by measurement) and `commands` (newest first)."""

    latest: dict[str, LatestPoint]
    commands: list[CommandRecordDict]


def device_summary(
    name: str,
    record: DeviceRecord | None,
    status: DeviceStatus | None,
    ledger: DeviceLedger | None,
) -> DeviceSummary:
    """The device summary of docs/control.md: name, state, since, reason, last_seen, epoch, firmware, model,
    interval, revoked, labels. State "never" when there is no status; then `since` is the registration time, if
    known."""
    last_seen = ledger.last_seen if ledger is not None else None
    revoked = record.revoked if record is not None else False
    labels = dict(record.labels) if record is not None else {}
    if status is None:
        return {
            "name": name,
            "state": INITIAL_STATE,
            "since": record.created if record is not None else None,
            "reason": "",
            "last_seen": last_seen,
            "epoch": record.epoch if record is not None else 0,
            "firmware": "",
            "model": "",
            "interval": 0.0,
            "revoked": revoked,
            "labels": labels,
        }
    return {
        "name": name,
        "state": status.state,
        "since": status.since,
        "reason": status.reason,
        "last_seen": last_seen,
        "epoch": status.epoch,
        "firmware": status.firmware,
        "model": status.model,
        "interval": status.interval,
        "revoked": revoked,
        "labels": labels,
    }


def latest_points(ledger: DeviceLedger | None) -> dict[str, LatestPoint]:
    """``{measurement: {"ts", "fields", "tags"}}`` of the newest point per measurement, integers plain."""
    if ledger is None:
        return {}
    return {
        measurement: {"ts": p["ts"], "fields": plain_fields(p["fields"]), "tags": p.get("tags") or {}}
        for measurement, p in sorted(ledger.latest.items())
    }


def device_detail(
    name: str,
    record: DeviceRecord | None,
    status: DeviceStatus | None,
    ledger: DeviceLedger | None,
    commands: list[CommandRecordDict],
) -> DeviceDetail:
    """The summary plus ``latest`` (newest point per measurement) and ``commands`` (records, newest first)."""
    return {**device_summary(name, record, status, ledger), "latest": latest_points(ledger), "commands": commands}


def list_summaries(
    records: Iterable[DeviceRecord],
    statuses: Mapping[str, DeviceStatus],
    find_ledger: Callable[[str], DeviceLedger | None],
    state: str | None = None,
    selector: Selector | None = None,
) -> list[DeviceSummary]:
    """Summaries of every registered device (and any device presence knows of, without labels), sorted by name;
    only those in `state` and whose labels match `selector` when they are given."""
    by_name: dict[str, DeviceRecord | None] = {r.name: r for r in records}
    for name in statuses:
        by_name.setdefault(name, None)
    out = []
    for name in sorted(by_name):
        status = statuses.get(name)
        current = status.state if status is not None else INITIAL_STATE
        record = by_name[name]
        if selector is not None and not selector.matches(record.labels if record is not None else {}):
            continue
        if state is None or current == state:
            out.append(device_summary(name, by_name[name], status, find_ledger(name)))
    return out


def state_counts(statuses: Iterable[DeviceStatus]) -> dict[str, int]:
    """How many devices are online, late and offline."""
    counts: dict[str, int] = dict.fromkeys(PRESENCE_STATES, 0)
    for status in statuses:
        counts[status.state] = counts.get(status.state, 0) + 1
    return counts
