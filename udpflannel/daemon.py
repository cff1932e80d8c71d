"""The one place that wires everything together for `udpflannel run`.

    registry --config--> subnet manager --lease--> TUN + addresses + subnet.env
        |                     |                         |
        +--watch events-------+--routes--> Dataplane(engine) <-- TUN fd / UDP fd
                              +--renew (background)

Startup order matters: the UDP port is bound before a lease is taken (a port clash
should not cost a lease), and subnet.env is written only once the TUN is configured,
because CNI reads it as "the node is ready".
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, replace
from typing import Any

from udpflannel.core import config as netconfig
from udpflannel.core import subnetenv
from udpflannel.core.lease import Lease
from udpflannel.dataplane.userspace import Dataplane, make_engine, open_udp_socket, parse_offloads
from udpflannel.host import localstate, netconf
from udpflannel.host.tun import Tun
from udpflannel.host.tun import preflight as tun_preflight
from udpflannel.observe import admin
from udpflannel.registry.base import Registry, RegistryError
from udpflannel.subnet import Backoff, RegistryHealth, SubnetManager

log = logging.getLogger("udpflannel")


class FatalError(Exception):
    """Stops the daemon with one clear line and a non-zero exit."""


@dataclass(frozen=True)
class RunOptions:
    tun: str = "flannel0"
    iface: str | None = None
    public_ip: str | None = None
    registry_file: str = "/var/lib/udpflannel/registry.db"
    net_config: str | None = None
    subnet_file: str = "/run/flannel/subnet.env"
    state_dir: str = "/var/lib/udpflannel"
    admin_socket: str | None = None  # default: /run/udpflannel/<tun>.sock
    port: int | None = None
    vni: int | None = None
    engine: str = "compiled"
    strict_source: bool = False  # every inner source must lie in its sender's subnet
    offload: str = "auto"  # see dataplane.parse_offloads
    lease_ttl: float = 24 * 3600.0
    renew_margin: float = 3600.0
    etcd_endpoints: tuple[str, ...] = ()
    etcd_prefix: str = "/coreos.com/network"
    etcd_cafile: str | None = None
    etcd_certfile: str | None = None
    etcd_keyfile: str | None = None
    etcd_username: str | None = None
    etcd_password: str | None = None

    @property
    def admin_path(self) -> str:
        return self.admin_socket or f"/run/udpflannel/{self.tun}.sock"


def open_registry(opts: RunOptions) -> Registry:
    if opts.etcd_endpoints:
        from udpflannel.registry.etcd import EtcdRegistry
        return EtcdRegistry(list(opts.etcd_endpoints), prefix=opts.etcd_prefix,
                            cafile=opts.etcd_cafile, certfile=opts.etcd_certfile,
                            keyfile=opts.etcd_keyfile, username=opts.etcd_username,
                            password=opts.etcd_password)
    from udpflannel.registry.embedded import EmbeddedRegistry
    return EmbeddedRegistry(opts.registry_file)


class Stopped(Exception):
    """SIGTERM/SIGINT arrived while start-up was still waiting for the registry."""


async def _until_reachable(what: str, call, retry: bool, stop: asyncio.Event):
    """Run a registry call; while it fails, retry (etcd) or give up (a local file).
    A stop request ends the wait (within one call's timeout)."""
    health, backoff = RegistryHealth(starting=True), Backoff(0.5, 10.0)
    while not stop.is_set():
        try:
            result = await call()
            health.succeeded()
            return result
        except RegistryError as e:
            if not retry:
                raise FatalError(str(e)) from None
            health.failed(what, e)
            try:
                await asyncio.wait_for(stop.wait(), backoff.delay())
            except asyncio.TimeoutError:
                pass
    raise Stopped(what)


async def load_network_config(registry: Registry, opts: RunOptions, retry: bool,
                              stop: asyncio.Event) -> netconfig.NetworkConfig:
    stored = await _until_reachable("reading config", registry.get_config, retry, stop)
    if stored is None:
        if opts.net_config:
            try:
                with open(opts.net_config) as f:
                    text = f.read()
            except OSError as e:
                raise FatalError(f"--net-config {opts.net_config}: {e.strerror}") from None
            _parse(text, opts.net_config)  # refuse to store a bad config
        elif opts.etcd_endpoints:
            raise FatalError(
                f"no network config at {opts.etcd_prefix}/config; write one, e.g. "
                f"etcdctl put {opts.etcd_prefix}/config "
                "'{\"Network\": \"10.244.0.0/16\", \"Backend\": {\"Type\": \"vxlan\"}}'")
        else:
            text = netconfig.default_config().to_json()
        stored = await _until_reachable("writing config",
                                        lambda: registry.put_config_if_absent(text), retry, stop)
    where = f"{opts.etcd_prefix}/config" if opts.etcd_endpoints else f"config in {opts.registry_file}"
    cfg = _parse(stored, where)
    if cfg.backend_type != "vxlan":  # the engine's udp framing lands with issue 9
        raise FatalError(f"{where}: Backend Type {cfg.backend_type!r} is not supported by this "
                         'version; use "Backend": {"Type": "vxlan"}')
    if opts.vni is not None or opts.port is not None:
        cfg = replace(cfg, vni=opts.vni or cfg.vni, port=opts.port or cfg.port)
    return cfg


def _parse(text: str, where: str) -> netconfig.NetworkConfig:
    try:
        return netconfig.parse(text)
    except netconfig.ConfigError as e:
        raise FatalError(f"{where}: {e}") from None


HOUSEKEEPING_PERIOD = 2.0


async def housekeeping(plane: Dataplane, underlay: netconf.Underlay) -> None:
    """Slow checks while running. The underlay address vanishing (DHCP renumbering,
    an operator's change) makes every send fail while the lease still advertises
    the old address: exit with one line so a supervisor restarts us with the new one."""
    while True:
        await asyncio.sleep(HOUSEKEEPING_PERIOD)
        plane.check_offloads()
        if not await asyncio.to_thread(netconf.underlay_address_present, underlay):
            raise FatalError(f"the underlay address {underlay.address} is no longer on "
                             f"{underlay.ifname}; exiting so that a restart advertises the new one")


async def run(opts: RunOptions) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    tun_preflight()  # fail before touching the registry
    # pyroute2's sync API runs an asyncio loop of its own, and uvloop cannot carry
    # netlink sockets: netlink calls go to a worker thread.
    underlay = await asyncio.to_thread(netconf.find_underlay, opts.iface, opts.public_ip)
    registry = open_registry(opts)
    retry = bool(opts.etcd_endpoints)
    cleanup: list[Any] = []
    try:
        cfg = await load_network_config(registry, opts, retry, stop)
        mac = localstate.load_or_create_mac(opts.state_dir, opts.tun)
        sock = open_udp_socket(underlay.address, cfg.port)
        cleanup.append(sock.close)
        mtu = underlay.mtu - netconf.VXLAN_OVERHEAD
        log.info("underlay %s (%s, public %s, MTU %d); network %s, VNI %d, port %d",
                 underlay.ifname, underlay.address, underlay.public_ip, underlay.mtu,
                 cfg.network, cfg.vni, cfg.port)

        manager = SubnetManager(registry, cfg, ttl=opts.lease_ttl, renew_margin=opts.renew_margin)
        wanted = Lease(cfg.network, underlay.public_ip, "vxlan", cfg.vni, mac)
        lease = await _until_reachable(
            "acquiring a lease",
            lambda: manager.acquire(wanted, localstate.previous_subnet(opts.subnet_file)), retry, stop)
        log.info("leased %s (VTEP MAC %s)", lease.subnet, mac)

        offloads = parse_offloads(opts.offload) if opts.engine == "compiled" else frozenset()
        tun = Tun(opts.tun, vnet_hdr="tso" in offloads)
        cleanup.append(tun.close)
        await asyncio.to_thread(netconf.configure_tun, tun.name, lease.subnet, cfg.network, mtu,
                                tun.tso)
        engine = make_engine(opts.engine, cfg, lease, opts.strict_source)
        plane = Dataplane(engine, tun, sock, cfg, cfg.port, offloads)
        plane.start()
        cleanup.append(plane.stop)
        localstate.write_atomically(opts.subnet_file,
                                    subnetenv.render(cfg.network, lease.subnet, mtu, False))

        def status() -> dict[str, Any]:
            current = manager.lease
            return {"subnet": str(current.subnet), "public_ip": str(current.public_ip),
                    "vtep_mac": current.vtep_mac, "tun": tun.name, "mtu": mtu,
                    "routes": plane.routes(), "counters": engine.counters(),
                    "offloads": engine.offloads(),
                    "registry_ok": manager.health.ok}
        server = await admin.serve(opts.admin_path, status)
        cleanup.append(server.close)
        cleanup.append(lambda: os.path.exists(opts.admin_path) and os.unlink(opts.admin_path))

        async def follow() -> None:
            async for events in manager.watch():
                plane.apply(events)

        tasks = [asyncio.create_task(follow(), name="watch"),
                 asyncio.create_task(manager.keep_renewed(), name="renew"),
                 asyncio.create_task(housekeeping(plane, underlay), name="housekeeping"),
                 asyncio.create_task(stop.wait(), name="stop"),
                 plane.failed]
        log.info("running: %s up, %d peers", tun.name, plane.routes())
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            if t not in done:
                t.cancel()
        # let cancelled tasks finish before the registry closes under them
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            if t.exception() is not None:
                raise FatalError(str(t.exception()))
        log.info("stopping: lease %s kept for reuse, %s removed", lease.subnet, tun.name)
    except Stopped as e:
        log.info("stopped while %s; nothing was changed", e)
    finally:
        for undo in reversed(cleanup):
            undo()
        await registry.close()
