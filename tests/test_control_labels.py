"""Device labels and selectors on the control channel, over a real hub and each state backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from hub import fleet
from hub.config import StateConfig
from hub.fleet import DeviceRecord, open_registry_store, parse_selector
from tests.hubtools import connect, control, hello, hub_config, start_hub


def test_summaries_carry_labels_and_filter_by_selector() -> None:
    records = [
        DeviceRecord(name="a", created=1.0, revoked=False, epoch=0, acked_seq=0, labels={"site": "berlin"}),
        DeviceRecord(name="b", created=1.0, revoked=False, epoch=0, acked_seq=0, labels={"site": "paris"}),
        DeviceRecord(name="c", created=1.0, revoked=False, epoch=0, acked_seq=0),
    ]
    assert fleet.device_summary("a", records[0], None, None)["labels"] == {"site": "berlin"}
    assert fleet.device_summary("ghost", None, None, None)["labels"] == {}

    def names(selector: str) -> list[str]:
        return [s["name"] for s in fleet.list_summaries(records, {}, lambda _: None, None, parse_selector(selector))]

    assert names("site=berlin") == ["a"]
    assert names("site") == ["a", "b"]
    assert names("site!=berlin") == ["b", "c"]
    assert [s["name"] for s in fleet.list_summaries(records, {}, lambda _: None, "never")] == ["a", "b", "c"]


def _overrides(state_config: StateConfig) -> dict[str, Any]:
    return {"state.backend": state_config.backend, "state.url": state_config.url}


async def test_labels_on_the_control_channel(state_config: StateConfig, tmp_path: Path) -> None:
    async with open_registry_store(state_config, tmp_path) as store:
        admin = await store.add_operator("a", "admin")
        operator = await store.add_operator("o", "operator")
        await store.add("old")  # a device without labels
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path, **_overrides(state_config)))
        async with control(hub, admin) as ctl, control(hub, operator) as op:
            await ctl.ok("device_add", name="b1", labels={"site": "berlin", "model": "th-100"})
            await ctl.ok("device_add", name="b2", labels={"site": "berlin", "model": "th-200"})
            await ctl.ok("device_add", name="p1", labels={"site": "paris"})
            assert await ctl.error("device_add", name="x1", labels={"site": "a b"}) == "bad_label"
            assert await ctl.error("device_add", name="x1", labels={f"k{i}": "v" for i in range(17)}) == "bad_label"
            assert await ctl.error("device", name="x1") == "not_found"  # refused whole

            listed = await ctl.ok("devices")
            assert {d["name"]: d["labels"] for d in listed} == {
                "b1": {"model": "th-100", "site": "berlin"},
                "b2": {"model": "th-200", "site": "berlin"},
                "old": {},
                "p1": {"site": "paris"},
            }
            assert (await ctl.ok("device", name="b1"))["labels"] == {"model": "th-100", "site": "berlin"}

            async def selected(selector: str, **more: Any) -> list[str]:
                return [d["name"] for d in await op.ok("devices", selector=selector, **more)]

            assert await selected("site=berlin") == ["b1", "b2"]
            assert await selected("site=berlin,model=th-100") == ["b1"]
            assert await selected("site!=berlin") == ["old", "p1"]
            assert await selected("model") == ["b1", "b2"]
            assert await selected("site=berlin", state="online") == []
            assert await op.error("devices", selector="site=") == "bad_label"
            assert await op.error("devices", selector="") == "bad_label"

            assert await op.error("device_label", name="b1", set={"x": "y"}) == "forbidden"
            changed = await ctl.ok("device_label", name="b1", set={"site": "paris", "rack": "r7"}, remove=["model"])
            assert changed == {"name": "b1", "labels": {"rack": "r7", "site": "paris"}}
            assert await selected("site=paris") == ["b1", "p1"]
            assert await ctl.ok("device_label", name="old", remove=["nothing"]) == {"name": "old", "labels": {}}
            assert await ctl.error("device_label", name="ghost", set={"a": "b"}) == "not_found"
            assert await ctl.error("device_label", name="b1") == "bad_request"
            assert await ctl.error("device_label", name="b1", set={"a": "b c"}) == "bad_label"
            full = {f"k{i}": "v" for i in range(16)}
            assert await ctl.error("device_label", name="b1", set=full) == "bad_label"  # 18 with rack, site
            assert (await ctl.ok("device", name="b1"))["labels"] == {"rack": "r7", "site": "paris"}
        hub.stop()
    async with open_registry_store(state_config, tmp_path) as store:  # durable
        record = await store.get("b1")
        assert record is not None and record.labels == {"rack": "r7", "site": "paris"}


async def test_a_subscription_with_a_selector_gets_events_of_the_selected_devices(
    state_config: StateConfig, tmp_path: Path
) -> None:
    async with open_registry_store(state_config, tmp_path) as store:
        viewer = await store.add_operator("v", "viewer")
        tokens = {
            "b1": await store.add("b1", {"site": "berlin"}),
            "b2": await store.add("b2", {"site": "berlin"}),
            "p1": await store.add("p1", {"site": "paris"}),
        }
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, hub_config(tmp_path, **_overrides(state_config)))
        async with control(hub, viewer) as ctl:
            berlin = (await ctl.ok("subscribe", topic="presence", selector="site=berlin"))["subscription"]
            b2_only = (await ctl.ok("subscribe", topic="presence", selector="site=berlin", devices=["b2", "p1"]))[
                "subscription"
            ]
            nobody = (await ctl.ok("subscribe", topic="presence", selector="site=rome"))["subscription"]
            assert await ctl.error("subscribe", topic="presence", selector="site==x") == "bad_label"
            async with connect(hub, tokens["p1"]) as p1, connect(hub, tokens["b1"]) as b1:
                await hello(p1)
                await hello(b1)
                [event] = await ctl.events(berlin, 1)
                assert (event["name"], event["state"], event["labels"]) == ("b1", "online", {"site": "berlin"})
                async with connect(hub, tokens["b2"]) as b2:
                    await hello(b2)
                    [event] = await ctl.events(berlin, 1)
                    assert (event["name"], event["state"]) == ("b2", "online")
                    [event] = await ctl.events(b2_only, 1)
                    assert (event["name"], event["state"]) == ("b2", "online")
                    await ctl.call("ping")  # a round trip after the events: anything pending has arrived
            names = {(p["subscription"], p["event"]["name"]) for p in ctl.pushes if p["type"] == "event"}
            assert all(name != "p1" for _, name in names)  # no subscription selects p1
            assert all(sub != nobody for sub, _ in names)
        hub.stop()
