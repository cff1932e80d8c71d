"""flannel's network configuration: parse, apply defaults, validate.

Pure: no I/O. The JSON is the one flanneld reads from ``<prefix>/config`` (etcd) or
``net-conf.json``; Go's decoder matches field names case-insensitively, so we do too.
Only the IPv4 overlay is carried by udpflannel; an IPv6 network is refused with a
clear message rather than silently ignored. Every key flanneld knows is either
honoured or refused with one line; keys flanneld does not know are ignored, as
flanneld's decoder ignores them.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class NetworkConfig:
    network: ipaddress.IPv4Network
    subnet_len: int
    subnet_min: ipaddress.IPv4Address
    subnet_max: ipaddress.IPv4Address
    backend_type: str = "vxlan"
    vni: int = DEFAULT_VNI
    port: int = VXLAN_PORT
    mtu: int | None = None  # vxlan Backend.MTU: the underlay MTU to assume (flanneld's meaning); None: the real one
    direct_routing: bool = False  # Backend.DirectRouting (vxlan)
    enable_nftables: bool = False  # EnableNFTables: masquerade/forward rules via nftables

    @property
    def subnet_count(self) -> int:
        return 1 << (self.subnet_len - self.network.prefixlen)

    def subnet_at(self, index: int) -> ipaddress.IPv4Network:
        """The index-th subnet of SubnetLen inside the network."""
        size = 1 << (32 - self.subnet_len)
        base = int(self.network.network_address) + index * size
        return ipaddress.IPv4Network((base, self.subnet_len))

    def index_of(self, subnet: ipaddress.IPv4Network) -> int:
        size = 1 << (32 - self.subnet_len)
        return (int(subnet.network_address) - int(self.network.network_address)) // size

    def usable_range(self) -> range:
        """Indices of subnets between SubnetMin and SubnetMax, inclusive."""
        lo = self.index_of(ipaddress.IPv4Network((self.subnet_min, self.subnet_len), strict=False))
        hi = self.index_of(ipaddress.IPv4Network((self.subnet_max, self.subnet_len), strict=False))
        return range(lo, hi + 1)

    def contains_subnet(self, subnet: ipaddress.IPv4Network) -> bool:
        return subnet.prefixlen == self.subnet_len and subnet.subnet_of(self.network)

    def to_json(self) -> str:
        backend: dict[str, Any] = {"Type": self.backend_type}
        if self.backend_type == "vxlan":
            backend["VNI"] = self.vni
        backend["Port"] = self.port
        if self.mtu is not None:
            backend["MTU"] = self.mtu
        if self.direct_routing:
            backend["DirectRouting"] = True
        doc: dict[str, Any] = {
            "Network": str(self.network),
            "SubnetLen": self.subnet_len,
            "SubnetMin": str(self.subnet_min),
            "SubnetMax": str(self.subnet_max),
            "Backend": backend,
        }
        if self.enable_nftables:
            doc["EnableNFTables"] = True
        return json.dumps(doc)


def _fold(obj: dict[str, Any]) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in obj.items()}


def _addr(value: Any, name: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(str(value))
    except ValueError:
        raise ConfigError(f"{name} {value!r} is not an IPv4 address") from None


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

    if cfg.get("enableipv6") is True:
        raise ConfigError("EnableIPv6 is set: udpflannel carries an IPv4 overlay only")
    if cfg.get("enableipv4") is False:
        raise ConfigError("EnableIPv4 is false: udpflannel needs an IPv4 Network")
    if "network" not in cfg:
        raise ConfigError('network config has no "Network" (e.g. "10.244.0.0/16")')
    try:
        network = ipaddress.IPv4Network(str(cfg["network"]))
    except ValueError as e:
        raise ConfigError(f"Network {cfg['network']!r} is not an IPv4 network: {e}") from None
    if network.prefixlen > 28:
        raise ConfigError(f"Network {network} is smaller than /28")

    if cfg.get("subnetlen") in (None, 0):
        subnet_len = 24 if network.prefixlen <= 22 else network.prefixlen + 2
    else:
        subnet_len = _int(cfg["subnetlen"], "SubnetLen", 1, 32)
    if subnet_len > 30:
        raise ConfigError(f"SubnetLen {subnet_len} is larger than 30")
    if subnet_len < network.prefixlen + 2:
        raise ConfigError(f"SubnetLen {subnet_len} must be at least the Network's /{network.prefixlen} "
                          "+ 2 (room for four subnets)")

    step = 1 << (32 - subnet_len)
    first = ipaddress.IPv4Address(int(network.network_address) + step)  # zeroth subnet is skipped
    last = ipaddress.IPv4Address(int(network.broadcast_address) + 1 - step)
    subnet_min = _addr(cfg["subnetmin"], "SubnetMin") if cfg.get("subnetmin") else first
    subnet_max = _addr(cfg["subnetmax"], "SubnetMax") if cfg.get("subnetmax") else last
    for name, addr in (("SubnetMin", subnet_min), ("SubnetMax", subnet_max)):
        if addr not in network:
            raise ConfigError(f"{name} {addr} is not inside Network {network}")
        if int(addr) % step:
            raise ConfigError(f"{name} {addr} is not aligned to SubnetLen /{subnet_len}")
    if subnet_max < subnet_min:
        raise ConfigError(f"SubnetMax {subnet_max} is below SubnetMin {subnet_min}")

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
    return NetworkConfig(network, subnet_len, subnet_min, subnet_max, btype, vni, port, mtu,
                         direct, enable_nftables)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def default_config() -> NetworkConfig:
    return parse(json.dumps({"Network": DEFAULT_NETWORK, "Backend": {"Type": "vxlan"}}))
