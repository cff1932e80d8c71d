"""The engine on its own threads (--io threads and --io poll): route tables
swapped under running threads, several queues, and the port still exclusive.

The churn test drives two engines in this process (real TUNs in two namespaces, real
sockets, offloads on, threads started) so that it can change routes 10,000 times at
full speed while a TCP stream crosses them, and check, on the wire, that a peer gets
nothing once its removal has been acknowledged (published, and every thread quiet
since: engine.reclaim() == 0).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
import time

import pytest
from support.waiting import wait_until

from udpflannel._engine import Engine
from udpflannel.cli import format_cpus
from udpflannel.dataplane import sockets
from udpflannel.host import netconf
from udpflannel.host.tun import Tun
from udpflannel.lab import probe

NETWORK = ipaddress.IPv4Network("10.244.0.0/16")
A_NET, B_NET, DECOY_NET = (ipaddress.IPv4Network(f"10.244.{i}.0/24") for i in (1, 2, 3))
A_MAC, B_MAC, DECOY_MAC = b"\x02\0\0\0\0\x0a", b"\x02\0\0\0\0\x0b", b"\x02\0\0\0\0\x0d"


class Node:
    """An engine with threads inside a lab namespace: TUN, VXLAN socket, offloads."""

    def __init__(self, ns, address: str, subnet: ipaddress.IPv4Network, mac: bytes) -> None:
        self.ns = ns
        self.tun = ns.call(Tun, "uft0", True, False, 1, True)  # vnet_hdr, not persistent, blocking
        ns.call(netconf.configure_tun, "uft0", subnet, NETWORK, 1450, self.tun.tso)
        self.sock = ns.call(sockets.open_udp_socket, ipaddress.IPv4Address(address), 8472)
        got = sockets.enable_udp_offloads(self.sock, frozenset({"gso", "gro"}))
        self.sock.setblocking(True)
        self.engine = Engine(vni=1, vtep_mac=mac, network=str(NETWORK), subnet_len=24)
        self.engine.attach(self.tun.fd, self.sock.fileno(), tx_fds=[self.sock.fileno()],
                           vnet_hdr=True, gso="gso" in got, gro="gro" in got)

    def close(self) -> None:
        self.engine.stop_threads()
        self.sock.close()
        self.tun.close()


THREADS_PER_QUEUE = {"threads": 2, "poll": 1}   # a thread per direction, or one for both


@pytest.fixture(params=sorted(THREADS_PER_QUEUE))
def pair(request, make_lab):
    lab = make_lab(2)
    a = b = None
    try:
        a = Node(lab.nodes[0], lab.addresses[0], A_NET, A_MAC)
        b = Node(lab.nodes[1], lab.addresses[1], B_NET, B_MAC)
        a.engine.set_route(str(B_NET), lab.addresses[1], 8472, B_MAC)
        b.engine.set_route(str(A_NET), lab.addresses[0], 8472, A_MAC)
        a.engine.start_threads(poll=request.param == "poll")
        b.engine.start_threads(poll=request.param == "poll")
        a.io = b.io = request.param
        yield lab, a, b
    finally:
        for node in (a, b):
            if node is not None:
                node.close()


def _decoy_listener(lab):
    """A UDP socket on node 2 standing for a peer: counts what reaches it and records
    the app's sequence numbers inside."""
    sock = lab.nodes[1].call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((lab.addresses[1], 0))
    sock.settimeout(0.05)
    seen: list[int] = []
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            try:
                frame = sock.recv(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            if len(frame) >= 22 + 28 + 8:
                seen.append(struct.unpack_from("!Q", frame, 22 + 28)[0])
    t = threading.Thread(target=listen, daemon=True)
    t.start()
    return sock, seen, stop, t


def test_10000_route_changes_during_a_stream(pair):
    lab, a, b = pair
    decoy, seen, stop_decoy, listener = _decoy_listener(lab)
    app = lab.nodes[0].call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    sent = [0]
    stop_app = threading.Event()

    def send_to_decoy() -> None:  # a pod talking to the decoy's subnet all along
        while not stop_app.is_set():
            app.sendto(struct.pack("!Q", sent[0]), ("10.244.3.9", 9))
            sent[0] += 1
            time.sleep(0.0002)
    stream: dict = {}
    total = 48 << 20

    def run_stream() -> None:
        try:
            stream["r"] = probe.tcp_stream(lab.nodes[0], lab.nodes[1], str(B_NET.network_address),
                                           nbytes=total, timeout=60.0)
        except BaseException as e:  # reported below
            stream["e"] = e
    sender = threading.Thread(target=send_to_decoy, daemon=True)
    streamer = threading.Thread(target=run_stream, daemon=True)
    sender.start()
    streamer.start()
    changes, violations, checked = 0, [], 0
    e = a.engine
    try:
        for i in range(5000):  # 10,000 changes: an add and a delete each round
            subnet = f"10.244.{10 + i % 200}.0/24"
            e.set_route(subnet, f"192.0.2.{1 + i % 250}", 8472, bytes([2, 0, 0, 0, 1, i % 256]))
            if i % 50 == 0:  # and the live route to b, replaced by itself
                e.set_route(str(B_NET), lab.addresses[1], 8472, B_MAC)
            e.publish()
            e.del_route(subnet)
            e.publish()
            changes += 2
            if i % 250 == 0:
                e.set_route(str(DECOY_NET), lab.addresses[1], decoy.getsockname()[1], DECOY_MAC)
                e.publish()
                time.sleep(0.02)  # the decoy gets traffic
                e.del_route(str(DECOY_NET))
                e.publish()
                deadline = time.monotonic() + 5
                while e.reclaim() and time.monotonic() < deadline:  # acknowledged: all quiet
                    time.sleep(0.001)
                assert e.reclaim() == 0
                if i % 1000 == 0:  # then nothing more may reach the decoy
                    time.sleep(0.2)  # what was sent before the acknowledgement lands
                    before = len(seen)
                    time.sleep(0.2)
                    checked += 1
                    if len(seen) != before:
                        violations.append((i, before, len(seen)))
    finally:
        stop_app.set()
        sender.join(5)
        streamer.join(90)
        stop_decoy.set()
        listener.join(5)
        decoy.close()
        app.close()
    assert changes == 10_000 and checked == 5
    assert violations == []
    assert "e" not in stream, stream.get("e")
    assert stream["r"].bytes == total  # the stream arrived intact (content-checked)
    assert seen, "the decoy never got traffic: the test would prove nothing"
    assert e.route_count() == 1 and e.reclaim() == 0
    assert a.engine.running_threads() == b.engine.running_threads() == THREADS_PER_QUEUE[a.io]


def test_threads_stop_promptly_and_report_a_deleted_tun(pair):
    lab, a, _ = pair
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        a.engine.stop_threads()
        a.engine.start_threads(efd, poll=a.io == "poll")
        with lab.nodes[0].ipr() as ipr:
            ipr.link("del", index=ipr.link_lookup(ifname="uft0")[0])
        deadline = time.monotonic() + 5
        errors = []
        while not errors and time.monotonic() < deadline:
            errors = a.engine.thread_errors()
            time.sleep(0.01)
        assert errors and errors[0][0] == "tun"  # EBADFD from the reader: the loop re-creates
        assert os.eventfd_read(efd) >= 1
        started = time.monotonic()
        a.engine.stop_threads()
        assert time.monotonic() - started < 1.0 and a.engine.running_threads() == 0
    finally:
        os.close(efd)


@pytest.mark.parametrize("io", sorted(THREADS_PER_QUEUE))
def test_queues_keep_order_and_exact_counters(make_lab, make_cluster, io):
    """--queues 4: numbered UDP datagrams of 6 flows arrive, each flow in order, and
    the counters account for exactly what was sent; TCP crosses too."""
    lab = make_lab(2)
    cluster = make_cluster(lab, extra_args=["--io", io, "--queues", "4"])
    cluster.start_all()
    cluster.wait_converged()
    dst = cluster.overlay_addr(1)
    assert probe.tcp_stream(lab.nodes[0], lab.nodes[1], dst, nbytes=8 << 20, timeout=30).bytes == 8 << 20
    rx = lab.nodes[1].call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    senders = [lab.nodes[0].call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM) for _ in range(6)]
    count = 300
    try:
        rx.bind((dst, 5555))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        rx.settimeout(5)
        before_a, before_b = (settled_counters(cluster, i) for i in (0, 1))
        for n in range(count):
            for f, s in enumerate(senders):
                s.sendto(struct.pack("!II", f, n) + bytes(100), (dst, 5555))
            if n % 50 == 49:
                time.sleep(0.005)  # bursts of 300: within the TUN's queue
        got: dict[int, list[int]] = {f: [] for f in range(len(senders))}
        for _ in range(count * len(senders)):
            f, n = struct.unpack_from("!II", rx.recv(2048))
            got[f].append(n)
    finally:
        rx.close()
        for s in senders:
            s.close()
    assert all(seq == list(range(count)) for seq in got.values())
    after_a, after_b = (cluster.status(i).dataplane.counters for i in (0, 1))
    sent = count * len(senders)
    assert after_a["tx_packets"] - before_a["tx_packets"] == sent
    assert after_b["rx_packets"] - before_b["rx_packets"] == sent
    assert cluster.status(0).dataplane.offloads == ("tso", "gso", "gro")


def settled_counters(cluster, i: int, quiet: float = 0.5) -> dict[str, int]:
    """Node i's counters once nothing has moved them for ``quiet`` s: the TCP stream
    before has closed (its last FIN and ACK, sent after tcp_stream returns, would
    otherwise land in the UDP test's count)."""
    last: list[dict[str, int]] = [cluster.status(i).dataplane.counters]

    def still() -> dict[str, int] | None:
        time.sleep(quiet)
        now = cluster.status(i).dataplane.counters
        settled = now if now == last[0] else None
        last[0] = now
        return settled
    return wait_until(still, 10, f"node {i + 1}'s counters settling", interval=0)


def test_a_second_daemon_cannot_join_the_queue_group(make_lab, make_cluster, workdir):
    """SO_REUSEPORT must not let a second daemon share the port silently."""
    import subprocess
    import sys
    lab = make_lab(1)
    cluster = make_cluster(lab, extra_args=["--io", "threads", "--queues", "2"])
    cluster.start(0)
    cluster.wait_status(0, lambda s: s.ready)
    argv = [sys.executable, "-m", "udpflannel", "run", "--iface", "eth0", "--io", "threads",
            "--queues", "2", "--tun", "second0", "--registry-file", f"{workdir}/other.db",
            "--state-dir", f"{workdir}/other", "--subnet-file", f"{workdir}/other.env",
            "--admin-socket", f"{workdir}/other.sock"]
    res = lab.nodes[0].run(argv, 30)
    assert res.returncode == 1 and "8472" in res.stderr and "in use" in res.stderr, res.stderr


def _threads_of(pid: int) -> list[tuple[str, str]]:
    """[(thread name, the CPUs it may run on)] for every thread of a process (names
    repeat: the control side has several "python" threads)."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            name = f.read().strip()
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            allowed = next(line.split()[1] for line in f if line.startswith("Cpus_allowed_list:"))
        out.append((name, allowed))
    return out


@pytest.mark.parametrize("io", sorted(THREADS_PER_QUEUE))
def test_cpus_pins_each_queue_pair_and_only_the_data_path(make_lab, make_cluster, io):
    """--cpus A,B --queues 2: queue 0's TUN reader and VXLAN reader on A, queue 1's on B
    (--io poll: one thread drains each queue's fds); the control threads stay where they
    were. No flanneld-udp reader (uf-bare): its port is open only while the config or a
    peer's lease needs it, and this cluster is vxlan only."""
    allowed = sorted(os.sched_getaffinity(0))
    a, b = allowed[0], allowed[-1]  # one CPU twice on a one-CPU machine: still checked
    lab = make_lab(2)
    cluster = make_cluster(lab, extra_args=["--io", io, "--queues", "2", "--cpus", f"{a},{b}"])
    cluster.start_all()
    cluster.wait_converged()
    assert probe.ping(lab.nodes[0], cluster.overlay_addr(1), count=3, timeout=2)[0] is not None
    threads = _threads_of(cluster.procs[0].pid)
    # (no uf-bare: flanneld's udp framing is read only while a peer speaks it)
    expected = {"threads": [("uf-tun0", a), ("uf-vxlan0", a),
                            ("uf-tun1", b), ("uf-vxlan1", b)],
                "poll": [("uf-poll0", a), ("uf-poll1", b)]}[io]
    assert sorted(t for t in threads if t[0].startswith("uf-")) == sorted(
        (name, str(cpu)) for name, cpu in expected), threads
    control = [v for k, v in threads if not k.startswith("uf-")]
    assert control and all(v == format_cpus(allowed) for v in control)  # as the daemon was started
    assert f"CPUs {a},{b}" in cluster.log_tail(0, 200)
    assert cluster.status(0).dataplane.io == f"{io}, 2 queues, CPUs {a},{b}"


def test_cpus_pins_the_event_loop_in_loop_mode(make_lab, make_cluster):
    cpu = sorted(os.sched_getaffinity(0))[-1]
    lab = make_lab(2)
    cluster = make_cluster(lab, extra_args=["--io", "loop", "--cpus", str(cpu)])
    cluster.start_all()
    cluster.wait_converged()
    assert probe.ping(lab.nodes[0], cluster.overlay_addr(1), count=3, timeout=2)[0] is not None
    pid = cluster.procs[0].pid
    with open(f"/proc/{pid}/task/{pid}/status") as f:  # the main thread runs the loop
        assert f"Cpus_allowed_list:\t{cpu}\n" in f.read()
    assert not any(k.startswith("uf-") for k, _ in _threads_of(pid))  # no data threads in loop mode
    assert cluster.status(0).dataplane.io == f"loop, CPUs {cpu}"
