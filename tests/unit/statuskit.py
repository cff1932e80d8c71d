"""NodeStatus objects for the observe tests: a busy node, a starting one; HTTP on free ports."""

from __future__ import annotations

from dataclasses import replace

from udpflannel.core.status import DataplaneStatus, LeaseStatus, NodeStatus, PeerStatus, RegistryStatus
from udpflannel.core.wire import COUNTERS
from udpflannel.lab.probe import free_port  # tests import it from here too (port 0 means 'off' to us)

STARTED = 1_700_000_000.0
EXPIRES = STARTED + 86_400.0

PEERS = (PeerStatus("10.244.10.0/24", "192.0.2.10", "vxlan"),
         PeerStatus("10.244.2.0/24", "192.0.2.2", "vxlan"),
         PeerStatus("10.244.3.0/24", "192.0.2.3", "udp"))

# Distinct values everywhere, so a swapped label or key cannot pass by accident.
BUSY_COUNTERS = {**dict.fromkeys(COUNTERS, 0),
                 "tx_packets": 1_234_567, "tx_bytes": 3 * 1024**3 + 5, "rx_packets": 7_654_321,
                 "rx_bytes": 512 * 1024**2, "icmp_unreachable": 17, "tx_super_packets": 4_001,
                 "rx_merged_writes": 3_002, "gso_fallbacks": 2, "tx_send_calls": 50_000,
                 "rx_recv_calls": 300_000, "drop_no_route": 12,
                 "drop_spoofed": 3, "drop_bad_vni": 40_000}


def busy(**changes) -> NodeStatus:
    plane = DataplaneStatus(kind="engine", reason="--dataplane engine", device="flannel0", mtu=1450,
                            offloads=("tso", "gso", "gro"), batching=("sendmmsg", "recvmmsg"),
                            io="threads, 2 queues, CPUs 0,1",
                            peers=3, forwarding=True,
                            counters=dict(BUSY_COUNTERS), kernel_drops=99)
    st = NodeStatus(version="1.2.3", started=STARTED, ready=True,
                    lease=LeaseStatus("10.244.1.0/24", "192.0.2.1", "vxlan", "0e:00:00:00:00:01", EXPIRES),
                    registry=RegistryStatus("etcd", "https://127.0.0.1:2379 /coreos.com/network", True),
                    dataplane=plane)
    return replace(st, **changes)


def starting() -> NodeStatus:
    """Just started: no registry answer yet, so no lease and no data plane."""
    return NodeStatus(version="1.2.3", started=STARTED, ready=False)


def with_counters(st: NodeStatus, **counters: int) -> NodeStatus:
    assert st.dataplane is not None
    return replace(st, dataplane=replace(st.dataplane, counters={**st.dataplane.counters, **counters}))


async def start_on_free_ports(status, *, healthz: bool = True, metrics: bool = True, shared: bool = False,
                              status_max_age: float = 0.0):
    """start_http on loopback ports the kernel just picked. Another process could take
    such a port between our pick and the bind, so a clash retries with new ports
    instead of failing the test. Each request reads a fresh status unless
    ``status_max_age`` says otherwise (the tests swap statuses between requests)."""
    from udpflannel.observe.http import HttpError, start_http
    for _ in range(5):
        hp = free_port()
        mp = hp if shared else free_port()
        try:
            return await start_http(status, healthz=("127.0.0.1", hp) if healthz else None,
                                    metrics=("127.0.0.1", mp) if metrics else None,
                                    status_max_age=status_max_age)
        except HttpError as e:
            if "in use" not in str(e):
                raise
    raise AssertionError("no free loopback port in 5 tries")
