"""udpflannel as a flanneld udp node (Backend.Type "udp"), and as the bridge that
keeps every pair of a cluster connected while its config moves from udp to vxlan.

The other side is always something we did not write the rules for: the lab's
flanneld-udp stand-in (udpflannel.lab.flanneld_udp, a C proxy built from flannel's
udp backend), a kernel VXLAN device programmed as flanneld's vxlan backend programs
it, scapy's dissectors for what is on the wire, and the receiving kernels (which
must accept what each side writes into its TUN, checksums and all).

Layout: one udp-config cluster on the embedded registry (a udpflannel node, a
flanneld-udp peer, and a third namespace that plays an unknown host), then the
migration scenarios on a real etcd in the lab's hub namespace.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import sqlite3
import subprocess
import sys
import uuid

import pytest
from pyroute2.netlink.exceptions import NetlinkError
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from udpflannel.core import subnetenv
from udpflannel.core.status import NodeStatus, PeerStatus
from udpflannel.lab import kernelvxlan, probe
from udpflannel.lab.benchlib import tools
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.flanneld_udp import FlanneldUdpPeer
from udpflannel.lab.netns import Lab, Namespace

try:
    from .etcd_server import FLANNEL_UDP_LEASE, FLANNEL_VXLAN_LEASE, EtcdServer, etcd_in_hub, subnet_leases
except ImportError:
    from etcd_server import FLANNEL_UDP_LEASE, FLANNEL_VXLAN_LEASE, EtcdServer, etcd_in_hub, subnet_leases

ENGINE = os.environ.get("UDPFLANNEL_TEST_ENGINE", "compiled")
NETWORK = "10.5.0.0/16"
UDP_CONFIG = json.dumps({"Network": NETWORK, "Backend": {"Type": "udp"}})
UDP_OVERHEAD = 28  # outer IPv4 + UDP: flannel's udp encapOverhead
UDP_PORT = 8285
VXLAN_PORT = 8472
IP_RECVTTL = 12  # Linux; not exported by Python's socket module
TCP_BYTES = 3 * 1024 * 1024 + 77  # odd on purpose: no segment boundary lines up with it
MIGRATION_NET = "10.244.0.0/16"
VXLAN_CONFIG = json.dumps({"Network": MIGRATION_NET, "Backend": {"Type": "vxlan"}})
OLD_UDP_CONFIG = json.dumps({"Network": MIGRATION_NET, "Backend": {"Type": "udp"}})
KERNEL_SUBNET = "10.244.200.0/24"
KERNEL_MAC = "02:aa:bb:cc:dd:09"


# -- helpers ------------------------------------------------------------------------

def flanneld_udp_value(public_ip: str) -> bytes:
    """flannel's LeaseAttrs{PublicIP} as Go's encoder writes it (the udp backend)."""
    return FLANNEL_UDP_LEASE.format(ip=public_ip).encode()


def overlay_addr_of(subnet: str) -> str:
    return str(ipaddress.IPv4Network(subnet).network_address)




def send_once(ns: Namespace, data: bytes, to: tuple[str, int], ttl: int) -> None:
    with udp_socket(ns, ttl=ttl) as sock:
        sock.sendto(data, to)


def udp_socket(ns: Namespace, bind: tuple[str, int] | None = None, ttl: int | None = None,
               recv_ttl: bool = False, timeout: float = 5.0) -> socket.socket:
    sock = ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    if ttl is not None:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
    if recv_ttl:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
    if bind is not None:
        sock.bind(bind)
    sock.settimeout(timeout)
    return sock


def receive_with_ttl(sock: socket.socket) -> tuple[bytes, tuple[str, int], int]:
    data, ancillary, _, source = sock.recvmsg(4096, socket.CMSG_SPACE(4))
    ttls = [int.from_bytes(d[:4], "little") for level, kind, d in ancillary
            if level == socket.IPPROTO_IP and kind == socket.IP_TTL]
    assert len(ttls) == 1, ancillary
    return data, source, ttls[0]


def nothing_waiting(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    return False


def reaches(src: Namespace, addr: str, count: int = 3, timeout: float = 1.0) -> bool:
    """Any echo answered. No route at all (ENETUNREACH on send) is 'no'."""
    try:
        return any(probe.ping(src, addr, count=count, timeout=timeout))
    except OSError:
        return False


def counter_after(cluster: Cluster, i: int, name: str, before: int, what: str) -> int:
    """Wait for counter ``name`` of node i to move past ``before``; its new value."""
    st = cluster.wait_status(i, lambda s: s.dataplane.counters[name] > before, 10, what)
    return st.dataplane.counters[name]


def peer_framings(st: NodeStatus) -> dict[str, str]:
    assert st.peer_list is not None, "start the daemon with --metrics-peers"
    return {p.subnet: p.framing for p in st.peer_list}


# -- a udp-config cluster on the embedded registry --------------------------------------

@pytest.fixture(scope="module")
def udp_mode(tmp_path_factory):
    """Node 1: udpflannel under the udp config (it stores the config); node 2: the
    flanneld-udp peer on the same registry; node 3: an unknown host (no lease)."""
    workdir = str(tmp_path_factory.mktemp("udpmode"))
    net_config = os.path.join(workdir, "net-conf.json")
    with open(net_config, "w") as f:
        f.write(UDP_CONFIG)
    with Lab(3, tag="uub") as lab:
        cluster = Cluster(lab, workdir, engine=ENGINE,
                          extra_args=["--net-config", net_config, "--metrics-peers"])
        peer = FlanneldUdpPeer.beside(cluster, lab.nodes[1])
        try:
            cluster.start(0)
            cluster.wait_status(0, lambda s: s.ready, 20, "ready")
            peer.start().wait_ready()
            cluster.wait_status(0, lambda s: s.dataplane.peers == 1, 10, "routing to the peer")
            tools.wait_reachable(lab.nodes[0], peer.overlay_addr, timeout=10)
            tools.wait_reachable(lab.nodes[1], cluster.overlay_addr(0), timeout=10)
            yield lab, cluster, peer
        finally:
            peer.stop()
            cluster.stop_all()


def test_ping_and_tcp_both_ways_with_a_flanneld_udp_node(udp_mode):
    lab, cluster, peer = udp_mode
    ours = cluster.overlay_addr(0)
    assert all(probe.ping(lab.nodes[0], peer.overlay_addr, count=3))
    assert all(probe.ping(lab.nodes[1], ours, count=3))
    payload = os.urandom(TCP_BYTES)
    expected = (len(payload), hashlib.sha256(payload).hexdigest())
    before = cluster.status(0).dataplane.counters
    assert probe.tcp_transfer(lab.nodes[0], lab.nodes[1], peer.overlay_addr, payload) == expected
    assert probe.tcp_transfer(lab.nodes[1], lab.nodes[0], ours, payload) == expected
    after = cluster.status(0).dataplane.counters
    # both directions went through the engine (not around it), and nothing was dropped
    assert after["tx_bytes"] - before["tx_bytes"] > TCP_BYTES
    assert after["rx_bytes"] - before["rx_bytes"] > TCP_BYTES
    assert {k: after[k] - before[k] for k in after if k.startswith("drop_") and after[k] != before[k]} == {}


def test_lease_device_and_status_are_a_flanneld_udp_nodes(udp_mode):
    lab, cluster, peer = udp_mode
    st = cluster.status(0)
    ours = ipaddress.IPv4Network(st.lease.subnet)
    with sqlite3.connect(cluster.registry_file) as db:
        rows = {k: bytes(v) for k, v in db.execute("SELECT subnet, value FROM leases")}
    key = f"{ours.network_address}-{ours.prefixlen}"
    peer_key = f"{peer.subnet.network_address}-{peer.subnet.prefixlen}"
    assert rows == {key: flanneld_udp_value(lab.addresses[0]),
                    peer_key: flanneld_udp_value(lab.addresses[1])}
    # the same bytes as the flanneld-udp peer's lease, its address aside
    assert rows[key] == rows[peer_key].replace(lab.addresses[1].encode(), lab.addresses[0].encode())

    mtu = lab.mtu - UDP_OVERHEAD
    with lab.nodes[0].ipr() as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname="flannel0")[0])[0]
        addrs = [(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=link["index"])
                 if a["family"] == socket.AF_INET]
        route = ipr.route("get", dst=peer.overlay_addr)[0]
    assert link.get_attr("IFLA_MTU") == mtu == st.dataplane.mtu
    assert addrs == [(str(ours.network_address), 32)]  # flanneld udp's <subnet .0>/32
    assert route.get_attr("RTA_OIF") == link["index"]  # the whole network into the TUN
    with open(os.path.join(cluster.node_dir(0), "subnet.env")) as f:
        env = subnetenv.parse(f.read())
    assert (env.network, env.subnet_network, env.mtu) == (ipaddress.IPv4Network(NETWORK), ours, mtu)
    assert env.mtu == peer.wait_ready().mtu  # what the flanneld-udp peer wrote for itself

    assert st.lease.backend_type == "udp" and st.lease.vtep_mac is None
    assert st.dataplane.kind == "engine"
    assert st.peer_list == (PeerStatus(str(peer.subnet), lab.addresses[1], "udp"),)
    # the status command shows the same
    out = lab.nodes[0].popen([sys.executable, "-m", "udpflannel", "status", "--json",
                              "--admin-socket", cluster.admin_path(0)],
                             stdout=subprocess.PIPE, text=True).communicate(timeout=20)[0]
    assert NodeStatus.from_dict(json.loads(out)).peer_list == st.peer_list


def test_wire_format_to_and_from_the_flanneld_udp_node(udp_mode):
    """Judged by scapy on the peer's wire: what udpflannel sends is a datagram to port
    8285 whose payload is the bare inner IPv4 packet, TTL down by exactly one, every
    checksum right; what the flanneld-udp proxy sends back is accepted, and its TTL
    goes down by one more on our side (flannel's proxy does so on each side)."""
    lab, cluster, peer = udp_mode
    ours = cluster.overlay_addr(0)
    marker = f"to-flanneld-{uuid.uuid4().hex[:8]}".encode()
    wire = probe.packet_socket(lab.nodes[1], "eth0")
    sender = udp_socket(lab.nodes[0], ttl=17)
    receiver = udp_socket(lab.nodes[1], bind=(peer.overlay_addr, 9999), recv_ttl=True)
    try:
        sender.sendto(marker, (peer.overlay_addr, 9999))
        data, source, ttl = receive_with_ttl(receiver)
        assert (data, source[0], ttl) == (marker, ours, 15)  # 17 - ours - the proxy's
        outer = [f for f in map(Ether, probe.drain(wire)) if f.haslayer(UDP) and f[IP].src == lab.addresses[0]
                 and marker in bytes(f[UDP].payload)]
        assert len(outer) == 1, [f.summary() for f in outer]
        f = outer[0]
        assert (f[IP].dst, f[UDP].sport, f[UDP].dport) == (lab.addresses[1], UDP_PORT, UDP_PORT)
        payload = bytes(f[UDP].payload)
        inner = IP(payload)  # the whole payload is one bare IPv4 packet: no header before it
        assert payload[0] == 0x45 and inner.len == len(payload)
        assert (inner.src, inner.dst, inner.ttl, inner.proto) == (ours, peer.overlay_addr, 16, 17)
        rebuilt = IP(payload)
        del rebuilt.chksum, rebuilt[UDP].chksum
        rebuilt = IP(bytes(rebuilt))
        assert rebuilt.chksum == inner.chksum  # the header checksum follows the new TTL
        assert inner[UDP].chksum in (0, rebuilt[UDP].chksum)  # never a half-done offload sum
        assert (inner[UDP].dport, inner[Raw].load) == (9999, marker)

        back = f"from-flanneld-{uuid.uuid4().hex[:8]}".encode()
        home = udp_socket(lab.nodes[0], bind=(ours, 7777), recv_ttl=True)
        with home:
            rx_before = cluster.status(0).dataplane.counters["rx_packets"]
            send_once(lab.nodes[1], back, (ours, 7777), ttl=20)
            data, source, ttl = receive_with_ttl(home)
        assert (data, source[0], ttl) == (back, peer.overlay_addr, 18)  # 20 - proxy's - ours
        assert cluster.status(0).dataplane.counters["rx_packets"] > rx_before
        sent = [f for f in map(Ether, probe.drain(wire)) if f.haslayer(UDP) and f[IP].src == lab.addresses[1]
                and back in bytes(f[UDP].payload)]
        assert len(sent) == 1 and sent[0][UDP].dport == UDP_PORT and IP(bytes(sent[0][UDP].payload)).ttl == 19
    finally:
        for s in (wire, sender, receiver):
            s.close()


def test_unknown_spoofed_and_expired_datagrams_are_dropped_and_counted(udp_mode):
    lab, cluster, peer = udp_mode
    ours = cluster.overlay_addr(0)
    own_subnet = ipaddress.IPv4Network(cluster.status(0).lease.subnet)
    # an overlay address in a subnet nobody leased: neither ours nor the peer's
    stranger = next(str(s.network_address + 9) for s in ipaddress.IPv4Network(NETWORK).subnets(new_prefix=24)
                    if s not in (own_subnet, peer.subnet) and s.network_address.packed[2] >= 100)
    home = udp_socket(lab.nodes[0], bind=(ours, 7778))

    def datagram(src: str, ttl: int, text: bytes) -> bytes:
        return bytes(IP(src=src, dst=ours, ttl=ttl) / UDP(sport=4000, dport=7778) / text)

    def drop(reason: str, from_ns: Namespace, bind_addr: str, packet: bytes) -> None:
        name = "drop_" + reason
        counters = cluster.status(0).dataplane.counters
        with udp_socket(from_ns, bind=(bind_addr, 0)) as s:
            s.sendto(packet, (lab.addresses[0], UDP_PORT))
        after = counter_after(cluster, 0, name, counters[name], f"counting {reason}")
        assert after == counters[name] + 1
        assert cluster.status(0).dataplane.counters["rx_packets"] == counters["rx_packets"]
        assert nothing_waiting(home), f"{reason}: the datagram was delivered"

    try:
        # a host that holds no lease, with a well-formed packet from the peer's subnet
        drop("unknown_sender", lab.nodes[2], lab.addresses[2],
             datagram(peer.overlay_addr, 64, b"unknown-host"))
        # the peer's host speaking for an overlay address outside its own subnet
        drop("spoofed", lab.nodes[1], lab.addresses[1], datagram(stranger, 64, b"spoofed"))
        drop("spoofed", lab.nodes[1], lab.addresses[1], datagram(str(own_subnet.network_address + 5), 64,
                                                                 b"claims-to-be-us"))
        # a packet from the peer that has no hop left (flannel's proxy drops TTL 1 too)
        drop("ttl_expired", lab.nodes[1], lab.addresses[1], datagram(peer.overlay_addr, 1, b"expired"))
        # and one the proxy itself forwards with TTL 1 (a local TTL of 2, minus its hop)
        before = cluster.status(0).dataplane.counters["drop_ttl_expired"]
        send_once(lab.nodes[1], b"expired-via-proxy", (ours, 7778), ttl=2)
        assert counter_after(cluster, 0, "drop_ttl_expired", before, "the proxy's TTL 1") == before + 1
        assert nothing_waiting(home)

        # outbound: a TTL 1 packet for the udp peer is not sent (counted on our side)
        far = udp_socket(lab.nodes[1], bind=(peer.overlay_addr, 9998))
        with far:
            before = cluster.status(0).dataplane.counters
            send_once(lab.nodes[0], b"expires-here", (peer.overlay_addr, 9998), ttl=1)
            counter_after(cluster, 0, "drop_ttl_expired", before["drop_ttl_expired"], "outbound TTL 1")
            after = cluster.status(0).dataplane.counters
            assert after["drop_ttl_expired"] == before["drop_ttl_expired"] + 1
            assert after["tx_packets"] == before["tx_packets"]
            assert nothing_waiting(far)
        # still fine afterwards
        assert all(probe.ping(lab.nodes[1], ours, count=2))
    finally:
        home.close()


def test_restart_under_the_udp_config_keeps_the_subnet(udp_mode):
    """A udp lease carries no MAC: a restarted node proves it is its own by PublicIP
    and the subnet it recorded, in subnet.env or (after a reboot emptied /run) in its
    state dir. Either way: the same subnet, the same lease bytes, no second lease."""
    lab, cluster, peer = udp_mode
    subnet = cluster.status(0).lease.subnet
    subnet_file = os.path.join(cluster.node_dir(0), "subnet.env")

    def leases() -> dict[str, bytes]:
        with sqlite3.connect(cluster.registry_file) as db:
            return {k: bytes(v) for k, v in db.execute("SELECT subnet, value FROM leases")}
    stored = leases()

    def restart(drop_subnet_file: bool) -> None:
        reused = cluster.log(0).count(f"reusing our lease {subnet}")
        assert cluster.stop(0) == 0
        if drop_subnet_file:
            os.unlink(subnet_file)
        cluster.start(0)
        st = cluster.wait_status(0, lambda s: s.ready, 20, "ready after the restart")
        assert st.lease.subnet == subnet
        assert cluster.log(0).count(f"reusing our lease {subnet}") == reused + 1
        assert leases() == stored
        assert "left alone" not in cluster.log(0)

    restart(drop_subnet_file=False)
    with open(os.path.join(cluster.node_dir(0), "flannel0.subnet")) as f:
        assert f.read().strip() == subnet  # the record in the state dir
    restart(drop_subnet_file=True)
    with open(subnet_file) as f:
        assert subnetenv.parse(f.read()).subnet_network == ipaddress.IPv4Network(subnet)
    tools.wait_reachable(lab.nodes[1], cluster.overlay_addr(0), timeout=10)
    assert all(probe.ping(lab.nodes[0], peer.overlay_addr, count=2))


# -- migrating a cluster from udp to vxlan, on etcd ---------------------------------------

@pytest.fixture(scope="module")
def etcd_lab(tmp_path_factory):
    """Six nodes and etcd on the hub's bridge address: the underlay the nodes tunnel
    over. Each test works under its own key prefix and on its own nodes."""
    with Lab(6, tag="uum") as lab, etcd_in_hub(lab, tmp_path_factory.mktemp("etcd")) as etcd:
        yield lab, etcd


def etcd_cluster(lab: Lab, etcd: EtcdServer, workdir: str, config: str) -> Cluster:
    prefix = f"/t-{uuid.uuid4().hex[:8]}/network"
    etcd.etcdctl("put", f"{prefix}/config", config)
    cluster = Cluster(lab, workdir, engine=ENGINE, etcd_endpoints=etcd.endpoint,
                      extra_args=["--etcd-prefix", prefix, "--metrics-peers"])
    cluster.prefix = prefix
    return cluster


def etcd_leases(etcd: EtcdServer, prefix: str) -> dict[str, str]:
    return {name: lease["value"] for name, lease in subnet_leases(etcd, prefix).items()}


def udp_listeners(ns: Namespace) -> str:
    return ns.run(["ss", "-Hnlu", "sport", f"= :{UDP_PORT}"], 10).stdout


def udp_no_ports(ns: Namespace) -> int:
    """The namespace's Udp NoPorts counter: datagrams for a port nobody listens on."""
    out = ns.run(["cat", "/proc/net/snmp"], 10).stdout
    head, values = [line.split() for line in out.splitlines() if line.startswith("Udp:")][:2]
    return int(values[head.index("NoPorts")])


def test_migration_every_pair_with_a_udpflannel_node_is_connected(etcd_lab, tmp_path):
    """The config says vxlan now. Node 1 is a flanneld udp node not yet restarted
    (--keep-udp), node 2 a kernel VXLAN node (flanneld's vxlan backend), nodes 3 and 4
    udpflannel engine nodes: each of those reaches every other node both ways, with the
    framing each peer's lease asks for."""
    lab, etcd = etcd_lab
    fu_ns, kv_ns = lab.nodes[0], lab.nodes[1]
    cluster = etcd_cluster(lab, etcd, str(tmp_path), VXLAN_CONFIG)
    fu = FlanneldUdpPeer(fu_ns, str(tmp_path / "fu"), etcd_endpoints=etcd.endpoint,
                         etcd_prefix=cluster.prefix, extra_args=["--keep-udp"])
    try:
        # the kernel node's lease first: nobody else can then pick its fixed subnet
        etcd.etcdctl("put", f"{cluster.prefix}/subnets/{KERNEL_SUBNET.replace('/', '-')}",
                     FLANNEL_VXLAN_LEASE.format(ip=lab.addresses[1], mac=KERNEL_MAC))
        fu.start().wait_ready()
        with kv_ns.ipr() as ipr:
            kv_index = kernelvxlan.create(ipr, local_ip=lab.addresses[1], underlay="eth0",
                                          subnet=KERNEL_SUBNET, vtep_mac=KERNEL_MAC)
        udpf = (2, 3)
        for i in udpf:
            cluster.start(i)
        sts = {i: cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 3, 20,
                                      "routing to the three others") for i in udpf}
        # flanneld's vxlan backend programs vxlan leases only: the operator's part here
        with kv_ns.ipr() as ipr:
            for st in sts.values():
                kernelvxlan.add_peer(ipr, kv_index, subnet=st.lease.subnet, vtep_mac=st.lease.vtep_mac,
                                     public_ip=st.lease.public_ip)

        addr = {0: fu.overlay_addr, 1: overlay_addr_of(KERNEL_SUBNET)}
        addr.update({i: overlay_addr_of(sts[i].lease.subnet) for i in udpf})
        for i in udpf:
            assert sts[i].lease.backend_type == "vxlan"
            assert peer_framings(cluster.status(i)) == {
                str(fu.subnet): "udp", KERNEL_SUBNET: "vxlan",
                sts[5 - i].lease.subnet: "vxlan"}  # the other udpflannel node
        pairs = [(a, b) for a in addr for b in addr if a != b and (a in udpf or b in udpf)]
        assert len(pairs) == 10
        for a, b in pairs:
            tools.wait_reachable(lab.nodes[a], addr[b], timeout=10)
        assert [(a + 1, b + 1) for a, b in pairs if not reaches(lab.nodes[a], addr[b], count=2)] == []

        # The pair without udpflannel is cut off, and that is flanneld's own limitation,
        # kept as it is: the flanneld udp node sends bare IP to the kernel node's 8285,
        # where nothing listens (kernel VXLAN speaks VXLAN on 8472 only), and flanneld's
        # vxlan backend ignores udp leases, so the kernel node has no route to it.
        assert udp_listeners(kv_ns).strip() == ""
        no_ports = udp_no_ports(kv_ns)
        assert not reaches(fu_ns, addr[1], count=2, timeout=0.5)
        assert udp_no_ports(kv_ns) >= no_ports + 2  # its echoes arrived, on a closed port
        with kv_ns.ipr() as ipr:
            try:
                via = ipr.route("get", dst=addr[0])[0].get_attr("RTA_OIF")
            except NetlinkError:
                via = None  # no route at all
            assert via != kv_index
        assert not reaches(kv_ns, addr[0], count=2, timeout=0.5)
    finally:
        fu.stop()
        cluster.stop_all()


def test_runbook_udp_node_meets_a_node_restarted_under_vxlan(etcd_lab, tmp_path):
    """The runbook's middle step: both nodes run udpflannel under the udp config, the
    operator flips the config to vxlan and restarts one. The other still runs the old
    config (its lease is a udp lease): it reaches the restarted one by VXLAN, which
    answers in flanneld's udp framing. Checked on the old node's wire. The restarted
    node keeps its subnet."""
    lab, etcd = etcd_lab
    old, new = 4, 5
    cluster = etcd_cluster(lab, etcd, str(tmp_path), OLD_UDP_CONFIG)
    try:
        for i in (old, new):
            cluster.start(i)
        for i in (old, new):
            cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 1, 20, "routing to the other")
        first = {i: cluster.status(i) for i in (old, new)}
        assert {st.lease.backend_type for st in first.values()} == {"udp"}
        tools.wait_reachable(lab.nodes[old], overlay_addr_of(first[new].lease.subnet), timeout=10)

        etcd.etcdctl("put", f"{cluster.prefix}/config", VXLAN_CONFIG)
        assert cluster.stop(new) == 0
        cluster.start(new)
        st_new = cluster.wait_status(new, lambda s: s.ready, 20, "ready under the vxlan config")
        assert st_new.lease.backend_type == "vxlan" and st_new.dataplane.mtu == lab.mtu - 50
        # It keeps the subnet of its udp lease, as flanneld does (flanneld reuses the lease
        # holding its PublicIP, whatever the backend): its pods keep their addresses and
        # no stale udp lease is left behind for the others to route.
        new_subnet, old_subnet = st_new.lease.subnet, first[old].lease.subnet
        assert new_subnet == first[new].lease.subnet, cluster.log(new)
        assert etcd_leases(etcd, cluster.prefix) == {
            old_subnet.replace("/", "-"): flanneld_udp_value(lab.addresses[old]).decode(),
            new_subnet.replace("/", "-"): FLANNEL_VXLAN_LEASE.format(ip=lab.addresses[new],
                                                                     mac=st_new.lease.vtep_mac)}
        cluster.wait_status(old, lambda s: peer_framings(s).get(new_subnet) == "vxlan", 10,
                            "routing to the restarted node by VXLAN")
        assert peer_framings(cluster.status(old)) == {new_subnet: "vxlan"}
        assert peer_framings(cluster.status(new)) == {old_subnet: "udp"}
        assert cluster.status(old).lease.backend_type == "udp"  # still the old config

        wire = probe.packet_socket(lab.nodes[old], "eth0")
        try:
            assert all(probe.ping(lab.nodes[old], overlay_addr_of(new_subnet), count=2))
            assert all(probe.ping(lab.nodes[new], overlay_addr_of(old_subnet), count=2))
            frames = [f for f in map(Ether, probe.drain(wire)) if f.haslayer(UDP)]
        finally:
            wire.close()
        out = [f for f in frames if f[IP].src == lab.addresses[old] and f[IP].dst == lab.addresses[new]]
        back = [f for f in frames if f[IP].src == lab.addresses[new] and f[IP].dst == lab.addresses[old]]
        assert len(out) == 4 and len(back) == 4  # 2 requests + 2 replies each way, no stray frame
        for f in out:  # udp node -> vxlan node: VXLAN on 8472, to its VtepMAC
            assert f[UDP].dport == VXLAN_PORT
            vx = VXLAN(bytes(f[UDP].payload))
            assert vx.vni == 1 and vx[Ether].dst == st_new.lease.vtep_mac
            assert (vx[IP].src, vx[IP].dst) == (overlay_addr_of(old_subnet), overlay_addr_of(new_subnet))
        for f in back:  # vxlan node -> udp node: bare IPv4 on 8285, from 8285
            assert (f[UDP].sport, f[UDP].dport) == (UDP_PORT, UDP_PORT)
            inner = IP(bytes(f[UDP].payload))
            assert inner.len == len(f[UDP].payload)
            assert (inner.src, inner.dst, inner.ttl) == (overlay_addr_of(new_subnet),
                                                         overlay_addr_of(old_subnet), 63)
    finally:
        cluster.stop_all()

