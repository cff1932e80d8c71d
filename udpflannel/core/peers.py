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
* ``unusable`` adds what depends on us: our VXLAN framing must reach it (backend type
  "vxlan" with a VtepMAC; a lease without BackendType is flanneld's udp backend), the
  same VNI, a /SubnetLen inside our network, a PublicIP that is not our own address and
  not inside the overlay (a tunnel to an address routed through the tunnel loops).
"""

from __future__ import annotations

import ipaddress

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


def unusable(lease: Lease, config: NetworkConfig,
             own_public_ip: ipaddress.IPv4Address | None) -> str | None:
    """Why ``lease`` must not become a route on this node, or None if it may."""
    reason = implausible(lease)
    if reason is not None:
        return reason
    if own_public_ip is not None and lease.public_ip == own_public_ip:
        return f"PublicIP {lease.public_ip} is our own address"
    if lease.public_ip in config.network:
        return f"PublicIP {lease.public_ip} is inside the overlay network {config.network}"
    if lease.backend_type != "vxlan":
        # flanneld's udp backend writes no BackendType. Per-peer udp framing is to come;
        # until then such a node cannot be reached by our VXLAN framing.
        return f"backend type {lease.backend_type or 'udp'!r} does not speak VXLAN framing"
    if lease.vtep_mac is None:
        return "vxlan lease without a VtepMAC"
    if lease.vni is not None and lease.vni != config.vni:
        return f"VNI {lease.vni} differs from ours ({config.vni})"
    if not config.contains_subnet(lease.subnet):
        return f"not a /{config.subnet_len} inside {config.network}"
    return None
