"""The routability policy: which peer leases may become routes (core.peers)."""

from __future__ import annotations

import ipaddress
import json

import pytest

from udpflannel.core import config as netconfig
from udpflannel.core.lease import Lease, decode
from udpflannel.core.peers import Framings, PeerRoute, implausible, route_for, unusable

CFG = netconfig.default_config()  # 10.244.0.0/16, /24, VNI 1
OWN = ipaddress.IPv4Address("192.168.64.1")
N = ipaddress.IPv4Network
A = ipaddress.IPv4Address


def peer(ip: str = "192.168.64.3", mac: str | None = "c6:d2:32:6f:8f:44", *, subnet: str = "10.244.7.0/24",
         backend: str = "vxlan", vni: int | None = 1) -> Lease:
    return Lease(N(subnet), A(ip), backend, vni, mac)


def test_a_flanneld_vxlan_peer_is_routable():
    value = ('{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
             '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}')
    lease = decode("10.244.7.0-24", value)
    assert implausible(lease) is None
    assert unusable(lease, CFG, OWN) is None
    assert unusable(lease, CFG, None) is None


@pytest.mark.parametrize("ip, words", [
    ("127.0.0.1", "loopback"),  # traffic counted as sent, then lost in our own stack
    ("127.255.0.9", "loopback"),
    ("224.0.0.5", "multicast"),  # sprayed onto the underlay as multicast
    ("239.1.2.3", "multicast"),
    ("0.0.0.0", "not a host address"),
    ("0.1.2.3", "not a host address"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
])
def test_public_ips_no_node_can_have_are_refused(ip, words):
    lease = peer(ip)
    assert words in implausible(lease)
    assert words in unusable(lease, CFG, OWN)


@pytest.mark.parametrize("mac, words", [
    ("00:00:00:00:00:00", "all-zero"),
    ("ff:ff:ff:ff:ff:ff", "broadcast or multicast"),
    ("01:00:5e:00:00:05", "broadcast or multicast"),  # IPv4 multicast MAC
    ("33:33:00:00:00:01", "broadcast or multicast"),  # IPv6 multicast MAC
    ("c7:d2:32:6f:8f:44", "broadcast or multicast"),  # the group bit on a random MAC
])
def test_group_and_zero_vtep_macs_are_refused(mac, words):
    lease = peer(mac=mac)
    assert words in implausible(lease)
    assert words in unusable(lease, CFG, OWN)


def test_a_vtep_mac_with_stray_spaces_is_not_a_lease_at_all():
    """Spaces never reach the policy: the value is refused when decoded."""
    from udpflannel.core.lease import LeaseError
    for mac in (" c6:d2:32:6f:8f:44", "c6:d2:32:6f:8f:44 ", "c6:d2:32:6f:8f: 4"):
        value = json.dumps({"PublicIP": "192.168.64.3", "BackendType": "vxlan",
                            "BackendData": {"VNI": 1, "VtepMAC": mac}})
        with pytest.raises(LeaseError):
            decode("10.244.7.0-24", value)


def test_our_own_public_ip_is_refused_but_is_plausible():
    lease = peer(str(OWN))
    assert implausible(lease) is None  # a real node could have it (a copy of our lease)
    assert "our own address" in unusable(lease, CFG, OWN)


def test_the_broadcast_or_network_address_of_our_underlay_is_no_peer():
    """Sent to the underlay's broadcast address a frame would reach every host on it
    (kernel VXLAN would do so); it is no node's address."""
    underlay = ipaddress.IPv4Network("192.168.64.0/24")
    for ip in ("192.168.64.255", "192.168.64.0"):
        assert "no host of our underlay network 192.168.64.0/24" in unusable(peer(ip), CFG, OWN,
                                                                             underlay_network=underlay)
        assert unusable(peer(ip), CFG, OWN) is None  # without knowing the underlay: a host like any
    assert unusable(peer("192.168.64.254"), CFG, OWN, underlay_network=underlay) is None
    point_to_point = ipaddress.IPv4Network("192.168.64.254/31")  # both addresses are hosts
    assert unusable(peer("192.168.64.255"), CFG, OWN, underlay_network=point_to_point) is None


def test_a_public_ip_inside_the_overlay_is_refused():
    assert "inside the overlay" in unusable(peer("10.244.9.1"), CFG, OWN)


def test_today_rules_from_the_dataplane():
    udp = peer(backend="", vni=None, mac=None)  # flanneld's udp backend: no BackendType
    assert "'udp' (flanneld's udp framing) is not spoken" in unusable(udp, CFG, OWN)
    assert "'host-gw' is not one udpflannel speaks" in unusable(peer(backend="host-gw", mac=None),
                                                                CFG, OWN)
    assert "without a VtepMAC" in unusable(peer(mac=None), CFG, OWN)
    assert "VNI 2 differs from ours (1)" in unusable(peer(vni=2), CFG, OWN)
    assert unusable(peer(vni=None), CFG, OWN) is None  # no VNI given: flannel's default
    assert "not a /24 inside 10.244.0.0/16" in unusable(peer(subnet="10.244.8.0/23"), CFG, OWN)
    assert "not a /24 inside 10.244.0.0/16" in unusable(peer(subnet="10.99.1.0/24"), CFG, OWN)


def test_framing_per_peer():
    both = Framings(vxlan_port=8472, udp_port=8285)
    vx = route_for(peer(), CFG, OWN, both)
    assert vx == PeerRoute(N("10.244.7.0/24"), A("192.168.64.3"), "vxlan", 8472, "c6:d2:32:6f:8f:44")
    for backend in ("", "udp"):
        got = route_for(peer(backend=backend, vni=None, mac=None), CFG, OWN, both)
        assert got == PeerRoute(N("10.244.7.0/24"), A("192.168.64.3"), "udp", 8285)
    # a udp node's checks are the same as a vxlan node's
    assert "loopback" in route_for(peer("127.0.0.1", backend="", mac=None), CFG, OWN, both)
    assert "our own address" in route_for(peer(str(OWN), backend="", mac=None), CFG, OWN, both)
    assert "not a /24" in route_for(peer(subnet="10.99.1.0/24", backend=""), CFG, OWN, both)


def test_every_reason_is_one_line():
    bad = [peer("127.0.0.1"), peer(mac="ff:ff:ff:ff:ff:ff"), peer(str(OWN)), peer(vni=3),
           peer(backend=""), peer(subnet="10.99.1.0/24")]
    for lease in bad:
        reason = unusable(lease, CFG, OWN)
        assert reason and "\n" not in reason
