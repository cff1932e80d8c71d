"""flanneld's ways of choosing the underlay, run by a real daemon in a lab namespace.

The node has two interfaces holding addresses: the lab's eth0 (192.168.250.11) and a
second interface ul2 (172.30.9.11), and no default route, so nothing but the flags can pick one.
Each case starts `udpflannel run` with one form of --iface / --iface-regex /
--iface-can-reach (or FLANNELD_IFACE) and reads the lease it took: its PublicIP must be
the chosen interface's address, and the log names the interface.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from udpflannel.lab.cluster import Cluster

ETH0, UL2 = "192.168.250.11", "172.30.9.11"
REACH_VIA_UL2 = "10.77.1.1"  # routed out of ul2 only


class ChosenUnderlay(Cluster):
    """A cluster whose daemons get no --iface from the lab: the test's flags decide."""

    def argv(self, i: int) -> list[str]:
        argv = super().argv(i)
        at = argv.index("--iface")
        return argv[:at] + argv[at + 2:]


def add_second_interface(lab) -> None:
    node = lab.nodes[0]
    with node.ipr() as ipr:  # a veth pair inside the node (no dummy module needed); ul2p is its far end
        ipr.link("add", ifname="ul2", kind="veth", peer={"ifname": "ul2p"})
    node.link_up("ul2p")
    index = node.link_up("ul2", f"{UL2}/24")
    with node.ipr() as ipr:
        ipr.route("add", dst="10.77.0.0/16", oif=index)


@pytest.mark.parametrize("flags, env, ifname, address", [
    (["--iface", "ul2"], None, "ul2", UL2),
    (["--iface", UL2], None, "ul2", UL2),
    (["--iface", "missing0", "--iface", "ul2"], None, "ul2", UL2),             # the first usable wins
    (["--iface", "ul2", "--iface", "eth0"], None, "ul2", UL2),                 # ... in the order given
    (["--iface", "missing0", "--iface", "10.99.99.99", "--iface", ETH0], None, "eth0", ETH0),
    (["--iface-regex", "u.2"], None, "ul2", UL2),                              # by name
    (["--iface-regex", r"172\.30\..*"], None, "ul2", UL2),                     # by address
    (["--iface-regex", "nothing", "--iface-regex", "eth[0-9]"], None, "eth0", ETH0),
    (["--iface-can-reach", REACH_VIA_UL2], None, "ul2", UL2),
    ([], "ul2", "ul2", UL2),                                                   # FLANNELD_IFACE
    ([], f"{ETH0}", "eth0", ETH0),
    (["--iface", "ul2"], "eth0", "ul2", UL2),                                  # the command line wins
], ids=["name", "address", "missing-first", "order", "skips-unheld-address", "regex-name", "regex-address",
        "regex-second", "can-reach", "env-name", "env-address", "flag-over-env"])
def test_the_underlay_is_the_one_asked_for(make_lab, workdir, monkeypatch, flags, env, ifname, address):
    lab = make_lab(1)
    add_second_interface(lab)
    if env is not None:
        monkeypatch.setenv("FLANNELD_IFACE", env)  # the daemon inherits it
    with ChosenUnderlay(lab, workdir, extra_args=flags) as cluster:
        cluster.start(0)
        st = cluster.wait_status(0, lambda s: s.ready)
        assert st.lease.public_ip == address
        assert f"underlay {ifname} ({address}, public {address}," in cluster.log_tail(0, 50)
        with open(f"{cluster.node_dir(0)}/subnet.env") as f:
            assert "FLANNEL_IPMASQ=false" in f.read().split()  # no --ip-masq: flanneld's default
        assert cluster.stop(0) == 0


@pytest.mark.parametrize("flags, env, words", [
    (["--iface", "missing0", "--iface", "10.99.99.99"], None, ["no usable interface", "missing0", "10.99.99.99"]),
    (["--iface-regex", "("], None, ["--iface-regex"]),
    (["--iface-regex", "nothing"], None, ["no interface name or address matches", "nothing"]),
    # as in flanneld, FLANNELD_IFACE is one value: no interface is named "missing0,ul2"
    ([], "missing0,ul2", ["no usable interface among --iface missing0,ul2"]),
])
def test_no_usable_underlay_is_one_line(make_lab, workdir, monkeypatch, flags, env, words):
    lab = make_lab(1)
    add_second_interface(lab)
    if env is not None:
        monkeypatch.setenv("FLANNELD_IFACE", env)
    argv = ChosenUnderlay(lab, workdir, extra_args=flags).argv(0)
    res = lab.nodes[0].run(argv, 30)
    err = res.stderr
    assert res.returncode == 1 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("udpflannel: error:") and all(w in last for w in words), last


def test_kube_flannel_arguments_without_the_pod_s_identity_are_one_line():
    """kube-flannel.yml's own arguments, without the POD_NAME and POD_NAMESPACE its
    DaemonSet sets: one line saying what is missing (tests/integration/test_kube_mode.py
    runs them with it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_NAME", "POD_NAME", "POD_NAMESPACE")}
    proc = subprocess.run([sys.executable, "-m", "udpflannel", "run", "--ip-masq", "--kube-subnet-mgr"],
                          capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("udpflannel: error: --kube-subnet-mgr needs the node's name: NODE_NAME, or "
                                  "POD_NAME and POD_NAMESPACE")
