"""TCP segmentation and coalescing around virtio_net_hdr, in pure Python (sans-IO).

The reference for the compiled engine's offload path (tests compare them byte for
byte). With IFF_VNET_HDR every TUN read and write carries a 10-byte virtio_net_hdr:

    flags u8 (NEEDS_CSUM 1) | gso_type u8 (NONE 0, TCPV4 1, TCPV6 4, UDP_L4 5) | hdr_len u16 |
    gso_size u16 | csum_start u16 | csum_offset u16          (host byte order)

Read side: the kernel hands us TCP super-packets of up to 64 KB (gso TCPV4, TCPV6), UDP ones
(gso UDP_L4, from senders using UDP_SEGMENT, when the kernel offers USO) and
packets whose L4 checksum is only the pseudo-header sum (NEEDS_CSUM). ``segment``
cuts a super-packet into MSS-sized segments with their own IP length (IPv4: id and
header checksum too), sequence number, flags and L4 checksum (IPv6: only where the
transport header follows the fixed header directly); ``complete_checksum`` finishes a NEEDS_CSUM one.
A peer (maybe a kernel) gets ordinary, fully checksummed packets.

Write side: ``coalesce`` merges consecutive segments of one TCP flow back into one
super-packet written with gso TCPV4 (TCPV6) + NEEDS_CSUM, so the kernel's stack handles
64 KB at a time. It merges only what is safe: IPv4 without options or fragmentation
(IPv6 without extension headers), ACK with at most PSH, identical TOS/TTL/DF (traffic
class, flow label, hop limit) and TCP options, adjacent sequence numbers, equal
segment sizes (the last may be shorter and ends the run, as does PSH), at most
MAX_MERGE segments, and only segments whose TCP checksum verifies (merging hides the
originals' checksums).
"""

from __future__ import annotations

import struct

from udpflannel.core.errors import BadInput
from udpflannel.core.wire import (
    HEADROOM,
    IPV6_HLEN,
    UDP_MAX_PAYLOAD,
    ip_checksum,
    ones_sum,
    pseudo_sum,
)

VNET_HLEN = 10
NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4 = 0, 1, 4, 5
MAX_PACKET = 65535
MAX_MERGE = 64  # segments per coalesced write (one iovec each in the compiled engine)
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10

_vnet = struct.Struct("=BBHHHH")
ZERO_VNET = bytes(VNET_HLEN)


class OffloadError(BadInput):
    """A virtio header or super-packet that cannot be processed (dropped, counted)."""


def vnet_header(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0,
                csum_start: int = 0, csum_offset: int = 0) -> bytes:
    return _vnet.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def parse_vnet(data: bytes) -> tuple[int, int, int, int, int, int]:
    if len(data) < VNET_HLEN:
        raise OffloadError("shorter than a virtio header")
    return _vnet.unpack_from(data)


def tcp_checksum(ip_header: bytes, segment: bytes) -> int:
    """Full TCP checksum of ``segment`` (its checksum field taken as zero), with the
    pseudo-header of ``ip_header``'s family."""
    zeroed = segment[:16] + b"\0\0" + segment[18:]
    return ~ones_sum(zeroed, pseudo_sum(ip_header, 6, len(segment))) & 0xFFFF


def complete_checksum(packet: bytes, csum_start: int, csum_offset: int) -> bytes:
    """Finish a NEEDS_CSUM packet: the field holds the pseudo-header sum already."""
    end = csum_start + csum_offset + 2
    if csum_start >= len(packet) or end > len(packet):
        raise OffloadError("checksum offsets outside the packet")
    value = ~ones_sum(packet[csum_start:]) & 0xFFFF
    if value == 0 and _is_udp(packet):
        value = 0xFFFF  # a UDP checksum of 0 means "none": send its twin
    return packet[:end - 2] + struct.pack("!H", value) + packet[end:]


def _is_udp(packet: bytes) -> bool:
    version = packet[0] >> 4 if packet else 0
    return ((version == 4 and len(packet) >= 20 and packet[9] == 17)
            or (version == 6 and len(packet) >= IPV6_HLEN and packet[6] == 17))


def segment(data: bytes) -> list[bytes]:
    """One TUN read (virtio header + packet) -> the IP packets to send to peers."""
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = parse_vnet(data)
    packet = data[VNET_HLEN:]
    if gso_type == GSO_NONE:
        if flags & NEEDS_CSUM:
            packet = complete_checksum(packet, csum_start, csum_offset)
        return [packet]
    if gso_type not in (GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4):  # ECN (0x80) is never asked for
        raise OffloadError(f"unsupported gso_type {gso_type}")
    proto = 17 if gso_type == GSO_UDP_L4 else 6
    version = packet[0] >> 4 if packet else 0
    wanted = {GSO_TCPV4: (4,), GSO_TCPV6: (6,)}.get(gso_type, (4, 6))
    if len(packet) < 28 or version not in wanted:
        raise OffloadError("super-packet without an IP header of its gso_type's family")
    ihl = (packet[0] & 0x0F) * 4 if version == 4 else IPV6_HLEN
    next_header = packet[9] if version == 4 else packet[6]  # (IPv6 extension headers: not followed)
    if ihl < 20 or len(packet) < ihl + (20 if proto == 6 else 8) or next_header != proto:
        raise OffloadError("super-packet without its TCP/UDP header")
    l4len = (packet[ihl + 12] >> 4) * 4 if proto == 6 else 8
    hlen = ihl + l4len
    if l4len < (20 if proto == 6 else 8) or len(packet) < hlen or gso_size == 0:
        raise OffloadError("bad L4 header length or gso_size")  # TCP: 20-60 bytes
    if HEADROOM + hlen + gso_size > UDP_MAX_PAYLOAD:
        raise OffloadError(f"gso_size {gso_size} makes segments too big for a UDP datagram")
    ip, l4, payload = packet[:ihl], packet[ihl:hlen], packet[hlen:]
    ident = struct.unpack_from("!H", ip, 4)[0]
    count = max(1, -(-len(payload) // gso_size))
    out = []
    for i in range(count):
        chunk = payload[i * gso_size:(i + 1) * gso_size]
        h = bytearray(ip)
        if version == 6:
            struct.pack_into("!H", h, 4, l4len + len(chunk))  # the payload length
        else:
            struct.pack_into("!HH", h, 2, hlen + len(chunk), (ident + i) & 0xFFFF)
            struct.pack_into("!H", h, 10, 0)
            struct.pack_into("!H", h, 10, ip_checksum(bytes(h)))
        out.append(bytes(h) + (_tcp_segment(h, l4, chunk, i, count, gso_size) if proto == 6
                               else _udp_datagram(h, l4, chunk)))
    return out


def _tcp_segment(ip: bytearray, tcp: bytes, chunk: bytes, i: int, count: int, mss: int) -> bytes:
    t = bytearray(tcp)
    seq = struct.unpack_from("!I", tcp, 4)[0]
    struct.pack_into("!I", t, 4, (seq + i * mss) & 0xFFFFFFFF)
    if i != count - 1:
        t[13] = tcp[13] & ~(TCP_FIN | TCP_PSH)
    struct.pack_into("!H", t, 16, tcp_checksum(bytes(ip), bytes(t) + chunk))
    return bytes(t) + chunk


def _udp_datagram(ip: bytearray, udp: bytes, chunk: bytes) -> bytes:
    u = bytearray(udp)
    struct.pack_into("!HH", u, 4, 8 + len(chunk), 0)
    value = ~ones_sum(bytes(u) + chunk, pseudo_sum(bytes(ip), 17, 8 + len(chunk))) & 0xFFFF
    struct.pack_into("!H", u, 6, value or 0xFFFF)  # 0 would mean "no checksum"
    return bytes(u) + chunk


def _tcp_at(p: bytes) -> int:
    """Where the TCP header of a segment that may merge starts (20: IPv4 without options,
    not a fragment; 40: IPv6 with TCP right after the fixed header), its IP length
    exactly the packet's; 0 for anything else."""
    if len(p) >= 40 and p[0] == 0x45 and p[9] == 6:
        frag, total = struct.unpack_from("!H", p, 6)[0], struct.unpack_from("!H", p, 2)[0]
        return 20 if not frag & 0x3FFF and total == len(p) else 0
    if len(p) >= 60 and p[0] >> 4 == 6 and p[6] == 6 and IPV6_HLEN + struct.unpack_from("!H", p, 4)[0] == len(p):
        return IPV6_HLEN
    return 0


def _mergeable(p: bytes) -> tuple | None:
    """The flow identity of a TCP segment (IPv4 or IPv6) that may be merged, else None."""
    h = _tcp_at(p)
    if not h:
        return None
    thl = (p[h + 12] >> 4) * 4
    if thl < 20 or h + thl >= len(p):  # no payload: nothing to merge
        return None
    flags = p[h + 13]
    if flags & ~(TCP_ACK | TCP_PSH) or not flags & TCP_ACK:
        return None
    if ones_sum(p[h:], pseudo_sum(p, 6, len(p) - h)) != 0xFFFF:  # checksum must verify
        return None
    # flow: TOS, TTL, DF (IPv6: traffic class, flow label, hop limit), addresses,
    # ports, header length and options
    ip_fields = (p[1], p[8], p[6] & 0x40, p[12:24]) if h == 20 else (p[0:4], p[7], p[8:44])
    return (h, ip_fields, thl, p[h + 20:h + thl])


def coalesce(packets: list[bytes], limit: int = MAX_PACKET) -> list[bytes]:
    """Inner packets of consecutive datagrams -> TUN writes (virtio header + packet)."""
    out: list[bytes] = []
    group: list[bytes] = []
    key = None

    def flush() -> None:
        if len(group) == 1:
            out.append(ZERO_VNET + group[0])
        elif group:
            out.append(_merge(group))
        group.clear()

    for p in packets:
        k = _mergeable(p)
        if group and k is not None and k == key and _extends(group, p, limit):
            group.append(p)
            continue
        flush()
        if k is None:
            out.append(ZERO_VNET + p)
            key = None
        else:
            group.append(p)
            key = k
    flush()
    return out


def _hlen(p: bytes) -> int:
    """IP + TCP header bytes of a mergeable segment."""
    h = 20 if p[0] >> 4 == 4 else IPV6_HLEN
    return h + (p[h + 12] >> 4) * 4


def _payload_len(p: bytes) -> int:
    return len(p) - _hlen(p)


def _tcp_word(p: bytes, at: int) -> int:
    return struct.unpack_from("!I", p, (20 if p[0] >> 4 == 4 else IPV6_HLEN) + at)[0]


def _extends(group: list[bytes], p: bytes, limit: int) -> bool:
    first, prev = group[0], group[-1]
    if len(group) >= MAX_MERGE:
        return False
    mss = _payload_len(first)
    if _tcp_flags(prev) & TCP_PSH or _payload_len(prev) != mss:  # the run already ended
        return False
    size = _payload_len(p)
    if size > mss:
        return False
    if _tcp_word(p, 4) != (_tcp_word(prev, 4) + _payload_len(prev)) & 0xFFFFFFFF:
        return False
    if _tcp_word(p, 8) != _tcp_word(first, 8):
        return False  # a different ACK number: keep the kernel's view of it exact
    return _hlen(first) + sum(map(_payload_len, group)) + size <= limit


def _tcp_flags(p: bytes) -> int:
    return p[(20 if p[0] >> 4 == 4 else IPV6_HLEN) + 13]


def _merge(group: list[bytes]) -> bytes:
    first = group[0]
    h = 20 if first[0] >> 4 == 4 else IPV6_HLEN
    hlen = _hlen(first)
    payload = b"".join(p[hlen:] for p in group)
    total = hlen + len(payload)
    ip = bytearray(first[:h])
    if h == 20:
        struct.pack_into("!H", ip, 2, total)
        struct.pack_into("!H", ip, 10, ip_checksum(bytes(ip)))
    else:
        struct.pack_into("!H", ip, 4, total - h)  # the payload length
    tcp = bytearray(first[h:hlen])
    tcp[13] |= _tcp_flags(group[-1]) & TCP_PSH
    # NEEDS_CSUM: the field holds the folded pseudo-header sum, not inverted
    struct.pack_into("!H", tcp, 16, pseudo_sum(bytes(ip), 6, total - h))
    header = vnet_header(NEEDS_CSUM, GSO_TCPV4 if h == 20 else GSO_TCPV6, hlen, _payload_len(first), h, 16)
    return header + bytes(ip) + bytes(tcp) + payload
