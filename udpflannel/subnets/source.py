"""Where a node's network config and subnet come from, as the daemon sees it.

A source gives the daemon these, whichever store is behind it:

    network_config(stop, health)  the flannel network config (waiting for one when
                                  the store has none yet, as flanneld does)
    kept                          what the store keeps about this node from an earlier
                                  run, known once network_config returned (Kept)
    manager(cfg, health)          the SubnetManager (base.py) that leases this node's
                                  subnet and watches the others'
    close()

``retry`` says whether the store's outages are waited out (etcd, the Kubernetes API:
a node must not crash-loop while its store is away) or end the daemon (a local file
that cannot be read is no outage). ``until_reachable`` runs one call that way.

Sources: registry_source.RegistrySource (etcd v3 or the embedded SQLite file) and the
Kubernetes subnet manager's source (flanneld's --kube-subnet-mgr).
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol, TypeVar

from udpflannel.core.config import NetworkConfig
from udpflannel.registry.base import RegistryError
from udpflannel.subnets.base import Backoff, RegistryHealth, SubnetManager

T = TypeVar("T")


class Stopped(Exception):
    """SIGTERM/SIGINT arrived while start-up was still waiting for the store."""


@dataclass(frozen=True)
class Kept:
    """What a store keeps about this node for its next start, as flanneld asks its
    subnet manager before it sets the backend up (GetStoredPublicIP, GetStoredMacAddresses).
    Kubernetes keeps both on the Node (node-public-ip, backend-data); a registry keeps
    neither (a lease is found by our PublicIP and our VTEP MAC, which the state dir keeps)."""
    public_ip: ipaddress.IPv4Address | None = None  # stands for --public-ip
    vtep_mac: str | None = None  # the VTEP MAC to keep when the state dir has none
    public_ipv6: ipaddress.IPv6Address | None = None  # dual stack: stands for --public-ipv6
    vtep_mac6: str | None = None  # dual stack: flannel-v6.<VNI>'s, as vtep_mac


class Source(Protocol):
    kind: str  # "etcd", "embedded", "kube": what status and /metrics call it
    retry: bool
    kept: Kept

    @property
    def where(self) -> str: ...  # may be refined by network_config (kube: the API server's URL)

    async def network_config(self, stop: asyncio.Event, health: RegistryHealth) -> NetworkConfig: ...

    def manager(self, cfg: NetworkConfig, health: RegistryHealth) -> SubnetManager: ...

    async def close(self) -> None: ...


async def pause(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def until_reachable(what: str, call: Callable[[], Awaitable[T]], retry: bool, stop: asyncio.Event,
                          health: RegistryHealth) -> T:
    """Run a store call; while it fails, retry (with backoff, saying so once through
    ``health``) or, without ``retry``, raise its error. A stop request ends the wait
    (within one call's timeout) with Stopped."""
    backoff = Backoff(0.5, 10.0)
    while not stop.is_set():
        try:
            result = await call()
            health.succeeded()
            return result
        except RegistryError as e:
            if not retry:
                raise
            health.failed(what, e)
            await pause(stop, backoff.delay())
    raise Stopped(what)
