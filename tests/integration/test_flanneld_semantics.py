"""What a user switching from flanneld trips over, checked against the real flanneld
(v0.28.9, built by `make setup`) beside udpflannel on one etcd, in namespaces.

Each test adds fresh lab nodes (namespaces) and an etcd prefix of its own, and judges
both by what they leave in etcd, as an operator would with etcdctl:

- reservations (flannel's Documentation/reservations.md: a lease key put without a
  TTL): udpflannel reuses and renews one without ever giving it a TTL. flanneld
  v0.28.9 gives it a 24 h lease at start and at every renewal (flannel issue #1329:
  etcd reports a key without a lease as TTL -1, so flanneld never sees a reservation);
  asserted here so that a flanneld that fixes it shows up;
- a lease carrying the node's PublicIP with another VTEP MAC (a reinstalled node):
  flanneld takes it whatever its state; udpflannel only once its holder missed its
  renewal (README, Security).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import subprocess
import uuid

import pytest
from support.waiting import wait_until

from udpflannel.core.lease import Lease, encode_value
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.flanneld import Flanneld
from udpflannel.lab.netns import Lab

try:
    from .etcd_server import etcd_in_hub
except ImportError:
    from etcd_server import etcd_in_hub

ENGINE = os.environ.get("UDPFLANNEL_TEST_ENGINE", "compiled")
NETWORK = "10.244.0.0/16"
DAY = 24 * 3600
FOREIGN_MAC = "02:00:00:00:00:66"  # the VTEP MAC of a node that was there before


@pytest.fixture(scope="module")
def lab():
    with Lab(0, tag="ufs") as lab:
        yield lab


@pytest.fixture(scope="module")
def etcd(lab, tmp_path_factory):
    with etcd_in_hub(lab, tmp_path_factory.mktemp("etcd")) as server:
        yield server


class Site:
    """One test's prefix, its flanneld and its udpflannel nodes, all stopped at the end."""

    def __init__(self, lab: Lab, etcd, workdir: str) -> None:
        self.lab, self.etcd, self.workdir = lab, etcd, workdir
        self.prefix = f"/t-{uuid.uuid4().hex[:8]}/network"
        etcd.etcdctl("put", f"{self.prefix}/config",
                     json.dumps({"Network": NETWORK, "Backend": {"Type": "vxlan"}}))
        self.cluster = Cluster(lab, os.path.join(workdir, "udpflannel"), engine=ENGINE,
                               etcd_endpoints=etcd.endpoint, extra_args=["--etcd-prefix", self.prefix])
        self.flanneld: list[Flanneld] = []

    def node(self) -> tuple[int, str]:
        """A fresh lab node: (its index, its underlay address: the PublicIP it advertises)."""
        self.lab.add_node()
        return len(self.lab.nodes) - 1, self.lab.addresses[-1]

    def start_flanneld(self, i: int, extra: list[str] | None = None) -> Flanneld:
        fl = Flanneld(self.lab.nodes[i], os.path.join(self.workdir, f"flanneld{i}"),
                      etcd_endpoints=self.etcd.endpoint, etcd_prefix=self.prefix, extra_args=extra or [])
        self.flanneld.append(fl)
        fl.start().wait_ready()
        return fl

    def start_ours(self, i: int, extra: list[str] | None = None):
        self.cluster.start(i, extra or [])
        return self.cluster.wait_status(i, lambda s: s.ready, 30)

    def key(self, subnet: str) -> str:
        return f"{self.prefix}/subnets/{subnet}"

    def put(self, subnet: str, value: str, ttl: int | None = None) -> None:
        """Write a lease key as an administrator (or an earlier node) would."""
        args = ["put", self.key(subnet), value]
        if ttl is not None:
            args[1:1] = ["--lease", self.etcd.etcdctl("lease", "grant", str(ttl)).split()[1]]
        self.etcd.etcdctl(*args)

    def state(self, subnet: str) -> dict:
        """What etcd holds at the key: value, etcd lease id (0: none), mod revision,
        and the lease's granted TTL (None without one)."""
        doc = self.etcd.etcdctl_json("get", self.key(subnet))
        if not doc.get("kvs"):
            return {}
        kv = doc["kvs"][0]
        lease_id = int(kv.get("lease", 0))
        granted = None
        if lease_id:
            ttl = self.etcd.etcdctl_json("lease", "timetolive", format(lease_id, "x"))
            granted = int(ttl["granted-ttl"])
        return {"value": base64.b64decode(kv["value"]).decode(), "lease": lease_id,
                "mod": int(kv["mod_revision"]), "granted": granted}

    def close(self) -> None:
        for fl in self.flanneld:
            fl.stop()
        self.cluster.stop_all()


@pytest.fixture
def site(lab, etcd, tmp_path):
    s = Site(lab, etcd, str(tmp_path))
    try:
        yield s
    finally:
        s.close()


def by_hand(ip: str) -> str:
    return json.dumps({"PublicIP": ip})


def test_a_reservation_stays_without_a_ttl_through_start_and_renewals(site):
    f, f_ip = site.node()
    u, u_ip = site.node()
    site.put("10.244.9.0-24", by_hand(f_ip))   # reservations, as reservations.md makes them
    site.put("10.244.10.0-24", by_hand(u_ip))

    fl = site.start_flanneld(f)
    # -v=1 logs each renewal; a 6 s TTL renews every 3 s (the margin is over the TTL)
    st = site.start_ours(u, ["--subnet-lease-ttl", "0.1", "-v=1"])
    assert str(fl.subnet) == "10.244.9.0/24" and st.lease.subnet == "10.244.10.0/24"

    theirs, ours = site.state("10.244.9.0-24"), site.state("10.244.10.0-24")
    assert theirs["granted"] == DAY, theirs  # flanneld made it a 24 h lease (flannel #1329)
    assert ours["lease"] == 0 and ours["granted"] is None, ours  # udpflannel kept it a reservation
    assert ours["value"] == value_of(st)  # filled in with our backend data, as flanneld's is
    assert st.lease.expiration == float("inf")

    # renewals. flanneld's: make its key a reservation again (reservations.md's recipe);
    # its watch reads the key's expiration as past and it renews at once, with a TTL.
    site.put("10.244.9.0-24", theirs["value"])
    wait_until(lambda: site.state("10.244.9.0-24")["lease"] != 0, 20, "flanneld to renew its lease")
    assert site.state("10.244.9.0-24")["granted"] == DAY
    assert "Lease renewed" in fl.log()
    # ours: two renewals come and go; the key is neither given a TTL nor even written
    log = os.path.join(site.cluster.node_dir(u), "daemon.log")
    wait_until(lambda: open(log).read().count("renewed 10.244.10.0/24: a reservation") >= 2, 20,
             "two renewals of the reservation")
    assert site.state("10.244.10.0-24") == ours
    assert site.cluster.status(u).lease.expiration == float("inf")


def test_a_lease_with_our_public_ip_and_another_mac(site):
    """A node reinstalled (new VTEP MAC, no state) finds a lease with its PublicIP.
    flanneld takes it even while another node could be renewing it; udpflannel only
    once its holder missed its renewal (less time left than the renew margin)."""
    f, f_ip = site.node()
    u, u_ip = site.node()
    v, v_ip = site.node()

    def before(ip: str) -> str:  # the lease the node wrote before it was reinstalled
        return encode_value(Lease(ipaddress.IPv4Network("10.244.0.0/24"), ipaddress.IPv4Address(ip),
                                  "vxlan", 1, FOREIGN_MAC)).decode()
    site.put("10.244.20.0-24", before(f_ip), ttl=DAY)     # renewed just now
    site.put("10.244.21.0-24", before(u_ip), ttl=DAY)     # renewed just now
    site.put("10.244.22.0-24", before(v_ip), ttl=20 * 60)  # 20 min left: its renewal is overdue
    kept = site.state("10.244.21.0-24")

    fl = site.start_flanneld(f)
    assert str(fl.subnet) == "10.244.20.0/24"  # flanneld: PublicIP alone decides
    assert FOREIGN_MAC not in site.state("10.244.20.0-24")["value"]

    st = site.start_ours(u)
    assert st.lease.subnet != "10.244.21.0/24"  # kept alive as far as anyone can tell
    assert site.state("10.244.21.0-24") == kept
    site.cluster.wait_log(u, f"lease 10.244.21.0/24 has our PublicIP {u_ip} but VTEP MAC {FOREIGN_MAC}")

    st = site.start_ours(v)
    assert st.lease.subnet == "10.244.22.0/24"  # its holder missed its renewal: taken over
    now = site.state("10.244.22.0-24")
    assert now["granted"] == DAY and json.loads(now["value"])["BackendData"]["VtepMAC"] == st.lease.vtep_mac
    assert now["value"] == value_of(st)


def value_of(st) -> str:
    """The lease value a udpflannel node with status ``st`` writes (flanneld's bytes)."""
    return encode_value(Lease(ipaddress.IPv4Network(st.lease.subnet), ipaddress.IPv4Address(st.lease.public_ip),
                              "vxlan", 1, st.lease.vtep_mac)).decode()


def ruleset(ns, subnet: str) -> dict[str, list[str]]:
    """iptables-save and `nft list ruleset` as an operator compares them: no comments,
    no counters, the node's own subnet written as <subnet>."""
    out = {}
    for name, argv in (("iptables", ["iptables-save"]), ("nft", ["nft", "list", "ruleset"])):
        res = ns.run(argv, 15)
        assert res.returncode == 0, res.stderr
        lines = []
        for line in res.stdout.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            line = re.sub(r" \[\d+:\d+\]$", "", line)
            line = re.sub(r"counter packets \d+ bytes \d+", "counter", line)
            lines.append(line.replace(subnet, "<subnet>"))
        out[name] = lines
    return out


@pytest.mark.parametrize("first", [False, True], ids=["iptables-first", "nftables-first"])
def test_rules_match_flanneld_in_both_backends_and_across_a_flip(site, first):
    """The same config and --ip-masq on a flanneld node and a udpflannel node: the same
    iptables and nftables rulesets, then the same after EnableNFTables flips (each
    restarts, as a config change needs) and flips back. flanneld cleans the unused
    backend at start, in its own way (host/rules/startup.py): so must we."""
    f, _ = site.node()
    u, _ = site.node()
    seen = []
    for nft in (first, not first, first):
        site.etcd.etcdctl("put", f"{site.prefix}/config", json.dumps(
            {"Network": NETWORK, "EnableNFTables": nft, "Backend": {"Type": "vxlan"}}))
        fl = Flanneld(site.lab.nodes[f], os.path.join(site.workdir, "flanneld-rules"),
                      etcd_endpoints=site.etcd.endpoint, etcd_prefix=site.prefix, ip_masq=True)
        site.flanneld.append(fl)
        fl.start().wait_ready()
        st = site.start_ours(u, ["--ip-masq"])
        theirs = ruleset(site.lab.nodes[f], str(fl.subnet))
        ours = ruleset(site.lab.nodes[u], st.lease.subnet)
        assert ours == theirs, f"EnableNFTables={nft}"
        seen.append(theirs)
        fl.stop()
        site.cluster.stop(u)
    # what was compared is what each mode leaves (so two empty rulesets cannot pass):
    # nftables mode its two tables; iptables mode its chains; after a flip to nftables
    # an emptied FLANNEL-POSTRTG behind its jump and the whole FLANNEL-FWD stay
    modes = (first, not first, first)
    fwd = '-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT'
    for k, (nft, rules) in enumerate(zip(modes, seen)):
        assert any(line.startswith("table ip flannel-ipv4") for line in rules["nft"]) == nft
        assert any(line.startswith("table ip6 flannel-ipv6") for line in rules["nft"]) == nft
        assert any(line.startswith("-A FLANNEL-POSTRTG") for line in rules["iptables"]) == (not nft)
        ran_iptables = not all(modes[:k + 1])
        assert (fwd in rules["iptables"]) == ran_iptables
        assert ('-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG'
                in rules["iptables"]) == ran_iptables


# A mount namespace of the process's own in which the br_netfilter module's sysctls are
# hidden (an empty tmpfs over /proc/sys/net/bridge), as on a host without the module.
WITHOUT_BR_NETFILTER = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount -t tmpfs none /proc/sys/net/bridge && exec "$@"', "sh"]


def test_without_br_netfilter_both_refuse_iptables_mode_before_a_lease(site):
    """flanneld (main.go) stats /proc/sys/net/bridge/bridge-nf-call-iptables in iptables
    mode and exits 1 before it takes a lease; so does udpflannel, with flanneld's words.
    In nftables mode neither checks."""
    f, _ = site.node()
    u, _ = site.node()
    fl = Flanneld(site.lab.nodes[f], os.path.join(site.workdir, "flanneld-nobr"),
                  etcd_endpoints=site.etcd.endpoint, etcd_prefix=site.prefix)
    theirs = site.lab.nodes[f].run(WITHOUT_BR_NETFILTER + fl.argv(), 30)
    ours = site.lab.nodes[u].run(WITHOUT_BR_NETFILTER + site.cluster.argv(u), 30)
    assert theirs.returncode == 1 and ours.returncode == 1, (theirs.stderr[-2000:], ours.stderr[-2000:])
    said = "Failed to check br_netfilter: stat /proc/sys/net/bridge/bridge-nf-call-iptables: no such file or directory"
    assert said in theirs.stderr
    assert f"udpflannel: error: {said}" in ours.stderr
    assert site.etcd.etcdctl("get", f"{site.prefix}/subnets/", "--prefix", "--keys-only").strip() == ""

    site.etcd.etcdctl("put", f"{site.prefix}/config", json.dumps(
        {"Network": NETWORK, "EnableNFTables": True, "Backend": {"Type": "vxlan"}}))
    started = site.lab.nodes[u].popen(WITHOUT_BR_NETFILTER + site.cluster.argv(u), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    site.cluster.procs[u] = started  # stopped by pid with the others
    site.cluster.wait_status(u, lambda s: s.ready, 30)


def test_switching_a_vxlan_node_from_flanneld(site):
    """flanneld's lease names flannel.1's MAC. A udpflannel with no MAC of its own takes
    that device's, so the lease is provably its own: it keeps the subnet flanneld had
    (the pods keep their addresses) without touching the registry by hand. The kernel
    plane keeps flanneld's very device (same ifindex: no outage); the engine removes it
    to take port 8472."""
    for plane in ("kernel", "engine"):
        i, _ = site.node()
        fl = site.start_flanneld(i)
        theirs, key = fl.subnet, fl.lease_key
        with site.lab.nodes[i].ipr() as ipr:
            before = ipr.link_lookup(ifname="flannel.1")[0]
        fl.stop()
        site.cluster.start(i, ["--subnet-file", fl.subnet_file, "--dataplane", plane])
        st = site.cluster.wait_status(i, lambda s: s.ready, 30)
        assert st.lease.subnet == str(theirs), (plane, st.lease.subnet, theirs)
        assert "taken from the flannel.1 already here" in site.cluster.log_tail(i, 60)
        assert site.etcd.etcdctl("get", key, "--print-value-only").strip()  # the same key, renewed
        with site.lab.nodes[i].ipr() as ipr:
            after = ipr.link_lookup(ifname="flannel.1")
        if plane == "kernel":
            assert after == [before]
        else:
            assert after == []
        site.cluster.stop(i)
