"""What reaches pods through the overlay: ICMP net unreachable for unleased addresses
and routed traffic whose source is outside the overlay."""

from __future__ import annotations

import errno
import socket
import subprocess
import threading
import time

import pytest

UNLEASED = "10.244.250.7"  # inside 10.244.0.0/16; no node holds 10.244.250.0/24


def _cluster(make_lab, make_cluster, extra=()):
    lab = make_lab(2)
    cluster = make_cluster(lab, extra_args=list(extra))
    cluster.start_all()
    cluster.wait_converged()
    return lab, cluster


def test_ping_to_an_unleased_address_reports_unreachable(make_lab, make_cluster):
    lab, cluster = _cluster(make_lab, make_cluster)
    out = lab.nodes[0].run(["ping", "-c", "1", "-W", "2", UNLEASED], 10,
                           stderr=subprocess.STDOUT).stdout
    assert "Destination Net Unreachable" in out, out
    assert cluster.status(0).dataplane.counters["icmp_unreachable"] >= 1


def test_tcp_connect_to_an_unleased_address_fails_fast(make_lab, make_cluster):
    lab, _ = _cluster(make_lab, make_cluster)
    client = lab.nodes[0].call(socket.socket)
    with client:
        client.settimeout(5)
        started = time.monotonic()
        with pytest.raises(OSError) as e:
            client.connect((UNLEASED, 80))
        assert e.value.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)
        assert time.monotonic() - started < 1.0


def _connect_from_overlay_to_host(lab, cluster, timeout: float) -> bytes:
    """A 'pod' on node 1 (its overlay address, no masquerade) talks to node 2's host
    address. The request leaves node 1 directly on the underlay; node 2 routes the
    answer back through the overlay with its underlay address as inner source."""
    server = lab.nodes[1].call(socket.create_server, ("0.0.0.0", 7070))
    server.settimeout(timeout)

    def serve() -> None:
        try:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"hello from " + conn.getsockname()[0].encode())
        except OSError:
            pass
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client = lab.nodes[0].call(socket.socket)
    try:
        client.settimeout(timeout)
        client.bind((cluster.overlay_addr(0), 0))
        client.connect((lab.addresses[1], 7070))
        return client.recv(100)
    finally:
        client.close()
        server.close()
        t.join(timeout)


def test_routed_source_outside_the_overlay_reaches_the_pod(make_lab, make_cluster):
    lab, cluster = _cluster(make_lab, make_cluster)
    before = cluster.status(0).dataplane.counters
    assert _connect_from_overlay_to_host(lab, cluster, 5.0) == f"hello from {lab.addresses[1]}".encode()
    after = cluster.status(0).dataplane.counters
    assert after["drop_spoofed"] == before["drop_spoofed"]
    assert after["rx_packets"] > before["rx_packets"]  # the answers came through the overlay


def test_strict_source_refuses_routed_sources(make_lab, make_cluster):
    lab, cluster = _cluster(make_lab, make_cluster, ["--strict-source"])
    with pytest.raises(OSError):
        _connect_from_overlay_to_host(lab, cluster, 1.5)
    assert cluster.status(0).dataplane.counters["drop_spoofed"] >= 1
