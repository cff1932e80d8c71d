"""Being told when a link or its IPv4 addresses change, instead of finding out at the
next poll.

A raw NETLINK_ROUTE socket subscribed to RTMGRP_LINK and RTMGRP_IPV4_IFADDR. The
daemon only needs to know *that* its underlay changed (its MTU, its address, the
device gone): it then runs its checks, which ask netlink for the current state. So a
message is read only as far as the interface index it concerns (the same offset in
ifinfomsg and ifaddrmsg); the pods' veths coming and going wake nobody. A burst is one
wake-up, and a receive-buffer overflow (ENOBUFS: some were missed) counts as a change.
Non-blocking, for the event loop's add_reader (pyroute2's sockets do not run on uvloop).
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Collection

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR = 16, 17, 20, 21
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_INDEX_AT = _NLMSGHDR.size + 4  # ifinfomsg: family, pad, type; ifaddrmsg: family, prefixlen, flags, scope


def concerns(data: bytes, ifindexes: Collection[int]) -> bool:
    """Whether a netlink datagram holds a link or address message about one of
    ``ifindexes``. Pure: a truncated or unknown message is skipped, never raises."""
    at = 0
    while at + _NLMSGHDR.size <= len(data):
        length, kind = _NLMSGHDR.unpack_from(data, at)[:2]
        if length < _NLMSGHDR.size or at + length > len(data):
            return False
        if kind in (RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR) and length >= _INDEX_AT + 4:
            if struct.unpack_from("=i", data, at + _INDEX_AT)[0] in ifindexes:
                return True
        at += (length + 3) & ~3
    return False


class LinkWatch:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        try:
            self.sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR))
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self, ifindexes: Collection[int]) -> bool:
        """Read every pending message; whether one concerned ``ifindexes`` (or some
        were lost to a full receive buffer)."""
        changed = False
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return changed
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                changed = True
                continue
            changed = changed or concerns(data, ifindexes)

    def close(self) -> None:
        self.sock.close()
