"""The compiled engine's real I/O over an IPv6 underlay (no root needed): loopback ::1
sockets for the peers' VXLAN-over-IPv6 ports, a SOCK_SEQPACKET pair for the TUN (as
test_engine_io.py). IPv6 peers are sent to from the IPv6 sockets (the IPv6 source-port
pool when given), IPv4 peers still from the IPv4 ones; the IPv6 sockets are received
on in every --io mode."""

from __future__ import annotations

import socket
import struct
import time
from socket import AF_INET, AF_INET6

import pytest
from enginekit import received
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import TCP, IPv6
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from udpflannel._engine import Engine
from udpflannel.core import offload
from udpflannel.dataplane.pyengine import PyEngine

SOL_UDP, UDP_SEGMENT = 17, 103
A_MAC, B_MAC = b"\x02\0\0\0\0\x0a", b"\x02\0\0\0\0\x0b"
A6_MAC, B6_MAC = b"\x02\0\0\0\x06\x0a", b"\x02\0\0\0\x06\x0b"
PAYLOAD = bytes(range(256)) * 40


def dual(cls, mac: bytes, mac6: bytes):
    return cls(vni=1, vtep_mac=mac, vtep_mac6=mac6, network="10.244.0.0/16", subnet_len=24,
               network6="fd10:244::/56", subnet_len6=64)


def ping6(dst: str, n: int, src: str = "fd10:244:0:1::7") -> bytes:
    return bytes(IPv6(src=src, dst=dst) / UDP(sport=1000 + n, dport=53) / Raw(bytes([n]) * 64))


@pytest.mark.parametrize("cls", [Engine, PyEngine], ids=["compiled", "twin"])
def test_ipv6_peers_from_the_ipv6_sockets_ipv4_peers_from_the_ipv4_ones(wires, cls):
    udp, tun = wires
    peer6, peer4 = udp(family=AF_INET6), udp(family=AF_INET)
    out6, out4 = udp(family=AF_INET6), udp(family=AF_INET)
    app, tun_fd = tun()
    a = dual(cls, A_MAC, A6_MAC)
    a.set_route("fd10:244:0:2::/64", "::1", peer6.getsockname()[1], B6_MAC)
    a.set_route("10.244.2.0/24", "127.0.0.1", peer4.getsockname()[1], B_MAC)
    a.attach(tun_fd.fileno(), out4.fileno(), udp6_fd=out6.fileno())
    sent6 = [ping6("fd10:244:0:2::9", n) for n in range(20)]
    sent4 = bytes(IP(src="10.244.1.7", dst="10.244.2.9") / UDP() / Raw(b"four"))
    for p in [*sent6[:10], sent4, *sent6[10:]]:
        app.send(p)
    assert a.drain_tun(64) == 21
    got6, got4 = received(peer6), received(peer4)
    assert [bytes(VXLAN(d)[Ether].payload) for d, _ in got6] == sent6
    assert {src[1] for _, src in got6} == {out6.getsockname()[1]}
    assert [VXLAN(d)[Ether].type for d, _ in got6] == [0x86DD] * 20
    assert [bytes(VXLAN(d)[IP]) for d, _ in got4] == [sent4]
    assert a.counters()["tx_packets"] == 21


def test_the_ipv6_source_port_pool_spreads_flows_and_keeps_each_on_one(wires):
    udp, tun = wires
    peer6 = udp(family=AF_INET6)
    pool = [udp(family=AF_INET6) for _ in range(4)]
    app, tun_fd = tun()
    a = dual(Engine, A_MAC, A6_MAC)
    a.set_route("fd10:244:0:2::/64", "::1", peer6.getsockname()[1], B6_MAC)
    a.attach(tun_fd.fileno(), -1, udp6_fd=udp(family=AF_INET6).fileno(), tx6_fds=[s.fileno() for s in pool],
             gso=True)
    sent = [ping6("fd10:244:0:2::9", n % 16) for n in range(48)]
    for p in sent:
        app.send(p)
    assert a.drain_tun(128) == 48
    by_flow: dict[bytes, set[int]] = {}
    for d, src in received(peer6):
        by_flow.setdefault(bytes(VXLAN(d)[Ether].payload), set()).add(src[1])
    assert len(by_flow) == 16 and all(len(ports) == 1 for ports in by_flow.values())
    assert {p for ports in by_flow.values() for p in ports} == {s.getsockname()[1] for s in pool}


@pytest.mark.parametrize("mode", ["loop", "threads", "poll"])
def test_frames_on_the_ipv6_socket_reach_the_tun_in_every_io_mode(wires, mode):
    udp, tun = wires
    rx6, rx4 = udp(family=AF_INET6), udp(family=AF_INET)
    sender = udp(family=AF_INET6)
    app, tun_fd = tun()
    app.settimeout(2)
    b = dual(Engine, B_MAC, B6_MAC)
    b.set_subnet("fd10:244:0:2::/64")
    b.set_route("fd10:244:0:1::/64", "::1", sender.getsockname()[1], A6_MAC)
    a = dual(Engine, A_MAC, A6_MAC)
    a.set_route("fd10:244:0:2::/64", "::1", rx6.getsockname()[1], B6_MAC)
    sent = [ping6("fd10:244:0:2::9", n) for n in range(10)]
    frames = [a.encap(p)[1] for p in sent]
    if mode != "loop":
        for s in (rx6, rx4):
            s.setblocking(True)
        tun_fd.setblocking(True)
    b.attach(tun_fd.fileno(), rx4.fileno(), udp6_fd=rx6.fileno())
    if mode != "loop":
        b.start_threads(poll=mode == "poll")
    try:
        for f in frames:
            sender.sendto(f, rx6.getsockname())
        if mode == "loop":
            deadline = time.monotonic() + 2
            while b.counters()["rx_packets"] < 10 and time.monotonic() < deadline:
                b.drain_udp6(64)
        assert [app.recv(70000) for _ in sent] == sent
    finally:
        b.stop_threads()
    assert b.counters()["rx_packets"] == 10


def test_a_tcpv6_super_packet_leaves_in_one_udp_segment_send_over_ipv6(wires):
    udp, tun = wires
    peer6 = udp(family=AF_INET6)
    app, tun_fd = tun()
    a = dual(Engine, A_MAC, A6_MAC)
    a.set_route("fd10:244:0:2::/64", "::1", peer6.getsockname()[1], B6_MAC)
    a.attach(tun_fd.fileno(), -1, udp6_fd=udp(family=AF_INET6).fileno(), vnet_hdr=True, gso=True)
    raw = bytes(IPv6(src="fd10:244:0:1::7", dst="fd10:244:0:2::9") / TCP(flags="A", seq=9) / Raw(PAYLOAD))
    app.send(offload.vnet_header(offload.NEEDS_CSUM, offload.GSO_TCPV6, 60, 1400, 40, 16) + raw)
    assert a.drain_tun(8) == 1
    got = [d for d, _ in received(peer6)]
    segments = [VXLAN(d)[IPv6] for d in got]
    assert b"".join(bytes(s[TCP].payload) for s in segments) == PAYLOAD
    assert [s[TCP].seq for s in segments] == [9 + 1400 * i for i in range(len(segments))]
    c = a.counters()
    assert (c["tx_super_packets"], c["tx_send_calls"], c["tx_packets"]) == (1, 1, len(segments))
    assert c["gso_fallbacks"] == 0
    assert struct.unpack("!H", got[0][22 + 4:22 + 6])[0] == 20 + 1400  # each its own payload length
