"""The session rules of both ends, driven in memory through `SessionPair`: no sockets, no trio, no clock."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from device_client.outbox import CommandLog, Outbox
from device_client.protocol import (
    ANSWERS,
    DEFAULT_LIMITS,
    Ack,
    CloseCode,
    Command,
    CommandAck,
    CommandResult,
    Error,
    ErrorCode,
    Hello,
    Limits,
    Telemetry,
    Welcome,
    decode,
    encode,
    encode_ack,
)
from device_client.session import (
    TRANSITIONS,
    Acked,
    CloseVerdict,
    CommandReceived,
    DeviceConnection,
    HubError,
    Ignored,
    Rejected,
    Role,
    SessionEnd,
    SessionError,
    SessionState,
    Trigger,
    Welcomed,
    transition,
)
from hub.devices import HubConnection, Refused, Resent
from tests.sessionpair import DEVICE, SessionPair, point


def kinds(frames: list[str]) -> list[str]:
    return [type(decode(f)).__name__ for f in frames]


# ---------------------------------------------------------------------------- the state table


def test_every_move_missing_from_the_table_raises() -> None:
    for role, state, trigger in itertools.product(Role, SessionState, Trigger):
        allowed = TRANSITIONS[role].get(state, {})
        if trigger in allowed:
            assert transition(role, state, trigger) is allowed[trigger]
        else:
            with pytest.raises(SessionError):
                transition(role, state, trigger)


def test_a_driver_out_of_step_gets_a_session_error() -> None:
    device = DeviceConnection(Outbox(), CommandLog())
    with pytest.raises(SessionError):
        device.receive(encode(Ack(1)))  # no connection yet
    device.connect(Hello())
    with pytest.raises(SessionError):
        device.connect(Hello())  # one connection at a time
    hub = HubConnection()
    with pytest.raises(SessionError):
        hub.welcome(DEVICE, 1, SessionPair().book, [], ping_interval=10.0, max_message_bytes=1000)  # before hello
    assert isinstance(hub.receive(encode(Hello()), 0.0), Hello)
    hub.welcome(DEVICE, 1, SessionPair().book, [], ping_interval=10.0, max_message_bytes=1000)
    with pytest.raises(SessionError):
        hub.welcome(DEVICE, 1, SessionPair().book, [], ping_interval=10.0, max_message_bytes=1000)
    hub.connection_lost()
    with pytest.raises(SessionError):
        hub.receive(encode(Hello()), 0.0)


def test_every_error_code_has_an_answer() -> None:
    assert set(ANSWERS) == set(ErrorCode)
    assert ANSWERS[ErrorCode.BAD_FIELD].close is None
    assert ANSWERS[ErrorCode.TOO_MANY_ERRORS].close == CloseCode.POLICY
    assert ANSWERS[ErrorCode.TOO_LARGE].frame is False


# ---------------------------------------------------------------------------- hello and welcome


def test_hello_and_welcome_open_both_ends() -> None:
    pair = SessionPair(window=8)
    pair.book.durable = pair.book.submitted = 41
    welcome = pair.connect(Hello(firmware="1.0", interval=5.0))
    assert (welcome.device, welcome.ack, welcome.epoch, welcome.window) == (DEVICE, 41, 1, 8)
    assert pair.hub.state is pair.device.state is SessionState.OPEN
    assert pair.hub.hello == Hello(firmware="1.0", interval=5.0)
    assert pair.device.window == 8 and pair.device.stats.connected
    assert pair.outbox.last_seq == 41  # new batches are numbered above the hub's ack
    assert pair.queue() == [42]


@pytest.mark.parametrize(
    ("first", "code"),
    [
        (encode(Telemetry(1, [point()])), ErrorCode.NOT_READY),
        ('{"type": "hello", "proto": 2}', ErrorCode.UNSUPPORTED_VERSION),
        ("not json", ErrorCode.BAD_JSON),
        ('{"type": "hello", "proto": 1, "firmware": "\udcff"}', ErrorCode.BAD_JSON),
    ],
)
def test_a_bad_first_message_closes_with_its_error(first: str, code: ErrorCode) -> None:
    hub = HubConnection()
    refused = hub.receive(first, 0.0)
    assert isinstance(refused, Refused) and refused.error.code == code
    close = refused.close
    assert close is not None and (close.code, close.reason, close.error) == (CloseCode.POLICY, code.value, code)
    assert close.frame is not None and decode(close.frame) == Error(code, refused.error.detail)
    assert hub.state is SessionState.CLOSING


def test_no_hello_in_time() -> None:
    hub = HubConnection()
    close = hub.hello_timed_out()
    assert (close.code, close.error) == (CloseCode.POLICY, ErrorCode.NOT_READY)
    assert close.frame is not None and decode(close.frame) == Error(ErrorCode.NOT_READY, "no hello in time")


def test_the_device_takes_errors_before_the_welcome_and_refuses_a_bad_welcome() -> None:
    device = DeviceConnection(Outbox(), CommandLog())
    device.connect(Hello())
    assert device.receive(encode(Error(ErrorCode.INTERNAL, "hm"))) == HubError(ErrorCode.INTERNAL, "hm")
    assert isinstance(device.receive(encode(Ack(3))), Ignored)
    with pytest.raises(Exception, match="bad_json"):
        device.receive("{")
    assert device.state is SessionState.HELLO


# ---------------------------------------------------------------------------- telemetry, window, acks


def test_batches_flow_within_the_window_and_acks_free_it() -> None:
    pair = SessionPair(window=2)
    pair.connect()
    pair.queue(5, points=3)
    events = pair.to_hub()
    assert [type(e) for e in events] == [Telemetry, Telemetry]  # the window: two in flight
    assert pair.to_hub() == []
    pair.make_durable(1)
    assert pair.to_device() == [Acked(1, 1, 3)]
    assert [e.seq for e in pair.to_hub() if isinstance(e, Telemetry)] == [3]
    pair.make_durable()
    assert pair.to_device() == [Acked(3, 2, 6)]
    assert [e.seq for e in pair.to_hub() if isinstance(e, Telemetry)] == [4, 5]
    pair.make_durable()
    pair.to_device()
    assert len(pair.outbox) == 0 and pair.device.stats.points_acked == 15
    assert pair.hub_frames() == []  # nothing more is due


def test_the_hub_window_counts_batches_not_yet_durable() -> None:
    pair = SessionPair(window=2)
    pair.connect()
    pair.queue(2)
    pair.to_hub()
    assert pair.hub.window_full() and pair.hub.oldest_inflight == 1
    pair.make_durable(1)
    assert not pair.hub.window_full() and pair.hub.oldest_inflight == 2


def test_resends_after_a_reconnect_are_acked_never_taken_again() -> None:
    pair = SessionPair(window=8)
    pair.connect()
    pair.queue(3)
    pair.to_hub()
    pair.make_durable(1)
    assert pair.drop() == SessionEnd()  # the ack of 1 never reached the device
    assert pair.connect().ack == 1
    assert [e.seq for e in pair.outbox.entries()] == [2, 3]
    events = pair.to_hub()
    assert events == [Resent(2, None), Resent(3, None)]  # in the pipeline still: their ack follows
    assert pair.device.stats.resent == 2
    pair.make_durable()
    assert pair.to_device() == [Acked(3, 2, 2)]
    # Resent again once durable: acked again at once.
    pair.outbox.add([point()])
    pair.drop()
    pair.connect()
    pair.book.durable = pair.book.submitted = 4  # e.g. a hub that saved more than this device heard
    assert pair.to_hub() == [Resent(4, encode(Ack(4)))]


def test_the_hub_refuses_a_batch_and_the_ack_passes_over_it() -> None:
    pair = SessionPair()
    pair.connect()
    pair.queue()
    pair.outbox.add([point(1, v="x" * 5000)], limits=None)  # unchecked: over the hub's string limit
    pair.queue()
    events = pair.to_hub()
    assert [type(e) for e in events] == [Telemetry, Refused, Telemetry]
    refused = events[1]
    assert isinstance(refused, Refused) and (refused.error.code, refused.resolve, refused.close) == (
        ErrorCode.BAD_FIELD,
        2,
        None,
    )
    pair.make_durable()
    rejected, acked = pair.to_device()
    assert isinstance(rejected, Rejected) and (rejected.seq, rejected.code) == (2, ErrorCode.BAD_FIELD)
    assert rejected.entry is not None and pair.device.stats.rejected == 1
    assert acked == Acked(3, 2, 2)
    assert len(pair.outbox) == 0


def test_the_error_budget_closes_the_session_past_max_errors() -> None:
    pair = SessionPair(max_errors=3)
    pair.connect()
    for i in range(3):
        pair.now = float(i)
        (refused,) = pair.to_hub(["{"])
        assert isinstance(refused, Refused) and refused.close is None
    pair.now = 61.0  # the first refusal is out of the 60 s window: still within budget
    (refused,) = pair.to_hub(["[]"])
    assert isinstance(refused, Refused) and refused.close is None
    (refused,) = pair.to_hub([b"binary"])  # type: ignore[list-item]
    assert isinstance(refused, Refused) and refused.error.code == ErrorCode.BAD_FRAME
    close = refused.close
    assert close is not None and (close.code, close.error) == (CloseCode.POLICY, ErrorCode.TOO_MANY_ERRORS)
    assert pair.hub.state is SessionState.CLOSING


def test_refusals_that_keep_the_session_open() -> None:
    pair = SessionPair()
    pair.connect()
    second_hello, stranger, bad_utf8 = pair.to_hub(
        [encode(Hello()), encode(Ack(1)), '{"type":"telemetry","seq":7,"points":[{"measurement":"\udcff"}]}']
    )
    assert isinstance(second_hello, Refused) and second_hello.error.code == ErrorCode.NOT_READY
    assert isinstance(stranger, Refused) and stranger.error.code == ErrorCode.BAD_MESSAGE
    assert isinstance(bad_utf8, Refused) and (bad_utf8.error.code, bad_utf8.resolve) == (ErrorCode.BAD_JSON, 7)
    assert pair.hub.state is SessionState.OPEN
    events = pair.to_device()
    assert events[:2] == [
        HubError(ErrorCode.NOT_READY, "hello was already received"),
        HubError(ErrorCode.BAD_MESSAGE, "devices send hello, telemetry, command_ack, command_result and report only"),
    ]
    assert events[2] == Rejected(7, ErrorCode.BAD_JSON, "text is not valid UTF-8", None)  # not pending here


# ---------------------------------------------------------------------------- commands


def test_a_command_is_acked_run_once_and_answered_before_telemetry() -> None:
    pair = SessionPair()
    pair.connect()
    command = Command("c1", "reboot", {"now": True}, 30.0)
    assert pair.hub.offer(command)
    pair.queue()
    (received,) = pair.to_device()
    assert received == CommandReceived(command, run=True)
    assert kinds(pair.device_frames()) == ["CommandAck", "Telemetry"]  # the answer goes first
    pair.device.command_finished(CommandResult("c1", True, {"ok": 1}))
    (answer,) = pair.to_hub()
    assert answer == CommandResult("c1", True, {"ok": 1})
    # The hub offers it again (a new session, say): acked and answered from the log, not run again.
    pair.hub.offer(command)
    assert pair.to_device() == [CommandReceived(command, run=False, answered=True)]
    assert pair.to_hub() == [CommandAck("c1"), CommandResult("c1", True, {"ok": 1})]
    stats = pair.device.stats
    assert (stats.commands_run, stats.command_repeats, stats.results_sent) == (1, 1, 2)


def test_the_hub_offers_at_most_max_offers() -> None:
    hub = HubConnection(max_offers=2)
    assert [hub.offer(Command(f"c{i}", "x", {}, 1.0)) for i in range(3)] == [True, True, False]


def test_a_command_may_skip_the_queue_only_when_the_session_is_open_and_none_waits() -> None:
    pair = SessionPair()
    assert not pair.hub.may_send_at_once()  # no welcome yet
    pair.connect()
    assert pair.hub.may_send_at_once()
    pair.hub.offer(Command("c1", "x", {}, 1.0))
    assert not pair.hub.may_send_at_once()  # c1 goes first
    assert pair.hub.next_outbound() == Command("c1", "x", {}, 1.0)
    assert pair.hub.may_send_at_once()


def test_a_result_whose_write_failed_waits_for_the_next_connection_acks_do_not() -> None:
    pair = SessionPair()
    pair.connect()
    pair.hub.offer(Command("c1", "x", {}, 1.0))
    pair.to_device()
    pair.device.command_finished(CommandResult("c1", False, error="nope"))
    assert pair.device.answers_waiting == 2 and pair.device.results_waiting == 1
    assert kinds([pair.device.next_frame()]) == ["CommandAck"]  # type: ignore[list-item]
    pair.device.frame_written()
    assert kinds([pair.device.next_frame()]) == ["CommandResult"]  # type: ignore[list-item]
    pair.drop()  # before the result was written
    pair.connect()
    assert kinds(pair.device_frames()) == ["CommandResult"]


def test_a_planned_reconnect_comes_once_the_result_is_written() -> None:
    pair = SessionPair()
    pair.connect()
    pair.hub.offer(Command("c1", "reboot", {}, 1.0))
    pair.to_device()
    pair.device.reconnect_after("c1", 2.5)
    pair.device.command_finished(CommandResult("c1", True))
    frames = []
    while isinstance(frame := pair.device.next_frame(), str):
        frames.append(frame)
        pair.device.frame_written()
    assert kinds(frames) == ["CommandAck", "CommandResult"]
    end = frame
    assert end == SessionEnd(retry_after=2.5, planned=True)
    assert pair.device.state is SessionState.CLOSING
    assert pair.device.connection_lost() == end


# ---------------------------------------------------------------------------- closes


@pytest.mark.parametrize(
    ("code", "verdict", "to_max"),
    [
        (CloseCode.REPLACED, CloseVerdict.REPLACED, True),
        (CloseCode.REVOKED, CloseVerdict.REFUSED, True),
        (CloseCode.POLICY, CloseVerdict.REFUSED, True),
        (CloseCode.PROTOCOL_ERROR, CloseVerdict.WIRE_BUG, False),
        (CloseCode.GOING_AWAY, CloseVerdict.CLOSED, False),
        (1006, CloseVerdict.CLOSED, False),
    ],
)
def test_what_a_close_means_for_reconnecting(code: int, verdict: CloseVerdict, to_max: bool) -> None:
    pair = SessionPair()
    pair.connect()
    closed = pair.device.peer_closed(code, "why")
    assert closed is not None and (closed.verdict, closed.end) == (verdict, SessionEnd(to_max=to_max))
    assert pair.device.peer_closed(code, "why") is None  # judged once per connection
    assert pair.device.connection_lost() == SessionEnd(to_max=to_max)


def test_a_batch_that_makes_the_hub_close_is_found_by_sending_one_at_a_time() -> None:
    pair = SessionPair(window=8)
    pair.connect()
    pair.queue(3)
    assert len(pair.device_frames()) == 3
    closed = pair.device.peer_closed(CloseCode.TOO_BIG, None)
    assert closed is not None and (closed.verdict, closed.inflight) == (CloseVerdict.PROBE, (1, 2, 3))
    pair.device.connection_lost()
    pair.hub = HubConnection(window=8)
    pair.connect()
    assert len(pair.to_hub()) == 1  # one at a time now
    pair.make_durable()
    pair.to_device()
    assert len(pair.device_frames()) == 1  # batch 2, alone
    closed = pair.device.peer_closed(CloseCode.TOO_BIG, None)
    assert closed is not None and closed.verdict is CloseVerdict.DROPPED and closed.dropped is not None
    assert closed.dropped.seq == 2 and closed.dropped.code == ErrorCode.TOO_LARGE
    assert [e.seq for e in pair.outbox.entries()] == [3]


def test_a_hub_close_stops_commands_not_acks() -> None:
    pair = SessionPair()
    pair.connect()
    pair.queue()
    pair.to_hub()
    pair.hub.offer(Command("c1", "x", {}, 1.0))
    pair.hub.close()
    pair.make_durable()
    assert kinds(pair.hub_frames()) == ["Ack"]


# ---------------------------------------------------------------------------- the hub's limits in the welcome


def test_the_welcome_carries_every_limit_and_the_device_keeps_them() -> None:
    hub_limits = Limits(
        max_points=10, max_fields=5, max_tags=2, max_name_len=20, max_tag_value_len=30, max_string_len=40
    )
    pair = SessionPair(hub_limits=hub_limits, max_message_bytes=5000)
    welcome = pair.connect()
    assert welcome.limits() == hub_limits and welcome.max_message_bytes == 5000
    assert pair.device.limits == hub_limits
    assert pair.outbox.max_message == 5000  # smaller than the device's own bound: the hub's applies


def test_a_welcome_from_an_older_hub_leaves_the_device_its_own_limits() -> None:
    device = DeviceConnection(Outbox(max_message=9000), CommandLog())
    device.connect(Hello())
    # What a hub without the limit fields sends: only max_points.
    old = '{"type":"welcome","device":"d1","ack":0,"epoch":1,"window":8,"max_points":50,"ping_interval":10,"proto":1}'
    assert isinstance(device.receive(old), Welcomed)
    assert device.limits == Limits(max_points=50)
    assert device.outbox.max_message == 9000


def test_an_older_device_reads_a_welcome_with_limits() -> None:
    text = encode(Welcome(DEVICE, 1, 2, 3, 4, 5.0, max_tags=2, max_message_bytes=100))
    assert '"max_tags":2' in text and "max_fields" not in text  # limits not given are not sent
    decoded = decode(text.replace("{", '{"some_future_field":[1],', 1))
    assert decoded == Welcome(DEVICE, 1, 2, 3, 4, 5.0, max_tags=2, max_message_bytes=100)
    assert decoded.limits() == Limits(max_points=4, max_tags=2)


def test_limits_are_those_of_the_latest_welcome() -> None:
    pair = SessionPair(hub_limits=Limits(max_tags=2))
    pair.connect()
    assert pair.device.limits.max_tags == 2
    pair.drop()
    pair.hub_limits = Limits()
    pair.connect()
    assert pair.device.limits == DEFAULT_LIMITS


def _paced() -> tuple[SessionPair, Callable[[int], None]]:
    """A connected pair with window 8 and acks paced 50 ms apart; and a way to make `n` more batches durable."""
    pair = SessionPair(window=8)
    pair.connect()
    pair.hub.ack_interval = 0.05

    def batches(n: int) -> None:
        pair.queue(n)
        pair.to_hub()
        pair.make_durable()

    return pair, batches


def test_acks_are_paced_while_less_than_half_the_window_waits() -> None:
    pair, batches = _paced()
    hub = pair.hub

    def ack(now: float | None) -> object:
        frame = hub.next_outbound(now)
        if isinstance(frame, str):
            pair.to_device([frame])
        return frame

    batches(1)
    assert ack(10.0) == encode_ack(1)  # the first goes at once
    batches(1)
    assert ack(10.02) is None  # held back: one ack went out 20 ms ago
    assert hub.ack_held(10.02) == pytest.approx(10.05)
    batches(2)
    assert hub.ack_held(10.03) == pytest.approx(10.05)  # three batches wait: fewer than half the window
    assert ack(10.05) == encode_ack(4)  # one cumulative ack for all three
    assert hub.ack_held(10.05) is None and ack(10.05) is None  # nothing more is due
    batches(4)
    assert ack(10.06) == encode_ack(8)  # half the window waits: at once
    batches(1)
    assert ack(None) == encode_ack(9)  # without a time (the close path): never held back
    assert pair.device.stats.points_acked == 9


def test_an_ack_written_at_once_follows_the_same_rules_as_the_outbound_tasks() -> None:
    pair, batches = _paced()
    hub = pair.hub
    assert hub.ack_at_once(1.0) is None  # nothing durable yet
    batches(1)
    assert hub.ack_at_once(1.0) == 1
    assert hub.ack_at_once(1.0) == 1  # nothing recorded until it is written
    hub.ack_written(1, 1.0)
    assert hub.ack_at_once(1.0) is None and hub.next_outbound(1.0) is None  # acked: nothing due for the task
    batches(1)
    assert hub.ack_at_once(1.02) is None and hub.ack_held(1.02) == pytest.approx(1.05)  # paced like the task's
    assert hub.ack_at_once(1.05) == 2
    command = Command(id="c-1", name="ping", args={}, timeout=30.0)
    hub.offer(command)
    assert hub.ack_at_once(1.05) is None  # a command waits: the outbound task sends it first, then the ack
    assert hub.next_outbound(1.05) == command and hub.next_outbound(1.05) == encode_ack(2)


def test_commands_are_never_held_back_by_ack_pacing() -> None:
    pair = SessionPair(window=8)
    pair.connect()
    pair.hub.ack_interval = 10.0
    pair.queue(1)
    pair.to_hub()
    pair.make_durable()
    assert pair.hub.next_outbound(0.0) == encode_ack(1)
    pair.queue(1)
    pair.to_hub()
    pair.make_durable()
    command = Command(id="c-1", name="ping", args={}, timeout=30.0)
    assert pair.hub.offer(command)
    assert pair.hub.next_outbound(1.0) == command
    assert pair.hub.next_outbound(1.0) is None and pair.hub.ack_held(1.0) == pytest.approx(10.0)
