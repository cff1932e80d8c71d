"""flannel's network configuration: parse, apply defaults, validate.

Pure: no I/O. The JSON is the one flanneld reads from ``<prefix>/config`` (etcd) or
``net-conf.json``; Go's decoder matches field names case-insensitively, so we do too.
Every key flanneld knows is either honoured or refused with one line; keys flanneld
does not know are ignored, as flanneld's decoder ignores them.

Dual stack (flannel's pkg/subnet/config.go CheckNetworkConfig): ``EnableIPv4`` (true
unless false: false is IPv6-only) and ``EnableIPv6`` choose the families; each enabled
family is a ``SubnetPool`` (network, subnet length, SubnetMin..SubnetMax) with
flanneld's defaults and limits: IPv4 /24 subnets when the network is /22 or larger,
else the network's prefix + 2, at most /30, networks no smaller than /28; IPv6 /64
when the network is /62 or larger, else prefix + 2, at most /126, networks no smaller
than /124; SubnetMin defaults to the second subnet, SubnetMax to the last. The udp
backend carries IPv4 only (flanneld's udp backend has no IPv6), so IPv6 with it is
refused rather than leaving pods with IPv6 addresses nothing routes.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any, cast

from udpflannel.core.errors import BadInput
from udpflannel.core.wire import UDP_PORT, VXLAN_PORT

DEFAULT_NETWORK = "10.244.0.0/16"
DEFAULT_VNI = 1
# Backend types whose wire formats udpflannel speaks: "vxlan" (VXLAN framing with a
# VtepMAC) and "udp" (flanneld's udp backend: the bare IP packet in a UDP datagram).
SUPPORTED_BACKENDS = ("vxlan", "udp")
DEFAULT_PORTS = {"vxlan": VXLAN_PORT, "udp": UDP_PORT}
# Backend keys of flanneld's vxlan backend that change what it does and that we do
# not implement: refused rather than ignored.
_REFUSED_VXLAN_KEYS = {
    "gbp": "GBP (VXLAN group policy) is not supported by udpflannel; remove it or set it to false",
    "learning": "Learning (VXLAN source-address learning) is not supported by udpflannel; remove it "
                "or set it to false",
    "macprefix": "MacPrefix is used by flanneld on Windows only and is not supported; remove it",
}


class ConfigError(BadInput):
    """The network configuration is unusable; the message says what to fix."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def subnet_within(subnet: Network, network: Network) -> bool:
    """subnet.subnet_of(network), and False (not TypeError) across families."""
    if isinstance(subnet, ipaddress.IPv4Network) and isinstance(network, ipaddress.IPv4Network):
        return subnet.subnet_of(network)
    if isinstance(subnet, ipaddress.IPv6Network) and isinstance(network, ipaddress.IPv6Network):
        return subnet.subnet_of(network)
    return False


@dataclass(frozen=True)
class SubnetPool:
    """One family's overlay: its network, the length of a node's subnet, and the
    subnets a node may lease (SubnetMin..SubnetMax, both included)."""
    network: Network
    subnet_len: int
    subnet_min: Address
    subnet_max: Address

    @property
    def version(self) -> int:
        return self.network.version

    @property
    def subnet_count(self) -> int:
        return 1 << (self.subnet_len - self.network.prefixlen)

    def _size(self) -> int:
        return 1 << (self.network.max_prefixlen - self.subnet_len)

    def subnet_at(self, index: int) -> Network:
        """The index-th subnet of subnet_len inside the network."""
        base = int(self.network.network_address) + index * self._size()
        return ipaddress.ip_network((ipaddress.ip_address(base) if self.version == 4
                                     else ipaddress.IPv6Address(base), self.subnet_len))

    def index_of(self, subnet: Network) -> int:
        return (int(subnet.network_address) - int(self.network.network_address)) // self._size()

    def usable_range(self) -> range:
        """Indices of subnets between subnet_min and subnet_max, inclusive."""
        lo = (int(self.subnet_min) - int(self.network.network_address)) // self._size()
        hi = (int(self.subnet_max) - int(self.network.network_address)) // self._size()
        return range(lo, hi + 1)

    def contains_subnet(self, subnet: Network | None) -> bool:
        """A subnet of this pool's length inside its network (of this family)."""
        return (subnet is not None and subnet.version == self.version
                and subnet.prefixlen == self.subnet_len and subnet_within(subnet, self.network))

    def in_range(self, subnet: Network | None) -> bool:
        """contains_subnet, and between subnet_min and subnet_max."""
        return (subnet is not None and self.contains_subnet(subnet)
                and self.index_of(subnet) in self.usable_range())


@dataclass(frozen=True)
class NetworkConfig:
    network: ipaddress.IPv4Network | None  # None when IPv6-only (EnableIPv4 false)
    subnet_len: int
    subnet_min: ipaddress.IPv4Address | None
    subnet_max: ipaddress.IPv4Address | None
    backend_type: str = "vxlan"
    vni: int = DEFAULT_VNI
    port: int = VXLAN_PORT
    mtu: int | None = None  # vxlan Backend.MTU: the underlay MTU to assume (flanneld's meaning); None: the real one
    direct_routing: bool = False  # Backend.DirectRouting (vxlan)
    enable_nftables: bool = False  # EnableNFTables: masquerade/forward rules via nftables
    enable_ipv6: bool = False  # EnableIPv6
    ipv6_network: ipaddress.IPv6Network | None = None  # IPv6Network (with EnableIPv6)
    ipv6_subnet_len: int = 0
    ipv6_subnet_min: ipaddress.IPv6Address | None = None
    ipv6_subnet_max: ipaddress.IPv6Address | None = None

    @property
    def enable_ipv4(self) -> bool:
        return self.network is not None

    @property
    def v4(self) -> SubnetPool | None:
        """The IPv4 pool, or None (IPv6-only)."""
        if self.network is None:
            return None
        assert self.subnet_min is not None and self.subnet_max is not None  # set with the network
        return SubnetPool(self.network, self.subnet_len, self.subnet_min, self.subnet_max)

    @property
    def v6(self) -> SubnetPool | None:
        """The IPv6 pool, or None (EnableIPv6 off)."""
        if not self.enable_ipv6 or self.ipv6_network is None:
            return None
        assert self.ipv6_subnet_min is not None and self.ipv6_subnet_max is not None  # set with the network
        return SubnetPool(self.ipv6_network, self.ipv6_subnet_len, self.ipv6_subnet_min, self.ipv6_subnet_max)

    @property
    def pools(self) -> tuple[SubnetPool, ...]:
        """The enabled families' pools, IPv4 first."""
        return tuple(p for p in (self.v4, self.v6) if p is not None)

    def pool(self, version: int) -> SubnetPool | None:
        return self.v4 if version == 4 else self.v6

    @property
    def networks(self) -> tuple[Network, ...]:
        return tuple(p.network for p in self.pools)

    # The IPv4 pool's, kept for callers that know the network is IPv4.
    @property
    def subnet_count(self) -> int:
        return self._v4().subnet_count

    def subnet_at(self, index: int) -> ipaddress.IPv4Network:
        """The index-th subnet of SubnetLen inside the network."""
        return cast(ipaddress.IPv4Network, self._v4().subnet_at(index))  # the IPv4 pool's

    def index_of(self, subnet: ipaddress.IPv4Network) -> int:
        return self._v4().index_of(subnet)

    def usable_range(self) -> range:
        """Indices of subnets between SubnetMin and SubnetMax, inclusive."""
        return self._v4().usable_range()

    def contains_subnet(self, subnet: Network | None) -> bool:
        """A subnet of the right length inside the network of its family."""
        pool = self.pool(subnet.version) if subnet is not None else None
        return pool is not None and pool.contains_subnet(subnet)

    def _v4(self) -> SubnetPool:
        pool = self.v4
        if pool is None:
            raise ValueError("this network is IPv6-only")
        return pool

    def to_json(self) -> str:
        backend: dict[str, Any] = {"Type": self.backend_type}
        if self.backend_type == "vxlan":
            backend["VNI"] = self.vni
        backend["Port"] = self.port
        if self.mtu is not None:
            backend["MTU"] = self.mtu
        if self.direct_routing:
            backend["DirectRouting"] = True
        doc: dict[str, Any] = {}
        if self.network is not None:
            doc.update(Network=str(self.network), SubnetLen=self.subnet_len,
                       SubnetMin=str(self.subnet_min), SubnetMax=str(self.subnet_max))
        else:
            doc["EnableIPv4"] = False
        if self.enable_ipv6:
            doc.update(EnableIPv6=True, IPv6Network=str(self.ipv6_network), IPv6SubnetLen=self.ipv6_subnet_len,
                       IPv6SubnetMin=str(self.ipv6_subnet_min), IPv6SubnetMax=str(self.ipv6_subnet_max))
        doc["Backend"] = backend
        if self.enable_nftables:
            doc["EnableNFTables"] = True
        return json.dumps(doc)


def _fold(obj: dict[str, Any]) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in obj.items()}


def _addr(value: Any, name: str, cls: type = ipaddress.IPv4Address, label: str = "IPv4") -> Any:
    try:
        return cls(str(value))
    except ValueError:
        raise ConfigError(f"{name} {value!r} is not an {label} address") from None


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name} {value} is out of range {lo}..{hi}")
    return value


def parse(text: str | bytes, *, default_port: int | None = None) -> NetworkConfig:
    """Parse flannel's network config JSON, fill in flannel's defaults, validate."""
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"network config is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError("network config must be a JSON object")
    cfg = _fold(raw)

    enable_ipv4 = _bool(cfg.get("enableipv4", True), "EnableIPv4")
    enable_ipv6 = _bool(cfg.get("enableipv6", False), "EnableIPv6")
    if not (enable_ipv4 or enable_ipv6):
        raise ConfigError("EnableIPv4 and EnableIPv6 are both false: enable at least one family")
    v4 = _pool(cfg, 4) if enable_ipv4 else None
    v6 = _pool(cfg, 6) if enable_ipv6 else None

    enable_nftables = _bool(cfg.get("enablenftables", False), "EnableNFTables")
    backend = cfg.get("backend")
    if backend is None:  # flanneld's default backend: udp (raw IP on port 8285)
        backend = {"type": "udp"}
    if not isinstance(backend, dict):
        raise ConfigError("Backend must be a JSON object")
    backend = _fold(backend)
    btype = str(backend.get("type") or "").lower()
    if not btype:
        raise ConfigError('Backend has no "Type" (e.g. "Backend": {"Type": "vxlan"})')
    if btype not in SUPPORTED_BACKENDS:
        raise ConfigError(
            f'Backend Type {btype!r} is not supported: udpflannel speaks "vxlan" and "udp" '
            '(set "Backend": {"Type": "vxlan"})'
        )
    port = backend.get("port") or default_port or DEFAULT_PORTS[btype]  # flannel: 0 means default
    port = _int(port, "Backend.Port", 1, 65535)
    vni, mtu, direct = DEFAULT_VNI, None, False
    if btype == "vxlan":
        vni = _int(backend.get("vni", DEFAULT_VNI), "Backend.VNI", 1, (1 << 24) - 1)
        for key, why in _REFUSED_VXLAN_KEYS.items():
            if backend.get(key) not in (None, False, ""):
                raise ConfigError(why)
        if backend.get("mtu") not in (None, 0):
            mtu = _int(backend["mtu"], "Backend.MTU", 68, 65535)
        direct = _bool(backend.get("directrouting", False), "Backend.DirectRouting")
    elif enable_ipv6:
        raise ConfigError(f'EnableIPv6 with the {btype} backend: flanneld\'s udp backend carries IPv4 only '
                          '(set "Backend": {"Type": "vxlan"})')
    # _pool(cfg, 4) holds IPv4 objects, _pool(cfg, 6) IPv6 ones
    v4_fields = cast(_V4Fields, (v4.network, v4.subnet_len, v4.subnet_min, v4.subnet_max) if v4
                     else (None, 0, None, None))
    v6_fields = cast(_V6Fields, (v6.network, v6.subnet_len, v6.subnet_min, v6.subnet_max) if v6
                     else (None, 0, None, None))
    return NetworkConfig(*v4_fields, btype, vni, port, mtu, direct, enable_nftables, enable_ipv6, *v6_fields)


_V4Fields = tuple[ipaddress.IPv4Network | None, int, ipaddress.IPv4Address | None, ipaddress.IPv4Address | None]
_V6Fields = tuple[ipaddress.IPv6Network | None, int, ipaddress.IPv6Address | None, ipaddress.IPv6Address | None]


@dataclass(frozen=True)
class _Family:
    """One family's config keys, flanneld's limits and defaults (CheckNetworkConfig)."""
    prefix: str
    name: str
    cls: type[ipaddress.IPv4Network] | type[ipaddress.IPv6Network]
    addr: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]
    smallest: int
    max_len: int
    default_len: int
    big: int


_FAMILY = {
    4: _Family(prefix="", name="Network", cls=ipaddress.IPv4Network, addr=ipaddress.IPv4Address,
               smallest=28, max_len=30, default_len=24, big=22),
    6: _Family(prefix="ipv6", name="IPv6Network", cls=ipaddress.IPv6Network, addr=ipaddress.IPv6Address,
               smallest=124, max_len=126, default_len=64, big=62),
}
# IPv6 networks whose addresses Go prints as IPv4 (flanneld's keys could not name them)
_V4_IN_V6 = (ipaddress.IPv6Network("::/96"), ipaddress.IPv6Network("::ffff:0:0/96"))


def _pool(cfg: dict[str, Any], version: int) -> SubnetPool:
    """One family's pool from the folded config, with flanneld's defaults and limits."""
    f = _FAMILY[version]
    p, name, label = f.prefix, f.name, f"IPv{version}"
    key, len_name = f"{p}network", f"{'IPv6' if p else ''}SubnetLen"
    if cfg.get(key) in (None, ""):
        example = "10.244.0.0/16" if version == 4 else "fd00:10:244::/56"
        why = "" if version == 4 else ' (EnableIPv6 is true)'
        raise ConfigError(f'network config has no "{name}" (e.g. "{example}"){why}')
    try:
        network = f.cls(str(cfg[key]))
    except ValueError as e:
        raise ConfigError(f"{name} {cfg[key]!r} is not an {label} network: {e}") from None
    if version == 6 and any(network.overlaps(n) for n in _V4_IN_V6):
        raise ConfigError(f"{name} {network} holds IPv4-mapped or -compatible addresses; use a "
                          "global or unique local prefix (e.g. fd00:10:244::/56)")
    bits = network.max_prefixlen
    if cfg.get(f"{p}subnetlen") in (None, 0):
        if network.prefixlen > f.smallest:
            raise ConfigError(f"{name} {network} is smaller than /{f.smallest}")
        subnet_len = f.default_len if network.prefixlen <= f.big else network.prefixlen + 2
    else:
        subnet_len = _int(cfg[f"{p}subnetlen"], len_name, 1, bits)
    if subnet_len > f.max_len:
        raise ConfigError(f"{len_name} {subnet_len} is larger than {f.max_len}")
    if subnet_len < network.prefixlen + 2:
        raise ConfigError(f"{len_name} {subnet_len} must be at least the {name}'s /{network.prefixlen} "
                          "+ 2 (room for four subnets)")

    step = 1 << (bits - subnet_len)
    first = f.addr(int(network.network_address) + step)  # zeroth subnet is skipped
    last = f.addr(int(network.broadcast_address) + 1 - step)
    bounds = []
    for bound, default in (("Min", first), ("Max", last)):
        bname = f"{'IPv6' if p else ''}Subnet{bound}"
        given = cfg.get(f"{p}subnet{bound.lower()}")
        addr = _addr(given, bname, f.addr, label) if given else default
        if addr not in network:
            raise ConfigError(f"{bname} {addr} is not inside {name} {network}")
        if int(addr) % step:
            raise ConfigError(f"{bname} {addr} is not aligned to {len_name} /{subnet_len}")
        bounds.append(addr)
    subnet_min, subnet_max = bounds
    if int(subnet_max) < int(subnet_min):  # (one family: mypy cannot see it)
        pre = "IPv6" if p else ""
        raise ConfigError(f"{pre}SubnetMax {subnet_max} is below {pre}SubnetMin {subnet_min}")
    return SubnetPool(network, subnet_len, subnet_min, subnet_max)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def default_config() -> NetworkConfig:
    return parse(json.dumps({"Network": DEFAULT_NETWORK, "Backend": {"Type": "vxlan"}}))
