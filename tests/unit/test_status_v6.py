"""The IPv6 side of a lease in the one status schema: the admin socket's map, `udpflannel
status` and /metrics; an older daemon's map (no IPv6 keys) still reads."""

from __future__ import annotations

import ipaddress

from udpflannel.core.lease import Lease
from udpflannel.core.status import LeaseStatus, NodeStatus
from udpflannel.observe import metrics, statusview

DUAL = Lease(ipaddress.IPv4Network("10.244.7.0/24"), ipaddress.IPv4Address("192.0.2.7"), "vxlan", 1,
             "02:00:00:00:00:07", 4e9, ipaddress.IPv6Network("fd10:0:0:7::/64"),
             ipaddress.IPv6Address("fd00:2::7"), 1, "06:00:00:00:00:07")
V6ONLY = Lease(None, ipaddress.IPv4Address(0), "vxlan", None, None, 4e9, ipaddress.IPv6Network("fd10:0:0:7::/64"),
               ipaddress.IPv6Address("fd00:2::7"), 1, "06:00:00:00:00:07")


def node(lease: Lease) -> NodeStatus:
    return NodeStatus(version="0.1.0", started=1.0, ready=True, lease=LeaseStatus.from_lease(lease))


def test_the_ipv6_side_round_trips_through_the_admin_map():
    st = node(DUAL)
    assert NodeStatus.from_dict(st.to_dict()) == st
    assert (st.lease.ipv6_subnet, st.lease.public_ipv6, st.lease.vtep_mac6) == ("fd10:0:0:7::/64", "fd00:2::7",
                                                                                "06:00:00:00:00:07")
    assert st.lease.describe() == "10.244.7.0/24 + fd10:0:0:7::/64"


def test_an_older_daemon_s_map_still_reads():
    old = {"version": "0.0.9", "started": 1.0, "ready": True,
           "lease": {"subnet": "10.244.7.0/24", "public_ip": "192.0.2.7", "backend_type": "vxlan",
                     "vtep_mac": "02:00:00:00:00:07", "expiration": 4e9}}
    lease = NodeStatus.from_dict(old).lease
    assert lease.subnet == "10.244.7.0/24" and lease.ipv6_subnet is None and lease.describe() == "10.244.7.0/24"


def test_status_shows_both_leases():
    text = statusview.render(node(DUAL), now=2.0)
    assert "10.244.7.0/24 via 192.0.2.7" in text and "fd10:0:0:7::/64 via fd00:2::7" in text
    only6 = statusview.render(node(V6ONLY), now=2.0)
    assert "fd10:0:0:7::/64 via fd00:2::7" in only6 and "0.0.0.0" not in only6


def test_metrics_carry_the_lease():
    text = metrics.render_status(node(DUAL)).decode()
    assert ('udpflannel_lease_info{ipv6_subnet="fd10:0:0:7::/64",public_ip="192.0.2.7",public_ipv6="fd00:2::7",'
            'subnet="10.244.7.0/24"} 1.0') in text
    text6 = metrics.render_status(node(V6ONLY)).decode()
    assert 'public_ip="",public_ipv6="fd00:2::7",subnet=""' in text6
