"""The wire format and forwarding rules, in pure Python (sans-IO).

This is the reference twin of the compiled engine (csrc/udpflannel/_engine.pyx): the
same class API, the same decisions, the same counters. Tests feed both the same
inputs and demand identical bytes; it also serves as a slow fallback engine.

Wire format (RFC 7348, as Linux and flannel's vxlan backend use it)::

    outer IPv4 | outer UDP (dst port 8472) | VXLAN 08 00 00 00 VNI(3) 00 |
    inner Ethernet: dst = receiver's VtepMAC, src = sender's VtepMAC, type 0800/86DD |
    the IP packet read from the TUN

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

import errno
import ipaddress
import os
import socket
import struct
import sys

from udpflannel.core import offload

VXLAN_HLEN = 8
ETH_HLEN = 14
HEADROOM = VXLAN_HLEN + ETH_HLEN  # bytes added in front of each IP packet
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD

# Drop reasons, in counter order. Outbound first, then inbound.
TX_DROPS = ("bad_packet", "no_route", "send_error", "bad_offload")
RX_DROPS = ("short", "bad_flags", "bad_vni", "bad_mac", "bad_ethertype", "bad_ip", "ipv6",
            "unknown_sender", "spoofed", "truncated", "tun_write_error")
# tx_super_packets: TSO super-packets read from the TUN (each sent as many datagrams);
# rx_merged_writes: TUN writes that carried several coalesced TCP segments;
# gso_fallbacks: UDP_SEGMENT sends that failed and were sent again datagram by datagram.
COUNTERS = (("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "icmp_unreachable",
             "tx_super_packets", "rx_merged_writes", "gso_fallbacks")
            + tuple("drop_" + r for r in TX_DROPS + RX_DROPS))

SEND, ICMP, DELIVER, DROP = "send", "icmp", "deliver", "drop"
SO_RXQ_OVFL = 40  # socket option: each read reports the socket's kernel drop count

_ICMP_ERROR_TYPES = frozenset((3, 4, 5, 11, 12))


def vxlan_header(vni: int) -> bytes:
    return bytes((0x08, 0, 0, 0, (vni >> 16) & 0xFF, (vni >> 8) & 0xFF, vni & 0xFF, 0))


def inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


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


class PyEngine:
    """Route table + framing + counters. Same API as ``udpflannel._engine.Engine``."""

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
        self._routes: dict[int, tuple[int, int, bytes]] = {}  # subnet base -> peer
        self._senders: dict[int, int] = {}  # public IP -> number of subnets it owns
        self._c = dict.fromkeys(COUNTERS, 0)
        self._kernel_drops = 0

    # --- control path -------------------------------------------------------------
    def _subnet_base(self, subnet: str) -> int:
        s = ipaddress.IPv4Network(subnet)
        base = int(s.network_address)
        if s.prefixlen != self._subnet_len or base & self._netmask != self._net:
            raise ValueError(f"{subnet} is not a /{self._subnet_len} inside the overlay network")
        return base

    def set_route(self, subnet: str, public_ip: str, port: int, vtep_mac: bytes) -> None:
        base = self._subnet_base(subnet)
        ip = int(ipaddress.IPv4Address(public_ip))
        if len(vtep_mac) != 6 or not 0 < port < 65536:
            raise ValueError("bad port or MAC")
        if ip in (0, 0xFFFFFFFF):
            raise ValueError(f"{public_ip} cannot be a peer's address")
        self.del_route(subnet)
        self._routes[base] = (ip, port, bytes(vtep_mac))
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

    def lookup(self, address: str) -> tuple[str, int, bytes] | None:
        peer = self._find(int(ipaddress.IPv4Address(address)))
        return None if peer is None else (str(ipaddress.IPv4Address(peer[0])), peer[1], peer[2])

    def route_count(self) -> int:
        return len(self._routes)

    def counters(self) -> dict[str, int]:
        return dict(self._c)

    def _find(self, addr: int) -> tuple[int, int, bytes] | None:
        if addr & self._netmask != self._net:
            return None
        return self._routes.get(addr >> self._shift << self._shift)

    def _drop(self, reason: str) -> tuple[str, str, None]:
        self._c["drop_" + reason] += 1
        return DROP, reason, None

    # --- data path ----------------------------------------------------------------
    def encap(self, packet: bytes) -> tuple[str, object, tuple[str, int] | None]:
        """TUN -> UDP. (SEND, datagram, (ip, port)) | (ICMP, packet, None) | (DROP, reason, None)."""
        n = len(packet)
        version = packet[0] >> 4 if n else 0
        if version == 4 and n >= 20:
            ethertype = ETH_P_IP
            dst = int.from_bytes(packet[16:20], "big")
            peer = self._find(dst)
            if peer is None:
                return self._unroutable(packet, dst)
        elif version == 6 and n >= 40:
            return self._drop("no_route")  # the overlay carries IPv4 subnets only
        else:
            return self._drop("bad_packet")
        ip, port, mac = peer
        frame = self._vxlan + mac + self._mac + ethertype.to_bytes(2, "big") + packet
        self._c["tx_packets"] += 1
        self._c["tx_bytes"] += n
        return SEND, frame, (str(ipaddress.IPv4Address(ip)), port)

    def _unroutable(self, packet: bytes, dst: int):
        ihl = (packet[0] & 0x0F) * 4
        frag_offset = int.from_bytes(packet[6:8], "big") & 0x1FFF
        is_icmp_error = packet[9] == 1 and len(packet) > ihl and packet[ihl] in _ICMP_ERROR_TYPES
        if (dst & self._netmask != self._net or ihl < 20 or len(packet) < ihl
                or frag_offset or is_icmp_error):
            return self._drop("no_route")
        self._c["icmp_unreachable"] += 1
        return ICMP, icmp_net_unreachable(packet), None

    def decap(self, datagram: bytes, source: str) -> tuple[str, object, None]:
        """UDP -> TUN. (DELIVER, packet, None) | (DROP, reason, None)."""
        d = datagram
        n = len(d)
        if n < HEADROOM + 20:
            return self._drop("short")
        if d[0:4] != b"\x08\0\0\0" or d[7] != 0:
            return self._drop("bad_flags")
        if int.from_bytes(d[4:7], "big") != self._vni:
            return self._drop("bad_vni")
        if d[8:14] != self._mac:
            return self._drop("bad_mac")
        ethertype = int.from_bytes(d[20:22], "big")
        p = HEADROOM
        if ethertype == ETH_P_IP:
            ihl = (d[p] & 0x0F) * 4
            total = int.from_bytes(d[p + 2:p + 4], "big")
            if d[p] >> 4 != 4 or ihl < 20 or total < ihl or p + total > n:
                return self._drop("bad_ip")
            inner_src = int.from_bytes(d[p + 12:p + 16], "big")
        elif ethertype == ETH_P_IPV6:
            if n < p + 40 or d[p] >> 4 != 6:
                return self._drop("bad_ip")
            total = 40 + int.from_bytes(d[p + 4:p + 6], "big")
            if p + total > n:
                return self._drop("bad_ip")
            inner_src = None
        else:
            return self._drop("bad_ethertype")
        sender = int(ipaddress.IPv4Address(source))
        if sender not in self._senders:
            return self._drop("unknown_sender")
        if inner_src is None:
            return self._drop("ipv6")  # the overlay carries IPv4 only
        if self._strict_source or inner_src & self._netmask == self._net:
            owner = self._find(inner_src)
            if owner is None or owner[0] != sender:
                return self._drop("spoofed")
        self._c["rx_packets"] += 1
        self._c["rx_bytes"] += total
        return DELIVER, bytes(d[p:p + total]), None

    # --- offloads (rules in udpflannel.core.offload) ------------------------------------
    def segment(self, data: bytes) -> list[bytes]:
        """virtio header + packet (one TUN read) -> the VXLAN datagrams it becomes
        (an ICMP reply for the TUN comes back with its zero virtio header)."""
        try:
            _flags, gso_type, *_ = offload.parse_vnet(data)
            packets = offload.segment(data)
        except offload.OffloadError:
            self._drop("bad_offload")
            return []
        if gso_type != offload.GSO_NONE:
            dst = int.from_bytes(packets[0][16:20], "big")  # all segments share it
            if self._find(dst) is None:
                kind, reply, _ = self._unroutable(data[offload.VNET_HLEN:], dst)
                return [offload.ZERO_VNET + reply] if kind == ICMP else []
            self._c["tx_super_packets"] += 1
        out = []
        for packet in packets:
            kind, frame, _addr = self.encap(packet)
            if kind == SEND:
                out.append(frame)
            elif kind == ICMP:
                out.append(offload.ZERO_VNET + frame)
        return out

    def coalesce(self, packets: list[bytes]) -> list[bytes]:
        """Inner packets of consecutive datagrams -> TUN writes (virtio header + packet)."""
        writes = offload.coalesce(packets)
        self._c["rx_merged_writes"] += sum(1 for w in writes if w[1] != offload.GSO_NONE)
        return writes

    # --- I/O drains (the compiled engine does these without Python objects) --------
    def attach(self, tun_fd: int, udp_fd: int, *, vnet_hdr: bool = False, gso: bool = False,
               gro: bool = False) -> None:
        """Give the engine the non-blocking TUN fd and UDP socket fd it drains. The
        twin's drains run without offloads (its segment/coalesce model them)."""
        if vnet_hdr or gso or gro:
            raise ValueError("the Python engine runs without offloads (use --offload off)")
        self._tun_fd = tun_fd
        self._sock = socket.socket(fileno=os.dup(udp_fd))

    def offloads(self) -> dict[str, bool]:
        return {"vnet_hdr": False, "gso": False, "gro": False}

    def kernel_drops(self) -> int:
        return self._kernel_drops

    def drain_tun(self, budget: int) -> int:
        """Like the compiled drain: reads done, or -errno if the TUN itself failed."""
        done = 0
        while done < budget:
            try:
                packet = os.read(self._tun_fd, 65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                return -(e.errno or errno.EIO)
            done += 1
            kind, data, addr = self.encap(packet)
            if kind == SEND:
                try:
                    self._sock.sendto(data, addr)
                except OSError:
                    self._c["tx_packets"] -= 1
                    self._c["tx_bytes"] -= len(packet)
                    self._c["drop_send_error"] += 1
            elif kind == ICMP:
                _write_quietly(self._tun_fd, data)
        return done

    def drain_udp(self, budget: int) -> int:
        """Like the compiled drain: reads done, or -errno if the socket itself failed."""
        done = 0
        while done < budget:
            try:
                datagram, ancillary, flags, (source, _port) = self._sock.recvmsg(
                    65535, socket.CMSG_SPACE(4) * 2)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                return -(e.errno or errno.EIO)
            done += 1
            for level, kind, value in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, SO_RXQ_OVFL) and len(value) >= 4:
                    self._kernel_drops = int.from_bytes(value[:4], sys.byteorder)
            if flags & socket.MSG_CTRUNC:
                self._drop("truncated")
                continue
            kind, data, _ = self.decap(datagram, source)
            if kind == DELIVER and not _write_quietly(self._tun_fd, data):
                self._c["rx_packets"] -= 1
                self._c["rx_bytes"] -= len(data)
                self._c["drop_tun_write_error"] += 1
        return done


def _write_quietly(fd: int, data: bytes) -> bool:
    try:
        os.write(fd, data)
        return True
    except OSError:  # counted by the caller, like the compiled engine
        return False
