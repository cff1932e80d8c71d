"""Dual stack beside the real flanneld v0.28.9 (EnableIPv6), in namespaces on a
dual-stack underlay, on one etcd.

- One cluster per rules backend (iptables, nftables): a flanneld node and two
  udpflannel kernel-plane nodes, all with --ip-masq: every pair pings over IPv4 and
  IPv6 (`ping -6` to the peer's IPv6 overlay address) and carries TCP over IPv6 both
  ways; the leases (keys and bytes), subnet.env, flannel.1 and flannel-v6.1 (device,
  address, neighbours, fdb, routes) and the rules (iptables and ip6tables, or the nft
  tables ip flannel-ipv4 and ip6 flannel-ipv6) are flanneld's.
- An IPv6-only cluster (EnableIPv4 false) of udpflannel nodes (flanneld v0.28.9 on etcd
  cannot hold two IPv6-only nodes: every such lease has PublicIP 0.0.0.0, and it takes
  the first it finds as its own; README, Differences), judged against one flanneld in
  a network of its own: an engine node beside kernel-plane ones (`--dataplane auto`
  picks the kernel). test_dual_stack_engine.py has the engine's own cases.
- A node's IPv4 lease moved to its dual-stack key when IPv6 is turned on: same IPv4
  subnet, no IPv4 ping lost while it restarts.

Known differences (the fallback route, route protocol 203, no IPv6 on flannel.1) are
not asserted here: see the README's "Differences from flanneld".
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import pytest

from udpflannel.core import lease as leases
from udpflannel.host import localstate
from udpflannel.lab import probe
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.flanneld import Flanneld
from udpflannel.lab.netns import Lab, Namespace

try:
    from .etcd_server import EtcdServer, etcd_in_hub, subnet_leases
except ImportError:
    from etcd_server import EtcdServer, etcd_in_hub, subnet_leases

NETWORK, NETWORK6 = "10.244.0.0/16", "fd10::/56"
UNDERLAY6 = "fd00:250::/64"
LEASE_TTL = 24 * 3600
TCP_BYTES = (1 << 20) + 77
NUD_PERMANENT, RTNH_F_ONLINK, RTPROT_KERNEL = 0x80, 4, 2


def dual_config(rules: str = "iptables", **more) -> dict:
    return {"Network": NETWORK, "EnableIPv6": True, "IPv6Network": NETWORK6, "Backend": {"Type": "vxlan"},
            "EnableNFTables": rules == "nftables", **more}


def prefix() -> str:
    return f"/t-{uuid.uuid4().hex[:8]}/network"


@pytest.fixture(scope="module")
def lab():
    with Lab(0, tag="ufd", underlay6=UNDERLAY6) as lab:
        yield lab


@pytest.fixture(scope="module")
def etcd(lab, tmp_path_factory):
    with etcd_in_hub(lab, tmp_path_factory.mktemp("etcd")) as server:
        yield server


# -- helpers ------------------------------------------------------------------------

def ping(ns: Namespace, addr: str, count: int = 3) -> int:
    """Echo replies received from ``addr`` (`ping`, or `ping -6` for an IPv6 address)."""
    family = ["-6"] if ipaddress.ip_address(addr).version == 6 else ["-4"]
    res = ns.run(["ping", *family, "-n", "-c", str(count), "-i", "0.2", "-W", "2", addr], 15 + count)
    found = re.search(r"(\d+) received", res.stdout)
    return int(found.group(1)) if found else 0


def wait_reachable(ns: Namespace, addr: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while ping(ns, addr, 1) != 1:
        assert time.monotonic() < deadline, f"{addr} unreachable from {ns.name} after {timeout:.0f} s"


def device(ns: Namespace, name: str) -> dict:
    """What a peer relies on of VXLAN device ``name``: its parameters, MTU, MAC, state,
    its addresses (IPv4, and IPv6 but link-local) and its per-peer entries."""
    with ns.ipr() as ipr:
        found = ipr.link_lookup(ifname=name)
        assert found, f"no {name} in {ns.name}"
        index = found[0]
        msg = ipr.link("get", index=index)[0]
        data = msg.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
        family = socket.AF_INET6 if name.startswith("flannel-v6") else socket.AF_INET
        addrs = sorted((a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(family=family, index=index)
                       if not a.get_attr("IFA_ADDRESS").startswith("fe80:"))
        neigh = {(n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR"))
                 for n in ipr.neigh("dump", ifindex=index, family=family) if n["state"] & NUD_PERMANENT}
        fdb = {(e.get_attr("NDA_LLADDR"), e.get_attr("NDA_DST")) for e in ipr.fdb("dump", ifindex=index)
               if e["ifindex"] == index and e.get_attr("NDA_DST") and e["state"] & NUD_PERMANENT}
        routes = {(f"{r.get_attr('RTA_DST')}/{r['dst_len']}", r.get_attr("RTA_GATEWAY"),
                   bool(r["flags"] & RTNH_F_ONLINK)) for r in ipr.route("dump", family=family, table=254)
                  if r.get_attr("RTA_OIF") == index and r.get_attr("RTA_DST") and r["proto"] != RTPROT_KERNEL}
        local = data.get_attr("IFLA_VXLAN_LOCAL6" if family == socket.AF_INET6 else "IFLA_VXLAN_LOCAL")
        return {"mtu": msg.get_attr("IFLA_MTU"), "up": bool(msg["flags"] & 1), "mac": msg.get_attr("IFLA_ADDRESS"),
                "vxlan": (data.get_attr("IFLA_VXLAN_ID"), data.get_attr("IFLA_VXLAN_PORT"),
                          data.get_attr("IFLA_VXLAN_LEARNING"), data.get_attr("IFLA_VXLAN_UDP_CSUM"),
                          ipr.link("get", index=data.get_attr("IFLA_VXLAN_LINK"))[0].get_attr("IFLA_IFNAME")),
                "local": local, "addresses": addrs, "neighbours": neigh, "fdb": fdb, "routes": routes}


def shape(value):
    if isinstance(value, dict):
        return tuple((k, shape(v)) for k, v in value.items())
    return type(value).__name__


# -- a cluster of flanneld and udpflannel kernel-plane nodes ----------------------------

@dataclass
class Mix:
    lab: Lab
    prefix: str
    rules: str
    flanneld: Flanneld
    cluster: Cluster
    f: int
    ours: tuple[int, ...]

    @property
    def nodes(self) -> list[int]:
        return [self.f, *self.ours]

    def ns(self, i: int) -> Namespace:
        return self.lab.nodes[i]

    def subnets(self, i: int) -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network]:
        if i == self.f:
            return self.flanneld.subnet, self.flanneld.ipv6_subnet
        st = self.cluster.status(i).lease
        return ipaddress.IPv4Network(st.subnet), ipaddress.IPv6Network(st.ipv6_subnet)

    def addrs(self, i: int) -> tuple[str, str]:
        v4, v6 = self.subnets(i)
        return str(v4.network_address), str(v6.network_address)

    def subnet_file(self, i: int) -> str:
        return self.flanneld.subnet_file if i == self.f else os.path.join(self.cluster.node_dir(i), "subnet.env")


@pytest.fixture(scope="module", params=["iptables", "nftables"])
def mix(request, lab, etcd, tmp_path_factory):
    rules = request.param
    workdir = str(tmp_path_factory.mktemp(f"dual-{rules}"))
    p = prefix()
    etcd.etcdctl("put", f"{p}/config", json.dumps(dual_config(rules)))
    first = len(lab.nodes)
    for _ in range(3):
        lab.add_node()
    fl = Flanneld(lab.nodes[first], os.path.join(workdir, "flanneld"), etcd_endpoints=etcd.endpoint,
                  etcd_prefix=p, ip_masq=True)
    cluster = Cluster(lab, workdir, etcd_endpoints=etcd.endpoint,
                      extra_args=["--etcd-prefix", p, "--ip-masq", "--dataplane", "kernel"])
    m = Mix(lab, p, rules, fl, cluster, first, (first + 1, first + 2))
    try:
        fl.start().wait_ready()
        for i in m.ours:
            cluster.start(i)
        for i in m.ours:  # two peers, a route to each of their subnets
            cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 4, 30, "routing both families")
        for a in m.nodes:
            for b in m.nodes:
                if a != b:
                    for addr in m.addrs(b):
                        wait_reachable(lab.nodes[a], addr)
        assert fl.running(), fl.log_tail()
        yield m
    finally:
        fl.stop()
        cluster.stop_all()


def test_every_pair_pings_over_both_families_and_carries_tcp_over_ipv6(mix):
    pairs = [(a, b) for a in mix.nodes for b in mix.nodes if a != b]
    lost = [(a, b, addr) for a, b in pairs for addr in mix.addrs(b) if ping(mix.ns(a), addr, 3) != 3]
    assert lost == [], f"{mix.rules}: (lab node, lab node, address) with a lost echo"
    payload = os.urandom(TCP_BYTES)
    expected = (len(payload), hashlib.sha256(payload).hexdigest())
    for port, (a, b) in enumerate(pairs, start=5611):
        assert probe.tcp_transfer(mix.ns(a), mix.ns(b), mix.addrs(b)[1], payload, port) == expected, (a, b)
    assert mix.flanneld.running(), mix.flanneld.log_tail()


def test_leases_in_etcd_are_flanneld_s(mix, etcd):
    stored = subnet_leases(etcd, mix.prefix)
    keys = {i: leases.subnet_key(*mix.subnets(i)) for i in mix.nodes}
    assert set(stored) == set(keys.values()) and all("&" in k for k in keys.values())
    docs = {i: json.loads(stored[keys[i]]["value"]) for i in mix.nodes}
    assert {i: shape(d) for i, d in docs.items()} == {i: shape(docs[mix.f]) for i in mix.nodes}
    for i in mix.nodes:
        mac, mac6 = device(mix.ns(i), "flannel.1")["mac"], device(mix.ns(i), "flannel-v6.1")["mac"]
        assert stored[keys[i]]["value"] == (
            f'{{"PublicIP":"{mix.lab.addresses[i]}","PublicIPv6":"{mix.lab.addresses6[i]}","BackendType":"vxlan",'
            f'"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}'), i
        parsed = leases.decode(keys[i], stored[keys[i]]["value"])  # ours reads flanneld's as its own
        assert (parsed.subnet, parsed.ipv6_subnet) == mix.subnets(i)
    ids = {i: stored[keys[i]]["lease"] for i in mix.nodes}
    assert 0 not in ids.values() and len(set(ids.values())) == len(ids)
    granted = {i: int(etcd.etcdctl_json("lease", "timetolive", format(ids[i], "x"))["granted-ttl"])
               for i in mix.nodes}
    assert granted == dict.fromkeys(mix.nodes, LEASE_TTL)


def test_subnet_env_agrees_line_for_line(mix):
    def masked(i: int) -> str:
        v4, v6 = mix.subnets(i)
        with open(mix.subnet_file(i)) as f:
            text = f.read()
        return (text.replace(f"={v4.network_address + 1}/{v4.prefixlen}\n", "=<v4>\n")
                .replace(f"={v6.network_address + 1}/{v6.prefixlen}\n", "=<v6>\n"))
    theirs = masked(mix.f)
    assert theirs == (f"FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET=<v4>\nFLANNEL_IPV6_NETWORK={NETWORK6}\n"
                      "FLANNEL_IPV6_SUBNET=<v6>\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    for i in mix.ours:
        assert masked(i) == theirs, i


def test_devices_and_per_peer_entries_are_flanneld_s(mix):
    macs = {i: {4: device(mix.ns(i), "flannel.1")["mac"], 6: device(mix.ns(i), "flannel-v6.1")["mac"]}
            for i in mix.nodes}
    publics = {i: {4: mix.lab.addresses[i], 6: mix.lab.addresses6[i]} for i in mix.nodes}
    theirs = {name: device(mix.ns(mix.f), name) for name in ("flannel.1", "flannel-v6.1")}
    for i in mix.nodes:
        for version, name in ((4, "flannel.1"), (6, "flannel-v6.1")):
            dev = device(mix.ns(i), name)
            want = (theirs[name]["vxlan"], theirs[name]["mtu"], True)
            assert (dev["vxlan"], dev["mtu"], dev["up"]) == want, (i, name)
            assert dev["local"] == publics[i][version]
            own = mix.subnets(i)[version == 6]
            assert dev["addresses"] == [(str(own.network_address), own.max_prefixlen)], (i, name)
            peers = [j for j in mix.nodes if j != i]
            nets = {j: mix.subnets(j)[version == 6] for j in peers}
            assert (dev["neighbours"], dev["fdb"], dev["routes"]) == (
                {(str(nets[j].network_address), macs[j][version]) for j in peers},
                {(macs[j][version], publics[j][version]) for j in peers},
                {(str(nets[j]), str(nets[j].network_address), True) for j in peers}), (i, name)
    assert theirs["flannel-v6.1"]["mtu"] == 1430 and theirs["flannel.1"]["mtu"] == 1450


def _iptables(ns: Namespace, tool: str, mask: dict[str, str]) -> list[str]:
    res = ns.run([tool], 15)
    assert res.returncode == 0, res.stderr
    lines = [re.sub(r" \[\d+:\d+\]$", "", line) for line in res.stdout.splitlines()
             if line and not line.startswith("#")]
    for real, name in mask.items():
        lines = [line.replace(real, name) for line in lines]
    return lines


def _nft(ns: Namespace, mask: dict[str, str]) -> str:
    res = ns.run(["nft", "list", "ruleset"], 15)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    for real, name in mask.items():
        text = text.replace(real, name)
    return text


def test_rules_agree(mix):
    def mask(i: int) -> dict[str, str]:
        v4, v6 = mix.subnets(i)
        return {str(v4): "<subnet>", str(v6): "<subnet6>"}
    if mix.rules == "iptables":
        for tool in ("iptables-save", "ip6tables-save"):
            theirs = _iptables(mix.ns(mix.f), tool, mask(mix.f))
            assert any("FLANNEL-POSTRTG -s <subnet" in line for line in theirs), theirs
            for i in mix.ours:
                assert _iptables(mix.ns(i), tool, mask(i)) == theirs, (i, tool)
    else:
        theirs = _nft(mix.ns(mix.f), mask(mix.f))
        assert "table ip6 flannel-ipv6" in theirs and "ip6 daddr != ff00::/8" in theirs, theirs
        for i in mix.ours:
            assert _nft(mix.ns(i), mask(i)) == theirs, i


# -- IPv6 only ---------------------------------------------------------------------------

def test_an_ipv6_only_cluster_and_its_leases_as_flanneld_writes_them(lab, etcd, tmp_path):
    config = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": NETWORK6, "Backend": {"Type": "vxlan"}}
    p, alone = prefix(), prefix()
    etcd.etcdctl("put", f"{p}/config", json.dumps(config))
    etcd.etcdctl("put", f"{alone}/config", json.dumps(config))
    first = len(lab.nodes)
    for _ in range(4):
        lab.add_node()
    nodes = [first, first + 1, first + 2]
    cluster = Cluster(lab, str(tmp_path), etcd_endpoints=etcd.endpoint, extra_args=["--etcd-prefix", p])
    fl = Flanneld(lab.nodes[first + 3], str(tmp_path / "flanneld"), etcd_endpoints=etcd.endpoint,
                  etcd_prefix=alone)
    try:
        for i, plane in zip(nodes, ("engine", "kernel", "auto")):
            cluster.start(i, ["--dataplane", plane])
        sts = {i: cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 2, 30) for i in nodes}
        assert [sts[i].dataplane.kind for i in nodes] == ["engine", "kernel", "kernel"]
        fl.start().wait_ready()
        addrs = {i: str(ipaddress.IPv6Network(sts[i].lease.ipv6_subnet).network_address) for i in nodes}
        for a in nodes:
            for b in nodes:
                if a != b:
                    wait_reachable(lab.nodes[a], addrs[b])
                    assert ping(lab.nodes[a], addrs[b], 3) == 3, (a, b)
        payload = os.urandom(TCP_BYTES)
        for port, (a, b) in enumerate([(nodes[0], nodes[1]), (nodes[1], nodes[0])], start=5711):
            assert probe.tcp_transfer(lab.nodes[a], lab.nodes[b], addrs[b], payload, port)[0] == len(payload)

        stored, theirs = subnet_leases(etcd, p), subnet_leases(etcd, alone)
        assert [k.split("&")[0] for k in theirs] == ["0.0.0.0-0"]
        assert sorted(stored) == sorted(f"0.0.0.0-0&{ipaddress.IPv6Network(sts[i].lease.ipv6_subnet).network_address}"
                                        f"-64" for i in nodes)
        flanneld_doc = json.loads(next(iter(theirs.values()))["value"])
        for i in nodes:
            key = leases.subnet_key(None, ipaddress.IPv6Network(sts[i].lease.ipv6_subnet))
            doc = json.loads(stored[key]["value"])
            assert shape(doc) == shape(flanneld_doc)
            mac6 = (localstate.load_mac(cluster.node_dir(i), "flannel0", 6) if i == nodes[0]  # the engine's
                    else device(lab.nodes[i], "flannel-v6.1")["mac"])
            assert doc == {"PublicIP": "0.0.0.0", "PublicIPv6": lab.addresses6[i], "BackendType": "vxlan",
                           "BackendV6Data": {"VNI": 1, "VtepMAC": mac6}}
            with open(os.path.join(cluster.node_dir(i), "subnet.env")) as f:
                ours = f.read().replace(f"{ipaddress.IPv6Network(sts[i].lease.ipv6_subnet).network_address}1/",
                                        "<first>/")
            assert ours == fl.subnet_env().replace(f"{fl.ipv6_subnet.network_address}1/", "<first>/")
            with lab.nodes[i].ipr() as ipr:
                assert not ipr.link_lookup(ifname="flannel.1")  # no IPv4 device, as flanneld
        ours_dev, their_dev = device(lab.nodes[nodes[1]], "flannel-v6.1"), device(fl.ns, "flannel-v6.1")
        assert (ours_dev["vxlan"], ours_dev["mtu"]) == (their_dev["vxlan"], their_dev["mtu"])
    finally:
        fl.stop()
        cluster.stop_all()


# -- turning IPv6 on ---------------------------------------------------------------------

def test_turning_ipv6_on_keeps_each_node_s_ipv4_subnet(lab, etcd, tmp_path):
    p = prefix()
    etcd.etcdctl("put", f"{p}/config", json.dumps({"Network": NETWORK, "Backend": {"Type": "vxlan"}}))
    a, b = len(lab.nodes), len(lab.nodes) + 1
    lab.add_node()
    lab.add_node()
    cluster = Cluster(lab, str(tmp_path), etcd_endpoints=etcd.endpoint,
                      extra_args=["--etcd-prefix", p, "--dataplane", "kernel"])
    try:
        for i in (a, b):
            cluster.start(i)
        before = {i: cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 1, 30).lease for i in (a, b)}
        assert set(subnet_leases(etcd, p)) == {leases.subnet_key(ipaddress.IPv4Network(x.subnet))
                                               for x in before.values()}
        addr = {i: str(ipaddress.IPv4Network(before[i].subnet).network_address) for i in (a, b)}
        wait_reachable(lab.nodes[a], addr[b])

        etcd.etcdctl("put", f"{p}/config", json.dumps(dual_config()))
        for i in (a, b):  # one at a time; the kernel forwards while a node restarts
            pinger = lab.nodes[a if i == b else b].popen(
                ["ping", "-4", "-n", "-c", "40", "-i", "0.1", "-W", "1", addr[i]],
                stdout=open(os.path.join(tmp_path, f"ping{i}.txt"), "w"))
            assert cluster.stop(i) == 0
            cluster.start(i)
            cluster.wait_status(i, lambda s: s.ready and s.lease.ipv6_subnet is not None, 30, "dual-stack")
            assert pinger.wait(30) == 0, open(os.path.join(tmp_path, f"ping{i}.txt")).read()
        after = {i: cluster.wait_status(i, lambda s: s.dataplane.peers == 2, 30).lease for i in (a, b)}
        assert {i: x.subnet for i, x in after.items()} == {i: x.subnet for i, x in before.items()}
        assert set(subnet_leases(etcd, p)) == {leases.subnet_key(ipaddress.IPv4Network(x.subnet),
                                                                 ipaddress.IPv6Network(x.ipv6_subnet))
                                               for x in after.values()}
        addr6 = str(ipaddress.IPv6Network(after[b].ipv6_subnet).network_address)
        wait_reachable(lab.nodes[a], addr6)
        assert ping(lab.nodes[a], addr6, 3) == 3
        assert "moved to key" in cluster.log_tail(a, 40)
    finally:
        cluster.stop_all()


# -- DirectRouting -------------------------------------------------------------------------

def _direct_routes(ns: Namespace) -> set[tuple[str, str, str]]:
    """(subnet, gateway, device) of the routes to the overlay via a gateway on eth0."""
    out = set()
    with ns.ipr() as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.route("dump", family=family, table=254):
                if r.get_attr("RTA_OIF") == eth0 and r.get_attr("RTA_GATEWAY") and r.get_attr("RTA_DST"):
                    out.add((f"{r.get_attr('RTA_DST')}/{r['dst_len']}", r.get_attr("RTA_GATEWAY"), "eth0"))
    return out


def test_direct_routing_routes_both_families_on_the_underlay_as_flanneld(lab, etcd, tmp_path):
    p = prefix()
    etcd.etcdctl("put", f"{p}/config", json.dumps(dual_config(Backend={"Type": "vxlan", "DirectRouting": True})))
    f, o = len(lab.nodes), len(lab.nodes) + 1
    lab.add_node()
    lab.add_node()
    fl = Flanneld(lab.nodes[f], str(tmp_path / "flanneld"), etcd_endpoints=etcd.endpoint, etcd_prefix=p)
    cluster = Cluster(lab, str(tmp_path), etcd_endpoints=etcd.endpoint,
                      extra_args=["--etcd-prefix", p, "--dataplane", "kernel"])
    try:
        fl.start().wait_ready()
        cluster.start(o)
        st = cluster.wait_status(o, lambda s: s.ready and s.dataplane.peers == 2, 30)
        ours = (ipaddress.IPv4Network(st.lease.subnet), ipaddress.IPv6Network(st.lease.ipv6_subnet))
        theirs = (fl.subnet, fl.ipv6_subnet)
        for i, subnets in ((o, theirs), (f, ours)):
            other = f if i == o else o
            want = {(str(subnets[0]), lab.addresses[other], "eth0"), (str(subnets[1]), lab.addresses6[other], "eth0")}
            deadline = time.monotonic() + 15
            while _direct_routes(lab.nodes[i]) != want:
                assert time.monotonic() < deadline, (i, _direct_routes(lab.nodes[i]), want)
                time.sleep(0.2)
        for a, subnets in ((o, theirs), (f, ours)):
            for subnet in subnets:
                wait_reachable(lab.nodes[a], str(subnet.network_address))
        with lab.nodes[o].ipr() as ipr:  # nothing of flanneld's subnets is in flannel-v6.1
            index = ipr.link_lookup(ifname="flannel-v6.1")[0]
            assert not [n for n in ipr.neigh("dump", ifindex=index, family=socket.AF_INET6)
                        if n["state"] & NUD_PERMANENT]
    finally:
        fl.stop()
        cluster.stop_all()
