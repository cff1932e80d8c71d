"""Shared fixtures for the unit tests (no root, no sockets, no TUN).

Every data-path test runs against both engines: the compiled ``Engine``
(csrc/udpflannel/_engine.pyx) and its pure-Python twin ``PyEngine``
(udpflannel/core/frame.py). ``make_engines`` builds one of each with identical
arguments so a test can feed both the same input and compare outcomes.
"""

from __future__ import annotations

import socket

import pytest
from enginekit import (  # noqa: F401  (re-exported for tests)
    DEFAULT_ARGS,
    ENGINE_CLASSES,
    ENGINE_IDS,
    NETWORK,
    OWN_MAC,
    PEER2_IP,
    PEER2_MAC,
    PEER2_SUBNET,
    PEER_IP,
    PEER_MAC,
    PEER_PORT,
    PEER_SUBNET,
    SUBNET_LEN,
    TUN_ADDR,
    VNI,
    add_default_peers,
    engine_args,
    make_engines,
)


@pytest.fixture(params=ENGINE_CLASSES, ids=ENGINE_IDS)
def engine_cls(request):
    """Each engine class in turn: the compiled Engine, then the Python twin."""
    return request.param


@pytest.fixture
def engine(engine_cls):
    """An engine of ``engine_cls`` with the default cluster's two peers routed."""
    e = engine_cls(**engine_args())
    add_default_peers(e)
    return e


@pytest.fixture
def engines():
    """(compiled, twin) with the default cluster's two peers routed."""
    return make_engines(with_peers=True)


@pytest.fixture
def wires():
    """(udp, tun) factories for the engines' real I/O without root: ``udp(opts, family=)``
    a loopback UDP socket of the family (IPv6: IPV6_V6ONLY) with socket options set,
    ``tun()`` a SOCK_SEQPACKET pair standing in for the TUN (it keeps packet
    boundaries): (the application's end, the engine's non-blocking end). All closed
    after the test."""
    socks: list[socket.socket] = []

    def udp(opts: dict | None = None, family: int = socket.AF_INET) -> socket.socket:
        s = socket.socket(family, socket.SOCK_DGRAM)
        socks.append(s)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        for (level, name), value in (opts or {}).items():
            s.setsockopt(level, name, value)
        return s

    def tun() -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        b.setblocking(False)
        socks.extend((a, b))
        return a, b
    try:
        yield udp, tun
    finally:
        for s in socks:
            s.close()
