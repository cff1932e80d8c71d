"""What every rules backend shares: the spec, the error, the interface, running a tool."""

from __future__ import annotations

import abc
import ipaddress
import subprocess
from dataclasses import dataclass
from typing import Sequence

from udpflannel.core.config import subnet_within
from udpflannel.core.errors import UdpflannelError

TOOL_TIMEOUT = 30.0  # seconds; iptables-restore also waits up to 5 s for the xtables lock


class RulesError(UdpflannelError):
    """A rules tool is missing, refused (not root) or failed; the message is one line."""


@dataclass(frozen=True)
class RuleSpec:
    """What to install. Field names follow flanneld's switches:
    ``masquerade`` is --ip-masq, ``fully_random`` is the opposite of
    --ip-masq-fully-random-disable, ``forward`` is --iptables-forward-rules. Each
    family with a network gets its rules (IPv6: ip6tables, nft table ip6 flannel-ipv6),
    as flanneld's SetupAndEnsure* for IPv4Network and IPv6Network."""

    network: ipaddress.IPv4Network | None  # the cluster network (FLANNEL_NETWORK); None: IPv6-only
    subnet: ipaddress.IPv4Network | None   # this node's lease
    masquerade: bool
    fully_random: bool = True
    forward: bool = True
    network6: ipaddress.IPv6Network | None = None  # FLANNEL_IPV6_NETWORK (EnableIPv6)
    subnet6: ipaddress.IPv6Network | None = None  # this node's IPv6 subnet

    def __post_init__(self) -> None:
        for version, (network, subnet) in ((4, (self.network, self.subnet)), (6, (self.network6, self.subnet6))):
            cls = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
            if (network is None) != (subnet is None):
                raise RulesError(f"rules: an IPv{version} network needs this node's IPv{version} subnet")
            if network is None:
                continue
            if not isinstance(network, cls) or not isinstance(subnet, cls):
                raise RulesError(f"rules: network and subnet must be IPv{version} networks")
            if not subnet_within(subnet, network):
                raise RulesError(f"rules: subnet {subnet} is not inside network {network}")
        if not self.versions:
            raise RulesError("rules: no network to make rules for")

    @property
    def versions(self) -> tuple[int, ...]:
        """The families with rules: 4, 6 or both."""
        return tuple(v for v, net in ((4, self.network), (6, self.network6)) if net is not None)

    def pair(self, version: int) -> tuple:
        """(network, subnet) of a family."""
        return (self.network, self.subnet) if version == 4 else (self.network6, self.subnet6)

    @classmethod
    def for_lease(cls, cfg, lease, **switches) -> "RuleSpec":
        """The spec for ``lease`` (core.lease.Lease) in ``cfg`` (NetworkConfig): the
        families the network enables."""
        v4 = cfg.enable_ipv4 and lease.subnet is not None
        v6 = cfg.enable_ipv6 and lease.ipv6_subnet is not None
        return cls(cfg.network if v4 else None, lease.subnet if v4 else None,
                   network6=cfg.ipv6_network if v6 else None, subnet6=lease.ipv6_subnet if v6 else None,
                   **switches)


class Rules(abc.ABC):
    """One backend's installer for one spec. Blocking; meant for a worker thread.
    Holds no memory of what it did: everything is read back from the kernel, so a
    restarted process (or a second instance) sees the same state."""

    backend: str

    def __init__(self, spec: RuleSpec) -> None:
        self.spec = spec

    @abc.abstractmethod
    def ensure(self) -> list[str]:
        """Install what is missing, idempotently; one short line per repair, [] if none."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Remove every chain, jump and table this backend owns; idempotent."""

    @abc.abstractmethod
    def present(self) -> bool:
        """True when everything the spec wants is in place, exactly once, in order."""


def first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run a rules tool; the caller looks at returncode. Only a tool that cannot be
    started (missing, not executable) or that hangs raises, as one-line RulesError."""
    try:
        return subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT, check=False)
    except FileNotFoundError:
        raise RulesError(f"{argv[0]} not found: install it (Debian package "
                         f"{'nftables' if argv[0] == 'nft' else 'iptables'})") from None
    except PermissionError as e:
        raise RulesError(f"{argv[0]}: {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise RulesError(f"{argv[0]} did not finish within {TOOL_TIMEOUT:.0f} s") from None


def failed(proc: subprocess.CompletedProcess, what: str) -> RulesError:
    detail = first_line(proc.stderr) or first_line(proc.stdout) or f"exit status {proc.returncode}"
    return RulesError(f"{what} failed: {detail}")
