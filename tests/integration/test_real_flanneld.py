"""udpflannel beside the real flanneld (flannel v0.28, built by `make setup`), on one
etcd, in namespaces: one cluster per backend, each under its own etcd prefix.

- vxlan: a flanneld vxlan node (kernel flannel.1), a udpflannel engine node and a
  udpflannel kernel-plane node;
- udp: a flanneld udp node (flannel0 and flannel's C proxy on 8285) and two
  udpflannel engine nodes (flanneld's udp framing), all with --ip-masq.

Judged by what flanneld itself does, not by our reading of its source: every pair
pings and carries TCP both ways; the leases in etcd have one shape (keys, order,
types, bytes, TTL); subnet.env, the iptables rules, the health endpoints and the
devices and routes a peer relies on are the same. What is known to differ on
purpose (route protocol and fallback route, TUN persistence, device queue length,
the VXLAN outer checksum) is not asserted here: see the README's "Differences from
flanneld".

The module's Lab starts with no node; each cluster adds three fresh namespaces, so
no namespace ever holds what another cluster left (flannel.1 stays after a stop).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import socket
import stat
import uuid
from dataclasses import dataclass

import pytest
from support.http import http_get

from udpflannel.core import lease as leases
from udpflannel.lab import probe
from udpflannel.lab.benchlib import tools
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.flanneld import Flanneld, FlanneldError
from udpflannel.lab.netns import Lab, Namespace

try:
    from .etcd_server import FLANNEL_UDP_LEASE, FLANNEL_VXLAN_LEASE, EtcdServer, etcd_in_hub, subnet_leases
except ImportError:
    from etcd_server import FLANNEL_UDP_LEASE, FLANNEL_VXLAN_LEASE, EtcdServer, etcd_in_hub, subnet_leases

ENGINE = os.environ.get("UDPFLANNEL_TEST_ENGINE", "compiled")
NETWORK = "10.244.0.0/16"
HEALTHZ_PORT = 9402
LEASE_TTL = 24 * 3600  # flanneld's, fixed; udpflannel's default --subnet-lease-ttl
TCP_BYTES = (1 << 20) + 77  # odd on purpose: no segment boundary lines up with it
# per backend: the udpflannel nodes' --dataplane, and whether every node runs --ip-masq
PLANES = {"vxlan": ("engine", "kernel"), "udp": ("engine", "engine")}
# The vxlan cluster's config carries "MTU": 1400, which flanneld reads as the underlay's
# MTU (flannel.1 gets 1350): every node of it must agree. The udp backend has no MTU
# setting: underlay 1500 minus its 28.
BACKEND_EXTRA = {"vxlan": {"MTU": 1400}, "udp": {}}
MTU = {"vxlan": 1350, "udp": 1472}
NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 4


@dataclass
class Mix:
    """One cluster: flanneld on lab node ``f``, udpflannel on ``ours`` (index -> plane)."""
    backend: str
    lab: Lab
    prefix: str
    ip_masq: bool
    flanneld: Flanneld
    cluster: Cluster
    f: int
    ours: dict[int, str]

    @property
    def nodes(self) -> list[int]:
        return [self.f, *self.ours]

    def ns(self, i: int) -> Namespace:
        return self.lab.nodes[i]

    def subnet(self, i: int) -> ipaddress.IPv4Network:
        if i == self.f:
            return self.flanneld.subnet
        return ipaddress.IPv4Network(self.cluster.status(i).lease.subnet)

    def addr(self, i: int) -> str:
        return str(self.subnet(i).network_address)

    def subnet_file(self, i: int) -> str:
        return self.flanneld.subnet_file if i == self.f else os.path.join(self.cluster.node_dir(i), "subnet.env")

    def device(self, i: int) -> str:
        """The node's overlay device: flanneld's is flannel.1 or flannel0; ours too,
        except the engine's, always the TUN flannel0."""
        plane = self.ours.get(i, "flanneld")
        return "flannel.1" if self.backend == "vxlan" and plane != "engine" else "flannel0"


@pytest.fixture(scope="module")
def lab():
    with Lab(0, tag="ufr") as lab:
        yield lab


@pytest.fixture(scope="module")
def etcd(lab, tmp_path_factory):
    with etcd_in_hub(lab, tmp_path_factory.mktemp("etcd")) as server:
        yield server


@pytest.fixture(scope="module", params=sorted(PLANES))
def mix(request, lab, etcd, tmp_path_factory):
    backend = request.param
    workdir = str(tmp_path_factory.mktemp(f"real-{backend}"))
    prefix = f"/t-{uuid.uuid4().hex[:8]}/network"
    config = {"Network": NETWORK, "Backend": {"Type": backend, **BACKEND_EXTRA[backend]}}
    etcd.etcdctl("put", f"{prefix}/config", json.dumps(config))
    ip_masq = backend == "udp"
    first = len(lab.nodes)
    for _ in range(3):
        lab.add_node()
    f, ours = first, dict(zip((first + 1, first + 2), PLANES[backend]))
    fl = Flanneld(lab.nodes[f], os.path.join(workdir, "flanneld"), etcd_endpoints=etcd.endpoint,
                  etcd_prefix=prefix, ip_masq=ip_masq, healthz_port=HEALTHZ_PORT)
    cluster = Cluster(lab, workdir, engine=ENGINE, etcd_endpoints=etcd.endpoint,
                      extra_args=["--etcd-prefix", prefix, "--healthz-port", str(HEALTHZ_PORT),
                                  *(["--ip-masq"] if ip_masq else [])])
    m = Mix(backend, lab, prefix, ip_masq, fl, cluster, f, ours)
    try:
        fl.start().wait_ready()
        for i, plane in ours.items():
            cluster.start(i, ["--dataplane", plane])
        for i in ours:
            cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 2, 30, "routing to both others")
        for a in m.nodes:
            for b in m.nodes:
                if a != b:
                    tools.wait_reachable(lab.nodes[a], m.addr(b), timeout=15)
        assert fl.running(), fl.log_tail()
        yield m
    finally:
        fl.stop()
        cluster.stop_all()


# -- helpers ------------------------------------------------------------------------

def link_of(ns: Namespace, name: str) -> dict:
    """What a peer or an operator sees of device ``name``: kind, MTU, up, MAC, its
    IPv4 addresses, byte counters and (VXLAN) the device's parameters."""
    with ns.ipr() as ipr:
        found = ipr.link_lookup(ifname=name)
        assert found, f"no {name} in {ns.name}"
        msg = ipr.link("get", index=found[0])[0]
        info = msg.get_attr("IFLA_LINKINFO")
        data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
        addrs = sorted((a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                       for a in ipr.get_addr(family=socket.AF_INET, index=found[0]))
        stats = msg.get_attr("IFLA_STATS64") or {}
        out = {"index": found[0], "kind": info.get_attr("IFLA_INFO_KIND") if info is not None else None,
               "mtu": msg.get_attr("IFLA_MTU"), "up": bool(msg["flags"] & 1),
               "mac": msg.get_attr("IFLA_ADDRESS"), "addresses": addrs,
               "rx_bytes": int(stats.get("rx_bytes", 0)), "tx_bytes": int(stats.get("tx_bytes", 0))}
        if out["kind"] == "vxlan" and data is not None:
            underlay = data.get_attr("IFLA_VXLAN_LINK")
            out["vxlan"] = {"vni": data.get_attr("IFLA_VXLAN_ID"), "port": data.get_attr("IFLA_VXLAN_PORT"),
                            "learning": data.get_attr("IFLA_VXLAN_LEARNING"),
                            "local": data.get_attr("IFLA_VXLAN_LOCAL"),
                            "udp_csum": data.get_attr("IFLA_VXLAN_UDP_CSUM"),
                            "txqlen": msg.get_attr("IFLA_TXQLEN"),
                            "underlay": ipr.link("get", index=underlay)[0].get_attr("IFLA_IFNAME")}
        return out


def vxlan_entries(ns: Namespace, index: int) -> dict[str, set]:
    """flannel.<VNI>'s per-peer entries: permanent neighbours (IP, MAC), permanent fdb
    entries (MAC, remote), and the routes through it (subnet, gateway, onlink)."""
    with ns.ipr() as ipr:
        neigh = {(n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR"))
                 for n in ipr.neigh("dump", ifindex=index, family=socket.AF_INET)
                 if n["state"] & NUD_PERMANENT}
        fdb = {(e.get_attr("NDA_LLADDR"), e.get_attr("NDA_DST")) for e in ipr.fdb("dump", ifindex=index)
               if e["ifindex"] == index and e.get_attr("NDA_DST") and e["state"] & NUD_PERMANENT}
        routes = {(f"{r.get_attr('RTA_DST')}/{r['dst_len']}", r.get_attr("RTA_GATEWAY"),
                   bool(r["flags"] & RTNH_F_ONLINK))
                  for r in ipr.route("dump", family=socket.AF_INET, table=254)
                  if r.get_attr("RTA_OIF") == index and r.get_attr("RTA_DST")}
    return {"neighbours": neigh, "fdb": fdb, "routes": routes}


def network_routes(ns: Namespace, index: int) -> list[str]:
    """Main-table routes for the whole overlay network through device ``index``."""
    net = ipaddress.IPv4Network(NETWORK)
    with ns.ipr() as ipr:
        return [f"{r.get_attr('RTA_DST')}/{r['dst_len']}" for r in ipr.route("dump", family=socket.AF_INET, table=254)
                if r.get_attr("RTA_OIF") == index and r.get_attr("RTA_DST") == str(net.network_address)
                and r["dst_len"] == net.prefixlen]


def lease_ttl(etcd: EtcdServer, lease_id: int) -> tuple[int, int]:
    """(granted TTL, remaining TTL) in seconds of etcd lease ``lease_id``."""
    doc = json.loads(etcd.etcdctl("lease", "timetolive", format(lease_id, "x"), "-w", "json"))
    return int(doc["granted-ttl"]), int(doc["ttl"])


def shape(value):
    """A JSON document's shape: objects as their (key, shape) pairs in order, other
    values as their type."""
    if isinstance(value, dict):
        return tuple((k, shape(v)) for k, v in value.items())
    return type(value).__name__


def iptables(ns: Namespace, subnet: ipaddress.IPv4Network) -> list[str]:
    """iptables-save's tables, chains and rules, without comments and counters, the
    node's own subnet written as <subnet>."""
    res = ns.run(["iptables-save"], 15)
    assert res.returncode == 0, res.stderr
    keep = (line for line in res.stdout.splitlines() if line and not line.startswith("#"))
    return [re.sub(r" \[\d+:\d+\]$", "", line).replace(str(subnet), "<subnet>") for line in keep]


# -- the tests --------------------------------------------------------------------------

def test_every_pair_pings_and_carries_tcp_both_ways(mix):
    pairs = [(a, b) for a in mix.nodes for b in mix.nodes if a != b]
    addr = {i: mix.addr(i) for i in mix.nodes}
    lost = [(a, b) for a, b in pairs if not all(probe.ping(mix.ns(a), addr[b], count=3, timeout=2.0))]
    assert lost == [], f"{mix.backend}: pairs (lab node, lab node) with a lost echo"

    engines = [i for i, plane in mix.ours.items() if plane == "engine"]
    before = {i: mix.cluster.status(i).dataplane.counters for i in engines}
    dev_before = link_of(mix.ns(mix.f), mix.device(mix.f))
    payload = os.urandom(TCP_BYTES)
    expected = (len(payload), hashlib.sha256(payload).hexdigest())
    for port, (a, b) in enumerate(pairs, start=5411):
        assert probe.tcp_transfer(mix.ns(a), mix.ns(b), addr[b], payload, port) == expected, (a, b)

    # flanneld's own device carried its four transfers (two out, two in) ...
    dev_after = link_of(mix.ns(mix.f), mix.device(mix.f))
    assert dev_after["tx_bytes"] - dev_before["tx_bytes"] > 2 * TCP_BYTES
    assert dev_after["rx_bytes"] - dev_before["rx_bytes"] > 2 * TCP_BYTES
    # ... and the engine nodes took everything flanneld and the others sent them
    for i in engines:
        after = mix.cluster.status(i).dataplane.counters
        assert after["rx_bytes"] - before[i]["rx_bytes"] > 2 * TCP_BYTES
        moved = {k: after[k] - before[i][k] for k in after if k.startswith("drop_") and after[k] != before[i][k]}
        assert moved == {}, f"engine node {i} dropped: {moved}"
    assert mix.flanneld.running(), mix.flanneld.log_tail()


def test_leases_in_etcd_parse_identically(mix, etcd):
    stored = subnet_leases(etcd, mix.prefix)
    keys = {i: leases.subnet_key(mix.subnet(i)) for i in mix.nodes}
    assert set(stored) == set(keys.values())
    docs = {i: json.loads(stored[keys[i]]["value"]) for i in mix.nodes}

    # one shape: the same keys in the same order, values of the same types
    assert {i: shape(d) for i, d in docs.items()} == {i: shape(docs[mix.f]) for i in mix.nodes}
    for i in mix.nodes:
        value = stored[keys[i]]["value"]
        if mix.backend == "vxlan":
            if i in mix.ours and mix.ours[i] == "engine":
                mac = mix.cluster.status(i).lease.vtep_mac  # the engine's VTEP has no device
            else:
                mac = link_of(mix.ns(i), "flannel.1")["mac"]
            assert value == FLANNEL_VXLAN_LEASE.format(ip=mix.lab.addresses[i], mac=mac), i
        else:
            assert value == FLANNEL_UDP_LEASE.format(ip=mix.lab.addresses[i]), i
        parsed = leases.decode(keys[i], value)  # udpflannel reads flanneld's as its own
        assert (parsed.subnet, str(parsed.public_ip)) == (mix.subnet(i), mix.lab.addresses[i])
        assert parsed.backend_type == ("vxlan" if mix.backend == "vxlan" else "")
    assert mix.flanneld.lease(etcd).public_ip == ipaddress.IPv4Address(mix.lab.addresses[mix.f])

    # each key bound to an etcd lease of its own, granted for the same 24 h
    ids = {i: stored[keys[i]]["lease"] for i in mix.nodes}
    assert 0 not in ids.values() and len(set(ids.values())) == len(ids)
    ttls = {i: lease_ttl(etcd, ids[i]) for i in mix.nodes}
    assert {i: granted for i, (granted, _) in ttls.items()} == dict.fromkeys(mix.nodes, LEASE_TTL)
    assert all(LEASE_TTL - 600 < left <= LEASE_TTL for _, left in ttls.values()), ttls


def test_subnet_env_agrees_line_for_line(mix):
    def masked(i: int) -> str:
        with open(mix.subnet_file(i)) as f:
            text = f.read()
        own = f"FLANNEL_SUBNET={mix.subnet(i).network_address + 1}/{mix.subnet(i).prefixlen}\n"
        assert own in text, (i, text)
        return text.replace(own, "FLANNEL_SUBNET=<first address of the lease>\n")

    theirs = masked(mix.f)
    assert theirs == (f"FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET=<first address of the lease>\n"
                      f"FLANNEL_MTU={MTU[mix.backend]}\nFLANNEL_IPMASQ={str(mix.ip_masq).lower()}\n")
    for i in mix.ours:
        assert masked(i) == theirs, i
        assert stat.S_IMODE(os.stat(mix.subnet_file(i)).st_mode) == \
            stat.S_IMODE(os.stat(mix.subnet_file(mix.f)).st_mode)


def test_iptables_rules_agree(mix):
    theirs = iptables(mix.ns(mix.f), mix.subnet(mix.f))
    assert any("-A FLANNEL-FWD -s 10.244.0.0/16" in line for line in theirs), theirs
    assert any("FLANNEL-POSTRTG" in line for line in theirs) == mix.ip_masq, theirs
    for i in mix.ours:  # both install their rules before they write subnet.env
        assert iptables(mix.ns(i), mix.subnet(i)) == theirs, i


def test_health_endpoints_answer_alike(mix):
    for i in mix.nodes:
        for path in ("/healthz", "/readyz"):
            status, body = http_get(mix.ns(i), HEALTHZ_PORT, path)
            assert status == 200, (i, path, body)


def test_devices_and_routes_match_flanneld(mix):
    f = mix.f
    theirs = link_of(mix.ns(f), mix.device(f))
    subnets = {i: mix.subnet(i) for i in mix.nodes}
    for i in mix.nodes:  # every node's own device: up, <subnet .0>/32, the same MTU
        dev = link_of(mix.ns(i), mix.device(i))
        assert dev["up"] and dev["mtu"] == MTU[mix.backend], (i, dev)
        assert dev["addresses"] == [(str(subnets[i].network_address), 32)], (i, dev)

    if mix.backend == "udp":
        # flannel0, a TUN with one route for the whole network into it
        for i in mix.nodes:
            dev = link_of(mix.ns(i), "flannel0")
            assert dev["kind"] == "tun", (i, dev)
            assert network_routes(mix.ns(i), dev["index"]) == [NETWORK], i
        return

    # vxlan: the kernel plane's flannel.1 is flanneld's: same parameters, and per peer
    # the same neighbour, fdb entry and onlink route (the engine node included)
    macs = {i: (mix.cluster.status(i).lease.vtep_mac if mix.ours.get(i) == "engine"
                else link_of(mix.ns(i), "flannel.1")["mac"]) for i in mix.nodes}
    kernels = [i for i, plane in mix.ours.items() if plane == "kernel"]
    for i in (f, *kernels):
        dev = link_of(mix.ns(i), "flannel.1")
        assert dev["kind"] == "vxlan"
        assert dev["vxlan"] == {**theirs["vxlan"], "local": mix.lab.addresses[i]}, i
        assert dev["vxlan"]["local"] == mix.lab.addresses[i] and dev["vxlan"]["underlay"] == "eth0"
        assert (dev["vxlan"]["vni"], dev["vxlan"]["port"], dev["vxlan"]["learning"]) == (1, 8472, 0)
        peers = [j for j in mix.nodes if j != i]
        assert vxlan_entries(mix.ns(i), dev["index"]) == {
            "neighbours": {(str(subnets[j].network_address), macs[j]) for j in peers},
            "fdb": {(macs[j], mix.lab.addresses[j]) for j in peers},
            "routes": {(str(subnets[j]), str(subnets[j].network_address), True) for j in peers},
        }, i


def test_a_flanneld_that_cannot_start_says_why(lab, etcd, tmp_path):
    """The lab's handle on flanneld fails with flanneld's own words: no such
    interface ends it at once (exit 1, its klog error line in the message)."""
    ns = lab.add_node()
    fl = Flanneld(ns, str(tmp_path / "bad"), etcd_endpoints=etcd.endpoint,
                  etcd_prefix=f"/t-{uuid.uuid4().hex[:8]}/network", iface="no-such-if0")
    etcd.etcdctl("put", f"{fl.etcd_prefix}/config", json.dumps({"Network": NETWORK}))
    try:
        with pytest.raises(FlanneldError, match=r"(?s)exited with 1:.*Failed to find interface"):
            fl.start().wait_ready(timeout=20)
    finally:
        fl.stop()
    assert not os.path.exists(fl.subnet_file)
    assert subnet_leases(etcd, fl.etcd_prefix) == {}
