"""The underlay: the host interface the overlay runs over (pure data).

Found by host/netconf.py (flanneld's --iface / --iface-regex / --iface-can-reach
order); read by both data planes and the daemon.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class Underlay:
    ifname: str
    ifindex: int
    address: ipaddress.IPv4Address | None  # bound by the UDP socket (None: an IPv6-only network)
    public_ip: ipaddress.IPv4Address | None  # advertised in the lease (may differ: NAT)
    mtu: int
    network: ipaddress.IPv4Network | None = None  # the prefix ``address`` is on (its broadcast is no peer)
    address6: ipaddress.IPv6Address | None = None  # flannel-v6.<VNI>'s local address (EnableIPv6)
    public_ip6: ipaddress.IPv6Address | None = None  # PublicIPv6 in the lease (--public-ipv6)
