"""flanneld's node annotations, read and written (core/kubenode.py).

The literal annotation values are flanneld's (flannel v0.28.9 pkg/subnet/kube/kube.go
AcquireLease and the vxlan backend's vxlanLeaseAttrs); the integration test
test_kube_mode.py compares them with what the real flanneld writes on a node.
"""

from __future__ import annotations

import ipaddress
import json

import pytest

from udpflannel.core import kubenode
from udpflannel.core.kubenode import NodeError, annotation_names
from udpflannel.core.lease import Lease

A = ipaddress.IPv4Address
N = ipaddress.IPv4Network
P = "flannel.alpha.coreos.com/"
NAMES = annotation_names()
VXLAN_DATA = '{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}'


def vx(subnet="10.244.1.0/24", ip="192.168.64.3", mac="c6:d2:32:6f:8f:44", vni=1):
    return Lease(N(subnet), A(ip), "vxlan", vni, mac)


def udp(subnet="10.244.1.0/24", ip="192.168.64.3"):
    return Lease(N(subnet), A(ip), "", None, None)


def node(name="n1", annotations=None, pod_cidr="10.244.1.0/24", pod_cidrs=None):
    spec = {}
    if pod_cidr is not None:
        spec["podCIDR"] = pod_cidr
    if pod_cidrs is not None:
        spec["podCIDRs"] = pod_cidrs
    elif pod_cidr is not None:
        spec["podCIDRs"] = [pod_cidr]
    return {"metadata": {"name": name, "annotations": dict(annotations or {})}, "spec": spec}


def flannel(ip="192.168.64.3", data=VXLAN_DATA, btype="vxlan", **kw):
    return node(annotations={P + "backend-type": btype, P + "backend-data": data, P + "public-ip": ip,
                             P + "kube-subnet-manager": "true"}, **kw)


# -- names ----------------------------------------------------------------------------

@pytest.mark.parametrize("prefix, want", [
    ("flannel.alpha.coreos.com", "flannel.alpha.coreos.com/public-ip"),
    ("flannel.alpha.coreos.com/", "flannel.alpha.coreos.com/public-ip"),
    ("example.com/x", "example.com/x-public-ip"),
    ("example.com/x-", "example.com/x-public-ip"),
    ("a.b.c/", "a.b.c/public-ip"),
])
def test_annotation_names_follow_new_annotations(prefix, want):
    assert annotation_names(prefix).public_ip == want


@pytest.mark.parametrize("prefix, words", [
    ("a/b/c", "at most one '/'"), ("noDots", "fqdn/"), ("example.com/A", "fqdn/"), ("example.com/a b", "fqdn/"),
])
def test_bad_annotation_prefixes_are_refused(prefix, words):
    with pytest.raises(NodeError, match=words):
        annotation_names(prefix)


def test_the_prefix_check_is_flanneld_s_unanchored_one():
    # regexp.MatchString finds the form anywhere: flanneld takes these, and so do we
    assert annotation_names("Example.com").public_ip == "Example.com/public-ip"
    assert annotation_names("exa mple.com").backend_type == "exa mple.com/backend-type"


def test_every_name_of_the_default_prefix():
    assert NAMES == kubenode.Annotations(
        P + "kube-subnet-manager", P + "backend-data", P + "backend-v6-data", P + "backend-type",
        P + "public-ip", P + "public-ipv6", P + "node-public-ip", P + "node-public-ipv6",
        P + "public-ip-overwrite", P + "public-ipv6-overwrite")


# -- writing ------------------------------------------------------------------------

def test_backend_data_is_flanneld_s():
    assert kubenode.backend_data(vx()) == VXLAN_DATA
    assert kubenode.backend_data(vx(mac="02:00:0A:0B:0C:0D", vni=4096)) == '{"VNI":4096,"VtepMAC":"02:00:0a:0b:0c:0d"}'
    assert kubenode.backend_data(udp()) == "null"


def test_publish_on_a_fresh_node_writes_all_four():
    got = kubenode.publish(NAMES, vx(), {"volumes.kubernetes.io/controller-managed-attach-detach": "true"})
    assert got.changes == {P + "backend-type": "vxlan", P + "backend-data": VXLAN_DATA,
                           P + "public-ip": "192.168.64.3", P + "kube-subnet-manager": "true"}
    assert got.overwritten is None
    assert kubenode.annotations_patch(got.changes) == (
        b'{"metadata":{"annotations":{"flannel.alpha.coreos.com/backend-data":"{\\"VNI\\":1,\\"VtepMAC\\":'
        b'\\"c6:d2:32:6f:8f:44\\"}","flannel.alpha.coreos.com/backend-type":"vxlan",'
        b'"flannel.alpha.coreos.com/kube-subnet-manager":"true","flannel.alpha.coreos.com/public-ip":'
        b'"192.168.64.3"}}}')


def test_publish_a_udp_node_as_flanneld_udp_does():
    got = kubenode.publish(NAMES, udp(), {})
    assert got.changes == {P + "backend-type": "", P + "backend-data": "null", P + "public-ip": "192.168.64.3",
                           P + "kube-subnet-manager": "true"}


def test_publish_nothing_when_right_and_only_what_changed():
    right = flannel()["metadata"]["annotations"]
    assert kubenode.publish(NAMES, vx(), right).changes == {}
    moved = {**right, P + "public-ip": "10.9.9.9"}
    assert kubenode.publish(NAMES, vx(), moved).changes == {P + "public-ip": "192.168.64.3"}
    gone = {k: v for k, v in right.items() if k != P + "kube-subnet-manager"}
    assert kubenode.publish(NAMES, vx(), gone).changes == {P + "kube-subnet-manager": "true"}
    new_mac = kubenode.publish(NAMES, vx(mac="02:00:00:00:00:01"), right).changes
    assert new_mac == {P + "backend-data": '{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}'}


def test_publish_honours_public_ip_overwrite():
    right = flannel()["metadata"]["annotations"]
    got = kubenode.publish(NAMES, vx(), {**right, P + "public-ip-overwrite": "203.0.113.7"})
    assert got.changes == {P + "public-ip": "203.0.113.7"} and got.overwritten == "203.0.113.7"
    settled = {**right, P + "public-ip-overwrite": "203.0.113.7", P + "public-ip": "203.0.113.7"}
    assert kubenode.publish(NAMES, vx(), settled).changes == {}  # nothing to send, ever again
    same = {**right, P + "public-ip-overwrite": "192.168.64.3"}
    assert kubenode.publish(NAMES, vx(), same).changes == {}


def dual(subnet="10.244.1.0/24", subnet6="fd00:10:244:1::/64", ip="192.168.64.3", ip6="fd00:64::3",
         mac="c6:d2:32:6f:8f:44", mac6="c6:d2:32:6f:8f:45", vni=1):
    return Lease(N(subnet), A(ip), "vxlan", vni, mac, ipv6_subnet=ipaddress.IPv6Network(subnet6),
                 public_ipv6=ipaddress.IPv6Address(ip6), vni6=vni, vtep_mac6=mac6)


def v6only(subnet6="fd00:10:244:1::/64", ip6="fd00:64::3", mac6="c6:d2:32:6f:8f:45", vni=1):
    return Lease(None, A("0.0.0.0"), "vxlan", None, None, ipv6_subnet=ipaddress.IPv6Network(subnet6),
                 public_ipv6=ipaddress.IPv6Address(ip6), vni6=vni, vtep_mac6=mac6)


def test_publish_dual_stack_writes_flanneld_s_v6_pair():
    got = kubenode.publish(NAMES, dual(), {})
    # byte for byte what flanneld v0.28.9 (vxlan, EnableIPv6) writes on its node
    assert got.changes == {
        P + "backend-type": "vxlan",
        P + "backend-data": '{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}',
        P + "public-ip": "192.168.64.3",
        P + "backend-v6-data": '{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:45"}',
        P + "public-ipv6": "fd00:64::3",
        P + "kube-subnet-manager": "true",
    }
    assert kubenode.publish(NAMES, dual(), got.changes).changes == {}
    # the IPv6 side alone changed: the IPv6 annotations are sent again
    moved = kubenode.publish(NAMES, dual(ip6="fd00:64::9"), got.changes).changes
    assert moved == {P + "public-ipv6": "fd00:64::9"}
    # an IPv4-only node's annotations are stale for a dual-stack lease
    assert kubenode.publish(NAMES, dual(), kubenode.publish(NAMES, vx(), {}).changes).changes == {
        P + "backend-v6-data": '{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:45"}', P + "public-ipv6": "fd00:64::3"}


def test_publish_honours_public_ipv6_overwrite():
    right = kubenode.publish(NAMES, dual(), {}).changes
    got = kubenode.publish(NAMES, dual(), {**right, P + "public-ipv6-overwrite": "2001:db8::7"})
    assert got.changes == {P + "public-ipv6": "2001:db8::7"}
    assert (got.overwritten, got.overwritten6) == (None, "2001:db8::7")
    settled = {**right, P + "public-ipv6-overwrite": "2001:db8::7", P + "public-ipv6": "2001:db8::7"}
    assert kubenode.publish(NAMES, dual(), settled).changes == {}


def test_publish_ipv6_only_writes_no_ipv4_side():
    got = kubenode.publish(NAMES, v6only(), {})
    # flanneld: BackendData null, so neither backend-data nor public-ip (0.0.0.0) is written
    assert got.changes == {P + "backend-type": "vxlan",
                           P + "backend-v6-data": '{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:45"}',
                           P + "public-ipv6": "fd00:64::3", P + "kube-subnet-manager": "true"}
    assert kubenode.publish(NAMES, v6only(), got.changes).changes == {}  # stale to flanneld, nothing differs


def test_network_available_patch_is_complete_lease_s():
    assert kubenode.network_available_patch("2026-01-02T03:04:05Z") == (
        b'{"status":{"conditions":[{"type":"NetworkUnavailable","status":"False",'
        b'"lastHeartbeatTime":"2026-01-02T03:04:05Z","lastTransitionTime":"2026-01-02T03:04:05Z",'
        b'"reason":"FlannelIsUp","message":"Flannel is running on this node"}]}}')


# -- reading ------------------------------------------------------------------------

def test_node_lease_reads_what_publish_writes():
    for lease in (vx(), udp(), vx(mac="02:00:0a:0b:0c:0d", vni=7)):
        n = node(annotations=kubenode.publish(NAMES, lease, {}).changes, pod_cidr=str(lease.subnet))
        assert kubenode.node_lease(NAMES, n) == lease
        assert kubenode.is_flannel_node(NAMES, n)


def test_node_lease_reads_dual_stack_and_ipv6_only_as_published():
    n = node(annotations=kubenode.publish(NAMES, dual(), {}).changes,
             pod_cidr="10.244.1.0/24", pod_cidrs=["10.244.1.0/24", "fd00:10:244:1::/64"])
    assert kubenode.node_lease(NAMES, n, ipv6=True) == dual()
    assert kubenode.node_lease(NAMES, n) == vx()  # an IPv4-only network reads the IPv4 side alone
    n6 = node(annotations=kubenode.publish(NAMES, v6only(), {}).changes,
              pod_cidr="fd00:10:244:1::/64", pod_cidrs=["fd00:10:244:1::/64"])
    assert kubenode.node_lease(NAMES, n6, ipv4=False, ipv6=True) == v6only()
    # a dual-stack network, a node with no IPv6 side yet: an IPv4-only lease (as etcd's)
    assert kubenode.node_lease(NAMES, flannel(pod_cidrs=["10.244.1.0/24", "fd00:10:244:1::/64"]), ipv6=True) == vx()


def test_pod_cidrs_pairs():
    v6 = ipaddress.IPv6Network
    both = (N("10.244.1.0/24"), v6("fd00:1::/64"))
    assert kubenode.pod_cidrs(node(pod_cidrs=["10.244.1.0/24", "fd00:1::/64"])) == both
    assert kubenode.pod_cidrs(node(pod_cidrs=["fd00:1::5/64", "10.244.1.0/24"])) == both  # masked, as Go
    assert kubenode.pod_cidrs(node(pod_cidr="fd00:1::/64", pod_cidrs=[])) == (None, v6("fd00:1::/64"))
    assert kubenode.pod_cidrs(node(pod_cidr=None)) == (None, None)
    with pytest.raises(NodeError, match="3 entries"):
        kubenode.pod_cidrs(node(pod_cidrs=["10.244.1.0/24", "fd00::/64", "fd01::/64"]))


@pytest.mark.parametrize("ann, cidrs, words", [
    ({P + "public-ipv6": "10.0.0.1"}, ["10.244.1.0/24", "fd00:1::/64"], "public-ipv6 '10.0.0.1' is not an IPv6"),
    ({P + "public-ipv6": ""}, ["10.244.1.0/24", "fd00:1::/64"], "is not an IPv6 address"),
    ({P + "public-ipv6": "fd00:64::3"}, ["10.244.1.0/24"], "no IPv6 pod CIDR"),
    ({P + "public-ipv6": "fd00:64::3", P + "backend-v6-data": "{"}, ["10.244.1.0/24", "fd00:1::/64"],
     "backend-v6-data '{' is not JSON"),
    ({P + "public-ipv6": "fd00:64::3", P + "backend-v6-data": '{"VNI":1,"VtepMAC":"x"}'},
     ["10.244.1.0/24", "fd00:1::/64"], "backend-v6-data: .*MAC"),
])
def test_unreadable_v6_sides_say_why(ann, cidrs, words):
    n = flannel(pod_cidrs=cidrs)
    n["metadata"]["annotations"].update(ann)
    with pytest.raises(NodeError, match=words):
        kubenode.node_lease(NAMES, n, ipv6=True)
    kubenode.node_lease(NAMES, n)  # an IPv4-only network does not read them


def test_ipv6_only_node_needs_public_ipv6():
    n = node(annotations={P + "backend-type": "vxlan", P + "kube-subnet-manager": "true"},
             pod_cidr="fd00:1::/64", pod_cidrs=["fd00:1::/64"])
    with pytest.raises(NodeError, match="public-ipv6 '' is not an IPv6"):
        kubenode.node_lease(NAMES, n, ipv4=False, ipv6=True)


def test_node_lease_picks_the_ipv4_pod_cidr():
    n = flannel(pod_cidr="fd00:1::/64", pod_cidrs=["fd00:1::/64", "10.244.9.0/24"])
    assert kubenode.node_lease(NAMES, n).subnet == N("10.244.9.0/24")
    assert kubenode.pod_cidr(node(pod_cidr="10.244.3.7/24", pod_cidrs=[])) == N("10.244.3.0/24")  # masked, as Go
    assert kubenode.pod_cidr(node(pod_cidr=None)) is None


@pytest.mark.parametrize("n, words", [
    (flannel(ip=""), "public-ip '' is not an IPv4 address"),
    (flannel(ip="fd00::1"), "not an IPv4 address"),
    (flannel(ip="010.1.2.3"), "not an IPv4 address"),
    (flannel(pod_cidr=None), "no pod CIDR"),
    (flannel(pod_cidr="fd00::/64"), "no IPv4 pod CIDR"),
    (flannel(pod_cidr="x"), "is not a CIDR"),
    (flannel(pod_cidrs=["10.244.1.0/24", "fd00::/64", "10.244.2.0/24"]), "3 entries"),
    (flannel(data="{"), "is not JSON"),
    (flannel(data="[1]"), "is not an object"),
    (flannel(data='{"VNI":1.0,"VtepMAC":"c6:d2:32:6f:8f:44"}'), "VNI 1.0 is not a 24-bit integer"),
    (flannel(data='{"VNI":true,"VtepMAC":"c6:d2:32:6f:8f:44"}'), "VNI True"),
    (flannel(data='{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f"}'), "not a MAC address"),
    (flannel(data="[" * 100000), "is not JSON"),
])
def test_unreadable_nodes_say_why(n, words):
    with pytest.raises(NodeError, match=words.replace("(", r"\(").replace(".", r"\.")):
        kubenode.node_lease(NAMES, n)


def test_node_lease_leaves_routability_to_core_peers():
    # readable but not routable: core.peers refuses these with its own reasons
    assert kubenode.node_lease(NAMES, flannel(data="null")).vtep_mac is None
    assert kubenode.node_lease(NAMES, flannel(btype="host-gw", data="{}")).backend_type == "host-gw"
    lower = kubenode.node_lease(NAMES, flannel(data='{"vni":2,"vtepmac":"C6-D2-32-6F-8F-44"}'))
    assert (lower.vni, lower.vtep_mac) == (2, "c6:d2:32:6f:8f:44")


def test_flannel_nodes_are_those_marked_true():
    assert not kubenode.is_flannel_node(NAMES, node())
    assert not kubenode.is_flannel_node(NAMES, node(annotations={P + "kube-subnet-manager": "True"}))
    assert not kubenode.is_flannel_node(NAMES, {"metadata": None})


def test_stored_vtep_mac_and_public_ip():
    assert kubenode.stored_vtep_mac(NAMES, flannel()) == "c6:d2:32:6f:8f:44"
    for data in ("null", "{", '{"VtepMAC":"ff:ff:ff:ff:ff:ff"}', '{"VtepMAC":"00:00:00:00:00:00"}'):
        assert kubenode.stored_vtep_mac(NAMES, flannel(data=data)) is None, data
    assert kubenode.stored_vtep_mac(NAMES, node()) is None
    assert kubenode.stored_public_ip(NAMES, node()) is None
    assert kubenode.stored_public_ip(NAMES, node(annotations={P + "node-public-ip": "10.1.1.1"})) == A("10.1.1.1")


def test_stored_v6_mac_and_public_ipv6():
    n = node(annotations=kubenode.publish(NAMES, dual(), {}).changes)
    assert kubenode.stored_vtep_mac(NAMES, n, 6) == "c6:d2:32:6f:8f:45"
    assert kubenode.stored_vtep_mac(NAMES, n) == "c6:d2:32:6f:8f:44"
    assert kubenode.stored_vtep_mac(NAMES, flannel(), 6) is None
    assert kubenode.stored_public_ipv6(NAMES, node()) is None
    assert kubenode.stored_public_ipv6(NAMES, node(annotations={P + "node-public-ipv6": "fd00::9"})) == \
        ipaddress.IPv6Address("fd00::9")
    with pytest.raises(NodeError, match="node-public-ipv6"):
        kubenode.stored_public_ipv6(NAMES, node(annotations={P + "node-public-ipv6": "10.1.1.1"}))
    with pytest.raises(NodeError, match="node-public-ip 'x'"):
        kubenode.stored_public_ip(NAMES, node(annotations={P + "node-public-ip": "x"}))


def test_contains_is_contains_cidr():
    net = N("10.244.0.0/16")
    assert kubenode.contains(net, N("10.244.7.0/24")) and kubenode.contains(net, net)
    assert not kubenode.contains(net, N("10.0.0.0/8")) and not kubenode.contains(net, N("10.245.0.0/24"))


def test_annotation_values_round_trip_through_json():
    # what the API server stores and hands back is a string; nothing is re-encoded
    data = kubenode.publish(NAMES, vx(), {}).changes[P + "backend-data"]
    assert json.loads(data) == {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}
