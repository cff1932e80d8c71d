"""subnet.env, flannel's hand-off file to CNI and docker: render and parse (pure).

    FLANNEL_NETWORK=10.244.0.0/16
    FLANNEL_SUBNET=10.244.7.1/24      (the first usable address, not .0)
    FLANNEL_MTU=1450
    FLANNEL_IPMASQ=false

Readers (flannel's CNI plugin, ours) take the file as "the node is ready", so it is
written only once the data plane forwards, and atomically (host.localstate).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from udpflannel.core.errors import BadInput


class SubnetEnvError(BadInput):
    """subnet.env is missing a key or holds a value that cannot be understood."""


@dataclass(frozen=True)
class SubnetEnv:
    network: ipaddress.IPv4Network
    subnet: ipaddress.IPv4Interface  # FLANNEL_SUBNET: first usable address / SubnetLen
    mtu: int
    ipmasq: bool

    @property
    def subnet_network(self) -> ipaddress.IPv4Network:
        return self.subnet.network


def render(network: ipaddress.IPv4Network, subnet: ipaddress.IPv4Network, mtu: int,
           ipmasq: bool) -> str:
    first = subnet.network_address + 1  # flannel writes the first usable address, not .0
    return (f"FLANNEL_NETWORK={network}\n"
            f"FLANNEL_SUBNET={first}/{subnet.prefixlen}\n"
            f"FLANNEL_MTU={mtu}\n"
            f"FLANNEL_IPMASQ={'true' if ipmasq else 'false'}\n")


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
    values = parse_lines(text)
    missing = [k for k in ("FLANNEL_NETWORK", "FLANNEL_SUBNET") if k not in values]
    if missing:
        raise SubnetEnvError(f"subnet.env has no {', '.join(missing)}")
    try:
        network = ipaddress.IPv4Network(values["FLANNEL_NETWORK"])
        subnet = ipaddress.IPv4Interface(values["FLANNEL_SUBNET"])
    except ValueError as e:
        raise SubnetEnvError(f"subnet.env: {e}") from None
    try:
        mtu = int(values.get("FLANNEL_MTU", "1500"))
    except ValueError:
        raise SubnetEnvError(f"subnet.env: FLANNEL_MTU {values['FLANNEL_MTU']!r} is not a number") from None
    masq = values.get("FLANNEL_IPMASQ", "false").lower()
    if masq not in ("true", "false"):
        raise SubnetEnvError(f"subnet.env: FLANNEL_IPMASQ {values['FLANNEL_IPMASQ']!r} is not true/false")
    return SubnetEnv(network, subnet, mtu, masq == "true")


def previous_subnet(text: str) -> ipaddress.IPv4Network | None:
    """The subnet an earlier run recorded (FLANNEL_SUBNET), or None."""
    try:
        return ipaddress.IPv4Interface(parse_lines(text)["FLANNEL_SUBNET"]).network
    except (KeyError, ValueError):
        return None
