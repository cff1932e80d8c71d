"""warmstart.py without root: which remembered states may start warm, and the file
the daemon keeps (private, rewritten only when the plane changed)."""

from __future__ import annotations

import asyncio
import json
import os
import stat

import pytest
from support.waiting import wait_until_async

from udpflannel import warmstart
from udpflannel.options import RunOptions

STATE = {"kind": "engine", "queues": 1, "tun": {"name": "flannel0"}}


@pytest.mark.parametrize("opts, state, why", [
    ({}, STATE, None),
    ({"dataplane": "auto"}, STATE, None),
    ({"dataplane": "kernel"}, STATE, "--dataplane kernel"),
    ({}, {**STATE, "kind": "kernel"}, "the last plane here was 'kernel'"),
    ({"queues": 2}, STATE, "--queues 2, 1 last time"),
    ({"tun": "flannel9"}, STATE, "another TUN"),
])
def test_what_may_start_warm(opts, state, why):
    assert warmstart._unfit(RunOptions(**opts), state) == why


def test_a_missing_or_garbled_file_means_an_ordinary_start(tmp_path):
    assert warmstart.load(str(tmp_path), "flannel0") is None
    (tmp_path / "flannel0.plane.json").write_text("{not json")
    assert warmstart.load(str(tmp_path), "flannel0") is None
    (tmp_path / "flannel0.plane.json").write_text("[1, 2]")
    assert warmstart.load(str(tmp_path), "flannel0") is None
    opts = RunOptions(state_dir=str(tmp_path))
    assert warmstart.begin(opts) is None


def test_keep_writes_a_private_file_only_when_the_plane_changed(tmp_path, monkeypatch):
    monkeypatch.setattr(warmstart, "KEEP_PERIOD", 0.01)
    state = {"kind": "engine", "routes": []}
    writes = []
    real = warmstart.localstate.write_if_changed

    def counting(*a, **kw):
        writes.append(a[1])
        return real(*a, **kw)
    monkeypatch.setattr(warmstart.localstate, "write_if_changed", counting)

    periods = []

    def describe() -> dict:  # once a period: a count of periods that cannot race a clock
        periods.append(1)
        return dict(state)

    async def body():
        task = asyncio.create_task(warmstart.keep(str(tmp_path / "state"), "flannel0", describe))
        await wait_until_async(lambda: len(periods) >= 3, 10, "three periods")
        state["routes"] = [["10.244.1.0/24", "192.0.2.1", "vxlan", 8472, "0e:00:00:00:00:01"]]
        changed = len(periods)
        await wait_until_async(lambda: len(periods) >= changed + 3, 10, "three periods after the change")
        task.cancel()
    asyncio.run(body())
    assert len(writes) == 2  # the first state, the changed one: not every period
    path = tmp_path / "state" / "flannel0.plane.json"
    assert json.loads(path.read_text())["routes"][0][0] == "10.244.1.0/24"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
