"""The daemon's admin socket: a Unix stream socket speaking msgpack.

One request map per message: ``{"cmd": "status"}``; one reply map back. The reply
carries the lease, the route count and every engine counter, so tests, `udpflannel
status` and monitoring read the data plane without parsing logs. ``{"cmd":
"takeover"}`` hands the connection to the daemon's takeover handler
(dataplane/handoff.py): a new daemon taking the data plane over.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any, Awaitable, Callable

import msgpack

from udpflannel.core.errors import UdpflannelError
from udpflannel.host import localstate


class AdminSocketBusy(UdpflannelError):
    pass


MAX_CONNECTIONS = 16  # concurrent clients; more are closed at once
IDLE_TIMEOUT = 10.0  # seconds a client may stay silent
MAX_REQUEST = 4096  # bytes of one request


async def serve(path: str, status: Callable[[], dict[str, Any]],
                takeover: Callable[[dict, asyncio.StreamWriter], Awaitable[None]] | None = None
                ) -> asyncio.AbstractServer:
    """Listen on ``path`` (mode 0600, in a 0700 directory it creates). Bounded: at most
    MAX_CONNECTIONS clients at a time, each dropped after IDLE_TIMEOUT seconds of
    silence or a request over MAX_REQUEST bytes, so idle or hostile local clients
    cannot pile up memory in the daemon."""
    localstate.ensure_dir(os.path.dirname(os.path.abspath(path)), 0o700)
    if os.path.exists(path):
        if not _listening(path):
            os.unlink(path)  # a stale socket left by a daemon that died
        else:
            raise AdminSocketBusy(f"admin socket {path} belongs to a running daemon "
                                  "(another udpflannel on this node? use --admin-socket)")
    clients: set[asyncio.StreamWriter] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(clients) >= MAX_CONNECTIONS:
            writer.close()
            return
        clients.add(writer)
        unpacker = msgpack.Unpacker(max_buffer_size=MAX_REQUEST)
        try:
            while data := await asyncio.wait_for(reader.read(MAX_REQUEST), IDLE_TIMEOUT):
                unpacker.feed(data)
                for request in unpacker:
                    cmd = request.get("cmd") if isinstance(request, dict) else None
                    if cmd == "takeover" and takeover is not None:
                        await takeover(request, writer)  # the connection is the handoff's now
                        return
                    reply = status() if cmd == "status" else {"error": f"unknown command {cmd!r}"}
                    writer.write(msgpack.packb(reply))
                    await asyncio.wait_for(writer.drain(), IDLE_TIMEOUT)
        except (ConnectionError, ValueError, msgpack.UnpackException, msgpack.BufferFull,
                asyncio.TimeoutError):
            pass
        except asyncio.CancelledError:  # the daemon is stopping: just hang up
            pass
        finally:
            clients.discard(writer)
            writer.close()

    server = await asyncio.start_unix_server(handle, path)
    os.chmod(path, 0o600)
    return server


def remove_socket(path: str) -> None:
    """On stop: our socket file goes (a stale one would only confuse `status`)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
