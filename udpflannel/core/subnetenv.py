"""subnet.env, flannel's hand-off file to CNI and docker: render and parse (pure).

    FLANNEL_NETWORK=10.244.0.0/16
    FLANNEL_SUBNET=10.244.7.1/24      (the first usable address, not .0)
    FLANNEL_IPV6_NETWORK=fd10::/56    (dual stack; IPv6-only has only these two)
    FLANNEL_IPV6_SUBNET=fd10:0:0:7::1/64
    FLANNEL_MTU=1450
    FLANNEL_IPMASQ=false

in flanneld's order (pkg/subnet WriteSubnetFile). Readers (flannel's CNI plugin,
ours) take the file as "the node is ready", so it is written only once the data plane
forwards, and atomically (host.localstate).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from udpflannel.core.errors import BadInput


class SubnetEnvError(BadInput):
    """subnet.env is missing a key or holds a value that cannot be understood."""


@dataclass(frozen=True)
class SubnetEnv:
    network: ipaddress.IPv4Network | None  # None: IPv6-only
    subnet: ipaddress.IPv4Interface | None  # FLANNEL_SUBNET: first usable address / SubnetLen
    mtu: int
    ipmasq: bool
    ipv6_network: ipaddress.IPv6Network | None = None  # FLANNEL_IPV6_NETWORK
    ipv6_subnet: ipaddress.IPv6Interface | None = None  # FLANNEL_IPV6_SUBNET: first address / length

    @property
    def subnet_network(self) -> ipaddress.IPv4Network | None:
        return None if self.subnet is None else self.subnet.network

    @property
    def ipv6_subnet_network(self) -> ipaddress.IPv6Network | None:
        return None if self.ipv6_subnet is None else self.ipv6_subnet.network


def render(network: ipaddress.IPv4Network | None, subnet: ipaddress.IPv4Network | None, mtu: int,
           ipmasq: bool, ipv6_network: ipaddress.IPv6Network | None = None,
           ipv6_subnet: ipaddress.IPv6Network | None = None) -> str:
    """flannel writes the first usable address of each subnet, not .0 (or ::)."""
    lines = []
    if network is not None and subnet is not None:
        lines += [f"FLANNEL_NETWORK={network}", f"FLANNEL_SUBNET={subnet.network_address + 1}/{subnet.prefixlen}"]
    if ipv6_network is not None and ipv6_subnet is not None:
        lines += [f"FLANNEL_IPV6_NETWORK={ipv6_network}",
                  f"FLANNEL_IPV6_SUBNET={ipv6_subnet.network_address + 1}/{ipv6_subnet.prefixlen}"]
    lines += [f"FLANNEL_MTU={mtu}", f"FLANNEL_IPMASQ={'true' if ipmasq else 'false'}"]
    return "\n".join(lines) + "\n"


def render_for(config, lease, mtu: int, ipmasq: bool) -> str:
    """subnet.env for ``lease`` (core.lease.Lease) in network ``config``
    (core.config.NetworkConfig): the families the config enables, as flanneld."""
    return render(config.network, lease.subnet, mtu, ipmasq,
                  config.ipv6_network if config.enable_ipv6 else None, lease.ipv6_subnet)


def parse_lines(text: str) -> dict[str, str]:
    """KEY=value lines as flannel writes them (blank lines and # comments skipped)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if sep:
            values[name.strip()] = value.strip()
    return values


def parse(text: str) -> SubnetEnv:
    """Both keys of at least one family (IPv4: FLANNEL_NETWORK and FLANNEL_SUBNET; IPv6:
    FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET); a family half there is refused."""
    values = parse_lines(text)
    families = [("FLANNEL_NETWORK", "FLANNEL_SUBNET"), ("FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET")]
    half = [k for pair in families if any(x in values for x in pair) for k in pair if k not in values]
    if half or not any(pair[0] in values for pair in families):
        raise SubnetEnvError(f"subnet.env has no {', '.join(half or families[0])}")
    network = subnet = network6 = subnet6 = None
    try:
        if "FLANNEL_NETWORK" in values:
            network = ipaddress.IPv4Network(values["FLANNEL_NETWORK"])
            subnet = ipaddress.IPv4Interface(values["FLANNEL_SUBNET"])
        if "FLANNEL_IPV6_NETWORK" in values:
            network6 = ipaddress.IPv6Network(values["FLANNEL_IPV6_NETWORK"])
            subnet6 = ipaddress.IPv6Interface(values["FLANNEL_IPV6_SUBNET"])
    except ValueError as e:
        raise SubnetEnvError(f"subnet.env: {e}") from None
    try:
        mtu = int(values.get("FLANNEL_MTU", "1500"))
    except ValueError:
        raise SubnetEnvError(f"subnet.env: FLANNEL_MTU {values['FLANNEL_MTU']!r} is not a number") from None
    masq = values.get("FLANNEL_IPMASQ", "false").lower()
    if masq not in ("true", "false"):
        raise SubnetEnvError(f"subnet.env: FLANNEL_IPMASQ {values['FLANNEL_IPMASQ']!r} is not true/false")
    return SubnetEnv(network, subnet, mtu, masq == "true", network6, subnet6)


def previous_subnet(text: str) -> ipaddress.IPv4Network | None:
    """The subnet an earlier run recorded (FLANNEL_SUBNET), or None."""
    try:
        return ipaddress.IPv4Interface(parse_lines(text)["FLANNEL_SUBNET"]).network
    except (KeyError, ValueError):
        return None


def previous_ipv6_subnet(text: str) -> ipaddress.IPv6Network | None:
    """The IPv6 subnet an earlier run recorded (FLANNEL_IPV6_SUBNET), or None."""
    try:
        return ipaddress.IPv6Interface(parse_lines(text)["FLANNEL_IPV6_SUBNET"]).network
    except (KeyError, ValueError):
        return None
