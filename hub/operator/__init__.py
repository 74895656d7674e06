"""The operator's side of the control channel: a client library (`open_control`) and `hubctl` (`hub.operator.ctl`).

Programs use the names here; `ctl` is the command-line program, imported on its own (it is an entry point).
"""

from hub.operator._client import (
    CONTROL_PATH,
    FINAL_STATES,
    HUB_WAIT_TIMEOUT,
    TOPICS,
    AuthRefused,
    ClientError,
    ConnectFailed,
    ControlClient,
    Disconnected,
    Dropped,
    ErrorCode,
    Event,
    InsecureURLError,
    ReplyTimeout,
    RequestFailed,
    Subscription,
    control_url,
    open_control,
)

__all__ = [
    "CONTROL_PATH",
    "FINAL_STATES",
    "HUB_WAIT_TIMEOUT",
    "TOPICS",
    "AuthRefused",
    "ClientError",
    "ConnectFailed",
    "ControlClient",
    "Disconnected",
    "Dropped",
    "ErrorCode",
    "Event",
    "InsecureURLError",
    "ReplyTimeout",
    "RequestFailed",
    "Subscription",
    "control_url",
    "open_control",
]
