"""The forwarding rules, in pure Python (sans-IO): the compiled engine's decisions.

``Forwarder`` is the reference twin of the compiled engine (csrc/udpflannel/_engine.pyx):
the same single-packet API, the same decisions, the same counters. Tests feed both the
same inputs and demand identical bytes. Its I/O (reading the TUN, the sockets) lives
in dataplane/pyengine.py; the wire's numbers and checksums in core/wire.py.

Outbound (TUN -> UDP): the packet's destination picks the peer whose subnet holds it.
No peer but inside the overlay network -> ICMP net unreachable written back to the TUN
(as flannel's udp proxy does; never in reply to an ICMP error or a non-first
fragment), sent from the unreachable address itself: flannel's choice, the TUN's own
address, is a local source the kernel drops as a martian. IPv6 likewise: ICMPv6
destination unreachable (no route), quoting as much as fits 1280 bytes, never in
reply to an ICMPv6 error or to an unspecified or multicast source. Anything else ->
dropped and counted.

Dual stack (flanneld's vxlan backend with EnableIPv6): a route's subnet is IPv4 or
IPv6 (IPv6 frames carry ethertype 86DD between the nodes' IPv6 VTEP MACs, flannel-v6's),
and its peer address either family (the outer header the sockets give it).

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
    IPV6_HLEN,
    inet_checksum,
    ones_sum,
    pseudo6_sum,
    pseudo_sum,
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


ICMP6_QUOTE_MAX = 1280 - IPV6_HLEN - 8  # RFC 4443 3.1: the reply fits the minimum MTU


def icmp6_unreachable(packet: bytes) -> bytes:
    """ICMPv6 destination unreachable, code 0 (no route), back to the sender of
    ``packet``, from its destination."""
    quoted = packet[:ICMP6_QUOTE_MAX]
    header = struct.pack("!IHBB16s16s", 6 << 28, 8 + len(quoted), 58, 64, packet[24:40], packet[8:24])
    icmp = bytearray(b"\x01\x00\x00\x00\x00\x00\x00\x00" + quoted)
    struct.pack_into("!H", icmp, 2, ~ones_sum(bytes(icmp), pseudo6_sum(header, 58, len(icmp))) & 0xFFFF)
    return header + bytes(icmp)


def _fmix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def flow_hash(packet: bytes) -> int:
    """The inner flow's hash that picks a VXLAN frame's outer source port: addresses,
    protocol and, for TCP/UDP that is not a fragment, the ports (RFC 7348 section 5).
    IPv6: the eight address words one by one, the next header, and the ports when TCP
    or UDP follows the fixed header."""
    if packet[0] >> 4 == 6:
        h = 0x9747B28C
        for (word,) in struct.iter_unpack("!I", packet[8:40]):
            h = _fmix32(h ^ word)
        nh = packet[6]
        ports = int.from_bytes(packet[40:44], "big") if nh in (6, 17) and len(packet) >= 44 else 0
        return _fmix32(h ^ ports ^ (nh << 24))
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
    anything else (fragments, other protocols, IPv6 with extension headers, fine or
    really corrupt checksums)."""
    v6 = packet[0] >> 4 == 6
    ihl = IPV6_HLEN if v6 else (packet[0] & 0x0F) * 4
    proto = packet[6] if v6 else packet[9]
    l4 = len(packet) - ihl
    if not v6 and int.from_bytes(packet[6:8], "big") & 0x3FFF:
        return None
    if proto == 6 and l4 >= 20:
        off = 16
    elif proto == 17 and l4 >= 8:
        off = 6
    else:
        return None
    field = int.from_bytes(packet[ihl + off:ihl + off + 2], "big")
    psum = pseudo_sum(packet, proto, l4)
    if not (field == psum or {field, psum} == {0, 0xFFFF}):
        return None
    if ones_sum(packet[ihl:], psum) == 0xFFFF:
        return None  # it verifies as it is
    value = inet_checksum(packet[ihl:])  # the field's pseudo sum completes the sum
    if value == 0 and proto == 17:
        value = 0xFFFF
    at = ihl + off
    return packet[:at] + struct.pack("!H", value) + packet[at + 2:]


def key(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    """An address as one number, as the compiled engine keys its tables: IPv6 as is,
    IPv4 in its mapped form (::ffff:a.b.c.d), so the families never meet."""
    ip = ipaddress.ip_address(address)
    return int(ip) | (0xFFFF << 32) if ip.version == 4 else int(ip)


def address_of(k: int) -> str:
    return str(ipaddress.IPv4Address(k & 0xFFFFFFFF) if k >> 32 == 0xFFFF else ipaddress.IPv6Address(k))


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def peer_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a node can have this address (the compiled engine's rule): not
    unspecified, not its family's all-ones address, not IPv4-mapped."""
    return int(ip) not in (0, (1 << ip.max_prefixlen) - 1) and not (ip.version == 6 and ip in _MAPPED)


class Forwarder:
    """Route table + framing + counters, sans-IO: the compiled engine's decisions with
    its single-packet API (``udpflannel._engine.Engine``). dataplane/pyengine.py adds
    the I/O (attach, drains) that makes it the --engine python fallback."""

    def __init__(self, *, vni: int, vtep_mac: bytes, network: str | None, subnet_len: int,
                 strict_source: bool = False, network6: str | None = None, subnet_len6: int = 0,
                 vtep_mac6: bytes | None = None) -> None:
        if network is None and network6 is None:
            raise ValueError("no network: give network, network6 or both")
        if not 0 < vni < 1 << 24:
            raise ValueError(f"VNI {vni} out of range")
        vtep_mac6 = vtep_mac if vtep_mac6 is None else vtep_mac6
        if len(vtep_mac) != 6 or len(vtep_mac6) != 6:
            raise ValueError("vtep_mac and vtep_mac6 must be 6 bytes")
        # family -> (network, subnet length): what set_route / set_subnet accept
        self._pools: dict[int, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int]] = {}
        if network is not None:
            net = ipaddress.IPv4Network(network)
            if not net.prefixlen < subnet_len <= 30:
                raise ValueError(f"subnet length /{subnet_len} does not fit {net}")
            self._pools[4] = (net, subnet_len)
        if network6 is not None:
            net6 = ipaddress.IPv6Network(network6)
            if not net6.prefixlen < subnet_len6 <= 126:
                raise ValueError(f"IPv6 subnet length /{subnet_len6} does not fit {net6}")
            if net6.overlaps(_MAPPED):
                raise ValueError(f"{net6} overlaps the IPv4-mapped addresses {_MAPPED}")
            self._pools[6] = (net6, subnet_len6)
        self._vni = vni
        self._macs = {4: bytes(vtep_mac), 6: bytes(vtep_mac6)}
        self._strict_source = strict_source
        self._vxlan = vxlan_header(vni)
        # subnet key -> (public IP key, port, VtepMAC or None, framing)
        self._routes: dict[int, tuple[int, int, bytes | None, str]] = {}
        self._senders: dict[int, int] = {}  # public IP key -> number of subnets it owns
        self._c = dict.fromkeys(COUNTERS, 0)
        self._own: dict[int, ipaddress.IPv4Network | ipaddress.IPv6Network] = {}  # set_subnet, by family

    # --- control path -------------------------------------------------------------
    def _subnet_key(self, subnet: str) -> int:
        s = ipaddress.ip_network(subnet)
        pool = self._pools.get(s.version)
        if pool is None or s.prefixlen != pool[1] or not s.subnet_of(pool[0]):  # type: ignore[arg-type]
            length = f"/{pool[1]}" if pool else f"IPv{s.version}"
            raise ValueError(f"{subnet} is not a {length} inside the overlay network")
        return key(s.network_address)

    def set_subnet(self, subnet: str) -> None:
        """This node's subnet of one family: received packets must be for one of its hosts."""
        self._subnet_key(subnet)
        own = ipaddress.ip_network(subnet)
        self._own[own.version] = own

    def set_route(self, subnet: str, public_ip: str, port: int, vtep_mac: bytes | None = None,
                  framing: str = "vxlan") -> None:
        ip = ipaddress.ip_address(public_ip)
        family = ipaddress.ip_network(subnet).version
        if framing not in FRAMINGS:
            raise ValueError(f"framing {framing!r} is not one of {FRAMINGS}")
        if framing == "vxlan" and (vtep_mac is None or len(vtep_mac) != 6):
            raise ValueError("VXLAN framing needs a 6-byte VtepMAC")
        if framing == "udp" and (family == 6 or ip.version == 6):
            raise ValueError("flanneld's udp framing carries IPv4 only")
        if not 0 < port < 65536:
            raise ValueError("bad port")
        if not peer_address(ip):
            raise ValueError(f"{public_ip} cannot be a peer's address")
        base = self._subnet_key(subnet)
        self.del_route(subnet)
        mac = bytes(vtep_mac) if framing == "vxlan" and vtep_mac is not None else None
        sender = key(ip)
        self._routes[base] = (sender, port, mac, framing)
        self._senders[sender] = self._senders.get(sender, 0) + 1

    def del_route(self, subnet: str) -> bool:
        peer = self._routes.pop(self._subnet_key(subnet), None)
        if peer is None:
            return False
        left = self._senders[peer[0]] - 1
        if left:
            self._senders[peer[0]] = left
        else:
            del self._senders[peer[0]]
        return True

    def lookup(self, address: str) -> tuple[str, int, bytes | None] | None:
        peer = self._find(ipaddress.ip_address(address))
        return None if peer is None else (address_of(peer[0]), peer[1], peer[2])

    def route_count(self) -> int:
        return len(self._routes)

    def counters(self) -> dict[str, int]:
        return dict(self._c)

    def _find(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, int, bytes | None, str] | None:
        pool = self._pools.get(addr.version)
        if pool is None:
            return None
        net, subnet_len = pool
        value, width = int(addr), addr.max_prefixlen
        if value & int(net.netmask) != int(net.network_address):
            return None
        base = value >> (width - subnet_len) << (width - subnet_len)
        return self._routes.get(base | (0xFFFF << 32) if width == 32 else base)

    def _drop(self, reason: str) -> Drop:
        self._c["drop_" + reason] += 1
        return DROP, reason, None

    # --- data path ----------------------------------------------------------------
    def encap(self, packet: bytes) -> Encap:
        """TUN -> UDP. (SEND, datagram, (ip, port)) | (ICMP, packet, None) | (DROP, reason, None)."""
        n = len(packet)
        version = packet[0] >> 4 if n else 0
        if version == 4 and n >= 20 and packet[0] & 0x0F >= 5:
            dst: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(packet[16:20])
            peer = self._find(dst)
            if peer is None:
                return self._unroutable(packet, dst)
        elif version == 6 and n >= IPV6_HLEN:
            dst = ipaddress.IPv6Address(packet[24:40])
            peer = self._find(dst)
            if peer is None:
                return self._unreachable6(packet, dst)
        else:
            return self._drop("bad_packet")
        ip, port, mac, framing = peer
        if framing == "udp":
            frame = decrement_ttl(packet)
            if frame is None:
                return self._drop("ttl_expired")
        else:
            assert mac is not None  # set_route gives every vxlan route its VtepMAC
            ethertype = ETH_P_IPV6 if version == 6 else ETH_P_IP
            frame = self._vxlan + mac + self._macs[version] + ethertype.to_bytes(2, "big") + packet
        self._c["tx_packets"] += 1
        self._c["tx_bytes"] += n
        return SEND, frame, (address_of(ip), port)

    def _unroutable(self, packet: bytes, dst: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Encap:
        ihl = (packet[0] & 0x0F) * 4
        frag_offset = int.from_bytes(packet[6:8], "big") & 0x1FFF
        is_icmp_error = packet[9] == 1 and len(packet) > ihl and packet[ihl] in ICMP_ERROR_TYPES
        if (4 not in self._pools or dst not in self._pools[4][0] or ihl < 20 or len(packet) < ihl
                or frag_offset or is_icmp_error):
            return self._drop("no_route")
        self._c["icmp_unreachable"] += 1
        return ICMP, icmp_net_unreachable(packet), None

    def _unreachable6(self, packet: bytes, dst: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Encap:
        is_icmp_error = packet[6] == 58 and len(packet) > IPV6_HLEN and packet[40] < 128
        unanswerable = packet[8] == 0xFF or not any(packet[8:24])  # multicast or unspecified
        if 6 not in self._pools or dst not in self._pools[6][0] or is_icmp_error or unanswerable:
            return self._drop("no_route")
        self._c["icmp_unreachable"] += 1
        return ICMP, icmp6_unreachable(packet), None

    def decap(self, datagram: bytes, source: str) -> Decap:
        """A VXLAN datagram -> (DELIVER, packet, None) | (DROP, reason, None)."""
        d = datagram
        if len(d) < HEADROOM + 20:
            return self._drop("short")
        if d[0:4] != b"\x08\0\0\0" or d[7] != 0:
            return self._drop("bad_flags")
        if int.from_bytes(d[4:7], "big") != self._vni:
            return self._drop("bad_vni")
        family = {ETH_P_IP: 4, ETH_P_IPV6: 6}.get(int.from_bytes(d[20:22], "big"))
        if family is None:
            return self._drop("bad_ethertype")
        if d[8:14] != self._macs[family]:  # each family's own VTEP MAC
            return self._drop("bad_mac")
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
            if len(p) < IPV6_HLEN or p[0] >> 4 != 6 or IPV6_HLEN + int.from_bytes(p[4:6], "big") > len(p):
                return self._drop("bad_ip")
            ihl, total = IPV6_HLEN, IPV6_HLEN + int.from_bytes(p[4:6], "big")
        else:
            return self._drop("bad_ip")
        sender = key(source)
        if sender not in self._senders:
            return self._drop("unknown_sender")
        if family == 6 and (6 not in self._pools or bare):
            return self._drop("ipv6")  # (flanneld's udp framing is IPv4 only)
        if family == 4 and 4 not in self._pools:
            return self._drop("ipv4")
        reason = self._inner_refused(p, family, sender)
        if reason is not None:
            return self._drop(reason)
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

    def _inner_refused(self, p: bytes, family: int, sender: int) -> str | None:
        """Why the inner addresses are refused, or None: a source inside the overlay
        must be the sender's own subnet (or any source, strict_source); the destination
        a host of our subnet (IPv4: not its broadcast address)."""
        if family == 4:
            src: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(p[12:16])
            dst: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(p[16:20])
        else:
            src, dst = ipaddress.IPv6Address(p[8:24]), ipaddress.IPv6Address(p[24:40])
        if self._strict_source or src in self._pools[family][0]:
            owner = self._find(src)
            if owner is None or owner[0] != sender:
                return "spoofed"
        own = self._own.get(family)
        if own is not None and (dst not in own or (family == 4 and dst == own.broadcast_address)):
            return "bad_destination"
        return None

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
            first = packets[0]  # all segments share its destination
            v6 = first[0] >> 4 == 6
            dst = ipaddress.ip_address(first[24:40] if v6 else first[16:20])
            peer = self._find(dst)
            if peer is None:
                whole = data[offload.VNET_HLEN:]
                reply = self._unreachable6(whole, dst) if v6 else self._unroutable(whole, dst)
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
