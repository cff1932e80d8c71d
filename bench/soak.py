"""Soak: a 3-node udpflannel cluster on a real etcd under continuous traffic,
lease churn, junk keys and etcd restarts; does memory or fd count grow, does anything die?

    sudo .venv/bin/python bench/soak.py [--minutes 10]

Theory of operation. A Lab with four node namespaces; etcd runs in the hub namespace on
the bridge's address (as tests/integration/test_etcd_cluster.py does), so daemons reach
it over the underlay they tunnel over. Nodes 1-3 run `udpflannel run` (compiled engine,
default offloads, flannel's 24 h lease) for the whole soak. Then, on one clock:

    traffic    a thread runs back-to-back iperf3 TCP tests node 1 -> node 2 (30 s each),
               and one `ping -q -i 0.2` per ordered pair of nodes 1-3 runs throughout
    churn      node 4 starts and stops every --churn-every s (20). Its lease TTL is
               3/4 of that (renewed at half-life), so each time it is down the lease
               expires in etcd and every other node sees it leave, then come back
    junk       every 10 s, 10 keys under <prefix>/subnets/junk-N (undecodable names and
               values) are written with etcdctl and the previous 10 deleted
    etcd       stopped for 3 s and started again about every 90 s (each moved into a
               node-4 up period: see schedule_for); once, half-way, frozen with
               SIGSTOP for 5 s and continued
    samples    every 30 s, per daemon: VmRSS, VmHWM, threads (/proc/<pid>/status), open
               fds (/proc/<pid>/fd), log size, route count and engine counters

Every second it also checks that no daemon exited by itself. Runs shorter than 10
minutes shrink every period in proportion (capped at the defaults), so a 1-minute
smoke still restarts etcd twice, pauses it once and churns node 4 several times.

Everything started is stopped by pid in a `finally` (iperf3, pings, daemons, etcd),
and the namespaces are removed, also on Ctrl-C or SIGTERM (then the partial figures
are still written, marked interrupted, exit 130). Writes bench/results/soak-<time>.json
and copies the logs to bench/results/soak-<time>-logs/. Exit 0 when no daemon died, the
traffic never stopped, every pair answered pings and every node-4 start was leased,
reachable and seen by node 1 (and seen leaving). Needs root, etcd, etcdctl, iperf3, ping.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(os.path.abspath(__file__)).parent.parent
sys.path.insert(0, str(ROOT))

from udpflannel.core.status import NodeStatus  # noqa: E402
from udpflannel.lab import probe  # noqa: E402
from udpflannel.lab.bench import deferred_signals  # noqa: E402
from udpflannel.lab.benchlib import parse, tools  # noqa: E402
from udpflannel.lab.cluster import Cluster  # noqa: E402
from udpflannel.lab.etcd import ETCD, ETCDCTL, EtcdServer  # noqa: E402
from udpflannel.lab.netns import Lab, Namespace, interrupt_on_sigterm  # noqa: E402

HUB_ADDR = "192.168.250.2"
PREFIX = "/coreos.com/network"
CONFIG = '{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}'
STEADY = (0, 1, 2)          # nodes 1-3: up all the time
CHURN = 3                   # node 4: started and stopped
JUNK_PER_ROUND = 10
JUNK_VALUES = ("not json", "", '{"PublicIP":"1.2.3"}', "{" * 64, "x" * 4096)
IPERF_PORT = 5201
WARMUP = 3.0                # seconds of traffic before the first sample
TICK = 1.0                  # death check and node-4 follow-up period
SETTLE = 0.5                # pause before each sample


# -- the schedule (pure) ------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    duration: float
    sample_every: float
    churn_every: float           # node 4 toggles at churn_every, 2 x churn_every, ...
    junk_every: float
    restarts: tuple[float, ...]  # etcd stop/start times
    outage: float                # etcd down per restart
    pause_at: float | None       # etcd SIGSTOP time
    pause: float                 # SIGSTOP length
    churn_ttl: float             # node 4's lease TTL, seconds
    traffic_chunk: int           # seconds per iperf3 test

    def events(self) -> list[tuple[float, str]]:
        """(time, kind) in time order."""
        out = [(t, "sample") for t in _ticks(self.sample_every, self.duration)]
        out += [(t, "churn") for t in _ticks(self.churn_every, self.duration)]
        out += [(t, "junk") for t in _ticks(self.junk_every, self.duration)]
        out += [(t, "restart") for t in self.restarts]
        if self.pause_at is not None:
            out.append((self.pause_at, "pause"))
        return sorted(out)


def _ticks(every: float, until: float) -> list[float]:
    n = int(until // every)
    return [round(k * every, 3) for k in range(1, n + 1) if k * every < until]


def _snap(t: float, phase: float, period: float) -> float:
    """The time phase + k * period (k >= 0) nearest to t."""
    return phase + max(0, round((t - phase) / period)) * period


def schedule_for(minutes: float, churn_every: float = 20.0) -> Schedule:
    """The defaults at 10 minutes and more; a shorter run gets shorter periods (never
    longer ones) so every kind of event still happens; from 1 minute on: >= 2 etcd
    restarts, 1 pause, >= 5 node-4 toggles, >= 7 samples.

    Node 4 is up during [c(2k+1), c(2k+2)] and down during [c(2k), c(2k+1)] (c =
    churn period). An etcd restart gives every lease its full TTL again, so a restart
    while node 4 is down would keep its lease alive past its next start and node 1
    would never see it leave: restarts are moved to the middle of an up period. The
    pause goes in the middle of a down period (a frozen etcd does not extend leases:
    they expire by the clock). Nothing happens to etcd in the last stretch, so the end
    sample sees a settled cluster."""
    duration = minutes * 60
    every = min(90.0, duration / 3)
    churn = min(churn_every, max(6.0, duration / 6))
    ttl = churn * 0.75          # < the time node 4 stays down
    last = duration - max(every / 3, 10.0)
    restarts = sorted({_snap(k * every, 1.5 * churn, 2 * churn)
                       for k in range(1, int(duration // every) + 1)})
    restarts = tuple(t for t in restarts if t < last)
    pause_at: float | None = _snap(duration / 2, 0.5 * churn, 2 * churn)
    if pause_at >= last:
        pause_at = None
    return Schedule(duration=duration, sample_every=min(30.0, duration / 6),
                    churn_every=churn, junk_every=min(10.0, duration / 12),
                    restarts=restarts, outage=3.0, pause_at=pause_at,
                    pause=min(5.0, ttl / 3), churn_ttl=ttl,
                    traffic_chunk=int(min(30, max(5, duration / 4))))


# -- /proc ----------------------------------------------------------------------------------

def proc_sample(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        text = f.read()
    return {"rss_kib": parse.proc_status_kib(text, "VmRSS"),
            "hwm_kib": parse.proc_status_kib(text, "VmHWM"),
            "threads": int(re.search(r"^Threads:\s+(\d+)", text, re.M).group(1)),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def fd_kinds(pid: int) -> dict[str, int]:
    """Open fds of pid by kind ("socket", "anon_inode:[eventfd]", "/dev/net/tun", ...)."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue   # closed meanwhile
        kind = target.split(":[", 1)[0] if target.startswith(("socket:", "pipe:")) else target
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


def status_fields(st: NodeStatus) -> dict[str, Any]:
    """Route count and counters from a daemon's status."""
    return {"routes": st.dataplane.peers, "counters": dict(st.dataplane.counters)}


# -- traffic --------------------------------------------------------------------------------

class Traffic(threading.Thread):
    """Back-to-back iperf3 TCP tests src -> addr; each result (or error) is kept. Every
    process is stopped by pid in this thread's finally, within a second of stop()."""

    def __init__(self, src: Namespace, dst: Namespace, addr: str, chunk: int, clock) -> None:
        super().__init__(name="traffic", daemon=True)
        self.src, self.dst, self.addr, self.chunk, self.clock = src, dst, addr, chunk, clock
        self.results: list[dict[str, Any]] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(self.chunk + 40)

    def run(self) -> None:
        while not self._halt.is_set():
            started = self.clock()
            try:
                result = self._one()
            except Exception as e:   # recorded; the soak goes on
                result = {"error": f"{type(e).__name__}: {e}"[:500]}
                self._halt.wait(1.0)
            if result is not None:
                self.results.append({"t": round(started, 1), **result})

    def _one(self) -> dict[str, Any] | None:
        deadline = time.monotonic() + self.chunk + 30
        with tools.iperf3_server(self.dst, self.addr, IPERF_PORT, self.chunk + 30):
            client = self.src.popen(["iperf3", "-c", self.addr, "-p", str(IPERF_PORT), "-J",
                                     "-t", str(self.chunk), "--connect-timeout", "5000"],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            try:
                while True:
                    try:
                        out, err = client.communicate(timeout=0.5)
                        break
                    except subprocess.TimeoutExpired:
                        if self._halt.is_set():
                            return None   # cut short by the end of the soak: not a result
                        if time.monotonic() > deadline:
                            raise tools.ToolError(f"iperf3 still running after {self.chunk + 30} s") from None
            finally:
                tools.stop(client, grace=0.5)
        r = parse.iperf_tcp(out)
        return {"gbps": round(r.gbps, 3), "retransmits": r.retransmits}


class Pings:
    """One `ping -q` per ordered pair, output to a file; summaries parsed at the end."""

    def __init__(self) -> None:
        self.procs: dict[tuple[int, int], tuple[subprocess.Popen, str]] = {}

    def start(self, lab: Lab, addrs: dict[int, str], workdir: str, duration: float) -> None:
        for i, j in ((i, j) for i in addrs for j in addrs if i != j):
            path = os.path.join(workdir, f"ping-{i + 1}-{j + 1}.txt")
            with open(path, "w") as out:
                proc = lab.nodes[i].popen(["ping", "-q", "-n", "-i", "0.2", "-W", "1",
                                           "-w", str(int(duration) + 60), addrs[j]],
                                          stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT)
            self.procs[(i, j)] = (proc, path)

    def stop(self) -> dict[str, dict[str, Any]]:
        """SIGINT (ping prints its summary), then SIGTERM/SIGKILL by pid."""
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        out: dict[str, dict[str, Any]] = {}
        for (i, j), (proc, path) in self.procs.items():
            tools.stop(proc, grace=3.0)
            with open(path, errors="replace") as f:
                text = f.read()
            m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
            sent, got = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
            out[f"{i + 1}->{j + 1}"] = {"sent": sent, "received": got,
                                        "loss_pct": round(100 * (1 - got / sent), 2) if sent else None}
        self.procs.clear()
        return out


# -- the soak -------------------------------------------------------------------------------

class Soak:
    def __init__(self, sched: Schedule, workdir: str) -> None:
        self.sched = sched
        self.workdir = workdir
        self.t0 = time.monotonic()
        self.samples: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.deaths: list[dict[str, Any]] = []
        self.churn_periods: list[dict[str, Any]] = []
        self.node1_routes: list[tuple[float, int]] = []
        self.junk = {"put": 0, "deleted": 0, "failed": 0}
        self.junk_next = 0
        self.dead: set[int] = set()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def note(self, kind: str, **info: Any) -> None:
        self.events.append({"t": round(self.now(), 2), "event": kind, **info})
        print(f"[{self.now():7.1f} s] {kind} {' '.join(f'{k}={v}' for k, v in info.items())}",
              file=sys.stderr, flush=True)

    # set-up ------------------------------------------------------------------------------

    def start(self, stack: ExitStack) -> None:
        self.lab = stack.enter_context(Lab(4, tag="ufk"))
        self.lab.hub.link_up("br0", f"{HUB_ADDR}/24")
        self.etcd = EtcdServer(Path(self.workdir) / "etcd", host=HUB_ADDR, popen=self.lab.hub.popen)
        stack.callback(self.etcd.__exit__)   # continues a frozen etcd, then stops it by pid
        self.etcd.start()
        self.etcd.etcdctl("put", f"{PREFIX}/config", CONFIG)
        self.cluster = stack.enter_context(
            Cluster(self.lab, os.path.join(self.workdir, "nodes"), etcd_endpoints=self.etcd.endpoint,
                    extra_args=["--etcd-prefix", PREFIX]))
        for i in STEADY:
            self.cluster.start(i)
        self.cluster.wait_converged(timeout=60)
        self.addrs = {i: self.cluster.overlay_addr(i) for i in STEADY}
        for j in (1, 2):
            tools.wait_reachable(self.lab.nodes[0], self.addrs[j], timeout=15)
        ttl_min = self.sched.churn_ttl / 60
        # a renew margin over the TTL renews at half of it (the margin's range is 1-1439)
        self.churn_args = ["--subnet-lease-ttl", f"{ttl_min:.4f}", "--subnet-lease-renew-margin", "1"]
        self.t0 = time.monotonic()
        self.traffic = Traffic(self.lab.nodes[0], self.lab.nodes[1], self.addrs[1],
                               self.sched.traffic_chunk, self.now)
        self.traffic.start()
        stack.callback(self.traffic.stop)
        self.pings = Pings()
        self.ping_results: dict[str, Any] = {}
        stack.callback(self._stop_pings)   # before any is started: a failure half-way stops those
        self.pings.start(self.lab, self.addrs, self.workdir, self.sched.duration + WARMUP)
        self.note("started", nodes=len(STEADY), etcd=self.etcd.endpoint,
                  addrs=",".join(self.addrs[i] for i in STEADY))

    def _stop_pings(self) -> None:
        if self.pings.procs:
            self.ping_results = self.pings.stop()

    # the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        time.sleep(WARMUP)
        self.t0 = time.monotonic()
        self.sample("start")
        for at, kind in self.sched.events():
            self.wait_until(at)
            getattr(self, "do_" + kind)()
        self.wait_until(self.sched.duration)
        self.sample("end")

    def wait_until(self, at: float) -> None:
        while (left := at - self.now()) > 0:
            time.sleep(min(TICK, left))
            self.watch()

    def watch(self) -> None:
        """Deaths, node 4's progress, node 1's view of the peers."""
        for i, proc in list(self.cluster.procs.items()):
            if i not in self.dead and proc.poll() is not None:
                self.dead.add(i)
                self.deaths.append({"node": i + 1, "pid": proc.pid, "rc": proc.returncode,
                                    "t": round(self.now(), 1), "log_tail": self.cluster.log_tail(i, 30)})
                self.note("DEATH", node=i + 1, rc=proc.returncode)
                self.cluster.procs.pop(i)
        try:
            routes = status_fields(self.cluster.status(0))["routes"]
            if not self.node1_routes or self.node1_routes[-1][1] != routes:
                self.node1_routes.append((round(self.now(), 1), routes))
        except (OSError, ConnectionError):
            pass
        period = self.churn_periods[-1] if self.churn_periods else None
        if period and "stopped" not in period and CHURN in self.cluster.procs:
            self._follow_node4(period)

    def _follow_node4(self, period: dict[str, Any]) -> None:
        if "ready" not in period:
            try:
                st = self.cluster.status(CHURN)
            except (OSError, ConnectionError):
                return
            period["ready"] = round(self.now() - period["started"], 1)
            period["subnet"] = st.lease.subnet
        elif "reached" not in period and period.get("subnet"):
            addr = period["subnet"].split("/")[0]
            if probe.ping(self.lab.nodes[0], addr, count=1, timeout=0.5)[0] is not None:
                period["reached"] = round(self.now() - period["started"], 1)

    # events ------------------------------------------------------------------------------

    def sample(self, label: str = "") -> None:
        # watch() may just have queried node 1's admin socket; let the daemon close its
        # end of that connection, or node 1 shows one socket more than it holds
        time.sleep(SETTLE)
        row: dict[str, Any] = {"t": round(self.now(), 1), "label": label, "nodes": {}}
        for i, proc in sorted(self.cluster.procs.items()):
            try:
                node = {"pid": proc.pid, **proc_sample(proc.pid),
                        "log_bytes": os.path.getsize(os.path.join(self.cluster.node_dir(i), "daemon.log"))}
            except (OSError, parse.ParseError, AttributeError) as e:   # the process is gone
                row["nodes"][str(i + 1)] = {"pid": proc.pid, "error": f"{type(e).__name__}: {e}"}
                continue
            if label:   # start and end: what the fds are, for a leak hunt
                node["fd_kinds"] = fd_kinds(proc.pid)
            try:
                node.update(status_fields(self.cluster.status(i)))
            except (OSError, ConnectionError) as e:   # not serving yet (node 4 waiting for etcd)
                node["status_error"] = f"{type(e).__name__}: {e}"
            row["nodes"][str(i + 1)] = node
        self.samples.append(row)
        brief = ", ".join(f"n{k} gone" if "error" in v else
                          f"n{k} {v['rss_kib'] / 1024:.1f} MiB/{v['fds']} fds"
                          + (" (no status)" if "status_error" in v else "")
                          for k, v in row["nodes"].items())
        self.note("sample", what=label or "-", nodes=f"[{brief}]")

    def do_sample(self) -> None:
        self.sample()

    def do_churn(self) -> None:
        if CHURN in self.cluster.procs:
            rc = self.cluster.stop(CHURN)
            period = self.churn_periods[-1]
            period.update(stopped=round(self.now(), 1), rc=rc)
            self.note("node4-stop", rc=rc, ready_after=period.get("ready"),
                      reached_after=period.get("reached"))
        elif CHURN not in self.dead:
            proc = self.cluster.start(CHURN, self.churn_args)
            self.churn_periods.append({"started": round(self.now(), 1), "pid": proc.pid})
            self.note("node4-start", pid=proc.pid)

    def do_junk(self) -> None:
        old = self.junk_next
        for n in range(self.junk_next, self.junk_next + JUNK_PER_ROUND):
            value = JUNK_VALUES[n % len(JUNK_VALUES)]
            try:
                self.etcd.etcdctl("put", f"{PREFIX}/subnets/junk-{n}", "--", value)
                self.junk["put"] += 1
            except (RuntimeError, subprocess.TimeoutExpired):
                self.junk["failed"] += 1
        self.junk_next += JUNK_PER_ROUND
        # delete the previous round's keys (left in place one round, so watchers see both)
        for n in range(old - JUNK_PER_ROUND, old):
            if n < 0:
                continue
            try:
                out = self.etcd.etcdctl("del", f"{PREFIX}/subnets/junk-{n}")
                self.junk["deleted"] += int(out.strip() or 0)
            except (RuntimeError, subprocess.TimeoutExpired, ValueError):
                self.junk["failed"] += 1

    def do_restart(self) -> None:
        t = time.monotonic()
        self.etcd.stop()
        time.sleep(self.sched.outage)
        self.etcd.start()
        self.note("etcd-restart", down_s=round(time.monotonic() - t, 1))

    def do_pause(self) -> None:
        self.etcd.pause()
        time.sleep(self.sched.pause)
        self.etcd.resume()
        self.note("etcd-pause", frozen_s=self.sched.pause)


# -- figures ----------------------------------------------------------------------------------

def summarize(soak: Soak) -> dict[str, Any]:
    per_node: dict[str, Any] = {}
    for i in STEADY:
        rows = [s["nodes"].get(str(i + 1)) for s in soak.samples]
        rows = [r for r in rows if r and "error" not in r and "status_error" not in r]
        if not rows:
            continue
        first, last = rows[0], rows[-1]
        per_node[str(i + 1)] = {
            "pid": first["pid"], "samples": len(rows),
            "rss_mib": {"start": first["rss_kib"] / 1024, "end": last["rss_kib"] / 1024,
                        "peak": max(r["rss_kib"] for r in rows) / 1024, "hwm_end": last["hwm_kib"] / 1024},
            "fds": {"start": first["fds"], "end": last["fds"], "peak": max(r["fds"] for r in rows)},
            "threads": {"start": first["threads"], "end": last["threads"]},
            "log_kib": {"start": first["log_bytes"] / 1024, "end": last["log_bytes"] / 1024},
            "counters_end": last["counters"], "routes_end": last["routes"],
            "same_pid_throughout": all(r["pid"] == first["pid"] for r in rows)}
    chunks = [c for c in soak.traffic.results if "gbps" in c]
    failed = [c for c in soak.traffic.results if "error" in c]
    gbps = [c["gbps"] for c in chunks]
    routes_seen = [r for _, r in soak.node1_routes]
    return {
        "nodes": per_node,
        "deaths": soak.deaths,
        "traffic": {"chunks": len(chunks), "failed": len(failed),
                    "gbps_min": min(gbps, default=None), "gbps_median": statistics.median(gbps) if gbps else None,
                    "gbps_max": max(gbps, default=None),
                    "zero_chunks": sum(1 for g in gbps if g <= 0), "errors": [c["error"] for c in failed]},
        "pings": soak.ping_results,
        "etcd": {"restarts": sum(1 for e in soak.events if e["event"] == "etcd-restart"),
                 "pauses": sum(1 for e in soak.events if e["event"] == "etcd-pause")},
        "junk": dict(soak.junk),
        "node4": {"starts": len(soak.churn_periods),
                  "ready": sum(1 for p in soak.churn_periods if "ready" in p),
                  "reached": sum(1 for p in soak.churn_periods if "reached" in p),
                  "clean_stops": sum(1 for p in soak.churn_periods if p.get("rc") == 0),
                  "stops": sum(1 for p in soak.churn_periods if "stopped" in p),
                  "periods": soak.churn_periods},
        "node1_route_count_changes": soak.node1_routes,
        "node1_saw_node4_join": sum(1 for a, b in zip(routes_seen, routes_seen[1:]) if b > a),
        "node1_saw_node4_leave": sum(1 for a, b in zip(routes_seen, routes_seen[1:]) if b < a),
    }


def checks(s: dict[str, Any]) -> list[tuple[str, bool]]:
    n4 = s["node4"]
    complete = [p for p in n4["periods"] if "stopped" in p]
    return [
        ("no daemon died", not s["deaths"] and len(s["nodes"]) == len(STEADY)),
        ("nodes 1-3 kept their pid", all(n["same_pid_throughout"] for n in s["nodes"].values())),
        ("traffic never stopped (every iperf3 test carried data)",
         s["traffic"]["chunks"] > 0 and not s["traffic"]["failed"] and not s["traffic"]["zero_chunks"]),
        ("every pair answered pings", bool(s["pings"]) and all(p["received"] > 0 for p in s["pings"].values())),
        ("every node-4 start leased and reachable from node 1",
         n4["starts"] > 0 and all("ready" in p and "reached" in p for p in complete)),
        ("every node-4 stop was clean (exit 0)", all(p.get("rc") == 0 for p in complete)),
        ("node 1 saw node 4 join and leave", s["node1_saw_node4_join"] > 0 and s["node1_saw_node4_leave"] > 0),
        ("etcd was restarted and paused", s["etcd"]["restarts"] > 0 and s["etcd"]["pauses"] > 0),
    ]


def render(s: dict[str, Any], sched: Schedule) -> str:
    lines = [f"{'daemon':<7} {'pid':>7} {'RSS start':>10} {'RSS end':>8} {'RSS peak':>9} {'HWM':>6} "
             f"{'fds start':>9} {'end':>4} {'peak':>5} {'threads':>8} {'log KiB':>8}"]
    for k, n in s["nodes"].items():
        r, f, t = n["rss_mib"], n["fds"], n["threads"]
        lines.append(f"node {k:<2} {n['pid']:>7} {r['start']:>7.1f} MiB {r['end']:>8.1f} {r['peak']:>9.1f} "
                     f"{r['hwm_end']:>6.1f} {f['start']:>9} {f['end']:>4} {f['peak']:>5} "
                     f"{t['start']:>3}->{t['end']:<4} {n['log_kib']['end']:>8.1f}")
    lines.append("")
    keys = ("tx_packets", "rx_packets", "tx_super_packets", "rx_merged_writes", "gso_fallbacks",
            "drop_send_error", "drop_no_route")
    lines.append(f"{'counters at end':<16}" + "".join(f"{k:>17}" for k in keys) + "  other drops")
    for k, n in s["nodes"].items():
        c = n["counters_end"]
        other = {x: v for x, v in c.items() if x.startswith("drop_") and x not in keys and v}
        lines.append(f"node {k:<11}" + "".join(f"{c.get(x, 0):>17}" for x in keys) + f"  {other or '-'}")
    lines.append("")
    t = s["traffic"]
    if t["chunks"]:
        lines.append(f"iperf3 node1->node2: {t['chunks']} tests of {sched.traffic_chunk} s, Gbit/s min "
                     f"{t['gbps_min']:.2f} / median {t['gbps_median']:.2f} / max {t['gbps_max']:.2f}, "
                     f"{t['failed']} failed")
    else:
        lines.append(f"iperf3 node1->node2: no test completed, {t['failed']} failed")
    lines.append("ping loss %: " + ", ".join(f"{k} {v['loss_pct']}% of {v['sent']}"
                                             for k, v in s["pings"].items()))
    n4 = s["node4"]
    lines.append(f"node 4: {n4['starts']} starts ({n4['ready']} leased, {n4['reached']} reachable), "
                 f"{n4['stops']} stops ({n4['clean_stops']} clean); node 1 saw it join "
                 f"{s['node1_saw_node4_join']}x, leave {s['node1_saw_node4_leave']}x")
    lines.append(f"etcd: {s['etcd']['restarts']} restarts, {s['etcd']['pauses']} SIGSTOP pause; junk keys "
                 f"{s['junk']['put']} written, {s['junk']['deleted']} deleted, {s['junk']['failed']} etcdctl failures")
    lines.append(f"deaths: {len(s['deaths'])}" + "".join(
        f"\n  node {d['node']} pid {d['pid']} rc {d['rc']} at {d['t']} s" for d in s["deaths"]))
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    parser.add_argument("--churn-every", type=float, default=20.0,
                        help="seconds between node-4 starts and stops (default 20)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/soak.py needs root (network namespaces, TUN)", file=sys.stderr)
        return 2
    if args.minutes < 0.5 or args.churn_every < 6:
        print("bench/soak.py: --minutes must be >= 0.5 and --churn-every >= 6", file=sys.stderr)
        return 2
    missing = [t for t in ("iperf3", "ping", ETCD, ETCDCTL) if shutil.which(t) is None]
    if missing:
        print(f"bench/soak.py: not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    sched = schedule_for(args.minutes, args.churn_every)
    started = dt.datetime.now(dt.timezone.utc)
    stem = os.path.join(args.out, "soak-" + started.strftime("%Y%m%d-%H%M%S"))
    print(f"soak: {sched.duration:.0f} s; schedule {asdict(sched)}", file=sys.stderr, flush=True)

    previous = interrupt_on_sigterm()
    workdir = tempfile.mkdtemp(prefix="uf-soak-")
    soak = Soak(sched, workdir)
    interrupted, failure = False, None
    stack = ExitStack()
    try:
        try:
            soak.start(stack)
            soak.run()
        except KeyboardInterrupt:
            interrupted = True
        except Exception as e:   # reported below, after everything is stopped
            failure = f"{type(e).__name__}: {e}"
        finally:
            try:
                with deferred_signals():
                    if hasattr(soak, "traffic") and "end" not in {s["label"] for s in soak.samples}:
                        try:
                            soak.sample("end (cut short)")
                        except Exception:  # noqa: BLE001 - the figures so far still count
                            pass
                    stack.close()
            except KeyboardInterrupt:
                interrupted = True
            finally:
                _keep_logs(workdir, stem + "-logs")
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        signal.signal(signal.SIGTERM, previous)

    if not hasattr(soak, "traffic"):   # never got going: nothing to summarize
        print(f"bench/soak.py: set-up failed: {failure or 'interrupted'}", file=sys.stderr)
        return 130 if interrupted else 1
    summary = summarize(soak)
    verdicts = checks(summary)
    if failure:
        verdicts.append((f"soak ran to the end ({failure})", False))
    if interrupted:
        verdicts.append(("soak ran to the end (interrupted)", False))
    doc = {"schema": "udpflannel-soak/1",
           "meta": {"started": started.strftime("%Y-%m-%d %H:%M:%S UTC"), "host": platform.node(),
                    "kernel": platform.release(), "cpus": os.cpu_count(), "minutes": args.minutes,
                    "interrupted": interrupted, "failure": failure},
           "schedule": asdict(sched), "summary": summary,
           "checks": [{"check": c, "ok": ok} for c, ok in verdicts],
           "samples": soak.samples, "events": soak.events, "traffic": soak.traffic.results,
           "ok": all(ok for _, ok in verdicts)}
    os.makedirs(args.out, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"\nsoak {doc['meta']['started']}, {sched.duration / 60:g} min; {doc['meta']['kernel']}, "
          f"{doc['meta']['cpus']} CPUs")
    print(render(summary, sched))
    for check, ok in verdicts:
        print(f"{'ok  ' if ok else 'FAIL'} {check}")
    print(f"wrote {stem}.json, logs in {stem}-logs/")
    if interrupted:
        return 130
    return 0 if doc["ok"] else 1


def _keep_logs(workdir: str, dest: str) -> None:
    """Daemon, etcd and ping logs, for a post-mortem."""
    try:
        os.makedirs(dest, exist_ok=True)
        for dirpath, _, files in os.walk(workdir):
            for name in files:
                if name.endswith((".log", ".txt")):
                    rel = os.path.relpath(os.path.join(dirpath, name), workdir).replace(os.sep, "_")
                    shutil.copy(os.path.join(dirpath, name), os.path.join(dest, rel))
    except OSError as e:
        print(f"logs not kept: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
