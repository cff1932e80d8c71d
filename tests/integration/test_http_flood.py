"""A connection flood on the health port cannot stop a node (the attack that did).

The flooded daemon runs with the open-files limit a systemd unit gives by default
(1,024), hard as well, so only the listener's own bounds protect it. From another
node's namespace 3,000 connections are opened to its /healthz port and held 20 s, a
hundred of them trickling a byte at a time; meanwhile a third node pings the flooded
node's overlay address every 20 ms and a fresh client asks /healthz every second.
The node must stay up, answer every probe and lose no ping.
"""

from __future__ import annotations

import contextlib
import re
import resource
import socket
import subprocess
import threading
import time

from support.http import http_get

HEALTHZ_PORT = 10256
FLOOD = 3000
TRICKLING = 100
HOLD = 20.0


def healthz(ns, address: str) -> int:
    return http_get(ns, HEALTHZ_PORT, "/healthz", host=address, timeout=3)[0]


def open_flood(ns, address: str) -> list[socket.socket]:
    def connect_all() -> list[socket.socket]:
        held = []
        for _ in range(FLOOD):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((address, HEALTHZ_PORT))
            held.append(s)
        return held
    return ns.call(connect_all, timeout=60)


def trickle(held: list[socket.socket], stop: threading.Event) -> None:
    while not stop.wait(0.5):
        for s in held[:TRICKLING]:
            with contextlib.suppress(OSError):
                s.send(b"G")


def test_a_connection_flood_on_the_health_port_stops_nothing(make_lab, make_cluster):
    lab = make_lab(3)
    cluster = make_cluster(lab, extra_args=["--healthz-port", str(HEALTHZ_PORT),
                                            "--metrics-port", str(HEALTHZ_PORT)])
    cluster.start_all()
    cluster.wait_converged()
    victim, attacker, pinger = lab.nodes
    proc = cluster.procs[0]
    resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (1024, 1024))  # systemd's default soft limit
    assert healthz(pinger, lab.addresses[0]) == 200

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, FLOOD + 1024), max(hard, FLOOD + 1024)))
    ping = pinger.popen(["ping", "-n", "-q", "-i", "0.02", "-W", "1", "-w", str(int(HOLD + 2)),
                         cluster.overlay_addr(0)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    held: list[socket.socket] = []
    stop = threading.Event()
    trickler = None
    try:
        held = open_flood(attacker, lab.addresses[0])
        trickler = threading.Thread(target=trickle, args=(held, stop), daemon=True)
        trickler.start()
        probes = []
        deadline = time.monotonic() + HOLD
        while time.monotonic() < deadline:
            started = time.monotonic()
            probes.append((healthz(pinger, lab.addresses[0]), time.monotonic() - started))
            assert proc.poll() is None, cluster.log_tail(0)
            time.sleep(1.0)
        out, _ = ping.communicate(timeout=HOLD + 10)
    finally:
        stop.set()
        if trickler is not None:
            trickler.join(5)
        for s in held:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if ping.poll() is None:
            ping.kill()
            ping.wait(5)
    assert [code for code, _ in probes] == [200] * len(probes), probes
    assert max(t for _, t in probes) < 3.0, probes
    sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+) received", out).groups())
    assert sent >= HOLD / 0.02 * 0.8 and received == sent, out
    assert proc.poll() is None, cluster.log_tail(0)
    st = cluster.status(0)
    assert st.ready and st.resource_errors == 0
    # the listener did the shedding: it evicted and timed out the flood
    _, scrape = http_get(cluster.lab.nodes[0], HEALTHZ_PORT, "/metrics", timeout=3)
    evicted = int(re.search(r'udpflannel_http_connections_closed_total\{reason="evicted"\} (\S+)', scrape)
                  .group(1).split(".")[0])
    timed_out = int(re.search(r'udpflannel_http_connections_closed_total\{reason="timeout"\} (\S+)', scrape)
                    .group(1).split(".")[0])
    assert evicted + timed_out >= FLOOD // 2, scrape
