"""The edge: one TCP listener for every WebSocket endpoint (device and control).

It admits connections before any WebSocket work (`_admission`, `_listener`), runs the shared handshake checks and
refusals and counts sessions (`_edge`), loads and reloads the TLS certificate (`_tls`), opens ports several
processes share (`_sockets`, SO_REUSEPORT), patches each connection's handling of malformed frames (`_wire`), and
lets a session read its own socket (`_direct`). An endpoint receives an accepted connection and its `Identity`.
"""

from hub.edge._direct import DirectReader
from hub.edge._edge import Edge, Endpoint, Identity, Ticket, Unavailable
from hub.edge._listener import reason_phrase
from hub.edge._sockets import bind_shared, open_shared_listeners
from hub.edge._tls import ServerTLS, TLSError, certificate_fingerprint, check_tls_files
from hub.edge._wire import (
    PARSE_FAILURE_REASONS,
    close_stream,
    has_bad_utf8,
    parse_failure,
    send_now,
)

__all__ = [
    "PARSE_FAILURE_REASONS",
    "DirectReader",
    "Edge",
    "Endpoint",
    "Identity",
    "ServerTLS",
    "TLSError",
    "Ticket",
    "Unavailable",
    "bind_shared",
    "certificate_fingerprint",
    "check_tls_files",
    "close_stream",
    "has_bad_utf8",
    "open_shared_listeners",
    "parse_failure",
    "reason_phrase",
    "send_now",
]
