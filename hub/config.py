"""Hub configuration: frozen sections read from a TOML file, environment variables for secrets."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from device_client.protocol import Limits

__all__ = [
    "BatchConfig",
    "CommandsConfig",
    "ConfigError",
    "ControlConfig",
    "HubConfig",
    "InfluxConfig",
    "MetricsConfig",
    "PresenceConfig",
    "ServerConfig",
    "StateConfig",
    "StorageConfig",
    "TLSConfig",
    "check_origin",
    "load_config",
]

#: Environment variables that carry the InfluxDB secrets (never put them in the TOML file).
INFLUX_TOKEN_ENV = "HUB_INFLUX_TOKEN"
INFLUX_PASSWORD_ENV = "HUB_INFLUX_PASSWORD"
#: Environment variables for the Redis state backend: its password, and a URL that overrides `[state] url`.
REDIS_PASSWORD_ENV = "HUB_REDIS_PASSWORD"
REDIS_URL_ENV = "HUB_REDIS_URL"
#: State backends: SQLite files in the data directory (one hub process), or Redis (shared by many).
STATE_BACKENDS = ("sqlite", "redis")
#: URL schemes of the Redis backend: plain TCP, TLS, a Unix socket.
REDIS_SCHEMES = ("redis", "rediss", "unix")


#: InfluxDB refuses a point whose series key (measurement + tags) is longer than this many bytes.
MAX_SERIES_KEY_BYTES = 65535


def _max_series_key_bytes(limits: Limits) -> int:
    """Worst-case series key in bytes: 4 bytes a character (UTF-8), escaping included; the device tag on top."""
    name, value = 4 * limits.max_name_len, 4 * limits.max_tag_value_len
    return name + limits.max_tags * (name + value + 2) + len(",device=") + 64


_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ConfigError(Exception):
    """The configuration file or an override is not valid."""


@attrs.frozen
class ServerConfig:
    """The device WebSocket listener."""

    host: str = "127.0.0.1"
    port: int = 8765
    max_message_bytes: int = 256 * 1024  # larger frames are closed with 1009
    handshake_timeout: float = 5.0  # seconds for a client to finish the HTTP upgrade
    max_handshakes: int = 512  # connections between accept and welcome at once; more: 503 + Retry-After at once
    max_handshakes_per_address: int = 64  # ... from one IP address; more: 429 + Retry-After; 0: no limit
    evict_slow_handshake_after: float = 1.0  # all places taken: a newcomer evicts one this old without its request
    hello_timeout: float = 10.0  # seconds after the upgrade for the device's hello
    window: int = 256  # unacked telemetry messages a device may have in flight
    ack_interval: float = 0.05  # acks to one device at least this far apart while < window / 2 wait; 0: at once
    max_errors: int = 10  # protocol errors in one session before it is closed with 1008
    shutdown_grace: float = 10.0  # seconds to drain the pipeline on SIGINT/SIGTERM
    max_connections: int = 10000  # open WebSocket connections (devices + operators); more: 503 before the upgrade
    max_connections_per_address: int = 256  # from one IP address; more: 429 before the upgrade; 0: no limit
    retry_after: int = 30  # seconds, sent in the Retry-After header of those 429/503 answers
    idle_timeout: float = 120.0  # no message from a device for max(this, 3 x its interval): close 1001; 0: never
    message_rate: float = 50.0  # messages per second a device may send on average ...
    message_burst: int = 100  # ... and in a burst; beyond: the hub reads from it more slowly
    point_rate: float = 20000.0  # points per second a device may send on average ...
    point_burst: int = 40000  # ... and in a burst
    throttle_close_after: float = 30.0  # seconds of uninterrupted throttling before a close with 1013
    compression: bool = True  # accept compressed telemetry from devices that offer it (docs/protocol.md)


@attrs.frozen
class TLSConfig:
    """TLS on the device/control listener (wss://): both files, or neither for plain ws://."""

    cert_file: str = ""  # PEM: the server certificate, then its intermediates
    key_file: str = ""  # PEM private key, unencrypted (keep it mode 0600); reloaded with the cert on SIGHUP

    @property
    def enabled(self) -> bool:
        """True when a certificate is configured."""
        return bool(self.cert_file)


@attrs.frozen
class PresenceConfig:
    """Keepalive and online/offline detection."""

    ping_interval: float = 10.0  # seconds between WebSocket pings to each device
    ping_timeout: float = 10.0  # no pong within this: the device is marked offline and dropped
    late_factor: float = 1.5  # no telemetry for interval x this (+ late_grace): the device is "late"
    late_grace: float = 2.0


@attrs.frozen
class ControlConfig:
    """The operator control channel (/v1/control, same port as devices)."""

    # Browser Origins allowed besides the console's own (checked at start: scheme://host[:port], lower case, no path),
    # e.g. "https://ops.example.com"; also on the REST API (CORS).
    allowed_origins: tuple[str, ...] = ()
    auth_timeout: float = 5.0  # seconds for a browser's first-message auth
    max_message_bytes: int = 64 * 1024
    max_subscriptions: int = 16  # per control session
    buffer: int = 1000  # events buffered per subscription before coalescing/dropping
    max_errors: int = 20  # bad frames in a session before it is closed with 1008
    request_rate: float = 50.0  # requests per second per operator (all its sessions together) ...
    request_burst: int = 200  # ... and in a burst; beyond: the request is answered "rate_limited"


@attrs.frozen
class CommandsConfig:
    """The durable command queue."""

    default_ttl: float = 3600.0  # seconds a command may wait for delivery
    max_ttl: float = 172800.0
    default_timeout: float = 30.0  # seconds for the result after delivery
    max_timeout: float = 300.0
    max_queue: int = 50  # unfinished commands per device


@attrs.frozen
class InfluxConfig:
    """An InfluxDB v2 write API (InfluxDB 2.x/3.x/1.8+, VictoriaMetrics). No url: embedded file sink."""

    url: str = ""
    api: str = "v2"  # "v2": /api/v2/write (InfluxDB 2.x/3.x/1.8+, VictoriaMetrics); "v1": /write (InfluxDB 1.x)
    org: str = ""  # v2
    bucket: str = "telemetry"  # v2
    database: str = "telemetry"  # v1
    retention_policy: str = ""  # v1; empty: the database's default
    username: str = ""  # v1; the password comes from HUB_INFLUX_PASSWORD
    token: str = attrs.field(default="", repr=False)  # from HUB_INFLUX_TOKEN
    password: str = attrs.field(default="", repr=False)  # from HUB_INFLUX_PASSWORD
    timeout: float = 10.0
    gzip: bool = True


@attrs.frozen
class MetricsConfig:
    """The hub's own figures as points every `interval`; the HTTP listener (/metrics, /healthz, REST, console)."""

    interval: float = 10.0  # seconds between hub_* points written to the sink
    http_host: str = "127.0.0.1"
    http_port: int = 9108  # 0: any free port
    http_enabled: bool = True


@attrs.frozen
class StorageConfig:
    """Local state: registry, spool and the embedded line-protocol files."""

    data_dir: str = "./var/hub"
    spool_max_bytes: int = 1024**3
    file_max_bytes: int = 64 * 1024**2  # embedded sink: rotate files at this size
    file_max_age: float = 3600.0  # ... or at this age in seconds

    @property
    def path(self) -> Path:
        """The data directory as a Path."""
        return Path(self.data_dir)


@attrs.frozen
class StateConfig:
    """Where the registry and the acked seqs live: SQLite in the data directory, or Redis shared by many hubs."""

    backend: str = "sqlite"  # one of STATE_BACKENDS
    url: str = "redis://127.0.0.1:6379"  # redis://, rediss:// (TLS) or unix://; HUB_REDIS_URL overrides it
    prefix: str = "hub"  # every Redis key starts with "<prefix>:" (several fleets may share one Redis)
    ca_file: str = ""  # rediss://: PEM CA bundle the server's certificate must chain to; empty: the system's CAs
    password: str = attrs.field(default="", repr=False)  # from HUB_REDIS_PASSWORD
    cache_devices: int = 100_000  # Redis: devices and operators whose handshake data is kept for an outage (LRU)
    cache_ttl: float = 300.0  # ... each trusted this many seconds after it was last read from Redis; 0: no cache
    hub_ttl: float = (
        15.0  # Redis: a hub not heard of (heartbeat every second) for this long is lost; its devices offline
    )


@attrs.frozen
class BatchConfig:
    """The batcher and writer."""

    max_lines: int = 5000
    max_delay: float = 0.2
    queue_items: int = 1024
    write_attempts: int = 3
    flush_when_idle: bool = True  # an idle writer gets a batch at once; under load batches fill up by themselves
    early_flush_interval: float = 0.05  # ... but no sooner than this long after the last write began
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    spool_after: float = 2.0  # a batch not written within this many seconds is spooled (and acked) instead
    probe_interval: float = 1.0  # while the database does not answer, check it this often to notice its return


@attrs.frozen
class HubConfig:
    """The whole configuration of one hub process."""

    server: ServerConfig = attrs.field(factory=ServerConfig)
    tls: TLSConfig = attrs.field(factory=TLSConfig)
    presence: PresenceConfig = attrs.field(factory=PresenceConfig)
    influx: InfluxConfig = attrs.field(factory=InfluxConfig)
    control: ControlConfig = attrs.field(factory=ControlConfig)
    commands: CommandsConfig = attrs.field(factory=CommandsConfig)
    metrics: MetricsConfig = attrs.field(factory=MetricsConfig)
    storage: StorageConfig = attrs.field(factory=StorageConfig)
    state: StateConfig = attrs.field(factory=StateConfig)
    batch: BatchConfig = attrs.field(factory=BatchConfig)
    limits: Limits = attrs.field(factory=Limits)
    log_level: str = "info"


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "tls": TLSConfig,
    "presence": PresenceConfig,
    "influx": InfluxConfig,
    "control": ControlConfig,
    "commands": CommandsConfig,
    "metrics": MetricsConfig,
    "storage": StorageConfig,
    "state": StateConfig,
    "batch": BatchConfig,
    "limits": Limits,
}


#: Numeric options for which 0 makes sense (any free port; flush every message at once; no per-address limit; ...).
_ZERO_OK = frozenset(
    {
        "port",
        "http_port",
        "max_delay",
        "max_connections_per_address",
        "max_handshakes_per_address",
        "idle_timeout",
        "ack_interval",
        "early_flush_interval",
        "cache_ttl",
    }
)


def _section(cls: type, values: Mapping[str, Any], where: str) -> Any:
    # TOML values in, checked here; out an instance of `cls` (the sections differ: load_config reads them by name).
    known = {f.name: f for f in attrs.fields(cls)}
    kwargs: dict[str, object] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown option {key!r} (known: {', '.join(sorted(known))})")
        default = known[key].default
        if key == "token":
            raise ConfigError(f"{where}: put the token in the {INFLUX_TOKEN_ENV} environment variable")
        if key == "password":
            env = REDIS_PASSWORD_ENV if cls is StateConfig else INFLUX_PASSWORD_ENV
            raise ConfigError(f"{where}: put the password in the {env} environment variable")
        if isinstance(default, tuple):
            ok = isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
            value = tuple(value) if ok else value
        elif isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ConfigError(f"{where}.{key}: expected {type(default).__name__}, got {value!r}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if key in _ZERO_OK:
                if value < 0:
                    raise ConfigError(f"{where}.{key}: must not be negative")
            elif value <= 0:
                raise ConfigError(f"{where}.{key}: must be greater than zero")
        kwargs[key] = value
    return cls(**kwargs)


_ORIGIN_HOST = re.compile(r"[a-z0-9.-]+|\[[0-9a-f:.]+\]")


def check_origin(entry: str, where: str = "control.allowed_origins") -> str:
    """`entry` if it is an Origin exactly as a browser sends it (scheme://host[:port], lower case, no path, no
    default port); else ConfigError naming the entry and how to write it."""
    parts = urlsplit(entry)
    suggestion = ""
    if entry in ("*", "null"):
        why = "list each site's origin; a wildcard or null would let any page drive the hub"
    elif parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        why = "an origin is http:// or https:// and a host"
    elif parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        why = "an origin has no user, query or fragment"
    else:
        try:
            port = parts.port
        except ValueError:
            port = -1
        default = 443 if parts.scheme.lower() == "https" else 80
        host = parts.netloc.rsplit("@", 1)[-1].lower()
        if port == default:
            host = host.rsplit(":", 1)[0]
        suggestion = f"{parts.scheme.lower()}://{host}"
        if port is not None and port < 0:
            why = "its port is not a number 1-65535"
            suggestion = ""
        elif parts.path:
            why = "an origin has no path, not even a trailing slash"
        elif entry != entry.lower():
            why = "browsers send it in lower case"
        elif port == default:
            why = f"browsers leave out the default port {default}"
        elif not _ORIGIN_HOST.fullmatch(host.rsplit(":", 1)[0] if not host.endswith("]") else host):
            why = "its host is not a host name or address"
            suggestion = ""
        else:
            return entry
    hint = f" (write {suggestion!r})" if suggestion else " (e.g. 'https://ops.example.com')"
    raise ConfigError(f"{where}: {entry!r} is not an origin as browsers send it: {why}{hint}")


def _state(state: StateConfig, env: Mapping[str, str]) -> StateConfig:
    """The [state] section checked, with the URL and password from the environment."""
    if state.backend not in STATE_BACKENDS:
        raise ConfigError(f"state.backend: expected {' or '.join(STATE_BACKENDS)}, got {state.backend!r}")
    if urlsplit(state.url).password:
        raise ConfigError(f"state.url: put the password in the {REDIS_PASSWORD_ENV} environment variable")
    url = env.get(REDIS_URL_ENV) or state.url
    if urlsplit(url).scheme not in REDIS_SCHEMES:
        where = REDIS_URL_ENV if env.get(REDIS_URL_ENV) else "state.url"
        raise ConfigError(f"{where}: expected a redis://, rediss:// or unix:// URL, got {url!r}")
    if not _PREFIX.fullmatch(state.prefix):
        raise ConfigError(f"state.prefix: use 1-64 of A-Z a-z 0-9 _ - . (no ':'), got {state.prefix!r}")
    if state.hub_ttl < 3:
        raise ConfigError(f"state.hub_ttl: at least 3 seconds (a hub beats every second), got {state.hub_ttl!r}")
    return attrs.evolve(state, url=url, password=env.get(REDIS_PASSWORD_ENV, ""))


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    allowed_origins: Sequence[str] = (),
) -> HubConfig:
    """Read the TOML file (if any), apply `overrides` ("section.key" -> value), take secrets from `env`, add
    `allowed_origins` (`hub serve --allowed-origin`) to `control.allowed_origins`.

    Raises `ConfigError` with a message naming the bad option.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    top: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table")
        elif key == "log_level":
            top[key] = value
        else:
            raise ConfigError(f"unknown section or option {key!r}")
    merged = {name: dict(data.get(name, {})) for name in _SECTIONS}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if key and section in merged:
            merged[section][key] = value
        elif dotted == "log_level":
            top[dotted] = value
        else:
            raise ConfigError(f"unknown option {dotted!r}")
    sections = {name: _section(cls, merged[name], name) for name, cls in _SECTIONS.items()}
    secrets = {"token": env.get(INFLUX_TOKEN_ENV, ""), "password": env.get(INFLUX_PASSWORD_ENV, "")}
    sections["influx"] = attrs.evolve(sections["influx"], **{k: v for k, v in secrets.items() if v})
    sections["state"] = _state(sections["state"], env)
    control = sections["control"]
    origins = tuple(dict.fromkeys([*control.allowed_origins, *allowed_origins]))
    for origin in origins:
        check_origin(origin)
    sections["control"] = attrs.evolve(control, allowed_origins=origins)
    tls = sections["tls"]
    if bool(tls.cert_file) != bool(tls.key_file):
        raise ConfigError("tls: cert_file and key_file go together (both for wss://, neither for plain ws://)")
    series_key = _max_series_key_bytes(sections["limits"])
    if series_key > MAX_SERIES_KEY_BYTES:
        raise ConfigError(
            f"limits: a series key could reach {series_key} bytes, over InfluxDB's {MAX_SERIES_KEY_BYTES}: "
            "lower max_tags, max_name_len or max_tag_value_len"
        )
    if sections["influx"].api not in ("v1", "v2"):
        raise ConfigError(f"influx.api: expected v1 or v2, got {sections['influx'].api!r}")
    level = top.get("log_level", "info")
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level: expected debug, info, warning or error, got {level!r}")
    return HubConfig(log_level=level, **sections)
