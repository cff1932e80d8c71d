"""Restarts, lost devices and cleanup in namespaces, in both data planes.

Two nodes on a Lab underlay; node 1 (index 0) runs the plane under test (the engine,
or `--dataplane kernel`), node 2 always runs the engine. Stopping a daemon leaves the
data plane in place, so:

- a TCP stream through node 1 survives its daemon's SIGTERM or kill -9 and restart, and
  the node keeps its subnet, VTEP MAC and device (same ifindex);
- while no daemon runs, a packet to a remote pod never leaves eth0 in the clear (a
  packet socket on eth0 watches, with a default route that would carry a leak, and a
  control after `cleanup` proves the watch sees one);
- a device deleted under a running daemon comes back, with a log line, and carries
  traffic again;
- `udpflannel cleanup` removes what a stop leaves, is a no-op the second time, refuses
  while a daemon runs, and with --release-lease deletes our lease.

The stream's sender is shaped (tbf on node 2's TUN, 10 Mbit/s) so a fixed-size stream
takes ~9 s on any machine; the silence across the restart is measured from node 2's
received-packet counter (the ACKs coming back through node 1), sampled every 20 ms,
and printed; only completion is asserted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from udpflannel.lab import probe, procs
from udpflannel.lab.silence import UnderlaySilence
from udpflannel.registry.embedded import EmbeddedRegistry

PLANES = {"engine": [], "kernel": ["--dataplane", "kernel"]}
DEVICE = {"engine": "flannel0", "kernel": "flannel.1"}
NETWORK = ipaddress.IPv4Network("10.244.0.0/16")
RTN_UNREACHABLE = 7
ETH_P_ALL = 0x0003
VXLAN_PORT = 8472
GATEWAY = "192.168.250.1"  # the hub's address: node 1's default route (what a leak would take)

STREAM_BYTES = 11_000_000  # ~9 s at the shaped rate
SHAPED_RATE = "10mbit"


# -- helpers ------------------------------------------------------------------------

def two_nodes(make_lab, make_cluster, plane: str):
    lab = make_lab(2)
    cluster = make_cluster(lab)
    cluster.start(0, PLANES[plane])
    cluster.start(1)
    cluster.wait_converged()
    return lab, cluster


def link(ns, name: str) -> tuple[int, str | None] | None:
    """(ifindex, MAC) of a device in ns, or None."""
    with ns.ipr() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        return found[0], ipr.link("get", index=found[0])[0].get("address")


def delete_link(ns, name: str) -> None:
    with ns.ipr() as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname=name)[0])


def fallback_route(ns) -> bool:
    """The overlay's unreachable route (the engine's guard for when the TUN is gone)."""
    with ns.ipr() as ipr:
        for route in ipr.route("dump", family=socket.AF_INET, table=254):
            if (route.get_attr("RTA_DST") == str(NETWORK.network_address)
                    and route["dst_len"] == NETWORK.prefixlen and route["type"] == RTN_UNREACHABLE):
                return True
    return False


def route_oif(ns, address: str) -> int | None:
    """The output interface the kernel picks for address (None: unreachable)."""
    from pyroute2.netlink.exceptions import NetlinkError
    with ns.ipr() as ipr:
        try:
            return ipr.route("get", dst=address)[0].get_attr("RTA_OIF")
        except NetlinkError:
            return None



def ping_until(ns, address: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(probe.ping(ns, address, count=1, timeout=0.5)):
            return
    raise AssertionError(f"no echo reply from {address} within {timeout}s")


def run_cli(ns, argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
    return ns.run(argv, timeout)


def cleanup_argv(cluster, i: int, *extra: str) -> list[str]:
    argv = cluster.argv(i)
    argv[argv.index("run")] = "cleanup"
    return argv + list(extra)


def shape(ns, device: str, rate: str) -> None:
    """Token bucket on ``device``'s egress: the stream's pace, whatever the machine."""
    with ns.ipr() as ipr:
        index = ipr.link_lookup(ifname=device)[0]
        ipr.tc("add", "tbf", index, 0x10000, rate=rate, burst=131072, latency="200ms")


class Silence:
    """Samples a counter of a node that stays up; ``longest`` is the longest interval
    (seconds) in which it did not move, at ``period`` resolution."""

    def __init__(self, cluster, i: int, key: str, period: float = 0.02) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(cluster, i, key, period), daemon=True)

    def _run(self, cluster, i: int, key: str, period: float) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), cluster.status(i).dataplane.counters[key]))
            except (OSError, ConnectionError):
                pass
            time.sleep(period)

    def __enter__(self) -> "Silence":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def resolution(self) -> float:
        """The sampler's own largest gap: a silence shorter than this is not resolved."""
        times = [t for t, _ in self.samples]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)

    @property
    def longest(self) -> float:
        if not self.samples:
            return 0.0
        longest, (since, last) = 0.0, self.samples[0]
        for t, value in self.samples[1:]:
            if value != last:
                longest, since, last = max(longest, t - since), t, value
        return longest


def frames(sock: socket.socket, seconds: float) -> list[bytes]:
    """Every frame the packet socket sees for ``seconds``."""
    out, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            out.append(sock.recv(65535))
        except socket.timeout:
            break
    return out


def ipv4_dst(packet: bytes) -> str | None:
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    return socket.inet_ntoa(packet[16:20])


def classify(frame: bytes) -> tuple[str | None, str | None]:
    """(destination in the clear, inner destination if VXLAN) of an Ethernet frame."""
    if len(frame) < 14 or struct.unpack_from("!H", frame, 12)[0] != 0x0800:
        return None, None
    ip = frame[14:]
    clear = ipv4_dst(ip)
    ihl = (ip[0] & 0x0F) * 4
    inner = None
    if ip[9] == socket.IPPROTO_UDP and len(ip) >= ihl + 8 + 8 + 14 + 20:
        if struct.unpack_from("!H", ip, ihl + 2)[0] == VXLAN_PORT:
            inner = ipv4_dst(ip[ihl + 8 + 8 + 14:])
    return clear, inner


def send_and_watch(ns, targets: list[str], seconds: float = 0.5) -> list[tuple[str | None, str | None]]:
    """Send three marked UDP datagrams to each target from ns (send errors are fine: an
    unreachable route refuses them) and return what eth0 carried meanwhile."""
    cap = ns.call(socket.socket, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    out = ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    with cap, out:
        cap.bind(("eth0", 0))
        for _ in range(3):
            for target in targets:
                try:
                    out.sendto(b"udpflannel leak probe", (target, 9))
                except OSError:
                    pass
            time.sleep(0.05)
        return [classify(f) for f in frames(cap, seconds)]


def leases(cluster) -> set[str]:
    async def listing() -> set[str]:
        reg = EmbeddedRegistry(cluster.registry_file)
        try:
            found, _ = await reg.list_leases()
            return {str(x.subnet) for x in found}
        finally:
            await reg.close()
    return asyncio.run(listing())


# -- 1. a stream across a restart -----------------------------------------------------

@pytest.mark.parametrize("how", ["sigterm", "kill9"])
@pytest.mark.parametrize("plane", ["engine", "kernel"])
def test_stream_survives_restart(make_lab, make_cluster, plane, how, capsys, record_property):
    lab, cluster = two_nodes(make_lab, make_cluster, plane)
    before = cluster.status(0)
    device_before = link(lab.nodes[0], DEVICE[plane])
    shape(lab.nodes[1], "flannel0", SHAPED_RATE)
    got: dict[str, object] = {}

    def stream() -> None:
        try:
            got["result"] = probe.tcp_stream(lab.nodes[1], lab.nodes[0], cluster.overlay_addr(0),
                                             nbytes=STREAM_BYTES, timeout=30.0)
        except BaseException as e:  # handed to the test below
            got["error"] = e

    sender = threading.Thread(target=stream, daemon=True)
    with UnderlaySilence(lab.nodes[1]) as silence:
        started = time.monotonic()
        sender.start()
        time.sleep(3.0)
        assert sender.is_alive(), f"the stream ended before the restart: {got}"
        proc = cluster.procs[0]  # left in procs: the fixture stops it if anything below fails
        proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        assert proc.wait(10) == (0 if how == "sigterm" else -signal.SIGKILL)
        down = time.monotonic()
        cluster.start(0, PLANES[plane])
        cluster.wait_status(0, lambda s: s.ready, what="ready again")
        back = time.monotonic() - down
        sender.join(60)
        elapsed = time.monotonic() - started
    assert not sender.is_alive(), "the stream did not finish"
    assert "error" not in got, f"the stream failed: {got.get('error')!r}"
    assert got["result"].bytes == STREAM_BYTES

    after = cluster.status(0)
    assert (after.lease.subnet, after.lease.vtep_mac) == (before.lease.subnet, before.lease.vtep_mac)
    assert link(lab.nodes[0], DEVICE[plane]) == device_before  # the same device, re-attached
    if plane == "engine":  # forwarding again before the registry answers (warmstart.py)
        cluster.wait_log(0, "warm start: forwarding on flannel0 with the 1 routes it last had")
    else:
        cluster.wait_log(0, "reusing flannel.1")
    record_property("silent_seconds", round(silence.longest, 3))
    record_property("sampler_largest_gap_seconds", round(silence.resolution, 3))
    with capsys.disabled():
        print(f"\n[restart {plane}/{how}] stream {STREAM_BYTES} B in {elapsed:.1f} s; daemon back "
              f"(ready) {back:.2f} s after it died; longest silence {silence.longest:.2f} s "
              f"(node 2's eth0 rx_packets sampled every 1 ms; the sampler's largest gap {silence.resolution:.3f} s)")


# -- 2. nothing leaks while no daemon runs --------------------------------------------

@pytest.mark.parametrize("plane", ["engine", "kernel"])
def test_no_clear_packets_while_daemon_down(make_lab, make_cluster, plane):
    lab = make_lab(2)
    lab.hub.link_up("br0", f"{GATEWAY}/24")
    with lab.nodes[0].ipr() as ipr:  # what a leak would take: the default route
        ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY)
    cluster = make_cluster(lab)
    cluster.start(0, PLANES[plane])
    cluster.start(1)
    cluster.wait_converged()
    pod = str(ipaddress.IPv4Network(cluster.status(1).lease.subnet).network_address + 7)
    node1 = lab.nodes[0]
    eth0 = link(node1, "eth0")[0]
    assert cluster.stop(0, grace=10) == 0

    seen = send_and_watch(node1, [pod, GATEWAY])
    assert (GATEWAY, None) in seen, "the packet socket saw nothing: the check would be blind"
    assert pod not in {clear for clear, _ in seen}, f"{pod} left eth0 unencapsulated"
    assert route_oif(node1, pod) not in (None, eth0)
    if plane == "engine":
        assert fallback_route(node1)
        delete_link(node1, "flannel0")  # the TUN goes while no daemon runs
        seen = send_and_watch(node1, [pod, GATEWAY])
        assert (GATEWAY, None) in seen
        assert pod not in {clear for clear, _ in seen}, f"{pod} leaked once the TUN was gone"
        assert route_oif(node1, pod) is None  # the unreachable fallback
    else:  # the kernel keeps forwarding: encapsulated to node 2
        assert (lab.addresses[1], pod) in seen

    # control: with everything removed on purpose, the same packet does leak, and is seen
    done = run_cli(node1, cleanup_argv(cluster, 0))
    assert done.returncode == 0, done.stderr
    seen = send_and_watch(node1, [pod])
    assert (pod, None) in seen, "after cleanup the default route should carry it in the clear"


# -- 3. a device deleted under a running daemon ---------------------------------------

@pytest.mark.parametrize("plane", ["engine", "kernel"])
def test_device_deleted_under_running_daemon_comes_back(make_lab, make_cluster, plane):
    lab, cluster = two_nodes(make_lab, make_cluster, plane)
    device = DEVICE[plane]
    index, mac = link(lab.nodes[0], device)
    ping_until(lab.nodes[0], cluster.overlay_addr(1))
    delete_link(lab.nodes[0], device)

    cluster.wait_log(0, f"{device} was deleted under us")
    cluster.wait_log(0, f"{device} is back")
    assert cluster.procs[0].poll() is None
    ping_until(lab.nodes[0], cluster.overlay_addr(1))
    ping_until(lab.nodes[1], cluster.overlay_addr(0))
    new_index, new_mac = link(lab.nodes[0], device)
    assert new_index != index  # a new device, not the old one
    if plane == "kernel":
        assert new_mac == mac == cluster.status(0).lease.vtep_mac
    else:
        assert fallback_route(lab.nodes[0])
    assert cluster.status(0).ready


# -- 4. cleanup ------------------------------------------------------------------------

def iptables_save(ns) -> str:
    done = run_cli(ns, ["iptables-save"])
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("plane,release", [("engine", True), ("kernel", False)],
                         ids=["engine-release-lease", "kernel-keep-lease"])
def test_cleanup_removes_what_stop_leaves(make_lab, make_cluster, plane, release):
    lab, cluster = two_nodes(make_lab, make_cluster, plane)
    node1, device = lab.nodes[0], DEVICE[plane]
    subnet_env = os.path.join(cluster.node_dir(0), "subnet.env")
    ours, theirs = cluster.status(0).lease.subnet, cluster.status(1).lease.subnet

    refused = run_cli(node1, cleanup_argv(cluster, 0))
    assert refused.returncode != 0 and "a daemon is running" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert link(node1, device) is not None and os.path.exists(subnet_env)

    assert cluster.stop(0, grace=10) == 0
    assert link(node1, device) is not None and os.path.exists(subnet_env)
    assert "FLANNEL-FWD" in iptables_save(node1)
    if plane == "engine":
        assert fallback_route(node1)
    assert leases(cluster) == {ours, theirs}

    done = run_cli(node1, cleanup_argv(cluster, 0, *(["--release-lease"] if release else [])))
    assert done.returncode == 0, done.stderr
    assert link(node1, device) is None
    assert link(node1, "flannel0") is None and link(node1, "flannel.1") is None
    assert not fallback_route(node1)
    assert route_oif(node1, str(ipaddress.IPv4Network(theirs).network_address)) is None  # nothing left
    assert "FLANNEL" not in iptables_save(node1)
    assert not os.path.exists(subnet_env)
    if release:
        assert leases(cluster) == {theirs}
        cluster.wait_status(1, lambda s: s.dataplane.peers == 0, what="told the lease is gone")
    else:
        assert leases(cluster) == {ours, theirs}

    again = run_cli(node1, cleanup_argv(cluster, 0))
    assert again.returncode == 0, again.stderr
    assert "removed: nothing" in again.stderr


# -- 5. a warm start forwards before the registry answers -------------------------------

def test_a_warm_start_forwards_before_the_registry_answers(make_lab, make_cluster, workdir):
    """The engine remembers its plane in the state dir; restarted while etcd is down, it
    forwards with those routes at once (the peer's pings cross), stays not ready (no
    lease confirmed), and once etcd is back the first snapshot drops a route that went
    away meanwhile."""
    import uuid

    try:
        from .etcd_server import etcd_in_hub
    except ImportError:
        from etcd_server import etcd_in_hub
    lab = make_lab(3)
    with etcd_in_hub(lab, os.path.join(workdir, "etcd")) as etcd:
        prefix = f"/t-{uuid.uuid4().hex[:8]}/network"
        etcd.etcdctl("put", f"{prefix}/config", '{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
        cluster = make_cluster(lab, etcd_endpoints=etcd.endpoint, extra_args=["--etcd-prefix", prefix])
        cluster.start_all()
        cluster.wait_converged()
        gone = cluster.status(2).lease.subnet
        subnet_before = cluster.status(0).lease.subnet
        time.sleep(1.5)  # the plane's state is kept once a second
        assert cluster.stop(0, grace=10) == 0
        assert cluster.stop(2, grace=10) == 0
        etcd.etcdctl("del", f"{prefix}/subnets/{gone.replace('/', '-')}")  # node 3 left for good
        etcd.stop()
        cluster.start(0)
        cluster.wait_log(0, "warm start: forwarding on flannel0 with the 2 routes it last had")
        address = str(ipaddress.IPv4Network(subnet_before).network_address)
        ping_until(lab.nodes[1], address)
        # the admin socket answers before the registry does
        st = cluster.wait_status(0, lambda s: s.dataplane is not None, 10, "answering")
        assert not st.ready and st.lease is None
        assert st.dataplane.forwarding and st.dataplane.peers == 2  # node 2's route and the stale one
        assert cluster.procs[0].poll() is None
        etcd.start()
        st = cluster.wait_status(0, lambda s: s.ready and s.dataplane.peers == 1, 30, "ready, node 3's route gone")
        assert st.lease.subnet == subnet_before
        ping_until(lab.nodes[1], cluster.overlay_addr(0))
