"""The Python engine (--engine python): core.frame's Forwarder on real fds.

The compiled engine's I/O API (attach, drain_tun / drain_udp / drain_bare, and the
calls the userspace plane makes of any engine) around the pure twin, one packet per
system call (it has no sendmmsg / recvmmsg: the counters of its send and receive
calls say one packet each). It runs in the event loop only (--io loop) and without offloads: routes
change in place between drains, there is one queue, and nothing ever waits to be
published or reclaimed. Per-packet trouble is counted like the compiled engine's:
a send or TUN write that fails undoes its tx_/rx_ counts and counts a drop.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys

from udpflannel.core.frame import DELIVER, ICMP, SEND, Forwarder, flow_index
from udpflannel.core.wire import SO_RXQ_OVFL

MAX_READ = 65535


class PyEngine(Forwarder):
    """The twin with the compiled engine's I/O API (``udpflannel._engine.Engine``)."""

    _kernel_drops = 0

    def attach(self, tun_fd: int, udp_fd: int, *, bare_fd: int = -1, tx_fds=(), udp6_fd: int = -1,
               tx6_fds=(), vnet_hdr: bool = False, gso: bool = False, gro: bool = False,
               mmsg: bool = True) -> None:
        """Give the engine its fds, as the compiled engine's attach. The twin's drains
        run without offloads (its segment/coalesce model them) and without batching
        (``mmsg`` is accepted and not used)."""
        if vnet_hdr or gso or gro:
            raise ValueError("the Python engine runs without offloads (use --offload off)")
        self._tun_fd = tun_fd
        self._sock = _dup(udp_fd)
        self._sock6 = _dup(udp6_fd)
        self._bare = _dup(bare_fd)
        self._tx = [socket.socket(fileno=os.dup(fd)) for fd in tx_fds]
        self._tx6 = [socket.socket(fileno=os.dup(fd)) for fd in tx6_fds]

    def set_bare_fd(self, bare_fd: int) -> None:
        """As the compiled engine's: speak flanneld's udp framing on bare_fd, or stop (-1)."""
        if self._bare is not None:
            self._bare.close()
        self._bare = _dup(bare_fd)

    def offloads(self) -> dict[str, bool]:
        return {"vnet_hdr": False, "gso": False, "gro": False, "sendmmsg": False, "recvmmsg": False}

    def queues(self) -> int:
        return 1

    def publish(self) -> bool:
        return False

    def reclaim(self) -> int:
        return 0

    def kernel_drops(self) -> int:
        return self._kernel_drops

    def _sender(self, packet: bytes, peer) -> socket.socket | None:
        """The socket a frame to ``peer`` leaves by (None: the port is not open)."""
        if peer[3] == "udp":  # (None while the flanneld udp port is closed)
            return self._bare
        outer6 = peer[0] >> 32 != 0xFFFF  # (keys: IPv4 in its mapped form)
        pool, main = (self._tx6, self._sock6) if outer6 else (self._tx, self._sock)
        return pool[flow_index(packet, len(pool))] if pool else main

    def drain_tun(self, budget: int) -> int:
        """Like the compiled drain: reads done, or -errno if the TUN itself failed."""
        done = 0
        while done < budget:
            try:
                packet = os.read(self._tun_fd, MAX_READ)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                return -(e.errno or errno.EIO)
            done += 1
            sent = self.encap(packet)
            if sent[0] == SEND:
                try:
                    sock = self._sender(packet, self._find(_destination(packet)))
                    if sock is None:  # the compiled engine's send on fd -1
                        raise OSError(errno.EBADF, "no socket for this peer")
                    sock.sendto(sent[1], sent[2])
                    self._c["tx_send_calls"] += 1
                except OSError:
                    self._c["tx_packets"] -= 1
                    self._c["tx_bytes"] -= len(packet)
                    self._c["drop_send_error"] += 1
            elif sent[0] == ICMP:
                _write_quietly(self._tun_fd, sent[1])
        return done

    def drain_udp(self, budget: int) -> int:
        """Like the compiled drain: reads done, or -errno if the socket itself failed."""
        return self._drain(self._sock, self.decap, budget)

    def drain_udp6(self, budget: int) -> int:
        if self._sock6 is None:
            raise RuntimeError("attach() with a udp6_fd first")
        return self._drain(self._sock6, self.decap, budget)

    def drain_bare(self, budget: int) -> int:
        if self._bare is None:
            raise RuntimeError("attach() with a bare_fd first")
        return self._drain(self._bare, self.decap_bare, budget)

    def _drain(self, sock: socket.socket | None, decap, budget: int) -> int:
        if sock is None:
            raise RuntimeError("attach() with a udp_fd first")
        done = 0
        while done < budget:
            try:
                datagram, ancillary, flags, (source, _port, *_v6) = sock.recvmsg(
                    MAX_READ, socket.CMSG_SPACE(4) * 2)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                return -(e.errno or errno.EIO)
            done += 1
            self._c["rx_recv_calls"] += 1
            for level, kind, value in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, SO_RXQ_OVFL) and len(value) >= 4:
                    self._kernel_drops = int.from_bytes(value[:4], sys.byteorder)
            if flags & socket.MSG_CTRUNC:
                self._drop("truncated")
                continue
            kind, data, _ = decap(datagram, source)
            if kind == DELIVER and not _write_quietly(self._tun_fd, data):
                self._c["rx_packets"] -= 1
                self._c["rx_bytes"] -= len(data)
                self._c["drop_tun_write_error"] += 1
        return done


def _dup(fd: int) -> socket.socket | None:
    """Our own socket object on a copy of ``fd`` (-1: None)."""
    return socket.socket(fileno=os.dup(fd)) if fd >= 0 else None


def _destination(packet: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The destination of a packet encap() sent (so a well-formed IPv4 or IPv6 one)."""
    return ipaddress.ip_address(packet[24:40] if packet[0] >> 4 == 6 else packet[16:20])


def _write_quietly(fd: int, data: bytes) -> bool:
    try:
        os.write(fd, data)
        return True
    except OSError:  # counted by the caller, like the compiled engine
        return False
