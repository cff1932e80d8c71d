"""Subnet leases: flannel's lease JSON, registry key names, and lease events.

Pure: no I/O. The value encoding is byte-for-byte what flanneld writes
(pkg/lease/lease.go), so a udpflannel lease is indistinguishable from a flanneld
vxlan lease in etcd, and flanneld's leases are understood here.

Keys and values come from whoever can write the registry, so parsing is strict: one
canonical key per subnet (parse_subnet_key says why), MAC addresses as Go parses
them, and error messages that quote at most a short prefix of what they refuse.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from udpflannel.core.errors import BadInput

# The expiration of a key stored without a TTL: a reservation (flannel's
# Documentation/reservations.md), which never expires and is never given one.
NEVER = float("inf")


class LeaseError(BadInput):
    """A lease key or value that cannot be understood."""


@dataclass(frozen=True)
class Lease:
    subnet: ipaddress.IPv4Network
    public_ip: ipaddress.IPv4Address
    backend_type: str = "vxlan"
    vni: int | None = None
    vtep_mac: str | None = None
    expiration: float = 0.0  # unix time; 0 when unknown; NEVER for a reservation

    @property
    def key(self) -> str:
        return subnet_key(self.subnet)

    @property
    def reserved(self) -> bool:
        """A reservation: the key has no TTL (an administrator wrote it without one)."""
        return self.expiration == NEVER

    def routable_by_vxlan(self) -> bool:
        """Whether our VXLAN framing can reach this node (flannel ignores other types)."""
        return self.backend_type == "vxlan" and self.vtep_mac is not None

    def same_route(self, other: "Lease") -> bool:
        return (self.subnet, self.public_ip, self.backend_type, self.vni, self.vtep_mac) == (
            other.subnet, other.public_ip, other.backend_type, other.vni, other.vtep_mac)


def subnet_key(subnet: ipaddress.IPv4Network) -> str:
    """flannel's key for a subnet: ``10.244.7.0-24``."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


# The one spelling of a subnet key: dotted quad without leading zeros, a prefix length
# without padding. ASCII only: Python's int() and \d accept other scripts' digits.
_OCTET = r"(?:0|[1-9][0-9]{0,2})"
_CANONICAL_KEY = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}-(?:0|[1-9][0-9]?)", re.ASCII)


def parse_subnet_key(name: str) -> ipaddress.IPv4Network:
    """The subnet of a key name (what follows ``<prefix>/subnets/``), canonical only.

    Any other spelling of a subnet (``10.244.07.0-24``, ``10.244.7.0-024``, a nested
    ``x/10.244.7.0-24``) is refused: if several keys could name one subnet, whoever
    writes the last-listed alias would decide where that subnet is routed. Dual-stack
    keys (``10.244.7.0-24&fc00::-64``) are refused too: flanneld writes them only when
    the shared network config has EnableIPv6, which udpflannel refuses, so in a network
    udpflannel runs in no node writes one (and flanneld itself deletes its own dual-stack
    lease as incompatible with an IPv4-only config). Accepting them would make
    ``<subnet>&<anything>`` a second key for every subnet."""
    if "&" in name:
        raise LeaseError(f"dual-stack key {_short(name)}: this network is IPv4-only")
    if not _CANONICAL_KEY.fullmatch(name):
        raise LeaseError(f"not a canonical subnet key: {_short(name)}")
    addr, plen = name.split("-")
    try:
        return ipaddress.IPv4Network(f"{addr}/{plen}")
    except ValueError:  # an octet above 255, a length above 32, host bits set
        raise LeaseError(f"not a canonical subnet key: {_short(name)}") from None


def _short(text: str | bytes, limit: int = 80) -> str:
    """repr() of a key or value for a log line; hostile ones can be megabytes long."""
    shown = repr(text[:limit])
    return shown if len(text) <= limit else f"{shown}... ({len(text)} bytes)"


def encode_value(lease: Lease) -> bytes:
    """flannel's lease JSON. Field order and omissions follow Go's encoder."""
    doc: dict[str, Any] = {"PublicIP": str(lease.public_ip), "PublicIPv6": None}
    if lease.backend_type:
        doc["BackendType"] = lease.backend_type
    if lease.backend_type == "vxlan":
        doc["BackendData"] = {"VNI": lease.vni, "VtepMAC": lease.vtep_mac}
    return json.dumps(doc, separators=(",", ":")).encode()


def decode(key: str, value: bytes | str, expiration: float = 0.0) -> Lease:
    """The lease at key name ``key`` (see parse_subnet_key). LeaseError if the key is not
    canonical or the value is not flannel's lease JSON."""
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
        raise LeaseError(f"lease {key}: bad value {_short(value)}: {e}") from None


_MAC = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}|[0-9a-fA-F]{2}(?:-[0-9a-fA-F]{2}){5}", re.ASCII)


def normalize_mac(text: str) -> str:
    """``c6:d2:32:6f:8f:44`` (or with dashes, any case) as Go's net.ParseMAC reads a
    6-byte address: two hex digits per byte, nothing else (no spaces, no signs)."""
    if not _MAC.fullmatch(text):
        raise ValueError(f"not a MAC address: {_short(text)}")
    return text.replace("-", ":").lower()


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
