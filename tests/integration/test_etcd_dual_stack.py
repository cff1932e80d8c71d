"""EtcdRegistry and the subnet manager with dual-stack keys against a real etcd:
flanneld's key and value bytes (read back with etcdctl), a create that refuses a key
whose IPv4 subnet another key names, a lease moved to its dual-stack key in one
transaction (one watch revision, the old key's etcd lease revoked), reservations
moved as reservations, IPv6-only keys."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import uuid

import pytest
from support.moduleloop import module_loop

from udpflannel.core import config as netconfig
from udpflannel.core.lease import NEVER, EventType, Lease
from udpflannel.registry.base import LeaseTaken
from udpflannel.registry.etcd import EtcdRegistry
from udpflannel.subnets.base import wanted_lease
from udpflannel.subnets.leasing import LeaseManager

try:
    from .etcd_server import EtcdServer, etcd_server, subnet_leases  # noqa: F401
except ImportError:
    from etcd_server import EtcdServer, etcd_server, subnet_leases  # noqa: F401

N4, N6 = ipaddress.IPv4Network, ipaddress.IPv6Network
A4, A6 = ipaddress.IPv4Address, ipaddress.IPv6Address
V4 = netconfig.default_config()
DUAL = netconfig.parse(json.dumps({"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd10::/56",
                                   "Backend": {"Type": "vxlan"}}))
V6ONLY = netconfig.parse(json.dumps({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd10::/56",
                                     "Backend": {"Type": "vxlan"}}))
# flanneld v0.28.9's value, from the lab (test_lease_v6.py has the same bytes)
FLANNELD_DUAL = ('{"PublicIP":"192.168.250.12","PublicIPv6":"fd00:250::12","BackendType":"vxlan",'
                 '"BackendData":{"VNI":1,"VtepMAC":"36:f7:67:53:96:ac"},'
                 '"BackendV6Data":{"VNI":1,"VtepMAC":"fe:85:f2:4c:e9:3e"}}')


_loop_fixture, run = module_loop()
_loop = pytest.fixture(scope="module", autouse=True)(_loop_fixture)


def prefix() -> str:
    return f"/t-{uuid.uuid4().hex[:8]}/network"


def me(cfg, n: int = 1) -> Lease:
    return wanted_lease(cfg, A4(f"192.0.2.{n}"), f"02:00:00:00:00:{n:02x}", A6(f"fd00:2::{n:x}"),
                        f"06:00:00:00:00:{n:02x}")


def test_flanneld_dual_stack_lease_is_listed_and_ours_is_written_as_flanneld_writes_it(etcd_server):
    p = prefix()
    etcd_server.etcdctl("put", f"{p}/subnets/10.244.53.0-24&fd10:0:0:1f::-64", FLANNELD_DUAL)

    async def body():
        reg = EtcdRegistry([etcd_server.endpoint], prefix=p)
        try:
            listed, _ = await reg.list_leases()
            ours = await LeaseManager(reg, DUAL).acquire(me(DUAL, 1))
            return listed, ours
        finally:
            await reg.close()
    listed, ours = run(body())
    assert [(x.subnet, x.ipv6_subnet, x.vtep_mac6) for x in listed] == [
        (N4("10.244.53.0/24"), N6("fd10:0:0:1f::/64"), "fe:85:f2:4c:e9:3e")]
    stored = subnet_leases(etcd_server, p)
    assert stored[ours.key]["value"] == (
        '{"PublicIP":"192.0.2.1","PublicIPv6":"fd00:2::1","BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"},"BackendV6Data":{"VNI":1,"VtepMAC":"06:00:00:00:00:01"}}')
    assert stored[ours.key]["lease"] != 0
    assert ours.subnet != N4("10.244.53.0/24") and ours.ipv6_subnet != N6("fd10:0:0:1f::/64")


def test_create_refuses_a_second_key_for_an_ipv4_subnet(etcd_server):
    p = prefix()
    etcd_server.etcdctl("put", f"{p}/subnets/10.244.5.0-24", FLANNELD_DUAL)
    etcd_server.etcdctl("put", f"{p}/subnets/10.244.6.0-24&fd10:0:0:6::-64", FLANNELD_DUAL)
    dual = Lease(N4("10.244.5.0/24"), A4("192.0.2.5"), "vxlan", 1, "02:00:00:00:00:05",
                 ipv6_subnet=N6("fd10:0:0:5::/64"), public_ipv6=A6("fd00:2::5"), vni6=1,
                 vtep_mac6="06:00:00:00:00:05")
    v4only = Lease(N4("10.244.6.0/24"), A4("192.0.2.6"), "vxlan", 1, "02:00:00:00:00:06")

    async def body():
        reg = EtcdRegistry([etcd_server.endpoint], prefix=p)
        try:
            errors = []
            for lease in (dual, v4only):
                with pytest.raises(LeaseTaken) as e:
                    await reg.create_lease(lease, 60)
                errors.append(e.value)
            fine = await reg.create_lease(Lease(N4("10.244.7.0/24"), A4("192.0.2.7"), "vxlan", 1,
                                                "02:00:00:00:00:07", ipv6_subnet=N6("fd10:0:0:7::/64")), 60)
            return errors, fine
        finally:
            await reg.close()
    (first, second), fine = run(body())
    assert first.key == "10.244.5.0-24" and first.holder.public_ipv6 == A6("fd00:250::12")
    assert second.key == "10.244.6.0-24&fd10:0:0:6::-64"
    assert fine.key == "10.244.7.0-24&fd10:0:0:7::-64"
    assert set(subnet_leases(etcd_server, p)) == {"10.244.5.0-24", "10.244.6.0-24&fd10:0:0:6::-64", fine.key}


def test_turning_ipv6_on_moves_the_lease_in_one_transaction(etcd_server):
    p = prefix()

    async def body():
        reg = EtcdRegistry([etcd_server.endpoint], prefix=p)
        try:
            old = await LeaseManager(reg, V4).acquire(me(V4, 1))
            old_id = subnet_leases(etcd_server, p)[old.key]["lease"]
            _, rev = await reg.list_leases()
            watch = reg.watch_leases(rev)
            new = await LeaseManager(reg, DUAL).acquire(me(DUAL, 1), previous=old.subnet)
            events, batch_rev = await asyncio.wait_for(watch.__anext__(), 10)
            await watch.aclose()
            back = await LeaseManager(reg, V4).acquire(me(V4, 1))
            return old, old_id, new, events, back
        finally:
            await reg.close()
    old, old_id, new, events, back = run(body())
    assert new.subnet == old.subnet and new.ipv6_subnet is not None and new.key != old.key
    assert [(e.type, e.lease.key) for e in events] == [(EventType.REMOVED, old.key), (EventType.ADDED, new.key)]
    assert back.key == old.key
    assert set(subnet_leases(etcd_server, p)) == {old.key}
    for _ in range(50):
        doc = etcd_server.etcdctl_json("lease", "timetolive", format(old_id, "x"))
        if int(doc.get("ttl", 0)) <= 0:
            break
        run(asyncio.sleep(0.1))
    assert int(doc.get("ttl", 0)) <= 0


def test_a_reservation_moves_as_a_reservation(etcd_server):
    p = prefix()
    etcd_server.etcdctl("put", f"{p}/subnets/10.244.42.0-24", '{"PublicIP":"192.0.2.1"}')

    async def body():
        reg = EtcdRegistry([etcd_server.endpoint], prefix=p)
        try:
            return await LeaseManager(reg, DUAL).acquire(me(DUAL, 1))
        finally:
            await reg.close()
    got = run(body())
    assert got.subnet == N4("10.244.42.0/24") and got.expiration == NEVER
    stored = subnet_leases(etcd_server, p)
    assert list(stored) == [got.key] and stored[got.key]["lease"] == 0


def test_ipv6_only_nodes_each_get_a_subnet(etcd_server):
    p = prefix()

    async def body():
        reg = EtcdRegistry([etcd_server.endpoint], prefix=p)
        try:
            a = await LeaseManager(reg, V6ONLY).acquire(me(V6ONLY, 1))
            b = await LeaseManager(reg, V6ONLY).acquire(me(V6ONLY, 2))
            again = await LeaseManager(reg, V6ONLY).acquire(me(V6ONLY, 1))
            return a, b, again
        finally:
            await reg.close()
    a, b, again = run(body())
    assert a.key.startswith("0.0.0.0-0&fd10:") and a.ipv6_subnet != b.ipv6_subnet and again.key == a.key
    assert json.loads(subnet_leases(etcd_server, p)[a.key]["value"]) == {
        "PublicIP": "0.0.0.0", "PublicIPv6": "fd00:2::1", "BackendType": "vxlan",
        "BackendV6Data": {"VNI": 1, "VtepMAC": "06:00:00:00:00:01"}}
