"""Bounded warnings about skipped registry entries (registry.badkeys)."""

from __future__ import annotations

import asyncio
import logging

from support.waiting import wait_until_async

from udpflannel.registry.badkeys import BadKeyLog

LOG = logging.getLogger("test.badkeys")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG.name]


def test_60000_junk_keys_write_a_burst_and_a_summary_in_bounded_memory(caplog):
    clock = Clock()
    gate = BadKeyLog(LOG, "skipping", burst=10, interval=60, remember=1024, clock=clock)
    with caplog.at_level(logging.WARNING, LOG.name):
        for i in range(60_000):
            gate.skipped(f"/coreos.com/network/subnets/junk-{i}", f"junk-{i}: not a key")
        assert len(gate) == 1024  # remembered keys are bounded
        assert len(messages(caplog)) == 10
        clock.now += 60
        gate.skipped("/coreos.com/network/subnets/one-more", "one-more: not a key")
    lines = messages(caplog)
    assert lines[10] == "skipping 59990 more entries (not logged one by one; at most 10 lines per 60 s)"
    assert lines[11] == "skipping one-more: not a key"
    assert len(lines) == 12


def test_a_key_is_warned_about_once_while_remembered(caplog):
    gate = BadKeyLog(LOG, "skipping", clock=Clock())
    with caplog.at_level(logging.WARNING, LOG.name):
        for _ in range(5):  # e.g. each re-listing finds it again
            gate.skipped("k", "k: bad")
        gate.good("k")  # fixed ...
        gate.skipped("k", "k: bad again")  # ... and broken again: worth a line
    assert messages(caplog) == ["skipping k: bad", "skipping k: bad again"]


def test_huge_keys_are_remembered_by_digest():
    gate = BadKeyLog(LOG, "skipping", clock=Clock())
    gate.skipped("k" * 1_500_000, "a huge key")
    assert len(gate) == 1
    assert all(len(d) == 16 for d in gate._seen)


def test_the_summary_comes_by_timer_on_a_running_loop(caplog):
    async def go():
        gate = BadKeyLog(LOG, "skipping", burst=2, interval=0.05)
        for i in range(7):
            gate.skipped(f"k{i}", f"k{i}: bad")
        # no further warning needed to flush the count: the timer writes it
        await wait_until_async(lambda: gate.suppressed == 0, 10, "the summary line")
        return gate
    with caplog.at_level(logging.WARNING, LOG.name):
        gate = asyncio.run(go())
    assert messages(caplog)[-1].startswith("skipping 5 more entries")
    assert gate.suppressed == 0
