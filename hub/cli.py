"""The `hub` command: run the hub (`serve`), manage device and operator tokens (`device ...`, `operator ...`), or
try it out (`demo`, or `device add-sim` for `firmware-sim`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sqlite3
import sys
import tomllib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any, TextIO

import attrs
import trio

from hub.config import INFLUX_PASSWORD_ENV, INFLUX_TOKEN_ENV, ConfigError, HubConfig, load_config
from hub.fleet import (
    MAX_LABELS,
    REGISTRY_FILE,
    ROLES,
    BadLabel,
    DeviceRecord,
    OperatorRecord,
    RegistryError,
    RegistryStore,
    Selector,
    StoreUnavailable,
    check_label_key,
    open_registry_store,
    parse_label,
    parse_selector,
    registry_path,
)
from hub.logs import FORMATS, LEVELS, setup_logging

__all__ = ["build_parser", "main"]

_DEFAULTS = HubConfig()

_DESCRIPTION = """\
Command-line options override the config file (--config),
which overrides the built-in defaults shown."""

_SERVE_EPILOG = f"""\
The InfluxDB token is read from the {INFLUX_TOKEN_ENV} environment variable only, the InfluxDB 1.x
password from {INFLUX_PASSWORD_ENV} (never from the command line or the config file). Without
--influx-url (or [influx] url in the config file) the hub writes line-protocol files under
DATA_DIR/lines (the embedded sink) and needs no database; each file imports as it is into
InfluxDB 2.x (influx write) or 1.x (influx -import): the hub prints both commands at start. With
--tls-cert and --tls-key, devices and operators connect with wss:// (same port); SIGHUP reloads
the certificate and key for new connections without dropping open ones (also on the HTTP port,
which then serves https://). The HTTP port METRICS_HOST:METRICS_PORT serves the hub's figures
(/metrics for Prometheus, /healthz), the REST API (/v1/..., docs/rest.md) and the web console
(/); the hub also writes its figures as hub* points. A port that cannot be had (taken by another
program, say) stops the hub at start with one line naming it and the option that changes it, and
exit code 1. --allowed-origin adds browser origins (the console's own needs none).
See docs/hub.example.toml for every setting."""

_WORKERS_EPILOG = """With --workers N (and [state] backend = "redis") this process supervises N hubs sharing the port,
each with its own data directory DATA_DIR/worker-K: it restarts a worker that dies, passes
SIGTERM/SIGINT (graceful) and SIGHUP (TLS reload) on, and serves one /metrics and /healthz for
all of them (docs/scaling.md)."""


_DEMO_EPILOG = f"""\
Unless --port, --metrics-port or the config file name them, the demo listens on free ports and
prints them, with the control URL and how to get an operator token for hubctl.

{_SERVE_EPILOG}"""


def _default(dotted: str) -> object:
    section, _, key = dotted.rpartition(".")
    return getattr(getattr(_DEFAULTS, section) if section else _DEFAULTS, key)


@attrs.frozen
class _Option:
    """A command-line option that overrides one config setting."""

    flag: str
    key: str  # "section.key" in HubConfig
    type: Callable[[str], object]
    metavar: str
    help: str
    shown: str = ""  # how to show the default, when its value alone says too little


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, not {port}")
    return port


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _influx_api(text: str) -> str:
    if text not in ("v1", "v2"):
        raise argparse.ArgumentTypeError(f"must be v1 or v2, not {text!r}")
    return text


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must not be negative, not {text}")
    return value


_HOST = _Option("--host", "server.host", str, "H", "address the device WebSocket listener binds to")
_PORT = _Option("--port", "server.port", _port, "P", "TCP port of the device listener (0: any free port)")
_DATA_DIR = _Option("--data-dir", "storage.data_dir", str, "DIR", "directory for registry, spool, embedded sink")
_TLS = (
    _Option(
        "--tls-cert",
        "tls.cert_file",
        str,
        "FILE",
        "PEM certificate chain: devices and operators connect with wss:// (needs --tls-key; SIGHUP reloads both)",
        "none: plain ws://",
    ),
    _Option("--tls-key", "tls.key_file", str, "FILE", "PEM private key of --tls-cert, unencrypted", "none"),
)
_INFLUX = (
    _Option("--influx-url", "influx.url", str, "URL", "InfluxDB base URL", "none: embedded sink"),
    _Option(
        "--influx-api",
        "influx.api",
        _influx_api,
        "v1|v2",
        "write API: v2 (/api/v2/write: InfluxDB 2.x, 3.x, 1.8+, VictoriaMetrics) or v1 (/write: InfluxDB 1.x)",
    ),
    _Option("--influx-org", "influx.org", str, "ORG", "InfluxDB organisation (v2)", "none"),
    _Option("--influx-bucket", "influx.bucket", str, "B", "InfluxDB bucket (v2; on 1.8: database/retention)"),
    _Option("--influx-database", "influx.database", str, "DB", "InfluxDB 1.x database (v1)"),
    _Option(
        "--influx-retention-policy",
        "influx.retention_policy",
        str,
        "RP",
        "InfluxDB 1.x retention policy (v1)",
        "none: the database's default",
    ),
    _Option(
        "--influx-username",
        "influx.username",
        str,
        "USER",
        f"InfluxDB 1.x user (v1; the password comes from {INFLUX_PASSWORD_ENV})",
        "none",
    ),
)
_METRICS = (
    _Option(
        "--metrics-host",
        "metrics.http_host",
        str,
        "H",
        "address the HTTP listener (/metrics, /healthz, /v1 REST, the console) binds to",
    ),
    _Option(
        "--metrics-port", "metrics.http_port", _port, "P", "TCP port of the HTTP listener (metrics, REST, console)"
    ),
)
#: The demo's ports: any free one (printed at start) unless an option or the config file names one.
_DEMO_PORTS = (
    _Option("--port", "server.port", _port, "P", "TCP port of the device and control listener", "any free port"),
    _Option(
        "--metrics-port",
        "metrics.http_port",
        _port,
        "P",
        "TCP port of the HTTP listener (metrics, REST, console)",
        "any free port",
    ),
)
_TUNING = (
    _Option("--ping-interval", "presence.ping_interval", float, "S", "seconds between pings to a device"),
    _Option("--ping-timeout", "presence.ping_timeout", float, "S", "seconds to wait for a pong, then drop"),
    _Option("--window", "server.window", int, "N", "unacked telemetry messages a device may have in flight"),
    _Option(
        "--max-message-bytes",
        "server.max_message_bytes",
        int,
        "N",
        "largest message accepted (larger: close 1009)",
    ),
    _Option("--batch-max-lines", "batch.max_lines", int, "N", "most lines per database write"),
    _Option("--batch-max-delay", "batch.max_delay", float, "S", "longest a line waits for its batch to fill"),
    _Option(
        "--batch-spool-after",
        "batch.spool_after",
        float,
        "S",
        "spool (and ack) a batch the database has not taken within S seconds",
    ),
    _Option("--spool-max-bytes", "storage.spool_max_bytes", int, "N", "spool bound while the database is down"),
)

_SERVE_OPTIONS = (_HOST, _PORT, *_TLS, _DATA_DIR, *_INFLUX, *_METRICS, *_TUNING)


def _show(key: str) -> str:
    value = _default(key)
    if key.endswith("_bytes") and isinstance(value, int):
        for size, unit in ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
            if value >= size and value % size == 0:
                return f"{value} = {value // size} {unit}"
    return str(value)


def _add_options(parser: argparse.ArgumentParser, options: Sequence[_Option]) -> None:
    for opt in options:
        parser.add_argument(
            opt.flag,
            dest=opt.key,
            type=opt.type,
            metavar=opt.metavar,
            default=None,  # None: not given, the config file or the built-in default applies
            help=f"{opt.help} (default: {opt.shown or _show(opt.key)})",
        )


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config file (default: none, built-in defaults)")


def _add_logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        dest="log_level",
        choices=LEVELS,
        default=None,
        help=f"least severe log events written to stderr (default: {_DEFAULTS.log_level})",
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="kv",
        help="kv: key=value pairs, json: one JSON object per line (default: kv)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `hub` command."""
    parser = argparse.ArgumentParser(
        prog="hub",
        description="IoT telemetry hub: devices stream telemetry over WebSocket, the hub writes InfluxDB.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the hub",
        description="Run the hub until SIGINT/SIGTERM.\n" + _DESCRIPTION,
        epilog=f"{_SERVE_EPILOG}\n\n{_WORKERS_EPILOG}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config(serve)
    _add_options(serve, _SERVE_OPTIONS)
    _add_logging(serve)
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="hub processes sharing the port (SO_REUSEPORT), supervised by this one; more than 1 needs "
        '[state] backend = "redis" (default: 1, this process is the hub)',
    )
    serve.add_argument(
        "--allowed-origin",
        action="append",
        metavar="URL",
        help="a browser Origin allowed on /v1/control and the REST API besides the console's own, e.g. "
        "https://ops.example.com (repeatable; added to [control] allowed_origins) (default: none)",
    )
    serve.add_argument("--worker-id", type=int, default=None, help=argparse.SUPPRESS)  # set by the supervisor
    serve.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    serve.set_defaults(func=_cmd_serve)

    device = commands.add_parser(
        "device",
        help="register devices and manage their tokens",
        description=f"Manage the device registry (DATA_DIR/{REGISTRY_FILE}, or Redis with [state] backend = "
        '"redis"); safe to use while hubs run.',
    )
    actions = device.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, func, text in (
        ("add", _cmd_add, "register a device and print its token (shown only this once)"),
        ("list", _cmd_list, "list devices: name, state, created, session epoch, last acked sequence, labels"),
        ("revoke", _cmd_revoke, "refuse the device's token from now on"),
        ("rotate", _cmd_rotate, "give the device a new token (the old one stops working) and un-revoke it"),
        ("label", _cmd_label, "set and remove the device's labels (KEY=VALUE) and print them"),
    ):
        epilog = _LABELS_HELP if name in ("add", "list", "label") else None
        sub = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".", epilog=epilog)
        if name == "list":
            sub.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
            sub.add_argument(
                "--selector",
                type=_selector_arg,
                metavar="SELECTOR",
                help="only devices whose labels match, e.g. site=berlin,model!=th-100,beta (default: all)",
            )
        else:
            sub.add_argument("name", metavar="NAME", help="device name (1-64 of A-Z a-z 0-9 _ -)")
        if name == "add":
            sub.add_argument(
                "--label",
                dest="labels",
                type=_label_arg,
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="a label of the device (repeatable) (default: none)",
            )
        if name == "label":
            sub.add_argument("labels", type=_label_arg, nargs="*", metavar="KEY=VALUE", help="labels to set")
            sub.add_argument(
                "--remove",
                type=_label_key_arg,
                action="append",
                default=[],
                metavar="KEY",
                help="a label key to remove (repeatable) (default: none)",
            )
        _add_config(sub)
        _add_options(sub, (_DATA_DIR,))
        sub.set_defaults(func=func)
    sims = actions.add_parser(
        "add-sim",
        help="register (or re-key) simulated devices sim-0001..sim-N and write their tokens for firmware-sim",
        description="Register devices sim-0001..sim-N (re-keying those already registered) and write their new tokens, "
        "one per line, for `firmware-sim --tokens FILE`.",
    )
    sims.add_argument("count", type=_positive_int, metavar="N", help="number of simulated devices")
    sims.add_argument(
        "--tokens-file",
        metavar="FILE",
        help="write the tokens to FILE (created with mode 0600) (default: none, print them)",
    )
    _add_config(sims)
    _add_options(sims, (_DATA_DIR,))
    sims.set_defaults(func=_cmd_add_sim)

    operator = commands.add_parser(
        "operator",
        help="manage the operators of the control channel and their tokens",
        description=f"Manage control-channel operators (DATA_DIR/{REGISTRY_FILE}, or Redis with [state] backend = "
        '"redis"); safe to use while hubs run.',
    )
    op_actions = operator.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, func, text in (
        ("add", _cmd_operator_add, "create an operator and print its token (shown only this once)"),
        ("list", _cmd_operator_list, "list operators: name, role, state, created"),
        ("revoke", _cmd_operator_revoke, "refuse the operator's token from now on (open sessions are closed)"),
    ):
        sub = op_actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        if name == "list":
            sub.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
        else:
            sub.add_argument("name", metavar="NAME", help="operator name (1-64 of A-Z a-z 0-9 _ -)")
        if name == "add":
            sub.add_argument(
                "--role",
                choices=ROLES,
                required=True,
                help="viewer: watch; operator: also send and cancel commands; admin: also manage devices "
                "(default: none, required)",
            )
        _add_config(sub)
        _add_options(sub, (_DATA_DIR,))
        sub.set_defaults(func=func)

    demo = commands.add_parser(
        "demo",
        help="run a hub and a simulated fleet in one process",
        description="Run a hub and a fleet of simulated devices in this process, to see the hub at work.\n"
        + _DESCRIPTION,
        epilog=_DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--devices", type=_positive_int, default=20, metavar="N", help="simulated devices (default: 20)")
    demo.add_argument(
        "--duration",
        type=_non_negative_float,
        default=0.0,
        metavar="S",
        help="seconds to run; 0: until Ctrl-C (default: 0)",
    )
    _add_config(demo)
    _add_options(demo, (_DEMO_PORTS[0], *_TLS, _DATA_DIR, *_INFLUX, _METRICS[0], _DEMO_PORTS[1]))
    _add_logging(demo)
    demo.set_defaults(func=_cmd_demo)
    return parser


# ---------------------------------------------------------------------------- commands


def _error(message: str) -> None:
    print(f"hub: error: {message}", file=sys.stderr)


def _config(args: argparse.Namespace) -> HubConfig | None:
    """The config from --config plus every "section.key" option given; None (after a message) if invalid."""
    overrides = {key: value for key, value in vars(args).items() if "." in key or key == "log_level"}
    try:
        return load_config(
            args.config, overrides=overrides, allowed_origins=getattr(args, "allowed_origin", None) or ()
        )
    except ConfigError as exc:
        _error(f"bad configuration: {exc}")
        return None


def _check_tls(config: HubConfig) -> bool:
    """False (after a message) when the configured TLS certificate and key do not load."""
    from hub.edge import TLSError, check_tls_files

    try:
        check_tls_files(config.tls)
    except TLSError as exc:
        _error(str(exc))
        return False
    return True


def _cmd_serve(args: argparse.Namespace) -> int:
    config = _config(args)
    if config is None or not _check_tls(config):
        return 2
    if args.worker_id is not None:
        return _serve_worker(config, args)
    if args.workers > 1 and config.state.backend != "redis":
        _error(f'--workers {args.workers} needs [state] backend = "redis": the workers share registry and acked seqs')
        return 2
    setup_logging(config.log_level, args.log_format)
    if args.workers > 1:
        from hub.ops import run_workers

        return run_workers(config, args.workers, partial(_worker_command, args))
    from hub.app import run  # imported here: the device commands need none of the server's modules

    return run(config)


def _worker_command(args: argparse.Namespace, worker: int, port: int, ready_fd: int) -> list[str]:
    """The command line of worker `worker` of `hub serve --workers N`: the same options, the supervisor's port."""
    argv = [sys.executable, "-m", "hub.cli", "serve"]
    if args.config is not None:
        argv += ["--config", args.config]
    for opt in _SERVE_OPTIONS:
        value = getattr(args, opt.key)
        if value is not None:
            argv += [opt.flag, str(value)]
    if args.log_level is not None:
        argv += ["--log-level", args.log_level]
    argv += ["--log-format", args.log_format, "--port", str(port)]
    return [*argv, "--worker-id", str(worker), "--ready-fd", str(ready_fd)]


def _serve_worker(config: HubConfig, args: argparse.Namespace) -> int:
    """Worker K: its own data directory (spool, command store, embedded sink) and a loopback /metrics on a port of
    its choosing, which the supervisor merges into the machine's."""
    worker = args.worker_id
    storage = attrs.evolve(config.storage, data_dir=str(config.storage.path / f"worker-{worker}"))
    metrics = attrs.evolve(config.metrics, http_host="127.0.0.1", http_port=0)
    config = attrs.evolve(config, storage=storage, metrics=metrics)
    setup_logging(config.log_level, args.log_format, {"worker": worker})
    from hub.app import run

    return run(config, worker=worker, ready_fd=args.ready_fd)


def _cmd_demo(args: argparse.Namespace) -> int:
    config = _config(args)
    if config is None or not _check_tls(config):
        return 2
    config = _demo_ports(config, args)
    setup_logging(config.log_level, args.log_format)
    from hub.demo import run_demo

    return run_demo(config, devices=args.devices, duration=args.duration)


def _demo_ports(config: HubConfig, args: argparse.Namespace) -> HubConfig:
    """The demo's config with port 0 (any free port) for each port neither an option nor the config file sets."""
    from_file: dict[str, Any] = {}
    if args.config is not None:  # `_config` has read and checked this file already
        with open(args.config, "rb") as f:
            from_file = tomllib.load(f)
    server, metrics = config.server, config.metrics
    if getattr(args, "server.port") is None and "port" not in from_file.get("server", {}):
        server = attrs.evolve(server, port=0)
    if getattr(args, "metrics.http_port") is None and "http_port" not in from_file.get("metrics", {}):
        metrics = attrs.evolve(metrics, http_port=0)
    return attrs.evolve(config, server=server, metrics=metrics)


_Action = Callable[[RegistryStore, argparse.Namespace], Awaitable[None]]


def _registry_command(action: _Action) -> Callable[[argparse.Namespace], int]:
    """Run `action` on the configured registry store; its refusals and storage errors become a message and exit 1."""

    def command(args: argparse.Namespace) -> int:
        config = _config(args)
        if config is None:
            return 2

        async def run() -> None:
            async with open_registry_store(config.state, config.storage.data_dir) as store:
                await action(store, args)

        path = registry_path(config.storage.data_dir)
        try:
            trio.run(run)
        except (RegistryError, StoreUnavailable, BaseExceptionGroup) as exc:
            error = _sole_error(exc)  # Redis: errors come out of its client's task group
            if error is None:
                raise
            _error(str(error))
            return 1
        except (OSError, sqlite3.Error) as exc:
            _error(f"registry {path}: {exc}")
            return 1
        return 0

    return command


def _sole_error(exc: BaseException) -> RegistryError | StoreUnavailable | None:
    """The registry or store error `exc` is, or is the only one in (through exception groups); else None."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, RegistryError | StoreUnavailable) else None


def _print_token(token: str, who: str = "device") -> None:
    print(token)
    print(f"hub: this token will not be shown again: give it to the {who} now", file=sys.stderr)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _state(record: DeviceRecord) -> str:
    return "revoked" if record.revoked else "active"


@_registry_command
async def _cmd_add(registry: RegistryStore, args: argparse.Namespace) -> None:
    _print_token(await registry.add(args.name, dict(args.labels)))


@_registry_command
async def _cmd_label(registry: RegistryStore, args: argparse.Namespace) -> None:
    if not args.labels and not args.remove:
        raise BadLabel("give labels to set (KEY=VALUE), keys to --remove, or both")
    labels = await registry.set_labels(args.name, dict(args.labels), args.remove)
    print(_labels_text(labels) or "(no labels)")


_LABELS_HELP = (
    "Labels: KEY=VALUE, each side 1-63 of A-Z a-z 0-9 _ . - starting with a letter or digit; at most "
    f"{MAX_LABELS} per device. A selector is comma-separated terms that must all match: KEY=VALUE, KEY!=VALUE "
    "(also matches a device without KEY) or KEY (has the label)."
)


def _label_arg(text: str) -> tuple[str, str]:
    try:
        return parse_label(text)
    except BadLabel as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _label_key_arg(text: str) -> str:
    try:
        return check_label_key(text)
    except BadLabel as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _selector_arg(text: str) -> Selector:
    try:
        return parse_selector(text)
    except BadLabel as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _labels_text(labels: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in labels.items())


@_registry_command
async def _cmd_rotate(registry: RegistryStore, args: argparse.Namespace) -> None:
    _print_token(await registry.rotate(args.name))


@_registry_command
async def _cmd_revoke(registry: RegistryStore, args: argparse.Namespace) -> None:
    await registry.revoke(args.name)
    print(f"hub: device {args.name!r} revoked", file=sys.stderr)


@_registry_command
async def _cmd_list(registry: RegistryStore, args: argparse.Namespace) -> None:
    records = await registry.list()
    if args.selector is not None:
        records = [r for r in records if args.selector.matches(r.labels)]
    if args.json:
        rows = [
            {
                "name": r.name,
                "state": _state(r),
                "created": _iso(r.created),
                "epoch": r.epoch,
                "acked_seq": r.acked_seq,
                "labels": r.labels,
            }
            for r in records
        ]
        print(json.dumps(rows, indent=2))
        return
    table = [("NAME", "STATE", "CREATED", "EPOCH", "ACKED_SEQ", "LABELS")]
    table += [
        (r.name, _state(r), _iso(r.created), str(r.epoch), str(r.acked_seq), _labels_text(r.labels)) for r in records
    ]
    _print_table(table)
    if not records:
        print("hub: no devices match" if args.selector is not None else "hub: no devices registered", file=sys.stderr)


def _print_table(table: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _cmd_add_sim(args: argparse.Namespace) -> int:
    # The file is opened before the registry changes: a path that cannot be written changes nothing.
    out: contextlib.AbstractContextManager[TextIO] = contextlib.nullcontext(sys.stdout)
    if args.tokens_file is not None:
        try:
            out = open(os.open(args.tokens_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w")  # noqa: SIM115
        except OSError as exc:
            _error(f"--tokens-file: {exc}")
            return 1
    with out as stream:

        @_registry_command
        async def add_sims(registry: RegistryStore, args: argparse.Namespace) -> None:
            from hub.demo import register_devices  # the demo's device names; it imports the server

            print("\n".join(await register_devices(registry, args.count)), file=stream)

        code = add_sims(args)
    if code == 0 and args.tokens_file is None:
        print("hub: these tokens will not be shown again: give them to firmware-sim now", file=sys.stderr)
    elif code == 0:
        file = shlex.quote(args.tokens_file)
        print(f"hub: {args.count} tokens written to {file}; run: firmware-sim --tokens {file}", file=sys.stderr)
    return code


def _operator_state(record: OperatorRecord) -> str:
    return "revoked" if record.revoked else "active"


@_registry_command
async def _cmd_operator_add(registry: RegistryStore, args: argparse.Namespace) -> None:
    _print_token(await registry.add_operator(args.name, args.role), "operator")


@_registry_command
async def _cmd_operator_revoke(registry: RegistryStore, args: argparse.Namespace) -> None:
    await registry.revoke_operator(args.name)
    print(f"hub: operator {args.name!r} revoked (open sessions are closed within seconds)", file=sys.stderr)


@_registry_command
async def _cmd_operator_list(registry: RegistryStore, args: argparse.Namespace) -> None:
    records = await registry.list_operators()
    if args.json:
        rows = [
            {"name": r.name, "role": r.role, "state": _operator_state(r), "created": _iso(r.created)} for r in records
        ]
        print(json.dumps(rows, indent=2))
        return
    table = [("NAME", "ROLE", "STATE", "CREATED")]
    table += [(r.name, r.role, _operator_state(r), _iso(r.created)) for r in records]
    _print_table(table)
    if not records:
        print("hub: no operators", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `hub` command with `argv` (default: sys.argv[1:]); return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return _interrupted()
    except BaseExceptionGroup as group:
        if group.split(KeyboardInterrupt)[1] is not None:  # something else went wrong too
            raise
        return _interrupted()  # a second Ctrl-C landed in one of the tasks


def _interrupted() -> int:
    """A second Ctrl-C (or SIGINT) cut the graceful stop short: say so in one line; the shell's code for SIGINT."""
    print("hub: interrupted: stopped without finishing the graceful shutdown", file=sys.stderr)
    return 130


if __name__ == "__main__":
    raise SystemExit(main())
