"""Dual-stack pods: two nodes running `udpflannel run --ip-masq` on a dual-stack network
and underlay, with each data plane (the kernel's flannel.1 and flannel-v6.1, the
engine's TUN); pods are lab namespaces added by CNI ADD through
udpflannel-cni with the real bridge and host-local plugins. Each pod gets an IPv4 and an
IPv6 address from its node's subnets (flannel's plugin renders one range set per
family); pods on different nodes reach each other over both families keeping their own
addresses (the daemon's rules, not the bridge, decide on NAT: FLANNEL_IPMASQ=true), and a
pod reaching a host outside the cluster network over IPv6 leaves with its node's IPv6
address (ip6tables MASQUERADE, as flanneld's masqIP6Rules)."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import threading
from typing import Any

import pytest

from udpflannel.lab import probe
from udpflannel.lab.netns import Namespace

try:
    from .test_cni import cni_call, pod_netconf
except ImportError:
    from test_cni import cni_call, pod_netconf

NETWORK, NETWORK6 = "10.247.0.0/16", "fd20::/56"


@pytest.mark.parametrize("plane", ["kernel", "engine"])
def test_dual_stack_pods_reach_each_other_over_both_families(make_lab, make_cluster, workdir, plane):
    lab = make_lab(3, underlay6="fd00:251::/64")  # node 3: a host outside the cluster network
    config = os.path.join(workdir, "net.json")
    with open(config, "w") as f:
        json.dump({"Network": NETWORK, "EnableIPv6": True, "IPv6Network": NETWORK6, "Backend": {"Type": "vxlan"}}, f)
    cluster = make_cluster(lab, extra_args=["--ip-masq", "--dataplane", plane, "--net-config", config])
    cluster.start(0)
    cluster.start(1)
    for i in (0, 1):
        cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 2 and s.dataplane.kind == plane, 30,
                            "routing both families")

    pods, ips = [], []
    for i in (0, 1):
        lease = cluster.status(i).lease
        pod = lab.add_namespace(f"pod{i + 1}")
        conf = pod_netconf(workdir, os.path.join(cluster.node_dir(i), "subnet.env"), f"cni{i + 1}")
        add = cni_call(lab.nodes[i], "ADD", conf, f"pod-{i + 1}", pod.path)
        assert add.rc == 0, add
        got = sorted((ipaddress.ip_interface(x["address"]) for x in add.out["ips"]), key=lambda x: x.version)
        assert [x.network for x in got] == [ipaddress.IPv4Network(lease.subnet),
                                            ipaddress.IPv6Network(lease.ipv6_subnet)], add.out
        with open(os.path.join(conf["dataDir"], f"pod-{i + 1}")) as f:
            saved = json.load(f)
        assert saved["ipMasq"] is False and len(saved["ipam"]["ranges"]) == 2
        assert saved["ipam"]["routes"] == [{"dst": NETWORK}, {"dst": NETWORK6}]
        pods.append(pod)
        ips.append([str(x.ip) for x in got])

    payload = os.urandom(100_000)
    for a, b in ((0, 1), (1, 0)):
        for family in (0, 1):  # IPv4, then IPv6: the remote pod sees the sending pod itself
            answer, peer = probe.tcp_exchange(pods[a], pods[b], ips[b][family], 7400 + 2 * a + family, payload)
            assert answer == payload[::-1] and peer == ips[a][family], (a, b, family, peer)

    # out of the cluster network over IPv6: masqueraded to the node's IPv6 address
    answer, peer = probe.tcp_exchange(pods[0], lab.nodes[2], lab.addresses6[2], 7500, payload)
    assert answer == payload[::-1] and peer == lab.addresses6[0], peer
