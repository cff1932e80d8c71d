"""Subnet leases over any registry: acquire, keep renewed, watch the others.

Theory of operation. ``acquire`` follows flanneld's order (our own lease by PublicIP,
then the subnet remembered in subnet.env, then a random free one) but treats a lost
creation race as "try another subnet", not as a fatal error. ``keep_renewed`` renews
ahead of expiry and retries with backoff while the registry is away; if our key has
vanished it re-creates the same subnet (a new subnet would strand the node's pods),
and only if another node took it does it give up with SubnetLost. ``watch`` turns a
snapshot plus the registry's change stream into route events; after a reconnect or a
compaction it re-lists and diffs, so nothing missed during an outage is lost. The
listing ``acquire`` made is handed to the first ``watch`` as its snapshot (watching from
that revision on also covers whatever changed since), so a start lists the registry
once, not twice: with 5,000 leases in etcd a listing is the bulk of start-up time.
Renewal and re-creation are serialized: the watch (our key deleted) and the renewal
timer may both find the key gone at once, and the loser of that re-create must not
mistake the winner's lease for another node's.

The clock and the random source are injected so tests can drive time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from dataclasses import replace
from typing import AsyncIterator, Awaitable, Callable

from udpflannel.core.config import NetworkConfig
from udpflannel.core.lease import EventType, Lease, LeaseEvent, diff, snapshot
from udpflannel.registry.base import Compacted, LeaseLost, LeaseTaken, Registry, RegistryError

log = logging.getLogger(__name__)

DEFAULT_TTL = 24 * 3600.0
DEFAULT_RENEW_MARGIN = 3600.0
CANDIDATES = 100  # flannel picks at random among up to this many free subnets


class SubnetLost(Exception):
    """Our subnet now belongs to another node; continuing would misroute our pods."""


class NoFreeSubnet(Exception):
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
    when the registry answers again after a failure (and cleared by whoever waits)."""

    def __init__(self, starting: bool = False) -> None:
        self.ok = True
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


class SubnetManager:
    def __init__(self, registry: Registry, config: NetworkConfig, *,
                 ttl: float = DEFAULT_TTL, renew_margin: float = DEFAULT_RENEW_MARGIN,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: random.Random | None = None) -> None:
        self.registry = registry
        self.config = config
        self.ttl = ttl
        self.renew_margin = renew_margin
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.health = RegistryHealth()
        self.lease: Lease | None = None
        self._listing: tuple[list[Lease], int] | None = None  # acquire's, for the first watch
        self._renewing = asyncio.Lock()

    # --- acquire ------------------------------------------------------------------
    async def acquire(self, wanted: Lease, previous: ipaddress.IPv4Network | None = None,
                      attempts: int = 20) -> Lease:
        """Lease a subnet for ``wanted`` (whose subnet field is ignored)."""
        for _ in range(attempts):
            current, rev = await self.registry.list_leases()
            self._listing = (current, rev)
            taken = {x.subnet for x in current}
            mine = [x for x in current if x.public_ip == wanted.public_ip
                    and self.config.contains_subnet(x.subnet)]
            for old in mine:
                got = await self._reuse(old, replace(wanted, subnet=old.subnet))
                if got:
                    return got
            choices = []
            if previous is not None and previous not in taken and self._in_range(previous):
                choices.append(previous)
            else:
                choices.append(self._pick_free(taken))
            try:
                self.lease = await self.registry.create_lease(replace(wanted, subnet=choices[0]), self.ttl)
                return self.lease
            except LeaseTaken:
                log.info("subnet %s was taken by a racing node; choosing again", choices[0])
                previous = None
        raise NoFreeSubnet(f"could not lease a subnet after {attempts} attempts")

    async def _reuse(self, old: Lease, new: Lease) -> Lease | None:
        if old.same_route(new):
            try:
                self.lease = await self.registry.renew_lease(new, self.ttl)
                log.info("reusing our lease %s", new.subnet)
                return self.lease
            except LeaseLost:
                return None
        # Our PublicIP but other backend data (e.g. a new VTEP MAC): replace it.
        await self.registry.delete_lease(old.subnet)
        try:
            self.lease = await self.registry.create_lease(new, self.ttl)
            log.info("reusing our subnet %s with updated backend data", new.subnet)
            return self.lease
        except LeaseTaken:
            return None

    def _in_range(self, subnet: ipaddress.IPv4Network) -> bool:
        return (self.config.contains_subnet(subnet)
                and self.config.index_of(subnet) in self.config.usable_range())

    def _pick_free(self, taken: set[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
        free = []
        for index in self.config.usable_range():
            subnet = self.config.subnet_at(index)
            if subnet not in taken:
                free.append(subnet)
                if len(free) == CANDIDATES:
                    break
        if not free:
            raise NoFreeSubnet(f"all subnets of {self.config.network} between "
                               f"{self.config.subnet_min} and {self.config.subnet_max} are leased")
        return self._rng.choice(free)

    # --- renew --------------------------------------------------------------------
    def _renew_delay(self, lease: Lease) -> float:
        left = lease.expiration - self._clock()
        margin = self.renew_margin if self.renew_margin < self.ttl else self.ttl / 2
        return max(left - margin, 0.0)

    async def keep_renewed(self) -> None:
        """Runs forever; raises SubnetLost if our subnet went to another node.

        After a failed renewal it retries with backoff (1 s doubling to 60 s), and at
        once when the watch finds the registry reachable again: a lease whose renewal
        is overdue must not wait out a long backoff and expire after the outage."""
        assert self.lease is not None
        backoff = Backoff(1.0, 60.0)
        delay = self._renew_delay(self.lease)
        failing = False
        while True:
            await self._pause(delay, wake_on_recovery=failing)
            try:
                await self.renew_or_recreate()
                self.health.succeeded()
                backoff.reset()
                failing = False
                delay = self._renew_delay(self.lease)
            except RegistryError as e:
                self.health.failed("renew", e)
                self.health.recovered.clear()  # no await since failed(): no wake-up is lost
                failing = True
                delay = backoff.delay()

    async def _pause(self, delay: float, wake_on_recovery: bool) -> None:
        if not wake_on_recovery:
            await self._sleep(delay)
            return
        sleeper = asyncio.ensure_future(self._sleep(delay))
        waker = asyncio.ensure_future(self.health.recovered.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    async def renew_or_recreate(self) -> None:
        assert self.lease is not None
        async with self._renewing:
            await self._renew_or_recreate()

    async def _renew_or_recreate(self) -> None:
        assert self.lease is not None
        for _ in range(3):
            try:
                self.lease = await self.registry.renew_lease(self.lease, self.ttl)
                log.debug("renewed %s until %s", self.lease.subnet, time.ctime(self.lease.expiration))
                return
            except LeaseLost as lost:
                if lost.holder is not None:
                    raise SubnetLost(f"our subnet {lost.subnet} is now leased by {lost.holder.public_ip}; "
                                     "refusing to take another subnet (it would strand this node's pods)") from None
            try:
                self.lease = await self.registry.create_lease(self.lease, self.ttl)
                log.warning("our lease %s had vanished from the registry; re-created it", self.lease.subnet)
                return
            except LeaseTaken:
                pass  # someone wrote the key between our renew and create: renew says who
        raise SubnetLost(f"our subnet {self.lease.subnet} keeps changing hands in the registry; "
                         "refusing to take another subnet (it would strand this node's pods)")

    # --- watch --------------------------------------------------------------------
    async def watch(self) -> AsyncIterator[list[LeaseEvent]]:
        """Route events for the other nodes, forever. The first batch is the snapshot.
        Our own lease vanishing triggers an immediate re-create (SubnetLost if taken)."""
        known: dict[ipaddress.IPv4Network, Lease] = {}
        backoff = Backoff()
        while True:
            try:
                # acquire's listing, made just before our lease was written: no need to
                # list again, and our key's absence from it means nothing
                from_acquire = self._listing is not None
                if self._listing is not None:
                    (current, rev), self._listing = self._listing, None
                else:
                    current, rev = await self.registry.list_leases()
                fresh = snapshot(x for x in current if not self._is_ours(x))
                changes = diff(known, fresh)
                known = fresh
                self.health.succeeded()
                if changes:
                    yield changes
                if (not from_acquire and self.lease is not None
                        and self.lease.subnet not in {x.subnet for x in current}):
                    await self.renew_or_recreate()
                backoff.reset()
                async for events, _rev in self.registry.watch_leases(rev):
                    out = []
                    for ev in events:
                        if self.lease is not None and ev.lease.subnet == self.lease.subnet:
                            if ev.type is EventType.REMOVED or ev.lease.public_ip != self.lease.public_ip:
                                await self.renew_or_recreate()
                            continue
                        prev = known.get(ev.lease.subnet)
                        if ev.type is EventType.REMOVED:
                            if prev is not None:
                                del known[ev.lease.subnet]
                                out.append(LeaseEvent(EventType.REMOVED, prev))
                        elif prev is None or not prev.same_route(ev.lease):
                            known[ev.lease.subnet] = ev.lease
                            out.append(ev)
                    if out:
                        yield out
            except Compacted as e:
                log.info("watch history compacted (%s); re-listing", e)
            except RegistryError as e:
                self.health.failed("watch", e)
                await self._sleep(backoff.delay())

    def _is_ours(self, lease: Lease) -> bool:
        return self.lease is not None and lease.subnet == self.lease.subnet
