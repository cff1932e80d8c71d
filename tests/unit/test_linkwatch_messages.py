"""The link watch reads netlink messages only as far as the interface they concern."""

from __future__ import annotations

import struct

from udpflannel.host.linkwatch import RTM_DELADDR, RTM_NEWLINK, concerns

RTM_NEWROUTE = 24


def message(kind: int, index: int, payload: bytes = b"") -> bytes:
    body = struct.pack("=BBHiII", 2, 0, 1, index, 0, 0) + payload  # ifinfomsg (ifaddrmsg: same offset)
    raw = struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body
    return raw + bytes(-len(raw) % 4)


def test_a_link_or_address_message_about_a_watched_interface():
    assert concerns(message(RTM_NEWLINK, 7), {7})
    assert concerns(message(RTM_DELADDR, 7), {7})
    assert not concerns(message(RTM_NEWLINK, 8), {7})  # a pod's veth
    assert not concerns(message(RTM_NEWROUTE, 7), {7})  # not a link or address message


def test_every_message_of_a_datagram_is_looked_at():
    data = message(RTM_NEWLINK, 3, b"\x01\x02\x03") + message(RTM_NEWLINK, 4) + message(RTM_DELADDR, 7)
    assert concerns(data, {7}) and concerns(data, {4}) and not concerns(data, {5})


def test_truncated_or_garbled_data_is_not_a_change_and_never_raises():
    good = message(RTM_NEWLINK, 7)
    for data in (b"", good[:10], good[:-8], struct.pack("=IHHII", 4, RTM_NEWLINK, 0, 0, 0) + good,
                 struct.pack("=IHHII", 16, RTM_NEWLINK, 0, 0, 0)):
        assert concerns(data, {7}) is False
