"""The harness's child processes: VictoriaMetrics, `hub serve`, the baseline server and generators; /proc figures."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from bench.jsonl import LineReader

__all__ = [
    "Child",
    "ChildError",
    "HubProcess",
    "RedisServer",
    "VictoriaMetrics",
    "cpu_seconds",
    "descendants",
    "hub_limit_overrides",
    "listening_ports",
    "rss_bytes",
    "sched_threads",
    "toml_config",
    "tree_cpu_seconds",
]

_CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The checkout this harness lives in.
REPO_ROOT = Path(__file__).resolve().parents[1]


class ChildError(Exception):
    """A child process failed, or did not answer in time."""


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (from /proc: its socket inodes, matched in /proc/net/tcp and tcp6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads included (from /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def sched_threads(pid: int) -> dict[int, tuple[float, float, int]]:
    """What the scheduler did with each live thread of process `pid`, by thread id: seconds on a CPU, seconds runnable
    but waiting for one (in a run queue), and timeslices (from /proc/PID/task/*/schedstat)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:  # the thread ended
            continue
        out[int(task.name)] = int(fields[0]) / 1e9, int(fields[1]) / 1e9, int(fields[2])
    return out


def descendants(pid: int) -> list[int]:
    """Process `pid`'s children, their children and so on (from /proc/PID/task/*/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except OSError:  # gone meanwhile
                continue
            out += kids
            todo += kids
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of process `pid` and its live descendants (a supervisor and its workers)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
    return total


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ChildError(f"no VmRSS for process {pid}")


def _http(url: str, data: bytes | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


#: Server processes started and not stopped yet: killed when the harness exits, however it ends.
_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()


def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """SIGTERM, then SIGKILL after `timeout`; the exit code (None if it had to be killed)."""
    _LIVE.discard(proc)
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


class VictoriaMetrics:
    """Debian's single-node VictoriaMetrics on a free loopback port, data in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0  # it binds port 0; the port it got is read back from /proc at start
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its base URL (once started)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start it and wait until /health answers."""
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            "victoria-metrics",
            f"-storageDataPath={self.directory / 'data'}",
            "-httpListenAddr=127.0.0.1:0",  # it logs ":0", not the port it got: read back from /proc
            "-retentionPeriod=100y",  # by default it drops points older than a month, after answering 204
            "-search.latencyOffset=0s",
            "-search.disableCache",
            "-dedup.minScrapeInterval=1ms",  # a resent point (same series and ms) counts once
            "-loggerLevel=WARN",
        ]
        with open(self.directory / "victoria-metrics.log", "ab") as log:
            try:
                self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                _LIVE.add(self.proc)
            except FileNotFoundError:
                raise ChildError("victoria-metrics is not installed: apt-get install -y victoria-metrics") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ChildError(f"victoria-metrics exited with {self.proc.returncode}: see {self.directory}")
            if not self.port and len(ports := listening_ports(self.proc.pid)) == 1:  # -httpListenAddr only
                self.port = ports.pop()
            try:
                if self.port and _http(self.url + "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise ChildError(f"victoria-metrics did not answer within {timeout} s")

    @property
    def pid(self) -> int:
        """Its process id."""
        assert self.proc is not None
        return self.proc.pid

    def version(self) -> str:
        """The installed package's version (Debian's build reports none over HTTP); empty if unknown."""
        try:
            done = subprocess.run(
                ["dpkg-query", "-W", "-f", "${Version}", "victoria-metrics"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    def count(self, series_regex: str, span_s: int = 30 * 86400) -> int:
        """Samples (after deduplication) in the series whose names match, with timestamps from BASE_TS on."""
        from bench.wire import BASE_TS

        _http(self.url + "/internal/force_flush")
        at = BASE_TS // 1000 + span_s - 60  # the window (at - span, at] must include BASE_TS itself
        query = f'sum(count_over_time({{__name__=~"{series_regex}"}}[{span_s}s]))'
        params = urllib.parse.urlencode({"query": query, "time": str(at)})
        status, body = _http(f"{self.url}/api/v1/query?{params}", timeout=60)
        if status != 200:
            raise ChildError(f"victoria-metrics query {query}: HTTP {status} {body[:300]!r}")
        result = json.loads(body)["data"]["result"]
        return int(float(result[0]["value"][1])) if result else 0

    def stop(self) -> None:
        """Terminate it (kill after 10 s)."""
        if self.proc is not None:
            _stop_process(self.proc, 10.0)
            self.proc = None


class RedisServer:
    """Debian's redis-server on a Unix socket (no TCP, nothing saved to disk), as tests/servers.py's `Redis`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # A Unix socket path holds at most 107 bytes: a short directory of its own.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        self.socket_path = self.socket_dir / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its URL for `[state] url`."""
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int:
        """Its process id."""
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> None:
        """Start it and wait until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        args = [exe, "--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        args += ["--dir", str(self.directory), "--save", "", "--appendonly", "no"]
        with open(self.directory / "redis.log", "ab") as log:
            try:
                self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            except FileNotFoundError:
                raise ChildError("redis-server is not installed: apt-get install -y redis-server") from None
        _LIVE.add(self.proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ChildError(f"redis-server exited with {self.proc.returncode}: see {self.directory}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1)
                sock.connect(str(self.socket_path))
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                if sock.recv(64) == b"+PONG\r\n":
                    return
            time.sleep(0.05)
        self.stop()
        raise ChildError(f"redis-server did not answer within {timeout} s")

    def stop(self) -> None:
        """Terminate it (kill after 10 s) and remove its socket directory."""
        if self.proc is not None:
            _stop_process(self.proc, 10.0)
            self.proc = None
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def hub_limit_overrides() -> dict[str, Any]:
    """Config overrides ("section.key" -> value) that lift the hub's rate and connection limits, if it has any.

    Looks at the installed `hub.config` for options named like rate limits (`*rate*`, `*per_second*`, `*burst*`),
    connection caps (`*connections*`) and idle timeouts, so load runs are not throttled whatever the hardening
    calls them. The harness records what it changed in the results.
    """
    from hub.config import _SECTIONS

    out: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        for field in attrs.fields(cls):
            name = field.name
            default = field.default
            if isinstance(default, bool):
                continue
            if not isinstance(default, int | float):
                continue
            lifted = any(word in name for word in ("rate", "per_second", "per_sec", "burst", "per_minute"))
            lifted = lifted or "connections" in name
            if lifted:
                out[f"{section}.{name}"] = type(default)(10**9)
            elif "idle" in name and "timeout" in name:
                out[f"{section}.{name}"] = type(default)(86400)
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_config(overrides: Mapping[str, Any]) -> str:
    """A hub TOML config file from "section.key" -> value."""
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if key:
            sections.setdefault(section, {})[key] = value
        else:
            top[section] = value
    out = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for section, values in sections.items():
        out.append(f"\n[{section}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(out) + "\n"


class HubProcess:
    """`hub serve` as a child process, configured by a TOML file in its data directory.

    It binds port 0 and the port it got is read from its log (so it must log at info or debug).
    """

    def __init__(self, data_dir: Path, overrides: Mapping[str, Any], extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.port = 0  # known once started
        self.overrides = {
            **overrides,
            "server.host": "127.0.0.1",
            "server.port": 0,
            "storage.data_dir": str(data_dir),
            "metrics.http_port": 0,
        }
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """Its process id."""
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        """Its stderr/stdout."""
        return self.data_dir / "hub.log"

    def start(self, timeout: float = 30.0) -> None:
        """Start it and wait until the device port accepts TCP connections."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "hub.toml"
        config.write_text(toml_config(self.overrides))
        cmd = [sys.executable, "-m", "hub.cli", "serve", "--config", str(config), *self.extra_args]
        logged = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _LIVE.add(self.proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ChildError(f"hub exited with {self.proc.returncode}: {self.log_tail()}")
            if not self.port:
                with open(self.log_path, "rb") as log:
                    log.seek(logged)
                    found = re.search(rb'websocket endpoints listening.*?\bport"?[=:] ?(\d+)', log.read())
                self.port = int(found.group(1)) if found else 0
            if self.port:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise ChildError(f"hub did not listen (or log its port at info) within {timeout} s: {self.log_tail()}")

    def log_tail(self, size: int = 2000) -> str:
        """The end of its log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-size:]

    def metrics_port(self) -> int | None:
        """The port of its /metrics listener, from its log (None before it listens, or with metrics off)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        found = re.search(r"metrics listening.*?port=(\d+)", text)
        return int(found.group(1)) if found else None

    def metric(self, name: str) -> float | None:
        """One unlabelled sample of its /metrics (None if that cannot be read now)."""
        port = self.metrics_port()
        if port is None:
            return None
        try:
            status, body = _http(f"http://127.0.0.1:{port}/metrics", timeout=5)
        except OSError:
            return None  # includes a timeout: a hub busy closing thousands of sessions answers late
        for line in body.decode(errors="replace").splitlines():
            if status == 200 and line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def connections(self) -> int | None:
        """Open device sessions, from its /metrics (None if that cannot be read now)."""
        value = self.metric("hub_connections")
        return None if value is None else int(value)

    def wait_disconnected(self, timeout: float = 120.0) -> bool:
        """Wait until the hub has closed every device session (bounded); whether it did.

        Stopping a hub that is still tearing down thousands of sessions measures its shutdown, not the load.
        """
        if self.metrics_port() is None:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connections() == 0:
                return True
            time.sleep(0.2)
        return False

    def kill(self) -> None:
        """SIGKILL: no drain, no last acks, nothing flushed (the failover scenario)."""
        if self.proc is not None:
            _LIVE.discard(self.proc)
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self, timeout: float = 30.0) -> int | None:
        """Graceful stop (SIGTERM: drain, last acks), killed after `timeout`; the exit code."""
        if self.proc is None:
            return None
        code = _stop_process(self.proc, timeout)
        self.proc = None
        return code


class Child:
    """A harness child speaking JSON lines (a generator or the baseline server), driven from trio."""

    def __init__(self, name: str, proc: trio.Process, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.events: list[dict[str, Any]] = []
        self._reader = LineReader(proc.stdout) if proc.stdout is not None else None

    @classmethod
    async def start(cls, name: str, args: list[str], log_dir: Path) -> Child:
        """Start `python -m <args>` with stdin/stdout piped and stderr in `log_dir/<name>.log`."""
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=REPO_ROOT,  # `bench` is not an installed package: it is imported from the checkout
            )
        return cls(name, proc, log_path)

    @property
    def pid(self) -> int:
        """Its process id."""
        return self.proc.pid

    async def send(self, command: str) -> None:
        """Send one command line."""
        assert self.proc.stdin is not None
        try:
            await self.proc.stdin.send_all(command.encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ChildError(f"{self.name} is gone ({exc}): {self.log_tail()}") from None

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next event named `event` (others are kept in `events`); ChildError after `timeout` s or at EOF."""
        assert self._reader is not None
        with trio.move_on_after(timeout):
            while (line := await self._reader.readline()) is not None:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                self.events.append(message)
                if message.get("event") == event:
                    return message
            raise ChildError(f"{self.name} ended before {event!r}: {self.log_tail()}")
        raise ChildError(f"{self.name}: no {event!r} within {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, size: int = 1500) -> str:
        """The end of its stderr."""
        return self.log_path.read_text(errors="replace")[-size:] if self.log_path.exists() else ""

    async def close(self, timeout: float = 20.0) -> None:
        """Ask it to exit; kill it if it has not after `timeout` s."""
        if self.proc.returncode is None:
            with contextlib.suppress(ChildError):  # already gone: waiting is all that is left
                await self.send("exit")
            with trio.move_on_after(timeout):
                await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        if self.proc.stdin is not None:
            await self.proc.stdin.aclose()
