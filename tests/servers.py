"""Real servers for tests: VictoriaMetrics, InfluxDB 1.x, and a scripted HTTP write endpoint, on loopback."""

from __future__ import annotations

import atexit
import gzip
import http.server
import json
import re
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

from bench.procs import listening_ports

__all__ = [
    "InfluxDB1",
    "ScriptedWriteServer",
    "VictoriaMetrics",
    "free_port",
    "http_get",
    "http_post",
    "listening_ports",
    "refused_port",
]

_LIVE: set[subprocess.Popen[bytes]] = set()
#: Sockets that hold `refused_port` numbers for as long as the test process lives.
_HELD: list[socket.socket] = []


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        proc.kill()


def refused_port() -> int:
    """A TCP port on 127.0.0.1 where every connection is refused, for as long as the test process lives.

    A socket bound to it that never listens holds it: the kernel refuses connections, and no server (ours or another
    process's) can bind it meanwhile. Servers for tests bind port 0 and report the port they got instead.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    return int(sock.getsockname()[1])


#: The name older tests import, for a port where nothing answers.
free_port = refused_port


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
    """A server subprocess with its log file in its own directory.

    Without a `port`, the first start binds port 0 and reads the port the server got back (never a port probed free and
    then bound: another process may take it in between); `restart` keeps that port, since clients reconnect to it.
    """

    binary = ""
    package = ""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or 0  # 0 until the first start has read back the port the server bound
        self.log_path = self.directory / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._exe = _require(self.binary, self.package)

    @property
    def url(self) -> str:
        """Its base URL (known once it has started)."""
        assert self.port, "the port is known once the server has started"
        return f"http://127.0.0.1:{self.port}"

    def _args(self) -> list[str]:
        raise NotImplementedError

    def _bound_port(self, pid: int, log_text: str) -> int | None:
        """The port the server bound (after being told to bind port 0), once it shows; None before."""
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start and wait until the server answers; fail the test with the log tail otherwise."""
        assert self._proc is None, "already started"
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                [self._exe, *self._args()], stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        _LIVE.add(self._proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._fail(f"exited with code {self._proc.returncode}")
            if not self.port:
                with open(self.log_path, "rb") as logf:
                    logf.seek(offset)
                    self.port = self._bound_port(self._proc.pid, logf.read().decode(errors="replace")) or 0
            try:
                if self.port and self._ready():
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
            f"-httpListenAddr=127.0.0.1:{self.port}",  # 0 at the first start: read back from /proc
            "-retentionPeriod=100y",  # tests use fixed old timestamps; the default drops them silently
            "-search.latencyOffset=0s",
            "-search.disableCache",
            "-dedup.minScrapeInterval=1ms",  # resent points (same series and ms) count once
            "-loggerLevel=WARN",
        ]

    def _bound_port(self, pid: int, log_text: str) -> int | None:
        # It logs the address it was given ("127.0.0.1:0"), not the port it got: ask /proc. -httpListenAddr is
        # its only listener.
        ports = listening_ports(pid)
        return ports.pop() if len(ports) == 1 else None

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
bind-address = "127.0.0.1:0"

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


_HTTP_BIND = re.compile(r'(\[http\][^\[]*?bind-address = "127\.0\.0\.1:)\d+"')


class InfluxDB1(_Process):
    """InfluxDB 1.x (`/write?db=`, `/query` InfluxQL; no `/api/v2/write` before 1.8)."""

    binary = "influxd"
    package = "influxdb"

    def __init__(self, directory: Path, port: int | None = None) -> None:
        super().__init__(directory, port)
        self.config_path = self.directory / "influxdb.conf"
        self.config_path.write_text(_INFLUXDB1_CONFIG.format(dir=self.directory, port=self.port))

    def _args(self) -> list[str]:
        # A restart binds the port the first start got (subclasses may have edited the rest of the file).
        text = self.config_path.read_text()
        self.config_path.write_text(_HTTP_BIND.sub(rf'\g<1>{self.port}"', text))
        return ["-config", str(self.config_path)]

    def _bound_port(self, pid: int, log_text: str) -> int | None:
        found = re.search(r'msg="Listening on HTTP".* addr=127\.0\.0\.1:(\d+)', log_text)
        return int(found.group(1)) if found else None

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
        self.port = port or 0  # 0: any free port, read back at start
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Its base URL (known once it has started)."""
        assert self.port, "the port is known once the server has started"
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen (on the port it had, or any free one) and serve in a daemon thread."""
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
        self.port = self._server.server_address[1]
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
