"""The compiled engine's real I/O paths on real kernel sockets (no root needed): a
SOCK_SEQPACKET pair stands in for the TUN (it keeps packet boundaries), loopback
UDP sockets for the underlay. Covers UDP_SEGMENT sends, the fallback when the kernel
refuses them, UDP_GRO receives and coalesced virtio writes."""

from __future__ import annotations

import socket
import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw
from udpflannel._engine import Engine

from udpflannel.core import offload
from udpflannel.dataplane.pyengine import PyEngine
from udpflannel.dataplane.userspace import EnginePlane

SOL_UDP, UDP_SEGMENT, UDP_GRO, SO_NO_CHECK, IPPROTO_UDPLITE = 17, 103, 104, 11, 136
A_MAC, B_MAC = b"\x02\0\0\0\0\x0a", b"\x02\0\0\0\0\x0b"
PAYLOAD = bytes(range(256)) * 40  # 10240 bytes


def engine(mac: bytes) -> Engine:
    return Engine(vni=1, vtep_mac=mac, network="10.244.0.0/16", subnet_len=24)


@pytest.fixture
def wires():
    socks = []

    def udp(opts: dict | None = None) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        for (level, name), value in (opts or {}).items():
            s.setsockopt(level, name, value)
        socks.append(s)
        return s

    def tun() -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        b.setblocking(False)
        socks.extend((a, b))
        return a, b
    try:
        yield udp, tun
    finally:
        for s in socks:
            s.close()


def super_packet() -> bytes:
    raw = bytes(IP(src="10.244.1.7", dst="10.244.2.9", id=1) / TCP(flags="A", seq=7) / Raw(PAYLOAD))
    return offload.vnet_header(offload.NEEDS_CSUM, offload.GSO_TCPV4, 40, 1400, 20, 16) + raw


def drain_datagrams(sock: socket.socket) -> list[bytes]:
    sock.settimeout(0.5)
    out = []
    try:
        while True:
            out.append(sock.recv(65535))
    except socket.timeout:
        return out


@pytest.mark.parametrize("refuse", [False, True])
def test_udp_segment_sends_and_falls_back_when_refused(wires, refuse):
    udp, tun = wires
    rx = udp()
    # SO_NO_CHECK makes the kernel refuse UDP_SEGMENT with EINVAL, as a path narrower
    # than a segment does: that send is retried datagram by datagram and GSO stays on
    # (only EIO turns it off: tests/integration/test_path_mtu.py)
    tx = udp({(socket.SOL_SOCKET, SO_NO_CHECK): 1} if refuse else None)
    tx.setblocking(False)
    app, tun_fd = tun()
    a = engine(A_MAC)
    a.set_route("10.244.2.0/24", "127.0.0.1", rx.getsockname()[1], B_MAC)
    a.attach(tun_fd.fileno(), tx.fileno(), vnet_hdr=True, gso=True)
    app.send(super_packet())
    assert a.drain_tun(8) == 1
    got = drain_datagrams(rx)
    twin = PyEngine(vni=1, vtep_mac=A_MAC, network="10.244.0.0/16", subnet_len=24)
    twin.set_route("10.244.2.0/24", "127.0.0.1", rx.getsockname()[1], B_MAC)
    assert got == twin.segment(super_packet())  # the same frames, one datagram each
    assert a.offloads()["gso"] is True
    c = a.counters()
    assert c["tx_packets"] == len(got) == 8 and c["drop_send_error"] == 0
    assert c["gso_fallbacks"] == (1 if refuse else 0)


def test_eio_turns_gso_off_for_good(wires):
    """EIO is the kernel saying it cannot segment here (a UDP-Lite socket gets it on
    every kernel; an egress device without checksum offload on older ones): the send
    is retried datagram by datagram and GSO stays off from then on."""
    _, tun = wires
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, IPPROTO_UDPLITE)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, IPPROTO_UDPLITE)
    with rx, tx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(0.2)
        tx.bind(("127.0.0.1", 0))
        tx.setblocking(False)
        app, tun_fd = tun()
        a = engine(A_MAC)
        a.set_route("10.244.2.0/24", "127.0.0.1", rx.getsockname()[1], B_MAC)
        a.attach(tun_fd.fileno(), tx.fileno(), vnet_hdr=True, gso=True)
        for _ in range(2):
            app.send(super_packet())
            assert a.drain_tun(8) == 1
        assert len(drain_datagrams(rx)) == 16
        c = a.counters()
        assert a.offloads()["gso"] is False
        assert c["gso_fallbacks"] == 1 and c["drop_send_error"] == 0  # the second went plain


def test_engine_plane_logs_gso_off_once(caplog):
    import asyncio

    class Engine:
        gso = True

        def offloads(self):
            return {"gso": self.gso}

        def reclaim(self):
            return 0
    from types import SimpleNamespace
    plane = EnginePlane.__new__(EnginePlane)
    plane.engine, plane._gso, plane.tun = Engine(), True, None
    plane.opts = SimpleNamespace(config=SimpleNamespace(mtu=None))
    asyncio.run(plane.check())
    plane.engine.gso = False
    for _ in range(3):
        asyncio.run(plane.check())
    assert [r.message for r in caplog.records].count(
        "UDP GSO turned off: the kernel cannot segment on this path (EIO); "
        "sending datagrams one by one") == 1


def test_gro_receive_coalesces_into_one_virtio_write(wires):
    udp, tun = wires
    rx = udp({(SOL_UDP, UDP_GRO): 1})
    rx.setblocking(False)
    tx = udp()
    app, tun_fd = tun()
    b = engine(B_MAC)
    b.set_route("10.244.1.0/24", "127.0.0.1", tx.getsockname()[1], A_MAC)
    b.attach(tun_fd.fileno(), rx.fileno(), vnet_hdr=True, gro=True)
    a = engine(A_MAC)
    a.set_route("10.244.2.0/24", "127.0.0.1", rx.getsockname()[1], B_MAC)
    frames = a.segment(super_packet())
    stride = len(frames[0])
    # one UDP_SEGMENT send: over loopback it reaches a UDP_GRO socket in one piece
    tx.sendmsg([b"".join(frames)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", stride))],
               0, rx.getsockname())
    assert b.drain_udp(8) >= 1
    app.settimeout(0.5)
    write = app.recv(70000)
    flags, gso, hlen, size, start, off = offload.parse_vnet(write)
    assert (flags, gso, hlen, size, start, off) == (1, 1, 40, 1400, 20, 16)
    merged = IP(offload.complete_checksum(write[offload.VNET_HLEN:], start, off))
    assert bytes(merged[TCP].payload) == PAYLOAD and merged[TCP].seq == 7
    c = b.counters()
    assert c["rx_packets"] == len(frames) and c["rx_merged_writes"] == 1


def test_plain_tun_path_delivers_packets_one_by_one(wires):
    udp, tun = wires
    rx = udp()
    rx.setblocking(False)
    tx = udp()
    app, tun_fd = tun()
    b = engine(B_MAC)
    b.set_route("10.244.1.0/24", "127.0.0.1", tx.getsockname()[1], A_MAC)
    b.attach(tun_fd.fileno(), rx.fileno())
    a = engine(A_MAC)
    a.set_route("10.244.2.0/24", "127.0.0.1", rx.getsockname()[1], B_MAC)
    frames = a.segment(super_packet())
    for f in frames:
        tx.sendto(f, rx.getsockname())
    assert b.drain_udp(64) == len(frames)
    app.settimeout(0.5)
    packets = [app.recv(70000) for _ in frames]
    assert b"".join(bytes(IP(p)[TCP].payload) for p in packets) == PAYLOAD


def _small(dst: str, size: int, n: int) -> bytes:
    return bytes(IP(src="10.244.1.7", dst=dst, id=n) / UDP(sport=1000 + n, dport=9) / Raw(bytes([n]) * size))


@pytest.mark.parametrize("vnet", [False, True])
@pytest.mark.parametrize("refuse", [False, True])
def test_small_packets_leave_in_batches_in_order(wires, vnet, refuse):
    """Packets read in one drain are framed in place and sent per peer in batches
    (UDP_SEGMENT when sizes allow; sendmmsg otherwise or when refused): every one
    arrives, unchanged and in order, at the right peer."""
    udp, tun = wires
    rx_b, rx_c = udp(), udp()
    tx = udp({(socket.SOL_SOCKET, SO_NO_CHECK): 1} if refuse else None)
    tx.setblocking(False)
    app, tun_fd = tun()
    a = engine(A_MAC)
    a.set_route("10.244.2.0/24", "127.0.0.1", rx_b.getsockname()[1], B_MAC)
    a.set_route("10.244.3.0/24", "127.0.0.1", rx_c.getsockname()[1], b"\x02\0\0\0\0\x0c")
    a.attach(tun_fd.fileno(), tx.fileno(), vnet_hdr=vnet, gso=True)
    plan = [("10.244.2.9", 64)] * 5 + [("10.244.2.9", 30)] + [("10.244.2.9", 64)] * 3 \
        + [("10.244.3.9", 64)] * 2 + [("10.244.2.9", 200)] + [("10.244.2.9", 64)] * 70
    sent = [_small(dst, size, n % 256) for n, (dst, size) in enumerate(plan)]
    for p in sent:
        app.send((bytes(offload.VNET_HLEN) if vnet else b"") + p)
    assert a.drain_tun(256) == len(sent)
    got_b = [bytes(VXLAN(d)[IP]) for d in drain_datagrams(rx_b)]
    got_c = [bytes(VXLAN(d)[IP]) for d in drain_datagrams(rx_c)]
    assert got_b == [p for p, (dst, _) in zip(sent, plan) if dst == "10.244.2.9"]
    assert got_c == [p for p, (dst, _) in zip(sent, plan) if dst == "10.244.3.9"]
    c = a.counters()
    assert c["tx_packets"] == len(sent) and c["drop_send_error"] == 0
    assert c["tx_bytes"] == sum(map(len, sent))
    assert a.offloads()["gso"] is True  # EINVAL concerns one send: GSO stays on
    assert (c["gso_fallbacks"] > 0) is refuse
