"""`udpflannel status` output: a table for people, JSON for machines (pure).

Both read one NodeStatus (core/status.py). The table shows what an operator asks
first: is the node ready and if not why, which lease, which data plane and why, is the
registry reachable, how much traffic, and which drops (only the non-zero ones).
"""

from __future__ import annotations

import ipaddress
import json
import math
import time

from udpflannel.core.status import NodeStatus
from udpflannel.core.wire import TX_DROPS


def not_ready_reason(st: NodeStatus) -> str | None:
    """None when ready; otherwise one line saying what the node still waits for."""
    if st.ready:
        return None
    if st.problems:
        return "; ".join(st.problems)
    if st.lease is None:
        return "no subnet lease yet (waiting for the registry and its network config)"
    if st.dataplane is None:
        return f"leased {st.lease.describe()} but the data plane is not set up yet"
    if not st.dataplane.forwarding:
        return f"the {st.dataplane.kind} data plane on {st.dataplane.device} is not forwarding"
    return "subnet.env is not written yet"


def to_json(st: NodeStatus) -> str:
    """Sorted keys: the same status always prints the same text (diffable, greppable).
    A reservation's expiration (infinite) is written as null: JSON has no infinity."""
    return json.dumps(_finite(st.to_dict()), indent=2, sort_keys=True)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    if n < 10_000:
        return str(n)
    value = float(n)
    for unit in ("k", "M", "G", "T"):
        value /= 1000
        if value < 1000 or unit == "T":
            return f"{value:.1f}{unit}"
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    s = int(abs(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{s}s"


def _expiry(expiration: float, now: float) -> str:
    if expiration <= 0:
        return "expiry unknown"
    if math.isinf(expiration):
        return "a reservation (no TTL, never expires)"
    left = expiration - now
    return f"expires in {human_duration(left)}" if left >= 0 else f"EXPIRED {human_duration(left)} ago"


def _per_call(packets: int, calls: int) -> str:
    return f"{packets / calls:.1f}" if calls else "-"


def _batching(plane) -> str:
    """The engine's batched calls, and how many packets each send and receive call
    has carried on average: what offloads and batching achieve together."""
    c = plane.counters
    used = ", ".join(plane.batching) or "none (one datagram per system call)"
    return (f"{used}; packets per call: {_per_call(int(c.get('tx_packets', 0)), int(c.get('tx_send_calls', 0)))}"
            f" sent, {_per_call(int(c.get('rx_packets', 0)), int(c.get('rx_recv_calls', 0)))} received")


def render(st: NodeStatus, now: float | None = None) -> str:
    """The human table. ``now`` (unix time) is injectable so tests are exact."""
    now = time.time() if now is None else now
    rows: list[tuple[str, str]] = []
    reason = not_ready_reason(st)
    rows.append(("ready", "yes" if reason is None else f"no: {reason}"))
    rows.append(("version", f"{st.version}, up {human_duration(now - st.started)}"))

    lease = st.lease
    if lease is None:
        rows.append(("lease", "none yet"))
    else:
        mac = f", VTEP MAC {lease.vtep_mac}" if lease.vtep_mac else ""
        kube = st.registry is not None and st.registry.kind == "kube"
        expiry = "the node's podCIDR (no expiry)" if kube else _expiry(lease.expiration, now)
        if lease.subnet is not None:
            rows.append(("lease", f"{lease.subnet} via {lease.public_ip} ({lease.backend_type}{mac}), {expiry}"))
        if lease.ipv6_subnet is not None:
            mac6 = f", VTEP MAC {lease.vtep_mac6}" if lease.vtep_mac6 else ""
            rows.append(("lease" if lease.subnet is None else "IPv6 lease",
                         f"{lease.ipv6_subnet} via {lease.public_ipv6} ({lease.backend_type}{mac6})"
                         + ("" if lease.subnet is not None else f", {expiry}")))

    reg = st.registry
    if reg is None:
        rows.append(("registry", "not opened yet"))
    else:
        ignored = f", {reg.ignored} entries ignored" if reg.ignored else ""
        rows.append(("registry", f"{reg.kind} {reg.where}, "
                                 f"{'reachable' if reg.reachable else 'UNREACHABLE (still forwarding)'}{ignored}"))

    plane = st.dataplane
    if plane is None:
        rows.append(("data plane", "not started"))
    else:
        rows.append(("data plane", f"{plane.kind} ({plane.reason})"))
        rows.append(("device", f"{plane.device}, MTU {plane.mtu}"))
        rows.append(("offloads", ", ".join(plane.offloads) or "none"))
        if plane.kind == "engine":
            rows.append(("batching", _batching(plane)))
        if plane.io:
            rows.append(("I/O", plane.io))
        if plane.listening:
            rows.append(("listening", ", ".join(plane.listening)))
        rows.append(("peers", str(plane.peers)))
        c = plane.counters
        for d in ("tx", "rx"):
            rows.append((d, f"{human_count(int(c.get(d + '_packets', 0)))} packets, "
                            f"{human_bytes(int(c.get(d + '_bytes', 0)))}"))
        rows.append(("icmp unreach", f"{human_count(int(c.get('icmp_unreachable', 0)))} sent"))
        if plane.offloads or any(c.get(k) for k in ("tx_super_packets", "rx_merged_writes", "gso_fallbacks")):
            rows.append(("offload work", f"{human_count(int(c.get('tx_super_packets', 0)))} TSO super-packets, "
                                         f"{human_count(int(c.get('rx_merged_writes', 0)))} merged writes, "
                                         f"{human_count(int(c.get('gso_fallbacks', 0)))} GSO fallbacks"))
        rows.append(("socket drops", f"{human_count(plane.kernel_drops)} by the kernel (receive queue full)"))
    if st.resource_errors:
        rows.append(("resources", f"{st.resource_errors} times out of file descriptors or memory (retried)"))
    # exact counts: a handful of drops is worth seeing precisely
    dropped = {r: n for r, n in st.drops().items() if n}
    if not dropped:
        rows.append(("drops", "no drops"))
    else:
        w = max(len(f"{n:,}") for n in dropped.values())
        for i, (r, n) in enumerate(sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))):
            rows.append(("drops" if i == 0 else "", f"{n:>{w},}  {r} ({'tx' if r in TX_DROPS else 'rx'})"))

    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if st.peer_list is not None:
        lines.append("")
        lines.extend(_peer_table(st))
    return "\n".join(lines) + "\n"


def _subnet_key(subnet: str) -> tuple[int, str]:
    """Numeric order (10.244.2.0 before 10.244.10.0); anything unparsable last."""
    try:
        return int(ipaddress.ip_network(subnet, strict=False).network_address), ""
    except ValueError:
        return 1 << 128, subnet


def _peer_table(st: NodeStatus) -> list[str]:
    peers = sorted(st.peer_list or (), key=lambda p: _subnet_key(p.subnet))
    if not peers:
        return ["no peers"]
    head = ("SUBNET", "PUBLIC IP", "FRAMING")
    body = [(p.subnet, p.public_ip, p.framing) for p in peers]
    widths = [max(len(r[i]) for r in (head, *body)) for i in range(3)]
    return ["  ".join(f"{cell:<{w}}" for cell, w in zip(r, widths)).rstrip() for r in (head, *body)]
