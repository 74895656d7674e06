"""Tests of `hubctl`: argument parsing and formatting (pure), then end to end against a real hub."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from device_client import DeviceClient
from device_client.protocol import DEVICE_PATH
from hub.app import HubHandle
from hub.operator import Dropped, Event, ctl
from hub.operator.ctl import (
    ExitCode,
    ago,
    build_parser,
    command_args,
    duration,
    format_command,
    format_commands,
    format_device,
    format_devices,
    format_dropped,
    format_event,
    format_labels,
    format_status,
    main,
    parse_arg,
    table,
)
from tests.hubtools import add_devices, add_operators, hub_config, start_hub
from tests.ports import refused_port
from tests.wire import upgrade

NOW = 1_764_000_000.0  # 2025-11-24 16:00:00 UTC


# ---------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("n=5", ("n", 5)),
        ("ratio=0.5", ("ratio", 0.5)),
        ("mode=eco", ("mode", "eco")),
        ("on=true", ("on", True)),
        ("off=null", ("off", None)),
        ('s="5"', ("s", "5")),
        ("list=[1, 2]", ("list", [1, 2])),
        ('obj={"a": 1}', ("obj", {"a": 1})),
        ("empty=", ("empty", "")),
        ("eq=a=b", ("eq", "a=b")),
        ("x=NaN", ("x", "NaN")),  # Python's json would give nan: not JSON, so a string
        ("x=Infinity", ("x", "Infinity")),
        ("x=[1,", ("x", "[1,")),
    ],
)
def test_parse_arg(text: str, expected: tuple[str, object]) -> None:
    assert parse_arg(text) == expected


@pytest.mark.parametrize("bad", ["novalue", "=5", ""])
def test_parse_arg_refuses(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_arg(bad)


def test_send_arguments() -> None:
    opts = build_parser().parse_args(
        [
            "send",
            "boiler-1",
            "set_mode",
            "--args-json",
            '{"mode": "off", "level": 1}',
            "--arg",
            "mode=eco",
            "--arg",
            "n=5",
            "--ttl",
            "60",
            "--timeout",
            "2.5",
            "--key",
            "k-1",
            "--wait",
            "--wait-timeout",
            "10",
            "--json",
        ]
    )
    assert (opts.command, opts.name, opts.command_name) == ("send", "boiler-1", "set_mode")
    assert command_args(opts) == {"mode": "eco", "level": 1, "n": 5}
    assert (opts.ttl, opts.timeout, opts.key, opts.wait, opts.wait_timeout, opts.json) == (
        60.0,
        2.5,
        "k-1",
        True,
        10.0,
        True,
    )


def test_send_without_arguments_sends_no_args() -> None:
    opts = build_parser().parse_args(["send", "boiler-1", "reboot"])
    assert command_args(opts) is None
    assert not opts.wait


def test_common_options_before_or_after_the_command() -> None:
    parser = build_parser()
    before = parser.parse_args(["--json", "--url", "ws://a:1", "--token-file", "t", "devices"])
    after = parser.parse_args(["devices", "--json", "--url", "ws://a:1", "--token-file", "t"])
    for opts in (before, after):
        assert (opts.json, opts.url, opts.token_file) == (True, "ws://a:1", "t")
    assert parser.parse_args(["--url", "ws://a:1", "devices", "--url", "ws://b:2"]).url == "ws://b:2"
    plain = parser.parse_args(["status"])
    assert (plain.json, plain.url, plain.token_file) == (False, None, None)


def test_watch_and_list_arguments() -> None:
    parser = build_parser()
    opts = parser.parse_args(["watch", "a", "b", "--topic", "all"])
    assert (opts.names, opts.topic) == (["a", "b"], "all")
    assert parser.parse_args(["watch"]).topic == "telemetry"
    opts = parser.parse_args(["commands", "a", "--state", "timed_out", "--limit", "5"])
    assert (opts.name, opts.state, opts.limit) == ("a", "timed_out", 5)
    assert parser.parse_args(["devices", "--state", "late"]).state == "late"
    assert parser.parse_args(["devices", "--state", "never"]).state == "never"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["--token", "secret", "status"],  # there is no --token option, on purpose
        ["status", "--token", "secret"],
        ["devices", "--state", "asleep"],
        ["commands", "--limit", "0"],
        ["watch", "--topic", "logs"],
        ["send", "a"],
        ["send", "a", "cmd", "--arg", "novalue"],
        ["send", "a", "cmd", "--args-json", "[1, 2]"],
        ["send", "a", "cmd", "--args-json", "{bad"],
        ["send", "a", "cmd", "--ttl", "0"],
        ["send", "a", "cmd", "--timeout", "nan"],
        ["send", "a", "cmd", "--wait-timeout", "5"],  # needs --wait
        ["request"],
        ["request", "reboot_the_world"],  # not in hub.control.REQUESTS
        ["request", "device"],  # no name: refused before connecting, as the hub would
        ["request", "commands", "limit=0"],
        ["request", "commands", "nokey"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv(ctl.TOKEN_ENV, "op.alice.x")
    assert main(argv) == ExitCode.USAGE
    assert capsys.readouterr().err


def test_request_arguments() -> None:
    opts = build_parser().parse_args(["request", "commands", "device=boiler-1", "limit=5", "--json"])
    assert (opts.type, opts.fields) == ("commands", [("device", "boiler-1"), ("limit", 5)])
    assert build_parser().parse_args(["request", "status"]).fields == []


def test_a_refused_request_says_why(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv(ctl.TOKEN_ENV, "op.alice.x")
    assert main(["request", "send_command", "device=d", "name=x", "args=[1]"]) == ExitCode.USAGE
    assert capsys.readouterr().err == "hubctl: error: bad_command: args must be an object\n"


def test_help_explains_where_the_token_comes_from(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    text = " ".join(out.split())
    assert "HUBCTL_TOKEN" in text
    assert "--token-file" in text
    assert "shell history" in text
    assert "--token " not in out.split("\n\n")[0]  # the usage paragraph


def test_no_token_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv(ctl.TOKEN_ENV, raising=False)
    assert main(["status"]) == ExitCode.USAGE
    assert "HUBCTL_TOKEN" in capsys.readouterr().err


def test_unreadable_token_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["status", "--token-file", str(tmp_path / "missing")]) == ExitCode.USAGE
    assert "token file" in capsys.readouterr().err


def test_token_url_in_environment_and_bad_url(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv(ctl.TOKEN_ENV, "op.alice.x")
    monkeypatch.setenv(ctl.URL_ENV, "http://wrong")
    assert main(["status"]) == ExitCode.USAGE
    assert "ws://" in capsys.readouterr().err


def test_cannot_connect_exits_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv(ctl.TOKEN_ENV, raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("op.alice.x\n")
    assert main(["--url", f"ws://127.0.0.1:{refused_port()}", "--token-file", str(token_file), "status"]) == 3
    assert "cannot connect" in capsys.readouterr().err


# ---------------------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (NOW - 12, "12s ago"),
        (NOW - 0.4, "now"),
        (NOW - 245, "4m05s ago"),
        (NOW - 3 * 3600 - 120, "3h02m ago"),
        (NOW - 2 * 86400 - 4 * 3600, "2d04h ago"),
        (NOW + 300, "in 5m00s"),
        (None, "-"),
        ("soon", "-"),
        (True, "-"),
    ],
)
def test_ago(t: object, expected: str) -> None:
    assert ago(t, NOW) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(2.5, "2.5s"), (30, "30s"), (30.0, "30s"), (3600, "1h00m"), (172800, "2d00h"), (None, "-")],
)
def test_duration(seconds: object, expected: str) -> None:
    assert duration(seconds) == expected


def test_table_aligns_columns_under_headers() -> None:
    lines = table(["NAME", "STATE"], [["a", "online"], ["longer-name", "late"]])
    assert lines == ["NAME         STATE", "a            online", "longer-name  late"]


def device_summary(name: str, **kw: object) -> dict[str, object]:
    summary: dict[str, object] = {
        "name": name,
        "state": "online",
        "since": NOW - 12,
        "reason": "hello",
        "last_seen": NOW - 2,
        "epoch": 3,
        "firmware": "1.4.2",
        "model": "th-100",
        "interval": 10,
        "revoked": False,
        "labels": {"model": "th-100", "site": "berlin"},
    }
    summary.update(kw)
    return summary


def test_format_devices() -> None:
    text = format_devices(
        [
            device_summary("boiler-1"),
            device_summary(
                "sensor-22",
                state="never",
                since=NOW - 86400,
                reason="",
                last_seen=None,
                firmware="",
                model="",
                interval=0,
                revoked=True,
                labels={},
            ),
        ],
        NOW,
    )
    assert text.splitlines() == [
        "NAME       STATE            SINCE      LAST SEEN  REASON  FIRMWARE  MODEL   INTERVAL  LABELS",
        "boiler-1   online           12s ago    2s ago     hello   1.4.2     th-100  10s       "
        "model=th-100,site=berlin",
        "sensor-22  never (revoked)  1d00h ago  -          -       -         -       -         -",
    ]
    assert format_labels({"k": "v\x1b[2J"}) == "k=v\\x1b[2J" and format_labels(None) == ""  # never a raw escape
    assert format_devices([], NOW, "late") == "no devices late"


def command_record(**kw: object) -> dict[str, object]:
    record: dict[str, object] = {
        "command_id": "c-1",
        "device": "boiler-1",
        "name": "set_mode",
        "args": {"mode": "eco"},
        "state": "succeeded",
        "created": NOW - 65,
        "updated": NOW - 60,
        "expires": NOW + 3535,
        "timeout": 30,
        "idempotency_key": None,
        "operator": "alice",
        "result": {"ok": True},
        "error": None,
        "history": [{"state": "queued", "at": NOW - 65}, {"state": "succeeded", "at": NOW - 60}],
    }
    record.update(kw)
    return record


def test_format_commands() -> None:
    records = [
        command_record(),
        command_record(command_id="c-2", state="failed", result=None, error="no such mode"),
        command_record(command_id="c-3", state="queued", result=None, operator=None),
    ]
    assert format_commands(records, NOW).splitlines() == [
        "ID   DEVICE    NAME      STATE      CREATED    UPDATED    OPERATOR  RESULT",
        'c-1  boiler-1  set_mode  succeeded  1m05s ago  1m00s ago  alice     {"ok":true}',
        "c-2  boiler-1  set_mode  failed     1m05s ago  1m00s ago  alice     no such mode",
        "c-3  boiler-1  set_mode  queued     1m05s ago  1m00s ago  -         expires in 58m55s",
    ]
    assert format_commands([], NOW) == "no commands"


def test_format_command() -> None:
    lines = format_command(command_record(), NOW, UTC).splitlines()
    assert lines[0] == "command   c-1"
    assert 'args      {"mode":"eco"}' in lines
    assert "created   2025-11-24 15:58:55 (1m05s ago)" in lines
    assert "expires   2025-11-24 16:58:55 (in 58m55s)" in lines
    assert "timeout   30s" in lines
    assert "key       -" in lines
    assert 'result    {"ok":true}' in lines
    start = lines.index("history:")
    assert lines[start + 1 :] == [
        "  STATE      AT",
        "  queued     2025-11-24 15:58:55 (1m05s ago)",
        "  succeeded  2025-11-24 15:59:00 (1m00s ago)",
    ]


def test_format_device() -> None:
    device = device_summary("boiler-1")
    device["latest"] = {
        "environment": {
            "ts": int((NOW - 3) * 1000),
            "fields": {"temperature": 20.5, "count": {"int": 7}},
            "tags": {"room": "lab 2"},
        }
    }
    device["commands"] = [command_record()]
    lines = format_device(device, NOW, UTC).splitlines()
    assert lines[:3] == [
        "name       boiler-1",
        "state      online since 2025-11-24 15:59:48 (12s ago), reason: hello",
        "last seen  2025-11-24 15:59:58 (2s ago)",
    ]
    latest = lines.index("latest values:")
    assert lines[latest + 1 : latest + 3] == [
        "MEASUREMENT  AGE     FIELDS                     TAGS",
        "environment  3s ago  temperature=20.5 count=7i  room=lab 2",
    ]
    recent = lines.index("recent commands:")
    assert lines[recent + 1].split() == ["ID", "NAME", "STATE", "CREATED", "UPDATED", "OPERATOR", "RESULT"]
    assert lines[recent + 2].split()[:3] == ["c-1", "set_mode", "succeeded"]
    bare = device_summary("b", latest={}, commands=[])
    assert "latest values: none" in format_device(bare, NOW).splitlines()
    assert "recent commands: none" in format_device(bare, NOW).splitlines()


def test_format_status() -> None:
    status = {
        "version": "0.1.0",
        "uptime": 3725.6,
        "connections": 12,
        "devices": {"online": 10, "late": 1, "offline": 3, "registered": 15},
        "ingest": {
            "points_in": 1000,
            "points_written": 990,
            "points_spooled": 10,
            "points_replayed": 0,
            "points_dropped": 0,
            "spool_bytes": 2048,
            "sink_up": False,
        },
        "commands": {"queued": 2, "succeeded": 40},
        "control_sessions": 1,
    }
    assert format_status(status).splitlines() == [
        "hub          version 0.1.0, up 1h02m",
        "connections  12 device sessions, 1 control session",
        "devices      10 online, 1 late, 3 offline, 15 registered",
        "points       1000 in, 990 written, 10 spooled, 0 replayed, 0 dropped",
        "spool        2.0 KiB, sink DOWN",
        "commands     2 queued, 40 succeeded",
    ]
    assert format_status({}).splitlines()[0] == "hub          version ?, up -"


def test_format_telemetry_event() -> None:
    event = {
        "device": "boiler-1",
        "measurement": "environment",
        "ts": int(NOW * 1000) + 123,
        "fields": {"temperature": 20.5, "count": {"int": 7}, "reading": 3, "ok": True, "mode": "eco"},
        "tags": {"room": "lab 2"},
    }
    assert format_event(Event(1, "telemetry", event), UTC) == (
        '2025-11-24 16:00:00.123  boiler-1     environment  temperature=20.5 count=7i reading=3 ok=true mode="eco"'
        "  [room=lab 2]"
    )


def test_format_presence_and_command_events() -> None:
    presence = device_summary("boiler-1", state="late", since=NOW, reason="missed 3 intervals", epoch=4)
    assert format_event(Event(1, "presence", presence), UTC) == (
        "2025-11-24 16:00:00.000  boiler-1     presence     late (missed 3 intervals) epoch 4"
    )
    record = command_record(updated=NOW)
    assert format_event(Event(2, "commands", record), UTC) == (
        '2025-11-24 16:00:00.000  boiler-1     command      c-1 set_mode succeeded result={"ok":true}'
    )
    failed = command_record(updated=NOW, state="failed", result=None, error="boom")
    assert format_event(Event(2, "commands", failed), UTC).endswith("c-1 set_mode failed error=boom")


def test_device_supplied_text_cannot_drive_the_terminal() -> None:
    # String fields and firmware text come from devices: an escape sequence must be shown, not obeyed.
    event = {"device": "d", "measurement": "m", "ts": int(NOW * 1000), "fields": {"s": "\x1b[2J\x07"}, "tags": {}}
    line = format_event(Event(1, "telemetry", event), UTC)
    assert "\x1b" not in line and "\x07" not in line
    assert "\\u001b[2J" in line or "\\x1b[2J" in line
    text = format_devices([device_summary("d", firmware="1.0\x1b]0;pwned\x07")], NOW)
    assert "\x1b" not in text and "\\x1b]0;pwned\\x07" in text


def test_format_dropped() -> None:
    line = format_dropped(Dropped(3, "telemetry", 120, 4000))
    assert "120" in line and "4000" in line and "telemetry" in line


# ---------------------------------------------------------------------------- end to end against a real hub


@attrs.frozen
class Hub:
    """A hub running in the test's trio loop, with two registered devices and two operators."""

    handle: HubHandle
    data: Path
    devices: dict[str, str]  # device tokens by name
    operator: str  # token of role operator
    viewer: str  # token of role viewer

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.handle.port}/v1/control"

    @property
    def device_url(self) -> str:
        return f"ws://127.0.0.1:{self.handle.port}"


@attrs.frozen
class Run:
    """A finished hubctl process."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def hubctl_argv(hub: Hub, *args: str) -> list[str]:
    return [sys.executable, "-m", "hub.operator.ctl", "--url", hub.url, *args]


def hubctl_env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (ctl.TOKEN_ENV, ctl.URL_ENV)}
    env[ctl.TOKEN_ENV] = token
    return env


async def hubctl(hub: Hub, *args: str, token: str | None = None) -> Run:
    """Run hubctl in a subprocess while this trio loop keeps serving the hub."""
    with trio.fail_after(60):
        proc = await trio.run_process(
            hubctl_argv(hub, *args),
            env=hubctl_env(token or hub.operator),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return Run(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    data = tmp_path / "hub"
    devices = add_devices(data, "boiler-1", "sensor-2")
    operators = add_operators(data, alice="operator", victor="viewer")
    async with trio.open_nursery() as nursery:
        handle = await start_hub(nursery, hub_config(data))
        yield Hub(handle, data, devices, operators["alice"], operators["victor"])
        handle.stop()


@asynccontextmanager
async def device(hub: Hub, name: str = "boiler-1") -> AsyncIterator[DeviceClient]:
    """A connected device that echoes `echo`'s args, fails `fail`, and never answers `hang`."""
    async with DeviceClient(hub.device_url, hub.devices[name], firmware="1.4.2", model="th-100", interval=10) as client:

        @client.command("echo")
        async def echo(args: dict[str, Any]) -> Any:
            return args

        @client.command("fail")
        async def fail(args: dict[str, Any]) -> Any:
            raise RuntimeError("valve stuck")

        with trio.fail_after(30):
            await client.wait_connected()
        yield client


class Lines:
    """Reads a subprocess pipe line by line."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str:
        """The next line (fails the test after 30 s or if the stream ends first)."""
        with trio.fail_after(30):
            while b"\n" not in self._buffer:
                chunk = await self._stream.receive_some()
                assert chunk, f"the stream ended; left over: {self._buffer!r}"
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    async def rest(self) -> str:
        """Everything up to the end of the stream."""
        with trio.fail_after(30):
            while chunk := await self._stream.receive_some():
                self._buffer += chunk
        return self._buffer.decode()


async def test_labels_and_selectors(hub: Hub) -> None:
    admin = add_operators(hub.data, adm="admin")["adm"]
    run = await hubctl(hub, "label", "boiler-1", "site=berlin", "model=th-100", token=admin)
    assert (run.code, run.out) == (0, "model=th-100,site=berlin\n"), run.err
    run = await hubctl(hub, "--json", "label", "sensor-2", "site=paris", token=admin)
    assert run.code == 0 and run.json() == {"name": "sensor-2", "labels": {"site": "paris"}}, run.err
    run = await hubctl(hub, "label", "boiler-1", "--remove", "model", token=admin)
    assert (run.code, run.out) == (0, "site=berlin\n"), run.err

    run = await hubctl(hub, "devices", "--selector", "site=berlin", token=hub.viewer)
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert lines[0].split()[-1] == "LABELS" and [line.split()[0] for line in lines[1:]] == ["boiler-1"]
    assert lines[1].split()[-1] == "site=berlin"
    run = await hubctl(hub, "--json", "devices", "--selector", "site!=berlin", token=hub.viewer)
    assert [d["name"] for d in run.json()] == ["sensor-2"]

    run = await hubctl(hub, "label", "boiler-1", "a=b", token=hub.operator)
    assert run.code == 1 and "forbidden" in run.err
    run = await hubctl(hub, "devices", "--selector", "site==x", token=hub.viewer)
    assert run.code == 1 and "bad_label" in run.err  # checked before anything is sent, as the hub would
    run = await hubctl(hub, "label", "boiler-1", "a b", token=admin)
    assert run.code == 2 and "bad label" in run.err
    run = await hubctl(hub, "label", "boiler-1", token=admin)
    assert run.code == 2 and "give labels to set" in run.err
    run = await hubctl(hub, "label", "ghost", "a=b", token=admin)
    assert run.code == 1 and "not_found" in run.err


async def test_devices_device_and_status(hub: Hub) -> None:
    async with device(hub) as client:
        await client.send("environment", {"temperature": 20.5, "count": 7}, tags={"room": "lab 2"})
        with trio.fail_after(30):
            await client.wait_acked()

        run = await hubctl(hub, "devices", token=hub.viewer)
        assert run.code == 0, run.err
        lines = run.out.splitlines()
        assert lines[0].split()[:3] == ["NAME", "STATE", "SINCE"]
        assert lines[1].split()[:2] == ["boiler-1", "online"]
        assert lines[2].split()[:2] == ["sensor-2", "never"]
        assert "1.4.2" in lines[1] and "th-100" in lines[1] and "10s" in lines[1]

        run = await hubctl(hub, "devices", "--state", "online", "--json", token=hub.viewer)
        assert run.code == 0, run.err
        assert [(d["name"], d["state"]) for d in run.json()] == [("boiler-1", "online")]

        run = await hubctl(hub, "devices", "--state", "never", token=hub.viewer)  # registered, never connected
        assert run.code == 0, run.err
        assert [line.split()[:2] for line in run.out.splitlines()[1:]] == [["sensor-2", "never"]]

        run = await hubctl(hub, "device", "boiler-1", token=hub.viewer)
        assert run.code == 0, run.err
        assert "latest values:" in run.out
        latest = run.out.splitlines()[run.out.splitlines().index("latest values:") + 2]
        assert latest.split()[0] == "environment" and "temperature=20.5" in latest and "room=lab 2" in latest

        run = await hubctl(hub, "--json", "device", "boiler-1", token=hub.viewer)
        assert run.code == 0, run.err
        got = run.json()
        assert (got["name"], got["state"], got["firmware"]) == ("boiler-1", "online", "1.4.2")
        assert got["latest"]["environment"]["fields"]["temperature"] == 20.5

        run = await hubctl(hub, "status", token=hub.viewer)
        assert run.code == 0, run.err
        assert [line.split()[0] for line in run.out.splitlines()] == [
            "hub",
            "connections",
            "devices",
            "points",
            "spool",
            "commands",
        ]
        assert "1 online" in run.out and "2 registered" in run.out

        run = await hubctl(hub, "status", "--json", token=hub.viewer)
        assert run.code == 0, run.err
        status = run.json()
        assert status["devices"]["online"] == 1 and status["devices"]["registered"] == 2
        assert status["ingest"]["points_in"] >= 1

    run = await hubctl(hub, "device", "no-such", token=hub.viewer)
    assert (run.code, run.out) == (1, "")
    assert "not_found" in run.err


async def test_request_sends_any_request_of_the_table(hub: Hub) -> None:
    run = await hubctl(hub, "request", "devices", "state=never", token=hub.viewer)
    assert run.code == 0, run.err
    assert [d["name"] for d in run.json()] == ["boiler-1", "sensor-2"]
    run = await hubctl(hub, "request", "ping", token=hub.viewer)
    assert (run.code, run.json()) == (0, None)
    run = await hubctl(hub, "request", "device_add", "name=d9", token=hub.operator)
    assert (run.code, run.out) == (1, "")
    assert "forbidden" in run.err


async def test_send_queued_commands_command_and_cancel(hub: Hub) -> None:
    # sensor-2 is offline: the command stays queued.
    run = await hubctl(hub, "send", "sensor-2", "echo", "--arg", "n=5", "--ttl", "600", "--key", "k-1", "--json")
    assert run.code == 0, run.err
    record = run.json()
    assert (record["device"], record["name"], record["args"], record["state"]) == (
        "sensor-2",
        "echo",
        {"n": 5},
        "queued",
    )
    assert (record["operator"], record["idempotency_key"]) == ("alice", "k-1")
    cid = record["command_id"]

    again = await hubctl(hub, "send", "sensor-2", "echo", "--arg", "n=5", "--key", "k-1", "--json")
    assert again.code == 0 and again.json()["command_id"] == cid  # the idempotency key

    run = await hubctl(hub, "commands", "sensor-2", token=hub.viewer)
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert lines[0].split()[:4] == ["ID", "DEVICE", "NAME", "STATE"]
    assert lines[1].split()[:4] == [cid, "sensor-2", "echo", "queued"]
    assert len(lines) == 2

    run = await hubctl(hub, "commands", "--state", "queued", "--limit", "1", "--json", token=hub.viewer)
    assert [r["command_id"] for r in run.json()] == [cid]

    run = await hubctl(hub, "command", cid, token=hub.viewer)
    assert run.code == 0, run.err
    assert f"command   {cid}" in run.out.splitlines()
    assert "history:" in run.out

    run = await hubctl(hub, "cancel", cid)
    assert run.code == 0, run.err
    assert f"command {cid} (echo on sensor-2): cancelled" in run.out
    run = await hubctl(hub, "command", cid, "--json", token=hub.viewer)
    assert run.json()["state"] == "cancelled"

    run = await hubctl(hub, "cancel", cid)
    assert run.code == 1
    assert "invalid_state" in run.err


async def test_send_wait_outcomes(hub: Hub) -> None:
    async with device(hub):
        run = await hubctl(
            hub, "send", "boiler-1", "echo", "--args-json", '{"mode": "off", "level": 1}', "--arg", "mode=eco",
            "--arg", "n=5", "--wait", "--json",
        )  # fmt: skip
        assert run.code == 0, run.err
        record = run.json()
        assert record["state"] == "succeeded"
        assert record["result"] == {"mode": "eco", "level": 1, "n": 5}

        run = await hubctl(hub, "send", "boiler-1", "echo", "--arg", "x=1", "--wait")
        assert run.code == 0, run.err
        assert "succeeded" in run.out and 'result: {"x":1}' in run.out

        run = await hubctl(hub, "send", "boiler-1", "fail", "--wait")
        assert run.code == 4
        assert "failed" in run.err and "valve stuck" in run.err

    # Nobody is connected as sensor-2: the wait runs out while the command is still queued.
    run = await hubctl(hub, "send", "sensor-2", "echo", "--wait", "--wait-timeout", "0.5")
    assert run.code == 4
    assert "wait timed out" in run.err and "queued" in run.err


async def test_viewer_may_not_send_and_bad_token_is_refused(hub: Hub) -> None:
    run = await hubctl(hub, "send", "boiler-1", "echo", token=hub.viewer)
    assert (run.code, run.out) == (1, "")
    assert "forbidden" in run.err

    run = await hubctl(hub, "status", token="op.alice.not-the-secret")
    assert (run.code, run.out) == (3, "")
    assert "refused the token" in run.err


async def test_watch_json_streams_telemetry_until_ctrl_c(hub: Hub) -> None:
    async with device(hub) as client, trio.open_nursery() as nursery:

        async def stream() -> None:
            n = 0
            while True:
                n += 1
                await client.send("environment", {"temperature": 20.0 + n / 10, "seq": n}, tags={"room": "lab"})
                await trio.sleep(0.05)  # pacing: a steady stream for watch to follow

        nursery.start_soon(stream)
        proc = await nursery.start(
            partial(
                trio.run_process,
                hubctl_argv(hub, "watch", "boiler-1", "--json"),
                env=hubctl_env(hub.viewer),
                stdout=subprocess.PIPE,
                check=False,
            )
        )
        buffer = b""
        events = []
        with trio.fail_after(30):
            while len(events) < 3:
                chunk = await proc.stdout.receive_some()
                assert chunk, "hubctl watch ended early"
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                events.extend(json.loads(line) for line in lines)
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            assert await proc.wait() == 0
        nursery.cancel_scope.cancel()
    for line in events:
        assert (line["type"], line["topic"]) == ("event", "telemetry")
        event = line["event"]
        assert (event["device"], event["measurement"], event["tags"]) == ("boiler-1", "environment", {"room": "lab"})
        assert event["fields"]["temperature"] > 20.0


async def test_watch_lines_and_exit_3_when_the_hub_goes_away(hub: Hub) -> None:
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(
            partial(
                trio.run_process,
                hubctl_argv(hub, "watch", "--topic", "presence"),
                env=hubctl_env(hub.viewer),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
            )
        )
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        assert "watching presence of all devices" in await err.next()
        async with device(hub):
            line = await out.next()
        assert line.split()[2:5] == ["boiler-1", "presence", "online"]
        hub.handle.stop()
        with trio.fail_after(30):
            assert await proc.wait() == ExitCode.CONNECT
        rest = await err.rest()
        assert "lost the connection to the hub" in rest and "1001" in rest, rest


async def test_admins_add_rotate_and_revoke_devices(hub: Hub) -> None:
    admin = add_operators(hub.data, adm="admin")["adm"]

    async def answer(token: str) -> int:
        """The HTTP status the hub answers a device upgrade with `token` (101: accepted)."""
        status, _, stream = await upgrade(hub.handle.port, DEVICE_PATH, headers={"Authorization": f"Bearer {token}"})
        await stream.aclose()
        return status

    run = await hubctl(hub, "add", "pump-3", "site=berlin", token=admin)
    assert run.code == 0, run.err
    first = run.out.strip()
    assert first.startswith("pump-3.") and await answer(first) == 101
    run = await hubctl(hub, "--json", "device", "pump-3", token=hub.viewer)
    assert run.json()["labels"] == {"site": "berlin"}
    run = await hubctl(hub, "add", "pump-3", token=admin)
    assert run.code == 1 and "exists" in run.err

    run = await hubctl(hub, "--json", "rotate", "pump-3", token=admin)
    assert run.code == 0, run.err
    second = run.json()["token"]
    assert run.json()["name"] == "pump-3" and second != first
    assert await answer(first) == 401 and await answer(second) == 101

    run = await hubctl(hub, "revoke", "pump-3", token=admin)
    assert (run.code, run.out) == (0, "revoked pump-3\n"), run.err
    assert await answer(second) == 401

    for who in (hub.operator, hub.viewer):  # admins only
        for args in (("add", "pump-4"), ("rotate", "boiler-1"), ("revoke", "boiler-1")):
            run = await hubctl(hub, *args, token=who)
            assert run.code == 1 and "forbidden" in run.err, (args, run.err)
    run = await hubctl(hub, "rotate", "ghost", token=admin)
    assert run.code == 1 and "not_found" in run.err


async def test_twin_get_and_set(hub: Hub) -> None:
    run = await hubctl(hub, "twin", "set", "boiler-1", '{"interval": 30, "alarm": {"high": 28}}')
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert lines[0].split()[:2] == ["desired", "v1"] and '"alarm":{"high":28}' in lines[0], run.out
    assert lines[2].split() == ["applied", "v0"]
    assert lines[3].startswith("delta") and '"interval":30' in lines[3]
    run = await hubctl(hub, "--json", "twin", "get", "boiler-1", token=hub.viewer)
    assert run.code == 0 and run.json()["desired"]["state"] == {"interval": 30, "alarm": {"high": 28}}, run.err
    run = await hubctl(hub, "twin", "get", "boiler-1", "--json", token=hub.viewer)
    assert run.code == 0 and run.json()["delta"] == {"interval": 30, "alarm": {"high": 28}}, run.err
    run = await hubctl(hub, "twin", "set", "boiler-1", '{"alarm": null}', "--if-version", "0")
    assert run.code == 1 and "version_conflict" in run.err
    run = await hubctl(hub, "twin", "set", "boiler-1", '{"alarm": null}', "--if-version", "1")
    assert run.code == 0 and run.out.startswith("desired   v2"), run.out
    run = await hubctl(hub, "twin", "set", "boiler-1", "[1]")
    assert run.code == 2 and "JSON object" in run.err
    run = await hubctl(hub, "twin", "set", "boiler-1", '{"a": 1}', token=hub.viewer)
    assert run.code == 1 and "forbidden" in run.err
    run = await hubctl(hub, "twin", "get", "ghost")
    assert run.code == 1 and "not_found" in run.err
