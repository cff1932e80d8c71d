"""How big and how fast is each form of the CNI plugin: the runtime execs it once per pod.

    .venv/bin/python bench/cni_plugin.py [--runs 40] [--extra NAME=PATH ...]   (as root)

Plugins compared (each as the runtime runs it: exec'd, netconf on stdin, CNI_* in env):
  * frozen   udpflannel-cni as `make setup` froze it (packaging/cni/freeze.py)
  * zipapp   the zipapp install-cni falls back to, through `#!/usr/bin/env python3`
             with PATH=/usr/sbin:/usr/bin:/sbin:/bin (the host's python3)
  * flannel  flannel's own plugin (Go, containernetworking/plugins v0.9.1: peers/flannel-cni)
  * --extra  anything else, e.g. a PyInstaller or Nuitka onefile build of the same sources

Measured, each --runs times (wall time: minimum, median and 90th percentile; and the
median of the child's CPU time, user + sys: on a busy machine the minimum and the CPU
time say more than the median):
  * VERSION  the plugin alone
  * ADD      with a fake delegate (a sh script on CNI_PATH printing a result): the
             plugin's own cost, its delegate execs included (udpflannel-cni asks the
             delegate's VERSION first, flannel's does not)
  * pod      ADD then DEL of a real pod (bridge, host-local from /usr/lib/cni) in a
             throwaway node namespace: what a runtime waits for
Results: a table on stdout and bench/results/cni_plugin.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(os.path.abspath(__file__)).parent.parent
sys.path.insert(0, str(ROOT))

from udpflannel.cni import install  # noqa: E402
from udpflannel.lab import peers  # noqa: E402
from udpflannel.lab.netns import Lab  # noqa: E402

HOST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
FAKE_BRIDGE = """#!/bin/sh
cat >/dev/null
case "$CNI_COMMAND" in
  VERSION) echo '{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]}';;
  ADD) echo '{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.1.17.2/24","gateway":"10.1.17.1"}]}';;
esac
"""
SUBNET_ENV = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"


def timed(argv: list[str], env: dict[str, str], stdin: bytes) -> tuple[float, float, bytes]:
    """Wall and CPU milliseconds of one run, and its stdout; it must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, env=env, capture_output=True, timeout=60)
    wall = (time.perf_counter() - start) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} {env.get('CNI_COMMAND')}: exit {proc.returncode}: {proc.stdout[:300]!r} "
                           f"{proc.stderr[-300:]!r}")
    return wall, cpu, proc.stdout


def summary(walls: list[float], cpus: list[float]) -> dict[str, float]:
    walls = sorted(walls)
    return {"min_ms": round(walls[0], 1), "median_ms": round(statistics.median(walls), 1),
            "p90_ms": round(walls[int(len(walls) * 0.9)], 1), "cpu_ms": round(statistics.median(cpus), 1)}


def netconf(plugin_type: str, work: str, tag: str, version: str = "0.4.0") -> dict:
    return {"cniVersion": version, "name": "cbr0", "type": plugin_type,
            "subnetFile": os.path.join(work, "subnet.env"), "dataDir": os.path.join(work, tag, "flannel"),
            "ipam": {"dataDir": os.path.join(work, tag, "ipam")}}


def bench_alone(name: str, path: str, plugin_type: str, work: str, runs: int) -> dict:
    fake_bin = os.path.join(work, "fake-bin")
    base = {"PATH": HOST_PATH, "CNI_PATH": fake_bin, "CNI_NETNS": "/var/run/netns/none", "CNI_IFNAME": "eth0"}
    out: dict = {}
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu, _ = timed([path], dict(base, CNI_COMMAND="VERSION"), b"{}")
        walls.append(wall)
        cpus.append(cpu)
    out["version"] = summary(walls, cpus)
    conf = json.dumps(netconf(plugin_type, work, f"fake-{name}")).encode()
    walls, cpus = [], []
    for i in range(runs):
        wall, cpu, result = timed([path], dict(base, CNI_COMMAND="ADD", CNI_CONTAINERID=f"c{i}"), conf)
        assert json.loads(result)["ips"][0]["address"] == "10.1.17.2/24", result
        walls.append(wall)
        cpus.append(cpu)
    out["add_fake_delegate"] = summary(walls, cpus)
    return out


def bench_pods(plugins: dict[str, tuple[str, str]], work: str, runs: int) -> dict[str, dict]:
    """ADD and DEL of real pods, the plugins taking turns (so load drifts hit all alike)."""
    times: dict[str, dict[str, list[float]]] = {n: {"add": [], "del": [], "add_cpu": [], "del_cpu": []}
                                               for n in plugins}
    with Lab(1, tag="ucb") as lab:
        node = lab.nodes[0]
        pods = [lab.add_namespace(f"p{i}") for i in range(4)]
        for i in range(runs):
            for name, (path, plugin_type) in plugins.items():
                pod = pods[i % len(pods)]
                conf = json.dumps(netconf(plugin_type, work, f"pod-{name}")).encode()
                env = {"PATH": HOST_PATH, "CNI_PATH": "/usr/lib/cni", "CNI_CONTAINERID": f"{name}-{i}",
                       "CNI_NETNS": pod.path, "CNI_IFNAME": "eth0"}
                for command in ("ADD", "DEL"):
                    wall, cpu, _ = timed(node.exec_argv([path]), dict(env, CNI_COMMAND=command), conf)
                    times[name][command.lower()].append(wall)
                    times[name][command.lower() + "_cpu"].append(cpu)
    return {n: {"add": summary(t["add"], t["add_cpu"]), "del": summary(t["del"], t["del_cpu"])}
            for n, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--extra", action="append", default=[], help="NAME=PATH: another udpflannel-cni build")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cni_plugin.json"))
    args = parser.parse_args()

    data, why = install.frozen_plugin()
    if data is None:
        sys.exit(f"the frozen plugin is {why}")
    with tempfile.TemporaryDirectory(prefix="cni-bench-") as work:
        zipapp = os.path.join(work, "udpflannel-cni.pyz")
        with open(zipapp, "wb") as f:
            f.write(install.plugin_zipapp())
        os.chmod(zipapp, 0o755)
        plugins = {"frozen": (install.frozen_path(), "udpflannel-cni"), "zipapp": (zipapp, "udpflannel-cni"),
                   "flannel": (peers.binary("flannel"), "flannel")}
        for item in args.extra:
            name, _, path = item.partition("=")
            plugins[name] = (os.path.abspath(path), "udpflannel-cni")
        os.mkdir(os.path.join(work, "fake-bin"))
        with open(os.path.join(work, "fake-bin", "bridge"), "w") as f:
            f.write(FAKE_BRIDGE)
        os.chmod(os.path.join(work, "fake-bin", "bridge"), 0o755)
        with open(os.path.join(work, "subnet.env"), "w") as f:
            f.write(SUBNET_ENV)

        results = {name: {"bytes": os.path.getsize(path)} for name, (path, _) in plugins.items()}
        for name, (path, plugin_type) in plugins.items():
            results[name].update(bench_alone(name, path, plugin_type, work, args.runs))
        for name, pod in bench_pods(plugins, work, args.runs).items():
            results[name]["pod"] = pod
    load = os.getloadavg()[0]

    print(f"runs {args.runs}, load average {load:.1f} on {os.cpu_count()} CPUs; "
          "wall min / median / p90 (CPU median), ms")
    print("| plugin | size | VERSION | ADD, fake delegate | pod ADD (bridge) | pod DEL |")
    print("|---|---|---|---|---|---|")

    def cell(s: dict) -> str:
        return f"{s['min_ms']} / {s['median_ms']} / {s['p90_ms']} ({s['cpu_ms']})"
    def size(n: int) -> str:
        return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"
    for name, r in results.items():
        print(f"| {name} | {size(r['bytes'])} | {cell(r['version'])} | {cell(r['add_fake_delegate'])} "
              f"| {cell(r['pod']['add'])} | {cell(r['pod']['del'])} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"runs": args.runs, "loadavg": load, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
