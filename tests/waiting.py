"""Waiting for a condition: `eventually` in trio tests, `wait_until` in plain (blocking) ones."""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn

import pytest
import trio

__all__ = ["eventually", "wait_until"]


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
    _timed_out(predicate, timeout, what)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, *, what: str = "", poll: float = 0.05) -> None:
    """Blocking `eventually`: poll `predicate` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            _timed_out(predicate, timeout, what)
        time.sleep(poll)


def _timed_out(predicate: object, timeout: float, what: str) -> NoReturn:
    pytest.fail(f"timed out after {timeout} s waiting for {what or getattr(predicate, '__qualname__', predicate)}")
