"""Subnet leases: flannel's lease JSON, registry key names, and lease events.

Pure: no I/O. The value encoding is byte-for-byte what flanneld writes
(pkg/lease/lease.go), so a udpflannel lease is indistinguishable from a flanneld
vxlan lease in etcd, and flanneld's leases are understood here.

Keys and values come from whoever can write the registry, so parsing is strict: one
canonical spelling per key (parse_key says why), MAC addresses as Go parses them, and
error messages that quote at most a short prefix of what they refuse.

Dual stack (flannel's pkg/subnet MakeSubnetKey and pkg/lease LeaseAttrs): a lease
holds an IPv4 subnet, an IPv6 subnet, or both, and its key names what it holds:
``10.244.7.0-24`` (IPv4), ``10.244.7.0-24&fd10:0:0:7::-64`` (both), and for an
IPv6-only lease ``0.0.0.0-0&fd10:0:0:7::-64`` (flanneld's empty IPv4 subnet). The
IPv6 side's attributes are ``PublicIPv6`` and ``BackendV6Data {VNI, VtepMAC}`` (the
VTEP of flannel-v6.<VNI>, a MAC of its own); an IPv6-only lease's PublicIP is
"0.0.0.0", as flanneld writes it. A lease is identified by its key: two keys may
name one subnet (a v4-only key and a dual one), and the routing policy (core.peers)
decides which one routes it.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Mapping, TypeVar

from udpflannel.core.errors import BadInput

# The expiration of a key stored without a TTL: a reservation (flannel's
# Documentation/reservations.md), which never expires and is never given one.
NEVER = float("inf")


class LeaseError(BadInput):
    """A lease key or value that cannot be understood."""


K = TypeVar("K", bound=Hashable)  # diff: snapshots by key, or by subnet
UNSPECIFIED = ipaddress.IPv4Address(0)  # an IPv6-only lease's PublicIP, as flanneld writes it


@dataclass(frozen=True)
class Lease:
    subnet: ipaddress.IPv4Network | None  # None: an IPv6-only lease
    public_ip: ipaddress.IPv4Address  # 0.0.0.0 in an IPv6-only lease
    backend_type: str = "vxlan"
    vni: int | None = None  # BackendData.VNI
    vtep_mac: str | None = None  # BackendData.VtepMAC (flannel.<VNI>)
    expiration: float = 0.0  # unix time; 0 when unknown; NEVER for a reservation
    ipv6_subnet: ipaddress.IPv6Network | None = None
    public_ipv6: ipaddress.IPv6Address | None = None  # PublicIPv6
    vni6: int | None = None  # BackendV6Data.VNI
    vtep_mac6: str | None = None  # BackendV6Data.VtepMAC (flannel-v6.<VNI>)

    @property
    def key(self) -> str:
        return subnet_key(self.subnet, self.ipv6_subnet)

    @property
    def subnets(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """The subnets the lease holds, IPv4 first."""
        return tuple(s for s in (self.subnet, self.ipv6_subnet) if s is not None)

    def describe(self) -> str:
        """The subnets for a log line: ``10.244.7.0/24`` or ``10.244.7.0/24 + fd10:0:0:7::/64``."""
        return " + ".join(str(s) for s in self.subnets)

    @property
    def reserved(self) -> bool:
        """A reservation: the key has no TTL (an administrator wrote it without one)."""
        return self.expiration == NEVER

    def routable_by_vxlan(self) -> bool:
        """Whether our VXLAN framing can reach this node (flannel ignores other types)."""
        return self.backend_type == "vxlan" and self.vtep_mac is not None

    def same_route(self, other: "Lease") -> bool:
        return self._route() == other._route()

    def _route(self) -> tuple:
        return (self.subnet, self.public_ip, self.backend_type, self.vni, self.vtep_mac,
                self.ipv6_subnet, self.public_ipv6, self.vni6, self.vtep_mac6)


def subnet_key(subnet: ipaddress.IPv4Network | None, ipv6_subnet: ipaddress.IPv6Network | None = None) -> str:
    """flannel's key (MakeSubnetKey): ``10.244.7.0-24``, ``10.244.7.0-24&fd10:0:0:7::-64``,
    or ``0.0.0.0-0&fd10:0:0:7::-64`` (IPv6-only: flanneld's empty IPv4 subnet)."""
    if subnet is None and ipv6_subnet is None:
        raise ValueError("a lease key names at least one subnet")
    v4 = f"{subnet.network_address}-{subnet.prefixlen}" if subnet is not None else _NO_V4
    if ipv6_subnet is None:
        return v4
    return f"{v4}&{ipv6_subnet.network_address}-{ipv6_subnet.prefixlen}"


_NO_V4 = "0.0.0.0-0"
# The one spelling of a key: dotted quad without leading zeros, a prefix length without
# padding; the IPv6 part as Go prints it (RFC 5952: lowercase, no leading zeros, the
# first longest run of zero groups as "::"), which is Python's compressed form, checked
# by printing it again. ASCII only: Python's int() and \d accept other scripts' digits.
_OCTET = r"(?:0|[1-9][0-9]{0,2})"
_CANONICAL_KEY = re.compile(rf"({_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET})-(0|[1-9][0-9]?)"
                            r"(?:&([0-9a-f:]{2,39})-(0|[1-9][0-9]{0,2}))?", re.ASCII)
# IPv6 addresses Go prints in dotted form (flanneld's key pattern cannot hold them)
_V4_IN_V6 = (ipaddress.IPv6Network("::/96"), ipaddress.IPv6Network("::ffff:0:0/96"))


def parse_key(name: str) -> tuple[ipaddress.IPv4Network | None, ipaddress.IPv6Network | None]:
    """The subnets a key name (what follows ``<prefix>/subnets/``) holds: (IPv4 or None,
    IPv6 or None), canonical spellings only.

    Any other spelling of a key (``10.244.07.0-24``, ``10.244.7.0-024``, a nested
    ``x/10.244.7.0-24``, an IPv6 part in upper case or uncompressed) is refused: if
    several spellings could name one key, whoever writes the last-listed alias would
    decide where a subnet is routed. ``0.0.0.0-0`` stands for "no IPv4 subnet" and is
    a key only with an IPv6 part."""
    found = _CANONICAL_KEY.fullmatch(name)
    if not found:
        raise LeaseError(f"not a canonical subnet key: {_short(name)}")
    addr, plen, addr6, plen6 = found.groups()
    try:
        subnet = ipaddress.IPv4Network(f"{addr}/{plen}")
        subnet6 = ipaddress.IPv6Network(f"{addr6}/{plen6}") if addr6 is not None else None
    except ValueError:  # an octet above 255, a length above 32 or 128, host bits set
        raise LeaseError(f"not a canonical subnet key: {_short(name)}") from None
    if subnet6 is not None and (str(subnet6.network_address) != addr6
                                or any(subnet6.overlaps(n) for n in _V4_IN_V6)):
        raise LeaseError(f"not a canonical subnet key: {_short(name)}")
    if f"{addr}-{plen}" == _NO_V4:
        if subnet6 is None:
            raise LeaseError(f"not a canonical subnet key: {_short(name)}")
        return None, subnet6
    return subnet, subnet6


def parse_subnet_key(name: str) -> ipaddress.IPv4Network | None:
    """The IPv4 subnet a canonical key names (None for an IPv6-only key); see parse_key."""
    return parse_key(name)[0]


def placeholder(name: str) -> Lease:
    """A lease that only names its key's subnets: what a REMOVED event carries when the
    value that went away is unknown or no lease."""
    subnet, subnet6 = parse_key(name)
    return Lease(subnet, UNSPECIFIED, "", ipv6_subnet=subnet6)


def _short(text: str | bytes, limit: int = 80) -> str:
    """repr() of a key or value for a log line; hostile ones can be megabytes long."""
    shown = repr(text[:limit])
    return shown if len(text) <= limit else f"{shown}... ({len(text)} bytes)"


def encode_value(lease: Lease) -> bytes:
    """flannel's lease JSON (LeaseAttrs). Field order and omissions follow Go's encoder:
    PublicIP always ("0.0.0.0" when IPv6-only), PublicIPv6 null or the address,
    BackendType, BackendData and BackendV6Data only when set (the vxlan backend sets
    BackendData with IPv4 and BackendV6Data with IPv6)."""
    doc: dict[str, Any] = {"PublicIP": str(lease.public_ip),
                           "PublicIPv6": None if lease.public_ipv6 is None else str(lease.public_ipv6)}
    if lease.backend_type:
        doc["BackendType"] = lease.backend_type
    if lease.backend_type == "vxlan":
        if lease.subnet is not None or lease.vtep_mac is not None:
            doc["BackendData"] = {"VNI": lease.vni, "VtepMAC": lease.vtep_mac}
        if lease.ipv6_subnet is not None or lease.vtep_mac6 is not None:
            doc["BackendV6Data"] = {"VNI": lease.vni6, "VtepMAC": lease.vtep_mac6}
    return json.dumps(doc, separators=(",", ":")).encode()


def _backend_data(data: Any) -> tuple[int | None, str | None]:
    """(VNI, VtepMAC) of a BackendData or BackendV6Data object (anything else: none)."""
    data = {k.lower(): v for k, v in data.items()} if isinstance(data, dict) else {}
    vni = data.get("vni")
    if vni is not None and (isinstance(vni, bool) or not isinstance(vni, int)
                            or not 0 <= vni < 1 << 24):
        raise ValueError(f"VNI {vni!r} is not a 24-bit integer")
    mac = data.get("vtepmac")
    if mac is not None:
        mac = normalize_mac(str(mac))
    return vni, mac


def decode(key: str, value: bytes | str, expiration: float = 0.0) -> Lease:
    """The lease at key name ``key`` (see parse_key). LeaseError if the key is not
    canonical or the value is not flannel's lease JSON."""
    subnet, subnet6 = parse_key(key)
    try:
        doc = json.loads(value)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        fold = {k.lower(): v for k, v in doc.items()}
        if not isinstance(fold["publicip"], str):
            raise ValueError("PublicIP must be a string")
        public_ip = ipaddress.IPv4Address(fold["publicip"])
        public_ipv6 = fold.get("publicipv6")
        if public_ipv6 is not None:
            if not isinstance(public_ipv6, str):
                raise ValueError("PublicIPv6 must be a string or null")
            public_ipv6 = ipaddress.IPv6Address(public_ipv6)
        btype = str(fold.get("backendtype") or "")
        vni, mac = _backend_data(fold.get("backenddata"))
        vni6, mac6 = _backend_data(fold.get("backendv6data"))
        return Lease(subnet, public_ip, btype, vni, mac, expiration, subnet6, public_ipv6, vni6, mac6)
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


def diff(old: Mapping[K, Lease], new: Mapping[K, Lease]) -> list[LeaseEvent]:
    """Events that turn snapshot ``old`` into snapshot ``new`` (used after re-listing)."""
    events = [LeaseEvent(EventType.REMOVED, lease) for key, lease in old.items() if key not in new]
    for key, lease in new.items():
        prev = old.get(key)
        if prev is None or not prev.same_route(lease):
            events.append(LeaseEvent(EventType.ADDED, lease))
    return events


def snapshot(leases: Iterable[Lease]) -> dict[str, Lease]:
    """Leases by key."""
    return {lease.key: lease for lease in leases}
