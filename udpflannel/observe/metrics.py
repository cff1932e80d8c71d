"""Prometheus metrics for one node, read from a NodeStatus at scrape time.

Theory of operation: the engine already counts every packet, byte and drop, so nothing
here is incremented on the data path. A scrape renders one NodeStatus snapshot
(``families`` is a pure function of it, so a scrape is internally consistent and
testable without a server); the HTTP thread renders, never the control loop.

Cardinality: per-peer series exist only when the status carries ``peer_list``, which
the daemon fills only when asked to (--metrics-peers); a 5,000-node cluster otherwise
costs a fixed ~40 series per node.
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from udpflannel.core.status import NodeStatus

# The classic text format (0.0.4): what every Prometheus server and agent parses. Our
# names are plain ASCII, so the body is the same as in the newer 1.0.0 text format.
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", "text/plain; version=0.0.4; charset=utf-8")

# Engine counters (core/frame.py COUNTERS) exported as their own counter family.
OFFLOAD_COUNTERS = (
    ("tx_super_packets", "udpflannel_offload_tx_super_packets",
     "TSO super-packets read from the TUN, each sent as several datagrams"),
    ("rx_merged_writes", "udpflannel_offload_rx_merged_writes",
     "TUN writes that carried several coalesced TCP segments (GRO)"),
    ("gso_fallbacks", "udpflannel_offload_gso_fallbacks",
     "UDP_SEGMENT sends that failed and were sent again datagram by datagram"),
)


def families(st: NodeStatus) -> list[Metric]:
    """Every metric family for one status snapshot (pure)."""
    plane = st.dataplane
    c = plane.counters if plane is not None else {}

    def count(key: str) -> int:
        return int(c.get(key, 0))

    packets = CounterMetricFamily("udpflannel_packets", "Overlay packets forwarded, by direction "
                                  "(tx: TUN to peers, rx: peers to TUN)", labels=["direction"])
    octets = CounterMetricFamily("udpflannel_bytes", "Bytes of the inner packets forwarded, by direction",
                                 labels=["direction"])
    for direction in ("tx", "rx"):
        packets.add_metric([direction], count(direction + "_packets"))
        octets.add_metric([direction], count(direction + "_bytes"))

    drops = CounterMetricFamily("udpflannel_drops", "Packets the data path dropped, by reason "
                                "(every reason present, at 0 when none)", labels=["reason"])
    for reason, value in st.drops().items():
        drops.add_metric([reason], value)

    out: list[Metric] = [packets, octets, drops]
    out.append(CounterMetricFamily(
        "udpflannel_icmp_unreachable", "ICMP destination-unreachable messages sent back into the TUN "
        "for packets to unleased addresses", value=count("icmp_unreachable")))
    for key, name, doc in OFFLOAD_COUNTERS:
        out.append(CounterMetricFamily(name, doc, value=count(key)))
    calls = CounterMetricFamily("udpflannel_datagram_calls", "Send (tx) and receive (rx) system calls "
                                "that carried overlay datagrams: packets over calls is what offloads "
                                "(UDP GSO/GRO) and batching (sendmmsg/recvmmsg) achieve", labels=["direction"])
    calls.add_metric(["tx"], count("tx_send_calls"))
    calls.add_metric(["rx"], count("rx_recv_calls"))
    out.append(calls)
    out.append(CounterMetricFamily(
        "udpflannel_socket_kernel_drops", "Datagrams the kernel dropped on the overlay UDP socket "
        "because its receive queue was full (SO_RXQ_OVFL)",
        value=plane.kernel_drops if plane is not None else 0))

    out.append(GaugeMetricFamily("udpflannel_peers", "Remote subnets the data plane forwards to",
                                 value=plane.peers if plane is not None else 0))
    out.append(GaugeMetricFamily(
        "udpflannel_registry_up", "1 when the last registry operation succeeded (a forwarding "
        "node stays ready while this is 0)",
        value=1 if st.registry is not None and st.registry.reachable else 0))
    out.append(CounterMetricFamily(
        "udpflannel_registry_ignored_entries", "Entries of the registry ignored as unreadable, each time "
        "seen (Kubernetes: nodes whose flannel annotations or podCIDR cannot be read as a lease)",
        value=st.registry.ignored if st.registry is not None else 0))
    if st.lease is not None and st.lease.expiration > 0:  # 0 means unknown: no false alarm
        out.append(GaugeMetricFamily("udpflannel_lease_expiry_timestamp_seconds",
                                     "Unix time at which this node's subnet lease expires (+Inf: a reservation)",
                                     value=st.lease.expiration))
    if st.lease is not None:
        lease_info = GaugeMetricFamily("udpflannel_lease_info", "Always 1; the labels are this node's lease "
                                       "(empty: that family is not leased)",
                                       labels=["subnet", "ipv6_subnet", "public_ip", "public_ipv6"])
        lease_info.add_metric([st.lease.subnet or "", st.lease.ipv6_subnet or "",
                               st.lease.public_ip if st.lease.subnet else "", st.lease.public_ipv6 or ""], 1)
        out.append(lease_info)
    out.append(GaugeMetricFamily("udpflannel_ready", "1 once subnet.env is written and the data "
                                 "plane forwards", value=1 if st.ready else 0))
    out.append(GaugeMetricFamily("udpflannel_problems", "Conditions the daemon is retrying while it "
                                 "forwards (e.g. a file it cannot write); /readyz names them",
                                 value=len(st.problems)))
    out.append(CounterMetricFamily("udpflannel_resource_errors", "Times a periodic task found no file "
                                   "descriptor or memory (EMFILE, ENFILE, ENOMEM) and retried",
                                   value=st.resource_errors))
    out.append(GaugeMetricFamily("udpflannel_start_time_seconds", "Unix time the daemon started",
                                 value=st.started))
    info = GaugeMetricFamily("udpflannel_info", "Always 1; the labels describe the daemon "
                             "(empty dataplane: not started yet; empty offloads: none)",
                             labels=["dataplane", "offloads", "version"])
    info.add_metric([plane.kind if plane is not None else "",
                     ",".join(plane.offloads) if plane is not None else "", st.version], 1)
    out.append(info)
    if plane is not None and plane.listening:
        listening = GaugeMetricFamily("udpflannel_listening_info", "Always 1; one series per UDP socket "
                                      "peers send to (engine: VXLAN over IPv4 and IPv6, flanneld udp)",
                                      labels=["socket"])
        for where in plane.listening:
            listening.add_metric([where], 1)
        out.append(listening)

    if st.peer_list is not None:
        peer = GaugeMetricFamily("udpflannel_peer_info", "Always 1; one series per remote subnet "
                                 "(only with --metrics-peers)", labels=["subnet", "public_ip", "framing"])
        for p in st.peer_list:
            peer.add_metric([p.subnet, p.public_ip, p.framing], 1)
        out.append(peer)
    return out


def http_families(accepted: int, closed: dict[str, int], accept_resource_errors: int) -> list[Metric]:
    """The HTTP listener's own counters (observe/http.py): floods show here."""
    conns = CounterMetricFamily("udpflannel_http_connections_closed", "HTTP connections closed, by why "
                                "(answered, evicted to make room, timeout, bad_request, reset)",
                                labels=["reason"])
    for reason, value in closed.items():
        conns.add_metric([reason], value)
    return [CounterMetricFamily("udpflannel_http_connections_accepted", "HTTP connections accepted",
                                value=accepted),
            conns,
            CounterMetricFamily("udpflannel_http_accept_resource_errors", "accept() calls refused for want "
                                "of file descriptors (EMFILE/ENFILE); retried", value=accept_resource_errors)]


class _Snapshot(Collector):
    def __init__(self, metric_families: list[Metric]) -> None:
        self._families = metric_families

    def collect(self) -> Iterable[Metric]:
        return self._families


def render_status(st: NodeStatus, extra: Iterable[Metric] = ()) -> bytes:
    """One status snapshot (and ``extra`` families) in the Prometheus text format
    (CONTENT_TYPE). A private CollectorRegistry: the global one would add process and
    platform collectors and make two daemons in one process (tests) collide on names."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot([*families(st), *extra]))
    return exposition.generate_latest(registry)
