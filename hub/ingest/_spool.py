"""A durable on-disk FIFO of line-protocol batches: CRC-checked records in segment files plus a head pointer.

Layout of the spool directory:

- `seg-<20 digits>.spool`: records, each `<u32 length><u32 crc32(payload)><payload utf-8>`, little-endian.
- `head`: `<segment number> <offset>` of the oldest unconsumed record, replaced atomically.

`append` fsyncs before it returns, so an appended batch survives a crash. A record torn by a crash
mid-append fails its length or CRC check and is cut off when the spool is opened. Methods block;
callers serialise them (the pipeline runs them one at a time in a worker thread).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

__all__ = ["Spool", "SpoolError", "SpoolFull"]

log = logging.getLogger("hub.spool")

_HEADER = struct.Struct("<II")
_SEGMENT_RE = re.compile(r"^seg-(\d{20})\.spool$")
_HEAD = "head"


class SpoolError(Exception):
    """The spool cannot be used (unreadable head file, corrupt record, ...)."""


class SpoolFull(SpoolError):
    """Appending this record would take the spool past `max_bytes`."""


def _segment_name(number: int) -> str:
    return f"seg-{number:020d}.spool"


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (new, renamed or removed files) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Durable FIFO of text records bounded by `max_bytes` of unconsumed records (headers included).

    Disk use can exceed `max_bytes` by at most the consumed part of the oldest segment
    (under `segment_bytes`, default `max_bytes // 8` clamped to 64 KiB..16 MiB).
    """

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int, segment_bytes: int | None = None) -> None:
        if max_bytes <= _HEADER.size:
            raise ValueError("max_bytes too small")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or min(16 * 2**20, max(64 * 2**10, max_bytes // 8))
        self._segments: dict[int, int] = {}  # segment number -> size in bytes, oldest first
        self._head_segment = 0
        self._head_offset = 0
        self._records = 0
        self._bytes = 0
        self._tail_fd: int | None = None
        self._peeked: list[tuple[int, int, int]] | None = None  # (segment, offset, size) of each peeked record
        self._closed = False
        self._open()

    # ------------------------------------------------------------------ state

    @property
    def bytes_used(self) -> int:
        """Bytes of records not yet popped (headers included)."""
        return self._bytes

    @property
    def records(self) -> int:
        """Number of records not yet popped."""
        return self._records

    def __len__(self) -> int:
        return self._records

    # ------------------------------------------------------------------ opening

    def _open(self) -> None:
        found = []
        for entry in os.listdir(self.directory):
            m = _SEGMENT_RE.match(entry)
            if m:
                found.append(int(m.group(1)))
            elif entry.endswith(".tmp"):
                os.unlink(self.directory / entry)  # a head update interrupted before its rename
        found.sort()
        head_segment, head_offset = self._read_head()
        if head_segment is None:
            head_segment, head_offset = (found[0] if found else 0), 0
        for number in found:
            if number < head_segment:  # consumed; its deletion was interrupted
                os.unlink(self.directory / _segment_name(number))
        live = [n for n in found if n >= head_segment]
        if live and live[0] != head_segment:
            log.warning("spool: head segment %d missing, resuming at segment %d", head_segment, live[0])
            head_segment, head_offset = live[0], 0
        if not live:
            head_offset = 0
        self._head_segment, self._head_offset = head_segment, head_offset
        for i, number in enumerate(live):
            is_last = i == len(live) - 1
            start = head_offset if number == head_segment else 0
            size, records = self._scan(number, start, verify=is_last)
            if start > size:  # cannot happen unless the files were edited; do not count negative bytes
                self._head_offset = start = size
            self._segments[number] = size
            self._records += records
            self._bytes += size - start
        if self._records:
            log.info("spool %s: %d records (%d bytes) from a previous run", self.directory, self._records, self._bytes)

    def _read_head(self) -> tuple[int | None, int]:
        path = self.directory / _HEAD
        try:
            text = path.read_text("ascii")
        except FileNotFoundError:
            return None, 0
        try:
            seg, off = (int(x) for x in text.split())
        except ValueError:
            raise SpoolError(f"spool head file {path} is unreadable: {text[:40]!r}") from None
        return seg, off

    def _scan(self, number: int, start: int, *, verify: bool) -> tuple[int, int]:
        """Walk the records of one segment from `start`; cut off a torn tail. Returns (size, records)."""
        path = self.directory / _segment_name(number)
        records = 0
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            pos = min(start, size)
            problem = ""
            while pos < size:
                f.seek(pos)
                header = f.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    problem = "a partial record header"
                    break
                length, crc = _HEADER.unpack(header)
                end = pos + _HEADER.size + length
                if length == 0 or end > size:
                    problem = f"a record of {length} bytes past the end of the file"
                    break
                if verify and zlib.crc32(f.read(length)) != crc:
                    problem = "a record with a bad CRC"
                    break
                records += 1
                pos = end
            if pos < size:
                log.warning(
                    "spool: %s ends with %s at offset %d (crash during an append?): cutting %d bytes",
                    path,
                    problem,
                    pos,
                    size - pos,
                )
                f.truncate(pos)
                f.flush()
                os.fsync(f.fileno())
                size = pos
        return size, records

    # ------------------------------------------------------------------ writing

    def append(self, body: str) -> None:
        """Add a record at the tail and fsync it; raise `SpoolFull` if it would pass `max_bytes`."""
        self._check_open()
        data = body.encode()
        if not data:
            raise ValueError("empty record")
        size = _HEADER.size + len(data)
        if self._bytes + size > self.max_bytes:
            raise SpoolFull(f"spool holds {self._bytes} bytes; {size} more would pass {self.max_bytes}")
        record = _HEADER.pack(len(data), zlib.crc32(data)) + data
        if not self._segments or self._segments[self._tail] >= self.segment_bytes:
            self._new_segment()
        tail = self._tail
        fd = self._tail_fd
        if fd is None:
            fd = self._tail_fd = os.open(self.directory / _segment_name(tail), os.O_WRONLY | os.O_APPEND)
        before = self._segments[tail]
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, before)
            except OSError as exc:
                log.error("spool: cannot cut a failed append off segment %d: %s", tail, exc)
            raise
        self._segments[tail] = before + size
        self._records += 1
        self._bytes += size

    @property
    def _tail(self) -> int:
        return next(reversed(self._segments))

    def _new_segment(self) -> None:
        number = self._tail + 1 if self._segments else self._head_segment
        if self._tail_fd is not None:
            os.close(self._tail_fd)
            self._tail_fd = None
        path = self.directory / _segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o644)
        self._tail_fd = fd
        fsync_dir(self.directory)
        self._segments[number] = 0
        if not self._records:
            # Everything before the new segment is consumed: move the head there, drop the rest.
            self._advance_head(number, 0)

    # ------------------------------------------------------------------ reading

    def peek(self) -> str | None:
        """The oldest record, or None when the spool is empty (see `peek_many`)."""
        records = self.peek_many(1)
        return records[0] if records else None

    def peek_many(
        self, max_records: int | None = None, *, max_bytes: int | None = None, max_lines: int | None = None
    ) -> list[str]:
        """The oldest records in order, without consuming them: `pop(len(result))` does that.

        At least one record unless the spool is empty; more while there are at most `max_records` of them,
        their payloads hold at most `max_bytes` bytes and `max_lines` `\\n`. A record that fails its CRC (the
        disk damaged it after it was written) ends the list; when it is the oldest, it is logged and dropped
        together with the rest of its segment, since its length cannot be trusted.
        """
        self._check_open()
        while self._records:
            self._skip_consumed_segment()
            texts: list[str] = []
            spans: list[tuple[int, int, int]] = []
            size = lines = 0
            for span, data in self._walk(self._head_segment, self._head_offset):
                if data is None:
                    break
                text = data.decode()
                n = text.count("\n")
                if texts and (
                    (max_bytes is not None and size + len(data) > max_bytes)
                    or (max_lines is not None and lines + n > max_lines)
                ):
                    break
                texts.append(text)
                spans.append(span)
                size += len(data)
                lines += n
                if max_records is not None and len(texts) >= max_records:
                    break
            if texts:
                self._peeked = spans
                return texts
            self._drop_damaged_rest()
        return []

    def _walk(self, segment: int, offset: int) -> Iterator[tuple[tuple[int, int, int], bytes | None]]:
        """((segment, offset, size), payload) of each record from (segment, offset) on; payload None if damaged."""
        for number in [n for n in self._segments if n >= segment]:
            end = self._segments[number]
            pos = offset if number == segment else 0
            if pos >= end:
                continue
            with open(self.directory / _segment_name(number), "rb") as f:
                f.seek(pos)
                while pos < end:
                    header = f.read(_HEADER.size)
                    data = None
                    if len(header) == _HEADER.size:
                        length, crc = _HEADER.unpack(header)
                        data = f.read(length)
                        if not (length and len(data) == length and zlib.crc32(data) == crc):
                            data = None
                    if data is None:
                        yield (number, pos, 0), None
                        return
                    size = _HEADER.size + len(data)
                    yield (number, pos, size), data
                    pos += size

    def _drop_damaged_rest(self) -> None:
        self._peeked = None
        segment, offset = self._head_segment, self._head_offset
        lost = self._segments[segment] - offset
        if segment == self._tail:
            os.truncate(self.directory / _segment_name(segment), offset)
            self._segments[segment] = offset
        else:
            self._advance_head(self._next_segment(segment), 0)
        before = self._records
        self._records = self._bytes = 0
        for number, size in list(self._segments.items()):
            start = self._head_offset if number == self._head_segment else 0
            size, records = self._scan(number, start, verify=False)
            self._segments[number] = size
            self._records += records
            self._bytes += size - start
        log.error(
            "spool: damaged record in segment %d at offset %d: dropped %d bytes (%d records) after it",
            segment,
            offset,
            lost,
            before - self._records,
        )

    def pop(self, count: int = 1) -> None:
        """Drop the oldest `count` records, durably and with one head update: a restart resumes after them."""
        self._check_open()
        if count < 1:
            raise ValueError("count must be at least 1")
        spans = self._peeked
        if spans is None or spans[0][:2] != (self._head_segment, self._head_offset) or len(spans) < count:
            self.peek_many(count)
            spans = self._peeked
            if spans is None or len(spans) < count:
                raise SpoolError(f"pop of {count} records from a spool holding {self._records} readable ones")
        self._peeked = None
        segment, offset, size = spans[count - 1]
        offset += size
        if offset >= self._segments[segment] and segment != self._tail:
            segment, offset = self._next_segment(segment), 0
        self._advance_head(segment, offset)
        self._records -= count
        self._bytes -= sum(span[2] for span in spans[:count])

    def _next_segment(self, number: int) -> int:
        later = [n for n in self._segments if n > number]
        return later[0]

    def _skip_consumed_segment(self) -> None:
        # The head can sit at the end of the tail segment when a new segment was started later.
        seg = self._head_segment
        if self._head_offset >= self._segments[seg] and seg != self._tail:
            self._advance_head(self._next_segment(seg), 0)

    def _advance_head(self, segment: int, offset: int) -> None:
        """Persist the new head (atomic replace + fsync), then delete segments before it."""
        tmp = self.directory / (_HEAD + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, f"{segment} {offset}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / _HEAD)
        fsync_dir(self.directory)
        self._head_segment, self._head_offset = segment, offset
        for number in [n for n in self._segments if n < segment]:
            del self._segments[number]
            os.unlink(self.directory / _segment_name(number))

    # ------------------------------------------------------------------ closing

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError("spool is closed")

    def close(self) -> None:
        """Close the tail file; the spool object cannot be used afterwards."""
        if self._tail_fd is not None:
            os.close(self._tail_fd)
            self._tail_fd = None
        self._closed = True

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
