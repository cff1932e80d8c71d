"""Path-MTU figures: TCP through the overlay when the underlay path is, or is claimed to
be (a forged ICMP), narrower than the overlay expects.

    sudo .venv/bin/python bench/path_mtu.py [--seconds 5] [--repeat 3] [--only udpflannel]

Theory of operation. For every repetition (outer loop, so drift of a shared machine
spreads over all cases), for each overlay (two `udpflannel run` daemons with default
offloads, or kernel VXLAN programmed as flanneld's vxlan backend does) and each case
below, a fresh two-node Lab is built (every case starts from a clean route cache: a
forged PMTU lives 600 s in the kernel), node 2 is made to answer an echo over the
overlay, the case's change is applied to node 1, and one iperf3 TCP stream runs node 1
-> node 2 for --seconds:

    baseline          nothing changed
    forged-icmp       node 2 sends node 1 an ICMP "fragmentation needed" (next-hop MTU
                      552) quoting node 1's VXLAN flow (outer IP + UDP 8472 -> 8472 +
                      VXLAN header), as any host on the path could, right before the run
    route-mtu-1400    node 1 gets `route replace <node 2's underlay>/32 dev eth0 mtu 1400`
    device-mtu-1400   node 1's eth0 is set to MTU 1400 after the overlay is up (the
                      overlay device keeps its 1450: every full-size packet fragments)

Around the change and the run it reads: the daemon's engine counters (node 1), node 1's
ICMP "destination unreachable" received count (proof the forged message arrived), the
PMTU node 1's kernel now holds for node 2 (`ip route get`), and node 2's reassembled
datagrams (which cases fragment). The table shows medians; JSON goes to --out.

Exit 0 when every run worked and the path-MTU demands hold for udpflannel: after a forged
ICMP at least half the baseline with not one send error or GSO fallback and GSO still
on; TCP flows with a route MTU or device MTU of 1400, without send errors. 1 otherwise,
130 after Ctrl-C/SIGTERM (everything removed, nothing written). Needs root and iperf3.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(os.path.abspath(__file__)).parent.parent
sys.path.insert(0, str(ROOT))

from scapy.layers.inet import ICMP, IP, UDP  # noqa: E402

from udpflannel.core.wire import UDP_FRAMING_OVERHEAD, VXLAN_OVERHEAD, VXLAN_PORT, vxlan_header  # noqa: E402
from udpflannel.lab import kernelvxlan  # noqa: E402
from udpflannel.lab.bench import deferred_signals  # noqa: E402
from udpflannel.lab.benchlib import cases as benchcases  # noqa: E402
from udpflannel.lab.benchlib import parse, tools  # noqa: E402
from udpflannel.lab.cluster import Cluster  # noqa: E402
from udpflannel.lab.netns import Lab, Namespace, interrupt_on_sigterm  # noqa: E402

ENGINES = ("udpflannel", "kernel-vxlan")
CASES = ("baseline", "forged-icmp", "route-mtu-1400", "device-mtu-1400")
FORGED_MTU = 552          # the kernel's min_pmtu: the worst a forged message can claim
NARROW_MTU = 1400
VNI = 1
WATCHED = ("drop_send_error", "gso_fallbacks")   # engine counters shown in the table
# also recorded per run: proof that the run went through the offload path at all
USED = ("tx_super_packets", "tx_packets")
MIN_ICMP_RATIO = 0.5      # demanded: after a forged ICMP, at least half the baseline


# -- the two overlays -----------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    lab: Lab
    target: str                    # node 2's overlay address
    cluster: Cluster | None = None  # udpflannel only


@contextmanager
def udpflannel_pair() -> Iterator[Pair]:
    """Two daemons, default offloads, sharing an embedded registry."""
    workdir = tempfile.mkdtemp(prefix="uf-pmtu-")
    try:
        with Lab(2, tag="ufm") as lab, Cluster(lab, workdir) as cluster:
            cluster.start_all()
            cluster.wait_converged(timeout=30)
            yield Pair(lab, cluster.overlay_addr(1), cluster)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def kernel_vxlan_pair() -> Iterator[Pair]:
    """flannel.1 on both nodes, exactly as udpflannel bench's kernel-vxlan case."""
    with Lab(2, tag="ufm") as lab:
        macs = (benchcases._random_mac(), benchcases._random_mac())
        for i, j in ((0, 1), (1, 0)):
            with lab.nodes[i].ipr() as ipr:
                dev = kernelvxlan.create(ipr, local_ip=lab.addresses[i], underlay="eth0",
                                         subnet=benchcases.VXLAN_SUBNETS[i], vtep_mac=macs[i],
                                         vni=VNI, port=VXLAN_PORT, name=benchcases.VXLAN_DEV,
                                         mtu=lab.mtu - VXLAN_OVERHEAD)
                kernelvxlan.add_peer(ipr, dev, subnet=benchcases.VXLAN_SUBNETS[j],
                                     vtep_mac=macs[j], public_ip=lab.addresses[j])
        yield Pair(lab, benchcases.VXLAN_SUBNETS[1].split("/")[0])


SETUPS: dict[str, Callable[[], Any]] = {"udpflannel": udpflannel_pair,
                                        "kernel-vxlan": kernel_vxlan_pair}


# -- the changes applied to node 1 -------------------------------------------------------

def forge_frag_needed(lab: Lab, mtu: int = FORGED_MTU) -> None:
    """From node 2, ICMP type 3 code 4 to node 1 quoting node 1's VXLAN flow to node 2:
    outer IP (DF, a full-size length) + UDP 8472 -> 8472 + the VXLAN header (the kernel's
    VXLAN socket checks the VNI before it accepts an error). Three copies, as a sender
    that wants it to land would."""
    a, b = lab.addresses[0], lab.addresses[1]
    vxlan = vxlan_header(VNI)
    quoted = bytes(IP(src=a, dst=b, flags="DF", len=1522)
                   / UDP(sport=VXLAN_PORT, dport=VXLAN_PORT, len=1502) / vxlan)
    icmp = bytes(ICMP(type=3, code=4, nexthopmtu=mtu) / quoted[:UDP_FRAMING_OVERHEAD + len(vxlan)])
    sock = lab.nodes[1].call(socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with sock:
        for _ in range(3):
            sock.sendto(icmp, (a, 0))


def narrow_route(lab: Lab) -> None:
    with lab.nodes[0].ipr() as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.route("replace", dst=f"{lab.addresses[1]}/32", oif=eth0, metrics={"mtu": NARROW_MTU})


def narrow_device(lab: Lab) -> None:
    lab.nodes[0].link_up("eth0", mtu=NARROW_MTU)


CHANGES: dict[str, Callable[[Lab], None] | None] = {
    "baseline": None, "forged-icmp": forge_frag_needed,
    "route-mtu-1400": narrow_route, "device-mtu-1400": narrow_device}


# -- what the kernels say ----------------------------------------------------------------

def snmp(ns: Namespace, group: str, field: str) -> int:
    """One counter of /proc/net/snmp as seen inside ``ns``."""
    def read() -> int:
        with open("/proc/thread-self/net/snmp") as f:
            head, values = [line.split() for line in f if line.startswith(group + ":")]
        return int(values[head.index(field)])
    return ns.call(read)


def route_pmtu(ns: Namespace, dst: str) -> int | None:
    """The MTU the kernel in ``ns`` now uses towards ``dst`` (a cached PMTU or a route
    metric); None when it uses the device's."""
    with ns.ipr() as ipr:
        metrics = ipr.route("get", dst=dst)[0].get_attr("RTA_METRICS")
    return metrics.get_attr("RTAX_MTU") if metrics else None


def engine_state(cluster: Cluster | None) -> dict[str, Any] | None:
    """Node 1's counters and whether GSO is on."""
    if cluster is None:
        return None
    plane = cluster.status(0).dataplane
    return {"counters": dict(plane.counters), "gso": "gso" in plane.offloads}


# -- one measurement ---------------------------------------------------------------------

def run_one(engine: str, case: str, seconds: float) -> dict[str, Any]:
    run: dict[str, Any] = {"engine": engine, "case": case}
    stack = ExitStack()
    try:
        pair: Pair = stack.enter_context(SETUPS[engine]())
        lab, node1, node2 = pair.lab, pair.lab.nodes[0], pair.lab.nodes[1]
        run["reachable_after_s"] = round(tools.wait_reachable(node1, pair.target), 2)
        before = engine_state(pair.cluster)
        unreach0 = snmp(node1, "Icmp", "InDestUnreachs")
        reasm0 = snmp(node2, "Ip", "ReasmOKs")
        change = CHANGES[case]
        if change is not None:
            change(lab)
        run["pmtu_to_node2"] = route_pmtu(node1, lab.addresses[1])
        result = parse.iperf_tcp(tools.iperf3(node1, node2, pair.target, seconds, []))
        after = engine_state(pair.cluster)
        run.update(gbps=result.gbps, retransmits=result.retransmits,
                   icmp_unreach_received=snmp(node1, "Icmp", "InDestUnreachs") - unreach0,
                   reassembled_at_node2=snmp(node2, "Ip", "ReasmOKs") - reasm0)
        if pair.cluster is not None:
            for i, proc in sorted(pair.cluster.procs.items()):
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon {i + 1} exited with {proc.returncode}")
            run["counters_before"], run["counters_after"] = before["counters"], after["counters"]
            run["gso_on_after"] = after["gso"]
            run["delta"] = {k: after["counters"].get(k, 0) - before["counters"].get(k, 0)
                            for k in WATCHED + USED}
    except Exception as e:   # recorded; the other runs still count
        run["error"] = f"{type(e).__name__}: {e}".strip()[:2000]
    finally:
        with deferred_signals():
            stack.close()
    return run


# -- figures -----------------------------------------------------------------------------

def summarize(runs: list[dict[str, Any]], engines: list[str]) -> dict[str, dict[str, Any]]:
    """Per engine and case: median Gbit/s, ratio to the engine's baseline median, and
    the worst (largest) counter movement over the repetitions."""
    out: dict[str, dict[str, Any]] = {}
    for engine in engines:
        for case in CASES:
            mine = [r for r in runs if r["engine"] == engine and r["case"] == case and "error" not in r]
            row: dict[str, Any] = {"runs": len(mine)}
            if mine:
                row["gbps"] = statistics.median(r["gbps"] for r in mine)
                row["gbps_all"] = [round(r["gbps"], 3) for r in mine]
                row["retransmits"] = statistics.median(r["retransmits"] for r in mine)
                row["pmtu_to_node2"] = mine[-1]["pmtu_to_node2"]
                row["icmp_unreach_received"] = max(r["icmp_unreach_received"] for r in mine)
                row["reassembled_at_node2"] = statistics.median(r["reassembled_at_node2"] for r in mine)
                if "delta" in mine[0]:
                    row["delta"] = {k: max(r["delta"][k] for r in mine) for k in WATCHED}
                    row["delta"]["tx_super_packets"] = min(r["delta"]["tx_super_packets"] for r in mine)
                    row["gso_on_after"] = all(r["gso_on_after"] for r in mine)
            out[f"{engine}/{case}"] = row
        base = out[f"{engine}/baseline"].get("gbps")
        for case in CASES:
            row = out[f"{engine}/{case}"]
            row["ratio"] = row["gbps"] / base if base and "gbps" in row else None
    return out


def checks(summary: dict[str, dict[str, Any]]) -> list[tuple[str, bool]]:
    """The path-MTU demands on udpflannel (kernel VXLAN is the reference, not judged)."""
    if "udpflannel/baseline" not in summary:
        return []
    icmp = summary["udpflannel/forged-icmp"]
    out = [("forged ICMP arrived at node 1", icmp.get("icmp_unreach_received", 0) > 0),
           (f"after a forged ICMP >= {MIN_ICMP_RATIO:g} x baseline",
            (icmp.get("ratio") or 0) >= MIN_ICMP_RATIO),
           ("after a forged ICMP: gso_fallbacks and drop_send_error unmoved",
            all((icmp.get("delta") or {}).get(k) == 0 for k in WATCHED)),
           ("after a forged ICMP: GSO still on", icmp.get("gso_on_after") is True),
           ("after a forged ICMP: the run used TSO super-packets",
            (icmp.get("delta") or {}).get("tx_super_packets", 0) > 0)]
    for case in ("route-mtu-1400", "device-mtu-1400"):
        row = summary[f"udpflannel/{case}"]
        out.append((f"{case}: TCP flows, no send error",
                    (row.get("gbps") or 0) > 0 and (row.get("delta") or {}).get("drop_send_error") == 0))
    return out


def render(summary: dict[str, dict[str, Any]], engines: list[str]) -> str:
    head = (f"{'overlay':<13} {'case':<16} {'Gbit/s':>7} {'ratio':>6} {'retrans':>8} "
            f"{'send err':>8} {'gso fb':>7} {'PMTU->n2':>9} {'ICMP in':>7} {'reasm n2':>9}")
    lines = [head, "-" * len(head)]
    for engine in engines:
        for case in CASES:
            row = summary[f"{engine}/{case}"]
            if "gbps" not in row:
                lines.append(f"{engine:<13} {case:<16} {'FAILED':>7}")
                continue
            d = row.get("delta")
            lines.append(
                f"{engine:<13} {case:<16} {row['gbps']:>7.2f} "
                f"{row['ratio'] if row['ratio'] is not None else float('nan'):>6.2f} "
                f"{row['retransmits']:>8.0f} "
                f"{d['drop_send_error'] if d else '-':>8} {d['gso_fallbacks'] if d else '-':>7} "
                f"{row['pmtu_to_node2'] or '-':>9} {row['icmp_unreach_received']:>7} "
                f"{row['reassembled_at_node2']:>9.0f}")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="iperf3 duration per run (default 5)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; the table shows medians (default 3)")
    parser.add_argument("--only", choices=ENGINES, help="measure one overlay only")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/path_mtu.py needs root (network namespaces, TUN)", file=sys.stderr)
        return 2
    if args.seconds < 1 or args.repeat < 1:
        print("bench/path_mtu.py: --seconds must be >= 1 and --repeat >= 1", file=sys.stderr)
        return 2
    if shutil.which("iperf3") is None:
        print("bench/path_mtu.py: iperf3 not found (apt-get install iperf3)", file=sys.stderr)
        return 2
    engines = [args.only] if args.only else list(ENGINES)
    started = dt.datetime.now(dt.timezone.utc)
    previous = interrupt_on_sigterm()
    runs: list[dict[str, Any]] = []
    total, n = args.repeat * len(engines) * len(CASES), 0
    try:
        for rep in range(1, args.repeat + 1):
            for engine in engines:
                for case in CASES:
                    n += 1
                    run = run_one(engine, case, args.seconds)
                    run["rep"] = rep
                    runs.append(run)
                    what = run.get("error") or (
                        f"{run['gbps']:.2f} Gbit/s, {run['retransmits']} retransmits, PMTU "
                        f"{run['pmtu_to_node2'] or '-'}, node 1 counters moved {run.get('delta', '-')}")
                    print(f"[{n:>2}/{total}] rep {rep} {engine:<13} {case:<16} {what}",
                          file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: namespaces, daemons and iperf3 removed; nothing written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)

    summary = summarize(runs, engines)
    verdicts = checks(summary)
    errors = [r for r in runs if "error" in r]
    doc = {"schema": "udpflannel-path-mtu/1",
           "meta": {"started": started.strftime("%Y-%m-%d %H:%M:%S UTC"), "host": platform.node(),
                    "kernel": platform.release(), "cpus": os.cpu_count(),
                    "iperf3": tools.iperf3_version(), "seconds": tools.iperf_duration(args.seconds),
                    "repeat": args.repeat, "forged_mtu": FORGED_MTU, "narrow_mtu": NARROW_MTU},
           "summary": summary, "checks": [{"check": c, "ok": ok} for c, ok in verdicts],
           "runs": runs, "ok": not errors and all(ok for _, ok in verdicts)}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "path_mtu-" + started.strftime("%Y%m%d-%H%M%S") + ".json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")

    print(f"path MTU, node 1 -> node 2, one TCP stream, {doc['meta']['seconds']} s per run, "
          f"median of {args.repeat}; {doc['meta']['kernel']}, {doc['meta']['cpus']} CPUs")
    print(render(summary, engines))
    print("ratio: to the same overlay's baseline; send err / gso fb: largest change of node 1's "
          "drop_send_error / gso_fallbacks over a run; PMTU->n2: what node 1's kernel holds for "
          "node 2 (- = the device's); ICMP in: dest-unreachable messages node 1 received; "
          "reasm n2: datagrams node 2 reassembled from fragments")
    for r in runs:
        if r["engine"] == "udpflannel" and r["case"] == "forged-icmp" and "delta" in r:
            b, a = r["counters_before"], r["counters_after"]
            print(f"udpflannel forged-icmp rep {r['rep']}, node 1 before -> after: "
                  + ", ".join(f"{k} {b.get(k, 0)} -> {a.get(k, 0)}" for k in WATCHED + USED))
    for check, ok in verdicts:
        print(f"{'ok  ' if ok else 'FAIL'} {check}")
    for r in errors:
        print(f"FAILED rep {r['rep']} {r['engine']} {r['case']}: {r['error'].splitlines()[0]}")
    print(f"wrote {path}")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
