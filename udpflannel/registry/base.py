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

Dual stack: a lease's key names its subnets (core.lease). create_lease refuses a key
whose IPv4 subnet another key already names (``10.244.7.0-24`` vs
``10.244.7.0-24&fd10:0:0:7::-64``), atomically; rekey_lease moves a lease to another
key in one step (a node's IPv4-only lease when IPv6 is turned on, and back).
"""

from __future__ import annotations

import ipaddress
from typing import AsyncIterator, Protocol

from udpflannel.core.errors import UdpflannelError
from udpflannel.core.lease import Lease, LeaseError, LeaseEvent, parse_key


class RegistryError(UdpflannelError):
    """The store could not be reached or answered badly; retry later."""


class LeaseTaken(Exception):
    """create_lease or replace_lease lost: the key holds something else.

    ``raw`` is the value found (None: the key was gone by the time it was read) and
    ``holder`` its lease, None when the value is not a lease. The subnet manager decides
    from them whether the key is another node's (leave it) or garbage (reclaim it)."""

    def __init__(self, message: str, holder: Lease | None = None, raw: bytes | None = None,
                 key: str | None = None) -> None:
        super().__init__(message)
        self.holder = holder
        self.raw = raw
        self.key = key  # the key found holding it, when not the lease's own key


class LeaseLost(Exception):
    """renew_lease found the key gone (``raw`` None) or holding another value: ``raw``,
    whose lease is ``holder`` (None when the value is not a lease)."""

    def __init__(self, key: str, holder: Lease | None, raw: bytes | None = None) -> None:
        if holder is not None:
            state = f"held by {holder.public_ip if holder.subnet is not None else holder.public_ipv6}"
        else:
            state = "gone" if raw is None else "holding a value that is not a lease"
        super().__init__(f"lease {key} is {state}")
        self.key = key
        try:
            self.subnet = parse_key(key)[0]  # its IPv4 subnet (None: IPv6-only)
        except LeaseError:
            self.subnet = None
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
        """Atomically create the lease iff its key is absent and no other key names its
        IPv4 subnet (else LeaseTaken, with what holds it: ``key`` set when another key).
        Returns the lease with its expiration set."""

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

    async def rekey_lease(self, lease: Lease, ttl: float, old_key: str, expected: bytes) -> Lease:
        """Atomically delete ``old_key`` and create ``lease`` at its own key, iff
        ``old_key`` still holds exactly ``expected`` and the new key is absent; else
        LeaseTaken (``key`` names which key differed; ``raw`` None: ``old_key`` is gone).
        A reservation (no TTL at ``old_key``, holding a lease) moves as a reservation."""

    async def delete_lease(self, subnet: ipaddress.IPv4Network | str) -> None:
        """Remove a lease, by its IPv4 subnet or its key name (tests and tools; a
        stopping daemon keeps its lease)."""

    def watch_leases(self, revision: int) -> AsyncIterator[tuple[list[LeaseEvent], int]]:
        """Changes after ``revision``, as (events, new revision) batches, forever.
        Raises Compacted if that history is gone, RegistryError if the store fails.
        Expired leases arrive as REMOVED events, and so does a canonical key whose new
        value is not a lease; changes to non-canonical keys are skipped."""

    async def close(self) -> None: ...
