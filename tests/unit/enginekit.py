"""Engine-building helpers shared by the unit tests (imported by conftest.py).

Kept out of conftest.py so test modules can import it by a unique name
(``import enginekit``) without clashing with other conftest modules.
"""

from __future__ import annotations

import socket

from udpflannel._engine import Engine
from udpflannel.dataplane.pyengine import PyEngine

ENGINE_CLASSES = (Engine, PyEngine)
ENGINE_IDS = ("compiled", "twin")

# One small, fixed cluster used by most tests:
#   us:   subnet 10.244.1.0/24, TUN address 10.244.1.0, VtepMAC 0e:11:22:33:44:55
#   peer: subnet 10.244.2.0/24 at 192.168.64.3:8472, VtepMAC c6:d2:32:6f:8f:44
#   peer2: subnet 10.244.3.0/24 at 192.168.64.4:8472, VtepMAC 6a:00:00:00:00:04
NETWORK = "10.244.0.0/16"
SUBNET_LEN = 24
VNI = 1
TUN_ADDR = "10.244.1.0"
OWN_MAC = bytes.fromhex("0e1122334455")
PEER_SUBNET = "10.244.2.0/24"
PEER_IP = "192.168.64.3"
PEER_PORT = 8472
PEER_MAC = bytes.fromhex("c6d2326f8f44")
PEER2_SUBNET = "10.244.3.0/24"
PEER2_IP = "192.168.64.4"
PEER2_MAC = bytes.fromhex("6a0000000004")

DEFAULT_ARGS = dict(vni=VNI, vtep_mac=OWN_MAC, network=NETWORK, subnet_len=SUBNET_LEN)


def engine_args(**overrides) -> dict:
    args = dict(DEFAULT_ARGS)
    args.update(overrides)
    return args


def make_engines(*, with_peers: bool = False, **overrides) -> tuple:
    """(compiled Engine, PyEngine) built with identical arguments."""
    args = engine_args(**overrides)
    engines = tuple(cls(**args) for cls in ENGINE_CLASSES)
    if with_peers:
        for e in engines:
            add_default_peers(e)
    return engines


def add_default_peers(engine) -> None:
    engine.set_route(PEER_SUBNET, PEER_IP, PEER_PORT, PEER_MAC)
    engine.set_route(PEER2_SUBNET, PEER2_IP, PEER_PORT, PEER2_MAC)


def counter_delta(before: dict, after: dict) -> dict:
    """The counters that changed between two ``counters()`` snapshots, and by how much."""
    assert before.keys() == after.keys()
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def received(sock: socket.socket, quiet: float = 0.5) -> list[tuple[bytes, tuple]]:
    """Every datagram (with its source) until ``sock`` has been quiet for ``quiet`` s."""
    sock.settimeout(quiet)
    out = []
    try:
        while True:
            out.append(sock.recvfrom(70000))
    except socket.timeout:
        return out
