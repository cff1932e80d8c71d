"""Bounded warnings about registry entries that are skipped.

Anyone who can write the registry can churn junk keys: 60,000 of them must neither
write 60,000 log lines nor leave 60,000 entries in memory. So:

* a key is warned about once while it is remembered; what is remembered is a 16-byte
  digest of the key (keys themselves can be megabytes), at most ``remember`` of them,
  the least recently seen forgotten first;
* at most ``burst`` lines are written per ``interval`` seconds; the rest are counted,
  and one summary line per interval gives the count (written by a timer on the running
  event loop, or by the next warning after the interval if no loop runs).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from typing import Callable

BURST = 10
INTERVAL = 60.0
REMEMBER = 1024


class BadKeyLog:
    def __init__(self, logger: logging.Logger, what: str, *, burst: int = BURST,
                 interval: float = INTERVAL, remember: int = REMEMBER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.what = what  # "etcd: skipping", "ignoring", ...
        self.burst = burst
        self.interval = interval
        self.remember = remember
        self._clock = clock
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._window_start = clock()
        self._lines = 0
        self.suppressed = 0  # counted, not yet reported in a summary
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """How many keys are remembered (bounded by ``remember``)."""
        return len(self._seen)

    @staticmethod
    def _digest(key: str) -> bytes:
        return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def skipped(self, key: str, reason: str) -> None:
        """``key`` was skipped because of ``reason`` (a one-line message naming it)."""
        digest = self._digest(key)
        if digest in self._seen:
            self._seen.move_to_end(digest)
            return
        self._seen[digest] = None
        if len(self._seen) > self.remember:
            self._seen.popitem(last=False)
        self._roll_window()
        if self._lines < self.burst:
            self._lines += 1
            self.logger.warning("%s %s", self.what, reason)
            return
        self.suppressed += 1
        self._schedule_summary()

    def good(self, key: str) -> None:
        """``key`` is fine again: warn anew if it turns bad later."""
        self._seen.pop(self._digest(key), None)

    def summarize(self) -> None:
        """Write the summary line for what was counted but not logged, if anything."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.suppressed:
            self.logger.warning("%s %d more entries (not logged one by one; at most %d lines per %.0f s)",
                                self.what, self.suppressed, self.burst, self.interval)
            self.suppressed = 0

    def close(self) -> None:
        self.summarize()

    def _roll_window(self) -> None:
        now = self._clock()
        if now - self._window_start >= self.interval:
            self.summarize()
            self._window_start = now
            self._lines = 0

    def _schedule_summary(self) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the next warning after the interval writes the summary
        delay = max(0.0, self._window_start + self.interval - self._clock())
        self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.summarize()
        self._window_start = self._clock()
        self._lines = 0
