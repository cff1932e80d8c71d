"""Every offload combination carries real TCP both ways between two daemons, and
each falls back cleanly when the kernel refuses it: asked for by --offload, or refused
by an older kernel (a seccomp filter around the daemons: oldkernels.py), where the
engine batches its system calls instead (sendmmsg, recvmmsg + coalescing)."""

from __future__ import annotations

import pytest
from oldkernels import EXPECTED, kernels

from udpflannel.lab import probe


def _run_pair(make_lab, make_cluster, offload: str, seconds: float = 1.0, kernel: str | None = None):
    lab = make_lab(2)
    cluster = make_cluster(lab, extra_args=["--offload", offload], kernel=kernel)
    cluster.start_all()
    cluster.wait_converged()
    there = probe.tcp_stream(lab.nodes[0], lab.nodes[1], cluster.overlay_addr(1), seconds)
    back = probe.tcp_stream(lab.nodes[1], lab.nodes[0], cluster.overlay_addr(0), seconds)
    assert there.bytes > 1_000_000 and back.bytes > 1_000_000  # content-checked streams
    assert all(probe.ping(lab.nodes[0], cluster.overlay_addr(1), count=2))
    return lab, cluster, cluster.statuses()


@pytest.mark.parametrize("offload", ["off", "tso", "gso", "gro", "tso,gso", "tso,gro", "auto"])
def test_offload_mode_carries_tcp_both_ways(make_lab, make_cluster, offload):
    _, _, statuses = _run_pair(make_lab, make_cluster, offload)
    wanted = {"auto": {"tso", "gso", "gro"}, "off": set()}.get(offload, set(offload.split(",")))
    for st in statuses:
        c = st.dataplane.counters
        assert set(st.dataplane.offloads) == wanted
        # super-packets are read only with TSO; merged writes need TSO (virtio header)
        assert (c["tx_super_packets"] > 0) == ("tso" in wanted)
        if "tso" not in wanted:
            assert c["rx_merged_writes"] == 0
        if {"tso", "gso", "gro"} <= wanted:
            assert c["rx_merged_writes"] > 0
        bad = {k: v for k, v in c.items() if k.startswith("drop_") and k != "drop_no_route" and v}
        assert bad == {}
        # batched calls whatever the offloads: fewer calls than packets both ways
        assert st.dataplane.batching == ("sendmmsg", "recvmmsg")
        assert c["tx_send_calls"] < c["tx_packets"] and c["rx_recv_calls"] < c["rx_packets"]


@pytest.mark.parametrize("kernel", kernels(*EXPECTED, this=False))
def test_an_older_kernel_falls_back_and_batches(make_lab, make_cluster, kernel):
    """Under each kernel profile: the start-up line and status say what is used, TCP
    both ways and ping work, and the counters show the fallbacks at work: TSO reads
    only with TUN TSO; coalesced TUN writes wherever a batch arrives (GRO reads or
    recvmmsg); far fewer send calls than packets (UDP_SEGMENT or sendmmsg)."""
    lab, cluster, statuses = _run_pair(make_lab, make_cluster, "auto", kernel=kernel)
    wanted, batching = EXPECTED[kernel]
    tun = "TSO" if "tso" in wanted else "none"  # every profile refuses USO (Linux < 6.2)
    for i, st in enumerate(statuses):
        cluster.wait_log(i, f"offloads: TUN {tun}, UDP GSO {'on' if 'gso' in wanted else 'off'}, "
                            f"UDP GRO {'on' if 'gro' in wanted else 'off'}; "
                            f"batching: {', '.join(batching) or 'none (one datagram per system call)'}")
        c = st.dataplane.counters
        assert set(st.dataplane.offloads) == wanted and st.dataplane.batching == batching
        assert (c["tx_super_packets"] > 0) == ("tso" in wanted)
        # coalesced TUN writes wherever a batch arrives: the TUN has its virtio header in
        # every profile (asked for with TSO, kept when the kernel refuses the offloads)
        assert (c["rx_merged_writes"] > 0) == (bool(batching) or "gro" in wanted)
        if batching or "gso" in wanted:
            assert c["tx_send_calls"] * 2 < c["tx_packets"]
        else:  # one datagram per call: sendmsg each (a status read between a packet's
            # encapsulation, which counts it, and its send call may see it in flight)
            assert c["tx_packets"] - c["tx_send_calls"] in (0, 1)
        if batching or "gro" in wanted:
            assert c["rx_recv_calls"] < c["rx_packets"]
        else:  # (the same: a call counted before its datagram is)
            assert abs(c["rx_recv_calls"] - c["rx_packets"]) <= 1
        bad = {k: v for k, v in c.items() if k.startswith("drop_") and k != "drop_no_route" and v}
        assert bad == {} and c["gso_fallbacks"] == 0


@pytest.mark.parametrize("kernel", kernels("no-uso", "no-udp-offload"))
def test_udp_gso_sender_goes_through_as_datagrams(make_lab, make_cluster, kernel):
    """A sender using UDP_SEGMENT hands the TUN one UDP super-packet (USO); the engine
    cuts it into datagrams that arrive at the peer one by one, intact and in order.
    A TUN without USO (Linux < 6.2) gets them already cut by the kernel."""
    import socket
    import struct
    lab = make_lab(2)
    cluster = make_cluster(lab, kernel=kernel)
    cluster.start_all()
    cluster.wait_converged()
    dst = cluster.overlay_addr(1)
    rx = lab.nodes[1].call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    tx = lab.nodes[0].call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((dst, 4433))
        rx.settimeout(2)
        size = 1000
        chunks = [bytes([i]) * size for i in range(40)]
        before = cluster.status(0).dataplane.counters["tx_super_packets"]
        tx.sendmsg([b"".join(chunks)], [(17, 103, struct.pack("=H", size))], 0, (dst, 4433))
        got = [rx.recv(65535) for _ in chunks]
    assert got == chunks
    uso = kernel is None
    cluster.wait_log(0, f"offloads: TUN {'TSO + USO' if uso else 'TSO'}, ")
    assert (cluster.status(0).dataplane.counters["tx_super_packets"] > before) is uso
