"""netconf.ensure_blackhole_route, flanneld's --ip-blackhole-route (pkg/ip
AddBlackholeV4Route), against a fake netlink: which routes count as already there,
what is added, and the one line when the kernel refuses. (The real kernel:
tests/integration/test_flanneld_binary.py.)"""

from __future__ import annotations

import errno
import ipaddress

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from udpflannel.host import netconf

SUBNET = ipaddress.IPv4Network("10.244.7.0/24")


class Route(dict):
    def __init__(self, dst: str, dst_len: int, kind: int, table: int = 254):
        super().__init__(type=kind, dst_len=dst_len, table=table)
        self.attrs = {"RTA_DST": dst, "RTA_TABLE": table}

    def get_attr(self, name):
        return self.attrs.get(name)


class FakeIPRoute:
    def __init__(self, routes, fail: int | None = None):
        self.routes, self.fail, self.added = routes, fail, []

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def route(self, cmd, **kw):
        if cmd == "dump":
            assert kw == {"family": 2, "table": 254}
            return list(self.routes)
        assert cmd == "add"
        if self.fail:
            raise NetlinkError(self.fail, "File exists")
        self.added.append(kw)


def run(monkeypatch, routes, fail=None):
    fake = FakeIPRoute(routes, fail)
    monkeypatch.setattr(netconf, "IPRoute", fake)
    return netconf.ensure_blackhole_route(SUBNET), fake.added


def test_added_when_missing(monkeypatch):
    assert run(monkeypatch, []) == (True, [{"dst": "10.244.7.0/24", "type": "blackhole", "proto": 3,
                                            "table": 254}])


def test_kept_when_there(monkeypatch):
    assert run(monkeypatch, [Route("10.244.7.0", 24, netconf.RTN_BLACKHOLE)]) == (False, [])


@pytest.mark.parametrize("other", [
    Route("10.244.7.0", 24, 1),                           # a unicast route (the bridge's): not a blackhole
    Route("10.244.0.0", 16, netconf.RTN_BLACKHOLE),       # a blackhole for another prefix
    Route("10.244.7.0", 25, netconf.RTN_BLACKHOLE),
    Route("10.244.7.0", 24, netconf.RTN_BLACKHOLE, table=100),  # another table
])
def test_other_routes_do_not_count(monkeypatch, other):
    added, calls = run(monkeypatch, [other])
    assert added and len(calls) == 1


def test_a_refusal_is_one_line(monkeypatch):
    with pytest.raises(netconf.NetconfError) as e:
        run(monkeypatch, [Route("10.244.7.0", 24, 1)], fail=errno.EEXIST)
    assert str(e.value) == ("blackhole route for 10.244.7.0/24: File exists (another route for this "
                            "prefix, e.g. the CNI bridge's)")


# -- the periodic check (housekeeping.keep_blackhole_route) ------------------------------

def test_kept_every_period_with_failures_logged_once_each(caplog):
    import asyncio
    import itertools
    import logging

    from udpflannel.housekeeping import keep_blackhole_route

    class Node:
        exhausted: list[str] = []

        def out_of_resources(self, what, e):
            self.exhausted.append(what)

    answers = itertools.chain([None, True, False, netconf.NetconfError("refused A"), netconf.NetconfError("refused A"),
                               netconf.NetconfError("refused B"), OSError(24, "Too many open files")],
                              itertools.repeat(False))
    seen = []

    def ensure(subnet):
        seen.append(subnet)
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    lease = itertools.chain([None], itertools.repeat(SUBNET))  # no lease yet at the first turn

    async def body():
        node = Node()
        task = asyncio.create_task(keep_blackhole_route(node, lambda: next(lease), 0.001, ensure))
        while len(seen) < 7:
            await asyncio.sleep(0.001)
        task.cancel()
        return node

    with caplog.at_level(logging.INFO, logger="udpflannel"):
        node = asyncio.run(body())
    assert seen[:7] == [SUBNET] * 7  # the turn without a lease asked nothing
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count("blackhole route for 10.244.7.0/24 added") >= 1
    assert [line for line in lines if "refused" in line] == ["refused A; retrying every 0.001 s",
                                                              "refused B; retrying every 0.001 s"]
    assert node.exhausted == ["checking the blackhole route"]
