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
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from udpflannel.core.config import NetworkConfig
from udpflannel.core.lease import Lease, mac_bytes

_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def implausible(lease: Lease) -> str | None:
    """Why no real node could hold this lease, or None."""
    ip = lease.public_ip
    if ip in _THIS_NETWORK:
        return f"PublicIP {ip} is not a host address"
    if ip.is_loopback:
        return f"PublicIP {ip} is a loopback address"
    if ip.is_multicast:
        return f"PublicIP {ip} is a multicast address"
    if ip.is_reserved:  # 240.0.0.0/4, which holds 255.255.255.255
        return f"PublicIP {ip} is a reserved or broadcast address"
    if lease.vtep_mac is not None:
        mac = mac_bytes(lease.vtep_mac)
        if mac == bytes(6):
            return f"VtepMAC {lease.vtep_mac} is all-zero"
        if mac[0] & 1:  # the group bit: broadcast and multicast
            return f"VtepMAC {lease.vtep_mac} is a broadcast or multicast address"
    return None


@dataclass(frozen=True)
class PeerRoute:
    """What a data plane programs for a peer: where its subnet goes, and how framed."""
    subnet: ipaddress.IPv4Network
    public_ip: ipaddress.IPv4Address
    framing: str  # "vxlan" or "udp" (flanneld's udp backend: bare IP)
    port: int
    vtep_mac: str | None = None  # vxlan framing only


@dataclass(frozen=True)
class Framings:
    """How this node can reach peers: VXLAN (always, on ``vxlan_port``) and flanneld's
    udp framing on ``udp_port`` (None: not spoken here, e.g. by the kernel plane)."""
    vxlan_port: int
    udp_port: int | None = None


def route_for(lease: Lease, config: NetworkConfig, own_public_ip: ipaddress.IPv4Address | None,
              framings: Framings, underlay_network: ipaddress.IPv4Network | None = None) -> PeerRoute | str:
    """The route to ``lease``'s node, or the one-line reason it must not have one.
    A vxlan lease is reached by VXLAN; a lease without BackendType (flanneld's udp
    backend writes none) or "udp" by flanneld's udp framing, where this node speaks
    it: a udp node sends bare IP to every lease on its own port, so every pair of a
    cluster migrating from udp to vxlan stays connected through udpflannel."""
    reason = implausible(lease)
    if reason is not None:
        return reason
    if own_public_ip is not None and lease.public_ip == own_public_ip:
        return f"PublicIP {lease.public_ip} is our own address"
    if (underlay_network is not None and underlay_network.prefixlen < 31
            and lease.public_ip in (underlay_network.broadcast_address, underlay_network.network_address)):
        return f"PublicIP {lease.public_ip} is no host of our underlay network {underlay_network}"
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


def unusable(lease: Lease, config: NetworkConfig, own_public_ip: ipaddress.IPv4Address | None,
             framings: Framings | None = None,
             underlay_network: ipaddress.IPv4Network | None = None) -> str | None:
    """Why ``lease`` must not become a route on this node, or None if it may."""
    got = route_for(lease, config, own_public_ip, framings or Framings(config.port), underlay_network)
    return got if isinstance(got, str) else None


@dataclass(frozen=True)
class RouteChanges:
    add: tuple[PeerRoute, ...]  # new routes, or replacements of a subnet's route
    remove: tuple[PeerRoute, ...]  # routes to take away
    ignored: tuple[tuple[Lease, str], ...]  # leases refused, with the reason


class RouteBook:
    """The routes a plane has installed, by subnet, and what a batch of lease events
    changes in them: the one place that turns events into route changes for both
    planes (pure; the plane then programs what ``plan`` says and nothing else)."""

    def __init__(self, config: NetworkConfig, own_public_ip: ipaddress.IPv4Address | None,
                 framings: Framings, underlay_network: ipaddress.IPv4Network | None = None) -> None:
        self.config = config
        self.own_public_ip = own_public_ip
        self.framings = framings
        self.underlay_network = underlay_network
        self.routes: dict[ipaddress.IPv4Network, PeerRoute] = {}

    def plan(self, events) -> RouteChanges:
        """Apply ``events`` (core.lease.LeaseEvent) to the book; return the changes."""
        from udpflannel.core.lease import EventType
        add: dict[ipaddress.IPv4Network, PeerRoute] = {}
        remove: list[PeerRoute] = []
        ignored = []
        for ev in events:
            subnet = ev.lease.subnet
            old = self.routes.pop(subnet, None)
            add.pop(subnet, None)
            if ev.type is EventType.REMOVED:
                if old is not None:
                    remove.append(old)
                continue
            got = route_for(ev.lease, self.config, self.own_public_ip, self.framings, self.underlay_network)
            if isinstance(got, str):
                if old is not None:
                    remove.append(old)
                ignored.append((ev.lease, got))
                continue
            if old is not None and old != got and (old.framing, old.vtep_mac) != (got.framing, got.vtep_mac):
                remove.append(old)  # a replaced route whose framing entries differ
            self.routes[subnet] = got
            if old != got:
                add[subnet] = got
        return RouteChanges(tuple(add.values()), tuple(remove), tuple(ignored))
