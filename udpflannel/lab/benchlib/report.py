"""What the bench reports, and how: metrics, medians, ratios, the table, the JSON.

Pure. A *run* is one repetition of one case:
``{"rep": 1, "metrics": {key: value | None}, "steps": {...}, "errors": {step: text}}``;
a failed step leaves its metrics None. Medians ignore None; a ratio is a case's
median over the baseline's median (kernel VXLAN), None when either side is missing
or the baseline is zero.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

SCHEMA = "udpflannel-bench/1"
BASELINE = "kernel-vxlan"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    better: str                 # "higher" or "lower"
    step: str                   # the bench step that produces it
    daemon_only: bool = False   # only cases with a udpflannel daemon have it
    integer: bool = False       # a count: no decimals unless a median falls between


METRICS: tuple[Metric, ...] = (
    Metric("tcp1_gbps", "TCP 1 stream", "Gbit/s", "higher", "tcp1"),
    Metric("tcp1_retrans", "  retransmits", "segs", "lower", "tcp1", integer=True),
    Metric("tcp1_cores_per_gbps", "  daemon CPU per Gbit/s", "cores", "lower", "tcp1", daemon_only=True),
    Metric("tcp4_gbps", "TCP 4 streams", "Gbit/s", "higher", "tcp4"),
    Metric("tcp4_retrans", "  retransmits", "segs", "lower", "tcp4", integer=True),
    Metric("tcp4_cores_per_gbps", "  daemon CPU per Gbit/s", "cores", "lower", "tcp4", daemon_only=True),
    Metric("udp_kpps", "UDP 64 B received", "kpkt/s", "higher", "udp"),
    Metric("udp_loss_pct", "  loss", "%", "lower", "udp"),
    Metric("rr_ktps", "UDP 64 flows req/resp", "ktrans/s", "higher", "rr"),
    Metric("rr_p50_us", "  RTT p50", "us", "lower", "rr"),
    Metric("rr_p99_us", "  RTT p99", "us", "lower", "rr"),
    Metric("rr_lost", "  lost (200 ms unanswered)", "reqs", "lower", "rr", integer=True),
    Metric("rtt_p50_us", "ping RTT p50", "us", "lower", "ping"),
    Metric("rtt_p99_us", "ping RTT p99", "us", "lower", "ping"),
    Metric("rtt_cpu0_p50_us", "  ping on CPU 0, p50", "us", "lower", "ping0"),
    Metric("rtt_cpu0_p99_us", "  ping on CPU 0, p99", "us", "lower", "ping0"),
    Metric("echo_p50_us", "UDP echo RTT p50", "us", "lower", "echo"),
    Metric("echo_cpu0_p50_us", "  UDP echo on CPU 0, p50", "us", "lower", "echo0"),
    Metric("echo_cross_p50_us", "  UDP echo across CPUs, p50", "us", "lower", "echox"),
    Metric("restart_takeover_silence_ms", "silence: --takeover", "ms", "lower", "restart", daemon_only=True),
    Metric("restart_sigterm_silence_ms", "  stop (SIGTERM), start", "ms", "lower", "restart", daemon_only=True),
    Metric("restart_kill9_silence_ms", "  kill -9, start", "ms", "lower", "restart", daemon_only=True),
    Metric("daemon_cpu_s", "daemon CPU, both nodes", "s", "lower", "daemon", daemon_only=True),
    Metric("daemon_rss_mib", "daemon peak RSS, max node", "MiB", "lower", "daemon", daemon_only=True),
)
METRIC_KEYS = tuple(m.key for m in METRICS)


def _present(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are present; None when there are none."""
    v = sorted(_present(values))
    if not v:
        return None
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def percentile(values: Iterable[float | None], q: float) -> float | None:
    """q-th percentile (0-100), linear between closest ranks (numpy's default)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0-100")
    v = sorted(_present(values))
    if not v:
        return None
    pos = (len(v) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def run_medians(runs: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    return {k: median(r.get("metrics", {}).get(k) for r in runs) for k in METRIC_KEYS}


def ratios(medians: Mapping[str, float | None],
           base: Mapping[str, float | None] | None) -> dict[str, float | None]:
    return {k: ratio(medians.get(k), (base or {}).get(k)) for k in METRIC_KEYS}


def select_cases(names: Sequence[str], only: str | None) -> list[str]:
    """Cases named in ``only`` (comma-separated names or shell patterns such as
    ``udpflannel-*``), kept in the bench's own order. An entry matching nothing is an
    error, so a typo never silently measures less."""
    if not only:
        return list(names)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    if not wanted:
        raise ValueError("--only names no case")
    for w in wanted:
        if not any(fnmatch.fnmatchcase(n, w) for n in names):
            raise ValueError(f"--only {w!r} matches no case (cases: {', '.join(names)})")
    return [n for n in names if any(fnmatch.fnmatchcase(n, w) for w in wanted)]


def format_value(v: float | None, integer: bool = False) -> str:
    if v is None:
        return "-"
    if integer:
        return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def format_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    if r >= 100:
        return f"x{r:.0f}"
    if r >= 10:
        return f"x{r:.1f}"
    if r >= 0.1 or r == 0:
        return f"x{r:.2f}"
    return f"x{r:.2g}"


def one_line(text: str) -> str:
    """First line, plus the last one when there are more (e.g. a daemon's last log line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return ""
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def render_table(order: Sequence[str], medians: Mapping[str, Mapping[str, float | None]],
                 baselines: Mapping[str, str] | None = None) -> str:
    """Rows are metrics, columns cases; each cell is "median  x ratio-to-baseline" (a
    case's baseline: ``baselines[case]``, else BASELINE)."""
    cells: dict[str, list[tuple[str, str]]] = {}
    for case in order:
        base = medians.get((baselines or {}).get(case, BASELINE))
        rs = ratios(medians[case], base)
        cells[case] = [(format_value(medians[case].get(m.key), m.integer),
                        format_ratio(rs[m.key]) if base is not None else "")
                       for m in METRICS]
    label_w = max(len(m.label) for m in METRICS)
    unit_w = max(len(m.unit) for m in METRICS)
    lines = []
    header = f"{'':<{label_w}}  {'':<{unit_w}}"
    widths: dict[str, tuple[int, int]] = {}
    for case in order:
        vw = max(len(v) for v, _ in cells[case])
        rw = max(len(r) for _, r in cells[case])
        pad = max(len(case) - (vw + 1 + rw), 0)
        widths[case] = (vw + pad, rw)
        header += "  " + case.rjust(vw + pad + 1 + rw)
    lines.append(header.rstrip())
    for i, m in enumerate(METRICS):
        row = f"{m.label:<{label_w}}  {m.unit:<{unit_w}}"
        for case in order:
            vw, rw = widths[case]
            v, r = cells[case][i]
            row += f"  {v:>{vw}} {r:>{rw}}"
        lines.append(row.rstrip())
    return "\n".join(lines)


FLOOR_CASE = "veth"


@dataclass(frozen=True)
class Wakeup:
    """One way of counting a wakeup: a UDP echo between the veth namespaces minus a
    kernel ping there, held against each udpflannel case's ping overhead."""
    name: str          # w, wx, w0
    echo: str          # the veth echo metric
    ping: str          # the veth ping metric it is measured against
    held: str          # the udpflannel ping metric counted in it (a key of HELD_LABELS)
    where: str         # the floor line's qualifier
    echo_words: str    # how the echo ran
    ping_words: str    # how the ping ran
    meaning: str       # what 4 of them are ({name}, and {four} = 4 x the wakeup, formatted)


HELD_LABELS = {"rtt_p50_us": "ping p50", "rtt_cpu0_p50_us": "on CPU 0"}  # in a case's line
AT_LEAST = ("a round trip through two userspace nodes costs at least 4{name} = {four} us over "
            "kernel VXLAN")
WAKEUPS: tuple[Wakeup, ...] = (
    Wakeup("w", "echo_p50_us", "rtt_p50_us", "rtt_p50_us", "", "UDP echo", "kernel ping", AT_LEAST),
    Wakeup("wx", "echo_cross_p50_us", "rtt_cpu0_p50_us", "rtt_p50_us", " across CPUs",
           "UDP echo (client on CPU 0, server on CPU 1)", "kernel ping on CPU 0",
           "a wakeup that the scheduler puts on the other CPU; four of them are 4{name} = {four} us"),
    Wakeup("w0", "echo_cpu0_p50_us", "rtt_cpu0_p50_us", "rtt_cpu0_p50_us", " on CPU 0",
           "UDP echo", "kernel ping", AT_LEAST),
)


def floor(medians: Mapping[str, Mapping[str, float | None]], baseline: str = BASELINE,
          baselines: Mapping[str, str] | None = None) -> list[str]:
    """The latency floor, in words: w, one process wakeup (a compiled UDP echo minus a
    kernel ping between the same namespaces), and for each udpflannel case its ping
    overhead over kernel VXLAN as a multiple of 4w (a round trip passes the daemons
    four times; 4w is what no userspace data plane can avoid). The unpinned echo's
    two programs usually share a CPU; wx is the same echo with the server forced onto
    the other CPU, what a wakeup costs when the woken thread runs elsewhere (the
    unpinned ping is counted in it too). The ping pinned to CPU 0 is held against its
    own floor, w0: the same echo and ping on CPU 0, where a wakeup never crosses to
    another CPU, as it never does for a `-cpu0` case."""
    veth = medians.get(FLOOR_CASE, {})
    base = medians.get(baseline) or {}
    lines: list[str] = []
    units: list[tuple[Wakeup, float]] = []
    for u in WAKEUPS:
        echo, ping = veth.get(u.echo), veth.get(u.ping)
        if echo is None or ping is None:
            continue
        if echo <= ping:  # a noisy run: no wakeup to count in
            lines.append(f"floor{u.where}: not measured in this run ({u.echo_words} "
                         f"{format_value(echo)} us is not above the {u.ping_words}'s "
                         f"{format_value(ping)} us)")
            continue
        w = echo - ping
        units.append((u, w))
        lines.append(f"floor{u.where}: one wakeup {u.name} = {u.echo_words} {format_value(echo)} us "
                     f"- {u.ping_words} {format_value(ping)} us = {format_value(w)} us; "
                     + u.meaning.format(name=u.name, four=format_value(4 * w)))
    for case, m in medians.items():
        if not case.startswith("udpflannel-") or (baselines or {}).get(case, baseline) != baseline:
            continue  # (the veth floor is IPv4's: IPv6 cases are held against their own baseline)
        parts: dict[str, list[str]] = {}   # a ping and its overhead -> it in each unit
        for u, w in units:
            rtt, base_rtt = m.get(u.held), base.get(u.held)
            if rtt is None or base_rtt is None:
                continue
            over = rtt - base_rtt
            head = f"{HELD_LABELS[u.held]} {format_value(rtt)} us = kernel VXLAN + {format_value(over)} us = "
            parts.setdefault(head, []).append(f"{over / w:.1f} {u.name} ({over / (4 * w):.2f} x 4{u.name})")
        if parts:
            lines.append(f"  {case}: " + "; ".join(head + ", ".join(v) for head, v in parts.items()))
    return lines


def build_document(meta: Mapping[str, Any], cases: Mapping[str, Mapping[str, Any]],
                   baseline: str = BASELINE) -> dict[str, Any]:
    """The JSON written next to the chart: every run, plus medians and ratios.
    ``cases`` maps name -> {"description", "daemon_args", "runs": [...]}, in order, and
    optionally "baseline": the case its ratios are to (else ``baseline``)."""
    meds = {name: run_medians(c["runs"]) for name, c in cases.items()}
    baselines = {name: c.get("baseline") or baseline for name, c in cases.items()}
    out_cases = {}
    for name, c in cases.items():
        base = meds.get(baselines[name])
        out_cases[name] = {
            **{k: v for k, v in c.items() if k != "runs"},
            "median": meds[name],
            "ratio_to_baseline": ratios(meds[name], base) if base is not None else None,
            "runs": list(c["runs"]),
        }
    errors = [{"case": name, "rep": r.get("rep"), "step": step, "error": text}
              for name, c in cases.items() for r in c["runs"]
              for step, text in (r.get("errors") or {}).items()]
    return {"schema": SCHEMA, "meta": dict(meta), "baseline": baseline,
            "metrics": [asdict(m) for m in METRICS], "cases": out_cases,
            "floor": floor(meds, baseline, baselines), "errors": errors, "ok": not errors}
