"""`hub demo` (the README's first command) runs a hub and a simulated fleet, on files or a real database."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import VictoriaMetrics


def run_demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "hub.cli", "demo", "--devices", "4", "--duration", "3", "--port", "0"]
    return subprocess.run(
        [*cmd, "--data-dir", str(tmp_path / "hub"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


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
    deadline = time.monotonic() + 30
    while True:  # the newest samples take a moment to become visible
        devices = {s["metric"]["device"] for s in victoria.export(match)}
        if devices == {"sim-0001", "sim-0002", "sim-0003", "sim-0004"} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert devices == {"sim-0001", "sim-0002", "sim-0003", "sim-0004"}
