"""Addresses, routes, MTU and link lookups through netlink (pyroute2). Never `ip`."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from udpflannel.core.config import Address, Network
from udpflannel.core.errors import UdpflannelError
from udpflannel.core.underlay import Underlay
from udpflannel.core.wire import HEADROOM, UDP_MAX_PAYLOAD

log = logging.getLogger(__name__)

RTPROT_UDPFLANNEL = 203  # our routes' protocol tag: how prune() knows which are ours


class NetconfError(UdpflannelError):
    """A link or address we need is missing or cannot be configured."""


def _ipv4_addresses(ipr: IPRoute, index: int) -> list[ipaddress.IPv4Address]:
    return [ipaddress.IPv4Address(a.get("IFA_ADDRESS"))
            for a in ipr.addr("dump", family=socket.AF_INET, index=index)]


IFA_F_TEMPORARY, IFA_F_DEPRECATED, IFA_F_PERMANENT = 0x01, 0x20, 0x80


def _ipv6_addresses(ipr: IPRoute, index: int) -> list[ipaddress.IPv6Address]:
    """The interface's usable IPv6 addresses in flanneld's order (pkg/ip
    GetInterfaceIP6Addrs): unicast (global, unique local or link-local) and not
    deprecated; global before link-local, permanent (set by hand) before autoconfigured,
    stable before temporary."""
    found = []
    for a in ipr.addr("dump", family=socket.AF_INET6, index=index):
        addr = ipaddress.IPv6Address(a.get("IFA_ADDRESS"))
        flags = a.get("IFA_FLAGS") or a["flags"]
        if addr.is_unspecified or addr.is_loopback or addr.is_multicast or flags & IFA_F_DEPRECATED:
            continue
        found.append((addr.is_link_local, not flags & IFA_F_PERMANENT, bool(flags & IFA_F_TEMPORARY), addr))
    return [x[-1] for x in sorted(found, key=lambda x: x[:3])]


def _default_route_oif(ipr: IPRoute, family: int) -> int | None:
    for route in ipr.route("dump", family=family, table=254):
        if route["dst_len"] == 0 and route.get("RTA_OIF"):
            return route.get("RTA_OIF")
    return None


def find_underlay(ifaces: tuple[str, ...] = (), public_ip: str | None = None, *,
                  regexes: tuple[str, ...] = (), can_reach: str | None = None,
                  public_ipv6: str | None = None, ipv4: bool = True, ipv6: bool = False) -> Underlay:
    """The interface the overlay runs over, in flanneld's order (main.go and pkg/ipmatch
    LookupExtIface, per IP stack: ``ipv4`` and/or ``ipv6``, the network's families): the
    first usable of --iface (names or addresses; usable: it holds an address of every
    family), else the first interface whose name or address (of those families; dual
    stack: both) matches an --iface-regex, else the one the kernel would use to reach
    --iface-can-reach, else the one holding --public-ip (or --public-ipv6), else the
    default route's (dual stack: IPv4's and IPv6's, which must be one interface). Its
    IPv4 address is the one named, else its first; its IPv6 address the one named (or
    --public-ipv6 when the interface holds it), else its first in flanneld's order."""
    import re
    with IPRoute() as ipr:
        links = {link["index"]: link.get("ifname") for link in ipr.get_links()}
        addrs = {i: _ipv4_addresses(ipr, i) if ipv4 else [] for i in links}
        addrs6 = {i: _ipv6_addresses(ipr, i) if ipv6 else [] for i in links}

        def usable(index: int) -> bool:
            return (not ipv4 or bool(addrs[index])) and (not ipv6 or bool(addrs6[index]))

        chosen: tuple[int, ipaddress.IPv4Address | None, ipaddress.IPv6Address | None] | None = None
        if ifaces:
            for item in ifaces:
                chosen = _by_name_or_address(item, links, addrs, addrs6, usable)
                if chosen is not None:
                    break
            if chosen is None:
                need = " and ".join(f for f, on in (("an IPv4", ipv4), ("an IPv6", ipv6)) if on)
                raise NetconfError(f"no usable interface among --iface {', '.join(ifaces)} "
                                   f"(each must exist and hold {need} address)")
        elif regexes:
            try:
                patterns = [re.compile(r) for r in regexes]
            except re.error as e:
                raise NetconfError(f"--iface-regex: {e}") from None
            chosen = _by_regex(patterns, links, addrs, addrs6, ipv4, ipv6)
            if chosen is None:
                raise NetconfError(f"no interface name or address matches --iface-regex "
                                   f"{', '.join(regexes)}")
        elif can_reach:
            try:
                route = ipr.route("get", dst=str(ipaddress.ip_address(can_reach)))[0]
            except (ValueError, NetlinkError) as e:
                raise NetconfError(f"--iface-can-reach {can_reach}: {e}") from None
            src = route.get_attr("RTA_PREFSRC")
            src = ipaddress.ip_address(src) if src else None
            chosen = (route.get_attr("RTA_OIF"), src if src and src.version == 4 else None,
                      src if src and src.version == 6 else None)
        elif given := public_ip or public_ipv6:
            want = ipaddress.ip_address(given)
            for index in links:
                if want in addrs[index] or want in addrs6[index]:
                    chosen = (index, want if want.version == 4 else None, want if want.version == 6 else None)
        if chosen is None:
            oif = _default_route_oif(ipr, socket.AF_INET) if ipv4 else None
            oif6 = _default_route_oif(ipr, socket.AF_INET6) if ipv6 else None
            if ipv4 and ipv6 and oif and oif6 and oif != oif6:
                raise NetconfError(f"the IPv6 default route's interface {links.get(oif6)} is not the IPv4 "
                                   f"default route's {links.get(oif)}; pass --iface")
            either = oif or oif6
            if either and (oif or not ipv4) and (oif6 or not ipv6):  # (no family at all: none)
                chosen = (either, None, None)
        if chosen is None:
            if public_ip or public_ipv6:  # e.g. a NATed public address on no local interface
                raise NetconfError(f"no interface holds {public_ip or public_ipv6} and there is no "
                                   "default route; pass --iface")
            which = "IPv6 default route" if ipv6 and not ipv4 else "default route"
            if ipv4 and ipv6:
                which = "IPv4 and IPv6 default route"
            raise NetconfError(f"no {which} to pick the underlay interface; pass --iface")
        index, addr, addr6 = chosen
        link = ipr.link("get", index=index)[0]
        prefixes = {ipaddress.IPv4Address(a.get("IFA_ADDRESS")): a["prefixlen"]
                    for a in ipr.addr("dump", family=socket.AF_INET, index=index)}
        held6 = _ipv6_addresses(ipr, index) if ipv6 else []
    local = None
    if ipv4:
        held = addrs.get(index, [])
        if not held:
            raise NetconfError(f"interface {link.get('ifname')} has no IPv4 address")
        local = addr if addr in held else held[0]
        if public_ip and ipaddress.IPv4Address(public_ip) in held:
            local = ipaddress.IPv4Address(public_ip)
    local6 = None
    if ipv6:
        if not held6:
            raise NetconfError(f"interface {link.get('ifname')} has no IPv6 address")
        local6 = addr6 if addr6 in held6 else held6[0]
        if public_ipv6 and ipaddress.IPv6Address(public_ipv6) in held6:
            local6 = ipaddress.IPv6Address(public_ipv6)
    return Underlay(link.get("ifname"), index, local,
                    (ipaddress.IPv4Address(public_ip) if public_ip else local) if ipv4 else None, link.get("mtu"),
                    ipaddress.IPv4Interface(f"{local}/{prefixes[local]}").network if local in prefixes else None,
                    local6, (ipaddress.IPv6Address(public_ipv6) if public_ipv6 else local6) if ipv6 else None)


def _by_name_or_address(item: str, links: dict, addrs: dict, addrs6: dict, usable):
    try:
        want = ipaddress.ip_address(item)
    except ValueError:
        want = None
    for index, name in links.items():
        if want is not None and (want in addrs[index] or want in addrs6[index]):
            return index, want if want.version == 4 else None, want if want.version == 6 else None
        if want is None and name == item and usable(index):
            return index, None, None
    return None


def _by_regex(patterns, links: dict, addrs: dict, addrs6: dict, ipv4: bool, ipv6: bool):
    """The first interface with an address of each family matching (IPv4 and IPv6
    both, in dual stack), else the first whose name matches."""
    for pattern in patterns:
        for index, name in sorted(links.items()):
            hit4 = next((a for a in addrs[index] if pattern.fullmatch(str(a))), None)
            hit6 = next((a for a in addrs6[index] if pattern.fullmatch(str(a))), None)
            if (not ipv4 or hit4) and (not ipv6 or hit6) and (hit4 or hit6):
                return index, hit4, hit6
            if pattern.fullmatch(name) and (not ipv4 or addrs[index]) and (not ipv6 or addrs6[index]):
                return index, None, None
    return None


def link_mtu(ifindex: int) -> int | None:
    """A device's MTU now (None if it is gone)."""
    with IPRoute() as ipr:
        try:
            return ipr.link("get", index=ifindex)[0].get("mtu")
        except NetlinkError:
            return None


def underlay_address_present(underlay: Underlay) -> bool:
    """Whether the underlay interface still holds the addresses our sockets and devices
    are bound to (IPv4, and IPv6 with dual stack)."""
    with IPRoute() as ipr:
        try:
            return ((underlay.address is None or underlay.address in _ipv4_addresses(ipr, underlay.ifindex))
                    and (underlay.address6 is None
                         or underlay.address6 in _ipv6_addresses(ipr, underlay.ifindex)))
        except NetlinkError:  # the interface itself is gone
            return False


def tso_size_for_one_send(mtu: int, mtu6: int | None = None) -> int:
    """The largest TCP super-packet the TUN should hand us so that all its segments,
    each framed in VXLAN, fit one UDP_SEGMENT send (so the peer's GRO sees one run
    and writes one super-packet). Assumes the worst TCP header, 20 + 12 (timestamps).
    With IPv6 (``mtu6``, its route's MTU) the smaller of both families' sizes: the
    device has one cap, and an IPv6 segment's IP header is 40 bytes."""
    return min(_one_send(mtu, 20), _one_send(mtu6, 40) if mtu6 else UDP_MAX_PAYLOAD)


def _one_send(mtu: int, ip_header: int) -> int:
    segments = UDP_MAX_PAYLOAD // (mtu + HEADROOM)
    return segments * (mtu - ip_header - 32) + ip_header + 20


FALLBACK_METRIC = 4096  # below the TUN's own route; only ever used without it
TUN_QUEUE = 2000  # packets the TUN holds for the engine (the kernel's default 500 overflows on bursts)


def configure_tun(name: str, subnet: ipaddress.IPv4Network | None, network: ipaddress.IPv4Network | None,
                  mtu: int, tso: bool = False, *, subnet6: ipaddress.IPv6Network | None = None,
                  network6: ipaddress.IPv6Network | None = None, mtu6: int | None = None) -> None:
    """<subnet .0>/32 on the TUN, MTU, link up, and the whole overlay routed into it,
    with an unreachable route for the overlay behind it: should the TUN ever go
    (deleted while no daemon runs), traffic for remote pods is refused here rather
    than sent unencapsulated out of the default route. With TSO, cap the super-packet
    size so each leaves in one UDP_SEGMENT send. Idempotent (a restart re-runs it).
    IPv6 (``subnet6``: EnableIPv6) as flanneld gives flannel-v6.<VNI>: <subnet6 ::>/128
    and the IPv6 overlay routed in with ``mtu6`` (VXLAN over IPv6 takes 20 bytes more
    than over IPv4: a per-route MTU, so the IPv4 side keeps the device's); without it,
    no IPv6 on the TUN (None: an IPv6-only network, no IPv4 address or route)."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise NetconfError(f"TUN device {name} vanished")
        index = found[0]
        if subnet6 is None:
            disable_ipv6(name)
        else:
            enable_ipv6(name)
        if tso:
            try:
                ipr.link("set", index=index, gso_max_size=tso_size_for_one_send(mtu, mtu6 if subnet6 else None))
            except NetlinkError as e:  # older kernels: bigger super-packets, two sends each
                log.info("cannot cap the TUN's TSO size (%s); continuing", e)
        try:
            ipr.link("set", index=index, mtu=mtu, txqlen=TUN_QUEUE)
            sides = [(own, overlay, route_mtu) for own, overlay, route_mtu in
                     ((subnet, network, None), (subnet6, network6, mtu6)) if own is not None and overlay is not None]
            for own, _, _ in sides:
                set_address(ipr, index, own)
            ipr.link("set", index=index, state="up")  # (a route needs the link up)
            for _, overlay, route_mtu in sides:
                _overlay_route(ipr, index, overlay, route_mtu)
        except NetlinkError as e:
            raise NetconfError(f"configuring {name}: {e.args[1] if len(e.args) > 1 else e}") from None


def _overlay_route(ipr: IPRoute, index: int, network: Network, mtu: int | None) -> None:
    """The overlay into the device (link scope), and the unreachable route behind it."""
    extra = {"metrics": {"mtu": mtu}} if mtu else {}
    ipr.route("replace", dst=str(network), oif=index, scope=253, **extra)
    _fallback_route(ipr, network)


def set_address(ipr: IPRoute, index: int, subnet: Network) -> None:
    """Exactly one address of the subnet's family on an overlay device: <subnet .0>/32,
    or <subnet ::>/128 (an old lease's is removed; IPv6 link-local addresses stay, as
    flanneld's EnsureV6AddressOnLink leaves them)."""
    own = str(subnet.network_address)
    family = socket.AF_INET if subnet.version == 4 else socket.AF_INET6
    for addr in ipr.addr("dump", family=family, index=index):
        found = addr.get_attr("IFA_ADDRESS")
        if found != own and not (subnet.version == 6 and ipaddress.IPv6Address(found).is_link_local):
            ipr.addr("del", index=index, address=found, prefixlen=addr["prefixlen"])
    ipr.addr("replace", index=index, address=own, prefixlen=subnet.max_prefixlen)


def _fallback_route(ipr: IPRoute, network: Network) -> None:
    ipr.route("replace", dst=str(network), type="unreachable", priority=FALLBACK_METRIC)


def ensure_fallback_route(network: Network) -> None:
    """The overlay's unreachable route, behind every route of the data plane: an
    address of the overlay that no route covers (an unleased subnet, or everything
    once a device is gone while no daemon runs) is refused here instead of leaving
    unencapsulated by the default route."""
    with IPRoute() as ipr:
        try:
            _fallback_route(ipr, network)
        except NetlinkError as e:
            raise NetconfError(f"unreachable route for {network}: {e}") from None


RT_TABLE_MAIN = 254
RTN_BLACKHOLE = 6
RTPROT_BOOT = 3  # the protocol flanneld's routes carry (netlink's default)


def ensure_blackhole_route(subnet: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """flanneld's --ip-blackhole-route (pkg/ip AddBlackholeV4Route): a blackhole route
    for this node's leased subnet in the main table, so that traffic for an address of
    the subnet no pod holds is dropped here rather than sent out by the default route;
    meant for CNI setups without a bridge route for the subnet (Canal). Added only when
    the main table holds no blackhole route for exactly this prefix (one flanneld left
    counts); flanneld calls it every --iptables-resync seconds. True when it added one.
    A route of another kind for the same prefix and metric (the CNI bridge's) makes the
    kernel refuse it with EEXIST, for flanneld too: a NetconfError saying so."""
    with IPRoute() as ipr:
        try:
            family = socket.AF_INET if subnet.version == 4 else socket.AF_INET6
            for route in ipr.route("dump", family=family, table=RT_TABLE_MAIN):
                if (route["type"] == RTN_BLACKHOLE and route["dst_len"] == subnet.prefixlen
                        and route.get_attr("RTA_DST") == str(subnet.network_address)
                        and (route.get_attr("RTA_TABLE") or route["table"]) == RT_TABLE_MAIN):
                    return False
            ipr.route("add", dst=str(subnet), type="blackhole", proto=RTPROT_BOOT, table=RT_TABLE_MAIN)
        except NetlinkError as e:
            why = e.args[1] if len(e.args) > 1 else str(e)
            if e.code == errno.EEXIST:
                why += " (another route for this prefix, e.g. the CNI bridge's)"
            raise NetconfError(f"blackhole route for {subnet}: {why}") from None
    return True


def remove_overlay_routes(network: ipaddress.IPv4Network) -> None:
    """Cleanup: the unreachable fallback route for the overlay (the TUN's own route
    goes with the TUN)."""
    with IPRoute() as ipr:
        try:
            ipr.route("del", dst=str(network), type="unreachable", priority=FALLBACK_METRIC)
        except NetlinkError:
            pass


def disable_ipv6(name: str) -> None:
    """No IPv6 on an overlay device: it carries IPv4, and a link-local address would
    make the kernel send MLD reports into it (counted as drops on a fresh node)."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1\n")
    except FileNotFoundError:  # IPv6 is off in this kernel or namespace
        pass
    except OSError as e:  # an unprivileged container mounts /proc/sys read-only: cosmetic, go on
        log.warning("cannot turn IPv6 off on %s (%s): it may send a few MLD reports", name, e.strerror)


def enable_ipv6(name: str) -> None:
    """IPv6 on an overlay device that carries it (a TUN an IPv4-only run turned it off
    on), accepting no router advertisements, as flanneld's flannel-v6.<VNI>."""
    write_sysctl(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "0")
    write_sysctl(f"/proc/sys/net/ipv6/conf/{name}/accept_ra", "0")


def write_sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value + "\n")
    except OSError as e:  # flanneld ignores this too; a read-only /proc/sys (a container) is cosmetic
        log.debug("cannot write %s: %s", path, e)


def route_get(address: Address) -> tuple[str | None, int | None]:
    """(gateway, output interface) of the route the kernel would use to reach address."""
    with IPRoute() as ipr:
        try:
            route = ipr.route("get", dst=str(address))[0]
        except NetlinkError:
            return None, None
        return route.get_attr("RTA_GATEWAY"), route.get_attr("RTA_OIF")


def set_direct_route(subnet: ipaddress.IPv4Network, via: ipaddress.IPv4Address,
                     underlay: Underlay, present: bool) -> None:
    """DirectRouting: ``subnet`` via the peer's PublicIP on the underlay (or removed)."""
    with IPRoute() as ipr:
        try:
            if present:
                ipr.route("replace", dst=str(subnet), gateway=str(via), oif=underlay.ifindex,
                          proto=RTPROT_UDPFLANNEL)
            else:
                ipr.route("del", dst=str(subnet), gateway=str(via), oif=underlay.ifindex)
        except NetlinkError as e:
            if present:
                raise NetconfError(f"direct route {subnet} via {via}: {e}") from None
