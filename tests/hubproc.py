"""Run `hub serve` as a real child process (for signal, kill and restart tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from device_client.protocol import DEVICE_PATH


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HubProcess:
    """`hub serve` in a subprocess on a fixed port, with its log in the data directory."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.log_path = data_dir / "hub.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{DEVICE_PATH}"

    def start(self, timeout: float = 20.0) -> None:
        """Start the hub and wait until it accepts TCP connections.

        The first start retries on another free port when the chosen one was taken in between (another process may
        bind it after `free_port` released it); a restart keeps its port, since devices reconnect to it.
        """
        first = self.proc is None
        for _ in range(5):
            logged = len(self.log())
            try:
                self._start_once(timeout)
                return
            except RuntimeError:
                if not (first and "Address already in use" in self.log()[logged:]):
                    raise
                self.port = free_port()
        raise RuntimeError(f"no free port for the hub after 5 tries:\n{self.log()}")

    def _start_once(self, timeout: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        cmd = [sys.executable, "-m", "hub.cli", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir)]
        cmd += ["--metrics-port", "0"]
        self.proc = subprocess.Popen([*cmd, *self.args], stdout=log, stderr=log, env=self.env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hub exited with {self.proc.returncode}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"hub did not listen within {timeout}s:\n{self.log()}")

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
