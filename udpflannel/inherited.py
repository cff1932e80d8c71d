"""A data plane the daemon did not set up itself, with the state it was set up for:
taken over from another daemon (takeover.py) or started warm from the state dir
(warmstart.py). The daemon keeps it if the registry's config and lease agree."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from udpflannel.core import config as netconfig
from udpflannel.core.underlay import Underlay
from udpflannel.dataplane.base import PlaneOptions
from udpflannel.dataplane.sockets import parse_offloads
from udpflannel.options import RunOptions


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def node_state(cfg: netconfig.NetworkConfig, underlay: Underlay, mac: str,
               subnet: ipaddress.IPv4Network | None, mac6: str | None = None,
               subnet6: ipaddress.IPv6Network | None = None) -> dict:
    """The node's part of the state (the plane adds its own: describe())."""
    return {"config": cfg.to_json(), "vtep_mac": mac, "lease_subnet": _text(subnet),
            "vtep_mac6": mac6, "lease_subnet6": _text(subnet6),  # dual stack
            "underlay": {"ifname": underlay.ifname, "ifindex": underlay.ifindex,
                         "address": _text(underlay.address), "public_ip": _text(underlay.public_ip),
                         "mtu": underlay.mtu, "network": _text(underlay.network),
                         "address6": _text(underlay.address6), "public_ip6": _text(underlay.public_ip6)}}


def plane_options(opts: RunOptions, cfg: netconfig.NetworkConfig, underlay: Underlay, mac: str,
                  mac6: str | None = None) -> PlaneOptions:
    return PlaneOptions(
        config=cfg, underlay=underlay, vtep_mac=mac, tun=opts.tun, engine=opts.engine,
        offloads=parse_offloads(opts.offload), udp_port=opts.udp_port or None,
        source_ports=opts.source_ports, strict_source=opts.strict_source, io=opts.io,
        queues=opts.queues, cpus=opts.cpus, vtep_mac6=mac6)


@dataclass
class Inherited:
    state: dict[str, Any]
    plane: Any  # None: the kernel plane (the kernel forwards meanwhile; set up as usual)
    how: str  # "--takeover" or "warm start"

    @property
    def config(self) -> netconfig.NetworkConfig:
        return netconfig.parse(self.state["config"])

    @property
    def underlay(self) -> Underlay:
        u = self.state["underlay"]

        def of(cls, key: str):  # absent or None in an older daemon's state, or IPv6-only
            return cls(u[key]) if u.get(key) else None
        return Underlay(u["ifname"], u["ifindex"], of(ipaddress.IPv4Address, "address"),
                        of(ipaddress.IPv4Address, "public_ip"), u["mtu"], of(ipaddress.IPv4Network, "network"),
                        of(ipaddress.IPv6Address, "address6"), of(ipaddress.IPv6Address, "public_ip6"))

    @property
    def vtep_mac(self) -> str:
        return self.state["vtep_mac"]

    @property
    def vtep_mac6(self) -> str | None:
        """The IPv6 VTEP MAC (dual stack), None without IPv6 (or from an older daemon)."""
        return self.state.get("vtep_mac6")

    @property
    def subnets(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """The subnets of the lease the plane was set up for, IPv4 first (as Lease.subnets)."""
        texts = (self.state.get("lease_subnet"), self.state.get("lease_subnet6"))
        return tuple(ipaddress.ip_network(t) for t in texts if t)

    def plane_options(self, opts: RunOptions) -> PlaneOptions:
        return plane_options(opts, self.config, self.underlay, self.vtep_mac, self.vtep_mac6)
