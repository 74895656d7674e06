"""Waiting for a condition in trio tests: the one poller, `eventually`."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import pytest
import trio

__all__ = ["eventually"]


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, *, what: str = "", poll: float = 0.01
) -> None:
    """Poll `predicate` (sync or async) every `poll` seconds until it is true; fail the test after `timeout` seconds."""
    with trio.move_on_after(timeout):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await trio.sleep(poll)
    pytest.fail(f"timed out after {timeout} s waiting for {what or getattr(predicate, '__qualname__', predicate)}")
