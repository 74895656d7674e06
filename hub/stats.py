"""Counters the hub keeps about itself (shown in logs and the progress line, exported by `hub.ops`)."""

from __future__ import annotations

import attrs


@attrs.define
class Stats:
    """Mutable counters, updated from trio tasks only (no locking needed)."""

    connections: int = 0  # open device sessions
    connects: int = 0  # accepted device sessions since start
    refused: int = 0  # handshakes refused before the upgrade
    admission_refused: int = 0  # of those: refused unread, too many handshakes in progress (503/429 + Retry-After)
    admission_unanswered: int = 0  # of those: closed without an answer (past the hub's refusal-answer budget)
    messages_in: int = 0
    compressed_in: int = 0  # of those, binary frames: compressed telemetry (accepted or refused)
    compressed_bytes_in: int = 0  # their payload bytes, before inflating
    points_in: int = 0  # points accepted into the pipeline
    points_written: int = 0  # points written to the sink
    points_spooled: int = 0  # points appended to the spool
    points_replayed: int = 0  # points written from the spool after an outage
    points_dropped: int = 0  # lines the database refused (400/422) and we dropped
    batches_written: int = 0
    write_errors: int = 0  # failed write attempts (any cause)
    write_retries: int = 0
    spool_bytes: int = 0
    spool_full: int = 0  # times the spool was full and ingest had to wait
    acks_sent: int = 0
    resends: int = 0  # telemetry messages whose seq was already submitted
    throttled: int = 0  # throttle episodes: device sessions read more slowly for exceeding their rates
    window_waits: int = 0  # times a device session stopped reading until acks made room in its window
    requests_rate_limited: int = 0  # control requests refused with "rate_limited"
    write_seconds_sum: float = 0.0  # time spent in successful sink writes (one per batches_written)
    write_seconds_last: float = 0.0  # duration of the latest successful write
    write_seconds_peak: float = 0.0  # longest successful write since the last metrics snapshot
    batch_lines_peak: int = 0  # most lines in one successful write since the last metrics snapshot
    protocol_errors: dict[str, int] = attrs.field(factory=dict)

    def count_error(self, code: str) -> None:
        """Count one refused input under its protocol error code."""
        self.protocol_errors[code] = self.protocol_errors.get(code, 0) + 1

    def count_write(self, seconds: float, lines: int) -> None:
        """Count one successful sink write of `lines` lines that took `seconds`."""
        self.write_seconds_sum += seconds
        self.write_seconds_last = seconds
        self.write_seconds_peak = max(self.write_seconds_peak, seconds)
        self.batch_lines_peak = max(self.batch_lines_peak, lines)
