"""The data-plane contract: what the daemon needs from a way of forwarding packets.

Two implementations: the userspace engine (TUN + compiled engine, ``userspace``) and
the kernel's VXLAN device programmed as flanneld does (``kernel``). Both apply the
same lease events through the same policy (core.peers), so a node's peers cannot
tell which one it runs. The life cycle, driven by the daemon:

    prepare()        before any lease is taken: sockets bound, devices that need no
                     subnet created, so a busy port or a missing module costs no lease
    start(lease)     the node's subnet on the device; forwarding from here on
    apply(events)    lease events -> routes (the first batch is the registry's snapshot)
    check()          every few seconds: a device deleted under us comes back, offload
                     changes are logged
    stop()           leaves every device, route and neighbour in place, so a restart or
                     an upgrade is no outage; removing them is ``cleanup``'s job
    pause_for_handoff()  stop reading, keep every fd: (state, fds by role) for a new
                     daemon taking over (dataplane/handoff.py); resume() if it falls
                     through
    status()         the plane's part of the one status schema

``failed`` completes with an exception when the data path breaks for good.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from udpflannel.core.config import NetworkConfig
from udpflannel.core.errors import UdpflannelError
from udpflannel.core.lease import Lease, LeaseEvent
from udpflannel.core.status import DataplaneStatus, PeerStatus
from udpflannel.core.underlay import Underlay
from udpflannel.core.wire import UDP_FRAMING_OVERHEAD, UDP_PORT, VXLAN_OVERHEAD

if TYPE_CHECKING:  # a warm start loads this before asyncio
    import asyncio

ENGINE, KERNEL, AUTO = "engine", "kernel", "auto"
KINDS = (ENGINE, KERNEL, AUTO)


class DataplaneError(UdpflannelError):
    """The data plane cannot run; the message says why in one line."""


@dataclass(frozen=True)
class PlaneOptions:
    """What both planes are built from (the daemon's options, resolved)."""
    config: NetworkConfig
    underlay: Underlay
    vtep_mac: str
    tun: str = "flannel0"  # engine: the TUN device's name
    engine: str = "compiled"  # engine: "compiled" or "python" (the twin)
    offloads: frozenset[str] = frozenset()  # engine: wanted ("tso", "gso", "gro")
    udp_port: int | None = UDP_PORT  # flanneld udp framing for udp peers (None: off)
    source_ports: int = 16  # engine: VXLAN outer source ports (one socket each; 0: one port)
    strict_source: bool = False
    io: str = "loop"  # engine: "loop" (the event loop drains), "threads" or "poll" (its own threads)
    queues: int = 1  # engine, threads or poll: TUN queues and VXLAN sockets, their threads each
    cpus: tuple[int, ...] = ()  # engine: CPUs its data path is pinned to (() unpinned)
    vtep_mac6: str | None = None  # kernel, EnableIPv6: flannel-v6.<VNI>'s MAC

    @property
    def mtu(self) -> int:
        """The underlay's MTU minus the framing: 50 for VXLAN (outer IPv4, UDP, VXLAN,
        inner Ethernet), 28 for flanneld's udp (outer IPv4 and UDP). A vxlan config's
        Backend.MTU stands for the underlay's, as in flanneld (its flannel.<VNI> gets
        MTU - 50); the udp backend has no MTU setting."""
        if self.config.backend_type == "udp":
            return self.underlay.mtu - UDP_FRAMING_OVERHEAD
        return (self.config.mtu or self.underlay.mtu) - VXLAN_OVERHEAD


class DataPlane(Protocol):
    kind: str
    reason: str

    @property
    def failed(self) -> asyncio.Future[None]: ...

    async def prepare(self) -> None: ...

    async def start(self, lease: Lease) -> None: ...

    async def apply(self, events: list[LeaseEvent]) -> None: ...

    async def check(self) -> None: ...

    async def stop(self) -> None: ...

    def status(self) -> DataplaneStatus: ...

    def peers(self) -> tuple[PeerStatus, ...]: ...

    def pause_for_handoff(self) -> tuple[dict, dict[str, int]]: ...

    def resume(self) -> None: ...


def on_link(underlay: Underlay, peer: ipaddress.IPv4Address | ipaddress.IPv6Address, gateway: str | None,
            oif: int | None) -> bool:
    """DirectRouting's test, as flanneld's: the peer's PublicIP (PublicIPv6) is reached
    on our underlay interface without a gateway."""
    return gateway is None and oif == underlay.ifindex and peer not in (underlay.address, underlay.address6)
