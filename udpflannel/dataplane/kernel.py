"""The kernel data plane: flanneld's vxlan backend, exactly (host.vxlandev).

The kernel forwards; this module only programs ``flannel.<VNI>`` from the same lease
events the engine gets, through the same policy (core.peers, with VXLAN as the only
framing: a flanneld udp peer is refused with a log line). Reusing a matching device
and replacing entries idempotently makes a restart no outage, and stop() leaves it
all in place, as flanneld leaves it. After the first snapshot, entries of peers that
left while we were down are pruned. A device deleted under us is built again with
every peer (check()).

pyroute2's sync API runs on a worker thread (it runs an event loop of its own), one
call at a time (the lock), so changes are never interleaved.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from pyroute2 import IPRoute

from udpflannel.core.lease import Lease, LeaseEvent
from udpflannel.core.peers import Framings, PeerRoute, RouteBook
from udpflannel.core.status import DataplaneStatus, PeerStatus
from udpflannel.core.wire import COUNTERS
from udpflannel.dataplane.base import KERNEL, PlaneOptions, on_link
from udpflannel.dataplane.changes import log_changes
from udpflannel.host import netconf, vxlandev

log = logging.getLogger(__name__)


class KernelPlane:
    kind = KERNEL

    def __init__(self, opts: PlaneOptions, reason: str) -> None:
        self.opts = opts
        self.reason = reason
        self.failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        cfg, underlay = opts.config, opts.underlay
        self.spec = vxlandev.DeviceSpec(vxlandev.device_name(cfg.vni), cfg.vni, cfg.port,
                                        underlay.address, underlay.ifindex, opts.vtep_mac, opts.mtu)
        self.book = RouteBook(cfg, underlay.public_ip, Framings(cfg.port, None), underlay.network)
        self.index: int | None = None
        self.entries: dict = {}  # subnet -> vxlandev.PeerEntry as programmed
        self._subnet = None
        self._first = True
        self._stats: dict[str, int] = {}
        self._lock = threading.Lock()

    def _netlink(self, fn, *args):
        def call():
            with self._lock, IPRoute() as ipr:
                return fn(ipr, *args)
        return asyncio.to_thread(call)

    async def prepare(self) -> None:
        """Create (or reuse) the device and bring it up: this is where a kernel without
        VXLAN, a container without the right, or a busy port shows (auto's probe)."""
        self.index, created = await self._netlink(vxlandev.ensure_device, self.spec)
        if not created:
            log.info("reusing %s", self.spec.name)

    async def start(self, lease: Lease) -> None:
        self._subnet = lease.subnet
        await self._netlink(vxlandev.set_address, self.index, lease.subnet)
        # Unlike flanneld, an overlay address no peer route covers is refused here
        # rather than sent out unencapsulated by the default route.
        await asyncio.to_thread(netconf.ensure_fallback_route, self.opts.config.network)
        if await asyncio.to_thread(_delete_tun, self.opts.tun):
            log.info("removed %s, left by the engine data plane", self.opts.tun)

    async def apply(self, events: list[LeaseEvent]) -> None:
        changes = self.book.plan(events)
        removes = [self.entries.pop(r.subnet) for r in changes.remove if r.subnet in self.entries]
        adds = []
        for route in changes.add:
            entry = await self._entry(route)
            self.entries[route.subnet] = entry
            adds.append(entry)
        await self._netlink(self._program, removes, adds)
        if self._first:  # the snapshot: drop what peers that left while we were down had
            self._first = False
            pruned = await self._netlink(self._prune)
            if pruned:
                log.info("removed %d stale entries of peers that left while we were down", pruned)
        log_changes(events, changes, len(self.entries))

    async def _entry(self, route: PeerRoute) -> vxlandev.PeerEntry:
        if self.opts.config.direct_routing:
            gateway, oif = await asyncio.to_thread(netconf.route_get, route.public_ip)
            if on_link(self.opts.underlay, route.public_ip, gateway, oif):
                return vxlandev.PeerEntry(route.subnet, route.public_ip, None)
        return vxlandev.PeerEntry(route.subnet, route.public_ip, route.vtep_mac)

    def _program(self, ipr: IPRoute, removes, adds) -> None:
        for entry in removes:
            vxlandev.remove_peer(ipr, self.index, entry, self.spec.underlay_index)
        for entry in adds:
            vxlandev.add_peer(ipr, self.index, entry, self.spec.underlay_index)

    def _prune(self, ipr: IPRoute) -> int:
        keep = set(self.entries)
        macs = {e.vtep_mac for e in self.entries.values() if e.vtep_mac}
        return (vxlandev.prune(ipr, self.index, self.opts.config.network, keep,
                               self.spec.underlay_index)
                + vxlandev.prune_fdb(ipr, self.index, macs))

    async def check(self) -> None:
        """The device deleted under us (an operator, a CNI reset): build it again with
        every peer, as flanneld does. Also refreshes the device counters."""
        index = await self._netlink(vxlandev.find, self.spec.name)
        if index is None:
            log.warning("%s was deleted under us; creating it again", self.spec.name)
            self.index, _ = await self._netlink(vxlandev.ensure_device, self.spec)
            await self._netlink(vxlandev.set_address, self.index, self._subnet)
            await self._netlink(self._program, [], list(self.entries.values()))
            log.info("%s is back with %d peers", self.spec.name, len(self.entries))
        self._stats = await self._netlink(vxlandev.stats, self.index)

    async def stop(self) -> None:
        """Nothing to undo: the kernel keeps forwarding while no daemon runs."""

    def pause_for_handoff(self) -> tuple[dict, dict[str, int]]:
        """Nothing to hand over but the word: the kernel forwards whoever runs."""
        return {"kind": KERNEL}, {}

    def resume(self) -> None:
        pass

    def status(self) -> DataplaneStatus:
        s = self._stats
        counters = dict.fromkeys(COUNTERS, 0)
        counters.update(tx_packets=s.get("tx_packets", 0), tx_bytes=s.get("tx_bytes", 0),
                        rx_packets=s.get("rx_packets", 0), rx_bytes=s.get("rx_bytes", 0),
                        drop_send_error=s.get("tx_dropped", 0) + s.get("tx_errors", 0))
        return DataplaneStatus(kind=self.kind, reason=self.reason, device=self.spec.name,
                               mtu=self.opts.mtu, offloads=(), peers=len(self.entries),
                               forwarding=self.index is not None and self._subnet is not None,
                               counters=counters, kernel_drops=s.get("rx_dropped", 0))

    def peers(self) -> tuple[PeerStatus, ...]:
        return tuple(PeerStatus(str(r.subnet), str(r.public_ip), r.framing)
                     for r in self.book.routes.values())


def _delete_tun(name: str) -> bool:
    """A persistent TUN left by the engine plane would keep its overlay route."""
    from udpflannel.host import tun
    try:
        return tun.delete(name)
    except tun.TunError:
        return False
