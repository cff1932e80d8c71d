"""The lab's copy of flannel's udp proxy (csrc/lab/udpproxy.c): build it, command it.

The C source is compiled on first use with gcc -O2 into a cache directory keyed by
the source's hash, so tests and the benchmark need no build step and an edited
source is rebuilt. Two builders racing is harmless: each compiles to a private file
and renames it into place.

The agent talks to the running proxy through a SOCK_SEQPACKET pair, one fixed
12-byte command per message (layout in the C source's header comment).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import struct
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "lab" / "udpproxy.c"
CACHE_DIRS = ("/var/cache/udpflannel-lab", os.path.join(tempfile.gettempdir(), "udpflannel-lab"))
COMPILE_TIMEOUT = 120.0

CMD_SET_ROUTE, CMD_DEL_ROUTE, CMD_STOP = 1, 2, 3
_COMMAND = struct.Struct("!BBH4s4s")  # cmd, prefix length, port, network, next hop


class ProxyBuildError(Exception):
    """The proxy's source is missing or does not compile; the message says which."""


def build(source: Path = SOURCE) -> str:
    """Path of the compiled proxy, compiling it if this source was never built."""
    try:
        text = source.read_bytes()
    except OSError as e:
        raise ProxyBuildError(f"udpproxy source {source}: {e.strerror} (the lab tools need "
                              "udpflannel installed from its source tree)") from None
    name = f"udpproxy-{hashlib.sha256(text).hexdigest()[:16]}"
    for directory in CACHE_DIRS:
        binary = os.path.join(directory, name)
        if os.access(binary, os.X_OK):
            return binary
    last: OSError | None = None
    for directory in CACHE_DIRS:
        try:
            os.makedirs(directory, exist_ok=True)
            return _compile(source, directory, name)
        except OSError as e:  # not writable: try the next place
            last = e
    raise ProxyBuildError(f"no writable cache directory for udpproxy ({last})")


def _compile(source: Path, directory: str, name: str) -> str:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}-")
    os.close(fd)
    try:
        try:
            done = subprocess.run(["gcc", "-O2", "-Wall", "-o", tmp, str(source)], capture_output=True,
                                  text=True, timeout=COMPILE_TIMEOUT, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise ProxyBuildError("gcc not found: install gcc to build the lab's udp proxy") from None
        except subprocess.TimeoutExpired:
            raise ProxyBuildError(f"gcc did not finish in {COMPILE_TIMEOUT:.0f} s") from None
        if done.returncode != 0:
            raise ProxyBuildError(f"gcc failed on {source}: {done.stderr.strip()[:500]}")
        binary = os.path.join(directory, name)
        os.replace(tmp, binary)
        return binary
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def encode(cmd: int, subnet: ipaddress.IPv4Network | None = None,
           next_hop: ipaddress.IPv4Address | None = None, port: int = 0) -> bytes:
    """One control command (pure)."""
    net = subnet.network_address.packed if subnet is not None else bytes(4)
    plen = subnet.prefixlen if subnet is not None else 0
    hop = next_hop.packed if next_hop is not None else bytes(4)
    return _COMMAND.pack(cmd, plen, port, net, hop)


def control_pair() -> tuple[socket.socket, socket.socket]:
    """(ours, the proxy's): the proxy's end is inherited by the proxy process."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class ProxyControl:
    """Our end of the control socket: route changes and stop, one message each."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def set_route(self, subnet: ipaddress.IPv4Network, next_hop: ipaddress.IPv4Address, port: int) -> None:
        self.sock.send(encode(CMD_SET_ROUTE, subnet, next_hop, port))

    def del_route(self, subnet: ipaddress.IPv4Network) -> None:
        self.sock.send(encode(CMD_DEL_ROUTE, subnet))

    def stop(self) -> None:
        try:
            self.sock.send(encode(CMD_STOP))
        except OSError:  # the proxy is already gone
            pass

    def close(self) -> None:
        self.sock.close()
