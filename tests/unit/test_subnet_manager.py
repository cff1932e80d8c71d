"""Lease logic over the embedded registry (a real SQLite file), with a driven clock."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import multiprocessing
import random

import pytest

from udpflannel.core import config as netconfig
from udpflannel.core.lease import EventType, Lease
from udpflannel.registry.embedded import EmbeddedRegistry
from udpflannel.subnet import NoFreeSubnet, SubnetLost, SubnetManager

CFG = netconfig.default_config()
SMALL = netconfig.parse(json.dumps(  # 15 usable subnets
    {"Network": "10.9.0.0/26", "SubnetLen": 30, "Backend": {"Type": "vxlan"}}))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def wanted(ip: str, mac: str = "02:00:00:00:00:01") -> Lease:
    return Lease(CFG.network, ipaddress.IPv4Address(ip), "vxlan", 1, mac)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "registry.db")


def test_acquire_picks_a_free_subnet_in_range_never_the_zeroth(db):
    async def go():
        reg = EmbeddedRegistry(db)
        mgr = SubnetManager(reg, CFG, rng=random.Random(1))
        lease = await mgr.acquire(wanted("192.0.2.1"))
        await reg.close()
        return lease
    lease = run(go())
    assert lease.subnet.prefixlen == 24 and lease.subnet.subnet_of(CFG.network)
    assert lease.subnet != ipaddress.IPv4Network("10.244.0.0/24")


def test_reuses_own_lease_then_previous_subnet(db):
    async def go():
        reg = EmbeddedRegistry(db)
        first = await SubnetManager(reg, CFG).acquire(wanted("192.0.2.1"))
        again = await SubnetManager(reg, CFG).acquire(wanted("192.0.2.1"))
        prev = ipaddress.IPv4Network("10.244.77.0/24")
        other = await SubnetManager(reg, CFG).acquire(wanted("192.0.2.2"), previous=prev)
        third = await SubnetManager(reg, CFG).acquire(wanted("192.0.2.3"), previous=prev)
        leases, _ = await reg.list_leases()
        await reg.close()
        return first, again, other, third, leases
    first, again, other, third, leases = run(go())
    assert again.subnet == first.subnet
    assert other.subnet == ipaddress.IPv4Network("10.244.77.0/24")
    assert third.subnet not in (other.subnet, first.subnet)  # previous was taken: another one
    assert len(leases) == 3


def test_own_lease_with_new_backend_data_is_updated_in_place(db):
    async def go():
        reg = EmbeddedRegistry(db)
        first = await SubnetManager(reg, CFG).acquire(wanted("192.0.2.1"))
        changed = Lease(CFG.network, ipaddress.IPv4Address("192.0.2.1"), "vxlan", 7, "02:00:00:00:00:01")
        again = await SubnetManager(reg, CFG).acquire(changed)
        leases, _ = await reg.list_leases()
        await reg.close()
        return first, again, leases
    first, again, leases = run(go())
    assert again.subnet == first.subnet
    assert [(x.subnet, x.vni) for x in leases] == [(first.subnet, 7)]


def test_no_free_subnet_is_an_error(db):
    async def go():
        reg = EmbeddedRegistry(db)
        got = [await SubnetManager(reg, SMALL).acquire(
            Lease(SMALL.network, ipaddress.IPv4Address(f"192.0.2.{i}"), "vxlan", 1, "02:00:00:00:00:01"))
            for i in range(1, 16)]
        with pytest.raises(NoFreeSubnet):
            await SubnetManager(reg, SMALL).acquire(
                Lease(SMALL.network, ipaddress.IPv4Address("192.0.2.99"), "vxlan", 1, "02:00:00:00:00:01"))
        await reg.close()
        return got
    got = run(go())
    assert len({x.subnet for x in got}) == 15


def _race_worker(path: str, index: int, start, out) -> None:
    async def go():
        reg = EmbeddedRegistry(path)
        mgr = SubnetManager(reg, SMALL)
        start.wait()
        lease = await mgr.acquire(Lease(SMALL.network, ipaddress.IPv4Address(f"192.0.2.{index + 1}"),
                                        "vxlan", 1, "02:00:00:00:00:01"))
        await reg.close()
        return str(lease.subnet)
    out.put(asyncio.run(go()))


@pytest.mark.parametrize("round_", range(5))
def test_processes_racing_never_share_a_subnet(tmp_path, round_):
    path = str(tmp_path / f"race{round_}.db")
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(path, i, start, out)) for i in range(12)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    assert len(results) == 12 and len(set(results)) == 12


def test_expired_leases_disappear_and_watch_reports_them(db):
    clock = Clock()

    async def go():
        reg = EmbeddedRegistry(db, clock=clock, poll_interval=0.01)
        other = await SubnetManager(reg, CFG, ttl=60, clock=clock).acquire(wanted("192.0.2.9"))
        me = SubnetManager(reg, CFG, ttl=3600, clock=clock)
        await me.acquire(wanted("192.0.2.1"))
        watch = me.watch()
        first = await asyncio.wait_for(watch.__anext__(), 5)
        clock.now += 61
        second = await asyncio.wait_for(watch.__anext__(), 5)
        await watch.aclose()
        leases, _ = await reg.list_leases()
        await reg.close()
        return other, first, second, leases
    other, first, second, leases = run(go())
    assert [(e.type, e.lease.subnet) for e in first] == [(EventType.ADDED, other.subnet)]
    assert [(e.type, e.lease.subnet) for e in second] == [(EventType.REMOVED, other.subnet)]
    assert [x.public_ip for x in leases] == [ipaddress.IPv4Address("192.0.2.1")]


def test_renew_extends_and_recreates_a_vanished_lease(db):
    clock = Clock()

    async def go():
        reg = EmbeddedRegistry(db, clock=clock)
        mgr = SubnetManager(reg, CFG, ttl=100, renew_margin=10, clock=clock)
        lease = await mgr.acquire(wanted("192.0.2.1"))
        assert mgr._renew_delay(lease) == pytest.approx(90)
        clock.now += 90
        await mgr.renew_or_recreate()
        renewed = mgr.lease
        await reg.delete_lease(lease.subnet)
        await mgr.renew_or_recreate()
        leases, _ = await reg.list_leases()
        await reg.close()
        return lease, renewed, leases
    lease, renewed, leases = run(go())
    assert renewed.expiration == pytest.approx(lease.expiration + 90)
    assert [x.subnet for x in leases] == [lease.subnet]


def test_watch_and_renewal_both_finding_our_lease_gone_recreate_it_once(db):
    """The watch (our key deleted) and the renewal timer can re-create at the same time;
    the loser must not take the winner's fresh lease for another node's."""
    async def go():
        reg = EmbeddedRegistry(db)
        mgr = SubnetManager(reg, CFG)
        lease = await mgr.acquire(wanted("192.0.2.1"))
        await reg.delete_lease(lease.subnet)
        await asyncio.gather(mgr.renew_or_recreate(), mgr.renew_or_recreate(), mgr.renew_or_recreate())
        leases, _ = await reg.list_leases()
        await reg.close()
        return lease, leases
    lease, leases = run(go())
    assert [(x.subnet, x.public_ip) for x in leases] == [(lease.subnet, lease.public_ip)]


def test_failed_renewal_is_retried_as_soon_as_the_registry_is_back(db):
    """Backoff after a failed renewal starts at 1 s and grows to 60 s; when the watch
    sees the registry again, an overdue renewal must not wait that out."""
    from udpflannel.registry.base import RegistryError

    class Flaky(EmbeddedRegistry):
        down = False
        renewals: list[float] = []

        async def renew_lease(self, lease, ttl):
            self.renewals.append(asyncio.get_running_loop().time())
            if self.down:
                raise RegistryError("etcd renew lease failed: connection refused")
            return await super().renew_lease(lease, ttl)

    async def go():
        reg = Flaky(db)
        mgr = SubnetManager(reg, CFG, ttl=2, renew_margin=1.95)  # renews every 50 ms
        await mgr.acquire(wanted("192.0.2.1"))
        reg.down = True
        renewer = asyncio.ensure_future(mgr.keep_renewed())
        await asyncio.sleep(0.2)
        assert not mgr.health.ok and len(reg.renewals) == 1  # failed once, now backing off 1 s
        reg.down = False
        mgr.health.succeeded()  # what the watch does when its re-list works
        await asyncio.sleep(0.1)
        renewer.cancel()
        await reg.close()
        return reg.renewals
    renewals = run(go())
    assert len(renewals) >= 2 and renewals[1] - renewals[0] < 0.3


def test_subnet_taken_by_another_node_is_fatal(db):
    async def go():
        reg = EmbeddedRegistry(db)
        mgr = SubnetManager(reg, CFG)
        lease = await mgr.acquire(wanted("192.0.2.1"))
        await reg.delete_lease(lease.subnet)
        await reg.create_lease(Lease(lease.subnet, ipaddress.IPv4Address("192.0.2.66"), "vxlan", 1,
                                     "02:00:00:00:00:66"), 100)
        with pytest.raises(SubnetLost, match="192.0.2.66"):
            await mgr.renew_or_recreate()
        await reg.close()
    run(go())


def test_watch_follows_joins_changes_and_leaves(db):
    async def go():
        reg = EmbeddedRegistry(db, poll_interval=0.01)
        me = SubnetManager(reg, CFG)
        await me.acquire(wanted("192.0.2.1"))
        watch = me.watch()
        other = SubnetManager(reg, CFG)
        got = []

        async def next_batch():
            return await asyncio.wait_for(watch.__anext__(), 5)
        lease = await other.acquire(wanted("192.0.2.2"))
        got.append(await next_batch())
        await other.renew_or_recreate()  # a renewal changes nothing a route cares about
        await reg.delete_lease(lease.subnet)
        await reg.create_lease(Lease(lease.subnet, lease.public_ip, "vxlan", 1, "02:00:00:00:00:09"), 60)
        while sum(map(len, got)) < 3:  # the delete and re-create may share a batch
            got.append(await next_batch())
        await watch.aclose()
        await reg.close()
        return lease, got
    lease, got = run(go())
    flat = [(e.type, e.lease.subnet, e.lease.vtep_mac) for batch in got for e in batch]
    assert flat == [(EventType.ADDED, lease.subnet, "02:00:00:00:00:01"),
                    (EventType.REMOVED, lease.subnet, "02:00:00:00:00:01"),
                    (EventType.ADDED, lease.subnet, "02:00:00:00:00:09")]
