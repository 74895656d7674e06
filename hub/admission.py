"""Admission of new connections: how many handshakes may be in progress at once, and when a refused one returns.

No I/O: the listener asks `enter(address, now)` as soon as it has accepted a TCP connection, before reading a
byte, and calls `leave` when that connection's handshake is over (welcomed, refused or gone). A handshake costs
the hub a task, its buffers and CPU (TLS, HTTP, authentication, the session's start); admitting every one of a
surge at once makes them all slow, so they time out, retry and waste what was done. Past the bounds the answer is
an immediate 503 (total) or 429 (one address) with a `Retry-After` that gives each refused client its own slot in
a virtual queue drained at the rate handshakes have recently been completing: a surge is spread over the time
the hub needs for it instead of returning as one wave.
"""

from __future__ import annotations

import math

import attrs

__all__ = ["Admission", "Refusal"]

#: Seconds over which the completion rate is measured.
RATE_WINDOW = 1.0
#: Handshakes per second assumed before any has completed, and the least ever assumed.
MIN_RATE = 50.0
#: The longest Retry-After handed out (seconds).
MAX_RETRY_AFTER = 60


@attrs.frozen
class Refusal:
    """Why a connection was refused before its handshake: HTTP status, reason code, seconds to come back after."""

    status: int
    reason: str
    retry_after: int


class Admission:
    """Counts handshakes in progress, in total and per address (0: no per-address bound)."""

    def __init__(self, max_pending: int, max_pending_per_address: int = 0) -> None:
        if max_pending < 1 or max_pending_per_address < 0:
            raise ValueError("need max_pending >= 1 and max_pending_per_address >= 0")
        self.max_pending = max_pending
        self.max_pending_per_address = max_pending_per_address
        self.pending = 0
        self.refused = 0  # connections refused since start
        self._by_address: dict[str, int] = {}
        self._rate = max(MIN_RATE, float(max_pending))  # completed handshakes per second, measured
        self._window_start = -math.inf
        self._window_done = 0
        self._queue_end = -math.inf  # when the virtual queue of refused clients is drained

    @property
    def rate(self) -> float:
        """Handshakes per second the hub has recently completed (the pace of the virtual queue)."""
        return self._rate

    def enter(self, address: str, now: float) -> Refusal | None:
        """Count a new connection from `address`; a `Refusal` (nothing counted) when past a bound."""
        if self.pending >= self.max_pending:
            return self._refuse(503, "busy", now)
        per_address = self.max_pending_per_address
        count = self._by_address.get(address, 0)
        if per_address and count >= per_address:
            return self._refuse(429, "address_busy", now)
        self.pending += 1
        self._by_address[address] = count + 1
        return None

    def leave(self, address: str, now: float, *, completed: bool) -> None:
        """The handshake of a connection `enter` admitted is over; `completed`: it became a session."""
        self.pending -= 1
        left = self._by_address[address] - 1
        if left:
            self._by_address[address] = left
        else:
            del self._by_address[address]
        if completed:
            self._count_completed(now)

    def _count_completed(self, now: float) -> None:
        if now - self._window_start >= RATE_WINDOW:
            if self._window_start > -math.inf:
                measured = self._window_done / (now - self._window_start)
                # Only a busy window measures capacity: a quiet one says nothing about how fast the hub can go.
                if self.pending >= self.max_pending // 2 or measured > self._rate:
                    self._rate = max(MIN_RATE, (self._rate + measured) / 2)
            self._window_start, self._window_done = now, 0
        self._window_done += 1

    def _refuse(self, status: int, reason: str, now: float) -> Refusal:
        self.refused += 1
        self._queue_end = max(self._queue_end, now) + 1.0 / self._rate
        wait = self._queue_end - now - 1e-9  # rounding must not push a slot's last client into the next
        retry_after = min(MAX_RETRY_AFTER, max(1, math.ceil(wait)))
        return Refusal(status, reason, retry_after)
