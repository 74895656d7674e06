"""Shared fixtures: real database servers and a scripted write endpoint on loopback, stopped at teardown even when a
test fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import InfluxDB1, ScriptedWriteServer, VictoriaMetrics


@pytest.fixture
def victoria(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    """A fresh VictoriaMetrics for this test (sync fixture; usable from trio tests)."""
    server = VictoriaMetrics(tmp_path / "victoria")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def influxdb1(tmp_path: Path) -> Iterator[InfluxDB1]:
    """A fresh InfluxDB 1.x for this test."""
    server = InfluxDB1(tmp_path / "influxdb1")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def scripted() -> Iterator[ScriptedWriteServer]:
    """A started `ScriptedWriteServer` (accepting everything with 204 until a test sets its `responder`)."""
    with ScriptedWriteServer() as server:
        yield server
