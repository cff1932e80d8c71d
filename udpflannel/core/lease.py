"""Subnet leases: flannel's lease JSON, registry key names, and lease events.

Pure: no I/O. The value encoding is byte-for-byte what flanneld writes
(pkg/lease/lease.go), so a udpflannel lease is indistinguishable from a flanneld
vxlan lease in etcd, and flanneld's leases are understood here.
"""

from __future__ import annotations

import enum
import ipaddress
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping


class LeaseError(ValueError):
    """A lease key or value that cannot be understood."""


@dataclass(frozen=True)
class Lease:
    subnet: ipaddress.IPv4Network
    public_ip: ipaddress.IPv4Address
    backend_type: str = "vxlan"
    vni: int | None = None
    vtep_mac: str | None = None
    expiration: float = 0.0  # unix time; 0 when unknown

    @property
    def key(self) -> str:
        return subnet_key(self.subnet)

    def routable_by_vxlan(self) -> bool:
        """Whether our VXLAN framing can reach this node (flannel ignores other types)."""
        return self.backend_type == "vxlan" and self.vtep_mac is not None

    def same_route(self, other: "Lease") -> bool:
        return (self.subnet, self.public_ip, self.backend_type, self.vni, self.vtep_mac) == (
            other.subnet, other.public_ip, other.backend_type, other.vni, other.vtep_mac)


def subnet_key(subnet: ipaddress.IPv4Network) -> str:
    """flannel's key for a subnet: ``10.244.7.0-24``."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(key: str) -> ipaddress.IPv4Network:
    name = key.rsplit("/", 1)[-1]
    if "&" in name:  # dual-stack key "v4&v6": the IPv4 half is what we route
        name = name.split("&", 1)[0]
    addr, sep, plen = name.partition("-")
    try:
        if not sep:
            raise ValueError
        return ipaddress.IPv4Network(f"{addr}/{int(plen)}")
    except ValueError:
        raise LeaseError(f"not a subnet key: {key!r}") from None


def encode_value(lease: Lease) -> bytes:
    """flannel's lease JSON. Field order and omissions follow Go's encoder."""
    doc: dict[str, Any] = {"PublicIP": str(lease.public_ip), "PublicIPv6": None}
    if lease.backend_type:
        doc["BackendType"] = lease.backend_type
    if lease.backend_type == "vxlan":
        doc["BackendData"] = {"VNI": lease.vni, "VtepMAC": lease.vtep_mac}
    return json.dumps(doc, separators=(",", ":")).encode()


def decode(key: str, value: bytes | str, expiration: float = 0.0) -> Lease:
    subnet = parse_subnet_key(key)
    try:
        doc = json.loads(value)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        fold = {k.lower(): v for k, v in doc.items()}
        if not isinstance(fold["publicip"], str):
            raise ValueError("PublicIP must be a string")
        public_ip = ipaddress.IPv4Address(fold["publicip"])
        btype = str(fold.get("backendtype") or "")
        data = fold.get("backenddata") or {}
        data = {k.lower(): v for k, v in data.items()} if isinstance(data, dict) else {}
        vni = data.get("vni")
        if vni is not None and (isinstance(vni, bool) or not isinstance(vni, int)
                                or not 0 <= vni < 1 << 24):
            raise ValueError(f"VNI {vni!r} is not a 24-bit integer")
        mac = data.get("vtepmac")
        if mac is not None:
            mac = normalize_mac(str(mac))
        return Lease(subnet, public_ip, btype, vni, mac, expiration)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        # anything a hostile or broken value can raise: one bad key must never stop a node
        raise LeaseError(f"lease {key}: bad value {value!r}: {e}") from None


def normalize_mac(text: str) -> str:
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) in (1, 2) for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return ":".join(f"{int(p, 16):02x}" for p in parts)


def mac_bytes(text: str) -> bytes:
    return bytes(int(p, 16) for p in normalize_mac(text).split(":"))


class EventType(enum.Enum):
    ADDED = "added"  # also: changed (a replaced lease is re-added)
    REMOVED = "removed"


@dataclass(frozen=True)
class LeaseEvent:
    type: EventType
    lease: Lease


def diff(old: Mapping[ipaddress.IPv4Network, Lease],
         new: Mapping[ipaddress.IPv4Network, Lease]) -> list[LeaseEvent]:
    """Events that turn snapshot ``old`` into snapshot ``new`` (used after re-listing)."""
    events = [LeaseEvent(EventType.REMOVED, lease) for s, lease in old.items() if s not in new]
    for subnet, lease in new.items():
        prev = old.get(subnet)
        if prev is None or not prev.same_route(lease):
            events.append(LeaseEvent(EventType.ADDED, lease))
    return events


def snapshot(leases: Iterable[Lease]) -> dict[ipaddress.IPv4Network, Lease]:
    return {lease.subnet: lease for lease in leases}
