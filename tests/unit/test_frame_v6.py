"""IPv6 in the engines (dual stack, as flanneld's vxlan backend with EnableIPv6): the
compiled engine and the twin against each other byte for byte, and against scapy's
own VXLAN / Ethernet / IPv6 / ICMPv6 dissectors and checksums.

The cluster: the IPv6 network fd10:244::/56 in /64s beside 10.244.0.0/16 in /24s.
  us:    fd10:244:0:1::/64, IPv6 VTEP MAC 0e:66:66:66:66:01 (IPv4's 0e:11:22:33:44:55)
  peer:  fd10:244:0:2::/64 at [2001:db8::3]:8472 (VXLAN over IPv6), MAC 02:66:00:00:00:02
  peer3: fd10:244:0:3::/64 at 192.168.64.4:8472 (IPv6 inside VXLAN over IPv4)
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from enginekit import (
    ENGINE_CLASSES,
    ENGINE_IDS,
    OWN_MAC,
    PEER2_IP,
    PEER_IP,
    PEER_MAC,
    PEER_PORT,
    PEER_SUBNET,
    counter_delta,
    engine_args,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.inet6 import TCP, UDP, ICMPv6DestUnreach, ICMPv6EchoRequest, ICMPv6TimeExceeded, IPv6
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from udpflannel.core import offload
from udpflannel.core.frame import DELIVER, DROP, ICMP, SEND

OWN_MAC6 = bytes.fromhex("0e6666666601")
NET6, LEN6 = "fd10:244::/56", 64
OWN6 = "fd10:244:0:1::/64"
PEER6_SUBNET, PEER6_IP, PEER6_MAC = "fd10:244:0:2::/64", "2001:db8::3", bytes.fromhex("026600000002")
PEER3_SUBNET, PEER3_MAC = "fd10:244:0:3::/64", bytes.fromhex("026600000003")
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dual(**overrides) -> dict:
    return engine_args(network6=NET6, subnet_len6=LEN6, vtep_mac6=OWN_MAC6, **overrides)


def with_routes(engine):
    engine.set_subnet("10.244.1.0/24")
    engine.set_subnet(OWN6)
    engine.set_route(PEER_SUBNET, PEER_IP, PEER_PORT, PEER_MAC)
    engine.set_route(PEER6_SUBNET, PEER6_IP, PEER_PORT, PEER6_MAC)
    engine.set_route(PEER3_SUBNET, PEER2_IP, PEER_PORT, PEER3_MAC)
    return engine


def pair(**overrides):
    return tuple(with_routes(cls(**dual(**overrides))) for cls in ENGINE_CLASSES)


@pytest.fixture(params=ENGINE_CLASSES, ids=ENGINE_IDS)
def engine(request):
    return with_routes(request.param(**dual()))


def ping6(src: str, dst: str, payload: bytes = b"x" * 32, **fields) -> bytes:
    return bytes(IPv6(src=src, dst=dst, **fields) / ICMPv6EchoRequest(id=7, seq=1) / Raw(payload))


def frame(inner: bytes, *, dst_mac: bytes = OWN_MAC6, ethertype: int = 0x86DD, vni: int = 1) -> bytes:
    return bytes(VXLAN(vni=vni, flags=0x08) / Ether(dst=dst_mac, src=PEER6_MAC, type=ethertype)) + inner


def mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


# ---- TUN -> UDP ------------------------------------------------------------------

def test_an_ipv6_packet_is_framed_for_its_peer_over_ipv6_as_scapy_reads_it(engine):
    inner = ping6("fd10:244:0:1::5", "fd10:244:0:2::9")
    kind, data, dest = engine.encap(inner)
    assert (kind, dest) == (SEND, (PEER6_IP, PEER_PORT))
    v = VXLAN(data)
    assert v.vni == 1 and v.flags == 0x08
    eth = v[Ether]
    assert (eth.dst, eth.src, eth.type) == (mac(PEER6_MAC), mac(OWN_MAC6), 0x86DD)
    assert bytes(eth.payload) == inner


def test_ipv6_inside_vxlan_over_ipv4_where_the_route_says_so(engine):
    kind, data, dest = engine.encap(ping6("fd10:244:0:1::5", "fd10:244:0:3::1"))
    assert (kind, dest) == (SEND, (PEER2_IP, PEER_PORT))
    assert VXLAN(data)[Ether].dst == mac(PEER3_MAC)


def test_ipv4_frames_keep_their_own_mac_and_ethertype_beside_ipv6(engine):
    inner = bytes(IP(src="10.244.1.5", dst="10.244.2.7") / UDP(sport=1, dport=2) / Raw(b"hi"))
    kind, data, dest = engine.encap(inner)
    eth = VXLAN(data)[Ether]
    assert (kind, dest) == (SEND, (PEER_IP, PEER_PORT))
    assert (eth.dst, eth.src, eth.type) == (mac(PEER_MAC), mac(OWN_MAC), 0x0800)


def test_lookup_and_routes_of_both_families(engine):
    assert engine.lookup("fd10:244:0:2::1") == (PEER6_IP, PEER_PORT, PEER6_MAC)
    assert engine.lookup("fd10:244:0:4::1") is None
    assert engine.lookup("10.244.2.1") == (PEER_IP, PEER_PORT, PEER_MAC)
    assert engine.route_count() == 3
    assert engine.del_route(PEER6_SUBNET) is True
    assert engine.lookup("fd10:244:0:2::1") is None
    assert engine.del_route(PEER6_SUBNET) is False
    assert engine.lookup("10.244.2.1") is not None


@pytest.mark.parametrize("subnet, ip, framing", [
    ("fd10:244:0:2::/64", PEER6_IP, "udp"),           # flanneld's udp framing: IPv4 only
    ("10.244.2.0/24", PEER6_IP, "udp"),
    ("fd10:244:0:2::/60", PEER6_IP, "vxlan"),         # not a /64
    ("fd10:245::/64", PEER6_IP, "vxlan"),             # outside the network
    ("fd10:244:0:2::1/128", PEER6_IP, "vxlan"),
])
def test_set_route_refuses_ipv6_routes_that_cannot_be(engine, subnet, ip, framing):
    with pytest.raises(ValueError):
        engine.set_route(subnet, ip, PEER_PORT, PEER6_MAC if framing == "vxlan" else None, framing)


@pytest.mark.parametrize("cls", ENGINE_CLASSES, ids=ENGINE_IDS)
@pytest.mark.parametrize("args", [
    dict(network=None),                                     # neither family
    dict(network6="fd10:244::/56", subnet_len6=56),         # subnet no longer than the network
    dict(network6="fd10:244::/56", subnet_len6=127),
    dict(network6="::ffff:0:0/100", subnet_len6=120),       # the IPv4-mapped keys
    dict(network6="fd10:244::/56", subnet_len6=64, vtep_mac6=b"\x02"),
])
def test_constructor_refuses(cls, args):
    with pytest.raises(ValueError):
        cls(**engine_args(**args))


def test_no_route_inside_the_ipv6_network_is_answered_with_icmpv6_no_route(engine):
    inner = ping6("fd10:244:0:1::5", "fd10:244:0:7::1", b"q" * 2000)
    before = engine.counters()
    kind, reply, _ = engine.encap(inner)
    assert kind == ICMP
    assert counter_delta(before, engine.counters()) == {"icmp_unreachable": 1}
    ip6 = IPv6(reply)
    assert (ip6.src, ip6.dst, ip6.hlim, ip6.nh) == ("fd10:244:0:7::1", "fd10:244:0:1::5", 64, 58)
    err = ip6[ICMPv6DestUnreach]
    assert (err.type, err.code) == (1, 0)
    assert len(reply) == 1280  # as much of the packet as fits the minimum MTU
    assert reply[48:] == inner[:1232]
    resum = IPv6(reply)
    del resum[ICMPv6DestUnreach].cksum
    assert IPv6(bytes(resum))[ICMPv6DestUnreach].cksum == err.cksum  # scapy's own checksum


@pytest.mark.parametrize("inner, why", [
    (bytes(IPv6(src="fd10:244:0:1::5", dst="fd10:244:0:7::1") / ICMPv6DestUnreach() / Raw(b"x" * 48)),
     "an ICMPv6 error"),
    (bytes(IPv6(src="fd10:244:0:1::5", dst="fd10:244:0:7::1") / ICMPv6TimeExceeded() / Raw(b"x" * 48)),
     "an ICMPv6 error"),
    (ping6("::", "fd10:244:0:7::1"), "the unspecified source"),
    (ping6("ff02::1", "fd10:244:0:7::1"), "a multicast source"),
    (ping6("fd10:244:0:1::5", "fd10:245::1"), "outside the network"),
    (ping6("fd10:244:0:1::5", "ff02::2"), "multicast (a router solicitation)"),
])
def test_no_icmpv6_for(engine, inner, why):
    before = engine.counters()
    assert engine.encap(inner) == (DROP, "no_route", None), why
    assert counter_delta(before, engine.counters()) == {"drop_no_route": 1}


@pytest.mark.parametrize("cls", ENGINE_CLASSES, ids=ENGINE_IDS)
def test_families_the_network_does_not_carry_are_dropped(cls):
    v4_only = cls(**engine_args())
    v4_only.set_route(PEER_SUBNET, PEER_IP, PEER_PORT, PEER_MAC)
    assert v4_only.encap(ping6("fd10:244:0:1::5", "fd10:244:0:2::9")) == (DROP, "no_route", None)
    v6_only = with6(cls)
    inner4 = bytes(IP(src="10.244.1.5", dst="10.244.2.7") / UDP() / Raw(b"hi"))
    assert v6_only.encap(inner4) == (DROP, "no_route", None)
    framed4 = bytes(VXLAN(vni=1, flags=0x08) / Ether(dst=OWN_MAC, src=PEER6_MAC, type=0x0800)) + bytes(
        IP(src="10.244.2.7", dst="10.244.1.5") / UDP() / Raw(b"hi"))
    assert v6_only.decap(framed4, PEER6_IP) == (DROP, "ipv4", None)
    framed6 = frame(ping6("fd10:244:0:2::9", "fd10:244:0:1::5"), dst_mac=OWN_MAC)  # (its only MAC)
    assert v4_only.decap(framed6, PEER_IP) == (DROP, "ipv6", None)


def with6(cls):
    e = cls(**dual(network=None))
    e.set_route(PEER6_SUBNET, PEER6_IP, PEER_PORT, PEER6_MAC)
    return e


# ---- UDP -> TUN ------------------------------------------------------------------

def test_an_ipv6_frame_from_its_peer_is_delivered(engine):
    inner = ping6("fd10:244:0:2::9", "fd10:244:0:1::5")
    assert engine.decap(frame(inner), PEER6_IP) == (DELIVER, inner, None)
    assert engine.decap(frame(inner + b"pad"), PEER6_IP) == (DELIVER, inner, None)  # (trailing bytes cut)


@pytest.mark.parametrize("datagram, source, reason", [
    (frame(ping6("fd10:244:0:2::9", "fd10:244:0:1::5")), "2001:db8::99", "unknown_sender"),
    (frame(ping6("fd10:244:0:3::9", "fd10:244:0:1::5")), PEER6_IP, "spoofed"),       # peer3's pods
    (frame(ping6("fd10:244:0:7::9", "fd10:244:0:1::5")), PEER6_IP, "spoofed"),       # nobody's
    (frame(ping6("fd10:244:0:2::9", "fd10:244:0:3::5")), PEER6_IP, "bad_destination"),
    (frame(ping6("fd10:244:0:2::9", "ff02::1")), PEER6_IP, "bad_destination"),
    (frame(ping6("fd10:244:0:2::9", "fd10:244:0:1::5"), dst_mac=OWN_MAC), PEER6_IP, "bad_mac"),
    (frame(bytes(IP(src="10.244.2.7", dst="10.244.1.5") / UDP()), dst_mac=OWN_MAC6, ethertype=0x0800),
     PEER_IP, "bad_mac"),                                                           # IPv4 to the IPv6 MAC
    (frame(ping6("fd10:244:0:2::9", "fd10:244:0:1::5")[:60]), PEER6_IP, "bad_ip"),  # cut short
    (frame(b"\x45" + ping6("fd10:244:0:2::9", "fd10:244:0:1::5")[1:]), PEER6_IP, "bad_ip"),
])
def test_hostile_ipv6_frames_are_dropped_by_reason(datagram, source, reason):
    for e in pair():
        before = e.counters()
        assert e.decap(datagram, source) == (DROP, reason, None), type(e).__name__
        assert counter_delta(before, e.counters()) == {"drop_" + reason: 1}


def test_a_source_outside_the_overlay_is_routed_traffic_unless_strict():
    inner = ping6("2001:db8:aa::1", "fd10:244:0:1::5")
    for e in pair():
        assert e.decap(frame(inner), PEER6_IP)[0] == DELIVER
    for e in pair(strict_source=True):
        assert e.decap(frame(inner), PEER6_IP) == (DROP, "spoofed", None)


def test_flanneld_udp_framing_never_carries_ipv6():
    inner = ping6("fd10:244:0:2::9", "fd10:244:0:1::5")
    for e in pair():
        e.set_route("10.244.5.0/24", "192.168.64.5", 8285, framing="udp")
        assert e.decap_bare(inner, "192.168.64.5") == (DROP, "ipv6", None)


def test_an_unfinished_ipv6_tcp_checksum_from_a_kernel_sender_is_completed():
    good = bytes(IPv6(src="fd10:244:0:2::9", dst="fd10:244:0:1::5") / TCP(sport=5, dport=6, flags="PA")
                 / Raw(b"d" * 101))
    pkt = IPv6(good)
    partial = bytearray(good)
    pseudo = pseudo6(good, 6, len(good) - 40)
    struct.pack_into("!H", partial, 40 + 16, pseudo)
    for e in pair():
        before = e.counters()
        assert e.decap(frame(bytes(partial)), PEER6_IP) == (DELIVER, good, None)
        assert counter_delta(before, e.counters())["rx_csum_completed"] == 1
    assert pkt[TCP].chksum == struct.unpack_from("!H", good, 56)[0]


def pseudo6(packet: bytes, nh: int, length: int) -> int:
    words = packet[8:40] + struct.pack("!I3xB", length, nh)
    total = sum(struct.unpack(f"!{len(words) // 2}H", words))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


# ---- both engines agree on anything ----------------------------------------------

def addr6(subnet: str):
    net = ipaddress.IPv6Network(subnet)
    return st.integers(int(net.network_address), int(net.broadcast_address)).map(
        lambda i: str(ipaddress.IPv6Address(i)))


anywhere6 = st.one_of(addr6("fd10:244:0:1::/64"), addr6("fd10:244:0:2::/64"), addr6("fd10:244:0:3::/64"),
                      addr6("fd10:244:0:9::/64"), addr6("fd10:244::/48"), addr6("2001:db8::/64"),
                      st.sampled_from(["::", "ff02::1", "::1"]))


@st.composite
def packets6(draw):
    kind = draw(st.sampled_from(["tcp", "udp", "echo", "err", "raw"]))
    layer = {"tcp": lambda: TCP(sport=draw(st.integers(0, 65535)), dport=80, flags="PA"),
             "udp": lambda: UDP(sport=draw(st.integers(0, 65535)), dport=53),
             "echo": lambda: ICMPv6EchoRequest(),
             "err": lambda: ICMPv6DestUnreach(),
             "raw": lambda: Raw(b"")}[kind]()
    pkt = IPv6(src=draw(anywhere6), dst=draw(anywhere6), nh=59 if kind == "raw" else None,
               hlim=draw(st.integers(0, 255))) / layer / Raw(draw(st.binary(max_size=1500)))
    return bytes(pkt)


@SETTINGS
@given(packets6())
def test_encap_agrees(packet):
    compiled, twin = pair()
    assert compiled.encap(packet) == twin.encap(packet)
    assert compiled.counters() == twin.counters()
    assert compiled.flow_index(packet, 16) == twin.flow_index(packet, 16)


@SETTINGS
@given(packets6(), st.sampled_from([PEER6_IP, PEER2_IP, PEER_IP, "2001:db8::99"]),
       st.sampled_from([OWN_MAC6, OWN_MAC]), st.integers(0, 80), st.binary(max_size=8))
def test_decap_agrees(packet, source, dst_mac, cut, tail):
    compiled, twin = pair()
    datagram = frame(packet[:len(packet) - cut] + tail, dst_mac=dst_mac)
    assert compiled.decap(datagram, source) == twin.decap(datagram, source)
    assert compiled.counters() == twin.counters()


def test_flows_spread_over_source_ports_and_keep_one_each():
    compiled, twin = pair()
    seen = set()
    for port in range(200):
        p = bytes(IPv6(src="fd10:244:0:1::5", dst="fd10:244:0:2::9") / UDP(sport=port, dport=53))
        index = compiled.flow_index(p, 16)
        assert index == twin.flow_index(p, 16) == compiled.flow_index(p + b"more", 16)
        seen.add(index)
    assert len(seen) == 16


# ---- offloads: TCPv6 and UDPv6 super-packets from the TUN ------------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_an_ipv6_super_packet_is_cut_into_segments_scapy_accepts(proto):
    payload = bytes(range(256)) * 23  # 5888 bytes: 5 segments of 1300 and a short one
    l4 = TCP(sport=40000, dport=5201, seq=1000, flags="PA") if proto == "tcp" else UDP(sport=40000, dport=5201)
    packet = IPv6(src="fd10:244:0:1::5", dst="fd10:244:0:2::9") / l4 / Raw(payload)
    raw = bytearray(bytes(packet))
    hlen = 40 + (20 if proto == "tcp" else 8)
    gso = offload.GSO_TCPV6 if proto == "tcp" else offload.GSO_UDP_L4
    read = offload.vnet_header(offload.NEEDS_CSUM, gso, hlen, 1300, 40, 16 if proto == "tcp" else 6) + bytes(raw)
    compiled, twin = pair()
    frames = compiled.segment(read)
    assert frames == twin.segment(read)
    assert compiled.counters() == twin.counters()
    assert len(frames) == 5
    got = b""
    for i, f in enumerate(frames):
        eth = VXLAN(f)[Ether]
        assert eth.type == 0x86DD and eth.dst == mac(PEER6_MAC)
        seg = eth[IPv6]
        resum = IPv6(bytes(seg))
        layer = TCP if proto == "tcp" else UDP
        del resum[layer].chksum
        assert IPv6(bytes(resum))[layer].chksum == seg[layer].chksum  # scapy agrees
        assert seg.plen == len(bytes(seg)) - 40
        if proto == "tcp":
            assert seg[TCP].seq == 1000 + 1300 * i
            assert ("P" in seg[TCP].flags) == (i == 4)
        got += bytes(seg[layer].payload)
    assert got == payload


def test_gso_type_and_family_must_agree():
    v4 = bytes(IP(src="10.244.1.5", dst="10.244.2.9") / TCP(flags="A") / Raw(b"z" * 3000))
    v6 = bytes(IPv6(src="fd10:244:0:1::5", dst="fd10:244:0:2::9") / TCP(flags="A") / Raw(b"z" * 3000))
    for e in pair():
        assert e.segment(offload.vnet_header(0, offload.GSO_TCPV6, 40, 1000) + v4) == []
        assert e.segment(offload.vnet_header(0, offload.GSO_TCPV4, 40, 1000) + v6) == []
        assert e.counters()["drop_bad_offload"] == 2


def test_a_super_packet_for_nobody_gets_one_icmpv6_reply():
    v6 = bytes(IPv6(src="fd10:244:0:1::5", dst="fd10:244:0:7::9") / TCP(flags="A") / Raw(b"z" * 3000))
    read = offload.vnet_header(0, offload.GSO_TCPV6, 60, 1000) + v6
    compiled, twin = pair()
    out = compiled.segment(read)
    assert out == twin.segment(read)
    assert len(out) == 1 and out[0][:offload.VNET_HLEN] == offload.ZERO_VNET
    assert IPv6(out[0][offload.VNET_HLEN:])[ICMPv6DestUnreach].code == 0


# ---- offloads: TCPv6 segments coalesced into one TUN write -----------------------

def tcp6_segments(count: int, mss: int = 1200, seq: int = 5000, **ip_fields) -> list[bytes]:
    return [bytes(IPv6(src="fd10:244:0:2::9", dst="fd10:244:0:1::5", **ip_fields)
                  / TCP(sport=5201, dport=40000, seq=seq + i * mss, ack=77, flags="PA" if i == count - 1 else "A")
                  / Raw(bytes([i]) * mss)) for i in range(count)]


def test_tcpv6_segments_are_coalesced_into_one_gso_write_scapy_accepts():
    segments = tcp6_segments(10)
    compiled, twin = pair()
    writes = compiled.coalesce(segments)
    assert writes == twin.coalesce(segments)
    assert compiled.counters() == twin.counters()
    assert len(writes) == 1
    flags, gso, hlen, size, start, off = offload.parse_vnet(writes[0])
    assert (flags, gso, hlen, size, start, off) == (1, offload.GSO_TCPV6, 60, 1200, 40, 16)
    merged = IPv6(offload.complete_checksum(writes[0][offload.VNET_HLEN:], start, off))
    assert merged.plen == 20 + 12000
    assert bytes(merged[TCP].payload) == b"".join(bytes([i]) * 1200 for i in range(10))
    assert merged[TCP].seq == 5000 and "P" in merged[TCP].flags
    resum = IPv6(bytes(merged))
    del resum[TCP].chksum
    assert IPv6(bytes(resum))[TCP].chksum == merged[TCP].chksum


@pytest.mark.parametrize("breaker", ["flow label", "hop limit", "traffic class", "gap", "bad checksum"])
def test_tcpv6_runs_break_where_the_kernel_would_not_merge(breaker):
    segments = tcp6_segments(6)
    odd = IPv6(segments[3])
    if breaker == "flow label":
        odd.fl = 9
    elif breaker == "hop limit":
        odd.hlim = 3
    elif breaker == "traffic class":
        odd.tc = 4
    elif breaker == "gap":
        odd[TCP].seq += 1
    if breaker != "bad checksum":
        del odd[TCP].chksum
    raw = bytearray(bytes(odd))
    if breaker == "bad checksum":
        raw[-1] ^= 0xFF
    segments[3] = bytes(raw)
    compiled, twin = pair()
    writes = compiled.coalesce(segments)
    assert writes == twin.coalesce(segments)
    assert len(writes) >= 2


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from([4, 6]), st.integers(0, 3), st.integers(1, 1400)), max_size=24))
def test_coalesce_agrees_on_mixed_families(plan):
    packets, next_seq = [], {}
    for family, flow, size in plan:  # each flow's segments in sequence: runs do form
        l3 = (IP(src="10.244.2.9", dst="10.244.1.5") if family == 4
              else IPv6(src="fd10:244:0:2::9", dst="fd10:244:0:1::5"))
        seq = next_seq.get((family, flow), 1)
        next_seq[(family, flow)] = seq + size
        packets.append(bytes(l3 / TCP(sport=flow, dport=80, seq=seq, flags="A") / Raw(b"p" * size)))
    compiled, twin = pair()
    assert compiled.coalesce(packets) == twin.coalesce(packets)
    assert compiled.counters() == twin.counters()
