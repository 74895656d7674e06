"""The durable spool: FIFO order across segments and restarts, bounds, torn and damaged records."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hub.ingest import Spool, SpoolError, SpoolFull

HEADER = 8


def rec(i: int) -> str:
    return f"m,device=d f={i} {1_700_000_000_000 + i}\n"


def drain(spool: Spool) -> list[str]:
    out = []
    while (r := spool.peek()) is not None:
        out.append(r)
        spool.pop()
    return out


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.spool"))


def test_fifo_counts_and_bytes(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=10_000) as spool:
        assert spool.peek() is None and spool.records == 0 and spool.bytes_used == 0
        for i in range(3):
            spool.append(rec(i))
        assert spool.records == 3 == len(spool)
        assert spool.bytes_used == sum(HEADER + len(rec(i)) for i in range(3))
        assert spool.peek() == rec(0)
        assert spool.peek() == rec(0)  # peek does not consume
        spool.pop()
        assert spool.peek() == rec(1) and spool.records == 2
        assert drain(spool) == [rec(1), rec(2)]
        assert spool.records == 0 and spool.bytes_used == 0
        with pytest.raises(SpoolError):
            spool.pop()


def test_unicode_records(tmp_path: Path) -> None:
    text = 'température,device=gerät s="☀ \\"x\\"" 1\n'
    with Spool(tmp_path, max_bytes=10_000) as spool:
        spool.append(text)
    with Spool(tmp_path, max_bytes=10_000) as spool:
        assert spool.peek() == text
        assert spool.bytes_used == HEADER + len(text.encode())


def test_empty_record_refused(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=10_000) as spool, pytest.raises(ValueError):
        spool.append("")


def test_full_refuses_then_room_after_pop(tmp_path: Path) -> None:
    size = HEADER + len(rec(0))
    with Spool(tmp_path, max_bytes=size * 3) as spool:
        for i in range(3):
            spool.append(rec(i))
        with pytest.raises(SpoolFull):
            spool.append(rec(3))
        assert spool.records == 3
        spool.pop()
        spool.append(rec(3))
        with pytest.raises(SpoolFull):
            spool.append(rec(4))
        assert drain(spool) == [rec(1), rec(2), rec(3)]


def test_restart_resumes_at_head(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=100_000, segment_bytes=200) as spool:
        for i in range(30):
            spool.append(rec(i))
        for _ in range(12):
            spool.pop()
    with Spool(tmp_path, max_bytes=100_000, segment_bytes=200) as spool:
        assert spool.records == 18
        assert spool.bytes_used == sum(HEADER + len(rec(i)) for i in range(12, 30))
        for _ in range(3):
            spool.pop()
        spool.append(rec(30))
    with Spool(tmp_path, max_bytes=100_000, segment_bytes=200) as spool:
        assert drain(spool) == [rec(i) for i in range(15, 31)]


def test_restart_without_close(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    spool.append(rec(0))
    spool.append(rec(1))
    spool.pop()
    # no close(): as after a crash
    again = Spool(tmp_path, max_bytes=10_000)
    assert drain(again) == [rec(1)]
    again.close()
    spool.close()


def test_fifo_across_segments_and_consumed_segments_deleted(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=100_000, segment_bytes=100) as spool:
        for i in range(40):
            spool.append(rec(i))
        assert len(segments(tmp_path)) > 5
        got = [spool.peek()]
        spool.pop()
        for i in range(40, 50):  # appends interleaved with replay
            spool.append(rec(i))
            got.append(spool.peek())
            spool.pop()
        got += drain(spool)
        assert got == [rec(i) for i in range(50)]
        assert len(segments(tmp_path)) == 1  # only the tail segment is left
        spool.append(rec(50))
    with Spool(tmp_path, max_bytes=100_000, segment_bytes=100) as spool:
        assert drain(spool) == [rec(50)]


def lines_of(i: int, n: int) -> str:
    return "".join(rec(i * 10 + k) for k in range(n))


def test_peek_many_within_limits_and_pop_many_in_one_head_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Spool(tmp_path, max_bytes=100_000, segment_bytes=100) as spool:
        for i in range(30):
            spool.append(lines_of(i, 3))
        assert len(segments(tmp_path)) > 5
        assert spool.peek_many(4) == [lines_of(i, 3) for i in range(4)]
        assert spool.peek_many(max_lines=10) == [lines_of(i, 3) for i in range(3)]  # 9 lines; 12 would pass
        five = sum(len(lines_of(i, 3)) for i in range(5))
        assert spool.peek_many(max_bytes=five) == [lines_of(i, 3) for i in range(5)]
        assert spool.peek_many(max_bytes=1, max_lines=1) == [lines_of(0, 3)]  # the oldest always comes
        heads = []
        advance = spool._advance_head
        monkeypatch.setattr(spool, "_advance_head", lambda seg, off: (heads.append((seg, off)), advance(seg, off)))
        got = spool.peek_many(max_lines=21)
        assert got == [lines_of(i, 3) for i in range(7)]  # across segments, oldest first
        spool.pop(len(got))
        assert len(heads) == 1 and spool.records == 23
        assert spool.bytes_used == sum(HEADER + len(lines_of(i, 3)) for i in range(7, 30))
        spool.pop(3)  # without a peek first
        assert spool.peek() == lines_of(10, 3)
        with pytest.raises(SpoolError):
            spool.pop(21)
        assert spool.records == 20
    with Spool(tmp_path, max_bytes=100_000, segment_bytes=100) as spool:
        assert spool.peek_many(1000) == [lines_of(i, 3) for i in range(10, 30)]
        spool.pop(20)
        assert spool.records == spool.bytes_used == 0 and spool.peek_many(5) == []
        assert len(segments(tmp_path)) == 1


def test_peek_many_stops_before_a_damaged_record(tmp_path: Path) -> None:
    size = HEADER + len(rec(0))
    with Spool(tmp_path, max_bytes=10_000, segment_bytes=3 * size) as spool:
        for i in range(9):
            spool.append(rec(i))
    second = segments(tmp_path)[1]  # records 3, 4, 5; only the last segment is CRC-checked on open
    data = bytearray(second.read_bytes())
    data[size + HEADER + 2] ^= 0x20  # payload of record 4
    second.write_bytes(bytes(data))
    with Spool(tmp_path, max_bytes=10_000, segment_bytes=3 * size) as spool:
        assert spool.peek_many(100) == [rec(i) for i in range(4)]
        spool.pop(4)
        assert spool.peek_many(100) == [rec(i) for i in range(6, 9)]  # the damaged rest of its segment dropped
        spool.pop(3)
        assert spool.records == 0


def test_disk_use_bounded_while_cycling(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=2_000, segment_bytes=300) as spool:
        for i in range(200):
            spool.append(rec(i))
            if i >= 10:
                assert spool.peek() == rec(i - 10)
                spool.pop()
            on_disk = sum(p.stat().st_size for p in segments(tmp_path))
            assert on_disk <= spool.max_bytes + spool.segment_bytes + HEADER + len(rec(i))


def test_torn_tail_cut_on_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Spool(tmp_path, max_bytes=10_000) as spool:
        for i in range(5):
            spool.append(rec(i))
    (seg,) = segments(tmp_path)
    size = seg.stat().st_size
    os.truncate(seg, size - 5)  # crash in the middle of the last record
    with caplog.at_level(logging.WARNING, logger="hub.spool"), Spool(tmp_path, max_bytes=10_000) as spool:
        assert spool.records == 4
        assert seg.stat().st_size == size - HEADER - len(rec(4))
        spool.append(rec(5))
        assert drain(spool) == [rec(0), rec(1), rec(2), rec(3), rec(5)]
    assert "cutting" in caplog.text and seg.name in caplog.text


@pytest.mark.parametrize("tail", [b"\x07\x00", b"\x00" * 64, b"\xff\xff\xff\x7f\x00\x00\x00\x00abc"])
def test_partial_header_zeros_and_bogus_length_cut_on_open(tmp_path: Path, tail: bytes) -> None:
    with Spool(tmp_path, max_bytes=10_000) as spool:
        spool.append(rec(0))
    (seg,) = segments(tmp_path)
    with open(seg, "ab") as f:
        f.write(tail)
    with Spool(tmp_path, max_bytes=10_000) as spool:
        assert spool.records == 1
        assert drain(spool) == [rec(0)]


def test_bad_crc_in_last_record_cut_on_open(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=10_000) as spool:
        spool.append(rec(0))
        spool.append(rec(1))
    (seg,) = segments(tmp_path)
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0x01
    seg.write_bytes(bytes(data))
    with Spool(tmp_path, max_bytes=10_000) as spool:
        assert drain(spool) == [rec(0)]


def test_damaged_record_in_older_segment_drops_rest_of_that_segment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seg_bytes = 3 * (HEADER + len(rec(0)))
    with Spool(tmp_path, max_bytes=10_000, segment_bytes=seg_bytes) as spool:
        for i in range(9):
            spool.append(rec(i))
    first = segments(tmp_path)[0]
    data = bytearray(first.read_bytes())
    data[HEADER + len(rec(0)) + HEADER + 2] ^= 0x20  # payload of record 1
    first.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="hub.spool"), Spool(tmp_path, 10_000, seg_bytes) as spool:
        assert spool.records == 9  # only the last segment is CRC-checked on open
        got = drain(spool)
        assert spool.records == 0 and spool.bytes_used == 0
    assert got == [rec(0)] + [rec(i) for i in range(3, 9)]
    assert "damaged record" in caplog.text


def test_leftover_head_tmp_ignored(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=10_000) as spool:
        spool.append(rec(0))
        spool.append(rec(1))
        spool.pop()
    (tmp_path / "head.tmp").write_text("999 999\n")  # a head update that crashed before its rename
    with Spool(tmp_path, max_bytes=10_000) as spool:
        assert drain(spool) == [rec(1)]
    assert not (tmp_path / "head.tmp").exists()


def test_closed_spool_refuses_use(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    spool.close()
    with pytest.raises(SpoolError):
        spool.append(rec(0))


_CHILD = textwrap.dedent(
    """
    import sys
    from hub.ingest import Spool
    spool = Spool(sys.argv[1], max_bytes=50_000_000, segment_bytes=20_000)
    i = 0
    while True:
        spool.append(f"m f={i} {i}\\n" + "x" * (i % 300) + "\\n")
        print(i, flush=True)  # acked: append returned, so the record was fsynced
        i += 1
    """
)


def test_kill_minus_9_loses_no_acked_record(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert child.stdout is not None
        acked = -1
        for text in child.stdout:
            acked = int(text)
            if acked >= 100:
                break
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert acked >= 100
    with Spool(tmp_path, max_bytes=50_000_000, segment_bytes=20_000) as spool:
        got = drain(spool)
    assert len(got) >= acked + 1
    assert got == [f"m f={i} {i}\n" + "x" * (i % 300) + "\n" for i in range(len(got))]
