"""Shared fixtures: real database servers, Redis and a scripted write endpoint on loopback, stopped at teardown even
when a test fails; a registry store of each backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hub.config import StateConfig
from hub.fleet import RegistryStore, open_registry_store
from tests.servers import InfluxDB1, Redis, ScriptedWriteServer, VictoriaMetrics


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


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    """A fresh, empty Redis for this test, on a Unix socket in its temp directory."""
    server = Redis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def state_config(request: pytest.FixtureRequest, tmp_path: Path) -> StateConfig:
    """A `[state]` section of each backend (Redis: a fresh server for this test)."""
    if request.param == "sqlite":
        return StateConfig()
    server: Redis = request.getfixturevalue("redis_server")
    return StateConfig(backend="redis", url=server.url)


@pytest.fixture
async def registry_store(state_config: StateConfig, tmp_path: Path) -> AsyncIterator[RegistryStore]:
    """An open `RegistryStore` of each backend (SQLite: in tmp_path/data), closed at teardown."""
    async with open_registry_store(state_config, tmp_path / "data") as opened:
        yield opened
