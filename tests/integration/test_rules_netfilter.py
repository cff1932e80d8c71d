"""flanneld's masquerade and forward rules with real iptables and nft, in lab namespaces.

Every test runs the rules code inside a node namespace (Namespace.call: the iptables /
nft processes it starts inherit that thread's namespace), reads the result back with
iptables-save / nft, damages it the way an admin or another tool would, and checks the
next ensure() repairs exactly that. The end-to-end tests send UDP from a pod namespace
through the node to a lab host and look at the source address that arrives.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import socket
import subprocess

import pytest

from udpflannel.host.rules import RuleSpec, make_rules
from udpflannel.host.rules import iptables as ipt
from udpflannel.lab.netns import Namespace

NET = ipaddress.IPv4Network("10.5.0.0/16")
SUB = ipaddress.IPv4Network("10.5.1.0/24")
POD = "10.5.1.2"
OTHER_NODE_POD = "10.5.2.1"  # a cluster address held by the second lab node
BACKENDS = ["iptables", "nftables"]

# What `nft list table ip flannel-ipv4` prints (nft 1.0.6) once our rules are in.
NFT_LISTED = [
    "meta mark 0x00004000 return",
    "ip saddr 10.5.1.0/24 ip daddr 10.5.0.0/16 return",
    "ip saddr 10.5.0.0/16 ip daddr 10.5.1.0/24 return",
    "ip saddr != 10.5.1.0/24 ip daddr 10.5.0.0/16 return",
    "ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
    "ip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade fully-random",
    "ip saddr 10.5.0.0/16 accept",
    "ip daddr 10.5.0.0/16 accept",
]


def spec(**kw) -> RuleSpec:
    return RuleSpec(NET, SUB, **{"masquerade": True, **kw})


def sh(ns: Namespace, *argv: str) -> str:
    res = ns.run(argv, 20)
    assert res.returncode == 0, f"{' '.join(argv)}: {res.stderr.strip()}"
    return res.stdout


def rule_lines(ns: Namespace) -> list[str]:
    """Every rule in the namespace as `TABLE -A CHAIN SPEC` (iptables-save view)."""
    out, table = [], ""
    for line in sh(ns, "iptables-save").splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A "):
            out.append(f"{table} {line}")
    return out


def nft_lines(ns: Namespace) -> list[str]:
    listing = sh(ns, "nft", "list", "ruleset")
    assert listing.count("table ip flannel-ipv4 {") == 1
    body = listing.split("table ip flannel-ipv4 {", 1)[1]
    return [line.strip() for line in body.split("\n}", 1)[0].splitlines()
            if line.startswith("\t\t") and not line.strip().startswith(("type ", "comment "))]


def assert_installed_once(ns: Namespace, backend: str, s: RuleSpec) -> None:
    if backend == "iptables":
        lines = rule_lines(ns)
        ours = [line for line in lines if "flanneld" in line or "FLANNEL-" in line]
        assert sorted(ours) == sorted(ipt.flannel_rule_list(s))
        for want in ipt.flannel_rule_list(s):
            assert lines.count(want) == 1, want
        # the chains hold exactly flanneld's rules, in flanneld's order
        assert [x for x in lines if x.startswith("nat -A FLANNEL-POSTRTG ")] == ipt.flannel_rule_list(s)[1:7]
        assert [x for x in lines if x.startswith("filter -A FLANNEL-FWD ")] == ipt.flannel_rule_list(s)[8:]
    else:
        assert nft_lines(ns) == NFT_LISTED


@pytest.mark.parametrize("backend", BACKENDS)
def test_ensure_installs_exactly_once(make_lab, backend):
    node = make_lab(1).nodes[0]
    rules = make_rules(spec(), backend)
    assert node.call(rules.present, timeout=30) is False
    first = node.call(rules.ensure, timeout=30)
    assert len(first) in (3, 4) and all(m.startswith(backend) for m in first)
    assert node.call(rules.ensure, timeout=30) == []
    # a restarted daemon (a fresh object, nothing remembered) finds it all in place
    assert node.call(make_rules(spec(), backend).ensure, timeout=30) == []
    assert node.call(rules.present, timeout=30) is True
    assert_installed_once(node, backend, spec())


def iptables_damage(node: Namespace, rules) -> None:
    cases = [
        (["iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG"],
         ["iptables: rewrote nat chain FLANNEL-POSTRTG (0 of 6 rules were in place)"]),
        (["iptables", "-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD"],
         ["iptables: added jump FORWARD -> FLANNEL-FWD"]),
        (["iptables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "3"],
         ["iptables: rewrote nat chain FLANNEL-POSTRTG (5 of 6 rules were in place)"]),
        (["iptables", "-t", "nat", "-I", "POSTROUTING", "-m", "comment", "--comment", "flanneld masq",
          "-j", "FLANNEL-POSTRTG"],
         ["iptables: removed 1 duplicate jump(s) POSTROUTING -> FLANNEL-POSTRTG"]),
        (["iptables", "-I", "FLANNEL-FWD", "-s", "10.99.0.0/16", "-j", "DROP"],
         ["iptables: rewrote filter chain FLANNEL-FWD (2 of 2 rules were in place)"]),
    ]
    for argv, expected in cases:
        sh(node, *argv)
        assert node.call(rules.present, timeout=30) is False, argv
        assert node.call(rules.ensure, timeout=30) == expected, argv
        assert_installed_once(node, "iptables", spec())
    # the chain and its jump gone altogether
    sh(node, "iptables", "-t", "nat", "-D", "POSTROUTING", "-m", "comment", "--comment", "flanneld masq",
       "-j", "FLANNEL-POSTRTG")
    sh(node, "iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG")
    sh(node, "iptables", "-t", "nat", "-X", "FLANNEL-POSTRTG")
    assert node.call(rules.ensure, timeout=30) == ["iptables: created nat chain FLANNEL-POSTRTG (6 rules)",
                                                  "iptables: added jump POSTROUTING -> FLANNEL-POSTRTG"]


def nft_handle(node: Namespace, chain: str, index: int) -> str:
    listing = sh(node, "nft", "-a", "list", "chain", "ip", "flannel-ipv4", chain)
    return re.findall(r"(?:accept|return|fully-random) # handle (\d+)", listing)[index]


def nftables_damage(node: Namespace, rules) -> None:
    cases = [
        (["nft", "delete", "table", "ip", "flannel-ipv4"],
         ["nftables: created table ip flannel-ipv4", "nftables: installed chain postrtg (6 rules)",
          "nftables: installed chain forward (2 rules)"]),
        (["nft", "flush", "chain", "ip", "flannel-ipv4", "postrtg"],
         ["nftables: rewrote chain postrtg (0 of 6 rules were in place)"]),
        (lambda: ["nft", "delete", "rule", "ip", "flannel-ipv4", "forward", "handle", nft_handle(node, "forward", 0)],
         ["nftables: rewrote chain forward (1 of 2 rules were in place)"]),
        (["nft", "insert", "rule", "ip", "flannel-ipv4", "postrtg", "ip", "saddr", "10.99.0.0/16", "accept"],
         ["nftables: rewrote chain postrtg (6 of 6 rules were in place)"]),
        (["nft", "chain", "ip", "flannel-ipv4", "forward", "{ policy drop ; }"],
         ["nftables: rewrote chain forward (2 of 2 rules were in place)"]),
    ]
    for argv, expected in cases:
        sh(node, *(argv() if callable(argv) else argv))
        assert node.call(rules.present, timeout=30) is False, argv
        assert node.call(rules.ensure, timeout=30) == expected, argv
        assert_installed_once(node, "nftables", spec())
    assert "policy accept" in sh(node, "nft", "list", "chain", "ip", "flannel-ipv4", "forward")


def add_foreign_rules(node: Namespace, backend: str) -> str:
    """Rules of other tools; returns a snapshot to compare with later."""
    if backend == "iptables":
        sh(node, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "172.31.0.0/16", "-j", "MASQUERADE")
        sh(node, "iptables", "-A", "FORWARD", "-s", "172.31.0.0/16", "-j", "DROP")
        return "\n".join(x for x in rule_lines(node) if "172.31" in x)
    sh(node, "nft", "add table ip other; add chain ip other post { type nat hook postrouting priority 50 ; } ; "
                    "add rule ip other post ip saddr 172.31.0.0/16 masquerade")
    return sh(node, "nft", "list", "table", "ip", "other")


def foreign_snapshot(node: Namespace, backend: str) -> str:
    if backend == "iptables":
        return "\n".join(x for x in rule_lines(node) if "172.31" in x)
    return sh(node, "nft", "list", "table", "ip", "other")


@pytest.mark.parametrize("backend", BACKENDS)
def test_damage_is_repaired_and_foreign_rules_untouched(make_lab, backend):
    node = make_lab(1).nodes[0]
    before = add_foreign_rules(node, backend)
    rules = make_rules(spec(), backend)
    node.call(rules.ensure, timeout=30)
    (iptables_damage if backend == "iptables" else nftables_damage)(node, rules)
    assert node.call(rules.ensure, timeout=30) == []
    assert foreign_snapshot(node, backend) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_remove_leaves_no_trace(make_lab, backend):
    node = make_lab(1).nodes[0]
    before = add_foreign_rules(node, backend)
    rules = make_rules(spec(), backend)
    node.call(rules.ensure, timeout=30)
    node.call(rules.remove, timeout=30)
    node.call(rules.remove, timeout=30)  # idempotent
    assert node.call(rules.present, timeout=30) is False
    saved = sh(node, "iptables-save")
    assert "FLANNEL" not in saved and "flanneld" not in saved
    assert "flannel" not in sh(node, "nft", "list", "ruleset")
    assert foreign_snapshot(node, backend) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_switching_masquerade_off_removes_its_chain(make_lab, backend):
    node = make_lab(1).nodes[0]
    node.call(make_rules(spec(), backend).ensure, timeout=30)
    off = make_rules(spec(masquerade=False), backend)
    msgs = node.call(off.ensure, timeout=30)
    assert msgs == (["iptables: removed nat chain FLANNEL-POSTRTG (not wanted)"] if backend == "iptables"
                    else ["nftables: removed chain postrtg (not wanted)"])
    assert node.call(off.ensure, timeout=30) == []
    assert "FLANNEL-POSTRTG" not in sh(node, "iptables-save")
    assert "postrtg" not in sh(node, "nft", "list", "ruleset")
    assert "FLANNEL-FWD" in sh(node, "iptables-save") or "chain forward" in sh(node, "nft", "list", "ruleset")


# --- packets ---------------------------------------------------------------------------

def write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def build_pod_network(lab):
    """node (lab node 1) forwards for a pod namespace on 10.5.1.0/24; lab node 2 is
    both an outside host (192.168.250.12) and, on its loopback, another node's pod
    address inside the cluster network (10.5.2.1), routed over the lab bridge."""
    node, peer = lab.nodes
    pod = lab.add_namespace("pod")
    with node.ipr() as ipr:
        ipr.link("add", ifname="vpod", kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod.path})
    node.link_up("vpod", "10.5.1.1/24")
    pod.link_up("eth0", f"{POD}/24")
    with pod.ipr() as ipr:
        ipr.route("add", dst="0.0.0.0/0", gateway="10.5.1.1")
    with node.ipr() as ipr:
        ipr.route("add", dst="10.5.2.0/24", gateway=lab.addresses[1])
    with peer.ipr() as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=OTHER_NODE_POD, prefixlen=32)
        ipr.route("add", dst=str(SUB), gateway=lab.addresses[0])
    node.call(write_sysctl, "/proc/sys/net/ipv4/ip_forward", "1")
    return node, peer, pod


class Listener:
    def __init__(self, ns: Namespace) -> None:
        self.sock = ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", 0))
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def source_seen(pod: Namespace, listener: Listener, dst: str, timeout: float = 2.0) -> str | None:
    """Send one datagram from a fresh pod socket (a new conntrack entry, so NAT decides
    anew) and return the source address it arrives with, or None if it never does."""
    token = secrets.token_bytes(8)
    sender = pod.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sender.sendto(token, (dst, listener.port))
        listener.sock.settimeout(timeout)
        while True:
            try:
                data, (src, _port) = listener.sock.recvfrom(64)
            except socket.timeout:
                return None
            if data == token:
                return src
    finally:
        sender.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masquerade_end_to_end(make_lab, backend):
    lab = make_lab(2)
    node, peer, pod = build_pod_network(lab)
    node_ip, outside = lab.addresses
    plain, marked = Listener(peer), Listener(peer)
    try:
        # without rules nothing is rewritten: the check below can tell
        assert source_seen(pod, plain, outside) == POD
        rules = make_rules(spec(fully_random=True), backend)
        node.call(rules.ensure, timeout=30)
        assert source_seen(pod, plain, outside) == node_ip          # leaving the network: masqueraded
        assert source_seen(pod, plain, OTHER_NODE_POD) == POD       # inside the network: kept
        # kube-proxy's mark: flanneld leaves such packets alone
        sh(node, "iptables", "-t", "mangle", "-A", "POSTROUTING", "-p", "udp", "--dport", str(marked.port),
           "-j", "MARK", "--set-mark", "0x4000")
        assert source_seen(pod, marked, outside) == POD
        assert source_seen(pod, plain, outside) == node_ip
        if backend == "iptables":
            masq = [x for x in rule_lines(node) if "-j MASQUERADE" in x and "flanneld" in x]
            assert len(masq) == 2 and all(x.endswith("-j MASQUERADE --random-fully") for x in masq)
        else:
            assert sh(node, "nft", "list", "chain", "ip", "flannel-ipv4", "postrtg").count(
                "masquerade fully-random") == 2
        node.call(rules.remove, timeout=30)
        assert source_seen(pod, plain, outside) == POD
    finally:
        plain.close()
        marked.close()


def test_forward_rules_admit_cluster_traffic_under_a_drop_policy(make_lab):
    lab = make_lab(2)
    node, peer, pod = build_pod_network(lab)
    listener = Listener(peer)
    try:
        sh(node, "iptables", "-P", "FORWARD", "DROP")  # what Docker does to FORWARD
        assert source_seen(pod, listener, lab.addresses[1], timeout=0.5) is None
        node.call(make_rules(spec(masquerade=False, forward=True), "iptables").ensure, timeout=30)
        assert source_seen(pod, listener, lab.addresses[1]) == POD
    finally:
        listener.close()
