"""The routing policy for IPv6 peers (core.peers): the same checks as for IPv4 in
their IPv6 forms, one route per family, and which key routes a subnet two keys name."""

from __future__ import annotations

import ipaddress
import itertools
import json

import pytest

from udpflannel.core import config as netconfig
from udpflannel.core.lease import EventType, Lease, LeaseEvent, decode
from udpflannel.core.peers import Framings, PeerRoute, RouteBook, implausible, route_for, unusable

N4, N6 = ipaddress.IPv4Network, ipaddress.IPv6Network
A4, A6 = ipaddress.IPv4Address, ipaddress.IPv6Address

DUAL = netconfig.parse(json.dumps({"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd10::/56",
                                   "Backend": {"Type": "vxlan"}}))
V6ONLY = netconfig.parse(json.dumps({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd10::/56",
                                     "Backend": {"Type": "vxlan"}}))
V4ONLY = netconfig.default_config()
OWN4, OWN6 = A4("192.168.64.1"), A6("fd00:64::1")
MAC4, MAC6 = "c6:d2:32:6f:8f:44", "ce:d2:32:6f:8f:66"


def peer(n: int = 7, *, ip6: str | None = "fd00:64::3", mac6: str | None = MAC6, v4: bool = True,
         backend: str = "vxlan", vni6: int | None = 1, sub6: str | None = None) -> Lease:
    return Lease(N4(f"10.244.{n}.0/24") if v4 else None, A4("192.168.64.3") if v4 else A4(0), backend,
                 1 if v4 else None, MAC4 if v4 else None,
                 ipv6_subnet=N6(sub6 or f"fd10:0:0:{n:x}::/64"), public_ipv6=A6(ip6) if ip6 else None,
                 vni6=vni6, vtep_mac6=mac6)


def v6route(lease: Lease, cfg=DUAL):
    return route_for(lease, cfg, OWN4, Framings(8472), version=6, own_public_ipv6=OWN6)


def test_a_flanneld_dual_stack_peer_gets_both_routes():
    value = ('{"PublicIP":"192.168.64.3","PublicIPv6":"fd00:64::3","BackendType":"vxlan",'
             f'"BackendData":{{"VNI":1,"VtepMAC":"{MAC4}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{MAC6}"}}}}')
    lease = decode("10.244.7.0-24&fd10:0:0:7::-64", value)
    assert implausible(lease) is None
    assert route_for(lease, DUAL, OWN4, Framings(8472)) == PeerRoute(
        N4("10.244.7.0/24"), A4("192.168.64.3"), "vxlan", 8472, MAC4)
    assert v6route(lease) == PeerRoute(N6("fd10:0:0:7::/64"), A6("fd00:64::3"), "vxlan", 8472, MAC6)
    assert v6route(lease).version == 6


def test_an_ipv6_only_lease_is_plausible_and_routed_over_ipv6():
    lease = peer(v4=False)
    assert lease.public_ip == A4(0) and implausible(lease) is None
    assert isinstance(v6route(lease, V6ONLY), PeerRoute)
    assert "no IPv4 subnet" in route_for(lease, DUAL, OWN4, Framings(8472))


@pytest.mark.parametrize("ip, words", [
    ("::", "not a host address"),
    ("::1", "loopback"),
    ("ff02::1", "multicast"),
    ("ff05::2", "multicast"),
    ("::ffff:192.168.64.3", "IPv4-mapped"),
    ("::2", "reserved"),  # ::/8
])
def test_public_ipv6_no_node_can_have_is_refused(ip, words):
    lease = peer(ip6=ip)
    assert words in implausible(lease)
    assert words in v6route(lease)
    assert words in route_for(lease, DUAL, OWN4, Framings(8472))  # the node is refused as a whole


@pytest.mark.parametrize("mac, words", [("00:00:00:00:00:00", "all-zero"), ("33:33:00:00:00:01", "multicast")])
def test_group_and_zero_v6_vtep_macs_are_refused(mac, words):
    assert words in implausible(peer(mac6=mac))


@pytest.mark.parametrize("lease, words", [
    (peer(ip6=str(OWN6)), "our own address"),
    (peer(ip6="fd10:0:0:9::1"), "inside the overlay network fd10::/56"),
    (peer(sub6="fd10:0:0:7::/65"), "not a /64 inside fd10::/56"),
    (peer(sub6="fd11:0:0:7::/64"), "not a /64 inside fd10::/56"),
    (peer(mac6=None), "IPv6 VtepMAC"),
    (peer(vni6=2), "IPv6 VNI 2"),
    (peer(ip6=None), "no PublicIPv6"),
    (peer(backend=""), "IPv4 only"),
])
def test_ipv6_routes_follow_the_ipv4_rules(lease, words):
    assert words in v6route(lease)
    assert words in unusable(lease, DUAL, OWN4, version=6, own_public_ipv6=OWN6)


def test_an_ipv4_only_network_has_no_ipv6_routes():
    assert "EnableIPv6 is off" in v6route(peer(), V4ONLY)
    assert isinstance(route_for(peer(), V4ONLY, OWN4, Framings(8472)), PeerRoute)  # its IPv4 side is routed


# --- RouteBook ------------------------------------------------------------------------

def added(*leases: Lease) -> list[LeaseEvent]:
    return [LeaseEvent(EventType.ADDED, x) for x in leases]


def removed(*leases: Lease) -> list[LeaseEvent]:
    return [LeaseEvent(EventType.REMOVED, x) for x in leases]


def book(cfg=DUAL) -> RouteBook:
    return RouteBook(cfg, OWN4, Framings(8472), own_public_ipv6=OWN6)


def test_a_dual_stack_lease_adds_and_removes_two_routes():
    b = book()
    changes = b.plan(added(peer()))
    assert {r.subnet for r in changes.add} == {N4("10.244.7.0/24"), N6("fd10:0:0:7::/64")}
    assert changes.remove == () and changes.ignored == ()
    changes = b.plan(removed(peer()))
    assert {r.subnet for r in changes.remove} == {N4("10.244.7.0/24"), N6("fd10:0:0:7::/64")}
    assert b.routes == {}


def test_an_ipv4_only_node_routes_the_ipv4_side_of_dual_stack_keys():
    b = book(V4ONLY)
    changes = b.plan(added(peer()))
    assert [r.subnet for r in changes.add] == [N4("10.244.7.0/24")]
    assert changes.ignored == ()


def test_a_refused_ipv6_side_keeps_the_ipv4_route():
    b = book()
    changes = b.plan(added(peer(mac6=None)))
    assert [r.subnet for r in changes.add] == [N4("10.244.7.0/24")]
    assert [why for _, why in changes.ignored] == ["IPv6: vxlan lease without an IPv6 VtepMAC (BackendV6Data)"]


def test_a_changed_ipv6_side_replaces_only_the_ipv6_route():
    b = book()
    b.plan(added(peer()))
    moved = peer(ip6="fd00:64::9", mac6="ce:d2:32:6f:8f:99")
    changes = b.plan(added(moved))
    assert [r.subnet for r in changes.add] == [N6("fd10:0:0:7::/64")]
    assert [r.vtep_mac for r in changes.remove] == [MAC6]


def test_upgrade_in_place_moves_the_ipv4_route_to_the_new_key_without_a_gap():
    """A node's v4-only key replaced by its dual-stack key (one registry transaction:
    both events in one batch): the IPv4 route stays as it was, the IPv6 one appears."""
    b = book()
    old = Lease(N4("10.244.7.0/24"), A4("192.168.64.3"), "vxlan", 1, MAC4)
    b.plan(added(old))
    changes = b.plan(removed(old) + added(peer()))
    assert [r.subnet for r in changes.add] == [N6("fd10:0:0:7::/64")]
    assert changes.remove == ()


@pytest.mark.parametrize("cfg, preferred", [(DUAL, "dual"), (V4ONLY, "v4")])
def test_of_two_keys_for_one_subnet_the_networks_own_form_wins_in_any_order(cfg, preferred):
    v4key = Lease(N4("10.244.7.0/24"), A4("192.168.64.4"), "vxlan", 1, "c6:d2:32:6f:8f:04")
    dual = peer()
    want = {"dual": dual.public_ip, "v4": v4key.public_ip}[preferred]
    for order in itertools.permutations([v4key, dual]):
        b = book(cfg)
        for lease in order:
            b.plan(added(lease))
        assert b.routes[N4("10.244.7.0/24")].public_ip == want, order
    # the winner gone, the other key routes the subnet
    b = book(cfg)
    b.plan(added(v4key, dual))
    loser = v4key if preferred == "dual" else dual
    changes = b.plan(removed(dual if preferred == "dual" else v4key))
    assert b.routes[N4("10.244.7.0/24")].public_ip == loser.public_ip
    assert [r.public_ip for r in changes.add if r.version == 4] == [loser.public_ip]


def test_the_losing_key_is_reported():
    b = book(V4ONLY)
    v4key = Lease(N4("10.244.7.0/24"), A4("192.168.64.4"), "vxlan", 1, "c6:d2:32:6f:8f:04")
    b.plan(added(v4key))
    changes = b.plan(added(peer()))
    assert changes.add == () and changes.remove == ()
    assert [why for _, why in changes.ignored] == ["10.244.7.0/24 is routed by key 10.244.7.0-24"]


def test_seeded_routes_stay_until_an_event_names_them():
    b = book()
    seeded = PeerRoute(N6("fd10:0:0:7::/64"), A6("fd00:64::3"), "vxlan", 8472, MAC6)
    b.routes[seeded.subnet] = seeded
    changes = b.plan(added(peer()))  # the same route: nothing to program for IPv6
    assert [r.subnet for r in changes.add] == [N4("10.244.7.0/24")]
    b2 = book()
    b2.routes[seeded.subnet] = seeded
    changes = b2.plan(removed(peer()))
    assert changes.remove == (seeded,)


def test_ipv6_only_network_routes_ipv6_only_keys():
    b = book(V6ONLY)
    changes = b.plan(added(peer(v4=False), Lease(N4("10.244.8.0/24"), A4("192.168.64.5"), "vxlan", 1, MAC4)))
    assert [r.subnet for r in changes.add] == [N6("fd10:0:0:7::/64")]
    assert [why for _, why in changes.ignored] == ["no IPv6 subnet"]
