"""Dual stack in flannel's network config: EnableIPv4/EnableIPv6, IPv6Network and
its subnet length and range, with the defaults and limits of flannel v0.28.9's
pkg/subnet/config.go (CheckNetworkConfig), worked out by hand per case."""

from __future__ import annotations

import ipaddress
import json

import pytest

from udpflannel.core.config import ConfigError, parse

A6 = ipaddress.IPv6Address
N6 = ipaddress.IPv6Network


def dual(**fields) -> str:
    doc = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd10::/56",
           "Backend": {"Type": "vxlan"}}
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not None})


@pytest.mark.parametrize("network, subnet_len, smin, smax", [
    ("fd10::/56", 64, "fd10:0:0:1::", "fd10:0:0:ff::"),
    ("fd00::/48", 64, "fd00:0:0:1::", "fd00:0:0:ffff::"),
    ("fd00::/62", 64, "fd00:0:0:1::", "fd00:0:0:3::"),  # /62 is still "large": /64 each
    ("fd00::/63", 65, "fd00:0:0:0:8000::", "fd00:0:0:1:8000::"),  # prefix + 2
    ("fd00::/124", 126, "fd00::4", "fd00::c"),  # smallest accepted network
])
def test_ipv6_defaults(network, subnet_len, smin, smax):
    c = parse(dual(IPv6Network=network))
    assert c.enable_ipv4 and c.enable_ipv6
    assert (c.ipv6_network, c.ipv6_subnet_len, c.ipv6_subnet_min, c.ipv6_subnet_max) == (
        N6(network), subnet_len, A6(smin), A6(smax))
    assert c.v6.subnet_at(c.v6.usable_range()[0]) == N6(f"{smin}/{subnet_len}")
    assert c.v6.subnet_at(c.v6.usable_range()[-1]) == N6(f"{smax}/{subnet_len}")
    assert c.network == ipaddress.IPv4Network("10.244.0.0/16") and c.subnet_len == 24  # IPv4 as before


def test_explicit_ipv6_values_are_kept_and_keys_fold_case():
    c = parse('{"network": "10.244.0.0/16", "enableipv6": true, "ipv6network": "fd10::/48", '
              '"ipv6subnetlen": 80, "ipv6subnetmin": "fd10:0:0:7::", "ipv6subnetmax": "fd10:0:0:7:ff::", '
              '"backend": {"type": "vxlan"}}')
    assert (c.ipv6_subnet_len, c.ipv6_subnet_min, c.ipv6_subnet_max) == (80, A6("fd10:0:0:7::"),
                                                                         A6("fd10:0:0:7:ff::"))
    assert len(c.v6.usable_range()) == 256


def test_ipv6_only():
    c = parse(json.dumps({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd10::/56",
                          "Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}))
    assert not c.enable_ipv4 and c.network is None and c.v4 is None  # Network is not used
    assert [p.network for p in c.pools] == [N6("fd10::/56")]
    assert parse(c.to_json()) == c


def test_ipv6_network_without_enable_ipv6_is_not_used():
    c = parse(dual(EnableIPv6=None))
    assert not c.enable_ipv6 and c.v6 is None and c.pools == (c.v4,)


def test_dual_stack_round_trips_through_json():
    c = parse(dual(IPv6SubnetLen=72))
    assert parse(c.to_json()) == c
    assert json.loads(c.to_json())["IPv6SubnetLen"] == 72


def test_ipv4_only_json_has_no_ipv6_keys():
    text = parse(dual(EnableIPv6=False)).to_json()
    assert "IPv6" not in text and "EnableIPv4" not in text


@pytest.mark.parametrize("text, match", [
    (dual(IPv6Network=None), "IPv6Network"),
    (dual(IPv6Network="fd10::/125"), "/124"),
    (dual(IPv6Network="10.0.0.0/8"), "IPv6Network"),
    (dual(IPv6Network="fd10::1/56"), "IPv6Network"),  # host bits, as Network refuses them
    (dual(IPv6Network="::ffff:10.0.0.0/104"), "IPv4-mapped"),
    (dual(IPv6SubnetLen=127), "127"),
    (dual(IPv6SubnetLen=57), "57"),  # fewer than four subnets
    (dual(IPv6SubnetLen="64"), "IPv6SubnetLen"),
    (dual(IPv6SubnetMin="fd11::"), "IPv6SubnetMin"),
    (dual(IPv6SubnetMin="fd10:0:0:1::1"), "aligned"),
    (dual(IPv6SubnetMin="10.244.1.0"), "IPv6SubnetMin"),
    (dual(IPv6SubnetMax="fd10:0:1::"), "IPv6SubnetMax"),
    (dual(IPv6SubnetMin="fd10:0:0:20::", IPv6SubnetMax="fd10:0:0:10::"), "below"),
    (dual(EnableIPv6="true"), "EnableIPv6"),
    (dual(EnableIPv4=0), "EnableIPv4"),
    (dual(EnableIPv4=False, EnableIPv6=False), "both false"),
    (dual(Backend={"Type": "udp"}), "udp backend"),
    (dual(Backend=None), "udp backend"),  # no Backend is flanneld's udp
])
def test_ipv6_errors(text, match):
    with pytest.raises(ConfigError, match=match) as info:
        parse(text)
    assert "Traceback" not in str(info.value)


def test_pool_arithmetic():
    c = parse(dual(IPv6Network="fd10::/56"))
    v6 = c.v6
    s = N6("fd10:0:0:2a::/64")
    assert v6.index_of(s) == 42 and v6.subnet_at(42) == s
    assert v6.contains_subnet(s) and v6.in_range(s)
    assert not v6.contains_subnet(N6("fd10:0:0:2a::/65"))
    assert not v6.in_range(N6("fd10::/64"))  # the zeroth subnet is never leased
    assert not v6.contains_subnet(ipaddress.IPv4Network("10.244.1.0/24"))
    assert c.contains_subnet(s) and c.contains_subnet(ipaddress.IPv4Network("10.244.1.0/24"))
    assert not c.contains_subnet(None)
