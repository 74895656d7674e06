"""The hub as a real child process: `hub serve` for signal, kill and restart tests (`HubProcess`); any other `hub`
command run to completion (`run_hub`)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from device_client.protocol import DEVICE_PATH
from hub.config import INFLUX_TOKEN_ENV

#: The hub's "listening" log line, in kv and JSON format: the port it got.
_LISTENING = re.compile(r'websocket endpoints listening.*?\bport"?[=:] ?(\d+)')


def run_hub(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the `hub` command line to completion in a child process (without an InfluxDB token in its environment)."""
    env = {k: v for k, v in os.environ.items() if k != INFLUX_TOKEN_ENV}
    return subprocess.run(
        [sys.executable, "-m", "hub.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class HubProcess:
    """`hub serve` in a subprocess, with its log in the data directory.

    The first start binds port 0 and reads the port from the hub's log (so the hub must log at info or debug); a
    restart keeps that port, since devices reconnect to it.
    """

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = 0  # known once started
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.log_path = data_dir / "hub.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{DEVICE_PATH}"

    def start(self, timeout: float = 20.0) -> None:
        """Start the hub (on port 0 the first time, on its port again after) and wait until it accepts connections."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        logged = len(self.log())
        log = self.log_path.open("ab")
        cmd = [sys.executable, "-m", "hub.cli", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir)]
        cmd += ["--metrics-port", "0"]
        self.proc = subprocess.Popen([*cmd, *self.args], stdout=log, stderr=log, env=self.env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hub exited with {self.proc.returncode}:\n{self.log()}")
            if not self.port and (found := _LISTENING.search(self.log()[logged:])):
                self.port = int(found.group(1))
            if self.port:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"hub did not listen (or log its port at info) within {timeout}s:\n{self.log()}")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
