"""The hub's end of one device session, sans-I/O: hello, welcome, resends, the window, the error budget, acks, commands.

`DeviceSession` (hub/devices/_server.py) makes one per connection and drives it with the WebSocket, the pipeline and
trio's clock; the states and their table are in `device_client.session`. Text that was not UTF-8 on the wire reaches
`receive` with lone surrogates in it (hub/edge/_wire.py decodes it that way). A binary frame is compressed telemetry
(`device_client.compression`), taken only once the welcome agreed a scheme: inflated within the message limit, then
read exactly as that text would be.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Protocol

import attrs

from device_client.compression import choose, inflate
from device_client.protocol import (
    ANSWERS,
    DEFAULT_LIMITS,
    HANDSHAKE_ANSWER,
    INT64_MAX,
    JSON,
    LIMIT_FIELDS,
    PROTOCOL_VERSION,
    Answer,
    CloseCode,
    Command,
    CommandAck,
    CommandResult,
    Desired,
    Error,
    ErrorCode,
    Hello,
    Limits,
    Message,
    ProtocolError,
    Report,
    Telemetry,
    Welcome,
    decode,
    encode,
    encode_ack,
)
from device_client.session import Role, SessionError, SessionState, Trigger, transition
from hub.edge import has_bad_utf8
from hub.ingest import Batch

_NEVER = -math.inf  # one float for every session (an expression would make one each)

__all__ = [
    "BAD_UTF8_DETAIL",
    "ERROR_WINDOW",
    "Book",
    "Close",
    "HubConnection",
    "HubEvent",
    "Refused",
    "Resent",
    "telemetry_seq",
]

#: Refused messages count against `max_errors` for this many seconds.
ERROR_WINDOW = 60.0
#: Error detail for a text message that is not valid UTF-8 (refused as `bad_json`, with its seq when readable).
BAD_UTF8_DETAIL = "text is not valid UTF-8"
#: Longest error detail sent to a device.
MAX_DETAIL = 200


def telemetry_seq(text: str) -> int | None:
    """The seq of a telemetry message that failed to decode, when it can be read (None otherwise)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if type(obj) is not dict or obj.get("type") != "telemetry":
        return None
    seq = obj.get("seq")
    return seq if type(seq) is int and 0 < seq <= INT64_MAX else None


class Book(Protocol):
    """A device's sequence numbers, shared by its successive sessions (`hub.fleet.DeviceLedger` is one)."""

    durable: int  # every batch up to it is durable; it grows as the pipeline writes, under the session's feet
    submitted: int  # the highest seq handed to the pipeline, or refused


@attrs.define
class _NoBook:
    durable: int = 0
    submitted: int = 0


@attrs.frozen
class Resent:
    """A telemetry batch the hub has already: `ack` is the ack to send again, None if its ack is still to come."""

    seq: int
    ack: str | None


@attrs.frozen
class Close:
    """Close the connection with `code` and `reason`; first send `frame`, and count and log `error`, if given."""

    code: CloseCode
    reason: str
    error: ErrorCode | None = None
    frame: str | None = None


@attrs.frozen
class Refused:
    """A refused input: send `frame`, let the ack pass over batch `resolve` (refused for good), then `close` if set."""

    error: ProtocolError = attrs.field(eq=False)
    frame: str | None
    resolve: int | None = None
    close: Close | None = None


#: What `HubConnection.receive` returns: a message to act on, or what the session makes of it. New telemetry is a
#: `Batch` when the connection has a `read` fast path that took it, else a `Telemetry`.
HubEvent = Hello | Telemetry | Batch | Resent | CommandAck | CommandResult | Report | Refused

_HELLO, _OPEN, _CLOSING = SessionState.HELLO, SessionState.OPEN, SessionState.CLOSING


class HubConnection:
    """The hub's end of one device session: feed it each message with the time, ask it what to send.

    `receive(text, now)` returns one `HubEvent` per message: the `Hello`, a new `Telemetry` batch (submit it when
    `window_full()` is false, then call `submitted(seq)`) or the same as a `Batch` when `read` (a
    `hub.ingest.TelemetryReader`'s, which takes only what `decode` accepts) took the frame, a `Resent` batch, a
    `CommandAck`/`CommandResult` to hand to the command service, a twin `Report`, or a `Refused` input. `welcome`
    gives the welcome; `offer_desired` queues the device's desired twin document; `next_outbound` gives the next
    command offered, desired document or ack due. Refusals past `max_errors` within `error_window` seconds close the
    session (`too_many_errors`).
    """

    __slots__ = (
        "_book",
        "_desired",
        "_errors",
        "_inflight",
        "_last_ack",
        "_last_ack_at",
        "_offers",
        "_state",
        "ack_interval",
        "compress",
        "compression",
        "desired_sent",
        "error_window",
        "hello",
        "limits",
        "max_errors",
        "max_message_bytes",
        "max_offers",
        "read",
        "window",
    )

    def __init__(
        self,
        limits: Limits = DEFAULT_LIMITS,
        *,
        window: int = 64,
        max_errors: int = 10,
        max_offers: int = 200,
        error_window: float = ERROR_WINDOW,
        read: Callable[[str], Batch | None] | None = None,
        compression: bool = True,
        ack_interval: float = 0.0,
    ) -> None:
        self.limits = limits
        #: Acks `next_outbound` hands out are at least this far apart while less than half the window waits for one
        #: (cumulative acks: a later one covers what an earlier one would have; fewer frames both ways).
        self.ack_interval = ack_interval
        #: Accept a compression scheme the device offers (the hub's `server.compression`).
        self.compression = compression
        #: The compression scheme agreed in the welcome, if any: binary telemetry frames are accepted then.
        self.compress: str | None = None
        #: The largest message, inflated (set by `welcome`).
        self.max_message_bytes = 0
        self.read = read
        self.window = window
        self.max_errors = max_errors
        self.max_offers = max_offers
        self.error_window = error_window
        #: The device's hello, once accepted.
        self.hello: Hello | None = None
        self._state = SessionState.HELLO
        self._book: Book = _NoBook()
        self._inflight: list[int] = []  # seqs handed to the pipeline and maybe not durable yet, oldest first
        self._last_ack = 0
        self._last_ack_at = _NEVER  # when `next_outbound` last handed out an ack
        self._errors: list[float] = []  # times of recent refusals
        self._offers: list[Command] = []  # offered by the command service, not handed out yet
        #: The desired twin version the device has or is being sent; None: it does not use the twin (no hello yet).
        self.desired_sent: int | None = None
        self._desired: Desired | None = None  # the desired document to send, not handed out yet

    @property
    def state(self) -> SessionState:
        return self._state

    def _go(self, trigger: Trigger) -> None:
        self._state = transition(Role.HUB, self._state, trigger)

    # ------------------------------------------------------------------ handshake

    def receive(self, text: str | bytes, now: float) -> HubEvent:
        """Take one message from the device that arrived at `now` (seconds, any monotonic clock)."""
        state = self._state
        if state is _OPEN or state is _CLOSING:
            return self._receive_open(text, now)
        if state is _HELLO:
            return self._receive_hello(text)
        raise SessionError(f"hub session: nothing to receive in state {state.value!r}")

    def _receive_hello(self, text: str | bytes) -> Hello | Refused:
        if type(text) is str and has_bad_utf8(text):
            return self._refuse_hello(ProtocolError(ErrorCode.BAD_JSON, BAD_UTF8_DETAIL))
        try:
            msg = decode(text, self.limits)
        except ProtocolError as exc:
            return self._refuse_hello(exc)
        if not isinstance(msg, Hello):
            return self._refuse_hello(ProtocolError(ErrorCode.NOT_READY, "the first message must be hello"))
        if msg.proto != PROTOCOL_VERSION:
            detail = f"this hub speaks proto {PROTOCOL_VERSION}"
            return self._refuse_hello(ProtocolError(ErrorCode.UNSUPPORTED_VERSION, detail))
        self.hello = msg
        if self.compression:
            self.compress = choose(msg.compress)
        self.desired_sent = msg.desired_version
        self._go(Trigger.HELLO)
        return msg

    def _refuse_hello(self, exc: ProtocolError) -> Refused:
        self._go(Trigger.CLOSE)
        return Refused(exc, None, close=_close(exc.code, exc.detail, HANDSHAKE_ANSWER))

    def hello_timed_out(self) -> Close:
        """No hello came in time: how to close."""
        self._go(Trigger.CLOSE)
        return _close(ErrorCode.NOT_READY, "no hello in time", HANDSHAKE_ANSWER)

    def welcome(
        self,
        device: str,
        epoch: int,
        book: Book,
        inflight: list[int],
        *,
        ping_interval: float,
        max_message_bytes: int,
    ) -> str:
        """The welcome to send, with every limit the device must keep: the session is open.

        `book` and `inflight` are the device's, across its sessions.
        """
        self._go(Trigger.WELCOME)
        self._book = book
        self._inflight = inflight
        self._last_ack = book.durable
        self.max_message_bytes = max_message_bytes
        limits = {name: getattr(self.limits, name) for name in LIMIT_FIELDS}
        welcome = Welcome(
            device=device,
            ack=book.durable,
            epoch=epoch,
            window=self.window,
            ping_interval=ping_interval,
            max_message_bytes=max_message_bytes,
            compress=self.compress,
            **limits,
        )
        return encode(welcome)

    def close(self) -> None:
        """This end closes the session (replaced, revoked, idle, shutdown...): no more commands go out."""
        self._go(Trigger.CLOSE)

    def connection_lost(self) -> None:
        """The connection is over."""
        self._go(Trigger.LOST)

    # ------------------------------------------------------------------ open

    def _receive_open(self, text: str | bytes, now: float) -> HubEvent:
        binary = False
        if not isinstance(text, str):
            if self.compress is None:
                return self.refuse(ProtocolError(ErrorCode.BAD_FRAME, "binary frames are not accepted"), now)
            try:  # the bomb check, before any parse: at most max_message_bytes + 1 bytes are inflated
                data = inflate(text, self.max_message_bytes)
            except ProtocolError as exc:
                return self.refuse(exc, now)
            # As a text frame arrives (hub/edge/_wire.py): invalid UTF-8 becomes lone surrogates, refused below.
            text, binary = data.decode("utf-8", "surrogateescape"), True
        if has_bad_utf8(text):
            return self.refuse(ProtocolError(ErrorCode.BAD_JSON, BAD_UTF8_DETAIL, telemetry_seq(text)), now)
        read = self.read
        msg: Message | Batch | None = None if read is None else read(text)
        if msg is None:
            try:
                msg = decode(text, self.limits)
            except ProtocolError as exc:
                return self.refuse(exc, now)
        if binary and type(msg) is not Telemetry and type(msg) is not Batch:
            return self.refuse(ProtocolError(ErrorCode.BAD_FRAME, "only telemetry may be compressed"), now)
        if type(msg) is Telemetry or type(msg) is Batch:
            seq, book = msg.seq, self._book
            if seq > book.submitted:
                return msg
            # A resend: never written again; acked again if durable, else its ack follows when it is.
            return Resent(seq, self._ack(book.durable) if seq <= book.durable else None)
        if isinstance(msg, CommandAck | CommandResult | Report):
            return msg
        if isinstance(msg, Hello):
            return self.refuse(ProtocolError(ErrorCode.NOT_READY, "hello was already received"), now)
        detail = "devices send hello, telemetry, command_ack, command_result and report only"
        return self.refuse(ProtocolError(ErrorCode.BAD_MESSAGE, detail), now)

    def refuse(self, exc: ProtocolError, now: float, *, report: int | None = None) -> Refused:
        """Answer a refused input (`ANSWERS`; `report`: the id of a refused twin report, named in the error frame); it
        counts against the error budget, which closes the session past it."""
        answer = ANSWERS[exc.code]
        frame = encode(Error(exc.code, exc.detail[:MAX_DETAIL], exc.seq, report)) if answer.frame else None
        seq = exc.seq
        resolve = seq if seq is not None and seq > self._book.submitted else None
        errors = self._errors
        errors.append(now)
        while errors[0] < now - self.error_window:
            del errors[0]
        close = None
        if answer.close is not None:
            close = Close(answer.close, exc.code.value)
        elif len(errors) > self.max_errors:
            close = _close(ErrorCode.TOO_MANY_ERRORS, "too many refused messages", ANSWERS[ErrorCode.TOO_MANY_ERRORS])
        if close is not None:
            self._go(Trigger.CLOSE)
        return Refused(exc, frame, resolve, close)

    def window_full(self) -> bool:
        """True while `window` batches of the device wait to be durable: take no more until one is."""
        inflight = self._inflight
        if len(inflight) < self.window:
            return False
        durable = self._book.durable
        n = 0
        for seq in inflight:
            if seq > durable:
                break
            n += 1
        if n:
            del inflight[:n]
        return len(inflight) >= self.window

    @property
    def oldest_inflight(self) -> int | None:
        """The oldest batch that may not be durable yet: room opens when it is."""
        return self._inflight[0] if self._inflight else None

    @property
    def newest_inflight(self) -> int | None:
        """The newest batch handed to the pipeline that may not be durable yet."""
        return self._inflight[-1] if self._inflight else None

    def submitted(self, seq: int) -> None:
        """Batch `seq` (or the mark of a refused one) is in the pipeline."""
        self._book.submitted = seq
        self._inflight.append(seq)

    def ack_due(self) -> str | None:
        """The ack to send now, if more is durable than this session has acked (whenever it was last sent)."""
        durable = self._book.durable
        return self._ack(durable) if durable > self._last_ack else None

    def ack_held(self, now: float) -> float | None:
        """When the ack due is to go out, if `ack_interval` holds it back at `now`; None if none is held back.

        Held back: more is durable than acked, the last ack went out less than `ack_interval` ago, and fewer than
        half the window's batches wait for an ack (counted as seqs above the last ack: devices number batches one
        by one)."""
        if self._book.durable <= self._last_ack:
            return None
        at = self._last_ack_at + self.ack_interval
        if now >= at or self._book.submitted - self._last_ack >= self.window // 2:
            return None
        return at

    def _ack(self, seq: int) -> str:
        if seq > self._last_ack:
            self._last_ack = seq
        return encode_ack(seq)

    def may_send_at_once(self) -> bool:
        """A command offered now may be written at once instead of queued: the session is open and no command waits
        (commands go out in the order they are offered)."""
        return self._state is _OPEN and not self._offers

    def offer(self, command: Command) -> bool:
        """The command service offers a command to send; False when too many wait already."""
        if len(self._offers) >= self.max_offers:
            return False
        self._offers.append(command)
        return True

    def offer_desired(
        self, version: int, state: dict[str, JSON], patch: dict[str, JSON] | None = None, *, whole: bool = False
    ) -> bool:
        """The desired document is at `version` (`state`, reached by `patch` from `version` - 1 if given): queue what
        the device needs to get there. False when it needs nothing (it does not use the twin, or has it already).
        `whole`: the device's version is not the hub's (from its hello): send `state` whatever the versions."""
        sent = self.desired_sent
        if sent is None or (version <= sent and not whole):
            return False
        if whole:
            patch = None
        if patch is not None and version == sent + 1 and self._desired is None:
            self._desired = Desired(version, patch=patch)
        else:
            self._desired = Desired(version, state=state)
        self.desired_sent = version
        return True

    def ack_at_once(self, now: float) -> int | None:
        """The seq to ack, when its ack may be written at once by whoever learns that more is durable, instead of by
        the outbound task: the session open, no command or desired document waiting (they go first), and nothing
        held back (`ack_held`). Records nothing: call `ack_written` once it went out."""
        durable = self._book.durable
        if (
            self._state is not _OPEN
            or self._offers
            or self._desired is not None
            or durable <= self._last_ack
            or self.ack_held(now) is not None
        ):
            return None
        return durable

    def ack_written(self, seq: int, now: float) -> None:
        """The ack of `seq` (from `ack_at_once`) went out at `now`."""
        self._ack(seq)
        self._last_ack_at = now

    def next_outbound(self, now: float | None = None) -> Command | Desired | str | None:
        """The next command offered (commands first: their latency is seen), else the desired document due, else the
        ack due unless `ack_held(now)`, else None. Without `now`, an ack due is never held back."""
        if self._state is _OPEN:
            if self._offers:
                return self._offers.pop(0)
            if self._desired is not None:
                desired, self._desired = self._desired, None
                return desired
        if now is None:
            return self.ack_due()
        if self.ack_held(now) is not None:
            return None
        ack = self.ack_due()
        if ack is not None:
            self._last_ack_at = now
        return ack


def _close(code: ErrorCode, detail: str, answer: Answer) -> Close:
    assert answer.close is not None
    frame = encode(Error(code, detail[:MAX_DETAIL])) if answer.frame else None
    return Close(answer.close, code.value, code, frame)
