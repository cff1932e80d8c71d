"""The compiled engine's real I/O paths on real kernel sockets (no root needed): a
SOCK_SEQPACKET pair stands in for the TUN (it keeps packet boundaries), loopback
UDP sockets for the underlay. Covers UDP_SEGMENT sends, the fallback when the kernel
refuses them, UDP_GRO receives and coalesced virtio writes, and the batched paths of
kernels without UDP GSO/GRO (sendmmsg, recvmmsg + coalescing; both refused at start
and at run time), byte for byte against the pure twin."""

from __future__ import annotations

import contextlib
import socket
import struct

import pytest
from enginekit import received
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


def super_packet() -> bytes:
    raw = bytes(IP(src="10.244.1.7", dst="10.244.2.9", id=1) / TCP(flags="A", seq=7) / Raw(PAYLOAD))
    return offload.vnet_header(offload.NEEDS_CSUM, offload.GSO_TCPV4, 40, 1400, 20, 16) + raw


def drain_datagrams(sock: socket.socket) -> list[bytes]:
    return [data for data, _ in received(sock)]


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
    plane.engine, plane._gso, plane._batching, plane.tun = Engine(), True, (), None
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


@pytest.mark.parametrize("gso", [True, False], ids=["udp-segment", "sendmmsg"])
def test_many_flows_to_one_peer_leave_in_one_call_per_source_port(wires, gso):
    """64 small flows to one peer, hashed over 4 source-port sockets and read in one
    drain: each socket's packets leave together (one call per socket, not one per
    change of socket), every packet arrives, and each flow keeps its order and its
    socket."""
    udp, tun = wires
    rx = udp()
    pool = [udp() for _ in range(4)]
    app, tun_fd = tun()
    a = engine(A_MAC)
    a.set_route("10.244.2.0/24", "127.0.0.1", rx.getsockname()[1], B_MAC)
    a.attach(tun_fd.fileno(), pool[0].fileno(), tx_fds=[s.fileno() for s in pool], gso=gso)
    sent = [_small("10.244.2.9", 64, flow) for _ in range(3) for flow in range(64)]
    for p in sent:
        app.send(p)
    assert a.drain_tun(256) == len(sent)
    rx.settimeout(0.5)
    got: list[tuple[int, bytes]] = []
    with contextlib.suppress(socket.timeout):
        while True:
            data, (_, port) = rx.recvfrom(65535)
            got.append((port, bytes(VXLAN(data)[IP])))
    assert sorted(p for _, p in got) == sorted(sent)
    for flow in range(64):  # in order, all by one socket
        mine = [(port, p) for port, p in got if IP(p)[UDP].sport == 1000 + flow]
        assert [p for _, p in mine] == [p for p in sent if IP(p)[UDP].sport == 1000 + flow]
        assert len({port for port, _ in mine}) == 1
    assert len({port for port, _ in got}) > 1  # the flows were spread over the sockets
    c = a.counters()
    assert c["tx_packets"] == len(sent) and c["drop_send_error"] == 0
    assert c["tx_send_calls"] <= len(pool)


def twin_of(mac: bytes, subnet: str, port: int, peer_mac: bytes) -> PyEngine:
    t = PyEngine(vni=1, vtep_mac=mac, network="10.244.0.0/16", subnet_len=24)
    t.set_route(subnet, "127.0.0.1", port, peer_mac)
    return t


def tun_writes(app: socket.socket) -> list[bytes]:
    return [data for data, _ in received(app, 0.3)]


def _flow(seq: int, n: int, size: int, sport: int = 40000, psh_last: bool = False) -> list[bytes]:
    return [bytes(IP(src="10.244.1.7", dst="10.244.2.9", id=k) /
                  TCP(sport=sport, dport=5201, seq=seq + k * size, ack=9,
                      flags="PA" if psh_last and k == n - 1 else "A") /
                  Raw(bytes([k % 251]) * size)) for k in range(n)]


# what one recvmmsg batch may bring: runs of two flows, a run broken by a gap and by
# PSH, a shorter last segment, and a packet that never merges (UDP) in between
MIXED = (_flow(1000, 5, 1400) + [bytes(IP(src="10.244.1.7", dst="10.244.2.9") / UDP(sport=5, dport=6) / Raw(b"u"))]
         + _flow(8000, 3, 1400, psh_last=True) + _flow(50_000, 4, 1400, sport=40001) + _flow(60_000, 2, 700)
         + _flow(100_000, 9, 1200) + _flow(100_000 + 9 * 1200 + 1200, 3, 1200))


@pytest.mark.parametrize("mmsg", [True, False], ids=["recvmmsg", "recvmsg"])
def test_a_batch_without_gro_is_coalesced_like_the_twin(wires, mmsg):
    """No UDP GRO: recvmmsg brings the datagrams in one call and the engine coalesces
    across them exactly as the twin's coalesce() does; one datagram per call (a
    kernel without recvmmsg) writes each packet alone, as before."""
    udp, tun = wires
    rx = udp()
    rx.setblocking(False)
    tx = udp()
    app, tun_fd = tun()
    b = engine(B_MAC)
    b.set_route("10.244.1.0/24", "127.0.0.1", tx.getsockname()[1], A_MAC)
    b.attach(tun_fd.fileno(), rx.fileno(), vnet_hdr=True, gro=False, mmsg=mmsg)
    assert b.offloads()["recvmmsg"] is mmsg
    a = twin_of(A_MAC, "10.244.2.0/24", rx.getsockname()[1], B_MAC)
    frames = [a.encap(p)[1] for p in MIXED]
    for f in frames:
        tx.sendto(f, rx.getsockname())
    assert b.drain_udp(256) == len(frames)
    twin = twin_of(B_MAC, "10.244.1.0/24", tx.getsockname()[1], A_MAC)
    inner = [twin.decap(f, "127.0.0.1")[1] for f in frames]
    expected = twin.coalesce(inner) if mmsg else [w for p in inner for w in twin.coalesce([p])]
    assert tun_writes(app) == expected
    c, t = b.counters(), twin.counters()
    assert {k: c[k] for k in ("rx_packets", "rx_bytes", "rx_merged_writes")} == \
        {k: t[k] for k in ("rx_packets", "rx_bytes", "rx_merged_writes")}
    assert c["rx_recv_calls"] == (1 if mmsg else len(frames))
    assert (c["rx_merged_writes"] > 0) is mmsg


def test_recvmmsg_batches_gro_reads_too(wires):
    """With UDP GRO each message of the batch may hold many datagrams: two UDP_SEGMENT
    sends arrive as two reads of one call, and both become TUN writes."""
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
    for _ in range(2):
        tx.sendmsg([b"".join(frames)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(frames[0])))],
                   0, rx.getsockname())
    assert b.drain_udp(8) == 2
    writes = tun_writes(app)
    assert len(writes) == 2  # the same segments twice: the second run does not extend the first
    c = b.counters()
    assert c["rx_packets"] == 2 * len(frames) and c["rx_recv_calls"] == 1 and c["rx_merged_writes"] == 2


@pytest.mark.parametrize("mmsg", [True, False], ids=["sendmmsg", "sendmsg"])
def test_a_super_packet_without_gso_leaves_in_one_call(wires, mmsg):
    """TUN TSO without UDP GSO: the super-packet's segments (headers written apart,
    payload in place) leave in one sendmmsg; the same frames as the twin's."""
    udp, tun = wires
    rx = udp()
    tx = udp()
    tx.setblocking(False)
    app, tun_fd = tun()
    a = engine(A_MAC)
    a.set_route("10.244.2.0/24", "127.0.0.1", rx.getsockname()[1], B_MAC)
    a.attach(tun_fd.fileno(), tx.fileno(), vnet_hdr=True, gso=False, mmsg=mmsg)
    app.send(super_packet())
    assert a.drain_tun(8) == 1
    twin = twin_of(A_MAC, "10.244.2.0/24", rx.getsockname()[1], B_MAC)
    assert drain_datagrams(rx) == twin.segment(super_packet())
    c = a.counters()
    assert c["tx_packets"] == 8 and c["tx_super_packets"] == 1 and c["drop_send_error"] == 0
    assert c["tx_send_calls"] == (1 if mmsg else 8)
    assert a.offloads()["sendmmsg"] is mmsg


def test_plain_reads_without_gso_leave_in_one_call_per_64(wires):
    """No TUN offloads and no UDP GSO: what one drain reads goes out 64 datagrams per
    sendmmsg, however many bytes that is (UDP_SEGMENT's 64 KB limit does not apply)."""
    udp, tun = wires
    rx = udp()
    tx = udp()
    tx.setblocking(False)
    app, tun_fd = tun()
    a = engine(A_MAC)
    a.set_route("10.244.2.0/24", "127.0.0.1", rx.getsockname()[1], B_MAC)
    a.attach(tun_fd.fileno(), tx.fileno())
    sent = [_small("10.244.2.9", 1400, n) for n in range(70)]
    for p in sent:
        app.send(p)
    assert a.drain_tun(256) == len(sent)
    assert [bytes(VXLAN(d)[IP]) for d in drain_datagrams(rx)] == sent
    c = a.counters()
    assert c["tx_packets"] == 70 and c["tx_send_calls"] == 2 and c["drop_send_error"] == 0


# Run in a child process: a seccomp filter cannot be taken off again. The engine is
# attached (its probe finds sendmmsg and recvmmsg), then the filter makes both answer
# ENOSYS, as on a kernel that lacks them; traffic must still flow, one datagram a call.
REFUSED_AT_RUN_TIME = """
import ctypes, errno, json, socket
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw
from udpflannel._engine import Engine
from udpflannel.core import offload
from udpflannel.dataplane.pyengine import PyEngine

A, B = b"\\x02\\0\\0\\0\\0\\x0a", b"\\x02\\0\\0\\0\\0\\x0b"

def refuse_mmsg():
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    ctx = ctypes.c_void_p(lib.seccomp_init(0x7FFF0000))  # SCMP_ACT_ALLOW
    for name in (b"sendmmsg", b"recvmmsg"):
        action = 0x00050000 | errno.ENOSYS  # SCMP_ACT_ERRNO(ENOSYS)
        assert lib.seccomp_rule_add_array(ctx, action, lib.seccomp_syscall_resolve_name(name), 0, None) == 0
    assert lib.seccomp_load(ctx) == 0

def super_packet(src, dst):
    raw = bytes(IP(src=src, dst=dst, id=1) / TCP(flags="A", seq=7) / Raw(bytes(range(256)) * 40))
    return offload.vnet_header(offload.NEEDS_CSUM, offload.GSO_TCPV4, 40, 1400, 20, 16) + raw

def engine(cls, mac, subnet, port, peer_mac):
    e = cls(vni=1, vtep_mac=mac, network="10.244.0.0/16", subnet_len=24)
    e.set_route(subnet, "127.0.0.1", port, peer_mac)
    return e

def drain(sock):
    sock.settimeout(0.5)
    out = []
    try:
        while True:
            out.append(sock.recv(70000))
    except socket.timeout:
        return out

rx, peer = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
for s in (rx, peer):
    s.bind(("127.0.0.1", 0))
rx.setblocking(False)
app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
tun.setblocking(False)
a = engine(Engine, A, "10.244.2.0/24", peer.getsockname()[1], B)
a.attach(tun.fileno(), rx.fileno(), vnet_hdr=True)
before = a.offloads()
refuse_mmsg()
app.send(super_packet("10.244.1.7", "10.244.2.9"))
a.drain_tun(8)
sent = drain(peer)
twin_a = engine(PyEngine, A, "10.244.2.0/24", peer.getsockname()[1], B)
twin_b = engine(PyEngine, B, "10.244.1.0/24", rx.getsockname()[1], A)
frames = twin_b.segment(super_packet("10.244.2.7", "10.244.1.9"))
for f in frames:
    peer.sendto(f, rx.getsockname())
received = a.drain_udp(64)
print(json.dumps({"before": before, "after": a.offloads(), "same_frames": sent == twin_a.segment(
    super_packet("10.244.1.7", "10.244.2.9")), "frames": len(frames), "received": received,
    "writes": len(drain(app)), "counters": a.counters()}))
"""


def test_sendmmsg_and_recvmmsg_refused_at_run_time():
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", REFUSED_AT_RUN_TIME], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert (r["before"]["sendmmsg"], r["before"]["recvmmsg"]) == (True, True)
    assert (r["after"]["sendmmsg"], r["after"]["recvmmsg"]) == (False, False)
    c = r["counters"]
    assert r["same_frames"] and c["tx_packets"] == 8 and c["tx_send_calls"] == 8 and c["drop_send_error"] == 0
    assert r["received"] == r["writes"] == c["rx_recv_calls"] == c["rx_packets"] == r["frames"]
