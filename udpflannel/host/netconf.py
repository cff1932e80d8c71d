"""Addresses, routes, MTU and link lookups through netlink (pyroute2). Never `ip`."""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14


class NetconfError(Exception):
    """A link or address we need is missing or cannot be configured."""


@dataclass(frozen=True)
class Underlay:
    ifname: str
    ifindex: int
    address: ipaddress.IPv4Address   # bound by the UDP socket
    public_ip: ipaddress.IPv4Address  # advertised in the lease (may differ: NAT)
    mtu: int


def _ipv4_addresses(ipr: IPRoute, index: int) -> list[ipaddress.IPv4Address]:
    return [ipaddress.IPv4Address(a.get("IFA_ADDRESS"))
            for a in ipr.addr("dump", family=socket.AF_INET, index=index)]


def find_underlay(iface: str | None, public_ip: str | None) -> Underlay:
    """The interface the overlay runs over: --iface, else the one holding --public-ip,
    else the default route's interface (flannel's order)."""
    with IPRoute() as ipr:
        index = None
        if iface:
            found = ipr.link_lookup(ifname=iface)
            if not found:
                raise NetconfError(f"interface {iface} does not exist")
            index = found[0]
        elif public_ip:
            want = ipaddress.IPv4Address(public_ip)
            for link in ipr.get_links():
                if want in _ipv4_addresses(ipr, link["index"]):
                    index = link["index"]
                    break
        if index is None:
            for route in ipr.route("dump", family=socket.AF_INET, table=254):
                if route["dst_len"] == 0 and route.get("RTA_OIF"):
                    index = route.get("RTA_OIF")
                    break
        if index is None:
            if public_ip:  # e.g. a NATed public address on no local interface
                raise NetconfError(f"no interface holds {public_ip} and there is no default "
                                   "route; pass --iface")
            raise NetconfError("no default route to pick the underlay interface; pass --iface")
        link = ipr.link("get", index=index)[0]
        addrs = _ipv4_addresses(ipr, index)
    if not addrs:
        raise NetconfError(f"interface {link.get('ifname')} has no IPv4 address")
    local = ipaddress.IPv4Address(public_ip) if public_ip and ipaddress.IPv4Address(public_ip) in addrs else addrs[0]
    return Underlay(link.get("ifname"), index, local,
                    ipaddress.IPv4Address(public_ip) if public_ip else local, link.get("mtu"))


def underlay_address_present(underlay: Underlay) -> bool:
    """Whether the underlay interface still holds the address our socket is bound to."""
    with IPRoute() as ipr:
        try:
            return underlay.address in _ipv4_addresses(ipr, underlay.ifindex)
        except NetlinkError:  # the interface itself is gone
            return False


UDP_GSO_MAX = 65507  # payload bytes one UDP_SEGMENT send may carry
VXLAN_FRAME_HEADERS = 22  # VXLAN + inner Ethernet, in front of each inner packet


def tso_size_for_one_send(mtu: int) -> int:
    """The largest TCP super-packet the TUN should hand us so that all its segments,
    each framed in VXLAN, fit one UDP_SEGMENT send (so the peer's GRO sees one run
    and writes one super-packet). Assumes the worst TCP header, 20 + 12 (timestamps)."""
    segments = UDP_GSO_MAX // (mtu + VXLAN_FRAME_HEADERS)
    return segments * (mtu - 52) + 40


def configure_tun(name: str, subnet: ipaddress.IPv4Network, network: ipaddress.IPv4Network,
                  mtu: int, tso: bool = False) -> None:
    """<subnet .0>/32 on the TUN, MTU, link up, and the whole overlay routed into it.
    With TSO, cap the super-packet size so each leaves in one UDP_SEGMENT send."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise NetconfError(f"TUN device {name} vanished")
        index = found[0]
        if tso:
            try:
                ipr.link("set", index=index, gso_max_size=tso_size_for_one_send(mtu))
            except NetlinkError as e:  # older kernels: bigger super-packets, two sends each
                log.info("cannot cap the TUN's TSO size (%s); continuing", e)
        try:
            ipr.link("set", index=index, mtu=mtu)
            ipr.addr("replace", index=index, address=str(subnet.network_address), prefixlen=32)
            ipr.link("set", index=index, state="up")
            ipr.route("replace", dst=str(network), oif=index, scope=253)  # link scope
        except NetlinkError as e:
            raise NetconfError(f"configuring {name}: {e.args[1] if len(e.args) > 1 else e}") from None

