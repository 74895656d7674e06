"""The device twin's pure rules: merge patches (RFC 7386), composition, limits, delta, the wire messages, the hub's
`patch_twin`, the device's `TwinLog` and both session ends, with plain values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_client import protocol
from device_client.outbox import CommandLog, Outbox, TwinLog
from device_client.protocol import (
    Desired,
    Error,
    ErrorCode,
    Hello,
    ProtocolError,
    Report,
    ReportAck,
    Welcome,
    decode,
    encode,
)
from device_client.session import DesiredChanged, DeviceConnection, Ignored, ReportAcked, ReportRefused
from device_client.twin import (
    MAX_TWIN_BYTES,
    MAX_TWIN_DEPTH,
    TwinError,
    check_document,
    check_patch,
    compose,
    delta,
    merge_patch,
)
from hub.devices import HubConnection
from hub.fleet import TwinRecord, VersionConflict, patch_twin, reported_point

# RFC 7386, appendix A: (target, patch, result).
RFC_EXAMPLES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "result"), RFC_EXAMPLES)
def test_merge_patch_follows_the_rfc_examples(target: Any, patch: Any, result: Any) -> None:
    before = json.dumps(target)
    assert merge_patch(target, patch) == result
    assert json.dumps(target) == before  # the target is not changed


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from(["x", "y"]))
_keys = st.sampled_from(["a", "b", "c"])
_values = st.recursive(_scalars, lambda inner: st.dictionaries(_keys, inner, max_size=3), max_leaves=8)
_patches = st.dictionaries(_keys, _values, max_size=3)
_docs = st.dictionaries(
    _keys,
    st.recursive(
        _scalars.filter(lambda v: v is not None), lambda i: st.dictionaries(_keys, i, max_size=3), max_leaves=8
    ),
    max_size=3,
)


@given(_docs, _patches, _patches)
def test_compose_does_what_both_patches_do_or_says_it_cannot(doc: Any, first: Any, second: Any) -> None:
    both = compose(first, second)
    in_turn = merge_patch(merge_patch(doc, first), second)
    if both is not None:
        assert merge_patch(doc, both) == in_turn
    else:
        assert _cannot(first, second)


def _cannot(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """Whether, somewhere, `first` puts a non-object (or a removal) where `second` merges an object."""
    for key, value in second.items():
        inside = key in first and isinstance(value, dict)
        if inside and (not isinstance(first[key], dict) or _cannot(first[key], value)):
            return True
    return False


@given(_docs, _patches)
def test_a_merge_patch_applied_twice_changes_nothing_more(doc: Any, patch: Any) -> None:
    once = merge_patch(doc, patch)
    assert merge_patch(once, patch) == once


def test_limits_of_documents_and_patches() -> None:
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(MAX_TWIN_DEPTH - 1):
        inner["a"] = {}
        inner = inner["a"]
    assert check_patch(deep) is deep  # exactly the deepest allowed
    inner["a"] = {}
    with pytest.raises(TwinError) as exc:
        check_patch(deep)
    assert exc.value.reason == "bad_patch"
    with pytest.raises(TwinError) as exc:
        check_document({"a": [[[[[[[[1]]]]]]]]})
    assert exc.value.reason == "bad_patch"
    with pytest.raises(TwinError) as exc:
        check_document({"big": "x" * MAX_TWIN_BYTES})
    assert exc.value.reason == "too_large"
    for bad in ([], "x", 1, None):
        with pytest.raises(TwinError):
            check_patch(bad)
    with pytest.raises(TwinError):
        check_patch({"x": float("nan")})


def test_delta_lists_the_desired_keys_not_reported_yet() -> None:
    desired = {"interval": 5, "mode": "eco", "net": {"apn": "x", "roam": False}, "flag": True}
    reported = {"interval": 5.0, "mode": "fast", "net": {"apn": "x", "roam": 0}, "flag": 1, "extra": 1}
    assert delta(desired, reported) == {"mode": "eco", "net": {"roam": False}, "flag": True}
    assert delta({"a": 1}, {"a": 1}) == {}
    assert delta({"a": {"b": 1}}, {"a": 2}) == {"a": {"b": 1}}


def test_twin_messages_on_the_wire() -> None:
    for msg in (
        Hello(desired_version=0),
        Desired(3, state={"interval": 5}),
        Desired(4, patch={"interval": None}),
        Report(7, {"interval": 5}, desired_version=4),
        Report(8, {}),
        ReportAck(8, 12),
        Error(ErrorCode.BAD_REPORT, "too big", report=8),
    ):
        assert decode(encode(msg)) == msg
    assert json.loads(encode(Hello())).keys() == {"type", "firmware", "model", "interval", "proto"}
    for bad in (
        '{"type":"desired","version":1}',
        '{"type":"desired","version":1,"state":{},"patch":{}}',
        '{"type":"desired","version":0,"state":{}}',
        '{"type":"report","id":0,"patch":{}}',
        '{"type":"report","id":1,"patch":[]}',
        '{"type":"report","id":1,"patch":{},"desired_version":-1}',
        '{"type":"report_ack","id":1}',
        '{"type":"hello","proto":1,"desired_version":"3"}',
    ):
        with pytest.raises(ProtocolError) as exc:
            decode(bad)
        assert exc.value.code == ErrorCode.BAD_MESSAGE, bad


def test_patch_twin_versions_conflicts_and_limits() -> None:
    rec = TwinRecord()
    rec, changed = patch_twin(rec, "desired", {"interval": 5})
    assert changed and rec.desired == {"interval": 5} and rec.desired_version == 1 and rec.desired_at > 0
    same, changed = patch_twin(rec, "desired", {"interval": 5, "gone": None})
    assert not changed and same == rec  # nothing changed: the version stays
    retyped, changed = patch_twin(rec, "desired", {"interval": 5.0})
    assert changed and retyped.desired_version == 2  # 5 -> 5.0 is a change in JSON
    with pytest.raises(VersionConflict) as exc:
        patch_twin(rec, "desired", {"interval": 6}, if_version=0)
    assert exc.value.version == 1
    rec, _ = patch_twin(rec, "desired", {"interval": 6}, if_version=1)
    assert rec.desired_version == 2
    rec, changed = patch_twin(rec, "reported", {}, applied=2)
    assert not changed and rec.applied_version == 2 and rec.reported_version == 0
    with pytest.raises(TwinError):
        patch_twin(rec, "reported", {"x": "y" * MAX_TWIN_BYTES})
    assert rec.to_dict("d")["delta"] == {"interval": 6}


def test_the_reported_point_keeps_numbers_and_booleans() -> None:
    point = reported_point(
        {"interval": 5, "net": {"rssi": -70, "apn": "x"}, "on": True, "_x": 1, "list": [1], "time": 3}, 1000
    )
    assert point == {
        "measurement": "twin_reported",
        "ts": 1000,
        "fields": {"interval": 5.0, "net.rssi": -70.0, "on": True},
        "tags": {},
    }
    assert reported_point({"name": "x"}, 1) is None
    assert reported_point({"#n": 1, "a\\b": 2, "x" * 129: 3}, 1) == {  # the protocol's field-key rule, no other
        "measurement": "twin_reported",
        "ts": 1,
        "fields": {"#n": 1.0},
        "tags": {},
    }


def test_twin_log_folds_reports_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    log = TwinLog(path)
    log.apply_desired(3, {"interval": 5})
    first = log.report({"a": 1})
    folded = log.report({"b": {"c": 1}}, desired_version=3)
    assert len(log.pending) == 1 and folded.id == first.id + 1
    assert log.pending[0].patch == {"a": 1, "b": {"c": 1}} and log.pending[0].desired_version == 3
    log.report({"a": None})
    separate = log.report({"a": {"x": 1}})  # a scalar removed, then an object merged: one patch cannot say both
    assert len(log.pending) == 2 and separate.id == 4
    log.close()
    again = TwinLog(path)
    assert again.desired == {"interval": 5} and again.desired_version == 3
    assert [(r.id, r.patch) for r in again.pending] == [(3, {"a": None, "b": {"c": 1}}), (4, {"a": {"x": 1}})]
    assert again.acked(3) == 1 and again.newest_id == 4
    assert again.drop(4) is not None and again.pending == []
    assert again.report({"z": 1}).id == 5  # ids keep growing across restarts
    again.close()


def _device(twin: TwinLog | None) -> DeviceConnection:
    conn = DeviceConnection(Outbox(), CommandLog(), twin=twin)
    hello = json.loads(conn.connect(Hello()))
    assert hello.get("desired_version") == (None if twin is None else twin.desired_version)
    welcome = Welcome(device="d", ack=0, epoch=1, window=8, max_points=100, ping_interval=30)
    conn.receive(encode(welcome))
    return conn


def test_the_device_end_applies_desired_documents_in_order_and_resends_reports() -> None:
    twin = TwinLog()
    conn = _device(twin)
    event = conn.receive(encode(Desired(2, state={"interval": 5, "mode": "eco"})))
    assert event == DesiredChanged(2, {"interval": 5, "mode": "eco"}, {})
    event = conn.receive(encode(Desired(3, patch={"mode": None})))
    assert isinstance(event, DesiredChanged) and event.desired == {"interval": 5}
    assert isinstance(conn.receive(encode(Desired(5, patch={"x": 1}))), Ignored)  # a gap: not applied
    assert twin.desired_version == 3
    conn.report({"interval": 5}, 3)
    frame = conn.next_frame()
    assert decode(frame) == Report(1, {"interval": 5}, 3)  # type: ignore[arg-type]
    conn.frame_written()
    assert conn.next_frame() is None  # sent once per connection
    conn.connection_lost()
    conn.connect(Hello())
    conn.receive(encode(Welcome(device="d", ack=0, epoch=2, window=8, max_points=100, ping_interval=30)))
    assert decode(conn.next_frame()) == Report(1, {"interval": 5}, 3)  # type: ignore[arg-type]
    assert conn.receive(encode(ReportAck(1, 4))) == ReportAcked(1, 4, 1)
    conn.report({"huge": 1})
    refused = conn.receive(encode(Error(ErrorCode.BAD_REPORT, "too large", report=2)))
    assert isinstance(refused, ReportRefused) and refused.report is not None and twin.pending == []


def test_a_device_without_a_twin_ignores_desired_documents() -> None:
    conn = _device(None)
    assert isinstance(conn.receive(encode(Desired(1, state={}))), Ignored)
    with pytest.raises(ValueError):
        conn.report({"a": 1})


def _hub(desired_version: int | None) -> HubConnection:
    conn = HubConnection()
    conn.receive(encode(Hello(desired_version=desired_version)), 0.0)
    conn.welcome("d", 1, _Book(), [], ping_interval=30, max_message_bytes=1000)
    return conn


class _Book:
    durable = 0
    submitted = 0


def test_the_hub_end_sends_patches_in_order_and_whole_documents_otherwise() -> None:
    conn = _hub(2)
    assert not conn.offer_desired(2, {"a": 1}, {"a": 1})  # the device has it
    assert conn.offer_desired(3, {"a": 2}, {"a": 2})
    assert conn.next_outbound() == Desired(3, patch={"a": 2})
    assert conn.offer_desired(4, {"a": 3}, {"a": 3})
    assert conn.offer_desired(5, {"a": 4}, {"a": 4})  # v4 not handed out yet: v5 goes whole
    assert conn.next_outbound() == Desired(5, state={"a": 4})
    assert conn.next_outbound() is None
    assert conn.offer_desired(7, {"a": 6}, {"a": 6})  # a gap: whole
    assert conn.next_outbound() == Desired(7, state={"a": 6})
    assert conn.offer_desired(1, {"b": 1}, whole=True)  # the hub's version is behind the device's: whole anyway
    assert conn.next_outbound() == Desired(1, state={"b": 1})
    report = encode(Report(1, {"a": 6}, 7))
    assert conn.receive(report, 1.0) == Report(1, {"a": 6}, 7)
    refused = conn.refuse(ProtocolError(ErrorCode.BAD_REPORT, "too large"), 2.0, report=1)
    assert refused.frame is not None and decode(refused.frame) == Error(ErrorCode.BAD_REPORT, "too large", report=1)
    assert refused.close is None and refused.resolve is None
    plain = _hub(None)  # no twin
    assert not plain.offer_desired(1, {"a": 1}, {"a": 1})
    assert protocol.ErrorCode.BAD_REPORT == "bad_report"
