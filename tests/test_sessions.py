"""Session lifecycle under churn: devices vanishing (TCP reset) while their pings come due."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import trio
from wsproto.events import Message

from device_client import protocol
from device_client.protocol import DEVICE_PATH, Hello
from tests.hubtools import add_devices, connect, hello, hub_config, points, send_batch, start_hub, wait_ack
from tests.waiting import eventually
from tests.wire import RawClient, open_tcp

DEVICES = 40
ROUNDS = 5


async def connect_then_reset(port: int, token: str) -> None:
    """Handshake, hello, welcome, then an abortive close (RST, no close frame) like a device losing power."""
    client = RawClient(await open_tcp(port))
    await client.handshake(DEVICE_PATH, token)
    await client.send(client.conn.send(Message(data=protocol.encode(Hello()))))
    assert isinstance(await client.message(), protocol.Welcome)
    client.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.stream.aclose()


async def test_devices_reset_while_pings_come_due_leave_the_hub_serving(tmp_path: Path) -> None:
    names = [f"d{i}" for i in range(DEVICES)]
    tokens = add_devices(tmp_path, "good", *names)
    # Pings due all the time, so some come due while a session is ending.
    overrides = {"presence.ping_interval": 0.001, "presence.ping_timeout": 5.0, "server.max_connections_per_address": 0}
    config = hub_config(tmp_path, **overrides)
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, config)
        for _ in range(ROUNDS):
            async with trio.open_nursery() as fleet:
                for name in names:
                    fleet.start_soon(connect_then_reset, hub.port, tokens[name])
        await eventually(lambda: not hub.server.sessions.keys() - {"good"}, 30)
        async with connect(hub, tokens["good"]) as ws:  # the hub still serves (the serve task did not crash)
            await hello(ws)
            await send_batch(ws, 1, points(3))
            await wait_ack(ws, 1)
        assert hub.stats.connects == DEVICES * ROUNDS + 1
        hub.stop()
