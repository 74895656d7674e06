"""Real servers for tests: VictoriaMetrics, InfluxDB 1.x, and a scripted HTTP write endpoint, on loopback."""

from __future__ import annotations

import atexit
import gzip
import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

__all__ = ["InfluxDB1", "ScriptedWriteServer", "VictoriaMetrics", "free_port", "http_get", "http_post"]

_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        proc.kill()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """Status and body of a GET (HTTP errors are returned, not raised)."""
    return _http(urllib.request.Request(url), timeout)


def http_post(url: str, body: bytes, timeout: float = 10.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Status and body of a POST (HTTP errors are returned, not raised)."""
    return _http(urllib.request.Request(url, data=body, method="POST", headers=headers or {}), timeout)


def _http(req: urllib.request.Request, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _require(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed: apt-get install -y {package}", pytrace=False)
    return path


class _Process:
    """A server subprocess with its log file in its own directory."""

    binary = ""
    package = ""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.directory / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._exe = _require(self.binary, self.package)

    def _args(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start and wait until the server answers; fail the test with the log tail otherwise."""
        assert self._proc is None, "already started"
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                [self._exe, *self._args()], stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        _LIVE.add(self._proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._fail(f"exited with code {self._proc.returncode}")
            try:
                if self._ready():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self._fail(f"did not answer within {timeout} s")

    def _fail(self, why: str) -> None:
        tail = self.log_path.read_text(errors="replace")[-3000:]
        self.stop()
        pytest.fail(f"{self.binary} on port {self.port} {why}; log tail:\n{tail}", pytrace=False)

    def stop(self) -> None:
        """Terminate (kill after 10 s); safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _LIVE.discard(proc)

    def kill(self) -> None:
        """Kill -9 (a crash): no graceful shutdown."""
        if self._proc is not None:
            self._proc.kill()
        self.stop()

    def restart(self) -> None:
        """Stop and start again on the same port with the same data."""
        self.stop()
        self.start()

    def __enter__(self) -> _Process:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class VictoriaMetrics(_Process):
    """A single-node VictoriaMetrics (`POST /api/v2/write`, `/write`, read back with `export`)."""

    binary = "victoria-metrics"
    package = "victoria-metrics"

    def _args(self) -> list[str]:
        return [
            f"-storageDataPath={self.directory / 'data'}",
            f"-httpListenAddr=127.0.0.1:{self.port}",
            "-retentionPeriod=100y",  # tests use fixed old timestamps; the default drops them silently
            "-search.latencyOffset=0s",
            "-search.disableCache",
            "-dedup.minScrapeInterval=1ms",  # resent points (same series and ms) count once
            "-loggerLevel=WARN",
        ]

    def _ready(self) -> bool:
        return http_get(self.url + "/health", timeout=2)[0] == 200

    def export(self, match: str) -> list[dict[str, Any]]:
        """Series matching a selector such as `{__name__=~"m_.*"}`, as export's JSON lines."""
        http_get(self.url + "/internal/force_flush")
        query = urllib.parse.urlencode({"match[]": match})
        status, body = http_get(f"{self.url}/api/v1/export?{query}")
        assert status == 200, f"export {match}: HTTP {status} {body[:300]!r}"
        return [json.loads(line) for line in body.splitlines() if line.strip()]

    def wait_for_count(self, match: str, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll `export` until its series hold at least `n` samples; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            series = self.export(match)
            count = sum(len(s["values"]) for s in series)
            if count >= n:
                return series
            if time.monotonic() > deadline:
                raise AssertionError(f"{match}: {count} samples after {timeout} s, expected {n}")
            time.sleep(0.1)


_INFLUXDB1_CONFIG = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{dir}/meta"

[data]
  dir = "{dir}/data"
  wal-dir = "{dir}/wal"
  query-log-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{port}"
  log-enabled = false

[monitor]
  store-enabled = false

[continuous_queries]
  enabled = false

[subscriber]
  enabled = false
"""


class InfluxDB1(_Process):
    """InfluxDB 1.x (`/write?db=`, `/query` InfluxQL; no `/api/v2/write` before 1.8)."""

    binary = "influxd"
    package = "influxdb"

    def __init__(self, directory: Path, port: int | None = None) -> None:
        super().__init__(directory, port)
        self.config_path = self.directory / "influxdb.conf"
        self.config_path.write_text(_INFLUXDB1_CONFIG.format(rpc_port=free_port(), dir=self.directory, port=self.port))

    def _args(self) -> list[str]:
        return ["-config", str(self.config_path)]

    def _ready(self) -> bool:
        return http_get(self.url + "/ping", timeout=2)[0] == 204

    def query(self, influxql: str, db: str | None = None) -> dict[str, Any]:
        """Run InfluxQL (POST /query) and return the decoded JSON; fails on an HTTP or query error."""
        params = {"q": influxql, "epoch": "ms"}
        if db:
            params["db"] = db
        status, body = http_post(
            f"{self.url}/query",
            urllib.parse.urlencode(params).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        result = json.loads(body)
        assert status == 200 and "error" not in result, f"{influxql}: HTTP {status} {result}"
        for r in result.get("results", []):
            assert "error" not in r, f"{influxql}: {r['error']}"
        return result

    def write(self, lines: str, db: str, precision: str = "ms") -> tuple[int, bytes]:
        """POST line protocol to /write; returns (status, body)."""
        query = urllib.parse.urlencode({"db": db, "precision": precision})
        return http_post(f"{self.url}/write?{query}", lines.encode())

    def rows(self, influxql: str, db: str) -> list[dict[str, Any]]:
        """The rows of the first series of a query, as dicts of column -> value."""
        series = self.query(influxql, db)["results"][0].get("series", [])
        return [dict(zip(s["columns"], row, strict=True)) for s in series for row in s["values"]]


Responder = Callable[[str, str], "tuple[int, dict[str, str], bytes]"]


class ScriptedWriteServer:
    """A tiny real HTTP server on loopback that answers writes as a test script says.

    `responder(path, body) -> (status, headers, response_body)` decides each answer; the
    default accepts everything with 204. Every request is recorded as (path, body) in
    `requests`, and accepted bodies in `accepted` (gzip is undone).
    """

    def __init__(self, responder: Responder | None = None, port: int | None = None) -> None:
        self.responder: Responder = responder or (lambda path, body: (204, {}, b""))
        self.requests: list[tuple[str, str]] = []
        self.accepted: list[str] = []
        self.headers: list[dict[str, str]] = []  # request headers of each request
        self.times: list[float] = []  # time.monotonic() of each request
        self._lock = threading.Lock()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen and serve in a daemon thread."""
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._answer(204 if self.path.startswith("/ping") else 404, {}, b"")

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                body = raw.decode()
                with owner._lock:
                    owner.requests.append((self.path, body))
                    owner.headers.append(dict(self.headers.items()))
                    owner.times.append(time.monotonic())
                status, headers, payload = owner.responder(self.path, body)
                if 200 <= status < 300:
                    with owner._lock:
                        owner.accepted.append(body)
                self._answer(status, headers, payload)

            def _answer(self, status: int, headers: dict[str, str], payload: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def accepted_lines(self) -> list[str]:
        """Every accepted line, in arrival order."""
        with self._lock:
            return [ln for body in self.accepted for ln in body.splitlines()]

    def __enter__(self) -> ScriptedWriteServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
