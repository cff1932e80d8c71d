"""Pods on nodes running `udpflannel run --ip-masq`, and the daemon's rules over its life.

Pods are lab namespaces added by CNI ADD through udpflannel-cni with the real bridge,
host-local and portmap plugins; the daemons are real processes. With --ip-masq the
daemon writes FLANNEL_IPMASQ=true, so the bridge does not masquerade and the daemon's
rules alone decide: pod to pod keeps the pod's address, pod to the outside (a lab host
on the underlay that runs no daemon) leaves with the node's address. Both rule
backends: iptables (the default) and nftables ("EnableNFTables": true in the config).

The expected rules are written out here from flanneld's source (iptables.go masqRules
and forwardRules, nftables.go) rather than taken from the product, and read back from
the node's namespace with iptables-save / nft.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess

import pytest
from support.waiting import wait_until

from udpflannel.core import subnetenv
from udpflannel.lab import probe
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.netns import Namespace

try:
    from .test_cni import cni_call, expected_source_seen_by_remote_pod, pod_address, pod_netconf
except ImportError:
    from test_cni import cni_call, expected_source_seen_by_remote_pod, pod_address, pod_netconf

NETWORK = "10.246.0.0/16"
BACKENDS = ["iptables", "nftables"]


def sh(ns: Namespace, *argv: str, check: bool = True) -> str:
    res = ns.run(argv, 30)
    assert not check or res.returncode == 0, f"{' '.join(argv)}: {res.stderr.strip()}"
    return res.stdout


def write_net_config(workdir: str, backend: str) -> str:
    path = os.path.join(workdir, f"net-{backend}.json")
    with open(path, "w") as f:
        json.dump({"Network": NETWORK, "Backend": {"Type": "vxlan"},
                   "EnableNFTables": backend == "nftables"}, f)
    return path


def masq_cluster(make_cluster, lab, workdir: str, backend: str) -> Cluster:
    return make_cluster(lab, extra_args=["--ip-masq", "--iptables-resync", "1",
                                         "--net-config", write_net_config(workdir, backend)])


def read_subnet_env(cluster: Cluster, i: int) -> subnetenv.SubnetEnv:
    with open(os.path.join(cluster.node_dir(i), "subnet.env")) as f:
        return subnetenv.parse(f.read())


# --- the rules as flanneld writes them ----------------------------------------------

def flanneld_iptables(net: str, sub: str) -> dict[str, list[str]]:
    """flanneld's rules with --ip-masq and forward rules, per table, as iptables-save
    prints them (comments quoted, `!` before the option it negates), in order."""
    masq, fwd = '-m comment --comment "flanneld masq"', '-m comment --comment "flanneld forward"'
    return {
        "filter": [
            f"-A FORWARD {fwd} -j FLANNEL-FWD",
            f"-A FLANNEL-FWD -s {net} {fwd} -j ACCEPT",
            f"-A FLANNEL-FWD -d {net} {fwd} -j ACCEPT",
        ],
        "nat": [
            f"-A POSTROUTING {masq} -j FLANNEL-POSTRTG",
            f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {masq} -j RETURN",
            f"-A FLANNEL-POSTRTG -s {sub} -d {net} {masq} -j RETURN",
            f"-A FLANNEL-POSTRTG -s {net} -d {sub} {masq} -j RETURN",
            f"-A FLANNEL-POSTRTG ! -s {net} -d {sub} {masq} -j RETURN",
            f"-A FLANNEL-POSTRTG -s {net} ! -d 224.0.0.0/4 {masq} -j MASQUERADE --random-fully",
            f"-A FLANNEL-POSTRTG ! -s {net} -d {net} {masq} -j MASQUERADE --random-fully",
        ],
    }


def flanneld_nft(net: str, sub: str) -> list[str]:
    """The rules of table ip flannel-ipv4 as `nft list` prints them, chain by chain."""
    return [
        "meta mark 0x00004000 return",
        f"ip saddr {sub} ip daddr {net} return",
        f"ip saddr {net} ip daddr {sub} return",
        f"ip saddr != {sub} ip daddr {net} return",
        f"ip saddr {net} ip daddr != 224.0.0.0/4 masquerade fully-random",
        f"ip saddr != {net} ip daddr {net} masquerade fully-random",
        f"ip saddr {net} accept",
        f"ip daddr {net} accept",
    ]


def our_iptables_lines(ns: Namespace) -> dict[str, list[str]]:
    """Per table, every rule that is flannel's or jumps to a flannel chain, in order."""
    out: dict[str, list[str]] = {}
    table = ""
    for line in sh(ns, "iptables-save").splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A ") and ("flanneld" in line or "FLANNEL-" in line):
            out.setdefault(table, []).append(line)
    return out


def our_nft_lines(ns: Namespace) -> list[str] | None:
    """Rules of table ip flannel-ipv4 in order; None without the table. Fails if the
    ruleset holds the table more than once."""
    listing = sh(ns, "nft", "list", "ruleset")
    count = listing.count("table ip flannel-ipv4 {")
    assert count <= 1, listing
    if count == 0:
        return None
    body = listing.split("table ip flannel-ipv4 {", 1)[1].split("\n}", 1)[0]
    return [line.strip() for line in body.splitlines()
            if line.startswith("\t\t") and not line.strip().startswith(("type ", "comment ", "policy "))]


def rules_exactly_once(ns: Namespace, backend: str, net: str, sub: str) -> bool:
    """Our rules are in, each exactly once and in flanneld's order, and the other
    backend holds none of ours."""
    if backend == "iptables":
        return (our_iptables_lines(ns) == flanneld_iptables(net, sub)
                and "flannel-ipv4" not in sh(ns, "nft", "list", "ruleset"))
    return our_nft_lines(ns) == flanneld_nft(net, sub) and our_iptables_lines(ns) == {}


def no_rules_left(ns: Namespace) -> bool:
    saved = sh(ns, "iptables-save")
    return "FLANNEL" not in saved and "flanneld" not in saved and "flannel" not in sh(ns, "nft", "list", "ruleset")


# --- pods end to end ----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_pods_keep_their_address_inside_and_are_masqueraded_outside(make_lab, make_cluster, workdir, backend):
    lab = make_lab(3)  # nodes 1 and 2 run daemons; node 3 is a host outside the cluster network
    outside_host, outside_addr = lab.nodes[2], lab.addresses[2]
    cluster = masq_cluster(make_cluster, lab, workdir, backend)
    cluster.start(0)
    cluster.start(1)
    cluster.wait_converged()

    pods, ips = [], []
    for i in range(2):
        env = read_subnet_env(cluster, i)
        assert env.ipmasq and str(env.network) == NETWORK  # --ip-masq: the daemon masquerades, not the bridge
        pod = lab.add_namespace(f"pod{i + 1}")
        conf = pod_netconf(workdir, os.path.join(cluster.node_dir(i), "subnet.env"), f"cni{i + 1}")
        add = cni_call(lab.nodes[i], "ADD", conf, f"pod-{i + 1}", pod.path)
        assert add.rc == 0, add
        ip = pod_address(add.out)
        assert ip.network == ipaddress.IPv4Network(cluster.status(i).lease.subnet)
        with open(os.path.join(conf["dataDir"], f"pod-{i + 1}")) as f:
            assert json.load(f)["ipMasq"] is False  # so the bridge adds no NAT of its own
        assert "CNI-" not in sh(lab.nodes[i], "iptables-save", "-t", "nat")
        sub = cluster.status(i).lease.subnet
        assert rules_exactly_once(lab.nodes[i], backend, NETWORK, sub)
        pods.append(pod)
        ips.append(str(ip.ip))

    for a, b in ((0, 1), (1, 0)):
        # inside the cluster network: the remote pod sees the sender pod itself
        payload = os.urandom(100_000)
        answer, peer = probe.tcp_exchange(pods[a], pods[b], ips[b], 7200 + a, payload)
        assert answer == payload[::-1]
        node_env = os.path.join(cluster.node_dir(a), "subnet.env")
        assert peer == expected_source_seen_by_remote_pod(node_env, cluster.overlay_addr(a), ips[a]) == ips[a]
        # leaving it: the outside host sees the sender's node, and its answer finds the pod
        answer, peer = probe.tcp_exchange(pods[a], outside_host, outside_addr, 7300 + a, payload)
        assert answer == payload[::-1]
        assert peer == lab.addresses[a], f"pod{a + 1} -> outside seen as {peer}"


# --- the rules over the daemon's life -----------------------------------------------

def cleanup_argv(cluster: Cluster, i: int) -> list[str]:
    argv = cluster.argv(i)
    return [*argv[:argv.index("run")], "cleanup", *argv[argv.index("run") + 1:]]


def log_size(cluster: Cluster, i: int) -> int:
    return os.path.getsize(os.path.join(cluster.node_dir(i), "daemon.log"))


def log_since(cluster: Cluster, i: int, offset: int) -> str:
    with open(os.path.join(cluster.node_dir(i), "daemon.log"), errors="replace") as f:
        f.seek(offset)
        return f.read()


def flush_everything(ns: Namespace, backend: str) -> None:
    """What an admin's `iptables -F` / `nft flush ruleset` does to a running node."""
    # (no read-back here: the daemon may already be repairing; its log says it did)
    if backend == "iptables":
        sh(ns, "iptables", "-t", "nat", "-F")
        sh(ns, "iptables", "-F")
    else:
        sh(ns, "nft", "flush", "ruleset")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rules_once_across_restart_restored_after_flush_removed_by_cleanup(make_lab, make_cluster, workdir,
                                                                            backend):
    lab = make_lab(1)
    node = lab.nodes[0]
    cluster = masq_cluster(make_cluster, lab, workdir, backend)
    cluster.start(0)
    st = cluster.wait_status(0, lambda s: s.ready)
    sub = st.lease.subnet
    assert read_subnet_env(cluster, 0).ipmasq
    assert rules_exactly_once(node, backend, NETWORK, sub)

    # stopped: the rules stay (no outage for the pods); restarted: still exactly once,
    # and the new daemon found nothing to repair
    assert cluster.stop(0) == 0
    assert rules_exactly_once(node, backend, NETWORK, sub)
    offset = log_size(cluster, 0)
    cluster.start(0)
    assert cluster.wait_status(0, lambda s: s.ready).lease.subnet == sub
    assert rules_exactly_once(node, backend, NETWORK, sub)
    assert "rules:" not in log_since(cluster, 0, offset)

    # someone flushes them while it runs: back within a few --iptables-resync periods
    offset = log_size(cluster, 0)
    flush_everything(node, backend)
    wait_until(lambda: rules_exactly_once(node, backend, NETWORK, sub), 15.0, "restored")
    restored = [line for line in log_since(cluster, 0, offset).splitlines() if "WARNING rules: " in line]
    assert restored and all(backend in line for line in restored), restored
    assert cluster.procs[0].poll() is None

    # `udpflannel cleanup` (after the stop, which leaves them) removes them
    assert cluster.stop(0) == 0
    assert rules_exactly_once(node, backend, NETWORK, sub)
    res = node.run(cleanup_argv(cluster, 0), 30)
    assert res.returncode == 0, res.stderr
    assert f"{backend} rules" in res.stderr
    assert no_rules_left(node)
    assert not os.path.exists(os.path.join(cluster.node_dir(0), "subnet.env"))


# --- as in a container --------------------------------------------------------------

class ReadOnlyProcSys(Cluster):
    """Daemons in a private mount namespace whose /proc/sys is read-only, as a
    container runtime mounts it for an unprivileged container (the DaemonSet's)."""

    def argv(self, i: int) -> list[str]:
        return ["unshare", "--mount", "--", "sh", "-c",
                'mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec "$@"',
                "sh", *super().argv(i)]


def test_daemon_runs_with_a_read_only_proc_sys(make_lab, workdir):
    lab = make_lab(1)
    with ReadOnlyProcSys(lab, workdir, extra_args=["--ip-masq"]) as cluster:
        cluster.start(0)
        st = cluster.wait_status(0, lambda s: s.ready)
        assert rules_exactly_once(lab.nodes[0], "iptables", "10.244.0.0/16", st.lease.subnet)
        assert "Read-only file system" in cluster.log_tail(0, 50)  # it met the read-only /proc/sys
        assert cluster.stop(0) == 0
