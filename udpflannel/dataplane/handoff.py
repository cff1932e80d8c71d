"""Taking a running data plane over from another daemon, with no gap in forwarding.

Theory of operation. An upgrade starts the new daemon with --takeover while the old
one runs. The new one connects to the old one's admin socket and asks; the old one
stops its data path from reading (its threads stop; every fd stays open), sends what
it forwards with (the TUN queue fds and UDP sockets, passed with SCM_RIGHTS, and the
state those fds were set up for: lease, config, underlay, routes) and waits. The new
daemon starts its engine on those very fds and answers "running"; the old daemon then
lets go (exits 0, or idles until it is stopped, as the new one asked). If the new one
says "abort", hangs up, or says nothing for ANSWER_TIMEOUT seconds, the old one starts
reading again and carries on: a failed upgrade costs nothing. Packets arriving in
between wait in the sockets' and the TUN's queues: they are not lost.

The wire: msgpack maps over the admin socket (a Unix stream socket). The old daemon's
one reply carries the fds as ancillary data on its first byte.

    new -> old   {"cmd": "takeover", "tun": str, "then": "exit" | "wait", "version": str}
    old -> new   {"state": {...}, "fds": [role, ...]}   + SCM_RIGHTS (one fd per role)
                 or {"error": str} and no fds
    new -> old   {"cmd": "running"} | {"cmd": "abort", "why": str}

This module is the protocol only (both ends, blocking sockets: each end runs it on a
worker thread); what the state holds and how a plane pauses, hands over and adopts
belongs to the planes.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack

from udpflannel.core.errors import UdpflannelError

ANSWER_TIMEOUT = 10.0  # seconds the old daemon waits for "running" before it resumes
CONNECT_TIMEOUT = 5.0
MAX_MESSAGE = 16 << 20  # bytes: the state of a 5,000-node cluster is well under 1 MiB
MAX_FDS = 1024
THEN = ("exit", "wait")


class HandoffError(UdpflannelError):
    """A takeover could not happen; the message says why in one line."""


@dataclass
class Handed:
    """What the new daemon received: the old plane's state and its fds by role."""
    state: dict[str, Any]
    fds: dict[str, int] = field(default_factory=dict)

    def take(self, role: str) -> int:
        """The fd for ``role``, now the caller's to close."""
        return self.fds.pop(role)

    def close_rest(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _read_message(sock: socket.socket, first: bytes = b"") -> Any:
    unpacker = msgpack.Unpacker(max_buffer_size=MAX_MESSAGE, raw=False, strict_map_key=False)
    unpacker.feed(first)
    for message in unpacker:
        return message
    while True:
        data = sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the other daemon hung up")
        unpacker.feed(data)
        for message in unpacker:
            return message


def send_message(sock: socket.socket, message: Any, fds: Sequence[int] = ()) -> None:
    data = msgpack.packb(message, use_bin_type=True)
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        data = data[sent:]
    if data:
        sock.sendall(data)


# --- the new daemon's side --------------------------------------------------------

def request(path: str, tun: str, then: str, version: str, timeout: float = CONNECT_TIMEOUT
            ) -> tuple[socket.socket, Handed] | None:
    """Ask the daemon at ``path`` for its data plane. None when no daemon listens
    there (--takeover then simply starts); the connection stays open for ``confirm``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    try:
        send_message(sock, {"cmd": "takeover", "tun": tun, "then": then, "version": version})
        data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, MAX_FDS)
        if not data:
            raise ConnectionError("the running daemon hung up (an older udpflannel without takeover?)")
        reply = _read_message(sock, data)
    except (OSError, ValueError, msgpack.UnpackException) as e:
        sock.close()
        raise HandoffError(f"taking over from the daemon at {path} failed: {e}") from None
    if not isinstance(reply, dict) or "error" in reply or "state" not in reply:
        for fd in fds:
            os.close(fd)
        sock.close()
        why = reply.get("error") if isinstance(reply, dict) else "a reply it could not read"
        raise HandoffError(f"the daemon at {path} refused the takeover: {why}")
    roles = reply.get("fds", [])
    if len(roles) != len(fds):
        for fd in fds:
            os.close(fd)
        sock.close()
        raise HandoffError(f"the daemon at {path} sent {len(fds)} fds for {len(roles)} roles")
    return sock, Handed(reply["state"], dict(zip(roles, fds)))


def confirm(sock: socket.socket, running: bool, why: str = "") -> None:
    """Tell the old daemon we forward now ("running": it lets go), or give it back."""
    try:
        send_message(sock, {"cmd": "running"} if running else {"cmd": "abort", "why": why})
    except OSError:
        pass


def wait_gone(sock: socket.socket, timeout: float) -> bool:
    """After "running": wait until the old daemon closed its end (exited or went idle,
    its admin socket and ports released). True if it did within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
        return True
    except OSError:
        return False
    finally:
        sock.close()


# --- the old daemon's side --------------------------------------------------------

def check_request(request_: Any, tun: str) -> str | None:
    """Why this takeover request cannot be served, or None."""
    if not isinstance(request_, dict) or request_.get("cmd") != "takeover":
        return "not a takeover request"
    if request_.get("tun") != tun:
        return f"this daemon runs {tun}, not {request_.get('tun')!r}"
    if request_.get("then") not in THEN:
        return f"'then' must be one of {', '.join(THEN)}"
    return None


def hand_over(sock: socket.socket, state: dict[str, Any], fds: dict[str, int],
              timeout: float = ANSWER_TIMEOUT) -> tuple[bool, str]:
    """Send ``state`` and ``fds`` and wait for the answer: (True, "") once the new
    daemon runs, else (False, why) and the caller resumes."""
    roles = list(fds)
    try:
        send_message(sock, {"state": state, "fds": roles}, [fds[r] for r in roles])
        sock.settimeout(timeout)
        answer = _read_message(sock)
    except (OSError, ValueError, msgpack.UnpackException) as e:
        return False, f"the new daemon did not answer ({e})"
    if isinstance(answer, dict) and answer.get("cmd") == "running":
        return True, ""
    why = answer.get("why", "") if isinstance(answer, dict) else ""
    return False, f"the new daemon gave it back{': ' + why if why else ''}"


def refuse(sock: socket.socket, why: str) -> None:
    try:
        send_message(sock, {"error": why})
    except OSError:
        pass

