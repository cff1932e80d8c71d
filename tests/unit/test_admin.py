"""The admin socket stays bounded against idle or hostile local clients."""

from __future__ import annotations

import asyncio
import os
import socket
import stat

import msgpack
import pytest

from udpflannel.observe import admin


def run(coro):
    return asyncio.run(coro)


async def _connect(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(path)


async def _hung_up(reader: asyncio.StreamReader) -> bool:
    """The daemon closed the connection without a reply (EOF, or a reset when it
    closed with our request unread)."""
    try:
        return await asyncio.wait_for(reader.read(), 2) == b""
    except ConnectionResetError:
        return True


def test_answers_status_and_unknown_commands(tmp_path):
    path = str(tmp_path / "run" / "a.sock")

    async def body():
        server = await admin.serve(path, lambda: {"subnet": "10.244.1.0/24"})
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
            reply = await asyncio.to_thread(admin.query, path)
            assert reply == {"subnet": "10.244.1.0/24"}
            assert "unknown command" in (await asyncio.to_thread(admin.query, path, "nope"))["error"]
        finally:
            server.close()
    run(body())


def test_connections_are_bounded_and_idle_ones_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(admin, "IDLE_TIMEOUT", 0.3)
    path = str(tmp_path / "a.sock")

    async def body():
        server = await admin.serve(path, lambda: {"ok": True})
        try:
            idle = [await _connect(path) for _ in range(admin.MAX_CONNECTIONS)]
            await asyncio.sleep(0.05)
            # the limit is reached: one more is closed at once, without a reply
            r, w = await _connect(path)
            w.write(msgpack.packb({"cmd": "status"}))
            assert await _hung_up(r)
            # silence longer than IDLE_TIMEOUT: the daemon hangs up on every idle client
            for r, _w in idle:
                assert await _hung_up(r)
            # and the slots are free again
            assert (await asyncio.to_thread(admin.query, path)) == {"ok": True}
        finally:
            server.close()
    run(body())


def test_oversized_request_is_dropped(tmp_path):
    path = str(tmp_path / "a.sock")

    async def body():
        server = await admin.serve(path, lambda: {"ok": True})
        try:
            r, w = await _connect(path)
            w.write(msgpack.packb({"cmd": "x" * (admin.MAX_REQUEST * 4)}))
            assert await _hung_up(r)
        finally:
            server.close()
    run(body())


def test_a_running_daemons_socket_is_never_taken(tmp_path):
    path = str(tmp_path / "a.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
        s.listen()

        async def body():
            with pytest.raises(admin.AdminSocketBusy):
                await admin.serve(path, dict)
        run(body())
    assert os.path.exists(path)
