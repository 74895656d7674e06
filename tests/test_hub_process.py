"""`hub serve` as a real process: SIGTERM/SIGINT shut it down gracefully, with the last acks sent."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from device_client import protocol
from device_client.protocol import Ack, CloseCode, ErrorCode, Hello, Telemetry, Welcome
from tests.hubproc import HubProcess
from tests.hubtools import add_devices, points, telemetry_lines


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_gracefully(tmp_path: Path, signum: int) -> None:
    tokens = add_devices(tmp_path, "d1")
    # A long batching delay: the batches are still in memory when the signal arrives.
    (tmp_path / "hub.toml").write_text("[batch]\nmax_delay = 30.0\nflush_when_idle = false\n")
    hub = HubProcess(tmp_path, "--config", str(tmp_path / "hub.toml"))
    hub.start()
    try:
        headers = [(b"authorization", f"Bearer {tokens['d1']}".encode())]
        async with open_websocket_url(hub.url, extra_headers=headers) as ws:
            await ws.send_message(protocol.encode(Hello()))
            assert isinstance(protocol.decode(await ws.get_message()), Welcome)
            for seq in (1, 2):
                await ws.send_message(protocol.encode(Telemetry(seq, points(3, start=seq * 10))))
            # The session handles messages in order: the error for a third, bad message proves the two
            # batches are in the pipeline (not yet written: the batcher waits 30 s).
            await ws.send_message("not json")
            with trio.fail_after(20):
                assert protocol.decode(await ws.get_message()).code == ErrorCode.BAD_JSON
            hub.signal(signum)
            seen = []
            with trio.fail_after(20), pytest.raises(ConnectionClosed) as closed:
                while True:
                    seen.append(protocol.decode(await ws.get_message()))
            assert closed.value.reason.code == CloseCode.GOING_AWAY
            assert seen[-1] == Ack(2)
        assert hub.wait() == 0
    finally:
        hub.kill()
    assert len(telemetry_lines(tmp_path)) == 6
    log = hub.log()
    assert "signal received" in log and "hub stopped" in log
    assert "Traceback" not in log
