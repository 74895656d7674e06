"""deploy/haproxy.cfg in front of 3 real hub processes on one Redis: devices spread over the hubs through one port; a
hub killed with SIGKILL is taken out by the /healthz checks, its devices reconnect through haproxy to the others, and
no acked point is lost."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import trio

from device_client import DeviceClient
from tests.hubproc import HubProcess, run_hub
from tests.hubtools import points
from tests.servers import HAPROXY_CFG, HAProxy, Redis, haproxy_config
from tests.waiting import eventually

DEVICES = 12
PER_BATCH = 20
_METRICS = re.compile(r'msg="metrics listening" host=\S+ port=(\d+)')


def _add_device(config: Path, name: str) -> str:
    done = run_hub("device", "add", name, "--config", str(config))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def _register(config: Path) -> dict[str, str]:
    """Devices added with `hub device add` (into Redis), a few CLI processes at a time."""
    tokens: dict[str, str] = {}
    limiter = trio.CapacityLimiter(4)

    async def add(name: str) -> None:
        tokens[name] = await trio.to_thread.run_sync(_add_device, config, name, limiter=limiter)

    async with trio.open_nursery() as nursery:
        for i in range(DEVICES):
            nursery.start_soon(add, f"d{i:02d}")
    return tokens


def _telemetry(data_dir: Path) -> set[tuple[str, str]]:
    """(device tag, timestamp) of each telemetry line the hub's embedded file sink wrote."""
    return {
        (ln.split(",", 2)[1], ln.rsplit(" ", 1)[1])
        for path in sorted((data_dir / "lines").glob("*.lp"))
        for ln in path.read_text().splitlines()
        if ln.startswith("environment,")
    }


def _sent(tokens: dict[str, str], batches: range) -> set[tuple[str, str]]:
    return {
        (f"device={name}", str(p["ts"]))
        for name in tokens
        for b in batches
        for p in points(PER_BATCH, start=b * PER_BATCH)
    }


async def _hold(client: DeviceClient, task_status: trio.TaskStatus[DeviceClient]) -> None:
    async with client:
        task_status.started(client)
        await trio.sleep_forever()


async def _send(clients: list[DeviceClient], batches: range) -> None:
    for client in clients:
        for b in batches:
            await client.send_batch(points(PER_BATCH, start=b * PER_BATCH))
    with trio.fail_after(60):
        for client in clients:
            await client.wait_acked()


def test_the_test_config_is_the_deploy_config_with_its_bind_and_servers_replaced() -> None:
    deploy = HAPROXY_CFG.read_text()
    generated = haproxy_config(7, [(1001, 2001), (1002, 2002), (1003, 2003)])
    for setting in ("balance leastconn", "option httpchk GET /healthz", "timeout tunnel 1h", "option redispatch"):
        assert setting in deploy and setting in generated
    assert "bind fd@7" in generated
    assert "server hub-3 127.0.0.1:1003 check port 2003" in generated
    assert "hub-1:8765" not in generated


async def test_three_hubs_behind_haproxy_lose_no_acked_point_when_one_is_killed(
    redis_server: Redis, tmp_path: Path
) -> None:
    config = tmp_path / "hub.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "cli-data"}"\n\n[state]\nbackend = "redis"\nurl = "{redis_server.url}"\n'
    )
    tokens = await _register(config)
    hubs = [HubProcess(tmp_path / f"hub-{i}", "--config", str(config)) for i in range(3)]
    proxy: HAProxy | None = None
    try:
        for hub in hubs:
            hub.start()
        metrics = []
        for hub in hubs:
            await eventually(lambda h=hub: _METRICS.search(h.log()) is not None, 20, what="metrics listening")
            found = _METRICS.search(hub.log())
            assert found
            metrics.append(int(found.group(1)))
        proxy = HAProxy(tmp_path / "haproxy", [(hub.port, port) for hub, port in zip(hubs, metrics, strict=True)])
        proxy.start()
        async with trio.open_nursery() as nursery:
            clients = [
                await nursery.start(_hold, DeviceClient(proxy.ws_url, token, backoff_initial=0.05, backoff_max=0.5))
                for token in tokens.values()
            ]
            await _send(clients, range(0, 3))
            held = [_telemetry(hub.data_dir) for hub in hubs]
            devices_on = [{device for device, _ in keys} for keys in held]
            assert sum(1 for on in devices_on if on) > 1, devices_on  # leastconn spread the devices over the hubs
            victim = max(range(3), key=lambda i: len(devices_on[i]))
            hubs[victim].kill()
            down = f"Server hubs/hub-{victim + 1} is DOWN"  # two failed /healthz checks took it out
            await eventually(lambda: down in proxy.log_path.read_text(), 10, what=down)
            await _send(clients, range(3, 6))  # its devices reconnected through haproxy to the two others
            nursery.cancel_scope.cancel()
        for i, hub in enumerate(hubs):
            if i != victim:
                hub.signal(signal.SIGTERM)
                assert hub.wait() == 0
    finally:
        if proxy is not None:
            proxy.close()
        for hub in hubs:
            hub.kill()
    written = [_telemetry(hub.data_dir) for hub in hubs]
    after_kill = [w - h for w, h in zip(written, held, strict=True)]
    assert not after_kill[victim]  # nothing reached the dead hub
    moved = devices_on[victim]
    for device in moved:  # each of the dead hub's devices went on, on one of the others
        assert any(device in {d for d, _ in keys} for keys in after_kill), device
    everything = set().union(*written)
    sent = _sent(tokens, range(0, 6))
    assert len(sent) == DEVICES * 6 * PER_BATCH
    assert sent <= everything  # every acked point, including those the killed hub's file sink held
    for hub in hubs:
        assert "Traceback" not in hub.log()
