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

Dual stack. A lease holds a subnet of each family the network enables, and its key
names them (core.lease); a node is identified by its primary family (IPv4, or IPv6
when the network is IPv6-only): PublicIP and VtepMAC, or PublicIPv6 and the IPv6
VtepMAC. A provably-ours lease whose key does not fit the network's families (IPv6
turned on: a v4-only key; or off) keeps the subnets it has that still fit and gains
the missing family's (the subnet file's FLANNEL_IPV6_SUBNET if free, else a free one),
moved to its new key in one registry step (rekey_lease): the node keeps its IPv4
subnet, and its pods their addresses, where flanneld deletes the lease and leases a
new pair. Other keys naming our subnets are never routes; the watch skips them.

The clock and the random source are injected so tests can drive time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from dataclasses import replace
from typing import AbstractSet, AsyncIterator, Awaitable, Callable, cast

from udpflannel.core import peers
from udpflannel.core.config import Network, NetworkConfig, SubnetPool
from udpflannel.core.lease import EventType, Lease, LeaseEvent, diff, encode_value, snapshot
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
                 rng: random.Random | None = None, health: RegistryHealth | None = None,
                 previous_v6: ipaddress.IPv6Network | None = None) -> None:
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
        self._previous6: ipaddress.IPv6Network | None = previous_v6  # ... and its IPv6 subnet
        self.bad_leases = BadKeyLog(log, "ignoring lease")
        self._renewing = asyncio.Lock()

    # --- acquire ------------------------------------------------------------------
    async def acquire(self, wanted: Lease, previous: ipaddress.IPv4Network | None = None,
                      attempts: int = 20, *, previous_v6: ipaddress.IPv6Network | None = None) -> Lease:
        """Lease subnets for ``wanted`` (whose subnet fields are ignored); ``previous``
        (and ``previous_v6``) are the subnets in subnet.env, which this node's pods may
        still be using."""
        self._identity = wanted
        self._previous = previous
        self._previous6 = previous_v6 or self._previous6
        refused: set = set()  # subnets found taken by a key the listing skipped
        try_previous = True
        for _ in range(attempts):
            current, rev = await self.registry.list_leases()
            self._listing = (current, rev)
            for old in self._ours_first(current):
                got = await self._claim(self._placed(wanted, old, current), reclaim=True, listed=old)
                if got:
                    return got
            for old in self._for_our_address(current):
                if old.reserved:
                    got = await self._claim(self._placed(wanted, old, current), reclaim=True, listed=old)
                elif self._fits(old):
                    got = await self._take_over(replace(wanted, subnet=old.subnet, ipv6_subnet=old.ipv6_subnet), old)
                else:
                    got = None
                if got:
                    return got
            prev = self._previous_primary()
            if try_previous and prev is not None and self._primary_pool().in_range(prev):
                holders = [x for x in current if prev in x.subnets]
                if all(self._reclaimable(h) is not None for h in holders):
                    holder = holders[0] if holders else None
                    got = await self._claim(self._placed(wanted, holder, current), reclaim=True, listed=holder)
                    if got:
                        return got
                log.info("subnet %s from the subnet file is leased by %s; choosing another", prev,
                         _address(holders[0]) if holders else "another node")
                try_previous = False
                refused.add(prev)
            choice = self._placed(wanted, None, current, refused)
            got = await self._claim(choice, reclaim=False, listed=None)
            if got:
                return got
            refused.update(choice.subnets)
            log.info("%s was taken by a racing node; choosing again", choice.describe())
        raise NoFreeSubnet(f"could not lease a subnet after {attempts} attempts")

    def _primary_pool(self) -> SubnetPool:
        return self.config.pools[0]

    def _previous_primary(self):
        return self._previous if self.config.enable_ipv4 else self._previous6

    @staticmethod
    def _primary(lease: Lease, ipv4: bool):
        """(subnet, public address, VTEP MAC) of the family that identifies a node."""
        if ipv4:
            return lease.subnet, lease.public_ip, lease.vtep_mac
        return lease.ipv6_subnet, lease.public_ipv6, lease.vtep_mac6

    def _fits(self, lease: Lease) -> bool:
        """The lease's key has the network's families, each subnet in range."""
        return all((sub is not None) == (pool is not None) and (pool is None or pool.in_range(sub))
                   for sub, pool in ((lease.subnet, self.config.v4), (lease.ipv6_subnet, self.config.v6)))

    def _placed(self, wanted: Lease, base: Lease | None, current: list[Lease],
                refused: AbstractSet[Network] = frozenset()) -> Lease:
        """``wanted`` with a subnet of each family the network enables: ``base``'s if it
        has one in range, else the subnet file's if free (no key names it), else a free
        one at random."""
        named: dict = {}
        for x in current:
            for sub in x.subnets:
                named.setdefault(sub, set()).add(x.key)
        mine = base.key if base is not None else None
        chosen = {}
        for pool in self.config.pools:
            v = pool.version
            kept = None if base is None else (base.subnet if v == 4 else base.ipv6_subnet)
            prev = self._previous if v == 4 else self._previous6
            for cand in (kept, prev):
                # ``base``'s own subnet stays its own even where another key names it too
                # (an alias must not move a node; the registry's write decides)
                if (cand is not None and pool.in_range(cand) and cand not in refused
                        and (cand == kept or not named.get(cand, set()) - {mine})):
                    chosen[v] = cand
                    break
            else:
                chosen[v] = self._pick_free(pool, set(named) | set(refused))
        # each pool's subnets are of its family
        return replace(wanted, subnet=cast(ipaddress.IPv4Network | None, chosen.get(4)),
                       ipv6_subnet=cast(ipaddress.IPv6Network | None, chosen.get(6)))

    def _ours_first(self, current: list[Lease]) -> list[Lease]:
        """Leases that are provably ours (our PublicIP and our VTEP MAC, of the primary
        family), those whose key fits the network first, then the subnet file's."""
        prev = self._previous_primary()
        mine = [x for x in current if self._provably_ours(x) and self._primary_in_range(x)]
        mine.sort(key=lambda x: (not self._fits(x), self._primary(x, self.config.enable_ipv4)[0] != prev, x.key))
        if len(mine) > 1:
            log.warning("%d leases carry our address and VTEP MAC (%s); using %s, leaving the others",
                        len(mine), ", ".join(x.key for x in mine), mine[0].key)
        return mine

    def _for_our_address(self, current: list[Lease]) -> list[Lease]:
        """Leases that carry our PublicIP but are not provably ours (another VTEP MAC, or
        a MAC-less one at a subnet we never had): flanneld reuses any of them; we reuse
        one only where no live node can be keeping it (README, Security): reservations
        first (an administrator bound the subnet to our address), then leases whose
        holder missed its renewal (_take_over decides, atomically). The subnet file's
        first within each kind."""
        me = self._identity or self.lease
        ipv4 = self.config.enable_ipv4
        prev = self._previous_primary()
        found = [x for x in current if me is not None and self._primary(x, ipv4)[1] is not None
                 and self._primary(x, ipv4)[1] == self._primary(me, ipv4)[1]
                 and self._primary_in_range(x) and not self._provably_ours(x)]
        found.sort(key=lambda x: (not x.reserved, self._primary(x, ipv4)[0] != prev, x.key))
        return found

    def _primary_in_range(self, lease: Lease) -> bool:
        return self._primary_pool().in_range(self._primary(lease, self.config.enable_ipv4)[0])

    def _provably_ours(self, lease: Lease) -> bool:
        """Our PublicIP and our VTEP MAC (PublicIPv6 and the IPv6 VTEP MAC when the
        network is IPv6-only). A udp lease (flanneld's udp backend writes PublicIP only)
        carries no MAC: then our PublicIP at a subnet this node demonstrably had (the
        subnet file's, or the one we hold) is the proof, whatever our own backend is now:
        a node restarted under a vxlan config after running udp (the migration runbook)
        keeps its subnet, as flanneld does."""
        me = self._identity or self.lease
        if me is None:
            return False
        ipv4 = self.config.enable_ipv4
        subnet, address, mac = self._primary(lease, ipv4)
        _, my_address, my_mac = self._primary(me, ipv4)
        if subnet is None or address is None or address != my_address:
            return False
        if mac is None:
            return subnet in self._our_subnets()
        return mac == my_mac

    def _our_subnets(self) -> set:
        held = self.lease.subnets if self.lease else ()
        return {s for s in (self._previous, self._previous6, *held) if s}

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
        ipv4 = self.config.enable_ipv4
        if (holder.reserved and me is not None and self._primary(holder, ipv4)[1] == self._primary(me, ipv4)[1]
                and (acquiring or self._primary(holder, ipv4)[2] is None)):
            return "it is a reservation for our PublicIP"
        reason = peers.implausible(holder)
        if reason is not None:
            return f"it held a lease no node can have ({reason})"
        return None

    async def _claim(self, new: Lease, *, reclaim: bool, listed: Lease | None) -> Lease | None:
        """Write ``new`` at its key: create it if free, renew it if it holds our exact
        value, and, if ``reclaim``, write over a value that _reclaimable allows (compare-
        and-swap on the bytes seen, so a racing writer wins or loses cleanly). ``listed``
        at another key (our lease under its old key, or garbage at the subnet file's
        subnet) is moved to ``new``'s key in one step. None if a key is another node's."""
        found: tuple[str, Lease | None, bytes] | None = None  # (key, holder, raw) seen
        if listed is not None and listed.key != new.key:
            found = (listed.key, listed, encode_value(listed))  # the stored bytes, most likely
        for _ in range(4):
            try:
                if found is not None:
                    key, holder, raw = found
                    why = self._reclaimable(holder, acquiring=True) if reclaim else None
                    if why is None:
                        return None
                    if key != new.key:
                        self.lease = await self.registry.rekey_lease(new, self.ttl, key, raw)
                        if holder is not None and self._provably_ours(holder):
                            log.warning("our lease %s moved to key %s, keeping %s (the network's families "
                                        "changed)%s", key, new.key, holder.describe(), _kind(self.lease))
                        else:
                            log.warning("subnet %s: reclaimed key %s into %s (%s)%s", new.describe(), key, new.key,
                                        why, _kind(self.lease))
                        return self.lease
                    self.lease = await self.registry.replace_lease(new, self.ttl, raw)
                    if holder is not None and self._provably_ours(holder):
                        log.info("reusing our lease %s%s%s", new.describe(),
                                 "" if holder.same_route(new) else " with updated backend data",
                                 _kind(self.lease))
                    else:
                        log.warning("subnet %s: reclaimed our key (%s)%s", new.describe(), why, _kind(self.lease))
                elif listed is not None:
                    self.lease = await self.registry.renew_lease(new, self.ttl)
                    log.info("reusing our lease %s%s", new.describe(), _kind(self.lease))
                else:
                    self.lease = await self.registry.create_lease(new, self.ttl)
                return self.lease
            except LeaseLost as e:
                found = None if e.raw is None else (new.key, e.holder, e.raw)
                listed = None if e.raw is None else listed
            except LeaseTaken as e:
                if e.raw is None:  # the key is absent (now): create it
                    found, listed = None, None
                else:
                    found = (e.key or new.key, e.holder, e.raw)
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
            _, address, mac = self._primary(old, self.config.enable_ipv4)
            log.warning("lease %s has our %s %s but VTEP MAC %s (ours is %s) and is renewed in "
                        "time%s: another node's, left alone", old.describe(), self._address_name(), address, mac,
                        self._primary(new, self.config.enable_ipv4)[2], left)
            return None
        _, address, mac = self._primary(old, self.config.enable_ipv4)
        log.warning("took over lease %s: it carries our %s %s (VTEP MAC %s, ours is %s) and its "
                    "holder missed its renewal (due %.0f min before expiry)", new.describe(), self._address_name(),
                    address, mac, self._primary(new, self.config.enable_ipv4)[2], self._margin() / 60)
        return self.lease

    def _address_name(self) -> str:
        return "PublicIP" if self.config.enable_ipv4 else "PublicIPv6"

    def _margin(self) -> float:
        return self.renew_margin if self.renew_margin < self.ttl else self.ttl / 2

    def _pick_free(self, pool: SubnetPool, taken: set):
        free = []
        for index in pool.usable_range():
            subnet = pool.subnet_at(index)
            if subnet not in taken:
                free.append(subnet)
                if len(free) == CANDIDATES:
                    break
        if not free:
            raise NoFreeSubnet(f"all subnets of {pool.network} between "
                               f"{pool.subnet_min} and {pool.subnet_max} are leased")
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
                    log.debug("renewed %s: a reservation, still without a TTL", self.lease.describe())
                else:
                    log.debug("renewed %s until %s", self.lease.describe(), time.ctime(self.lease.expiration))
                return
            except LeaseLost as lost:
                holder, raw = lost.holder, lost.raw
            if raw is None:
                try:
                    self.lease = await self.registry.create_lease(self.lease, self.ttl)
                    log.warning("our lease %s had vanished from the registry; re-created it", self.lease.describe())
                    return
                except LeaseTaken as taken:  # written between our renew and create
                    holder, raw = taken.holder, taken.raw
                    if raw is None:
                        continue
            why = self._reclaimable(holder)
            if why is None:
                assert holder is not None
                raise SubnetLost(f"our subnet {self.lease.describe()} is now leased by {_address(holder)}; "
                                 "refusing to take another subnet (it would strand this node's pods)")
            try:
                self.lease = await self.registry.replace_lease(self.lease, self.ttl, raw)
                log.warning("our lease %s: reclaimed our key (%s)", self.lease.describe(), why)
                return
            except LeaseTaken:
                continue  # changed again under us: look again
        raise SubnetLost(f"our subnet {self.lease.describe()} keeps changing hands in the registry; "
                         "refusing to take another subnet (it would strand this node's pods)")

    # --- watch --------------------------------------------------------------------
    async def watch(self) -> AsyncIterator[list[LeaseEvent]]:
        """Route events for the other nodes, forever. The first batch is the snapshot
        (yielded even when empty, so a caller knows it has every peer there is).
        Our own key is defended after every listing and on every change to it: gone,
        or holding anything but our lease, it is renewed, re-created or reclaimed
        (SubnetLost if another node validly holds it)."""
        known: dict[str, Lease] = {}  # by key
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
                fresh = snapshot(x for x in current if not self._is_ours(x) and not self._names_ours(x)
                                 and self._in_network(x))
                changes = diff(known, fresh)
                known = fresh
                self.health.succeeded()
                if changes or first:
                    yield changes  # the first batch always: "the snapshot is applied"
                first = False
                if not from_acquire and self.lease is not None:
                    now = next((x for x in current if x.key == self.lease.key), None)
                    if now is None or not now.same_route(self.lease):
                        await self.renew_or_recreate()
                backoff.reset()
                async for events, _rev in self.registry.watch_leases(rev):
                    out = []
                    for ev in events:
                        key = ev.lease.key
                        if self._is_ours(ev.lease):
                            if (ev.type is EventType.REMOVED or self.lease is None  # (_is_ours: it is not)
                                    or not ev.lease.same_route(self.lease)):
                                await self.renew_or_recreate()
                            continue
                        prev = known.get(key)
                        if ev.type is EventType.REMOVED or self._names_ours(ev.lease):
                            if prev is not None:
                                del known[key]
                                out.append(LeaseEvent(EventType.REMOVED, prev))
                        elif not self._in_network(ev.lease):
                            continue
                        elif prev is None or not prev.same_route(ev.lease):
                            known[key] = ev.lease
                            out.append(ev)
                    if out:
                        yield out
            except Compacted as e:
                log.info("watch history compacted (%s); re-listing", e)
            except RegistryError as e:
                self.health.failed("watch", e)
                await self._sleep(backoff.delay())

    def _is_ours(self, lease: Lease) -> bool:
        return self.lease is not None and lease.key == self.lease.key

    def _names_ours(self, lease: Lease) -> bool:
        """Another key naming one of our subnets: never a route (our own subnets are
        ours to serve), logged at a bounded rate."""
        if self.lease is None or not set(lease.subnets) & set(self.lease.subnets):
            return False
        self.bad_leases.skipped(lease.key, f"{lease.key} from {_address(lease)}: names our subnet "
                                f"{self.lease.describe()}")
        return True

    def _in_network(self, lease: Lease) -> bool:
        """Only a /SubnetLen inside our network is a subnet of this network: another
        length would be a second name for part of a node's subnet. A lease counts when
        one of its subnets is one of the network's families'."""
        if any(self.config.contains_subnet(sub) for sub in lease.subnets):
            self.bad_leases.good(lease.key)
            return True
        wanted = " or ".join(f"/{p.subnet_len} inside {p.network}" for p in self.config.pools)
        self.bad_leases.skipped(lease.key, f"{lease.describe() or lease.key} from {_address(lease)}: not a {wanted}")
        return False


def _kind(lease: Lease) -> str:
    return " (a reservation: it keeps no TTL)" if lease.reserved else ""


def _address(lease: Lease) -> str:
    """The address a lease names its node by: PublicIP, or PublicIPv6 when IPv6-only."""
    return str(lease.public_ip if lease.subnet is not None or lease.public_ipv6 is None else lease.public_ipv6)
