"""Golden frames, worked out by hand from RFC 7348 and RFC 792, as literal hex.

Nothing here is computed by udpflannel: every expected byte string below was written
out by hand (checksums included, with the arithmetic in the comments), and scapy is
used only as an independent check that the hand-made inputs are themselves valid.

Layout of a VXLAN datagram payload (what the engine produces / consumes; the outer
IPv4/UDP headers belong to the kernel socket):

    08 00 00 00 | VNI (3 bytes, big endian) | 00          VXLAN header, I flag set
    dst MAC (6) | src MAC (6) | 08 00                     inner Ethernet, IPv4
    the IP packet
"""

from __future__ import annotations

import pytest
from enginekit import PEER_IP, PEER_PORT, counter_delta, engine_args, make_engines
from scapy.layers.inet import ICMP, IP, UDP, IPerror, UDPerror
from scapy.utils import checksum


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# Our pod 10.244.1.5 pings the peer's pod 10.244.2.7 (ICMP echo request, id 1, seq 0).
# IP checksum: 4500+001c+0001+0000+4001+0af4+0105+0af4+0207 = 9e12 -> ~ = 61ed
# ICMP checksum: 0800+0000+0001+0000 = 0801 -> ~ = f7fe
PING = h("""
    45 00 00 1c  00 01 00 00  40 01 61 ed  0a f4 01 05  0a f4 02 07
    08 00 f7 fe  00 01 00 00
""")

# What goes into the UDP socket for PING, VNI 1:
ENCAP_VNI1 = h("""
    08 00 00 00  00 00 01  00
    c6 d2 32 6f 8f 44
    0e 11 22 33 44 55
    08 00
    45 00 00 1c  00 01 00 00  40 01 61 ed  0a f4 01 05  0a f4 02 07
    08 00 f7 fe  00 01 00 00
""")

# The same with VNI 0x0a0b0c (658188): the VNI is big endian in bytes 4..6.
ENCAP_VNI_0A0B0C = h("""
    08 00 00 00  0a 0b 0c  00
    c6 d2 32 6f 8f 44
    0e 11 22 33 44 55
    08 00
    45 00 00 1c  00 01 00 00  40 01 61 ed  0a f4 01 05  0a f4 02 07
    08 00 f7 fe  00 01 00 00
""")

# The peer's pod answers (echo reply, id 2): 10.244.2.7 -> 10.244.1.5.
# IP checksum: 4500+001c+0002+0000+4001+0af4+0207+0af4+0105 = 9e13 -> ~ = 61ec
# ICMP checksum: 0000+0000+0001+0000 = 0001 -> ~ = fffe
PONG = h("""
    45 00 00 1c  00 02 00 00  40 01 61 ec  0a f4 02 07  0a f4 01 05
    00 00 ff fe  00 01 00 00
""")

# ...as it arrives from 192.168.64.3: dst MAC = ours, src MAC = the peer's.
DECAP_IN = h("""
    08 00 00 00  00 00 01  00
    0e 11 22 33 44 55
    c6 d2 32 6f 8f 44
    08 00
    45 00 00 1c  00 02 00 00  40 01 61 ec  0a f4 02 07  0a f4 01 05
    00 00 ff fe  00 01 00 00
""")

# A UDP packet from our pod 10.244.1.5:12345 to 10.244.9.9:53, a subnet nobody holds.
# IP checksum: 4500+0020+0002+0000+4011+0af4+0105+0af4+0909 = a529 -> ~ = 5ad6
UNROUTED = h("""
    45 00 00 20  00 02 00 00  40 11 5a d6  0a f4 01 05  0a f4 09 09
    30 39 00 35  00 0c 00 00
    de ad be ef
""")

# ICMP net unreachable (type 3 code 0) from the TUN address 10.244.1.0 to 10.244.1.5,
# quoting the IP header and the first 8 bytes after it (not the payload de ad be ef).
# IP: total 20 + 8 + 28 = 56 = 0x38, id 0, no flags, TTL 64, proto 1.
#   checksum: 4500+0038+0000+0000+4001+0af4+0100+0af4+0105 = 9d26 -> ~ = 62d9
# ICMP checksum: 0300 + (quoted IP header, itself summing to ffff) + 3039+0035+000c+0000
#   = 0300 + ffff -> 0300 (end-around carry); + 3039 + 0035 + 000c = 337a -> ~ = cc85
# From the unreachable address itself (10.244.9.9): a reply from the TUN's own address
# (flannel's choice) is dropped by the receiving kernel as a martian. IP checksum
# 0x5ad0 worked out by hand from flannel's 0x62d9 with source 0af4 0100 -> 0af4 0909.
ICMP_REPLY = h("""
    45 00 00 38  00 00 00 00  40 01 5a d0  0a f4 09 09  0a f4 01 05
    03 00 cc 85  00 00 00 00
    45 00 00 20  00 02 00 00  40 11 5a d6  0a f4 01 05  0a f4 09 09
    30 39 00 35  00 0c 00 00
""")


def _ip_checksum_ok(packet: bytes) -> bool:
    ihl = (packet[0] & 0x0F) * 4
    return checksum(packet[:ihl]) == 0


# --- the hand-made inputs are sound (scapy's view) --------------------------------------

@pytest.mark.parametrize("packet", [PING, PONG, UNROUTED, ICMP_REPLY])
def test_hand_made_packets_have_valid_checksums(packet):
    assert _ip_checksum_ok(packet)
    p = IP(packet)
    assert p.len == len(packet)
    if p.proto == 1:
        assert checksum(bytes(p[ICMP])) == 0


# --- encap ------------------------------------------------------------------------------

def test_encap_golden_vni1(engine):
    before = engine.counters()
    assert engine.encap(PING) == ("send", ENCAP_VNI1, (PEER_IP, PEER_PORT))
    assert counter_delta(before, engine.counters()) == {"tx_packets": 1, "tx_bytes": 28}


def test_encap_golden_big_vni(engine_cls):
    e = engine_cls(**engine_args(vni=0x0A0B0C))
    e.set_route("10.244.2.0/24", "192.168.64.3", 8472, h("c6 d2 32 6f 8f 44"))
    assert e.encap(PING) == ("send", ENCAP_VNI_0A0B0C, ("192.168.64.3", 8472))


def test_encap_golden_max_vni_and_other_port(engine_cls):
    e = engine_cls(**engine_args(vni=(1 << 24) - 1))
    e.set_route("10.244.2.0/24", "203.0.113.9", 4789, h("c6 d2 32 6f 8f 44"))
    kind, frame, addr = e.encap(PING)
    assert kind == "send"
    assert addr == ("203.0.113.9", 4789)
    assert frame[:8] == h("08 00 00 00 ff ff ff 00")
    assert frame[8:] == ENCAP_VNI1[8:]


def test_encap_does_not_touch_the_inner_packet(engine):
    # TTL and checksum untouched: a VXLAN hop is a link, not a router.
    _, frame, _ = engine.encap(PING)
    assert frame[22:] == PING


# --- decap ------------------------------------------------------------------------------

def test_decap_golden(engine):
    before = engine.counters()
    assert engine.decap(DECAP_IN, "192.168.64.3") == ("deliver", PONG, None)
    assert counter_delta(before, engine.counters()) == {"rx_packets": 1, "rx_bytes": 28}


def test_decap_of_encap_output_is_rejected_by_sender(engine):
    # Our own encap output is addressed to the peer's MAC: we must not accept it.
    kind, reason, _ = engine.decap(ENCAP_VNI1, "192.168.64.3")
    assert (kind, reason) == ("drop", "bad_mac")


def test_round_trip_between_two_nodes(engine_cls):
    """Node A encaps, node B (holding A's subnet as a route) decaps the same bytes."""
    mac_a, mac_b = h("0e 11 22 33 44 55"), h("c6 d2 32 6f 8f 44")
    a = engine_cls(**engine_args(vtep_mac=mac_a))
    b = engine_cls(**engine_args(vtep_mac=mac_b))
    a.set_route("10.244.2.0/24", "192.168.64.3", 8472, mac_b)
    b.set_route("10.244.1.0/24", "192.168.64.2", 8472, mac_a)
    kind, frame, addr = a.encap(PING)
    assert (kind, addr) == ("send", ("192.168.64.3", 8472))
    assert b.decap(frame, "192.168.64.2") == ("deliver", PING, None)


# --- ICMP net unreachable ----------------------------------------------------------------

def test_icmp_net_unreachable_golden(engine):
    before = engine.counters()
    assert engine.encap(UNROUTED) == ("icmp", ICMP_REPLY, None)
    assert counter_delta(before, engine.counters()) == {"icmp_unreachable": 1}


def test_icmp_net_unreachable_verified_by_scapy(engine):
    kind, reply, _ = engine.encap(UNROUTED)
    assert kind == "icmp"
    p = IP(reply)
    assert (p.version, p.ihl, p.proto, p.ttl, p.len) == (4, 5, 1, 64, len(reply))
    assert (p.src, p.dst) == ("10.244.9.9", "10.244.1.5")
    # checksums: recompute with scapy and compare with what the engine wrote
    ip_chk, icmp_chk = p.chksum, p[ICMP].chksum
    q = IP(reply)
    del q.chksum
    del q[ICMP].chksum
    q = IP(bytes(q))
    assert (q.chksum, q[ICMP].chksum) == (ip_chk, icmp_chk)
    assert (p[ICMP].type, p[ICMP].code) == (3, 0)
    assert p.haslayer(IPerror) and p.haslayer(UDPerror)
    assert (p[IPerror].src, p[IPerror].dst) == ("10.244.1.5", "10.244.9.9")
    assert (p[UDPerror].sport, p[UDPerror].dport) == (12345, 53)
    assert bytes(p[ICMP].payload) == UNROUTED[:28]


def test_icmp_quotes_ip_options_plus_8_bytes(engine):
    # ihl = 6 (one 4-byte option: NOP NOP NOP EOL), then UDP: quote 24 + 8 bytes.
    original = IP(src="10.244.1.5", dst="10.244.77.1", options=b"\x01\x01\x01\x00") / \
        UDP(sport=1000, dport=2000) / (b"x" * 40)
    raw = bytes(original)
    assert raw[0] == 0x46
    kind, reply, _ = engine.encap(raw)
    assert kind == "icmp"
    p = IP(reply)
    assert p.len == len(reply) == 20 + 8 + 24 + 8
    assert reply[28:] == raw[:32]
    assert checksum(reply[:20]) == 0 and checksum(reply[20:]) == 0


def test_icmp_quotes_whole_packet_when_shorter_than_ihl_plus_8(engine):
    # a 24-byte packet (IP header + 4 bytes): everything is quoted
    raw = bytes(IP(src="10.244.1.5", dst="10.244.77.1", proto=253) / b"abcd")
    kind, reply, _ = engine.encap(raw)
    assert kind == "icmp"
    assert reply[28:] == raw
    assert checksum(reply[:20]) == 0 and checksum(reply[20:]) == 0


def test_icmp_checksum_with_odd_quoted_length(engine):
    raw = bytes(IP(src="10.244.1.5", dst="10.244.77.1", proto=253) / b"abc")  # 23 bytes
    kind, reply, _ = engine.encap(raw)
    assert kind == "icmp"
    assert reply[28:] == raw
    assert checksum(reply[20:]) == 0


@pytest.mark.parametrize("packet", [
    pytest.param(bytes(IP(src="10.244.1.5", dst="10.244.9.9") / ICMP(type=3, code=1) /
                       bytes(IP(src="10.244.9.9", dst="10.244.1.5") / UDP())),
                 id="icmp-dest-unreachable"),
    pytest.param(bytes(IP(src="10.244.1.5", dst="10.244.9.9") / ICMP(type=11) /
                       bytes(IP(src="10.244.9.9", dst="10.244.1.5") / UDP())),
                 id="icmp-time-exceeded"),
    pytest.param(bytes(IP(src="10.244.1.5", dst="10.244.9.9", frag=185) / (b"z" * 16)),
                 id="non-first-fragment"),
    pytest.param(bytes(IP(src="10.244.1.5", dst="8.8.8.8") / UDP()), id="outside-overlay"),
])
def test_no_icmp_for_errors_fragments_or_foreign_destinations(engine, packet):
    before = engine.counters()
    assert engine.encap(packet) == ("drop", "no_route", None)
    assert counter_delta(before, engine.counters()) == {"drop_no_route": 1}


@pytest.mark.parametrize("packet", [
    pytest.param(bytes(IP(src="10.244.1.5", dst="10.244.9.9") / ICMP(type=8)), id="echo"),
    pytest.param(bytes(IP(src="10.244.1.5", dst="10.244.9.9", flags="MF") / (b"z" * 16)),
                 id="first-fragment"),
])
def test_icmp_for_echo_and_first_fragment(engine, packet):
    kind, reply, _ = engine.encap(packet)
    assert kind == "icmp"
    assert IP(reply)[ICMP].type == 3


def test_engines_agree_on_golden_cases():
    c, py = make_engines(with_peers=True)
    for packet in (PING, UNROUTED):
        assert c.encap(packet) == py.encap(packet)
    assert c.decap(DECAP_IN, "192.168.64.3") == py.decap(DECAP_IN, "192.168.64.3")
    assert c.counters() == py.counters()
