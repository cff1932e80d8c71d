"""The one place that wires everything together for `udpflannel run`.

    registry --config--> subnet manager --lease--> data plane (engine | kernel)
        |                     |                      ^  routes from lease events
        +--watch events-------+----------------------+
                              +--renew (background)
    rules (masquerade, forward) . subnet.env . admin socket . /healthz /metrics . sd_notify

Start-up order matters: /healthz answers from the first moment (a node waiting for
etcd is alive, not ready); the data plane binds its ports and creates what needs no
subnet before a lease is taken (a port clash or a kernel without VXLAN must not cost a
lease); subnet.env is written only once the plane forwards and the rules are in,
because CNI reads it as "the node is ready"; READY=1 goes to systemd after that.

Stopping leaves the data plane in place (the TUN or flannel.<VNI>, addresses, routes,
rules) and the lease in the registry, so a restart or an upgrade is no outage: the
next daemon takes the same subnet and MAC and re-attaches. `udpflannel cleanup`
removes it all on purpose.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import replace
from typing import Any

from udpflannel.core import config as netconfig
from udpflannel.core import subnetenv
from udpflannel.core.lease import Lease
from udpflannel.core.status import LeaseStatus, NodeStatus, RegistryStatus
from udpflannel.dataplane.base import DataplaneError, PlaneOptions
from udpflannel.dataplane.select import prepare_plane
from udpflannel.dataplane.sockets import parse_offloads
from udpflannel.host import localstate, netconf
from udpflannel.host.linkwatch import LinkWatch
from udpflannel.host.rules import RulesError, RuleSpec, make_rules
from udpflannel.host.tun import has_net_admin
from udpflannel.observe import admin, sdnotify
from udpflannel.observe.http import start_http
from udpflannel.options import RunOptions
from udpflannel.registry.base import Registry, RegistryError
from udpflannel.subnet import Backoff, RegistryHealth, SubnetManager
from udpflannel.version import __version__

log = logging.getLogger("udpflannel")

HOUSEKEEPING_PERIOD = 2.0
LINK_EVENT_SETTLE = 0.05  # after a netlink link/address event, before checking
CONFIG_WAIT_LOG = 30.0  # seconds between "still waiting for the network config" lines


class FatalError(Exception):
    """Stops the daemon with one clear line and a non-zero exit."""


class Stopped(Exception):
    """SIGTERM/SIGINT arrived while start-up was still waiting for the registry."""


def open_registry(opts: RunOptions) -> Registry:
    if opts.etcd_endpoints:
        from udpflannel.registry.etcd import EtcdRegistry
        return EtcdRegistry(list(opts.etcd_endpoints), prefix=opts.etcd_prefix,
                            cafile=opts.etcd_cafile, certfile=opts.etcd_certfile,
                            keyfile=opts.etcd_keyfile, username=opts.etcd_username,
                            password=opts.etcd_password)
    from udpflannel.registry.embedded import EmbeddedRegistry
    return EmbeddedRegistry(opts.registry_file)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def _until_reachable(what: str, call, retry: bool, stop: asyncio.Event,
                           health: RegistryHealth):
    """Run a registry call; while it fails, retry (etcd) or give up (a local file).
    A stop request ends the wait (within one call's timeout)."""
    backoff = Backoff(0.5, 10.0)
    while not stop.is_set():
        try:
            result = await call()
            health.succeeded()
            return result
        except RegistryError as e:
            if not retry:
                raise FatalError(str(e)) from None
            health.failed(what, e)
            await _pause(stop, backoff.delay())
    raise Stopped(what)


async def load_network_config(registry: Registry, opts: RunOptions, retry: bool,
                              stop: asyncio.Event, health: RegistryHealth) -> netconfig.NetworkConfig:
    """The stored config; --net-config's (or, embedded, the default) when none is
    stored. Under etcd with neither, wait for one like flanneld (an exit would be a
    crash loop under a DaemonSet), saying so every CONFIG_WAIT_LOG seconds."""
    key = f"{opts.etcd_prefix}/config" if opts.etcd_endpoints else f"config in {opts.registry_file}"
    waited_since = None
    while True:
        stored = await _until_reachable("reading config", registry.get_config, retry, stop, health)
        if stored is not None:
            break
        if opts.net_config or not opts.etcd_endpoints:
            text = _read_net_config(opts) if opts.net_config else netconfig.default_config().to_json()
            stored = await _until_reachable(
                "writing config", lambda t=text: registry.put_config_if_absent(t), retry, stop, health)
            break
        now = time.monotonic()
        if waited_since is None or now - waited_since >= CONFIG_WAIT_LOG:
            waited_since = now
            log.warning("no network config at %s yet; waiting for one (e.g. etcdctl put %s "
                        "'{\"Network\": \"10.244.0.0/16\", \"Backend\": {\"Type\": \"vxlan\"}}')",
                        key, key)
            sdnotify.status(f"waiting for the network config at {key}")
        await _pause(stop, 1.0)
        if stop.is_set():
            raise Stopped("waiting for the network config")
    cfg = _parse(stored, key)
    if opts.vni is not None or opts.port is not None:
        cfg = replace(cfg, vni=opts.vni or cfg.vni, port=opts.port or cfg.port)
    return cfg


def _read_net_config(opts: RunOptions) -> str:
    try:
        with open(opts.net_config) as f:
            text = f.read()
    except OSError as e:
        raise FatalError(f"--net-config {opts.net_config}: {e.strerror}") from None
    _parse(text, opts.net_config)  # refuse to store a bad config
    return text


def _parse(text: str, where: str) -> netconfig.NetworkConfig:
    try:
        return netconfig.parse(text)
    except netconfig.ConfigError as e:
        raise FatalError(f"{where}: {e}") from None


class Node:
    """The running node's parts, for the one status schema."""

    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.started = time.time()
        self.health = RegistryHealth(starting=True)
        self.manager: SubnetManager | None = None
        self.plane = None
        self.ready = False

    def status(self) -> NodeStatus:
        lease = self.manager.lease if self.manager else None
        plane = self.plane
        return NodeStatus(
            version=__version__, started=self.started, ready=self.ready,
            lease=None if lease is None else LeaseStatus(
                str(lease.subnet), str(lease.public_ip), lease.backend_type or "udp",
                lease.vtep_mac, lease.expiration),
            registry=RegistryStatus(self.opts.registry_kind, self.opts.registry_where,
                                    self.health.ok),
            dataplane=plane.status() if plane else None,
            peer_list=plane.peers() if plane and self.opts.metrics_peers else None)


def _rules(opts: RunOptions, cfg: netconfig.NetworkConfig, lease: Lease):
    if not (opts.ip_masq or opts.forward_rules):
        return None
    spec = RuleSpec(cfg.network, lease.subnet, masquerade=opts.ip_masq,
                    fully_random=opts.ip_masq_fully_random, forward=opts.forward_rules)
    return make_rules(spec, "nftables" if cfg.enable_nftables else "iptables")


async def _keep_rules(rules, period: float) -> None:
    """Re-check the rules every --iptables-resync seconds and restore what someone
    flushed (as flanneld does); a failing check is logged, not fatal."""
    while True:
        await asyncio.sleep(period)
        try:
            for line in await asyncio.to_thread(rules.ensure):
                log.warning("rules: %s", line)
        except RulesError as e:
            log.warning("rules: %s", e)


async def _housekeeping(plane, underlay: netconf.Underlay, on_mtu) -> None:
    """Checks while running: the plane's (device still there, offloads, MTU), and the
    underlay address. It vanishing (DHCP renumbering, an operator's change) makes every
    send fail while the lease advertises the old address: exit with one line so a
    supervisor restarts us with the new one. They run at once when netlink says the
    underlay link or its addresses changed, and every HOUSEKEEPING_PERIOD seconds in
    any case (the plane's own device, say, deleted under us)."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    try:
        watch: LinkWatch | None = LinkWatch()
    except OSError as e:  # polling alone still finds every change, later
        log.warning("no netlink link events (%s): checking every %.0f s", e.strerror, HOUSEKEEPING_PERIOD)
        watch = None

    def on_link_event() -> None:
        try:
            if watch.drain((underlay.ifindex,)):
                changed.set()
        except OSError as e:
            log.warning("netlink link events failed (%s): checking every %.0f s", e.strerror,
                        HOUSEKEEPING_PERIOD)
            loop.remove_reader(watch.fileno())

    if watch is not None:
        loop.add_reader(watch.fileno(), on_link_event)
    mtu = plane.status().mtu
    try:
        while True:
            try:
                await asyncio.wait_for(changed.wait(), HOUSEKEEPING_PERIOD)
                await asyncio.sleep(LINK_EVENT_SETTLE)  # one check for a burst of events
            except asyncio.TimeoutError:
                pass
            changed.clear()
            await plane.check()
            if plane.status().mtu != mtu:
                mtu = plane.status().mtu
                on_mtu(mtu)
            if not await asyncio.to_thread(netconf.underlay_address_present, underlay):
                raise FatalError(f"the underlay address {underlay.address} is no longer on "
                                 f"{underlay.ifname}; exiting so that a restart advertises the new one")
    finally:
        if watch is not None:
            loop.remove_reader(watch.fileno())
            watch.close()


async def run(opts: RunOptions) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not has_net_admin():  # fail before touching the registry
        raise FatalError("need root or CAP_NET_ADMIN to configure the data plane and its routes")
    node = Node(opts)
    http = await start_http(node.status, healthz=(opts.healthz_ip, opts.healthz_port),
                            metrics=(opts.healthz_ip, opts.metrics_port))
    registry = None
    cleanup: list[Any] = []
    try:
        # pyroute2's sync API runs an asyncio loop of its own, and uvloop cannot carry
        # netlink sockets: netlink calls go to a worker thread.
        underlay = await asyncio.to_thread(netconf.find_underlay, opts.ifaces, opts.public_ip,
                                           regexes=opts.iface_regex, can_reach=opts.iface_can_reach)
        registry = open_registry(opts)
        log.info("registry: %s (%s)", opts.registry_kind, opts.registry_where)
        retry = bool(opts.etcd_endpoints)
        cfg = await load_network_config(registry, opts, retry, stop, node.health)
        mac = localstate.load_or_create_mac(opts.state_dir, opts.tun)
        plane_opts = PlaneOptions(
            config=cfg, underlay=underlay, vtep_mac=mac, tun=opts.tun, engine=opts.engine,
            offloads=parse_offloads(opts.offload), udp_port=opts.udp_port or None,
            source_ports=opts.source_ports, strict_source=opts.strict_source, io=opts.io,
            queues=opts.queues, cpus=opts.cpus)
        log.info("underlay %s (%s, public %s, MTU %d); network %s, backend %s, port %d",
                 underlay.ifname, underlay.address, underlay.public_ip, underlay.mtu,
                 cfg.network, cfg.backend_type, cfg.port)
        plane = await prepare_plane(opts.dataplane, plane_opts)
        cleanup.append(plane.stop)
        node.plane = plane

        manager = SubnetManager(registry, cfg, ttl=opts.lease_ttl, renew_margin=opts.renew_margin,
                                health=node.health)
        node.manager = manager
        if cfg.backend_type == "vxlan":
            wanted = Lease(cfg.network, underlay.public_ip, "vxlan", cfg.vni, mac)
        else:  # flanneld udp's lease: PublicIP only
            wanted = Lease(cfg.network, underlay.public_ip, "", None, None)
        previous = (localstate.previous_subnet(opts.subnet_file)
                    or localstate.recorded_subnet(opts.state_dir, opts.tun))
        lease = await _until_reachable("acquiring a lease", lambda: manager.acquire(wanted, previous),
                                       retry, stop, node.health)
        node.health.consequence = "data plane keeps its routes, retrying"
        localstate.record_subnet(opts.state_dir, opts.tun, lease.subnet)
        log.info("leased %s (%s)", lease.subnet,
                 f"VTEP MAC {mac}" if lease.vtep_mac else "flanneld udp lease")

        await plane.start(lease)
        tasks_extra = []
        rules = _rules(opts, cfg, lease)
        if rules is not None:
            try:
                for line in await asyncio.to_thread(rules.ensure):
                    log.info("rules: %s", line)
            except RulesError as e:
                raise FatalError(f"installing rules: {e} (or pass --iptables-forward-rules=false)") from None
            tasks_extra.append(asyncio.create_task(_keep_rules(rules, opts.rules_resync), name="rules"))
        def write_subnet_env(mtu: int) -> None:  # CNI gives new pods this MTU
            localstate.write_atomically(opts.subnet_file, subnetenv.render(
                cfg.network, lease.subnet, mtu, opts.ip_masq))
        write_subnet_env(plane.status().mtu)
        server = await admin.serve(opts.admin_path, lambda: node.status().to_dict())
        cleanup.append(server.close)
        cleanup.append(lambda: admin.remove_socket(opts.admin_path))

        async def follow() -> None:
            async for events in manager.watch():
                await plane.apply(events)
                if not node.ready:
                    node.ready = True  # the snapshot is in: every known peer has a route
                    sdnotify.ready(f"leased {lease.subnet}, {plane.kind} plane, "
                                   f"{plane.status().peers} peers")
                    log.info("running: %s plane on %s, %d peers", plane.kind,
                             plane.status().device, plane.status().peers)

        tasks = [asyncio.create_task(follow(), name="watch"),
                 asyncio.create_task(manager.keep_renewed(), name="renew"),
                 asyncio.create_task(_housekeeping(plane, underlay, write_subnet_env),
                                     name="housekeeping"),
                 asyncio.create_task(stop.wait(), name="stop"),
                 plane.failed, *tasks_extra]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        sdnotify.stopping(f"stopping; {plane.status().device} stays in place")
        node.ready = False
        for t in tasks:
            if t not in done:
                t.cancel()
        # let cancelled tasks finish before the registry closes under them
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            if t.exception() is not None:
                raise FatalError(str(t.exception()))
        log.info("stopping: lease %s kept, %s left in place for the next start",
                 lease.subnet, plane.status().device)
    except Stopped as e:
        log.info("stopped while %s; nothing was changed", e)
    except DataplaneError as e:
        raise FatalError(str(e)) from None
    finally:
        for undo in reversed(cleanup):
            result = undo()
            if asyncio.iscoroutine(result):
                await result
        if registry is not None:
            await registry.close()
        await http.close()
