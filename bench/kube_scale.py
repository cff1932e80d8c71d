"""Scale benchmark, kube mode: one udpflannel daemon (--kube-subnet-mgr) joining a
Kubernetes API server that already holds N flannel Nodes.

    .venv/bin/python bench/kube_scale.py [--nodes 5000] [--events 100] [--repeat 3]   (as root)

The same figures as bench/etcd_scale.py, so the two modes can be put side by side:
  * start → all routes: from starting `udpflannel run --kube-subnet-mgr` to its admin
    socket reporting a route for every flannel Node; the worst of --repeat fresh starts
    (each with an empty state dir: the MAC comes back from the Node's annotation)
  * watch event → route live: a new flannel Node created (one POST over a kept-alive
    connection, podCIDR and annotations in it, as after a kubelet registered it and its
    flanneld published) until the daemon's route count includes it, p50 / p99 over
    --events, one at a time; beside it the POST's own round trip (admission and the
    etcd write: the API server's share)
  * the daemon's memory, VmRSS and VmHWM from /proc/<pid>/status

Set-up: a Lab with one node namespace; etcd, kube-apiserver and kube-controller-manager
(node IPAM) run in the hub namespace, the API server on the hub's bridge address. This
process joins the hub namespace first, so it and the control plane it starts talk
there. The N Nodes are created through the API with their podCIDR (10.a.b.0/24 of
10.0.0.0/8) and flanneld's four annotations (vxlan), by a pool of threads. The daemon
runs with credentials bound to exactly flannel's ClusterRole. Results go to
bench/results/kube_scale.json (bench/results/ is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(os.path.abspath(__file__)).parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from etcd_scale import log_times, memory, wait_admin, wait_routes  # noqa: E402
from pyroute2 import netns  # noqa: E402

from udpflannel.lab import procs  # noqa: E402
from udpflannel.lab.kubeapi import KubeAPILab  # noqa: E402
from udpflannel.lab.netns import Lab  # noqa: E402

HUB_ADDR = "192.168.250.2"
NETWORK = "10.0.0.0/8"
P = "flannel.alpha.coreos.com/"
OWN = "bench-node"
OWN_CIDR = "10.255.255.0/24"
NEW_BASE = 60000  # the new Nodes' index: podCIDRs far from the preloaded ones

log = logging.getLogger("kube_scale")


def node_body(i: int) -> dict:
    """The i-th flannel Node (i >= 1) as flanneld leaves it: podCIDR 10.a.b.0/24, its
    InternalIP, and the four annotations."""
    a, b = divmod(i, 256)
    ip = f"172.{16 + i // 65536}.{(i // 256) % 256}.{i % 256}"
    mac = f"0e:00:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"
    cidr = f"10.{a}.{b}.0/24"
    name = f"node-{i:06d}"
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name},
                         "annotations": {P + "backend-type": "vxlan",
                                         P + "backend-data": json.dumps({"VNI": 1, "VtepMAC": mac},
                                                                        separators=(",", ":")),
                                         P + "public-ip": ip, P + "kube-subnet-manager": "true",
                                         "node.alpha.kubernetes.io/ttl": "0"}},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def fill(kube: KubeAPILab, count: int, workers: int = 12) -> None:
    def one(i: int) -> None:
        kube.api.request("POST", "/api/v1/nodes", node_body(i), timeout=60)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(1, count + 1)))


class Poster:
    """POSTs of Nodes over one kept-alive HTTPS connection (as etcd_scale.py's puts go
    over one gRPC channel): the figure is the API server's and the daemon's, not a TLS
    handshake's."""

    def __init__(self, kube: KubeAPILab) -> None:
        import http.client
        import ssl
        assert kube.pki is not None
        ctx = ssl.create_default_context(cafile=kube.pki.ca)
        ctx.load_cert_chain(kube.pki.admin.cert, kube.pki.admin.key)
        self.conn = http.client.HTTPSConnection(kube.host, kube.port, context=ctx, timeout=30)

    def node(self, body: dict) -> None:
        self.conn.request("POST", "/api/v1/nodes", body=json.dumps(body).encode(),
                          headers={"Content-Type": "application/json", "Accept": "application/json"})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 201:
            raise RuntimeError(f"POST /api/v1/nodes: {resp.status} {data[:200]!r}")

    def close(self) -> None:
        self.conn.close()


class Daemon:
    """`udpflannel run --kube-subnet-mgr` in the lab's node namespace, fresh state dir."""

    def __init__(self, lab: Lab, kubeconfig: str, net_conf: str, directory: str, engine: str) -> None:
        os.makedirs(directory)
        self.admin_path = os.path.join(directory, "admin.sock")
        self.log_path = os.path.join(directory, "daemon.log")
        argv = [sys.executable, "-m", "udpflannel", "run", "--iface", "eth0", "--engine", engine,
                "--kube-subnet-mgr", "--kubeconfig-file", kubeconfig, "--net-config-path", net_conf,
                "--subnet-file", f"{directory}/subnet.env", "--state-dir", directory,
                "--admin-socket", self.admin_path]
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}, "NODE_NAME": OWN}
        with open(self.log_path, "wb") as log_file:
            self.started_wall = time.time()
            self.started = time.monotonic()
            self.proc = lab.nodes[0].popen(argv, cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=log_file,
                                           stderr=subprocess.STDOUT, env=env)

    def stop(self) -> None:
        procs.terminate(self.proc, 10)


# where a kube-mode start-up's time goes (etcd_scale.log_times' marks for this mode)
LOG_MARKS = {"Kubernetes API server": "api_found_s", "leased ": "leased_s", "running: ": "running_s"}


def bench(lab: Lab, kube: KubeAPILab, work: str, args) -> dict:
    t = time.monotonic()
    fill(kube, args.nodes)
    filled = time.monotonic() - t
    log.info("created %d flannel Nodes in %.1f s", args.nodes, filled)
    own = node_body(0)  # our node, as its kubelet registered it, podCIDR given (no flannel annotations yet)
    own["metadata"] = {"name": OWN, "labels": {"kubernetes.io/hostname": OWN}}
    own["spec"] = {"podCIDR": OWN_CIDR, "podCIDRs": [OWN_CIDR]}
    own["status"] = {"addresses": [{"type": "InternalIP", "address": lab.addresses[0]}]}
    kube.api.request("POST", "/api/v1/nodes", own)
    kubeconfig = kube.flannel_kubeconfig("token")
    net_conf = os.path.join(work, "net-conf.json")
    with open(net_conf, "w") as f:
        json.dump({"Network": NETWORK, "Backend": {"Type": "vxlan"}}, f)

    starts: list[dict] = []
    delays: list[float] = []
    posts: list[float] = []  # the POST's round trip alone: the API server's share (admission, etcd)
    mem: dict[str, float] = {}
    for rep in range(args.repeat):
        daemon = Daemon(lab, kubeconfig, net_conf, os.path.join(work, f"node{rep}"), args.engine)
        try:
            admin = wait_admin(daemon.admin_path, daemon.proc, 60)
            admin_up = time.monotonic() - daemon.started
            all_routes = wait_routes(admin, args.nodes, 120, daemon.proc) - daemon.started
            start = {"admin_socket_up_s": round(admin_up, 3), "start_to_all_routes_s": round(all_routes, 3),
                     **log_times(daemon.log_path, daemon.started_wall, LOG_MARKS),
                     "rss_mb": round(memory(daemon.proc.pid)["VmRSS"], 1)}
            starts.append(start)
            log.info("start %d: %s", rep + 1, start)
            if rep < args.repeat - 1:
                admin.close()
                continue
            poster = Poster(kube)
            poster.node(node_body(NEW_BASE - 1))  # the connection made, and the route awaited
            wait_routes(admin, args.nodes + 1, 20, daemon.proc)
            for n in range(args.events):
                body = node_body(NEW_BASE + n)
                want = args.nodes + 2 + n
                t0 = time.monotonic()
                poster.node(body)
                posts.append(time.monotonic() - t0)
                delays.append(wait_routes(admin, want, 20, daemon.proc) - t0)
                time.sleep(0.01)
            poster.close()
            mem = memory(daemon.proc.pid)
            admin.close()
        finally:
            daemon.stop()
            shutil.copy(daemon.log_path, os.path.join(args.out, "kube_scale_daemon.log"))

    delays_ms = sorted(d * 1000 for d in delays)
    p = statistics.quantiles(delays_ms, n=100, method="inclusive")
    totals = [x["start_to_all_routes_s"] for x in starts]
    return {
        "nodes": args.nodes, "events": args.events, "engine": args.engine, "fill_s": round(filled, 1),
        "starts": starts,
        "start_to_all_routes_s": round(max(totals), 3),
        "start_to_all_routes_median_s": round(statistics.median(totals), 3),
        "event_to_route_p50_ms": round(statistics.median(delays_ms), 2),
        "event_to_route_p99_ms": round(p[98], 2),
        "event_to_route_max_ms": round(delays_ms[-1], 2),
        "post_round_trip_p50_ms": round(statistics.median(posts) * 1000, 2),
        "rss_mb": round(mem["VmRSS"], 1),
        "hwm_mb": round(mem["VmHWM"], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="fresh daemon starts measured (worst is reported)")
    parser.add_argument("--engine", choices=("compiled", "python"), default="compiled")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if os.geteuid() != 0:
        print("bench/kube_scale.py needs root (network namespaces, TUN)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="uf-kube-scale-")
    try:
        with Lab(1, tag="ufks") as lab:
            lab.hub.link_up("br0", f"{HUB_ADDR}/24")
            netns.setns(lab.hub.name)  # this process and the control plane it starts live in the hub
            kube = KubeAPILab(Path(work) / "kube", cluster_cidr=NETWORK, host=HUB_ADDR)
            try:
                kube.start()
                kube.apply_flannel_rbac()
                result = bench(lab, kube, work, args)
            finally:
                kube.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    path = os.path.join(args.out, "kube_scale.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    width = max(map(len, result))
    for name, value in result.items():
        if name == "starts":
            for i, start in enumerate(value, 1):
                print(f"{'start ' + str(i):<{width}}  " + ", ".join(f"{k}={v}" for k, v in start.items()))
        else:
            print(f"{name:<{width}}  {value}")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
