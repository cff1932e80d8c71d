"""Compiled engine vs Python twin vs scapy's independent VXLAN/Ethernet/IP dissectors.

Random inner packets are built with scapy, framed by both engines (which must agree
byte for byte) and parsed back with scapy's ``VXLAN`` layer; and the other way round,
scapy-built VXLAN frames must be unwrapped by both engines to exactly the inner IP.
"""

from __future__ import annotations

import ipaddress

from enginekit import OWN_MAC, PEER2_IP, PEER2_MAC, PEER_IP, PEER_MAC, PEER_PORT, engine_args, make_engines
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def mac_str(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def addr_in(subnet: str):
    net = ipaddress.IPv4Network(subnet)
    return st.integers(int(net.network_address), int(net.broadcast_address)).map(
        lambda i: str(ipaddress.IPv4Address(i)))


PEERS = {  # subnet -> (public IP, MAC)
    "10.244.2.0/24": (PEER_IP, PEER_MAC),
    "10.244.3.0/24": (PEER2_IP, PEER2_MAC),
}

payloads = st.binary(max_size=1400)


@st.composite
def l4(draw):
    kind = draw(st.sampled_from(["tcp", "udp", "icmp"]))
    if kind == "tcp":
        layer = TCP(sport=draw(st.integers(0, 65535)), dport=draw(st.integers(0, 65535)),
                    seq=draw(st.integers(0, 2**32 - 1)),
                    flags=draw(st.sampled_from(["S", "SA", "A", "PA", "FA", "R"])))
    elif kind == "udp":
        layer = UDP(sport=draw(st.integers(0, 65535)), dport=draw(st.integers(0, 65535)))
    else:
        layer = ICMP(type=draw(st.sampled_from([0, 8])), id=draw(st.integers(0, 65535)),
                     seq=draw(st.integers(0, 65535)))
    data = draw(payloads)
    return layer / Raw(data) if data else layer


@st.composite
def inner_ip(draw, src_subnet: str, dst_subnet: str):
    options = draw(st.sampled_from([b"", b"\x01\x01\x01\x00", b"\x01" * 8]))
    ip = IP(src=draw(addr_in(src_subnet)), dst=draw(addr_in(dst_subnet)),
            ttl=draw(st.integers(1, 255)), tos=draw(st.integers(0, 255)),
            id=draw(st.integers(0, 65535)), flags=draw(st.sampled_from([0, 2])),
            options=options)
    return ip / draw(l4())


# --- encap: TUN -> UDP ----------------------------------------------------------------

@SETTINGS
@given(dst_subnet=st.sampled_from(sorted(PEERS)), data=st.data())
def test_encap_matches_scapy(dst_subnet, data):
    pkt = data.draw(inner_ip("10.244.1.0/24", dst_subnet))
    raw = bytes(pkt)
    c, py = make_engines(with_peers=True)
    out_c, out_py = c.encap(raw), py.encap(raw)
    assert out_c == out_py
    kind, frame, addr = out_c
    public_ip, mac = PEERS[dst_subnet]
    assert kind == "send"
    assert addr == (public_ip, PEER_PORT)
    v = VXLAN(frame)
    assert int(v.flags) == 0x08
    assert v.reserved1 == 0 and v.reserved2 == 0
    assert v.vni == 1
    eth = v[Ether]
    assert eth.dst == mac_str(mac)
    assert eth.src == mac_str(OWN_MAC)
    assert eth.type == 0x0800
    assert bytes(eth.payload) == raw
    assert eth[IP].src == pkt.src and eth[IP].dst == pkt.dst
    assert len(frame) == 8 + 14 + len(raw)
    assert c.counters() == py.counters()
    assert c.counters()["tx_bytes"] == len(raw)


@SETTINGS
@given(vni=st.integers(1, (1 << 24) - 1), own=st.binary(min_size=6, max_size=6),
       peer=st.binary(min_size=6, max_size=6), port=st.integers(1, 65535), data=st.data())
def test_encap_vni_and_macs_match_scapy(vni, own, peer, port, data):
    pkt = data.draw(inner_ip("10.244.1.0/24", "10.244.200.0/24"))
    raw = bytes(pkt)
    c, py = make_engines(vni=vni, vtep_mac=own)
    for e in (c, py):
        e.set_route("10.244.200.0/24", "198.51.100.7", port, peer)
    out = c.encap(raw)
    assert out == py.encap(raw)
    assert out[0] == "send" and out[2] == ("198.51.100.7", port)
    v = VXLAN(out[1])
    assert v.vni == vni and int(v.flags) == 0x08
    assert (v[Ether].dst, v[Ether].src, v[Ether].type) == (mac_str(peer), mac_str(own), 0x0800)
    assert bytes(v[Ether].payload) == raw


def test_encap_ipv6_is_not_routed(engines):
    raw = bytes(IPv6(src="fc00::1", dst="fc00::2") / UDP() / b"hello")
    outs = [e.encap(raw) for e in engines]
    assert outs[0] == outs[1] == ("drop", "no_route", None)


# --- decap: UDP -> TUN ----------------------------------------------------------------

@SETTINGS
@given(src_subnet=st.sampled_from(sorted(PEERS)), pad=st.binary(max_size=40), data=st.data())
def test_decap_scapy_frames(src_subnet, pad, data):
    pkt = data.draw(inner_ip(src_subnet, "10.244.1.0/24"))
    public_ip, mac = PEERS[src_subnet]
    frame = VXLAN(vni=1, flags=0x08) / Ether(dst=mac_str(OWN_MAC), src=mac_str(mac)) / pkt
    datagram = bytes(frame) + pad  # trailing Ethernet padding must be trimmed
    c, py = make_engines(with_peers=True)
    out_c, out_py = c.decap(datagram, public_ip), py.decap(datagram, public_ip)
    assert out_c == out_py
    assert out_c == ("deliver", bytes(pkt), None)
    assert IP(out_c[1]).src == pkt.src
    assert c.counters() == py.counters()
    assert c.counters()["rx_packets"] == 1
    assert c.counters()["rx_bytes"] == len(bytes(pkt))


@SETTINGS
@given(src_subnet=st.sampled_from(sorted(PEERS)), data=st.data())
def test_decap_scapy_frame_from_the_wrong_peer_is_spoofed(src_subnet, data):
    pkt = data.draw(inner_ip(src_subnet, "10.244.1.0/24"))
    other = PEER2_IP if src_subnet == "10.244.2.0/24" else PEER_IP
    _, mac = PEERS[src_subnet]
    datagram = bytes(VXLAN(vni=1, flags=0x08) /
                     Ether(dst=mac_str(OWN_MAC), src=mac_str(mac)) / pkt)
    c, py = make_engines(with_peers=True)
    assert c.decap(datagram, other) == py.decap(datagram, other) == ("drop", "spoofed", None)
    assert c.counters() == py.counters()


@SETTINGS
@given(vni=st.integers(1, (1 << 24) - 1), wrong=st.integers(0, (1 << 24) - 1), data=st.data())
def test_decap_scapy_vni(vni, wrong, data):
    pkt = data.draw(inner_ip("10.244.2.0/24", "10.244.1.0/24"))
    c, py = make_engines(vni=vni, with_peers=True)
    good = bytes(VXLAN(vni=vni, flags=0x08) /
                 Ether(dst=mac_str(OWN_MAC), src=mac_str(PEER_MAC)) / pkt)
    bad = bytes(VXLAN(vni=wrong, flags=0x08) /
                Ether(dst=mac_str(OWN_MAC), src=mac_str(PEER_MAC)) / pkt)
    assert c.decap(good, PEER_IP) == py.decap(good, PEER_IP) == ("deliver", bytes(pkt), None)
    expected = ("deliver", bytes(pkt), None) if wrong == vni else ("drop", "bad_vni", None)
    assert c.decap(bad, PEER_IP) == py.decap(bad, PEER_IP) == expected


def test_decap_scapy_ipv6_inner_is_not_delivered(engines):
    inner = IPv6(src="fc00::1", dst="fc00::2") / UDP() / b"hello"
    datagram = bytes(VXLAN(vni=1, flags=0x08) /
                     Ether(dst=mac_str(OWN_MAC), src=mac_str(PEER_MAC)) / inner)
    outs = [e.decap(datagram, PEER_IP) for e in engines]
    assert outs[0] == outs[1]
    assert outs[0][0] == "drop"
    assert engines[0].counters() == engines[1].counters()
    assert engines[0].counters()["rx_packets"] == 0


def test_encap_then_scapy_rewrap_then_decap(engine_cls):
    """Engine A frames, scapy re-parses and re-serialises, engine B unwraps."""
    a = engine_cls(**engine_args())
    b = engine_cls(**engine_args(vtep_mac=PEER_MAC))
    a.set_route("10.244.2.0/24", PEER_IP, PEER_PORT, PEER_MAC)
    b.set_route("10.244.1.0/24", "192.168.64.2", PEER_PORT, OWN_MAC)
    pkt = IP(src="10.244.1.9", dst="10.244.2.200") / TCP(dport=80, flags="S") / b"GET /"
    kind, frame, _ = a.encap(bytes(pkt))
    assert kind == "send"
    again = bytes(VXLAN(frame))
    assert again == frame
    assert b.decap(again, "192.168.64.2") == ("deliver", bytes(pkt), None)
