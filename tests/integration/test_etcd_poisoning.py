"""Registry poisoning: daemons on a real etcd while someone who can write the prefix
writes aliases, garbage and copies.

Same set-up as test_etcd_cluster (whose fixtures and helpers are used): etcd inside the
Lab's hub namespace, daemons in the node namespaces, every hand-made write done with
etcdctl in the hub namespace as an attacker with etcd credentials would. Routes are
judged by pings across the overlay and by the daemons' route counts; a "sentinel"
lease written after the hostile writes tells when a daemon has seen all of them.
"""

from __future__ import annotations

import ipaddress
import re

from support.waiting import wait_until

try:
    from .test_etcd_cluster import (  # noqa: F401 - fixtures
        FLANNEL_VXLAN_LEASE,
        etcd,
        key_of,
        lab,
        leases,
        make,
        unreachable_pairs,
    )
except ImportError:
    from test_etcd_cluster import (  # noqa: F401 - fixtures
        FLANNEL_VXLAN_LEASE,
        etcd,
        key_of,
        lab,
        leases,
        make,
        unreachable_pairs,
    )

NET = ipaddress.IPv4Network
ATTACKER = FLANNEL_VXLAN_LEASE.format(ip="192.168.250.66", mac="c6:d2:32:6f:8f:66")


def aliases(subnets: str, subnet: str) -> list[str]:
    """Other spellings of ``subnet``'s key (all but the padded octet were read as its
    key by the old parser)."""
    net = NET(subnet)
    a, b, c, d = str(net.network_address).split(".")
    plen = net.prefixlen
    return [f"{subnets}/x/{net.network_address}-{plen}",  # nested
            f"{subnets}/{a}.{b}.0{c}.{d}-{plen}",  # zero-padded octet
            f"{subnets}/{net.network_address}-0{plen}",  # zero-padded length
            f"{subnets}/{net.network_address}-{plen}&fc00::-64"]  # dual stack: a key of its own, which loses


def test_alias_keys_change_no_routes_and_do_not_win_at_start(etcd, make):
    """Before: node b's aliases made every udpflannel node route b's subnet to the
    attacker (the last listed key won; watched alias events replaced the route), and a
    garbage alias of a flanneld node's subnet removed its route for good."""
    cluster = make()
    subnets = f"{cluster.prefix}/subnets"
    flanneld = "10.244.210.0/24"  # a flanneld kernel node, written as flanneld writes it
    etcd.etcdctl("put", f"{subnets}/{key_of(flanneld)}",
                 FLANNEL_VXLAN_LEASE.format(ip="192.168.250.210", mac="c6:d2:32:6f:8f:10"))
    cluster.start(0)
    cluster.start(1)
    cluster.wait_converged()
    for i in (0, 1):
        cluster.wait_status(i, lambda s: s.dataplane.peers == 2, 10, "routing to b and the flanneld node")
    b = cluster.status(1).lease.subnet

    for key in aliases(subnets, b):  # b's aliases point at the attacker, and stay
        etcd.etcdctl("put", key, ATTACKER)
    for key in aliases(subnets, flanneld):  # garbage aliases of the flanneld node, then gone
        etcd.etcdctl("put", key, "garbage")
    for key in aliases(subnets, flanneld):
        etcd.etcdctl("del", key)
    etcd.etcdctl("put", f"{subnets}/10.244.211.0-24",  # sentinel: a second flanneld node
                 FLANNEL_VXLAN_LEASE.format(ip="192.168.250.211", mac="c6:d2:32:6f:8f:11"))
    for i in (0, 1):  # b, 210 (never dropped) and 211
        cluster.wait_status(i, lambda s: s.dataplane.peers == 3, 10, "seeing the sentinel, keeping 210")
    assert unreachable_pairs(cluster) == []  # a still reaches b at b's address

    cluster.start(2)  # starts with b's aliases in the listing
    cluster.wait_status(2, lambda s: s.dataplane.peers == 4, 10, "routing to a, b, 210 and 211")
    assert unreachable_pairs(cluster) == []
    assert all(p.poll() is None for p in cluster.procs.values())
    text = cluster.log(2)
    assert "etcd: skipping" in text and "not a canonical subnet key" in text, text


def test_garbage_in_our_key_is_reclaimed_without_exit_and_across_a_restart(etcd, make):
    """Before: the node exited ("keeps changing hands") and came back on a new random
    subnet, stranding its pods."""
    cluster = make()
    cluster.start(0)
    st = cluster.wait_status(0, lambda s: s.ready)
    name = key_of(st.lease.subnet)
    key = f"{cluster.prefix}/subnets/{name}"
    original = leases(etcd, cluster.prefix)[name]["value"]

    etcd.etcdctl("put", key, "garbage")
    wait_until(lambda: leases(etcd, cluster.prefix)[name]["value"] == original, 10, "our lease back")
    assert leases(etcd, cluster.prefix)[name]["lease"] != 0  # attached to an etcd lease again
    assert cluster.procs[0].poll() is None and cluster.status(0).lease.subnet == st.lease.subnet
    assert re.search(rf"{re.escape(st.lease.subnet)}: reclaimed our key \(it held a value that is not a lease\)",
                     cluster.log(0))

    # while it is down, its key gets a value that is not a lease (and no etcd lease:
    # it would never expire); the subnet in its subnet.env is reclaimed at start
    assert cluster.stop(0) == 0
    etcd.etcdctl("put", key, '{"PublicIP": 42}')
    cluster.start(0)
    assert cluster.wait_status(0, lambda s: s.ready).lease.subnet == st.lease.subnet
    assert leases(etcd, cluster.prefix)[name]["value"] == original


def test_a_node_with_our_public_ip_takes_nothing_and_a_copy_of_our_lease_does_not_move_us(etcd, make):
    """Before: a second node started with our --public-ip deleted our lease and took
    our subnet, and a copy of our lease at a subnet listed before ours moved us there."""
    cluster = make()
    cluster.start(0)
    st0 = cluster.wait_status(0, lambda s: s.ready)
    ours = FLANNEL_VXLAN_LEASE.format(ip=cluster.lab.addresses[0], mac=st0.lease.vtep_mac)

    cluster.start(1, ["--public-ip", cluster.lab.addresses[0]])
    st1 = cluster.wait_status(1, lambda s: s.ready)
    assert st1.lease.subnet != st0.lease.subnet
    assert leases(etcd, cluster.prefix)[key_of(st0.lease.subnet)]["value"] == ours
    assert cluster.procs[0].poll() is None and cluster.status(0).lease.subnet == st0.lease.subnet
    assert f"lease {st0.lease.subnet} has our PublicIP" in cluster.log(1)
    assert cluster.stop(1) == 0  # its lease (our PublicIP, its MAC) stays in etcd

    # a copy of our exact lease at the first subnet in etcd's key order
    names = sorted(key_of(f"10.244.{i}.0/24") for i in range(1, 255))
    copy = next(n for n in names if n not in (key_of(st0.lease.subnet), key_of(st1.lease.subnet)))
    etcd.etcdctl("put", f"{cluster.prefix}/subnets/{copy}", ours)
    assert cluster.stop(0) == 0
    cluster.start(0)
    assert cluster.wait_status(0, lambda s: s.ready).lease.subnet == st0.lease.subnet
    stored = leases(etcd, cluster.prefix)
    assert stored[copy]["value"] == ours  # left alone, not deleted
    assert stored[key_of(st1.lease.subnet)]["value"] != ours  # node 1's lease left alone too
