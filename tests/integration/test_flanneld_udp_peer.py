"""The lab's flanneld-udp peer (udpflannel.lab.flanneld_udp), checked as a flanneld udp
node: real processes in namespaces, on the embedded registry and on etcd.

What is judged by something we did not write: the wire format by scapy's dissectors
and the kernel (which must accept what the proxy writes into the TUN), the lease
bytes against flannel's LeaseAttrs encoding, the ICMP net unreachable by the
sender's kernel (connect() fails with ENETUNREACH).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
import socket
import sqlite3
import subprocess
import time
import uuid

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from udpflannel.core.lease import Lease
from udpflannel.lab import probe
from udpflannel.lab.benchlib import tools
from udpflannel.lab.flanneld_udp import FlanneldUdpPeer
from udpflannel.lab.netns import Lab
from udpflannel.registry.embedded import EmbeddedRegistry

try:
    from .etcd_server import FLANNEL_UDP_LEASE, etcd_in_hub, subnet_leases
except ImportError:
    from etcd_server import FLANNEL_UDP_LEASE, etcd_in_hub, subnet_leases

NETWORK = "10.5.0.0/16"
CONFIG = json.dumps({"Network": NETWORK, "Backend": {"Type": "udp"}})
UNOWNED = "10.5.0.1"  # the zeroth subnet is never leased (SubnetMin skips it)
FAKE_SUBNET = ipaddress.IPv4Network("10.5.250.0/24")  # a lease with no proxy behind it
IP_RECVTTL = 12  # Linux; not exported by Python's socket module


def flanneld_udp_value(public_ip: str) -> bytes:
    """flannel's LeaseAttrs{PublicIP} as Go's encoder writes it (udp backend)."""
    return FLANNEL_UDP_LEASE.format(ip=public_ip).encode()


def start_peers(lab: Lab, workdir: str, count: int, **kw) -> list[FlanneldUdpPeer]:
    peers = [FlanneldUdpPeer(lab.nodes[i], os.path.join(workdir, f"fu{i + 1}"), **kw) for i in range(count)]
    for peer in peers:  # one at a time: the first stores the config
        peer.start().wait_ready()
    for i in range(count):
        for j, other in enumerate(peers):
            if i != j:
                tools.wait_reachable(lab.nodes[i], other.overlay_addr, timeout=10)
    return peers




def set_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


# -- two peers on the embedded registry ------------------------------------------------

@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("fu"))
    registry = os.path.join(workdir, "registry.db")
    with Lab(3, tag="ufu") as lab:
        peers: list[FlanneldUdpPeer] = []
        try:
            peers = start_peers(lab, workdir, 2, registry_file=registry, net_config=CONFIG)
            yield lab, peers, registry
        finally:
            for peer in peers:
                peer.stop()


def test_ping_and_tcp_both_ways(embedded):
    lab, (a, b), _ = embedded
    assert all(probe.ping(lab.nodes[0], b.overlay_addr, count=3))
    assert all(probe.ping(lab.nodes[1], a.overlay_addr, count=3))
    there = probe.tcp_stream(lab.nodes[0], lab.nodes[1], b.overlay_addr, 1.0)
    back = probe.tcp_stream(lab.nodes[1], lab.nodes[0], a.overlay_addr, 1.0)
    assert there.bytes > 1_000_000 and back.bytes > 1_000_000


def test_lease_bytes_are_flanneld_udps(embedded):
    lab, peers, registry = embedded
    with sqlite3.connect(registry) as db:
        rows = dict(db.execute("SELECT subnet, value FROM leases").fetchall())
    expected = {f"{p.subnet.network_address}-{p.subnet.prefixlen}": flanneld_udp_value(lab.addresses[i])
                for i, p in enumerate(peers)}
    assert {k: bytes(v) for k, v in rows.items()} == expected


def test_wire_format_seen_by_scapy(embedded):
    """Node 3 holds a *vxlan* lease but no proxy: peer 1 must still send it bare IP on
    port 8285 (flannel's udp backend ignores BackendType); what node 3 sends back,
    built by scapy, must reach a socket on node 1 with its TTL decremented."""
    lab, (a, _b), registry = embedded
    node1, node3 = lab.nodes[0], lab.nodes[2]

    async def lease(create: bool) -> None:
        reg = EmbeddedRegistry(registry)
        try:
            if create:
                await reg.create_lease(Lease(FAKE_SUBNET, ipaddress.IPv4Address(lab.addresses[2]),
                                             "vxlan", 1, "02:00:00:00:00:03"), 3600)
            else:
                await reg.delete_lease(FAKE_SUBNET)
        finally:
            await reg.close()

    wire = probe.packet_socket(node3, "eth0")
    listener = node3.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind((lab.addresses[2], 8285))
    listener.settimeout(0.2)
    sender = node1.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 17)
    target = str(FAKE_SUBNET.network_address + 7)
    asyncio.run(lease(True))
    try:
        deadline = time.monotonic() + 10
        while True:  # until peer 1 has learnt the route
            sender.sendto(b"wire-check", (target, 9999))
            try:
                payload, origin = listener.recvfrom(65536)
                break
            except socket.timeout:
                assert time.monotonic() < deadline, "peer 1 never routed to the vxlan lease"
        assert origin == (lab.addresses[0], 8285)
        frames = [Ether(f) for f in probe.drain(wire)]
        outer = [f for f in frames if f.haslayer(UDP) and f[UDP].dport == 8285 and f[IP].dst == lab.addresses[2]]
        assert outer and all(f[UDP].sport == 8285 and f[IP].src == lab.addresses[0] for f in outer)
        assert payload in [bytes(f[UDP].payload) for f in outer]
        inner = IP(payload)  # the whole payload is one bare IPv4 packet
        assert payload[0] == 0x45 and len(payload) == inner.len
        assert (inner.src, inner.dst, inner.ttl, inner.proto) == (a.overlay_addr, target, 16, 17)
        clone = IP(payload)
        del clone.chksum
        assert IP(bytes(clone)).chksum == inner.chksum
        assert (inner[UDP].dport, inner[Raw].load) == (9999, b"wire-check")

        # and back: scapy's packet, bare in UDP to port 8285, reaches a socket on node 1
        receiver = node1.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        receiver.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
        receiver.bind((a.overlay_addr, 7777))
        receiver.settimeout(5)
        with receiver:
            back = IP(src=target, dst=a.overlay_addr, ttl=20) / UDP(sport=9999, dport=7777) / b"from-scapy"
            listener.sendto(bytes(back), (lab.addresses[0], 8285))
            data, ancillary, _, source = receiver.recvmsg(2048, socket.CMSG_SPACE(4))
        assert (data, source) == (b"from-scapy", (target, 9999))
        ttl = [int.from_bytes(d[:4], "little") for level, kind, d in ancillary
               if level == socket.IPPROTO_IP and kind == socket.IP_TTL]
        assert ttl == [19]
    finally:
        asyncio.run(lease(False))
        for s in (wire, listener, sender):
            s.close()


def test_icmp_net_unreachable_for_an_unowned_address(embedded):
    """flannel's proxy answers a packet it has no route for with ICMP net unreachable
    from the TUN's own address. That source is local to the node, so the node's kernel
    takes the ICMP for a martian and drops it (Linux does unless accept_local is set
    on the receiving device): we set accept_local on flannel0 to let it through and
    judge the ICMP by the sender's kernel. No ICMP is sent about ICMP (a ping)."""
    lab, (a, _b), _ = embedded
    node1 = lab.nodes[0]
    node1.call(set_sysctl, "/proc/sys/net/ipv4/conf/flannel0/accept_local", "1")
    tun = probe.packet_socket(node1, "flannel0")
    try:
        assert probe.ping(node1, UNOWNED, count=1, timeout=0.3) == [None]
        client = node1.call(socket.socket)
        client.settimeout(3)
        started = time.monotonic()
        with client, pytest.raises(OSError) as failure:
            client.connect((UNOWNED, 80))
        assert failure.value.errno == errno.ENETUNREACH and time.monotonic() - started < 1.0
        # what the proxy wrote into the TUN (a TUN has no link header: bare IP)
        icmps = [IP(p) for p in probe.drain(tun) if p[0] == 0x45 and IP(p).haslayer(ICMP) and IP(p)[ICMP].type == 3]
        assert len(icmps) == 1, [p.summary() for p in icmps]
        reply = icmps[0]
        assert (reply.src, reply.dst, reply.ttl, reply[ICMP].code) == (a.overlay_addr, a.overlay_addr, 8, 0)
        quoted = reply[ICMP].payload
        assert (quoted.dst, quoted.proto) == (UNOWNED, 6)
    finally:
        tun.close()
        node1.call(set_sysctl, "/proc/sys/net/ipv4/conf/flannel0/accept_local", "0")


def test_refuses_other_backends_unless_kept_udp(embedded, tmp_path):
    """A vxlan config: refused with one line, or (--keep-udp, a flanneld udp node that
    has not been restarted since the config changed) run as udp on port 8285."""
    lab, _, _ = embedded
    registry = str(tmp_path / "vxlan.db")
    vxlan = json.dumps({"Network": "10.6.0.0/16", "Backend": {"Type": "vxlan"}})
    refused = FlanneldUdpPeer(lab.nodes[2], str(tmp_path / "refused"), registry_file=registry,
                              net_config=vxlan)
    refused.start()
    assert refused.proc.wait(20) == 1
    assert refused.log_tail(5).strip().splitlines()[-1].startswith(
        "flanneld-udp: error: network config has Backend Type 'vxlan'")
    with FlanneldUdpPeer(lab.nodes[2], str(tmp_path / "kept"), registry_file=registry,
                         extra_args=["--keep-udp"]) as kept:
        env = kept.wait_ready()
        assert env.mtu == lab.mtu - 28 and env.network == ipaddress.IPv4Network("10.6.0.0/16")
        with sqlite3.connect(registry) as db:
            assert [bytes(v) for (v,) in db.execute("SELECT value FROM leases")] == \
                [flanneld_udp_value(lab.addresses[2])]
        bound = lab.nodes[2].popen(["ss", "-Hnlu", "sport", "= :8285"], stdout=subprocess.PIPE, text=True)
        assert f"{lab.addresses[2]}:8285" in bound.communicate(timeout=10)[0]


# -- two peers on etcd --------------------------------------------------------------------

def test_two_peers_on_etcd(tmp_path):
    """Ping and TCP both ways over etcd; the lease bytes in etcd; SIGTERM stops a peer
    cleanly (exit 0, its proxy gone, flannel0 removed, the lease kept)."""
    prefix = f"/t-{uuid.uuid4().hex[:8]}/network"
    with Lab(2, tag="ufv") as lab, etcd_in_hub(lab, tmp_path / "etcd") as etcd:
        peers: list[FlanneldUdpPeer] = []
        try:
            etcd.etcdctl("put", f"{prefix}/config", CONFIG)
            peers = start_peers(lab, str(tmp_path), 2, etcd_endpoints=etcd.endpoint, etcd_prefix=prefix)
            a, b = peers
            assert all(probe.ping(lab.nodes[0], b.overlay_addr, count=2))
            assert all(probe.ping(lab.nodes[1], a.overlay_addr, count=2))
            assert probe.tcp_stream(lab.nodes[0], lab.nodes[1], b.overlay_addr, 0.5).bytes > 500_000
            assert probe.tcp_stream(lab.nodes[1], lab.nodes[0], a.overlay_addr, 0.5).bytes > 500_000

            stored = {name: lease["value"] for name, lease in subnet_leases(etcd, prefix).items()}
            assert stored == {f"{p.subnet.network_address}-{p.subnet.prefixlen}":
                              FLANNEL_UDP_LEASE.format(ip=lab.addresses[i]) for i, p in enumerate(peers)}

            proxy_pid = int(b.log_tail(50).split("proxy pid ")[1].split()[0])
            assert b.stop() == 0
            assert not os.path.exists(f"/proc/{proxy_pid}")
            with lab.nodes[1].ipr() as ipr:
                assert ipr.link_lookup(ifname="flannel0") == []
            assert "udpproxy: stopped:" in b.log_tail(5)
            assert len(etcd.etcdctl_json("get", f"{prefix}/subnets/", "--prefix")["kvs"]) == 2
        finally:
            for peer in peers:
                peer.stop()
