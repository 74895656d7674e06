"""Session states of both ends, and the device's end of a session: pure rules, no I/O, no clock.

The theory. A session is one WebSocket connection: the device sends `hello`, the hub answers `welcome`, then
telemetry flows to the hub and acks, commands and errors flow back, until one end closes or the connection drops.
Each end holds a `SessionState` and moves it only along `TRANSITIONS`, one table for both roles; a move the table
lacks raises `SessionError`, which is always a bug of the code driving the end, never the peer's doing (what the
peer gets wrong is a `ProtocolError`, answered on the wire). The device's end lives across connections and rests in
CLOSED between them; the hub makes a new end (`hub.devices.HubConnection`) for every connection.

`DeviceConnection` holds the device's rules: the hello, what the welcome changes (acked batches, window, limits), the
window and the one-at-a-time probe after a close a batch caused, cumulative acks, refused batches, command ids run at
most once, command answers ahead of telemetry, and what each close code means for reconnecting. Feed it what arrived
(`receive`, `peer_closed`, `connection_lost`), ask it what to send (`next_frame`). `DeviceClient` is its trio driver.
"""

from __future__ import annotations

import enum
import logging
import sqlite3
from collections import deque

import attrs

from device_client.compression import deflate
from device_client.outbox import TOO_LARGE, CommandLog, Entry, Outbox, PendingReport, TwinLog
from device_client.protocol import (
    DEFAULT_LIMITS,
    JSON,
    Ack,
    CloseCode,
    Command,
    CommandAck,
    CommandResult,
    Desired,
    Error,
    ErrorCode,
    Hello,
    Limits,
    ProtocolError,
    Report,
    ReportAck,
    Welcome,
    decode,
    encode,
)
from device_client.twin import merge_patch

__all__ = [
    "CULPRIT_CLOSES",
    "TRANSITIONS",
    "Acked",
    "ClientStats",
    "CloseVerdict",
    "CommandReceived",
    "DesiredChanged",
    "DeviceConnection",
    "DeviceEvent",
    "HubError",
    "Ignored",
    "PeerClosed",
    "Rejected",
    "ReportAcked",
    "ReportRefused",
    "Role",
    "SessionEnd",
    "SessionError",
    "SessionState",
    "Trigger",
    "Welcomed",
    "transition",
]

log = logging.getLogger("device_client")

# ---------------------------------------------------------------------------- the state machine


class Role(enum.Enum):
    """Which end of a session."""

    DEVICE = "device"
    HUB = "hub"


class SessionState(enum.Enum):
    """Where one end of a session stands."""

    CLOSED = "closed"  # no connection: the device's end between connections, the hub's once the connection is over
    HELLO = "hello"  # device: hello going out, waiting for welcome; hub: waiting for hello
    WELCOMING = "welcoming"  # hub: hello accepted, the session being set up, welcome not sent yet
    OPEN = "open"  # welcome done: telemetry, acks, commands
    CLOSING = "closing"  # this end decided to close: what is already due may still go out


class Trigger(enum.Enum):
    """What moves a session end from one state to the next."""

    CONNECT = "connect"  # device: a new connection, hello to send
    HELLO = "hello"  # hub: a good hello arrived
    WELCOME = "welcome"  # hub: welcome sent; device: welcome received
    CLOSE = "close"  # this end decided to close (a refusal, a timeout, a planned reconnect, replaced, shutdown)
    LOST = "lost"  # the connection is gone


_CLOSED, _HELLO, _WELCOMING, _OPEN, _CLOSING = (
    SessionState.CLOSED,
    SessionState.HELLO,
    SessionState.WELCOMING,
    SessionState.OPEN,
    SessionState.CLOSING,
)

#: role -> state -> trigger -> next state. Nothing else is allowed.
TRANSITIONS: dict[Role, dict[SessionState, dict[Trigger, SessionState]]] = {
    Role.DEVICE: {
        _CLOSED: {Trigger.CONNECT: _HELLO},
        _HELLO: {Trigger.WELCOME: _OPEN, Trigger.LOST: _CLOSED},
        _OPEN: {Trigger.CLOSE: _CLOSING, Trigger.LOST: _CLOSED},
        _CLOSING: {Trigger.LOST: _CLOSED},
    },
    Role.HUB: {
        _HELLO: {Trigger.HELLO: _WELCOMING, Trigger.CLOSE: _CLOSING, Trigger.LOST: _CLOSED},
        _WELCOMING: {Trigger.WELCOME: _OPEN, Trigger.CLOSE: _CLOSING, Trigger.LOST: _CLOSED},
        _OPEN: {Trigger.CLOSE: _CLOSING, Trigger.LOST: _CLOSED},
        _CLOSING: {Trigger.CLOSE: _CLOSING, Trigger.LOST: _CLOSED},
        _CLOSED: {Trigger.CLOSE: _CLOSED},  # closing what is already gone changes nothing
    },
}


class SessionError(RuntimeError):
    """The driver asked a session end for something its state does not allow (a bug of the caller)."""


def transition(role: Role, state: SessionState, trigger: Trigger) -> SessionState:
    """The state after `trigger`; `SessionError` if `TRANSITIONS` has no such move."""
    try:
        return TRANSITIONS[role][state][trigger]
    except KeyError:
        raise SessionError(f"{role.value} session: no {trigger.value!r} in state {state.value!r}") from None


# ---------------------------------------------------------------------------- the device's end: results and events


@attrs.define
class ClientStats:
    """Counters of one client, updated by its session end."""

    connected: bool = False
    epoch: int = 0  # session epoch from the last Welcome
    connects: int = 0  # sessions welcomed by the hub
    reconnects: int = 0  # sessions after the first
    connect_failures: int = 0  # attempts refused before the upgrade or failing before Welcome
    batches_queued: int = 0
    points_queued: int = 0
    batches_sent: int = 0  # telemetry messages written to the socket, resends included
    resent: int = 0  # of those, messages sent before (on an earlier connection or before a restart)
    batches_acked: int = 0
    points_acked: int = 0
    rejected: int = 0  # batches the hub refused for good (dropped, never resent)
    points_rejected: int = 0
    commands_received: int = 0  # command frames from the hub, repeats included
    commands_run: int = 0  # new command ids taken on (unknown names included)
    command_repeats: int = 0  # command frames for an id already in the log: answered, not run again
    commands_succeeded: int = 0
    commands_failed: int = 0  # unknown names, raising handlers, results too large or not JSON
    results_sent: int = 0  # command_result frames written, repeats included
    compressed_sent: int = 0  # of `batches_sent`, messages sent compressed (binary frames)


@attrs.frozen
class SessionEnd:
    """How a connection ended, for the reconnect decision."""

    to_max: bool = False  # back off to the maximum: retrying fast is useless or harmful
    retry_after: float | None = None  # the hub (or a planned reconnect) said when to come back
    planned: bool = False  # we closed on purpose (`reconnect`): not a failure


@attrs.frozen
class Welcomed:
    """The hub welcomed this connection (`welcome.ack` and below are acked)."""

    welcome: Welcome


@attrs.frozen
class Acked:
    """A cumulative ack: `batches` pending batches with `points` points are done."""

    seq: int
    batches: int
    points: int


@attrs.frozen
class Rejected:
    """Batch `seq` is dropped for good; `entry` is None when it was no longer pending."""

    seq: int
    code: str
    detail: str
    entry: Entry | None


@attrs.frozen
class HubError:
    """An error frame naming no pending batch: nothing to retry (`unknown_command`: an answer was dropped)."""

    code: str
    detail: str


@attrs.frozen
class CommandReceived:
    """A command frame: a new id to run (`run`), or a repeat answered from the log (`answered`: its result again)."""

    command: Command
    run: bool
    answered: bool = False


@attrs.frozen
class DesiredChanged:
    """The hub sent a new desired twin document: `desired` at `version` is now the device's (stored already)."""

    version: int
    desired: dict[str, JSON]
    previous: dict[str, JSON]


@attrs.frozen
class ReportAcked:
    """The hub stored the twin reports up to `id`; the reported document is at `version`."""

    id: int
    version: int
    done: int  # pending reports forgotten


@attrs.frozen
class ReportRefused:
    """The hub refused twin report `report` for good (too large, too deep): it is dropped."""

    report: PendingReport | None
    code: str
    detail: str


@attrs.frozen
class Ignored:
    """A message from the hub that means nothing here: invalid, or not expected now."""

    why: str


class CloseVerdict(enum.Enum):
    """What a close by the hub means to the device."""

    REPLACED = "replaced"  # another connection took the device's place: back off
    REFUSED = "refused"  # revoked or policy: retrying fast will not help
    PROBE = "probe"  # a batch in flight may have caused it: resend them one at a time
    DROPPED = "dropped"  # the batch alone in flight caused it again: dropped
    WIRE_BUG = "wire_bug"  # the hub could not parse our frames
    CLOSED = "closed"  # anything else: reconnect with backoff


@attrs.frozen
class PeerClosed:
    """The hub closed the connection (`code` 1006: no close frame); `end` says how to reconnect."""

    code: int
    reason: str | None
    verdict: CloseVerdict
    end: SessionEnd
    inflight: tuple[int, ...] = ()  # PROBE: the batches to resend one at a time
    dropped: Rejected | None = None  # DROPPED: the batch found to cause the close


DeviceEvent = (
    Welcomed | Acked | Rejected | HubError | CommandReceived | DesiredChanged | ReportAcked | ReportRefused | Ignored
)

#: Closes that one batch in flight causes, and how such a batch is reported: (error code, why).
CULPRIT_CLOSES: dict[int, tuple[ErrorCode, str]] = {
    CloseCode.TOO_BIG: (TOO_LARGE, "message too big, a client bug"),
    # The hub answers invalid UTF-8 with bad_json and the batch's seq; a proxy in between may close instead.
    CloseCode.INVALID_DATA: (ErrorCode.BAD_JSON, "not valid UTF-8"),
}

#: The other close codes that mean something particular: (verdict, back off to the maximum).
_CLOSE_VERDICTS: dict[int, tuple[CloseVerdict, bool]] = {
    CloseCode.REPLACED: (CloseVerdict.REPLACED, True),
    CloseCode.REVOKED: (CloseVerdict.REFUSED, True),
    CloseCode.POLICY: (CloseVerdict.REFUSED, True),
    CloseCode.PROTOCOL_ERROR: (CloseVerdict.WIRE_BUG, False),
}

# ---------------------------------------------------------------------------- the device's end


class DeviceConnection:
    """The device's end of its sessions with the hub, across connections (see the module docstring).

    It owns the outbox and the command log while it lives. Per connection: `connect` gives the hello to send;
    `receive` takes each frame from the hub and returns what happened; `next_frame` gives the next frame to write
    (command answers first, then telemetry within the window), `frame_written` confirms it; `peer_closed` judges the
    hub's close; `connection_lost` ends the connection and returns how to reconnect.
    """

    def __init__(
        self,
        outbox: Outbox,
        commands: CommandLog,
        stats: ClientStats | None = None,
        *,
        name: str = "",
        limits: Limits = DEFAULT_LIMITS,
        twin: TwinLog | None = None,
    ) -> None:
        self.outbox = outbox
        self.commands = commands
        #: The device's twin, if it uses one (its hello then says the desired version it applied).
        self.twin = twin
        self._reports_sent = 0  # twin reports up to this id are written on this connection
        self.stats = ClientStats() if stats is None else stats
        #: The device name: from the token until a welcome says it.
        self.device = name
        self._base_limits = limits
        self._base_max_message = outbox.max_message
        #: The limits batches are checked against: the hub's, once a welcome said them.
        self.limits = limits
        #: The most unacked batches in flight: the hub's, once a welcome said it.
        self.window = 1
        self._state = SessionState.CLOSED
        self._end: SessionEnd | None = None
        self._probe_until = 0  # after a close a batch may have caused: one at a time up to this seq
        # Command acks and results to write, in order: (command id, text) for a result, (None, text) for an ack.
        self._answers: deque[tuple[str | None, str]] = deque(commands.unsent())
        self._ready: deque[Entry] = deque()  # taken from the outbox for this connection, not handed out yet
        self._ready_resent = 0  # entries of `_ready` up to this seq were sent before
        self._writing: Entry | tuple[str | None, str] | None = None  # handed out by next_frame, not confirmed
        self._reconnect_after: dict[str, float] = {}  # command id -> delay, once its result is written
        self._reconnect: tuple[str | None, float] | None = None  # (after this result is written | None, delay)
        self._offered: tuple[str, ...] = ()  # the compression schemes this connection's hello offered
        #: The compression scheme the hub accepted for this connection, if any: telemetry goes out deflated then.
        self.compress: str | None = None
        self._deflated = False  # the telemetry frame handed out last was compressed

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def end(self) -> SessionEnd | None:
        """How the current connection ends, once something decided it."""
        return self._end

    @property
    def answers_waiting(self) -> int:
        """Command acks and results not written yet."""
        return len(self._answers)

    @property
    def results_waiting(self) -> int:
        """Command results not written yet (they wait for the next connection if this one ends)."""
        return sum(1 for cid, _ in self._answers if cid is not None)

    def _go(self, trigger: Trigger) -> None:
        self._state = transition(Role.DEVICE, self._state, trigger)

    # ------------------------------------------------------------------ connection

    def connect(self, hello: Hello) -> str:
        """A new connection: the hello to send as soon as it is open (with the desired version, with a twin)."""
        self._go(Trigger.CONNECT)
        self._end = None
        self._offered, self.compress = hello.compress, None
        self._reports_sent = 0
        if self.twin is not None:
            hello = attrs.evolve(hello, desired_version=self.twin.desired_version)
        return encode(hello)

    def set_end(self, end: SessionEnd) -> None:
        """How this connection ends, if nothing decided it before (the first verdict stands)."""
        if self._end is None:
            self._end = end

    def peer_closed(self, code: int, reason: str | None) -> PeerClosed | None:
        """The hub closed the connection with `code` (1006: no close frame); None if its end was decided already."""
        if self._end is not None:
            return None
        if code in CULPRIT_CLOSES:
            closed = self._culprit(code, reason)
        else:
            verdict, to_max = _CLOSE_VERDICTS.get(code, (CloseVerdict.CLOSED, False))
            closed = PeerClosed(code, reason, verdict, SessionEnd(to_max=to_max))
        self._end = closed.end
        return closed

    def _culprit(self, code: int, reason: str | None) -> PeerClosed:
        # Resend the batches that were in flight one at a time; drop the one alone in flight when it happens again.
        inflight = self.outbox.inflight_seqs()
        error, why = CULPRIT_CLOSES[code]
        if self._probe_until and len(inflight) == 1:
            detail = f"the connection was closed with {code} ({reason or why})"
            dropped = self._reject(inflight[0], error, detail)
            return PeerClosed(code, reason, CloseVerdict.DROPPED, SessionEnd(), tuple(inflight), dropped)
        self._probe_until = max(inflight, default=0)
        return PeerClosed(code, reason, CloseVerdict.PROBE, SessionEnd(), tuple(inflight))

    def connection_lost(self) -> SessionEnd:
        """The connection is over: forget what was in flight on it; how to reconnect."""
        self._go(Trigger.LOST)
        end, self._end = self._end or SessionEnd(), None
        self.stats.connected = False
        self.outbox.reset_inflight()
        self._ready.clear()
        # Acks belong to their connection (the hub sends the command again); results wait for the next one.
        answers = deque(item for item in self._answers if item[0] is not None)
        writing, self._writing = self._writing, None
        if type(writing) is tuple and writing[0] is not None:
            answers.appendleft(writing)
        self._answers = answers
        if self._reconnect is not None and self._reconnect[0] is None:
            self._reconnect = None  # the connection is gone anyway
        return end

    # ------------------------------------------------------------------ from the hub

    def receive(self, text: str | bytes) -> DeviceEvent:
        """One frame from the hub. Before the welcome, a frame that is not a valid message raises `ProtocolError`."""
        state = self._state
        if state is _OPEN or state is _CLOSING:
            try:
                msg = decode(text)
            except ProtocolError as exc:
                return Ignored(f"ignoring an invalid message from the hub: {exc}")
            if isinstance(msg, Ack):
                return self._acked(msg.seq, self.outbox.ack(msg.seq))
            if isinstance(msg, Command):
                return self._command(msg)
            if isinstance(msg, Error):
                return self._error(msg)
            if isinstance(msg, Desired):
                return self._desired(msg)
            if isinstance(msg, ReportAck):
                return self._report_acked(msg)
            return Ignored(f"unexpected {type(msg).__name__} from the hub")
        if state is _HELLO:
            msg = decode(text)
            if isinstance(msg, Welcome):
                return self._welcomed(msg)
            if isinstance(msg, Error):
                return self._error(msg)
            return Ignored(f"unexpected {type(msg).__name__} before the welcome")
        raise SessionError(f"device session: nothing to receive in state {state.value!r}")

    def _welcomed(self, welcome: Welcome) -> Welcomed:
        self._go(Trigger.WELCOME)
        self.device = welcome.device or self.device
        self._acked(welcome.ack, self.outbox.welcome(welcome.ack))
        self.window = max(1, welcome.window)
        # What the hub said, else what this device would use anyway (an older hub says only max_points).
        self.limits = welcome.limits(self._base_limits)
        largest = welcome.max_message_bytes
        self.outbox.max_message = min(self._base_max_message, largest) if largest else self._base_max_message
        # Only a scheme this connection offered (a hub that names another is ignored: text it is).
        self.compress = welcome.compress if welcome.compress in self._offered else None
        stats = self.stats
        stats.connected = True
        stats.epoch = welcome.epoch
        stats.connects += 1
        if stats.connects > 1:
            stats.reconnects += 1
        return Welcomed(welcome)

    def _acked(self, seq: int, done: list[Entry]) -> Acked:
        points = 0
        if done:
            points = sum(e.points for e in done)
            self.stats.batches_acked += len(done)
            self.stats.points_acked += points
        return Acked(seq, len(done), points)

    def _error(self, error: Error) -> Rejected | HubError | ReportRefused:
        if error.report is not None and self.twin is not None:
            return ReportRefused(self.twin.drop(error.report), error.code, error.detail)
        # An unknown_command names our ack or result of a command the hub does not know (it expired there, say).
        if error.seq is None or error.code == ErrorCode.UNKNOWN_COMMAND:
            return HubError(error.code, error.detail)
        return self._reject(error.seq, error.code, error.detail)

    def _reject(self, seq: int, code: str, detail: str) -> Rejected:
        entry = self.outbox.reject(seq)
        if entry is not None:
            self._count_rejected(entry)
        return Rejected(seq, code, detail, entry)

    def discard(self, entry: Entry, code: str, detail: str) -> Rejected:
        """Count a batch dropped for good outside any session (e.g. unreadable in the outbox file)."""
        self._count_rejected(entry)
        return Rejected(entry.seq, code, detail, entry)

    def _count_rejected(self, entry: Entry) -> None:
        self.stats.rejected += 1
        self.stats.points_rejected += entry.points

    # ------------------------------------------------------------------ twin

    def _desired(self, msg: Desired) -> DesiredChanged | Ignored:
        twin = self.twin
        if twin is None:
            return Ignored("a desired document, but this device keeps no twin")
        previous = twin.desired
        if msg.state is not None:
            doc = msg.state
        elif msg.version == twin.desired_version + 1:
            doc = merge_patch(previous, msg.patch)
        else:
            return Ignored(f"desired patch to version {msg.version} does not follow version {twin.desired_version}")
        twin.apply_desired(msg.version, doc)
        return DesiredChanged(msg.version, doc, previous)

    def report(self, patch: dict[str, JSON], desired_version: int | None = None) -> PendingReport:
        """Queue a twin report (kept with the twin until the hub acknowledges it); ValueError without a twin."""
        if self.twin is None:
            raise ValueError("this device keeps no twin")
        return self.twin.report(patch, desired_version)

    def _report_acked(self, msg: ReportAck) -> ReportAcked | Ignored:
        if self.twin is None:
            return Ignored("a report_ack, but this device keeps no twin")
        return ReportAcked(msg.id, msg.version, self.twin.acked(msg.id))

    # ------------------------------------------------------------------ commands

    def _command(self, cmd: Command) -> CommandReceived:
        stats = self.stats
        stats.commands_received += 1
        self._answers.append((None, encode(CommandAck(cmd.id))))
        commands = self.commands
        if commands.status(cmd.id) == CommandLog.NEW:
            commands.begin(cmd.id)
            stats.commands_run += 1
            return CommandReceived(cmd, run=True)
        stats.command_repeats += 1
        text = commands.result(cmd.id)
        if text is not None:
            self._queue_result(cmd.id, text)
        return CommandReceived(cmd, run=False, answered=text is not None)

    def _queue_result(self, cid: str, text: str) -> None:
        # At most one copy of a result waits, and after the ack just queued for it.
        if any(item[0] == cid for item in self._answers):
            self._answers = deque(item for item in self._answers if item[0] != cid)
        self._answers.append((cid, text))

    def command_finished(self, result: CommandResult) -> None:
        """A command's handler is done: store its result and queue it (it waits for a connection if there is none)."""
        cid = result.id
        text = encode(result)
        try:
            self.commands.finish(cid, text)
        except sqlite3.Error:
            log.exception("%s: cannot store the result of command %s in the outbox file", self.device, cid)
        if result.ok:
            self.stats.commands_succeeded += 1
        else:
            self.stats.commands_failed += 1
        self._queue_result(cid, text)
        delay = self._reconnect_after.pop(cid, None)
        if delay is not None:
            self._reconnect = (cid, delay)

    def command_abandoned(self, cid: str) -> None:
        """A command's handler was cancelled: it gives no result (the hub times it out)."""
        self.commands.abandon(cid)
        self._reconnect_after.pop(cid, None)

    def reconnect_after(self, cid: str, delay: float) -> None:
        """Once the result of command `cid` is written, close the connection and reconnect after `delay` s."""
        self._reconnect_after[cid] = delay

    def request_reconnect(self, delay: float) -> bool:
        """Close once the answers queued so far are written, reconnect after `delay` s; False when not open."""
        if self._state is not _OPEN:
            return False
        self._reconnect = (None, delay)
        return True

    # ------------------------------------------------------------------ to the hub

    def next_frame(self) -> str | bytes | SessionEnd | None:
        """The next frame to write, a `SessionEnd` when this end closes now (planned), or None: nothing is due.

        Command answers go first (they are small and the hub times commands out), then twin reports, then telemetry
        within the window. Telemetry is a binary frame (bytes) when the welcome agreed compression, else text.
        """
        if self._state is not _OPEN:
            return None
        if self._answers:
            item = self._writing = self._answers.popleft()
            return item[1]
        twin = self.twin
        if twin is not None and twin.newest_id > self._reports_sent:
            for report in twin.pending:
                if report.id > self._reports_sent:
                    self._reports_sent = report.id
                    return encode(Report(report.id, report.patch, report.desired_version))
        ready, outbox = self._ready, self.outbox
        while ready:
            entry = ready.popleft()
            if entry.seq in outbox:  # not acked or rejected while the ones before it were written
                self._writing = entry
                return self._telemetry_frame(entry)
        reconnect = self._reconnect
        if reconnect is not None and reconnect[0] is None:
            self._reconnect = None
            self.set_end(SessionEnd(retry_after=reconnect[1], planned=True))
            self._go(Trigger.CLOSE)
            assert self._end is not None
            return self._end
        self._ready_resent = outbox.sent_max
        ready.extend(outbox.take(self._window_now()))
        if ready:
            entry = self._writing = ready.popleft()
            return self._telemetry_frame(entry)
        return None

    def _telemetry_frame(self, entry: Entry) -> str | bytes:
        # The outbox checked the text's length against the hub's limit, which bounds the inflated bytes of a
        # compressed message: the same figure, as `encode` writes ASCII only.
        self._deflated = self.compress is not None
        return deflate(entry.text) if self._deflated else entry.text

    def frame_written(self) -> bool:
        """The frame from `next_frame` is written; True if it was a command answer (someone may wait for those)."""
        item, self._writing = self._writing, None
        if item is None:  # a twin report
            return False
        if type(item) is Entry:
            self.stats.batches_sent += 1
            if self._deflated:
                self.stats.compressed_sent += 1
            if item.seq <= self._ready_resent:
                self.stats.resent += 1
            return False
        assert type(item) is tuple
        cid = item[0]
        if cid is not None:
            self._result_written(cid)
        return True

    def _result_written(self, cid: str) -> None:
        self.stats.results_sent += 1
        try:
            self.commands.mark_sent(cid)
        except sqlite3.Error:
            log.exception("%s: cannot mark the result of command %s as sent in the outbox file", self.device, cid)
        if self._reconnect is not None and self._reconnect[0] == cid:
            self._reconnect = (None, self._reconnect[1])

    def _window_now(self) -> int:
        if self._probe_until:
            first = self.outbox.first_seq
            if first is not None and first <= self._probe_until:
                return 1
            self._probe_until = 0
        return self.window
