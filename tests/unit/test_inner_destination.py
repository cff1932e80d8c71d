"""A received packet must be for a host of this node's subnet, on both framings: no
peer (or anyone spoofing one) may use a node as a router to its host, to other
subnets, to broadcast or multicast addresses. And flanneld's udp framing lowers the
TTL without laundering a corrupt header checksum. Both engines, byte for byte."""

from __future__ import annotations

import pytest
from enginekit import PEER_IP, PEER_MAC, PEER_PORT, PEER_SUBNET, counter_delta, make_engines
from test_decap_props import inner, vxlan

from udpflannel.core.wire import inet_checksum

OWN_SUBNET = "10.244.1.0/24"


def with_checksum(packet: bytes) -> bytes:
    header = bytearray(packet[:20])
    header[10:12] = inet_checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + packet[20:]


def engines(framing: str = "vxlan", own: str | None = OWN_SUBNET):
    out = make_engines()
    for e in out:
        e.set_route(PEER_SUBNET, PEER_IP, PEER_PORT, PEER_MAC if framing == "vxlan" else None, framing)
        if own is not None:
            e.set_subnet(own)
    return out


def outcome(framing: str, packet: bytes, own: str | None = OWN_SUBNET):
    """The one outcome both engines reach for ``packet`` from the peer, and its counter."""
    results = []
    for e in engines(framing, own):
        before = e.counters()
        got = e.decap(vxlan(packet), PEER_IP) if framing == "vxlan" else e.decap_bare(packet, PEER_IP)
        results.append((got, counter_delta(before, e.counters())))
    assert results[0] == results[1], results
    return results[0]


@pytest.mark.parametrize("framing", ["vxlan", "udp"])
@pytest.mark.parametrize("dst, delivered", [
    ("10.244.1.5", True),         # a pod here
    ("10.244.1.0", True),         # this node's own overlay address
    ("10.244.1.255", False),      # our subnet's broadcast address
    ("10.244.2.9", False),        # another node's subnet: no routing through us
    ("10.244.200.1", False),      # an unleased subnet of the overlay
    ("192.168.64.1", False),      # a host address outside the overlay
    ("8.8.8.8", False),
    ("255.255.255.255", False),
    ("224.0.0.1", False),
])
def test_only_hosts_of_our_subnet_are_delivered(framing, dst, delivered):
    packet = with_checksum(inner(src="10.244.2.7", dst=dst))
    (action, *_), delta = outcome(framing, packet)
    if delivered:
        assert action == "deliver" and delta["rx_packets"] == 1
    else:
        assert action == "drop" and delta == {"drop_bad_destination": 1}


def test_without_a_subnet_yet_the_destination_is_not_checked():
    (action, *_), _ = outcome("vxlan", inner(dst="10.244.2.9"), own=None)
    assert action == "deliver"


def test_a_corrupt_header_in_udp_framing_is_dropped_not_laundered():
    good = with_checksum(inner(dst="10.244.1.5"))
    corrupt = bytearray(good)
    corrupt[10] ^= 0x01
    (action, packet, _), delta = outcome("udp", good)
    assert action == "deliver" and packet[8] == good[8] - 1 and inet_checksum(packet[:20]) == 0
    (action, reason, _), delta = outcome("udp", bytes(corrupt))
    assert (action, reason) == ("drop", "bad_ip") and delta == {"drop_bad_ip": 1}
    # VXLAN leaves the inner header alone: the receiving kernel checks it, as for flanneld
    (action, packet, _), _ = outcome("vxlan", bytes(corrupt))
    assert action == "deliver" and packet == bytes(corrupt)


@pytest.mark.parametrize("subnet", ["10.244.1.0/25", "10.99.1.0/24"])
def test_set_subnet_refuses_what_is_no_subnet_of_ours(subnet):
    for e in make_engines():
        with pytest.raises(ValueError):
            e.set_subnet(subnet)
