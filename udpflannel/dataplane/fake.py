"""A data plane that forwards nothing and remembers everything, for unit tests of the
daemon's order without root (as tailscale keeps router_fake.go beside its Router).

It keeps the contract of dataplane/base.py: prepare, start, apply, check, stop,
status, peers, and ``failed``. Every call is appended to ``journal`` (shared with the
test's other fakes, so one list shows the order across the registry and the plane),
and ``gate`` lets a test hold the plane inside one step.
"""

from __future__ import annotations

import asyncio

from udpflannel.core.lease import Lease, LeaseEvent
from udpflannel.core.peers import Framings, RouteBook
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

    def fail(self, message: str) -> None:
        if not self.failed.done():
            self.failed.set_exception(RuntimeError(message))

    def status(self) -> DataplaneStatus:
        return DataplaneStatus(kind=self.kind, reason=self.reason, device=self.opts.tun, mtu=self.mtu,
                               peers=len(self.book.routes), forwarding=self.forwarding)

    def peers(self) -> tuple[PeerStatus, ...]:
        return tuple(PeerStatus(str(r.subnet), str(r.public_ip), r.framing) for r in self.book.routes.values())
