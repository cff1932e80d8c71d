"""Path MTU under attack and under a genuinely narrower path.

Before: one forged ICMP "fragmentation needed" quoting the node's VXLAN flow cut TCP
through the overlay to 0.2 Mbit/s for the 600 s the kernel keeps the PMTU, and a
route with `mtu 1400` did the same: UDP_SEGMENT sends larger than the path failed and
the whole TSO window was dropped. Now outer packets leave with DF clear, the socket
ignores frag-needed (IP_PMTUDISC_OMIT), and a failed UDP_SEGMENT send is retried
datagram by datagram (fragmented by the kernel when the device is narrower).

Each test sends a fixed amount of data and demands it arrives intact with no send
error: the failure mode here is a stall, not a slowdown (throughput ratios live in
bench/path_mtu.py).
"""

from __future__ import annotations

import socket

from scapy.layers.inet import ICMP, IP, UDP

from udpflannel.lab import probe

TRANSFER = 24 << 20


def _cluster(make_lab, make_cluster):
    lab = make_lab(2)
    cluster = make_cluster(lab)
    cluster.start_all()
    cluster.wait_converged()
    return lab, cluster


def _transfer(lab, cluster) -> None:
    result = probe.tcp_stream(lab.nodes[0], lab.nodes[1], cluster.overlay_addr(1),
                              nbytes=TRANSFER, timeout=30.0)
    assert result.bytes == TRANSFER


def _counters(cluster, i: int = 0) -> dict:
    return cluster.status(i).dataplane.counters


def _forge_frag_needed(lab, mtu: int) -> None:
    """From node 2 (any host on the path could), an ICMP frag-needed to node 1 quoting
    node 1's VXLAN flow towards node 2."""
    a, b = lab.addresses[0], lab.addresses[1]
    quoted = IP(src=a, dst=b, flags="DF", len=1522) / UDP(sport=8472, dport=8472, len=1502)
    icmp = bytes(ICMP(type=3, code=4, nexthopmtu=mtu) / bytes(quoted)[:28])
    sock = lab.nodes[1].call(socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with sock:
        for _ in range(3):
            sock.sendto(icmp, (a, 0))


def test_forged_frag_needed_changes_nothing(make_lab, make_cluster):
    lab, cluster = _cluster(make_lab, make_cluster)
    _transfer(lab, cluster)  # warm: the flow exists, GSO is in use
    before = _counters(cluster)
    _forge_frag_needed(lab, 552)
    _transfer(lab, cluster)
    after = _counters(cluster)
    assert after["drop_send_error"] == before["drop_send_error"]
    assert after["gso_fallbacks"] == before["gso_fallbacks"]  # not even one send retried
    assert "gso" in cluster.status(0).dataplane.offloads


def test_route_with_a_smaller_mtu_still_carries_tcp(make_lab, make_cluster):
    lab, cluster = _cluster(make_lab, make_cluster)
    with lab.nodes[0].ipr() as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.route("replace", dst=f"{lab.addresses[1]}/32", oif=eth0, metrics={"mtu": 1400})
    _transfer(lab, cluster)
    assert _counters(cluster)["drop_send_error"] == 0


def _reassembled(ns) -> int:
    def read() -> int:
        with open("/proc/thread-self/net/snmp") as f:
            head, values = [line.split() for line in f if line.startswith("Ip:")]
        return int(values[head.index("ReasmOKs")])
    return ns.call(read)


def test_narrower_underlay_device_fragments_instead_of_dropping(make_lab, make_cluster, workdir):
    """With an explicit Backend.MTU of 1500 (flanneld's meaning: the underlay's, so the
    TUN gets 1450) the TUN keeps 1450 when the underlay device shrinks to 1400: each
    UDP_SEGMENT send fails and is retried as single datagrams
    that the kernel fragments, as kernel VXLAN's DF-clear packets are."""
    lab = make_lab(2)
    config = f"{workdir}/net.json"
    with open(config, "w") as f:
        f.write('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "MTU": 1500}}')
    cluster = make_cluster(lab, extra_args=["--net-config", config])
    cluster.start_all()
    cluster.wait_converged()
    lab.nodes[0].link_up("eth0", mtu=1400)
    reassembled = _reassembled(lab.nodes[1])
    _transfer(lab, cluster)
    st = cluster.status(0)
    c = st.dataplane.counters
    assert st.dataplane.mtu == 1450 and c["drop_send_error"] == 0 and c["gso_fallbacks"] > 0
    assert "gso" in st.dataplane.offloads  # EMSGSIZE/EINVAL: per send only
    assert _reassembled(lab.nodes[1]) > reassembled  # the peer saw real fragments


def test_the_tun_follows_a_shrinking_underlay(make_lab, make_cluster):
    """Without Backend.MTU the TUN (and subnet.env, for new pods) follows the underlay:
    the local stack then sizes segments for the path, nothing is fragmented."""
    lab, cluster = _cluster(make_lab, make_cluster)
    lab.nodes[0].link_up("eth0", mtu=1400)
    cluster.wait_status(0, lambda s: s.dataplane.mtu == 1350, 10, "following the underlay MTU")
    with open(f"{cluster.node_dir(0)}/subnet.env") as f:
        assert "FLANNEL_MTU=1350\n" in f.read()
    before = _counters(cluster)
    reassembled = _reassembled(lab.nodes[1])
    _transfer(lab, cluster)
    after = _counters(cluster)
    assert after["drop_send_error"] == 0 and after["gso_fallbacks"] == before["gso_fallbacks"]
    assert _reassembled(lab.nodes[1]) == reassembled
    assert "underlay eth0 MTU is now 1400: flannel0 MTU 1450 -> 1350" in cluster.log_tail(0, 50)
