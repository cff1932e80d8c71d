"""Waiting for an event, never for a guessed time: poll a predicate until it holds or a
deadline passes, then fail saying what never happened (and, given ``detail``, what
the system looked like then: a log tail, the last status)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, *, interval: float = 0.1,
               detail: Callable[[], object] | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that; an
    AssertionError naming ``what`` once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_timed_out(timeout, what, detail))
        time.sleep(interval)


async def wait_until_async(predicate: Callable[[], Any | Awaitable[Any]], timeout: float, what: str, *,
                           interval: float = 0.01, detail: Callable[[], object] | None = None) -> Any:
    """wait_until on an event loop: ``predicate`` may be a coroutine function, and the
    loop runs between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_timed_out(timeout, what, detail))
        await asyncio.sleep(interval)


def _timed_out(timeout: float, what: str, detail: Callable[[], object] | None) -> str:
    message = f"timed out after {timeout}s waiting for {what}"
    return f"{message}:\n{detail()}" if detail is not None else message
