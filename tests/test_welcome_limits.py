"""The hub announces its limits in `welcome`, and `device_client` checks points against them before sending."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from device_client import DeviceClient, Limits, ProtocolError
from device_client.protocol import DEFAULT_LIMITS, ErrorCode
from tests.hubtools import BASE_TS, add_devices, connect, hello, hub_config, start_hub, url

STRICT = {
    "limits.max_points": 7,
    "limits.max_fields": 6,
    "limits.max_tags": 2,
    "limits.max_name_len": 40,
    "limits.max_tag_value_len": 50,
    "limits.max_string_len": 60,
    "server.max_message_bytes": 70_000,
}


async def test_welcome_carries_every_limit_of_the_hub(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path, **STRICT))
        async with connect(hub, tokens["d1"]) as ws:
            welcome = await hello(ws)
        assert welcome.limits() == Limits(
            max_points=7, max_fields=6, max_tags=2, max_name_len=40, max_tag_value_len=50, max_string_len=60
        )
        assert welcome.max_message_bytes == 70_000
        hub.stop()


async def test_a_client_refuses_locally_what_the_hub_would_refuse(tmp_path: Path) -> None:
    tokens = add_devices(tmp_path, "d1")
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path, **{"limits.max_tags": 2}))
        async with DeviceClient(url(hub), tokens["d1"], linger=0.01) as client:
            assert client.limits == DEFAULT_LIMITS  # not welcomed yet: the defaults
            with trio.fail_after(10):
                await client.wait_connected()
            assert client.limits.max_tags == 2
            three = {"room": "lab", "rack": "r1", "slot": "s4"}
            with pytest.raises(ProtocolError, match="more than 2 tags") as refused:
                await client.send("environment", {"temperature": 21.5}, tags=three, ts=BASE_TS)
            assert refused.value.code == ErrorCode.BAD_POINT
            point = {"measurement": "environment", "ts": BASE_TS, "fields": {"t": 1.0}, "tags": three}
            with pytest.raises(ProtocolError, match="more than 2 tags"):
                await client.send_batch([point])
            await client.send("environment", {"temperature": 21.5}, tags={"room": "lab", "rack": "r1"}, ts=BASE_TS)
            with trio.fail_after(10):
                await client.wait_acked()
            assert (client.stats.points_acked, client.stats.rejected) == (1, 0)
        assert hub.stats.protocol_errors.get(ErrorCode.BAD_POINT, 0) == 0  # nothing reached the hub to refuse
        hub.stop()
