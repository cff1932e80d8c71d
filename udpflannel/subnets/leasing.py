"""Subnet leases over a registry (etcd v3 or the embedded SQLite file): acquire, keep
renewed, watch the others. One of the two subnet managers (subnets/base.py).

Theory of operation. Anyone who can write the registry may write anything, so a lease
is trusted only as far as it can be proven. ``acquire`` reuses a lease only if it is
provably ours: our PublicIP *and* our VTEP MAC (kept in the state dir), the one in the
subnet file (``previous``) first; a lease with our PublicIP and another MAC may be
another node's (flanneld matches on PublicIP alone and takes it over even from a live
node: two nodes on one subnet, with colliding pod addresses).
A flanneld-udp style lease carries no MAC: our PublicIP at a subnet this node recorded
(subnet file or state dir) is the proof, whatever our backend is now.
A lease with our PublicIP that is not provably ours (another MAC: a reinstalled node
whose state dir is gone; or a node sharing our address) is reused, as flanneld reuses
it, only where no live node can be keeping it: a reservation (a key without a TTL,
flannel's Documentation/reservations.md: the administrator bound that subnet to our
address), or a lease whose holder missed its renewal (less time left than our renew
margin; the registry's take_over checks and writes atomically, so a renewal in between
wins). Otherwise it is left alone and expires by itself (README, Security).
Then it takes ``previous`` unless a valid lease of another node holds it: a key holding
garbage or a lease no node can have (core.peers.implausible) is reclaimed with a
compare-and-swap on the bytes seen, because a new subnet would strand the node's pods.
Last, a random free subnet; a lost creation race means "try another subnet", not a
fatal error.

Reservations are never given a TTL: the registries renew and replace a key without
one as a key without one. A reservation is "renewed" on a lease's schedule, which
writes nothing but checks it still holds our value.

``keep_renewed`` renews ahead of expiry and retries with backoff while the registry is
away; if our key has vanished it re-creates the same subnet, if it holds garbage it
reclaims it, and only if another node validly holds it does it give up with
SubnetLost. ``watch`` turns a snapshot plus the registry's change stream into route
events for the leases of this network (a /SubnetLen inside it; registries already
drop non-canonical keys); after a reconnect or a compaction it re-lists and diffs, so
nothing missed during an outage is lost, and after every listing and on every change
to our key it checks that the key still holds our lease. The listing ``acquire`` made
is handed to the first ``watch`` as its snapshot (watching from that revision on also
covers whatever changed since), so a start lists the registry once, not twice: with
5,000 leases in etcd a listing is the bulk of start-up time. Renewal and re-creation
are serialized: the watch (our key deleted) and the renewal timer may both find the key
gone at once, and the loser of that re-create must not mistake the winner's lease for
another node's.

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

from udpflannel.core import peers
from udpflannel.core.config import NetworkConfig
from udpflannel.core.lease import EventType, Lease, LeaseEvent, diff, snapshot
from udpflannel.registry.badkeys import BadKeyLog
from udpflannel.registry.base import Compacted, LeaseLost, LeaseTaken, Registry, RegistryError
from udpflannel.subnets.base import Backoff, NoFreeSubnet, RegistryHealth, SubnetLost

log = logging.getLogger(__name__)

DEFAULT_TTL = 24 * 3600.0
DEFAULT_RENEW_MARGIN = 3600.0
CANDIDATES = 100  # flannel picks at random among up to this many free subnets


class LeaseManager:
    """Leases over a registry (etcd or the embedded SQLite file); see the module docstring."""

    def __init__(self, registry: Registry, config: NetworkConfig, *,
                 ttl: float = DEFAULT_TTL, renew_margin: float = DEFAULT_RENEW_MARGIN,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: random.Random | None = None, health: RegistryHealth | None = None) -> None:
        self.registry = registry
        self.config = config
        self.ttl = ttl
        self.renew_margin = renew_margin
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.health = health or RegistryHealth()
        self.lease: Lease | None = None
        self._listing: tuple[list[Lease], int] | None = None  # acquire's, for the first watch
        self._identity: Lease | None = None  # acquire's ``wanted``: our PublicIP and VTEP MAC
        self._previous: ipaddress.IPv4Network | None = None  # the subnet file's subnet
        self.bad_leases = BadKeyLog(log, "ignoring lease")
        self._renewing = asyncio.Lock()

    # --- acquire ------------------------------------------------------------------
    async def acquire(self, wanted: Lease, previous: ipaddress.IPv4Network | None = None,
                      attempts: int = 20) -> Lease:
        """Lease a subnet for ``wanted`` (whose subnet field is ignored); ``previous`` is
        the subnet in subnet.env, which this node's pods may still be using."""
        self._identity = wanted
        self._previous = previous
        refused: set[ipaddress.IPv4Network] = set()  # found taken by a key the listing skipped
        for _ in range(attempts):
            current, rev = await self.registry.list_leases()
            self._listing = (current, rev)
            held = {x.subnet: x for x in current}
            for old in self._ours_first(current, wanted, previous):
                got = await self._claim(replace(wanted, subnet=old.subnet), reclaim=True, listed=old)
                if got:
                    return got
            for old in self._for_our_address(current, wanted, previous):
                if old.reserved:
                    got = await self._claim(replace(wanted, subnet=old.subnet), reclaim=True, listed=old)
                else:
                    got = await self._take_over(replace(wanted, subnet=old.subnet), old)
                if got:
                    return got
            if previous is not None and self._in_range(previous):
                holder = held.get(previous)
                if holder is None or self._reclaimable(holder) is not None:
                    got = await self._claim(replace(wanted, subnet=previous), reclaim=True, listed=holder)
                    if got:
                        return got
                log.info("subnet %s from the subnet file is leased by %s; choosing another",
                         previous, holder.public_ip if holder else "another node")
                previous = None
            choice = self._pick_free(set(held) | refused)
            got = await self._claim(replace(wanted, subnet=choice), reclaim=False, listed=None)
            if got:
                return got
            refused.add(choice)
            log.info("subnet %s was taken by a racing node; choosing again", choice)
        raise NoFreeSubnet(f"could not lease a subnet after {attempts} attempts")

    def _ours_first(self, current: list[Lease], wanted: Lease,
                    previous: ipaddress.IPv4Network | None) -> list[Lease]:
        """Leases that are provably ours (our PublicIP and our VTEP MAC), the one in the
        subnet file first."""
        mine = [x for x in current if x.public_ip == wanted.public_ip and self._in_range(x.subnet)
                and self._provably_ours(x)]
        mine.sort(key=lambda x: (x.subnet != previous, x.subnet))
        if len(mine) > 1:
            log.warning("%d leases carry our PublicIP and VTEP MAC (%s); using %s, leaving the others",
                        len(mine), ", ".join(str(x.subnet) for x in mine), mine[0].subnet)
        return mine

    def _for_our_address(self, current: list[Lease], wanted: Lease,
                         previous: ipaddress.IPv4Network | None) -> list[Lease]:
        """Leases that carry our PublicIP but are not provably ours (another VTEP MAC, or
        a MAC-less one at a subnet we never had): flanneld reuses any of them; we reuse
        one only where no live node can be keeping it (README, Security): reservations
        first (an administrator bound the subnet to our address), then leases whose
        holder missed its renewal (_take_over decides, atomically). The subnet file's
        first within each kind."""
        found = [x for x in current if x.public_ip == wanted.public_ip and self._in_range(x.subnet)
                 and not self._provably_ours(x)]
        found.sort(key=lambda x: (not x.reserved, x.subnet != previous, x.subnet))
        return found

    def _provably_ours(self, lease: Lease) -> bool:
        """Our PublicIP and our VTEP MAC. A udp lease (flanneld's udp backend writes
        PublicIP only) carries no MAC: then our PublicIP at a subnet this node
        demonstrably had (the subnet file's, or the one we hold) is the proof, whatever
        our own backend is now: a node restarted under a vxlan config after running udp
        (the migration runbook) keeps its subnet, as flanneld does."""
        me = self._identity or self.lease
        if me is None or lease.public_ip != me.public_ip:
            return False
        if lease.vtep_mac is None:
            return lease.subnet in self._our_subnets()
        return lease.vtep_mac == me.vtep_mac

    def _our_subnets(self) -> set[ipaddress.IPv4Network]:
        return {s for s in (self._previous, self.lease.subnet if self.lease else None) if s}

    def _reclaimable(self, holder: Lease | None, *, acquiring: bool = False) -> str | None:
        """Why a key holding ``holder`` (None: a value that is no lease) may be written
        over with our lease, or None if it is another node's. Used only for keys that
        are ours to defend (our current subnet, or the one in the subnet file) and, while
        ``acquiring``, for reservations of our address.

        A reservation of our address is ours to take while acquiring, whatever MAC it
        names (the node was reinstalled: the reservation outlives its VTEP MAC). Once
        we run, only a MAC-less one (written by hand over our key) is reclaimed: one
        naming another MAC is a node with our address that took it, and taking it back
        would make the two write it in turn forever; we give up instead (SubnetLost)."""
        if holder is None:
            return "it held a value that is not a lease"
        if self._provably_ours(holder):
            return "it held our lease"
        me = self._identity or self.lease
        if (holder.reserved and me is not None and holder.public_ip == me.public_ip
                and (acquiring or holder.vtep_mac is None)):
            return "it is a reservation for our PublicIP"
        reason = peers.implausible(holder)
        if reason is not None:
            return f"it held a lease no node can have ({reason})"
        return None

    async def _claim(self, new: Lease, *, reclaim: bool, listed: Lease | None) -> Lease | None:
        """Write ``new`` at its key: create it if free, renew it if it holds our exact
        value, and, if ``reclaim``, write over a value that _reclaimable allows (compare-
        and-swap on the bytes seen, so a racing writer wins or loses cleanly). None if
        the key is another node's."""
        found: tuple[Lease | None, bytes] | None = None  # (holder, raw) seen at the key
        for _ in range(4):
            try:
                if found is not None:
                    holder, raw = found
                    why = self._reclaimable(holder, acquiring=True) if reclaim else None
                    if why is None:
                        return None
                    self.lease = await self.registry.replace_lease(new, self.ttl, raw)
                    if holder is not None and self._provably_ours(holder):
                        log.info("reusing our lease %s%s%s", new.subnet,
                                 "" if holder.same_route(new) else " with updated backend data",
                                 _kind(self.lease))
                    else:
                        log.warning("subnet %s: reclaimed our key (%s)%s", new.subnet, why, _kind(self.lease))
                elif listed is not None:
                    self.lease = await self.registry.renew_lease(new, self.ttl)
                    log.info("reusing our lease %s%s", new.subnet, _kind(self.lease))
                else:
                    self.lease = await self.registry.create_lease(new, self.ttl)
                return self.lease
            except (LeaseTaken, LeaseLost) as e:
                if e.raw is None:  # the key is absent (now): create it
                    found, listed = None, None
                else:
                    found = (e.holder, e.raw)
        return None

    async def _take_over(self, new: Lease, old: Lease) -> Lease | None:
        """Write ``new`` over ``old`` (our PublicIP, another node's as far as anyone can
        prove) iff its holder missed its renewal: it expires within our renew margin.
        Every flannel agent renews a margin before expiry (flanneld's default margin,
        60 min, is ours) and retries each minute, so no live node reaching the registry
        lets its lease get that close. The registry checks and writes atomically: a
        renewal in between wins. None if the lease is kept alive."""
        due = self._clock() + self._margin()
        try:
            self.lease = await self.registry.take_over(new, self.ttl, old, due)
        except LeaseTaken as e:
            if e.raw is None:  # expired meanwhile: free
                return await self._claim(new, reclaim=False, listed=None)
            left = "" if e.holder is None or not e.holder.expiration else \
                f", {max(e.holder.expiration - self._clock(), 0) / 60:.0f} min left"
            log.warning("lease %s has our PublicIP %s but VTEP MAC %s (ours is %s) and is renewed in "
                        "time%s: another node's, left alone", old.subnet, old.public_ip, old.vtep_mac,
                        new.vtep_mac, left)
            return None
        log.warning("took over lease %s: it carries our PublicIP %s (VTEP MAC %s, ours is %s) and its "
                    "holder missed its renewal (due %.0f min before expiry)", new.subnet,
                    old.public_ip, old.vtep_mac, new.vtep_mac, self._margin() / 60)
        return self.lease

    def _margin(self) -> float:
        return self.renew_margin if self.renew_margin < self.ttl else self.ttl / 2

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
        margin = self._margin()
        if lease.reserved:  # nothing to extend: look at it as often as a lease is renewed
            return self.ttl - margin
        left = lease.expiration - self._clock()
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
                if self.lease.reserved:
                    log.debug("renewed %s: a reservation, still without a TTL", self.lease.subnet)
                else:
                    log.debug("renewed %s until %s", self.lease.subnet, time.ctime(self.lease.expiration))
                return
            except LeaseLost as lost:
                holder, raw = lost.holder, lost.raw
            if raw is None:
                try:
                    self.lease = await self.registry.create_lease(self.lease, self.ttl)
                    log.warning("our lease %s had vanished from the registry; re-created it", self.lease.subnet)
                    return
                except LeaseTaken as taken:  # written between our renew and create
                    holder, raw = taken.holder, taken.raw
                    if raw is None:
                        continue
            why = self._reclaimable(holder)
            if why is None:
                assert holder is not None
                raise SubnetLost(f"our subnet {self.lease.subnet} is now leased by {holder.public_ip}; "
                                 "refusing to take another subnet (it would strand this node's pods)")
            try:
                self.lease = await self.registry.replace_lease(self.lease, self.ttl, raw)
                log.warning("our lease %s: reclaimed our key (%s)", self.lease.subnet, why)
                return
            except LeaseTaken:
                continue  # changed again under us: look again
        raise SubnetLost(f"our subnet {self.lease.subnet} keeps changing hands in the registry; "
                         "refusing to take another subnet (it would strand this node's pods)")

    # --- watch --------------------------------------------------------------------
    async def watch(self) -> AsyncIterator[list[LeaseEvent]]:
        """Route events for the other nodes, forever. The first batch is the snapshot
        (yielded even when empty, so a caller knows it has every peer there is).
        Our own key is defended after every listing and on every change to it: gone,
        or holding anything but our lease, it is renewed, re-created or reclaimed
        (SubnetLost if another node validly holds it)."""
        known: dict[ipaddress.IPv4Network, Lease] = {}
        backoff = Backoff()
        first = True
        while True:
            try:
                # acquire's listing, made just before our lease was written: no need to
                # list again, and our key's absence from it means nothing
                from_acquire = self._listing is not None
                if self._listing is not None:
                    (current, rev), self._listing = self._listing, None
                else:
                    current, rev = await self.registry.list_leases()
                fresh = snapshot(x for x in current if not self._is_ours(x) and self._in_network(x))
                changes = diff(known, fresh)
                known = fresh
                self.health.succeeded()
                if changes or first:
                    yield changes  # the first batch always: "the snapshot is applied"
                first = False
                if not from_acquire and self.lease is not None:
                    now = next((x for x in current if x.subnet == self.lease.subnet), None)
                    if now is None or not now.same_route(self.lease):
                        await self.renew_or_recreate()
                backoff.reset()
                async for events, _rev in self.registry.watch_leases(rev):
                    out = []
                    for ev in events:
                        if self.lease is not None and ev.lease.subnet == self.lease.subnet:
                            if ev.type is EventType.REMOVED or not ev.lease.same_route(self.lease):
                                await self.renew_or_recreate()
                            continue
                        prev = known.get(ev.lease.subnet)
                        if ev.type is EventType.REMOVED:
                            if prev is not None:
                                del known[ev.lease.subnet]
                                out.append(LeaseEvent(EventType.REMOVED, prev))
                        elif not self._in_network(ev.lease):
                            continue
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

    def _in_network(self, lease: Lease) -> bool:
        """Only a /SubnetLen inside our network is a subnet of this network: another
        length would be a second name for part of a node's subnet."""
        if self.config.contains_subnet(lease.subnet):
            self.bad_leases.good(str(lease.subnet))
            return True
        self.bad_leases.skipped(str(lease.subnet), f"{lease.subnet} from {lease.public_ip}: not a "
                                f"/{self.config.subnet_len} inside {self.config.network}")
        return False


def _kind(lease: Lease) -> str:
    return " (a reservation: it keeps no TTL)" if lease.reserved else ""
