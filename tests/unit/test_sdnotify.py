"""systemd's notify protocol against a real datagram socket standing in for systemd:
path and abstract ('@') addresses, and never an exception."""

from __future__ import annotations

import os
import socket

import pytest

from udpflannel.observe import sdnotify


@pytest.fixture
def systemd(tmp_path, monkeypatch):
    """A bound AF_UNIX datagram socket at a path in tmp_path, named by NOTIFY_SOCKET."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield s


def test_ready_stopping_and_status_arrive_as_datagrams(systemd):
    assert sdnotify.ready("leased 10.244.1.0/24\non flannel0")
    assert systemd.recv(4096) == b"READY=1\nSTATUS=leased 10.244.1.0/24 on flannel0"
    assert sdnotify.status("3 peers, registry etcd reachable")
    assert systemd.recv(4096) == b"STATUS=3 peers, registry etcd reachable"
    assert sdnotify.stopping()
    assert systemd.recv(4096) == b"STOPPING=1"
    assert sdnotify.stopping("leaving flannel0 in place")
    assert systemd.recv(4096) == b"STOPPING=1\nSTATUS=leaving flannel0 in place"
    assert sdnotify.ready()
    assert systemd.recv(4096) == b"READY=1"


def test_abstract_namespace_names(monkeypatch):
    name = f"udpflannel-test-{os.getpid()}-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready("up")
        assert s.recv(4096) == b"READY=1\nSTATUS=up"
        assert sdnotify.notify("WATCHDOG=1")
        assert s.recv(4096) == b"WATCHDOG=1"


def test_without_systemd_every_call_is_a_quiet_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready("x") is False
    assert sdnotify.stopping() is False
    assert sdnotify.status("x") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize("value", ["/nonexistent/dir/notify.sock", "@udpflannel-nobody-listens-here",
                                   "vsock:2:1234", "relative/path"])
def test_a_missing_or_strange_socket_never_raises(monkeypatch, value):
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.ready("x") is False
    assert sdnotify.stopping() is False


def test_a_stream_socket_in_its_place_does_not_raise(tmp_path, monkeypatch):
    path = str(tmp_path / "stream.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
        s.listen()
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sdnotify.ready() is False  # EPROTOTYPE: wrong socket type
