"""flanneld's Kubernetes node annotations and what a Node means as a lease (pure).

In kube mode (flanneld --kube-subnet-mgr; flannel v0.28.9 pkg/subnet/kube) there is no
registry of leases: a node's subnet is its ``spec.podCIDR`` (``spec.podCIDRs``), given
by Kubernetes, and the rest of what an etcd lease holds is published as annotations on
the node, under a prefix (``--kube-annotation-prefix``, flannel.alpha.coreos.com):

    <prefix>/backend-type         "vxlan" (flanneld's udp backend: "")
    <prefix>/backend-data         {"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"} (udp: null)
    <prefix>/public-ip            192.168.64.3
    <prefix>/kube-subnet-manager  true

and, with IPv6 (EnableIPv6: dual stack, or IPv6-only with EnableIPv4 false)

    <prefix>/backend-v6-data      {"VNI":1,"VtepMAC":"..."} (flannel-v6.<VNI>'s MAC)
    <prefix>/public-ipv6          fd00:64::3

(an IPv6-only node writes neither backend-data nor public-ip: its BackendData is
null). The node's subnets are spec.podCIDRs' IPv4 and IPv6 entries. An administrator
may set ``public-ip-overwrite`` / ``public-ipv6-overwrite`` (the address published
instead of the node's own) and ``node-public-ip`` / ``node-public-ipv6`` (used as
--public-ip / --public-ipv6). Peers are the nodes whose ``kube-subnet-manager``
annotation is "true".

The values are a wire format shared with flanneld, so this module produces them byte
for byte as flanneld's Go code does (annotations.go newAnnotations for the names,
kube.go AcquireLease for what is written and when, nodeToLease for reading a node,
CompleteLease for the NetworkUnavailable condition). Nodes come from anyone who can
write them, so reading is strict and every refusal is one line (NodeError).
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping, TypeVar

from udpflannel.core.errors import BadInput
from udpflannel.core.lease import UNSPECIFIED, Lease, _short, normalize_mac

DEFAULT_PREFIX = "flannel.alpha.coreos.com"
TRUE = "true"  # the kube-subnet-manager annotation's value on a flannel node
UDP_BACKEND_DATA = "null"  # flanneld's udp backend has no backend data: a nil RawMessage

# newAnnotations' check (a regexp.MatchString, so not anchored at the start).
_PREFIX_FORM = re.compile(r"(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$")


class NodeError(BadInput):
    """A Node (or the annotation prefix) that cannot be read as flannel's."""


@dataclass(frozen=True)
class Annotations:
    """The annotation names for one prefix (annotations.go's ``annotations``)."""
    subnet_kube_managed: str
    backend_data: str
    backend_v6_data: str
    backend_type: str
    public_ip: str
    public_ipv6: str
    node_public_ip: str
    node_public_ipv6: str
    public_ip_overwrite: str
    public_ipv6_overwrite: str

    def ours(self) -> tuple[str, ...]:
        """The annotations flanneld writes (what a change to a peer is judged by)."""
        return (self.backend_type, self.backend_data, self.public_ip, self.subnet_kube_managed,
                self.backend_v6_data, self.public_ipv6)


def annotation_names(prefix: str = DEFAULT_PREFIX) -> Annotations:
    """The names under ``prefix``, by newAnnotations' rules: at most one "/"; without
    one, "/" is appended; a prefix not ending in "/" or "-" gets "-"; then it must look
    like ``fqdn/[name-]``. NodeError otherwise."""
    slashes = prefix.count("/")
    if slashes > 1:
        raise NodeError(f"annotation prefix {_short(prefix)}: it can contain at most one '/'")
    if slashes == 0:
        prefix += "/"
    if not prefix.endswith(("/", "-")):
        prefix += "-"
    if not _PREFIX_FORM.search(prefix):
        raise NodeError(f"annotation prefix {_short(prefix)}: it must be in the form fqdn/[0-9a-z-_]*")
    return Annotations(
        subnet_kube_managed=prefix + "kube-subnet-manager",
        backend_data=prefix + "backend-data",
        backend_v6_data=prefix + "backend-v6-data",
        backend_type=prefix + "backend-type",
        public_ip=prefix + "public-ip",
        public_ipv6=prefix + "public-ipv6",
        node_public_ip=prefix + "node-public-ip",
        node_public_ipv6=prefix + "node-public-ipv6",
        public_ip_overwrite=prefix + "public-ip-overwrite",
        public_ipv6_overwrite=prefix + "public-ipv6-overwrite",
    )


# -- writing ------------------------------------------------------------------------

def backend_data(lease: Lease) -> str:
    """What flanneld marshals as the lease's BackendData: the vxlan backend's
    ``vxlanLeaseAttrs`` (VNI, then the MAC in Go's lower-case form), or ``null``."""
    if lease.backend_type == "vxlan" and lease.vtep_mac is not None:
        return json.dumps({"VNI": lease.vni or 0, "VtepMAC": normalize_mac(lease.vtep_mac)},
                          separators=(",", ":"))
    return UDP_BACKEND_DATA


def backend_v6_data(lease: Lease) -> str:
    """The lease's BackendV6Data as flanneld marshals it: flannel-v6.<VNI>'s
    ``vxlanLeaseAttrs``, or ``null`` (no IPv6 side)."""
    if lease.backend_type == "vxlan" and lease.vtep_mac6 is not None:
        return json.dumps({"VNI": lease.vni6 or 0, "VtepMAC": normalize_mac(lease.vtep_mac6)},
                          separators=(",", ":"))
    return UDP_BACKEND_DATA


@dataclass(frozen=True)
class Published:
    """What AcquireLease decides for a node's annotations: ``changes`` (name -> value,
    only what differs: the body of its two-way merge patch; empty when the node is
    already right), and ``overwritten``, the public-ip-overwrite value it publishes
    instead of our own address (None when it publishes ours); ``overwritten6`` the same
    for public-ipv6-overwrite."""
    changes: dict[str, str]
    overwritten: str | None = None
    overwritten6: str | None = None


def publish(names: Annotations, lease: Lease, current: Mapping[str, str]) -> Published:
    """The annotations flanneld's AcquireLease writes on our node, given its
    ``current`` annotations: nothing if they already say our backend type, data and
    public IP (or the public-ip-overwrite an administrator set), the same of the IPv6
    side when the lease has a PublicIPv6, and that the node is flannel's; else the
    backend type, the data and public IP (the overwrite if one is set) when the lease
    has an IPv4 side, backend-v6-data and public-ipv6 (public-ipv6-overwrite if set)
    when it has an IPv6 side, and kube-subnet-manager "true". A missing annotation
    reads as "" (Go's map lookup). An IPv6-only lease (BackendData null) is never
    "already right" for the IPv4 test, as in flanneld: its patch then holds what
    differs, often nothing."""
    def get(name: str) -> str:
        return current.get(name, "")

    bt, bd, pip = lease.backend_type, backend_data(lease), str(lease.public_ip)
    public_ipv6 = str(lease.public_ipv6) if lease.public_ipv6 is not None else None
    stale = (get(names.backend_data) != bd or get(names.backend_type) != bt or get(names.public_ip) != pip
             or get(names.subnet_kube_managed) != TRUE
             or (get(names.public_ip_overwrite) != "" and get(names.public_ip_overwrite) != pip))
    v6 = backend_v6_data(lease)
    if public_ipv6 is not None:
        stale = stale or (get(names.backend_v6_data) != v6 or get(names.backend_type) != bt
                          or get(names.public_ipv6) != public_ipv6 or get(names.subnet_kube_managed) != TRUE
                          or (get(names.public_ipv6_overwrite) != ""
                              and get(names.public_ipv6_overwrite) != public_ipv6))
    if not stale:
        return Published({})
    new = dict(current)
    overwritten = overwritten6 = None
    new[names.backend_type] = bt
    if (bt in ("vxlan", "wireguard") and bd != UDP_BACKEND_DATA) or bt != "vxlan":
        new[names.backend_data] = bd
        if get(names.public_ip_overwrite) != "":
            overwritten = get(names.public_ip_overwrite)
            new[names.public_ip] = overwritten
        else:
            new[names.public_ip] = pip
    if public_ipv6 is not None and (bt in ("vxlan", "wireguard") and v6 != UDP_BACKEND_DATA):
        new[names.backend_v6_data] = v6
        overwrite6 = get(names.public_ipv6_overwrite)
        overwritten6 = overwrite6 or None
        new[names.public_ipv6] = overwrite6 if overwrite6 != "" else public_ipv6
    new[names.subnet_kube_managed] = TRUE
    changes = {k: v for k, v in new.items() if k not in current or current[k] != v}
    return Published(changes, overwritten, overwritten6)


def annotations_patch(changes: Mapping[str, str]) -> bytes:
    """The strategic merge patch flanneld sends to nodes/status for ``changes``: what
    CreateTwoWayMergePatch makes of them (Go's encoder: keys sorted, no spaces)."""
    return json.dumps({"metadata": {"annotations": dict(changes)}}, separators=(",", ":"),
                      sort_keys=True).encode()


def network_available_patch(now: str) -> bytes:
    """CompleteLease's strategic merge patch of nodes/status: the NetworkUnavailable
    condition False, reason FlannelIsUp; ``now`` is RFC 3339 in UTC, to the second
    (metav1.Now() as Go marshals it), e.g. "2026-01-02T03:04:05Z". The fields are in
    v1.NodeCondition's order."""
    condition = {"type": "NetworkUnavailable", "status": "False", "lastHeartbeatTime": now,
                 "lastTransitionTime": now, "reason": "FlannelIsUp", "message": "Flannel is running on this node"}
    return b'{"status":{"conditions":' + json.dumps([condition], separators=(",", ":")).encode() + b"}}"


# -- reading ------------------------------------------------------------------------

def node_name(node: Mapping[str, Any]) -> str:
    meta = node.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    return name if isinstance(name, str) else ""


def node_annotations(node: Mapping[str, Any]) -> Mapping[str, str]:
    meta = node.get("metadata")
    found = meta.get("annotations") if isinstance(meta, Mapping) else None
    return found if isinstance(found, Mapping) else {}


def is_flannel_node(names: Annotations, node: Mapping[str, Any]) -> bool:
    """Whether a node is a peer: its kube-subnet-manager annotation is "true"."""
    return node_annotations(node).get(names.subnet_kube_managed) == TRUE


def pod_cidrs(node: Mapping[str, Any]) -> tuple[ipaddress.IPv4Network | None, ipaddress.IPv6Network | None]:
    """The node's pod CIDRs, (IPv4, IPv6), as flanneld reads them: spec.podCIDRs (one
    or two entries; the first of each family), else spec.podCIDR; (None, None) when it
    has none yet. Like Go's net.ParseCIDR, host bits are masked off. NodeError if
    malformed."""
    spec = node.get("spec")
    spec = spec if isinstance(spec, Mapping) else {}
    many = spec.get("podCIDRs") or []
    if not isinstance(many, list):
        raise NodeError(f"spec.podCIDRs {_short(str(many))} is not a list")
    if len(many) >= 3:
        raise NodeError(f"spec.podCIDRs has {len(many)} entries: IPv4, IPv6 or one of each")
    texts = many or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    v4: ipaddress.IPv4Network | None = None
    v6: ipaddress.IPv6Network | None = None
    for text in texts:
        net = _cidr(text)
        if isinstance(net, ipaddress.IPv4Network):
            v4 = v4 or net
        else:
            v6 = v6 or net
    return v4, v6


def pod_cidr(node: Mapping[str, Any]) -> ipaddress.IPv4Network | None:
    """The node's IPv4 pod CIDR (pod_cidrs); None when it has none yet; NodeError when
    it has only IPv6 ones."""
    v4, v6 = pod_cidrs(node)
    if v4 is None and v6 is not None:
        raise NodeError(f"no IPv4 pod CIDR in {v6}")
    return v4


def _cidr(text: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(text, str) or "/" not in text:
        raise NodeError(f"pod CIDR {_short(str(text))} is not a CIDR")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise NodeError(f"pod CIDR {_short(text)} is not a CIDR") from None


def contains(network: ipaddress.IPv4Network | ipaddress.IPv6Network,
             subnet: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """kube.go containsCIDR: ``subnet`` is inside ``network`` (and not larger)."""
    return network.prefixlen <= subnet.prefixlen and subnet.network_address in network


def node_lease(names: Annotations, node: Mapping[str, Any], *, ipv4: bool = True, ipv6: bool = False) -> Lease:
    """A peer node as a lease (nodeToLease): with ``ipv4`` (EnableIPv4) its IPv4 pod
    CIDR, the public-ip annotation and backend-data's VNI and VtepMAC; with ``ipv6``
    (EnableIPv6) its IPv6 pod CIDR, public-ipv6 and backend-v6-data's; the backend
    type. A node without a public-ipv6 annotation in a dual-stack network is read as an
    IPv4-only lease (routed over IPv4 alone, as an IPv4-only etcd lease is; flanneld
    skips such a node). Whether the lease may become a route is core.peers' decision;
    this only refuses what cannot be read (NodeError, one line)."""
    ann = node_annotations(node)
    btype = ann.get(names.backend_type, "")
    if not isinstance(btype, str):
        raise NodeError(f"annotation {names.backend_type} is not a string")
    v4_cidr, v6_cidr = pod_cidrs(node)
    if v4_cidr is None and v6_cidr is None:
        raise NodeError("no pod CIDR (spec.podCIDR) yet")
    lease = Lease(None, UNSPECIFIED, btype)
    if ipv4:
        public_ip, vni, mac = _family_side(ann, names.public_ip, names.backend_data, btype, v4_cidr, v6_cidr,
                                          ipaddress.IPv4Address)
        lease = replace(lease, subnet=v4_cidr, public_ip=public_ip, vni=vni, vtep_mac=mac)
    if ipv6 and (not ipv4 or names.public_ipv6 in ann):
        public_ipv6, vni6, mac6 = _family_side(ann, names.public_ipv6, names.backend_v6_data, btype, v6_cidr,
                                               v4_cidr, ipaddress.IPv6Address)
        lease = replace(lease, ipv6_subnet=v6_cidr, public_ipv6=public_ipv6, vni6=vni6, vtep_mac6=mac6)
    return lease


_Address = TypeVar("_Address", ipaddress.IPv4Address, ipaddress.IPv6Address)


def _family_side(ann: Mapping[str, Any], public_name: str, data_name: str, btype: str,
                 cidr: ipaddress.IPv4Network | ipaddress.IPv6Network | None,
                 other_cidr: ipaddress.IPv4Network | ipaddress.IPv6Network | None,
                 address: type[_Address]) -> tuple[_Address, int | None, str | None]:
    """One family's side of a peer's lease (``address``: that family's address class):
    (public address, VNI, VTEP MAC) from the annotations ``public_name`` and
    ``data_name`` (vxlan only), given that family's pod CIDR ``cidr``; one NodeError
    for a bad address or a missing CIDR."""
    family = "IPv4" if address is ipaddress.IPv4Address else "IPv6"
    text = ann.get(public_name, "")
    try:
        public = address(text)
    except ValueError:
        raise NodeError(f"annotation {public_name} {_short(str(text))} is not an {family} address") from None
    if cidr is None:
        raise NodeError(f"no {family} pod CIDR in {other_cidr}")
    vni, mac = _vxlan_data(data_name, ann.get(data_name, "")) if btype == "vxlan" else (None, None)
    return public, vni, mac


def _vxlan_data(name: str, raw: Any) -> tuple[int | None, str | None]:
    """(VNI, VtepMAC) from a vxlan node's backend-data (or backend-v6-data: ``name``),
    as Go's decoder reads it into vxlanLeaseAttrs (field names in any case); ``null``
    gives neither."""
    where = f"annotation {name}"
    try:
        data = json.loads(raw)
    except (TypeError, ValueError, RecursionError):
        raise NodeError(f"{where} {_short(str(raw))} is not JSON") from None
    if data is None:
        return None, None
    if not isinstance(data, dict):
        raise NodeError(f"{where} {_short(str(raw))} is not an object")
    fold = {str(k).lower(): v for k, v in data.items()}
    vni = fold.get("vni")
    if vni is not None and (isinstance(vni, bool) or not isinstance(vni, int) or not 0 <= vni < 1 << 24):
        shown = _short(vni) if isinstance(vni, str) else repr(vni)[:40]
        raise NodeError(f"{where}: VNI {shown} is not a 24-bit integer")
    mac = fold.get("vtepmac")
    if mac is not None:
        try:
            mac = normalize_mac(str(mac))
        except ValueError as e:
            raise NodeError(f"{where}: {e}") from None
    return vni, mac


def stored_vtep_mac(names: Annotations, node: Mapping[str, Any], version: int = 4) -> str | None:
    """The VTEP MAC our node's backend-data names (``version`` 6: backend-v6-data's,
    flannel-v6.<VNI>'s); flanneld's GetStoredMacAddresses: after a restart the device
    gets the MAC the node already advertises. None when there is none or it is not a
    usable unicast MAC."""
    name = names.backend_v6_data if version == 6 else names.backend_data
    try:
        _, mac = _vxlan_data(name, node_annotations(node).get(name, ""))
    except NodeError:
        return None
    if mac is None:
        return None
    first = int(mac[:2], 16)
    return None if first & 1 or mac == "00:00:00:00:00:00" else mac


def stored_public_ip(names: Annotations, node: Mapping[str, Any]) -> ipaddress.IPv4Address | None:
    """The node-public-ip annotation an administrator set (flanneld's
    GetStoredPublicIP: it stands for --public-ip), or None. NodeError if malformed."""
    text = node_annotations(node).get(names.node_public_ip, "")
    if text == "":
        return None
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise NodeError(f"annotation {names.node_public_ip} {_short(str(text))} is not an IPv4 address") from None


def stored_public_ipv6(names: Annotations, node: Mapping[str, Any]) -> ipaddress.IPv6Address | None:
    """The node-public-ipv6 annotation (GetStoredPublicIP's second value: it stands for
    --public-ipv6), or None. NodeError if malformed."""
    text = node_annotations(node).get(names.node_public_ipv6, "")
    if text == "":
        return None
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        raise NodeError(f"annotation {names.node_public_ipv6} {_short(str(text))} is not an IPv6 address") from None
