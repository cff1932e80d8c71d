"""flannel's lease JSON, subnet keys and snapshot diffs.

The literal values below are copied from flannel (what flannel-io/flannel's
pkg/lease/lease.go writes), not produced by udpflannel.
"""

from __future__ import annotations

import ipaddress
import json

import pytest

from udpflannel.core.lease import (
    EventType,
    Lease,
    LeaseError,
    LeaseEvent,
    decode,
    diff,
    encode_value,
    mac_bytes,
    normalize_mac,
    parse_subnet_key,
    snapshot,
    subnet_key,
)

A = ipaddress.IPv4Address
N = ipaddress.IPv4Network

FLANNEL_VXLAN_VALUE = (b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
                       b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}')
FLANNEL_UDP_VALUE = b'{"PublicIP":"10.0.0.5"}'


def vx(subnet="10.244.1.0/24", ip="192.168.64.3", mac="c6:d2:32:6f:8f:44", vni=1, exp=0.0):
    return Lease(N(subnet), A(ip), "vxlan", vni, mac, exp)


# --- value encoding -----------------------------------------------------------------

def test_encode_value_matches_flannel_byte_for_byte():
    assert encode_value(vx()) == FLANNEL_VXLAN_VALUE


def test_encode_value_other_vni_and_mac():
    got = encode_value(vx(ip="10.1.2.3", mac="02:00:0a:0b:0c:0d", vni=4096))
    assert got == (b'{"PublicIP":"10.1.2.3","PublicIPv6":null,"BackendType":"vxlan",'
                   b'"BackendData":{"VNI":4096,"VtepMAC":"02:00:0a:0b:0c:0d"}}')


def test_encode_value_udp_lease_omits_backend_fields():
    lease = Lease(N("10.244.5.0/24"), A("10.0.0.5"), "", None, None)
    assert encode_value(lease) == b'{"PublicIP":"10.0.0.5","PublicIPv6":null}'


def test_encode_value_is_independent_of_expiration():
    assert encode_value(vx(exp=1234567890.5)) == FLANNEL_VXLAN_VALUE


# --- value decoding -----------------------------------------------------------------

def test_decode_flannel_vxlan_value():
    lease = decode("10.244.1.0-24", FLANNEL_VXLAN_VALUE, 99.0)
    assert lease.subnet == N("10.244.1.0/24")
    assert lease.public_ip == A("192.168.64.3")
    assert lease.backend_type == "vxlan"
    assert lease.vni == 1
    assert lease.vtep_mac == "c6:d2:32:6f:8f:44"
    assert lease.expiration == 99.0
    assert lease.routable_by_vxlan()
    assert lease.key == "10.244.1.0-24"


def test_decode_accepts_str_value():
    assert decode("10.244.1.0-24", FLANNEL_VXLAN_VALUE.decode()) == vx()


def test_decode_flannel_udp_value():
    lease = decode("10.244.5.0-24", FLANNEL_UDP_VALUE)
    assert lease.public_ip == A("10.0.0.5")
    assert lease.backend_type == ""
    assert lease.vni is None and lease.vtep_mac is None
    assert lease.routable_by_vxlan() is False


def test_decode_other_backends_are_not_routable():
    host_gw = b'{"PublicIP":"10.0.0.6","PublicIPv6":null,"BackendType":"host-gw"}'
    assert decode("10.244.6.0-24", host_gw).routable_by_vxlan() is False
    # a vxlan lease without a VtepMAC cannot be framed for either
    no_mac = b'{"PublicIP":"10.0.0.7","BackendType":"vxlan","BackendData":{"VNI":1}}'
    assert decode("10.244.7.0-24", no_mac).routable_by_vxlan() is False


def test_decode_normalizes_mac_and_is_case_insensitive():
    value = b'{"publicip":"192.168.64.3","backendtype":"vxlan","backenddata":{"vni":1,"vtepmac":"C6-D2-32-6F-8F-44"}}'
    assert decode("10.244.1.0-24", value) == vx()


def test_round_trip():
    lease = vx(subnet="10.244.200.0/24", ip="172.31.9.9", mac="0a:1b:2c:3d:4e:5f", vni=77)
    assert decode(lease.key, encode_value(lease)) == lease


@pytest.mark.parametrize("value", [
    b"",
    b"not json",
    b"[]",
    b'"192.168.64.3"',
    b"null",
    b"{}",  # no PublicIP
    b'{"PublicIP":null}',
    b'{"PublicIP":"10.0.0"}',
    b'{"PublicIP":"fc00::1"}',
    b'{"PublicIP":"10.0.0.5","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz:d2:32:6f:8f:44"}}',
    b'{"PublicIP":"10.0.0.5","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f"}}',
    b'{"PublicIP":"10.0.0.5","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44:55"}}',
    b'{"PublicIP":"10.0.0.5","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6d:2:32:6f:8f:44"}}',
    b'{"PublicIP":"10.0.0.5","BackendType":"vxlan","BackendData":{"VNI":"one","VtepMAC":"c6:d2:32:6f:8f:44"}}',
    b'{"PublicIP":"10.0.0.5","BackendType":"vxlan","BackendData":{"VNI":[1],"VtepMAC":"c6:d2:32:6f:8f:44"}}',
    b"\xff\xfe\x00",
])
def test_bad_values_raise_lease_error(value):
    with pytest.raises(LeaseError):
        decode("10.244.1.0-24", value)


def test_numeric_public_ip_is_rejected():
    with pytest.raises(LeaseError):
        decode("10.244.1.0-24", b'{"PublicIP":167772165}')


def test_lease_error_is_a_value_error():
    assert issubclass(LeaseError, ValueError)


# --- keys ------------------------------------------------------------------------------

@pytest.mark.parametrize("subnet, key", [
    ("10.244.7.0/24", "10.244.7.0-24"),
    ("10.244.0.0/24", "10.244.0.0-24"),
    ("192.168.0.128/25", "192.168.0.128-25"),
    ("10.0.0.4/30", "10.0.0.4-30"),
    ("172.16.16.0/20", "172.16.16.0-20"),
])
def test_subnet_key_round_trip(subnet, key):
    assert subnet_key(N(subnet)) == key
    assert parse_subnet_key(key) == N(subnet)


@pytest.mark.parametrize("alias", [
    "010.244.1.0-24",
    "10.244.01.0-24",
    "10.244.1.00-24",
    "10.244.1.0-024",
    "10.244.1.0-+24",
    "10.244.1.0-24&garbage",
    "x/10.244.1.0-24",  # nested: registries pass the name after <prefix>/subnets/
    "/coreos.com/network/subnets/10.244.1.0-24",
    " 10.244.1.0-24",
    "10.244.1.0-24 ",
    "10.244.1.0-24\n",
    "10.244.1.0 -24",
    "1\u0660.244.1.0-24",  # an Arabic-Indic zero: int() would take it
    "10.244.1.0-2\u0664",
])
def test_aliases_of_a_subnet_key_are_refused(alias):
    """Only one spelling names a subnet: an alias would let whoever writes it decide
    where that subnet is routed (the last listed key used to win)."""
    with pytest.raises(LeaseError):
        parse_subnet_key(alias)
    with pytest.raises(LeaseError):
        decode(alias, FLANNEL_VXLAN_VALUE)


def test_error_messages_quote_only_a_prefix_of_huge_keys_and_values():
    with pytest.raises(LeaseError) as key_err:
        parse_subnet_key("k" * 1_400_000)
    with pytest.raises(LeaseError) as value_err:
        decode("10.244.1.0-24", b"x" * 1_400_000)
    assert len(str(key_err.value)) < 200 and "1400000 bytes" in str(key_err.value)
    assert len(str(value_err.value)) < 300 and "1400000 bytes" in str(value_err.value)


@pytest.mark.parametrize("key", [
    "",
    "config",
    "/coreos.com/network/config",
    "10.244.7.0",
    "10.244.7.0/24",  # the CIDR form is not the key form
    "10.244.7.0-",
    "-24",
    "10.244.7.1-24",  # host bits set
    "10.244.7.0-33",
    "10.244.7.0-24x",
    "10.244.7-24",
    "10.244.7.256-24",
    "fc00::-64",
    "&fc00::-64",
])
def test_bad_keys_raise_lease_error(key):
    with pytest.raises(LeaseError):
        parse_subnet_key(key)
    with pytest.raises(LeaseError):
        decode(key, FLANNEL_VXLAN_VALUE)


# --- MAC helpers ----------------------------------------------------------------------

def test_mac_helpers():
    assert normalize_mac("C6:D2:32:6F:8F:44") == "c6:d2:32:6f:8f:44"
    assert normalize_mac("c6-d2-32-6f-8f-44") == "c6:d2:32:6f:8f:44"
    assert mac_bytes("c6:d2:32:6f:8f:44") == b"\xc6\xd2\x32\x6f\x8f\x44"
    with pytest.raises(ValueError):
        normalize_mac("c6:d2:32:6f:8f")
    with pytest.raises(ValueError):
        mac_bytes("c6:d2:32:6f:8f:4g")


@pytest.mark.parametrize("text", [
    "2:0:a:b:c:d",  # Go's net.ParseMAC wants two digits per byte
    " 6:d2:32:6f:8f:44",
    "c6:d2:32:6f:8f: 4",
    "c6:d2:32:6f:8f:44 ",
    "+6:d2:32:6f:8f:44",
    "c6:d2-32:6f:8f:44",
    "c6d2.326f.8f44",
    "c6:d2:32:6f:8f:\u0664\u0664",
])
def test_mac_must_be_written_as_go_parses_it(text):
    with pytest.raises(ValueError):
        normalize_mac(text)
    value = ('{"PublicIP":"10.0.0.5","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":%s}}'
             % json.dumps(text))
    with pytest.raises(LeaseError):
        decode("10.244.1.0-24", value)


# --- diff -------------------------------------------------------------------------------

def _events(events):
    return sorted(((e.type.value, str(e.lease.subnet), e.lease.vtep_mac) for e in events))


def test_diff_identical_snapshots_is_empty():
    leases = [vx("10.244.1.0/24"), vx("10.244.2.0/24", ip="192.168.64.4")]
    assert diff(snapshot(leases), snapshot(leases)) == []
    assert diff({}, {}) == []


def test_diff_added_removed_changed():
    a = vx("10.244.1.0/24", ip="192.168.64.3", mac="02:00:00:00:00:01")
    b = vx("10.244.2.0/24", ip="192.168.64.4", mac="02:00:00:00:00:02")
    c = vx("10.244.3.0/24", ip="192.168.64.5", mac="02:00:00:00:00:03")
    b2 = vx("10.244.2.0/24", ip="192.168.64.4", mac="02:00:00:00:00:22")  # new MAC
    d = vx("10.244.4.0/24", ip="192.168.64.6", mac="02:00:00:00:00:04")
    old = snapshot([a, b, c])
    new = snapshot([a, b2, d])
    events = diff(old, new)
    assert all(isinstance(e, LeaseEvent) for e in events)
    assert _events(events) == sorted([
        ("removed", "10.244.3.0/24", "02:00:00:00:00:03"),
        ("added", "10.244.2.0/24", "02:00:00:00:00:22"),
        ("added", "10.244.4.0/24", "02:00:00:00:00:04"),
    ])
    added = {e.lease for e in events if e.type is EventType.ADDED}
    assert added == {b2, d}


def test_diff_from_empty_and_to_empty():
    leases = [vx("10.244.1.0/24"), vx("10.244.2.0/24")]
    assert {e.type for e in diff({}, snapshot(leases))} == {EventType.ADDED}
    assert len(diff({}, snapshot(leases))) == 2
    removed = diff(snapshot(leases), {})
    assert {e.type for e in removed} == {EventType.REMOVED}
    assert {e.lease for e in removed} == set(leases)


@pytest.mark.parametrize("change", [
    dict(ip="192.168.64.99"),  # node moved
    dict(vni=2),
    dict(mac="02:00:00:00:00:99"),
])
def test_diff_route_changes_are_added(change):
    before = vx()
    after = vx(**change)
    events = diff(snapshot([before]), snapshot([after]))
    assert events == [LeaseEvent(EventType.ADDED, after)]


def test_diff_backend_type_change_is_added():
    before = vx()
    after = Lease(before.subnet, before.public_ip, "", None, None)
    assert diff(snapshot([before]), snapshot([after])) == [LeaseEvent(EventType.ADDED, after)]


def test_diff_ignores_expiration_only_changes():
    assert diff(snapshot([vx(exp=100.0)]), snapshot([vx(exp=200.0)])) == []
