"""The device outbox and command log as plain state: numbering, acks, rejects, window, bounds, dedup, SQLite."""

from __future__ import annotations

import json

import pytest

from device_client.outbox import TOO_LARGE, CommandLog, Outbox, OutboxFull
from device_client.protocol import ErrorCode, Limits, ProtocolError, Telemetry, decode

TS = 1_700_000_000_000


def pts(n: int = 1, **fields: object) -> list[dict]:
    return [{"measurement": "m", "ts": TS + i, "fields": dict(fields or {"v": 1.5})} for i in range(n)]


def fill(ob: Outbox, n: int) -> list[int]:
    return [ob.add(pts()) for _ in range(n)]


def test_add_numbers_and_encodes() -> None:
    ob = Outbox()
    assert fill(ob, 3) == [1, 2, 3]
    assert len(ob) == 3 and ob.last_seq == 3
    msg = decode(ob.entries()[0].text)
    assert isinstance(msg, Telemetry) and msg.seq == 1
    assert msg.points == [{"measurement": "m", "ts": TS, "fields": {"v": 1.5}, "tags": {}}]


def test_python_int_becomes_an_integer_field() -> None:
    ob = Outbox()
    ob.add(pts(count=7, temp=21.5, ok=True, s="x"))
    wire = json.loads(ob.entries()[0].text)
    assert wire["points"][0]["fields"] == {"count": {"int": 7}, "temp": 21.5, "ok": True, "s": "x"}


@pytest.mark.parametrize(
    ("points", "code"),
    [
        ([], ErrorCode.BAD_MESSAGE),
        ([{"measurement": "m", "ts": 5, "fields": {"v": 1.0}}], ErrorCode.BAD_TIME),
        ([{"measurement": "m", "ts": TS, "fields": {"v": [1]}}], ErrorCode.BAD_FIELD),
        ([{"measurement": "m", "ts": TS, "fields": {"v": float("nan")}}], ErrorCode.BAD_FIELD),
        ([{"measurement": "m", "ts": TS, "fields": {"v": float("inf")}}], ErrorCode.BAD_FIELD),
        ([{"measurement": "m", "ts": TS, "fields": {"v": 1.0}, "tags": {"device": "x"}}], ErrorCode.RESERVED_TAG),
    ],
)
def test_bad_points_are_refused_before_numbering(points: list[dict], code: str) -> None:
    ob = Outbox()
    with pytest.raises(ProtocolError) as info:
        ob.add(points)
    assert info.value.code == code
    assert len(ob) == 0 and ob.last_seq == 0


def test_limits_apply() -> None:
    ob = Outbox()
    with pytest.raises(ProtocolError) as info:
        ob.add(pts(3), limits=Limits(max_points=2))
    assert info.value.code == ErrorCode.TOO_MANY_POINTS
    assert ob.add(pts(2), limits=Limits(max_points=2)) == 1


def test_too_large_message_is_refused() -> None:
    ob = Outbox(max_message=200)
    with pytest.raises(ProtocolError) as info:
        ob.add(pts(1, s="x" * 300))
    assert info.value.code == TOO_LARGE
    assert ob.last_seq == 0


def test_acks_are_cumulative() -> None:
    ob = Outbox()
    fill(ob, 5)
    done = ob.ack(3)
    assert [e.seq for e in done] == [1, 2, 3]
    assert [e.seq for e in ob.entries()] == [4, 5]
    assert ob.acked == 3
    assert ob.ack(2) == [] and ob.ack(3) == []  # stale and repeated acks change nothing
    assert [e.seq for e in ob.ack(5)] == [4, 5]
    assert len(ob) == 0 and ob.bytes == 0


def test_reject_drops_one_batch() -> None:
    ob = Outbox()
    fill(ob, 3)
    assert ob.reject(2).seq == 2
    assert ob.reject(2) is None
    assert [e.seq for e in ob.entries()] == [1, 3]
    assert [e.seq for e in ob.ack(3)] == [1, 3]


def test_welcome_with_higher_ack_drops_entries_and_moves_the_counter() -> None:
    ob = Outbox()
    fill(ob, 3)
    assert [e.seq for e in ob.welcome(2)] == [1, 2]
    assert [e.seq for e in ob.entries()] == [3]
    ob.welcome(10)  # the hub holds more than we ever sent (e.g. a lost outbox file)
    assert len(ob) == 0
    assert ob.add(pts()) == 11


def test_welcome_with_lower_ack_keeps_everything_and_our_numbering() -> None:
    ob = Outbox()
    fill(ob, 4)
    ob.ack(2)
    assert ob.welcome(0) == []
    assert [e.seq for e in ob.entries()] == [3, 4]
    assert ob.add(pts()) == 5


def test_take_respects_the_window_and_order() -> None:
    ob = Outbox()
    fill(ob, 5)
    assert [e.seq for e in ob.take(2)] == [1, 2]
    assert ob.take(2) == []  # two in flight already
    assert ob.inflight == 2 and ob.inflight_seqs() == [1, 2]
    ob.ack(1)
    assert [e.seq for e in ob.take(2)] == [3]
    ob.reject(2)
    assert [e.seq for e in ob.take(2)] == [4]
    assert ob.inflight_seqs() == [3, 4]
    ob.ack(5)  # an ack beyond what is in flight
    assert ob.inflight == 0 and ob.take(2) == []


def test_reset_inflight_resends_everything_pending_in_order() -> None:
    ob = Outbox()
    fill(ob, 4)
    ob.take(3)
    ob.ack(1)
    ob.reset_inflight()
    assert ob.inflight == 0
    assert ob.sent_max == 3
    assert [e.seq for e in ob.take(10)] == [2, 3, 4]


def test_bound_by_batches() -> None:
    ob = Outbox(max_batches=2)
    fill(ob, 2)
    assert ob.full
    with pytest.raises(OutboxFull):
        ob.add(pts())
    assert ob.last_seq == 2  # a refused add uses no number
    ob.ack(1)
    assert not ob.full
    assert ob.add(pts()) == 3


def test_bound_by_bytes_still_takes_one_oversized_batch() -> None:
    ob = Outbox(max_bytes=10)
    ob.add(pts(3))  # larger than the bound, but the outbox was empty
    assert ob.full
    with pytest.raises(OutboxFull):
        ob.add(pts())
    ob.ack(1)
    assert not ob.full


def test_persistence_across_reopen(tmp_path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as ob:
        fill(ob, 4)
        ob.ack(1)
        ob.reject(3)
        texts = {e.seq: e.text for e in ob.entries()}
    with Outbox(path) as ob:
        assert [e.seq for e in ob.entries()] == [2, 4]
        assert {e.seq: e.text for e in ob.entries()} == texts
        assert ob.entries()[0].points == 1
        assert ob.sent_max == 4  # what was on disk may have been sent before the restart
        assert ob.add(pts()) == 5


def test_seq_counter_survives_an_empty_outbox(tmp_path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as ob:
        fill(ob, 3)
        ob.ack(3)
        assert len(ob) == 0
    with Outbox(path) as ob:
        assert len(ob) == 0 and ob.last_seq == 3 and ob.acked == 3
        assert ob.add(pts()) == 4
    with Outbox(path) as ob:
        ob.welcome(7)
    with Outbox(path) as ob:
        assert ob.add(pts()) == 8


def test_persisted_file_uses_wal(tmp_path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as ob:
        ob.add(pts())
        assert ob._db is not None
        assert ob._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ---------------------------------------------------------------------------- command log


def test_command_log_states() -> None:
    log = CommandLog()
    assert log.status("c1") == CommandLog.NEW
    log.begin("c1")
    assert log.status("c1") == CommandLog.RUNNING and log.result("c1") is None
    with pytest.raises(ValueError):
        log.begin("c1")
    log.finish("c1", "R1")
    assert log.status("c1") == CommandLog.DONE and log.result("c1") == "R1"
    assert log.unsent() == [("c1", "R1")]
    log.mark_sent("c1")
    assert log.unsent() == [] and log.result("c1") == "R1"
    log.begin("c2")
    log.abandon("c2")  # cancelled: forgotten, so a resend runs it
    log.abandon("c1")  # finished: kept
    assert log.status("c2") == CommandLog.NEW and log.status("c1") == CommandLog.DONE


def test_command_log_forgets_the_oldest_sent_results_first() -> None:
    log = CommandLog(limit=3)
    for i in range(3):
        log.begin(f"c{i}")
        log.finish(f"c{i}", f"R{i}")
    log.mark_sent("c1")
    log.mark_sent("c2")
    log.begin("c3")  # over the limit: c1 goes (c0 is not sent yet, c3 runs)
    assert [c for c in ("c0", "c1", "c2", "c3") if c in log] == ["c0", "c2", "c3"]
    log.begin("c4")
    assert "c2" not in log and len(log) == 3
    log.begin("c5")  # nothing can go: running and unsent records stay
    assert len(log) == 4 and log.unsent() == [("c0", "R0")]


def test_command_log_persists_finished_results(tmp_path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as ob, CommandLog(path) as log:  # one file for both
        ob.add(pts())
        log.begin("done")
        log.finish("done", "R-done")
        log.mark_sent("done")
        log.begin("unsent")
        log.finish("unsent", "R-unsent")
        log.begin("running")
    with Outbox(path) as ob, CommandLog(path) as log:
        assert len(ob) == 1
        assert log.status("done") == CommandLog.DONE and log.result("done") == "R-done"
        assert log.unsent() == [("unsent", "R-unsent")]
        assert log.status("running") == CommandLog.NEW
        log.mark_sent("unsent")
    with CommandLog(path, limit=1) as log:  # a smaller limit on reopen keeps the newest
        assert len(log) == 1 and log.result("unsent") == "R-unsent" and log.unsent() == []
    with CommandLog(path) as log:
        assert len(log) == 1
