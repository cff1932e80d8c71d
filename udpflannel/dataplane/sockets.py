"""The engine's UDP sockets: one per port it listens on, and a pool for source ports.

* The VXLAN socket (the config's port, 8472) and the flanneld-udp socket (8285)
  receive, each bound to the underlay address. No SO_REUSEADDR or SO_REUSEPORT: a
  second daemon on the port must fail, not share it.
* VXLAN frames leave from a pool of sockets, each bound to its own port in the
  kernel's ephemeral range (RFC 7348 section 5: the source port carries entropy so
  receivers' RSS and ECMP fabrics spread flows; the engine picks a socket by a hash
  of the inner flow). Nothing is ever read from the pool: a classic BPF filter that
  accepts nothing keeps their receive queues empty whatever anyone sends there.
* Every socket: big buffers (SO_*BUFFORCE as root), outer DF clear and ICMP "frag
  needed" ignored (IP_PMTUDISC_OMIT; a forged one cannot shrink what we send), and
  SO_RXQ_OVFL so that each read reports the kernel's drops on the socket.
* The family is the address's: with EnableIPv6 the engine has a second VXLAN group
  and source-port pool on the underlay's IPv6 address (VXLAN over IPv6, as
  flannel-v6.<VNI>), IPV6_V6ONLY so that it never shares the IPv4 sockets' ports
  through mapped addresses, and IPV6_PMTUDISC_OMIT for the same reason as IPv4's.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import random
import socket
import struct

from udpflannel.core.errors import BadInput, UdpflannelError
from udpflannel.core.wire import SO_RXQ_OVFL

log = logging.getLogger(__name__)

SOCKET_BUFFER = 32 << 20  # room for ~250 GRO batches of 64 KB while the daemon is busy
SO_SNDBUFFORCE, SO_RCVBUFFORCE, SO_ATTACH_FILTER = 32, 33, 26
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104
IP_MTU_DISCOVER, IP_PMTUDISC_DONT, IP_PMTUDISC_OMIT = 10, 0, 5
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DONT, IPV6_PMTUDISC_OMIT = 23, 0, 5
OFFLOADS = ("tso", "gso", "gro")  # TUN super-packets, UDP_SEGMENT sends, UDP_GRO receives
EPHEMERAL = (32768, 60999)  # Linux's default ip_local_port_range, as kernel VXLAN uses


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class SocketError(UdpflannelError):
    """A port cannot be bound; the message says which and why, in one line."""


def endpoint(address: Address, port: int) -> str:
    """``10.0.0.5:8472`` or ``[fd00::5]:8472``, for messages and status."""
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _new_socket(address: Address) -> socket.socket:
    """A UDP socket of the address's family; IPv6 ones carry IPv6 only."""
    if address.version == 4:
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


def parse_offloads(text: str) -> frozenset[str]:
    """'auto' (all the kernel allows), 'off', or a comma list of OFFLOADS."""
    if text in ("auto", "all"):
        return frozenset(OFFLOADS)
    if text in ("off", "none", ""):
        return frozenset()
    wanted = frozenset(w.strip() for w in text.split(","))
    unknown = wanted - set(OFFLOADS)
    if unknown:
        raise BadInput(f"unknown offload {', '.join(sorted(unknown))} "
                         f"(choose from {', '.join(OFFLOADS)}, auto, off)")
    return wanted


def enable_udp_offloads(sock: socket.socket, wanted: frozenset[str], quiet: bool = False) -> frozenset[str]:
    """Turn on what the kernel accepts; what it refuses is simply not used."""
    got = set()
    for name, opt, value in (("gso", UDP_SEGMENT, 0), ("gro", UDP_GRO, 1)):
        if name in wanted:
            try:
                sock.setsockopt(SOL_UDP, opt, value)  # GSO: per-send size, 0 = off by default
                got.add(name)
            except OSError as e:
                if not quiet:
                    log.warning("UDP %s refused by the kernel (%s); continuing without it",
                                name.upper(), e.strerror)
    return frozenset(got)


def _tune(sock: socket.socket) -> None:
    for opt, fallback in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:  # not root: the capped, unforced size
            sock.setsockopt(socket.SOL_SOCKET, fallback, SOCKET_BUFFER)
    set_no_path_mtu(sock)
    sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
    sock.setblocking(False)


def set_no_path_mtu(sock: socket.socket) -> None:
    """Outer packets leave with DF clear and are fragmented if they exceed the
    interface MTU, as kernel VXLAN's are by default; ICMP "fragmentation needed"
    is ignored for this socket (IP_PMTUDISC_OMIT, Linux >= 3.16), so a forged one
    from any host cannot shrink what the node sends. Older kernels get DF clear
    alone (IP_PMTUDISC_DONT). IPv6 has no DF bit: the same options there make the
    sending host fragment to the interface's MTU and ignore "packet too big"."""
    level, option = ((socket.IPPROTO_IP, IP_MTU_DISCOVER) if sock.family == socket.AF_INET
                     else (socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER))
    try:
        sock.setsockopt(level, option, IP_PMTUDISC_OMIT)  # (IPV6_PMTUDISC_OMIT: the same 5)
    except OSError:
        sock.setsockopt(level, option, IP_PMTUDISC_DONT)


def open_udp_socket(address: Address, port: int, what: str = "UDP") -> socket.socket:
    sock = _new_socket(address)
    try:
        sock.bind((str(address), port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise SocketError(f"{what} port {port} on {address} is already in use "
                              "(another flanneld/udpflannel or a kernel VXLAN device?)") from None
        raise SocketError(f"cannot bind {what} {endpoint(address, port)}: {e.strerror}") from None
    _tune(sock)
    return sock


def open_udp_group(address: Address, port: int, count: int,
                   what: str = "UDP") -> list[socket.socket]:
    """``count`` sockets sharing one port with SO_REUSEPORT (one per queue; the kernel
    spreads datagrams over them by their addresses and ports). SO_REUSEPORT would also
    let a second daemon join the group silently, so the port is first bound alone:
    held by anyone, that fails as a plain bind does. (Our group, once made, makes a
    later daemon's plain probe fail the same way.)"""
    if count <= 1:
        return [open_udp_socket(address, port, what)]
    open_udp_socket(address, port, what).close()  # the probe: is anyone there?
    group = []
    try:
        for _ in range(count):
            sock = _new_socket(address)
            group.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((str(address), port))
            _tune(sock)
    except OSError as e:
        for sock in group:
            sock.close()
        raise SocketError(f"cannot bind {what} {endpoint(address, port)} for {count} queues: "
                          f"{e.strerror}") from None
    return group


_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)  # BPF_RET | BPF_K, 0: accept nothing


def _refuse_everything(sock: socket.socket) -> None:
    import ctypes
    program = ctypes.create_string_buffer(_DROP_ALL)
    fprog = struct.pack("HL", 1, ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def open_source_port_pool(address: Address, count: int,
                          ports: tuple[int, int] = EPHEMERAL,
                          rng: random.Random | None = None) -> list[socket.socket]:
    """``count`` send-only sockets on distinct random ports of ``ports`` (ports in use
    are skipped). Fewer when the range is crowded; never an error."""
    rng = rng or random.Random()
    pool: list[socket.socket] = []
    tried: set[int] = set()
    span = ports[1] - ports[0] + 1
    while len(pool) < count and len(tried) < min(span, count * 8):
        port = rng.randint(*ports)
        if port in tried:
            continue
        tried.add(port)
        sock = _new_socket(address)
        try:
            _refuse_everything(sock)
            sock.bind((str(address), port))
        except OSError:
            sock.close()
            continue
        _tune(sock)
        pool.append(sock)
    if len(pool) < count:
        log.warning("only %d of %d VXLAN source ports could be bound on %s", len(pool), count, address)
    return pool
