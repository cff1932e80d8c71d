"""Hostile input: property tests and one explicit case per drop reason.

For any bytes at all, both engines must not raise, must reach the same outcome
(same action and bytes, or the same drop reason), and must account for the call in
exactly one counter: rx_packets (and rx_bytes) for a delivery, else one drop_*.
"""

from __future__ import annotations

import struct

import pytest
from enginekit import OWN_MAC, PEER2_IP, PEER_IP, PEER_MAC, counter_delta, make_engines
from hypothesis import given, settings
from hypothesis import strategies as st

from udpflannel.core.wire import RX_DROPS, TX_DROPS

SETTINGS = settings(max_examples=400, deadline=None)

UNKNOWN_IP = "203.0.113.1"
SOURCES = st.sampled_from([PEER_IP, PEER2_IP, UNKNOWN_IP, "0.0.0.0", "10.244.2.1"])


def ip_header(src: str, dst: str, *, total: int, ver_ihl: int = 0x45, proto: int = 17,
              options: bytes = b"") -> bytes:
    """A hand-packed IPv4 header (checksum left 0: the engine does not check it)."""
    def a(s):
        return bytes(int(x) for x in s.split("."))
    return (bytes([ver_ihl, 0]) + struct.pack("!HHHBBH", total, 0x1234, 0, 64, proto, 0)
            + a(src) + a(dst) + options)


def inner(src: str = "10.244.2.7", dst: str = "10.244.1.5", payload: bytes = b"payload!") -> bytes:
    return ip_header(src, dst, total=20 + len(payload)) + payload


def vxlan(packet: bytes, *, head: bytes = b"\x08\x00\x00\x00", vni: bytes = b"\x00\x00\x01",
          tail: bytes = b"\x00", dst: bytes = OWN_MAC, src: bytes = PEER_MAC,
          ethertype: bytes = b"\x08\x00") -> bytes:
    return head + vni + tail + dst + src + ethertype + packet


VALID_INNER = inner()
VALID = vxlan(VALID_INNER)  # from PEER_IP: delivered


def check_decap(datagram: bytes, source: str):
    """Feed both engines; assert they agree and account for the call; return outcome."""
    c, py = make_engines(with_peers=True)
    before_c, before_py = c.counters(), py.counters()
    out_c = c.decap(datagram, source)
    out_py = py.decap(datagram, source)
    assert out_c == out_py, (datagram.hex(), source)
    d_c = counter_delta(before_c, c.counters())
    assert d_c == counter_delta(before_py, py.counters())
    kind, data, extra = out_c
    assert extra is None
    if kind == "deliver":
        assert d_c == {"rx_packets": 1, "rx_bytes": len(data)}
        assert data == datagram[22:22 + len(data)]
    else:
        assert kind == "drop"
        assert data in RX_DROPS
        assert d_c == {"drop_" + data: 1}
    return out_c


def check_encap(packet: bytes):
    c, py = make_engines(with_peers=True)
    before_c, before_py = c.counters(), py.counters()
    out_c, out_py = c.encap(packet), py.encap(packet)
    assert out_c == out_py, packet.hex()
    d_c = counter_delta(before_c, c.counters())
    assert d_c == counter_delta(before_py, py.counters())
    kind, data, addr = out_c
    if kind == "send":
        assert d_c == {"tx_packets": 1, "tx_bytes": len(packet)}
        assert data[22:] == packet and addr is not None
    elif kind == "icmp":
        assert d_c == {"icmp_unreachable": 1} and addr is None
    else:
        assert kind == "drop" and data in TX_DROPS and addr is None
        assert d_c == {"drop_" + data: 1}
    return out_c


# --- properties: decap ----------------------------------------------------------------

@SETTINGS
@given(data=st.binary(max_size=200), source=SOURCES)
def test_decap_random_bytes(data, source):
    check_decap(data, source)


@SETTINGS
@given(data=st.binary(min_size=42, max_size=120), source=SOURCES)
def test_decap_random_bytes_behind_a_valid_header(data, source):
    # Get past the VXLAN/MAC checks so the IP checks see random input.
    check_decap(VALID[:22] + data[22:], source)


@SETTINGS
@given(cut=st.integers(0, len(VALID) + 8), source=SOURCES)
def test_decap_truncations(cut, source):
    out = check_decap(VALID[:cut], source)
    if cut < len(VALID) and source == PEER_IP:
        assert out[0] == "drop"
        assert out[1] == ("short" if cut < 42 else "bad_ip")


@SETTINGS
@given(pos=st.integers(0, len(VALID) - 1), value=st.integers(0, 255), source=SOURCES)
def test_decap_single_byte_mutations(pos, value, source):
    mutated = bytearray(VALID)
    mutated[pos] = value
    check_decap(bytes(mutated), source)


@SETTINGS
@given(edits=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)),
                      min_size=1, max_size=6),
       extra=st.binary(max_size=16), source=SOURCES)
def test_decap_multi_byte_mutations(edits, extra, source):
    mutated = bytearray(VALID)
    for pos, value in edits:
        mutated[pos] = value
    check_decap(bytes(mutated) + extra, source)


# --- properties: encap ----------------------------------------------------------------

@SETTINGS
@given(data=st.binary(max_size=200))
def test_encap_random_bytes(data):
    check_encap(data)


@st.composite
def ipv4ish(draw):
    """Random bytes that look enough like IPv4 into the overlay to reach deep checks."""
    body = bytearray(draw(st.binary(min_size=20, max_size=120)))
    body[0] = 0x40 | draw(st.integers(0, 15))
    body[16:20] = bytes([10, 244, draw(st.sampled_from([1, 2, 3, 9, 255])),
                         draw(st.integers(0, 255))])
    if draw(st.booleans()):
        body[9] = 1  # ICMP
    if draw(st.booleans()):
        body[6:8] = b"\x00\x00"  # not a fragment
    return bytes(body)


@SETTINGS
@given(packet=ipv4ish())
def test_encap_random_ipv4ish(packet):
    check_encap(packet)


# --- one explicit case per drop reason --------------------------------------------------

DROP_CASES = {
    "short": [
        b"",
        VALID[:8],
        VALID[:22],
        VALID[:41],  # one byte less than VXLAN + Ethernet + a minimal IP header
    ],
    "bad_flags": [
        vxlan(VALID_INNER, head=b"\x00\x00\x00\x00"),  # I flag clear
        vxlan(VALID_INNER, head=b"\x0c\x00\x00\x00"),  # I + GPE-ish bit
        vxlan(VALID_INNER, head=b"\x88\x00\x00\x00"),  # GBP G bit
        vxlan(VALID_INNER, head=b"\x09\x00\x00\x00"),
        vxlan(VALID_INNER, head=b"\x08\x01\x00\x00"),  # reserved byte 1
        vxlan(VALID_INNER, head=b"\x08\x00\x80\x00"),  # reserved byte 2
        vxlan(VALID_INNER, head=b"\x08\x00\x00\x01"),  # reserved byte 3
        vxlan(VALID_INNER, tail=b"\x01"),  # reserved byte after the VNI
    ],
    "bad_vni": [
        vxlan(VALID_INNER, vni=b"\x00\x00\x02"),
        vxlan(VALID_INNER, vni=b"\x00\x00\x00"),
        vxlan(VALID_INNER, vni=b"\x01\x00\x01"),  # byte order matters
    ],
    "bad_mac": [
        vxlan(VALID_INNER, dst=bytes.fromhex("0e1122334456")),  # foreign
        vxlan(VALID_INNER, dst=b"\xff" * 6),  # broadcast
        vxlan(VALID_INNER, dst=bytes.fromhex("01005e000001")),  # multicast
        vxlan(VALID_INNER, dst=PEER_MAC, src=OWN_MAC),  # our own frame reflected
    ],
    "bad_ethertype": [
        vxlan(VALID_INNER, ethertype=b"\x08\x06"),  # ARP
        vxlan(VALID_INNER, ethertype=b"\x81\x00"),  # 802.1Q
        vxlan(VALID_INNER, ethertype=b"\x00\x08"),  # byte-swapped IPv4
        vxlan(VALID_INNER, ethertype=b"\x00\x00"),
    ],
    "bad_ip": [
        vxlan(ip_header("10.244.2.7", "10.244.1.5", total=28, ver_ihl=0x65) + b"x" * 8),
        vxlan(ip_header("10.244.2.7", "10.244.1.5", total=28, ver_ihl=0x44) + b"x" * 8),
        vxlan(ip_header("10.244.2.7", "10.244.1.5", total=28, ver_ihl=0x40) + b"x" * 8),
        vxlan(ip_header("10.244.2.7", "10.244.1.5", total=29) + b"x" * 8),  # total > datagram
        vxlan(ip_header("10.244.2.7", "10.244.1.5", total=0xFFFF) + b"x" * 8),
        vxlan(ip_header("10.244.2.7", "10.244.1.5", total=19) + b"x" * 8),  # total < ihl
        vxlan(ip_header("10.244.2.7", "10.244.1.5", total=0) + b"x" * 8),
        vxlan(ip_header("10.244.2.7", "10.244.1.5", total=23, ver_ihl=0x46,
                        options=b"\x01\x01\x01\x00") + b"x" * 8),  # total < 24-byte ihl
        vxlan(ip_header("10.244.2.7", "10.244.1.5", total=20, ver_ihl=0x4F)),  # ihl 60 > total
        # IPv6 ethertype with a v4 packet, and a truncated v6 packet
        vxlan(VALID_INNER + b"\0" * 20, ethertype=b"\x86\xdd"),
        vxlan(bytes([0x60]) + b"\0" * 24, ethertype=b"\x86\xdd"),
    ],
}


def _flat():
    for reason, datagrams in DROP_CASES.items():
        for i, d in enumerate(datagrams):
            yield pytest.param(d, PEER_IP, reason, id=f"{reason}-{i}")
    # source checks
    yield pytest.param(VALID, UNKNOWN_IP, "unknown_sender", id="unknown_sender-0")
    yield pytest.param(VALID, "10.244.2.7", "unknown_sender", id="unknown_sender-inner-addr")
    yield pytest.param(vxlan(inner(src="8.8.8.8")), UNKNOWN_IP, "unknown_sender",
                       id="unknown_sender-1")
    yield pytest.param(VALID, PEER2_IP, "spoofed", id="spoofed-other-peers-subnet")
    yield pytest.param(vxlan(inner(src="10.244.3.9")), PEER_IP, "spoofed", id="spoofed-0")
    yield pytest.param(vxlan(inner(src="10.244.1.9")), PEER_IP, "spoofed",
                       id="spoofed-our-own-subnet")
    yield pytest.param(vxlan(inner(src="10.244.77.1")), PEER_IP, "spoofed",
                       id="spoofed-unleased-subnet")
    yield pytest.param(vxlan(inner(src="10.244.0.9")), PEER_IP, "spoofed",
                       id="spoofed-zeroth-subnet")
    yield pytest.param(b"", PEER_IP, "short", id="short-empty")
    yield pytest.param(vxlan(bytes([0x60]) + b"\0" * 39, ethertype=b"\x86\xdd"), PEER_IP, "ipv6",
                       id="ipv6-from-a-known-peer")
    yield pytest.param(vxlan(bytes([0x60]) + b"\0" * 39, ethertype=b"\x86\xdd"), UNKNOWN_IP,
                       "unknown_sender", id="ipv6-from-a-stranger")


@pytest.mark.parametrize("datagram, source, reason", list(_flat()))
def test_each_drop_reason(engine, datagram, source, reason):
    before = engine.counters()
    assert engine.decap(datagram, source) == ("drop", reason, None)
    assert counter_delta(before, engine.counters()) == {"drop_" + reason: 1}


@pytest.mark.parametrize("datagram, source, reason", list(_flat()))
def test_each_drop_reason_engines_agree(datagram, source, reason):
    assert check_decap(datagram, source) == ("drop", reason, None)


@pytest.mark.parametrize("src", ["8.8.8.8", "192.168.64.9", "172.16.0.1"])
def test_routed_source_outside_the_overlay_is_delivered(src):
    """A pod talking to a host address gets the reply: the peer routes it back with
    the host's address as source."""
    datagram = vxlan(inner(src=src))
    for e in make_engines(with_peers=True):
        assert e.decap(datagram, PEER_IP) == ("deliver", datagram[22:], None)


@pytest.mark.parametrize("src", ["8.8.8.8", "10.244.3.9"])
def test_strict_source_refuses_every_foreign_source(src):
    for e in make_engines(with_peers=True, strict_source=True):
        assert e.decap(vxlan(inner(src=src)), PEER_IP) == ("drop", "spoofed", None)
        assert e.decap(VALID, PEER_IP)[0] == "deliver"


def test_valid_datagram_is_delivered(engine):
    assert engine.decap(VALID, PEER_IP) == ("deliver", VALID_INNER, None)
    assert engine.decap(vxlan(inner(src="10.244.3.200")), PEER2_IP)[0] == "deliver"


def test_minimal_datagram_is_delivered(engine):
    bare = ip_header("10.244.2.7", "10.244.1.5", total=20, proto=253)
    d = vxlan(bare)
    assert len(d) == 42
    assert engine.decap(d, PEER_IP) == ("deliver", bare, None)


def test_ip_options_are_delivered(engine):
    pkt = ip_header("10.244.2.7", "10.244.1.5", total=28, ver_ihl=0x46,
                    options=b"\x01\x01\x01\x00") + b"abcd"
    assert engine.decap(vxlan(pkt), PEER_IP) == ("deliver", pkt, None)


def test_source_mac_is_not_what_is_checked(engine):
    # Only the destination MAC is ours to check; the peer's MAC may differ from its lease.
    d = vxlan(VALID_INNER, src=bytes.fromhex("02deadbeef01"))
    assert engine.decap(d, PEER_IP) == ("deliver", VALID_INNER, None)


@pytest.mark.parametrize("pad", [1, 6, 18, 100])
def test_ethernet_padding_is_trimmed(engine, pad):
    before = engine.counters()
    out = engine.decap(VALID + b"\0" * pad, PEER_IP)
    assert out == ("deliver", VALID_INNER, None)
    assert counter_delta(before, engine.counters()) == {"rx_packets": 1,
                                                        "rx_bytes": len(VALID_INNER)}


def test_ethernet_min_frame_padding_is_trimmed(engine):
    # A 28-byte ping padded to Ethernet's 46-byte minimum payload by a sender's NIC.
    ping = ip_header("10.244.2.7", "10.244.1.5", total=28, proto=1) + b"\x08\0\xf7\xff\0\0\0\0"
    assert engine.decap(vxlan(ping + b"\0" * 18), PEER_IP) == ("deliver", ping, None)


@pytest.mark.parametrize("packet, reason", [
    (b"", "bad_packet"),
    (b"\x45" + b"\0" * 18, "bad_packet"),  # 19 bytes: shorter than an IP header
    (b"\x00" * 40, "bad_packet"),  # version 0
    (b"\x55" + b"\0" * 39, "bad_packet"),  # version 5
    (b"\x60" + b"\0" * 38, "bad_packet"),  # IPv6 shorter than its header
    (b"\x60" + b"\0" * 39, "no_route"),  # IPv6: the overlay is IPv4 only
])
def test_encap_drop_reasons(engine, packet, reason):
    before = engine.counters()
    assert engine.encap(packet) == ("drop", reason, None)
    assert counter_delta(before, engine.counters()) == {"drop_" + reason: 1}


def test_decap_many_calls_counters_add_up(engines):
    """After a mixed stream, rx_packets + all rx drops == number of decap calls."""
    stream = [VALID, VALID[:30], vxlan(VALID_INNER, vni=b"\0\0\2"), VALID + b"\0\0",
              vxlan(inner(src="10.244.3.1")), b"\xff" * 64]
    for e in engines:
        for d in stream:
            e.decap(d, PEER_IP)
        ctr = e.counters()
        assert ctr["rx_packets"] + sum(ctr["drop_" + r] for r in RX_DROPS) == len(stream)
        assert ctr["rx_packets"] == 2
        assert ctr["rx_bytes"] == 2 * len(VALID_INNER)
    assert engines[0].counters() == engines[1].counters()
