"""Upgrades by takeover (--takeover, SIGUSR2), with real daemons in namespaces.

Two nodes on a Lab underlay; node 1 (index 0) runs the plane under test. A second
daemon started on node 1 with --takeover takes the running one's data plane over (its
TUN queues and sockets, passed over the admin socket): the old daemon exits 0 (or
idles until SIGTERM with --takeover=wait), the lease, VTEP MAC and device stay. During
a paced TCP stream through node 1 the silence at node 2 (its underlay's received-packet
counter, sampled every 1 ms) is measured and printed; the stream must survive. A takeover the
new daemon cannot use leaves the old one forwarding.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from udpflannel.lab import probe, procs

try:
    from .test_restarts import DEVICE, PLANES, SHAPED_RATE, STREAM_BYTES, UnderlaySilence, link, shape, two_nodes
except ImportError:
    from test_restarts import DEVICE, PLANES, SHAPED_RATE, STREAM_BYTES, UnderlaySilence, link, shape, two_nodes


def start_successor(cluster, i: int, *extra: str) -> subprocess.Popen:
    """A second daemon for node i beside the running one (the cluster's own is left
    alone until it exits); its log goes to the same file."""
    log = open(os.path.join(cluster.node_dir(i), "daemon.log"), "ab")
    try:
        return cluster.lab.nodes[i].popen(cluster.argv(i) + list(extra), stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        log.close()


def wait_pid_in_status(cluster, i: int, pid: int, timeout: float = 20.0):
    return cluster.wait_status(i, lambda s: s.ready and s.pid == pid, timeout, f"pid {pid} ready")


@pytest.mark.parametrize("plane", ["engine", "kernel"])
def test_a_takeover_during_a_stream_keeps_it_flowing(make_lab, make_cluster, plane, capsys, record_property):
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
    old = cluster.procs[0]
    new = None
    try:
        with UnderlaySilence(lab.nodes[1]) as silence:
            started = time.monotonic()
            sender.start()
            time.sleep(3.0)
            assert sender.is_alive(), f"the stream ended before the takeover: {got}"
            asked = time.monotonic()
            new = start_successor(cluster, 0, *PLANES[plane], "--takeover")
            assert old.wait(30) == 0, cluster.log_tail(0, 40)
            let_go = time.monotonic() - asked
            cluster.procs[0] = new  # the fixture stops it from here on
            wait_pid_in_status(cluster, 0, new.pid)
            sender.join(60)
            elapsed = time.monotonic() - started
    finally:
        if new is not None and cluster.procs.get(0) is not new:
            procs.terminate(new)
    assert not sender.is_alive(), "the stream did not finish"
    assert "error" not in got, f"the stream failed: {got.get('error')!r}"
    assert got["result"].bytes == STREAM_BYTES
    after = cluster.status(0)
    assert (after.lease.subnet, after.lease.vtep_mac) == (before.lease.subnet, before.lease.vtep_mac)
    assert link(lab.nodes[0], DEVICE[plane]) == device_before
    assert "the new daemon forwards now; letting go (exit)" in cluster.log_tail(0, 80)
    record_property("silent_seconds", round(silence.longest, 3))
    with capsys.disabled():
        print(f"\n[takeover {plane}] stream {STREAM_BYTES} B in {elapsed:.1f} s; the old daemon let go "
              f"{let_go:.2f} s after the new one started; longest silence {silence.longest:.3f} s "
              f"(node 2's eth0 rx_packets sampled every 1 ms; the sampler's largest gap {silence.resolution:.3f} s)")


def test_takeover_wait_leaves_the_old_daemon_idle_until_stopped(make_lab, make_cluster):
    lab, cluster = two_nodes(make_lab, make_cluster, "engine")
    old = cluster.procs[0]
    new = start_successor(cluster, 0, "--takeover=wait")
    try:
        wait_pid_in_status(cluster, 0, new.pid)
        assert old.poll() is None  # idle, not exited: a pod's container must not restart
        assert all(probe.ping(lab.nodes[1], cluster.overlay_addr(0), count=3))
        old.send_signal(signal.SIGTERM)
        assert old.wait(10) == 0
        cluster.procs[0] = new
        assert all(probe.ping(lab.nodes[1], cluster.overlay_addr(0), count=3))  # the old one took nothing
        assert cluster.status(0).pid == new.pid
    finally:
        if cluster.procs.get(0) is not new:
            procs.terminate(new)


def test_a_takeover_the_new_daemon_cannot_use_leaves_the_old_one_forwarding(make_lab, make_cluster):
    lab, cluster = two_nodes(make_lab, make_cluster, "engine")
    old = cluster.procs[0]
    new = start_successor(cluster, 0, "--takeover", "--io", "poll", "--queues", "2")
    assert new.wait(30) == 1
    log = cluster.log_tail(0, 40)
    assert ("udpflannel: error: --takeover: the running daemon has 1 queue(s), this one asks for 2: "
            "restart instead of taking over") in log
    assert "the takeover fell through" in log
    assert old.poll() is None
    st = cluster.status(0)
    assert st.ready and st.pid == old.pid
    assert all(probe.ping(lab.nodes[1], cluster.overlay_addr(0), count=3))


def test_sigusr2_starts_a_successor_that_takes_over(make_lab, make_cluster):
    """`systemctl reload` (ExecReload=kill -USR2 $MAINPID): the daemon starts the
    installed udpflannel with its own command line and --takeover=exit, and exits 0
    once that one forwards."""
    lab, cluster = two_nodes(make_lab, make_cluster, "engine")
    old = cluster.procs[0]
    before = cluster.status(0)
    old.send_signal(signal.SIGUSR2)
    assert old.wait(30) == 0, cluster.log_tail(0, 40)
    del cluster.procs[0]  # gone as it should be; the successor is no child of ours
    st = cluster.wait_status(0, lambda s: s.ready and s.pid not in (0, old.pid), 20, "the successor ready")
    try:
        assert (st.lease.subnet, st.lease.vtep_mac) == (before.lease.subnet, before.lease.vtep_mac)
        assert all(probe.ping(lab.nodes[1], cluster.overlay_addr(0), count=3))
    finally:
        os.kill(st.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{st.pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        if os.path.exists(f"/proc/{st.pid}"):
            os.kill(st.pid, signal.SIGKILL)
