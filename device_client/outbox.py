"""The device's durable state: the telemetry outbox, the command log and the twin (sans-I/O, optionally on SQLite)."""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections import OrderedDict
from types import TracebackType
from typing import Any

import attrs

from device_client.protocol import (
    DEFAULT_LIMITS,
    INT64_MAX,
    JSON,
    ErrorCode,
    Limits,
    Point,
    ProtocolError,
    Telemetry,
    encode,
    validate_points,
)
from device_client.twin import compose

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "TOO_LARGE",
    "CommandLog",
    "Entry",
    "Outbox",
    "OutboxFull",
    "PendingReport",
    "TwinLog",
    "check_points",
]

#: Largest encoded telemetry message (characters) the outbox accepts: the hub's default `max_message_bytes`.
DEFAULT_MAX_MESSAGE = 262_144
#: Error code for a batch whose encoded message is over the size limit (the hub closes with 1009 for those).
TOO_LARGE = ErrorCode.TOO_LARGE


class OutboxFull(Exception):
    """The outbox holds its maximum of batches or bytes; wait for acks or drop the batch."""


@attrs.frozen
class Entry:
    """One queued telemetry batch: its sequence number, the encoded message text and its point count."""

    seq: int
    text: str
    points: int


def _stored_text(raw: bytes) -> str:
    # SQLite hands back whatever bytes a TEXT column holds; a row that is not UTF-8 must not stop the device.
    return raw.decode("utf-8", "surrogateescape")


def _is_utf8(text: str) -> bool:
    """False for text read from bytes that were not UTF-8 (they became lone surrogates)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_points(points: object, limits: Limits = DEFAULT_LIMITS) -> list[Point]:
    """Validate points as the hub will (in place: a missing `tags` becomes `{}`), and refuse NaN/infinity."""
    checked = validate_points(points, limits)  # `points` itself
    for p in checked:
        for key, value in p["fields"].items():
            if type(value) is float and not math.isfinite(value):
                raise ProtocolError(ErrorCode.BAD_FIELD, f"field {key!r} is NaN or infinite")
    return checked


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (seq INTEGER PRIMARY KEY, points INTEGER NOT NULL, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Outbox:
    """Batches not yet acked, in sequence order, plus what is in flight on the current connection.

    Plain state, no I/O except the optional SQLite file: `add` numbers and encodes a batch,
    `take(window)` hands out what to (re)send, `ack`/`reject`/`welcome` drop what is done,
    `reset_inflight` forgets the connection. With `path`, entries and the sequence counter
    are committed (WAL, synchronous=FULL) before a method returns, so a reboot loses nothing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        max_batches: int = 1000,
        max_bytes: int | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        if max_batches < 1:
            raise ValueError("max_batches must be at least 1")
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self.max_message = max_message
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._bytes = 0
        self._last_seq = 0
        self._acked = 0
        self._cursor = 0  # highest seq handed out by take() on this connection
        self._inflight = 0  # entries with seq <= _cursor
        self._sent_max = 0  # highest seq ever handed out (resend detection)
        self._db: sqlite3.Connection | None = None
        #: Entries found on disk that are not UTF-8 text (so no hub could take them): dropped from the file at open.
        self.unreadable: list[Entry] = []
        if path is not None:
            self._open(path)

    # ------------------------------------------------------------------ persistence

    def _open(self, path: str | os.PathLike[str]) -> None:
        db = sqlite3.connect(os.fspath(path))
        db.text_factory = _stored_text
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            meta = dict(db.execute("SELECT key, value FROM meta"))
            for seq, points, text in db.execute("SELECT seq, points, text FROM entries ORDER BY seq"):
                if not _is_utf8(text):
                    self.unreadable.append(Entry(seq, text, points))
                    continue
                self._entries[seq] = Entry(seq, text, points)
                self._bytes += len(text)
            if self.unreadable:
                with db:
                    db.executemany("DELETE FROM entries WHERE seq = ?", [(e.seq,) for e in self.unreadable])
        except BaseException:
            db.close()
            raise
        self._db = db
        last_entry = max([0, *self._entries, *(e.seq for e in self.unreadable)])
        self._last_seq = max(meta.get("last_seq", 0), last_entry)
        self._acked = meta.get("acked", 0)
        # Entries found on disk may have reached the hub before the restart: count them as resends.
        self._sent_max = last_entry

    def _commit(self, sql: str, args: tuple[object, ...], **meta: int) -> None:
        if self._db is None:
            return
        with self._db:
            if sql:
                self._db.execute(sql, args)
            self._db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(meta.items()))

    def close(self) -> None:
        """Close the SQLite file, if any (the in-memory state stays readable)."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ state

    @property
    def last_seq(self) -> int:
        """The highest sequence number used or acked so far; the next batch gets `last_seq + 1`."""
        return self._last_seq

    @property
    def acked(self) -> int:
        """The highest cumulative ack seen."""
        return self._acked

    @property
    def sent_max(self) -> int:
        """The highest sequence number ever handed out by `take` (or found on disk at open)."""
        return self._sent_max

    @property
    def inflight(self) -> int:
        """How many pending batches were sent on the current connection and are not acked yet."""
        return self._inflight

    @property
    def bytes(self) -> int:
        """Total length of the pending encoded messages."""
        return self._bytes

    @property
    def full(self) -> bool:
        """True when `add` would raise `OutboxFull`."""
        if len(self._entries) >= self.max_batches:
            return True
        return self.max_bytes is not None and bool(self._entries) and self._bytes >= self.max_bytes

    @property
    def first_seq(self) -> int | None:
        """The lowest pending sequence number, or None when the outbox is empty."""
        return next(iter(self._entries)) if self._entries else None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, seq: object) -> bool:
        return seq in self._entries

    def entries(self) -> list[Entry]:
        """The pending entries in sequence order."""
        return list(self._entries.values())

    def inflight_seqs(self) -> list[int]:
        """Sequence numbers sent on the current connection and still pending."""
        out = []
        for seq in self._entries:
            if seq > self._cursor:
                break
            out.append(seq)
        return out

    def pending_upto(self, seq: int) -> bool:
        """True while some batch with sequence <= `seq` is neither acked nor rejected."""
        first = self.first_seq
        return first is not None and first <= seq

    # ------------------------------------------------------------------ transitions

    def add(self, points: list[Point], *, limits: Limits | None = DEFAULT_LIMITS) -> int:
        """Number, encode and store one batch; return its seq.

        Validates with `limits` first (pass None when the points are already checked).
        Raises `ProtocolError` for bad points or an encoded message over `max_message`
        (code `too_large`), `OutboxFull` when full.
        """
        if limits is not None:
            check_points(points, limits)
        if self.full:
            raise OutboxFull(f"outbox holds {len(self._entries)} batches, {self._bytes} bytes")
        seq = self._last_seq + 1
        if seq > INT64_MAX:
            raise OverflowError("sequence numbers exhausted")
        try:
            text = encode(Telemetry(seq, points))
        except ValueError as exc:  # NaN or infinity slipped past an unchecked add
            raise ProtocolError(ErrorCode.BAD_FIELD, "a field is NaN or infinite") from exc
        if len(text) > self.max_message:
            raise ProtocolError(TOO_LARGE, f"encoded batch is {len(text)} characters, over {self.max_message}")
        self._commit("INSERT INTO entries (seq, points, text) VALUES (?, ?, ?)", (seq, len(points), text), last_seq=seq)
        self._entries[seq] = Entry(seq, text, len(points))
        self._bytes += len(text)
        self._last_seq = seq
        return seq

    def ack(self, seq: int) -> list[Entry]:
        """Cumulative ack: drop and return every pending entry with sequence <= `seq`."""
        if seq <= self._acked and not self.pending_upto(seq):
            return []
        self._commit(
            "DELETE FROM entries WHERE seq <= ?",
            (seq,),
            acked=max(self._acked, seq),
            last_seq=max(self._last_seq, seq),
        )
        self._acked = max(self._acked, seq)
        self._last_seq = max(self._last_seq, seq)
        done = []
        while self._entries:
            first = next(iter(self._entries))
            if first > seq:
                break
            done.append(self._drop(first))
        return done

    def reject(self, seq: int) -> Entry | None:
        """Drop the batch the hub refused for good; return it (None if it was not pending)."""
        if seq not in self._entries:
            return None
        self._commit("DELETE FROM entries WHERE seq = ?", (seq,))
        return self._drop(seq)

    def welcome(self, ack: int) -> list[Entry]:
        """Apply a `Welcome`: drop entries the hub already holds; new batches get numbers above `ack`."""
        return self.ack(ack)

    def take(self, window: int) -> list[Entry]:
        """The next entries to send, in order, so that at most `window` are in flight; marks them sent."""
        room = window - self._inflight
        if room <= 0:
            return []
        out = []
        for seq, entry in self._entries.items():
            if seq <= self._cursor:
                continue
            out.append(entry)
            if len(out) == room:
                break
        if out:
            self._cursor = out[-1].seq
            self._inflight += len(out)
            self._sent_max = max(self._sent_max, self._cursor)
        return out

    def reset_inflight(self) -> None:
        """The connection is gone: every pending entry is to be sent again."""
        self._cursor = 0
        self._inflight = 0

    def _drop(self, seq: int) -> Entry:
        entry = self._entries.pop(seq)
        self._bytes -= len(entry.text)
        if seq <= self._cursor:
            self._inflight -= 1
        return entry


# ---------------------------------------------------------------------------- commands


def _open_table(path: str | os.PathLike[str], schema: str, query: str) -> tuple[sqlite3.Connection, list[Any]]:
    """The outbox file opened (WAL, every commit synced) with `schema` made, and the rows of `query`."""
    db = sqlite3.connect(os.fspath(path))
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(schema)
        return db, db.execute(query).fetchall()
    except BaseException:
        db.close()
        raise


_COMMANDS_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (id TEXT PRIMARY KEY, result TEXT NOT NULL, sent INTEGER NOT NULL);
"""


class CommandLog:
    """Recent command ids with their encoded `command_result` messages, oldest first, about `limit` of them.

    Plain state like `Outbox`: `begin` marks a new id running, `finish` stores its
    result, `mark_sent` notes that the result was written to a connection, `unsent`
    lists the results still to send. With `path` (the outbox file is a good place),
    finished results and their sent flag are committed to the table `commands` before a
    method returns, so after a reboot a command the hub sends again is answered, not
    run again. Running ids live in memory only. Past `limit`, the oldest finished and
    sent records are forgotten.
    """

    NEW = "new"
    RUNNING = "running"
    DONE = "done"

    def __init__(self, path: str | os.PathLike[str] | None = None, *, limit: int = 1000) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._results: OrderedDict[str, str | None] = OrderedDict()  # None while running
        self._unsent: dict[str, None] = {}  # ids of finished results not written yet, in order
        self._db: sqlite3.Connection | None = None
        if path is not None:
            self._open(path)

    def _open(self, path: str | os.PathLike[str]) -> None:
        db, rows = _open_table(path, _COMMANDS_SCHEMA, "SELECT id, result, sent FROM commands ORDER BY rowid")
        self._db = db
        for cid, text, sent in rows:
            self._results[cid] = text
            if not sent:
                self._unsent[cid] = None
        self._evict()

    def close(self) -> None:
        """Close the SQLite file, if any (the in-memory state stays readable)."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> CommandLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._results)

    def __contains__(self, cid: object) -> bool:
        return cid in self._results

    def status(self, cid: str) -> str:
        """`NEW` for an id not in the log, `RUNNING` while its handler runs, `DONE` once it has a result."""
        if cid not in self._results:
            return self.NEW
        return self.RUNNING if self._results[cid] is None else self.DONE

    def result(self, cid: str) -> str | None:
        """The encoded result of a finished command, else None."""
        return self._results.get(cid)

    def unsent(self) -> list[tuple[str, str]]:
        """(id, encoded result) of the finished commands whose result was not written yet, oldest first."""
        out = []
        for cid in self._unsent:
            text = self._results.get(cid)
            if text is not None:
                out.append((cid, text))
        return out

    def begin(self, cid: str) -> None:
        """Record a new command as running."""
        if cid in self._results:
            raise ValueError(f"command {cid!r} is already in the log")
        self._results[cid] = None
        self._evict()

    def finish(self, cid: str, text: str) -> None:
        """Store the encoded result of a command (committed to the file, if any), not sent yet."""
        self._commit("INSERT OR REPLACE INTO commands (id, result, sent) VALUES (?, ?, 0)", (cid, text))
        self._results[cid] = text
        self._unsent[cid] = None
        self._evict()

    def abandon(self, cid: str) -> None:
        """Forget a running command that will give no result (its handler was cancelled)."""
        if self._results.get(cid, "") is None:
            del self._results[cid]

    def mark_sent(self, cid: str) -> None:
        """The result of `cid` was written to a connection: it is not sent again unless asked for."""
        if cid in self._unsent:
            self._commit("UPDATE commands SET sent = 1 WHERE id = ?", (cid,))
            del self._unsent[cid]

    def _evict(self) -> None:
        extra = len(self._results) - self.limit
        if extra <= 0:
            return
        gone = []
        for cid, text in self._results.items():
            if text is not None and cid not in self._unsent:
                gone.append(cid)
                if len(gone) == extra:
                    break
        if gone:
            if self._db is not None:
                with self._db:
                    self._db.executemany("DELETE FROM commands WHERE id = ?", [(cid,) for cid in gone])
            for cid in gone:
                del self._results[cid]

    def _commit(self, sql: str, args: tuple[object, ...]) -> None:
        if self._db is not None:
            with self._db:
                self._db.execute(sql, args)


# ---------------------------------------------------------------------------- twin

_TWIN_SCHEMA = """
CREATE TABLE IF NOT EXISTS twin (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@attrs.frozen
class PendingReport:
    """A twin report not acknowledged yet: merge `patch` into the reported document, say `desired_version`."""

    id: int
    patch: dict[str, JSON]
    desired_version: int | None = None


class TwinLog:
    """The device's side of its twin: the desired document it applied (and its version) and the reports the hub has
    not acknowledged, oldest first.

    Plain state like `Outbox`. `report` queues a patch, folding it into the newest pending report when one merge patch
    can do both (`device_client.twin.compose`), so a device offline for long keeps a short queue; `acked(id)` drops
    the reports up to `id`. With `path` (the outbox file), every change is committed to the table `twin` before a
    method returns: after a reboot the device still knows its desired document and resends what was not acknowledged.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.desired: dict[str, JSON] = {}
        self.desired_version = 0
        self._reports: list[PendingReport] = []
        self._next_id = 1
        self._db: sqlite3.Connection | None = None
        if path is not None:
            self._open(path)

    def _open(self, path: str | os.PathLike[str]) -> None:
        db, rows = _open_table(path, _TWIN_SCHEMA, "SELECT key, value FROM twin")
        stored = dict(rows)
        self._db = db
        if "desired" in stored:
            self.desired = json.loads(stored["desired"])
            self.desired_version = int(stored["desired_version"])
        if "reports" in stored:
            self._reports = [PendingReport(r[0], r[1], r[2]) for r in json.loads(stored["reports"])]
            self._next_id = int(stored["next_id"])

    def close(self) -> None:
        """Close the SQLite file, if any (the in-memory state stays readable)."""
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def newest_id(self) -> int:
        """The id of the newest pending report (0 when none is pending)."""
        return self._reports[-1].id if self._reports else 0

    @property
    def pending(self) -> list[PendingReport]:
        """The reports not acknowledged yet, oldest first."""
        return list(self._reports)

    def apply_desired(self, version: int, doc: dict[str, JSON]) -> None:
        """The device now holds desired document `doc` at `version`."""
        self.desired, self.desired_version = doc, version
        self._save(desired=json.dumps(doc), desired_version=str(version))

    def report(self, patch: dict[str, JSON], desired_version: int | None = None) -> PendingReport:
        """Queue a report (it may be folded into the newest pending one, which then gets a new id); the report."""
        reports = self._reports
        last = reports[-1] if reports else None
        merged = None if last is None else compose(last.patch, patch)
        if last is not None and merged is not None:
            applied = desired_version if desired_version is not None else last.desired_version
            reports[-1] = PendingReport(self._next_id, merged, applied)
        else:
            reports.append(PendingReport(self._next_id, dict(patch), desired_version))
        self._next_id += 1
        self._save_reports()
        return reports[-1]

    def acked(self, report_id: int) -> int:
        """The hub stored the reports up to `report_id`: forget them; how many were forgotten."""
        keep = [r for r in self._reports if r.id > report_id]
        gone = len(self._reports) - len(keep)
        if gone:
            self._reports = keep
            self._save_reports()
        return gone

    def drop(self, report_id: int) -> PendingReport | None:
        """The hub refused report `report_id` for good: forget it; the report, if it was pending."""
        for i, r in enumerate(self._reports):
            if r.id == report_id:
                del self._reports[i]
                self._save_reports()
                return r
        return None

    def _save_reports(self) -> None:
        rows = [[r.id, r.patch, r.desired_version] for r in self._reports]
        self._save(reports=json.dumps(rows), next_id=str(self._next_id))

    def _save(self, **values: str) -> None:
        if self._db is not None:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO twin (key, value) VALUES (?, ?)", list(values.items()))
