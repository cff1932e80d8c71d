"""Data-plane pieces that need no privileges: a plane's status before it forwards
(/healthz and /metrics ask for it from the first moment), and the flow hash that
picks a VXLAN frame's outer source port (compiled engine and Python twin agree,
and a flow keeps its pick whatever its payload)."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import struct

from udpflannel.core import frame
from udpflannel.core.config import parse
from udpflannel.core.underlay import Underlay
from udpflannel.core.wire import COUNTERS
from udpflannel.dataplane.base import PlaneOptions
from udpflannel.dataplane.kernel import KernelPlane
from udpflannel.dataplane.userspace import EnginePlane

UNDERLAY = Underlay("eth0", 2, ipaddress.IPv4Address("192.0.2.1"), ipaddress.IPv4Address("192.0.2.1"), 1500)


def _opts(config: str = '{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}') -> PlaneOptions:
    return PlaneOptions(config=parse(config), underlay=UNDERLAY, vtep_mac="02:00:00:00:00:01")


def test_status_before_start_has_every_counter_at_zero():
    async def both():
        return [plane(_opts(), "test").status() for plane in (KernelPlane, EnginePlane)]
    kernel, engine = asyncio.run(both())
    assert kernel.kind == "kernel" and kernel.device == "flannel.1" and not kernel.forwarding
    assert engine.kind == "engine" and engine.device == "flannel0" and not engine.forwarding
    for st in (kernel, engine):
        assert st.counters == dict.fromkeys(COUNTERS, 0) and st.mtu == 1450 and st.peers == 0


def test_backend_mtu_wins_over_the_underlays():
    # flanneld's meaning: Backend.MTU stands for the underlay's; the device gets 50 less
    assert _opts('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "MTU": 1400}}').mtu == 1350
    assert _opts('{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}').mtu == 1472


def _udp(src: str, dst: str, sport: int, dport: int, payload: bytes, frag: int = 0) -> bytes:
    total = 28 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 7, frag, 64, 17, 0,
                     ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return ip + struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def test_flow_index_compiled_and_python_agree_and_ignore_the_payload():
    from udpflannel._engine import Engine
    engine = Engine(vni=1, vtep_mac=bytes.fromhex("020000000001"), network="10.244.0.0/16", subnet_len=24)
    rng = random.Random(8)
    picks = set()
    for _ in range(500):
        src = f"10.244.{rng.randrange(256)}.{rng.randrange(256)}"
        dst = f"10.244.{rng.randrange(256)}.{rng.randrange(256)}"
        sport, dport = rng.randrange(1, 65536), rng.randrange(1, 65536)
        ways = rng.choice((1, 2, 7, 16, 64))
        a = _udp(src, dst, sport, dport, rng.randbytes(rng.randrange(0, 200)))
        b = _udp(src, dst, sport, dport, rng.randbytes(rng.randrange(0, 200)))
        pick = engine.flow_index(a, ways)
        assert pick == frame.flow_index(a, ways) == engine.flow_index(b, ways)
        assert 0 <= pick < ways
        if ways == 16:
            picks.add(pick)
    assert len(picks) > 8  # spread, not one socket for everything
    # the ports are part of the flow, except in a fragment (whose ports are not there)
    flows = {engine.flow_index(_udp("10.244.1.1", "10.244.2.1", p, 9999, b"x"), 64) for p in range(40001, 40033)}
    assert len(flows) > 1
    frags = {engine.flow_index(_udp("10.244.1.1", "10.244.2.1", p, 9999, b"x", frag=0x2000), 64)
             for p in range(40001, 40033)}
    assert len(frags) == 1
