"""Hostile datagrams at a daemon's VXLAN port while real traffic flows through it:
the traffic is undisturbed and every bad datagram is counted under its reason."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

import pytest
from oldkernels import kernels
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from udpflannel.lab import probe

COUNT = 100


@pytest.mark.parametrize("kernel", kernels("no-udp-offload"))
def test_hostile_datagrams_are_counted_and_traffic_survives(make_lab, make_cluster, kernel):
    """(On an older kernel the hostile datagrams share recvmmsg batches with the
    stream's segments, and every one is still counted under its reason.)"""
    lab = make_lab(3)  # node 3 runs no daemon: an unknown host on the underlay
    cluster = make_cluster(lab, kernel=kernel)
    cluster.start(0)
    cluster.start(1)
    cluster.wait_converged()
    a, b = cluster.status(0), cluster.status(1)
    a_net, b_net = ipaddress.IPv4Network(a.lease.subnet), ipaddress.IPv4Network(b.lease.subnet)
    target = (lab.addresses[1], 8472)

    def frame(src: str, *, vni=1, flags=0x08, dst_mac=b.lease.vtep_mac, ethertype=None) -> bytes:
        eth = Ether(dst=dst_mac, src=a.lease.vtep_mac)
        if ethertype is not None:
            eth.type = ethertype
        return bytes(VXLAN(flags=flags, vni=vni) / eth / IP(src=src, dst=str(b_net[1])) / ICMP())

    good_src = str(a_net[5])
    unleased = str(ipaddress.IPv4Network("10.244.0.0/16")[-2])  # inside the overlay, no owner
    from_peer = {  # sent from node 1's underlay address: a known peer misbehaving
        "drop_bad_flags": frame(good_src, flags=0x0C),
        "drop_bad_vni": frame(good_src, vni=2),
        "drop_bad_mac": frame(good_src, dst_mac="02:00:00:00:00:99"),
        "drop_bad_ethertype": frame(good_src, ethertype=0x0806),
        "drop_spoofed": frame(unleased),
        "drop_short": frame(good_src)[:30],
        "drop_bad_ip": frame(good_src)[:-4],  # IP total length now exceeds the datagram
    }
    from_stranger = {"drop_unknown_sender": frame(good_src)}

    before = cluster.status(1).dataplane.counters
    result: dict = {}
    stream = threading.Thread(target=lambda: result.setdefault(
        "tcp", probe.tcp_stream(lab.nodes[0], lab.nodes[1], cluster.overlay_addr(1), 2.0)))
    stream.start()
    try:
        time.sleep(0.3)
        for ns, batch in ((lab.nodes[0], from_peer), (lab.nodes[2], from_stranger)):
            sock = ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
            with sock:
                for n in range(COUNT):
                    for datagram in batch.values():
                        sock.sendto(datagram, target)
                    if n % 10 == 9:
                        time.sleep(0.002)  # stay well inside the receive buffer
    finally:
        stream.join(15)
    assert result["tcp"].bytes > 1_000_000  # content-checked by the receiver
    after = cluster.status(1).dataplane.counters
    for reason in list(from_peer) + list(from_stranger):
        assert after[reason] - before[reason] == COUNT, reason
    # and the daemon is still healthy: both directions still work
    assert all(probe.ping(lab.nodes[1], cluster.overlay_addr(0), count=2))


def test_the_udp_framing_port_is_open_only_while_a_peer_speaks_it(make_lab, make_cluster):
    """In a vxlan cluster port 8285 (flanneld's udp framing) is closed, so nobody can
    spoof a node there; a lease of a udp-framing node opens it, its removal closes it."""
    import asyncio

    from udpflannel.core.lease import Lease
    from udpflannel.registry.embedded import EmbeddedRegistry

    lab = make_lab(3)  # node 3 stands for the udp-framing node: only its lease is needed
    cluster = make_cluster(lab)
    cluster.start(0)
    cluster.start(1)
    cluster.wait_converged()
    node = lab.nodes[1]

    def listening() -> bool:
        out = node.run(["ss", "-ulnH", "sport = :8285"], 15).stdout
        return bool(out.strip())

    def until(predicate, what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"{what}: {cluster.log_tail(1)}"
            time.sleep(0.1)

    async def registry(call):
        reg = EmbeddedRegistry(cluster.registry_file)
        try:
            return await call(reg)
        finally:
            await reg.close()

    udp_subnet = ipaddress.IPv4Network("10.244.250.0/24")
    assert not listening()
    asyncio.run(registry(lambda r: r.create_lease(
        Lease(udp_subnet, ipaddress.IPv4Address(lab.addresses[2]), "", None, None), 3600)))
    until(listening, "8285 did not open for the udp peer")
    cluster.wait_log(1, "flanneld udp framing: listening on port 8285 (a peer speaks it)")
    assert all(probe.ping(lab.nodes[0], cluster.overlay_addr(1), count=2))  # VXLAN undisturbed
    asyncio.run(registry(lambda r: r.delete_lease(udp_subnet)))
    until(lambda: not listening(), "8285 stayed open without a udp peer")
    assert all(probe.ping(lab.nodes[0], cluster.overlay_addr(1), count=2))


def test_spoofed_packets_for_anything_but_our_pods_are_dropped(make_lab, make_cluster):
    """The attack: a datagram whose outer source is a known node's address, carrying a
    packet for a host address, a broadcast, another subnet: dropped and counted as
    bad_destination, never written to the TUN."""
    lab = make_lab(2)
    cluster = make_cluster(lab)
    cluster.start(0)
    cluster.start(1)
    cluster.wait_converged()
    a, b = cluster.status(0), cluster.status(1)
    a_net, b_net = ipaddress.IPv4Network(a.lease.subnet), ipaddress.IPv4Network(b.lease.subnet)
    bad = [str(b_net.broadcast_address), "8.8.8.8", lab.addresses[1], "255.255.255.255", str(a_net[9])]
    before = cluster.status(1).dataplane.counters
    sock = lab.nodes[0].call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        for dst in bad:
            eth = Ether(dst=b.lease.vtep_mac, src=a.lease.vtep_mac)
            sock.sendto(bytes(VXLAN(flags=0x08, vni=1) / eth / IP(src=str(a_net[5]), dst=dst) / ICMP()),
                        (lab.addresses[1], 8472))
    deadline = time.monotonic() + 5
    while cluster.status(1).dataplane.counters["drop_bad_destination"] - before["drop_bad_destination"] < len(bad):
        assert time.monotonic() < deadline, cluster.status(1).dataplane.counters
        time.sleep(0.05)
    after = cluster.status(1).dataplane.counters
    assert after["drop_bad_destination"] - before["drop_bad_destination"] == len(bad)
    assert after["rx_packets"] == before["rx_packets"]
