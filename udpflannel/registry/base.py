"""The registry contract: what the subnet manager needs from a store of leases.

Two stores implement it: ``embedded`` (a SQLite file shared by daemons on one host)
and ``etcd`` (etcd v3 with flannel's key layout). Like flannel's pkg/subnet Registry,
it is deliberately small; all policy (which subnet, when to renew, what to do when a
lease vanishes) lives in udpflannel.subnets.leasing, written once for both.

Reservations (flannel's Documentation/reservations.md): a key stored without a TTL.
Both stores list and watch it with expiration ``core.lease.NEVER``, report it so in a
LeaseTaken or LeaseLost holder, and never give it a TTL: renew_lease and replace_lease
write over a reservation without one. Only create_lease makes a key with a TTL (a key
that was absent is nobody's reservation).
"""

from __future__ import annotations

import ipaddress
from typing import AsyncIterator, Protocol

from udpflannel.core.errors import UdpflannelError
from udpflannel.core.lease import Lease, LeaseEvent


class RegistryError(UdpflannelError):
    """The store could not be reached or answered badly; retry later."""


class LeaseTaken(Exception):
    """create_lease or replace_lease lost: the key holds something else.

    ``raw`` is the value found (None: the key was gone by the time it was read) and
    ``holder`` its lease, None when the value is not a lease. The subnet manager decides
    from them whether the key is another node's (leave it) or garbage (reclaim it)."""

    def __init__(self, message: str, holder: Lease | None = None, raw: bytes | None = None) -> None:
        super().__init__(message)
        self.holder = holder
        self.raw = raw


class LeaseLost(Exception):
    """renew_lease found the key gone (``raw`` None) or holding another value: ``raw``,
    whose lease is ``holder`` (None when the value is not a lease)."""

    def __init__(self, subnet: ipaddress.IPv4Network, holder: Lease | None,
                 raw: bytes | None = None) -> None:
        if holder is not None:
            state = f"held by {holder.public_ip}"
        else:
            state = "gone" if raw is None else "holding a value that is not a lease"
        super().__init__(f"lease for {subnet} is {state}")
        self.subnet = subnet
        self.holder = holder
        self.raw = raw


class Compacted(Exception):
    """watch_leases was asked for history the store no longer keeps; re-list."""


class Registry(Protocol):
    async def get_config(self) -> str | None:
        """The network config JSON text, or None when none is stored."""

    async def put_config_if_absent(self, text: str) -> str:
        """Store ``text`` unless a config exists; return the config now stored."""

    async def list_leases(self) -> tuple[list[Lease], int]:
        """Every live lease and the store's revision. Only canonical keys count
        (core.lease.parse_subnet_key); they and undecodable values are skipped with a
        bounded warning (registry.badkeys)."""

    async def create_lease(self, lease: Lease, ttl: float) -> Lease:
        """Atomically create the lease iff its key is absent (else LeaseTaken, with what
        the key holds). Returns the lease with its expiration set."""

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        """Extend our lease iff the key still holds our value (else LeaseLost). A
        reservation stays one (expiration NEVER), and nothing is written."""

    async def replace_lease(self, lease: Lease, ttl: float, expected: bytes) -> Lease:
        """Atomically write our lease iff the key still holds exactly ``expected`` (the
        raw value a LeaseTaken or LeaseLost reported); else LeaseTaken with what it holds
        now. How the subnet manager reclaims garbage in its own key, and updates the
        value of a lease it reuses. A reservation stays one (expiration NEVER)."""

    async def take_over(self, lease: Lease, ttl: float, holder: Lease, due: float) -> Lease:
        """Atomically write our lease (with a TTL) over the key iff it still holds
        ``holder`` (same route: subnet, PublicIP, backend data), with a TTL, expiring
        before ``due`` (unix time): its holder missed its renewal. A write in between
        (a renewal) wins. Else LeaseTaken with what the key holds (its expiration set
        when known; ``raw`` None: the key is absent). How a lease carrying our PublicIP
        that is not provably ours is reused without taking it from a live node."""

    async def delete_lease(self, subnet: ipaddress.IPv4Network) -> None:
        """Remove a lease (tests and tools; a stopping daemon keeps its lease)."""

    def watch_leases(self, revision: int) -> AsyncIterator[tuple[list[LeaseEvent], int]]:
        """Changes after ``revision``, as (events, new revision) batches, forever.
        Raises Compacted if that history is gone, RegistryError if the store fails.
        Expired leases arrive as REMOVED events, and so does a canonical key whose new
        value is not a lease; changes to non-canonical keys are skipped."""

    async def close(self) -> None: ...
