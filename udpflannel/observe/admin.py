"""The daemon's admin socket: a Unix stream socket speaking msgpack.

One request map per message: ``{"cmd": "status"}``; one reply map back. The reply
carries the lease, the route count and every engine counter, so tests, `udpflannel
status` and monitoring read the data plane without parsing logs.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any, Callable

import msgpack


class AdminSocketBusy(Exception):
    pass


async def serve(path: str, status: Callable[[], dict[str, Any]]) -> asyncio.AbstractServer:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path):
        if not _listening(path):
            os.unlink(path)  # a stale socket left by a daemon that died
        else:
            raise AdminSocketBusy(f"admin socket {path} belongs to a running daemon "
                                  "(another udpflannel on this node? use --admin-socket)")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        unpacker = msgpack.Unpacker()
        try:
            while data := await reader.read(4096):
                unpacker.feed(data)
                for request in unpacker:
                    cmd = request.get("cmd") if isinstance(request, dict) else None
                    reply = status() if cmd == "status" else {"error": f"unknown command {cmd!r}"}
                    writer.write(msgpack.packb(reply))
                    await writer.drain()
        except (ConnectionError, ValueError, msgpack.UnpackException):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path)
    os.chmod(path, 0o600)
    return server


def _listening(path: str) -> bool:
    """Whether a process listens on the socket (the kernel accepts for it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def query(path: str, cmd: str = "status", timeout: float = 5.0) -> dict[str, Any]:
    """Blocking client, for the CLI and tests."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(msgpack.packb({"cmd": cmd}))
        unpacker = msgpack.Unpacker()
        while True:
            data = s.recv(65536)
            if not data:
                raise ConnectionError("admin socket closed without a reply")
            unpacker.feed(data)
            for reply in unpacker:
                return reply
