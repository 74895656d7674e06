"""The simulated fleet and the `firmware-sim` command, against the test hub from test_client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from device_client.protocol import Command, CommandResult
from firmware_sim import COMMANDS, MODELS, FleetTotals, run_fleet
from firmware_sim.cli import build_parser, main
from tests.servers import FakeHub, Plan
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parent.parent
TOKENS = [f"sim-{i:04d}.secret{i}" for i in range(1, 7)]


@pytest.fixture
async def hub(nursery: trio.Nursery) -> FakeHub:
    h = FakeHub()
    await h.start(nursery)
    return h


def devices_seen(hub: FakeHub) -> set[str]:
    return {name for name, held in hub.points.items() if held}


async def run_until(done: Callable[[], bool], hub: FakeHub, tokens: list[str], **options: Any) -> FleetTotals:
    """Run a fleet until `done()` holds (checked while it runs), then stop it gracefully."""
    stop = trio.Event()
    result: list[FleetTotals] = []

    async def fleet() -> None:
        result.append(await run_fleet(hub.url, tokens, stop=stop, **options))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fleet)
        await eventually(done, timeout=30)
        stop.set()
    return result[0]


async def test_fleet_streams_and_everything_is_acked(hub: FakeHub) -> None:
    seen: list[FleetTotals] = []
    start_ms = time.time() * 1000
    totals = await run_until(
        lambda: len(devices_seen(hub)) == 6 and min(len(hub.all_points(d)) for d in devices_seen(hub)) >= 6,
        hub,
        TOKENS,
        interval=0.05,
        seed=1,
        progress=seen.append,
        progress_every=0.05,
        clock_skew=2.0,
    )
    end_ms = time.time() * 1000
    assert totals.devices == 6 and totals.points_sent > 0
    assert totals.points_acked == totals.points_sent
    assert totals.pending == 0 and totals.buffered == 0
    assert totals.reconnects == 0 and totals.rejected == 0 and totals.connected == 0
    assert seen and seen[-1] == totals
    assert len(hub.conns) == 6
    assert devices_seen(hub) == {t.split(".")[0] for t in TOKENS}
    assert sum(len(hub.all_points(d)) for d in devices_seen(hub)) == totals.points_acked
    models = {conn.device: conn.hello.model for conn in hub.conns}
    assert sorted(models.values()) == sorted(list(MODELS) * 2)  # round-robin over the models
    for conn in hub.conns:
        assert conn.hello.interval == 0.05 and conn.hello.firmware == MODELS[conn.hello.model].firmware
    expected = {"th-100": {"environment", "battery"}, "pm-10": {"power"}, "tracker": {"position", "radio", "battery"}}
    for device, model in models.items():
        points = hub.all_points(device)
        assert {p["measurement"] for p in points} == expected[model]
        assert all(start_ms - 2100 <= p["ts"] <= end_ms + 2100 for p in points)


async def test_each_device_has_its_own_clock(hub: FakeHub) -> None:
    await run_until(lambda: len(devices_seen(hub)) == 6, hub, TOKENS, interval=0.05, seed=2, clock_skew=3600.0)
    firsts = sorted(min(p["ts"] for p in hub.all_points(d)) for d in devices_seen(hub))
    assert len(firsts) == 6
    assert firsts[-1] - firsts[0] > 60_000  # offsets of up to an hour, while the run took well under a minute


async def test_stop_event_ends_the_fleet_gracefully(hub: FakeHub) -> None:
    totals = await run_until(lambda: len(devices_seen(hub)) == 3, hub, TOKENS[:3], interval=0.02, seed=3)
    assert totals.points_sent > 0 and totals.points_acked == totals.points_sent and totals.pending == 0


async def test_fleet_ends_after_its_duration(hub: FakeHub) -> None:
    start = trio.current_time()
    totals = await run_fleet(hub.url, TOKENS[:2], interval=0.05, duration=0.3, seed=3)
    assert trio.current_time() - start >= 0.3
    assert totals.points_acked == totals.points_sent and totals.pending == 0


async def test_cancelled_fleet_still_delivers_what_it_sent(hub: FakeHub) -> None:
    seen: list[FleetTotals] = []
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(run_fleet, hub.url, TOKENS[:3], interval=0.02, seed=4, progress=seen.append, progress_every=10)
            )
            await eventually(lambda: len(devices_seen(hub)) == 3)
            scope.cancel()
    assert scope.cancelled_caught
    final = seen[-1]
    assert final.points_sent > 0 and final.points_acked == final.points_sent
    assert sum(len(hub.all_points(d)) for d in devices_seen(hub)) == final.points_sent


async def test_fleet_resends_after_the_hub_drops_connections(nursery: trio.Nursery) -> None:
    hub = FakeHub(plans=[Plan(durable=False, ack=False, close_after=2) for _ in range(3)])
    await hub.start(nursery)
    totals = await run_until(
        lambda: len(hub.conns) >= 6 and len(devices_seen(hub)) == 3,
        hub,
        TOKENS[:3],
        interval=0.02,
        seed=5,
        client_options={"backoff_initial": 0.01, "backoff_max": 0.05},
    )
    assert totals.reconnects == 3
    assert totals.points_acked == totals.points_sent > 0
    assert sum(len(hub.all_points(d)) for d in devices_seen(hub)) == totals.points_sent


async def test_fleet_with_persistent_outboxes(hub: FakeHub, tmp_path: Path) -> None:
    totals = await run_until(
        lambda: len(devices_seen(hub)) == 2, hub, TOKENS[:2], interval=0.05, seed=6, outbox_dir=tmp_path / "ob"
    )
    assert totals.points_acked == totals.points_sent > 0
    assert sorted(p.name for p in (tmp_path / "ob").glob("*.sqlite3")) == [
        "sim-0001.outbox.sqlite3",
        "sim-0002.outbox.sqlite3",
    ]


async def test_fleet_checks_its_arguments() -> None:
    with pytest.raises(ValueError):
        await run_fleet("ws://127.0.0.1:9", [])
    with pytest.raises(ValueError):
        await run_fleet("ws://127.0.0.1:9", TOKENS, models=["toaster"])
    with pytest.raises(ValueError):
        await run_fleet("ws://127.0.0.1:9", ["a.1", "a.2"])
    with pytest.raises(ValueError):
        await run_fleet("http://127.0.0.1:9", TOKENS)


# ---------------------------------------------------------------------------- commands


async def ask(hub: FakeHub, device: str, cid: str, name: str, args: dict[str, Any] | None = None) -> CommandResult:
    """Send a command as the hub does and wait for its first result."""
    await hub.command(device, Command(cid, name, args or {}, 30.0))
    await eventually(lambda: hub.results(cid), timeout=30)
    return hub.results(cid)[0]


async def test_simulated_device_answers_every_command(nursery: trio.Nursery) -> None:
    # First connection: nothing is acked, so what was sent before the reboot must come again after it.
    hub = FakeHub(plans=[Plan(durable=False, ack=False)])
    await hub.start(nursery)
    stop = trio.Event()
    result: list[FleetTotals] = []
    dev = "sim-0001"

    async def fleet() -> None:
        result.append(await run_fleet(hub.url, TOKENS[:1], interval=0.05, seed=7, clock_skew=0.0, stop=stop))

    async with trio.open_nursery() as fleet_nursery:
        fleet_nursery.start_soon(fleet)
        await eventually(lambda: hub.conns and hub.conns[0].received, timeout=30)
        before = int(time.time() * 1000)
        ping = await ask(hub, dev, "p1", "ping")
        after = int(time.time() * 1000)
        assert ping.ok and ping.result["pong"] is True and before <= ping.result["ts"] <= after
        assert await ask(hub, dev, "e1", "echo", {"x": [1, "a"], "y": None}) == CommandResult(
            "e1", True, {"x": [1, "a"], "y": None}
        )
        assert (await ask(hub, dev, "s1", "set_config", {"a": 1, "b": "x"})).result == {"config": {"a": 1, "b": "x"}}
        assert (await ask(hub, dev, "s2", "set_config", {"b": None, "c": True})).result == {
            "config": {"a": 1, "c": True}
        }
        too_big = await ask(hub, dev, "s3", "set_config", {"big": "x" * 9000})
        assert not too_big.ok and "config" in too_big.error
        assert (await ask(hub, dev, "s4", "set_config")).result == {"config": {"a": 1, "c": True}}
        assert await ask(hub, dev, "f1", "fail") == CommandResult(
            "f1", False, error="failed on purpose (the 'fail' test command)"
        )
        assert await ask(hub, dev, "f2", "fail", {"message": "as asked"}) == CommandResult(
            "f2", False, error="as asked"
        )
        for cid, args in (
            ("i1", {}),
            ("i2", {"interval": 0}),
            ("i3", {"interval": True}),
            ("i4", {"interval": "1"}),
            ("i5", {"interval": 1e9}),
        ):
            bad = await ask(hub, dev, cid, "set_interval", args)
            assert not bad.ok and "'interval'" in bad.error, (args, bad)
        assert (await ask(hub, dev, "i6", "set_interval", {"interval": 0.5})).result == {
            "interval": 0.5,
            "previous": 0.05,
        }
        assert await ask(hub, dev, "u1", "warp") == CommandResult("u1", False, error="unknown command 'warp'")
        assert not (await ask(hub, dev, "r0", "reboot", {"delay": 1000})).ok
        sent_before_reboot = list(hub.conns[0].received)
        reboot = await ask(hub, dev, "r1", "reboot", {"delay": 0.05})
        assert reboot == CommandResult("r1", True, {"rebooting": True, "delay": 0.05})
        await eventually(lambda: len(hub.conns) == 2 and hub.conns[1].received, timeout=30)
        stop.set()
    totals = result[0]
    first, second = hub.conns
    assert first.results[-1].id == "r1" and first.frames[-1] == "CommandResult"
    assert second.hello is not None and second.hello.interval == 0.5  # the new interval is declared
    assert second.received[: len(sent_before_reboot)] == sent_before_reboot  # the outbox was kept
    assert totals.reconnects == 1 and totals.connect_failures == 0
    assert totals.commands == len(first.results) == 17
    assert totals.points_acked == totals.points_sent == len(hub.all_points(dev)) and totals.pending == 0


async def test_set_interval_changes_the_reporting_rate(hub: FakeHub) -> None:
    dev = "sim-0001"

    def reports() -> int:
        return len({p["ts"] for p in hub.all_points(dev)})

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        # An hour between reports: without the command, the first might come any time in that hour.
        nursery.start_soon(partial(run_fleet, hub.url, TOKENS[:1], interval=3600.0, seed=8, stop=stop))
        await eventually(lambda: hub.live(dev) is not None, timeout=30)
        assert (await ask(hub, dev, "i1", "set_interval", {"interval": 0.02})).ok
        await eventually(lambda: reports() >= 5, timeout=30)
        assert (await ask(hub, dev, "i2", "set_interval", {"interval": 3600})).result == {
            "interval": 3600.0,
            "previous": 0.02,
        }
        stop.set()


# ---------------------------------------------------------------------------- the command


def test_help_describes_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    parser = build_parser()
    for action in parser._actions:
        for option in action.option_strings:
            assert option in out
        assert action.help
    for option in (
        "--hub",
        "--devices",
        "--tokens",
        "--interval",
        "--duration",
        "--seed",
        "--outbox-dir",
    ):
        assert option in out
    for command in COMMANDS:
        assert f"\n  {command} " in out  # each simulated command is documented in the epilog
    assert "hub device add-sim" in " ".join(out.split())  # where tokens for a local hub come from


def test_bad_arguments_exit_with_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("a.1\n")
    for argv in (
        [],  # no --tokens
        ["--register", str(tmp_path / "registry.sqlite3")],  # gone: `hub device add-sim` registers devices
        ["--tokens", str(tokens), "--devices", "2"],
        ["--tokens", str(tmp_path / "missing.txt")],
        ["--tokens", str(tokens), "--models", "toaster"],
        ["--tokens", str(tokens), "--hub", "http://x"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2, argv
    capsys.readouterr()


def sim_command(hub: FakeHub, *args: str) -> list[str]:
    return [sys.executable, "-m", "firmware_sim.cli", "--hub", hub.url.removesuffix("/v1/device"), *args]


async def test_cli_runs_a_fleet_from_a_tokens_file(hub: FakeHub, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# demo devices\n" + "\n".join(TOKENS[:3]) + "\n\n")
    result = await trio.run_process(
        sim_command(
            hub,
            "--tokens",
            str(tokens),
            "--devices",
            "2",
            "--interval",
            "0.1",
            "--duration",
            "1.5",
            "--progress-every",
            "0.2",
        ),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=ROOT,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert devices_seen(hub) == {"sim-0001", "sim-0002"}
    assert "devices 2/2 connected" in stderr  # a progress line (not a TTY: one line each period)
    assert "done:" in stderr and "pending 0 batches" in stderr.splitlines()[-1]


async def test_cli_stops_gracefully_on_sigint(hub: FakeHub, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("\n".join(TOKENS[:3]) + "\n")
    log = tmp_path / "stderr.txt"
    with log.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            sim_command(hub, "--tokens", str(tokens), "--interval", "0.05"), stderr=err, cwd=ROOT
        )
        try:
            await eventually(lambda: len(devices_seen(hub)) == 3, timeout=30)
            proc.send_signal(signal.SIGINT)
            with trio.fail_after(30):
                code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
    stderr = log.read_text()
    assert code == 0, stderr
    assert "stopping" in stderr
    last = stderr.splitlines()[-1]
    assert last.startswith("done:") and "pending 0 batches" in last
    sent = int(last.split("points sent ")[1].split()[0])
    assert sent == sum(len(hub.all_points(d)) for d in devices_seen(hub))


async def test_hub_add_sim_registers_and_rekeys_the_devices_firmware_sim_runs(hub: FakeHub, tmp_path: Path) -> None:
    from hub.fleet import Registry, registry_path

    data, tokens = tmp_path / "data", tmp_path / "tokens.txt"
    add_sim = [sys.executable, "-m", "hub.cli", "device", "add-sim", "3", "--tokens-file", str(tokens)]
    add_sim += ["--data-dir", str(data)]
    args = ("--tokens", str(tokens), "--interval", "0.1", "--duration", "0.5")
    seen = []
    for _ in range(2):
        added = await trio.run_process(add_sim, capture_stderr=True, check=False, cwd=ROOT)
        assert added.returncode == 0, added.stderr.decode()
        assert f"firmware-sim --tokens {tokens}" in added.stderr.decode()
        assert tokens.stat().st_mode & 0o777 == 0o600
        hub.conns.clear()
        ran = await trio.run_process(sim_command(hub, *args), capture_stderr=True, check=False, cwd=ROOT)
        assert ran.returncode == 0, ran.stderr.decode()
        used = {c.headers[b"authorization"].decode().removeprefix("Bearer ") for c in hub.conns}
        assert used == set(tokens.read_text().split())
        seen.append(used)
    first_tokens, second_tokens = seen
    assert len(second_tokens) == 3 and not second_tokens & first_tokens
    with Registry(registry_path(str(data))) as reg:
        assert sorted(reg.authenticate(t) for t in second_tokens) == ["sim-0001", "sim-0002", "sim-0003"]
        assert all(reg.authenticate(t) is None for t in first_tokens)  # re-keyed


def test_entry_point_is_installed() -> None:
    exe = Path(sys.executable).parent / "firmware-sim"
    assert exe.exists(), "console script not installed: pip install -e '.[test]' (as ./scripts/test does)"
    result = subprocess.run(
        [str(exe), "--help"], capture_output=True, text=True, check=False, env={**os.environ, "COLUMNS": "100"}
    )
    assert result.returncode == 0 and "--tokens" in result.stdout
