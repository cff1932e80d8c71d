"""Kube mode (--kube-subnet-mgr) with EnableIPv6 against a real kube-apiserver whose
kube-controller-manager allocates dual-stack podCIDRs (--cluster-cidr=<v4>,<v6>), on a
dual-stack underlay, beside the real flanneld v0.28.9 in kube mode.

Two udpflannel kernel-plane nodes and one flanneld, all in one cluster: every pair pings
over IPv4 and IPv6 and carries TCP over IPv6; each node's subnets are its podCIDRs; the
node annotations (backend-v6-data with flannel-v6.1's MAC, public-ipv6) are flanneld's,
byte for byte; flannel-v6.1's per-peer entries come from the peers' annotations; a
restart without the state dir takes both MACs back from the Node's annotations; a node
moved to the engine plane keeps its annotations and carries both families too. IPv6-only (EnableIPv4 false) in the same
cluster under an annotation prefix of its own: two udpflannel nodes (--dataplane auto,
which picks the kernel plane) and a flanneld take the IPv6 podCIDR alone, ping and
carry TCP over IPv6, and publish flanneld's annotations (no backend-data, no public-ip).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import sys

import pytest

from udpflannel.core import kubenode
from udpflannel.core.lease import Lease
from udpflannel.host import localstate
from udpflannel.lab import probe
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.flanneld import Flanneld
from udpflannel.lab.kubeapi import CLUSTER_CIDR, KubeAPILab
from udpflannel.lab.netns import Lab

try:
    from .test_dual_stack import device, ping, wait_reachable
except ImportError:
    from test_dual_stack import device, ping, wait_reachable

HUB_ADDR = "192.168.250.2"  # the API server's address, on the hub's bridge
UNDERLAY6 = "fd00:251::/64"
NETWORK6 = "fd10:244::/56"
NAMES = kubenode.annotation_names()
P = "flannel.alpha.coreos.com/"
TCP_BYTES = (1 << 20) + 77


@pytest.fixture(scope="module")
def lab():
    with Lab(0, tag="ufk6", underlay6=UNDERLAY6) as lab:
        lab.hub.link_up("br0", f"{HUB_ADDR}/24")
        yield lab


@pytest.fixture(scope="module")
def kube(lab, tmp_path_factory):
    api = KubeAPILab(tmp_path_factory.mktemp("kube6"), host=HUB_ADDR, netns=lab.hub, cluster_cidr6=NETWORK6)
    try:
        api.start()
        print(f"\ndual-stack kube lab started in {api.start_seconds:.1f} s", file=sys.stderr)
        api.apply_flannel_rbac()
        yield api
    finally:
        api.stop()


def annotations(kube: KubeAPILab, name: str) -> dict[str, str]:
    got = kube.api.get(f"/api/v1/nodes/{name}")["metadata"].get("annotations", {})
    return {k: v for k, v in got.items() if k.startswith(P)}


class Mixed:
    def __init__(self, lab: Lab, kube: KubeAPILab, cluster: Cluster, fl: Flanneld, ours: tuple[int, ...], f: int):
        self.lab, self.kube, self.cluster, self.flanneld, self.ours, self.f = lab, kube, cluster, fl, ours, f
        self.cidrs: dict[int, tuple[ipaddress.IPv4Network, ipaddress.IPv6Network]] = {}

    @property
    def nodes(self) -> list[int]:
        return [*self.ours, self.f]

    def name(self, i: int) -> str:
        return self.cluster.node_name(i)

    def addrs(self, i: int) -> tuple[str, str]:
        return tuple(str(c.network_address) for c in self.cidrs[i])  # type: ignore[return-value]


@pytest.fixture(scope="module")
def mix(lab, kube, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("kdual"))
    kubeconfig = kube.flannel_kubeconfig("token")
    conf = os.path.join(work, "net-conf.json")
    with open(conf, "w") as f:
        json.dump({"Network": CLUSTER_CIDR, "EnableIPv6": True, "IPv6Network": NETWORK6,
                   "Backend": {"Type": "vxlan"}}, f)
    first = len(lab.nodes)
    for _ in range(3):
        lab.add_node()
    ours, fi = (first, first + 1), first + 2
    cluster = Cluster(lab, work, kubeconfig=kubeconfig, net_config=conf, node_prefix="k6",
                      extra_args=["--dataplane", "kernel"])
    fl = Flanneld(lab.nodes[fi], os.path.join(work, "flanneld"), kubeconfig=kubeconfig,
                  node_name=cluster.node_name(fi), net_config=conf)
    m = Mixed(lab, kube, cluster, fl, ours, fi)
    try:
        for i in m.nodes:
            kube.register_node(m.name(i), lab.addresses[i])
            got = [ipaddress.ip_network(c) for c in kube.wait_pod_cidrs(m.name(i))]
            v4 = next(c for c in got if c.version == 4)
            v6 = next(c for c in got if c.version == 6)
            m.cidrs[i] = (v4, v6)  # type: ignore[assignment]
        fl.start()
        for i in ours:
            cluster.start(i)
        fl.wait_ready(timeout=60)
        for i in ours:  # two peers, a route to each of their subnets in each family
            cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 4, 60, "routing both families")
        for a in m.nodes:
            for b in m.nodes:
                if a != b:
                    for addr in m.addrs(b):
                        wait_reachable(lab.nodes[a], addr, timeout=30)
        assert fl.running(), fl.log_tail()
        yield m
    finally:
        fl.stop()
        cluster.stop_all()


def test_leases_are_both_pod_cidrs(mix):
    for i in mix.ours:
        lease = mix.cluster.status(i).lease
        assert (ipaddress.IPv4Network(lease.subnet), ipaddress.IPv6Network(lease.ipv6_subnet)) == mix.cidrs[i]
    assert (mix.flanneld.subnet, mix.flanneld.ipv6_subnet) == mix.cidrs[mix.f]
    assert all(c[1].subnet_of(ipaddress.IPv6Network(NETWORK6)) and c[1].prefixlen == 64 for c in mix.cidrs.values())


def test_every_pair_pings_over_both_families_and_carries_tcp_over_ipv6(mix):
    pairs = [(a, b) for a in mix.nodes for b in mix.nodes if a != b]
    lost = [(a, b, addr) for a, b in pairs for addr in mix.addrs(b) if ping(mix.lab.nodes[a], addr, 3) != 3]
    assert lost == [], "(lab node, lab node, address) with a lost echo"
    payload = os.urandom(TCP_BYTES)
    expected = (len(payload), hashlib.sha256(payload).hexdigest())
    for port, (a, b) in enumerate(pairs, start=5811):
        got = probe.tcp_transfer(mix.lab.nodes[a], mix.lab.nodes[b], mix.addrs(b)[1], payload, port)
        assert got == expected, (a, b)
    assert mix.flanneld.running(), mix.flanneld.log_tail()


def node_lease(mix, i: int) -> Lease:
    """What node i publishes, from its devices: as a kubenode Lease."""
    ns = mix.lab.nodes[i]
    mac, mac6 = device(ns, "flannel.1")["mac"], device(ns, "flannel-v6.1")["mac"]
    v4, v6 = mix.cidrs[i]
    return Lease(v4, ipaddress.IPv4Address(mix.lab.addresses[i]), "vxlan", 1, mac, ipv6_subnet=v6,
                 public_ipv6=ipaddress.IPv6Address(mix.lab.addresses6[i]), vni6=1, vtep_mac6=mac6)


def test_annotations_are_flanneld_s_byte_for_byte(mix):
    theirs = annotations(mix.kube, mix.name(mix.f))
    lease = node_lease(mix, mix.f)
    assert theirs == kubenode.publish(NAMES, lease, {}).changes  # our encoder, on flanneld's values
    assert theirs[P + "backend-v6-data"] == f'{{"VNI":1,"VtepMAC":"{lease.vtep_mac6}"}}'
    assert theirs[P + "public-ipv6"] == mix.lab.addresses6[mix.f]
    for i in mix.ours:
        mine = annotations(mix.kube, mix.name(i))
        assert set(mine) == set(theirs)
        assert mine == kubenode.publish(NAMES, node_lease(mix, i), {}).changes, i


def test_flannel_v6_entries_come_from_the_peers_annotations(mix):
    leases = {i: node_lease(mix, i) for i in mix.nodes}
    for i in mix.nodes:
        dev = device(mix.lab.nodes[i], "flannel-v6.1")
        peers = [j for j in mix.nodes if j != i]
        assert dev["local"] == mix.lab.addresses6[i]
        assert (dev["neighbours"], dev["fdb"]) == (
            {(str(mix.cidrs[j][1].network_address), leases[j].vtep_mac6) for j in peers},
            {(leases[j].vtep_mac6, mix.lab.addresses6[j]) for j in peers}), i


def test_a_restart_without_the_state_dir_takes_both_macs_from_the_node(mix):
    i = mix.ours[0]
    before = node_lease(mix, i)
    assert mix.cluster.stop(i) == 0
    d = mix.cluster.node_dir(i)
    for path in (localstate.mac_path(d, "flannel0"), localstate.mac_path(d, "flannel0", 6)):
        os.unlink(path)
    mix.cluster.start(i)
    mix.cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 4, 60, "ready again")
    after = node_lease(mix, i)
    assert (after.vtep_mac, after.vtep_mac6) == (before.vtep_mac, before.vtep_mac6)
    mix.cluster.wait_log(i, "taken from our Node's backend-v6-data annotation")
    assert annotations(mix.kube, mix.name(i)) == kubenode.publish(NAMES, before, {}).changes
    for b in mix.nodes:
        if b != i:
            for addr in mix.addrs(i):
                wait_reachable(mix.lab.nodes[b], addr, timeout=30)


def test_the_engine_carries_ipv6_in_kube_mode_too(mix):
    i = mix.ours[1]
    published = annotations(mix.kube, mix.name(i))
    assert mix.cluster.stop(i) == 0
    try:
        mix.cluster.start(i, ["--dataplane", "engine"])
        st = mix.cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 4, 60, "ready on the engine")
        assert st.dataplane.kind == "engine"
        assert annotations(mix.kube, mix.name(i)) == published  # the same VTEP MACs, both families
        for b in mix.nodes:
            if b != i:
                for theirs, ours in zip(mix.addrs(b), mix.addrs(i)):  # IPv4, then IPv6
                    wait_reachable(mix.lab.nodes[i], theirs, timeout=30)
                    wait_reachable(mix.lab.nodes[b], ours, timeout=30)
        payload = os.urandom(TCP_BYTES)
        for port, (a, b) in enumerate([(i, mix.f), (mix.f, i)], start=5891):
            got = probe.tcp_transfer(mix.lab.nodes[a], mix.lab.nodes[b], mix.addrs(b)[1], payload, port)
            assert got[0] == len(payload), (a, b)
    finally:  # back on the kernel plane, for the tests after this one
        mix.cluster.stop(i)
        mix.cluster.start(i)
        mix.cluster.wait_status(i, lambda s: s.ready and s.dataplane.kind == "kernel" and s.dataplane.peers == 4,
                                60, "ready again")


# -- IPv6-only (EnableIPv4 false), in the same cluster under its own annotation prefix ----

V6_PREFIX = "v6.flannel.example.com"  # so the dual-stack nodes are not its peers


@pytest.fixture(scope="module")
def only6(lab, kube, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("konly6"))
    kubeconfig = kube.flannel_kubeconfig("token")
    conf = os.path.join(work, "net-conf.json")
    with open(conf, "w") as f:
        json.dump({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": NETWORK6, "Backend": {"Type": "vxlan"}}, f)
    first = len(lab.nodes)
    for _ in range(3):
        lab.add_node()
    ours, fi = (first, first + 1), first + 2
    prefix = ["--kube-annotation-prefix", V6_PREFIX]
    cluster = Cluster(lab, work, kubeconfig=kubeconfig, net_config=conf, node_prefix="k6o",
                      extra_args=["--dataplane", "auto", *prefix])
    fl = Flanneld(lab.nodes[fi], os.path.join(work, "flanneld"), kubeconfig=kubeconfig,
                  node_name=cluster.node_name(fi), net_config=conf, extra_args=prefix)
    m = Mixed(lab, kube, cluster, fl, ours, fi)
    try:
        for i in m.nodes:
            kube.register_node(m.name(i), lab.addresses[i])
            got = [ipaddress.ip_network(c) for c in kube.wait_pod_cidrs(m.name(i))]
            m.cidrs[i] = tuple(sorted(got, key=lambda c: c.version))  # type: ignore[assignment]
        fl.start()
        for i in ours:
            cluster.start(i)
        fl.wait_ready(timeout=60)
        for i in ours:
            cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 2, 60, "routing to both others")
        yield m
    finally:
        fl.stop()
        cluster.stop_all()


def test_ipv6_only_nodes_ping_and_carry_tcp_beside_flanneld(only6):
    m = only6
    for i in m.ours:
        lease = m.cluster.status(i).lease
        assert lease.subnet is None and ipaddress.IPv6Network(lease.ipv6_subnet) == m.cidrs[i][1]
        assert m.cluster.status(i).dataplane.kind == "kernel"  # --dataplane auto picked the kernel plane
    assert m.flanneld.ipv6_subnet == m.cidrs[m.f][1]
    pairs = [(a, b) for a in m.nodes for b in m.nodes if a != b]
    for a, b in pairs:
        wait_reachable(m.lab.nodes[a], m.addrs(b)[1], timeout=30)
    assert [(a, b) for a, b in pairs if ping(m.lab.nodes[a], m.addrs(b)[1], 3) != 3] == []
    payload = os.urandom(TCP_BYTES)
    expected = (len(payload), hashlib.sha256(payload).hexdigest())
    for port, (a, b) in enumerate(pairs, start=5911):
        assert probe.tcp_transfer(m.lab.nodes[a], m.lab.nodes[b], m.addrs(b)[1], payload, port) == expected, (a, b)
    names = kubenode.annotation_names(V6_PREFIX)

    def published(i: int) -> dict[str, str]:
        got = m.kube.api.get(f"/api/v1/nodes/{m.name(i)}")["metadata"].get("annotations", {})
        return {k: v for k, v in got.items() if k.startswith(V6_PREFIX + "/")}

    def lease6(i: int) -> Lease:
        mac6 = device(m.lab.nodes[i], "flannel-v6.1")["mac"]
        return Lease(None, ipaddress.IPv4Address(0), "vxlan", None, None, ipv6_subnet=m.cidrs[i][1],
                     public_ipv6=ipaddress.IPv6Address(m.lab.addresses6[i]), vni6=1, vtep_mac6=mac6)
    theirs = published(m.f)
    assert theirs == kubenode.publish(names, lease6(m.f), {}).changes
    assert names.public_ip not in theirs and names.backend_data not in theirs
    for i in m.ours:
        assert published(i) == kubenode.publish(names, lease6(i), {}).changes, i
    assert m.flanneld.running(), m.flanneld.log_tail()
