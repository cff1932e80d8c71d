"""Dual-stack leasing over the embedded registry (a real SQLite file): pairs of
subnets under one key, a node's IPv4-only lease moved to its dual-stack key when
IPv6 is turned on (and back), IPv6-only networks, and keys naming one subnet twice."""

from __future__ import annotations

import asyncio
import ipaddress
import json

import pytest

from udpflannel.core import config as netconfig
from udpflannel.core.lease import UNSPECIFIED, EventType, Lease, LeaseEvent, decode, encode_value
from udpflannel.core.peers import Framings, RouteBook
from udpflannel.registry.base import LeaseTaken
from udpflannel.registry.embedded import EmbeddedRegistry
from udpflannel.subnets.base import wanted_lease
from udpflannel.subnets.leasing import LeaseManager

N4, N6 = ipaddress.IPv4Network, ipaddress.IPv6Network
A4, A6 = ipaddress.IPv4Address, ipaddress.IPv6Address
V4 = netconfig.default_config()
DUAL = netconfig.parse(json.dumps({"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd10::/56",
                                   "Backend": {"Type": "vxlan"}}))
V6ONLY = netconfig.parse(json.dumps({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd10::/56",
                                     "Backend": {"Type": "vxlan"}}))


def me(cfg, n: int = 1) -> Lease:
    return wanted_lease(cfg, A4(f"192.0.2.{n}"), f"02:00:00:00:00:{n:02x}", A6(f"fd00:2::{n:x}"),
                        f"06:00:00:00:00:{n:02x}")


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "registry.db")


def raw_rows(path: str) -> dict[str, bytes]:
    import sqlite3
    con = sqlite3.connect(path)
    try:
        return {k: bytes(v) for k, v in con.execute("SELECT subnet, value FROM leases")}
    finally:
        con.close()


def test_wanted_lease_per_family():
    dual, v6, v4 = me(DUAL), me(V6ONLY), me(V4)
    assert (dual.public_ip, dual.vtep_mac, dual.public_ipv6, dual.vtep_mac6) == (
        A4("192.0.2.1"), "02:00:00:00:00:01", A6("fd00:2::1"), "06:00:00:00:00:01")
    assert (v6.public_ip, v6.vtep_mac, v6.vni) == (UNSPECIFIED, None, None) and v6.vtep_mac6
    assert (v4.public_ipv6, v4.vtep_mac6, v4.vni6) == (None, None, None)


def test_a_dual_stack_node_leases_a_pair_under_one_key(db):
    async def go():
        reg = EmbeddedRegistry(db)
        a = await LeaseManager(reg, DUAL).acquire(me(DUAL, 1))
        b = await LeaseManager(reg, DUAL).acquire(me(DUAL, 2))
        again = await LeaseManager(reg, DUAL).acquire(me(DUAL, 1))
        await reg.close()
        return a, b, again
    a, b, again = run(go())
    assert DUAL.v4.in_range(a.subnet) and DUAL.v6.in_range(a.ipv6_subnet)
    assert a.subnet != b.subnet and a.ipv6_subnet != b.ipv6_subnet
    assert again.key == a.key
    rows = raw_rows(db)
    assert set(rows) == {a.key, b.key} and "&" in a.key
    assert rows[a.key] == encode_value(a)
    assert json.loads(rows[a.key])["BackendV6Data"] == {"VNI": 1, "VtepMAC": "06:00:00:00:00:01"}


def test_turning_ipv6_on_keeps_the_ipv4_subnet_and_moves_the_key_in_one_step(db):
    async def go():
        reg = EmbeddedRegistry(db, poll_interval=0.01)
        watcher = LeaseManager(reg, DUAL)
        await watcher.acquire(me(DUAL, 9))
        watch = watcher.watch()
        await asyncio.wait_for(watch.__anext__(), 5)
        old = await LeaseManager(reg, V4).acquire(me(V4, 1))
        await asyncio.wait_for(watch.__anext__(), 5)
        prev6 = N6("fd10:0:0:aa::/64")  # FLANNEL_IPV6_SUBNET from before, free
        new = await LeaseManager(reg, DUAL, previous_v6=prev6).acquire(me(DUAL, 1), previous=old.subnet)
        moved = await asyncio.wait_for(watch.__anext__(), 5)
        back = await LeaseManager(reg, V4).acquire(me(V4, 1))  # and IPv6 off again
        await watch.aclose()
        await reg.close()
        return old, new, moved, back
    old, new, moved, back = run(go())
    assert old.key == str(old.subnet.network_address) + "-24"
    assert new.subnet == old.subnet and new.ipv6_subnet == N6("fd10:0:0:aa::/64")
    assert [(e.type, e.lease.key) for e in moved] == [(EventType.REMOVED, old.key), (EventType.ADDED, new.key)]
    assert back.subnet == old.subnet and back.key == old.key
    assert set(raw_rows(db)) - {k for k in raw_rows(db) if k.startswith("10.244.") and "&" in k} == {old.key}
    # to a peer's routes the move changed nothing for IPv4
    book = RouteBook(DUAL, A4("192.0.2.9"), Framings(8472), own_public_ipv6=A6("fd00:2::9"))
    book.plan([LeaseEvent(EventType.ADDED, old)])
    changes = book.plan(moved)
    assert [r.subnet.version for r in changes.add] == [6] and changes.remove == ()


def test_a_reservation_keeps_no_ttl_when_its_key_moves(db):
    async def go():
        reg = EmbeddedRegistry(db)
        await reg.list_leases()
        from test_subnet_manager import poke
        poke(db, "10.244.42.0-24", b'{"PublicIP":"192.0.2.1"}', expires=float("inf"))
        got = await LeaseManager(reg, DUAL).acquire(me(DUAL, 1))
        leases, _ = await reg.list_leases()
        await reg.close()
        return got, leases
    got, leases = run(go())
    assert got.subnet == N4("10.244.42.0/24") and got.ipv6_subnet is not None and got.reserved
    assert [x.key for x in leases] == [got.key] and leases[0].reserved


def test_ipv6_only_nodes_get_their_own_subnets_and_keep_them(db):
    """flanneld v0.28.9 on etcd finds every IPv6-only lease "ours" (PublicIP 0.0.0.0)."""
    async def go():
        reg = EmbeddedRegistry(db)
        a = await LeaseManager(reg, V6ONLY).acquire(me(V6ONLY, 1))
        b = await LeaseManager(reg, V6ONLY).acquire(me(V6ONLY, 2))
        again = await LeaseManager(reg, V6ONLY).acquire(me(V6ONLY, 1))
        await reg.close()
        return a, b, again
    a, b, again = run(go())
    assert a.subnet is None and a.key.startswith("0.0.0.0-0&fd10:")
    assert a.ipv6_subnet != b.ipv6_subnet and again.key == a.key
    assert raw_rows(db)[a.key] == (b'{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:2::1","BackendType":"vxlan",'
                                   b'"BackendV6Data":{"VNI":1,"VtepMAC":"06:00:00:00:00:01"}}')


def test_create_refuses_a_key_whose_subnet_another_key_names(db):
    async def go():
        reg = EmbeddedRegistry(db)
        await reg.create_lease(Lease(N4("10.244.5.0/24"), A4("192.0.2.5"), "vxlan", 1, "02:00:00:00:00:05"), 60)
        dual = Lease(N4("10.244.5.0/24"), A4("192.0.2.6"), "vxlan", 1, "02:00:00:00:00:06",
                     ipv6_subnet=N6("fd10:0:0:5::/64"), public_ipv6=A6("fd00:2::6"), vni6=1,
                     vtep_mac6="06:00:00:00:00:06")
        with pytest.raises(LeaseTaken) as first:
            await reg.create_lease(dual, 60)
        other6 = Lease(N4("10.244.6.0/24"), A4("192.0.2.7"), "vxlan", 1, "02:00:00:00:00:07",
                       ipv6_subnet=N6("fd10:0:0:5::/64"))
        await reg.create_lease(Lease(N4("10.244.8.0/24"), A4("192.0.2.8"), "vxlan", 1, "02:00:00:00:00:08",
                                     ipv6_subnet=N6("fd10:0:0:5::/64")), 60)
        with pytest.raises(LeaseTaken) as second:
            await reg.create_lease(other6, 60)
        await reg.close()
        return first.value, second.value
    first, second = run(go())
    assert first.key == "10.244.5.0-24" and first.holder.public_ip == A4("192.0.2.5")
    assert second.key == "10.244.8.0-24&fd10:0:0:5::-64"


def test_keys_naming_our_subnets_are_no_peers_and_aliases_do_not_win(db):
    async def go():
        reg = EmbeddedRegistry(db, poll_interval=0.01)
        other = await LeaseManager(reg, V4).acquire(me(V4, 2))
        mine = LeaseManager(reg, V4)
        lease = await mine.acquire(me(V4, 1))
        from test_subnet_manager import poke
        attacker = encode_value(Lease(None, A4("192.0.2.66"), "vxlan", 1, "02:00:00:00:00:66"))
        poke(db, f"{lease.key}&fd10:0:0:1::-64", attacker)  # names our subnet
        poke(db, f"{other.key}&fd10:0:0:2::-64", attacker)  # names the other node's
        watch = mine.watch()
        snap = await asyncio.wait_for(watch.__anext__(), 5)  # acquire's listing
        later = await asyncio.wait_for(watch.__anext__(), 5)
        await watch.aclose()
        await reg.close()
        return other, snap + later
    other, events = run(go())
    assert sorted(e.lease.key for e in events) == [other.key, f"{other.key}&fd10:0:0:2::-64"]
    book = RouteBook(V4, A4("192.0.2.1"), Framings(8472))
    book.plan(events)
    assert {str(r.public_ip) for r in book.routes.values()} == {"192.0.2.2"}  # the real key wins


def test_garbage_at_the_subnet_files_ipv4_key_is_reclaimed_into_the_dual_stack_key(db):
    async def go():
        reg = EmbeddedRegistry(db)
        await reg.list_leases()
        from test_subnet_manager import poke
        poke(db, "10.244.77.0-24", b'{"PublicIP":"127.0.0.1"}')  # no node can have it
        got = await LeaseManager(reg, DUAL).acquire(me(DUAL, 1), previous=N4("10.244.77.0/24"))
        await reg.close()
        return got
    got = run(go())
    assert got.subnet == N4("10.244.77.0/24") and got.ipv6_subnet is not None
    assert set(raw_rows(db)) == {got.key}


def test_renewal_and_recreation_of_a_dual_stack_lease(db):
    async def go():
        reg = EmbeddedRegistry(db)
        mgr = LeaseManager(reg, DUAL)
        lease = await mgr.acquire(me(DUAL, 1))
        await mgr.renew_or_recreate()
        await reg.delete_lease(lease.key)
        await mgr.renew_or_recreate()
        rows = raw_rows(db)
        await reg.close()
        return lease, rows
    lease, rows = run(go())
    assert rows == {lease.key: encode_value(lease)}
    assert decode(lease.key, rows[lease.key]).same_route(lease)
