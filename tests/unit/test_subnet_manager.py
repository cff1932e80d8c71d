"""Lease logic over the embedded registry (a real SQLite file), with a driven clock."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import multiprocessing
import random

import pytest
from support.waiting import wait_until_async

from udpflannel.core import config as netconfig
from udpflannel.core.lease import EventType, Lease
from udpflannel.registry.embedded import EmbeddedRegistry
from udpflannel.subnets.base import NoFreeSubnet, SubnetLost
from udpflannel.subnets.leasing import LeaseManager

CFG = netconfig.default_config()
SMALL = netconfig.parse(json.dumps(  # 15 usable subnets
    {"Network": "10.9.0.0/26", "SubnetLen": 30, "Backend": {"Type": "vxlan"}}))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class DrivenSleep:
    """LeaseManager's sleep on the driven clock: records each delay asked for and
    returns once the test has advanced the clock that far."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.asked: list[float] = []
        self._due: list[tuple[float, asyncio.Future]] = []

    async def __call__(self, delay: float) -> None:
        self.asked.append(delay)
        woken = asyncio.get_running_loop().create_future()
        self._due.append((self.clock.now + delay, woken))
        await woken

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        for due, woken in self._due:
            if due <= self.clock.now and not woken.done():
                woken.set_result(None)


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
        mgr = LeaseManager(reg, CFG, rng=random.Random(1))
        lease = await mgr.acquire(wanted("192.0.2.1"))
        await reg.close()
        return lease
    lease = run(go())
    assert lease.subnet.prefixlen == 24 and lease.subnet.subnet_of(CFG.network)
    assert lease.subnet != ipaddress.IPv4Network("10.244.0.0/24")


def test_reuses_own_lease_then_previous_subnet(db):
    async def go():
        reg = EmbeddedRegistry(db)
        first = await LeaseManager(reg, CFG).acquire(wanted("192.0.2.1"))
        again = await LeaseManager(reg, CFG).acquire(wanted("192.0.2.1"))
        # beyond the first 100 free subnets the random pick draws from: `first` never has it
        prev = ipaddress.IPv4Network("10.244.177.0/24")
        other = await LeaseManager(reg, CFG).acquire(wanted("192.0.2.2"), previous=prev)
        third = await LeaseManager(reg, CFG).acquire(wanted("192.0.2.3"), previous=prev)
        leases, _ = await reg.list_leases()
        await reg.close()
        return first, again, other, third, leases
    first, again, other, third, leases = run(go())
    assert again.subnet == first.subnet
    assert other.subnet == ipaddress.IPv4Network("10.244.177.0/24")
    assert third.subnet not in (other.subnet, first.subnet)  # previous was taken: another one
    assert len(leases) == 3


def test_own_lease_with_new_backend_data_is_updated_in_place(db):
    async def go():
        reg = EmbeddedRegistry(db)
        first = await LeaseManager(reg, CFG).acquire(wanted("192.0.2.1"))
        changed = Lease(CFG.network, ipaddress.IPv4Address("192.0.2.1"), "vxlan", 7, "02:00:00:00:00:01")
        again = await LeaseManager(reg, CFG).acquire(changed)
        leases, _ = await reg.list_leases()
        await reg.close()
        return first, again, leases
    first, again, leases = run(go())
    assert again.subnet == first.subnet
    assert [(x.subnet, x.vni) for x in leases] == [(first.subnet, 7)]


def test_no_free_subnet_is_an_error(db):
    async def go():
        reg = EmbeddedRegistry(db)
        got = [await LeaseManager(reg, SMALL).acquire(
            Lease(SMALL.network, ipaddress.IPv4Address(f"192.0.2.{i}"), "vxlan", 1, "02:00:00:00:00:01"))
            for i in range(1, 16)]
        with pytest.raises(NoFreeSubnet):
            await LeaseManager(reg, SMALL).acquire(
                Lease(SMALL.network, ipaddress.IPv4Address("192.0.2.99"), "vxlan", 1, "02:00:00:00:00:01"))
        await reg.close()
        return got
    got = run(go())
    assert len({x.subnet for x in got}) == 15


def _race_worker(path: str, index: int, start, out) -> None:
    async def go():
        reg = EmbeddedRegistry(path)
        mgr = LeaseManager(reg, SMALL)
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
        other = await LeaseManager(reg, CFG, ttl=60, clock=clock).acquire(wanted("192.0.2.9"))
        me = LeaseManager(reg, CFG, ttl=3600, clock=clock)
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
        mgr = LeaseManager(reg, CFG, ttl=100, renew_margin=10, clock=clock)
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
        mgr = LeaseManager(reg, CFG)
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

    clock = Clock()

    class Flaky(EmbeddedRegistry):
        down = False
        renewals: list[float] = []

        async def renew_lease(self, lease, ttl):
            self.renewals.append(clock())
            if self.down:
                raise RegistryError("etcd renew lease failed: connection refused")
            return await super().renew_lease(lease, ttl)

    async def go():
        reg = Flaky(db, clock=clock)
        sleep = DrivenSleep(clock)
        mgr = LeaseManager(reg, CFG, ttl=2, renew_margin=1.95, clock=clock, sleep=sleep)  # renews every 50 ms
        await mgr.acquire(wanted("192.0.2.1"))
        reg.down = True
        renewer = asyncio.ensure_future(mgr.keep_renewed())
        await wait_until_async(lambda: sleep.asked == [pytest.approx(0.05)], 5, "the renewal timer")
        sleep.advance(0.05)
        await wait_until_async(lambda: len(sleep.asked) == 2, 5, "the backoff after the failed renewal")
        assert sleep.asked[1] == 1.0  # backing off 1 s: the driven clock never gets there
        assert not mgr.health.ok and len(reg.renewals) == 1  # failed once, now backing off 1 s
        reg.down = False
        mgr.health.succeeded()  # what the watch does when its re-list works
        await wait_until_async(lambda: len(reg.renewals) >= 2, 5, "the renewal retried")
        renewer.cancel()
        await reg.close()
        return reg.renewals
    renewals = run(go())
    assert len(renewals) >= 2 and renewals[1] - renewals[0] < 0.3


def test_subnet_taken_by_another_node_is_fatal(db):
    async def go():
        reg = EmbeddedRegistry(db)
        mgr = LeaseManager(reg, CFG)
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
        me = LeaseManager(reg, CFG)
        await me.acquire(wanted("192.0.2.1"))
        watch = me.watch()
        other = LeaseManager(reg, CFG)
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


# --- registry poisoning: whoever writes the registry file ------------------------------

GARBAGE = b"\x00garbage, not JSON"


def poke(path: str, key: str, value: bytes | None, *, expires: float = 4e9, event: bool = True) -> None:
    """Write the registry file as an attacker (or a broken tool) would: a row under any
    key name, with or without the event that tells watchers."""
    import sqlite3
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        if value is None:
            db.execute("DELETE FROM leases WHERE subnet = ?", (key,))
        else:
            db.execute("INSERT OR REPLACE INTO leases (subnet, value, expires) VALUES (?, ?, ?)",
                       (key, value, expires))
        if event:
            db.execute("INSERT INTO events (subnet, value, expires) VALUES (?, ?, ?)",
                       (key, value, None if value is None else expires))
        db.execute("COMMIT")
    finally:
        db.close()


def row(path: str, key: str) -> bytes | None:
    import sqlite3
    db = sqlite3.connect(path)
    try:
        got = db.execute("SELECT value FROM leases WHERE subnet = ?", (key,)).fetchone()
    finally:
        db.close()
    return None if got is None else bytes(got[0])


def flannel_value(ip: str, mac: str, vni: int = 1) -> bytes:
    return json.dumps({"PublicIP": ip, "PublicIPv6": None, "BackendType": "vxlan",
                       "BackendData": {"VNI": vni, "VtepMAC": mac}}, separators=(",", ":")).encode()


def test_garbage_in_our_key_is_reclaimed_at_renewal_not_fatal(db):
    """It used to end in SubnetLost ("keeps changing hands"): the node exited and came
    back on a new random subnet, stranding its pods."""
    from udpflannel.core.lease import encode_value

    async def go():
        reg = EmbeddedRegistry(db)
        mgr = LeaseManager(reg, CFG)
        lease = await mgr.acquire(wanted("192.0.2.1"))
        poke(db, lease.key, GARBAGE)
        await mgr.renew_or_recreate()
        await reg.close()
        return lease, mgr.lease
    lease, after = run(go())
    assert after.subnet == lease.subnet
    assert row(db, lease.key) == encode_value(lease)


@pytest.mark.parametrize("value", [
    flannel_value("127.0.0.1", "02:00:00:00:00:66"),
    flannel_value("224.0.0.5", "02:00:00:00:00:66"),
    flannel_value("192.0.2.66", "ff:ff:ff:ff:ff:ff"),
    flannel_value("192.0.2.1", "02:00:00:00:00:01", vni=99),  # ours (PublicIP and MAC), other data
])
def test_a_lease_no_node_can_have_in_our_key_is_reclaimed(db, value):
    from udpflannel.core.lease import encode_value

    async def go():
        reg = EmbeddedRegistry(db)
        mgr = LeaseManager(reg, CFG)
        lease = await mgr.acquire(wanted("192.0.2.1"))
        poke(db, lease.key, value)
        await mgr.renew_or_recreate()
        await reg.close()
        return lease
    lease = run(go())
    assert row(db, lease.key) == encode_value(lease)


def test_a_node_sharing_our_public_ip_in_our_key_is_still_fatal(db):
    async def go():
        reg = EmbeddedRegistry(db)
        mgr = LeaseManager(reg, CFG)
        lease = await mgr.acquire(wanted("192.0.2.1"))
        poke(db, lease.key, flannel_value("192.0.2.1", "02:00:00:00:00:77"))  # another MAC
        with pytest.raises(SubnetLost, match="192.0.2.1"):
            await mgr.renew_or_recreate()
        await reg.close()
    run(go())


class FailFirstWatch(EmbeddedRegistry):
    """A registry whose first watch fails, so the manager re-lists (as after an etcd
    outage): the listing is then all the manager learns from."""
    watches = 0

    def watch_leases(self, revision):
        self.watches += 1
        if self.watches == 1:
            from udpflannel.registry.base import RegistryError

            async def fail():
                raise RegistryError("etcd watch failed: connection refused")
                yield
            return fail()
        return super().watch_leases(revision)


async def _follow(watch) -> None:
    async for _batch in watch:
        pass


def test_first_watch_batch_is_the_snapshot_even_when_empty(db):
    async def go():
        reg = EmbeddedRegistry(db, poll_interval=0.01)
        try:
            mgr = LeaseManager(reg, CFG)
            await mgr.acquire(wanted("192.0.2.1"))
            watch = mgr.watch()
            first = await asyncio.wait_for(watch.__anext__(), 5)
            await watch.aclose()
            return first
        finally:
            await reg.close()
    assert run(go()) == []


def test_our_key_is_defended_after_a_listing_not_only_on_watch_events(db):
    """Garbage written with no event (or missed during an outage) is seen by the next
    listing; the owner must check its key there too."""
    from udpflannel.core.lease import encode_value

    async def no_sleep(_):
        return None

    async def go():
        reg = FailFirstWatch(db, poll_interval=0.01)
        mgr = LeaseManager(reg, CFG, sleep=no_sleep)
        lease = await mgr.acquire(wanted("192.0.2.1"))
        poke(db, lease.key, GARBAGE, event=False)
        watch = mgr.watch()
        task = asyncio.ensure_future(_follow(watch))  # the (empty) snapshot, then changes
        # (a deadline for a loaded machine: the test goes on as soon as both have happened)
        await wait_until_async(lambda: row(db, lease.key) != GARBAGE and reg.watches >= 2, 30,
                               "our key defended, and a re-listing after the failed watch")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await watch.aclose()
        await reg.close()
        return lease, reg.watches
    lease, watches = run(go())
    assert watches >= 2  # it did re-list
    assert row(db, lease.key) == encode_value(lease)


def test_garbage_event_for_our_key_is_noticed_by_the_watch_and_reclaimed(db):
    from udpflannel.core.lease import encode_value

    async def go():
        reg = EmbeddedRegistry(db, poll_interval=0.01)
        mgr = LeaseManager(reg, CFG)
        lease = await mgr.acquire(wanted("192.0.2.1"))
        watch = mgr.watch()
        task = asyncio.ensure_future(_follow(watch))
        await asyncio.sleep(0.05)
        poke(db, lease.key, GARBAGE)
        await wait_until_async(lambda: row(db, lease.key) != GARBAGE, 30, "our key reclaimed")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await watch.aclose()
        await reg.close()
        return lease
    lease = run(go())
    assert row(db, lease.key) == encode_value(lease)


@pytest.mark.parametrize("holder, reclaimed", [
    (GARBAGE, True),
    (flannel_value("0.0.0.0", "02:00:00:00:00:66"), True),
    (flannel_value("192.0.2.66", "00:00:00:00:00:00"), True),
    (flannel_value("192.0.2.66", "02:00:00:00:00:66"), False),  # a real node: leave it
    (flannel_value("192.0.2.1", "02:00:00:00:00:66"), False),  # our PublicIP, another MAC
])
def test_restart_reclaims_the_subnet_file_subnet_unless_a_valid_lease_holds_it(db, holder, reclaimed):
    prev = ipaddress.IPv4Network("10.244.77.0/24")

    async def go():
        reg = EmbeddedRegistry(db)
        await reg.list_leases()  # creates the file
        poke(db, "10.244.77.0-24", holder)
        lease = await LeaseManager(reg, CFG).acquire(wanted("192.0.2.1"), previous=prev)
        await reg.close()
        return lease
    lease = run(go())
    assert (lease.subnet == prev) is reclaimed
    if not reclaimed:
        assert row(db, "10.244.77.0-24") == holder  # untouched


def test_a_node_started_with_our_public_ip_does_not_take_our_subnet(db):
    """flanneld's rule (reuse any lease with our PublicIP) let a second node started
    with our --public-ip delete our lease and take our subnet."""
    from udpflannel.core.lease import encode_value

    async def go():
        reg = EmbeddedRegistry(db)
        ours = await LeaseManager(reg, CFG).acquire(wanted("192.0.2.1", "02:00:00:00:00:01"))
        other = await LeaseManager(reg, CFG).acquire(wanted("192.0.2.1", "02:00:00:00:00:02"),
                                                      previous=ours.subnet)
        await reg.close()
        return ours, other
    ours, other = run(go())
    assert other.subnet != ours.subnet
    assert row(db, ours.key) == encode_value(ours)


def test_a_copy_of_our_lease_elsewhere_does_not_move_us(db):
    """A copy of our exact lease at another subnet (sorted first) used to be reused."""
    async def go():
        reg = EmbeddedRegistry(db)
        me = wanted("192.0.2.1")
        first = await LeaseManager(reg, CFG).acquire(me, previous=ipaddress.IPv4Network("10.244.200.0/24"))
        value = row(db, first.key)
        poke(db, "10.244.1.0-24", value)
        poke(db, first.key, None)  # re-written: now listed after the copy
        poke(db, first.key, value)
        again = await LeaseManager(reg, CFG).acquire(me, previous=first.subnet)
        leases, _ = await reg.list_leases()
        await reg.close()
        return first, again, leases
    first, again, leases = run(go())
    assert first.subnet == ipaddress.IPv4Network("10.244.200.0/24")
    assert again.subnet == first.subnet
    assert sorted(str(x.subnet) for x in leases) == ["10.244.1.0/24", "10.244.200.0/24"]  # copy left


# (a dual-stack key naming the subnet is a key of its own since dual stack: the routing
# policy keeps the subnet's own key winning, tests/unit/test_subnet_manager_v6.py)
ALIASES = ["10.244.077.0-24", "10.244.77.0-024", "x/10.244.77.0-24", "10.244.77.0-24 "]


def test_alias_keys_neither_win_at_start_nor_change_routes(db):
    """Keys that parsed as another node's subnet: the last listed used to win at start,
    and a garbage alias removed the real node's route for good."""
    b = ipaddress.IPv4Network("10.244.77.0/24")
    attacker = flannel_value("192.0.2.66", "02:00:00:00:00:66")

    async def go():
        reg = EmbeddedRegistry(db, poll_interval=0.01)
        await LeaseManager(reg, CFG).acquire(wanted("192.0.2.2", "02:00:00:00:00:02"), previous=b)
        for alias in ALIASES:
            poke(db, alias, attacker)
        me = LeaseManager(reg, CFG)
        await me.acquire(wanted("192.0.2.1"))
        watch = me.watch()
        snap = await asyncio.wait_for(watch.__anext__(), 5)
        for alias in ALIASES:  # garbage in every alias, then every alias deleted
            poke(db, alias, GARBAGE)
        for alias in ALIASES:
            poke(db, alias, None)
        sentinel = await LeaseManager(reg, CFG).acquire(wanted("192.0.2.3", "02:00:00:00:00:03"))
        later = await asyncio.wait_for(watch.__anext__(), 5)
        await watch.aclose()
        await reg.close()
        return snap, later, sentinel
    snap, later, sentinel = run(go())
    assert [(e.type, e.lease.subnet, str(e.lease.public_ip)) for e in snap] == \
        [(EventType.ADDED, b, "192.0.2.2")]
    # the aliases' changes produced nothing; the next batch is the sentinel node joining
    assert [(e.type, e.lease.subnet) for e in later] == [(EventType.ADDED, sentinel.subnet)]


def test_leases_of_another_length_or_outside_the_network_are_ignored(db, caplog):
    async def go():
        reg = EmbeddedRegistry(db, poll_interval=0.01)
        await reg.list_leases()  # creates the file
        poke(db, "10.244.76.0-23", flannel_value("192.0.2.66", "02:00:00:00:00:66"))  # covers .77
        poke(db, "10.99.1.0-24", flannel_value("192.0.2.67", "02:00:00:00:00:67"))
        other = await LeaseManager(reg, CFG).acquire(wanted("192.0.2.2", "02:00:00:00:00:02"))
        me = LeaseManager(reg, CFG)
        await me.acquire(wanted("192.0.2.1"))
        watch = me.watch()
        snap = await asyncio.wait_for(watch.__anext__(), 5)
        poke(db, "10.244.76.0-23", None)
        poke(db, "10.244.78.0-25", flannel_value("192.0.2.68", "02:00:00:00:00:68"))
        sentinel = await LeaseManager(reg, CFG).acquire(wanted("192.0.2.3", "02:00:00:00:00:03"))
        later = await asyncio.wait_for(watch.__anext__(), 5)
        await watch.aclose()
        await reg.close()
        return other, snap, sentinel, later
    with caplog.at_level(logging.WARNING, "udpflannel.subnets"):
        other, snap, sentinel, later = run(go())
    assert [e.lease.subnet for e in snap] == [other.subnet]
    assert [e.lease.subnet for e in later] == [sentinel.subnet]
    text = caplog.text
    assert "10.244.76.0/23 from 192.0.2.66: not a /24 inside 10.244.0.0/16" in text
    assert "10.99.1.0/24 from 192.0.2.67: not a /24 inside 10.244.0.0/16" in text


def test_junk_rows_write_a_bounded_number_of_warnings(db, caplog):
    async def go():
        reg = EmbeddedRegistry(db, poll_interval=0.01)
        me = LeaseManager(reg, CFG)
        await me.acquire(wanted("192.0.2.1"))
        watch = me.watch()
        await asyncio.sleep(0)
        import sqlite3
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        for i in range(3000):
            conn.execute("INSERT INTO leases VALUES (?, ?, 4e9)", (f"junk-{i}", GARBAGE))
            conn.execute("INSERT INTO events (subnet, value, expires) VALUES (?, ?, 4e9)",
                         (f"junk-{i}", GARBAGE))
        conn.execute("COMMIT")
        conn.close()
        for _ in range(3):
            await reg.list_leases()
        sentinel = await LeaseManager(reg, CFG).acquire(wanted("192.0.2.3", "02:00:00:00:00:03"))
        while True:  # the watch has read past all 3,000 junk events once the sentinel shows
            batch = await asyncio.wait_for(watch.__anext__(), 5)
            if any(e.lease.subnet == sentinel.subnet for e in batch):
                break
        await watch.aclose()
        remembered = len(reg.bad_keys)
        await reg.close()
        return remembered
    with caplog.at_level(logging.WARNING, "udpflannel.registry.embedded"):
        remembered = run(go())
    lines = [r for r in caplog.records if r.name == "udpflannel.registry.embedded"]
    assert 10 <= len(lines) <= 11  # the burst, and the summary written at close
    assert remembered <= 1024


def udp_wanted(ip: str) -> Lease:
    """A flanneld-udp style lease: PublicIP only, no backend type, no MAC."""
    return Lease(CFG.network, ipaddress.IPv4Address(ip), "", None, None)


def test_udp_lease_is_ours_by_public_ip_at_the_subnet_we_had(db):
    """flanneld udp leases carry no MAC: our PublicIP at the subnet this node had (the
    subnet file's, or the state dir's record) is the proof, and the lease is renewed."""
    async def go():
        reg = EmbeddedRegistry(db)
        try:
            first = await LeaseManager(reg, CFG).acquire(udp_wanted("192.0.2.1"))
            again = await LeaseManager(reg, CFG).acquire(udp_wanted("192.0.2.1"), first.subnet)
            return first, again
        finally:
            await reg.close()
    first, again = run(go())
    assert again.subnet == first.subnet and again.backend_type == ""


def test_udp_lease_with_our_ip_elsewhere_is_left_alone(db):
    """Without proof (no subnet recorded), a udp lease that merely shares our PublicIP
    may be another node's (NAT): neither taken over nor deleted."""
    async def go():
        reg = EmbeddedRegistry(db)
        try:
            other = await LeaseManager(reg, CFG).acquire(udp_wanted("192.0.2.1"))
            mine = await LeaseManager(reg, CFG).acquire(udp_wanted("192.0.2.1"))
            listed, _ = await reg.list_leases()
            return other, mine, listed
        finally:
            await reg.close()
    other, mine, listed = run(go())
    assert mine.subnet != other.subnet
    assert {x.subnet for x in listed} == {other.subnet, mine.subnet}


def test_udp_lease_at_our_recorded_subnet_is_reused_under_vxlan(db):
    """The migration runbook: a node that ran udp (its lease has no MAC) restarts under
    a vxlan config. Its PublicIP at the subnet it recorded proves the lease is its own:
    it keeps the subnet (as flanneld does) and the lease becomes a vxlan lease; without
    the record the udp lease is left alone."""
    async def go():
        reg = EmbeddedRegistry(db)
        try:
            old = await LeaseManager(reg, CFG).acquire(udp_wanted("192.0.2.1"))
            now = await LeaseManager(reg, CFG).acquire(wanted("192.0.2.1"), old.subnet)
            listed, _ = await reg.list_leases()
            stranger = await LeaseManager(reg, CFG).acquire(udp_wanted("192.0.2.2"))
            unproven = await LeaseManager(reg, CFG).acquire(wanted("192.0.2.2", "02:00:00:00:00:02"))
            return old, now, listed, stranger, unproven
        finally:
            await reg.close()
    old, now, listed, stranger, unproven = run(go())
    assert now.subnet == old.subnet and now.backend_type == "vxlan"
    assert [(x.subnet, x.backend_type, x.vtep_mac) for x in listed] == \
        [(old.subnet, "vxlan", "02:00:00:00:00:01")]
    assert unproven.subnet != stranger.subnet
