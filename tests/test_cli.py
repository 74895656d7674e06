"""Tests of the `hub` command line (as a subprocess and in-process) and of the logging setup."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub import cli, logs
from hub.config import INFLUX_PASSWORD_ENV, INFLUX_TOKEN_ENV, HubConfig, load_config
from hub.fleet import Registry, registry_path
from tests.hubproc import run_hub
from tests.ports import listening_port


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if isinstance(h, logs._HubHandler)]:
        root.removeHandler(handler)
    root.setLevel(level)


# ---------------------------------------------------------------------------- help

_COMMON = ["--config", "--data-dir"]
_INFLUX = [
    "--influx-url",
    "--influx-api",
    "--influx-org",
    "--influx-bucket",
    "--influx-database",
    "--influx-retention-policy",
    "--influx-username",
]
_LOGGING = ["--log-level", "--log-format"]
_TLS = ["--tls-cert", "--tls-key"]
HELP = {
    (): ["serve", "device", "operator", "demo"],
    ("serve",): [
        *_COMMON,
        *_INFLUX,
        *_LOGGING,
        *_TLS,
        "--host",
        "--port",
        "--ping-interval",
        "--ping-timeout",
        "--window",
        "--max-message-bytes",
        "--batch-max-lines",
        "--batch-max-delay",
        "--batch-spool-after",
        "--spool-max-bytes",
        "--metrics-host",
        "--metrics-port",
        "--allowed-origin",
        "--workers",
    ],
    ("device",): ["add", "list", "revoke", "rotate", "label", "add-sim"],
    ("device", "add"): [*_COMMON, "NAME", "--label"],
    ("device", "label"): [*_COMMON, "NAME", "--remove"],
    ("device", "add-sim"): [*_COMMON, "--tokens-file", "N"],
    ("device", "list"): [*_COMMON, "--json", "--selector"],
    ("device", "revoke"): [*_COMMON, "NAME"],
    ("device", "rotate"): [*_COMMON, "NAME"],
    ("operator",): ["add", "list", "revoke"],
    ("operator", "add"): [*_COMMON, "NAME", "--role"],
    ("operator", "list"): [*_COMMON, "--json"],
    ("operator", "revoke"): [*_COMMON, "NAME"],
    ("demo",): [
        *_COMMON,
        *_INFLUX,
        *_LOGGING,
        *_TLS,
        "--devices",
        "--duration",
        "--port",
        "--metrics-host",
        "--metrics-port",
    ],
}


def _parsers() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    found = {}

    def walk(path: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
        found[path] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk((*path, name), sub)

    walk((), cli.build_parser())
    return found


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """The options `--help` shows (not the internal ones, such as the supervisor's `--worker-id`)."""
    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS]
    return {s for a in shown for s in a.option_strings if s.startswith("--") and s != "--help"}


def test_help_table_covers_the_parser() -> None:
    parsers = _parsers()
    assert set(parsers) == set(HELP)
    for path, parser in parsers.items():
        assert _options(parser) == {o for o in HELP[path] if o.startswith("--")}, path


@pytest.mark.parametrize("path", list(HELP), ids=lambda p: " ".join(p) or "hub")
def test_help_lists_every_option(path: tuple[str, ...], tmp_path: Path) -> None:
    result = run_hub(*path, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: hub {' '.join(path)}".rstrip())
    for word in HELP[path]:
        assert re.search(rf"(^|\s){re.escape(word)}\b", result.stdout), word


def test_every_option_help_states_its_default() -> None:
    for path, parser in _parsers().items():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:
                continue  # internal: not shown
            if action.option_strings and action.option_strings[0] not in ("-h", "--json"):
                assert "(default: " in action.help, (path, action.option_strings)


def test_help_shows_the_real_defaults() -> None:
    helps = {a.option_strings[-1]: a.help for a in _parsers()[("serve",)]._actions}
    defaults = HubConfig()
    for flag, value in [
        ("--port", defaults.server.port),
        ("--window", defaults.server.window),
        ("--ping-interval", defaults.presence.ping_interval),
        ("--batch-max-lines", defaults.batch.max_lines),
        ("--spool-max-bytes", defaults.storage.spool_max_bytes),
        ("--data-dir", defaults.storage.data_dir),
        ("--log-level", defaults.log_level),
    ]:
        assert f"(default: {value}" in helps[flag], flag


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_epilog_explains_token_and_embedded_sink(command: str) -> None:
    text = " ".join(_parsers()[(command,)].format_help().split())
    assert INFLUX_TOKEN_ENV in text
    assert "DATA_DIR/lines" in text


# ---------------------------------------------------------------------------- device commands


def test_device_round_trip(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    # The hub's own handle on the registry stays open throughout, as when a hub is running.
    with Registry(registry_path(data)) as hub_side:
        added = run_hub("device", "add", "d1", "--data-dir", data, cwd=tmp_path)
        assert added.returncode == 0, added.stderr
        token = added.stdout.strip()
        assert added.stdout == token + "\n"
        assert "not be shown again" in added.stderr
        assert token not in added.stderr
        assert hub_side.authenticate(token) == "d1"
        assert run_hub("device", "add", "d2", "--data-dir", data, cwd=tmp_path).returncode == 0
        hub_side.begin_session("d1")
        hub_side.save_acked({"d1": 42})

        listed = run_hub("device", "list", "--data-dir", data, cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        rows = [line.split() for line in listed.stdout.splitlines()]
        assert rows[0] == ["NAME", "STATE", "CREATED", "EPOCH", "ACKED_SEQ", "LABELS"]
        assert [r[:2] + r[3:] for r in rows[1:]] == [["d1", "active", "1", "42"], ["d2", "active", "0", "0"]]
        assert token not in listed.stdout

        assert run_hub("device", "revoke", "d1", "--data-dir", data, cwd=tmp_path).returncode == 0
        assert hub_side.authenticate(token) is None
        shown = json.loads(run_hub("device", "list", "--json", "--data-dir", data, cwd=tmp_path).stdout)
        assert [(d["name"], d["state"], d["epoch"], d["acked_seq"]) for d in shown] == [
            ("d1", "revoked", 1, 42),
            ("d2", "active", 0, 0),
        ]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", shown[0]["created"])

        rotated = run_hub("device", "rotate", "d1", "--data-dir", data, cwd=tmp_path)
        assert rotated.returncode == 0, rotated.stderr
        new_token = rotated.stdout.strip()
        assert "not be shown again" in rotated.stderr
        assert new_token != token
        assert hub_side.authenticate(new_token) == "d1"
        assert hub_side.authenticate(token) is None
        assert hub_side.get("d1").revoked is False


def test_add_sim_registers_and_rekeys_simulated_devices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, tokens = str(tmp_path / "data"), tmp_path / "tokens.txt"
    assert cli.main(["device", "add-sim", "2", "--data-dir", data]) == 0
    printed = capsys.readouterr().out.split()
    assert cli.main(["device", "add-sim", "3", "--data-dir", data, "--tokens-file", str(tokens)]) == 0
    assert capsys.readouterr().out == ""
    written = tokens.read_text().split()
    assert tokens.stat().st_mode & 0o777 == 0o600  # the file holds secrets
    with Registry(registry_path(data)) as registry:
        assert [registry.authenticate(t) for t in written] == ["sim-0001", "sim-0002", "sim-0003"]
        assert [registry.authenticate(t) for t in printed] == [None, None]  # re-keyed by the second run
    assert cli.main(["device", "add-sim", "1", "--data-dir", data, "--tokens-file", str(tmp_path / "no/dir")]) == 1
    assert "--tokens-file" in capsys.readouterr().err
    with Registry(registry_path(data)) as registry:
        assert [registry.authenticate(t) for t in written] == ["sim-0001", "sim-0002", "sim-0003"]  # unchanged


def test_device_error_in_a_subprocess(tmp_path: Path) -> None:
    result = run_hub("device", "revoke", "ghost", "--data-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1
    assert "unknown device 'ghost'" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["device", "add", "d1"], "already exists"),
        (["device", "add", "bad.name"], "bad device name"),
        (["device", "revoke", "ghost"], "unknown device"),
        (["device", "rotate", "ghost"], "unknown device"),
    ],
)
def test_device_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    with Registry(registry_path(tmp_path)) as reg:
        reg.add("d1")
    assert cli.main([*argv, "--data-dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert message in err and err.startswith("hub: error:")
    assert out == ""


def test_device_commands_use_the_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "hub.toml"
    config.write_text(f"[storage]\ndata_dir = {json.dumps(str(tmp_path / 'from-file'))}\n")
    assert cli.main(["device", "add", "d1", "--config", str(config)]) == 0
    assert cli.main(["device", "add", "d2", "--config", str(config), "--data-dir", str(tmp_path / "cli")]) == 0
    with Registry(registry_path(tmp_path / "from-file")) as reg:
        assert [r.name for r in reg.list()] == ["d1"]
    with Registry(registry_path(tmp_path / "cli")) as reg:
        assert [r.name for r in reg.list()] == ["d2"]
    capsys.readouterr()
    assert cli.main(["device", "list", "--json", "--config", str(config)]) == 0
    assert [d["name"] for d in json.loads(capsys.readouterr().out)] == ["d1"]


def test_device_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path)]
    assert cli.main(["device", "add", "b1", "--label", "site=berlin", "--label", "model=th-100", *data]) == 0
    assert cli.main(["device", "add", "p1", "--label", "site=paris", *data]) == 0
    assert cli.main(["device", "add", "n1", *data]) == 0
    capsys.readouterr()
    assert cli.main(["device", "label", "n1", "site=berlin", "rack=r1", *data]) == 0
    assert capsys.readouterr().out == "rack=r1,site=berlin\n"
    assert cli.main(["device", "label", "n1", "--remove", "rack", "--remove", "nothing", *data]) == 0
    assert capsys.readouterr().out == "site=berlin\n"
    assert cli.main(["device", "list", "--selector", "site=berlin", *data]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [(r[0], r[-1]) for r in rows] == [
        ("NAME", "LABELS"),
        ("b1", "model=th-100,site=berlin"),
        ("n1", "site=berlin"),
    ]
    assert cli.main(["device", "list", "--json", "--selector", "site!=berlin", *data]) == 0
    assert [(d["name"], d["labels"]) for d in json.loads(capsys.readouterr().out)] == [("p1", {"site": "paris"})]
    assert cli.main(["device", "list", "--selector", "site=rome", *data]) == 0
    assert "no devices match" in capsys.readouterr().err
    with Registry(registry_path(tmp_path)) as reg:
        assert [r.labels for r in reg.list()] == [
            {"model": "th-100", "site": "berlin"},
            {"site": "berlin"},
            {"site": "paris"},
        ]

    # Refusals: bad syntax is a usage error (2), what the registry refuses exits 1; nothing changes.
    for argv in (
        ["device", "add", "x1", "--label", "site"],
        ["device", "add", "x1", "--label", "site=a b"],
        ["device", "label", "n1", "--remove", "bad key"],
        ["device", "list", "--selector", "site=="],
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*argv, *data])
        assert exit_info.value.code == 2, argv
        assert "bad " in capsys.readouterr().err or "selector" in argv[-1]
    assert cli.main(["device", "label", "n1", *data]) == 1
    assert "give labels to set" in capsys.readouterr().err
    assert cli.main(["device", "label", "ghost", "a=b", *data]) == 1
    assert "unknown device" in capsys.readouterr().err
    many = [f"k{i}=v" for i in range(16)]
    assert cli.main(["device", "label", "n1", *many, *data]) == 1
    assert "at most 16 labels" in capsys.readouterr().err
    assert cli.main(["device", "add", "x1", *[a for kv in many for a in ("--label", kv)], "--label", "z=1", *data]) == 1
    with Registry(registry_path(tmp_path)) as reg:
        assert reg.get("x1") is None
        record = reg.get("n1")
        assert record is not None and record.labels == {"site": "berlin"}


def test_empty_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["device", "list", "--json", "--data-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == []


# ---------------------------------------------------------------------------- bad configuration


@pytest.mark.parametrize("command", [["serve"], ["demo"], ["device", "list"], ["device", "add", "d1"]])
@pytest.mark.parametrize("text", ["[server]\nbogus = 1\n", "[server\n", None])
def test_bad_config_exits_2(tmp_path: Path, command: list[str], text: str | None) -> None:
    path = tmp_path / "hub.toml"
    if text is not None:
        path.write_text(text)
    result = run_hub(*command, "--config", str(path), "--data-dir", str(tmp_path / "d"), cwd=tmp_path)
    assert result.returncode == 2
    assert "hub: error: bad configuration" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "d").exists()


def test_bad_option_value_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--window", "-1", "--data-dir", str(tmp_path)]) == 2
    assert "server.window: must be greater than zero" in capsys.readouterr().err
    for argv in (["serve", "--port", "70000"], ["serve", "--log-format", "xml"], ["demo", "--devices", "0"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2


# ---------------------------------------------------------------------------- serve and demo hand over


def _fake(monkeypatch: pytest.MonkeyPatch, module: str, func: str, code: int) -> list:
    """Stand-in for the lead's hub.app / hub.demo: records what the CLI hands over."""
    calls: list = []

    def entry(config: HubConfig, **kwargs: object) -> int:
        calls.append((config, kwargs))
        logging.getLogger("hub.test").info("started", extra={"kv": {"port": config.server.port}})
        return code

    fake = types.ModuleType(module)
    setattr(fake, func, entry)
    monkeypatch.setitem(sys.modules, module, fake)
    return calls


def test_serve_builds_config_and_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = _fake(monkeypatch, "hub.app", "run", 3)
    monkeypatch.setenv(INFLUX_TOKEN_ENV, "tok")
    config_file = tmp_path / "hub.toml"
    config_file.write_text("[server]\nport = 9001\nmax_errors = 7\n[influx]\norg = 'file-org'\n")
    argv = ["serve", "--config", str(config_file), "--host", "0.0.0.0", "--port", "9100"]
    argv += ["--data-dir", str(tmp_path / "d"), "--influx-url", "http://db:8086", "--influx-bucket", "b"]
    argv += ["--ping-interval", "2.5", "--ping-timeout", "3", "--window", "4", "--max-message-bytes", "2048"]
    argv += ["--batch-max-lines", "100", "--batch-max-delay", "0.5", "--spool-max-bytes", "1000"]
    argv += ["--log-level", "debug", "--log-format", "json"]
    assert cli.main(argv) == 3
    [(config, kwargs)] = calls
    assert kwargs == {}
    assert (config.server.host, config.server.port, config.server.max_errors) == ("0.0.0.0", 9100, 7)
    assert (config.server.window, config.server.max_message_bytes) == (4, 2048)
    assert (config.presence.ping_interval, config.presence.ping_timeout) == (2.5, 3.0)
    assert (config.influx.url, config.influx.org, config.influx.bucket) == ("http://db:8086", "file-org", "b")
    assert config.influx.token == "tok"
    assert (config.batch.max_lines, config.batch.max_delay) == (100, 0.5)
    assert (config.storage.data_dir, config.storage.spool_max_bytes) == (str(tmp_path / "d"), 1000)
    assert config.log_level == "debug"
    event = json.loads(capsys.readouterr().err)
    assert (event["logger"], event["msg"], event["port"]) == ("hub.test", "started", 9100)
    assert logging.getLogger().level == logging.DEBUG


def test_serve_influx_v1_and_metrics_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake(monkeypatch, "hub.app", "run", 0)
    monkeypatch.setenv(INFLUX_PASSWORD_ENV, "pw")
    argv = ["serve", "--data-dir", str(tmp_path), "--influx-url", "http://db:8086", "--influx-api", "v1"]
    argv += ["--influx-database", "iot", "--influx-retention-policy", "week", "--influx-username", "hub"]
    argv += ["--metrics-host", "0.0.0.0", "--metrics-port", "9200"]
    assert cli.main(argv) == 0
    [(config, _)] = calls
    influx = config.influx
    assert (influx.api, influx.database, influx.retention_policy, influx.username) == ("v1", "iot", "week", "hub")
    assert influx.password == "pw"
    assert (config.metrics.http_host, config.metrics.http_port) == ("0.0.0.0", 9200)
    assert "pw" not in repr(config)
    for bad in (["--influx-api", "v3"], ["--metrics-port", "70000"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(["serve", *bad])
        assert exc.value.code == 2


def test_serve_epilog_names_the_password_variable() -> None:
    text = " ".join(_parsers()[("serve",)].format_help().split())
    assert INFLUX_PASSWORD_ENV in text and "/metrics" in text


def test_serve_without_options_uses_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake(monkeypatch, "hub.app", "run", 0)
    monkeypatch.delenv(INFLUX_TOKEN_ENV, raising=False)
    config_file = tmp_path / "hub.toml"
    config_file.write_text("log_level = 'warning'\n[server]\nport = 9001\n[batch]\nmax_lines = 7\n")
    assert cli.main(["serve", "--config", str(config_file)]) == 0
    assert calls == [(load_config(config_file), {})]


def test_demo_hands_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake(monkeypatch, "hub.demo", "run_demo", 0)
    assert cli.main(["demo", "--data-dir", str(tmp_path)]) == 0
    argv = ["demo", "--devices", "3", "--duration", "1.5", "--port", "9001", "--metrics-port", "9002"]
    assert cli.main([*argv, "--data-dir", str(tmp_path)]) == 0
    (first, kw1), (second, kw2) = calls
    assert kw1 == {"devices": 20, "duration": 0.0}
    assert kw2 == {"devices": 3, "duration": 1.5}
    assert (first.server.port, first.metrics.http_port) == (0, 0)  # the demo takes free ports unless told
    assert (second.server.port, second.metrics.http_port) == (9001, 9002)
    assert second.storage.data_dir == str(tmp_path)


def test_demo_keeps_the_ports_of_its_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake(monkeypatch, "hub.demo", "run_demo", 0)
    config_file = tmp_path / "hub.toml"
    config_file.write_text("[server]\nport = 9001\n")
    assert cli.main(["demo", "--config", str(config_file)]) == 0
    config_file.write_text("[metrics]\nhttp_port = 9002\n")
    assert cli.main(["demo", "--config", str(config_file), "--port", "9003"]) == 0
    (first, _), (second, _) = calls
    assert (first.server.port, first.metrics.http_port) == (9001, 0)
    assert (second.server.port, second.metrics.http_port) == (9003, 9002)


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another program listens on."""
    with listening_port() as port:
        yield port


@pytest.mark.parametrize("command", ["serve", "demo"])
@pytest.mark.parametrize(
    ("option", "what"),
    [("--port", "devices and operators"), ("--metrics-port", "HTTP (/metrics, /healthz, /v1, the console)")],
)
def test_a_busy_port_is_one_line_naming_it_and_the_option(
    tmp_path: Path, held_port: int, command: str, option: str, what: str
) -> None:
    other = "--metrics-port" if option == "--port" else "--port"
    argv = [command, option, str(held_port), other, "0", "--data-dir", str(tmp_path / "data")]
    if command == "demo":
        argv += ["--devices", "1", "--duration", "1"]
    expected = (
        f"hub: error: cannot listen on 127.0.0.1:{held_port} for {what}: address already in use; "
        f"choose another port with {option} (0: any free port)"
    )
    quiet = run_hub(*argv, "--log-level", "error", cwd=tmp_path)
    assert (quiet.returncode, quiet.stderr.splitlines()) == (1, [expected])
    chatty = run_hub(*argv, cwd=tmp_path)  # at info, the start-up lines come first; the error is one line
    assert chatty.returncode == 1
    assert "Traceback" not in chatty.stderr and "Error" not in chatty.stderr
    assert [line for line in chatty.stderr.splitlines() if "error" in line] == [expected]


# ---------------------------------------------------------------------------- logging


_TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def test_kv_format(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup_logging("info", "kv")
    log = logging.getLogger("hub.session")
    log.info("device connected", extra={"kv": {"device": "d1", "epoch": 3}})
    log.debug("not shown")
    log.warning("odd", extra={"kv": {"why": 'said "hi"', "path": "a b", "empty": "", "eq": "a=b"}})
    log.error("flags", extra={"kv": {"ok": True, "none": None, "multi": "x\ny", "ratio": 0.5}})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert re.fullmatch(rf'ts={_TS} level=info logger=hub.session msg="device connected" device=d1 epoch=3', lines[0])
    assert lines[1].split(" ", 1)[1] == (
        r'level=warning logger=hub.session msg=odd why="said \"hi\"" path="a b" empty="" eq="a=b"'
    )
    assert (
        lines[2].split(" ", 1)[1]
        == r'level=error logger=hub.session msg=flags ok=true none=null multi="x\ny" ratio=0.5'
    )


def test_kv_exception_stays_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup_logging("debug", "kv")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("hub.writer").exception("write failed", extra={"kv": {"batch": 1}})
    [line] = capsys.readouterr().err.splitlines()
    assert 'msg="write failed" batch=1 exc="Traceback' in line
    assert "RuntimeError: boom" in line


def test_json_format(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup_logging("warning", "json")
    log = logging.getLogger("hub.sink")
    log.info("not shown")
    log.warning("slow write", extra={"kv": {"seconds": 1.5, "path": Path("/x y"), "quote": 'a"b'}})
    try:
        raise ValueError("bad")
    except ValueError:
        log.error("failed", exc_info=True)
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert re.fullmatch(_TS, first.pop("ts"))
    assert first == {
        "level": "warning",
        "logger": "hub.sink",
        "msg": "slow write",
        "seconds": 1.5,
        "path": "/x y",
        "quote": 'a"b',
    }
    assert second["level"] == "error" and "ValueError: bad" in second["exc"]


def test_timestamp_is_utc_with_milliseconds() -> None:
    record = logging.makeLogRecord({"name": "x", "msg": "m", "levelno": logging.INFO, "levelname": "INFO"})
    record.created, record.msecs = 86400 * 365 + 1.25, 250.0
    assert logs.KvFormatter().format(record).startswith("ts=1971-01-01T00:00:01.250Z level=info")


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("", '""'),
        ("a b", '"a b"'),
        ('a"b', '"a\\"b"'),
        ("k=v", '"k=v"'),
        ("\x00", '"\x00"'),
        ("\x1f", '"\x1f"'),
        ("tab\t", '"tab\\t"'),
        ("\x7f", '"\x7f"'),
        ("é-ü_ok", "é-ü_ok"),
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        (None, "null"),
        (False, "false"),
        (12.5, "12.5"),
    ],
)
def test_kv_values_quoted_exactly_when_needed(value: object, written: str) -> None:
    assert logs._kv_value(value) == written


def test_timestamps_of_different_seconds() -> None:
    formatter = logs.KvFormatter()
    for created, expected in [
        (1.5, "1970-01-01T00:00:01.500Z"),
        (3601.004, "1970-01-01T01:00:01.004Z"),
        (1.25, "1970-01-01T00:00:01.250Z"),
    ]:
        record = logging.makeLogRecord({"name": "x", "msg": "m", "levelno": logging.INFO, "levelname": "INFO"})
        record.created, record.msecs = created, round((created - int(created)) * 1000, 3)
        assert formatter.format(record).startswith(f"ts={expected} ")


def test_setup_twice_replaces_the_handler(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup_logging("info", "json")
    logs.setup_logging("info", "kv")
    logging.getLogger("hub").info("once")
    [line] = capsys.readouterr().err.splitlines()
    assert line.endswith("logger=hub msg=once")


def test_setup_refuses_unknown_level_and_format() -> None:
    with pytest.raises(ValueError):
        logs.setup_logging("verbose")
    with pytest.raises(ValueError):
        logs.setup_logging("info", "xml")


def test_an_address_not_of_this_machine_is_one_line_naming_the_host_option(tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: binding it fails at once and sends nothing.
    argv = ["serve", "--host", "192.0.2.1", "--port", "0", "--metrics-port", "0", "--data-dir", str(tmp_path / "d")]
    result = run_hub(*argv, "--log-level", "error", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "hub: error: cannot listen on 192.0.2.1:0 for devices and operators: cannot assign requested address; "
        "choose an address of this machine with --host"
    ]
