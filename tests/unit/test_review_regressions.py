"""Regressions for bugs a code review found (each test failed before its fix)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest
from enginekit import make_engines
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import Raw

from udpflannel.core import config, lease
from udpflannel.core.offload import GSO_TCPV4, NEEDS_CSUM, vnet_header
from udpflannel.dataplane.sockets import SocketError, open_udp_socket
from udpflannel.observe import admin


def test_segment_size_too_big_for_a_datagram_is_dropped_not_spun_on():
    # with UDP_SEGMENT on, a window of zero segments once looped forever (GIL released)
    raw = bytes(IP(src="10.244.1.7", dst="10.244.2.9") / TCP(flags="A") / Raw(b"x" * 3000))
    compiled, twin = make_engines(with_peers=True)
    compiled.attach(-1, -1, vnet_hdr=True, gso=True)  # segment() never touches the fds
    for e in (compiled, twin):
        assert e.segment(vnet_header(NEEDS_CSUM, GSO_TCPV4, 40, 65450, 20, 16) + raw) == []
        assert e.counters()["drop_bad_offload"] == 1


def test_ecn_super_packets_are_refused_alike():
    raw = bytes(IP(src="10.244.1.7", dst="10.244.2.9") / TCP(flags="A") / Raw(b"x" * 3000))
    for e in make_engines(with_peers=True):
        assert e.segment(vnet_header(NEEDS_CSUM, GSO_TCPV4 | 0x80, 40, 1400, 20, 16) + raw) == []


@pytest.mark.parametrize("value", [
    b'{"PublicIP":"192.0.2.1","BackendType":"vxlan","BackendData":{"VNI":1e400,"VtepMAC":"02:00:00:00:00:01"}}',
    b'{"PublicIP":"192.0.2.1","BackendType":"vxlan","BackendData":{"VNI":1.5,"VtepMAC":"02:00:00:00:00:01"}}',
    b'{"PublicIP":"192.0.2.1","BackendType":"vxlan","BackendData":{"VNI":true,"VtepMAC":"02:00:00:00:00:01"}}',
    b'{"PublicIP":"192.0.2.1","BackendData":' + b"[" * 100000 + b"]" * 100000 + b"}",
    b'{"PublicIP":"192.0.2.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":7}}',
])
def test_hostile_lease_values_are_lease_errors(value):
    with pytest.raises(lease.LeaseError):
        lease.decode("10.244.1.0-24", value)


def test_deeply_nested_config_is_a_config_error():
    with pytest.raises(config.ConfigError):
        config.parse("[" * 100000 + "]" * 100000)


def test_a_second_socket_cannot_share_the_vxlan_port():
    first = open_udp_socket(ipaddress.IPv4Address("127.0.0.1"), 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(SocketError, match="in use"):
            open_udp_socket(ipaddress.IPv4Address("127.0.0.1"), port)
    finally:
        first.close()


def test_admin_socket_of_a_running_daemon_is_not_taken(tmp_path):
    path = str(tmp_path / "a.sock")

    async def go():
        server = await admin.serve(path, lambda: {"who": "first"})
        try:
            with pytest.raises(admin.AdminSocketBusy):
                await admin.serve(path, lambda: {"who": "second"})
            return await asyncio.to_thread(admin.query, path)
        finally:
            server.close()
    assert asyncio.run(go()) == {"who": "first"}


def test_stale_admin_socket_is_replaced(tmp_path):
    path = str(tmp_path / "a.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens

    async def go():
        server = await admin.serve(path, lambda: {"who": "new"})
        try:
            return await asyncio.to_thread(admin.query, path)
        finally:
            server.close()
    assert asyncio.run(go()) == {"who": "new"}


def test_failed_tun_write_undoes_rx_bytes_too():
    from udpflannel._engine import Engine
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    b.close()  # writes to `a` now fail with EPIPE
    e = Engine(vni=1, vtep_mac=b"\x02\0\0\0\0\x0b", network="10.244.0.0/16", subnet_len=24)
    e.set_route("10.244.1.0/24", "127.0.0.1", 9, b"\x02\0\0\0\0\x0a")
    e.attach(a.fileno(), udp.fileno())
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN
    frame = bytes(VXLAN(vni=1, flags=0x08) / Ether(dst="02:00:00:00:00:0b", src="02:00:00:00:00:0a")
                  / IP(src="10.244.1.5", dst="10.244.2.5") / UDP() / Raw(b"hello"))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.sendto(frame, udp.getsockname())
    import select
    select.select([udp], [], [], 2)
    e.drain_udp(4)
    c = e.counters()
    assert (c["rx_packets"], c["rx_bytes"], c["drop_tun_write_error"]) == (0, 0, 1)
    for s in (a, udp, sender):
        s.close()
