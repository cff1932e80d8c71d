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
``wanted_lease`` builds what a node asks for from its config, addresses and MACs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import AsyncIterator, Protocol

from udpflannel.core.config import NetworkConfig
from udpflannel.core.errors import UdpflannelError
from udpflannel.core.lease import UNSPECIFIED, Lease, LeaseEvent

log = logging.getLogger("udpflannel.subnets")


def wanted_lease(cfg: NetworkConfig, public_ip: ipaddress.IPv4Address | None, mac: str | None,
                 public_ipv6: ipaddress.IPv6Address | None = None, mac6: str | None = None) -> Lease:
    """What this node publishes, its subnets left for the manager to choose: as
    flanneld's vxlan backend (newSubnetAttrs), the IPv4 side (PublicIP, BackendData with
    flannel.<VNI>'s MAC) when the network has IPv4, the IPv6 side (PublicIPv6,
    BackendV6Data with flannel-v6.<VNI>'s MAC) when it has IPv6; an IPv6-only node's
    PublicIP is 0.0.0.0. flanneld's udp backend publishes PublicIP alone."""
    if cfg.backend_type != "vxlan":
        return Lease(None, public_ip or UNSPECIFIED, "", None, None)
    v4 = cfg.enable_ipv4 and public_ip is not None
    v6 = cfg.enable_ipv6 and public_ipv6 is not None
    ip = public_ip if v4 and public_ip is not None else UNSPECIFIED
    return Lease(None, ip, "vxlan", cfg.vni if v4 else None, mac if v4 else None,
                 public_ipv6=public_ipv6 if v6 else None, vni6=cfg.vni if v6 else None, vtep_mac6=mac6 if v6 else None)


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
