"""Who owns which subnet: the contract the daemon, both data planes and status see,
whichever manager runs.

Two managers implement it, as flannel's subnet.Manager has two: leasing over a
registry (``leasing.LeaseManager``: etcd v3 with flannel's key layout, or the
embedded SQLite file), and Kubernetes (the node's spec.podCIDR and the other nodes'
flannel annotations). The daemon asks a manager for three things:

    acquire(wanted, previous)  this node's lease (its subnet, published with our
                               PublicIP and VTEP MAC); ``previous`` is the subnet the
                               node's pods may still use (subnet.env, state dir)
    keep_renewed()             runs for the daemon's life: keeps our lease (renewal,
                               re-creation, republishing); raises SubnetLost when
                               another node validly took our subnet
    watch()                    the other nodes' leases as batches of events; the
                               first batch is a snapshot, later ones changes

``lease`` is the current lease; ``health`` says whether the store answers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import AsyncIterator, Protocol

from udpflannel.core.errors import UdpflannelError
from udpflannel.core.lease import Lease, LeaseEvent

log = logging.getLogger("udpflannel.subnets")


class SubnetLost(UdpflannelError):
    """Our subnet now belongs to another node; continuing would misroute our pods."""


class NoFreeSubnet(UdpflannelError):
    """Every subnet between SubnetMin and SubnetMax is leased."""


class Backoff:
    """Exponential backoff, 100 ms doubling to a cap (flannel's watch uses 100 ms→5 s)."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first, self.cap, self.next = first, cap, first

    def reset(self) -> None:
        self.next = self.first

    def delay(self) -> float:
        d, self.next = self.next, min(self.next * 2, self.cap)
        return d


class RegistryHealth:
    """Logs once per change of state, not once per failed call. ``recovered`` is set
    when the registry answers again after a failure (and cleared by whoever waits).
    ``waiting``: what start-up waits for in the store, one line (e.g. a node without a
    podCIDR yet), shown by /readyz and `status` while it lasts; ``ignored``: how many
    entries of the store were ignored as unreadable (Kubernetes: nodes with bad
    flannel annotations), for /metrics."""

    def __init__(self, starting: bool = False) -> None:
        self.ok = True
        self.waiting: str | None = None
        self.ignored = 0
        self.recovered = asyncio.Event()
        # before the data plane runs there are no routes to keep: say so honestly
        self.consequence = "retrying" if starting else "data plane keeps its routes, retrying"

    def failed(self, what: str, err: Exception) -> None:
        if self.ok:
            log.warning("registry unreachable (%s): %s; %s", what, err, self.consequence)
        self.ok = False

    def succeeded(self) -> None:
        if not self.ok:
            log.info("registry reachable again")
            self.recovered.set()
        self.ok = True



class SubnetManager(Protocol):
    health: RegistryHealth
    lease: Lease | None

    async def acquire(self, wanted: Lease, previous: ipaddress.IPv4Network | None = None) -> Lease: ...

    async def keep_renewed(self) -> None: ...

    def watch(self) -> AsyncIterator[list[LeaseEvent]]: ...
