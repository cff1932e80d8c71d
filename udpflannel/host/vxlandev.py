"""A kernel VXLAN device programmed exactly as flanneld's vxlan backend programs it.

The kernel data plane (udpflannel.dataplane.kernel) runs on it, and the lab's kernel
peer (a plain flanneld vxlan node stand-in for tests and the benchmark) is built from
the same functions, so both program the kernel one way.

The device: ``flannel.<VNI>``, VNI, ``local`` our underlay address, ``dev`` the
underlay, ``dstport`` the port, learning off, outer UDP checksums off (as flanneld's
netlink library leaves them), our persisted VTEP MAC, MTU, ``<subnet .0>/32``, up.
Per peer three entries, all permanent, none ever learnt from the wire:

    neigh <peer subnet .0> lladdr <VtepMAC> dev flannel.<VNI>
    fdb   <VtepMAC> dev flannel.<VNI> self dst <PublicIP>
    route <peer subnet> via <peer subnet .0> dev flannel.<VNI> onlink

With DirectRouting a peer on our underlay's own link gets ``route <subnet> via
<PublicIP> dev <underlay>`` instead (no VXLAN at all).

IPv6 (EnableIPv6), as flanneld's: a second device ``flannel-v6.<VNI>`` with ``local``
our IPv6 underlay address (VXLAN over IPv6), its own MAC, MTU the same request as
flannel.<VNI>'s capped where the kernel caps it (an IPv6 underlay's VXLAN header is 20
bytes longer: the underlay's MTU - 70), IPv6 kept on (accept_ra 0), exactly one
non-link-local address ``<subnet ::>/128``, and per peer the same three entries in
IPv6: ``neigh <peer subnet ::> lladdr <v6 VtepMAC>``, ``fdb <v6 VtepMAC> dst
<PublicIPv6>``, ``route <peer subnet> via <peer subnet ::> onlink``.

Blocking netlink calls (pyroute2's sync API): the daemon runs them on a worker thread.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from udpflannel.core.config import subnet_within
from udpflannel.host.netconf import RTPROT_UDPFLANNEL, disable_ipv6, write_sysctl

log = logging.getLogger(__name__)

NUD_PERMANENT = 0x80
RTPROT_KERNEL = 2
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04


VXLAN6_EXTRA = 20  # an IPv6 outer header is 20 bytes longer than IPv4's


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    vni: int
    port: int
    local: ipaddress.IPv4Address | ipaddress.IPv6Address  # our underlay address
    underlay_index: int
    mac: str
    mtu: int

    @property
    def version(self) -> int:
        """The family the device carries (and its underlay's): 4 or 6."""
        return self.local.version


@dataclass(frozen=True)
class PeerEntry:
    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network
    public_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    vtep_mac: str | None  # None: a direct route (DirectRouting)

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address)

    @property
    def family(self) -> int:
        return socket.AF_INET if self.subnet.version == 4 else socket.AF_INET6


def device_name(vni: int, version: int = 4) -> str:
    return f"flannel.{vni}" if version == 4 else f"flannel-v6.{vni}"


def device_mtu(requested: int, underlay_mtu: int, version: int) -> int:
    """flanneld asks for the same MTU for both devices; the kernel caps an IPv6 VXLAN
    device at its underlay's MTU minus the longer headers (as flanneld's ends up)."""
    return requested if version == 4 else min(requested, underlay_mtu - 50 - VXLAN6_EXTRA)


def device_mac(name: str) -> str | None:
    """The MAC of the VXLAN device ``name``, or None if there is none (or it is no VXLAN)."""
    with IPRoute() as ipr:
        index = find(ipr, name)
        if index is None:
            return None
        link = ipr.link("get", index=index)[0]
        info = link.get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
            return None
        return link.get("address")


def find(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _mismatch(ipr: IPRoute, index: int, spec: DeviceSpec) -> str | None:
    """Why an existing device cannot be reused as ``spec``, or None."""
    link = ipr.link("get", index=index)[0]
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    if kind != "vxlan":
        return f"it is a {kind or 'non-VXLAN'} device"
    data = dict(info.get_attr("IFLA_INFO_DATA")["attrs"])
    local = "IFLA_VXLAN_LOCAL" if spec.version == 4 else "IFLA_VXLAN_LOCAL6"
    wanted = {"IFLA_VXLAN_ID": spec.vni, "IFLA_VXLAN_PORT": spec.port,
              local: str(spec.local), "IFLA_VXLAN_LINK": spec.underlay_index,
              "IFLA_VXLAN_LEARNING": 0}
    for key, value in wanted.items():
        if data.get(key) != value:
            return f"{key[11:].lower()} is {data.get(key)!r}, not {value!r}"
    if link.get("address") != spec.mac:
        return f"its MAC is {link.get('address')}, not {spec.mac}"
    return None


def ensure_device(ipr: IPRoute, spec: DeviceSpec) -> tuple[int, bool]:
    """Reuse a matching device (no outage on restart) or replace a mismatching one,
    then set MTU and bring it up. Returns (index, created)."""
    index = find(ipr, spec.name)
    created = False
    if index is not None:
        why = _mismatch(ipr, index, spec)
        if why is not None:
            log.warning("replacing %s: %s", spec.name, why)
            ipr.link("del", index=index)
            index = None
    if index is None:
        # As flanneld asks for it: no UDP checksum setting (the kernel's default, which
        # computes outer checksums) and no transmit queue (txqlen 0, as netlink's Go
        # LinkAttrs leaves it).
        local = {"vxlan_local" if spec.version == 4 else "vxlan_local6": str(spec.local)}
        ipr.link("add", ifname=spec.name, kind="vxlan", vxlan_id=spec.vni, vxlan_port=spec.port,
                 vxlan_learning=0, vxlan_link=spec.underlay_index, address=spec.mac, txqlen=0, **local)
        index = find(ipr, spec.name)
        created = True
        if index is None:
            raise NetlinkError(errno.ENODEV, f"{spec.name} vanished after creation")
    ipr.link("set", index=index, mtu=spec.mtu)
    if spec.version == 4:
        # No IPv6 on it: the overlay is IPv4, and a link-local address would make the kernel
        # send MLD reports and router solicitations that no fdb entry carries, counted as
        # tx_dropped (send errors in the metrics) on an idle node.
        disable_ipv6(spec.name)
    else:
        write_sysctl(f"/proc/sys/net/ipv6/conf/{spec.name}/accept_ra", "0")  # as flanneld (newVXLANDevice)
    ipr.link("set", index=index, state="up")  # binds the UDP port: EADDRINUSE if busy
    return index, created


def add_peer(ipr: IPRoute, index: int, peer: PeerEntry, underlay_index: int) -> None:
    if peer.vtep_mac is None:
        ipr.route("replace", dst=str(peer.subnet), gateway=str(peer.public_ip),
                  oif=underlay_index, proto=RTPROT_UDPFLANNEL)
        return
    ipr.neigh("replace", dst=peer.gateway, lladdr=peer.vtep_mac, ifindex=index,
              state=NUD_PERMANENT, family=peer.family)
    ipr.fdb("replace", ifindex=index, lladdr=peer.vtep_mac, dst=str(peer.public_ip),
            state=NUD_PERMANENT, flags=NTF_SELF)
    ipr.route("replace", dst=str(peer.subnet), gateway=peer.gateway, oif=index,
              flags=RTNH_F_ONLINK, proto=RTPROT_UDPFLANNEL)


def _quietly(call, *args, **kw) -> None:
    try:
        call(*args, **kw)
    except NetlinkError as e:
        if e.code not in (errno.ENOENT, errno.ESRCH, errno.ENODEV):
            raise


def remove_peer(ipr: IPRoute, index: int, peer: PeerEntry, underlay_index: int) -> None:
    """Undo add_peer; entries already gone are fine."""
    if peer.vtep_mac is None:
        _quietly(ipr.route, "del", dst=str(peer.subnet), gateway=str(peer.public_ip),
                 oif=underlay_index)
        return
    _quietly(ipr.route, "del", dst=str(peer.subnet), gateway=peer.gateway, oif=index)
    _quietly(ipr.fdb, "del", ifindex=index, lladdr=peer.vtep_mac, dst=str(peer.public_ip),
             flags=NTF_SELF)
    _quietly(ipr.neigh, "del", dst=peer.gateway, lladdr=peer.vtep_mac, ifindex=index,
             family=peer.family)


def prune(ipr: IPRoute, index: int, network: ipaddress.IPv4Network | ipaddress.IPv6Network,
          keep: set, underlay_index: int) -> int:
    """After a restart: remove the routes, neighbours and fdb entries of peers that
    left while we were down (everything of ours in ``network``'s family not in
    ``keep``). Returns how many."""
    removed = 0
    family = socket.AF_INET if network.version == 4 else socket.AF_INET6
    for route in ipr.route("dump", family=family, table=254):
        dst = route.get_attr("RTA_DST")
        if dst is None or route.get_attr("RTA_OIF") not in (index, underlay_index):
            continue
        if route["proto"] == RTPROT_KERNEL:  # e.g. the route of flannel-v6's own /128
            continue
        subnet = ipaddress.ip_network(f"{dst}/{route['dst_len']}")
        if subnet in keep or not subnet_within(subnet, network) or subnet == network:
            continue
        if route.get_attr("RTA_OIF") == underlay_index and route["proto"] != RTPROT_UDPFLANNEL:
            continue  # a route on the underlay that we did not make
        _quietly(ipr.route, "del", dst=str(subnet), oif=route.get_attr("RTA_OIF"))
        removed += 1
    gateways = {str(s.network_address) for s in keep}
    for neigh in ipr.neigh("dump", ifindex=index, family=family):
        dst = neigh.get_attr("NDA_DST")
        if family == socket.AF_INET6 and not neigh["state"] & NUD_PERMANENT:
            continue  # the kernel's own (multicast, NOARP): never ours
        if dst not in gateways:
            _quietly(ipr.neigh, "del", dst=dst, ifindex=index, family=family,
                     lladdr=neigh.get_attr("NDA_LLADDR"))
            removed += 1
    return removed


def prune_fdb(ipr: IPRoute, index: int, keep_macs: set[str]) -> int:
    removed = 0
    for entry in ipr.fdb("dump", ifindex=index):
        mac, dst = entry.get_attr("NDA_LLADDR"), entry.get_attr("NDA_DST")
        if entry["ifindex"] == index and dst and mac not in keep_macs and mac != "00:00:00:00:00:00":
            _quietly(ipr.fdb, "del", ifindex=index, lladdr=mac, dst=dst, flags=NTF_SELF)
            removed += 1
    return removed


def stats(ipr: IPRoute, index: int) -> dict[str, int]:
    """The device's own counters (IFLA_STATS64)."""
    link = ipr.link("get", index=index)[0]
    s = link.get_attr("IFLA_STATS64") or {}
    return {k: int(s.get(k, 0)) for k in ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes",
                                          "rx_dropped", "tx_dropped", "rx_errors", "tx_errors")}


def delete(ipr: IPRoute, name: str) -> bool:
    index = find(ipr, name)
    if index is None:
        return False
    ipr.link("del", index=index)
    return True
