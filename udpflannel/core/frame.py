"""The forwarding rules, in pure Python (sans-IO): the compiled engine's decisions.

``Forwarder`` is the reference twin of the compiled engine (csrc/udpflannel/_engine.pyx):
the same single-packet API, the same decisions, the same counters. Tests feed both the
same inputs and demand identical bytes. Its I/O (reading the TUN, the sockets) lives
in dataplane/pyengine.py; the wire's numbers and checksums in core/wire.py.

Outbound (TUN -> UDP): the packet's destination picks the peer whose subnet holds it.
No peer but inside the overlay network -> ICMP net unreachable written back to the TUN
(as flannel's udp proxy does; never in reply to an ICMP error or a non-first
fragment), sent from the unreachable address itself: flannel's choice, the TUN's own
address, is a local source the kernel drops as a martian. Anything else -> dropped
and counted.

Inbound (UDP -> TUN): every header is checked and the sender must be a known node. An
inner source inside the overlay network must lie in the sender's own subnet (no node
may speak for another's pods); one outside it is routed traffic (a host address, a
router's ICMP error) and is delivered, unless ``strict_source`` demands the sender's
subnet for every source. Otherwise one drop counter names the reason.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final, Literal

from udpflannel.core import offload
from udpflannel.core.wire import (
    COUNTERS,
    ETH_P_IP,
    ETH_P_IPV6,
    FRAMINGS,
    HEADROOM,
    ICMP_ERROR_TYPES,
    inet_checksum,
    vxlan_header,
)

# What encap / decap decide (both engines return these): a frame to send to a peer, an
# ICMP error for the TUN, a packet to deliver to the TUN, or a counted drop.
SEND: Final = "send"
ICMP: Final = "icmp"
DELIVER: Final = "deliver"
DROP: Final = "drop"
Drop = tuple[Literal["drop"], str, None]  # (DROP, reason, None)
# encap: a frame for the peer at (ip, port), an ICMP error for the TUN, or a drop
Encap = tuple[Literal["send"], bytes, tuple[str, int]] | tuple[Literal["icmp"], bytes, None] | Drop
# decap / decap_bare: the inner packet for the TUN, or a drop
Decap = tuple[Literal["deliver"], bytes, None] | Drop


def icmp_net_unreachable(packet: bytes) -> bytes:
    """ICMP type 3 code 0 back to the sender of ``packet``, from its destination."""
    ihl = (packet[0] & 0x0F) * 4
    quoted = packet[: ihl + 8]
    icmp = bytearray(b"\x03\x00\x00\x00\x00\x00\x00\x00" + quoted)
    struct.pack_into("!H", icmp, 2, inet_checksum(bytes(icmp)))
    total = 20 + len(icmp)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 1, 0,
                               packet[16:20], packet[12:16]))
    struct.pack_into("!H", ip, 10, inet_checksum(bytes(ip)))
    return bytes(ip + icmp)


def _fmix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def flow_hash(packet: bytes) -> int:
    """The inner flow's hash that picks a VXLAN frame's outer source port: addresses,
    protocol and, for TCP/UDP that is not a fragment, the ports (RFC 7348 section 5)."""
    ihl = (packet[0] & 0x0F) * 4
    proto = packet[9]
    ports = 0
    if (proto in (6, 17) and not int.from_bytes(packet[6:8], "big") & 0x3FFF and ihl >= 20
            and len(packet) >= ihl + 4):
        ports = int.from_bytes(packet[ihl:ihl + 4], "big")
    src, dst = int.from_bytes(packet[12:16], "big"), int.from_bytes(packet[16:20], "big")
    return _fmix32(_fmix32(_fmix32(src ^ 0x9747B28C) ^ dst) ^ ports ^ (proto << 24))


def flow_index(packet: bytes, ways: int) -> int:
    """Which of ``ways`` source-port sockets a packet's flow leaves by."""
    return (flow_hash(packet) * ways) >> 32


def decrement_ttl(packet: bytes) -> bytes | None:
    """flanneld udp framing: TTL - 1 with a fresh header checksum; None once it would
    reach 0 (flannel's proxy drops such packets)."""
    if packet[8] <= 1:
        return None
    ihl = (packet[0] & 0x0F) * 4
    h = bytearray(packet[:ihl])
    h[8] -= 1
    struct.pack_into("!H", h, 10, 0)
    struct.pack_into("!H", h, 10, inet_checksum(bytes(h)))
    return bytes(h) + packet[ihl:]


def complete_partial_checksum(packet: bytes) -> bytes | None:
    """A TCP/UDP packet whose checksum field holds only the pseudo-header sum (a kernel
    sender's unfinished CHECKSUM_PARTIAL) and does not verify, completed; None for
    anything else (fragments, other protocols, fine or really corrupt checksums)."""
    ihl = (packet[0] & 0x0F) * 4
    proto = packet[9]
    l4 = len(packet) - ihl
    if int.from_bytes(packet[6:8], "big") & 0x3FFF:
        return None
    if proto == 6 and l4 >= 20:
        off = 16
    elif proto == 17 and l4 >= 8:
        off = 6
    else:
        return None
    field = int.from_bytes(packet[ihl + off:ihl + off + 2], "big")
    pseudo_words = packet[12:20] + struct.pack("!BBH", 0, proto, l4)
    pseudo = ~inet_checksum(pseudo_words) & 0xFFFF  # folded, not inverted
    if not (field == pseudo or {field, pseudo} == {0, 0xFFFF}):
        return None
    if inet_checksum(pseudo_words + packet[ihl:]) == 0:
        return None  # it verifies as it is
    value = inet_checksum(packet[ihl:])  # the field's pseudo sum completes the sum
    if value == 0 and proto == 17:
        value = 0xFFFF
    at = ihl + off
    return packet[:at] + struct.pack("!H", value) + packet[at + 2:]


class Forwarder:
    """Route table + framing + counters, sans-IO: the compiled engine's decisions with
    its single-packet API (``udpflannel._engine.Engine``). dataplane/pyengine.py adds
    the I/O (attach, drains) that makes it the --engine python fallback."""

    def __init__(self, *, vni: int, vtep_mac: bytes, network: str, subnet_len: int,
                 strict_source: bool = False) -> None:
        net = ipaddress.IPv4Network(network)
        if not 0 < vni < 1 << 24:
            raise ValueError(f"VNI {vni} out of range")
        if len(vtep_mac) != 6:
            raise ValueError("vtep_mac must be 6 bytes")
        if not net.prefixlen < subnet_len <= 30:
            raise ValueError(f"subnet length /{subnet_len} does not fit {net}")
        self._vni = vni
        self._mac = bytes(vtep_mac)
        self._net = int(net.network_address)
        self._netmask = int(net.netmask)
        self._shift = 32 - subnet_len
        self._subnet_len = subnet_len
        self._strict_source = strict_source
        self._vxlan = vxlan_header(vni)
        # subnet base -> (public IP, port, VtepMAC or None, framing)
        self._routes: dict[int, tuple[int, int, bytes | None, str]] = {}
        self._senders: dict[int, int] = {}  # public IP -> number of subnets it owns
        self._c = dict.fromkeys(COUNTERS, 0)
        self._own: tuple[int, int] | None = None  # this node's subnet (base, mask): set_subnet

    # --- control path -------------------------------------------------------------
    def _subnet_base(self, subnet: str) -> int:
        s = ipaddress.IPv4Network(subnet)
        base = int(s.network_address)
        if s.prefixlen != self._subnet_len or base & self._netmask != self._net:
            raise ValueError(f"{subnet} is not a /{self._subnet_len} inside the overlay network")
        return base

    def set_subnet(self, subnet: str) -> None:
        """This node's subnet: received packets must be for one of its hosts."""
        own = ipaddress.IPv4Network(subnet)
        self._own = (self._subnet_base(subnet), int(own.netmask))

    def set_route(self, subnet: str, public_ip: str, port: int, vtep_mac: bytes | None = None,
                  framing: str = "vxlan") -> None:
        base = self._subnet_base(subnet)
        ip = int(ipaddress.IPv4Address(public_ip))
        if framing not in FRAMINGS:
            raise ValueError(f"framing {framing!r} is not one of {FRAMINGS}")
        if framing == "vxlan" and (vtep_mac is None or len(vtep_mac) != 6):
            raise ValueError("VXLAN framing needs a 6-byte VtepMAC")
        if not 0 < port < 65536:
            raise ValueError("bad port")
        if ip in (0, 0xFFFFFFFF):
            raise ValueError(f"{public_ip} cannot be a peer's address")
        self.del_route(subnet)
        mac = bytes(vtep_mac) if framing == "vxlan" and vtep_mac is not None else None
        self._routes[base] = (ip, port, mac, framing)
        self._senders[ip] = self._senders.get(ip, 0) + 1

    def del_route(self, subnet: str) -> bool:
        peer = self._routes.pop(self._subnet_base(subnet), None)
        if peer is None:
            return False
        left = self._senders[peer[0]] - 1
        if left:
            self._senders[peer[0]] = left
        else:
            del self._senders[peer[0]]
        return True

    def lookup(self, address: str) -> tuple[str, int, bytes | None] | None:
        peer = self._find(int(ipaddress.IPv4Address(address)))
        return None if peer is None else (str(ipaddress.IPv4Address(peer[0])), peer[1], peer[2])

    def route_count(self) -> int:
        return len(self._routes)

    def counters(self) -> dict[str, int]:
        return dict(self._c)

    def _find(self, addr: int) -> tuple[int, int, bytes | None, str] | None:
        if addr & self._netmask != self._net:
            return None
        return self._routes.get(addr >> self._shift << self._shift)

    def _drop(self, reason: str) -> Drop:
        self._c["drop_" + reason] += 1
        return DROP, reason, None

    # --- data path ----------------------------------------------------------------
    def encap(self, packet: bytes) -> Encap:
        """TUN -> UDP. (SEND, datagram, (ip, port)) | (ICMP, packet, None) | (DROP, reason, None)."""
        n = len(packet)
        version = packet[0] >> 4 if n else 0
        if version == 4 and n >= 20 and packet[0] & 0x0F >= 5:
            dst = int.from_bytes(packet[16:20], "big")
            peer = self._find(dst)
            if peer is None:
                return self._unroutable(packet, dst)
        elif version == 6 and n >= 40:
            return self._drop("no_route")  # the overlay carries IPv4 subnets only
        else:
            return self._drop("bad_packet")
        ip, port, mac, framing = peer
        if framing == "udp":
            frame = decrement_ttl(packet)
            if frame is None:
                return self._drop("ttl_expired")
        else:
            assert mac is not None  # set_route gives every vxlan route its VtepMAC
            frame = self._vxlan + mac + self._mac + ETH_P_IP.to_bytes(2, "big") + packet
        self._c["tx_packets"] += 1
        self._c["tx_bytes"] += n
        return SEND, frame, (str(ipaddress.IPv4Address(ip)), port)

    def _unroutable(self, packet: bytes, dst: int) -> Encap:
        ihl = (packet[0] & 0x0F) * 4
        frag_offset = int.from_bytes(packet[6:8], "big") & 0x1FFF
        is_icmp_error = packet[9] == 1 and len(packet) > ihl and packet[ihl] in ICMP_ERROR_TYPES
        if (dst & self._netmask != self._net or ihl < 20 or len(packet) < ihl
                or frag_offset or is_icmp_error):
            return self._drop("no_route")
        self._c["icmp_unreachable"] += 1
        return ICMP, icmp_net_unreachable(packet), None

    def decap(self, datagram: bytes, source: str) -> Decap:
        """A VXLAN datagram -> (DELIVER, packet, None) | (DROP, reason, None)."""
        d = datagram
        if len(d) < HEADROOM + 20:
            return self._drop("short")
        if d[0:4] != b"\x08\0\0\0" or d[7] != 0:
            return self._drop("bad_flags")
        if int.from_bytes(d[4:7], "big") != self._vni:
            return self._drop("bad_vni")
        if d[8:14] != self._mac:
            return self._drop("bad_mac")
        family = {ETH_P_IP: 4, ETH_P_IPV6: 6}.get(int.from_bytes(d[20:22], "big"))
        if family is None:
            return self._drop("bad_ethertype")
        return self._accept_inner(bytes(d[HEADROOM:]), family, source, bare=False)

    def decap_bare(self, datagram: bytes, source: str) -> Decap:
        """A flanneld-udp datagram (the bare IP packet) -> as decap."""
        if len(datagram) < 20:
            return self._drop("short")
        return self._accept_inner(bytes(datagram), datagram[0] >> 4, source, bare=True)

    def _accept_inner(self, p: bytes, family: int, source: str, bare: bool) -> Decap:
        if family == 4:
            ihl = (p[0] & 0x0F) * 4
            total = int.from_bytes(p[2:4], "big")
            if p[0] >> 4 != 4 or ihl < 20 or total < ihl or total > len(p):
                return self._drop("bad_ip")
        elif family == 6:
            if len(p) < 40 or p[0] >> 4 != 6 or 40 + int.from_bytes(p[4:6], "big") > len(p):
                return self._drop("bad_ip")
        else:
            return self._drop("bad_ip")
        sender = int(ipaddress.IPv4Address(source))
        if sender not in self._senders:
            return self._drop("unknown_sender")
        if family != 4:
            return self._drop("ipv6")  # the overlay carries IPv4 only
        inner_src = int.from_bytes(p[12:16], "big")
        if self._strict_source or inner_src & self._netmask == self._net:
            owner = self._find(inner_src)
            if owner is None or owner[0] != sender:
                return self._drop("spoofed")
        if self._own is not None:
            base, mask = self._own
            inner_dst = int.from_bytes(p[16:20], "big")
            if inner_dst & mask != base or inner_dst == base | (~mask & 0xFFFFFFFF):
                return self._drop("bad_destination")
        packet = p[:total]
        if bare:
            if inet_checksum(packet[:ihl]) != 0:  # a corrupt header stays one (flannel's proxy)
                return self._drop("bad_ip")
            decremented = decrement_ttl(packet)
            if decremented is None:
                return self._drop("ttl_expired")
            packet = decremented
        completed = complete_partial_checksum(packet)
        if completed is not None:
            packet = completed
            self._c["rx_csum_completed"] += 1
        self._c["rx_packets"] += 1
        self._c["rx_bytes"] += total
        return DELIVER, packet, None

    # --- offloads (rules in udpflannel.core.offload) -------------------------------
    def segment(self, data: bytes) -> list[bytes]:
        """virtio header + packet (one TUN read) -> the datagrams it becomes (an ICMP
        reply for the TUN comes back with its zero virtio header)."""
        try:
            _flags, gso_type, *_ = offload.parse_vnet(data)
            packets = offload.segment(data)
        except offload.OffloadError:
            self._drop("bad_offload")
            return []
        if gso_type != offload.GSO_NONE:
            dst = int.from_bytes(packets[0][16:20], "big")  # all segments share it
            peer = self._find(dst)
            if peer is None:
                reply = self._unroutable(data[offload.VNET_HLEN:], dst)
                return [offload.ZERO_VNET + reply[1]] if reply[0] == ICMP else []
            if peer[3] == "udp" and packets[0][8] <= 1:
                self._drop("ttl_expired")  # one super-packet, one drop
                return []
            self._c["tx_super_packets"] += 1
        out = []
        for packet in packets:
            sent = self.encap(packet)
            if sent[0] == SEND:
                out.append(sent[1])
            elif sent[0] == ICMP:
                out.append(offload.ZERO_VNET + sent[1])
        return out

    def coalesce(self, packets: list[bytes]) -> list[bytes]:
        """Inner packets of consecutive datagrams -> TUN writes (virtio header + packet)."""
        writes = offload.coalesce(packets)
        self._c["rx_merged_writes"] += sum(1 for w in writes if w[1] != offload.GSO_NONE)
        return writes

    def flow_index(self, packet: bytes, ways: int) -> int:
        return flow_index(packet, ways)
