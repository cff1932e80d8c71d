"""Segmentation (TUN TSO reads) and coalescing (TUN GSO writes): compiled engine vs
its pure twin vs scapy's checksums and fields."""

from __future__ import annotations

import random
import struct

import pytest
from enginekit import make_engines
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from udpflannel.core import offload, wire
from udpflannel.core.offload import GSO_NONE, GSO_TCPV4, NEEDS_CSUM, VNET_HLEN, vnet_header

SRC, DST = "10.244.1.7", "10.244.2.9"


def tcp_packet(payload: bytes, *, seq=1000, flags="A", options=(), ip_id=7, ack=55,
               sport=40000, dport=5201, ip_options=None) -> bytes:
    ip = IP(src=SRC, dst=DST, id=ip_id, flags="DF")
    if ip_options:
        ip.options = ip_options
    return bytes(ip / TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags,
                          options=list(options), window=512) / Raw(payload))


def super_packet(raw: bytes, mss: int) -> bytes:
    """What a TUN with TSO hands us: checksums not done, a TCPV4 virtio header."""
    ihl = (raw[0] & 0x0F) * 4
    thl = (raw[ihl + 12] >> 4) * 4
    return vnet_header(NEEDS_CSUM, GSO_TCPV4, ihl + thl, mss, ihl, 16) + raw


def both(method, data):
    compiled, twin = make_engines(with_peers=True)
    outs = [getattr(e, method)(data) for e in (compiled, twin)]
    assert outs[0] == outs[1]
    assert compiled.counters() == twin.counters()
    return outs[0], compiled.counters()


def assert_checksums_valid(packet: bytes) -> IP:
    parsed = IP(packet)
    again = parsed.copy()
    del again.chksum
    if again.haslayer(TCP):
        del again[TCP].chksum
    assert bytes(IP(bytes(again))) == packet, "scapy recomputes different checksums"
    return parsed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(0, 30000), mss=st.integers(64, 9000),
       seq=st.integers(0, 2**32 - 1), ip_id=st.integers(0, 65535),
       flags=st.sampled_from(["A", "PA", "FA", "FPA"]),
       timestamps=st.booleans())
def test_segmentation_matches_twin_and_scapy(size, mss, seq, ip_id, flags, timestamps):
    payload = random.Random(size).randbytes(size)
    options = [("NOP", None), ("NOP", None), ("Timestamp", (123, 456))] if timestamps else []
    raw = tcp_packet(payload, seq=seq, flags=flags, options=options, ip_id=ip_id)
    frames, counters = both("segment", super_packet(raw, mss))
    assert len(frames) == max(1, -(-size // mss))
    assert counters["tx_super_packets"] == 1 and counters["tx_packets"] == len(frames)
    data = b""
    for i, frame in enumerate(frames):
        vx = VXLAN(frame)
        assert vx.vni == 1 and vx.flags == 0x08
        ip = assert_checksums_valid(bytes(vx[IP]))
        tcp = ip[TCP]
        last = i == len(frames) - 1
        assert ip.id == (ip_id + i) & 0xFFFF and ip.flags == "DF"
        assert tcp.seq == (seq + i * mss) & 0xFFFFFFFF and tcp.ack == 55
        assert str(tcp.flags) == (flags if last else "A")
        assert len(bytes(tcp.payload)) == (size - i * mss if last else mss) or size == 0
        assert tcp.options == IP(raw)[TCP].options
        data += bytes(tcp.payload) if tcp.payload else b""
    assert data == payload


def test_needs_csum_packets_are_completed():
    for l4 in (TCP(sport=1, dport=2, flags="S"), UDP(sport=53, dport=53)):
        pkt = bytes(IP(src=SRC, dst=DST) / l4 / Raw(b"odd-length payload!"))
        offset = 16 if l4.name == "TCP" else 6
        partial = bytearray(pkt)
        pseudo = wire.pseudo4_sum(pkt[:20], pkt[9], len(pkt) - 20)
        struct.pack_into("!H", partial, 20 + offset, pseudo)
        frames, _ = both("segment", vnet_header(NEEDS_CSUM, GSO_NONE, 0, 0, 20, offset) + bytes(partial))
        assert bytes(VXLAN(frames[0])[IP]) == pkt


@pytest.mark.parametrize("data", [
    b"\x01\x00",  # shorter than a virtio header
    vnet_header(0, 3) + tcp_packet(b"x" * 100),  # UDP GSO: not asked for, refused
    vnet_header(0, GSO_TCPV4, 40, 1400) + bytes(IP(src=SRC, dst=DST) / UDP() / Raw(b"x" * 100)),
    vnet_header(0, GSO_TCPV4, 40, 0, 20, 16) + tcp_packet(b"x" * 100),  # gso_size 0
    vnet_header(NEEDS_CSUM, GSO_NONE, 0, 0, 200, 16) + tcp_packet(b"x"),  # offsets outside
    vnet_header(0, GSO_TCPV4, 40, 1400) + tcp_packet(b"x" * 100)[:30],  # truncated header
])
def test_bad_offload_input_is_dropped_and_counted(data):
    frames, counters = both("segment", data)
    assert frames == [] and counters["drop_bad_offload"] == 1


def test_unroutable_super_packet_gets_one_icmp_reply():
    raw = bytes(IP(src=SRC, dst="10.244.99.1") / TCP(flags="A") / Raw(b"z" * 5000))
    frames, counters = both("segment", super_packet(raw, 1400))
    assert len(frames) == 1 and frames[0][:VNET_HLEN] == bytes(VNET_HLEN)
    reply = IP(frames[0][VNET_HLEN:])
    assert (reply.proto, reply[1].type, reply[1].code) == (1, 3, 0)
    assert counters["icmp_unreachable"] == 1 and counters["tx_super_packets"] == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 255), st.integers(0, 255))
def test_random_reads_never_raise_and_engines_agree(body, flags, gso_type):
    header = vnet_header(flags, gso_type, 40, 536, 20, 16)
    both("segment", header + bytes(IP(src=SRC, dst=DST) / TCP()) + body)
    both("segment", body)


# --- coalescing ----------------------------------------------------------------------

def segments_of(payload: bytes, mss: int, **kw) -> list[bytes]:
    frames, _ = both("segment", super_packet(tcp_packet(payload, **kw), mss))
    return [bytes(VXLAN(f)[IP]) for f in frames]


def complete(write: bytes) -> bytes:
    """What the kernel does with a NEEDS_CSUM GSO write: finish the checksum."""
    flags, gso, _hlen, _size, start, off = offload.parse_vnet(write)
    assert flags == NEEDS_CSUM and gso == GSO_TCPV4
    return offload.complete_checksum(write[VNET_HLEN:], start, off)


@settings(max_examples=100, deadline=None)
@given(size=st.integers(1, 60000), mss=st.integers(200, 1448), psh=st.booleans())
def test_segments_coalesce_back_into_the_super_packet(size, mss, psh):
    payload = random.Random(size).randbytes(size)
    segs = segments_of(payload, mss, flags="PA" if psh else "A")
    writes, counters = both("coalesce", segs)
    if len(segs) == 1:
        assert writes == [bytes(VNET_HLEN) + segs[0]]
        return
    runs = [segs[i:i + offload.MAX_MERGE] for i in range(0, len(segs), offload.MAX_MERGE)]
    assert len(writes) == len(runs)
    data = b""
    for write, run in zip(writes, runs):
        if len(run) == 1:
            assert write == bytes(VNET_HLEN) + run[0]
            data += bytes(IP(run[0])[TCP].payload)
            continue
        _flags, _gso, hlen, gso_size, start, off = offload.parse_vnet(write)
        assert (hlen, gso_size, start, off) == (40, mss, 20, 16)
        merged = assert_checksums_valid(complete(write))
        last = write is writes[-1]
        assert str(merged[TCP].flags) == ("PA" if psh and last else "A")
        assert merged.id == IP(run[0]).id
        data += bytes(merged[TCP].payload)
    assert data == payload
    assert counters["rx_merged_writes"] == sum(len(r) > 1 for r in runs)


def test_coalescing_keeps_flows_apart_and_respects_boundaries():
    a = segments_of(b"a" * 4000, 1000, sport=1111)
    b = segments_of(b"b" * 4000, 1000, sport=2222)
    interleaved = [a[0], a[1], b[0], b[1], a[2], a[3], b[2], b[3]]
    writes, _ = both("coalesce", interleaved)
    sizes = [len(w) - VNET_HLEN for w in writes]
    assert sizes == [2040] * 4  # each run of two segments of one flow merged, in order
    assert [IP(complete(w))[TCP].sport for w in writes] == [1111, 2222, 1111, 2222]


@pytest.mark.parametrize("mutate, expect_writes", [
    (lambda s: [s[0], s[2]], 2),                           # a gap in sequence numbers
    (lambda s: s[:1] + [_with_flags(s[1], "PA")] + s[2:], 2),  # PSH ends the run
    (lambda s: [_with_flags(s[0], "SA")] + s[1:], 2),      # SYN is never merged
    (lambda s: s[:1] + [_corrupt(s[1])] + s[2:], 3),        # bad checksum: left alone
    (lambda s: [s[0], _with_ack(s[1], 99)], 2),            # a new ACK number
    (lambda s: [s[0][:-500] + b"", s[1]], 2),              # length field disagrees: left alone
])
def test_coalescing_refuses_what_is_unsafe(mutate, expect_writes):
    segs = segments_of(bytes(3000), 1000)
    writes, _ = both("coalesce", mutate(segs))
    assert len(writes) == expect_writes


def test_ip_options_and_fragments_are_not_merged():
    opts = segments_of(bytes(2000), 1000, ip_options=[b"\x01\x01\x01\x00"])
    writes, _ = both("coalesce", opts)
    assert len(writes) == 2 and all(w[:VNET_HLEN] == bytes(VNET_HLEN) for w in writes)
    frag = [bytes(IP(src=SRC, dst=DST, flags="MF") / Raw(b"x" * 100))] * 2
    assert len(both("coalesce", frag)[0]) == 2


def _with_flags(packet: bytes, flags: str) -> bytes:
    p = IP(packet)
    p[TCP].flags = flags
    del p.chksum, p[TCP].chksum
    return bytes(p)


def _with_ack(packet: bytes, ack: int) -> bytes:
    p = IP(packet)
    p[TCP].ack = ack
    del p.chksum, p[TCP].chksum
    return bytes(p)


def _corrupt(packet: bytes) -> bytes:
    return packet[:-1] + bytes([packet[-1] ^ 0xFF])



@settings(max_examples=100, deadline=None)
@given(size=st.integers(0, 20000), gso=st.integers(8, 8000), ip_id=st.integers(0, 65535))
def test_udp_super_packets_become_datagrams(size, gso, ip_id):
    """USO: a UDP super-packet (a sender's UDP_SEGMENT) becomes one datagram per
    gso_size bytes, each with its own IPv4 id/length/checksum and UDP length/checksum."""
    payload = random.Random(size).randbytes(size)
    raw = bytes(IP(src=SRC, dst=DST, id=ip_id) / UDP(sport=4433, dport=443) / Raw(payload))
    frames, counters = both("segment", vnet_header(NEEDS_CSUM, offload.GSO_UDP_L4, 28, gso, 20, 6) + raw)
    assert len(frames) == max(1, -(-size // gso)) and counters["tx_super_packets"] == 1
    data = b""
    for i, frame in enumerate(frames):
        ip = assert_checksums_valid_udp(bytes(VXLAN(frame)[IP]))
        assert ip.id == (ip_id + i) & 0xFFFF and (ip[UDP].sport, ip[UDP].dport) == (4433, 443)
        chunk = bytes(ip[UDP].payload)
        assert ip[UDP].len == 8 + len(chunk) and len(chunk) == min(gso, size - i * gso)
        data += chunk
    assert data == payload


def assert_checksums_valid_udp(packet: bytes) -> IP:
    parsed = IP(packet)
    again = parsed.copy()
    del again.chksum, again[UDP].chksum
    rebuilt = IP(bytes(again))
    expected = rebuilt[UDP].chksum or 0xFFFF  # scapy writes 0 as FFFF too; keep it explicit
    assert (parsed.chksum, parsed[UDP].chksum) == (rebuilt.chksum, expected)
    return parsed
