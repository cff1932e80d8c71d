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
    address: ipaddress.IPv4Address   # bound by the UDP socket
    public_ip: ipaddress.IPv4Address  # advertised in the lease (may differ: NAT)
    mtu: int
    network: ipaddress.IPv4Network | None = None  # the prefix ``address`` is on (its broadcast is no peer)
