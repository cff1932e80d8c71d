"""`udpflannel status`: the human table for a busy and a starting node, and JSON that
reads back into the same NodeStatus."""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import replace

import pytest
from statuskit import EXPIRES, PEERS, STARTED, busy, starting, with_counters

from udpflannel.core.status import NodeStatus, RegistryStatus
from udpflannel.observe.statusview import human_bytes, human_count, human_duration, not_ready_reason, render, to_json

NOW = STARTED + 3 * 3600 + 125

BUSY_TABLE = """\
ready         yes
version       1.2.3, up 3h 2m
lease         10.244.1.0/24 via 192.0.2.1 (vxlan, VTEP MAC 0e:00:00:00:00:01), expires in 20h 57m
registry      etcd https://127.0.0.1:2379 /coreos.com/network, reachable
data plane    engine (--dataplane engine)
device        flannel0, MTU 1450
offloads      tso, gso, gro
I/O           threads, 2 queues, CPUs 0,1
peers         3
tx            1.2M packets, 3.0 GiB
rx            7.7M packets, 512.0 MiB
icmp unreach  17 sent
offload work  4001 TSO super-packets, 3002 merged writes, 2 GSO fallbacks
socket drops  99 by the kernel (receive queue full)
drops         40,000  bad_vni (rx)
                  12  no_route (tx)
                   3  spoofed (rx)

SUBNET          PUBLIC IP   FRAMING
10.244.2.0/24   192.0.2.2   vxlan
10.244.3.0/24   192.0.2.3   udp
10.244.10.0/24  192.0.2.10  vxlan
"""

STARTING_TABLE = """\
ready       no: no subnet lease yet (waiting for the registry and its network config)
version     1.2.3, up 3h 2m
lease       none yet
registry    not opened yet
data plane  not started
drops       no drops
"""


def test_a_busy_node_with_its_peer_list():
    assert render(busy(peer_list=PEERS), now=NOW) == BUSY_TABLE


def test_a_starting_node_without_lease_or_data_plane():
    assert render(starting(), now=NOW) == STARTING_TABLE


def test_no_drops_and_no_peer_table_by_default():
    quiet = with_counters(busy(), drop_no_route=0, drop_spoofed=0, drop_bad_vni=0)
    table = render(quiet, now=NOW)
    assert table.splitlines()[-1] == "drops         no drops"
    assert "SUBNET" not in table


def test_an_outage_and_an_expired_lease_say_so():
    st = busy(registry=RegistryStatus("embedded", "/var/lib/udpflannel/registry.db", reachable=False),
              lease=replace(busy().lease, expiration=NOW - 90))
    lines = render(st, now=NOW).splitlines()
    assert "registry      embedded /var/lib/udpflannel/registry.db, UNREACHABLE (still forwarding)" in lines
    assert lines[2].endswith("EXPIRED 1m 30s ago")
    assert render(replace(st, lease=replace(st.lease, expiration=0)), now=NOW).splitlines()[2].endswith(
        "expiry unknown")


def test_why_a_node_is_not_ready():
    plane = busy().dataplane
    assert not_ready_reason(busy()) is None
    assert "no subnet lease yet" in not_ready_reason(starting())
    assert not_ready_reason(replace(starting(), lease=busy().lease)) == \
        "leased 10.244.1.0/24 but the data plane is not set up yet"
    assert not_ready_reason(busy(ready=False, dataplane=replace(plane, forwarding=False))) == \
        "the engine data plane on flannel0 is not forwarding"
    assert not_ready_reason(busy(ready=False)) == "subnet.env is not written yet"


@pytest.mark.parametrize("st", [busy(), busy(peer_list=PEERS), busy(peer_list=()), starting()],
                         ids=["busy", "peers", "no-peers", "starting"])
def test_json_round_trip_and_stable_key_order(st):
    text = to_json(st)
    assert NodeStatus.from_dict(json.loads(text)) == st
    assert text == to_json(NodeStatus.from_dict(json.loads(text)))
    assert list(json.loads(text)) == sorted(json.loads(text))


def test_json_carries_every_field_a_machine_needs():
    d = json.loads(to_json(busy()))
    assert d["lease"]["expiration"] == EXPIRES and d["dataplane"]["kernel_drops"] == 99
    assert d["dataplane"]["counters"]["drop_bad_vni"] == 40_000 and d["peer_list"] is None


def test_human_units():
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536 * 1024, 5 * 1024**4, 2048 * 1024**4)] == \
        ["0 B", "1023 B", "1.0 KiB", "1.5 MiB", "5.0 TiB", "2048.0 TiB"]
    assert [human_count(n) for n in (0, 9_999, 10_000, 1_234_567, 5 * 10**12)] == \
        ["0", "9999", "10.0k", "1.2M", "5.0T"]
    assert [human_duration(s) for s in (0, 59, 61, 3 * 3600 + 125, 2 * 86400 + 7200)] == \
        ["0s", "59s", "1m 1s", "3h 2m", "2d 2h"]


def test_version_comes_from_the_installed_package():
    from udpflannel.version import __version__
    assert __version__ == importlib.metadata.version("udpflannel")
