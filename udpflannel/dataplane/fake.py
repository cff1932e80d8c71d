"""A data plane that forwards nothing and remembers everything, for unit tests of the
daemon's order without root (as tailscale keeps router_fake.go beside its Router).

It keeps the contract of dataplane/base.py: prepare, start, apply, check, stop,
status, peers, and ``failed``. Every call is appended to ``journal`` (shared with the
test's other fakes, so one list shows the order across the registry and the plane),
and ``gate`` lets a test hold the plane inside one step.
"""

from __future__ import annotations

import asyncio
import ipaddress

from udpflannel.core.lease import Lease, LeaseEvent
from udpflannel.core.peers import Framings, PeerRoute, RouteBook
from udpflannel.core.status import DataplaneStatus, PeerStatus
from udpflannel.dataplane.base import ENGINE, PlaneOptions


class FakePlane:
    def __init__(self, opts: PlaneOptions, journal: list[str], *, kind: str = ENGINE,
                 gates: dict[str, asyncio.Event] | None = None) -> None:
        self.opts = opts
        self.kind = kind
        self.reason = "fake"
        self.journal = journal
        self.gates = gates or {}
        self.failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.adopted_subnet: ipaddress.IPv4Network | None = None  # adopter(): the handed state's
        self.book = RouteBook(opts.config, opts.underlay.public_ip, Framings(opts.config.port, opts.udp_port),
                              opts.underlay.network)
        self.lease: Lease | None = None
        self.forwarding = False
        self.mtu = opts.mtu

    async def _step(self, name: str) -> None:
        self.journal.append(f"plane.{name}")
        gate = self.gates.get(name)
        if gate is not None:
            await gate.wait()

    async def prepare(self) -> None:
        await self._step("prepare")

    async def start(self, lease: Lease) -> None:
        await self._step("start")
        self.lease = lease
        self.forwarding = True

    async def apply(self, events: list[LeaseEvent]) -> None:
        await self._step("apply")
        self.book.plan(events)

    async def check(self) -> None:
        self.journal.append("plane.check")

    async def stop(self) -> None:
        await self._step("stop")
        self.forwarding = False

    def pause_for_handoff(self) -> tuple[dict, dict[str, int]]:
        self.journal.append("plane.pause")
        self.forwarding = False
        return {"kind": self.kind, "subnet": str(self.lease.subnet) if self.lease else None,
                "routes": [[str(r.subnet), str(r.public_ip), r.framing, r.port, r.vtep_mac]
                           for r in self.book.routes.values()]}, {}

    @classmethod
    def adopter(cls, journal: list[str]):
        """Outside.adopt_plane for tests: a FakePlane that forwards from the handed
        state, as EnginePlane.adopt does with real fds."""
        def adopt(opts: PlaneOptions, reason: str, state: dict, handed) -> "FakePlane":
            plane = cls(opts, journal)
            plane.journal.append("plane.adopt")
            for subnet, public_ip, framing, port, mac in state["routes"]:
                route = PeerRoute(ipaddress.IPv4Network(subnet), ipaddress.IPv4Address(public_ip), framing, port, mac)
                plane.book.routes[route.subnet] = route
            plane.adopted_subnet = ipaddress.IPv4Network(state["subnet"])
            plane.forwarding = True
            return plane
        return adopt

    def resume(self) -> None:
        self.journal.append("plane.resume")
        self.forwarding = True

    def fail(self, message: str) -> None:
        if not self.failed.done():
            self.failed.set_exception(RuntimeError(message))

    def status(self) -> DataplaneStatus:
        return DataplaneStatus(kind=self.kind, reason=self.reason, device=self.opts.tun, mtu=self.mtu,
                               peers=len(self.book.routes), forwarding=self.forwarding)

    def peers(self) -> tuple[PeerStatus, ...]:
        return tuple(PeerStatus(str(r.subnet), str(r.public_ip), r.framing) for r in self.book.routes.values())
