"""The cases the bench compares. Each builds its own throwaway two-node Lab (same
underlay every time: two namespaces with a veth each into a bridge in a hub namespace,
MTU 1500), yields a ``Target`` to measure node 1 -> node 2, and removes everything
on exit.

- ``veth``: nothing on top; target node 2's underlay address.
- ``kernel-vxlan``: ``flannel.1`` configured by netlink exactly as flannel's vxlan
  backend does (flannel-io/flannel pkg/backend/vxlan); target node 2's ``<subnet>.0``.
- ``udpflannel-<mode>``: two ``udpflannel run`` daemons sharing an embedded registry,
  with the mode's extra daemon arguments and network config; target node 2's overlay
  address (the TUN's, or flannel.1's with the kernel plane).
- ``flanneld-udp``: two of the lab's flanneld udp-backend stand-ins (flannel's C proxy
  design: one packet per syscall), the reference for the udp-mode case.
- ``*-ipv6``: dual stack (EnableIPv6) on a dual-stack underlay, measured over IPv6:
  ``kernel-vxlan-ipv6`` is flannel-v6.1 as flanneld's vxlan backend sets it up (VXLAN
  over IPv6), the reference of the ``udpflannel-*-ipv6`` cases (their ratios are to
  it); the target is node 2's IPv6 overlay address (<subnet ::>). No echo or rr step
  (the compiled echo speaks IPv4).

To add a udpflannel mode, add one line to ``UDPFLANNEL_MODES``: its daemon arguments,
how many other (absent) peers to preload into the registry (so the route table holds
that many entries while node 1 talks to node 2), and the network config.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

from udpflannel.core import config as netconfig
from udpflannel.core.lease import Lease
from udpflannel.core.wire import VXLAN_OVERHEAD, VXLAN_PORT
from udpflannel.lab import kernelvxlan, oldkernel
from udpflannel.lab.benchlib.report import BASELINE as BASE_CASE
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.netns import Lab, Namespace
from udpflannel.registry.embedded import EmbeddedRegistry

# A network with room for 4,096 peers and more (16,384 /24s; the default /16 holds 255).
BIG_NETWORK = '{"Network": "10.64.0.0/10", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}'
UDP_NETWORK = '{"Network": "10.64.0.0/10", "SubnetLen": 24, "Backend": {"Type": "udp"}}'
DUAL_NETWORK = ('{"Network": "10.64.0.0/10", "SubnetLen": 24, "EnableIPv6": true, '
                '"IPv6Network": "fd10:64::/48", "IPv6SubnetLen": 64, "Backend": {"Type": "vxlan"}}')
UNDERLAY6 = "fd00:250::/64"
IPV6_STEPS = ("ping", "tcp1", "tcp4", "udp")
# name -> (extra `udpflannel run` arguments, extra peers preloaded, network config)
UDPFLANNEL_MODES: dict[str, tuple[tuple[str, ...], int, str]] = {
    "offload": (("--offload", "auto"), 0, BIG_NETWORK),   # the defaults: --io poll
    "loop": (("--io", "loop"), 0, BIG_NETWORK),
    "threads": (("--io", "threads"), 0, BIG_NETWORK),
    "threads-2q": (("--io", "threads", "--queues", "2"), 0, BIG_NETWORK),
    "poll-2q": (("--io", "poll", "--queues", "2"), 0, BIG_NETWORK),
    "poll-cpu0": (("--io", "poll", "--cpus", "0"), 0, BIG_NETWORK),
    "threads-cpu0": (("--io", "threads", "--cpus", "0"), 0, BIG_NETWORK),
    "loop-cpu0": (("--io", "loop", "--cpus", "0"), 0, BIG_NETWORK),
    "kernel": (("--dataplane", "kernel"), 0, BIG_NETWORK),
    "udp-backend": (("--offload", "auto"), 0, UDP_NETWORK),
    "offload-4096-peers": (("--offload", "auto"), 4094, BIG_NETWORK),
    "no-offload": (("--offload", "off"), 0, BIG_NETWORK),
    "python": (("--engine", "python"), 0, BIG_NETWORK),
    # the defaults on older kernels (lab.oldkernel's profiles: OLD_KERNEL below)
    "no-uso": (("--offload", "auto"), 0, BIG_NETWORK),
    "no-gro": (("--offload", "auto"), 0, BIG_NETWORK),
    "no-udp-offload": (("--offload", "auto"), 0, BIG_NETWORK),
    "no-tun-offload": (("--offload", "auto"), 0, BIG_NETWORK),
}
# IPv6 modes, measured over IPv6 against kernel-vxlan-ipv6: name -> extra arguments
UDPFLANNEL_IPV6_MODES: dict[str, tuple[str, ...]] = {
    "offload-ipv6": ("--offload", "auto"),
    "kernel-ipv6": ("--dataplane", "kernel"),
}
# mode -> the lab.oldkernel profile its daemons run under (a seccomp filter refusing
# the newer kernel features, as an older kernel does); other modes see this kernel
OLD_KERNEL: dict[str, str] = {mode: mode for mode in ("no-uso", "no-gro", "no-udp-offload", "no-tun-offload")}

LAB_TAG = "ufb"
VXLAN_DEV, VXLAN_VNI = "flannel.1", 1
VXLAN_SUBNETS = ("10.244.1.0/24", "10.244.2.0/24")
VXLAN6_SUBNETS = ("fd10:244:0:1::/64", "fd10:244:0:2::/64")


@dataclass(frozen=True)
class Target:
    src: Namespace
    dst: Namespace
    addr: str                      # where traffic goes, inside dst
    daemons: tuple[int, ...] = ()  # pids of udpflannel daemons (node 1, node 2)
    note: str = ""
    restart: Callable[[str], None] | None = None  # node 2's daemon: "takeover", "sigterm" or "kill9"


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    setup: Callable[[], ContextManager[Target]]
    daemon_args: tuple[str, ...] | None = None
    steps: tuple[str, ...] = ("ping", "ping0", "tcp1", "tcp4", "udp", "rr")
    baseline: str = BASE_CASE  # the case its ratios are to


@contextmanager
def veth() -> Iterator[Target]:
    with Lab(2, tag=LAB_TAG) as lab:
        yield Target(lab.nodes[0], lab.nodes[1], lab.addresses[1], note=f"lab {lab.id}")


def _random_mac() -> str:
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFE) | 0x02   # unicast, locally administered (as flannel's)
    return ":".join(f"{x:02x}" for x in b)


def _flannel_vxlan(ns: Namespace, local: str, subnet: str, mac: str, mtu: int,
                   peer_ip: str, peer_subnet: str, peer_mac: str) -> None:
    """What flanneld's vxlan backend does on one node for itself and one peer lease."""
    with ns.ipr() as ipr:
        dev = kernelvxlan.create(ipr, local_ip=local, underlay="eth0", subnet=subnet,
                                 vtep_mac=mac, vni=VXLAN_VNI, port=VXLAN_PORT,
                                 name=VXLAN_DEV, mtu=mtu - VXLAN_OVERHEAD)
        kernelvxlan.add_peer(ipr, dev, subnet=peer_subnet, vtep_mac=peer_mac, public_ip=peer_ip)


@contextmanager
def kernel_vxlan() -> Iterator[Target]:
    with Lab(2, tag=LAB_TAG) as lab:
        macs = (_random_mac(), _random_mac())
        for i in (0, 1):
            j = 1 - i
            _flannel_vxlan(lab.nodes[i], lab.addresses[i], VXLAN_SUBNETS[i], macs[i], lab.mtu,
                           lab.addresses[j], VXLAN_SUBNETS[j], macs[j])
        yield Target(lab.nodes[0], lab.nodes[1], VXLAN_SUBNETS[1].split("/")[0],
                     note=f"lab {lab.id}, {VXLAN_DEV} MTU {lab.mtu - VXLAN_OVERHEAD}")


@contextmanager
def kernel_vxlan6() -> Iterator[Target]:
    """flannel-v6.1 on both nodes, as flanneld's vxlan backend with EnableIPv6."""
    with Lab(2, tag=LAB_TAG, underlay6=UNDERLAY6) as lab:
        macs = (_random_mac(), _random_mac())
        for i in (0, 1):
            j = 1 - i
            with lab.nodes[i].ipr() as ipr:
                dev = kernelvxlan.create(ipr, local_ip=lab.addresses6[i], underlay="eth0",
                                         subnet=VXLAN6_SUBNETS[i], vtep_mac=macs[i], vni=VXLAN_VNI)
                kernelvxlan.add_peer(ipr, dev, subnet=VXLAN6_SUBNETS[j], vtep_mac=macs[j],
                                     public_ip=lab.addresses6[j])
        yield Target(lab.nodes[0], lab.nodes[1], VXLAN6_SUBNETS[1].split("/")[0],
                     note=f"lab {lab.id}, flannel-v6.{VXLAN_VNI} over IPv6")


def _preload_peers(registry_file: str, count: int, config: str = BIG_NETWORK) -> None:
    """The network config, and leases of ``count`` absent nodes so every daemon's
    route table holds them."""
    async def write() -> None:
        reg = EmbeddedRegistry(registry_file)
        try:
            cfg = netconfig.parse(await reg.put_config_if_absent(config))
            for k in range(count):
                subnet = cfg.subnet_at(cfg.subnet_count - 1 - k)  # far from what nodes pick
                await reg.create_lease(Lease(subnet, ipaddress.IPv4Address(0x0A000000 + 0x10000 + k),
                                             "vxlan", 1, _random_mac()), 3600)
        finally:
            await reg.close()
    asyncio.run(write())


def udpflannel(extra_args: tuple[str, ...], peers: int = 0, config: str = BIG_NETWORK,
               kernel: str | None = None, ipv6: bool = False) -> Callable[[], ContextManager[Target]]:
    """``ipv6``: a dual-stack network and underlay, measured over IPv6."""
    @contextmanager
    def setup() -> Iterator[Target]:
        workdir = tempfile.mkdtemp(prefix="udpflannel-bench-")
        wrapper = oldkernel.wrap(kernel) if kernel else ()
        try:
            with Lab(2, tag=LAB_TAG, underlay6=UNDERLAY6 if ipv6 else None) as lab, \
                    Cluster(lab, workdir, extra_args=extra_args, wrapper=wrapper) as cluster:
                _preload_peers(cluster.registry_file, peers, config)
                cluster.start_all()
                cluster.wait_converged(timeout=30)
                if peers:
                    for i in (0, 1):
                        cluster.wait_status(i, lambda st: st.dataplane.peers >= peers + 1, 30,
                                            f"routing to {peers + 1} peers")
                pids = tuple(cluster.procs[i].pid for i in sorted(cluster.procs))
                st = cluster.status(1)
                assert st.dataplane is not None  # (routing, waited for above)
                assert st.lease is not None
                target = (str(ipaddress.IPv6Network(st.lease.ipv6_subnet or "::/0").network_address)
                          if ipv6 else cluster.overlay_addr(1))
                yield Target(lab.nodes[0], lab.nodes[1], target, daemons=pids,
                             note=f"lab {lab.id}, daemons {', '.join(map(str, pids))}, "
                                  f"{st.dataplane.kind} plane, {st.dataplane.device} MTU "
                                  f"{st.dataplane.mtu}, offloads {','.join(st.dataplane.offloads) or 'none'}"
                                  + (f", kernel profile {kernel}" if kernel else ""),
                             restart=lambda how: _restart(cluster, 1, how))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return setup


def _restart(cluster: Cluster, i: int, how: str) -> None:
    """Node i's daemon replaced: by a --takeover successor, or stopped (SIGTERM, or
    SIGKILL as in a crash) and started again; returns once the new one is ready."""
    import os
    import signal
    import subprocess
    old = cluster.procs[i]
    if how == "takeover":
        with open(os.path.join(cluster.node_dir(i), "daemon.log"), "ab") as log:
            new = cluster.lab.nodes[i].popen(cluster.argv(i) + ["--takeover"], stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if old.wait(30) != 0:
            raise RuntimeError(f"the old daemon exited with {old.returncode} on a takeover")
        cluster.procs[i] = new
    else:
        old.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        old.wait(30)
        cluster.start(i)
    cluster.wait_status(i, lambda st: st.ready and st.pid == cluster.procs[i].pid, 30, f"ready after a {how}")


@contextmanager
def flanneld_udp() -> Iterator[Target]:
    from udpflannel.lab.flanneld_udp import FlanneldUdpPeer
    workdir = tempfile.mkdtemp(prefix="udpflannel-bench-")
    peers: list = []
    try:
        with Lab(2, tag=LAB_TAG) as lab:
            registry = f"{workdir}/registry.db"
            _preload_peers(registry, 0, UDP_NETWORK)
            for i in (0, 1):
                peer = FlanneldUdpPeer(lab.nodes[i], f"{workdir}/n{i + 1}", registry_file=registry)
                peers.append(peer)
                peer.start().wait_ready()
            # the C proxies do the forwarding: theirs is the CPU and memory to count
            pids = tuple(int(p.log_tail(50).split("proxy pid ")[1].split()[0]) for p in peers)
            yield Target(lab.nodes[0], lab.nodes[1], peers[1].overlay_addr, daemons=pids,
                         note=f"lab {lab.id}, flanneld-udp proxies {', '.join(map(str, pids))}")
    finally:
        for peer in peers:
            peer.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def all_cases() -> list[Case]:
    cases = [
        Case("veth", "bare underlay: veth pairs through a bridge, no overlay", veth,
             steps=("ping", "ping0", "echo", "echo0", "echox", "tcp1", "tcp4", "udp", "rr")),
        Case(BASE_CASE, "kernel VXLAN set up as flannel's vxlan backend (flannel.1, "
                        f"VNI {VXLAN_VNI}, port {VXLAN_PORT}, nolearning, static neigh/fdb/route)",
             kernel_vxlan),
    ]
    for mode, (extra, peers, config) in UDPFLANNEL_MODES.items():
        more = f", {peers + 1} peers in the route table" if peers else ""
        backend = ", flanneld's udp backend" if config == UDP_NETWORK else ""
        kernel = OLD_KERNEL.get(mode)
        older = f", on a kernel as {oldkernel.PROFILES[kernel][1]} (seccomp)" if kernel else ""
        cases.append(Case(f"udpflannel-{mode}", f"udpflannel run {' '.join(extra)}{more}{backend}{older}",
                          udpflannel(extra, peers, config, kernel), daemon_args=extra))
    cases.append(Case("kernel-vxlan-ipv6", "kernel VXLAN over IPv6 set up as flannel's vxlan backend "
                      f"with EnableIPv6 (flannel-v6.{VXLAN_VNI}), measured over IPv6", kernel_vxlan6,
                      steps=IPV6_STEPS, baseline="kernel-vxlan-ipv6"))
    for mode, extra in UDPFLANNEL_IPV6_MODES.items():
        cases.append(Case(f"udpflannel-{mode}", f"udpflannel run {' '.join(extra)}, dual stack, measured "
                          "over IPv6", udpflannel(extra, config=DUAL_NETWORK, ipv6=True), daemon_args=extra,
                          steps=IPV6_STEPS, baseline="kernel-vxlan-ipv6"))
    cases.append(Case("udpflannel-restart", "udpflannel run (defaults), node 2's daemon replaced during a "
                      "paced TCP stream: by a --takeover successor, and stopped then started (SIGTERM, "
                      "SIGKILL)", udpflannel(("--offload", "auto")), daemon_args=("--offload", "auto"),
                      steps=("restart",)))
    cases.append(Case("flanneld-udp", "flanneld's udp backend: the lab's stand-in with flannel's "
                      "C proxy design (one packet per syscall)", flanneld_udp))
    return cases

