"""One status schema for everything that reports on a node (pure).

The daemon builds a ``NodeStatus`` on demand; the admin socket sends it as a map
(``to_dict``), `udpflannel status` reads it back (``from_dict``) and renders it, and
the HTTP endpoints derive /metrics, /healthz and /readyz from the same object. No
other place reads status by key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from udpflannel.core.wire import COUNTERS, DROP_REASONS


@dataclass(frozen=True)
class LeaseStatus:
    subnet: str | None  # "10.244.7.0/24"; None: an IPv6-only lease
    public_ip: str
    backend_type: str  # "vxlan" or "udp"
    vtep_mac: str | None = None
    expiration: float = 0.0  # unix time; 0 when unknown
    # dual stack (absent from older daemons' maps: from_dict leaves them None)
    ipv6_subnet: str | None = None  # "fd10:0:0:7::/64"
    public_ipv6: str | None = None
    vtep_mac6: str | None = None

    @classmethod
    def from_lease(cls, lease) -> "LeaseStatus":
        """From a core.lease.Lease."""
        def text(value) -> str | None:
            return None if value is None else str(value)
        return cls(text(lease.subnet), str(lease.public_ip), lease.backend_type or "udp", lease.vtep_mac,
                   lease.expiration, text(lease.ipv6_subnet), text(lease.public_ipv6), lease.vtep_mac6)

    def describe(self) -> str:
        """The leased subnets: "10.244.7.0/24", "10.244.7.0/24 + fd10:0:0:7::/64"."""
        return " + ".join(s for s in (self.subnet, self.ipv6_subnet) if s)


@dataclass(frozen=True)
class RegistryStatus:
    kind: str  # "etcd", "embedded" or "kube"
    where: str  # endpoints and prefix, the SQLite file, or the Kubernetes API server
    reachable: bool = True
    ignored: int = 0  # entries ignored as unreadable (kube: nodes with bad flannel annotations)


@dataclass(frozen=True)
class PeerStatus:
    subnet: str
    public_ip: str
    framing: str  # "vxlan" or "udp"


@dataclass(frozen=True)
class DataplaneStatus:
    kind: str  # "engine" or "kernel"
    reason: str  # why this plane ("--dataplane engine", "auto: kernel VXLAN works", ...)
    device: str  # flannel0, flannel.1
    mtu: int
    offloads: tuple[str, ...] = ()  # in use now: "tso", "gso", "gro" (engine)
    # engine: the batched system calls the kernel has, used where an offload is missing
    # or cannot carry the packets: "sendmmsg" (several datagrams per send), "recvmmsg"
    # (a batch per receive, TCP coalesced across it); empty: one datagram per call
    batching: tuple[str, ...] = ()
    io: str = ""  # engine: how it runs, "loop" or "threads, 2 queues", and ", CPUs 0-1" if pinned
    peers: int = 0
    forwarding: bool = False  # the data path runs (readiness)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    kernel_drops: int = 0  # datagrams the kernel dropped on our socket (queue full)
    # engine: the sockets peers send to, "VXLAN 10.0.0.5:8472", "VXLAN [fd00::5]:8472"
    # (dual stack), "flanneld udp 10.0.0.5:8285"; absent from older daemons' maps
    listening: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeStatus:
    version: str
    started: float  # unix time the daemon started
    ready: bool  # subnet.env written and the data plane forwards
    lease: LeaseStatus | None = None
    registry: RegistryStatus | None = None
    dataplane: DataplaneStatus | None = None
    peer_list: tuple[PeerStatus, ...] | None = None  # only when asked for (cardinality)
    problems: tuple[str, ...] = ()  # what the daemon retries while forwarding; one line each
    pid: int = 0  # the daemon's process (after a takeover: the new one's)
    resource_errors: int = 0  # times a periodic task found no file descriptor / memory

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NodeStatus":
        """Inverse of to_dict, tolerant of keys it does not know (a newer daemon)."""
        def build(kind, value):
            if value is None:
                return None
            known = {f.name for f in fields(kind)}
            return kind(**{k: v for k, v in value.items() if k in known})
        plane = build(DataplaneStatus, d.get("dataplane"))
        if plane is not None:
            plane = DataplaneStatus(**{**asdict(plane), "offloads": tuple(plane.offloads),
                                       "batching": tuple(plane.batching), "listening": tuple(plane.listening)})
        peers = d.get("peer_list")
        return cls(version=d["version"], started=d["started"], ready=d["ready"],
                   lease=build(LeaseStatus, d.get("lease")),
                   registry=build(RegistryStatus, d.get("registry")),
                   dataplane=plane,
                   peer_list=None if peers is None else tuple(build(PeerStatus, p) for p in peers),
                   problems=tuple(d.get("problems", ())), resource_errors=d.get("resource_errors", 0),
                   pid=d.get("pid", 0))

    def drops(self) -> dict[str, int]:
        """Every drop reason, present at 0."""
        counters = self.dataplane.counters if self.dataplane else {}
        return {r: int(counters.get("drop_" + r, 0)) for r in DROP_REASONS}
