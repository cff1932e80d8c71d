"""Where the lab's real peers are: binaries `make setup` built from their Go modules
(peers/build.sh) into a cache shared by every clone on the machine.

A test that needs one asks ``binary(name)``; a missing one is an error that says how to
build it, never a skip: the test command builds them.
"""

from __future__ import annotations

import os

CACHE = os.environ.get("UDPFLANNEL_PEERS", "/var/cache/udpflannel-peers")


class PeerMissing(Exception):
    pass


def binary(name: str) -> str:
    """The path of ``name`` (e.g. "flanneld") under the cache's bin folder."""
    path = os.path.join(CACHE, "bin", name)
    if not os.access(path, os.X_OK):
        raise PeerMissing(f"{path} is missing: run `make setup` (peers/build.sh builds it)")
    return path
