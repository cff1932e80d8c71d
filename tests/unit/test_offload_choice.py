"""Which offloads are asked for, and what happens when the kernel refuses one."""

from __future__ import annotations

import socket

import pytest

from udpflannel.dataplane.sockets import UDP_GRO, UDP_SEGMENT, enable_udp_offloads, parse_offloads


@pytest.mark.parametrize("text, expected", [
    ("auto", {"tso", "gso", "gro"}), ("all", {"tso", "gso", "gro"}), ("off", set()),
    ("none", set()), ("tso", {"tso"}), ("gso,gro", {"gso", "gro"}), ("tso, gro", {"tso", "gro"}),
])
def test_parse_offloads(text, expected):
    assert parse_offloads(text) == frozenset(expected)


def test_unknown_offload_is_an_error():
    with pytest.raises(ValueError, match="unknown offload lro"):
        parse_offloads("tso,lro")


class RefusingSocket:
    """A real UDP socket whose setsockopt refuses the named UDP options."""

    def __init__(self, refuse: set[int]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.refuse = refuse

    def setsockopt(self, level, opt, value):
        if level == 17 and opt in self.refuse:
            raise OSError(92, "Protocol not available")
        return self.sock.setsockopt(level, opt, value)


@pytest.mark.parametrize("refuse, left", [
    (set(), {"gso", "gro"}), ({UDP_SEGMENT}, {"gro"}), ({UDP_GRO}, {"gso"}),
    ({UDP_SEGMENT, UDP_GRO}, set()),
])
def test_refused_udp_offloads_are_left_out(refuse, left, caplog):
    s = RefusingSocket(refuse)
    try:
        assert enable_udp_offloads(s, frozenset({"gso", "gro"})) == frozenset(left)
        assert all(n.upper() in caplog.text for n in {"gso", "gro"} - left)
    finally:
        s.sock.close()


def test_only_wanted_offloads_are_enabled():
    s = RefusingSocket(set())
    try:
        assert enable_udp_offloads(s, frozenset({"tso"})) == frozenset()
        assert s.sock.getsockopt(17, UDP_GRO) == 0
    finally:
        s.sock.close()
