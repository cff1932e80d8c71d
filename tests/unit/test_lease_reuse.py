"""Reservations and leases that carry our PublicIP, over the embedded registry (a real
SQLite file) with a driven clock.

- Reservations (flannel's Documentation/reservations.md): a key without a TTL. It is
  reused by the node with its PublicIP and never given a TTL, not at start, not at a
  renewal (flanneld v0.28.9 gives it one: flannel issue #1329, see
  tests/integration/test_flanneld_semantics.py).
- A lease carrying our PublicIP that is not provably ours (another VTEP MAC: a
  reinstalled node whose state dir is gone) is taken over only when its holder missed
  its renewal, never from a node that keeps it alive (README, Security).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sqlite3

import pytest
from test_subnet_manager import CFG, Clock, flannel_value, poke, row, run, wanted

from udpflannel.core.lease import NEVER, encode_value
from udpflannel.registry.embedded import EmbeddedRegistry
from udpflannel.subnets.base import SubnetLost
from udpflannel.subnets.leasing import LeaseManager

ME = "192.0.2.1"
MY_MAC = "02:00:00:00:00:01"
OTHER_MAC = "02:00:00:00:00:66"
KEY = "10.244.50.0-24"
SUBNET = ipaddress.IPv4Network("10.244.50.0/24")
HOUR = 3600.0


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "registry.db")


def expires(path: str, key: str) -> float | None:
    conn = sqlite3.connect(path)
    try:
        got = conn.execute("SELECT expires FROM leases WHERE subnet = ?", (key,)).fetchone()
    finally:
        conn.close()
    return None if got is None else got[0]


def event_count(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        conn.close()


def by_hand(ip: str) -> bytes:
    """A reservation as an administrator writes it: the PublicIP, nothing else."""
    return json.dumps({"PublicIP": ip}).encode()


async def opened(db: str, clock: Clock | None = None) -> EmbeddedRegistry:
    reg = EmbeddedRegistry(db, clock=clock or Clock())
    await reg.list_leases()  # creates the file
    return reg


# --- reservations --------------------------------------------------------------------

def test_a_reservation_for_our_address_is_reused_and_never_gets_a_ttl(db):
    clock = Clock()

    async def go():
        reg = await opened(db, clock)
        poke(db, KEY, by_hand(ME), expires=NEVER)
        mgr = LeaseManager(reg, CFG, ttl=100, renew_margin=10, clock=clock)
        lease = await mgr.acquire(wanted(ME))
        after_acquire = (row(db, KEY), expires(db, KEY))
        events = event_count(db)
        clock.now += 90
        await mgr.renew_or_recreate()
        after_renewal = (row(db, KEY), expires(db, KEY), event_count(db) - events)
        clock.now += 10 * 365 * 86400  # a reservation outlives any TTL
        listed, _ = await reg.list_leases()
        await reg.close()
        return mgr, lease, after_acquire, after_renewal, listed
    mgr, lease, after_acquire, after_renewal, listed = run(go())
    assert lease.subnet == SUBNET and lease.reserved and mgr.lease.reserved
    assert after_acquire == (encode_value(lease), NEVER)  # our data filled in, still no TTL
    assert after_renewal == (encode_value(lease), NEVER, 0)  # nothing written at all
    assert [(x.subnet, x.reserved) for x in listed] == [(SUBNET, True)]
    assert mgr._renew_delay(mgr.lease) == pytest.approx(90)  # looked at as often as a lease


def test_a_lease_turned_into_a_reservation_stays_one_across_renewals(db):
    """reservations.md's recipe: re-put the node's own lease without a TTL."""
    clock = Clock()

    async def go():
        reg = await opened(db, clock)
        mgr = LeaseManager(reg, CFG, ttl=100, renew_margin=10, clock=clock)
        lease = await mgr.acquire(wanted(ME))
        poke(db, lease.key, row(db, lease.key), expires=NEVER)
        renewals = []
        for _ in range(3):
            clock.now += 90
            await mgr.renew_or_recreate()
            renewals.append((mgr.lease.reserved, expires(db, lease.key)))
        restarted = await LeaseManager(reg, CFG, ttl=100, clock=clock).acquire(wanted(ME), lease.subnet)
        await reg.close()
        return lease, renewals, restarted, expires(db, lease.key)
    lease, renewals, restarted, left = run(go())
    assert renewals == [(True, NEVER)] * 3
    assert restarted.subnet == lease.subnet and restarted.reserved and left == NEVER


def test_a_reinstalled_node_gets_its_reservation_back_whatever_mac_it_names(db):
    """The state dir is gone: a new VTEP MAC. The reservation names the old one."""
    async def go():
        reg = await opened(db)
        poke(db, KEY, flannel_value(ME, OTHER_MAC), expires=NEVER)
        lease = await LeaseManager(reg, CFG).acquire(wanted(ME, MY_MAC))
        await reg.close()
        return lease
    lease = run(go())
    assert (lease.subnet, lease.vtep_mac, lease.reserved) == (SUBNET, MY_MAC, True)
    assert row(db, KEY) == encode_value(lease) and expires(db, KEY) == NEVER


def test_a_reservation_for_another_address_is_never_taken(db):
    async def go():
        reg = await opened(db)
        poke(db, KEY, by_hand("192.0.2.66"), expires=NEVER)
        lease = await LeaseManager(reg, CFG).acquire(wanted(ME), previous=SUBNET)
        await reg.close()
        return lease
    lease = run(go())
    assert lease.subnet != SUBNET and not lease.reserved
    assert row(db, KEY) == by_hand("192.0.2.66") and expires(db, KEY) == NEVER


def test_a_running_node_gives_up_its_reservation_to_a_node_with_its_address(db):
    """Taking it back would make two nodes with one address write it in turn forever:
    the one that finds it taken stops (SubnetLost), loudly."""
    async def go():
        reg = await opened(db)
        poke(db, KEY, by_hand(ME), expires=NEVER)
        mgr = LeaseManager(reg, CFG)
        await mgr.acquire(wanted(ME, MY_MAC))
        poke(db, KEY, flannel_value(ME, OTHER_MAC), expires=NEVER)  # the other node took it
        with pytest.raises(SubnetLost, match=ME):
            await mgr.renew_or_recreate()
        await reg.close()
    run(go())
    assert row(db, KEY) == flannel_value(ME, OTHER_MAC)


def test_a_reservation_written_by_hand_over_our_key_is_filled_in_and_kept(db):
    async def go():
        reg = await opened(db)
        mgr = LeaseManager(reg, CFG)
        lease = await mgr.acquire(wanted(ME))
        poke(db, lease.key, by_hand(ME), expires=NEVER)
        await mgr.renew_or_recreate()
        await reg.close()
        return lease, mgr.lease
    lease, after = run(go())
    assert after.subnet == lease.subnet and after.reserved
    assert row(db, lease.key) == encode_value(lease) and expires(db, lease.key) == NEVER


# --- a lease carrying our PublicIP, not provably ours ---------------------------------

@pytest.mark.parametrize("left, taken", [
    (10 * HOUR, False),   # renewed in time: a live node keeps it
    (HOUR + 60, False),   # just outside the renew margin
    (HOUR - 60, True),    # its holder missed its renewal
    (1.0, True),
])
def test_a_lease_with_our_address_is_taken_over_only_once_its_holder_missed_its_renewal(db, left, taken):
    clock = Clock()

    async def go():
        reg = await opened(db, clock)
        poke(db, KEY, flannel_value(ME, OTHER_MAC), expires=clock.now + left)
        lease = await LeaseManager(reg, CFG, clock=clock).acquire(wanted(ME, MY_MAC))
        await reg.close()
        return lease
    lease = run(go())
    assert (lease.subnet == SUBNET) is taken
    if taken:
        assert row(db, KEY) == encode_value(lease) and expires(db, KEY) == pytest.approx(clock.now + 24 * HOUR)
        assert not lease.reserved
    else:
        assert row(db, KEY) == flannel_value(ME, OTHER_MAC)  # untouched
        assert expires(db, KEY) == pytest.approx(clock.now + left)


def test_a_flanneld_udp_lease_with_our_address_past_its_renewal_is_taken_over(db):
    clock = Clock()
    udp = json.dumps({"PublicIP": ME, "PublicIPv6": None}, separators=(",", ":")).encode()

    async def go():
        reg = await opened(db, clock)
        poke(db, KEY, udp, expires=clock.now + 60)
        lease = await LeaseManager(reg, CFG, clock=clock).acquire(wanted(ME, MY_MAC))
        await reg.close()
        return lease
    assert run(go()).subnet == SUBNET


def test_a_renewal_between_the_check_and_the_write_wins(db):
    """The holder renews at the last moment: the take-over must not overwrite it."""
    clock = Clock()

    class RenewedJustThen(EmbeddedRegistry):
        async def take_over(self, lease, ttl, holder, due):
            poke(db, KEY, flannel_value(ME, OTHER_MAC), expires=clock.now + 24 * HOUR)
            return await super().take_over(lease, ttl, holder, due)

    async def go():
        reg = RenewedJustThen(db, clock=clock)
        await reg.list_leases()
        poke(db, KEY, flannel_value(ME, OTHER_MAC), expires=clock.now + 60)
        lease = await LeaseManager(reg, CFG, clock=clock).acquire(wanted(ME, MY_MAC))
        await reg.close()
        return lease
    lease = run(go())
    assert lease.subnet != SUBNET
    assert row(db, KEY) == flannel_value(ME, OTHER_MAC)


def test_a_lease_that_expired_during_the_take_over_is_simply_created(db):
    clock = Clock()

    class ExpiredJustThen(EmbeddedRegistry):
        async def take_over(self, lease, ttl, holder, due):
            poke(db, KEY, None)
            return await super().take_over(lease, ttl, holder, due)

    async def go():
        reg = ExpiredJustThen(db, clock=clock)
        await reg.list_leases()
        poke(db, KEY, flannel_value(ME, OTHER_MAC), expires=clock.now + 60)
        lease = await LeaseManager(reg, CFG, clock=clock).acquire(wanted(ME, MY_MAC))
        await reg.close()
        return lease
    lease = run(go())
    assert lease.subnet == SUBNET and row(db, KEY) == encode_value(lease)


def test_our_own_lease_comes_before_a_reservation_and_a_due_lease_for_our_address(db):
    clock = Clock()

    async def go():
        reg = await opened(db, clock)
        mine = await LeaseManager(reg, CFG, clock=clock).acquire(wanted(ME, MY_MAC))
        poke(db, KEY, by_hand(ME), expires=NEVER)
        poke(db, "10.244.51.0-24", flannel_value(ME, OTHER_MAC), expires=clock.now + 60)
        again = await LeaseManager(reg, CFG, clock=clock).acquire(wanted(ME, MY_MAC))
        await reg.close()
        return mine, again
    mine, again = run(go())
    assert again.subnet == mine.subnet
    assert row(db, KEY) == by_hand(ME)  # both left as they were
    assert row(db, "10.244.51.0-24") == flannel_value(ME, OTHER_MAC)


def test_the_subnet_file_s_reservation_and_then_due_lease_come_first(db):
    clock = Clock()

    async def go():
        reg = await opened(db, clock)
        poke(db, "10.244.60.0-24", flannel_value(ME, OTHER_MAC), expires=clock.now + 60)
        poke(db, "10.244.61.0-24", flannel_value(ME, OTHER_MAC), expires=clock.now + 60)
        poke(db, "10.244.70.0-24", by_hand(ME), expires=NEVER)
        poke(db, "10.244.71.0-24", by_hand(ME), expires=NEVER)
        first = await LeaseManager(reg, CFG, clock=clock).acquire(
            wanted(ME, MY_MAC), previous=ipaddress.IPv4Network("10.244.71.0/24"))
        poke(db, first.key, None)
        poke(db, "10.244.70.0-24", None)
        second = await LeaseManager(reg, CFG, clock=clock).acquire(
            wanted(ME, MY_MAC), previous=ipaddress.IPv4Network("10.244.61.0/24"))
        await reg.close()
        return first, second
    first, second = run(go())
    assert str(first.subnet) == "10.244.71.0/24" and first.reserved  # reservations before leases
    assert str(second.subnet) == "10.244.61.0/24" and not second.reserved


def test_watch_reports_a_reservation_as_one(db):
    async def go():
        reg = EmbeddedRegistry(db, poll_interval=0.01)
        me = LeaseManager(reg, CFG)
        # our own subnet anything but SUBNET (a random pick was it once in 256 runs:
        # the poke below then overwrote our own lease)
        await me.acquire(wanted(ME), ipaddress.IPv4Network("10.244.7.0/24"))
        watch = me.watch()
        await asyncio.wait_for(watch.__anext__(), 5)
        poke(db, KEY, flannel_value("192.0.2.9", OTHER_MAC), expires=NEVER)
        batch = await asyncio.wait_for(watch.__anext__(), 5)
        await watch.aclose()
        await reg.close()
        return batch
    batch = run(go())
    assert [(e.lease.subnet, e.lease.reserved) for e in batch] == [(SUBNET, True)]
