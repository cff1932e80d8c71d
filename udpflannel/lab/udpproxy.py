"""The lab's copy of flannel's udp proxy (csrc/lab/udpproxy.c): build it, command it.

The C source is compiled on first use (lab.cbuild), so tests and the benchmark need
no build step and an edited source is rebuilt.

The agent talks to the running proxy through a SOCK_SEQPACKET pair, one fixed
12-byte command per message (layout in the C source's header comment).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

from udpflannel.lab import cbuild

SOURCE = cbuild.LAB_SOURCES / "udpproxy.c"

CMD_SET_ROUTE, CMD_DEL_ROUTE, CMD_STOP = 1, 2, 3
_COMMAND = struct.Struct("!BBH4s4s")  # cmd, prefix length, port, network, next hop


class ProxyBuildError(Exception):
    """The proxy's source is missing or does not compile; the message says which."""


def build(source: Path = SOURCE) -> str:
    """Path of the compiled proxy, compiling it if this source was never built."""
    try:
        return cbuild.build(source)
    except cbuild.BuildError as e:
        raise ProxyBuildError(str(e)) from None


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
