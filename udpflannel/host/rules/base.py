"""What every rules backend shares: the spec, the error, the interface, running a tool."""

from __future__ import annotations

import abc
import ipaddress
import subprocess
from dataclasses import dataclass
from typing import Sequence

from udpflannel.core.errors import UdpflannelError

TOOL_TIMEOUT = 30.0  # seconds; iptables-restore also waits up to 5 s for the xtables lock


class RulesError(UdpflannelError):
    """A rules tool is missing, refused (not root) or failed; the message is one line."""


@dataclass(frozen=True)
class RuleSpec:
    """What to install. Field names follow flanneld's switches:
    ``masquerade`` is --ip-masq, ``fully_random`` is the opposite of
    --ip-masq-fully-random-disable, ``forward`` is --iptables-forward-rules."""

    network: ipaddress.IPv4Network  # the cluster network (FLANNEL_NETWORK)
    subnet: ipaddress.IPv4Network   # this node's lease
    masquerade: bool
    fully_random: bool = True
    forward: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.network, ipaddress.IPv4Network) or \
                not isinstance(self.subnet, ipaddress.IPv4Network):
            raise RulesError("rules: network and subnet must be IPv4 networks")
        if not self.subnet.subnet_of(self.network):
            raise RulesError(f"rules: subnet {self.subnet} is not inside network {self.network}")


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
