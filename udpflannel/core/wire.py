"""The wire's numbers, the data path's counters and the Internet checksum: one copy.

Every module that frames, sizes, counts or checksums packets takes these from here;
the compiled engine (csrc/udpflannel/) mirrors the constants and the counter order in
C, and tests/unit/test_wire.py compares the two.

A VXLAN frame (RFC 7348, as Linux and flannel's vxlan backend use it)::

    outer IPv4 (20) | outer UDP (8, dst port 8472) | VXLAN 08 00 00 00 VNI(3) 00 (8) |
    inner Ethernet (14): dst = receiver's VtepMAC, src = sender's VtepMAC, type 0800 |
    the IP packet read from the TUN

An IPv6 packet (dual stack, as flanneld's flannel-v6.<VNI>) is framed the same way with
type 86DD between the two nodes' IPv6 VTEP MACs, over an outer IPv6 header (40) when
the peer's address is IPv6.

flanneld's udp framing (its udp backend, port 8285) is the bare IPv4 packet in a UDP
datagram.
"""

from __future__ import annotations

import struct

IPV4_HLEN = 20  # without options
IPV6_HLEN = 40  # the fixed header (extension headers follow it)
UDP_HLEN = 8
VXLAN_HLEN = 8
ETH_HLEN = 14
HEADROOM = VXLAN_HLEN + ETH_HLEN  # 22: bytes the engine writes in front of each IP packet
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD

UDP_FRAMING_OVERHEAD = IPV4_HLEN + UDP_HLEN  # 28: flanneld's udp encapOverhead
VXLAN_OVERHEAD = UDP_FRAMING_OVERHEAD + HEADROOM  # 50: what kernel VXLAN takes off the MTU
UDP_MAX_PAYLOAD = 65535 - UDP_FRAMING_OVERHEAD  # 65507: one IPv4 UDP datagram (or UDP_SEGMENT send)

VXLAN_PORT = 8472  # flannel's vxlan default: Linux's, not IANA's 4789
UDP_PORT = 8285  # flanneld's udp backend

SO_RXQ_OVFL = 40  # socket option: each read reports the socket's kernel drop count

# ICMP error types (destination unreachable, source quench, redirect, time exceeded,
# parameter problem): never answered with an ICMP error (RFC 1122 3.2.2).
ICMP_ERROR_TYPES = frozenset((3, 4, 5, 11, 12))

# Route framings: "vxlan" (RFC 7348, flanneld's vxlan backend) and "udp" (flanneld's
# udp backend: the bare IPv4 packet is the datagram; its TTL goes down by one on each
# side, as flannel's proxy does).
FRAMINGS = ("vxlan", "udp")

# Drop reasons, in counter order. Outbound first, then inbound. ttl_expired counts
# udp-framed packets whose TTL ran out, in either direction; bad_destination received
# packets for anything but a host of this node's subnet (its broadcast address, another
# node's subnet, an address outside the overlay: no peer may use a node as a router).
TX_DROPS = ("bad_packet", "no_route", "send_error", "bad_offload", "ttl_expired")
RX_DROPS = ("short", "bad_flags", "bad_vni", "bad_mac", "bad_ethertype", "bad_ip", "ipv6",
            "ipv4", "unknown_sender", "spoofed", "bad_destination", "truncated", "tun_write_error")
DROP_REASONS = TX_DROPS + RX_DROPS
# Every engine counter, in the engine's slot order.
# tx_super_packets: TSO super-packets read from the TUN (each sent as many datagrams);
# rx_merged_writes: TUN writes that carried several coalesced TCP segments;
# gso_fallbacks: UDP_SEGMENT sends that failed and were sent again datagram by datagram;
# rx_csum_completed: received TCP/UDP checksums a same-host kernel sender left unfinished
# (CHECKSUM_PARTIAL), completed before the TUN;
# tx_send_calls / rx_recv_calls: the send and receive system calls that carried datagrams
# (a UDP_SEGMENT send or a sendmmsg carries many, a recvmmsg brings many): packets per
# call is what the batching achieves.
COUNTERS = (("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "icmp_unreachable",
             "tx_super_packets", "rx_merged_writes", "gso_fallbacks", "rx_csum_completed",
             "tx_send_calls", "rx_recv_calls")
            + tuple("drop_" + r for r in DROP_REASONS))


def vxlan_header(vni: int) -> bytes:
    """Flags (I: the VNI is valid), reserved, the 24-bit VNI, reserved."""
    return bytes((0x08, 0, 0, 0, (vni >> 16) & 0xFF, (vni >> 8) & 0xFF, vni & 0xFF, 0))


# ---- the Internet checksum (RFC 1071) ---------------------------------------------------

def ones_sum(data: bytes | memoryview, start: int = 0) -> int:
    """The ones' complement sum of ``data`` as 16-bit big-endian words (an odd byte is
    padded with zero), plus ``start``, folded to 16 bits and not inverted."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def inet_checksum(data: bytes) -> int:
    """The checksum that makes ``data`` (its checksum field zero) verify."""
    return ~ones_sum(data) & 0xFFFF


def pseudo4_sum(ip: bytes, proto: int, length: int) -> int:
    """ones_sum of the IPv4 pseudo-header (addresses from ``ip``) for an L4 segment."""
    return ones_sum(bytes(ip[12:20]) + struct.pack("!BBH", 0, proto, length))


def pseudo6_sum(ip: bytes, next_header: int, length: int) -> int:
    """ones_sum of the IPv6 pseudo-header (RFC 8200 8.1; addresses from ``ip``)."""
    return ones_sum(bytes(ip[8:40]) + struct.pack("!I3xB", length, next_header))


def pseudo_sum(ip: bytes, proto: int, length: int) -> int:
    """The pseudo-header sum of the packet's own family."""
    return pseudo6_sum(ip, proto, length) if ip[0] >> 4 == 6 else pseudo4_sum(ip, proto, length)


def ip_checksum(header: bytes) -> int:
    """An IPv4 header's checksum, whatever its checksum field holds now."""
    return inet_checksum(header[:10] + b"\0\0" + header[12:])
