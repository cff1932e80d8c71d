"""`udpflannel cleanup`: remove on purpose what `run` leaves in place on stop.

A stopped daemon leaves the data plane (the persistent TUN or flannel.<VNI>, their
addresses and routes), the rules and subnet.env, so that a restart is no outage.
This removes them: the TUN, the VXLAN device carrying our VTEP MAC, the overlay's
fallback and direct routes, the masquerade and forward rules of both backends,
subnet.env and the admin socket; with --release-lease also our lease, if the key
still holds it. It refuses while a daemon runs (its admin socket answers).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os

from udpflannel.core import subnetenv
from udpflannel.core.config import subnet_within
from udpflannel.core.errors import UdpflannelError
from udpflannel.core.lease import Lease
from udpflannel.host import localstate, netconf, tun
from udpflannel.host.rules import BACKENDS, RulesError, RuleSpec, make_rules
from udpflannel.host.rules.nftables import delete_tables
from udpflannel.observe import admin
from udpflannel.options import RunOptions
from udpflannel.registry.select import open_registry

log = logging.getLogger("udpflannel")


class CleanupError(UdpflannelError):
    pass


def _read_env(path: str) -> subnetenv.SubnetEnv | None:
    try:
        with open(path) as f:
            return subnetenv.parse(f.read())
    except (OSError, subnetenv.SubnetEnvError):
        return None


def _remove_devices(opts: RunOptions, mac: str | None, mac6: str | None = None) -> list[str]:
    from pyroute2 import IPRoute
    gone = []
    if tun.delete(opts.tun):
        gone.append(opts.tun)
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get("ifname")
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            ours = ((name.startswith("flannel.") and mac and link.get("address") == mac)
                    or (name.startswith("flannel-v6.") and mac6 and link.get("address") == mac6))
            if kind == "vxlan" and ours:
                ipr.link("del", index=link["index"])
                gone.append(name)
    return gone


def _networks(env: subnetenv.SubnetEnv) -> list:
    return [n for n in (env.network, env.ipv6_network) if n is not None]


def _remove_direct_routes(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    import socket

    from pyroute2 import IPRoute
    removed = 0
    with IPRoute() as ipr:
        family = socket.AF_INET if network.version == 4 else socket.AF_INET6
        for route in ipr.route("dump", family=family, table=254):
            dst = route.get_attr("RTA_DST")
            if route["proto"] == netconf.RTPROT_UDPFLANNEL and dst is not None:
                subnet = ipaddress.ip_network(f"{dst}/{route['dst_len']}")
                if subnet_within(subnet, network):
                    ipr.route("del", dst=str(subnet), oif=route.get_attr("RTA_OIF"))
                    removed += 1
    return removed


def _remove_rules(env: subnetenv.SubnetEnv) -> list[str]:
    gone = []
    spec = RuleSpec(env.network, env.subnet_network, masquerade=True, forward=True,
                    network6=env.ipv6_network, subnet6=env.ipv6_subnet_network)
    for backend in BACKENDS:
        try:
            if backend == "nftables":  # both tables, also the empty ones flanneld's Init makes
                if delete_tables():
                    gone.append("nftables rules")
                continue
            make_rules(spec, backend).remove()
            gone.append(f"{backend} rules")
        except RulesError as e:  # e.g. nft not installed: nothing of ours can be there
            log.debug("rules (%s): %s", backend, e)
    return gone


async def _release(opts: RunOptions, env: subnetenv.SubnetEnv, mac: str | None) -> str:
    registry = open_registry(opts)
    try:
        leases, _ = await registry.list_leases()
        ours = (env.subnet_network, env.ipv6_subnet_network)
        mine: Lease | None = next((x for x in leases if (x.subnet, x.ipv6_subnet) == ours), None)
        what = " + ".join(str(s) for s in ours if s is not None)
        if mine is None:
            return f"no lease for {what}"
        if mac is not None and mine.vtep_mac not in (None, mac):
            raise CleanupError(f"the lease for {what} carries VTEP MAC "
                               f"{mine.vtep_mac}, not ours ({mac}): left alone")
        await registry.delete_lease(mine.key)
        return f"lease {what}"
    finally:
        await registry.close()


async def run(opts: RunOptions, release_lease: bool = False) -> None:
    if not tun.has_net_admin():
        raise CleanupError("need root or CAP_NET_ADMIN to remove devices, routes and rules")
    if os.path.exists(opts.admin_path) and admin._listening(opts.admin_path):
        raise CleanupError(f"a daemon is running (its admin socket {opts.admin_path} answers); "
                           "stop it first")
    env = _read_env(opts.subnet_file)
    mac = localstate.load_mac(opts.state_dir, opts.tun)
    gone = await asyncio.to_thread(_remove_devices, opts, mac, localstate.load_mac(opts.state_dir, opts.tun, 6))
    if env is not None:
        direct = 0
        for network in _networks(env):
            await asyncio.to_thread(netconf.remove_overlay_routes, network)
            direct += await asyncio.to_thread(_remove_direct_routes, network)
        if direct:
            gone.append("direct routes")
        gone += await asyncio.to_thread(_remove_rules, env)
        if release_lease:
            gone.append(await _release(opts, env, mac))
        os.unlink(opts.subnet_file)
        gone.append(opts.subnet_file)
    elif release_lease:
        raise CleanupError(f"no {opts.subnet_file}: cannot tell which lease is ours")
    admin.remove_socket(opts.admin_path)
    log.info("removed: %s", ", ".join(gone) if gone else "nothing (nothing of ours was left)")
