"""Swapping the binary: udpflannel started as `flanneld` with flanneld's command line.

A symlink named flanneld (in a temp dir) points at the venv's `udpflannel` entry point.
The node runs in a lab namespace with Go-style flags and no registry flag at all, so
it must do what flanneld does: use etcd at its default endpoints,
http://127.0.0.1:4001,http://127.0.0.1:2379. The test runs etcd inside that same
namespace on 127.0.0.1:2379 (nothing on 4001), with flannel's config under flannel's
default prefix, and reads back the lease the node took there. Everything started is
stopped by its pid; the namespace is removed by the lab fixture.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

import pytest
from support.waiting import wait_until

from udpflannel.host import netconf
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.etcd import EtcdServer

try:
    from .etcd_server import require_etcd, subnet_leases
except ImportError:
    from etcd_server import require_etcd, subnet_leases

PREFIX = "/coreos.com/network"  # flanneld's default -etcd-prefix
CONFIG = '{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}'
NODE_IP = "192.168.250.11"  # the lab's first node on its underlay


@pytest.fixture
def flanneld(tmp_path) -> str:
    """A file named flanneld: a symlink to the venv's console script `udpflannel`."""
    entry = os.path.join(os.path.dirname(sys.executable), "udpflannel")
    assert os.access(entry, os.X_OK), f"{entry} missing: is the package installed (make setup)?"
    link = tmp_path / "bin" / "flanneld"
    link.parent.mkdir()
    link.symlink_to(entry)
    return str(link)


class AsFlanneld(Cluster):
    """Daemons started as `flanneld` with Go-style flags, and no registry flag."""

    def __init__(self, lab, workdir, binary: str) -> None:
        super().__init__(lab, workdir)
        self.binary = binary

    def argv(self, i: int) -> list[str]:
        d = self.node_dir(i)
        return [self.binary, "-iface=eth0", "--subnet-file", os.path.join(d, "subnet.env"), "-ip-masq=false",
                "-v=1", f"-state-dir={d}", "--admin-socket", self.admin_path(i), "-iptables-resync", "5"]


def test_flanneld_with_no_registry_flag_leases_from_etcd_on_the_default_endpoint(make_lab, workdir, flanneld,
                                                                                  monkeypatch):
    require_etcd()
    lab = make_lab(1)
    node = lab.nodes[0]
    etcd = EtcdServer(os.path.join(workdir, "etcd"), host="127.0.0.1", popen=node.popen, client_port=2379)
    try:
        etcd.start()
        assert etcd.endpoint == "http://127.0.0.1:2379"
        etcd.etcdctl("put", f"{PREFIX}/config", CONFIG)
        monkeypatch.setenv("FLANNELD_HEALTHZ_PORT", "8471")  # the environment, as flanneld reads it
        with AsFlanneld(lab, workdir, flanneld) as cluster:
            cluster.start(0)
            st = cluster.wait_status(0, lambda s: s.ready, timeout=30)
            assert st.registry.kind == "etcd"
            assert st.registry.where == f"http://127.0.0.1:4001,http://127.0.0.1:2379 prefix {PREFIX}"
            # the lease is in etcd, under flannel's default prefix, bound to an etcd lease
            leases = subnet_leases(etcd, PREFIX)
            net = ipaddress.IPv4Network(st.lease.subnet)
            key = f"{net.network_address}-{net.prefixlen}"
            assert list(leases) == [key], leases
            value = json.loads(leases[key]["value"])
            assert value["PublicIP"] == NODE_IP and value["BackendType"] == "vxlan"
            assert leases[key]["lease"] != 0
            log = cluster.log_tail(0, 200)
            assert "registry: etcd (http://127.0.0.1:4001,http://127.0.0.1:2379 prefix" in log
            assert "etcd: http://127.0.0.1:4001 failed, trying http://127.0.0.1:2379 next" in log  # nothing on 4001
            with open(os.path.join(cluster.node_dir(0), "subnet.env")) as f:
                assert f"FLANNEL_SUBNET={net.network_address + 1}/{net.prefixlen}" in f.read().split()
            health = node.run(["python3", "-c", "import urllib.request as u; "
                               "print(u.urlopen('http://127.0.0.1:8471/readyz', timeout=5).read().decode())"], 15)
            assert health.stdout == "ready\n\n", health.stderr  # etcd: no "single host" note
            assert cluster.stop(0) == 0
    finally:
        etcd.__exit__()


@pytest.mark.parametrize("argv, code, err", [
    (["--etcd-end=http://127.0.0.1:2379"], 2, "udpflannel: error: flag provided but not defined: -etcd-end\n"),
    (["-ip-masq", "false"], 2, 'udpflannel: error: unexpected argument "false": flanneld takes flags only, and '
                               "would ignore it and all that follows; a boolean takes its value as "
                               "-ip-masq=false\n"),
    (["-charon-viciurl=unix:///run/charon.vici"], 2, "udpflannel: error: --charon-viciurl is not supported: the "
                                                     "ipsec backend is not implemented; use the vxlan backend\n"),
    (["-kube-subnet-mgr"], 1, "udpflannel: error: --kube-subnet-mgr needs the node's name: NODE_NAME, or POD_NAME "
                              "and POD_NAMESPACE (the pod's own, whose spec.nodeName is read; a DaemonSet sets "
                              "them with the downward API)\n"),
])
def test_flanneld_refuses_in_one_line(flanneld, argv, code, err):
    proc = subprocess.run([flanneld, *argv], capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout, proc.stderr) == (code, "", err)


def test_flanneld_version(flanneld):
    from udpflannel.version import __version__
    proc = subprocess.run([flanneld, "--version"], capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", f"v{__version__}\n")


def test_the_blackhole_route_in_a_real_kernel(make_lab):
    """ensure_blackhole_route as flanneld's AddBlackholeV4Route: added once, kept; and
    refused in one line where the CNI bridge's route for the subnet is."""
    lab = make_lab(1)
    node = lab.nodes[0]
    subnet = ipaddress.IPv4Network("10.244.7.0/24")
    assert node.call(netconf.ensure_blackhole_route, subnet) is True
    assert node.call(netconf.ensure_blackhole_route, subnet) is False
    routes = node.run(["ip", "route", "show", "table", "main", "type", "blackhole"], 15).stdout
    assert routes.split("\n")[0].split() == ["blackhole", "10.244.7.0/24"], routes
    other = ipaddress.IPv4Network("10.244.8.0/24")
    with node.ipr() as ipr:
        ipr.link("add", ifname="cni0", kind="bridge")
    node.link_up("cni0", "10.244.8.1/24")
    with pytest.raises(netconf.NetconfError, match="another route for this prefix"):
        node.call(netconf.ensure_blackhole_route, other)


def test_a_daemon_with_ip_blackhole_route_keeps_one_for_its_subnet(make_lab, make_cluster):
    """--ip-blackhole-route on a running node: its own subnet gets a blackhole route
    within one --iptables-resync period, and gets it back when someone deletes it."""
    lab = make_lab(1)
    cluster = make_cluster(lab, extra_args=["--ip-blackhole-route", "--iptables-resync", "1"])
    cluster.start(0)
    subnet = cluster.wait_status(0, lambda s: s.ready).lease.subnet
    node = lab.nodes[0]

    def blackholes() -> list[str]:
        out = node.run(["ip", "route", "show", "table", "main", "type", "blackhole"], 15).stdout
        return [line.split()[1] for line in out.splitlines() if line.strip()]

    for attempt in range(2):
        wait_until(lambda: subnet in blackholes(), 10, f"a blackhole route for {subnet}", interval=0.2,
                   detail=lambda: cluster.log_tail(0))
        if attempt == 0:
            node.run(["ip", "route", "del", "blackhole", subnet], 15)
            assert subnet not in blackholes()
    assert cluster.procs[0].poll() is None
