"""A plain flanneld vxlan node's kernel programming, for tests and the benchmark.

The peer to match: the interop tests put one next to a udpflannel node, and the
benchmark measures it as the reference. It is programmed by the same functions as
udpflannel's own kernel data plane (host.vxlandev): flannel.<VNI> with learning off,
and per remote lease a permanent neighbour, fdb entry and onlink route. Its offloads
are the kernel's defaults (no tweak: a kernel peer on a virtual network hands over
unfinished checksums, and the engine must cope, as it does).
"""

from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute

from udpflannel.core.wire import VXLAN_OVERHEAD, VXLAN_PORT
from udpflannel.host import netconf, vxlandev


def create(ipr: IPRoute, *, local_ip: str, underlay: str, subnet: str, vtep_mac: str,
           vni: int = 1, port: int = VXLAN_PORT, name: str | None = None, mtu: int | None = None) -> int:
    """flannel.<VNI>: nolearning, dstport, <subnet .0>/32, up. Returns its index. An IPv6
    ``local_ip`` and ``subnet`` make flannel-v6.<VNI> (VXLAN over IPv6, <subnet ::>/128,
    MTU 70 bytes under the underlay's)."""
    link = ipr.link_lookup(ifname=underlay)[0]
    underlay_mtu = ipr.link("get", index=link)[0].get("mtu")
    local = ipaddress.ip_address(local_ip)
    spec = vxlandev.DeviceSpec(name or vxlandev.device_name(vni, local.version), vni, port, local, link, vtep_mac,
                               mtu or vxlandev.device_mtu(underlay_mtu - VXLAN_OVERHEAD, underlay_mtu,
                                                          local.version))
    index, _ = vxlandev.ensure_device(ipr, spec)
    netconf.set_address(ipr, index, ipaddress.ip_network(subnet))
    return index


def _entry(subnet: str, vtep_mac: str, public_ip: str) -> vxlandev.PeerEntry:
    return vxlandev.PeerEntry(ipaddress.ip_network(subnet), ipaddress.ip_address(public_ip), vtep_mac)


def add_peer(ipr: IPRoute, index: int, *, subnet: str, vtep_mac: str, public_ip: str) -> None:
    vxlandev.add_peer(ipr, index, _entry(subnet, vtep_mac, public_ip), underlay_index=0)


def remove_peer(ipr: IPRoute, index: int, *, subnet: str, vtep_mac: str, public_ip: str) -> None:
    vxlandev.remove_peer(ipr, index, _entry(subnet, vtep_mac, public_ip), underlay_index=0)
