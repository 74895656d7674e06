"""`hub serve --workers N` as real processes on Redis: devices spread over the workers through one port, a killed
worker comes back under its id (and replays its spool), SIGTERM stops every worker gracefully, one `/metrics`."""

from __future__ import annotations

import os
import re
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from device_client import DeviceClient
from hub.config import StateConfig
from hub.edge import bind_shared, open_shared_listeners
from hub.fleet import open_registry_store
from hub.ops import merge_health, merge_metrics
from tests.hubproc import HubProcess, run_hub
from tests.hubtools import points
from tests.servers import Redis, ScriptedWriteServer
from tests.waiting import eventually
from tests.wire import http_get

_READY = re.compile(r'msg="worker ready" worker=(\d+) pid=(\d+)')
_METRICS = re.compile(r'logger=hub\.workers msg="metrics listening" host=\S+ port=(\d+)')
DEVICES = 12  # each lands on worker 0 or 1 as the kernel hashes its connection: all on one is 1 in 2,048


async def _register(redis: Redis, tmp_path: Path, count: int) -> dict[str, str]:
    async with open_registry_store(StateConfig(backend="redis", url=redis.url), tmp_path / "cli") as store:
        return {f"d{i:02d}": await store.add(f"d{i:02d}") for i in range(count)}


def _config(tmp_path: Path, redis: Redis, extra: str = "") -> str:
    path = tmp_path / "hub.toml"
    path.write_text(f'[state]\nbackend = "redis"\nurl = "{redis.url}"\n\n[metrics]\ninterval = 0.5\n\n{extra}')
    return str(path)


async def _start(hub: HubProcess) -> None:
    """Start the supervisor; return once every worker is ready (`HubProcess` waits only for the port)."""
    hub.start()
    await eventually(_until(hub, lambda: 'msg="workers ready"' in hub.log()), 60, what="workers ready")


def _pids(hub: HubProcess) -> dict[int, int]:
    """The latest pid of each worker, from the supervisor's log."""
    return {int(k): int(pid) for k, pid in _READY.findall(hub.log())}


def _scrape(hub: HubProcess) -> dict[tuple[str, str], float]:
    """The machine's `/metrics`: value by (sample name, worker label)."""
    found = _METRICS.search(hub.log())
    assert found, hub.log()
    status, body = http_get(f"http://127.0.0.1:{found.group(1)}/metrics")
    assert status == 200
    return {
        (sample.name, sample.labels.get("worker", "")): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


async def _figure(hub: HubProcess, name: str, worker: int) -> float:
    return (await trio.to_thread.run_sync(_scrape, hub)).get((name, str(worker)), 0.0)


def _keys(lines: list[str]) -> set[tuple[str, str]]:
    """(device, timestamp) of each telemetry line."""
    return {(ln.split(",", 2)[1], ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith("environment,")}


def _file_lines(data_dir: Path, workers: str = "worker-*") -> list[str]:
    """What the embedded sink of the workers wrote (every worker's by default)."""
    return [
        ln
        for path in sorted(data_dir.glob(f"{workers}/lines/*.lp"))
        for ln in path.read_text().splitlines()
        if not ln.startswith("#")
    ]


def _sent(tokens: dict[str, str], batches: range, per_batch: int) -> set[tuple[str, str]]:
    return {
        (f"device={name}", str(p["ts"]))
        for name in tokens
        for b in batches
        for p in points(per_batch, start=b * per_batch)
    }


async def _stream(nursery: trio.Nursery, hub: HubProcess, tokens: dict[str, str]) -> dict[str, DeviceClient]:
    clients: dict[str, DeviceClient] = {}
    for name, token in tokens.items():
        client = DeviceClient(hub.url, token, backoff_initial=0.05, backoff_max=0.5)
        clients[name] = await nursery_enter(nursery, client)
    return clients


async def nursery_enter(nursery: trio.Nursery, client: DeviceClient) -> DeviceClient:
    """Run `client` (its `async with`) in `nursery` until the nursery is cancelled."""

    async def hold(task_status: trio.TaskStatus[DeviceClient]) -> None:
        async with client:
            task_status.started(client)
            await trio.sleep_forever()

    started: DeviceClient = await nursery.start(hold)
    return started


async def _send(clients: dict[str, DeviceClient], batches: range, per_batch: int) -> None:
    for client in clients.values():
        for b in batches:
            await client.send_batch(points(per_batch, start=b * per_batch))
    with trio.fail_after(60):
        for client in clients.values():
            await client.wait_acked()


def _until(hub: HubProcess, predicate: Callable[[], bool]) -> Callable[[], bool]:
    def check() -> bool:
        assert hub.proc is not None and hub.proc.poll() is None, hub.log()
        return predicate()

    return check


async def test_two_workers_share_a_port_survive_a_kill_and_stop_gracefully(redis_server: Redis, tmp_path: Path) -> None:
    tokens = await _register(redis_server, tmp_path, DEVICES)
    data = tmp_path / "hub"
    hub = HubProcess(data, "--workers", "2", "--config", _config(tmp_path, redis_server))
    await _start(hub)
    try:
        assert sorted(_pids(hub)) == [0, 1]
        async with trio.open_nursery() as nursery:
            clients = await _stream(nursery, hub, tokens)
            await _send(clients, range(0, 3), 20)
            for worker in (0, 1):  # the kernel spread the devices over both workers
                await eventually(lambda w=worker: _figure(hub, "hub_connects_total", w), 10)
            first = _pids(hub)
            hub_pid = hub.proc.pid if hub.proc else 0
            os.kill(first[0], signal.SIGKILL)
            await eventually(_until(hub, lambda: _pids(hub).get(0) not in (None, first[0])), 20, what="worker 0 back")
            assert _pids(hub)[1] == first[1] and hub.proc and hub.proc.pid == hub_pid
            await _send(clients, range(3, 6), 20)  # the devices of worker 0 reconnected, to either worker
            figures = await trio.to_thread.run_sync(_scrape, hub)
            assert figures[("hub_worker_restarts_total", "0")] == 1
            assert figures[("hub_worker_restarts_total", "1")] == 0
            assert figures[("hub_workers", "")] == 2
            status, body = await trio.to_thread.run_sync(http_get, _health_url(hub))
            assert status == 200, body
            nursery.cancel_scope.cancel()
        hub.signal(signal.SIGHUP)  # passed on: each worker reloads its TLS files (here: has none)
        await eventually(lambda: hub.log().count('msg="nothing to reload: TLS is not configured"') == 2, 10)
        for pid in _pids(hub).values():  # as systemd stops a service: SIGTERM to every process of its cgroup
            os.kill(pid, signal.SIGTERM)
        hub.signal(signal.SIGTERM)  # the supervisor's SIGTERM reaches each worker a second time: still graceful
        assert hub.wait() == 0
    finally:
        hub.kill()
    log = hub.log()
    assert log.count('msg="hub stopped"') == 2  # both workers drained and closed, as one hub does
    assert 'msg="worker died; restarting it" worker=0 returncode=-9' in log
    assert "Traceback" not in log
    assert _sent(tokens, range(0, 6), 20) <= _keys(_file_lines(data))  # every acked point, none lost to the kill
    for worker in (0, 1):  # each worker's own points name it: tag hub=<host>-K
        own = [ln for ln in _file_lines(data, f"worker-{worker}") if ln.startswith("hub,")]
        assert own and all(
            ln.startswith(f"hub,host={socket.gethostname()},hub={socket.gethostname()}-{worker} ") for ln in own
        ), own[:1]


def _health_url(hub: HubProcess) -> str:
    found = _METRICS.search(hub.log())
    assert found
    return f"http://127.0.0.1:{found.group(1)}/healthz"


async def test_a_killed_workers_spool_is_replayed_by_its_replacement(
    redis_server: Redis, scripted: ScriptedWriteServer, tmp_path: Path
) -> None:
    down = True
    scripted.responder = lambda path, body: (503 if down else 204, {}, b"")
    tokens = await _register(redis_server, tmp_path, DEVICES)
    extra = (
        f'[influx]\nurl = "{scripted.url}"\napi = "v1"\ndatabase = "telemetry"\n\n'
        "[batch]\nwrite_attempts = 1\nspool_after = 0.3\nbackoff_initial = 0.05\nprobe_interval = 0.2\n"
    )
    data = tmp_path / "hub"
    hub = HubProcess(data, "--workers", "2", "--config", _config(tmp_path, redis_server, extra))
    await _start(hub)
    try:
        async with trio.open_nursery() as nursery:
            clients = await _stream(nursery, hub, tokens)
            await _send(clients, range(0, 3), 20)  # acked: spooled, since the database answers 503
            await eventually(lambda: _figure(hub, "hub_spool_records", 0), 10, what="worker 0 spooled")
            assert (data / "worker-0" / "spool").is_dir()
            assert _keys("".join(scripted.accepted).splitlines()) == set()
            killed = _pids(hub)[0]
            os.kill(killed, signal.SIGKILL)
            await eventually(_until(hub, lambda: _pids(hub).get(0) not in (None, killed)), 20, what="worker 0 back")
            down = False
            sent = _sent(tokens, range(0, 3), 20)
            await eventually(
                lambda: sent <= _keys("".join(scripted.accepted).splitlines()), 20, what="every acked point written"
            )
            assert await _figure(hub, "hub_points_replayed_total", 0) > 0  # the replacement replayed the spool
            nursery.cancel_scope.cancel()
        hub.signal(signal.SIGTERM)
        assert hub.wait() == 0
    finally:
        hub.kill()
    assert "Traceback" not in hub.log()


def test_several_workers_need_the_redis_backend(tmp_path: Path) -> None:
    done = run_hub("serve", "--workers", "2", "--port", "0", "--data-dir", str(tmp_path))
    assert done.returncode == 2
    assert (
        done.stderr
        == 'hub: error: --workers 2 needs [state] backend = "redis": the workers share registry and acked seqs\n'
    )


def test_the_machines_metrics_label_each_workers_figures() -> None:
    texts = {
        0: "# TYPE hub_connects counter\nhub_connects_total 3.0\n",
        1: "# TYPE hub_connects counter\nhub_connects_total 4.0\n",
        2: None,  # did not answer
    }
    body, _ = merge_metrics(texts, {0: 0, 1: 2, 2: 0}, running=2)
    samples = {
        (s.name, s.labels.get("worker", "")): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("hub_connects_total", "0")] == 3 and samples[("hub_connects_total", "1")] == 4
    assert samples[("hub_worker_up", "2")] == 0 and samples[("hub_worker_up", "0")] == 1
    assert samples[("hub_worker_restarts_total", "1")] == 2
    assert samples[("hub_workers", "")] == 2


def test_the_machine_is_healthy_only_when_every_worker_is() -> None:
    ok = (200, b'{"status": "ok"}')
    assert merge_health({0: ok, 1: ok})[0] == 200
    assert merge_health({0: ok, 1: (503, b'{"status": "unavailable"}')})[0] == 503
    status, _, body = merge_health({0: ok, 1: None})
    assert status == 503 and b"unreachable" in body


async def test_workers_stop_when_their_supervisor_is_killed_and_a_second_one_is_refused(
    redis_server: Redis, tmp_path: Path
) -> None:
    hub = HubProcess(tmp_path / "hub", "--workers", "2", "--config", _config(tmp_path, redis_server))
    await _start(hub)
    pids = _pids(hub)
    config = _config(tmp_path, redis_server)
    again = run_hub(
        "serve", "--workers", "2", "--port", str(hub.port), "--data-dir", str(hub.data_dir), "--config", config
    )
    assert again.returncode == 1  # SO_REUSEPORT would let it share the port; the data directory's lock does not
    lock = hub.data_dir / "workers.lock"
    assert (
        again.stderr == f"hub: error: another hub serve --workers runs on the data directory {hub.data_dir} ({lock})\n"
    )
    hub.kill()  # SIGKILL: no chance to stop them itself

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False  # (a zombie until reaped by init: also gone from the port)

    await eventually(lambda: all(gone(pid) for pid in pids.values()), 30, what="workers gone")
    assert hub.log().count('msg="the supervisor is gone: shutting down"') == 2
    assert hub.log().count('msg="hub stopped"') == 2


def test_a_worker_that_cannot_start_stops_the_supervisor_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text(f'[state]\nbackend = "redis"\nurl = "unix://{tmp_path}/nothing.sock"\n')
    done = run_hub("serve", "--workers", "2", "--port", "0", "--metrics-port", "0", "--config", str(config))
    assert done.returncode == 1
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("hub: error:")]
    assert errors[0].startswith(f"hub: error: cannot reach Redis at unix://{tmp_path}/nothing.sock")
    assert errors[-1] == "hub: error: worker 0 exited with 1 before it was ready"
    assert "Traceback" not in done.stderr


async def test_shared_sockets_hold_one_port_for_every_address() -> None:
    held = await bind_shared("localhost", 0)  # 127.0.0.1 and, where there is IPv6, ::1
    try:
        ports = {sock.getsockname()[1] for sock in held}
        assert len(ports) == 1
        listeners = await open_shared_listeners("localhost", ports.pop())  # a worker: same port, listening
        for listener in listeners:
            await listener.aclose()
    finally:
        for sock in held:
            sock.close()
