"""The control channel's vocabulary (docs/control.md): its one error family and its subscription topics.

Every refusal on the control wire is a `ControlError` whose `code` is an `ErrorCode`; `ANSWERS` says, for each code,
what the hub does besides replying with it. The requests themselves are in `hub.control` (its codec). A shared leaf:
the fleet's command service raises these errors and its subscriptions use `TOPICS`, below the control endpoint.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs

from device_client.protocol import CloseCode
from device_client.twin import TwinError

__all__ = ["ANSWERS", "TOPICS", "Answer", "ControlError", "ErrorCode", "twin_error"]

#: Subscription topics.
TOPICS = ("telemetry", "presence", "commands", "twin", "jobs")


class ErrorCode(enum.StrEnum):
    """Stable error codes of `result` frames (docs/control.md, "Error codes"); each is its wire text."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_TYPE = "unknown_type"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    INVALID_STATE = "invalid_state"
    QUEUE_FULL = "queue_full"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    BAD_COMMAND = "bad_command"
    BAD_LABEL = "bad_label"
    EXISTS = "exists"
    VERSION_CONFLICT = "version_conflict"
    TOO_LARGE = "too_large"
    BAD_PATCH = "bad_patch"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


@attrs.frozen
class Answer:
    """What the hub does with a refused request besides its error reply."""

    #: Counts towards `control.max_errors`: past it, the session is closed with 1008.
    bad_frame: bool = False
    #: Close the session with this code right after the reply.
    close: int | None = None
    #: Logged at debug level only (the first of a run is logged as a warning where it is detected).
    quiet: bool = False


#: Code -> answer; a code not listed here is not sent.
ANSWERS: Mapping[str, Answer] = {
    ErrorCode.BAD_REQUEST: Answer(bad_frame=True),
    ErrorCode.UNKNOWN_TYPE: Answer(bad_frame=True),
    ErrorCode.FORBIDDEN: Answer(),
    ErrorCode.NOT_FOUND: Answer(),
    ErrorCode.INVALID_STATE: Answer(),
    ErrorCode.QUEUE_FULL: Answer(),
    ErrorCode.TOO_MANY_SUBSCRIPTIONS: Answer(),
    ErrorCode.BAD_COMMAND: Answer(),
    ErrorCode.BAD_LABEL: Answer(),
    ErrorCode.BAD_PATCH: Answer(),
    ErrorCode.TOO_LARGE: Answer(),
    ErrorCode.VERSION_CONFLICT: Answer(),
    ErrorCode.EXISTS: Answer(),
    ErrorCode.RATE_LIMITED: Answer(quiet=True),
    ErrorCode.UNAVAILABLE: Answer(),
    ErrorCode.INTERNAL: Answer(close=CloseCode.INTERNAL),
}


class ControlError(Exception):
    """A control request refused: `code` is an `ErrorCode`, `message` is safe to show the operator.

    Raises ValueError for a code that is not an `ErrorCode`: the hub sends no other.
    """

    def __init__(self, code: str, message: str = "") -> None:
        # `str`, not `ErrorCode`: a client keeps a code it does not know (from a newer hub) as the hub sent it.
        self.code: str = ErrorCode(code)
        self.message = message
        super().__init__(f"{code}: {message}" if message else code)

    @property
    def answer(self) -> Answer:
        """What the hub does besides replying (`ANSWERS`)."""
        return ANSWERS[self.code]


def twin_error(exc: TwinError) -> ControlError:
    """The control error of a twin patch refused (`too_large`, or `bad_patch` for anything else)."""
    return ControlError(ErrorCode.TOO_LARGE if exc.reason == "too_large" else ErrorCode.BAD_PATCH, exc.detail)
