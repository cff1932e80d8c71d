"""The CNI plugin with a dual-stack or IPv6-only subnet.env: the delegate gets one
range set per family and a route to each cluster network, as flannel's plugin
renders them (containernetworking/plugins v0.9.1 plugins/meta/flannel: getDelegateIPAM,
and its tests' expected ranges and routes)."""

from __future__ import annotations

import pytest

from udpflannel.cni import delegate as cni
from udpflannel.cni.delegate import CniError

DUAL = """FLANNEL_NETWORK=10.1.0.0/16
FLANNEL_SUBNET=10.1.17.1/24
FLANNEL_IPV6_NETWORK=fc00::/48
FLANNEL_IPV6_SUBNET=fc00::1/64
FLANNEL_MTU=1472
FLANNEL_IPMASQ=true
"""
V6ONLY = "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"


def render(text: str, **extra):
    conf = cni.load_netconf({"cniVersion": "1.0.0", "name": "cni-flannel", "type": "udpflannel-cni", **extra})
    return cni.render_delegate(conf, cni.load_subnet_env(text, "subnet.env"))


def test_dual_stack_gets_both_ranges_and_both_routes():
    ipam = render(DUAL)["ipam"]
    assert ipam == {"type": "host-local",
                    "ranges": [[{"subnet": "10.1.17.0/24"}], [{"subnet": "fc00::/64"}]],
                    "routes": [{"dst": "10.1.0.0/16"}, {"dst": "fc00::/48"}]}


def test_ipv6_only_gets_the_ipv6_range_and_route():
    delegate = render(V6ONLY)
    assert delegate["ipam"]["ranges"] == [[{"subnet": "fc00::/64"}]]
    assert delegate["ipam"]["routes"] == [{"dst": "fc00::/48"}]
    assert (delegate["type"], delegate["mtu"], delegate["ipMasq"], delegate["isGateway"]) == ("bridge", 1472,
                                                                                               False, True)


def test_the_netconf_s_routes_come_first():
    ipam = render(DUAL, ipam={"routes": [{"dst": "192.168.0.0/16"}, {"dst": "fd99::/64"}]})["ipam"]
    assert ipam["routes"] == [{"dst": "192.168.0.0/16"}, {"dst": "fd99::/64"}, {"dst": "10.1.0.0/16"},
                              {"dst": "fc00::/48"}]


@pytest.mark.parametrize("text, missing", [
    ("FLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n",
     "FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET"),
    ("FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\n", "FLANNEL_MTU, FLANNEL_IPMASQ"),
])
def test_what_is_missing_is_named_as_flannel_names_it(text, missing):
    with pytest.raises(CniError) as e:
        cni.load_subnet_env(text, "subnet.env")
    assert e.value.code == cni.BAD_SUBNET_ENV and f"is missing {missing}" in e.value.msg


def test_half_a_family_is_refused():
    with pytest.raises(CniError) as e:
        cni.load_subnet_env(DUAL.replace("FLANNEL_IPV6_SUBNET=fc00::1/64\n", ""), "subnet.env")
    assert e.value.code == cni.BAD_SUBNET_ENV and "FLANNEL_IPV6_SUBNET" in e.value.msg
