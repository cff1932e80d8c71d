"""The one place that wires everything together for `udpflannel run`.

    registry --config--> subnet manager --lease--> data plane (engine | kernel)
        |                     |                      ^  routes from lease events
        +--watch events-------+----------------------+
                              +--renew (background)
    rules (masquerade, forward) . subnet.env . admin socket . /healthz /metrics . sd_notify

``run`` reads as the start-up order, and the order matters:
1. /healthz answers from the first moment (a node waiting for etcd is alive, not ready).
2. The data plane binds its ports and creates what needs no subnet before a lease is
   taken: a port clash or a kernel without VXLAN must not cost a lease.
3. The lease, then the plane starts forwarding on it, then the rules.
4. subnet.env is written only once the plane forwards and the rules are in, because
   CNI reads it as "the node is ready"; READY=1 goes to systemd once the registry's
   snapshot of peers is applied too. A file that cannot be written (full or read-only
   disk) keeps the node not ready and is retried; it never stops forwarding.
5. Supervision until a stop signal or a failure.

Stopping leaves the data plane in place (the TUN or flannel.<VNI>, addresses, routes,
rules) and the lease in the registry, so a restart or an upgrade is no outage: the
next daemon takes the same subnet and MAC and re-attaches. `udpflannel cleanup`
removes it all on purpose.

Everything outside Python the daemon reaches goes through ``Outside``; unit tests
give it a fake data plane (dataplane/fake.py) and a fixed underlay, so the start-up,
readiness and shutdown order are tested without root.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable

from udpflannel import takeover, warmstart
from udpflannel.core import config as netconfig
from udpflannel.core import subnetenv
from udpflannel.core.errors import UdpflannelError
from udpflannel.core.lease import UNSPECIFIED, EventType, Lease, LeaseEvent
from udpflannel.core.underlay import Underlay
from udpflannel.dataplane.base import AUTO, ENGINE, DataPlane, DataplaneError, PlaneOptions
from udpflannel.dataplane.select import prepare_plane
from udpflannel.dataplane.userspace import EnginePlane
from udpflannel.host import localstate, netconf, vxlandev
from udpflannel.host.rules import RulesError, RuleSpec, make_rules, start_backend
from udpflannel.host.tun import has_net_admin
from udpflannel.housekeeping import keep_blackhole_route, keep_rules, watch_underlay_and_plane
from udpflannel.inherited import Inherited, node_state, plane_options
from udpflannel.node import Node, Persist
from udpflannel.observe import admin, sdnotify
from udpflannel.observe.http import start_http
from udpflannel.options import RunOptions
from udpflannel.registry.base import Registry
from udpflannel.registry.select import open_registry
from udpflannel.subnets.base import SubnetManager, wanted_lease
from udpflannel.subnets.registry_source import RegistrySource
from udpflannel.subnets.source import Source, Stopped, until_reachable
from udpflannel.takeover import TakeoverError

log = logging.getLogger("udpflannel")

WANTED_OPEN_FILES = 65536  # the soft RLIMIT_NOFILE asked for at start (up to the hard limit)


class FatalError(UdpflannelError):
    """Stops the daemon with one clear line and a non-zero exit."""


def _find_underlay(opts: RunOptions, cfg: netconfig.NetworkConfig | None = None) -> Underlay:
    """With ``cfg``, for its IP families (dual stack); before the config is known, for
    IPv4, else (an IPv6-only host) IPv6, so that a bad --iface fails before the registry."""
    def find(ipv4: bool, ipv6: bool) -> Underlay:
        return netconf.find_underlay(opts.ifaces, opts.public_ip, regexes=opts.iface_regex,
                                     can_reach=opts.iface_can_reach, public_ipv6=opts.public_ipv6,
                                     ipv4=ipv4, ipv6=ipv6)
    if cfg is not None:
        return find(cfg.enable_ipv4, cfg.enable_ipv6)
    try:
        return find(True, False)
    except netconf.NetconfError as first:
        try:
            return find(False, True)
        except netconf.NetconfError:
            raise first from None


def _rules(opts: RunOptions, cfg: netconfig.NetworkConfig, lease: Lease):
    if not (opts.ip_masq or opts.forward_rules):
        return None
    spec = RuleSpec.for_lease(cfg, lease, masquerade=opts.ip_masq,  # dual stack: both families' rules
                              fully_random=opts.ip_masq_fully_random, forward=opts.forward_rules)
    return make_rules(spec, "nftables" if cfg.enable_nftables else "iptables")


@dataclass(frozen=True)
class Outside:
    """What the daemon reaches outside Python; unit tests swap in fakes."""
    has_net_admin: Callable[[], bool] = has_net_admin
    find_underlay: Callable[..., Underlay] = _find_underlay  # (opts, cfg=None); dual stack: cfg
    underlay_present: Callable[[Underlay], bool] = netconf.underlay_address_present
    open_registry: Callable[[RunOptions], Registry] = open_registry
    open_kube: Callable[[RunOptions], Source] | None = None  # --kube-subnet-mgr (None: subnets/kube.py)

    def open_source(self, opts: RunOptions) -> Source:
        """Where config and leases come from: the registry, or Kubernetes."""
        if getattr(opts, "kube_subnet_mgr", False):
            if self.open_kube is not None:
                return self.open_kube(opts)
            from udpflannel.subnets.kube import open_kube_source
            return open_kube_source(opts)
        return RegistrySource(opts, self.open_registry(opts))
    prepare_plane: Callable[[str, PlaneOptions], Awaitable[DataPlane]] = prepare_plane
    rules: Callable[[RunOptions, netconfig.NetworkConfig, Lease], Any] = _rules
    start_rules: Callable[[bool], Any] = start_backend  # host/rules/startup.py
    link_events: bool = True  # netlink wake-ups for housekeeping (else it polls)
    wait_for_signal: Callable[[], Awaitable[Any]] = lambda: _stop_on_signals().wait()  # handed over, "wait"
    adopt_plane: Callable[..., DataPlane] = EnginePlane.adopt  # (popts, reason, state, handed), --takeover
    existing_vtep_mac: Callable[[int], str | None] = lambda vni: vxlandev.device_mac(vxlandev.device_name(vni))
    existing_vtep_mac6: Callable[[int], str | None] = lambda vni: vxlandev.device_mac(  # dual stack
        vxlandev.device_name(vni, 6))


def raise_open_files_limit(wanted: int = WANTED_OPEN_FILES) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (never past the hard limit):
    systemd's default soft limit, 1,024, leaves little headroom. Returns (old, new)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target
        except (ValueError, OSError):
            pass
    return soft, soft


async def _vtep_mac(opts: RunOptions, persist: Persist, vni: int, existing: Callable[[int], str | None],
                    stored: str | None = None, version: int = 4) -> str:  # dual stack: version 6
    """The kept VTEP MAC (``version`` 6: flannel-v6.<VNI>'s, with dual stack). Without one,
    ``stored`` (kube-mgr: the MAC our Node's backend-data names, flanneld's
    GetStoredMacAddresses), else the MAC of a flannel.<VNI> already here (a
    flanneld this node replaces: its lease names that MAC, so the node keeps its subnet
    and the kernel plane its device), else a new one; kept once the state dir takes it
    (until then the node runs with it and says so: a restart before that would pick
    another)."""
    mac = localstate.load_mac(opts.state_dir, opts.tun, version)
    if mac is None:
        mac = stored or await asyncio.to_thread(existing, vni)  # kube-mgr: stored = our Node's backend-data MAC
        if mac is not None:
            annotation = "backend-v6-data" if version == 6 else "backend-data"
            log.info("VTEP MAC %s taken from %s", mac, f"our Node's {annotation} annotation" if stored  # kube-mgr
                     else f"the {vxlandev.device_name(vni, version)} already here (flanneld's?)")
        else:
            mac = localstate.new_mac()
        persist.write(localstate.mac_path(opts.state_dir, opts.tun, version),
                      lambda: localstate.write_mac(opts.state_dir, opts.tun, mac, version))
    return mac


async def _acquire(node: Node, source: Source, cfg: netconfig.NetworkConfig, underlay: Underlay,
                   mac: str, stop: asyncio.Event, mac6: str | None = None) -> Lease:
    opts = node.opts
    manager = source.manager(cfg, node.health)
    node.manager = manager
    # vxlan: our PublicIP and VTEP MAC (and PublicIPv6 and flannel-v6's); udp: PublicIP only
    wanted = wanted_lease(cfg, underlay.public_ip, mac, underlay.public_ip6, mac6)  # dual stack
    previous = (localstate.previous_subnet(opts.subnet_file)
                or localstate.recorded_subnet(opts.state_dir, opts.tun))
    lease = await until_reachable("acquiring a lease", lambda: manager.acquire(wanted, previous),
                                  source.retry, stop, node.health)
    node.changed()
    node.health.consequence = "data plane keeps its routes, retrying"
    log.info("leased %s (%s)", lease.describe(),  # dual stack: both subnets
             f"VTEP MAC {mac}" if lease.vtep_mac else "flanneld udp lease" if lease.subnet else "IPv6 only")
    return lease


async def _install_rules(opts: RunOptions, outside: Outside, cfg, lease: Lease):
    rules = outside.rules(opts, cfg, lease)
    if rules is None:
        return None
    try:
        for line in await asyncio.to_thread(rules.ensure):
            log.info("rules: %s", line)
    except RulesError as e:
        raise FatalError(f"installing rules: {e} (or pass --iptables-forward-rules=false)") from None
    return rules


async def _follow(node: Node, manager: SubnetManager, plane) -> None:
    """Lease events into routes; the first batch is the snapshot: then every known peer
    has a route, and the node is ready once subnet.env is written too. A plane that
    already has routes (taken over from another daemon) loses those the snapshot
    no longer lists."""
    async for events in manager.watch():
        if not node.snapshot_applied:
            events = events + stale_routes(plane, events)
        await plane.apply(events)
        if not node.snapshot_applied:
            node.snapshot_applied = True
            _announce_if_ready(node)


def stale_routes(plane, snapshot: list[LeaseEvent]) -> list[LeaseEvent]:
    """REMOVED events for the plane's routes whose subnets the snapshot does not hold."""
    listed = {s for ev in snapshot if ev.type is EventType.ADDED for s in ev.lease.subnets}  # dual stack
    gone = [ipaddress.ip_network(p.subnet) for p in plane.peers()]
    return [LeaseEvent(EventType.REMOVED, Lease(s if s.version == 4 else None, UNSPECIFIED, "",  # dual stack
                                                ipv6_subnet=s if s.version == 6 else None))
            for s in gone if s not in listed]


def _announce_if_ready(node: Node) -> None:
    plane, manager = node.plane, node.manager
    if node.ready and plane is not None and manager is not None and manager.lease is not None:
        st = plane.status()
        sdnotify.ready(f"leased {manager.lease.describe()}, {plane.kind} plane, {st.peers} peers")
        log.info("running: %s plane on %s, %d peers", plane.kind, st.device, st.peers)


async def _supervise(tasks: list[asyncio.Future]) -> None:
    """Until the first task ends (the stop signal, or a failure): the rest are
    cancelled and awaited, so nothing runs on once the registry closes."""
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in tasks:
        if t not in done:
            t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        if not t.cancelled() and t.exception() is not None:
            raise FatalError(str(t.exception()))


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run(opts: RunOptions, outside: Outside = Outside(), stop: asyncio.Event | None = None,
              warm: Inherited | None = None) -> None:
    """The node, until SIGTERM/SIGINT (or ``stop``, for tests) or a failure. ``warm``: a
    plane warmstart.begin already has forwarding (the caller did that before importing
    this module)."""
    stop = stop or _stop_on_signals()
    if not outside.has_net_admin():  # fail before touching the registry
        raise FatalError("need root or CAP_NET_ADMIN to configure the data plane and its routes")
    old_limit, new_limit = raise_open_files_limit()
    if new_limit != old_limit:
        log.debug("open files limit raised from %d to %d", old_limit, new_limit)
    _successor_on_sigusr2()
    node = Node(opts)
    persist = Persist(node)
    giver: takeover.Giver | None = None
    # Undone last: the data plane forwards until everything else has stopped.
    async with contextlib.AsyncExitStack() as plane_undo, contextlib.AsyncExitStack() as undo:
        inherited = warm
        if opts.takeover:
            taken = await takeover.ask(opts)
            inherited = await _adopt(opts, taken, outside) if taken is not None else None
        if inherited is not None and inherited.plane is not None:
            plane_undo.push_async_callback(inherited.plane.stop)
            node.plane = inherited.plane
        http = await start_http(node.status, healthz=(opts.healthz_ip, opts.healthz_port),
                                metrics=(opts.healthz_ip, opts.metrics_port), status_version=node.version)
        undo.push_async_callback(http.close)

        async def hand_over(request: dict, writer: asyncio.StreamWriter) -> None:
            if giver is None:
                return await takeover.refuse_for_now(writer, "this daemon has no data plane to hand over yet")
            await giver(request, writer)
        server = await admin.serve(opts.admin_path, lambda: node.status().to_dict(), takeover=hand_over)
        undo.callback(admin.remove_socket, opts.admin_path)
        undo.callback(server.close)
        try:
            # pyroute2's sync API runs an asyncio loop of its own, and uvloop cannot carry
            # netlink sockets: netlink calls go to a worker thread.
            underlay = inherited.underlay if inherited else await asyncio.to_thread(outside.find_underlay, opts)
            source = outside.open_source(opts)
            node.source = source  # kube-mgr: status and /metrics name the source's own where
            undo.push_async_callback(source.close)
            log.info("registry: %s (%s)", source.kind, source.where)
            cfg = await source.network_config(stop, node.health)
            if not inherited and cfg.enable_ipv6:  # dual stack: again, for the config's IP families
                underlay = await asyncio.to_thread(outside.find_underlay, opts, cfg)
            if source.kept.public_ip is not None and not inherited:  # kube-mgr: node-public-ip, as --public-ip
                underlay = replace(underlay, public_ip=source.kept.public_ip)
            if source.kept.public_ipv6 is not None and not inherited:  # kube-mgr: node-public-ipv6 (dual stack)
                underlay = replace(underlay, public_ip6=source.kept.public_ipv6)
            await asyncio.to_thread(outside.start_rules, cfg.enable_nftables)  # as flanneld, before a lease
            plane = inherited.plane if inherited else None
            if inherited is not None and plane is not None and cfg != inherited.config:
                log.warning("the network config changed since the data plane (%s) was set up: setting it "
                            "up again", inherited.how)
                await plane.stop()  # its ports are needed again
                plane = None
            if inherited:
                mac = inherited.vtep_mac
            else:
                mac = await _vtep_mac(opts, persist, cfg.vni, outside.existing_vtep_mac,
                                      source.kept.vtep_mac)  # kube-mgr: the MAC our Node names
            mac6 = None
            if inherited and inherited.vtep_mac6:  # the MAC the inherited engine frames IPv6 with
                mac6 = inherited.vtep_mac6
            elif cfg.enable_ipv6:  # dual stack
                mac6 = await _vtep_mac(opts, persist, cfg.vni, outside.existing_vtep_mac6,
                                       source.kept.vtep_mac6, version=6)  # kube-mgr: backend-v6-data's MAC
            log.info("underlay %s; network %s, backend %s, port %d", underlay.describe(),  # dual stack
                     " + ".join(map(str, cfg.networks)), cfg.backend_type, cfg.port)
            if plane is None:
                plane = await outside.prepare_plane(opts.dataplane, plane_options(opts, cfg, underlay, mac, mac6))
                plane_undo.push_async_callback(plane.stop)
            node.plane = plane
            node.changed()

            lease = await _acquire(node, source, cfg, underlay, mac, stop, mac6)  # dual stack: mac6
            persist.write(localstate.subnet_path(opts.state_dir, opts.tun),
                          lambda: localstate.record_lease(opts.state_dir, opts.tun, lease))  # dual stack
            if inherited is not None and plane is inherited.plane and lease.subnets != inherited.subnets:
                log.warning("the registry leased %s, the data plane (%s) ran %s: setting it up again",
                            lease.describe(), inherited.how, " + ".join(map(str, inherited.subnets)))
                await plane.stop()
                plane = await outside.prepare_plane(opts.dataplane, plane_options(opts, cfg, underlay, mac, mac6))
                plane_undo.push_async_callback(plane.stop)
                node.plane = plane
            await plane.start(lease)
            node.changed()
            rules = await _install_rules(opts, outside, cfg, lease)

            def write_subnet_env(mtu: int) -> None:  # CNI gives new pods this MTU
                text = subnetenv.render_for(cfg, lease, mtu, opts.ip_masq)  # dual stack: FLANNEL_IPV6_*

                def written() -> None:
                    node.subnet_env_written = True
                    _announce_if_ready(node)
                persist.write(opts.subnet_file, lambda: localstate.write_if_changed(opts.subnet_file, text),
                              on_success=written)
            write_subnet_env(plane.status().mtu)
            state = node_state(cfg, underlay, mac, lease.subnet, mac6, lease.ipv6_subnet)
            giver = takeover.Giver(opts.tun, plane, state, on_handed_over=stop.set)

            manager = node.manager
            assert manager is not None  # (_acquire)
            tasks = [asyncio.create_task(_follow(node, manager, plane), name="watch"),
                     asyncio.create_task(manager.keep_renewed(), name="renew"),
                     asyncio.create_task(watch_underlay_and_plane(
                         node, plane, underlay, write_subnet_env, outside.underlay_present,
                         outside.link_events), name="housekeeping"),
                     asyncio.create_task(persist.retry_forever(), name="persist"),
                     asyncio.create_task(stop.wait(), name="stop"), plane.failed]
            if hasattr(plane, "describe"):  # the engine: remembered for a warm start
                tasks.append(asyncio.create_task(warmstart.keep(
                    opts.state_dir, opts.tun, lambda: {**state, **plane.describe()}), name="warm state"))
            if rules is not None:
                tasks.append(asyncio.create_task(keep_rules(node, rules, opts.rules_resync), name="rules"))
            if opts.ip_blackhole_route:
                tasks.append(asyncio.create_task(keep_blackhole_route(
                    node, lambda: manager.lease.subnets if manager.lease else None,  # dual stack
                    opts.rules_resync), name="blackhole"))
            try:
                await _supervise(tasks)
            finally:
                node.stopping = True
                if giver.handed_over is None:  # else the new daemon is the service now
                    sdnotify.stopping(f"stopping; {plane.status().device} stays in place")
            log.info("stopping: lease %s kept, %s left in place for the %s",
                     lease.describe(), plane.status().device,
                     "new daemon" if giver.handed_over else "next start")
        except Stopped as e:
            log.info("stopped while %s; nothing was changed", e)
        except DataplaneError as e:
            raise FatalError(str(e)) from None
    if giver is not None and giver.let_go() == "wait":
        log.info("handed over: idle until stopped")
        await outside.wait_for_signal()


async def _adopt(opts: RunOptions, taken: takeover.Taken, outside: Outside) -> Inherited:
    """The old daemon's plane: the engine forwarding on its fds, or (the kernel plane)
    nothing to adopt, the kernel forwards meanwhile and the plane is set up as usual.
    The old daemon is told how it went either way, and has let go of its ports when
    this returns."""
    kind = taken.state.get("kind")
    inherited = Inherited(taken.state, None, "--takeover")
    try:
        if opts.dataplane not in (AUTO, kind):
            raise TakeoverError(f"--dataplane {opts.dataplane}, but the running daemon's plane is {kind}: "
                                "restart instead of taking over")
        if kind == ENGINE:
            inherited.plane = outside.adopt_plane(inherited.plane_options(opts), "--takeover", taken.state,
                                                  taken.handed)
    except Exception as e:  # anything: the old daemon must be told to carry on
        await takeover.confirm(taken, False, str(e))
        if isinstance(e, (UdpflannelError, OSError)):
            raise FatalError(f"--takeover: {e}") from None
        raise
    await takeover.confirm(taken, True)
    return inherited


def successor_argv() -> list[str]:
    """How this daemon was started, plus --takeover=exit: what SIGUSR2 starts."""
    first = sys.argv[0]
    if os.path.basename(first) in ("udpflannel", "flanneld") and os.access(first, os.X_OK):
        return [first, *sys.argv[1:], "--takeover=exit"]
    return [sys.executable, "-m", "udpflannel", *sys.argv[1:], "--takeover=exit"]


def _successor_on_sigusr2() -> None:
    """SIGUSR2 (`systemctl reload` after an upgrade): start the installed udpflannel
    with our command line and --takeover=exit; it takes the plane over and becomes
    systemd's main process (MAINPID=), and this one exits 0."""
    def spawn() -> None:
        argv = successor_argv()
        log.info("SIGUSR2: starting %s to take over", " ".join(argv))
        try:
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, close_fds=True)
        except OSError as e:
            log.warning("SIGUSR2: cannot start the successor: %s", e)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, spawn)
