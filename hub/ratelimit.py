"""Token buckets for the hub's rate limits (per device: messages and points; per operator: requests); no I/O."""

from __future__ import annotations

import attrs

__all__ = ["DeviceRate", "Rate", "Throttle", "TokenBucket", "Verdict"]


def _positive(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


@attrs.frozen
class Rate:
    """A sustained rate (tokens per second) and the burst a full bucket allows."""

    per_second: float = attrs.field(validator=_positive)
    burst: float = attrs.field(validator=_positive)


class TokenBucket:
    """`rate.burst` tokens, refilled at `rate.per_second`; time is passed in (any monotonic clock, in seconds).

    `take` may leave the bucket in debt (the caller waits the debt off), `try_take` never does.
    """

    __slots__ = ("_stamp", "burst", "per_second", "tokens")

    def __init__(self, rate: Rate, now: float) -> None:
        self.per_second = rate.per_second
        self.burst = float(rate.burst)
        self.tokens = self.burst
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.per_second)
            self._stamp = now

    def take(self, n: float, now: float) -> float:
        """Take `n` tokens, into debt if need be; the seconds until the debt is paid off (0.0 when none)."""
        self._refill(now)
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.per_second

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled to its burst (a bucket in this state is as good as a new one)."""
        self._refill(now)
        return self.tokens >= self.burst

    def try_take(self, n: float, now: float) -> bool:
        """Take `n` tokens if the bucket holds them; False (and nothing taken) otherwise."""
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


class DeviceRate:
    """The message and point buckets of one device, kept across its sessions (a reconnect refills nothing)."""

    __slots__ = ("messages", "points")

    def __init__(self, messages: Rate, points: Rate, now: float) -> None:
        self.messages = TokenBucket(messages, now)
        self.points = TokenBucket(points, now)

    def charge(self, messages: int, points: int, now: float) -> float:
        """Charge one reading's cost; the seconds to stop reading from the device so that it keeps to both rates."""
        wait = self.messages.take(messages, now)
        if points:
            wait = max(wait, self.points.take(points, now))
        return wait


@attrs.frozen
class Verdict:
    """What a session does after charging a message: wait `delay` s before reading on, and maybe more."""

    delay: float = 0.0
    started: bool = False  # a throttle episode began with this message: tell the device once
    persistent: bool = False  # throttled without a break for longer than `close_after`: close the session


NOT_THROTTLED = Verdict()


class Throttle:
    """One session's view of its device's rate: throttle episodes and when one has lasted too long.

    An episode begins with the first message that leaves a bucket in debt and ends with the first
    message that does not (the device slowed down to its rates); one lasting more than `close_after`
    seconds is persistent.
    """

    __slots__ = ("close_after", "rate", "since")

    def __init__(self, rate: DeviceRate, close_after: float) -> None:
        self.rate = rate
        self.close_after = close_after
        self.since: float | None = None  # start of the current episode

    def charge(self, messages: int, points: int, now: float) -> Verdict:
        """Charge one message (and its points) read at `now`."""
        delay = self.rate.charge(messages, points, now)
        if delay <= 0.0:
            self.since = None
            return NOT_THROTTLED
        if self.since is None:
            self.since = now
            return Verdict(delay, started=True)
        return Verdict(delay, persistent=now - self.since > self.close_after)
