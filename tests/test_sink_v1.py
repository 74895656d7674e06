"""InfluxV1Sink against a real InfluxDB 1.6 (written, read back with InfluxQL) and a scripted HTTP endpoint."""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hub.ingest import InfluxV1Sink, LineBuilder, SinkError, SinkRejected, SinkTooLarge, SinkUnavailable
from tests.ports import refused_port
from tests.servers import InfluxDB1, ScriptedWriteServer

TS = 1_700_000_000_000


def body(n: int, start: int = 0, measurement: str = "m") -> str:
    return "".join(f"{measurement},device=d f={i}.5 {TS + i}\n" for i in range(start, start + n))


class AuthInfluxDB1(InfluxDB1):
    """InfluxDB 1.x with `auth-enabled = true` and an admin user `admin` / `s3cret pw`."""

    user, password = "admin", "s3cret pw"

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        text = self.config_path.read_text()
        self.config_path.write_text(
            text.replace("  log-enabled = false\n", "  log-enabled = false\n  auth-enabled = true\n")
        )

    def start(self, timeout: float = 30.0) -> None:
        super().start(timeout)
        # Allowed without credentials while there is no user at all.
        self.query(f"CREATE USER {self.user} WITH PASSWORD '{self.password}' WITH ALL PRIVILEGES")

    def query(self, influxql: str, db: str | None = None) -> dict[str, Any]:
        params = {"q": influxql, "epoch": "ms", **({"db": db} if db else {})}
        req = urllib.request.Request(f"{self.url}/query", data=urllib.parse.urlencode(params).encode(), method="POST")
        if "CREATE USER" not in influxql:
            secret = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            req.add_header("Authorization", f"Basic {secret}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            result = json.loads(resp.read())
        assert all("error" not in r for r in result["results"]), result
        return result


@pytest.fixture
def auth_influxdb1(tmp_path: Path) -> Iterator[AuthInfluxDB1]:
    server = AuthInfluxDB1(tmp_path / "influxdb1-auth")
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------- real InfluxDB 1.6


def test_v1_sink_writes_every_type_and_reads_back(influxdb1: InfluxDB1) -> None:
    influxdb1.query("CREATE DATABASE iot")
    points = [
        {
            "measurement": "env room",
            "ts": TS + i,
            "fields": {"t": 20.5 + i, "whole": 21, "n": {"int": i}, "s": f'x "y" \\ {i}', "ok": i % 2 == 0},
            "tags": {"room": "a b,c=d"},
        }
        for i in range(30)
    ]
    sink = InfluxV1Sink(influxdb1.url, "iot")
    try:
        assert influxdb1.url in sink.description and "'iot'" in sink.description
        assert sink.check()
        builder = LineBuilder("dev 1")
        sink.write(builder.lines(points[:10]))
        sink.write(builder.lines(points[10:]))
    finally:
        sink.close()
    rows = influxdb1.rows('SELECT * FROM "env room"', "iot")
    assert len(rows) == 30
    assert [r["time"] for r in rows] == [TS + i for i in range(30)]  # ms precision kept
    assert rows[3] == {
        "time": TS + 3,
        "t": 23.5,
        "whole": 21,  # a float field: 21.0 is shown as 21 in JSON
        "n": 3,
        "s": 'x "y" \\ 3',
        "ok": False,
        "device": "dev 1",
        "room": "a b,c=d",
    }
    field_types = influxdb1.rows('SHOW FIELD KEYS FROM "env room"', "iot")
    assert {r["fieldKey"]: r["fieldType"] for r in field_types} == {
        "t": "float",
        "whole": "float",
        "n": "integer",
        "s": "string",
        "ok": "boolean",
    }


def test_v1_sink_retention_policy(influxdb1: InfluxDB1) -> None:
    influxdb1.query("CREATE DATABASE iot")
    influxdb1.query('CREATE RETENTION POLICY "week" ON "iot" DURATION 100000h REPLICATION 1')
    sink = InfluxV1Sink(influxdb1.url, "iot", retention_policy="week")
    try:
        assert "'week'" in sink.description
        sink.write(body(3))
    finally:
        sink.close()
    assert len(influxdb1.rows('SELECT * FROM "iot"."week"."m"', "iot")) == 3
    assert influxdb1.rows('SELECT * FROM "iot"."autogen"."m"', "iot") == []


def test_v1_sink_refusals_from_influxdb(influxdb1: InfluxDB1) -> None:
    sink = InfluxV1Sink(influxdb1.url, "missing")
    try:
        with pytest.raises(SinkUnavailable) as info:  # keep the data: someone may create the database
            sink.write(body(1))
        assert info.value.status == 404 and 'database not found: "missing"' in str(info.value)
    finally:
        sink.close()
    influxdb1.query("CREATE DATABASE iot")
    sink = InfluxV1Sink(influxdb1.url, "iot")
    try:
        sink.write(body(2))
        with pytest.raises(SinkRejected) as rejected:
            sink.write(f'm,device=d f="text" {TS + 5}\n')
        assert rejected.value.status == 400 and "field type conflict" in str(rejected.value)
        with pytest.raises(SinkRejected):
            sink.write("m,device=d f= 1\n")
        sink.write(body(1, start=2))  # the connection is still usable after refusals
    finally:
        sink.close()
    assert len(influxdb1.rows("SELECT * FROM m", "iot")) == 3


def test_v1_sink_database_down_and_back(influxdb1: InfluxDB1, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="hub.sinks")
    influxdb1.query("CREATE DATABASE iot")
    sink = InfluxV1Sink(influxdb1.url, "iot", timeout_s=5.0)
    try:
        sink.write(body(1))  # leaves a kept-alive connection to this server process
        influxdb1.stop()
        assert not sink.check()
        with pytest.raises(SinkUnavailable) as info:
            sink.write(body(1, start=1))
        assert info.value.status is None and influxdb1.url in str(info.value)
        influxdb1.start()
        sink.write(body(1, start=2))
        sink.write(body(1, start=3))
        caplog.clear()
        influxdb1.restart()
        sink.write(body(1, start=4))  # its kept-alive connection died with the old process: reconnects
        assert "kept-alive connection" in caplog.text
    finally:
        sink.close()
    assert [r["time"] for r in influxdb1.rows("SELECT * FROM m", "iot")] == [TS, TS + 2, TS + 3, TS + 4]


def test_v1_sink_basic_auth(auth_influxdb1: AuthInfluxDB1) -> None:
    db = auth_influxdb1
    db.query("CREATE DATABASE iot")
    good = InfluxV1Sink(db.url, "iot", username=db.user, password=db.password)
    bad = InfluxV1Sink(db.url, "iot", username=db.user, password="wrong")
    anonymous = InfluxV1Sink(db.url, "iot")
    try:
        assert db.password not in good.description and db.user in good.description
        good.write(body(2))
        for sink in (bad, anonymous):
            with pytest.raises(SinkUnavailable) as info:  # misconfiguration: keep the data, say so loudly
                sink.write(body(1, start=5))
            assert info.value.status == 401
            assert sink.check()  # /ping needs no credentials: reachable, but writes fail
    finally:
        for sink in (good, bad, anonymous):
            sink.close()
    rows = db.query("SELECT * FROM m", "iot")["results"][0]["series"][0]["values"]
    assert [row[0] for row in rows] == [TS, TS + 1]


# ---------------------------------------------------------------------------- scripted answers


def test_v1_sink_request_shape(scripted: ScriptedWriteServer) -> None:
    sink = InfluxV1Sink(scripted.url + "/influx/", "my db", retention_policy="r p", username="hub", password="p&w d")
    try:
        sink.write(body(3))
        sink.write(body(1))
    finally:
        sink.close()
    path, received = scripted.requests[0]
    url = urllib.parse.urlsplit(path)
    assert url.path == "/influx/write"
    assert urllib.parse.parse_qs(url.query) == {"db": ["my db"], "rp": ["r p"], "precision": ["ms"]}
    assert received == body(3)
    headers = scripted.headers[0]
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Content-Type"].startswith("text/plain")
    assert base64.b64decode(headers["Authorization"].removeprefix("Basic ")) == b"hub:p&w d"
    assert all("p&w" not in urllib.parse.unquote(p) and "u=" not in p for p, _ in scripted.requests)
    assert len(scripted.requests) == 2


def test_v1_sink_without_gzip_or_credentials(scripted: ScriptedWriteServer) -> None:
    sink = InfluxV1Sink(scripted.url, "db", gzip=False)
    try:
        sink.write(body(1))
    finally:
        sink.close()
    path, received = scripted.requests[0]
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(path).query) == {"db": ["db"], "precision": ["ms"]}
    assert received == body(1)
    assert "Content-Encoding" not in scripted.headers[0] and "Authorization" not in scripted.headers[0]


@pytest.mark.parametrize(
    ("status", "headers", "kind", "retry_after"),
    [
        (400, {}, SinkRejected, None),
        (413, {}, SinkTooLarge, None),
        (429, {"Retry-After": "7"}, SinkUnavailable, 7.0),
        (503, {"Retry-After": "2.5"}, SinkUnavailable, 2.5),
        (500, {}, SinkUnavailable, None),
        (401, {}, SinkUnavailable, None),
        (403, {}, SinkUnavailable, None),
        (404, {}, SinkUnavailable, None),
    ],
)
def test_v1_sink_maps_statuses_without_retrying(
    scripted: ScriptedWriteServer,
    status: int,
    headers: dict[str, str],
    kind: type[SinkError],
    retry_after: float | None,
) -> None:
    message = b'{"error":"partial write: field type conflict: dropped=1"}'
    scripted.responder = lambda path, text: (status, {"Content-Type": "application/json", **headers}, message)
    sink = InfluxV1Sink(scripted.url, "db")
    try:
        with pytest.raises(SinkError) as info:
            sink.write(body(2))
    finally:
        sink.close()
    assert type(info.value) is kind
    assert info.value.status == status
    assert info.value.retry_after == retry_after
    assert str(info.value) == f"HTTP {status}: partial write: field type conflict: dropped=1"
    assert len(scripted.requests) == 1  # the sink never retries by itself: the pipeline does


def test_v1_sink_retry_after_http_date_and_plain_error_body(scripted: ScriptedWriteServer) -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    scripted.responder = lambda path, text: (503, {"Retry-After": when}, b"<html>overloaded</html>")
    sink = InfluxV1Sink(scripted.url, "db")
    try:
        with pytest.raises(SinkUnavailable) as info:
            sink.write(body(1))
    finally:
        sink.close()
    assert info.value.retry_after is not None and 60 < info.value.retry_after <= 120
    assert "overloaded" in str(info.value)


def test_v1_sink_timeout_is_unavailable_and_not_resent(scripted: ScriptedWriteServer) -> None:
    def slow(path: str, text: str) -> tuple[int, dict[str, str], bytes]:
        time.sleep(2)
        return 204, {}, b""

    sink = InfluxV1Sink(scripted.url, "db", timeout_s=0.3)
    try:
        sink.write(body(1))  # a kept-alive connection: a timeout on it must not be taken for a stale one
        scripted.responder = slow
        with pytest.raises(SinkUnavailable) as info:
            sink.write(body(1, start=1))
    finally:
        sink.close()
    assert info.value.status is None
    assert len(scripted.requests) == 2


def test_v1_sink_connection_refused_and_bad_settings() -> None:
    sink = InfluxV1Sink(f"http://127.0.0.1:{refused_port()}", "db")
    try:
        assert not sink.check()
        with pytest.raises(SinkUnavailable) as info:
            sink.write(body(1))
        assert info.value.status is None and info.value.retry_after is None
        assert "127.0.0.1" in str(info.value)
    finally:
        sink.close()
    with pytest.raises(ValueError, match="http"):
        InfluxV1Sink("influx:8086", "db")
    with pytest.raises(ValueError, match="database"):
        InfluxV1Sink("http://influx:8086", "")
