"""Shared fixtures: real database servers on loopback, killed at teardown even when a test fails."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Test modules import helpers as `tests.servers`; pytest puts only tests/ itself on sys.path.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.servers import InfluxDB1, VictoriaMetrics  # noqa: E402


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
