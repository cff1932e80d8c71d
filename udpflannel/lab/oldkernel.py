"""Daemons that see an older or stripped kernel: the lab's seccomp launcher.

The engine's fast path rests on UDP GSO (Linux 4.18), UDP GRO (5.0) and the TUN's
segmentation offloads (TSO; USO since 6.2). Nodes without them must still forward
well, so the tests and the bench run daemons on this kernel under a seccomp filter
(csrc/lab/oldkernel.c, libseccomp, installed before exec) that refuses those features
the way an older kernel answers: ENOPROTOOPT for the socket options, EINVAL for the
TUN flags. Each profile below is a kind of kernel; ``wrap(profile)`` is the argv
prefix that starts a command on it (Cluster's ``wrapper``).
"""

from __future__ import annotations

from udpflannel.lab import cbuild

SOURCE = cbuild.LAB_SOURCES / "oldkernel.c"

# name -> (what the filter refuses, the kernels it stands for)
PROFILES: dict[str, tuple[tuple[str, ...], str]] = {
    "full": ((), "this kernel, through the launcher without a filter"),
    "no-uso": (("tun-uso",), "Linux 5.0-6.1: UDP GSO and GRO, TUN TSO without USO"),
    "no-gro": (("udp-gro", "tun-uso"), "Linux 4.18-4.19: UDP GSO without UDP GRO"),
    "no-udp-offload": (("udp-gso", "udp-gro", "tun-uso"), "Linux < 4.18: TUN TSO, no UDP GSO or GRO"),
    "no-tun-offload": (("udp-gso", "udp-gro", "tun-offload"),
                       "no UDP GSO or GRO and the TUN's offloads refused (one packet per read)"),
    "no-mmsg": (("udp-gso", "udp-gro", "tun-uso", "mmsg"),
                "no UDP GSO or GRO, and sendmmsg/recvmmsg refused (ENOSYS)"),
}


class OldKernelError(Exception):
    """An unknown profile, or the launcher does not build (libseccomp-dev missing)."""


def build() -> str:
    """Path of the compiled launcher (needs libseccomp-dev: `make setup` installs it)."""
    try:
        return cbuild.build(SOURCE, libs=("seccomp",))
    except cbuild.BuildError as e:
        raise OldKernelError(f"{e} (is libseccomp-dev installed?)") from None


def refusals(profile: str) -> tuple[str, ...]:
    try:
        return PROFILES[profile][0]
    except KeyError:
        raise OldKernelError(f"unknown kernel profile {profile!r} (known: {', '.join(PROFILES)})") from None


def wrap(profile: str) -> list[str]:
    """The argv prefix that runs a command under ``profile``'s filter."""
    return [build(), ",".join(refusals(profile)) or "none", "--"]
