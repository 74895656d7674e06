"""A hub that accepts TCP and never answers the handshake must not hold a device past its connect timeout."""

from __future__ import annotations

import trio

from device_client import DeviceClient
from tests.waiting import eventually


async def test_silent_listener_counts_as_a_failed_attempt_and_the_client_retries() -> None:
    held: list[trio.SocketStream] = []

    async def silent(stream: trio.SocketStream) -> None:
        held.append(stream)  # accept, read nothing, answer nothing
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, silent, 0)
        port = listeners[0].socket.getsockname()[1]
        client = DeviceClient(
            f"ws://127.0.0.1:{port}/v1/device",
            "d1.secret",
            connect_timeout=0.2,
            backoff_initial=0.05,
            backoff_max=0.1,
            close_timeout=0.5,
        )
        async with client:
            # trio-websocket's open_websocket_url would wait for the peer to hang up: no attempt would end.
            await eventually(lambda: client.stats.connect_failures >= 3, 30)
        assert len(held) >= 3  # each failure was a fresh connection attempt
        nursery.cancel_scope.cancel()
