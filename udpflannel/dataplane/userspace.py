"""Event-loop adapter: TUN fd and UDP socket fd -> the engine's drain loops.

Both fds are level-triggered readers on the (uv)loop. A callback enters compiled code
once and drains up to BUDGET packets with the GIL released, so the loop stays
responsive to control work (route changes, renewals, the admin socket) between
bursts. Route changes are applied on the loop thread, between drains: no locks.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket

from udpflannel.core.config import NetworkConfig
from udpflannel.core.frame import PyEngine
from udpflannel.core.lease import EventType, Lease, LeaseEvent, mac_bytes

log = logging.getLogger(__name__)

BUDGET = 256
LOG_EACH = 20  # lease events logged one by one up to this batch size
SOCKET_BUFFER = 32 << 20  # room for ~250 GRO batches of 64 KB while the daemon is busy
SO_SNDBUFFORCE, SO_RCVBUFFORCE, SO_RXQ_OVFL = 32, 33, 40
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104
IP_MTU_DISCOVER, IP_PMTUDISC_DONT, IP_PMTUDISC_OMIT = 10, 0, 5
OFFLOADS = ("tso", "gso", "gro")  # TUN super-packets, UDP_SEGMENT sends, UDP_GRO receives


def parse_offloads(text: str) -> frozenset[str]:
    """'auto' (all the kernel allows), 'off', or a comma list of OFFLOADS."""
    if text in ("auto", "all"):
        return frozenset(OFFLOADS)
    if text in ("off", "none", ""):
        return frozenset()
    wanted = frozenset(w.strip() for w in text.split(","))
    unknown = wanted - set(OFFLOADS)
    if unknown:
        raise ValueError(f"unknown offload {', '.join(sorted(unknown))} (choose from {', '.join(OFFLOADS)}, auto, off)")
    return wanted


def enable_udp_offloads(sock: socket.socket, wanted: frozenset[str]) -> frozenset[str]:
    """Turn on what the kernel accepts; what it refuses is simply not used."""
    got = set()
    for name, opt, value in (("gso", UDP_SEGMENT, 0), ("gro", UDP_GRO, 1)):
        if name in wanted:
            try:
                sock.setsockopt(SOL_UDP, opt, value)  # GSO: per-send size, 0 = off by default
                got.add(name)
            except OSError as e:
                log.warning("UDP %s refused by the kernel (%s); continuing without it",
                            name.upper(), e.strerror)
    return frozenset(got)


class DataplaneError(Exception):
    pass


def make_engine(kind: str, config: NetworkConfig, lease: Lease, strict_source: bool = False):
    """'compiled' (the default) or 'python' (the reference twin, slow)."""
    args = dict(vni=config.vni, vtep_mac=mac_bytes(lease.vtep_mac), network=str(config.network),
                subnet_len=config.subnet_len, strict_source=strict_source)
    if kind == "python":
        return PyEngine(**args)
    from udpflannel._engine import Engine
    return Engine(**args)


def open_udp_socket(address: ipaddress.IPv4Address, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:  # no SO_REUSEADDR: a second daemon on this port must fail, not share it
        sock.bind((str(address), port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise DataplaneError(f"UDP port {port} on {address} is already in use "
                                 "(another flanneld/udpflannel or a kernel VXLAN device?)") from None
        raise DataplaneError(f"cannot bind UDP {address}:{port}: {e.strerror}") from None
    for opt, fallback in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:  # not root: the capped, unforced size
            sock.setsockopt(socket.SOL_SOCKET, fallback, SOCKET_BUFFER)
    set_no_path_mtu(sock)
    sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)  # every read reports kernel drops
    sock.setblocking(False)
    return sock


def set_no_path_mtu(sock: socket.socket) -> None:
    """Outer packets leave with DF clear and are fragmented if they exceed the
    interface MTU, as kernel VXLAN's are by default; ICMP "fragmentation needed"
    is ignored for this socket (IP_PMTUDISC_OMIT, Linux >= 3.16), so a forged one
    from any host cannot shrink what the node sends (issue 7 part 1). Older kernels
    get DF clear alone (IP_PMTUDISC_DONT)."""
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_OMIT)
    except OSError:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)


class Dataplane:
    def __init__(self, engine, tun, sock: socket.socket, config: NetworkConfig,
                 port: int, offloads: frozenset[str] = frozenset()) -> None:
        self.engine = engine
        self.tun_fd = tun.fd
        self.sock = sock
        self.config = config
        self.port = port
        self.failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        udp = enable_udp_offloads(sock, offloads)
        engine.attach(tun.fd, sock.fileno(), vnet_hdr=tun.vnet_hdr, gso="gso" in udp,
                      gro="gro" in udp)
        self._gso = "gso" in udp
        log.info("offloads: TUN %s, UDP GSO %s, UDP GRO %s", getattr(tun, "offloads", "none"),
                 *("on" if x else "off" for x in ("gso" in udp, "gro" in udp)))

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.tun_fd, self._on_tun)
        loop.add_reader(self.sock.fileno(), self._on_udp)

    def stop(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.tun_fd)
        loop.remove_reader(self.sock.fileno())

    def _on_tun(self) -> None:
        n = self.engine.drain_tun(BUDGET)
        if n < 0:
            self._fail(f"reading the TUN device failed: {os.strerror(-n)}")

    def _on_udp(self) -> None:
        n = self.engine.drain_udp(BUDGET)
        if n < 0:
            self._fail(f"receiving on the UDP socket failed: {os.strerror(-n)}")

    def check_offloads(self) -> None:
        """Say once in the log when the engine turned UDP GSO off for good (the kernel
        answered EIO: the egress device cannot checksum-offload)."""
        if self._gso and not self.engine.offloads()["gso"]:
            self._gso = False
            log.warning("UDP GSO turned off: the kernel cannot segment on this path (EIO); "
                        "sending datagrams one by one")

    def _fail(self, message: str) -> None:
        self.stop()
        if not self.failed.done():
            self.failed.set_exception(DataplaneError(message))

    # --- control: lease events -> routes ------------------------------------------
    def apply(self, events: list[LeaseEvent]) -> None:
        """Lease events -> route changes. One log line per peer, except for big batches
        (a snapshot of thousands of leases) which get a summary line."""
        detail = log.info if len(events) <= LOG_EACH else log.debug
        added = removed = ignored = 0
        for ev in events:
            lease = ev.lease
            if ev.type is EventType.REMOVED:
                if self._remove(lease):
                    removed += 1
                    detail("peer removed: %s", lease.subnet)
                continue
            reason = self._unusable(lease)
            if reason is None:
                try:
                    self.engine.set_route(str(lease.subnet), str(lease.public_ip), self.port,
                                          mac_bytes(lease.vtep_mac))
                    added += 1
                    detail("peer added: %s via %s (VTEP %s)", lease.subnet, lease.public_ip,
                           lease.vtep_mac)
                    continue
                except ValueError as e:
                    reason = str(e)
            self._remove(lease)
            ignored += 1
            detail("ignoring lease %s from %s: %s", lease.subnet, lease.public_ip, reason)
        if len(events) > LOG_EACH:
            log.info("applied %d lease changes: %d peers added, %d removed, %d ignored; %d peers",
                     len(events), added, removed, ignored, self.routes())

    def _remove(self, lease: Lease) -> bool:
        try:
            return self.engine.del_route(str(lease.subnet))
        except ValueError:  # not a subnet of ours: it never had a route
            return False

    def _unusable(self, lease: Lease) -> str | None:
        if not lease.routable_by_vxlan():
            return f"backend type {lease.backend_type or 'udp'!r} does not speak VXLAN framing"
        if lease.vni is not None and lease.vni != self.config.vni:
            return f"VNI {lease.vni} differs from ours ({self.config.vni})"
        if not self.config.contains_subnet(lease.subnet):
            return f"not a /{self.config.subnet_len} inside {self.config.network}"
        return None

    def routes(self) -> int:
        return self.engine.route_count()
