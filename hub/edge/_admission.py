"""Admission of new connections: how many handshakes may be in progress at once, and when a refused one returns.

No I/O: the listener asks `enter(address, now)` as soon as it has accepted a TCP connection, before reading a
byte, and calls `leave` when that connection's handshake is over (welcomed, refused or gone). A handshake costs
the hub a task, its buffers and CPU (TLS, HTTP, authentication, the session's start); admitting every one of a
surge at once makes them all slow, so they time out, retry and waste what was done. Past the bounds the answer is
an immediate 503 (total) or 429 (one address) with a `Retry-After` that gives each refused client its own slot in
a virtual queue drained at the rate handshakes have recently been completing: a surge is spread over the time
the hub needs for it instead of returning as one wave. Each address has a queue of its own, drained at an equal
share of that rate (for its 429s: its part of the places), so an address refused again and again (a client
hammering the hub, or a slowloris) pushes back its own slots, not everyone else's.

Answers are budgeted per address (a burst as large as a site's fleet refused at once, then a trickle) and in total:
past its budget a connection is closed unanswered and takes no slot, so a client ignoring `Retry-After` neither
costs the hub more than an accept and a close nor pushes the slots of others back, while every device of a surge
from many addresses gets its slot.
"""

from __future__ import annotations

import collections
import math

import attrs

from hub.ratelimit import Rate, TokenBucket

__all__ = ["Admission", "Refusal"]

#: Seconds over which the completion rate is measured, and how many such measurements the estimate averages. One
#: window with few completions (a garbage collection, or a wave of handshakes that all finish in the next window)
#: must not halve the pace that every client refused meanwhile gets its slot from: a slot handed out is a promise,
#: and one too late leaves the hub idle while the fleet waits (a surge took 75 s instead of about 40 that way).
RATE_WINDOW = 1.0
RATE_WINDOWS = 5
#: Handshakes per second assumed before any has completed, and the least ever assumed.
MIN_RATE = 50.0
#: The longest Retry-After handed out (seconds).
MAX_RETRY_AFTER = 60
#: Answered refusals per second in total, and per address (with the burst an address may use at once).
ANSWERS_PER_SECOND = 5000.0
ADDRESS_ANSWERS = Rate(per_second=10.0, burst=300)
#: Seconds between sweeps that forget drained per-address queues and refilled answer budgets.
PRUNE_EVERY = 0.5
#: The least share of the rate an address's queue drains at (handshakes per second).
MIN_SHARE = 1.0


@attrs.frozen
class Refusal:
    """Why a connection was refused before its handshake: HTTP status, reason code, seconds to come back after.

    `answered` False: past the budget of answers per second, the connection is closed without one (and holds no
    place in the queue: `retry_after` is 0).
    """

    status: int
    reason: str
    retry_after: int
    answered: bool = True


class Admission:
    """Counts handshakes in progress, in total and per address (0: no per-address bound)."""

    def __init__(
        self,
        max_pending: int,
        max_pending_per_address: int = 0,
        answers_per_second: float = ANSWERS_PER_SECOND,
        address_answers: Rate = ADDRESS_ANSWERS,
    ) -> None:
        if max_pending < 1 or max_pending_per_address < 0 or answers_per_second <= 0:
            raise ValueError("need max_pending >= 1, max_pending_per_address >= 0, answers_per_second > 0")
        self.max_pending = max_pending
        self.max_pending_per_address = max_pending_per_address
        self.pending = 0
        self.refused = 0  # connections refused since start
        self.unanswered = 0  # of those, closed without an answer
        self.evicted = 0  # slow handshakes closed by the listener to make room for a newcomer
        self._answers = TokenBucket(Rate(answers_per_second, answers_per_second), 0.0)
        self._address_answers_rate = address_answers
        self._address_answers: dict[str, TokenBucket] = {}
        self._by_address: dict[str, int] = {}
        self._rate = max(MIN_RATE, float(max_pending))  # completed handshakes per second, measured
        self._measured = collections.deque([self._rate], maxlen=RATE_WINDOWS)  # the last windows' rates
        self._window_start = -math.inf
        self._window_done = 0
        self._window_refused = 0
        self._address_queue_end: dict[str, float] = {}  # per address: when its virtual queue of refused clients ends
        self._pruned = -math.inf

    @property
    def rate(self) -> float:
        """Handshakes per second the hub has recently completed (the pace of the virtual queue)."""
        return self._rate

    def enter(self, address: str, now: float) -> Refusal | None:
        """Count a new connection from `address`; a `Refusal` (nothing counted) when past a bound."""
        if self.pending >= self.max_pending:
            if not self._may_answer(address, now):
                return self._unanswered(503, "busy")
            # Each address with clients waiting drains at an equal share of the rate: the shares add up to the rate
            # (a surge comes back at the pace the hub completes handshakes), and an address that is refused again
            # and again lengthens its own queue, not those of others.
            share = self._rate / max(1, len(self._address_queue_end))
            return self._refuse(503, "busy", self._slot(address, now, share) - now)
        per_address = self.max_pending_per_address
        count = self._by_address.get(address, 0)
        if per_address and count >= per_address:
            if not self._may_answer(address, now):
                return self._unanswered(429, "address_busy")
            share = self._rate * per_address / self.max_pending  # its part of the places, its part of the rate
            return self._refuse(429, "address_busy", self._slot(address, now, share) - now)
        self.pending += 1
        self._by_address[address] = count + 1
        return None

    def _slot(self, address: str, now: float, share: float) -> float:
        """When the client just refused from `address` may come back: the end of its address's queue, one later."""
        queue = self._address_queue_end
        queue[address] = end = self._next_slot(queue.get(address, -math.inf), now, max(MIN_SHARE, share))
        return end

    def _may_answer(self, address: str, now: float) -> bool:
        """Whether a refusal of `address` gets an answer (taking it from both budgets) or is closed unanswered."""
        if now - self._pruned >= PRUNE_EVERY:
            self._pruned = now
            self._prune(now)
        bucket = self._address_answers.get(address)
        if bucket is None:
            bucket = self._address_answers[address] = TokenBucket(self._address_answers_rate, now)
        return bucket.try_take(1, now) and self._answers.try_take(1, now)

    def _prune(self, now: float) -> None:
        """Forget per-address queues that are drained and answer budgets that are full again."""
        queue = self._address_queue_end
        for gone in [a for a, end in queue.items() if end < now]:
            del queue[gone]
        budgets = self._address_answers
        for gone in [a for a, bucket in budgets.items() if bucket.full(now)]:
            del budgets[gone]

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
                # A window with refusals measures capacity (there was more to do than got done); a quiet one only
                # shows the hub can go at least that fast.
                if self._window_refused or measured > self._rate:
                    self._measured.append(measured)
                    self._rate = max(MIN_RATE, sum(self._measured) / len(self._measured))
            self._window_start, self._window_done, self._window_refused = now, 0, 0
        self._window_done += 1

    @staticmethod
    def _next_slot(queue_end: float, now: float, rate: float) -> float:
        """The end of a virtual queue drained at `rate` per second, after one more client joins it (at most full)."""
        return min(max(queue_end, now) + 1.0 / rate, now + MAX_RETRY_AFTER)

    def _unanswered(self, status: int, reason: str) -> Refusal:
        self.refused += 1
        self.unanswered += 1
        self._window_refused += 1
        return Refusal(status, reason, 0, answered=False)

    def _refuse(self, status: int, reason: str, wait: float) -> Refusal:
        self.refused += 1
        self._window_refused += 1
        # Rounding must not push a slot's last client into the next second.
        retry_after = min(MAX_RETRY_AFTER, max(1, math.ceil(wait - 1e-9)))
        return Refusal(status, reason, retry_after)
