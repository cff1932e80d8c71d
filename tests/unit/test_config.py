"""flannel's network config: defaults, case-insensitive keys, validation errors.

Expected values come from flannel's rules (flannel-io/flannel pkg/subnet/config.go),
worked out by hand per case.
"""

from __future__ import annotations

import ipaddress
import json

import pytest

from udpflannel.core.config import ConfigError, NetworkConfig, default_config, parse

A = ipaddress.IPv4Address
N = ipaddress.IPv4Network


def cfg(**fields) -> str:
    return json.dumps(fields)


VX = {"Type": "vxlan"}


def vx(fields: str) -> str:
    """A JSON object with the given fields and Backend vxlan (so only they can be wrong)."""
    return '{"Backend": {"Type": "vxlan"}, ' + fields + "}"


# --- defaults ------------------------------------------------------------------------

@pytest.mark.parametrize("network, subnet_len, smin, smax", [
    ("10.244.0.0/16", 24, "10.244.1.0", "10.244.255.0"),
    ("10.0.0.0/8", 24, "10.0.1.0", "10.255.255.0"),
    ("10.0.0.0/22", 24, "10.0.1.0", "10.0.3.0"),  # /22 is still "large": /24 each
    ("192.168.0.0/23", 25, "192.168.0.128", "192.168.1.128"),  # prefix + 2
    ("192.168.4.0/24", 26, "192.168.4.64", "192.168.4.192"),
    ("10.0.0.0/28", 30, "10.0.0.4", "10.0.0.12"),  # smallest accepted network
])
def test_defaults(network, subnet_len, smin, smax):
    c = parse(cfg(Network=network, Backend=VX))
    assert c.network == N(network)
    assert c.subnet_len == subnet_len
    assert c.subnet_min == A(smin)
    assert c.subnet_max == A(smax)
    assert (c.backend_type, c.vni, c.port) == ("vxlan", 1, 8472)


def test_default_config_is_flannels_kube_default():
    c = default_config()
    assert (c.network, c.subnet_len, c.subnet_min, c.subnet_max) == (
        N("10.244.0.0/16"), 24, A("10.244.1.0"), A("10.244.255.0"))
    assert (c.backend_type, c.vni, c.port) == ("vxlan", 1, 8472)


def test_explicit_values_are_kept():
    c = parse(cfg(Network="10.10.0.0/16", SubnetLen=26, SubnetMin="10.10.8.0",
                  SubnetMax="10.10.9.192", Backend={"Type": "vxlan", "VNI": 4096, "Port": 4789}))
    assert c.subnet_len == 26
    assert (c.subnet_min, c.subnet_max) == (A("10.10.8.0"), A("10.10.9.192"))
    assert (c.vni, c.port) == (4096, 4789)


def test_subnet_len_zero_means_default():
    assert parse(cfg(Network="10.244.0.0/16", SubnetLen=0, Backend=VX)).subnet_len == 24
    assert parse(cfg(Network="192.168.0.0/23", SubnetLen=0, Backend=VX)).subnet_len == 25


def test_explicit_subnet_len_moves_defaults():
    c = parse(cfg(Network="10.244.0.0/16", SubnetLen=20, Backend=VX))
    assert (c.subnet_min, c.subnet_max) == (A("10.244.16.0"), A("10.244.240.0"))


def test_backend_vni_and_port_defaults():
    c = parse(cfg(Network="10.244.0.0/16", Backend={"Type": "vxlan"}))
    assert (c.vni, c.port) == (1, 8472)
    # flannel's Port 0 means "the kernel default", i.e. 8472
    c = parse(cfg(Network="10.244.0.0/16", Backend={"Type": "vxlan", "Port": 0}))
    assert c.port == 8472
    c = parse(cfg(Network="10.244.0.0/16", Backend={"Type": "vxlan"}), default_port=4789)
    assert c.port == 4789


def test_vni_and_port_bounds_accepted():
    c = parse(cfg(Network="10.244.0.0/16", Backend={"Type": "vxlan", "VNI": 2**24 - 1,
                                                    "Port": 65535}))
    assert (c.vni, c.port) == (2**24 - 1, 65535)


def test_keys_are_case_insensitive():
    c = parse('{"network": "10.50.0.0/16", "SUBNETLEN": 25, "subnetMin": "10.50.0.128",'
              ' "SubnetMAX": "10.50.10.0", "backend": {"type": "vxlan", "vni": 7, "PORT": 4789}}')
    assert c.network == N("10.50.0.0/16")
    assert c.subnet_len == 25
    assert (c.subnet_min, c.subnet_max) == (A("10.50.0.128"), A("10.50.10.0"))
    assert (c.backend_type, c.vni, c.port) == ("vxlan", 7, 4789)


def test_bytes_input_and_enable_flags():
    c = parse(b'{"Network": "10.244.0.0/16", "EnableIPv4": true, "EnableIPv6": false,'
              b' "Backend": {"Type": "vxlan"}}')
    assert c.network == N("10.244.0.0/16")


def test_helpers():
    c = parse(cfg(Network="10.244.0.0/16", SubnetMin="10.244.10.0", SubnetMax="10.244.20.0",
                  Backend=VX))
    assert c.subnet_count == 256
    assert c.subnet_at(0) == N("10.244.0.0/24")
    assert c.subnet_at(255) == N("10.244.255.0/24")
    assert c.index_of(N("10.244.37.0/24")) == 37
    assert c.usable_range() == range(10, 21)
    assert c.contains_subnet(N("10.244.37.0/24"))
    assert not c.contains_subnet(N("10.244.37.0/25"))
    assert not c.contains_subnet(N("10.245.37.0/24"))
    assert isinstance(c, NetworkConfig)


def test_to_json_round_trips():
    c = parse(cfg(Network="172.16.0.0/12", SubnetLen=22, Backend={"Type": "vxlan", "VNI": 9}))
    assert parse(c.to_json()) == c
    doc = json.loads(c.to_json())
    assert doc["Network"] == "172.16.0.0/12"
    assert doc["Backend"] == {"Type": "vxlan", "VNI": 9, "Port": 8472}


# --- errors -----------------------------------------------------------------------

@pytest.mark.parametrize("text, match", [
    ("", "not valid JSON"),
    ("{", "not valid JSON"),
    ("{'Network': '10.244.0.0/16'}", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    ("[]", "JSON object"),
    ('"10.244.0.0/16"', "JSON object"),
    ("{}", "Network"),
    ('{"Backend": {"Type": "vxlan"}}', "Network"),
    ('{"SubnetLen": 24, "Backend": {"Type": "vxlan"}}', "Network"),
    (vx('"Network": "10.244.0.0"'), None),  # no prefix: a /32 network
    (vx('"Network": "10.244.0.0/33"'), "Network"),
    (vx('"Network": "not-a-network"'), "Network"),
    (vx('"Network": "fc00::/48"'), "Network"),
    (vx('"Network": "10.0.0.0/29"'), "/28"),
    (vx('"Network": "10.0.0.0/30"'), "/28"),
    (vx('"Network": "10.0.0.0/16", "SubnetLen": 31'), "SubnetLen"),
    (vx('"Network": "10.0.0.0/16", "SubnetLen": 32'), "SubnetLen"),
    (vx('"Network": "10.0.0.0/16", "SubnetLen": 33'), "SubnetLen"),
    (vx('"Network": "10.0.0.0/16", "SubnetLen": 16'), "SubnetLen"),
    (vx('"Network": "10.0.0.0/16", "SubnetLen": 8'), "SubnetLen"),
    (vx('"Network": "10.0.0.0/16", "SubnetLen": -1'), "SubnetLen"),
    (vx('"Network": "10.0.0.0/16", "SubnetLen": "24"'), "SubnetLen"),
    (vx('"Network": "10.0.0.0/16", "SubnetLen": 24.5'), "SubnetLen"),
    (vx('"Network": "10.244.0.0/16", "SubnetMin": "10.245.1.0"'), "SubnetMin"),
    (vx('"Network": "10.244.0.0/16", "SubnetMin": "10.243.255.0"'), "SubnetMin"),
    (vx('"Network": "10.244.0.0/16", "SubnetMin": "banana"'), "SubnetMin"),
    (vx('"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.7"'), "SubnetMin"),  # unaligned
    (vx('"Network": "10.244.0.0/16", "SubnetMax": "10.245.0.0"'), "SubnetMax"),
    (vx('"Network": "10.244.0.0/16", "SubnetMax": "10.244.9.128"'), "SubnetMax"),
    (vx('"Network": "10.244.0.0/16", "SubnetMin": "10.244.20.0", "SubnetMax": "10.244.10.0"'),
     "SubnetMax"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}', "host-gw"),
    ('{"Network": "10.244.0.0/16", "Backend": {}}', "Type"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard"}}', "wireguard"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "ipip"}}', "ipip"),
    ('{"Network": "10.244.0.0/16", "Backend": "vxlan"}', "Backend"),
    ('{"Network": "10.244.0.0/16", "Backend": ["vxlan"]}', "Backend"),
    (vx('"Network": "10.244.0.0/16", "EnableIPv6": true'), "IPv6Network"),  # dual stack: test_config_v6.py
    (vx('"Network": "10.244.0.0/16", "EnableIPv4": false'), "IPv4"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 16777216}}', "VNI"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": -1}}', "VNI"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": "1"}}', "VNI"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": true}}', "VNI"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "Port": 65536}}', "Port"),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "Port": -5}}', "Port"),
])
def test_errors(text, match):
    with pytest.raises(ConfigError, match=match) as info:
        parse(text)
    assert str(info.value)  # never an empty message
    assert "Traceback" not in str(info.value)


def test_error_messages_are_specific():
    with pytest.raises(ConfigError) as e:
        parse('{"Network": "10.0.0.0/29", "Backend": {"Type": "vxlan"}}')
    assert "10.0.0.0/29" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse('{"Network": "10.0.0.0/16", "SubnetLen": 31, "Backend": {"Type": "vxlan"}}')
    assert "31" in str(e.value) and "30" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse(vx('"Network": "10.244.0.0/16", "SubnetMin": "10.245.1.0"'))
    assert "10.245.1.0" in str(e.value) and "10.244.0.0/16" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}')
    assert "vxlan" in str(e.value)  # says what to use instead


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_vni_zero_is_an_error():
    with pytest.raises(ConfigError, match="VNI"):
        parse('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 0}}')


def test_missing_backend_means_udp_as_in_flannel():
    c = parse('{"Network": "10.244.0.0/16"}')
    assert (c.backend_type, c.port) == ("udp", 8285)


def test_udp_backend_port():
    assert parse('{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}').port == 8285
    assert parse('{"Network": "10.244.0.0/16", "Backend": {"Type": "UDP", "Port": 9000}}').port == 9000
    c = parse('{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}')
    assert parse(c.to_json()) == c


def test_vxlan_mtu_and_direct_routing():
    c = parse(vx('"Network": "10.244.0.0/16"'))
    assert (c.mtu, c.direct_routing, c.enable_nftables) == (None, False, False)
    c = parse('{"Network": "10.244.0.0/16", "EnableNFTables": true, '
              '"Backend": {"Type": "vxlan", "MTU": 1400, "DirectRouting": true}}')
    assert (c.mtu, c.direct_routing, c.enable_nftables) == (1400, True, True)
    assert parse(c.to_json()) == c
    assert parse('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "MTU": 0}}').mtu is None


@pytest.mark.parametrize("backend, words", [
    ('{"Type": "vxlan", "GBP": true}', "GBP"),
    ('{"Type": "vxlan", "Learning": true}', "Learning"),
    ('{"Type": "vxlan", "MacPrefix": "0E-2A"}', "MacPrefix"),
    ('{"Type": "vxlan", "MTU": 20}', "MTU"),
    ('{"Type": "vxlan", "MTU": "1400"}', "MTU"),
    ('{"Type": "vxlan", "DirectRouting": "yes"}', "DirectRouting"),
])
def test_refused_backend_keys(backend, words):
    with pytest.raises(ConfigError, match=words):
        parse('{"Network": "10.244.0.0/16", "Backend": ' + backend + "}")


def test_gbp_false_is_fine():
    parse('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "GBP": false, "Learning": false}}')


def test_enable_nftables_must_be_a_bool():
    with pytest.raises(ConfigError, match="EnableNFTables"):
        parse(vx('"Network": "10.244.0.0/16", "EnableNFTables": 1'))


def test_subnet_len_must_leave_four_subnets():
    with pytest.raises(ConfigError, match="SubnetLen"):
        parse('{"Network": "10.244.0.0/16", "SubnetLen": 17, "Backend": {"Type": "vxlan"}}')
