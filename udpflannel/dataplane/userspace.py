"""The userspace data plane: a TUN device, UDP sockets, and the engine between them.

Two ways to drive the engine (--io):
* loop: the fds are level-triggered readers on the (uv)loop: the TUN, the VXLAN
  socket and the flanneld-udp socket. A callback enters compiled code once and drains
  up to BUDGET packets with the GIL released, so the loop stays responsive to control
  work (route changes, renewals, the admin socket) between bursts. Route changes are
  applied on the loop thread, between drains: no locks.
* threads: the engine runs a thread per direction and queue, blocking in the kernel
  with no GIL; the loop keeps the control work. Route changes are published to the
  threads as a new table (engine.publish) and old tables reclaimed once unused. A
  thread that ends (the TUN deleted, a socket failed) writes to an eventfd the loop
  watches.

The TUN is persistent (host.tun): stop() closes our fds and leaves the device, its
address and its routes, so the next daemon re-attaches without an outage. If the
device is deleted under a running daemon, the TUN read fails (EBADFD) and the plane
builds it again and carries on, as flanneld re-creates its device.

Dual stack (EnableIPv6), as flanneld's vxlan backend: the IPv6 subnets travel as VXLAN
over IPv6 between the nodes' PublicIPv6 addresses, from a second set of sockets on the
underlay's IPv6 address (a VXLAN group and a source-port pool, sockets.py), framed
with the IPv6 VTEP MAC the lease publishes (BackendV6Data, flannel-v6.<VNI>'s). One
TUN carries both families: <subnet ::>/128 on it and the IPv6 overlay routed into it
with a route MTU 20 bytes below the device's (the longer outer header). IPv6-only
(EnableIPv4 false): no IPv4 sockets, address or route.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from typing import TYPE_CHECKING

from udpflannel.core.lease import Lease, LeaseEvent, mac_bytes
from udpflannel.core.peers import Framings, PeerRoute, RouteBook
from udpflannel.core.status import DataplaneStatus, PeerStatus
from udpflannel.core.wire import COUNTERS, VXLAN_PORT
from udpflannel.dataplane import sockets
from udpflannel.dataplane.base import ENGINE, DataplaneError, PlaneOptions, on_link
from udpflannel.dataplane.changes import log_changes
from udpflannel.host.tun import Tun
from udpflannel.host.tun import preflight as tun_preflight
from udpflannel.lazyimport import lazy

log = logging.getLogger(__name__)
# Needed once the node forwards, not before: a warm start (warmstart.py) runs before
# asyncio or netlink (pyroute2) are loaded, and must not wait for them.
if TYPE_CHECKING:
    import asyncio

    from udpflannel._engine import Engine
    from udpflannel.dataplane.pyengine import PyEngine
else:
    asyncio = lazy("asyncio")
netconf = lazy("udpflannel.host.netconf")
vxlandev = lazy("udpflannel.host.vxlandev")

BUDGET = 256
# The TUN device was deleted under us: EBADFD for a read that starts after, EFAULT
# for one that was blocked in it (tun_ring_recv sees RCV_SHUTDOWN).
GONE = (errno.EBADFD, errno.ENODEV, errno.ENXIO, errno.EFAULT)


def make_engine(kind: str, opts: PlaneOptions) -> Engine | PyEngine:
    """'compiled' (the default) or 'python' (the reference twin, slow)."""
    args = engine_args(opts)
    if kind == "python":
        from udpflannel.dataplane.pyengine import PyEngine
        return PyEngine(**args)
    from udpflannel._engine import Engine
    return Engine(**args)


def engine_args(opts: PlaneOptions) -> dict:
    """The engine's constructor arguments: the network of each family it carries
    (``network`` None: IPv6-only), and with IPv6 the VTEP MAC its IPv6 frames use."""
    cfg = opts.config
    args: dict = {"vni": cfg.vni, "vtep_mac": mac_bytes(opts.vtep_mac), "strict_source": opts.strict_source,
                  "network": str(cfg.network) if cfg.network else None, "subnet_len": cfg.subnet_len}
    if cfg.v6 is not None:
        if opts.vtep_mac6 is None:
            raise DataplaneError("EnableIPv6 needs a VTEP MAC for IPv6 (BackendV6Data)")
        args.update(network6=str(cfg.v6.network), subnet_len6=cfg.v6.subnet_len, vtep_mac6=mac_bytes(opts.vtep_mac6))
    return args


class EnginePlane:
    kind = ENGINE

    def __init__(self, opts: PlaneOptions, reason: str, on_loop: bool = True) -> None:
        self.opts = opts
        self.reason = reason
        self._failed: asyncio.Future[None] | None = None  # activate() makes it, on the loop
        self.offloads = opts.offloads if opts.engine == "compiled" else frozenset()
        cfg = opts.config
        # Ours is the config's port; the other framing's port is where we meet peers
        # of the other backend (a cluster migrating from udp to vxlan).
        self.vxlan_port = cfg.port if cfg.backend_type == "vxlan" else VXLAN_PORT
        self.udp_port = cfg.port if cfg.backend_type == "udp" else opts.udp_port
        self.book: RouteBook | None = None
        self.engine: Engine | PyEngine | None = None  # start() (or adopt(), warm()) makes it
        self.tun: Tun | None = None
        self.vxlan_sock: socket.socket | None = None
        self.udp_sock: socket.socket | None = None
        self.pool: list[socket.socket] = []
        self.vxlan6_group: list[socket.socket] = []  # EnableIPv6: VXLAN over IPv6, one per queue
        self.pool6: list[socket.socket] = []  # and its source ports
        self._udp_offloads: frozenset[str] = frozenset()
        self._gso = False
        self._batching: tuple[str, ...] = ()  # sendmmsg / recvmmsg, as at attach (check() logs a loss)
        self._subnet: ipaddress.IPv4Network | None = None
        self._subnet6: ipaddress.IPv6Network | None = None
        self._readers: list[int] = []
        self._direct: dict = {}  # subnet -> PublicIP of peers routed directly
        self.mtu = opts.mtu  # follows the underlay's (unless Backend.MTU): see check()
        self.vxlan_group: list[socket.socket] = []  # one per queue (threads, --queues)
        self._events: int | None = None  # eventfd: a data thread ended
        self._recreating = False
        if on_loop:  # (a warm start runs before there is a loop, or asyncio is imported)
            self.activate()

    # What exists once the plane runs (start(), adopt(), warm()); a call before is a bug.
    @property
    def failed(self) -> asyncio.Future[None]:
        assert self._failed is not None, "activate() first"
        return self._failed

    @property
    def _eng(self) -> Engine | PyEngine:
        assert self.engine is not None, "no engine yet"
        return self.engine

    @property
    def _compiled(self) -> Engine:
        """The engine, where only the compiled one gets here (threads, queues)."""
        from udpflannel._engine import Engine
        assert isinstance(self.engine, Engine), "the compiled engine only"
        return self.engine

    @property
    def _book(self) -> RouteBook:
        assert self.book is not None, "prepare() first"
        return self.book

    @property
    def _dev(self) -> Tun:
        assert self.tun is not None, "no TUN yet"
        return self.tun

    # --- life cycle -----------------------------------------------------------------
    async def prepare(self, remove_kernel_device: bool = True) -> None:
        """Bind every port before a lease is taken (a clash must not cost a lease)."""
        tun_preflight()
        # Our own flannel.<VNI> (and flannel-v6.<VNI>), left up by the kernel plane, holds
        # the VXLAN port: it goes before we bind (after a lease would be too late: the
        # bind fails).
        if remove_kernel_device:
            for version, mac in ((4, self.opts.vtep_mac), (6, self.opts.vtep_mac6)):  # (6: dual stack)
                name = vxlandev.device_name(self.opts.config.vni, version)
                if mac is None:
                    continue
                if await asyncio.to_thread(_delete_link, name, mac):
                    log.info("removed %s, left by the kernel data plane (it holds the VXLAN port)", name)
        self._bind_all()

    def _bind_all(self) -> None:
        cfg, underlay = self.opts.config, self.opts.underlay
        own = cfg.backend_type
        if cfg.enable_ipv4:
            assert underlay.address is not None  # found for IPv4 (find_underlay)
            self.vxlan_group, self.pool = self._bind_vxlan(underlay.address, required=own == "vxlan")
            self.vxlan_sock = self.vxlan_group[0] if self.vxlan_group else None
            if own == "udp":  # else bound only while a peer speaks it (_sync_bare_socket)
                assert self.udp_port is not None  # (the config's port)
                self.udp_sock = self._bind(underlay.address, self.udp_port, "flanneld udp", required=True)
        if cfg.enable_ipv6:  # (a udp backend has no IPv6: config.py refuses it)
            if underlay.address6 is None:
                raise DataplaneError("EnableIPv6 needs an IPv6 address on the underlay")
            if underlay.address6.is_link_local:  # (a socket cannot bind one without its scope)
                raise DataplaneError(f"the underlay's IPv6 address {underlay.address6} is link-local: the "
                                     "engine needs a global or unique local one (or --dataplane kernel)")
            self.vxlan6_group, self.pool6 = self._bind_vxlan(underlay.address6, required=True)
        if not self._listening():
            raise DataplaneError("no UDP port could be bound")
        first = self._listening()[0]
        for sock in self._sockets():
            got = sockets.enable_udp_offloads(sock, self.offloads & {"gso", "gro"}, quiet=sock is not first)
            self._udp_offloads = got if sock is first else self._udp_offloads
        self.book = make_book(self.opts, self.vxlan_port, self.udp_port)

    def _bind_vxlan(self, address, required: bool) -> tuple[list[socket.socket], list[socket.socket]]:
        """The VXLAN group on ``address`` (one socket per queue) and its source-port pool."""
        group = self._bind_group(address, self.vxlan_port, required)
        pool = (sockets.open_source_port_pool(address, self.opts.source_ports)
                if group and self.opts.source_ports else [])
        return group, pool

    def _listening(self) -> list[socket.socket]:
        """The sockets peers send to, queue 0's: VXLAN over IPv4, flanneld udp, VXLAN over IPv6."""
        return [s for s in (self.vxlan_sock, self.udp_sock, self.vxlan6_sock) if s is not None]

    @property
    def vxlan6_sock(self) -> socket.socket | None:
        return self.vxlan6_group[0] if self.vxlan6_group else None

    def _wants_bare_socket(self) -> bool:
        """flanneld's udp framing port is open only while it is spoken here: the
        config's backend is udp, or a peer's lease is (a cluster migrating from udp):
        a port that is open in every vxlan cluster would only let spoofed packets in."""
        return self.opts.config.backend_type == "udp" or any(
            r.framing == "udp" for r in self._book.routes.values())

    def _sync_bare_socket(self, running: bool) -> None:
        """Open or close the udp framing port as _wants_bare_socket says; with the data
        path ``running``, its readers pause for the change."""
        want = bool(self.udp_port) and self._wants_bare_socket()
        if want == (self.udp_sock is not None):
            return
        if running:
            self._stop_reading()
        if want and self.udp_port:  # (want says it is set)
            self.udp_sock = self._bind(self.opts.underlay.address, self.udp_port, "flanneld udp", required=False)
            if self.udp_sock is not None:
                sockets.enable_udp_offloads(self.udp_sock, self._udp_offloads & {"gro"}, quiet=True)
                log.info("flanneld udp framing: listening on port %d (a peer speaks it)", self.udp_port)
        elif self.udp_sock is not None:  # (want is False: it is open)
            self.udp_sock.close()
            self.udp_sock = None
            log.info("flanneld udp framing: port %d closed (no peer speaks it)", self.udp_port)
        if self.engine is not None:
            self.engine.set_bare_fd(self.udp_sock.fileno() if self.udp_sock else -1)
        if running:
            self._start_reading()

    def _bind_group(self, address, port: int, required: bool) -> list[socket.socket]:
        try:
            return sockets.open_udp_group(address, port, self.opts.queues, "VXLAN")
        except sockets.SocketError as e:
            if required:
                raise DataplaneError(str(e)) from None
            log.warning("%s; peers that need it are left out", e)
            return []

    def _bind(self, address, port: int, what: str, required: bool) -> socket.socket | None:
        try:
            return sockets.open_udp_socket(address, port, what)
        except sockets.SocketError as e:
            if required:
                raise DataplaneError(str(e)) from None
            log.warning("%s; peers that need it are left out", e)
            return None

    async def start(self, lease: Lease) -> None:
        if self.engine is not None and (self._subnet, self._subnet6) == (lease.subnet, lease.ipv6_subnet):
            # forwarding already (taken over, or a warm start): make sure the device
            # still has its address, routes and MTU, as a fresh start sets them
            await asyncio.to_thread(self._configure_tun, self._dev, self.mtu)
            return
        self._new_engine(lease.subnet, lease.ipv6_subnet)
        await self._attach_tun()

    def _new_engine(self, subnet: ipaddress.IPv4Network | None, subnet6: ipaddress.IPv6Network | None) -> None:
        """The engine for this node's subnets (one per family the lease holds)."""
        self._subnet, self._subnet6 = subnet, subnet6
        self.engine = make_engine(self.opts.engine, self.opts)
        for own in (subnet, subnet6):
            if own is not None:
                self.engine.set_subnet(str(own))

    def _configure_tun(self, tun: Tun, mtu: int) -> None:
        """The TUN's addresses, routes and MTU (netlink: on a worker thread). The IPv6
        overlay's route MTU is 20 bytes less: VXLAN over IPv6 has the longer outer
        header (flannel-v6.<VNI>'s MTU, as the kernel caps it: vxlandev.device_mtu)."""
        cfg = self.opts.config
        netconf.configure_tun(tun.name, self._subnet, cfg.network, mtu, tun.tso, subnet6=self._subnet6,
                              network6=cfg.ipv6_network if cfg.enable_ipv6 else None,
                              mtu6=mtu - vxlandev.VXLAN6_EXTRA)

    def _sockets(self) -> list[socket.socket]:
        return (self.vxlan_group + [s for s in (self.udp_sock,) if s] + self.pool
                + self.vxlan6_group + self.pool6)

    @property
    def threaded(self) -> bool:
        return self.opts.io in ("threads", "poll")

    async def _attach_tun(self) -> None:
        """Create or re-attach the TUN, configure it, and start reading everything."""
        # on a worker thread: it may ask netlink (pyroute2's sync API cannot run on uvloop)
        tun = await asyncio.to_thread(Tun, self.opts.tun, "tso" in self.offloads, True,
                                      self.opts.queues, self.threaded)
        try:
            await asyncio.to_thread(self._configure_tun, tun, self.mtu)
        except BaseException:
            tun.close()
            raise
        if tun.existed:
            log.info("re-attached to %s", tun.name)
        self.tun = tun
        self._attach_engine(tun)
        self._start_reading()

    def _attach_engine(self, tun: Tun) -> None:
        """Give the engine the TUN's queue fds and our sockets."""
        gso = "gso" in self._udp_offloads and bool(self._listening())
        self._eng.attach(
            tun.fd, _fd(self.vxlan_sock), bare_fd=_fd(self.udp_sock), tx_fds=_send_fds(self.pool, self.vxlan_sock),
            udp6_fd=_fd(self.vxlan6_sock), tx6_fds=_send_fds(self.pool6, self.vxlan6_sock),
            vnet_hdr=tun.vnet_hdr, gso=gso, gro="gro" in self._udp_offloads)
        for q in range(self._eng.queues(), self.opts.queues):  # first attach only
            self._compiled.add_queue(tun.fds[q], _fd(_nth(self.vxlan_group, q)), _fd(_nth(self.vxlan6_group, q)))
        for q in range(1, self.opts.queues):  # a re-created TUN: its new queue fds
            self._compiled.set_tun_fd(q, tun.fds[q])
        self._gso = gso
        self._batching = batching(self._eng.offloads())
        log.info("offloads: TUN %s, UDP GSO %s, UDP GRO %s; batching: %s; VXLAN source ports: %s",
                 tun.offloads, "on" if gso else "off", "on" if "gro" in self._udp_offloads else "off",
                 ", ".join(self._batching) or "none (one datagram per system call)",
                 " + ".join(f"{len(pool) or 1} {family}" for family, pool, group in
                            (("IPv4", self.pool, self.vxlan_group), ("IPv6", self.pool6, self.vxlan6_group))
                            if group))

    def _start_reading(self) -> None:
        """The data path runs from here: its threads, or the loop's readers."""
        loop = asyncio.get_running_loop()
        for fd in self._dev.fds:  # (adopted fds keep the mode their first owner set)
            os.set_blocking(fd, self.threaded)
        if self.threaded:
            self._start_threads(loop)
            return
        if self.opts.cpus:  # the loop thread is the data path (threads it starts inherit)
            os.sched_setaffinity(0, self.opts.cpus)
            log.info("data path: %s", self._io_text())
        tun = self._dev
        for sock in self._sockets():
            sock.setblocking(False)
        loop.add_reader(tun.fd, self._on_tun)
        self._readers = [tun.fd]
        if self.vxlan_sock is not None:
            loop.add_reader(self.vxlan_sock.fileno(), self._on_vxlan)
            self._readers.append(self.vxlan_sock.fileno())
        if self.udp_sock is not None:
            loop.add_reader(self.udp_sock.fileno(), self._on_bare)
            self._readers.append(self.udp_sock.fileno())
        if self.vxlan6_sock is not None:
            loop.add_reader(self.vxlan6_sock.fileno(), self._on_vxlan6)
            self._readers.append(self.vxlan6_sock.fileno())

    def _start_threads(self, loop) -> None:
        self._start_engine_threads()
        loop.add_reader(self._events, self._on_thread_event)

    def _start_engine_threads(self) -> None:
        """The data-path threads, told to write the eventfd when one ends (which the
        loop watches once there is one: activate())."""
        for sock in self._sockets():
            sock.setblocking(True)  # threads block in recvmsg; sends wait instead of drop
        if self._events is None:
            self._events = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._compiled.set_cpus(self.opts.cpus)
        self._compiled.start_threads(self._events, poll=self.opts.io == "poll")
        self._readers = [self._events]
        log.info("data path: %s (%d threads running)", self._io_text(), self._compiled.running_threads())

    def activate(self) -> None:
        """On the event loop: the failure future, and (a plane started warm, before
        there was a loop) the loop's watch on the threads' eventfd."""
        loop = asyncio.get_running_loop()
        if self._failed is None:
            self._failed = loop.create_future()
        if self._events is not None and self._readers == [self._events]:
            loop.add_reader(self._events, self._on_thread_event)
            self._on_thread_event()  # a thread that ended meanwhile

    def _on_thread_event(self) -> None:
        assert self._events is not None  # (it is what calls us)
        try:
            os.eventfd_read(self._events)
        except BlockingIOError:
            return
        for role, queue, err in self._compiled.thread_errors():
            if role == "tun" and err in GONE:
                if not self._recreating:
                    self._recreating = True
                    asyncio.ensure_future(self._recreate_tun())
            else:
                what = "the TUN device" if role == "tun" else f"the UDP socket of queue {queue}"
                self._fail(f"reading {what} failed: {os.strerror(err)}")

    def _stop_reading(self) -> None:
        if self._readers and self._failed is not None:  # activated: the loop watches these fds
            loop = asyncio.get_running_loop()
            for fd in self._readers:
                loop.remove_reader(fd)
        self._readers = []
        if self.threaded and self.engine is not None:
            self._compiled.stop_threads()

    async def stop(self) -> None:
        """Close our fds; the TUN, its address and routes stay for the next daemon."""
        self.close()

    def close(self) -> None:
        self._stop_reading()
        if self._events is not None:
            os.close(self._events)
            self._events = None
        if self.tun is not None:
            self.tun.close()
            self.tun = None
        for sock in self._sockets():
            sock.close()

    # --- takeover (dataplane/handoff.py) -------------------------------------------------
    def describe(self) -> dict:
        """What this plane forwards with: enough to go on with its fds (a takeover) or
        to set it up again before the registry answers (a warm start, warmstart.py)."""
        return {
            "kind": ENGINE, "queues": self.opts.queues, "subnet": _text(self._subnet),
            "subnet6": _text(self._subnet6), "mtu": self.mtu,
            "tun": {"name": self._dev.name, "vnet_hdr": self._dev.vnet_hdr, "tso": self._dev.tso,
                    "offloads": self._dev.offloads},
            "vxlan_port": self.vxlan_port,
            "udp_offloads": sorted(self._udp_offloads), "pool": len(self.pool), "pool6": len(self.pool6),
            "routes": [[str(r.subnet), str(r.public_ip), r.framing, r.port, r.vtep_mac]
                       for r in self._book.routes.values()],
            "direct": [[str(subnet), str(via)] for subnet, via in self._direct.items()],
        }

    def pause_for_handoff(self) -> tuple[dict, dict[str, int]]:
        """Stop reading (threads joined, loop readers removed), keep every fd open, and
        say what a new daemon needs to go on forwarding with them: (state, fds by role)."""
        self._stop_reading()
        fds = {f"tun{q}": fd for q, fd in enumerate(self._dev.fds)}
        fds.update({f"vxlan{q}": s.fileno() for q, s in enumerate(self.vxlan_group)})
        if self.udp_sock is not None:
            fds["udp"] = self.udp_sock.fileno()
        fds.update({f"pool{i}": s.fileno() for i, s in enumerate(self.pool)})
        fds.update({f"vxlan6_{q}": s.fileno() for q, s in enumerate(self.vxlan6_group)})
        fds.update({f"pool6_{i}": s.fileno() for i, s in enumerate(self.pool6)})
        return self.describe(), fds

    def resume(self) -> None:
        """A takeover fell through: read again, as before."""
        self._start_reading()
        log.info("the takeover fell through: forwarding again")

    @classmethod
    def adopt(cls, opts: PlaneOptions, reason: str, state: dict, handed) -> "EnginePlane":
        """A plane that forwards with another daemon's fds (``handed``: a
        handoff.Handed) and state, from the moment this returns. Offloads follow the
        fds (a TUN's virtio header is fixed when it is opened): to change them, restart."""
        plane = cls(opts, reason)
        if state.get("kind") != ENGINE:
            raise DataplaneError(f"the running daemon's data plane is {state.get('kind')!r}, not the engine")
        if state["queues"] != opts.queues:
            raise DataplaneError(f"the running daemon has {state['queues']} queue(s), this one asks for "
                                 f"{opts.queues}: restart instead of taking over")
        sock = lambda role: socket.socket(fileno=handed.take(role))  # noqa: E731
        plane.vxlan_group = [sock(f"vxlan{q}") for q in range(opts.queues) if f"vxlan{q}" in handed.fds]
        plane.vxlan_sock = plane.vxlan_group[0] if plane.vxlan_group else None
        plane.udp_sock = sock("udp") if "udp" in handed.fds else None
        plane.pool = [sock(f"pool{i}") for i in range(state["pool"])]
        plane.vxlan6_group = [sock(f"vxlan6_{q}") for q in range(opts.queues) if f"vxlan6_{q}" in handed.fds]
        plane.pool6 = [sock(f"pool6_{i}") for i in range(state.get("pool6", 0))]  # (an older daemon: none)
        plane.vxlan_port = state["vxlan_port"]
        plane._udp_offloads = frozenset(state["udp_offloads"])
        t = state["tun"]
        plane.tun = Tun.adopt(t["name"], [handed.take(f"tun{q}") for q in range(opts.queues)],
                              vnet_hdr=t["vnet_hdr"], tso=t["tso"], offloads=t["offloads"])
        plane.offloads = frozenset(name for name, on in (("tso", t["vnet_hdr"]), ("gso", "gso" in plane._udp_offloads),
                                                        ("gro", "gro" in plane._udp_offloads)) if on)
        plane.mtu = state["mtu"]
        plane.book = make_book(opts, plane.vxlan_port, plane.udp_port)
        plane._new_engine(*remembered_subnets(state))
        plane._attach_engine(plane.tun)
        plane._load_routes(state)
        plane._sync_bare_socket(running=False)
        plane._start_reading()
        log.info("took over %s from the running daemon: %d routes, forwarding", plane.tun.name,
                 len(plane.book.routes))
        return plane

    @classmethod
    def warm(cls, opts: PlaneOptions, state: dict) -> "EnginePlane":
        """A restart that forwards before anything else: the ports bound, the
        persistent TUN re-attached, the routes this node last had (``state``, from
        describe(), kept in the state dir) in the engine, its threads running. No
        event loop yet, no netlink: activate() joins the loop later, and start()
        checks the device's address and routes. Threaded I/O only (poll, threads)."""
        if not (opts.io in ("threads", "poll") and opts.engine == "compiled"):
            raise DataplaneError("a warm start needs the compiled engine on its own threads")
        plane = cls(opts, "warm start from the state dir", on_loop=False)
        tun_preflight()
        try:
            plane._bind_all()
            plane._new_engine(*remembered_subnets(state))
            plane.tun = Tun(opts.tun, "tso" in plane.offloads, True, opts.queues, True)
            if not plane.tun.existed:
                raise DataplaneError(f"{opts.tun} was gone")
            plane._attach_engine(plane.tun)
            plane._load_routes(state)
            plane._sync_bare_socket(running=False)
            plane._start_engine_threads()
        except BaseException:
            plane.close()
            raise
        log.info("warm start: forwarding on %s with the %d routes it last had", opts.tun, len(plane._book.routes))
        return plane

    def _load_routes(self, state: dict) -> None:
        """The routes of describe()'s ``state``, into the book and the engine at once."""
        for subnet, public_ip, framing, port, mac in state["routes"]:
            route = PeerRoute(ipaddress.ip_network(subnet), ipaddress.ip_address(public_ip), framing, port, mac)
            self._book.routes[route.subnet] = route
            self._eng.set_route(subnet, public_ip, port, mac_bytes(mac) if mac else None, framing)
        self._eng.publish()
        self._direct = {ipaddress.ip_network(s): ipaddress.ip_address(v) for s, v in state["direct"]}

    # --- data path callbacks ----------------------------------------------------------
    def _on_tun(self) -> None:
        n = self._eng.drain_tun(BUDGET)
        if n < 0:
            if -n in GONE:
                self._stop_reading()
                asyncio.ensure_future(self._recreate_tun())
            else:
                self._fail(f"reading the TUN device failed: {os.strerror(-n)}")

    def _on_vxlan(self) -> None:
        n = self._eng.drain_udp(BUDGET)
        if n < 0:
            self._fail(f"receiving on the VXLAN socket failed: {os.strerror(-n)}")

    def _on_vxlan6(self) -> None:
        n = self._eng.drain_udp6(BUDGET)
        if n < 0:
            self._fail(f"receiving on the IPv6 VXLAN socket failed: {os.strerror(-n)}")

    def _on_bare(self) -> None:
        n = self._eng.drain_bare(BUDGET)
        if n < 0:
            self._fail(f"receiving on the flanneld udp socket failed: {os.strerror(-n)}")

    async def _recreate_tun(self) -> None:
        log.warning("%s was deleted under us; creating it again", self.opts.tun)
        self._stop_reading()
        if self.tun is not None:
            self.tun.close()
            self.tun = None
        try:
            await self._attach_tun()
            self._recreating = False
            for subnet, via in self._direct.items():
                await asyncio.to_thread(netconf.set_direct_route, subnet, via, self.opts.underlay, True)
        except Exception as e:  # noqa: BLE001 - reported as the plane's failure
            self._fail(f"re-creating {self.opts.tun} failed: {e}")
            return
        log.info("%s is back", self.opts.tun)

    def _fail(self, message: str) -> None:
        self._stop_reading()
        if not self.failed.done():
            self.failed.set_exception(DataplaneError(message))

    # --- control: lease events -> routes ----------------------------------------------
    async def apply(self, events: list[LeaseEvent]) -> None:
        changes = self._book.plan(events)
        for route in changes.remove:
            self._eng.del_route(str(route.subnet))
            if route.subnet in self._direct:
                await asyncio.to_thread(netconf.set_direct_route, route.subnet,
                                        self._direct.pop(route.subnet), self.opts.underlay, False)
        for route in changes.add:
            self._eng.set_route(str(route.subnet), str(route.public_ip), route.port,
                                  mac_bytes(route.vtep_mac) if route.vtep_mac else None,
                                  route.framing)
        self._eng.publish()  # threads: the new table in one atomic store
        if changes.add or changes.remove:
            self._sync_bare_socket(running=bool(self._readers))
        for route in changes.add:
            await self._direct_routing(route)
        log_changes(events, changes, self._eng.route_count())

    async def _direct_routing(self, route: PeerRoute) -> None:
        """DirectRouting: a vxlan peer on our own link gets a kernel route via its
        PublicIP, more specific than the overlay's route into the TUN, so its traffic
        never enters the engine (the engine keeps its route, to accept what it sends)."""
        if not self.opts.config.direct_routing or route.framing != "vxlan":
            return
        gateway, oif = await asyncio.to_thread(netconf.route_get, route.public_ip)
        if on_link(self.opts.underlay, route.public_ip, gateway, oif):
            await asyncio.to_thread(netconf.set_direct_route, route.subnet, route.public_ip,
                                    self.opts.underlay, True)
            self._direct[route.subnet] = route.public_ip

    async def check(self) -> None:
        """Follow the underlay's MTU; say once in the log when the engine turned UDP GSO
        off for good (the kernel answered EIO: the egress device cannot checksum-offload)."""
        await self._follow_underlay_mtu()
        if self.engine is not None:
            self.engine.reclaim()  # tables replaced while threads read them
        if self._gso and self.engine is not None and not self.engine.offloads()["gso"]:
            self._gso = False
            log.warning("UDP GSO turned off: the kernel cannot segment on this path (EIO); "
                        "sending datagrams one by one")
        if self.engine is not None and self._batching:
            now = batching(self.engine.offloads())
            for name in sorted(set(self._batching) - set(now)):
                log.warning("%s turned off: the kernel refused it (ENOSYS); one datagram per call", name)
            self._batching = now

    async def _follow_underlay_mtu(self) -> None:
        """The underlay's MTU changed under us (a VPN, a cloud's jumbo frames turned
        off): the TUN follows, so the local stack sizes segments for the path instead
        of every frame being fragmented (kernel VXLAN gets there by path-MTU discovery
        on the inner flows). An explicit Backend.MTU is the operator's and stays."""
        if self.opts.config.mtu or self.tun is None:
            return
        underlay = await asyncio.to_thread(netconf.link_mtu, self.opts.underlay.ifindex)
        if underlay is None:
            return
        wanted = underlay - (self.opts.underlay.mtu - self.opts.mtu)  # the framing's overhead
        if wanted != self.mtu and wanted >= 576:
            log.warning("underlay %s MTU is now %d: %s MTU %d -> %d", self.opts.underlay.ifname,
                        underlay, self.opts.tun, self.mtu, wanted)
            await asyncio.to_thread(self._configure_tun, self.tun, wanted)  # (the IPv6 route's MTU too)
            self.mtu = wanted

    # --- status -----------------------------------------------------------------------
    def status(self) -> DataplaneStatus:
        e = self.engine
        offloads: tuple[str, ...] = ()
        if e is not None:
            got = e.offloads()
            offloads = tuple(name for name, key in (("tso", "vnet_hdr"), ("gso", "gso"), ("gro", "gro"))
                             if got[key] and (name != "tso" or (self.tun and self.tun.tso)))
        return DataplaneStatus(
            kind=self.kind, reason=self.reason, device=self.opts.tun, mtu=self.mtu,
            offloads=offloads, batching=batching(e.offloads()) if e else (),
            io=self._io_text(), peers=e.route_count() if e else 0,
            forwarding=bool(self._readers),
            counters=e.counters() if e else dict.fromkeys(COUNTERS, 0),
            kernel_drops=e.kernel_drops() if e else 0, listening=self._listening_text())

    def _listening_text(self) -> tuple[str, ...]:
        """Queue 0's sockets as status shows them: "VXLAN [fd00::5]:8472"."""
        return tuple(f"{'flanneld udp' if sock is self.udp_sock else 'VXLAN'} {_where(sock)}"
                     for sock in self._listening())

    def _io_text(self) -> str:
        """How the engine runs, for `udpflannel status`: "loop", "threads, 2 queues",
        "poll, 1 queue", and the CPUs it is pinned to."""
        text = "loop" if not self.threaded else (
            f"{self.opts.io}, {self.opts.queues} queue{'' if self.opts.queues == 1 else 's'}")
        if self.opts.cpus:
            text += f", CPUs {','.join(map(str, self.opts.cpus))}"
        return text

    def peers(self) -> tuple[PeerStatus, ...]:
        routes = self._book.routes.values() if self.book else ()
        return tuple(PeerStatus(str(r.subnet), str(r.public_ip), r.framing) for r in routes)


def remembered_subnets(state: dict) -> tuple[ipaddress.IPv4Network | None, ipaddress.IPv6Network | None]:
    """The subnets describe() remembered (an older daemon's state has no IPv6 one)."""
    subnet, subnet6 = state["subnet"], state.get("subnet6")
    return (ipaddress.IPv4Network(subnet) if subnet else None,
            ipaddress.IPv6Network(subnet6) if subnet6 else None)


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _where(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:  # closed
        return "closed"
    return sockets.endpoint(ipaddress.ip_address(host), port)


def _fd(sock: socket.socket | None) -> int:
    return sock.fileno() if sock is not None else -1


def _nth(group: list[socket.socket], q: int) -> socket.socket | None:
    return group[q] if q < len(group) else None


def _send_fds(pool: list[socket.socket], listening: socket.socket | None) -> list[int]:
    """The source-port pool, or (none bound) the listening socket itself."""
    return [s.fileno() for s in pool] or ([listening.fileno()] if listening is not None else [])


def make_book(opts: PlaneOptions, vxlan_port: int, udp_port: int | None) -> RouteBook:
    """The plane's routing policy (core.peers): our own public addresses are no peers."""
    return RouteBook(opts.config, opts.underlay.public_ip, Framings(vxlan_port, udp_port or None),
                     opts.underlay.network, own_public_ipv6=opts.underlay.public_ip6)


def batching(offloads: dict[str, bool]) -> tuple[str, ...]:
    """The batched calls an engine's offloads() says it uses (sendmmsg, recvmmsg)."""
    return tuple(name for name in ("sendmmsg", "recvmmsg") if offloads.get(name))


def _delete_link(name: str, mac: str) -> bool:
    """Delete the VXLAN device ``name`` if it is ours (our VTEP MAC); a stranger's
    (a flanneld's) stays, and the bind then says that the port is taken."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        index = vxlandev.find(ipr, name)
        if index is None or ipr.link("get", index=index)[0].get("address") != mac:
            return False
        ipr.link("del", index=index)
        return True
