"""A flanneld udp node for the lab: the peer udpflannel's udp mode must match.

A stand-in, built from the facts of flannel's udp backend (pkg/backend/udp). The real
flanneld runs in the lab too (lab.flanneld, etcd only); this one stays where the real
one cannot go: on udpflannel's embedded registry, and with its proxy a process of its
own (the benchmark measures it). What it re-creates:

- control in Python, data in C (csrc/lab/udpproxy.c: one thread, one packet per
  syscall), talking only through fixed commands on a socket pair, as flanneld's Go
  half talks to its C proxy;
- the lease holds only PublicIP (flannel's LeaseAttrs with no BackendType and no
  BackendData), so its value is ``{"PublicIP":"…","PublicIPv6":null}``;
- TUN ``flannel0`` (IFF_TUN|IFF_NO_PI) with <subnet .0>/32, MTU = underlay MTU - 28,
  up, and a route (scope universe) for the whole network through it;
- the UDP socket is bound to the underlay interface's address on Backend.Port (8285);
- every other lease becomes a route to its PublicIP on *our* port, whatever its
  BackendType (flannel's udp backend never looks at it), and a removed lease a
  removed route;
- subnet.env is written once the TUN is configured. The lease is kept on exit.

Run as ``python -m udpflannel.lab.flanneld_udp --iface eth0 --registry-file PATH
--subnet-file PATH`` (or ``--etcd-endpoints URLS``). ``FlanneldUdpPeer`` below starts
one in a lab namespace as a real process, for tests and the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import NoReturn, Sequence

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from udpflannel.core import config as netconfig
from udpflannel.core import subnetenv
from udpflannel.core.lease import EventType, Lease, LeaseEvent
from udpflannel.core.wire import UDP_FRAMING_OVERHEAD, UDP_PORT
from udpflannel.lab import procs, udpproxy
from udpflannel.lab.netns import Namespace

log = logging.getLogger("flanneld-udp")

DEFAULT_PREFIX = "/coreos.com/network"
PROXY_GRACE = 2.0  # seconds the proxy gets to obey the stop command
REGISTRY_PATIENCE = 30.0  # seconds start-up keeps retrying an unreachable etcd


class AgentError(Exception):
    """Stops the agent with one line and exit status 1."""


@dataclass(frozen=True)
class AgentOptions:
    subnet_file: str
    iface: str | None = None
    public_ip: str | None = None
    registry_file: str | None = None
    etcd_endpoints: tuple[str, ...] = ()
    etcd_prefix: str = DEFAULT_PREFIX
    port: int | None = None
    tun: str = "flannel0"
    net_config: str | None = None  # stored as the network config when none is
    keep_udp: bool = False  # a flanneld started before the config left "udp"
    verbose: bool = False


def udp_lease(public_ip: ipaddress.IPv4Address, network: ipaddress.IPv4Network) -> Lease:
    """What flanneld's udp backend asks for: PublicIP only (the subnet is chosen later)."""
    return Lease(network, public_ip, backend_type="", vni=None, vtep_mac=None)


def route_commands(events: Sequence[LeaseEvent], port: int) -> list[tuple[str, tuple]]:
    """Lease events -> proxy commands, as flannel's processSubnetEvents (pure)."""
    out: list[tuple[str, tuple]] = []
    for ev in events:
        if ev.type is EventType.ADDED:
            out.append(("set_route", (ev.lease.subnet, ev.lease.public_ip, port)))
        else:
            out.append(("del_route", (ev.lease.subnet,)))
    return out


def configure_tun(name: str, subnet: ipaddress.IPv4Network, network: ipaddress.IPv4Network,
                  mtu: int) -> None:
    """flannel's configureIface: <subnet .0>/32, MTU, up, the network routed into the TUN."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise AgentError(f"TUN device {name} vanished")
        index = found[0]
        try:
            ipr.addr("add", index=index, address=str(subnet.network_address), prefixlen=32)
            ipr.link("set", index=index, mtu=mtu)
            ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            raise AgentError(f"configuring {name}: {e}") from None
        try:
            ipr.route("add", dst=str(network), oif=index, scope=0)  # universe, as flannel
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise AgentError(f"route {network} -> {name}: {e}") from None


def bind_udp(address: ipaddress.IPv4Address, port: int) -> socket.socket:
    """Bound like flanneld's net.ListenUDP: the interface address, no sharing. Blocking:
    a full send buffer makes the proxy wait, it does not drop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((str(address), port))
    except OSError as e:
        sock.close()
        raise AgentError(f"cannot bind UDP {address}:{port}: {e.strerror}") from None
    return sock


# --- the agent ------------------------------------------------------------------------

async def _patient(what: str, call, retry: bool, stop: asyncio.Event):
    """A registry call, retried for a while against etcd (flanneld waits for etcd too)."""
    from udpflannel.registry.base import RegistryError
    deadline = time.monotonic() + (REGISTRY_PATIENCE if retry else 0.0)
    while True:
        try:
            return await call()
        except RegistryError as e:
            if time.monotonic() >= deadline or stop.is_set():
                raise AgentError(f"{what}: {e}") from None
            log.warning("%s: %s; retrying", what, e)
            await asyncio.sleep(1.0)


async def load_config(registry, opts: AgentOptions, stop: asyncio.Event) -> netconfig.NetworkConfig:
    retry = bool(opts.etcd_endpoints)
    text = await _patient("reading the network config", registry.get_config, retry, stop)
    if text is None and opts.net_config:
        try:
            with open(opts.net_config) as f:
                wanted = f.read()
        except OSError as e:
            raise AgentError(f"--net-config {opts.net_config}: {e.strerror}") from None
        text = await _patient("storing the network config",
                              lambda: registry.put_config_if_absent(wanted), retry, stop)
    if text is None:
        where = f"{opts.etcd_prefix}/config" if opts.etcd_endpoints else opts.registry_file
        raise AgentError(f"no network config in {where} (pass --net-config FILE to store one)")
    try:
        cfg = netconfig.parse(text)
    except netconfig.ConfigError as e:
        raise AgentError(f"network config: {e}") from None
    if cfg.backend_type != "udp":
        if not opts.keep_udp:
            raise AgentError(f"network config has Backend Type {cfg.backend_type!r}; this stand-in "
                             "is a flanneld udp node (--keep-udp: run udp anyway, as a flanneld "
                             "started before the config changed)")
        cfg = dataclasses.replace(cfg, backend_type="udp", port=UDP_PORT)
    if opts.port:
        cfg = dataclasses.replace(cfg, port=opts.port)
    return cfg


def _open_registry(opts: AgentOptions):
    from udpflannel.options import RunOptions
    from udpflannel.registry.select import open_registry
    return open_registry(RunOptions(registry_file=opts.registry_file or "",
                                    etcd_endpoints=opts.etcd_endpoints,
                                    etcd_prefix=opts.etcd_prefix))


def _start_proxy(tun_fd: int, sock: socket.socket, tun_addr: ipaddress.IPv4Address, mtu: int,
                 verbose: bool) -> tuple[subprocess.Popen, udpproxy.ProxyControl]:
    binary = udpproxy.build()
    ours, theirs = udpproxy.control_pair()
    argv = [binary, str(tun_fd), str(sock.fileno()), str(theirs.fileno()), str(tun_addr), str(mtu)]
    try:
        proc = subprocess.Popen(argv + (["-v"] if verbose else []), stdin=subprocess.DEVNULL,
                                pass_fds=(tun_fd, sock.fileno(), theirs.fileno()))
    except OSError as e:
        ours.close()
        raise AgentError(f"cannot start {binary}: {e.strerror}") from None
    finally:
        theirs.close()  # the proxy's copy is its own: its exit closes the pair
    return proc, udpproxy.ProxyControl(ours)


def _stop_proxy(proc: subprocess.Popen, control: udpproxy.ProxyControl) -> None:
    """The stop command, then SIGTERM, then SIGKILL, each by pid after a grace period."""
    control.stop()
    for action in (None, proc.terminate, proc.kill):
        if proc.poll() is not None:
            return
        if action is not None:
            action()
        try:
            proc.wait(PROXY_GRACE)
        except subprocess.TimeoutExpired:
            pass


async def _proxy_exit(proc: subprocess.Popen) -> None:
    while proc.poll() is None:
        await asyncio.sleep(0.2)
    raise AgentError(f"the udp proxy exited with status {proc.returncode}")


async def run(opts: AgentOptions) -> None:
    from udpflannel.host import localstate, netconf
    from udpflannel.host.tun import Tun, TunError
    from udpflannel.subnets.leasing import LeaseManager

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        underlay = await asyncio.to_thread(netconf.find_underlay, (opts.iface,) if opts.iface else (),
                                           opts.public_ip)
    except netconf.NetconfError as e:
        raise AgentError(str(e)) from None
    await asyncio.to_thread(udpproxy.build)  # a compile error should cost nothing yet
    registry = _open_registry(opts)
    undo: list = []
    try:
        cfg = await load_config(registry, opts, stop)
        network = cfg.network
        # flanneld's udp backend: IPv4 only (the config's parse refuses IPv6 with it)
        assert underlay.address is not None and underlay.public_ip is not None and network is not None
        sock = bind_udp(underlay.address, cfg.port)
        undo.append(sock.close)
        mtu = underlay.mtu - UDP_FRAMING_OVERHEAD
        manager = LeaseManager(registry, cfg)
        lease = await _patient(
            "acquiring a lease",
            lambda: manager.acquire(udp_lease(underlay.public_ip, network),
                                    localstate.previous_subnet(opts.subnet_file)),
            bool(opts.etcd_endpoints), stop)
        log.info("leased %s for %s; network %s, port %d, MTU %d", lease.subnet, underlay.public_ip,
                 cfg.network, cfg.port, mtu)
        try:
            tun = Tun(opts.tun, persist=False)  # flanneld tears its TUN down on exit
        except TunError as e:
            raise AgentError(str(e)) from None
        undo.append(tun.close)
        await asyncio.to_thread(configure_tun, tun.name, lease.subnet, network, mtu)
        proc, control = _start_proxy(tun.fd, sock, lease.subnet.network_address, mtu, opts.verbose)
        undo.append(control.close)
        undo.append(lambda: _stop_proxy(proc, control))
        localstate.write_atomically(opts.subnet_file,
                                    subnetenv.render(cfg.network, lease.subnet, mtu, False))

        async def follow() -> None:
            async for events in manager.watch():
                for name, args in route_commands(events, cfg.port):
                    getattr(control, name)(*args)
                    log.info("subnet %s: %s", "added" if name == "set_route" else "removed",
                             " via ".join(str(a) for a in args[:2]))

        tasks = [asyncio.create_task(follow(), name="watch"),
                 asyncio.create_task(manager.keep_renewed(), name="renew"),
                 asyncio.create_task(_proxy_exit(proc), name="proxy"),
                 asyncio.create_task(stop.wait(), name="stop")]
        log.info("running: %s up, proxy pid %d", tun.name, proc.pid)
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                err = t.exception()
                raise err if isinstance(err, AgentError) else AgentError(f"{t.get_name()}: {err}")
        log.info("stopping: lease %s kept, %s removed", lease.subnet, tun.name)
    finally:
        for action in reversed(undo):
            await asyncio.to_thread(action)  # the proxy's grace period must not block the loop
        await registry.close()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"flanneld-udp: error: {message}\n")


def parse_args(argv: Sequence[str] | None = None) -> AgentOptions:
    p = _Parser(prog="python -m udpflannel.lab.flanneld_udp",
                description="A flanneld udp node for the lab (flanneld's udp backend, re-created).")
    p.add_argument("--iface", help="underlay interface (default: the default route's)")
    p.add_argument("--public-ip", help="address to advertise in the lease")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--registry-file", help="udpflannel's embedded registry (SQLite file)")
    where.add_argument("--etcd-endpoints", help="comma-separated etcd URLs")
    p.add_argument("--etcd-prefix", default=DEFAULT_PREFIX)
    p.add_argument("--subnet-file", required=True)
    p.add_argument("--port", type=int, help="UDP port (default: Backend.Port, else 8285)")
    p.add_argument("--tun", default="flannel0")
    p.add_argument("--net-config", help="network config JSON file, stored if the registry has none")
    p.add_argument("--keep-udp", action="store_true",
                   help="run the udp backend whatever the stored Backend says")
    p.add_argument("-v", "--verbose", action="store_true", help="the proxy logs per-packet errors")
    a = p.parse_args(argv)
    if a.port is not None and not 0 < a.port < 65536:
        p.error(f"--port {a.port} is not a UDP port (1-65535)")
    if a.public_ip is not None:
        try:
            ipaddress.IPv4Address(a.public_ip)
        except ValueError:
            p.error(f"--public-ip {a.public_ip!r} is not an IPv4 address")
    endpoints = tuple(e.strip() for e in (a.etcd_endpoints or "").split(",") if e.strip())
    return AgentOptions(subnet_file=a.subnet_file, iface=a.iface, public_ip=a.public_ip,
                        registry_file=a.registry_file, etcd_endpoints=endpoints,
                        etcd_prefix=a.etcd_prefix, port=a.port, tun=a.tun, net_config=a.net_config,
                        keep_udp=a.keep_udp, verbose=a.verbose)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s flanneld-udp %(levelname)s %(message)s")
    try:
        asyncio.run(run(opts))
    except (AgentError, udpproxy.ProxyBuildError) as e:
        print(f"flanneld-udp: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


# --- for tests and the benchmark -----------------------------------------------------------

class PeerError(Exception):
    pass


class FlanneldUdpPeer:
    """One flanneld-udp node in a lab namespace, as a real process stopped by pid.

    It shares a registry with udpflannel daemons: pass the cluster's ``registry_file``,
    or its ``etcd_endpoints`` and ``etcd_prefix`` (``beside`` does that for a Cluster).
    Files (subnet.env, log) live in ``workdir``."""

    def __init__(self, ns: Namespace, workdir: str, *, registry_file: str | None = None,
                 etcd_endpoints: str | None = None, etcd_prefix: str = DEFAULT_PREFIX,
                 net_config: str | None = None, iface: str = "eth0", port: int | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        if (registry_file is None) == (etcd_endpoints is None):
            raise ValueError("give exactly one of registry_file and etcd_endpoints")
        self.ns = ns
        self.workdir = workdir
        self.registry_file = registry_file
        self.etcd_endpoints = etcd_endpoints
        self.etcd_prefix = etcd_prefix
        self.net_config = net_config
        self.iface = iface
        self.port = port
        self.extra_args = list(extra_args)
        self.subnet_file = os.path.join(workdir, "subnet.env")
        self.log_path = os.path.join(workdir, "flanneld-udp.log")
        self.proc: subprocess.Popen | None = None

    @classmethod
    def beside(cls, cluster, ns: Namespace, name: str = "fu", **kw) -> "FlanneldUdpPeer":
        """A peer on ``cluster``'s registry (its file, or its etcd and --etcd-prefix)."""
        workdir = os.path.join(cluster.workdir, name)
        if cluster.etcd_endpoints:
            args = list(cluster.extra_args)
            prefix = args[args.index("--etcd-prefix") + 1] if "--etcd-prefix" in args else DEFAULT_PREFIX
            return cls(ns, workdir, etcd_endpoints=cluster.etcd_endpoints, etcd_prefix=prefix, **kw)
        return cls(ns, workdir, registry_file=cluster.registry_file, **kw)

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "udpflannel.lab.flanneld_udp", "--iface", self.iface,
                "--subnet-file", self.subnet_file]
        if self.etcd_endpoints:
            argv += ["--etcd-endpoints", self.etcd_endpoints, "--etcd-prefix", self.etcd_prefix]
        else:
            assert self.registry_file is not None  # (one or the other)
            argv += ["--registry-file", self.registry_file]
        if self.port:
            argv += ["--port", str(self.port)]
        if self.net_config is not None:
            os.makedirs(self.workdir, exist_ok=True)
            path = os.path.join(self.workdir, "net-conf.json")
            with open(path, "w") as f:
                f.write(self.net_config)
            argv += ["--net-config", path]
        return argv + self.extra_args

    def start(self) -> "FlanneldUdpPeer":
        if self.proc is not None and self.proc.poll() is None:
            raise PeerError(f"flanneld-udp in {self.ns.name} already running")
        os.makedirs(self.workdir, exist_ok=True)
        udpproxy.build()  # compile once here, not in each peer's start-up
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.subnet_file)  # its reappearance is the readiness signal
        with open(self.log_path, "ab") as log_file:
            self.proc = self.ns.popen(self.argv(), stdout=log_file, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        return self

    def wait_ready(self, timeout: float = 20.0) -> subnetenv.SubnetEnv:
        """Block until the peer wrote subnet.env (its TUN is configured, its proxy runs)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise PeerError(f"flanneld-udp in {self.ns.name} exited with {code}:\n{self.log_tail()}")
            try:
                with open(self.subnet_file) as f:
                    return subnetenv.parse(f.read())
            except (OSError, subnetenv.SubnetEnvError):
                pass
            if time.monotonic() > deadline:
                raise PeerError(f"flanneld-udp in {self.ns.name} wrote no subnet.env in {timeout}s:\n"
                                f"{self.log_tail()}")
            time.sleep(0.05)

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        with open(self.subnet_file) as f:
            subnet = subnetenv.parse(f.read()).subnet_network
        assert subnet is not None, f"no FLANNEL_SUBNET in {self.subnet_file}"
        return subnet

    @property
    def overlay_addr(self) -> str:
        """The TUN's address (<subnet .0>): it answers pings over the overlay."""
        return str(self.subnet.network_address)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds, by pid; the exit status."""
        proc, self.proc = self.proc, None
        return procs.terminate(proc, grace)

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> "FlanneldUdpPeer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
