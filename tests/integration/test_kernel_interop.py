"""udpflannel next to a Linux kernel VXLAN node programmed as flannel's vxlan backend
programs it: the kernel is the independent judge of our wire format."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from oldkernels import kernels

from udpflannel.core.lease import Lease
from udpflannel.lab import kernelvxlan, probe
from udpflannel.registry.embedded import EmbeddedRegistry

KERNEL_SUBNET = "10.244.200.0/24"
KERNEL_MAC = "02:aa:bb:cc:dd:01"


@pytest.fixture(params=kernels("no-udp-offload", "no-tun-offload"))
def mixed(make_lab, make_cluster, request):
    """Node 1 runs udpflannel (on this kernel, or as on an older one: its batched
    paths then face the kernel's frames); node 2 runs kernel VXLAN and holds a lease in
    the same registry, as a flanneld vxlan node would."""
    lab = make_lab(2)
    cluster = make_cluster(lab, kernel=request.param)
    cluster.start(0)
    st = cluster.wait_status(0, lambda s: s.ready)
    with lab.nodes[1].ipr() as ipr:
        index = kernelvxlan.create(ipr, local_ip=lab.addresses[1], underlay="eth0",
                                   subnet=KERNEL_SUBNET, vtep_mac=KERNEL_MAC)
        kernelvxlan.add_peer(ipr, index, subnet=st.lease.subnet, vtep_mac=st.lease.vtep_mac,
                             public_ip=lab.addresses[0])

    async def register() -> None:
        reg = EmbeddedRegistry(cluster.registry_file)
        try:
            await reg.create_lease(Lease(ipaddress.IPv4Network(KERNEL_SUBNET),
                                         ipaddress.IPv4Address(lab.addresses[1]), "vxlan", 1,
                                         KERNEL_MAC), 3600)
        finally:
            await reg.close()
    asyncio.run(register())
    cluster.wait_status(0, lambda s: s.dataplane.peers == 1)
    return lab, cluster, str(ipaddress.IPv4Network(st.lease.subnet).network_address)


def test_ping_both_ways_with_kernel_vxlan(mixed):
    lab, cluster, ours = mixed
    theirs = str(ipaddress.IPv4Network(KERNEL_SUBNET).network_address)
    assert all(probe.ping(lab.nodes[0], theirs, count=3))
    assert all(probe.ping(lab.nodes[1], ours, count=3))


def test_tcp_both_ways_with_kernel_vxlan(mixed):
    lab, cluster, ours = mixed
    theirs = str(ipaddress.IPv4Network(KERNEL_SUBNET).network_address)
    there = probe.tcp_stream(lab.nodes[0], lab.nodes[1], theirs, 1.0)
    back = probe.tcp_stream(lab.nodes[1], lab.nodes[0], ours, 1.0)
    assert there.bytes > 1_000_000 and back.bytes > 1_000_000
    c = cluster.status(0).dataplane.counters
    assert c["rx_packets"] > 1000 and c["tx_packets"] > 1000
    # the kernel's frames passed every check of ours: nothing was dropped as malformed
    # the kernel peer on its default offloads hands over unfinished checksums
    # (CHECKSUM_PARTIAL over veth): TCP works only because the engine completes them
    assert c["rx_csum_completed"] > 1000
    assert {k: v for k, v in c.items() if k.startswith("drop_") and k != "drop_no_route" and v} == {}
