"""`hub demo`: a hub and a simulated fleet in one process, with a live progress line."""

from __future__ import annotations

import itertools
import logging
import re
import shlex
import signal
import sys
from collections.abc import AsyncIterator

import trio

from firmware_sim.fleet import FleetTotals, run_fleet
from hub.app import HubHandle, serve, start_error
from hub.config import HubConfig
from hub.control import CONTROL_PATH
from hub.fleet import DeviceExists, OperatorExists, RegistryStore, open_registry_store

__all__ = ["DEMO_OPERATOR", "SIM_NAME", "add_demo_operator", "register_devices", "run_demo"]

#: Seconds between progress lines.
PROGRESS_EVERY = 2.0
#: Reporting interval of the simulated devices in the demo (seconds).
DEMO_INTERVAL = 1.0
#: Names of the simulated devices: sim-0001, sim-0002, ...
SIM_NAME = "sim-{:04d}"
#: The demo's own operator (role operator), for the web console and hubctl: "demo", then "demo-2", ... Its token is
#: printed, never stored, and revoked when the demo ends.
DEMO_OPERATOR = "demo"
_DEMO_OPERATOR_NAME = re.compile(r"demo(-[0-9]+)?")


async def register_devices(registry: RegistryStore, count: int) -> list[str]:
    """Register (or re-key) devices sim-0001..sim-<count>; return their new tokens, in that order."""
    tokens = []
    for i in range(1, count + 1):
        name = SIM_NAME.format(i)
        try:
            tokens.append(await registry.add(name))
        except DeviceExists:
            tokens.append(await registry.rotate(name))
    return tokens


async def add_demo_operator(registry: RegistryStore) -> tuple[str, str]:
    """Revoke the operators earlier demos left active (a demo killed before it could), then add this demo's:
    `demo`, or `demo-2`, `demo-3`, ... (names are never reused). Returns its name and token."""
    known = await registry.list_operators()
    for record in known:
        if _DEMO_OPERATOR_NAME.fullmatch(record.name) and not record.revoked:
            await registry.revoke_operator(record.name)
    taken = {record.name for record in known}
    for n in itertools.count(1):
        name = DEMO_OPERATOR if n == 1 else f"{DEMO_OPERATOR}-{n}"
        if name in taken:
            continue
        try:
            return name, await registry.add_operator(name, "operator")
        except OperatorExists:  # added meanwhile by another process
            continue
    raise AssertionError("unreachable")


def _progress_line(handle: HubHandle, totals: FleetTotals) -> str:
    s = handle.stats
    return (
        f"[{totals.elapsed:6.0f}s] devices {totals.connected}/{totals.devices} connected"
        f" | points sent {totals.points_sent} acked {totals.points_acked}"
        f" | hub written {s.points_written} spooled {s.points_spooled} | reconnects {totals.reconnects}"
    )


def _banner(config: HubConfig, handle: HubHandle, control_url: str, operator_token: str) -> str:
    """Where the control channel, the metrics and the web console are, and the tokens for them."""
    lines = [f"control channel: {control_url}"]
    if handle.metrics_port is not None:
        lines[0] += f"; metrics: http://{config.metrics.http_host}:{handle.metrics_port}/metrics"
        http_host = "127.0.0.1" if config.metrics.http_host in ("0.0.0.0", "") else config.metrics.http_host
        web = "https" if config.tls.enabled else "http"  # the HTTP port serves the hub's certificate too
        lines += [
            f"web console: {web}://{http_host}:{handle.metrics_port}/",
            f"  log in with the demo's operator token (valid until the demo stops): {operator_token}",
        ]
    ca = f" --ca-file {shlex.quote(config.tls.cert_file)}" if config.tls.enabled else ""
    registry = f"--data-dir {shlex.quote(config.storage.data_dir)}"
    if config.state.backend == "redis":
        registry = "--config FILE"  # FILE: the config whose [state] names this Redis
    lines += [
        "hubctl needs an operator token (the demo's will do); more operators, in another terminal:",
        f"  hub operator add NAME --role operator {registry}   # prints the token once",
        f"  HUBCTL_TOKEN=TOKEN hubctl --url {control_url}{ca} status",
    ]
    return "\n".join(lines)


async def _demo(config: HubConfig, devices: int, duration: float) -> None:
    config.storage.path.mkdir(parents=True, exist_ok=True)
    async with open_registry_store(config.state, config.storage.path) as registry:
        tokens = await register_devices(registry, devices)
        operator, operator_token = await add_demo_operator(registry)
    try:
        await _run(config, devices, duration, tokens, operator_token)
    finally:
        with trio.CancelScope(shield=True):  # even while the demo is cancelled: the token must not outlive it
            try:
                async with open_registry_store(config.state, config.storage.path) as registry:
                    await registry.revoke_operator(operator)
            except Exception as exc:  # the next demo revokes it; meanwhile, say so
                print(f"hub: could not revoke the demo's operator {operator!r}: {exc}", file=sys.stderr)


async def _run(config: HubConfig, devices: int, duration: float, tokens: list[str], operator_token: str) -> None:
    stop = trio.Event()
    totals: FleetTotals | None = None
    # Caught for the whole run: the first SIGINT/SIGTERM stops the fleet gracefully, a second cuts it all short (a
    # signal left to Python would raise KeyboardInterrupt in whichever task runs, mid-close).
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as watching:
            watching.start_soon(_watch_signals, signals, stop, watching.cancel_scope)
            totals = await _hub_and_fleet(config, devices, duration, tokens, operator_token, stop)
            watching.cancel_scope.cancel()
    if totals is None:
        print("interrupted: stopped without waiting for the devices and the hub to finish", flush=True)
    elif totals.points_acked == totals.points_sent:
        print(f"done: all {totals.points_acked} points acked and durable", flush=True)
    else:
        print(f"done: {totals.points_sent - totals.points_acked} points not acked (see the log)", flush=True)


async def _watch_signals(signals: AsyncIterator[int], stop: trio.Event, everything: trio.CancelScope) -> None:
    async for _ in signals:
        if stop.is_set():
            everything.cancel()
            return
        print("stopping: devices flush their outboxes, then the hub drains (Ctrl-C again: at once)", flush=True)
        stop.set()


async def _hub_and_fleet(
    config: HubConfig, devices: int, duration: float, tokens: list[str], operator_token: str, stop: trio.Event
) -> FleetTotals | None:
    """Run the hub and the fleet until the fleet ends (its duration, or `stop`); the fleet's totals. None if
    cancelled (a second signal) before it ended."""
    totals: FleetTotals | None = None
    async with trio.open_nursery() as nursery:
        handle: HubHandle = await nursery.start(serve, config)
        host = "127.0.0.1" if config.server.host in ("0.0.0.0", "") else config.server.host
        # The devices run in this process: with TLS they trust the hub's own certificate file (meant for a
        # self-signed one); without, plain ws:// to our own address never leaves the machine.
        trust: dict[str, str | bool]
        if config.tls.enabled:
            scheme, trust = "wss", {"ca_file": config.tls.cert_file}
        else:
            scheme, trust = "ws", {"allow_insecure": True}
        url = f"{scheme}://{host}:{handle.port}/v1/device"
        print(f"hub listening on {url}; storage: {handle.sink.description}", flush=True)
        control_url = f"{scheme}://{host}:{handle.port}{CONTROL_PATH}"
        print(_banner(config, handle, control_url, operator_token), flush=True)
        print(f"{devices} simulated devices report every ~{DEMO_INTERVAL:g}s; Ctrl-C stops", flush=True)
        totals = await run_fleet(
            url,
            tokens,
            interval=DEMO_INTERVAL,
            duration=duration or None,
            stop=stop,
            progress=lambda t: print(_progress_line(handle, t), flush=True),
            progress_every=PROGRESS_EVERY,
            client_options=trust,
        )
        handle.stop()
    print(_progress_line(handle, totals), flush=True)
    return totals


def run_demo(config: HubConfig, *, devices: int, duration: float) -> int:
    """Entry point of `hub demo`: the exit code."""
    # Per-device connect/online lines would drown the progress line.
    for name in ("hub.session", "hub.presence", "device_client"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).getEffectiveLevel()))
    try:
        trio.run(_demo, config, devices, duration)
    except (OSError, BaseExceptionGroup) as exc:
        error = exc if isinstance(exc, OSError) else start_error(exc)
        if error is None:
            raise
        print(f"hub: error: {error}", file=sys.stderr)
        return 1
    return 0
