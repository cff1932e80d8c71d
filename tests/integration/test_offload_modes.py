"""Every offload combination carries real TCP both ways between two daemons, and
each falls back cleanly when the kernel refuses it."""

from __future__ import annotations

import pytest

from udpflannel.lab import probe


def _run_pair(make_lab, make_cluster, offload: str, seconds: float = 1.0):
    lab = make_lab(2)
    cluster = make_cluster(lab, extra_args=["--offload", offload])
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



def test_udp_gso_sender_goes_through_as_datagrams(make_lab, make_cluster):
    """A sender using UDP_SEGMENT hands the TUN one UDP super-packet (USO); the engine
    cuts it into datagrams that arrive at the peer one by one, intact and in order."""
    import socket
    import struct
    lab = make_lab(2)
    cluster = make_cluster(lab)
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
    assert cluster.status(0).dataplane.counters["tx_super_packets"] > before
