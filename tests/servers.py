"""Servers for tests, on loopback: real VictoriaMetrics, InfluxDB 1.x and Redis, a scripted HTTP write endpoint, a
scripted device hub (`FakeHub`), a static site serving the web console (`ConsoleSite`)."""

from __future__ import annotations

import atexit
import contextlib
import gzip
import http.server
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from bench.procs import listening_ports
from device_client import ProtocolError
from device_client.protocol import (
    DEVICE_PATH,
    Ack,
    CloseCode,
    Command,
    CommandAck,
    CommandResult,
    Error,
    ErrorCode,
    Hello,
    Telemetry,
    Welcome,
    decode,
    encode,
)
from hub.web import CONSOLE_DIR, CONTENT_SECURITY_POLICY
from tests.wire import http_get, http_post

__all__ = [
    "FAST",
    "TS",
    "Conn",
    "ConsoleSite",
    "FakeHub",
    "HAProxy",
    "InfluxDB1",
    "Plan",
    "Redis",
    "ScriptedWriteServer",
    "VictoriaMetrics",
    "batch",
]

#: The first timestamp of `batch`.
TS = 1_700_000_000_000
#: DeviceClient options for quick reconnects to a `FakeHub`.
FAST = {"backoff_initial": 0.01, "backoff_max": 0.05}

_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        proc.kill()


def _require(binary: str, package: str) -> str:
    # Debian puts some servers (haproxy) in /usr/sbin, which a non-login PATH may lack.
    path = shutil.which(binary, path=os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin", "/sbin")))
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
    needs_port = True  # False: the server listens on something else (a Unix socket), known before it starts
    pass_fds: tuple[int, ...] = ()  # descriptors the server inherits (a listening socket the test bound)

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
                [self._exe, *self._args()],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                pass_fds=self.pass_fds,
            )
        _LIVE.add(self._proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._fail(f"exited with code {self._proc.returncode}")
            if self.needs_port and not self.port:
                with open(self.log_path, "rb") as logf:
                    logf.seek(offset)
                    self.port = self._bound_port(self._proc.pid, logf.read().decode(errors="replace")) or 0
            try:
                if (self.port or not self.needs_port) and self._ready():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self._fail(f"did not answer within {timeout} s")

    def _fail(self, why: str) -> None:
        tail = self.log_path.read_text(errors="replace")[-3000:]
        self.stop()
        where = f"on port {self.port}" if self.needs_port else f"in {self.directory}"
        pytest.fail(f"{self.binary} {where} {why}; log tail:\n{tail}", pytrace=False)

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

    def pause(self) -> None:
        """SIGSTOP: the server hangs (connections stay open, nothing is answered) until `resume`."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

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


class Redis(_Process):
    """A Redis server on a Unix socket in its directory (no TCP listener: `--port 0`); nothing saved to disk
    unless `persistent`."""

    binary = "redis-server"
    package = "redis-server"
    needs_port = False

    def __init__(self, directory: Path, *, persistent: bool = False) -> None:
        super().__init__(directory)
        self.persistent = persistent  # an append-only file in its directory: what it holds survives a restart
        self.socket_path = self.directory / "redis.sock"
        if len(str(self.socket_path)) > 100:  # a Unix socket path holds at most 107 bytes
            self.socket_path = Path(tempfile.mkdtemp(prefix="redis-")) / "redis.sock"

    @property
    def url(self) -> str:
        """Its URL for coredis and `[state] url`."""
        return f"unix://{self.socket_path}"

    def stop(self) -> None:
        super().stop()
        if self.socket_path.parent != self.directory:  # the short directory made for a long path
            shutil.rmtree(self.socket_path.parent, ignore_errors=True)

    def _args(self) -> list[str]:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)  # again after a restart
        return [
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
        ]  # fmt: skip

    def _ready(self) -> bool:
        return self.command(b"PING") == b"+PONG\r\n"

    def command(self, *words: bytes) -> bytes:
        """Send one command; its raw RESP reply (one read: small replies only), for checks without a client."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(str(self.socket_path))
            sock.sendall(b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words))
            return sock.recv(65536)


#: The repository's load balancer configuration, which `HAProxy` runs with its `bind` and `server` lines replaced.
HAPROXY_CFG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
_MONITOR_URI = "/haproxy-up"


def haproxy_config(listen_fd: int, hubs: list[tuple[int, int]], check_inter: str = "200ms") -> str:
    """deploy/haproxy.cfg bound to inherited descriptor `listen_fd`, its backend the hubs at (port, metrics port) on
    loopback, checked every `check_inter` (a dead hub is out after two failed checks, as in the file)."""
    out: list[str] = []
    for line in HAPROXY_CFG.read_text().splitlines():
        words = line.split()
        if words[:1] == ["bind"]:
            out.append(f"    bind fd@{listen_fd}")
            out.append(f"    monitor-uri {_MONITOR_URI}")  # haproxy's own 200: it is up (for `_ready`)
        elif words[:1] == ["maxconn"]:
            out.append("    maxconn 1000")  # the file's needs twice as many descriptors, more than a test may open
        elif words[:1] == ["default-server"]:
            out.append(line.replace("inter 2s", f"inter {check_inter}"))
        elif words[:1] != ["server"]:
            out.append(line)
    out += [f"    server hub-{i} 127.0.0.1:{port} check port {metrics}" for i, (port, metrics) in enumerate(hubs, 1)]
    return "\n".join(out) + "\n"


class HAProxy(_Process):
    """HAProxy in the foreground, with deploy/haproxy.cfg in front of hubs on loopback.

    haproxy cannot tell which port it got for port 0, so this binds 127.0.0.1:0 itself and hands the socket over as an
    inherited descriptor (`bind fd@N`): the port is known before haproxy starts and never probed free.
    """

    binary = "haproxy"
    package = "haproxy"

    def __init__(self, directory: Path, hubs: list[tuple[int, int]]) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(1024)
        self._sock.set_inheritable(True)
        super().__init__(directory, self._sock.getsockname()[1])
        self.pass_fds = (self._sock.fileno(),)
        self.config_path = self.directory / "haproxy.cfg"
        self.config_path.write_text(haproxy_config(self._sock.fileno(), hubs))

    @property
    def ws_url(self) -> str:
        """The device endpoint through the load balancer."""
        return f"ws://127.0.0.1:{self.port}{DEVICE_PATH}"

    def _args(self) -> list[str]:
        return ["-db", "-f", str(self.config_path)]  # -db: foreground, no daemon

    def _ready(self) -> bool:
        return http_get(self.url + _MONITOR_URI, timeout=2)[0] == 200

    def close(self) -> None:
        """Stop haproxy and close the listening socket."""
        self.stop()
        self._sock.close()


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


class ConsoleSite:
    """The web console's files (hub/console/) over HTTP on 127.0.0.1 port 0, and /console/config.json naming the
    control channel that `control_url()` returns at each request: a site of a foreign origin (the hub serves the
    console itself). Its `origin` is known at once.

    Every answer carries the Content-Security-Policy the hub's own HTTP port gives the console (no inline script or
    style, connections only to its own origin and WebSocket URLs), so a console that breaks it fails here too.
    """

    directory = CONSOLE_DIR
    content_security_policy = CONTENT_SECURITY_POLICY

    def __init__(self, control_url: Callable[[], str]) -> None:
        site = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript"}

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(site.directory), **kwargs)

            def end_headers(self) -> None:
                self.send_header("Content-Security-Policy", site.content_security_policy)
                self.send_header("X-Content-Type-Options", "nosniff")
                super().end_headers()

            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/console/config.json":
                    super().do_GET()
                    return
                body = json.dumps({"control_url": control_url()}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> ConsoleSite:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


# ---------------------------------------------------------------------------- a scripted device hub


@attrs.define
class Plan:
    """How the fake hub treats one connection."""

    durable: bool = True  # keep the batches (and so re-ack them later)
    ack: bool = True  # send acks
    close_after: int | None = None  # close after this many telemetry messages
    close_code: int = CloseCode.GOING_AWAY
    ping_every: float | None = None  # ping the device this often (seconds), as the real hub does
    hold: float | None = None  # close (with close_code) this many seconds after the welcome


@attrs.define
class Conn:
    """What the fake hub saw on one connection."""

    device: str
    headers: dict[bytes, bytes]
    hello: Hello | None = None
    received: list[int] = attrs.field(factory=list)
    max_inflight: int = 0
    ws: Any = None
    frames: list[str] = attrs.field(factory=list)  # message types after the hello, in order
    acks: list[str] = attrs.field(factory=list)  # command ids acked
    results: list[CommandResult] = attrs.field(factory=list)
    close_code: int | None = None  # how the connection ended (either side's close code)
    closed_at: float | None = None  # trio time at which the hub saw the connection end


@attrs.define
class FakeHub:
    """The hub side of the device contract, small and scriptable: welcome, cumulative acks, errors, closes."""

    tokens: dict[str, str] | None = None  # token -> device; None accepts any "<name>.<secret>"
    window: int = 8
    max_points: int = 5000
    refuse_status: int | None = None  # refuse every handshake with this HTTP status
    refuse_first: int = 0  # refuse this many handshakes with 503 first
    retry_after: bytes | None = None
    reject_seqs: set[int] = attrs.field(factory=set)
    plans: list[Plan] = attrs.field(factory=list)  # one per connection, then `default`
    default: Plan = attrs.field(factory=Plan)
    lazy_acks: bool = False  # ack only when `window` batches are unacked or after a quiet moment
    max_message_size: int = 1_048_576
    notice: str | None = None  # an informational error (no seq) sent right after the welcome
    url: str = ""
    epoch: int = 0
    attempts: list[float] = attrs.field(factory=list)
    conns: list[Conn] = attrs.field(factory=list)
    durable: dict[str, int] = attrs.field(factory=dict)
    points: dict[str, dict[int, list[dict[str, Any]]]] = attrs.field(factory=dict)
    errors_sent: int = 0
    pongs: int = 0
    # Commands as the real hub keeps them: sent on every session until a result comes (then dropped here).
    open_commands: dict[str, dict[str, Command]] = attrs.field(factory=dict)
    unknown_ids: set[str] = attrs.field(factory=set)  # answer acks/results of these ids with unknown_command

    async def start(self, nursery: trio.Nursery) -> str:
        server = await nursery.start(
            partial(
                serve_websocket,
                self.handler,
                "127.0.0.1",
                0,
                None,
                max_message_size=self.max_message_size,
                connect_timeout=5,
            )
        )
        self.url = f"ws://127.0.0.1:{server.port}{DEVICE_PATH}"
        return self.url

    def seqs(self, device: str) -> list[int]:
        return sorted(self.points.get(device, {}))

    def all_points(self, device: str) -> list[dict[str, Any]]:
        held = self.points.get(device, {})
        return [p for seq in sorted(held) for p in held[seq]]

    def live(self, device: str) -> Conn | None:
        """The device's open connection, if any."""
        for conn in reversed(self.conns):
            if conn.device == device and conn.ws is not None and conn.ws.closed is None:
                return conn
        return None

    async def command(self, device: str, cmd: Command) -> None:
        """Queue a command like the hub: sent now if the device is online, again on each session until answered."""
        self.open_commands.setdefault(device, {})[cmd.id] = cmd
        await self.send_raw(device, cmd)

    async def send_raw(self, device: str, cmd: Command) -> bool:
        """Send one command frame on the device's open connection (no bookkeeping); False when offline."""
        conn = self.live(device)
        if conn is None:
            return False
        with contextlib.suppress(ConnectionClosed):
            await conn.ws.send_message(encode(cmd))
            return True
        return False

    async def drop(self, device: str, code: int = CloseCode.GOING_AWAY) -> None:
        """Close the device's open connection from the hub side."""
        conn = self.live(device)
        assert conn is not None, f"{device} is not connected"
        await conn.ws.aclose(code)

    def results(self, cid: str) -> list[CommandResult]:
        """Every result received for command `cid`, over all connections."""
        return [r for conn in self.conns for r in conn.results if r.id == cid]

    async def handler(self, request: WebSocketRequest) -> None:
        self.attempts.append(trio.current_time())
        headers = dict(request.headers)
        if request.path != DEVICE_PATH:
            await request.reject(404)
            return
        if b"origin" in headers:
            await request.reject(403)
            return
        if self.refuse_first:
            self.refuse_first -= 1
            await request.reject(503)
            return
        if self.refuse_status is not None:
            extra = [(b"retry-after", self.retry_after)] if self.retry_after else []
            await request.reject(self.refuse_status, extra_headers=extra)
            return
        token = headers.get(b"authorization", b"").decode().removeprefix("Bearer ")
        device = self.tokens.get(token) if self.tokens is not None else token.split(".")[0]
        if not device or "." not in token:
            await request.reject(401)
            return
        ws = await request.accept()
        conn = Conn(device, headers, ws=ws)
        self.conns.append(conn)
        plan = self.plans.pop(0) if self.plans else self.default
        async with trio.open_nursery() as nursery:
            if plan.ping_every is not None:
                nursery.start_soon(self._pinger, ws, plan.ping_every)
            with contextlib.suppress(ConnectionClosed):  # the client went away: nothing to do
                await self._session(ws, conn, plan)
            nursery.cancel_scope.cancel()
        conn.close_code = ws.closed.code if ws.closed is not None else None
        conn.closed_at = trio.current_time()

    async def _pinger(self, ws: Any, every: float) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                with trio.fail_after(5):
                    await ws.ping()
                self.pongs += 1
                await trio.sleep(every)

    async def _session(self, ws: Any, conn: Conn, plan: Plan) -> None:
        hello = decode(await ws.get_message())
        assert isinstance(hello, Hello)
        conn.hello = hello
        self.epoch += 1
        device = conn.device
        welcome = Welcome(device, self.durable.get(device, 0), self.epoch, self.window, self.max_points, 30.0)
        await ws.send_message(encode(welcome))
        if self.notice is not None:
            await ws.send_message(encode(Error(self.notice, "just so you know")))
        for cmd in list(self.open_commands.get(device, {}).values()):
            await ws.send_message(encode(cmd))
        if plan.close_after == 0:
            await ws.aclose(plan.close_code)
            return
        if plan.hold is not None:
            with trio.move_on_after(plan.hold):
                await self._session_loop(ws, conn, plan)
            await ws.aclose(plan.close_code)
            return
        await self._session_loop(ws, conn, plan)

    async def _session_loop(self, ws: Any, conn: Conn, plan: Plan) -> None:
        device = conn.device
        unacked = 0
        while True:
            with trio.move_on_after(0.02 if self.lazy_acks and unacked else math.inf) as idle:
                text = await ws.get_message()
            if idle.cancelled_caught:
                if plan.ack:
                    await ws.send_message(encode(Ack(self.durable.get(device, 0))))
                    unacked = 0
                continue
            if await self._command_answer(ws, conn, text):
                continue
            unacked += 1
            conn.max_inflight = max(conn.max_inflight, unacked)
            await self._telemetry(ws, conn, plan, text)
            if plan.ack and (not self.lazy_acks or unacked >= self.window):
                if self.lazy_acks:
                    await ws.send_message(encode(Ack(self.durable.get(device, 0))))
                unacked = 0
            if plan.close_after is not None and len(conn.received) >= plan.close_after:
                await ws.aclose(plan.close_code)
                return

    async def _command_answer(self, ws: Any, conn: Conn, text: str) -> bool:
        """Record a command ack or result (True), or leave the frame to `_telemetry` (False)."""
        try:
            msg = decode(text)
        except ProtocolError:
            return False
        conn.frames.append(type(msg).__name__)
        if isinstance(msg, CommandAck):
            conn.acks.append(msg.id)
        elif isinstance(msg, CommandResult):
            conn.results.append(msg)
            self.open_commands.get(conn.device, {}).pop(msg.id, None)
        else:
            return False
        if msg.id in self.unknown_ids:
            self.errors_sent += 1
            await ws.send_message(encode(Error(ErrorCode.UNKNOWN_COMMAND, f"no command {msg.id!r} for this device")))
        return True

    async def _telemetry(self, ws: Any, conn: Conn, plan: Plan, text: str) -> None:
        device = conn.device
        try:
            msg = decode(text)
        except ProtocolError as exc:
            self.errors_sent += 1
            await ws.send_message(encode(Error(exc.code, exc.detail, exc.seq)))
            return
        assert isinstance(msg, Telemetry)
        conn.received.append(msg.seq)
        held = self.durable.get(device, 0)
        if msg.seq <= held:
            if plan.ack and not self.lazy_acks:
                await ws.send_message(encode(Ack(held)))
            return
        if msg.seq in self.reject_seqs:
            self.errors_sent += 1
            await ws.send_message(encode(Error(ErrorCode.BAD_FIELD, "refused by the test", msg.seq)))
        elif plan.durable:
            self.points.setdefault(device, {})[msg.seq] = msg.points
        if plan.durable:
            self.durable[device] = msg.seq
            if plan.ack and not self.lazy_acks:
                await ws.send_message(encode(Ack(msg.seq)))


def batch(n: int = 1, base: int = 0, **fields: Any) -> list[dict[str, Any]]:
    """`n` points of measurement `m`, one millisecond apart from `TS + base`."""
    return [
        {"measurement": "m", "ts": TS + base + i, "fields": dict(fields or {"v": float(base + i)})} for i in range(n)
    ]
