"""The kernel data plane: flanneld's vxlan backend, exactly (host.vxlandev).

The kernel forwards; this module only programs ``flannel.<VNI>`` from the same lease
events the engine gets, through the same policy (core.peers, with VXLAN as the only
framing: a flanneld udp peer is refused with a log line). Reusing a matching device
and replacing entries idempotently makes a restart no outage, and stop() leaves it
all in place, as flanneld leaves it. After the first snapshot, entries of peers that
left while we were down are pruned. A device deleted under us is built again with
every peer (check()).

Dual stack, as flanneld: with EnableIPv6 a second device, ``flannel-v6.<VNI>``, over
the IPv6 underlay, carries the peers' IPv6 subnets (core.peers gives one route per
family; a route goes to the device of its subnet's family); IPv6-only networks have
only that one. Each device has its own VTEP MAC, kept in the state dir.

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
from udpflannel.dataplane.base import KERNEL, DataplaneError, PlaneOptions, on_link
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
        self.specs: dict[int, vxlandev.DeviceSpec] = {}  # by family: flannel.<VNI>, flannel-v6.<VNI>
        if cfg.enable_ipv4:
            assert underlay.address is not None  # found for IPv4 (find_underlay)
            self.specs[4] = vxlandev.DeviceSpec(vxlandev.device_name(cfg.vni), cfg.vni, cfg.port,
                                                underlay.address, underlay.ifindex, opts.vtep_mac, opts.mtu)
        if cfg.enable_ipv6:
            if underlay.address6 is None or opts.vtep_mac6 is None:
                raise DataplaneError("EnableIPv6 needs an IPv6 address on the underlay and a VTEP MAC for flannel-v6")
            self.specs[6] = vxlandev.DeviceSpec(
                vxlandev.device_name(cfg.vni, 6), cfg.vni, cfg.port, underlay.address6, underlay.ifindex,
                opts.vtep_mac6, vxlandev.device_mtu(opts.mtu, (cfg.mtu or underlay.mtu), 6))
        self.spec = next(iter(self.specs.values()))  # the first device (IPv4's unless IPv6-only)
        self.book = RouteBook(cfg, underlay.public_ip, Framings(cfg.port, None), underlay.network,
                              own_public_ipv6=underlay.public_ip6)
        self.indexes: dict[int, int] = {}  # by family
        self.entries: dict = {}  # subnet -> vxlandev.PeerEntry as programmed
        self._lease: Lease | None = None
        self._first = True
        self._stats: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def index(self) -> int | None:
        return self.indexes.get(self.spec.version)

    def _netlink(self, fn, *args):
        def call():
            with self._lock, IPRoute() as ipr:
                return fn(ipr, *args)
        return asyncio.to_thread(call)

    async def prepare(self) -> None:
        """Create (or reuse) the devices and bring them up: this is where a kernel without
        VXLAN, a container without the right, or a busy port shows (auto's probe)."""
        for version, spec in self.specs.items():
            self.indexes[version], created = await self._netlink(vxlandev.ensure_device, spec)
            if not created:
                log.info("reusing %s", spec.name)

    async def start(self, lease: Lease) -> None:
        self._lease = lease
        await self._netlink(self._addresses)
        # Unlike flanneld, an overlay address no peer route covers is refused here
        # rather than sent out unencapsulated by the default route.
        for network in self.opts.config.networks:
            await asyncio.to_thread(netconf.ensure_fallback_route, network)
        if await asyncio.to_thread(_delete_tun, self.opts.tun):
            log.info("removed %s, left by the engine data plane", self.opts.tun)

    def _addresses(self, ipr: IPRoute) -> None:
        assert self._lease is not None  # (start)
        for subnet in self._lease.subnets:
            if subnet.version in self.indexes:
                netconf.set_address(ipr, self.indexes[subnet.version], subnet)

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
            vxlandev.remove_peer(ipr, self.indexes[entry.subnet.version], entry, self.opts.underlay.ifindex)
        for entry in adds:
            vxlandev.add_peer(ipr, self.indexes[entry.subnet.version], entry, self.opts.underlay.ifindex)

    def _prune(self, ipr: IPRoute) -> int:
        removed = 0
        for version, index in self.indexes.items():
            mine = {s: e for s, e in self.entries.items() if s.version == version}
            macs = {e.vtep_mac for e in mine.values() if e.vtep_mac}
            pool = self.opts.config.pool(version)
            assert pool is not None  # a device exists for each family the network has
            removed += (vxlandev.prune(ipr, index, pool.network, set(mine),
                                       self.opts.underlay.ifindex)
                        + vxlandev.prune_fdb(ipr, index, macs))
        return removed

    async def check(self) -> None:
        """A device deleted under us (an operator, a CNI reset): build it again with
        every peer, as flanneld does. Also refreshes the device counters."""
        for version, spec in self.specs.items():
            index = await self._netlink(vxlandev.find, spec.name)
            if index is None:
                log.warning("%s was deleted under us; creating it again", spec.name)
                self.indexes[version], _ = await self._netlink(vxlandev.ensure_device, spec)
                if self._lease is not None:
                    await self._netlink(self._addresses)
                mine = [e for e in self.entries.values() if e.subnet.version == version]
                await self._netlink(self._program, [], mine)
                log.info("%s is back with %d peers", spec.name, len(mine))
        stats: dict[str, int] = {}
        for index in self.indexes.values():
            for key, value in (await self._netlink(vxlandev.stats, index)).items():
                stats[key] = stats.get(key, 0) + value
        self._stats = stats

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
        return DataplaneStatus(kind=self.kind, reason=self.reason,
                               device=", ".join(spec.name for spec in self.specs.values()),
                               mtu=self.opts.mtu, offloads=(), peers=len(self.entries),
                               forwarding=len(self.indexes) == len(self.specs) and self._lease is not None,
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
