"""`udpflannel bench`: bare veth vs kernel VXLAN (as flannel sets it up) vs each
udpflannel mode, measured the same way in one run.

Theory of operation. Repetitions are the outer loop and cases the inner one, so slow
drift of a shared machine spreads over every case instead of favouring one. Each
(repetition, case) builds its own two-node Lab from scratch, waits until node 2 answers
an echo from node 1, then runs these steps from node 1 to node 2:

    ping   iputils ping, 200 echoes 10 ms apart           -> RTT p50 / p99
    ping0  the same ping pinned to CPU 0, where the `-cpu0` cases pin their daemons'
           data path: a workload placed beside its node's data path    -> RTT p50
    echo   (veth only) a compiled UDP echo, 200 x 10 ms    -> the latency floor: one
           process wakeup w = echo p50 - ping p50; each udpflannel case's ping
           overhead over kernel VXLAN is reported as a multiple of 4w
    echo0  (veth only) the same echo, client and server on CPU 0 -> the floor for
           ping0: w0 = echo0 p50 - ping0 p50, a wakeup that stays on one CPU
    echox  (veth only) the same echo, client on CPU 0 and server on CPU 1 -> what a
           wakeup costs when the woken thread runs on the other CPU: wx = echox p50 -
           ping0 p50 (skipped on a machine without CPU 1)
    tcp1   iperf3 TCP, 1 stream                           -> Gbit/s, retransmits
    tcp4   iperf3 TCP, 4 streams                          -> Gbit/s, retransmits
    udp    iperf3 UDP, 64 B datagrams, unlimited rate     -> received kpkt/s, loss %
    rr     64 UDP flows (each its own source port), each one 64 B request in flight,
           answered by one echo server: DNS-like request/response, so coalescing is
           not tuned to one bulk flow      -> k transactions/s, RTT p50 / p99, lost

Around each step it samples the daemons' utime+stime (/proc/<pid>/stat) and the whole
machine's busy time (/proc/stat); after the last step the daemons' VmHWM. A failed
step is recorded and the run goes on. Teardown defers SIGINT/SIGTERM until every
process is stopped and every namespace removed. Progress goes to stderr, one line per
step; the table (medians, and ratios to kernel VXLAN) to stdout; JSON and PNG to --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

from udpflannel.lab.benchlib import parse, report, tools
from udpflannel.lab.benchlib.cases import Case, Target, all_cases
from udpflannel.lab.netns import interrupt_on_sigterm, owned_handler

log = logging.getLogger("udpflannel.lab.bench")

UDP_LENGTH = 64
RR_FLOWS = 64         # the rr step's request/response flows
PING_COUNT, PING_INTERVAL = 200, 0.01
SETTLE = 0.3          # seconds between steps, for queues and TIME_WAITs to drain


class Progress:
    def __init__(self, total: int, partial_lines: bool) -> None:
        self.total, self.done = total, 0
        self.partial = partial_lines
        self._open = ""

    def begin(self, rep: str, case: str, step: str) -> None:
        self.done += 1
        self._open = f"[{self.done:>{len(str(self.total))}}/{self.total}] {rep}  {case:<20} {step:<6}"
        self._t0 = time.monotonic()
        if self.partial:
            sys.stderr.write(self._open + " ")
            sys.stderr.flush()

    def end(self, text: str) -> None:
        line = f"{text} ({time.monotonic() - self._t0:.1f} s)"
        sys.stderr.write((line if self.partial else f"{self._open} {line}") + "\n")
        sys.stderr.flush()

    def skip(self, n: int) -> None:
        self.done += n

    def say(self, text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while cleaning up; raise KeyboardInterrupt afterwards."""
    pending: list[int] = []
    old = {s: signal.signal(s, owned_handler(pending.append)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if pending:
            raise KeyboardInterrupt


# -- steps: each fills run["metrics"] and run["steps"][name], returns a progress text

def _pinger(cpu: int | None, prefix: str) -> Callable[[Target, float, dict, dict], str]:
    def step(t: Target, seconds: float, metrics: dict, detail: dict) -> str:
        r = parse.ping_output(tools.ping(t.src, t.addr, PING_COUNT, PING_INTERVAL, cpu))
        rtts = [x * 1000 for x in r.rtts_ms]
        metrics[f"{prefix}_p50_us"] = report.percentile(rtts, 50)
        metrics[f"{prefix}_p99_us"] = report.percentile(rtts, 99)
        detail.update(sent=r.sent, received=len(rtts), loss_pct=r.loss_pct, rtts_us=rtts, cpu=cpu)
        if not rtts:
            raise tools.ToolError(f"no echo replies out of {r.sent}")
        return (f"RTT p50 {report.format_value(metrics[f'{prefix}_p50_us'])} us, "
                f"p99 {report.format_value(metrics[f'{prefix}_p99_us'])} us, loss {r.loss_pct:.1f} %")
    return step


def _tcp(streams: int) -> Callable[[Target, float, dict, dict], str]:
    key = f"tcp{streams}"

    def step(t: Target, seconds: float, metrics: dict, detail: dict) -> str:
        r = parse.iperf_tcp(tools.iperf3(t.src, t.dst, t.addr, seconds, ["-P", str(streams)]))
        metrics[f"{key}_gbps"], metrics[f"{key}_retrans"] = r.gbps, r.retransmits
        detail.update(gbps=r.gbps, retransmits=r.retransmits, streams=r.streams,
                      congestion=r.congestion)
        return f"{r.gbps:.2f} Gbit/s, {r.retransmits} retransmits"
    return step


def _udp(t: Target, seconds: float, metrics: dict, detail: dict) -> str:
    r = parse.iperf_udp(tools.iperf3(t.src, t.dst, t.addr, seconds,
                                     ["-u", "-l", str(UDP_LENGTH), "-b", "0"]))
    metrics["udp_kpps"], metrics["udp_loss_pct"] = r.received_pps / 1e3, r.loss_pct
    detail.update(sent=r.sent, received=r.received, seconds=r.seconds,
                  sent_kpps=r.sent_pps / 1e3, received_kpps=r.received_pps / 1e3,
                  loss_pct=r.loss_pct)
    return (f"sent {r.sent_pps / 1e3:.0f} kpkt/s, received {r.received_pps / 1e3:.0f} kpkt/s, "
            f"loss {r.loss_pct:.1f} %")


def _rr(t: Target, seconds: float, metrics: dict, detail: dict) -> str:
    r = tools.udp_flows(t.src, t.dst, t.addr, RR_FLOWS, seconds)
    metrics.update(rr_ktps=r.tps / 1e3, rr_p50_us=r.p50_us, rr_p99_us=r.p99_us, rr_lost=r.lost)
    detail.update(flows=RR_FLOWS, transactions=r.transactions, seconds=r.seconds,
                  p50_us=r.p50_us, p99_us=r.p99_us, lost=r.lost, late=r.late)
    return (f"{RR_FLOWS} flows: {r.tps / 1e3:.1f} k transactions/s, RTT p50 "
            f"{report.format_value(r.p50_us)} us, p99 {report.format_value(r.p99_us)} us, lost {r.lost}")


def _echoer(cpus: tuple[int, int] | None, prefix: str) -> Callable[[Target, float, dict, dict], str]:
    """A UDP echo step; `cpus` = (client's CPU, server's CPU), or None: unpinned."""
    def step(t: Target, seconds: float, metrics: dict, detail: dict) -> str:
        if cpus is not None and not set(cpus) <= os.sched_getaffinity(0):
            detail.update(skipped=f"needs CPUs {cpus[0]} and {cpus[1]}")
            return f"skipped: this machine does not give the bench CPUs {cpus[0]} and {cpus[1]}"
        rtts = tools.udp_echo(t.src, t.dst, t.addr, PING_COUNT, PING_INTERVAL, cpus=cpus)
        if not rtts:
            raise tools.ToolError("no UDP echo came back")
        metrics[f"{prefix}_p50_us"] = report.percentile(rtts, 50)
        detail.update(sent=PING_COUNT, received=len(rtts), rtts_us=rtts, cpus=cpus)
        return f"UDP echo RTT p50 {report.format_value(metrics[f'{prefix}_p50_us'])} us"
    return step


RESTART_RATE = "20M"  # the paced stream during a restart: ACKs keep flowing without filling queues


def _restarts(t: Target, seconds: float, metrics: dict, detail: dict) -> str:
    """The longest time node 1's underlay heard nothing from node 2 while node 2's
    daemon was replaced during a paced TCP stream (each way of replacing it in turn)."""
    import threading

    from udpflannel.lab.silence import UnderlaySilence
    if t.restart is None:
        raise tools.ToolError("this case cannot restart its daemon")
    texts = []
    for how in ("takeover", "sigterm", "kill9"):
        result: dict = {}

        def run(out: dict = result) -> None:
            out["out"] = tools.iperf3(t.src, t.dst, t.addr, max(seconds, 6.0), ["-b", RESTART_RATE])
        stream = threading.Thread(target=run, daemon=True)
        with UnderlaySilence(t.src) as silence:
            stream.start()
            time.sleep(2.0)
            t.restart(how)
            stream.join(max(seconds, 6.0) + 40)
        r = parse.iperf_tcp(result["out"])
        metrics[f"restart_{how}_silence_ms"] = silence.longest * 1000
        detail[how] = {"silence_s": silence.longest, "resolution_s": silence.resolution, "gbps": r.gbps}
        texts.append(f"{how} {silence.longest * 1000:.0f} ms")
        time.sleep(SETTLE)
    return "longest silence: " + ", ".join(texts)


STEPS: dict[str, Callable[[Target, float, dict, dict], str]] = {
    "ping": _pinger(None, "rtt"), "ping0": _pinger(0, "rtt_cpu0"),
    "echo": _echoer(None, "echo"), "echo0": _echoer((0, 0), "echo_cpu0"),
    "echox": _echoer((0, 1), "echo_cross"),
    "tcp1": _tcp(1), "tcp4": _tcp(4), "udp": _udp, "rr": _rr, "restart": _restarts}


def _daemon_cpu(pids: tuple[int, ...]) -> list[float | None]:
    out: list[float | None] = []
    for pid in pids:
        try:
            out.append(tools.cpu_seconds(pid))
        except (OSError, parse.ParseError):
            out.append(None)   # gone: counted as a failure by the caller
    return out


def _error_text(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text if len(text) < 2000 else text[:2000] + "..."


def run_case(case: Case, rep: int, repeat: int, seconds: float, progress: Progress) -> dict[str, Any]:
    run: dict[str, Any] = {"rep": rep, "metrics": dict.fromkeys(report.METRIC_KEYS),
                           "steps": {}, "errors": {}}
    tag = f"rep {rep}/{repeat}"
    stack = ExitStack()
    try:
        progress.begin(tag, case.name, "setup")
        try:
            target = stack.enter_context(case.setup())
            took = tools.wait_reachable(target.src, target.addr)
        except Exception as e:
            run["errors"]["setup"] = _error_text(e)
            progress.end("FAILED: " + report.one_line(_error_text(e)))
            progress.skip(len(case.steps))
            return run
        run["target"] = {"addr": target.addr, "note": target.note}
        progress.end(f"{target.note}; {target.addr} reachable after {took:.1f} s")
        daemon_total = 0.0
        for name, step in STEPS.items():
            if name not in case.steps:
                continue
            time.sleep(SETTLE)
            progress.begin(tag, case.name, name)
            detail: dict[str, Any] = {}
            cpu0, (busy0, _), t0 = _daemon_cpu(target.daemons), tools.host_cpu(), time.monotonic()
            try:
                summary = step(target, seconds, run["metrics"], detail)
            except Exception as e:   # recorded; the other steps still run
                log.debug("step %s failed", name, exc_info=True)
                run["errors"][name] = _error_text(e)
                summary = "FAILED: " + report.one_line(_error_text(e))
            cpu1, (busy1, _), t1 = _daemon_cpu(target.daemons), tools.host_cpu(), time.monotonic()
            detail.update(wall_s=t1 - t0, host_cpu_busy_s=busy1 - busy0)
            if target.daemons:
                deltas = [b - a if a is not None and b is not None else None
                          for a, b in zip(cpu0, cpu1)]
                detail["daemon_cpu_s"] = deltas
                if None in deltas and name != "restart":  # (replacing one is the restart step's point)
                    run["errors"].setdefault("daemon", "a udpflannel daemon exited during " + name)
                else:
                    cpu_s = sum(d for d in deltas if d is not None)  # (restart: the replaced one's is None)
                    daemon_total += cpu_s
                    summary += f"; daemons {cpu_s:.2f} CPU-s"
                    if detail.get("gbps"):  # cores busy per Gbit/s carried (TCP steps)
                        run["metrics"][f"{name}_cores_per_gbps"] = cpu_s / detail["wall_s"] / detail["gbps"]
            run["steps"][name] = detail
            progress.end(summary)
        if target.daemons and "daemon" not in run["errors"]:
            run["metrics"]["daemon_cpu_s"] = daemon_total
            try:
                # a restart step replaced a daemon: the peak of the ones still running
                alive = [pid for pid in target.daemons
                         if target.restart is None or os.path.exists(f"/proc/{pid}")]
                rss = [tools.peak_rss_mib(pid) for pid in alive]
                run["metrics"]["daemon_rss_mib"] = max(rss)
                run["steps"]["daemon"] = {"peak_rss_mib": rss, "pids": alive}
            except (OSError, parse.ParseError) as e:
                run["errors"]["daemon"] = f"reading VmHWM: {_error_text(e)}"
        for m in report.METRICS:          # a failed step leaves no half-filled figures
            if m.step in run["errors"]:
                run["metrics"][m.key] = None
        return run
    finally:
        with deferred_signals():
            stack.close()


def _meta(args: argparse.Namespace, order: list[str], started: dt.datetime) -> dict[str, Any]:
    return {"started": started.strftime("%Y-%m-%d %H:%M:%S UTC"), "host": platform.node(),
            "kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "iperf3": tools.iperf3_version(),
            "seconds": args.seconds, "iperf_seconds": tools.iperf_duration(args.seconds),
            "repeat": args.repeat, "udp_length": UDP_LENGTH, "rr_flows": RR_FLOWS,
            "ping_count": PING_COUNT,
            "ping_interval_s": PING_INTERVAL, "cases": order, "only": args.only,
            "underlay": "2 namespaces, veth into a bridge in a hub namespace, MTU 1500"}


def main(args: argparse.Namespace) -> int:
    cases = {c.name: c for c in all_cases()}
    order = report.select_cases(list(cases), args.only)
    for tool in ("iperf3", "ping", "taskset"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool} not found in PATH (apt-get install iperf3 iputils-ping "
                                    "util-linux)")
    os.makedirs(args.out, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    meta = _meta(args, order, started)

    previous = interrupt_on_sigterm()
    progress = Progress(args.repeat * sum(1 + len(cases[n].steps) for n in order),
                        partial_lines=not args.verbose)
    progress.say(f"udpflannel bench: {', '.join(order)}; {meta['iperf_seconds']} s per iperf3 run, "
                 f"{args.repeat} repetition(s); {meta['kernel']}, {meta['cpus']} CPUs, {meta['iperf3']}")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
    try:
        for rep in range(1, args.repeat + 1):
            for name in order:
                runs[name].append(run_case(cases[name], rep, args.repeat, args.seconds, progress))
    except KeyboardInterrupt:
        progress.say("\ninterrupted: namespaces, daemons and iperf3 removed; nothing written")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)

    doc = report.build_document(meta, {
        name: {"description": cases[name].description,
               "daemon_args": list(extra) if (extra := cases[name].daemon_args) else None,
               "baseline": cases[name].baseline, "runs": runs[name]} for name in order})
    stem = os.path.join(args.out, "bench-" + started.strftime("%Y%m%d-%H%M%S"))
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    written = [stem + ".json"]
    try:
        from udpflannel.lab.benchlib import chart
        chart.write_png(doc, stem + ".png")
        written.append(stem + ".png")
    except Exception as e:   # the numbers matter more than the picture
        progress.say(f"chart not written: {type(e).__name__}: {e}")

    medians = {name: doc["cases"][name]["median"] for name in order}
    print(f"\nudpflannel bench {meta['started']}: {meta['kernel']}, {meta['cpus']} CPUs; "
          f"node 1 -> node 2, {meta['iperf_seconds']} s per iperf3 run")
    print(f"median of {args.repeat} run(s); xN = ratio to the {report.BASELINE} median "
          "(for the -ipv6 cases: to kernel-vxlan-ipv6's)" if report.BASELINE in order
          else f"median of {args.repeat} run(s)")
    print(report.render_table(order, medians, {name: cases[name].baseline for name in order}))
    for line in doc["floor"]:
        print(line)
    for err in doc["errors"]:
        print(f"FAILED {err['case']} rep {err['rep']} {err['step']}: {report.one_line(err['error'])}")
    print("wrote " + ", ".join(written))
    return 0 if doc["ok"] else 1
