"""Reachability and throughput probes between namespaces: ICMP echo, TCP (a timed or
sized stream, a payload transferred and hashed, an echoed exchange), a packet capture,
and a free port.

Sockets are created inside the namespace they belong to (Namespace.call) and used
from any thread afterwards: a socket keeps the namespace it was created in.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import cast

from udpflannel.core.wire import inet_checksum
from udpflannel.lab.netns import Namespace


def _echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, inet_checksum(head + payload), ident, seq) + payload


def ping(ns: Namespace, dst: str, count: int = 3, timeout: float = 1.0,
         interval: float = 0.0, src_addr: str | None = None) -> list[float | None]:
    """RTTs in seconds (None for a lost echo), from inside ``ns`` (from ``src_addr``
    when given, else from the address the kernel picks for the route)."""
    sock = ns.call(socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    if src_addr is not None:
        sock.bind((src_addr, 0))
    ident = os.getpid() & 0xFFFF ^ threading.get_ident() & 0xFFFF
    rtts: list[float | None] = []
    try:
        for seq in range(count):
            sock.sendto(_echo_request(ident, seq, b"udpflannel-probe"), (dst, 0))
            sent = time.perf_counter()
            rtts.append(_await_reply(sock, dst, ident, seq, sent, timeout))
            if interval:
                time.sleep(interval)
    finally:
        sock.close()
    return rtts


def _await_reply(sock: socket.socket, dst: str, ident: int, seq: int, sent: float,
                 timeout: float) -> float | None:
    deadline = sent + timeout
    while (left := deadline - time.perf_counter()) > 0:
        sock.settimeout(left)
        try:
            data, (src, _) = sock.recvfrom(2048)
        except socket.timeout:
            return None
        ihl = (data[0] & 0x0F) * 4
        if src == dst and len(data) >= ihl + 8 and data[ihl] == 0:
            if struct.unpack_from("!HH", data, ihl + 4) == (ident, seq):
                return time.perf_counter() - sent
    return None


@dataclass(frozen=True)
class TcpResult:
    bytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.bytes * 8 / self.seconds / 1e9


def tcp_stream(src: Namespace, dst: Namespace, dst_addr: str, seconds: float = 3.0,
               port: int = 5201, timeout: float = 10.0, nbytes: int | None = None,
               src_addr: str | None = None) -> TcpResult:
    """Send for ``seconds`` (or exactly ``nbytes``, however long it takes within
    ``timeout`` per socket operation) from ``src`` (from ``src_addr`` when given) to
    ``dst_addr`` (in ``dst``); bytes counted by the receiver, which also checks the
    stream's content."""
    listener = dst.call(socket.create_server, ("0.0.0.0", port))
    listener.settimeout(timeout)
    got: dict[str, object] = {}

    def receive() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(timeout)
            total, start = 0, None
            with conn:
                while chunk := conn.recv(1 << 20):
                    if start is None:
                        start = time.perf_counter()
                    # byte k of the stream is k % 256: spot-check both ends of each read
                    if chunk[0] != total % 256 or chunk[-1] != (total + len(chunk) - 1) % 256:
                        raise ValueError(f"corrupt stream near byte {total}")
                    total += len(chunk)
            got["result"] = TcpResult(total, time.perf_counter() - (start or time.perf_counter()))
        except BaseException as e:
            got["error"] = e

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    try:
        client = src.call(socket.socket)
        client.settimeout(timeout)
        if src_addr is not None:
            client.bind((src_addr, 0))
        client.connect((dst_addr, port))
        block = bytes(range(256)) * 256
        end = time.perf_counter() + seconds
        with client:
            if nbytes is not None:
                for _ in range(nbytes // len(block)):
                    client.sendall(block)
                client.sendall(block[:nbytes % len(block)])
            else:
                while time.perf_counter() < end:
                    client.sendall(block)
        receiver.join(timeout)
    finally:
        listener.close()
    if "error" in got:
        raise cast(BaseException, got["error"])  # (the thread above stores only exceptions there)
    if "result" not in got:
        raise TimeoutError("TCP receiver did not finish")
    return got["result"]  # type: ignore[return-value]


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def _serve_once(dst: Namespace, port: int, timeout: float, handle,
                family: socket.AddressFamily = socket.AF_INET) -> tuple[socket.socket, threading.Thread, dict]:
    """A listener on ``port`` in ``dst`` (of ``family``) and a thread that accepts one
    connection and gives it (with the peer's address) to ``handle``, whose result or
    error lands in the returned dict ("result" / "error")."""
    any_addr = "::" if family == socket.AF_INET6 else "0.0.0.0"
    listener = dst.call(lambda: socket.create_server((any_addr, port), family=family))
    listener.settimeout(timeout)
    got: dict[str, object] = {}

    def serve() -> None:
        try:
            conn, peer = listener.accept()
            conn.settimeout(timeout)
            with conn:
                got["result"] = handle(conn, peer)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            got["error"] = e
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread, got


def _served(got: dict) -> object:
    if "error" in got:
        raise got["error"]
    if "result" not in got:
        raise TimeoutError("the TCP server in the namespace did not finish")
    return got["result"]


def tcp_transfer(src: Namespace, dst: Namespace, dst_addr: str, payload: bytes, port: int = 5311,
                 timeout: float = 20.0) -> tuple[int, str]:
    """``payload`` over one TCP connection from ``src`` to ``dst_addr`` (in ``dst``,
    either family); (bytes received, their sha256) as the receiver counted them. Every
    socket operation has ``timeout``."""
    def receive(conn: socket.socket, _peer: object) -> tuple[int, str]:
        digest, total = hashlib.sha256(), 0
        while chunk := conn.recv(1 << 20):
            digest.update(chunk)
            total += len(chunk)
        return total, digest.hexdigest()

    listener, receiver, got = _serve_once(dst, port, timeout, receive, _family(dst_addr))
    try:
        client = src.call(socket.socket, _family(dst_addr))
        client.settimeout(timeout)
        with client:
            client.connect((dst_addr, port))
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            receiver.join(timeout)
    finally:
        listener.close()
    return _served(got)  # type: ignore[return-value]


def tcp_exchange(src: Namespace, dst: Namespace, dst_addr: str, port: int, payload: bytes,
                 timeout: float = 10.0) -> tuple[bytes, str]:
    """Send ``payload`` from ``src`` to a server in ``dst`` (``dst_addr``, either
    family) that answers it reversed; the answer, and the client address the server
    saw (masquerading shows there)."""
    def reverse(conn: socket.socket, peer: tuple[str, int]) -> str:
        data = b""
        while chunk := conn.recv(1 << 16):
            data += chunk
        conn.sendall(data[::-1])
        return peer[0]

    listener, server, got = _serve_once(dst, port, timeout, reverse, _family(dst_addr))
    try:
        client = src.call(socket.socket, _family(dst_addr))
        client.settimeout(timeout)
        with client:
            client.connect((dst_addr, port))
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := client.recv(1 << 16):
                answer += chunk
        server.join(timeout)
    finally:
        listener.close()
    return answer, _served(got)  # type: ignore[return-value]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the kernel's pick) in the caller's namespace.
    Another process may take it before it is used: callers that can, retry."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


ETH_P_ALL = 0x0003  # every protocol: what a capture wants


def packet_socket(ns: Namespace, ifname: str) -> socket.socket:
    """A non-blocking packet socket on ``ifname`` inside ``ns`` that sees both
    directions: a capture without tcpdump."""
    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((ifname, 0))
        s.setblocking(False)
        return s
    return ns.call(make)


def drain(sock: socket.socket) -> list[bytes]:
    """Every frame a non-blocking packet socket holds right now."""
    out = []
    while True:
        try:
            out.append(sock.recv(1 << 16))
        except BlockingIOError:
            return out
