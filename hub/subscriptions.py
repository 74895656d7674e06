"""Live subscriptions of control sessions (placeholder: replaced by the control-channel work)."""

from __future__ import annotations

from typing import Any

__all__ = ["Broadcaster"]


class Broadcaster:
    """Fans hub events out to control-channel subscribers; every method is sync and never blocks."""

    def has_telemetry_subscribers(self, device: str) -> bool:
        """Whether anyone watches this device's telemetry (so the caller can skip building events)."""
        return False

    def telemetry(self, device: str, points: list[dict[str, Any]]) -> None:
        """Points just accepted from `device` (validated dicts; do not mutate them)."""

    def presence(self, summary: dict[str, Any]) -> None:
        """A device summary after a presence change."""

    def command(self, record: dict[str, Any]) -> None:
        """A command record after a state change."""
