"""The engine's sockets in either family (dataplane/sockets.py), on loopback, no root:
an IPv6 address makes an IPv6-only socket with the same tuning as an IPv4 one, its
SO_REUSEPORT group and its source-port pool; a clash says so in one line."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from udpflannel.core.wire import SO_RXQ_OVFL
from udpflannel.dataplane import sockets

V4, V6 = ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")


def _free_port(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.bind((str(address), 0))
        return probe.getsockname()[1]


def _path_mtu_option(sock: socket.socket) -> int:
    if sock.family == socket.AF_INET:
        return sock.getsockopt(socket.IPPROTO_IP, sockets.IP_MTU_DISCOVER)
    return sock.getsockopt(socket.IPPROTO_IPV6, sockets.IPV6_MTU_DISCOVER)


@pytest.mark.parametrize("address", [V4, V6], ids=["ipv4", "ipv6"])
def test_a_socket_takes_its_family_from_the_address_and_is_tuned_alike(address):
    sock = sockets.open_udp_socket(address, _free_port(address), "VXLAN")
    try:
        assert sock.family == (socket.AF_INET if address.version == 4 else socket.AF_INET6)
        assert ipaddress.ip_address(sock.getsockname()[0]) == address
        assert not sock.getblocking()
        assert sock.getsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL) == 1
        assert _path_mtu_option(sock) == sockets.IP_PMTUDISC_OMIT  # (5 in both families)
        if address.version == 6:  # never the IPv4 sockets' port through mapped addresses
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        sock.close()


def test_an_ipv6_group_shares_one_port_and_refuses_a_port_held_by_anyone():
    port = _free_port(V6)
    group = sockets.open_udp_group(V6, port, 3, "VXLAN")
    try:
        assert [s.getsockname()[1] for s in group] == [port] * 3
        assert {s.family for s in group} == {socket.AF_INET6}
        assert all(s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1 for s in group)
        with pytest.raises(sockets.SocketError, match=rf"^VXLAN port {port} on ::1 is already in use "):
            sockets.open_udp_group(V6, port, 2, "VXLAN")
    finally:
        for s in group:
            s.close()


def test_the_ipv4_and_ipv6_groups_may_share_a_port_number():
    port = _free_port(V4)
    both = sockets.open_udp_group(V4, port, 1) + sockets.open_udp_group(V6, port, 1)
    try:
        assert [(s.family, s.getsockname()[1]) for s in both] == [(socket.AF_INET, port), (socket.AF_INET6, port)]
    finally:
        for s in both:
            s.close()


def test_an_ipv6_source_port_pool_binds_distinct_ports_in_its_range():
    pool = sockets.open_source_port_pool(V6, 4, ports=(40000, 40999))
    try:
        ports = [s.getsockname()[1] for s in pool]
        assert len(pool) == 4 and len(set(ports)) == 4 and all(40000 <= p <= 40999 for p in ports)
        assert {s.family for s in pool} == {socket.AF_INET6}
        assert all(_path_mtu_option(s) == sockets.IPV6_PMTUDISC_OMIT for s in pool)
    finally:
        for s in pool:
            s.close()


def test_endpoints_are_written_as_each_family_writes_them():
    assert sockets.endpoint(V4, 8472) == "127.0.0.1:8472"
    assert sockets.endpoint(ipaddress.IPv6Address("fd00::5"), 8472) == "[fd00::5]:8472"


def test_an_unbindable_ipv6_address_is_one_line():
    with pytest.raises(sockets.SocketError, match=r"^cannot bind VXLAN \[2001:db8::1\]:\d+: "):
        sockets.open_udp_socket(ipaddress.IPv6Address("2001:db8::1"), _free_port(V6), "VXLAN")
