"""`hubctl`: the operator's command line over the hub's control channel (docs/control.md)."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, tzinfo
from typing import Any, NoReturn

import trio

from device_client.client import client_ssl_context
from device_client.protocol import JSON
from hub import fleet
from hub.control import REQUESTS, ControlError
from hub.fleet import CommandRecordDict, DeviceDetail
from hub.operator._client import (
    FINAL_STATES,
    HUB_WAIT_TIMEOUT,
    TOPICS,
    AuthRefused,
    ClientError,
    ConnectFailed,
    ControlClient,
    Disconnected,
    Dropped,
    Event,
    ReplyTimeout,
    RequestFailed,
    control_url,
    open_control,
)

__all__ = [
    "CA_FILE_ENV",
    "DEFAULT_URL",
    "TOKEN_ENV",
    "URL_ENV",
    "ExitCode",
    "ago",
    "build_parser",
    "command_args",
    "duration",
    "format_command",
    "format_commands",
    "format_device",
    "format_devices",
    "format_dropped",
    "format_event",
    "format_job",
    "format_job_progress",
    "format_jobs",
    "format_labels",
    "format_status",
    "format_twin",
    "job_action",
    "main",
    "parse_arg",
    "table",
]

DEFAULT_URL = "ws://127.0.0.1:8765/v1/control"
URL_ENV = "HUBCTL_URL"
TOKEN_ENV = "HUBCTL_TOKEN"
CA_FILE_ENV = "HUBCTL_CA_FILE"

#: The states of a device summary (hub.fleet): "never" is registered but not connected since the hub started.
DEVICE_STATES = tuple(s.value for s in fleet.DEVICE_STATES)
COMMAND_STATES = tuple(s.value for s in fleet.COMMAND_STATES)


class ExitCode:
    """The exit codes of `hubctl`."""

    OK = 0
    ERROR = 1  # the hub answered with an error (its code and message are on stderr)
    USAGE = 2
    CONNECT = 3  # cannot connect, token refused, or the connection failed
    COMMAND = 4  # send --wait: the command did not succeed, or the wait timed out; a followed job not all succeeded
    INTERRUPTED = 130


class UsageError(Exception):
    """A problem with the command line or the environment (exit code 2)."""


# ---------------------------------------------------------------------------- arguments

_DESCRIPTION = """\
Watch the fleet and command devices through the hub's control channel (/v1/control).

The operator token comes from the HUBCTL_TOKEN environment variable or from --token-file.
There is deliberately no --token option: a token on the command line lands in shell history
and in the process list (ps) for every user of the machine to read.

With a wss:// URL the hub's certificate is verified (system CAs, or only --ca-file). Plain ws://
is refused to any host but loopback (localhost, 127.0.0.0/8, ::1) unless --insecure-plain-ws."""

_EPILOG = """\
exit codes: 0 ok; 1 the hub answered with an error (its code is on stderr); 2 usage;
3 cannot connect, token refused, or the connection failed; 4 send --wait: the command
failed, expired, timed out or was cancelled, or the wait timed out; job create --wait and
job show --follow: the job ended with a device that did not succeed (failed, cancelled or
skipped), or was cancelled or aborted."""


_SELECTOR_HELP = "only devices whose labels match, e.g. site=berlin,model!=th-100,beta (all terms must match)"


def _label(text: str) -> tuple[str, str]:
    try:
        return fleet.parse_label(text)
    except fleet.BadLabel as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_arg(text: str) -> tuple[str, JSON]:
    """One ``--arg k=v``: `v` as JSON when it parses (``n=5`` is 5), else as a string (``mode=eco``)."""
    key, eq, raw = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except ValueError:
        value = raw
    return key, value


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: keep them as strings


def _json_object(text: str) -> dict[str, JSON]:
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, like '{\"n\": 5}'")
    return value


def _float_arg(what: str, ok: Callable[[float], bool], must: str) -> Callable[[str], float]:
    """An argparse type: a float that is `ok`, else the error "not WHAT" or "must be MUST"."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {must}, not {text}")
        return value

    return parse


_seconds = _float_arg("a number of seconds", lambda v: v > 0 and math.isfinite(v), "a positive number of seconds")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before and after the command; given after it, a value overrides one given before.
    default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    parser.add_argument(
        "--url",
        default=default(None),
        help=f"control endpoint (default: ${URL_ENV}, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        default=default(None),
        help=f"read the operator token from FILE (default: ${TOKEN_ENV}); never give a token as an argument",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="machine output: one JSON document (JSON lines for watch)",
    )
    parser.add_argument(
        "--ca-file",
        metavar="FILE",
        default=default(None),
        help=f"wss://: trust only the CA certificates in FILE (PEM) (default: ${CA_FILE_ENV}, else the system CAs)",
    )
    parser.add_argument(
        "--insecure-plain-ws",
        action="store_true",
        default=default(False),
        help="allow plain ws:// to a host that is not loopback: the token travels unencrypted",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `hubctl`."""
    parser = argparse.ArgumentParser(
        prog="hubctl",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def sub(name: str, help: str, description: str = "", *, common: bool = True) -> argparse.ArgumentParser:
        return _subparser(commands, name, help, description, common=common)

    p = sub("devices", "list devices: state, since when, last seen, firmware, labels")
    p.add_argument(
        "--state",
        choices=DEVICE_STATES,
        help="only devices in this state (never: registered, not connected since the hub started)",
    )
    p.add_argument("--selector", metavar="SELECTOR", help=_SELECTOR_HELP)

    p = sub(
        "label",
        "set and remove a device's labels (admins), and print them",
        "Remove the label keys given with --remove, then set the KEY=VALUE labels, in one step (admins\n"
        "only); print the device's labels. A key or value is 1-63 of A-Z a-z 0-9 _ . - starting with a\n"
        f"letter or digit; a device has at most {fleet.MAX_LABELS} labels.",
    )
    p.add_argument("name", metavar="NAME", help="the device")
    p.add_argument("labels", metavar="KEY=VALUE", type=_label, nargs="*", help="labels to set")
    p.add_argument("--remove", metavar="KEY", action="append", default=[], help="a label key to remove; repeatable")

    p = sub(
        "add",
        "register a device (admins); print its token, shown only this once",
        "Register device NAME (admins only) with the KEY=VALUE labels given, and print its token: the only\n"
        "time it is shown (the hub keeps a hash). Give it to the device (device_client's token).",
    )
    p.add_argument("name", metavar="NAME", help="the new device")
    p.add_argument("labels", metavar="KEY=VALUE", type=_label, nargs="*", help="labels to set")
    p = sub("revoke", "revoke a device's token (admins); its open session is closed")
    p.add_argument("name", metavar="NAME", help="the device")
    p = sub("rotate", "give a device a new token (admins); print it, shown only this once")
    p.add_argument("name", metavar="NAME", help="the device")

    p = sub(
        "twin",
        "a device's twin: get it, or set its desired document",
        common=False,  # on its actions: argparse would let their defaults override options given before them
        description="`twin get NAME` prints the device's desired and reported documents with their versions, the\n"
        "desired version the device applied, and the delta (desired keys not reported yet).\n"
        "`twin set NAME PATCH` merges the JSON merge patch PATCH (RFC 7386: null removes a key) into the\n"
        "desired document (operators); the device gets it now if connected, else when it connects.",
    )
    twin = p.add_subparsers(dest="twin_action", metavar="ACTION", required=True)
    q = _subparser(twin, "get", "print the twin", "Print the device's twin.")
    q.add_argument("name", metavar="NAME", help="the device")
    q = _subparser(
        twin,
        "set",
        "merge a patch into the desired document",
        "Merge PATCH (a JSON object; null removes a key) into the device's desired document.",
    )
    q.add_argument("name", metavar="NAME", help="the device")
    q.add_argument("patch", metavar="PATCH", type=_json_object, help="a JSON merge patch, e.g. '{\"interval\": 5}'")
    q.add_argument(
        "--if-version",
        metavar="N",
        type=int,
        help="only if the desired document is at version N now (else version_conflict, exit 1)",
    )

    p = sub("device", "one device: its state, latest values and recent commands")
    p.add_argument("name", metavar="NAME")

    p = sub(
        "watch",
        "stream live events, one line each, until Ctrl-C",
        "Stream live events, one line each, until Ctrl-C (exit 0). A line on stderr says when the hub\n"
        "dropped events because this client read too slowly. With --json: one JSON object per line,\n"
        '{"type": "event", "topic": T, "event": {...}} or\n'
        '{"type": "dropped", "topic": T, "dropped": N, "coalesced": M} (counts are cumulative).',
    )
    p.add_argument("names", metavar="NAME", nargs="*", help="only these devices (default: all)")
    p.add_argument("--selector", metavar="SELECTOR", help=_SELECTOR_HELP + " when the watch starts")
    p.add_argument("--topic", choices=(*TOPICS, "all"), default="telemetry", help="what to watch (default: telemetry)")

    p = sub("send", "send a command to a device")
    p.add_argument("name", metavar="NAME", help="the device")
    p.add_argument("command_name", metavar="COMMAND", help="the command's name")
    _add_command_args(p)
    p.add_argument("--ttl", metavar="S", type=_seconds, help="seconds the command may wait for delivery (hub: 3600)")
    p.add_argument(
        "--timeout", metavar="S", type=_seconds, help="seconds the device has to answer once delivered (hub: 30)"
    )
    p.add_argument("--key", metavar="IDEMPOTENCY_KEY", help="sending again with the same key returns the same command")
    p.add_argument("--wait", action="store_true", help="wait for the result; exit 4 unless it succeeded")
    p.add_argument(
        "--wait-timeout",
        metavar="S",
        type=_seconds,
        help=f"with --wait: give up after S seconds (default: {HUB_WAIT_TIMEOUT:g})",
    )

    p = sub("commands", "list commands, newest first")
    p.add_argument("name", metavar="NAME", nargs="?", help="only this device's commands")
    p.add_argument("--state", choices=COMMAND_STATES, help="only commands in this state")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="at most N commands (hub default: 50, max 1000)")

    p = sub("command", "one command: its record and history")
    p.add_argument("command_id", metavar="ID")

    p = sub("cancel", "cancel a command that is still queued or sent")
    p.add_argument("command_id", metavar="ID")

    sub("status", "the hub's figures: connections, devices, ingest, commands")

    _add_job_parser(sub)

    p = sub(
        "request",
        "send any control request and print its result as JSON",
        'Send any request of the control channel (docs/control.md, "Requests and replies") and print\n'
        "its result as JSON, e.g. `hubctl request commands device=boiler-1 limit=5`.",
    )
    p.add_argument("type", metavar="TYPE", choices=list(REQUESTS), help=f"one of: {', '.join(REQUESTS)}")
    p.add_argument(
        "fields",
        metavar="K=V",
        type=parse_arg,
        nargs="*",
        help="an argument; V is parsed as JSON when it parses (limit=5 is a number), else taken as a string",
    )
    return parser


def _subparser(
    group: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    description: str = "",
    *,
    common: bool = True,
) -> argparse.ArgumentParser:
    """A sub-command of `group` with hubctl's epilog and, unless `common` is false, its common options."""
    p = group.add_parser(
        name,
        help=help,
        description=description or help,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if common:
        _add_common(p, top=False)
    return p


def _add_command_args(p: argparse.ArgumentParser) -> None:
    """--arg K=V (repeatable) and --args-json JSON (also --args): a command's arguments (`command_args`)."""
    p.add_argument(
        "--arg",
        dest="args",
        metavar="K=V",
        type=parse_arg,
        action="append",
        default=[],
        help="an argument; V is parsed as JSON when it parses (n=5 is a number), else taken as a string; repeatable",
    )
    p.add_argument(
        "--args-json",
        "--args",
        dest="args_json",
        metavar="JSON",
        type=_json_object,
        help="arguments as a JSON object (--arg adds)",
    )


def command_args(opts: argparse.Namespace) -> dict[str, JSON] | None:
    """The `args` object of `send`: --args-json, updated by each --arg; None when neither is given."""
    if opts.args_json is None and not opts.args:
        return None
    args = dict(opts.args_json or {})
    args.update(opts.args)
    return args


def _token(opts: argparse.Namespace, env: Mapping[str, str]) -> str:
    if opts.token_file:
        try:
            with open(opts.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the token file: {exc}") from None
        source = opts.token_file
    else:
        token = env.get(TOKEN_ENV, "").strip()
        source = f"${TOKEN_ENV}"
        if not token:
            raise UsageError(f"no operator token: set {TOKEN_ENV} or use --token-file FILE")
    if not token or not token.isascii() or not token.isprintable():
        raise UsageError(f"the token in {source} is empty or not printable ASCII")
    return token


# ---------------------------------------------------------------------------- formatting


def _clean(value: object) -> str:
    """`value` as text safe for a terminal: control characters (escape sequences) are shown escaped."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _compact(value: object) -> str:
    return _clean(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


def _dur(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def duration(seconds: object) -> str:
    """A length of time for people: ``2.5s``, ``42s``, ``4m05s``, ``3h02m``, ``2d04h``; "-" when unknown."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not math.isfinite(seconds):
        return "-"
    if 0 < seconds < 60 and seconds != int(seconds):
        return f"{seconds:.3g}s"
    return _dur(max(seconds, 0))


def ago(t: object, now: float) -> str:
    """How long ago Unix time `t` was: ``12s ago``, ``now``, ``in 5m00s`` (future), "-" when unknown."""
    if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t):
        return "-"
    delta = now - t
    if -1 < delta < 1:
        return "now"
    return f"{_dur(delta)} ago" if delta > 0 else f"in {_dur(-delta)}"


def _when(t: object, tz: tzinfo | None, *, ms: bool = False) -> str:
    """Unix time `t` (seconds) as local date and time."""
    if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t):
        return "-"
    try:
        stamp = datetime.fromtimestamp(t, tz)
    except (OverflowError, OSError, ValueError):
        return _clean(t)
    return stamp.isoformat(" ", "milliseconds" if ms else "seconds")[: 23 if ms else 19]


def _at(t: object, now: float, tz: tzinfo | None) -> str:
    when = _when(t, tz)
    return when if when == "-" else f"{when} ({ago(t, now)})"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of an aligned table with a header row (columns two spaces apart, no trailing blanks)."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in [headers, *rows]
    ]


def _value(v: object) -> str:
    if v is True or v is False:
        return "true" if v else "false"
    if isinstance(v, dict) and len(v) == 1 and isinstance(v.get("int"), int):
        return f"{v['int']}i"  # an explicit integer field, as line protocol writes it
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, int):
        return str(v)
    return _compact(v)


def _fields(fields: object) -> str:
    if not isinstance(fields, dict):
        return _compact(fields)
    return " ".join(f"{_clean(k)}={_value(v)}" for k, v in fields.items())


def _tags(tags: object) -> str:
    if not isinstance(tags, dict) or not tags:
        return ""
    return ", ".join(f"{_clean(k)}={_clean(v)}" for k, v in tags.items())


def _state(summary: Mapping[str, object]) -> str:
    state = _clean(summary.get("state", "?"))
    return f"{state} (revoked)" if summary.get("revoked") else state


def format_labels(labels: object) -> str:
    """Labels as ``key=value,...`` (empty when there are none, or the hub sent none)."""
    if not isinstance(labels, Mapping):
        return ""
    return ",".join(f"{_clean(key)}={_clean(value)}" for key, value in labels.items())


def format_devices(devices: Sequence[Mapping[str, object]], now: float, state: str | None = None) -> str:
    """The `devices` table."""
    if not devices:
        if state == "never":
            return "no devices that never connected"
        return f"no devices {state}" if state else "no devices"
    rows = [
        [
            _clean(d.get("name", "?")),
            _state(d),
            ago(d.get("since"), now),
            ago(d.get("last_seen"), now),
            _clean(d.get("reason") or "-"),
            _clean(d.get("firmware") or "-"),
            _clean(d.get("model") or "-"),
            duration(d.get("interval")) if d.get("interval") else "-",
            format_labels(d.get("labels")) or "-",
        ]
        for d in devices
    ]
    headers = ["NAME", "STATE", "SINCE", "LAST SEEN", "REASON", "FIRMWARE", "MODEL", "INTERVAL", "LABELS"]
    return "\n".join(table(headers, rows))


def _result_text(record: Mapping[str, object], now: float) -> str:
    state = record.get("state")
    if state == "succeeded":
        result = record.get("result")
        return "-" if result is None else _compact(result)
    if record.get("error"):
        return _clean(record["error"])
    if state in fleet.COMMAND_TTL_STATES:
        return f"expires {ago(record.get('expires'), now)}"
    return "-"


def _shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def format_commands(records: Sequence[Mapping[str, object]], now: float, *, device_column: bool = True) -> str:
    """The `commands` table (newest first, as the hub sends them)."""
    if not records:
        return "no commands"
    headers = ["ID", "DEVICE", "NAME", "STATE", "CREATED", "UPDATED", "OPERATOR", "RESULT"]
    rows = [
        [
            _clean(r.get("command_id", "?")),
            _clean(r.get("device", "?")),
            _clean(r.get("name", "?")),
            _clean(r.get("state", "?")),
            ago(r.get("created"), now),
            ago(r.get("updated"), now),
            _clean(r.get("operator") or "-"),
            _shorten(_result_text(r, now)),
        ]
        for r in records
    ]
    if not device_column:
        headers.pop(1)
        for row in rows:
            row.pop(1)
    return "\n".join(table(headers, rows))


def _pairs(pairs: Sequence[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in pairs)
    return [f"{k.ljust(width)}  {v}".rstrip() for k, v in pairs]


def format_device(device: DeviceDetail, now: float, tz: tzinfo | None = None) -> str:
    """The `device NAME` view: summary, latest values, recent commands."""
    since = _at(device.get("since"), now, tz)
    reason = f", reason: {_clean(device['reason'])}" if device.get("reason") else ""
    lines = _pairs(
        [
            ("name", _clean(device.get("name", "?"))),
            ("state", f"{_state(device)} since {since}{reason}"),
            ("last seen", _at(device.get("last_seen"), now, tz)),
            ("epoch", _clean(device.get("epoch", "-"))),
            ("firmware", _clean(device.get("firmware") or "-")),
            ("model", _clean(device.get("model") or "-")),
            ("interval", duration(device.get("interval")) if device.get("interval") else "-"),
            ("revoked", "yes" if device.get("revoked") else "no"),
        ]
    )
    latest = device.get("latest") or {}
    lines.append("")
    if latest:
        rows = []
        for measurement, value in sorted(latest.items()):
            value = value if isinstance(value, dict) else {}
            ts = value.get("ts")
            seconds = ts / 1000 if isinstance(ts, int | float) and not isinstance(ts, bool) else None
            rows.append(
                [_clean(measurement), ago(seconds, now), _fields(value.get("fields")), _tags(value.get("tags"))]
            )
        lines.append("latest values:")
        lines.extend(table(["MEASUREMENT", "AGE", "FIELDS", "TAGS"], rows))
    else:
        lines.append("latest values: none")
    commands = device.get("commands") or []
    lines.append("")
    if commands:
        lines.append("recent commands:")
        lines.append(format_commands(commands, now, device_column=False))
    else:
        lines.append("recent commands: none")
    return "\n".join(lines)


def format_command(record: CommandRecordDict, now: float, tz: tzinfo | None = None) -> str:
    """The `command ID` view: the record and its history."""
    pairs = [
        ("command", _clean(record.get("command_id", "?"))),
        ("device", _clean(record.get("device", "?"))),
        ("name", _clean(record.get("name", "?"))),
        ("args", _compact(record.get("args") or {})),
        ("state", _clean(record.get("state", "?"))),
        ("created", _at(record.get("created"), now, tz)),
        ("updated", _at(record.get("updated"), now, tz)),
        ("expires", _at(record.get("expires"), now, tz)),
        ("timeout", duration(record.get("timeout"))),
        ("key", _clean(record.get("idempotency_key") or "-")),
        ("operator", _clean(record.get("operator") or "-")),
        ("result", "-" if record.get("result") is None else _compact(record["result"])),
        ("error", _clean(record.get("error") or "-")),
    ]
    lines = _pairs(pairs)
    history = record.get("history") or []
    if history:
        lines.append("history:")
        rows = [[_clean(h.get("state", "?")), _at(h.get("at"), now, tz)] for h in history if isinstance(h, dict)]
        lines.extend("  " + line for line in table(["STATE", "AT"], rows))
    return "\n".join(lines)


def _counts(mapping: object, keys: Sequence[str] | None = None) -> str:
    if not isinstance(mapping, dict) or not mapping:
        return "none"
    keys = keys or list(mapping)
    return ", ".join(f"{_clean(mapping.get(k, 0))} {_clean(k)}" for k in keys)


def _object(value: object) -> Mapping[str, object]:
    return value if isinstance(value, dict) else {}


def format_status(status: Mapping[str, object]) -> str:
    """The `status` view of the hub's figures (a `HubStatus`; a part missing or malformed shows as "?")."""
    devices = _object(status.get("devices"))
    ingest = _object(status.get("ingest"))
    up = ingest.get("sink_up")
    sink = "up" if up is True else "DOWN" if up is False else "?"
    ingest_text = (
        f"{ingest.get('points_in', '?')} in, {ingest.get('points_written', '?')} written, "
        f"{ingest.get('points_spooled', '?')} spooled, {ingest.get('points_replayed', '?')} replayed, "
        f"{ingest.get('points_dropped', '?')} dropped"
    )
    uptime = status.get("uptime")
    connections = (
        f"{_plural(status.get('connections'), 'device session')}, "
        f"{_plural(status.get('control_sessions'), 'control session')}"
    )
    pairs = [
        ("hub", f"version {_clean(status.get('version', '?'))}, up {duration(_whole(uptime))}"),
        ("connections", connections),
        ("devices", _counts(devices, [*fleet.SEEN_STATES, "registered"])),
        ("points", _clean(ingest_text)),
        ("spool", f"{_bytes(ingest.get('spool_bytes'))}, sink {sink}"),
        ("commands", _counts(status.get("commands"))),
    ]
    return "\n".join(_pairs(pairs))


def _whole(seconds: object) -> object:
    return int(seconds) if isinstance(seconds, float) and math.isfinite(seconds) else seconds


def _plural(n: object, noun: str) -> str:
    return f"{_clean(n)} {noun}" if n == 1 else f"{_clean('?' if n is None else n)} {noun}s"


def _bytes(n: object) -> str:
    if not isinstance(n, int) or isinstance(n, bool):
        return "?"
    for size, unit in ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def format_event(item: Event, tz: tzinfo | None = None) -> str:
    """One `watch` line: time, device, what happened."""
    e = item.event
    device = _clean(e.get("device") or e.get("name") or "?")
    if item.topic == "telemetry":
        ts = e.get("ts")
        when = _when(ts / 1000, tz, ms=True) if isinstance(ts, int | float) and not isinstance(ts, bool) else "-"
        tags = _tags(e.get("tags"))
        text = f"{_clean(e.get('measurement', '?')):<12} {_fields(e.get('fields'))}"
        return f"{when}  {device:<12} {text}" + (f"  [{tags}]" if tags else "")
    if item.topic == "presence":
        reason = f" ({_clean(e['reason'])})" if e.get("reason") else ""
        epoch = _clean(e.get("epoch", "-"))
        return f"{_when(e.get('since'), tz, ms=True)}  {device:<12} presence     {_state(e)}{reason} epoch {epoch}"
    if item.topic == "commands":
        state = _clean(e.get("state", "?"))
        extra = ""
        if state == "succeeded" and e.get("result") is not None:
            extra = f" result={_shorten(_compact(e['result']), 200)}"
        elif e.get("error"):
            extra = f" error={_clean(e['error'])}"
        name = _clean(e.get("name", "?"))
        cid = _clean(e.get("command_id", "?"))
        return f"{_when(e.get('updated'), tz, ms=True)}  {device:<12} command      {cid} {name} {state}{extra}"
    if item.topic == "twin":
        desired, reported = _mapping(e.get("desired")), _mapping(e.get("reported"))
        when = _when(max(_number(desired.get("updated")), _number(reported.get("updated"))), tz, ms=True)
        versions = f"desired v{_clean(desired.get('version', 0))} reported v{_clean(reported.get('version', 0))}"
        delta = e.get("delta")
        return f"{when}  {device:<12} twin         {versions} delta={_shorten(_compact(delta or {}), 200)}"
    if item.topic == "jobs":
        return f"{_when(e.get('updated'), tz, ms=True)}  {format_job_progress(e)}"
    return f"{_clean(item.topic)}: {_compact(e)}"


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def format_dropped(item: Dropped) -> str:
    """The line `watch` prints when the hub reports lost events."""
    return (
        f"hubctl: the hub dropped {item.dropped} {item.topic} events so far and coalesced {item.coalesced} "
        "(this client reads too slowly)"
    )


def _json_line(item: Event | Dropped) -> str:
    if isinstance(item, Event):
        body: dict[str, object] = {"type": "event", "topic": item.topic, "event": item.event}
    else:
        body = {"type": "dropped", "topic": item.topic, "dropped": item.dropped, "coalesced": item.coalesced}
    return json.dumps(body, separators=(",", ":"))


# ---------------------------------------------------------------------------- commands


def _out(text: str) -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _show(opts: argparse.Namespace, result: object, human: Callable[[], str]) -> None:
    _out(json.dumps(result, indent=2) if opts.json else human())


async def _devices(hub: ControlClient, opts: argparse.Namespace) -> int:
    devices = await hub.devices(opts.state, opts.selector)
    _show(opts, devices, lambda: format_devices(devices, time.time(), opts.state))
    return ExitCode.OK


async def _label_device(hub: ControlClient, opts: argparse.Namespace) -> int:
    result = await hub.device_label(opts.name, dict(opts.labels) or None, opts.remove or None)
    _show(opts, result, lambda: format_labels(result.get("labels")) or "(no labels)")
    return ExitCode.OK


async def _add_device(hub: ControlClient, opts: argparse.Namespace) -> int:
    added = await hub.device_add(opts.name, dict(opts.labels) or None)
    _show(opts, added, lambda: added["token"])
    return ExitCode.OK


async def _revoke_device(hub: ControlClient, opts: argparse.Namespace) -> int:
    await hub.device_revoke(opts.name)
    _show(opts, {"name": opts.name, "revoked": True}, lambda: f"revoked {opts.name}")
    return ExitCode.OK


async def _rotate_device(hub: ControlClient, opts: argparse.Namespace) -> int:
    rotated = await hub.device_rotate(opts.name)
    _show(opts, rotated, lambda: rotated["token"])
    return ExitCode.OK


async def _twin(hub: ControlClient, opts: argparse.Namespace) -> int:
    if opts.twin_action == "set":
        twin = await hub.twin_set(opts.name, opts.patch, opts.if_version)
    else:
        twin = await hub.twin(opts.name)
    _show(opts, twin, lambda: format_twin(twin))
    return ExitCode.OK


def format_twin(twin: Mapping[str, Any]) -> str:
    """`twin get` and `twin set`: both documents with their versions, the applied version, the delta."""
    lines = []
    for side in ("desired", "reported"):
        doc = twin.get(side) or {}
        lines.append(f"{side:<9} v{_clean(doc.get('version', 0))}  {_shorten(_compact(doc.get('state', {})), 400)}")
    lines.append(f"applied   v{_clean(twin.get('applied_version', 0))}")
    delta = twin.get("delta") or {}
    lines.append(f"delta     {_shorten(_compact(delta), 400) if delta else '(in sync)'}")
    return "\n".join(lines)


async def _device(hub: ControlClient, opts: argparse.Namespace) -> int:
    device = await hub.device(opts.name)
    _show(opts, device, lambda: format_device(device, time.time()))
    return ExitCode.OK


async def _commands(hub: ControlClient, opts: argparse.Namespace) -> int:
    records = await hub.commands(opts.name, opts.state, opts.limit)
    _show(opts, records, lambda: format_commands(records, time.time()))
    return ExitCode.OK


async def _command(hub: ControlClient, opts: argparse.Namespace) -> int:
    record = await hub.command(opts.command_id)
    _show(opts, record, lambda: format_command(record, time.time()))
    return ExitCode.OK


async def _cancel(hub: ControlClient, opts: argparse.Namespace) -> int:
    record = await hub.cancel_command(opts.command_id)
    _show(opts, record, lambda: _summary(record, time.time()))
    return ExitCode.OK


async def _status(hub: ControlClient, opts: argparse.Namespace) -> int:
    status = await hub.status()
    _show(opts, status, lambda: format_status(status))
    return ExitCode.OK


def _summary(record: Mapping[str, object], now: float) -> str:
    state = _clean(record.get("state", "?"))
    line = (
        f"command {_clean(record.get('command_id', '?'))} ({_clean(record.get('name', '?'))} "
        f"on {_clean(record.get('device', '?'))}): {state}"
    )
    if state in fleet.COMMAND_TTL_STATES:
        line += f", expires {ago(record.get('expires'), now)}"
    if state == "succeeded" and record.get("result") is not None:
        line += f"\nresult: {_compact(record['result'])}"
    if record.get("error"):
        line += f"\nerror: {_clean(record['error'])}"
    return line


async def _send(hub: ControlClient, opts: argparse.Namespace) -> int:
    record = await hub.send_command(
        opts.name,
        opts.command_name,
        command_args(opts),
        ttl=opts.ttl,
        timeout=opts.timeout,
        idempotency_key=opts.key,
        wait=opts.wait,
        wait_timeout=opts.wait_timeout,
    )
    _show(opts, record, lambda: _summary(record, time.time()))
    if not opts.wait:
        return ExitCode.OK
    state = record.get("state")
    cid = _clean(record.get("command_id", "?"))
    if state == "succeeded":
        return ExitCode.OK
    if state in FINAL_STATES:
        error = f": {_clean(record['error'])}" if record.get("error") else ""
        _err(f"hubctl: command {cid} ended {_clean(state)}{error}")
    else:
        waited = opts.wait_timeout or HUB_WAIT_TIMEOUT
        _err(f"hubctl: the wait timed out after {duration(waited)}; command {cid} is still {_clean(state)}")
    return ExitCode.COMMAND


async def _watch(hub: ControlClient, opts: argparse.Namespace) -> int:
    topics = TOPICS if opts.topic == "all" else (opts.topic,)
    devices = opts.names or None
    failures: list[Exception] = []

    async def follow(topic: str, nursery: trio.Nursery, ready: trio.Event) -> None:
        try:
            async with hub.subscribe(topic, devices, selector=opts.selector) as events:
                ready.set()
                async for item in events:
                    if opts.json:
                        _out(_json_line(item))
                    elif isinstance(item, Dropped):
                        _err(format_dropped(item))
                    else:
                        _out(format_event(item))
        except Exception as exc:  # reported by main once the others are stopped
            failures.append(exc)
            nursery.cancel_scope.cancel()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            readies = []
            for topic in topics:
                ready = trio.Event()
                readies.append(ready)
                nursery.start_soon(follow, topic, nursery, ready)
            for ready in readies:
                await ready.wait()
            who = ", ".join(_clean(n) for n in devices) if devices else "all devices"
            if opts.selector:
                who += f" matching {_clean(opts.selector)}"
            _err(f"hubctl: watching {', '.join(topics)} of {who}; Ctrl-C stops")
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    if failures:
        raise failures[0]
    return ExitCode.OK


async def _request(hub: ControlClient, opts: argparse.Namespace) -> int:
    _out(json.dumps(await hub.call(opts.request), indent=2))
    return ExitCode.OK


# ---------------------------------------------------------------------------- jobs

JOB_STATES = tuple(s.value for s in fleet.JOB_STATES)
JOB_DEVICE_STATES = tuple(s.value for s in fleet.JOB_DEVICE_STATES)
#: Seconds between two looks at a followed job.
FOLLOW_EVERY = 0.5

_JOB_DESCRIPTION = """\
Fleet jobs: one action on every device a label selector matches when the job starts, at most
--rate devices started per second and --max-in-flight at once, each device with its own outcome
(docs/control.md, "Jobs"). Creating and cancelling need the operator role; list and show, viewer.
Jobs are durable: a restarted hub resumes them."""


_percent = _float_arg("a number", lambda v: 0 <= v <= 100, "in 0..100")
_rate = _float_arg("a number", lambda v: v > 0 and math.isfinite(v), "a positive number of devices per second")


def _add_job_parser(sub: Callable[..., argparse.ArgumentParser]) -> None:
    job = sub("job", "fleet jobs: create, list, show, cancel", _JOB_DESCRIPTION, common=False)  # on its actions
    actions = job.add_subparsers(dest="job_command", metavar="ACTION", required=True)

    def action(name: str, help: str, description: str = "") -> argparse.ArgumentParser:
        return _subparser(actions, name, help, description)

    p = action(
        "create",
        "start a job: a command or a desired-state change on every device a selector matches",
        "Start a job on every device --selector matches now and print its id: --command NAME sends a\n"
        "command (each with the idempotency key job:<job id>); --desired PATCH merges a JSON merge patch\n"
        "into each device's desired twin state, and a device succeeds once it applied it (--timeout: how\n"
        "long it has, hub default 3600 s). With --wait, print a live progress line until it ends, then its\n"
        "outcome; exit 4 unless every device succeeded.",
    )
    p.add_argument("--selector", metavar="SELECTOR", required=True, help="the devices, e.g. site=berlin,model=th-100")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--command", dest="command_name", metavar="NAME", help="the command to send")
    what.add_argument(
        "--desired", metavar="PATCH", type=_json_object, help="a desired-state merge patch, e.g. '{\"interval\": 30}'"
    )
    _add_command_args(p)
    p.add_argument("--ttl", metavar="S", type=_seconds, help="seconds each command may wait for delivery (hub: 3600)")
    p.add_argument(
        "--timeout",
        metavar="S",
        type=_seconds,
        help="seconds a device has to answer a command (hub: 30), or to apply --desired (hub: 3600)",
    )
    p.add_argument(
        "--rate", metavar="R", type=_rate, help=f"devices started per second (default {fleet.DEFAULT_RATE:g})"
    )
    p.add_argument(
        "--max-in-flight",
        metavar="N",
        type=_positive_int,
        help=f"devices in flight at once (default {fleet.DEFAULT_MAX_IN_FLIGHT})",
    )
    p.add_argument(
        "--abort-percent",
        metavar="X",
        type=_percent,
        help=f"abort when more than X%% of the outcomes so far failed (checked from min({fleet.ABORT_MIN_OUTCOMES},"
        " devices) outcomes on; default: never)",
    )
    p.add_argument("--wait", action="store_true", help="follow the job with a progress line until it ends")

    p = action("list", "list jobs, newest first")
    p.add_argument("--state", choices=JOB_STATES, help="only jobs in this state")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="at most N jobs (hub default: 50, max 1000)")

    p = action(
        "show",
        "one job: its progress and its devices' outcomes",
        "Show a job: its action, rollout, progress by state and a page of its devices' outcomes.\n"
        "With --follow, print a live progress line until the job ends first; exit 4 unless every\n"
        "device succeeded.",
    )
    p.add_argument("job_id", metavar="ID")
    p.add_argument("--state", choices=JOB_DEVICE_STATES, help="only devices in this state")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="at most N devices (hub default: 50, max 1000)")
    p.add_argument("--offset", type=int, metavar="N", help="skip the first N devices")
    p.add_argument("--follow", action="store_true", help="print a live progress line until the job ends")

    p = action("cancel", "cancel a running job: pending devices are cancelled, queued commands too")
    p.add_argument("job_id", metavar="ID")


def job_action(opts: argparse.Namespace) -> dict[str, JSON]:
    """The `action` object of `job create`."""
    if opts.desired is not None:
        desired: dict[str, JSON] = {"type": "desired", "patch": opts.desired}
        if opts.timeout is not None:
            desired["timeout"] = opts.timeout
        return desired
    action: dict[str, JSON] = {"type": "command", "name": opts.command_name}
    args = command_args(opts)
    if args is not None:
        action["args"] = args
    if opts.ttl is not None:
        action["ttl"] = opts.ttl
    if opts.timeout is not None:
        action["timeout"] = opts.timeout
    return action


def format_job_progress(job: Mapping[str, object]) -> str:
    """One line of a job's progress: ``job j-1 running: 57/200 done (50 succeeded, 7 failed), 10 running, ...``."""
    counts = _object(job.get("counts"))

    def n(state: str) -> int:
        value = counts.get(state, 0)
        return value if isinstance(value, int) else 0

    done = sum(n(s) for s in ("succeeded", "failed", "cancelled", "skipped"))
    outcomes = ", ".join(f"{n(s)} {s}" for s in ("succeeded", "failed", "cancelled", "skipped") if n(s))
    total = _clean(job.get("total", "?"))
    line = f"job {_clean(job.get('job_id', '?'))} {_clean(job.get('state', '?'))}: {done}/{total} done"
    if outcomes:
        line += f" ({outcomes})"
    line += f", {n('running')} running, {n('pending')} pending"
    return line


def _action_text(action: object) -> str:
    a = _object(action)
    if a.get("type") == "command":
        text = f"command {_clean(a.get('name', '?'))}"
        if a.get("args"):
            text += f" {_compact(a['args'])}"
        for key in ("ttl", "timeout"):
            if a.get(key) is not None:
                text += f" {key} {duration(a[key])}"
        return text
    return _compact(a)


def format_jobs(jobs: Sequence[Mapping[str, object]], now: float) -> str:
    """The `job list` table (newest first)."""
    if not jobs:
        return "no jobs"
    rows = []
    for j in jobs:
        counts = _object(j.get("counts"))
        done = sum(v for k, v in counts.items() if k not in ("pending", "running") and isinstance(v, int))
        rows.append(
            [
                _clean(j.get("job_id", "?")),
                _clean(j.get("state", "?")),
                f"{done}/{_clean(j.get('total', '?'))}",
                _clean(counts.get("failed", 0)),
                _shorten(_action_text(j.get("action")), 40),
                _shorten(_clean(j.get("selector", "?")), 40),
                ago(j.get("created"), now),
                _clean(j.get("operator") or "-"),
            ]
        )
    return "\n".join(table(["ID", "STATE", "DONE", "FAILED", "ACTION", "SELECTOR", "CREATED", "OPERATOR"], rows))


def format_job(job: Mapping[str, object], now: float, tz: tzinfo | None = None, *, filtered: bool = False) -> str:
    """The `job show ID` view: the record, its progress and a page of its devices (`filtered`: of one state)."""

    def num(value: object) -> str:
        return f"{value:g}" if isinstance(value, int | float) and not isinstance(value, bool) else _clean(value)

    abort = job.get("abort_percent")
    rollout = f"{num(job.get('rate', '?'))}/s, at most {num(job.get('max_in_flight', '?'))} in flight"
    rollout += f", abort past {num(abort)} % failed" if abort is not None else ", never aborts"
    pairs = [
        ("job", _clean(job.get("job_id", "?"))),
        ("state", _clean(job.get("state", "?"))),
        ("reason", _clean(job.get("reason") or "-")),
        ("action", _action_text(job.get("action"))),
        ("selector", _clean(job.get("selector", "?"))),
        ("rollout", rollout),
        ("operator", _clean(job.get("operator") or "-")),
        ("created", _at(job.get("created"), now, tz)),
        ("updated", _at(job.get("updated"), now, tz)),
        ("progress", format_job_progress(job).split(": ", 1)[-1]),
    ]
    lines = _pairs(pairs)
    devices = job.get("devices")
    if isinstance(devices, list) and devices:
        lines.append("")
        rows = [
            [
                _clean(d.get("device", "?")),
                _clean(d.get("state", "?")),
                ago(d.get("started"), now),
                ago(d.get("finished"), now),
                _clean(d.get("ref") or "-"),
                _shorten(_clean(d.get("error") or "")),
            ]
            for d in devices
            if isinstance(d, dict)
        ]
        lines.extend(table(["DEVICE", "STATE", "STARTED", "FINISHED", "COMMAND", "ERROR"], rows))
        offset = job.get("offset")
        first = offset if isinstance(offset, int) else 0
        total = job.get("total")
        if isinstance(total, int) and first + len(rows) < total and not filtered:
            lines.append(f"(devices {first + 1}-{first + len(rows)} of {total}: --offset for more)")
    return "\n".join(lines)


def _job_exit(job: Mapping[str, object]) -> int:
    counts = _object(job.get("counts"))
    if job.get("state") == "completed" and counts.get("succeeded") == job.get("total"):
        return ExitCode.OK
    _err(f"hubctl: {format_job_progress(job)}")
    return ExitCode.COMMAND


async def _follow_job(hub: ControlClient, job_id: str) -> None:
    """Print the job's progress line until it ends: in place on a terminal, a line per change otherwise."""
    tty = sys.stderr.isatty()
    last = ""
    while True:
        job = await hub.job(job_id, limit=1)
        line = format_job_progress(job)
        if line != last:
            print(("\r\x1b[K" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
            last = line
        if job.get("state") in fleet.JOB_FINAL_STATES:
            if tty:
                print(file=sys.stderr, flush=True)
            return
        await trio.sleep(FOLLOW_EVERY)


async def _job_create(hub: ControlClient, opts: argparse.Namespace) -> int:
    job = await hub.job_create(
        opts.selector,
        job_action(opts),
        rate=opts.rate,
        max_in_flight=opts.max_in_flight,
        abort_percent=opts.abort_percent,
    )
    if not opts.wait:
        _show(opts, job, lambda: f"{format_job_progress(job)}\nfollow it: hubctl job show {job['job_id']} --follow")
        return ExitCode.OK
    await _follow_job(hub, job["job_id"])
    final = await hub.job(job["job_id"])
    _show(opts, final, lambda: format_job(final, time.time()))
    return _job_exit(final)


async def _job_list(hub: ControlClient, opts: argparse.Namespace) -> int:
    jobs = await hub.jobs(opts.state, opts.limit)
    _show(opts, jobs, lambda: format_jobs(jobs, time.time()))
    return ExitCode.OK


async def _job_show(hub: ControlClient, opts: argparse.Namespace) -> int:
    if opts.follow:
        await _follow_job(hub, opts.job_id)
    job = await hub.job(opts.job_id, state=opts.state, limit=opts.limit, offset=opts.offset)
    _show(opts, job, lambda: format_job(job, time.time(), filtered=opts.state is not None))
    return _job_exit(job) if opts.follow else ExitCode.OK


async def _job_cancel(hub: ControlClient, opts: argparse.Namespace) -> int:
    job = await hub.job_cancel(opts.job_id)
    _show(opts, job, lambda: format_job_progress(job))
    return ExitCode.OK


_JOB_COMMANDS: dict[str, Callable[[ControlClient, argparse.Namespace], Awaitable[int]]] = {
    "create": _job_create,
    "list": _job_list,
    "show": _job_show,
    "cancel": _job_cancel,
}


_COMMANDS: dict[str, Callable[[ControlClient, argparse.Namespace], Awaitable[int]]] = {
    "devices": _devices,
    "device": _device,
    "twin": _twin,
    "label": _label_device,
    "add": _add_device,
    "revoke": _revoke_device,
    "rotate": _rotate_device,
    "watch": _watch,
    "send": _send,
    "commands": _commands,
    "command": _command,
    "cancel": _cancel,
    "status": _status,
    "request": _request,
    "job": lambda hub, opts: _JOB_COMMANDS[opts.job_command](hub, opts),
}


async def _run(opts: argparse.Namespace, url: str, token: str) -> int:
    try:
        async with open_control(url, token, ca_file=opts.ca_file, allow_insecure=opts.insecure_plain_ws) as hub:
            return await _COMMANDS[opts.command](hub, opts)
    except RequestFailed as exc:
        message = f": {_clean(exc.message)}" if exc.message else ""
        _err(f"hubctl: error from the hub: {_clean(exc.code)}{message}")
        return ExitCode.ERROR
    except AuthRefused as exc:
        _err(f"hubctl: {exc}")
        return ExitCode.CONNECT
    except ConnectFailed as exc:
        _err(f"hubctl: {exc}")
        return ExitCode.CONNECT
    except Disconnected as exc:
        _err(f"hubctl: lost the connection to the hub: {_clean(exc)}")
        return ExitCode.CONNECT
    except ReplyTimeout as exc:
        _err(f"hubctl: {exc}")
        return ExitCode.CONNECT
    except ClientError as exc:
        _err(f"hubctl: {exc}")
        return ExitCode.ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run `hubctl` with `argv` (default: the process arguments); the exit code."""
    parser = build_parser()
    try:
        opts = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error (argparse exits 2)
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    if opts.command == "send" and opts.wait_timeout is not None and not opts.wait:
        _err("hubctl: error: --wait-timeout needs --wait")
        return ExitCode.USAGE
    if opts.command == "label" and not opts.labels and not opts.remove:
        _err("hubctl: error: give labels to set (KEY=VALUE), keys to --remove, or both")
        return ExitCode.USAGE
    commandless = opts.command == "job" and opts.job_command == "create" and opts.desired is not None
    if commandless and (opts.args or opts.args_json is not None or opts.ttl is not None):
        _err("hubctl: error: --arg, --args and --ttl go with --command, not --desired")
        return ExitCode.USAGE
    if opts.command == "request":
        try:
            opts.request = REQUESTS[opts.type].decode(dict(opts.fields))
        except ControlError as exc:  # checked here as the hub would: the same code and message
            _err(f"hubctl: error: {_clean(exc)}")
            return ExitCode.USAGE
    try:
        token = _token(opts, os.environ)
        url = control_url(opts.url or os.environ.get(URL_ENV) or DEFAULT_URL)
        if opts.ca_file is None and url.startswith("wss:"):
            opts.ca_file = os.environ.get(CA_FILE_ENV) or None
        # Refuses plain ws:// to a remote host and loads the CA file before anything is sent.
        client_ssl_context(url, ca_file=opts.ca_file, allow_insecure=opts.insecure_plain_ws)
    except (UsageError, ValueError) as exc:
        _err(f"hubctl: {exc}")
        return ExitCode.USAGE
    try:
        return trio.run(_run, opts, url, token)
    except KeyboardInterrupt:
        return ExitCode.OK if opts.command == "watch" else ExitCode.INTERRUPTED
    except BaseExceptionGroup as group:
        if group.split(KeyboardInterrupt)[1] is not None:
            raise
        return ExitCode.OK if opts.command == "watch" else ExitCode.INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (hubctl watch | head): not an error; keep Python quiet at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
