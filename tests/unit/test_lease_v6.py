"""Dual-stack leases: keys (flannel's MakeSubnetKey / ParseSubnetKey) and values
(pkg/lease LeaseAttrs with PublicIPv6 and BackendV6Data), byte for byte as the real
flanneld v0.28.9 wrote them in the lab (EnableIPv6, and EnableIPv4 false). The
integration test test_lease_structs_go.py checks the same against flannel's own Go
structs."""

from __future__ import annotations

import ipaddress

import pytest

from udpflannel.core.lease import (
    UNSPECIFIED,
    EventType,
    Lease,
    LeaseError,
    decode,
    diff,
    encode_value,
    parse_key,
    parse_subnet_key,
    placeholder,
    snapshot,
    subnet_key,
)

N4, N6 = ipaddress.IPv4Network, ipaddress.IPv6Network
A4, A6 = ipaddress.IPv4Address, ipaddress.IPv6Address

# What flanneld v0.28.9 wrote (EnableIPv6, IPv6Network fd10::/56), key and value
DUAL_KEY = "10.244.53.0-24&fd10:0:0:1f::-64"
DUAL_VALUE = (b'{"PublicIP":"192.168.250.12","PublicIPv6":"fd00:250::12","BackendType":"vxlan",'
              b'"BackendData":{"VNI":1,"VtepMAC":"36:f7:67:53:96:ac"},'
              b'"BackendV6Data":{"VNI":1,"VtepMAC":"fe:85:f2:4c:e9:3e"}}')
# ... and with EnableIPv4 false
V6_KEY = "0.0.0.0-0&fd10:0:0:5f::-64"
V6_VALUE = (b'{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:250::12","BackendType":"vxlan",'
            b'"BackendV6Data":{"VNI":1,"VtepMAC":"16:a8:69:e2:b6:93"}}')


def test_flanneld_dual_stack_lease_round_trips_byte_for_byte():
    lease = decode(DUAL_KEY, DUAL_VALUE)
    assert (lease.subnet, lease.ipv6_subnet) == (N4("10.244.53.0/24"), N6("fd10:0:0:1f::/64"))
    assert (lease.public_ip, lease.public_ipv6) == (A4("192.168.250.12"), A6("fd00:250::12"))
    assert (lease.vni, lease.vtep_mac, lease.vni6, lease.vtep_mac6) == (1, "36:f7:67:53:96:ac", 1,
                                                                        "fe:85:f2:4c:e9:3e")
    assert lease.key == DUAL_KEY
    assert encode_value(lease) == DUAL_VALUE
    assert lease.subnets == (N4("10.244.53.0/24"), N6("fd10:0:0:1f::/64"))


def test_flanneld_ipv6_only_lease_round_trips_byte_for_byte():
    lease = decode(V6_KEY, V6_VALUE)
    assert lease.subnet is None and lease.ipv6_subnet == N6("fd10:0:0:5f::/64")
    assert lease.public_ip == UNSPECIFIED and lease.public_ipv6 == A6("fd00:250::12")
    assert (lease.vni, lease.vtep_mac, lease.vni6, lease.vtep_mac6) == (None, None, 1, "16:a8:69:e2:b6:93")
    assert lease.key == V6_KEY and encode_value(lease) == V6_VALUE
    assert lease.subnets == (N6("fd10:0:0:5f::/64"),)


def test_ipv4_only_lease_is_unchanged():
    lease = Lease(N4("10.244.7.0/24"), A4("10.0.0.7"), "vxlan", 1, "c6:d2:32:6f:8f:44")
    assert lease.key == "10.244.7.0-24"
    assert encode_value(lease) == (b'{"PublicIP":"10.0.0.7","PublicIPv6":null,"BackendType":"vxlan",'
                                   b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}')


@pytest.mark.parametrize("key, subnets", [
    ("10.244.7.0-24", (N4("10.244.7.0/24"), None)),
    ("10.244.7.0-24&fd10:0:0:7::-64", (N4("10.244.7.0/24"), N6("fd10:0:0:7::/64"))),
    ("0.0.0.0-0&fd10:0:0:7::-64", (None, N6("fd10:0:0:7::/64"))),
    ("10.0.0.4-30&2001:db8::-126", (N4("10.0.0.4/30"), N6("2001:db8::/126"))),
    ("10.244.1.0-24&fd00:0:0:1:8000::-65", (N4("10.244.1.0/24"), N6("fd00:0:0:1:8000::/65"))),
    ("10.244.1.0-24&fd00:1:0:0:1::-80", (N4("10.244.1.0/24"), N6("fd00:1:0:0:1::/80"))),
])
def test_keys_round_trip(key, subnets):
    assert parse_key(key) == subnets
    assert subnet_key(*subnets) == key
    assert parse_subnet_key(key) == subnets[0]


@pytest.mark.parametrize("alias", [
    "10.244.1.0-24&FD10:0:0:7::-64",  # Go prints lowercase
    "10.244.1.0-24&fd10:0000:0:7::-64",  # leading zeros
    "10.244.1.0-24&fd10:0:0:7:0:0:0:0-64",  # not compressed
    "10.244.1.0-24&fd10::7:0:0:0:0-64",  # "::" on the first run, not the longest
    "10.244.1.0-24&fd10:0:0:7::1-64",  # host bits
    "10.244.1.0-24&fd10:0:0:7::-064",
    "10.244.1.0-24&fd10:0:0:7::-129",
    "10.244.1.0-24&fd10:0:0:7::",
    "10.244.1.0-24&",
    "10.244.1.0-24&fd10:0:0:7::-64&fd10:0:0:8::-64",
    "10.244.1.0-24&::ffff:a00:0-120",  # Go would print it as IPv4
    "10.244.1.0-24&::a00:0-120",
    "0.0.0.0-0",  # no subnet at all
    "0.0.0.0-0&",
    "fd10:0:0:7::-64",  # flanneld's key pattern needs the IPv4 part
    "10.244.1.0-24 &fd10:0:0:7::-64",
])
def test_non_canonical_keys_are_refused(alias):
    with pytest.raises(LeaseError, match="canonical"):
        parse_key(alias)


@pytest.mark.parametrize("value, match", [
    (b'{"PublicIP":"192.168.250.12","PublicIPv6":"not-an-address"}', "PublicIPv6"),
    (b'{"PublicIP":"192.168.250.12","PublicIPv6":"192.168.250.12"}', "IPv6"),
    (b'{"PublicIP":"192.168.250.12","PublicIPv6":7}', "PublicIPv6"),
    (b'{"PublicIP":"192.168.250.12","BackendV6Data":{"VNI":1,"VtepMAC":"zz"}}', "MAC"),
    (b'{"PublicIP":"192.168.250.12","BackendV6Data":{"VNI":16777216}}', "VNI"),
])
def test_bad_ipv6_attributes_make_no_lease(value, match):
    with pytest.raises(LeaseError, match=match):
        decode(DUAL_KEY, value)


def test_ipv6_attributes_fold_case_and_tolerate_absence():
    lease = decode(DUAL_KEY, b'{"publicip":"192.168.250.12","publicipv6":"FD00:250::12","backendtype":"vxlan",'
                             b'"backendv6data":{"vni":1,"vtepmac":"FE-85-F2-4C-E9-3E"}}')
    assert lease.public_ipv6 == A6("fd00:250::12") and lease.vtep_mac6 == "fe:85:f2:4c:e9:3e"
    bare = decode(DUAL_KEY, b'{"PublicIP":"192.168.250.12"}')  # flanneld udp's shape
    assert bare.public_ipv6 is None and bare.vtep_mac6 is None and bare.ipv6_subnet == N6("fd10:0:0:1f::/64")


def test_same_route_sees_the_ipv6_side():
    a = decode(DUAL_KEY, DUAL_VALUE)
    b = decode(DUAL_KEY, DUAL_VALUE.replace(b"fe:85:f2:4c:e9:3e", b"fe:85:f2:4c:e9:3f"))
    assert not a.same_route(b) and a.same_route(decode(DUAL_KEY, DUAL_VALUE))


def test_snapshots_and_diffs_are_by_key():
    """An IPv4-only key and a dual-stack key for one IPv4 subnet are two leases."""
    v4 = decode("10.244.53.0-24", DUAL_VALUE)
    dual = decode(DUAL_KEY, DUAL_VALUE)
    assert snapshot([v4, dual]) == {"10.244.53.0-24": v4, DUAL_KEY: dual}
    events = diff(snapshot([v4]), snapshot([dual]))
    assert [(e.type, e.lease.key) for e in events] == [(EventType.REMOVED, "10.244.53.0-24"),
                                                       (EventType.ADDED, DUAL_KEY)]


def test_placeholder_names_the_keys_subnets():
    gone = placeholder(V6_KEY)
    assert gone.key == V6_KEY and gone.subnet is None and gone.ipv6_subnet == N6("fd10:0:0:5f::/64")
    assert placeholder(DUAL_KEY).describe() == "10.244.53.0/24 + fd10:0:0:1f::/64"
