"""JSON lines between the harness and its child processes: one event per stdout line, one command per stdin line."""

from __future__ import annotations

import json
import os
import resource
import sys
from collections.abc import AsyncIterator
from typing import Any

import trio

__all__ = ["LineReader", "emit", "lines", "raise_fd_limit", "stdin_lines"]


def emit(event: str, **fields: Any) -> None:
    """Write one event line to stdout (the harness reads it)."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    """The lines of a byte stream, decoded, without their line ends; ends at EOF."""
    buffer = b""
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            if buffer:
                yield buffer.decode()
            return
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            yield line.decode()


class LineReader:
    """Lines from a byte stream; unlike `lines`, a cancelled `readline` loses nothing and can be called again."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""
        self._eof = False

    async def readline(self) -> str | None:
        """The next line without its line end; None at EOF."""
        while b"\n" not in self._buffer:
            if self._eof:
                if self._buffer:
                    line, self._buffer = self._buffer, b""
                    return line.decode()
                return None
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                self._eof = True
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()


async def stdin_lines() -> AsyncIterator[str]:
    """Commands from the harness, stripped; ends when the harness closes our stdin (or dies)."""
    async with trio.lowlevel.FdStream(os.dup(0)) as stream:
        async for line in lines(stream):
            if line.strip():
                yield line.strip()


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (children inherit it); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
