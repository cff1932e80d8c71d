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

    def describe(self) -> str:
        """For a log line: ``eth0 (10.0.0.5, public 10.0.0.5; fd00::5, public fd00::5, MTU 1500)``."""
        families = [f"{a}, public {p}" for a, p in ((self.address, self.public_ip), (self.address6, self.public_ip6))
                    if a is not None]
        return f"{self.ifname} ({'; '.join(families)}, MTU {self.mtu})"
