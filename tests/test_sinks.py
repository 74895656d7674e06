"""Sinks against real servers: VictoriaMetrics, a scripted HTTP endpoint for error answers, InfluxDB 1.x for files."""

from __future__ import annotations

import email.utils
import os
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from hub.ingest import FileSink, InfluxV2Sink, SinkError, SinkRejected, SinkTooLarge, SinkUnavailable
from hub.ingest._sinks import file_header, import_commands, parse_retry_after
from tests.ports import refused_port
from tests.servers import InfluxDB1, ScriptedWriteServer, VictoriaMetrics

TS = 1_700_000_000_000


def body(n: int, start: int = 0, measurement: str = "m") -> str:
    return "".join(f"{measurement},device=d f={i}.5 {TS + i}\n" for i in range(start, start + n))


def v2(url: str, **kw: object) -> InfluxV2Sink:
    return InfluxV2Sink(url, token="secret-token", org="my-org", bucket="my-bucket", **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- InfluxV2Sink, real VictoriaMetrics


def test_v2_sink_writes_to_victoriametrics(victoria: VictoriaMetrics) -> None:
    sink = v2(victoria.url)
    try:
        assert victoria.url in sink.description and "my-bucket" in sink.description
        assert sink.check()
        sink.write(body(100))
        sink.write(body(50, start=100))
        (series,) = victoria.wait_for_count('{__name__="m_f"}', 150)
        assert series["metric"] == {"__name__": "m_f", "device": "d"}
        assert series["timestamps"] == [TS + i for i in range(150)]  # ms precision kept
        assert series["values"] == [i + 0.5 for i in range(150)]
    finally:
        sink.close()


def test_v2_sink_victoriametrics_skips_unparsable_line_with_204(victoria: VictoriaMetrics) -> None:
    # What is true of VictoriaMetrics: a bad line is logged and skipped, the request answers 204,
    # so the sink reports success and the good lines land. (InfluxDB answers 400: see scripted tests.)
    sink = v2(victoria.url)
    try:
        sink.write(body(2) + "m,device=d f= 1\n" + "garbage\n" + body(1, start=2))
        (series,) = victoria.wait_for_count('{__name__="m_f"}', 3)
        assert series["timestamps"] == [TS, TS + 1, TS + 2]
    finally:
        sink.close()


def test_v2_sink_database_down_and_back(victoria: VictoriaMetrics) -> None:
    sink = v2(victoria.url, timeout_s=5.0)
    try:
        sink.write(body(1))
        victoria.stop()
        assert not sink.check()
        with pytest.raises(SinkUnavailable) as info:
            sink.write(body(1, start=1))
        assert info.value.status is None
        victoria.start()
        sink.write(body(1, start=2))  # the pooled connection to the old process must not break this
        (series,) = victoria.wait_for_count('{__name__="m_f"}', 2)
        assert series["timestamps"] == [TS, TS + 2]
    finally:
        sink.close()


def test_v2_sink_connection_refused_is_unavailable() -> None:
    sink = v2(f"http://127.0.0.1:{refused_port()}")
    try:
        assert not sink.check()
        with pytest.raises(SinkUnavailable) as info:
            sink.write(body(1))
        assert info.value.status is None and info.value.retry_after is None
        assert "127.0.0.1" in str(info.value)
    finally:
        sink.close()


# ---------------------------------------------------------------------------- InfluxV2Sink, scripted answers


def test_v2_sink_request_shape(scripted: ScriptedWriteServer) -> None:
    sink = v2(scripted.url)
    try:
        sink.write(body(3))
        sink.write(body(1))
    finally:
        sink.close()
    path, received = scripted.requests[0]
    url = urllib.parse.urlsplit(path)
    assert url.path == "/api/v2/write"
    assert urllib.parse.parse_qs(url.query) == {"org": ["my-org"], "bucket": ["my-bucket"], "precision": ["ms"]}
    assert received.rstrip("\n") == body(3).rstrip("\n")
    assert scripted.headers[0]["Authorization"] == "Token secret-token"
    assert scripted.headers[0]["Content-Encoding"] == "gzip"
    assert len(scripted.requests) == 2


def test_v2_sink_without_gzip(scripted: ScriptedWriteServer) -> None:
    sink = v2(scripted.url, gzip=False)
    try:
        sink.write(body(1))
    finally:
        sink.close()
    assert "Content-Encoding" not in scripted.headers[0]


@pytest.mark.parametrize(
    ("status", "headers", "kind", "retry_after"),
    [
        (400, {}, SinkRejected, None),
        (422, {}, SinkRejected, None),
        (413, {}, SinkTooLarge, None),
        (429, {"Retry-After": "7"}, SinkUnavailable, 7.0),
        (503, {"Retry-After": "2.5"}, SinkUnavailable, 2.5),
        (500, {}, SinkUnavailable, None),
        (502, {}, SinkUnavailable, None),
        (401, {}, SinkUnavailable, None),
        (403, {}, SinkUnavailable, None),
        (404, {}, SinkUnavailable, None),
    ],
)
def test_v2_sink_maps_statuses_without_retrying(
    scripted: ScriptedWriteServer,
    status: int,
    headers: dict[str, str],
    kind: type[SinkError],
    retry_after: float | None,
) -> None:
    message = b'{"code":"invalid","message":"partial write: field type conflict"}'
    scripted.responder = lambda path, text: (status, {"Content-Type": "application/json", **headers}, message)
    sink = v2(scripted.url)
    try:
        with pytest.raises(SinkError) as info:
            sink.write(body(2))
    finally:
        sink.close()
    assert type(info.value) is kind
    assert info.value.status == status
    assert info.value.retry_after == retry_after
    assert str(status) in str(info.value) and "field type conflict" in str(info.value)
    assert len(scripted.requests) == 1  # the client itself never retries: the pipeline does


def test_v2_sink_retry_after_http_date(scripted: ScriptedWriteServer) -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    scripted.responder = lambda path, text: (503, {"Retry-After": when}, b"")
    sink = v2(scripted.url)
    try:
        with pytest.raises(SinkUnavailable) as info:
            sink.write(body(1))
    finally:
        sink.close()
    assert info.value.retry_after is not None and 60 < info.value.retry_after <= 120


def test_v2_sink_timeout_is_unavailable(scripted: ScriptedWriteServer) -> None:
    def slow(path: str, text: str) -> tuple[int, dict[str, str], bytes]:
        time.sleep(3)
        return 204, {}, b""

    scripted.responder = slow
    sink = v2(scripted.url, timeout_s=0.3)
    try:
        with pytest.raises(SinkUnavailable) as info:
            sink.write(body(1))
    finally:
        sink.close()
    assert info.value.status is None


def test_parse_retry_after() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("30") == 30.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after("soon") is None
    now = 1_700_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 90, usegmt=True), now=now) == 90.0
    assert parse_retry_after(email.utils.formatdate(now - 90, usegmt=True), now=now) == 0.0


# ---------------------------------------------------------------------------- FileSink


def lp_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("lines-*.lp"))


def data(path: Path) -> str:
    """A file's lines after its import header."""
    text = path.read_text()
    header = file_header("telemetry")
    assert text.startswith(header), text[:300]
    return text[len(header) :]


def test_file_sink_appends_and_describes_import(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "out")
    try:
        assert str(tmp_path / "out") in sink.description
        assert "influx write --bucket B --precision ms --file F" in sink.description  # InfluxDB 2.x
        assert "influx -import -path=F -precision=ms" in sink.description  # InfluxDB 1.x
        assert sink.check()
        sink.write(body(3))
        sink.write(body(2, start=3))
        (f,) = lp_files(tmp_path / "out")
        assert f == sink.current_file
        assert data(f) == body(5)
    finally:
        sink.close()


def test_file_sink_header_names_the_database_for_influx_import(tmp_path: Path) -> None:
    sink = FileSink(tmp_path, database="plant 7")
    try:
        sink.write(body(1))
    finally:
        sink.close()
    (f,) = lp_files(tmp_path)
    lines = f.read_text().splitlines()
    assert all(line.startswith("#") for line in lines[:-1]) and lines[-1] == body(1).strip()
    assert lines[-3:-1] == ["# DML", "# CONTEXT-DATABASE: plant 7"]  # what `influx -import` (1.x) needs


def test_file_sink_rotates_by_size(tmp_path: Path) -> None:
    one = body(1)
    header = len(file_header("telemetry"))
    sink = FileSink(tmp_path, max_bytes=header + len(one) * 3)
    try:
        for i in range(7):
            sink.write(body(1, start=i))
    finally:
        sink.close()
    files = lp_files(tmp_path)
    assert [f.stat().st_size - header for f in files] == [len(one) * 3, len(one) * 3, len(one)]
    assert "".join(data(f) for f in files) == body(7)  # names sort in write order


def test_file_sink_puts_a_write_larger_than_a_file_in_one_file(tmp_path: Path) -> None:
    sink = FileSink(tmp_path, max_bytes=10)  # smaller than the header: every write gets a file of its own
    try:
        for i in range(3):
            sink.write(body(2, start=i * 2))
    finally:
        sink.close()
    assert [data(f) for f in lp_files(tmp_path)] == [body(2), body(2, start=2), body(2, start=4)]


def test_file_sink_rotates_by_age(tmp_path: Path) -> None:
    now = [1000.0]
    sink = FileSink(tmp_path, max_age_s=60, clock=lambda: now[0])
    try:
        sink.write(body(1))
        now[0] += 59
        sink.write(body(1, start=1))
        now[0] += 2
        sink.write(body(1, start=2))
    finally:
        sink.close()
    files = lp_files(tmp_path)
    assert [data(f) for f in files] == [body(2), body(1, start=2)]


def test_file_sink_starts_a_new_file_after_restart(tmp_path: Path) -> None:
    for i in range(2):
        sink = FileSink(tmp_path)
        sink.write(body(1, start=i))
        sink.close()
    assert [data(f) for f in lp_files(tmp_path)] == [body(1), body(1, start=1)]


def test_file_sink_names_sort_in_write_order_even_within_a_millisecond(tmp_path: Path) -> None:
    sink = FileSink(tmp_path, max_bytes=1)  # every write starts a new file
    try:
        for i in range(30):
            sink.write(body(1, start=i))
    finally:
        sink.close()
    files = lp_files(tmp_path)
    assert len(files) == 30
    assert [data(f) for f in files] == [body(1, start=i) for i in range(30)]


def test_file_sink_check_fails_without_directory(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "gone")
    os.rmdir(tmp_path / "gone")
    assert not sink.check()
    sink.close()


def sink_files(directory: Path, database: str = "telemetry") -> list[Path]:
    """Files the file sink wrote: 40 points of every field type, in several files."""
    from hub.ingest import LineBuilder

    b = LineBuilder("dev 1")
    points = [
        {
            "measurement": "env",
            "ts": TS + i,
            "fields": {"t": 20.5, "n": {"int": i}, "s": 'x "y"', "ok": True},
            "tags": {"room": "a b"},
        }
        for i in range(40)
    ]
    sink = FileSink(directory, max_bytes=1500, database=database)
    try:
        for i in range(0, 40, 8):
            sink.write(b.lines(points[i : i + 8]))
    finally:
        sink.close()
    files = lp_files(directory)
    assert len(files) > 1
    return files


def check_imported(influxdb1: InfluxDB1, database: str) -> None:
    rows = influxdb1.rows("SELECT * FROM env", database)
    assert [r["n"] for r in rows] == list(range(40))
    assert rows[0] == {"time": TS, "t": 20.5, "n": 0, "s": 'x "y"', "ok": True, "device": "dev 1", "room": "a b"}


def test_file_sink_files_import_into_influxdb(tmp_path: Path, influxdb1: InfluxDB1) -> None:
    """Each file, header and all, is accepted by the write API (the header lines are comments to it)."""
    influxdb1.query("CREATE DATABASE imported")
    for f in sink_files(tmp_path / "files"):
        assert f.read_text().endswith("\n")
        status, answer = influxdb1.write(f.read_text(), "imported", precision="ms")
        assert status == 204, answer
    check_imported(influxdb1, "imported")


def test_file_sink_files_import_with_the_influxdb1_cli(tmp_path: Path, influxdb1: InfluxDB1) -> None:
    """The command the hub prints for InfluxDB 1.x works: `influx -import` takes each file as it is."""
    influx = shutil.which("influx")
    if influx is None:
        pytest.fail("the influx CLI is not installed: apt-get install -y influxdb-client", pytrace=False)
    _, v1 = import_commands("plant")
    create, _, load = v1.partition(" && ")
    connect = ["-host", "127.0.0.1", "-port", str(influxdb1.port)]
    subprocess.run([influx, *connect, "-execute", create.split("'")[1]], check=True, timeout=60)
    for f in sink_files(tmp_path / "files", database="plant"):
        argv = [arg.replace("-path=F", f"-path={f}") for arg in load.split()[1:]]
        done = subprocess.run([influx, *connect, *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "Failed 0 inserts" in done.stdout, done.stdout + done.stderr
    check_imported(influxdb1, "plant")


# ---------------------------------------------------------------------------- the server helpers themselves


def test_victoria_restart_keeps_port_and_data(victoria: VictoriaMetrics) -> None:
    sink = v2(victoria.url)
    try:
        sink.write(body(3))
        victoria.wait_for_count('{__name__="m_f"}', 3)
        port = victoria.port
        victoria.restart()
        assert victoria.port == port and victoria.running
        sink.write(body(2, start=3))
        (series,) = victoria.wait_for_count('{__name__="m_f"}', 5)
        assert series["timestamps"] == [TS + i for i in range(5)]
    finally:
        sink.close()


def test_missing_server_binary_fails_with_package_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(VictoriaMetrics, "binary", "victoria-metrics-not-installed")
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y victoria-metrics"):
        VictoriaMetrics(tmp_path)
