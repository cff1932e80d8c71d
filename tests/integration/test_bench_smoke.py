"""`udpflannel bench` end to end, shortest form: one repetition, 1 s per iperf3 run, the
bare underlay (it carries the latency floor's echo) and the pinned default (poll) case (its
daemons run `--cpus 0`; every case's ping also runs pinned to CPU 0). Checks that
every step produced its figures and that the run leaves nothing behind: of the
namespaces on the machine it looks only at the bench's own (its Lab tag and pid), since
other tests may make and remove namespaces meanwhile."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

from support.namespaces import NamespaceWatch

from udpflannel.lab import procs
from udpflannel.lab.benchlib.cases import LAB_TAG


def test_bench_runs_every_step_of_two_cases(workdir):
    popen = subprocess.Popen([sys.executable, "-m", "udpflannel", "bench", "--seconds", "1", "--repeat", "1",
                              "--only", "veth,udpflannel-poll-cpu0", "--out", workdir],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with NamespaceWatch(LAB_TAG, popen.pid) as made:
        out, err = procs.communicate(popen, timeout=240)
    proc = subprocess.CompletedProcess(popen.args, popen.returncode, out, err)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [path] = glob.glob(f"{workdir}/bench-*.json")
    with open(path) as f:
        doc = json.load(f)
    assert doc["ok"] and not doc["errors"]
    veth, pinned = doc["cases"]["veth"]["median"], doc["cases"]["udpflannel-poll-cpu0"]["median"]
    for m in (veth, pinned):
        assert m["rtt_p50_us"] > 0 and m["rtt_cpu0_p50_us"] > 0 and m["tcp1_gbps"] > 0
        assert m["udp_kpps"] > 0
        assert m["rr_ktps"] > 0 and 0 < m["rr_p50_us"] <= m["rr_p99_us"] and m["rr_lost"] is not None
    assert veth["echo_p50_us"] > 0 and veth["echo_cpu0_p50_us"] > 0 and pinned["daemon_cpu_s"] > 0
    if {0, 1} <= os.sched_getaffinity(0):   # the cross-CPU echo needs a second CPU
        assert veth["echo_cross_p50_us"] > 0 and "floor across CPUs" in proc.stdout
    else:
        assert veth["echo_cross_p50_us"] is None and "skipped" in proc.stderr
    assert pinned["tcp1_cores_per_gbps"] > 0 and veth["tcp1_cores_per_gbps"] is None  # no daemons
    assert doc["cases"]["udpflannel-poll-cpu0"]["daemon_args"] == ["--io", "poll", "--cpus", "0"]
    assert "ping on CPU 0, p50" in proc.stdout and "UDP 64 flows req/resp" in proc.stdout
    made.assert_all_removed()
