"""`hub demo` (the README's first command) runs a hub and a simulated fleet, on files or a real database."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from hub.config import HubConfig
from tests.hubproc import run_hub
from tests.servers import VictoriaMetrics
from tests.waiting import wait_until


def run_demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_hub("demo", "--devices", "4", "--duration", "3", "--data-dir", str(tmp_path / "hub"), *args, timeout=120)


def acked_points(stdout: str) -> int:
    match = re.search(r"done: all (\d+) points acked and durable", stdout)
    assert match, stdout
    return int(match.group(1))


def test_demo_on_the_embedded_file_sink(tmp_path: Path) -> None:
    result = run_demo(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "line-protocol files" in result.stdout
    acked = acked_points(result.stdout)
    assert acked > 0
    lines = [ln for f in (tmp_path / "hub" / "lines").glob("*.lp") for ln in f.read_text().splitlines()]
    lines = [ln for ln in lines if not ln.startswith("#")]  # the import header
    devices = {m.group(1) for ln in lines if (m := re.search(r",device=(sim-\d{4})[, ]", ln))}
    assert devices == {"sim-0001", "sim-0002", "sim-0003", "sim-0004"}
    assert len([ln for ln in lines if not ln.startswith("device_status")]) == acked


@pytest.mark.e2e
def test_demo_into_victoria(tmp_path: Path, victoria: VictoriaMetrics) -> None:
    result = run_demo(tmp_path, "--influx-url", victoria.url)
    assert result.returncode == 0, result.stderr
    assert victoria.url in result.stdout
    acked = acked_points(result.stdout)
    match = '{device=~"sim-.*",__name__!~"device_status.*"}'
    victoria.wait_for_count(match, acked)  # at least one sample per acked point (a point has 1+ fields)
    devices = {"sim-0001", "sim-0002", "sim-0003", "sim-0004"}
    # The newest samples take a moment to become visible.
    wait_until(lambda: {s["metric"]["device"] for s in victoria.export(match)} == devices, 30, poll=0.2)


@pytest.fixture
def default_ports_taken() -> Iterator[None]:
    """The default device and metrics ports are taken (by this test, or already by another program)."""
    defaults = HubConfig()
    with ExitStack() as stack:
        for port in (defaults.server.port, defaults.metrics.http_port):
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen()
            except OSError:
                pass  # someone else holds it: taken all the same
        yield


def test_demo_runs_beside_a_hub_and_names_the_control_and_console_urls_and_operator_tokens(
    tmp_path: Path, default_ports_taken: None
) -> None:
    """With the default ports taken, the demo takes free ones; its banner is enough to use hubctl and the console:
    the console's URL on the hub's HTTP port and a working operator token."""
    data = tmp_path / "data"
    cmd = [sys.executable, "-m", "hub.cli", "demo", "--devices", "2", "--data-dir", str(data)]
    demo = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path)
    try:
        assert demo.stdout is not None
        banner = []
        for line in demo.stdout:  # the banner comes before the first progress line
            banner.append(line.rstrip("\n"))
            if "simulated devices" in line:
                break
        text = "\n".join(banner)
        control = re.search(r"control channel: (ws://127\.0\.0\.1:(\d+)/v1/control)", text)
        metrics = re.search(r"metrics: http://127\.0\.0\.1:(\d+)/metrics", text)
        console = re.search(r"^web console: http://127\.0\.0\.1:(\d+)/$", text, re.MULTILINE)
        ready = re.search(
            r"^  log in with the demo's operator token \(valid until the demo stops\): (op\.demo\.\S+)$",
            text,
            re.MULTILINE,
        )
        add = re.search(r"^\s*(hub operator add NAME --role operator --data-dir \S+)", text, re.MULTILINE)
        ctl = re.search(r"^\s*HUBCTL_TOKEN=TOKEN (hubctl --url \S+ status)", text, re.MULTILINE)
        assert control and metrics and console and ready and add and ctl, text
        assert int(control.group(2)) != HubConfig().server.port
        assert console.group(1) == metrics.group(1)  # the console is served on the hub's HTTP port
        bin_dir = Path(sys.executable).parent
        argv = shlex.split(ctl.group(1))
        env = {**os.environ, "HUBCTL_TOKEN": ready.group(1)}
        status = subprocess.run(
            [str(bin_dir / argv[0]), *argv[1:]], capture_output=True, text=True, env=env, timeout=60
        )
        assert status.returncode == 0, status.stderr  # the demo's token works as printed
        argv = shlex.split(add.group(1).replace("NAME", "alice"))
        token = subprocess.run(
            [str(bin_dir / argv[0]), *argv[1:]], capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()
        argv = shlex.split(ctl.group(1))
        env = {**os.environ, "HUBCTL_TOKEN": token}
        status = subprocess.run(
            [str(bin_dir / argv[0]), *argv[1:]], capture_output=True, text=True, env=env, timeout=60
        )
        assert status.returncode == 0, status.stderr
        assert status.stdout.startswith("hub ") and "devices" in status.stdout, status.stdout
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.communicate()
    assert demo.returncode == 0
    listed = run_hub("operator", "list", "--data-dir", str(data)).stdout
    assert re.search(r"^demo\b.*revoked", listed, re.MULTILINE), listed  # its token ended with the demo


def test_each_demo_has_an_operator_of_its_own_revoked_when_it_ends(tmp_path: Path) -> None:
    """The registry keeps only a hash, so each demo adds an operator (demo, demo-2, ...) and prints its token, which
    is revoked when the demo ends: no token is kept anywhere."""

    def printed_token() -> str:
        result = run_hub("demo", "--devices", "1", "--duration", "1", "--data-dir", str(data), timeout=120)
        assert result.returncode == 0, result.stderr
        found = re.search(r"operator token \(valid until the demo stops\): (op\.\S+)", result.stdout)
        assert found, result.stdout
        return found.group(1)

    data = tmp_path / "hub"
    assert printed_token().startswith("op.demo.")
    assert printed_token().startswith("op.demo-2.")
    listed = run_hub("operator", "list", "--data-dir", str(data)).stdout
    assert re.search(r"^demo\b.*revoked", listed, re.MULTILINE), listed
    assert re.search(r"^demo-2\b.*revoked", listed, re.MULTILINE), listed
    stored = b"".join(f.read_bytes() for f in data.rglob("*") if f.is_file())
    assert b"op.demo" not in stored


def test_a_second_ctrl_c_stops_the_demo_at_once_without_a_traceback(tmp_path: Path) -> None:
    """Ctrl-C twice: the first starts the graceful stop, the second cuts it short, with one line and no traceback."""
    cmd = [sys.executable, "-m", "hub.cli", "demo", "--devices", "20", "--data-dir", str(tmp_path / "hub")]
    demo = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            if line.startswith("["):  # the first progress line: the fleet is running
                break
        demo.send_signal(signal.SIGINT)
        for line in demo.stdout:
            if line.startswith("stopping:"):
                break
        demo.send_signal(signal.SIGINT)  # while the devices flush and the hub drains
        stdout, stderr = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    assert "Traceback" not in stderr, stderr
    assert demo.returncode == 0, stderr
    last = stdout.splitlines()[-1]
    # Cut short; or, on a machine quick enough, already done when the second signal came.
    assert last.startswith(("interrupted: stopped without waiting", "done: all")), stdout
