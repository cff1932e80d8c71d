"""Shared fixtures for the unit tests (no root, no sockets, no TUN).

Every data-path test runs against both engines: the compiled ``Engine``
(csrc/udpflannel/_engine.pyx) and its pure-Python twin ``PyEngine``
(udpflannel/core/frame.py). ``make_engines`` builds one of each with identical
arguments so a test can feed both the same input and compare outcomes.
"""

from __future__ import annotations

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
