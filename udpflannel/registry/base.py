"""The registry contract: what the subnet manager needs from a store of leases.

Two stores implement it: ``embedded`` (a SQLite file shared by daemons on one host)
and ``etcd`` (etcd v3 with flannel's key layout). Like flannel's pkg/subnet Registry,
it is deliberately small; all policy (which subnet, when to renew, what to do when a
lease vanishes) lives in udpflannel.subnet, written once for both.
"""

from __future__ import annotations

import ipaddress
from typing import AsyncIterator, Protocol

from udpflannel.core.lease import Lease, LeaseEvent


class RegistryError(Exception):
    """The store could not be reached or answered badly; retry later."""


class LeaseTaken(Exception):
    """create_lease lost: the subnet is already leased (maybe by a racing node)."""


class LeaseLost(Exception):
    """renew_lease found the key gone or holding another node's lease."""

    def __init__(self, subnet: ipaddress.IPv4Network, holder: Lease | None) -> None:
        super().__init__(f"lease for {subnet} is {'held by ' + str(holder.public_ip) if holder else 'gone'}")
        self.subnet = subnet
        self.holder = holder


class Compacted(Exception):
    """watch_leases was asked for history the store no longer keeps; re-list."""


class Registry(Protocol):
    async def get_config(self) -> str | None:
        """The network config JSON text, or None when none is stored."""

    async def put_config_if_absent(self, text: str) -> str:
        """Store ``text`` unless a config exists; return the config now stored."""

    async def list_leases(self) -> tuple[list[Lease], int]:
        """Every live lease (undecodable ones skipped) and the store's revision."""

    async def create_lease(self, lease: Lease, ttl: float) -> Lease:
        """Atomically create the lease iff its subnet is free (else LeaseTaken).
        Returns the lease with its expiration set."""

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        """Extend our lease iff the key still holds our value (else LeaseLost)."""

    async def delete_lease(self, subnet: ipaddress.IPv4Network) -> None:
        """Remove a lease (tests and tools; a stopping daemon keeps its lease)."""

    def watch_leases(self, revision: int) -> AsyncIterator[tuple[list[LeaseEvent], int]]:
        """Changes after ``revision``, as (events, new revision) batches, forever.
        Raises Compacted if that history is gone, RegistryError if the store fails.
        Expired leases arrive as REMOVED events."""

    async def close(self) -> None: ...
