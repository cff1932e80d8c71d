"""Scale benchmark: one udpflannel daemon joining an etcd that already holds 5,000 leases.

    sudo .venv/bin/python bench/etcd_scale.py [--leases 5000] [--puts 100]

Measures (the registry's scale targets in brackets):
  * start → all routes: from starting `udpflannel run` to its admin socket reporting a
    route for every lease in etcd; the worst of --repeat fresh starts      [< 2 s]
  * put → route live: a new lease's etcd put until the daemon's route count includes
    it, p50 / p99 over --puts puts, one at a time                          [p99 < 200 ms]
  * the daemon's memory, VmRSS and VmHWM from /proc/<pid>/status          [< 80 MB]
  * with --scrapers N: N clients scraping /metrics (--metrics-peers: a series per
    lease) back to back during the puts, and /healthz asked every 50 ms: the puts'
    p50 / p99 beside a run without scrapers tell whether scraping slows routing

Set-up: a Lab with one node namespace; etcd listens on the hub's bridge address inside
the lab (never outside it). This process joins the hub namespace to talk to etcd (before
any gRPC thread exists, so they all live there too). The leases are flannel's vxlan JSON,
each attached to an etcd lease of its own with a 24 h TTL, as flanneld nodes leave them.
The network is 10.0.0.0/8 with /24 subnets. Results go to bench/results/etcd_scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(os.path.abspath(__file__)).parent.parent
sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
from pyroute2 import netns  # noqa: E402

from udpflannel.core.status import NodeStatus  # noqa: E402
from udpflannel.lab import procs  # noqa: E402
from udpflannel.lab.etcd import EtcdServer  # noqa: E402
from udpflannel.lab.netns import Lab  # noqa: E402

HUB_ADDR = "192.168.250.2"
PREFIX = "/coreos.com/network"
CONFIG = '{"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}'
NEW_BASE = 60000  # the puts go to 10.234.96.0/24 and up
TARGETS = {"start_to_all_routes_s": 2.0, "put_to_route_p99_ms": 200.0, "rss_mb": 80.0}
VALUE = ('{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan",'
         '"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}')

log = logging.getLogger("etcd_scale")


def lease_kv(i: int) -> tuple[bytes, bytes]:
    """The i-th fake flanneld node (i >= 1): subnet 10.a.b.0/24, a public IP, a MAC."""
    a, b = divmod(i, 256)
    key = f"{PREFIX}/subnets/10.{a}.{b}.0-24".encode()
    ip = f"172.{16 + i // 65536}.{(i // 256) % 256}.{i % 256}"
    mac = f"0e:00:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"
    return key, VALUE.format(ip=ip, mac=mac).encode()


class Admin:
    """A persistent connection to the daemon's admin socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.unpacker = msgpack.Unpacker()
        self.request = msgpack.packb({"cmd": "status"})

    def status(self) -> NodeStatus:
        self.sock.sendall(self.request)
        while True:
            for reply in self.unpacker:
                return NodeStatus.from_dict(reply)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("admin socket closed")
            self.unpacker.feed(data)

    def close(self) -> None:
        self.sock.close()


def memory(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0]) / 1024  # kB -> MiB
    return out


async def fill(client, count: int, concurrency: int = 64) -> None:
    """``count`` leases, each on its own 24 h etcd lease, as a flannel cluster has them."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            key, value = lease_kv(i)
            granted = await client.lease(86400)
            await client.put(key, value, lease=granted.id)

    await asyncio.gather(*(one(i) for i in range(1, count + 1)))


def wait_admin(path: str, proc: subprocess.Popen, timeout: float) -> Admin:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        try:
            return Admin(path)
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no admin socket after {timeout}s")
        time.sleep(0.002)


def wait_routes(admin: Admin, want: int, timeout: float, proc: subprocess.Popen) -> float:
    """Poll until the route count reaches ``want``; returns the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        plane = admin.status().dataplane  # None while the daemon starts (the socket answers at once)
        if plane is not None and plane.peers >= want:
            return now
        if now > deadline or proc.poll() is not None:
            raise TimeoutError(f"route count never reached {want} (daemon rc {proc.poll()})")
        time.sleep(0.0005)


LOG_MARKS = {"underlay ": "config_read_s", "leased ": "leased_s", "running: ": "running_s"}


def log_times(path: str, started_wall: float, marks: dict[str, str] = LOG_MARKS) -> dict[str, float]:
    """Seconds from the daemon's start to its own log lines (where start-up time goes):
    the first INFO line starting with each of ``marks`` (text -> figure's name)."""
    out: dict[str, float] = {}
    with open(path, errors="replace") as f:
        for line in f:
            for needle, name in marks.items():
                if name not in out and f"INFO {needle}" in line:
                    stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
                    out[name] = round(stamp - started_wall, 3)
    return out


HTTP_PORT = 10256


class Scrapers:
    """``count`` threads fetching /metrics back to back, and one asking /healthz every
    50 ms, from this process (the hub's namespace) to the node's underlay address."""

    def __init__(self, address: str, count: int) -> None:
        import threading
        self.base = f"http://{address}:{HTTP_PORT}"
        self.done = threading.Event()
        self.scrapes: list[float] = []
        self.probes: list[float] = []
        self.threads = [threading.Thread(target=self._scrape, daemon=True) for _ in range(count)]
        self.threads.append(threading.Thread(target=self._probe, daemon=True))
        for t in self.threads:
            t.start()

    def _get(self, path: str) -> float:
        import urllib.request
        t = time.monotonic()
        with urllib.request.urlopen(self.base + path, timeout=10) as r:
            r.read()
        return time.monotonic() - t

    def _scrape(self) -> None:
        while not self.done.is_set():
            self.scrapes.append(self._get("/metrics"))

    def _probe(self) -> None:
        while not self.done.wait(0.05):
            self.probes.append(self._get("/healthz"))

    def stop(self) -> dict:
        self.done.set()
        for t in self.threads:
            t.join(15)
        ms = lambda xs: sorted(x * 1000 for x in xs)  # noqa: E731
        probes, scrapes = ms(self.probes), ms(self.scrapes)
        return {"scrapers": len(self.threads) - 1, "scrapes": len(scrapes),
                "scrape_p50_ms": round(statistics.median(scrapes), 1),
                "healthz_p50_ms": round(statistics.median(probes), 2),
                "healthz_p99_ms": round(statistics.quantiles(probes, n=100, method="inclusive")[98], 2)}


class Daemon:
    """`udpflannel run` in the lab's node namespace, with a fresh state directory."""

    def __init__(self, lab: Lab, etcd: EtcdServer, directory: str, engine: str, http: bool = False) -> None:
        os.makedirs(directory)
        self.dir = directory
        self.admin_path = os.path.join(directory, "admin.sock")
        self.log_path = os.path.join(directory, "daemon.log")
        argv = [sys.executable, "-m", "udpflannel", "run", "--iface", "eth0", "--engine", engine,
                "--etcd-endpoints", etcd.endpoint, "--subnet-file", f"{directory}/subnet.env",
                "--state-dir", directory, "--admin-socket", self.admin_path]
        if http:
            argv += ["--healthz-port", str(HTTP_PORT), "--metrics-port", str(HTTP_PORT), "--metrics-peers"]
        with open(self.log_path, "wb") as log_file:
            self.started_wall = time.time()
            self.started = time.monotonic()
            self.proc = lab.nodes[0].popen(argv, cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=log_file,
                                           stderr=subprocess.STDOUT)

    def stop(self) -> None:
        procs.terminate(self.proc, 10)


async def bench(lab: Lab, etcd: EtcdServer, work: str, args) -> dict:
    import aetcd
    client = aetcd.Client(host=HUB_ADDR, port=etcd.client_port, timeout=30)
    starts: list[dict] = []
    try:
        await client.put(f"{PREFIX}/config".encode(), CONFIG.encode())
        t = time.monotonic()
        await fill(client, args.leases)
        log.info("wrote %d leases in %.1f s", args.leases, time.monotonic() - t)

        for rep in range(args.repeat):
            daemon = Daemon(lab, etcd, os.path.join(work, f"node{rep}"), args.engine, http=args.scrapers > 0)
            try:
                admin = wait_admin(daemon.admin_path, daemon.proc, 30)
                admin_up = time.monotonic() - daemon.started
                all_routes = wait_routes(admin, args.leases, 60, daemon.proc) - daemon.started
                start = {"admin_socket_up_s": round(admin_up, 3), "start_to_all_routes_s": round(all_routes, 3),
                         **log_times(daemon.log_path, daemon.started_wall),
                         "rss_mb": round(memory(daemon.proc.pid)["VmRSS"], 1)}
                starts.append(start)
                log.info("start %d: %s", rep + 1, start)
                if rep < args.repeat - 1:  # next start is a fresh node again: free this subnet
                    subnet = admin.status().lease.subnet
                    admin.close()
                    daemon.stop()
                    net, plen = subnet.split("/")
                    await client.delete(f"{PREFIX}/subnets/{net}-{plen}".encode())
                    continue

                delays = []
                granted = await client.lease(86400)
                load = Scrapers(lab.addresses[0], args.scrapers) if args.scrapers else None
                for n in range(args.puts):
                    key, value = lease_kv(NEW_BASE + n)  # far from the subnet the daemon picked
                    want = args.leases + 1 + n
                    t0 = time.monotonic()
                    await client.put(key, value, lease=granted.id)
                    delays.append(wait_routes(admin, want, 10, daemon.proc) - t0)
                    await asyncio.sleep(0.01)
                mem = memory(daemon.proc.pid)
                scraped = load.stop() if load else {}
                admin.close()
            finally:
                daemon.stop()
                shutil.copy(daemon.log_path, os.path.join(args.out, "etcd_scale_daemon.log"))
    finally:
        await client.close()

    delays_ms = sorted(d * 1000 for d in delays)
    p = statistics.quantiles(delays_ms, n=100, method="inclusive")
    totals = [x["start_to_all_routes_s"] for x in starts]
    return {
        "leases": args.leases, "puts": args.puts, "engine": args.engine, "starts": starts,
        "start_to_all_routes_s": round(max(totals), 3),  # the worst of --repeat fresh starts
        "start_to_all_routes_median_s": round(statistics.median(totals), 3),
        "put_to_route_p50_ms": round(statistics.median(delays_ms), 2),
        "put_to_route_p99_ms": round(p[98], 2),
        "put_to_route_max_ms": round(delays_ms[-1], 2),
        "rss_mb": round(mem["VmRSS"], 1),
        "hwm_mb": round(mem["VmHWM"], 1),
        **scraped,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leases", type=int, default=5000)
    parser.add_argument("--puts", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="fresh daemon starts measured (worst is reported)")
    parser.add_argument("--engine", choices=("compiled", "python"), default="compiled")
    parser.add_argument("--scrapers", type=int, default=0, help="clients scraping /metrics during the puts")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if os.geteuid() != 0:
        print("bench/etcd_scale.py needs root (network namespaces, TUN)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="uf-etcd-scale-")
    try:
        with Lab(1, tag="ufs") as lab:
            lab.hub.link_up("br0", f"{HUB_ADDR}/24")
            etcd = EtcdServer(Path(work) / "etcd", host=HUB_ADDR, popen=lab.hub.popen,
                              extra_args=("--quota-backend-bytes", str(1 << 30)))
            try:
                etcd.start()
                netns.setns(lab.hub.name)  # this thread, and the gRPC threads it starts, talk from the hub
                result = asyncio.run(asyncio.wait_for(bench(lab, etcd, work, args), 600))
            finally:
                etcd.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result["targets"] = TARGETS
    result["met"] = {
        "start_to_all_routes_s": result["start_to_all_routes_s"] < TARGETS["start_to_all_routes_s"],
        "put_to_route_p99_ms": result["put_to_route_p99_ms"] < TARGETS["put_to_route_p99_ms"],
        "rss_mb": max(result["rss_mb"], result["hwm_mb"]) < TARGETS["rss_mb"],
    }
    path = os.path.join(args.out, "etcd_scale.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    width = max(map(len, result))
    for name, value in result.items():
        if name == "starts":
            for i, start in enumerate(value, 1):
                print(f"{'start ' + str(i):<{width}}  " + ", ".join(f"{k}={v}" for k, v in start.items()))
        elif name not in ("targets", "met"):
            print(f"{name:<{width}}  {value}")
    print("targets met:", ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in result["met"].items()))
    print(f"written to {path}")
    return 0 if all(result["met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
