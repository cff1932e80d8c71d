"""Two data planes in one cluster (kernel-plane and engine nodes side by side), on a
real etcd, in namespaces.

One Lab and one etcd (in the hub namespace, on the underlay, as in test_etcd_cluster)
serve the whole module. Each test adds fresh node namespaces with ``lab.add_node()``
and works under its own etcd prefix: the kernel plane leaves flannel.<VNI>, its
neighbours and routes in place on purpose, so a namespace that ran one is never
handed to another test.

What is proved, each by real devices, routes and packets:
* an engine node, a --dataplane kernel node, an auto node (which picks the kernel)
  and a node programmed by hand as flanneld's vxlan backend does form one cluster:
  every pair pings, TCP works both ways between the engine and each kernel peer on
  the kernel's default offloads (the engine completes their unfinished checksums);
* auto falls back to the engine, with one line saying why, when the kernel refuses
  the VXLAN device;
* a kernel-plane daemon restart (SIGTERM, kill -9) is no outage: a paced TCP stream
  crosses both, and netlink never reports the device or its entries deleted;
* Backend.MTU, DirectRouting (both planes), outer source ports on the wire, a fresh
  engine node's hygiene, flanneld udp leases beside the kernel plane.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

import pytest
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from udpflannel.lab import kernelvxlan, probe
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.netns import Lab, Namespace

try:
    from .etcd_server import FLANNEL_UDP_LEASE, FLANNEL_VXLAN_LEASE, EtcdServer, etcd_in_hub, wait_for
except ImportError:
    from etcd_server import FLANNEL_UDP_LEASE, FLANNEL_VXLAN_LEASE, EtcdServer, etcd_in_hub, wait_for

NETWORK = "10.244.0.0/16"
CONFIG = '{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}'
KERNEL = ["--dataplane", "kernel"]
AUTO = ["--dataplane", "auto"]
NET = ipaddress.IPv4Network


# -- fixtures -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab():
    with Lab(0, tag="ufd") as lab:
        yield lab


@pytest.fixture(scope="module")
def etcd(lab, tmp_path_factory):
    with etcd_in_hub(lab, tmp_path_factory.mktemp("etcd")) as server:
        yield server


@pytest.fixture
def make(lab, etcd, make_cluster):
    """make(count, config) -> (cluster on a fresh etcd prefix, indices of ``count``
    fresh node namespaces in lab.nodes)."""
    def make_one(count: int, config: str = CONFIG) -> tuple[Cluster, list[int]]:
        prefix = f"/t-{uuid.uuid4().hex[:8]}/network"
        etcd.etcdctl("put", f"{prefix}/config", config)
        first = len(lab.nodes)
        for _ in range(count):
            lab.add_node()
        cluster = make_cluster(lab, etcd_endpoints=etcd.endpoint,
                               extra_args=["--etcd-prefix", prefix])
        cluster.prefix = prefix
        return cluster, list(range(first, first + count))
    return make_one


# -- helpers ------------------------------------------------------------------------

def log_of(cluster: Cluster, i: int) -> str:
    with open(os.path.join(cluster.node_dir(i), "daemon.log"), errors="replace") as f:
        return f.read()


def subnet_env(cluster: Cluster, i: int) -> dict[str, str]:
    with open(os.path.join(cluster.node_dir(i), "subnet.env")) as f:
        return dict(line.strip().split("=", 1) for line in f if line.strip())


def gateway_of(subnet: str) -> str:
    return str(NET(subnet).network_address)


def link(ns: Namespace, name: str) -> dict:
    """index, mtu and the IFLA_STATS64 counters of ``name`` in ``ns``."""
    with ns.ipr() as ipr:
        found = ipr.link_lookup(ifname=name)
        assert found, f"{name} missing in {ns.name}"
        msg = ipr.link("get", index=found[0])[0]
        stats = msg.get_attr("IFLA_STATS64") or {}
        return {"index": found[0], "mtu": msg.get_attr("IFLA_MTU"),
                "up": bool(msg["flags"] & 1),
                **{k: int(stats.get(k, 0)) for k in ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes")}}


def has_link(ns: Namespace, name: str) -> bool:
    with ns.ipr() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def routes_to(ns: Namespace, subnet: str) -> list[tuple[str | None, int]]:
    """(gateway, output interface index) of every main-table route to ``subnet``."""
    net = NET(subnet)
    with ns.ipr() as ipr:
        return [(r.get_attr("RTA_GATEWAY"), r.get_attr("RTA_OIF"))
                for r in ipr.route("dump", family=socket.AF_INET, table=254)
                if r.get_attr("RTA_DST") == str(net.network_address) and r["dst_len"] == net.prefixlen]


def neighbours(ns: Namespace, index: int) -> dict[str, str]:
    """IPv4 neighbour -> lladdr on device ``index``."""
    with ns.ipr() as ipr:
        return {n.get_attr("NDA_DST"): n.get_attr("NDA_LLADDR")
                for n in ipr.neigh("dump", ifindex=index, family=socket.AF_INET)}


def fdb(ns: Namespace, index: int) -> dict[str, str]:
    """VTEP MAC -> remote address of the fdb entries on device ``index``."""
    with ns.ipr() as ipr:
        return {e.get_attr("NDA_LLADDR"): e.get_attr("NDA_DST") for e in ipr.fdb("dump", ifindex=index)
                if e["ifindex"] == index and e.get_attr("NDA_DST")}


def index_of(ns: Namespace, name: str) -> int:
    with ns.ipr() as ipr:
        return ipr.link_lookup(ifname=name)[0]


def put_flanneld_node(etcd: EtcdServer, lab: Lab, prefix: str, i: int, subnet: str, mac: str) -> int:
    """Node i becomes a plain flanneld vxlan node: flannel.1 made as flanneld makes it,
    its lease written into etcd by hand. Returns the device's index."""
    with lab.nodes[i].ipr() as ipr:
        index = kernelvxlan.create(ipr, local_ip=lab.addresses[i], underlay="eth0",
                                   subnet=subnet, vtep_mac=mac)
    etcd.etcdctl("put", f"{prefix}/subnets/{subnet.replace('/', '-')}",
                 FLANNEL_VXLAN_LEASE.format(ip=lab.addresses[i], mac=mac))
    return index


def unreachable_pairs(lab: Lab, addrs: dict[int, str]) -> list[tuple[int, int]]:
    return [(i, j) for i in addrs for j in addrs
            if i != j and not any(probe.ping(lab.nodes[i], addrs[j], count=3, timeout=1.0))]


def malformed_drops(counters: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counters.items() if k.startswith("drop_") and k != "drop_no_route" and v}


class DeletionWatch:
    """Every netlink deletion in ``ns`` that touches device ``index``: the device, its
    addresses, its neighbours and fdb entries, routes through it. Also a new device of
    ``name`` with another index (deleted and made again). A restart that keeps
    everything in place shows none."""

    GROUPS = 0x1 | 0x4 | 0x10 | 0x40  # RTMGRP_LINK, NEIGH, IPV4_IFADDR, IPV4_ROUTE
    RTM_NEWLINK, RTM_DELLINK, RTM_DELADDR, RTM_DELROUTE, RTM_DELNEIGH = 16, 17, 21, 25, 29

    def __init__(self, ns: Namespace, name: str, index: int) -> None:
        self.name, self.index = name, index
        self.sock = ns.call(socket.socket, socket.AF_NETLINK, socket.SOCK_RAW, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: never ENOBUFS
        self.sock.bind((0, self.GROUPS))
        self.sock.settimeout(0.2)
        self.seen: list[str] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        marshal = MarshalRtnl()
        while not self._stop.is_set():
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError as e:  # ENOBUFS: events were lost, nothing can be proved
                self.errors.append(e)
                return
            for msg in marshal.parse(data):
                self._judge(msg)

    def _judge(self, msg) -> None:
        kind = msg["header"]["type"]
        if kind == self.RTM_DELLINK and msg["index"] == self.index:
            self.seen.append(f"device {self.name} deleted")
        elif kind == self.RTM_NEWLINK and msg.get_attr("IFLA_IFNAME") == self.name \
                and msg["index"] != self.index:
            self.seen.append(f"{self.name} made again as index {msg['index']}")
        elif kind == self.RTM_DELADDR and msg["index"] == self.index:
            self.seen.append(f"address {msg.get_attr('IFA_ADDRESS')} deleted")
        elif kind == self.RTM_DELNEIGH and msg["ifindex"] == self.index:
            self.seen.append(f"neighbour/fdb {msg.get_attr('NDA_DST')} "
                             f"{msg.get_attr('NDA_LLADDR')} deleted")
        elif kind == self.RTM_DELROUTE and msg.get_attr("RTA_OIF") == self.index:
            self.seen.append(f"route {msg.get_attr('RTA_DST')}/{msg['dst_len']} deleted")

    def close(self) -> list[str]:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        assert not self.errors, f"netlink monitor lost events: {self.errors}"
        return self.seen


def watch_sees_deletions(watch: DeletionWatch, ns: Namespace, index: int) -> None:
    """The watch itself works: a neighbour made and deleted on the device is seen
    (an empty list afterwards then means something)."""
    with ns.ipr() as ipr:
        ipr.neigh("add", dst="10.244.254.0", lladdr="02:00:00:00:fe:01", ifindex=index,
                  state=0x80, family=socket.AF_INET)
        ipr.neigh("del", dst="10.244.254.0", ifindex=index, family=socket.AF_INET)
    deadline = time.monotonic() + 5
    while not watch.seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(watch.seen) == 1 and watch.seen[0].startswith("neighbour/fdb 10.244.254.0 "), watch.seen
    watch.seen.clear()


class PacedStream:
    """Exactly ``nbytes`` of TCP from ``src`` to ``dst_addr`` in ``dst``, paced over
    about ``seconds`` (so that it is in flight while the test does something), every
    byte checked by the receiver (byte k of the stream is k % 256)."""

    def __init__(self, src: Namespace, dst: Namespace, dst_addr: str, port: int,
                 nbytes: int, seconds: float, timeout: float = 15.0) -> None:
        self.nbytes, self.seconds, self.timeout = nbytes, seconds, timeout
        self.listener = dst.call(socket.create_server, ("0.0.0.0", port))
        self.listener.settimeout(timeout)
        self.client = src.call(socket.socket)
        self.client.settimeout(timeout)
        self.dst = (dst_addr, port)
        self.received = 0
        self.errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._guard(self._receive), daemon=True),
                         threading.Thread(target=self._guard(self._send), daemon=True)]
        for t in self._threads:
            t.start()

    def _guard(self, fn):
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # handed to the test by result()
                self.errors.append(e)
        return run

    def _receive(self) -> None:
        pattern = bytes(range(256)) * ((2 << 20) // 256 + 2)
        conn, _ = self.listener.accept()
        conn.settimeout(self.timeout)
        with conn:
            while chunk := conn.recv(1 << 20):
                start = self.received % 256
                if chunk != pattern[start:start + len(chunk)]:
                    raise AssertionError(f"stream corrupt within bytes {self.received}.."
                                         f"{self.received + len(chunk)}")
                self.received += len(chunk)

    def _send(self) -> None:
        block = bytes(range(256)) * 64  # 16 KiB, a whole number of patterns
        rate = self.nbytes / self.seconds
        begin = time.monotonic()
        sent = 0
        with self.client:
            self.client.connect(self.dst)
            while sent < self.nbytes:
                piece = block[:min(len(block), self.nbytes - sent)]
                self.client.sendall(piece)
                sent += len(piece)
                ahead = begin + sent / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)

    def result(self) -> int:
        for t in self._threads:
            t.join(self.seconds + 2 * self.timeout)
        self.listener.close()
        assert not any(t.is_alive() for t in self._threads), "stream did not finish"
        assert not self.errors, f"stream failed: {self.errors[0]!r}"
        return self.received


# -- 1. one cluster, four kinds of node ------------------------------------------------

def test_engine_kernel_auto_and_flanneld_nodes_form_one_cluster(lab, etcd, make):
    """An engine node (0), --dataplane kernel (1), --dataplane auto (2, which must pick
    the kernel) and a flanneld vxlan node programmed by hand (3), all on the kernel's
    default offloads: every pair pings both ways, TCP works both ways between the
    engine and each of the others, and the engine completed the kernel peers'
    unfinished (CHECKSUM_PARTIAL) TCP checksums."""
    cluster, (e, k, a, f) = make(4)
    flanneld_subnet, flanneld_mac = "10.244.200.0/24", "02:aa:bb:cc:dd:03"
    f_index = put_flanneld_node(etcd, lab, cluster.prefix, f, flanneld_subnet, flanneld_mac)
    cluster.start(e)
    cluster.start(k, KERNEL)
    cluster.start(a, AUTO)
    for i in (e, k, a):  # 2 udpflannel peers + the flanneld node
        cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 3, 20, "routing to 3 peers")
    st = {i: cluster.status(i) for i in (e, k, a)}
    with lab.nodes[f].ipr() as ipr:  # the flanneld node's routes, by hand from the others' status
        for i in (e, k, a):
            kernelvxlan.add_peer(ipr, f_index, subnet=st[i].lease.subnet, vtep_mac=st[i].lease.vtep_mac,
                                 public_ip=lab.addresses[i])

    # the planes, as status and the log tell
    assert st[e].dataplane.kind == "engine" and st[e].dataplane.device == "flannel0"
    for i in (k, a):
        assert st[i].dataplane.kind == "kernel" and st[i].dataplane.device == "flannel.1", st[i]
        assert not has_link(lab.nodes[i], "flannel0")
    auto_log = log_of(cluster, a)
    assert auto_log.count("data plane: ") == 1, auto_log
    assert "data plane: kernel (auto: kernel VXLAN works here)" in auto_log, auto_log
    assert st[a].dataplane.reason == "auto: kernel VXLAN works here"
    assert "data plane: kernel VXLAN (flannel.1)" in log_of(cluster, k)
    # every node's lease looks the same to etcd, whatever its plane
    for i in (e, k, a):
        key = f"{cluster.prefix}/subnets/{st[i].lease.subnet.replace('/', '-')}"
        assert etcd.etcdctl("get", key, "--print-value-only").strip() == \
            FLANNEL_VXLAN_LEASE.format(ip=lab.addresses[i], mac=st[i].lease.vtep_mac)
    # the kernel nodes' flannel.1 is flanneld's: our MAC, <subnet .0>, entries per peer
    for i in (k, a):
        dev = link(lab.nodes[i], "flannel.1")
        assert dev["up"] and dev["mtu"] == lab.mtu - 50
        assert neighbours(lab.nodes[i], dev["index"])[gateway_of(flanneld_subnet)] == flanneld_mac
        assert fdb(lab.nodes[i], dev["index"])[flanneld_mac] == lab.addresses[f]
        assert routes_to(lab.nodes[i], flanneld_subnet) == [(gateway_of(flanneld_subnet), dev["index"])]

    addrs = {i: gateway_of(st[i].lease.subnet) for i in (e, k, a)}
    addrs[f] = gateway_of(flanneld_subnet)
    assert unreachable_pairs(lab, addrs) == []

    completed = {}
    for port, peer in enumerate((k, a, f), start=5301):
        before = cluster.status(e).dataplane.counters["rx_csum_completed"]
        back = probe.tcp_stream(lab.nodes[peer], lab.nodes[e], addrs[e], port=port,
                                nbytes=4 << 20, timeout=20)
        completed[peer] = cluster.status(e).dataplane.counters["rx_csum_completed"] - before
        there = probe.tcp_stream(lab.nodes[e], lab.nodes[peer], addrs[peer], port=port + 10,
                                 nbytes=4 << 20, timeout=20)
        assert back.bytes == there.bytes == 4 << 20
    # each kernel sender (kernel plane, auto, flanneld) left its TCP checksums for a NIC
    # to finish; the engine finished them, or no segment would have reached the socket
    assert all(n >= 16 for n in completed.values()), completed  # ~80 per 4 MiB here
    assert malformed_drops(cluster.status(e).dataplane.counters) == {}

    # the kernel plane's status is the device's: name, kind, and its own counters
    def reported() -> tuple[dict, dict] | None:  # refreshed every 2 s from the device
        counters, dev = cluster.status(k).dataplane.counters, link(lab.nodes[k], "flannel.1")
        keys = ("tx_packets", "rx_packets", "tx_bytes", "rx_bytes")
        return (counters, dev) if all(counters[key] == dev[key] for key in keys) else None
    counters, dev = wait_for(reported, 10, "status to report flannel.1's own counters")
    assert counters["tx_bytes"] > 4 << 20 and counters["rx_bytes"] > 4 << 20  # its streams
    out = subprocess.run([sys.executable, "-m", "udpflannel", "status", "--json",
                          "--admin-socket", cluster.admin_path(k)],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    doc = json.loads(out)
    assert doc["dataplane"]["kind"] == "kernel" and doc["dataplane"]["device"] == "flannel.1", doc
    assert doc["dataplane"]["counters"]["rx_packets"] == dev["rx_packets"]

    # the flanneld node leaves: the running kernel node (auto) drops its entries at
    # once; the kernel node, down meanwhile, prunes them when it starts again
    assert cluster.stop(k) == 0
    etcd.etcdctl("del", f"{cluster.prefix}/subnets/{flanneld_subnet.replace('/', '-')}")
    for i in (e, a):
        cluster.wait_status(i, lambda s: s.dataplane.peers == 2, 10, "dropping the flanneld node")
    cluster.start(k, KERNEL)
    cluster.wait_status(k, lambda s: s.ready and s.dataplane.peers == 2, 20, "back with 2 peers")
    # its route, neighbour and fdb entry
    assert "removed 3 stale entries of peers that left while we were down" in log_of(cluster, k)
    for i in (k, a):
        dev = link(lab.nodes[i], "flannel.1")
        assert gateway_of(flanneld_subnet) not in neighbours(lab.nodes[i], dev["index"])
        assert flanneld_mac not in fdb(lab.nodes[i], dev["index"])
        assert routes_to(lab.nodes[i], flanneld_subnet) == []
        assert len(neighbours(lab.nodes[i], dev["index"])) == 2  # the two udpflannel peers
    assert unreachable_pairs(lab, {i: addrs[i] for i in (e, k, a)}) == []


# -- 2. auto falls back ---------------------------------------------------------------

def test_auto_falls_back_to_the_engine_when_the_kernel_refuses_vxlan(lab, make):
    """A down VXLAN device of another name with the same VNI and port is there first:
    the kernel refuses flannel.1 (EEXIST), and, down, it holds no UDP port. auto runs
    the engine, says why in one line, and the node works."""
    cluster, (fb, peer) = make(2)
    with lab.nodes[fb].ipr() as ipr:
        ipr.link("add", ifname="vxsquat", kind="vxlan", vxlan_id=1, vxlan_port=8472, vxlan_learning=0)
        squatter = ipr.link_lookup(ifname="vxsquat")[0]
    cluster.start(fb, AUTO)
    cluster.start(peer, KERNEL)
    for i in (fb, peer):
        cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 1, 20, "routing to its peer")
    st = cluster.status(fb)
    why = "auto: kernel VXLAN unavailable: another VXLAN device already uses this VNI and port"
    assert st.dataplane.kind == "engine" and st.dataplane.reason == why
    text = log_of(cluster, fb)
    assert text.count("data plane: ") == 1 and f"data plane: engine ({why})" in text, text
    assert not has_link(lab.nodes[fb], "flannel.1")
    squat = link(lab.nodes[fb], "vxsquat")
    assert squat["index"] == squatter and not squat["up"]  # a stranger's device, left alone
    addrs = {i: gateway_of(cluster.status(i).lease.subnet) for i in (fb, peer)}
    assert unreachable_pairs(lab, addrs) == []
    assert cluster.status(fb).dataplane.counters["rx_packets"] >= 3


# -- 3. restarting the kernel plane is no outage ------------------------------------------

def test_kernel_plane_restart_keeps_device_entries_and_a_stream(lab, make):
    """A paced, content-checked TCP stream each way between a kernel-plane node and an
    engine node while the kernel-plane daemon is stopped (SIGTERM) and started, then
    killed (-9) and started: both streams complete; netlink never reports the device,
    its address, neighbours, fdb entries or routes deleted; its counters never reset."""
    cluster, (k, e) = make(2)
    cluster.start(k, KERNEL)
    cluster.start(e)
    for i in (k, e):
        cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 1, 20, "routing to its peer")
    k_addr, e_addr = (gateway_of(cluster.status(i).lease.subnet) for i in (k, e))
    e_st = cluster.status(e)
    ns = lab.nodes[k]
    dev = link(ns, "flannel.1")
    watch = DeletionWatch(ns, "flannel.1", dev["index"])
    watch_sees_deletions(watch, ns, dev["index"])
    streams = [PacedStream(lab.nodes[e], ns, k_addr, 5401, 12 << 20, 9.0),
               PacedStream(ns, lab.nodes[e], e_addr, 5402, 12 << 20, 9.0)]
    try:
        last = dev
        for how in ("SIGTERM", "SIGKILL"):
            time.sleep(2.0)
            if how == "SIGTERM":
                assert cluster.stop(k) == 0
            else:
                cluster.procs[k].kill()
                cluster.procs.pop(k).wait(10)
            time.sleep(0.5)  # no daemon: the kernel forwards on its own
            assert all(not s.errors for s in streams), [s.errors for s in streams]
            cluster.start(k, KERNEL)
            cluster.wait_status(k, lambda s: s.ready and s.dataplane.peers == 1, 20, f"back after {how}")
            now = link(ns, "flannel.1")
            assert now["index"] == dev["index"], f"flannel.1 was re-created after {how}"
            assert now["tx_packets"] >= last["tx_packets"] and now["rx_packets"] >= last["rx_packets"]
            last = now
        assert [s.result() for s in streams] == [12 << 20, 12 << 20]
    finally:
        seen = watch.close()
    assert seen == []
    assert log_of(cluster, k).count("reusing flannel.1") == 2
    # everything is still there, as it was
    now = link(ns, "flannel.1")
    assert now["index"] == dev["index"] and now["tx_bytes"] > dev["tx_bytes"] + (12 << 20)
    assert neighbours(ns, dev["index"]) == {e_addr: e_st.lease.vtep_mac}
    assert fdb(ns, dev["index"])[e_st.lease.vtep_mac] == lab.addresses[e]
    assert routes_to(ns, e_st.lease.subnet) == [(e_addr, dev["index"])]


# -- switching planes -----------------------------------------------------------------

def test_switching_planes_keeps_the_lease_and_removes_the_other_planes_device(lab, etcd, make):
    """engine -> kernel -> engine on one node: the lease in etcd stays byte-identical
    (same subnet, same VTEP MAC), the other plane's device is removed with a log line,
    and the node reaches its peer after each switch."""
    cluster, (n, peer) = make(2)
    cluster.start(peer, KERNEL)
    cluster.start(n)
    cluster.wait_status(n, lambda s: s.ready and s.dataplane.peers == 1, 20, "routing to its peer")
    subnet = cluster.status(n).lease.subnet
    key = f"{cluster.prefix}/subnets/{subnet.replace('/', '-')}"
    lease = etcd.etcdctl("get", key, "--print-value-only")
    addrs = {n: gateway_of(subnet), peer: gateway_of(cluster.status(peer).lease.subnet)}
    for plane, gone, line in (("kernel", "flannel0", "removed flannel0, left by the engine data plane"),
                              ("engine", "flannel.1", "removed flannel.1, left by the kernel data plane")):
        assert cluster.stop(n) == 0
        cluster.start(n, ["--dataplane", plane])
        st = cluster.wait_status(n, lambda s: s.ready and s.dataplane.peers == 1, 20, f"ready as {plane}")
        assert st.dataplane.kind == plane and st.lease.subnet == subnet
        assert etcd.etcdctl("get", key, "--print-value-only") == lease
        assert not has_link(lab.nodes[n], gone) and line in log_of(cluster, n)
        cluster.wait_status(peer, lambda s: s.dataplane.peers == 1, 10, "still routing to the node")
        assert unreachable_pairs(lab, addrs) == []


# -- 4. Backend.MTU ------------------------------------------------------------------

def test_backend_mtu_is_honoured_by_both_planes(lab, make):
    """flanneld's meaning: a vxlan Backend.MTU stands for the underlay's MTU, and the
    device gets 50 less (flanneld's flannel.1 with "MTU": 1400 is 1350, and so is its
    FLANNEL_MTU: checked against the real flanneld in test_real_flanneld.py)."""
    cluster, (e, k) = make(2, '{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "MTU": 1400}}')
    cluster.start(e)
    cluster.start(k, KERNEL)
    for i in (e, k):
        cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 1, 20, "routing to its peer")
    assert link(lab.nodes[e], "flannel0")["mtu"] == 1350
    assert link(lab.nodes[k], "flannel.1")["mtu"] == 1350
    for i in (e, k):
        assert subnet_env(cluster, i)["FLANNEL_MTU"] == "1350"
        assert cluster.status(i).dataplane.mtu == 1350
    # 1350 fits either way: a full-size ping crosses in both directions, not fragmented
    addrs = {i: gateway_of(cluster.status(i).lease.subnet) for i in (e, k)}
    assert unreachable_pairs(lab, addrs) == []


# -- 5. DirectRouting ----------------------------------------------------------------

def test_direct_routing_bypasses_vxlan_in_both_planes(lab, make):
    """Two nodes on one underlay subnet with DirectRouting: each plane routes the
    other's subnet via its PublicIP on eth0, and traffic between their overlay
    addresses never touches VXLAN (the engine's counters and flannel.1's stay still)."""
    cluster, (e, k) = make(2, '{"Network": "10.244.0.0/16", '
                              '"Backend": {"Type": "vxlan", "DirectRouting": true}}')
    cluster.start(e)
    cluster.start(k, KERNEL)
    for i in (e, k):
        cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 1, 20, "routing to its peer")
    subnet = {i: cluster.status(i).lease.subnet for i in (e, k)}
    addr = {i: gateway_of(subnet[i]) for i in (e, k)}
    assert routes_to(lab.nodes[e], subnet[k]) == [(lab.addresses[k], index_of(lab.nodes[e], "eth0"))]
    assert routes_to(lab.nodes[k], subnet[e]) == [(lab.addresses[e], index_of(lab.nodes[k], "eth0"))]
    k_dev = index_of(lab.nodes[k], "flannel.1")
    assert neighbours(lab.nodes[k], k_dev) == {} and fdb(lab.nodes[k], k_dev) == {}

    engine_before = cluster.status(e).dataplane.counters
    kernel_before = link(lab.nodes[k], "flannel.1")
    # between the overlay addresses (as pods' traffic would be), both ways
    assert all(probe.ping(lab.nodes[e], addr[k], count=3, src_addr=addr[e]))
    assert all(probe.ping(lab.nodes[k], addr[e], count=3, src_addr=addr[k]))
    there = probe.tcp_stream(lab.nodes[e], lab.nodes[k], addr[k], port=5501, nbytes=2 << 20,
                             timeout=20, src_addr=addr[e])
    back = probe.tcp_stream(lab.nodes[k], lab.nodes[e], addr[e], port=5502, nbytes=2 << 20,
                            timeout=20, src_addr=addr[k])
    assert there.bytes == back.bytes == 2 << 20
    engine_after = cluster.status(e).dataplane.counters
    kernel_after = link(lab.nodes[k], "flannel.1")
    for key in ("tx_packets", "rx_packets"):
        assert engine_after[key] == engine_before[key], (key, engine_before, engine_after)
        assert kernel_after[key] == kernel_before[key], (key, kernel_before, kernel_after)
    # ...and the underlay carried it: eth0 saw at least the stream's bytes
    assert link(lab.nodes[e], "eth0")["tx_bytes"] > 2 << 20


# -- 6. outer source ports -----------------------------------------------------------

FLOWS = 8
PER_FLOW = 4


def capture_vxlan(ns: Namespace, seconds_idle: float = 0.5):
    """A packet socket on ns's eth0, and a function that returns the VXLAN frames
    received there (outer source port, inner IP packet) once none came for a while.

    The sender batches frames of one flow into one UDP_SEGMENT send, and veth hands
    such a GSO packet over whole: its UDP payload is then several VXLAN frames back
    to back, each its own datagram once segmented. So the payload is walked frame by
    frame (VXLAN header, inner Ethernet, inner IP of its total length)."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN
    sock = ns.call(socket.socket, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sock.bind(("eth0", 0))
    sock.settimeout(seconds_idle)

    def frames() -> list[tuple[int, bytes]]:
        got = []
        try:
            while True:
                data, addr = sock.recvfrom(1 << 17)
                if addr[2] == socket.PACKET_OUTGOING:
                    continue
                pkt = Ether(data)
                if IP not in pkt or UDP not in pkt or pkt[UDP].dport != 8472:
                    continue
                payload = bytes(pkt[UDP].payload)
                off = 0
                while off + 8 + 14 + 20 <= len(payload):
                    vxlan = VXLAN(payload[off:off + 8])
                    assert vxlan.flags & 0x08 and vxlan.vni == 1, vxlan
                    inner = Ether(payload[off + 8:])
                    assert IP in inner, inner
                    size = inner[IP].len
                    got.append((pkt[UDP].sport, payload[off + 22:off + 22 + size]))
                    off += 22 + size
                assert off == len(payload), f"trailing bytes in a VXLAN datagram: {payload[off:]!r}"
        except socket.timeout:
            pass
        finally:
            sock.close()
        return got
    return frames


def test_inner_flows_spread_over_outer_source_ports(lab, make):
    """8 UDP flows (distinct inner source ports) from an engine node to a peer: on the
    peer's wire each flow leaves on exactly one outer source port, the one the
    engine's flow hash picks (flows with the same pick share it, others do not), and
    together they use at least two, none of them 8472."""
    from udpflannel._engine import Engine
    cluster, (e, k) = make(2)
    cluster.start(e)
    cluster.start(k, KERNEL)
    for i in (e, k):
        cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 1, 20, "routing to its peer")
    ways = int(re.search(r"VXLAN source ports: (\d+)", log_of(cluster, e)).group(1))
    assert ways == 16  # the default pool
    src, dst = (gateway_of(cluster.status(i).lease.subnet) for i in (e, k))
    receiver = lab.nodes[k].call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((dst, 9999))
    frames = capture_vxlan(lab.nodes[k])
    senders = []
    try:
        for n in range(FLOWS):
            s = lab.nodes[e].call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((src, 40001 + n))
            senders.append(s)
        for round_ in range(PER_FLOW):
            for n, s in enumerate(senders):
                s.sendto(f"flow {n} packet {round_}".encode(), (dst, 9999))
            time.sleep(0.05)
    finally:
        for s in senders:
            s.close()
    got = frames()
    receiver.settimeout(2.0)
    delivered = 0
    try:
        while delivered < FLOWS * PER_FLOW:
            receiver.recv(2048)
            delivered += 1
    except socket.timeout:
        pass
    finally:
        receiver.close()
    assert delivered == FLOWS * PER_FLOW

    engine = Engine(vni=1, vtep_mac=bytes.fromhex("020000000001"), network=NETWORK, subnet_len=24)
    ports: dict[int, set[int]] = {}  # inner source port -> outer source ports seen
    pick: dict[int, int] = {}  # inner source port -> the engine's socket index
    seen = 0
    for outer, inner in got:
        ihl = (inner[0] & 0x0F) * 4
        if inner[9] != 17 or struct.unpack_from("!H", inner, ihl + 2)[0] != 9999:
            continue  # not one of our flows
        flow = struct.unpack_from("!H", inner, ihl)[0]
        seen += 1
        ports.setdefault(flow, set()).add(outer)
        pick[flow] = engine.flow_index(inner, ways)
    assert sorted(ports) == [40001 + n for n in range(FLOWS)], ports
    assert seen == FLOWS * PER_FLOW  # every frame of ours, once
    assert all(len(p) == 1 for p in ports.values()), ports  # one flow, one port
    port_of = {flow: next(iter(p)) for flow, p in ports.items()}
    assert len(set(port_of.values())) >= 2, port_of
    assert all(32768 <= p <= 60999 for p in port_of.values()), port_of
    # the port is the hash's choice: same pick <=> same port
    for a in port_of:
        for b in port_of:
            assert (pick[a] == pick[b]) == (port_of[a] == port_of[b]), (pick, port_of)


# -- 7. a fresh engine node is quiet --------------------------------------------------

def test_fresh_engine_node_has_no_ipv6_and_no_drops(lab, make):
    cluster, (e,) = make(1)
    cluster.start(e)
    cluster.wait_status(e, lambda s: s.ready, 20)
    time.sleep(3.0)  # a link-local address would have sent MLD reports and solicitations by now
    st = cluster.status(e)
    assert st.drops() == dict.fromkeys(st.drops(), 0), st.drops()
    assert st.dataplane.counters["tx_packets"] == 0 and st.dataplane.kernel_drops == 0
    ns = lab.nodes[e]
    index = index_of(ns, "flannel0")
    with ns.ipr() as ipr:
        assert ipr.addr("dump", family=socket.AF_INET6, index=index) == ()
    disabled = ns.call(lambda: open("/proc/sys/net/ipv6/conf/flannel0/disable_ipv6").read().strip())
    assert disabled == "1"


# -- 8. flanneld udp leases and the kernel plane --------------------------------------

def test_kernel_plane_ignores_udp_leases_and_refuses_a_udp_config(lab, etcd, make, workdir):
    cluster, (k, e, other) = make(3)
    udp_subnet = "10.244.202.0/24"
    etcd.etcdctl("put", f"{cluster.prefix}/subnets/10.244.202.0-24",
                 FLANNEL_UDP_LEASE.format(ip="192.168.250.202"))
    cluster.start(k, KERNEL)
    cluster.start(e)
    cluster.wait_status(e, lambda s: s.ready and s.dataplane.peers == 2, 20, "routing to both")
    cluster.wait_status(k, lambda s: s.ready and s.dataplane.peers == 1, 20, "routing to the engine")
    ignored = re.findall(r"ignoring lease 10\.244\.202\.0/24 from 192\.168\.250\.202: (.*)", log_of(cluster, k))
    assert ignored == ["backend type 'udp' (flanneld's udp framing) is not spoken by this data plane"]
    assert routes_to(lab.nodes[k], udp_subnet) == []
    assert "peer added: 10.244.202.0/24 via 192.168.250.202 (flanneld udp framing" in log_of(cluster, e)

    # flannel.1 deleted under the running kernel plane comes back with its peer
    old_index = index_of(lab.nodes[k], "flannel.1")
    with lab.nodes[k].ipr() as ipr:
        ipr.link("del", index=old_index)
    deadline = time.monotonic() + 10
    while "flannel.1 is back with 1 peers" not in log_of(cluster, k) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "flannel.1 was deleted under us; creating it again" in log_of(cluster, k)
    assert "flannel.1 is back with 1 peers" in log_of(cluster, k)
    e_st = cluster.status(e)
    dev = link(lab.nodes[k], "flannel.1")
    assert dev["up"] and neighbours(lab.nodes[k], dev["index"]) == {
        gateway_of(e_st.lease.subnet): e_st.lease.vtep_mac}
    assert routes_to(lab.nodes[k], e_st.lease.subnet) == [(gateway_of(e_st.lease.subnet), dev["index"])]
    addrs = {i: gateway_of(cluster.status(i).lease.subnet) for i in (k, e)}
    assert unreachable_pairs(lab, addrs) == []

    prefix = f"/t-{uuid.uuid4().hex[:8]}/network"
    etcd.etcdctl("put", f"{prefix}/config", '{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}')
    argv = [sys.executable, "-m", "udpflannel", "run", "--iface", "eth0", "--dataplane", "kernel",
            "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", prefix, "--state-dir", workdir,
            "--subnet-file", f"{workdir}/subnet.env", "--admin-socket", f"{workdir}/admin.sock"]
    res = lab.nodes[other].run(argv, 30)
    err = res.stderr
    assert res.returncode == 1, err
    errors = [line for line in err.strip().splitlines() if " INFO " not in line]
    assert errors == ["udpflannel: error: --dataplane kernel needs a vxlan backend; the config's "
                      "is 'udp' (use engine or auto)"], err
    assert etcd.etcdctl("get", f"{prefix}/subnets/", "--prefix", "--keys-only").strip() == ""
    assert not has_link(lab.nodes[other], "flannel.1") and not has_link(lab.nodes[other], "flannel0")
