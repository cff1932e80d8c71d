"""A kernel VXLAN node programmed exactly as flannel's vxlan backend programs it.

Used as the peer to match: the interop tests put one next to a udpflannel node, and
the benchmark measures it as the reference. Per remote lease flannel installs three
things, and so do we: a permanent neighbour entry (<subnet .0> -> VtepMAC), an fdb
entry (VtepMAC -> PublicIP) and an onlink route (subnet via <subnet .0>). Learning
is off, so no ARP or flooding ever reaches the wire.
"""

from __future__ import annotations

import ipaddress
import socket

from pyroute2 import IPRoute

NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04


def create(ipr: IPRoute, *, local_ip: str, underlay: str, subnet: str, vtep_mac: str,
           vni: int = 1, port: int = 8472, name: str = "flannel.1", mtu: int | None = None) -> int:
    """flannel.<VNI>: nolearning, dstport 8472, <subnet .0>/32, up. Returns its index."""
    link = ipr.link_lookup(ifname=underlay)[0]
    underlay_mtu = ipr.link("get", index=link)[0].get("mtu")
    ipr.link("add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_port=port,
             vxlan_learning=0, vxlan_local=local_ip, vxlan_link=link, address=vtep_mac)
    index = ipr.link_lookup(ifname=name)[0]
    ipr.link("set", index=index, mtu=mtu or underlay_mtu - 50)
    own = ipaddress.IPv4Network(subnet)
    ipr.addr("add", index=index, address=str(own.network_address), prefixlen=32)
    ipr.link("set", index=index, state="up")
    return index


def add_peer(ipr: IPRoute, index: int, *, subnet: str, vtep_mac: str, public_ip: str) -> None:
    gateway = str(ipaddress.IPv4Network(subnet).network_address)
    ipr.neigh("replace", dst=gateway, lladdr=vtep_mac, ifindex=index, state=NUD_PERMANENT,
              family=socket.AF_INET)
    ipr.fdb("replace", ifindex=index, lladdr=vtep_mac, dst=public_ip, state=NUD_PERMANENT,
            flags=NTF_SELF)
    ipr.route("replace", dst=subnet, gateway=gateway, oif=index, flags=RTNH_F_ONLINK)


def remove_peer(ipr: IPRoute, index: int, *, subnet: str, vtep_mac: str, public_ip: str) -> None:
    gateway = str(ipaddress.IPv4Network(subnet).network_address)
    ipr.route("del", dst=subnet, gateway=gateway, oif=index)
    ipr.fdb("del", ifindex=index, lladdr=vtep_mac, dst=public_ip, flags=NTF_SELF)
    ipr.neigh("del", dst=gateway, lladdr=vtep_mac, ifindex=index, family=socket.AF_INET)


def complete_checksums(ifname: str = "flannel.1") -> None:
    """Make the kernel finish inner checksums before encapsulating (call inside the
    node's namespace, e.g. via Namespace.call).

    Over veth the kernel leaves a locally sent TCP packet's checksum half done
    (CHECKSUM_PARTIAL travels with the buffer, and a kernel receiver trusts it).
    A real NIC completes it on the wire; a userspace receiver on the same host reads
    the unfinished field and its TUN write is dropped. Turning off the VXLAN
    device's checksum offload gives the frames a real NIC would send."""
    from pyroute2.ethtool import Ethtool
    ethtool = Ethtool()
    try:
        features = ethtool.get_features(ifname)
        features.features["tx-checksum-ip-generic"].enable = False
        ethtool.set_features(ifname, features)
    finally:
        ethtool.close()
