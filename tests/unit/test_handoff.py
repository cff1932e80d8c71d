"""The takeover protocol between two daemons (dataplane/handoff.py), over a real Unix
socket: fds really pass (SCM_RIGHTS), and every way the new daemon can fail leaves
the old one told to carry on."""

from __future__ import annotations

import os
import socket
import threading

import msgpack
import pytest

from udpflannel.dataplane import handoff


class OldDaemon:
    """A listener playing the old daemon's side on a thread."""

    def __init__(self, path: str, fds: dict[str, int], tun: str = "flannel0") -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen()
        self.fds, self.tun = fds, tun
        self.outcome: tuple[bool, str] | None = None
        self.request = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            unpacker = msgpack.Unpacker(raw=False)
            unpacker.feed(conn.recv(4096))
            self.request = next(unpacker)
            why = handoff.check_request(self.request, self.tun)
            if why:
                handoff.refuse(conn, why)
                self.outcome = (False, why)
                return
            self.outcome = handoff.hand_over(conn, {"subnet": "10.244.7.0/24", "routes": list(range(5000))},
                                             self.fds, timeout=2.0)

    def join(self) -> tuple[bool, str]:
        self.thread.join(10)
        self.server.close()
        assert self.outcome is not None
        return self.outcome


@pytest.fixture
def passed_pipe():
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def test_state_and_fds_pass_and_running_lets_the_old_daemon_go(tmp_path, passed_pipe):
    r, w = passed_pipe
    old = OldDaemon(str(tmp_path / "a.sock"), {"tun0": r, "vxlan0": w})
    sock, handed = handoff.request(str(tmp_path / "a.sock"), "flannel0", "exit", "1.0")
    assert handed.state == {"subnet": "10.244.7.0/24", "routes": list(range(5000))}
    assert set(handed.fds) == {"tun0", "vxlan0"}
    # the received fds are new numbers for the same open files: write one, read the other
    got_w, got_r = handed.take("vxlan0"), handed.take("tun0")
    assert {got_w, got_r}.isdisjoint({r, w})
    os.write(got_w, b"through")
    assert os.read(r, 100) == b"through"
    os.close(got_w)
    os.close(got_r)
    handoff.confirm(sock, True)
    assert old.join() == (True, "")
    assert handoff.wait_gone(sock, 2.0)
    assert old.request == {"cmd": "takeover", "tun": "flannel0", "then": "exit", "version": "1.0"}


def test_abort_gives_the_plane_back_with_the_reason(tmp_path, passed_pipe):
    old = OldDaemon(str(tmp_path / "a.sock"), {"tun0": passed_pipe[0]})
    sock, handed = handoff.request(str(tmp_path / "a.sock"), "flannel0", "wait", "1.0")
    handed.close_rest()
    handoff.confirm(sock, False, "cannot start threads")
    assert old.join() == (False, "the new daemon gave it back: cannot start threads")
    sock.close()


def test_a_new_daemon_that_hangs_up_gives_the_plane_back(tmp_path, passed_pipe):
    old = OldDaemon(str(tmp_path / "a.sock"), {"tun0": passed_pipe[0]})
    sock, handed = handoff.request(str(tmp_path / "a.sock"), "flannel0", "exit", "1.0")
    handed.close_rest()
    sock.close()  # crashed
    ok, why = old.join()
    assert not ok and why.startswith("the new daemon did not answer")


def test_a_request_for_another_device_is_refused_and_nothing_passes(tmp_path, passed_pipe):
    old = OldDaemon(str(tmp_path / "a.sock"), {"tun0": passed_pipe[0]}, tun="flannel9")
    with pytest.raises(handoff.HandoffError, match="refused the takeover: this daemon runs flannel9, "
                                                   "not 'flannel0'"):
        handoff.request(str(tmp_path / "a.sock"), "flannel0", "exit", "1.0")
    assert old.join()[0] is False


def test_no_daemon_means_none(tmp_path):
    assert handoff.request(str(tmp_path / "nobody.sock"), "flannel0", "exit", "1.0") is None
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on: a daemon that died
    assert handoff.request(str(stale), "flannel0", "exit", "1.0") is None


@pytest.mark.parametrize("bad", [None, {"cmd": "status"}, {"cmd": "takeover", "tun": "flannel0", "then": "x"}])
def test_check_request(bad):
    assert handoff.check_request(bad, "flannel0") is not None
