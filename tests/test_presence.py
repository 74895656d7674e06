"""Presence without sockets, on trio's mock clock: online, late, online again, offline, epochs, the points."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from hub.fleet import DeviceStatus, Presence, PresenceEvent, PresenceState
from hub.fleet._presence import LATE_CHECK_EVERY
from hub.fleet._presence_states import IllegalTransition

EPOCH = 1_700_000_000.0


def wall() -> float:
    """A wall clock that moves with trio's (mock) clock."""
    return EPOCH + trio.current_time()


class Fleet:
    """What presence reads and writes around it: last telemetry times (Unix s) and the points it submits."""

    def __init__(self) -> None:
        self.data_at: dict[str, float] = {}
        self.lines: list[str] = []
        self.hold: trio.Event | None = None  # set: submits wait until it is set

    def last_seen(self, name: str) -> float | None:
        return self.data_at.get(name)

    def data(self, name: str) -> None:
        self.data_at[name] = wall()

    async def submit(self, text: str, n: int, mark: None) -> None:
        if self.hold is not None:
            await self.hold.wait()
        self.lines.append(text)


@asynccontextmanager
async def watching(fleet: Fleet, **kwargs: Any) -> AsyncIterator[Presence]:
    presence = Presence(fleet.submit, late_factor=1.5, late_grace=2.0, clock=wall, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(presence.watch_late, fleet.last_seen)
        yield presence
        nursery.cancel_scope.cancel()


async def test_a_quiet_device_is_late_then_online_again_with_its_data(autojump_clock: Any) -> None:
    fleet = Fleet()
    async with watching(fleet) as presence:
        t0 = trio.current_time()
        await presence.online("d1", 1, firmware="f", model="m", interval=10)  # late after 1.5 x 10 + 2 = 17 s
        await trio.sleep_until(t0 + 17.5)
        assert presence.status["d1"].state is PresenceState.ONLINE
        await trio.sleep_until(t0 + 18 + LATE_CHECK_EVERY)
        late = presence.status["d1"]
        assert (late.state, late.reason, late.epoch) == ("late", "no_data", 1)
        assert late.since == pytest.approx(EPOCH + t0 + 18, abs=LATE_CHECK_EVERY)
        fleet.data("d1")
        await presence.seen("d1")
        assert (presence.status["d1"].state, presence.status["d1"].reason) == ("online", "data")
        assert presence.counts() == {"online": 1, "late": 0, "offline": 0}
    assert [ln.split(" ")[1].split(",") for ln in fleet.lines] == [
        ["online=1i", "late=0i", "epoch=1i"],
        ["online=1i", "late=1i", "epoch=1i"],
        ["online=1i", "late=0i", "epoch=1i"],
    ]
    assert [ln.split(" ")[0] for ln in fleet.lines] == [
        "device_status,device=d1,reason=connected",
        "device_status,device=d1,reason=no_data",
        "device_status,device=d1,reason=data",
    ]


async def test_the_late_timer_counts_from_the_last_data(autojump_clock: Any) -> None:
    fleet = Fleet()
    async with watching(fleet) as presence:
        await presence.online("d1", 1, firmware="", model="", interval=10)
        for _ in range(10):  # reporting on time for 100 s
            await trio.sleep(10)
            fleet.data("d1")
            assert presence.status["d1"].state == "online"
        t_data = trio.current_time()
        await trio.sleep_until(t_data + 17)
        assert presence.status["d1"].state == "online"
        await trio.sleep_until(t_data + 17 + 2 * LATE_CHECK_EVERY)
        assert presence.status["d1"].state == "late"


async def test_no_declared_interval_is_never_late_and_offline_is_never_late(autojump_clock: Any) -> None:
    fleet = Fleet()
    async with watching(fleet) as presence:
        await presence.online("quiet", 1, firmware="", model="", interval=0)
        await presence.online("gone", 1, firmware="", model="", interval=1)
        await presence.offline("gone", 1, "disconnected")
        await trio.sleep(3600)
        assert presence.status["quiet"].state == "online"
        assert (presence.status["gone"].state, presence.status["gone"].reason) == ("offline", "disconnected")


async def test_epochs_order_the_events_of_successive_sessions(autojump_clock: Any) -> None:
    fleet = Fleet()
    async with watching(fleet) as presence:
        await presence.online("d1", 1, firmware="", model="", interval=0)
        await presence.online("d1", 2, firmware="", model="", interval=0)  # a new session replaces the old
        await presence.offline("d1", 1, "replaced")  # the old session's end: ignored
        assert (presence.status["d1"].state, presence.status["d1"].epoch) == ("online", 2)
        await presence.online("d1", 1, firmware="", model="", interval=0)  # older: ignored
        assert presence.status["d1"].epoch == 2
        await presence.offline("d1", 2, "closed")
        await presence.offline("d1", 2, "closed again")  # already offline: DISCONNECT is moot
        await presence.seen("d1")  # DATA only matters when late
        assert (presence.status["d1"].state, presence.status["d1"].reason) == ("offline", "closed")
        assert presence.online_count() == 0
    assert len(fleet.lines) == 3


async def test_a_device_that_left_while_a_point_waited_is_not_marked_late(autojump_clock: Any) -> None:
    fleet = Fleet()
    async with watching(fleet) as presence:
        for name in ("a", "b"):
            await presence.online(name, 1, firmware="", model="", interval=1)
        fleet.hold = trio.Event()  # the pipeline is full: a's "late" point waits
        await trio.sleep(10)
        assert presence.status["a"].state == "late" and presence.status["b"].state == "online"
        hold, fleet.hold = fleet.hold, None
        hold.set()
        await presence.offline("b", 1, "disconnected")  # b's session ends before the check resumes
        await trio.sleep(10)
        assert presence.status["b"].state == "offline"


def test_device_status_states_are_the_enum() -> None:
    status = DeviceStatus("late", 1, EPOCH, "no_data")  # type: ignore[arg-type]
    assert status.state is PresenceState.LATE and status.online
    assert not DeviceStatus(PresenceState.OFFLINE, 1, EPOCH, "x").online
    with pytest.raises(ValueError):
        DeviceStatus("away", 1, EPOCH, "x")  # type: ignore[arg-type]
    assert math.isfinite(status.changed_at)


async def test_an_illegal_move_raises(autojump_clock: Any) -> None:
    presence = Presence(Fleet().submit, clock=wall)
    await presence.online("d1", 1, firmware="", model="", interval=0)
    with pytest.raises(IllegalTransition):
        await presence._move("d1", presence.status["d1"], PresenceEvent.DATA, "data")
