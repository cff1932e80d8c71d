"""Kernel profiles for the data-path tests (``make_cluster(lab, kernel=...)``).

Each profile (udpflannel.lab.oldkernel) runs the daemons under a seccomp filter that
refuses what an older kernel lacks, so this machine tests every fallback. Their test
ids start with ``oldkernel_``: the Makefile's runs with --io threads and loop keep only
``oldkernel_no_udp_offload`` of them (the profile with most new code on its path).
"""

from __future__ import annotations

import pytest

# profile -> (offloads in use under --offload auto, batching): what status must say
EXPECTED = {
    "no-uso": ({"tso", "gso", "gro"}, ("sendmmsg", "recvmmsg")),
    "no-gro": ({"tso", "gso"}, ("sendmmsg", "recvmmsg")),
    "no-udp-offload": ({"tso"}, ("sendmmsg", "recvmmsg")),
    "no-tun-offload": (set(), ("sendmmsg", "recvmmsg")),
    "no-mmsg": ({"tso"}, ()),
}


def kernels(*profiles: str, this: bool = True) -> list:
    """pytest params: this kernel (None) unless ``this`` is False, then the profiles."""
    out = [pytest.param(None, id="thiskernel")] if this else []
    return out + [pytest.param(p, id="oldkernel_" + p.replace("-", "_")) for p in profiles]
