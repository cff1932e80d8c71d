"""Addresses, routes, MTU and link lookups through netlink (pyroute2). Never `ip`."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

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


def configure_tun(name: str, subnet: ipaddress.IPv4Network, network: ipaddress.IPv4Network,
                  mtu: int) -> None:
    """<subnet .0>/32 on the TUN, MTU, link up, and the whole overlay routed into it."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise NetconfError(f"TUN device {name} vanished")
        index = found[0]
        try:
            ipr.link("set", index=index, mtu=mtu)
            ipr.addr("replace", index=index, address=str(subnet.network_address), prefixlen=32)
            ipr.link("set", index=index, state="up")
            ipr.route("replace", dst=str(network), oif=index, scope=253)  # link scope
        except NetlinkError as e:
            raise NetconfError(f"configuring {name}: {e.args[1] if len(e.args) > 1 else e}") from None


def link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))
