"""Turn what the measuring tools print into numbers. Pure: text in, values out.

Every parser raises ``ParseError`` (a ValueError) on input it does not understand,
so a bench step can report "iperf3 said X" instead of a KeyError.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any


class ParseError(ValueError):
    pass


@dataclass(frozen=True)
class TcpResult:
    gbps: float           # goodput as counted by the receiver
    retransmits: int      # sender side, summed over streams
    streams: int
    congestion: str = ""  # the sender's TCP congestion control


@dataclass(frozen=True)
class UdpResult:
    sent: int             # datagrams the client sent
    received: int         # datagrams the server got
    seconds: float        # the server's measuring interval
    loss_pct: float       # iperf3's own figure (lost / sent)

    @property
    def received_pps(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0

    @property
    def sent_pps(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def _iperf_end(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        snippet = text.strip()[:200] or "(no output)"
        raise ParseError(f"iperf3 output is not JSON ({e}): {snippet}") from None
    if not isinstance(doc, dict):
        raise ParseError("iperf3 output is not a JSON object")
    if doc.get("error"):
        raise ParseError(f"iperf3: {doc['error']}")
    end = doc.get("end")
    if not isinstance(end, dict) or not end:
        raise ParseError("iperf3 output has no 'end' section (test did not finish)")
    return end


def iperf_tcp(text: str) -> TcpResult:
    """``iperf3 -c ... -J`` (TCP): receiver-side Gbit/s and sender retransmits."""
    end = _iperf_end(text)
    try:
        received = end["sum_received"]
        sent = end["sum_sent"]
        return TcpResult(gbps=float(received["bits_per_second"]) / 1e9,
                         retransmits=int(sent.get("retransmits", 0)),
                         streams=len(end.get("streams", [])) or 1,
                         congestion=str(end.get("sender_tcp_congestion", "")))
    except (KeyError, TypeError, ValueError) as e:
        raise ParseError(f"iperf3 TCP result lacks {e}") from None


def iperf_udp(text: str) -> UdpResult:
    """``iperf3 -c ... -u -J``: datagrams sent and received, from the server's count.

    iperf3 ≥ 3.11 has ``sum_received``; older ones put the server's view in ``sum``.
    """
    end = _iperf_end(text)
    summary = end.get("sum_received") or end.get("sum")
    if not isinstance(summary, dict):
        raise ParseError("iperf3 UDP result has neither 'sum_received' nor 'sum'")
    try:
        packets = int(summary["packets"])
        lost = int(summary["lost_packets"])
        seconds = float(summary["seconds"])
        loss = float(summary.get("lost_percent", 100.0 * lost / packets if packets else 0.0))
    except (KeyError, TypeError, ValueError) as e:
        raise ParseError(f"iperf3 UDP result lacks {e}") from None
    return UdpResult(sent=packets, received=max(packets - lost, 0), seconds=seconds,
                     loss_pct=loss)


_PING_REPLY = re.compile(r"icmp_seq=(\d+)\b.*?\btime=([0-9.]+) ms")
_PING_SENT = re.compile(r"(\d+) packets transmitted")


@dataclass(frozen=True)
class PingResult:
    sent: int
    rtts_ms: tuple[float, ...]   # one per answered sequence number, in order

    @property
    def loss_pct(self) -> float:
        return 100.0 * (self.sent - len(self.rtts_ms)) / self.sent if self.sent else 100.0


def ping_output(text: str) -> PingResult:
    """iputils ``ping -n`` per-packet output (not -q): RTT of each reply, duplicates dropped."""
    seen: dict[int, float] = {}
    for line in text.splitlines():
        m = _PING_REPLY.search(line)
        if m and "DUP!" not in line:
            seen.setdefault(int(m.group(1)), float(m.group(2)))
    sent_m = _PING_SENT.search(text)
    if sent_m is None:
        raise ParseError("ping printed no summary ('N packets transmitted')")
    return PingResult(sent=int(sent_m.group(1)), rtts_ms=tuple(seen[k] for k in sorted(seen)))


@dataclass(frozen=True)
class FlowsResult:
    """``udpecho flows``: closed-loop request/response over many UDP flows."""
    transactions: int     # requests answered
    seconds: float        # how long the client ran
    p50_us: float         # RTT percentiles of the answered requests
    p99_us: float
    lost: int             # requests unanswered for 200 ms (given up and sent again)
    late: int             # answers that came after their request was given up

    @property
    def tps(self) -> float:
        return self.transactions / self.seconds if self.seconds > 0 else 0.0


def udp_flows(text: str) -> FlowsResult:
    """The summary line of ``udpecho flows``:
    ``transactions=N seconds=S p50_us=X p99_us=Y lost=L late=K``."""
    lines = [ln for ln in text.splitlines() if ln.startswith("transactions=")]
    if not lines:
        raise ParseError(f"udpecho flows printed no summary: {text.strip()[:200] or '(no output)'}")
    fields = {}
    for item in lines[-1].split():
        key, _, value = item.partition("=")
        fields[key] = value
    try:
        r = FlowsResult(transactions=int(fields["transactions"]), seconds=float(fields["seconds"]),
                        p50_us=float(fields["p50_us"]), p99_us=float(fields["p99_us"]),
                        lost=int(fields["lost"]), late=int(fields["late"]))
    except KeyError as e:
        raise ParseError(f"udpecho flows summary lacks {e}") from None
    except ValueError as e:
        raise ParseError(f"udpecho flows summary: {e}") from None
    if r.transactions == 0:   # (its percentiles are then -1: none measured)
        raise ParseError(f"no request answered in {r.seconds:g} s ({r.lost} given up after 200 ms)")
    return r


def proc_cpu_ticks(stat_text: str) -> int:
    """utime + stime (clock ticks) from /proc/<pid>/stat; the name in parentheses may
    hold spaces and parentheses, so split after the last ')'."""
    close = stat_text.rfind(")")
    if close < 0:
        raise ParseError("not a /proc/<pid>/stat line")
    fields = stat_text[close + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    try:
        return int(fields[11]) + int(fields[12])
    except (IndexError, ValueError):
        raise ParseError("truncated /proc/<pid>/stat line") from None


def proc_status_kib(status_text: str, key: str = "VmHWM") -> int:
    """A ``kB`` field of /proc/<pid>/status, e.g. VmHWM (peak resident set)."""
    for line in status_text.splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            parts = rest.split()
            if parts and parts[0].isdigit():
                return int(parts[0])
    raise ParseError(f"no {key} in /proc/<pid>/status")


def host_cpu_ticks(proc_stat_text: str) -> tuple[int, int]:
    """(busy, total) clock ticks over all CPUs from the ``cpu`` line of /proc/stat.
    Busy excludes idle and iowait; guest time is already inside user."""
    for line in proc_stat_text.splitlines():
        if line.startswith("cpu "):
            v = [int(x) for x in line.split()[1:]]
            v += [0] * (8 - len(v))
            user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
            busy = user + nice + system + irq + softirq + steal
            return busy, busy + idle + iowait
    raise ParseError("no 'cpu' line in /proc/stat")


def listening_tcp_ports(proc_net_tcp_text: str) -> set[int]:
    """Ports in state LISTEN (0A) in /proc/<pid>/net/tcp or tcp6 (a namespace's view)."""
    ports: set[int] = set()
    for line in proc_net_tcp_text.splitlines()[1:]:
        parts = line.split()
        if len(parts) > 3 and parts[3] == "0A" and ":" in parts[1]:
            ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports
