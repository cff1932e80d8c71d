"""The real flanneld as a peer in the lab: started and stopped in a lab namespace.

The binary is flannel's own (github.com/flannel-io/flannel, pinned in
peers/flannel/go.mod, built by `make setup` into the peers cache: lab.peers). It
runs on an etcd the caller runs (lab.etcd.EtcdServer, usually in the lab's hub
namespace on the underlay), with flanneld's own flags, and is judged by what it
leaves behind, as a cluster operator would: subnet.env, its lease in etcd, its
devices, routes and rules.

What flanneld does that shapes this module (read from flannel v0.28, main.go):

- it writes subnet.env (atomically, renameio: a new file renamed over the old) only
  after the lease, the backend's device and its iptables rules are in place, then
  logs "flannel is ready": a subnet.env that is not the one there before the start
  is the readiness signal (the old one stays: flanneld reads it to ask for the same
  subnet again);
- without a network config at <prefix>/config it waits for one forever, and a bad
  flag or a failed backend ends it with status 1 and one klog "E" line: so every
  wait has a deadline and fails with the log's tail;
- flags can also come from FLANNELD_<FLAG> variables (flagutil.SetFlagsFromEnv): the
  child gets none of ours, so only the flags given here count (the test suite sets
  FLANNELD_IO for udpflannel);
- SIGTERM stops it cleanly; the udp backend removes its TUN (flannel0), the vxlan
  backend leaves flannel.<VNI>, its entries and the lease in place.

The process is started by exec (nsenter, then setpriv --pdeathsig TERM, then
flanneld: one pid), never by forking Python, and always ended by that pid
(procs.terminate); an atexit hook stops one a crashed caller left running.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import shutil
import subprocess
import time
from typing import Sequence

from udpflannel.core import lease as leases
from udpflannel.core import subnetenv
from udpflannel.lab import peers, procs
from udpflannel.lab.netns import Namespace

DEFAULT_PREFIX = "/coreos.com/network"
READY_TIMEOUT = 30.0

_running: set["Flanneld"] = set()


class FlanneldError(Exception):
    pass


class Flanneld:
    """One flanneld in namespace ``ns``; its files (subnet.env, log) under ``workdir``.

    ``ip_masq`` and ``healthz_port`` map to flanneld's --ip-masq and --healthz-port;
    ``extra_args`` are further flanneld flags (e.g. ``--public-ip``). With a
    ``kubeconfig`` it runs as kube-flannel.yml runs it, --kube-subnet-mgr, as the Node
    ``node_name`` (its NODE_NAME), reading ``net_config`` (--net-config-path), instead
    of on etcd."""

    def __init__(self, ns: Namespace, workdir: str, *, etcd_endpoints: str = "",
                 etcd_prefix: str = DEFAULT_PREFIX, iface: str = "eth0", ip_masq: bool = False,
                 healthz_port: int = 0, extra_args: Sequence[str] = (),
                 binary: str | None = None, kubeconfig: str | None = None, node_name: str | None = None,
                 net_config: str | None = None) -> None:
        if not etcd_endpoints and not kubeconfig:
            raise ValueError("Flanneld needs etcd_endpoints or a kubeconfig")
        self.kubeconfig = kubeconfig
        self.node_name = node_name
        self.net_config = net_config
        self.ns = ns
        self.workdir = workdir
        self.etcd_endpoints = etcd_endpoints
        self.etcd_prefix = etcd_prefix
        self.iface = iface
        self.ip_masq = ip_masq
        self.healthz_port = healthz_port
        self.extra_args = list(extra_args)
        self.binary = binary or peers.binary("flanneld")
        self.subnet_file = os.path.join(workdir, "subnet.env")
        self.log_path = os.path.join(workdir, "flanneld.log")
        self.proc: subprocess.Popen | None = None
        self._previous: tuple[int, int] | None = None

    def argv(self) -> list[str]:
        if self.kubeconfig:
            argv = [self.binary, "--kube-subnet-mgr", "--kubeconfig-file", self.kubeconfig]
            if self.net_config:
                argv += ["--net-config-path", self.net_config]
        else:
            argv = [self.binary, "--etcd-endpoints", self.etcd_endpoints, "--etcd-prefix", self.etcd_prefix]
        argv += ["--iface", self.iface, "--subnet-file", self.subnet_file]
        if self.ip_masq:
            argv.append("--ip-masq")
        if self.healthz_port:
            argv += ["--healthz-port", str(self.healthz_port)]
        if shutil.which("setpriv"):  # dies with whoever started it, if that dies first
            argv = ["setpriv", "--pdeathsig", "TERM", "--", *argv]
        return argv + self.extra_args

    def start(self) -> "Flanneld":
        if self.proc is not None and self.proc.poll() is None:
            raise FlanneldError(f"flanneld in {self.ns.name} already running")
        os.makedirs(self.workdir, exist_ok=True)
        self._previous = _identity(self.subnet_file)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}
        if self.node_name:
            env["NODE_NAME"] = self.node_name
        with open(self.log_path, "ab") as log:
            self.proc = self.ns.popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, env=env)
        _running.add(self)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> subnetenv.SubnetEnv:
        """Until flanneld wrote subnet.env (lease, device and rules in place); its
        content. FlanneldError with the log's tail if it exits or times out first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise FlanneldError(f"flanneld in {self.ns.name} exited with {code}:\n{self.log_tail()}")
            if _identity(self.subnet_file) not in (None, self._previous):
                try:
                    with open(self.subnet_file) as f:
                        return subnetenv.parse(f.read())
                except (OSError, subnetenv.SubnetEnvError):
                    pass
            if time.monotonic() > deadline:
                raise FlanneldError(f"flanneld in {self.ns.name} wrote no subnet.env in {timeout:.0f}s:\n"
                                    f"{self.log_tail()}")
            time.sleep(0.05)

    def subnet_env(self) -> str:
        with open(self.subnet_file) as f:
            return f.read()

    @property
    def subnet(self) -> ipaddress.IPv4Network | None:
        """The leased subnet (from subnet.env; None when IPv6-only)."""
        return subnetenv.parse(self.subnet_env()).subnet_network

    @property
    def ipv6_subnet(self) -> ipaddress.IPv6Network | None:
        """The leased IPv6 subnet (subnet.env's FLANNEL_IPV6_SUBNET; None without EnableIPv6)."""
        return subnetenv.parse(self.subnet_env()).ipv6_subnet_network

    @property
    def overlay_addr(self) -> str:
        """<subnet .0>, flanneld's address on flannel.<VNI> or flannel0: it answers
        pings over the overlay."""
        subnet = self.subnet
        assert subnet is not None, "no IPv4 subnet"
        return str(subnet.network_address)

    @property
    def overlay_addr6(self) -> str:
        """<IPv6 subnet ::>, flanneld's address on flannel-v6.<VNI>."""
        subnet = self.ipv6_subnet
        assert subnet is not None, "no IPv6 subnet"
        return str(subnet.network_address)

    @property
    def key_name(self) -> str:
        """Its lease's key under <prefix>/subnets/ (dual stack: ``<v4>&<v6>``)."""
        return leases.subnet_key(self.subnet, self.ipv6_subnet)

    @property
    def lease_key(self) -> str:
        return f"{self.etcd_prefix}/subnets/{self.key_name}"

    def lease(self, etcd) -> leases.Lease:
        """flanneld's lease as stored in ``etcd`` (a lab.etcd.EtcdServer), parsed."""
        value = etcd.etcdctl("get", self.lease_key, "--print-value-only").strip()
        if not value:
            raise FlanneldError(f"no lease at {self.lease_key}")
        return leases.decode(self.key_name, value)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds, by pid; the exit status."""
        proc, self.proc = self.proc, None
        _running.discard(self)
        return procs.terminate(proc, grace)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "".join(self.log().splitlines(keepends=True)[-lines:])

    def __enter__(self) -> "Flanneld":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _identity(path: str) -> tuple[int, int] | None:
    """(inode, mtime) of ``path``: a file renamed into place is a new one."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


@atexit.register
def _stop_leftovers() -> None:
    for node in list(_running):
        with contextlib.suppress(Exception):
            node.stop(grace=2.0)
