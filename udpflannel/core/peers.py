"""Which peer leases may become routes: the routability policy (pure).

A lease is whatever anyone who can write the registry put there, so before a lease
becomes a route its values are checked, and a refused lease gets one line saying why
(``unusable`` returns that line; None means routable). Two kinds of rule:

* ``implausible``: values no node can have, whatever our config: a PublicIP that is
  unspecified, "this network" (0/8), loopback (traffic counted as sent, then lost in our
  own stack), multicast (sprayed onto the underlay), reserved or the limited broadcast
  address; a VtepMAC that is all-zero or a group address (broadcast, multicast). The
  subnet manager also uses this to tell a garbage lease it may reclaim from a real
  node's lease it must leave alone.
* ``route_for`` adds what depends on us and picks the framing: a /SubnetLen inside our
  network, a PublicIP that is not our own address and not inside the overlay (a tunnel
  to an address routed through the tunnel loops); a vxlan lease needs a VtepMAC and
  our VNI and gets VXLAN framing; a udp lease (no BackendType: flanneld's udp backend)
  gets flanneld's udp framing where the data plane speaks it.

Dual stack: a lease gives up to two routes, one per family the network enables: its
IPv4 subnet to its PublicIP (BackendData's VtepMAC: flannel.<VNI>) and its IPv6
subnet to its PublicIPv6 (BackendV6Data's VtepMAC: flannel-v6.<VNI>), each checked
with the same rules in that family's forms (IPv6: unspecified, loopback, multicast,
reserved, our own, inside the IPv6 overlay). A ``PeerRoute``'s family is its subnet's
version; an IPv6 route always has VXLAN framing (flanneld's udp backend is IPv4 only).

Keys: one subnet may be named by two keys (``10.244.7.0-24`` and
``10.244.7.0-24&fd10:0:0:7::-64``, e.g. a node's lease before and after IPv6 was
turned on; flanneld's v4-only nodes route the IPv4 side of a dual-stack key, and so do
we). ``RouteBook`` routes a subnet by one key, chosen from what is known now, not from
the order events came in: a key of the network's own form first (dual-stack keys in
a dual-stack network, IPv4-only keys in an IPv4 network), then the lowest key; a key
whose route is refused does not count. So an alias never wins over the real key, and
when the winner goes the other takes over.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from udpflannel.core.config import NetworkConfig
from udpflannel.core.lease import Lease, mac_bytes

_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _implausible_ip(ip: Address, name: str) -> str | None:
    if ip.version == 4 and ip in _THIS_NETWORK:
        return f"{name} {ip} is not a host address"
    if ip.is_unspecified:
        return f"{name} {ip} is not a host address"
    if ip.is_loopback:
        return f"{name} {ip} is a loopback address"
    if ip.is_multicast:
        return f"{name} {ip} is a multicast address"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return f"{name} {ip} is an IPv4-mapped address"
    if ip.is_reserved:  # IPv4 240.0.0.0/4, which holds 255.255.255.255; IPv6 ::/8 and others
        return f"{name} {ip} is a reserved or broadcast address"
    return None


def _implausible_mac(mac: str | None, name: str) -> str | None:
    if mac is None:
        return None
    raw = mac_bytes(mac)
    if raw == bytes(6):
        return f"{name} {mac} is all-zero"
    if raw[0] & 1:  # the group bit: broadcast and multicast
        return f"{name} {mac} is a broadcast or multicast address"
    return None


def implausible(lease: Lease) -> str | None:
    """Why no real node could hold this lease, or None. Each family the lease holds is
    checked on the values it has (an IPv6-only lease's PublicIP is 0.0.0.0, as flanneld
    writes it; a missing PublicIPv6 only costs the IPv6 route)."""
    if lease.subnet is not None:
        reason = _implausible_ip(lease.public_ip, "PublicIP")
        if reason is not None:
            return reason
    if lease.public_ipv6 is not None:
        reason = _implausible_ip(lease.public_ipv6, "PublicIPv6")
        if reason is not None:
            return reason
    return _implausible_mac(lease.vtep_mac, "VtepMAC") or _implausible_mac(lease.vtep_mac6, "v6 VtepMAC")


@dataclass(frozen=True)
class PeerRoute:
    """What a data plane programs for a peer: where its subnet goes, and how framed.
    The family is the subnet's: an IPv6 route's ``public_ip`` is the peer's PublicIPv6
    (the outer IPv6 address) and its ``vtep_mac`` the peer's flannel-v6 VTEP."""
    subnet: Network
    public_ip: Address
    framing: str  # "vxlan" or "udp" (flanneld's udp backend: bare IP, IPv4 only)
    port: int
    vtep_mac: str | None = None  # vxlan framing only

    @property
    def version(self) -> int:
        return self.subnet.version


@dataclass(frozen=True)
class Framings:
    """How this node can reach peers: VXLAN (always, on ``vxlan_port``) and flanneld's
    udp framing on ``udp_port`` (None: not spoken here, e.g. by the kernel plane)."""
    vxlan_port: int
    udp_port: int | None = None


def route_for(lease: Lease, config: NetworkConfig, own_public_ip: ipaddress.IPv4Address | None,
              framings: Framings, underlay_network: ipaddress.IPv4Network | None = None, *,
              version: int = 4, own_public_ipv6: ipaddress.IPv6Address | None = None) -> PeerRoute | str:
    """The ``version`` route to ``lease``'s node (4: its IPv4 subnet, 6: its IPv6 one),
    or the one-line reason it must not have one.
    A vxlan lease is reached by VXLAN; a lease without BackendType (flanneld's udp
    backend writes none) or "udp" by flanneld's udp framing, where this node speaks
    it: a udp node sends bare IP to every lease on its own port, so every pair of a
    cluster migrating from udp to vxlan stays connected through udpflannel."""
    reason = implausible(lease)
    if reason is not None:
        return reason
    if version == 6:
        return _route6(lease, config, framings, own_public_ipv6)
    if lease.subnet is None:
        return "no IPv4 subnet (an IPv6-only lease)"
    if own_public_ip is not None and lease.public_ip == own_public_ip:
        return f"PublicIP {lease.public_ip} is our own address"
    if (underlay_network is not None and underlay_network.prefixlen < 31
            and lease.public_ip in (underlay_network.broadcast_address, underlay_network.network_address)):
        return f"PublicIP {lease.public_ip} is no host of our underlay network {underlay_network}"
    if config.network is None:
        return "this network is IPv6-only"
    if lease.public_ip in config.network:
        return f"PublicIP {lease.public_ip} is inside the overlay network {config.network}"
    if not config.contains_subnet(lease.subnet):
        return f"not a /{config.subnet_len} inside {config.network}"
    if lease.backend_type == "vxlan":
        if lease.vtep_mac is None:
            return "vxlan lease without a VtepMAC"
        if lease.vni is not None and lease.vni != config.vni:
            return f"VNI {lease.vni} differs from ours ({config.vni})"
        return PeerRoute(lease.subnet, lease.public_ip, "vxlan", framings.vxlan_port, lease.vtep_mac)
    if lease.backend_type in ("", "udp"):
        if framings.udp_port is None:
            return "backend type 'udp' (flanneld's udp framing) is not spoken by this data plane"
        return PeerRoute(lease.subnet, lease.public_ip, "udp", framings.udp_port)
    return f"backend type {lease.backend_type!r} is not one udpflannel speaks (vxlan, udp)"


def _route6(lease: Lease, config: NetworkConfig, framings: Framings,
            own: ipaddress.IPv6Address | None) -> PeerRoute | str:
    pool = config.v6
    if pool is None:
        return "this network has no IPv6 (EnableIPv6 is off)"
    if lease.ipv6_subnet is None:
        return "no IPv6 subnet"
    ip = lease.public_ipv6
    if ip is None:
        return "no PublicIPv6"
    if own is not None and ip == own:
        return f"PublicIPv6 {ip} is our own address"
    if ip in pool.network:
        return f"PublicIPv6 {ip} is inside the overlay network {pool.network}"
    if not pool.contains_subnet(lease.ipv6_subnet):
        return f"IPv6 subnet {lease.ipv6_subnet} is not a /{pool.subnet_len} inside {pool.network}"
    if lease.backend_type != "vxlan":
        return (f"backend type {lease.backend_type or 'udp'!r} carries no IPv6 "
                "(flanneld's udp backend is IPv4 only)")
    if lease.vtep_mac6 is None:
        return "vxlan lease without an IPv6 VtepMAC (BackendV6Data)"
    if lease.vni6 is not None and lease.vni6 != config.vni:
        return f"IPv6 VNI {lease.vni6} differs from ours ({config.vni})"
    return PeerRoute(lease.ipv6_subnet, ip, "vxlan", framings.vxlan_port, lease.vtep_mac6)


def unusable(lease: Lease, config: NetworkConfig, own_public_ip: ipaddress.IPv4Address | None,
             framings: Framings | None = None,
             underlay_network: ipaddress.IPv4Network | None = None, *,
             version: int = 4, own_public_ipv6: ipaddress.IPv6Address | None = None) -> str | None:
    """Why ``lease`` must not become a ``version`` route on this node, or None if it may."""
    got = route_for(lease, config, own_public_ip, framings or Framings(config.port), underlay_network,
                    version=version, own_public_ipv6=own_public_ipv6)
    return got if isinstance(got, str) else None


@dataclass(frozen=True)
class RouteChanges:
    add: tuple[PeerRoute, ...]  # new routes, or replacements of a subnet's route
    remove: tuple[PeerRoute, ...]  # routes to take away
    ignored: tuple[tuple[Lease, str], ...]  # leases (or one family of them) refused, with the reason


class RouteBook:
    """The routes a plane has installed, by subnet, and what a batch of lease events
    changes in them: the one place that turns events into route changes for both
    planes (pure; the plane then programs what ``plan`` says and nothing else).
    ``routes`` may be seeded directly (a plane that starts with routes it remembers);
    a seeded route stays until an event names its subnet."""

    def __init__(self, config: NetworkConfig, own_public_ip: ipaddress.IPv4Address | None,
                 framings: Framings, underlay_network: ipaddress.IPv4Network | None = None, *,
                 own_public_ipv6: ipaddress.IPv6Address | None = None) -> None:
        self.config = config
        self.own_public_ip = own_public_ip
        self.own_public_ipv6 = own_public_ipv6
        self.framings = framings
        self.underlay_network = underlay_network
        self.routes: dict[Network, PeerRoute] = {}
        self._leases: dict[str, Lease] = {}  # every lease known, by key
        self._claims: dict[Network, set[str]] = {}  # subnet -> keys of leases naming it

    def _claimed(self, lease: Lease) -> list[Network]:
        """The subnets of ``lease`` in families this network carries."""
        return [s for s in lease.subnets if self.config.pool(s.version) is not None]

    def route(self, lease: Lease, version: int) -> PeerRoute | str:
        return route_for(lease, self.config, self.own_public_ip, self.framings, self.underlay_network,
                         version=version, own_public_ipv6=self.own_public_ipv6)

    def _rank(self, key: str) -> tuple[bool, str]:
        """Keys of the network's own form first ("&" when both families, none when
        IPv4 only, "0.0.0.0-0&" when IPv6 only), then by key."""
        lease = self._leases[key]
        own_form = (lease.subnet is not None) == self.config.enable_ipv4 and \
            (lease.ipv6_subnet is not None) == self.config.enable_ipv6
        return not own_form, key

    def _winner(self, subnet: Network) -> tuple[str | None, PeerRoute | None]:
        for key in sorted(self._claims.get(subnet, ()), key=self._rank):
            got = self.route(self._leases[key], subnet.version)
            if isinstance(got, PeerRoute):
                return key, got
        return None, None

    def plan(self, events) -> RouteChanges:
        """Apply ``events`` (core.lease.LeaseEvent) to the book; return the changes: the
        batch's net effect (a key replaced by another in one batch moves no route that
        stays the same)."""
        from udpflannel.core.lease import EventType
        affected: dict[Network, None] = {}
        latest: dict[str, Lease] = {}  # ADDED leases of this batch, by key
        for ev in events:
            key = ev.lease.key
            old = self._leases.pop(key, None)
            affected.update(dict.fromkeys([*(old.subnets if old else ()), *ev.lease.subnets]))
            for subnet in (self._claimed(old) if old else ()):
                self._claims.get(subnet, set()).discard(key)
            latest.pop(key, None)
            if ev.type is EventType.ADDED:
                self._leases[key] = latest[key] = ev.lease
                for subnet in self._claimed(ev.lease):
                    self._claims.setdefault(subnet, set()).add(key)
        add: dict[Network, PeerRoute] = {}
        remove: list[PeerRoute] = []
        winners: dict[Network, str | None] = {}
        for subnet in affected:
            if not self._claims.get(subnet):
                self._claims.pop(subnet, None)
            winners[subnet], desired = self._winner(subnet)
            self._update(subnet, desired, add, remove)
        ignored: list[tuple[Lease, str]] = []
        for key, lease in latest.items():
            claimed = self._claimed(lease)
            if not claimed:  # so no route either: the reason why
                got = self.route(lease, 4 if self.config.enable_ipv4 else 6)
                ignored.append((lease, got if isinstance(got, str) else "no subnet this network carries"))
            for subnet in claimed:
                if winners.get(subnet) != key:
                    got = self.route(lease, subnet.version)
                    why = got if isinstance(got, str) else f"{subnet} is routed by key {winners.get(subnet)}"
                    ignored.append((lease, why if subnet.version == 4 else f"IPv6: {why}"))
        return RouteChanges(tuple(add.values()), tuple(remove), tuple(ignored))

    def _update(self, subnet: Network, desired: PeerRoute | None, add: dict, remove: list) -> None:
        current = self.routes.get(subnet)
        if desired == current:
            return
        add.pop(subnet, None)
        if desired is None:
            del self.routes[subnet]
            remove.append(current)
            return
        if current is not None and (current.framing, current.vtep_mac) != (desired.framing, desired.vtep_mac):
            remove.append(current)  # a replaced route whose framing entries differ
        self.routes[subnet] = desired
        add[subnet] = desired
