"""`python -m bench.compression --quick`: the report has its figures for every scheme, and every scheme round-trips."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from bench import compression

ROOT = Path(__file__).resolve().parent.parent


def test_quick_report(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "bench.compression", "--quick", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert "round trip" in done.stdout and "FAILED" not in done.stdout
    report = json.loads(out.read_text())
    assert report["quick"] is True
    names = set(report["schemes"])
    assert {"json", "pmd-ctx-w15", "pmd-noctx-w9", "zjson", "zjson+dict"} <= names
    assert set(report["results"]) == set(compression.WORKLOADS)
    for by_n in report["results"].values():
        assert set(by_n) == {"1", "10", "100"}
        for n, rows in by_n.items():
            assert set(rows) == names
            for row in rows.values():
                assert row["roundtrip"] is True
                # at least the payload plus a 2-byte header and the 4-byte mask, per message
                assert row["wire_per_point"] >= row["payload_per_point"] + 6 / int(n) - 1e-9
    timed = report["results"]["template"]["10"]
    for name in ("json", "zjson+dict"):
        assert {"encode_s_per_mpt", "inflate_s_per_mpt", "to_dicts_s_per_mpt", "hub_s_per_mpt"} <= set(timed[name])
    assert all(m["tracemalloc_bytes"] > 0 for m in report["memory"].values())
    assert set(report["transient_peak_bytes_100pt"]) <= names
    assert report["bombs"]
    for bomb in report["bombs"]:
        assert bomb["refused"] is True
        assert bomb["inflated_before_refusal"] <= report["message_limit"] + 1
    assert len(report["load_average"]["start"]) == 3


@pytest.mark.parametrize("scheme", compression.schemes(), ids=lambda s: s.name)
def test_every_scheme_round_trips_each_batch_exactly(scheme: compression.Scheme) -> None:
    for _, make in compression.WORKLOADS.values():
        stream = list(make(10, 30))
        enc, dec = scheme.encoder(), scheme.to_points()
        for seq, points in enumerate(stream, 1):
            assert dec(enc(seq, points)) == points


def test_inflate_limited_refuses_past_the_limit_and_takes_up_to_it() -> None:
    limit = 1000
    exact = zlib.compressobj(9, zlib.DEFLATED, -15)
    frame = exact.compress(bytes(limit)) + exact.flush()
    assert compression.inflate_limited(frame, limit) == bytes(limit)
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    frame = bomb.compress(bytes(limit * 1000)) + bomb.flush()
    with pytest.raises(ValueError):
        compression.inflate_limited(frame, limit)


def test_built_report_goes_through_the_hub_session_and_matches_the_measured_bytes() -> None:
    report = compression.built(points=200, repeats=1, quick=True)
    rows = report["template"]
    assert set(rows) == {"1", "10", "100"}
    for row in rows.values():
        assert row["deflate-d1_wire_per_point"] < row["text_wire_per_point"]
        assert row["text_hub_s_per_mpt"] > 0 and row["deflate-d1_hub_s_per_mpt"] > 0 and row["deflate_s_per_mpt"] > 0
    # device_client's frames are the measured scheme's, byte for byte (tests/test_compression.py): same sizes here.
    stream = list(compression.WORKLOADS["template"][1](10, 100))
    frames, ok = compression._roundtrip(next(s for s in compression.schemes() if s.name == "zjson+dict"), stream)
    assert ok
    wire = sum(len(f) + compression.ws_header(len(f)) for f in frames) / 100
    assert rows["10"]["deflate-d1_wire_per_point"] == pytest.approx(wire)
