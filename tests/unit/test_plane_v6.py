"""The engine plane's IPv6 wiring without root (dataplane/userspace.py): what the engine
is built with per family, the sockets bound on a loopback underlay (dual stack and
IPv6-only), what a takeover or warm start remembers, and how status shows the
sockets."""

from __future__ import annotations

import ipaddress
import json
import socket

import pytest

from udpflannel.core.config import parse
from udpflannel.core.status import DataplaneStatus, NodeStatus
from udpflannel.core.underlay import Underlay
from udpflannel.dataplane.base import DataplaneError, PlaneOptions
from udpflannel.dataplane.userspace import EnginePlane, engine_args, make_engine, remembered_subnets
from udpflannel.inherited import Inherited, node_state
from udpflannel.observe.metrics import families
from udpflannel.observe.statusview import render
from udpflannel.options import RunOptions

MAC, MAC6 = "02:00:00:00:00:01", "02:00:00:00:00:06"
LOOPBACK = Underlay("lo", 1, ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv4Address("127.0.0.1"), 65536,
                    ipaddress.IPv4Network("127.0.0.0/8"), ipaddress.IPv6Address("::1"), ipaddress.IPv6Address("::1"))
DUAL = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd10::/56"}
V6_ONLY = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd10::/56"}


def _free_port() -> int:
    """A port free on both loopbacks (the planes bind it in each family)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, socket.socket(socket.AF_INET6,
                                                                                    socket.SOCK_DGRAM) as b:
            a.bind(("127.0.0.1", 0))
            try:
                b.bind(("::1", a.getsockname()[1]))
            except OSError:
                continue
            return a.getsockname()[1]


def _opts(config: dict, underlay: Underlay = LOOPBACK, mac6: str | None = MAC6, **more) -> PlaneOptions:
    doc = {**config, "Backend": {"Type": "vxlan", "Port": _free_port()}}
    return PlaneOptions(config=parse(json.dumps(doc)), underlay=underlay, vtep_mac=MAC, vtep_mac6=mac6, **more)


def test_the_engine_is_built_with_the_network_of_each_family():
    args = engine_args(_opts(DUAL))
    assert (args["network"], args["subnet_len"], args["network6"], args["subnet_len6"]) == (
        "10.244.0.0/16", 24, "fd10::/56", 64)
    assert (args["vtep_mac"], args["vtep_mac6"]) == (bytes.fromhex("020000000001"), bytes.fromhex("020000000006"))
    assert engine_args(_opts(V6_ONLY))["network"] is None
    ipv4_only = engine_args(_opts({"Network": "10.244.0.0/16"}, mac6=None))
    assert "network6" not in ipv4_only and "vtep_mac6" not in ipv4_only  # an IPv4-only call, as ever


@pytest.mark.parametrize("kind", ["compiled", "python"])
@pytest.mark.parametrize("config", [DUAL, V6_ONLY], ids=["dual", "ipv6-only"])
def test_both_engines_take_the_plane_s_arguments_and_route_ipv6_to_publicipv6(kind, config):
    engine = make_engine(kind, _opts(config))
    engine.set_subnet("fd10:0:0:7::/64")
    peer_mac = bytes.fromhex("0e0000000008")
    engine.set_route("fd10:0:0:8::/64", "fd00:250::8", 8472, peer_mac)
    engine.publish()
    assert engine.lookup("fd10:0:0:8::1") == ("fd00:250::8", 8472, peer_mac)


def test_ipv6_without_its_vtep_mac_is_one_line():
    with pytest.raises(DataplaneError, match=r"^EnableIPv6 needs a VTEP MAC for IPv6 \(BackendV6Data\)$"):
        engine_args(_opts(DUAL, mac6=None))


def _bound(opts: PlaneOptions) -> EnginePlane:
    plane = EnginePlane(opts, "test", on_loop=False)
    plane._bind_all()
    return plane


def test_dual_stack_binds_a_vxlan_group_and_a_source_port_pool_per_family():
    opts = _opts(DUAL, source_ports=3, queues=2)
    plane = _bound(opts)
    try:
        port = opts.config.port
        assert [(s.family, s.getsockname()[:2]) for s in plane.vxlan6_group] == [(socket.AF_INET6, ("::1", port))] * 2
        assert [s.getsockname()[:2] for s in plane.vxlan_group] == [("127.0.0.1", port)] * 2
        assert len(plane.pool) == 3 and len(plane.pool6) == 3
        assert {s.family for s in plane.pool6} == {socket.AF_INET6}
        assert plane.status().listening == (f"VXLAN 127.0.0.1:{port}", f"VXLAN [::1]:{port}")
        assert plane._book.own_public_ipv6 == ipaddress.IPv6Address("::1")  # our own lease is no peer
    finally:
        plane.close()


def test_ipv6_only_binds_nothing_for_ipv4():
    underlay = Underlay("lo", 1, None, None, 65536, None, ipaddress.IPv6Address("::1"), ipaddress.IPv6Address("::1"))
    opts = _opts(V6_ONLY, underlay=underlay, source_ports=2)
    plane = _bound(opts)
    try:
        assert (plane.vxlan_sock, plane.vxlan_group, plane.pool, plane.udp_sock) == (None, [], [], None)
        assert plane.status().listening == (f"VXLAN [::1]:{opts.config.port}",)
        assert len(plane.pool6) == 2
    finally:
        plane.close()


def test_a_link_local_underlay_address_is_one_line():
    underlay = Underlay("lo", 1, LOOPBACK.address, LOOPBACK.public_ip, 65536, None,
                        ipaddress.IPv6Address("fe80::1"), ipaddress.IPv6Address("fe80::1"))
    plane = EnginePlane(_opts(DUAL, underlay=underlay), "test", on_loop=False)
    with pytest.raises(DataplaneError, match=r"^the underlay's IPv6 address fe80::1 is link-local: "):
        plane._bind_all()
    plane.close()


def test_ipv6_without_an_ipv6_underlay_address_is_one_line():
    underlay = Underlay("lo", 1, LOOPBACK.address, LOOPBACK.public_ip, 65536)
    plane = EnginePlane(_opts(DUAL, underlay=underlay), "test", on_loop=False)
    with pytest.raises(DataplaneError, match=r"^EnableIPv6 needs an IPv6 address on the underlay$"):
        plane._bind_all()
    plane.close()


@pytest.mark.parametrize("state, subnets", [
    ({"subnet": "10.244.7.0/24", "subnet6": "fd10:0:0:7::/64"},
     (ipaddress.IPv4Network("10.244.7.0/24"), ipaddress.IPv6Network("fd10:0:0:7::/64"))),
    ({"subnet": None, "subnet6": "fd10:0:0:7::/64"}, (None, ipaddress.IPv6Network("fd10:0:0:7::/64"))),
    ({"subnet": "10.244.7.0/24"}, (ipaddress.IPv4Network("10.244.7.0/24"), None)),  # an older daemon's
])
def test_the_remembered_subnets_of_either_family(state, subnets):
    assert remembered_subnets(state) == subnets


def test_a_takeover_or_warm_start_keeps_the_ipv6_vtep_mac_and_subnet():
    opts = _opts(DUAL)
    v4, v6 = ipaddress.IPv4Network("10.244.7.0/24"), ipaddress.IPv6Network("fd10:0:0:7::/64")
    state = json.loads(json.dumps(node_state(opts.config, LOOPBACK, MAC, v4, MAC6, v6)))
    inherited = Inherited(state, None, "--takeover")
    assert (inherited.subnets, inherited.vtep_mac6) == ((v4, v6), MAC6)
    assert inherited.plane_options(RunOptions()).vtep_mac6 == MAC6
    ipv6_only = Inherited(json.loads(json.dumps(node_state(opts.config, LOOPBACK, MAC, None, MAC6, v6))), None, "")
    assert ipv6_only.subnets == (v6,)
    older = Inherited({k: v for k, v in state.items() if k not in ("vtep_mac6", "lease_subnet6")}, None, "")
    assert (older.subnets, older.vtep_mac6) == ((v4,), None)


def test_status_and_metrics_name_the_sockets_and_an_older_daemon_s_status_still_reads():
    plane = DataplaneStatus(kind="engine", reason="test", device="flannel0", mtu=1450,
                            listening=("VXLAN 192.0.2.1:8472", "VXLAN [fd00::1]:8472"))
    st = NodeStatus(version="1", started=0.0, ready=True, dataplane=plane)
    assert NodeStatus.from_dict(json.loads(json.dumps(st.to_dict()))) == st
    assert "listening     VXLAN 192.0.2.1:8472, VXLAN [fd00::1]:8472\n" in render(st, now=1.0)
    family = next(f for f in families(st) if f.name == "udpflannel_listening_info")
    assert [(s.labels, s.value) for s in family.samples] == [
        ({"socket": "VXLAN 192.0.2.1:8472"}, 1), ({"socket": "VXLAN [fd00::1]:8472"}, 1)]
    older = st.to_dict()
    del older["dataplane"]["listening"]
    assert NodeStatus.from_dict(older).dataplane.listening == ()


@pytest.mark.parametrize("mtu, mtu6", [(1450, 1430), (1350, 1330), (8950, 8930)])
def test_the_tun_s_tso_cap_fits_one_udp_segment_send_in_either_family(mtu, mtu6):
    """The TUN has one cap (gso_max_size) for TSO4 and TSO6 super-packets: the segments
    of either, each framed in VXLAN (inner packet + 22), fit one 65,507-byte send."""
    from udpflannel.host.netconf import tso_size_for_one_send
    cap = tso_size_for_one_send(mtu, mtu6)
    assert tso_size_for_one_send(mtu) >= cap  # IPv6's longer headers only lower it
    for route_mtu, headers in ((mtu, 20 + 32), (mtu6, 40 + 32)):
        segments = -(-(cap - headers) // (route_mtu - headers))  # each carries route_mtu - headers of payload
        assert segments * (route_mtu + 22) <= 65507, (route_mtu, cap)
