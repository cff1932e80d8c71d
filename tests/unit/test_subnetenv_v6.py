"""subnet.env with IPv6, line for line as flanneld v0.28.9 wrote it in the lab
(pkg/subnet WriteSubnetFile), and read back; the state dir's IPv6 subnet and MAC."""

from __future__ import annotations

import ipaddress
import json

import pytest

from udpflannel.core import config as netconfig
from udpflannel.core import subnetenv
from udpflannel.core.lease import Lease
from udpflannel.host import localstate

N4, N6 = ipaddress.IPv4Network, ipaddress.IPv6Network
DUAL_CFG = netconfig.parse(json.dumps({"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd10::/56",
                                       "Backend": {"Type": "vxlan"}}))
V6_CFG = netconfig.parse(json.dumps({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd10::/56",
                                     "Backend": {"Type": "vxlan"}}))
# flanneld's files, from the lab
FLANNELD_DUAL = ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.63.1/24\n"
                 "FLANNEL_IPV6_NETWORK=fd10::/56\nFLANNEL_IPV6_SUBNET=fd10:0:0:a::1/64\n"
                 "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
FLANNELD_V6 = ("FLANNEL_IPV6_NETWORK=fd10::/56\nFLANNEL_IPV6_SUBNET=fd10:0:0:5f::1/64\n"
               "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")


def lease(v4: str | None, v6: str | None) -> Lease:
    return Lease(N4(v4) if v4 else None, ipaddress.IPv4Address(0), ipv6_subnet=N6(v6) if v6 else None)


def test_render_is_flanneld_s_file():
    assert subnetenv.render_for(DUAL_CFG, lease("10.244.63.0/24", "fd10:0:0:a::/64"), 1450, True) == FLANNELD_DUAL
    assert subnetenv.render_for(V6_CFG, lease(None, "fd10:0:0:5f::/64"), 1450, True) == FLANNELD_V6
    v4 = netconfig.default_config()
    assert subnetenv.render_for(v4, lease("10.244.7.0/24", None), 1450, False) == subnetenv.render(
        v4.network, N4("10.244.7.0/24"), 1450, False)


def test_parse_reads_both_families():
    env = subnetenv.parse(FLANNELD_DUAL)
    assert (env.network, env.subnet_network) == (N4("10.244.0.0/16"), N4("10.244.63.0/24"))
    assert (env.ipv6_network, env.ipv6_subnet_network) == (N6("fd10::/56"), N6("fd10:0:0:a::/64"))
    assert str(env.ipv6_subnet.ip) == "fd10:0:0:a::1"
    only6 = subnetenv.parse(FLANNELD_V6)
    assert only6.network is None and only6.subnet is None and only6.subnet_network is None
    assert only6.ipv6_subnet_network == N6("fd10:0:0:5f::/64") and only6.mtu == 1450 and only6.ipmasq


@pytest.mark.parametrize("text, match", [
    ("FLANNEL_IPV6_NETWORK=fd10::/56\nFLANNEL_MTU=1450\n", "FLANNEL_IPV6_SUBNET"),
    ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_IPV6_NETWORK=fd10::/56\nFLANNEL_IPV6_SUBNET=fd10::1/64\n",
     "FLANNEL_SUBNET"),
    ("FLANNEL_MTU=1450\n", "FLANNEL_NETWORK"),
    ("FLANNEL_IPV6_NETWORK=10.0.0.0/8\nFLANNEL_IPV6_SUBNET=fd10::1/64\n", "subnet.env"),
])
def test_parse_refuses_half_a_family(text, match):
    with pytest.raises(subnetenv.SubnetEnvError, match=match):
        subnetenv.parse(text)


def test_previous_ipv6_subnet(tmp_path):
    assert subnetenv.previous_ipv6_subnet(FLANNELD_DUAL) == N6("fd10:0:0:a::/64")
    assert subnetenv.previous_ipv6_subnet("FLANNEL_SUBNET=10.244.1.1/24\n") is None
    path = tmp_path / "subnet.env"
    path.write_text(FLANNELD_V6)
    assert localstate.previous_ipv6_subnet(str(path)) == N6("fd10:0:0:5f::/64")
    assert localstate.previous_subnet(str(path)) is None


def test_state_dir_keeps_both_subnets_and_the_ipv6_mac_apart(tmp_path):
    d = str(tmp_path / "state")
    localstate.record_lease(d, "flannel0", lease("10.244.63.0/24", "fd10:0:0:a::/64"))
    assert localstate.recorded_subnet(d, "flannel0") == N4("10.244.63.0/24")
    assert localstate.recorded_subnet(d, "flannel0", 6) == N6("fd10:0:0:a::/64")
    localstate.write_mac(d, "flannel0", "02:00:00:00:00:04")
    localstate.write_mac(d, "flannel0", "06:00:00:00:00:06", 6)
    assert localstate.load_mac(d, "flannel0") == "02:00:00:00:00:04"
    assert localstate.load_mac(d, "flannel0", 6) == "06:00:00:00:00:06"
