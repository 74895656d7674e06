"""Tests of the configuration model and the example config file."""

from __future__ import annotations

import tomllib
from pathlib import Path

import attrs
import pytest

from hub.config import (
    INFLUX_PASSWORD_ENV,
    INFLUX_TOKEN_ENV,
    REDIS_PASSWORD_ENV,
    REDIS_URL_ENV,
    ConfigError,
    HubConfig,
    load_config,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "hub.example.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hub.toml"
    path.write_text(text)
    return path


def test_example_equals_defaults() -> None:
    assert load_config(EXAMPLE, env={}) == HubConfig()


def test_the_compose_replicas_config_loads() -> None:
    config = load_config(EXAMPLE.parents[1] / "deploy" / "hub.toml", env={})
    assert (config.server.max_connections_per_address, config.server.max_handshakes_per_address) == (0, 0)


def test_example_sets_every_option() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    defaults = HubConfig()
    expected = {}
    for field in attrs.fields(HubConfig):
        value = getattr(defaults, field.name)
        if attrs.has(type(value)):
            expected[field.name] = {f.name for f in attrs.fields(type(value))} - {"token", "password"}
        else:
            expected[field.name] = None
    actual = {key: set(value) if isinstance(value, dict) else None for key, value in data.items()}
    assert actual == expected


def test_no_file_gives_defaults() -> None:
    assert load_config(None, env={}) == HubConfig()


def test_file_values(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        'log_level = "debug"\n[server]\nport = 9001\n[presence]\nping_interval = 3\n'
        '[influx]\nurl = "http://db:8086"\ngzip = false\n',
    )
    config = load_config(path, env={})
    assert config.log_level == "debug"
    assert config.server.port == 9001
    assert config.server.host == "127.0.0.1"  # untouched options keep their defaults
    assert config.presence.ping_interval == 3.0 and isinstance(config.presence.ping_interval, float)
    assert (config.influx.url, config.influx.gzip) == ("http://db:8086", False)


def test_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, "[server]\nport = 9001\nwindow = 4\n[storage]\ndata_dir = '/from/file'\n")
    config = load_config(
        path,
        env={},
        overrides={
            "server.port": 9100,
            "storage.data_dir": "/from/cli",
            "batch.max_delay": 1,
            "log_level": "warning",
            "server.host": None,  # None: not given
        },
    )
    assert config.server.port == 9100
    assert config.server.window == 4
    assert config.server.host == "127.0.0.1"
    assert config.storage.data_dir == "/from/cli"
    assert config.storage.path == Path("/from/cli")
    assert config.batch.max_delay == 1.0
    assert config.log_level == "warning"


def test_bad_override_value() -> None:
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_config(None, env={}, overrides={"server.port": "80"})
    with pytest.raises(ConfigError, match="must be greater than zero"):
        load_config(None, env={}, overrides={"presence.ping_timeout": -1.0})
    with pytest.raises(ConfigError, match=r"server\.window: must be greater than zero"):
        load_config(None, env={}, overrides={"server.window": 0})
    with pytest.raises(ConfigError, match=r"unknown option 'bogus\.x'"):
        load_config(None, env={}, overrides={"bogus.x": 1})
    with pytest.raises(ConfigError, match="unknown option 'bogus'"):
        load_config(None, env={}, overrides={"bogus": 1})
    assert load_config(None, env={}, overrides={"server.port": 0}).server.port == 0
    assert load_config(None, env={}, overrides={"batch.max_delay": 0.0}).batch.max_delay == 0.0


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[nope]\nx = 1\n", "unknown section"),
        ("nope = 1\n", "unknown section or option"),
        ("[server]\nbogus = 1\n", "unknown option 'bogus'"),
        ("server = 3\n", "must be a table"),
        ('[server]\nport = "80"\n', "server.port: expected int"),
        ("[server]\nport = 80.0\n", "server.port: expected int"),
        ("[server]\nport = true\n", "server.port: expected int"),
        ("[influx]\ngzip = 1\n", "influx.gzip: expected bool"),
        ('[presence]\nping_interval = "10s"\n', "presence.ping_interval: expected float"),
        ("[influx]\nurl = 8086\n", "influx.url: expected str"),
        ("[server]\nport = -1\n", "server.port: must not be negative"),
        ("[presence]\nping_timeout = -0.5\n", "presence.ping_timeout: must be greater than zero"),
        ("[limits]\nmax_points = -5\n", "limits.max_points: must be greater than zero"),
        ('log_level = "loud"\n', "log_level"),
        ('[state]\nbackend = "postgres"\n', "state.backend: expected sqlite or redis, got 'postgres'"),
        ('[state]\nurl = "http://redis:6379"\n', "state.url: expected a redis://, rediss:// or unix:// URL"),
        ('[state]\nurl = "redis://:pw@redis:6379"\n', f"state.url: put the password in the {REDIS_PASSWORD_ENV}"),
        ('[state]\nprefix = "a:b"\n', "state.prefix: use 1-64 of"),
        ('[state]\nprefix = ""\n', "state.prefix: use 1-64 of"),
        ("[state]\ncache_devices = 0\n", "state.cache_devices: must be greater than zero"),
        ("[state]\ncache_devices = 1.5\n", "state.cache_devices: expected int"),
        ("[state]\ncache_ttl = -1\n", "state.cache_ttl: must not be negative"),
        ("[state]\nhub_ttl = 2\n", "state.hub_ttl: at least 3 seconds"),
        ("[server\n", "hub.toml"),  # not TOML
    ],
)
def test_bad_file(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, text), env={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml", env={})


def test_token_only_from_env(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=INFLUX_TOKEN_ENV):
        load_config(_write(tmp_path, '[influx]\ntoken = "s3cret"\n'), env={})
    with pytest.raises(ConfigError, match=INFLUX_TOKEN_ENV):
        load_config(None, env={}, overrides={"influx.token": "s3cret"})
    config = load_config(None, env={INFLUX_TOKEN_ENV: "s3cret"})
    assert config.influx.token == "s3cret"
    assert "s3cret" not in repr(config)
    assert load_config(None, env={}).influx.token == ""


def test_limits_that_would_let_a_series_key_outgrow_influxdb_are_refused() -> None:
    # InfluxDB refuses series keys over 65535 bytes: with 4-byte characters, 42 tags of default lengths fit, 43 not.
    assert load_config(None, env={}, overrides={"limits.max_tags": 42}).limits.max_tags == 42
    for overrides in ({"limits.max_tags": 43}, {"limits.max_tag_value_len": 512}):
        with pytest.raises(ConfigError, match="series key could reach"):
            load_config(None, env={}, overrides=overrides)


def test_state_backend_url_and_password_from_env(tmp_path: Path) -> None:
    assert load_config(None, env={}).state.backend == "sqlite"
    with pytest.raises(ConfigError, match=f"state: put the password in the {REDIS_PASSWORD_ENV} environment"):
        load_config(_write(tmp_path, '[state]\npassword = "s3cret"\n'), env={})
    with pytest.raises(ConfigError, match=f"influx: put the password in the {INFLUX_PASSWORD_ENV} environment"):
        load_config(_write(tmp_path, '[influx]\npassword = "s3cret"\n'), env={})
    path = _write(tmp_path, '[state]\nbackend = "redis"\nurl = "redis://a:6379"\nprefix = "east"\n')
    state = load_config(path, env={REDIS_PASSWORD_ENV: "s3cret"}).state
    assert (state.backend, state.url, state.prefix, state.password) == ("redis", "redis://a:6379", "east", "s3cret")
    assert "s3cret" not in repr(state)
    overridden = load_config(path, env={REDIS_URL_ENV: "rediss://:pw@b:6380/1"}).state
    assert overridden.url == "rediss://:pw@b:6380/1"  # the environment may carry the password in the URL
    with pytest.raises(ConfigError, match=f"{REDIS_URL_ENV}: expected a redis://"):
        load_config(path, env={REDIS_URL_ENV: "b:6380"})


def test_state_cache_options() -> None:
    state = load_config(None, env={}).state
    assert (state.cache_devices, state.cache_ttl) == (100_000, 300.0)
    state = load_config(None, env={}, overrides={"state.cache_devices": 10, "state.cache_ttl": 0}).state
    assert (state.cache_devices, state.cache_ttl) == (10, 0.0)  # 0: no cache
