"""The engine plane with EnableIPv6, beside the kernel plane and the real flanneld
v0.28.9, on one etcd, in namespaces on a dual-stack underlay.

- Dual stack: a flanneld node, a udpflannel kernel-plane node and two engine nodes.
  Every pair pings over IPv4 and IPv6 and carries TCP over IPv6 both ways where an
  engine is at either end; the engine nodes' leases are flanneld's bytes with their
  IPv6 VTEP MAC (BackendV6Data), which the peers' flannel-v6.1 programs; the TUN has
  <subnet ::>/128 and the IPv6 network routed in with flannel-v6's MTU (the underlay's
  minus 70); an unleased IPv6 subnet gets ICMPv6 "destination unreachable" back from
  the engine; a takeover and a warm start carry the IPv6 sockets and routes.
- IPv6-only (EnableIPv4 false): two engine nodes (compiled, and the Python twin) and a
  kernel-plane node ping each other and carry TCP both ways; the engine binds, leases
  and routes nothing of IPv4. (flanneld v0.28.9 on etcd cannot hold two IPv6-only
  nodes: test_dual_stack.py judges it alone.)

`make test` runs this file again with FLANNELD_IO=threads and loop (IO_TESTS).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import socket
import subprocess
from dataclasses import dataclass

import pytest
from etcd_server import subnet_leases
from test_dual_stack import (  # noqa: F401 - fixtures: lab (a dual-stack underlay) and etcd, this module's own
    NETWORK,
    NETWORK6,
    device,
    dual_config,
    etcd,
    lab,
    ping,
    prefix,
    wait_reachable,
)
from test_takeover import start_successor, wait_pid_in_status

from udpflannel.core import lease as leases
from udpflannel.host import localstate
from udpflannel.lab import procs
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.flanneld import Flanneld
from udpflannel.lab.netns import Lab, Namespace
from udpflannel.lab.probe import tcp_transfer

TCP_BYTES = (1 << 20) + 77
ENGINE, KERNEL = ["--dataplane", "engine"], ["--dataplane", "kernel"]
PYTHON_ENGINE = [*ENGINE, "--engine", "python", "--io", "loop", "--offload", "off"]
RTAX_MTU = "RTAX_MTU"


@dataclass
class Nodes:
    """A cluster of lab nodes: flanneld (``f``, or None), kernel-plane and engine nodes."""
    lab: Lab
    prefix: str
    cluster: Cluster
    flanneld: Flanneld | None
    f: int | None
    kernel: tuple[int, ...]
    engines: tuple[int, ...]

    @property
    def nodes(self) -> list[int]:
        return [*([self.f] if self.f is not None else []), *self.kernel, *self.engines]

    def ns(self, i: int) -> Namespace:
        return self.lab.nodes[i]

    def subnets(self, i: int) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        if i == self.f:
            assert self.flanneld is not None
            return [s for s in (self.flanneld.subnet, self.flanneld.ipv6_subnet) if s is not None]
        lease = self.cluster.status(i).lease
        return [ipaddress.ip_network(s) for s in (lease.subnet, lease.ipv6_subnet) if s]

    def addrs(self, i: int) -> list[str]:
        """The node's overlay addresses (<subnet .0>, <subnet ::>), IPv4 first."""
        return [str(s.network_address) for s in self.subnets(i)]

    def addr6(self, i: int) -> str:
        return self.addrs(i)[-1]

    def pairs(self) -> list[tuple[int, int]]:
        return [(a, b) for a in self.nodes for b in self.nodes if a != b]


def _start(nodes: Nodes, planes: dict[int, list[str]], peers: int) -> None:
    """Start the udpflannel nodes, each with its plane's flags, until each routes ``peers``
    subnets and every node reaches every other's addresses."""
    for i, flags in planes.items():
        nodes.cluster.start(i, flags)
    for i in planes:
        nodes.cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == peers, 30, f"routing {peers}")
    for a, b in nodes.pairs():
        for addr in nodes.addrs(b):
            wait_reachable(nodes.ns(a), addr)


@pytest.fixture(scope="module")
def mix(lab, etcd, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("dual-engine"))
    p = prefix()
    etcd.etcdctl("put", f"{p}/config", json.dumps(dual_config()))
    first = len(lab.nodes)
    for _ in range(4):
        lab.add_node()
    f, k, e1, e2 = range(first, first + 4)
    fl = Flanneld(lab.nodes[f], os.path.join(workdir, "flanneld"), etcd_endpoints=etcd.endpoint, etcd_prefix=p)
    cluster = Cluster(lab, workdir, etcd_endpoints=etcd.endpoint, extra_args=["--etcd-prefix", p])
    nodes = Nodes(lab, p, cluster, fl, f, (k,), (e1, e2))
    try:
        fl.start().wait_ready()
        _start(nodes, {k: KERNEL, e1: ENGINE, e2: ENGINE}, peers=6)  # three peers, both families
        yield nodes
    finally:
        fl.stop()
        cluster.stop_all()


def _tcp_both_ways_over_ipv6(nodes: Nodes, first_port: int) -> list[tuple[int, int]]:
    """TCP over IPv6 between every pair with an engine at either end, each way: the
    pairs whose transfer did not arrive whole."""
    payload = os.urandom(TCP_BYTES)
    expected = (len(payload), hashlib.sha256(payload).hexdigest())
    pairs = [(a, b) for a, b in nodes.pairs() if a in nodes.engines or b in nodes.engines]
    return [(a, b) for port, (a, b) in enumerate(pairs, start=first_port)
            if tcp_transfer(nodes.ns(a), nodes.ns(b), nodes.addr6(b), payload, port) != expected]


def _unexpected_drops(nodes: Nodes) -> dict[int, dict[str, int]]:
    """Drops on the engine nodes other than outbound no-route (the kernel's own IPv6
    chatter into the TUN, multicast listener reports, has no peer)."""
    out = {}
    for i in nodes.engines:
        counters = nodes.cluster.status(i).dataplane.counters
        bad = {k: v for k, v in counters.items() if k.startswith("drop_") and k != "drop_no_route" and v}
        if bad:
            out[i] = bad
    return out


def test_every_pair_pings_over_both_families_and_carries_tcp_over_ipv6_both_ways(mix):
    lost = [(a, b, addr) for a, b in mix.pairs() for addr in mix.addrs(b) if ping(mix.ns(a), addr, 3) != 3]
    assert lost == [], "(lab node, lab node, address) with a lost echo"
    assert _tcp_both_ways_over_ipv6(mix, 6111) == []
    assert _unexpected_drops(mix) == {}
    for i in mix.engines:  # the transfers to it (one from each other node) crossed its engine
        st = mix.cluster.status(i)
        assert st.dataplane.kind == "engine" and st.dataplane.counters["rx_bytes"] > 3 * TCP_BYTES
    assert mix.flanneld.running(), mix.flanneld.log_tail()


def _mac6(nodes: Nodes, i: int) -> str:
    """An engine node's IPv6 VTEP MAC, as its state dir keeps it."""
    mac = localstate.load_mac(nodes.cluster.node_dir(i), "flannel0", 6)
    assert mac is not None, f"node {i}: no IPv6 VTEP MAC kept"
    return mac


def test_engine_leases_are_flanneld_s_and_its_peers_program_their_ipv6_vtep(mix, etcd):
    stored = subnet_leases(etcd, mix.prefix)
    for i in mix.engines:
        v4, v6 = mix.subnets(i)
        mac = localstate.load_mac(mix.cluster.node_dir(i), "flannel0")
        mac6 = _mac6(mix, i)
        assert mac6 != mac and mix.cluster.status(i).lease.vtep_mac6 == mac6
        assert stored[leases.subnet_key(v4, v6)]["value"] == (
            f'{{"PublicIP":"{mix.lab.addresses[i]}","PublicIPv6":"{mix.lab.addresses6[i]}","BackendType":"vxlan",'
            f'"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}'), i
        for peer in (mix.f, *mix.kernel):  # flanneld's flannel-v6.1, and ours, frame to it
            dev = device(mix.ns(peer), "flannel-v6.1")
            assert (mac6, mix.lab.addresses6[i]) in dev["fdb"], (peer, i)
            assert (str(v6.network_address), mac6) in dev["neighbours"], (peer, i)


def _tun(ns: Namespace) -> dict:
    """flannel0's MTU, its addresses (no link-local) and the routes through it, by family."""
    with ns.ipr() as ipr:
        index = ipr.link_lookup(ifname="flannel0")[0]
        out: dict = {"mtu": ipr.link("get", index=index)[0].get_attr("IFLA_MTU")}
        for name, family in (("v4", socket.AF_INET), ("v6", socket.AF_INET6)):
            out[name] = {
                "addresses": sorted(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                                    for a in ipr.get_addr(family=family, index=index)
                                    if not a.get_attr("IFA_ADDRESS").startswith("fe80:")),
                "routes": {f"{r.get_attr('RTA_DST')}/{r['dst_len']}": dict((r.get_attr("RTA_METRICS") or {})
                                                                           .get("attrs", [])).get(RTAX_MTU)
                           for r in ipr.route("dump", family=family, table=254)
                           if r.get_attr("RTA_OIF") == index and r.get_attr("RTA_DST")
                           and r["dst_len"] < (32 if family == socket.AF_INET else 128)
                           and not r.get_attr("RTA_DST").startswith("fe80:")}}
    return out


def test_the_tun_carries_both_families_with_flannel_v6_s_mtu_for_ipv6(mix):
    flannel_v6_mtu = device(mix.ns(mix.f), "flannel-v6.1")["mtu"]
    assert flannel_v6_mtu == 1430  # the underlay's 1500 minus VXLAN over IPv6's 70
    for i in mix.engines:
        v4, v6 = mix.subnets(i)
        assert _tun(mix.ns(i)) == {
            "mtu": 1450,
            "v4": {"addresses": [f"{v4.network_address}/32"], "routes": {NETWORK: None}},
            "v6": {"addresses": [f"{v6.network_address}/128"], "routes": {NETWORK6: flannel_v6_mtu}}}, i
        st = mix.cluster.status(i).dataplane
        assert st.listening == (f"VXLAN {mix.lab.addresses[i]}:8472", f"VXLAN [{mix.lab.addresses6[i]}]:8472")


def _unleased_ipv6_address(nodes: Nodes) -> str:
    network = ipaddress.IPv6Network(NETWORK6)
    leased = {s for i in nodes.nodes for s in nodes.subnets(i) if s.version == 6}
    free = next(s for s in network.subnets(new_prefix=64) if s not in leased and s.network_address != network[0])
    return str(free.network_address + 1)


def test_an_unleased_ipv6_subnet_gets_icmpv6_destination_unreachable_from_the_engine(mix):
    i = mix.engines[0]
    target = _unleased_ipv6_address(mix)
    before = mix.cluster.status(i).dataplane.counters["icmp_unreachable"]
    res = mix.ns(i).run(["ping", "-6", "-n", "-c", "1", "-W", "2", target], 15)
    assert res.returncode != 0
    assert re.search(r"Destination unreachable: No route", res.stdout), res.stdout + res.stderr
    assert mix.cluster.status(i).dataplane.counters["icmp_unreachable"] > before


PINGS = 60


def test_a_takeover_carries_the_ipv6_sockets_and_routes(mix):
    i, other = mix.engines[0], mix.kernel[0]
    before = mix.cluster.status(i)
    pinger = mix.ns(other).popen(["ping", "-6", "-n", "-c", str(PINGS), "-i", "0.05", "-W", "1", mix.addr6(i)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    old = mix.cluster.procs[i]
    new = start_successor(mix.cluster, i, *ENGINE, "--takeover")
    try:
        assert old.wait(30) == 0, mix.cluster.log_tail(i, 40)
        mix.cluster.procs[i] = new  # the fixture stops it from here on
        after = wait_pid_in_status(mix.cluster, i, new.pid)
    finally:
        if mix.cluster.procs.get(i) is not new:
            procs.terminate(new)
        pinged, _ = procs.communicate(pinger, 30)
    received = re.search(r"(\d+) received", pinged)
    assert received and int(received.group(1)) >= PINGS - 3, pinged  # a takeover is no outage
    assert (after.lease.ipv6_subnet, after.lease.vtep_mac6) == (before.lease.ipv6_subnet, before.lease.vtep_mac6)
    assert after.dataplane.listening == before.dataplane.listening
    assert "took over flannel0 from the running daemon: 6 routes, forwarding" in mix.cluster.log(i)
    for peer in mix.nodes:
        if peer != i:
            assert ping(mix.ns(peer), mix.addr6(i), 2) == 2 and ping(mix.ns(i), mix.addr6(peer), 2) == 2


def test_a_warm_start_forwards_ipv6_with_the_remembered_routes(mix):
    if os.environ.get("FLANNELD_IO") == "loop":
        pytest.skip("a warm start needs the engine on its own threads (--io poll or threads)")
    i = mix.engines[1]
    assert mix.cluster.stop(i) == 0
    mix.cluster.start(i, ENGINE)
    mix.cluster.wait_log(i, "warm start: forwarding on flannel0 with the 6 routes it last had", 30)
    mix.cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 6, 30, "ready again")
    for peer in mix.nodes:
        if peer != i:
            wait_reachable(mix.ns(peer), mix.addr6(i))
            assert ping(mix.ns(i), mix.addr6(peer), 2) == 2


# -- IPv6 only ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def only6(lab, etcd, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("only6-engine"))
    p = prefix()
    config = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": NETWORK6, "Backend": {"Type": "vxlan"}}
    etcd.etcdctl("put", f"{p}/config", json.dumps(config))
    first = len(lab.nodes)
    for _ in range(3):
        lab.add_node()
    k, e, py = range(first, first + 3)
    cluster = Cluster(lab, workdir, etcd_endpoints=etcd.endpoint, extra_args=["--etcd-prefix", p])
    nodes = Nodes(lab, p, cluster, None, None, (k,), (e, py))
    try:
        _start(nodes, {k: KERNEL, e: ENGINE, py: PYTHON_ENGINE}, peers=2)
        yield nodes
    finally:
        cluster.stop_all()


def test_ipv6_only_engine_nodes_ping_and_carry_tcp_both_ways(only6):
    lost = [(a, b) for a, b in only6.pairs() if ping(only6.ns(a), only6.addr6(b), 3) != 3]
    assert lost == []
    assert _tcp_both_ways_over_ipv6(only6, 6311) == []
    assert _unexpected_drops(only6) == {}


def test_ipv6_only_engine_nodes_lease_and_route_nothing_of_ipv4(only6, etcd):
    stored = subnet_leases(etcd, only6.prefix)
    kernel_env = _subnet_env(only6, only6.kernel[0])
    for i in only6.engines:
        (v6,) = only6.subnets(i)
        doc = json.loads(stored[leases.subnet_key(None, v6)]["value"])
        assert doc == {"PublicIP": "0.0.0.0", "PublicIPv6": only6.lab.addresses6[i], "BackendType": "vxlan",
                       "BackendV6Data": {"VNI": 1, "VtepMAC": _mac6(only6, i)}}
        tun = _tun(only6.ns(i))
        assert tun["v4"] == {"addresses": [], "routes": {}}, i
        assert tun["v6"] == {"addresses": [f"{v6.network_address}/128"], "routes": {NETWORK6: 1430}}, i
        assert only6.cluster.status(i).dataplane.listening == (f"VXLAN [{only6.lab.addresses6[i]}]:8472",)
        assert _subnet_env(only6, i) == kernel_env
        with only6.ns(i).ipr() as ipr:
            assert not ipr.link_lookup(ifname="flannel.1") and not ipr.link_lookup(ifname="flannel-v6.1")


def _subnet_env(nodes: Nodes, i: int) -> str:
    """The node's subnet.env, its own subnet masked."""
    (v6,) = nodes.subnets(i)
    with open(os.path.join(nodes.cluster.node_dir(i), "subnet.env")) as f:
        return f.read().replace(f"{v6.network_address}1/", "<first>/")


def test_the_ipv6_route_mtu_follows_a_shrinking_underlay(only6):
    """Without Backend.MTU the TUN follows the underlay's MTU, and its IPv6 route's MTU
    with it, 20 bytes below (last here: the node's underlay stays shrunk)."""
    e, k = only6.engines[0], only6.kernel[0]
    only6.ns(e).link_up("eth0", mtu=1400)
    only6.cluster.wait_status(e, lambda s: s.dataplane.mtu == 1350, 10, "following the underlay MTU")
    assert _tun(only6.ns(e))["v6"]["routes"] == {NETWORK6: 1330}
    payload = os.urandom(TCP_BYTES)  # sized for the smaller path from here on
    assert tcp_transfer(only6.ns(e), only6.ns(k), only6.addr6(k), payload, 6411)[0] == len(payload)
