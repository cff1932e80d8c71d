"""The route table (subnet -> peer) checked against a plain ``ipaddress`` + dict model.

The compiled engine keeps routes in an open-addressing hash map with linear probing
and backward-shift deletion, plus a second map counting subnets per public IP (used
to tell ``unknown_sender`` from ``spoofed``). The model here is the obvious one.
"""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest
from enginekit import ENGINE_CLASSES, OWN_MAC, engine_args
from hypothesis import given, settings
from hypothesis import strategies as st

CONFIGS = [
    ("10.244.0.0/16", 24),
    ("10.0.0.0/16", 26),
    ("10.0.0.0/8", 24),
    ("192.168.0.0/23", 25),
    ("172.16.0.0/12", 20),
    ("10.244.0.0/16", 30),
    ("100.64.0.0/10", 17),
]


class Model:
    """subnet (IPv4Network) -> (public ip str, port, mac), the obvious way."""

    def __init__(self, network: str, subnet_len: int):
        self.net = ipaddress.IPv4Network(network)
        self.subnet_len = subnet_len
        self.routes: dict[ipaddress.IPv4Network, tuple[str, int, bytes]] = {}

    def subnet(self, index: int) -> ipaddress.IPv4Network:
        size = self.net.num_addresses >> (self.subnet_len - self.net.prefixlen)
        return ipaddress.IPv4Network((int(self.net.network_address) + index * size,
                                      self.subnet_len))

    def count(self) -> int:
        return 1 << (self.subnet_len - self.net.prefixlen)

    def lookup(self, addr: str):
        a = ipaddress.IPv4Address(addr)
        if a not in self.net:
            return None
        return self.routes.get(ipaddress.IPv4Network((a, self.subnet_len), strict=False))

    def senders(self) -> set[str]:
        return {peer[0] for peer in self.routes.values()}


def engines_for(network: str, subnet_len: int):
    return [cls(**engine_args(network=network, subnet_len=subnet_len))
            for cls in ENGINE_CLASSES]


def datagram_from(inner_src: str) -> bytes:
    """A well-formed VXLAN datagram to our MAC whose inner IPv4 source is inner_src."""
    ip = (bytes([0x45, 0]) + struct.pack("!HHHBBH", 20, 0, 0, 64, 253, 0)
          + ipaddress.IPv4Address(inner_src).packed + bytes([10, 244, 1, 5]))
    return b"\x08\0\0\0\0\0\x01\0" + OWN_MAC + b"\x02\0\0\0\0\x09\x08\x00" + ip


def check_senders(engines, model: Model, candidates):
    """For an inner source outside the network (routed traffic): delivered from a known
    sender, unknown_sender from anyone else."""
    outside = "8.8.8.8" if ipaddress.IPv4Address("8.8.8.8") not in model.net else "1.1.1.1"
    d = datagram_from(outside)
    known = model.senders()
    for ip in candidates:
        want = ("deliver", d[22:], None) if ip in known else ("drop", "unknown_sender", None)
        for e in engines:
            assert e.decap(d, ip) == want, (type(e).__name__, ip)


def check_lookups(engines, model: Model, addresses):
    for a in addresses:
        want = model.lookup(a)
        for e in engines:
            assert e.lookup(a) == want, (type(e).__name__, a)


# --- hypothesis: random set/del sequences --------------------------------------------

PUBLIC_IPS = [f"192.0.2.{i}" for i in range(1, 9)] + ["10.244.2.1"]  # 0.0.0.0 is refused: see below
MACS = [bytes([2, 0, 0, 0, 0, i]) for i in range(4)]


@st.composite
def scenario(draw):
    network, subnet_len = draw(st.sampled_from(CONFIGS))
    model = Model(network, subnet_len)
    n = model.count()
    index = st.one_of(st.integers(0, min(n, 24) - 1), st.integers(0, n - 1))
    op = st.one_of(
        st.tuples(st.just("set"), index, st.sampled_from(PUBLIC_IPS),
                  st.integers(1, 65535), st.sampled_from(MACS)),
        st.tuples(st.just("del"), index),
    )
    ops = draw(st.lists(op, max_size=60))
    return network, subnet_len, ops


@settings(max_examples=250, deadline=None)
@given(sc=scenario(), rnd=st.randoms(use_true_random=False))
def test_random_route_sequences_match_model(sc, rnd):
    network, subnet_len, ops = sc
    model = Model(network, subnet_len)
    engines = engines_for(network, subnet_len)
    touched = set()
    for op in ops:
        subnet = model.subnet(op[1])
        touched.add(subnet)
        if op[0] == "set":
            _, _, ip, port, mac = op
            for e in engines:
                assert e.set_route(str(subnet), ip, port, mac) is None
            model.routes[subnet] = (ip, port, mac)
        else:
            existed = model.routes.pop(subnet, None) is not None
            for e in engines:
                assert e.del_route(str(subnet)) is existed
        for e in engines:
            assert e.route_count() == len(model.routes)
    # lookups: inside every subnet ever touched, at its edges, and anywhere at all
    addrs = []
    for s in touched:
        addrs += [str(s.network_address), str(s.broadcast_address),
                  str(s.network_address + rnd.randrange(s.num_addresses))]
        addrs.append(str(ipaddress.IPv4Address((int(s.broadcast_address) + 1) % 2**32)))
    net = model.net
    addrs += [str(net.network_address + rnd.randrange(net.num_addresses)) for _ in range(20)]
    addrs += [str(ipaddress.IPv4Address(rnd.randrange(2**32))) for _ in range(20)]
    check_lookups(engines, model, addrs)
    check_senders(engines, model, PUBLIC_IPS + ["198.51.100.1"])
    # every routed subnet accepts traffic from its owner only
    for s, (ip, _, _) in model.routes.items():
        d = datagram_from(str(s.network_address + 1))
        for e in engines:
            assert e.decap(d, ip) == ("deliver", d[22:], None)


# --- scale: hash growth and backward-shift deletion ------------------------------------

def test_5000_routes_then_half_removed():
    network, subnet_len = "10.0.0.0/8", 24
    model = Model(network, subnet_len)
    engines = engines_for(network, subnet_len)
    rnd = random.Random(7348)
    subnets = [model.subnet(i) for i in rnd.sample(range(model.count()), 5000)]
    ips = [str(ipaddress.IPv4Address(0xC6120000 + i)) for i in range(1700)]  # 198.18/15
    for i, s in enumerate(subnets):
        peer = (rnd.choice(ips), 8472 + i % 3, bytes([2, 0, 0, 0, i >> 8 & 0xFF, i & 0xFF]))
        model.routes[s] = peer
        for e in engines:
            e.set_route(str(s), *peer)
    for e in engines:
        assert e.route_count() == 5000

    def probe():
        addrs = [str(s.network_address + rnd.randrange(256)) for s in subnets]
        addrs += [str(ipaddress.IPv4Address(0x0A000000 + rnd.randrange(1 << 24)))
                  for _ in range(2000)]
        check_lookups(engines, model, addrs)
        check_senders(engines, model, ips + ["198.51.100.1"])

    probe()
    removed = rnd.sample(subnets, 2500)
    for s in removed:
        del model.routes[s]
        for e in engines:
            assert e.del_route(str(s)) is True
    for e in engines:
        assert e.route_count() == 2500
        for s in removed[:200]:
            assert e.del_route(str(s)) is False  # already gone
    probe()
    # re-add what was removed, with new peers, then remove everything
    for s in removed:
        peer = (rnd.choice(ips[:100]), 4789, b"\x02\xaa\xbb\xcc\xdd\xee")
        model.routes[s] = peer
        for e in engines:
            e.set_route(str(s), *peer)
    probe()
    rnd.shuffle(subnets)
    for s in subnets:
        del model.routes[s]
        for e in engines:
            assert e.del_route(str(s)) is True
    for e in engines:
        assert e.route_count() == 0
    probe()


def test_dense_consecutive_subnets_with_interleaved_deletes():
    """Every subnet of a /16 as /26 (1024 routes), deleting every third, then the rest."""
    network, subnet_len = "10.0.0.0/16", 26
    model = Model(network, subnet_len)
    engines = engines_for(network, subnet_len)
    all_subnets = [model.subnet(i) for i in range(model.count())]
    for i, s in enumerate(all_subnets):
        peer = (f"192.0.2.{i % 200 + 1}", 8472, bytes([2, 1, 2, 3, i >> 8, i & 0xFF]))
        model.routes[s] = peer
        for e in engines:
            e.set_route(str(s), *peer)
            if i % 3 == 2:
                assert e.del_route(str(all_subnets[i - 1])) is True
        if i % 3 == 2:
            del model.routes[all_subnets[i - 1]]
    addrs = [str(s.network_address + 63) for s in all_subnets]
    check_lookups(engines, model, addrs)
    check_senders(engines, model, [f"192.0.2.{i}" for i in range(1, 202)])
    for s in list(model.routes):
        del model.routes[s]
        for e in engines:
            e.del_route(str(s))
    check_lookups(engines, model, addrs)
    for e in engines:
        assert e.route_count() == 0


# --- API contract ---------------------------------------------------------------------

@pytest.mark.parametrize("subnet", [
    "10.245.1.0/24",  # outside the network
    "10.243.255.0/24",
    "10.244.1.0/25",  # wrong length
    "10.244.0.0/23",
    "10.244.0.0/16",  # the whole network
    "10.244.1.5/24",  # host bits set
    "0.0.0.0/24",
    "fc00::/64",
    "not-a-subnet",
])
def test_set_and_del_route_reject_bad_subnets(engine_cls, subnet):
    e = engine_cls(**engine_args())
    with pytest.raises(ValueError):
        e.set_route(subnet, "192.0.2.1", 8472, b"\x02" * 6)
    with pytest.raises(ValueError):
        e.del_route(subnet)
    assert e.route_count() == 0


@pytest.mark.parametrize("public_ip, port, mac", [
    ("192.0.2.1", 0, b"\x02" * 6),
    ("192.0.2.1", 65536, b"\x02" * 6),
    ("192.0.2.1", -1, b"\x02" * 6),
    ("192.0.2.1", 8472, b"\x02" * 5),
    ("192.0.2.1", 8472, b"\x02" * 7),
    ("192.0.2.1", 8472, b""),
    ("192.0.2", 8472, b"\x02" * 6),
    ("::", 8472, b"\x02" * 6),
    ("::ffff:192.0.2.1", 8472, b"\x02" * 6),  # its key would be 192.0.2.1's
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 8472, b"\x02" * 6),
    ("255.255.255.255", 8472, b"\x02" * 6),
])
def test_set_route_rejects_bad_peer(engine_cls, public_ip, port, mac):
    e = engine_cls(**engine_args())
    with pytest.raises(ValueError):
        e.set_route("10.244.2.0/24", public_ip, port, mac)
    assert e.route_count() == 0
    assert e.lookup("10.244.2.1") is None


def test_failed_set_route_keeps_the_old_route(engine_cls):
    e = engine_cls(**engine_args())
    e.set_route("10.244.2.0/24", "192.0.2.1", 8472, b"\x02" * 6)
    with pytest.raises(ValueError):
        e.set_route("10.244.2.0/24", "192.0.2.9", 0, b"\x03" * 6)
    assert e.lookup("10.244.2.1") == ("192.0.2.1", 8472, b"\x02" * 6)


@pytest.mark.parametrize("kwargs", [
    dict(vni=0), dict(vni=1 << 24), dict(vni=-1),
    dict(vtep_mac=b"\x02" * 5), dict(vtep_mac=b"\x02" * 7),
    dict(subnet_len=16), dict(subnet_len=8), dict(subnet_len=31), dict(subnet_len=32),
    dict(network="10.244.1.0/16"), dict(network="fc00::/64"),
])
def test_constructor_rejects_bad_arguments(engine_cls, kwargs):
    with pytest.raises(ValueError):
        engine_cls(**engine_args(**kwargs))


def test_lookup_edges(engine_cls):
    e = engine_cls(**engine_args())
    e.set_route("10.244.2.0/24", "192.0.2.1", 8472, b"\x02" * 6)
    peer = ("192.0.2.1", 8472, b"\x02" * 6)
    assert e.lookup("10.244.2.0") == peer
    assert e.lookup("10.244.2.255") == peer
    assert e.lookup("10.244.1.255") is None
    assert e.lookup("10.244.3.0") is None
    assert e.lookup("10.245.2.1") is None  # same low bits, other network
    assert e.lookup("11.244.2.1") is None
    with pytest.raises(ValueError):
        e.lookup("10.244.2")


def test_resetting_a_subnet_replaces_its_peer(engine_cls):
    e = engine_cls(**engine_args())
    a, b = ("192.0.2.1", 8472, b"\x02" * 6), ("192.0.2.2", 4789, b"\x04" * 6)
    e.set_route("10.244.2.0/24", *a)
    e.set_route("10.244.2.0/24", *b)
    assert e.route_count() == 1
    assert e.lookup("10.244.2.77") == b
    packet = bytes([0x45, 0, 0, 20, 0, 0, 0, 0, 64, 253, 0, 0, 10, 244, 1, 5, 10, 244, 2, 77])
    kind, frame, addr = e.encap(packet)
    assert (kind, addr) == ("send", ("192.0.2.2", 4789))
    assert frame[8:14] == b"\x04" * 6
    d = datagram_from("10.244.2.9")
    assert e.decap(d, "192.0.2.1") == ("drop", "unknown_sender", None)  # a no longer a peer
    assert e.decap(d, "192.0.2.2") == ("deliver", d[22:], None)
    # setting the same peer again is idempotent
    e.set_route("10.244.2.0/24", *b)
    assert e.route_count() == 1
    assert e.del_route("10.244.2.0/24") is True
    assert e.del_route("10.244.2.0/24") is False
    assert e.decap(d, "192.0.2.2") == ("drop", "unknown_sender", None)


def test_sender_accounting_after_removal(engine_cls):
    """A public IP that owned two subnets and lost one is still a known sender."""
    e = engine_cls(**engine_args())
    e.set_route("10.244.2.0/24", "192.0.2.1", 8472, b"\x02" * 6)
    e.set_route("10.244.3.0/24", "192.0.2.1", 8472, b"\x02" * 6)
    e.set_route("10.244.4.0/24", "192.0.2.2", 8472, b"\x04" * 6)
    from_2, from_3, from_4 = (datagram_from(f"10.244.{i}.9") for i in (2, 3, 4))

    assert e.decap(from_2, "192.0.2.1")[0] == "deliver"
    assert e.decap(from_3, "192.0.2.1")[0] == "deliver"
    assert e.del_route("10.244.2.0/24") is True
    # 192.0.2.1 still owns 10.244.3.0/24: traffic claiming 10.244.2.x is spoofing
    assert e.decap(from_2, "192.0.2.1") == ("drop", "spoofed", None)
    assert e.decap(from_4, "192.0.2.1") == ("drop", "spoofed", None)
    assert e.decap(from_3, "192.0.2.1")[0] == "deliver"
    assert e.del_route("10.244.3.0/24") is True
    # now it owns nothing
    assert e.decap(from_3, "192.0.2.1") == ("drop", "unknown_sender", None)
    assert e.decap(from_4, "192.0.2.2")[0] == "deliver"
    assert e.decap(from_3, "192.0.2.2") == ("drop", "spoofed", None)
    c = e.counters()
    assert (c["rx_packets"], c["drop_spoofed"], c["drop_unknown_sender"]) == (4, 3, 1)


def test_moving_a_subnet_between_peers_updates_sender_counts(engine_cls):
    e = engine_cls(**engine_args())
    e.set_route("10.244.2.0/24", "192.0.2.1", 8472, b"\x02" * 6)
    e.set_route("10.244.2.0/24", "192.0.2.2", 8472, b"\x02" * 6)  # moved to .2
    e.set_route("10.244.2.0/24", "192.0.2.1", 8472, b"\x02" * 6)  # and back
    d = datagram_from("8.8.8.8")  # routed traffic: known senders may carry it
    assert e.decap(d, "192.0.2.1")[0] == "deliver"
    assert e.decap(d, "192.0.2.2") == ("drop", "unknown_sender", None)
    e.del_route("10.244.2.0/24")
    assert e.decap(d, "192.0.2.1") == ("drop", "unknown_sender", None)


@pytest.mark.parametrize("address", ["255.255.255.255", "0.0.0.0"])
def test_non_unicast_public_ip_is_refused(address):
    # 255.255.255.255 would also collide with the compiled hash maps' empty-slot marker
    for cls in ENGINE_CLASSES:
        e = cls(**engine_args())
        with pytest.raises(ValueError, match="cannot be a peer"):
            e.set_route("10.244.2.0/24", address, 8472, b"\x02" * 6)
        assert e.route_count() == 0
