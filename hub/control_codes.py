"""Names of the control channel shared by the server and its clients (docs/control.md): error codes, topics, states."""

__all__ = ["COMMAND_FINAL_STATES", "TOPICS", "ErrorCode"]

#: Subscription topics.
TOPICS = ("telemetry", "presence", "commands")
#: Command states after which nothing changes.
COMMAND_FINAL_STATES = frozenset({"succeeded", "failed", "expired", "timed_out", "cancelled"})

class ErrorCode:
    """Stable error codes of `result` frames (see docs/control.md)."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_TYPE = "unknown_type"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    INVALID_STATE = "invalid_state"
    QUEUE_FULL = "queue_full"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    BAD_COMMAND = "bad_command"
    EXISTS = "exists"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"
