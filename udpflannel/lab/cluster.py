"""Run `udpflannel run` daemons inside a Lab's namespaces (demo, bench, tests).

Each node gets its own state dir, subnet.env, admin socket and log file under
``workdir``; all share one registry (the embedded file, or etcd endpoints), or, given
a ``kubeconfig``, one Kubernetes API server (--kube-subnet-mgr: node i is the Node
``node_name(i)``, its NODE_NAME, and reads ``net_config``). Daemons are real processes,
stopped by pid: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from typing import Any, Sequence

from udpflannel.core.status import NodeStatus
from udpflannel.lab import procs
from udpflannel.lab.netns import Lab
from udpflannel.observe import admin


class ClusterError(Exception):
    pass


class Cluster:
    def __init__(self, lab: Lab, workdir: str, *, engine: str = "compiled",
                 extra_args: Sequence[str] = (), etcd_endpoints: str | None = None,
                 kubeconfig: str | None = None, net_config: str | None = None, node_prefix: str = "node",
                 wrapper: Sequence[str] = ()) -> None:
        self.lab = lab
        self.kubeconfig = kubeconfig
        self.net_config = net_config
        self.node_prefix = node_prefix
        self.workdir = workdir
        self.engine = engine
        self.extra_args = list(extra_args)
        self.wrapper = list(wrapper)  # argv prefix for every daemon (lab.oldkernel.wrap)
        self.etcd_endpoints = etcd_endpoints
        self.registry_file = os.path.join(workdir, "registry.db")
        self.procs: dict[int, subprocess.Popen] = {}

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def node_dir(self, i: int) -> str:
        path = os.path.join(self.workdir, f"n{i + 1}")
        os.makedirs(path, exist_ok=True)
        return path

    def admin_path(self, i: int) -> str:
        return os.path.join(self.node_dir(i), "admin.sock")

    def argv(self, i: int) -> list[str]:
        d = self.node_dir(i)
        argv = [*self.wrapper, sys.executable, "-m", "udpflannel", "run", "--tun", "flannel0", "--iface", "eth0",
                "--subnet-file", os.path.join(d, "subnet.env"), "--state-dir", d,
                "--admin-socket", self.admin_path(i), "--engine", self.engine]
        if self.kubeconfig:
            argv += ["--kube-subnet-mgr", "--kubeconfig-file", self.kubeconfig]
            if self.net_config:
                argv += ["--net-config-path", self.net_config]
        elif self.etcd_endpoints:
            argv += ["--etcd-endpoints", self.etcd_endpoints]
        else:
            argv += ["--registry-file", self.registry_file]
        return argv + self.extra_args

    def node_name(self, i: int) -> str:
        """Node i's Kubernetes Node name (kube mode)."""
        return f"{self.node_prefix}-{i + 1}"

    def start(self, i: int, extra: Sequence[str] = ()) -> subprocess.Popen:
        if i in self.procs and self.procs[i].poll() is None:
            raise ClusterError(f"node {i + 1} already running")
        if os.path.exists(self.admin_path(i)):
            os.unlink(self.admin_path(i))
        env = None
        if self.kubeconfig:
            env = {k: v for k, v in os.environ.items() if k not in ("POD_NAME", "POD_NAMESPACE")}
            env["NODE_NAME"] = self.node_name(i)
        log = open(os.path.join(self.node_dir(i), "daemon.log"), "ab")
        proc = self.lab.nodes[i].popen(self.argv(i) + list(extra), stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env)
        log.close()
        self.procs[i] = proc
        return proc

    def start_all(self) -> None:
        for i in range(len(self.lab.nodes)):
            self.start(i)

    def stop(self, i: int, grace: float = 5.0) -> int | None:
        return procs.terminate(self.procs.pop(i, None), grace)

    def stop_all(self) -> None:
        for i in list(self.procs):
            self.stop(i)

    def log(self, i: int) -> str:
        """Node ``i``'s whole log (every start of it, appended)."""
        with open(os.path.join(self.node_dir(i), "daemon.log"), errors="replace") as f:
            return f.read()

    def log_tail(self, i: int, lines: int = 15) -> str:
        try:
            return "".join(self.log(i).splitlines(keepends=True)[-lines:])
        except OSError:
            return ""

    def wait_log(self, i: int, text: str, timeout: float = 15.0) -> None:
        """Until node ``i``'s log holds ``text``; AssertionError with the log's tail if not."""
        path = os.path.join(self.node_dir(i), "daemon.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(path, errors="replace") as f:
                if text in f.read():
                    return
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} in node {i + 1}'s log after {timeout}s:\n{self.log_tail(i)}")

    def status(self, i: int) -> NodeStatus:
        return NodeStatus.from_dict(admin.query(self.admin_path(i), timeout=2.0))

    def statuses(self) -> list[NodeStatus]:
        return [self.status(i) for i in sorted(self.procs)]

    def overlay_addr(self, i: int) -> str:
        """The node's TUN address (<subnet .0>), which answers pings over the overlay."""
        lease = self.status(i).lease
        assert lease is not None, f"node {i} has no lease"
        return str(ipaddress.IPv4Network(lease.subnet).network_address)

    def wait_status(self, i: int, predicate, timeout: float = 20.0, what: str = "ready") -> NodeStatus:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            for j, proc in self.procs.items():  # any node dying explains a wait that fails
                if proc.poll() is not None:
                    raise ClusterError(f"node {j + 1} exited with {proc.returncode}:\n{self.log_tail(j)}")
            try:
                last = self.status(i)
                if predicate(last):
                    return last
            except (OSError, ConnectionError):
                pass
            except AttributeError:  # a daemon still starting answers without a lease or plane
                if last is None or last.lease is not None and last.dataplane is not None:
                    raise
            time.sleep(0.1)
        others = "".join(f"\nnode {j + 1} log:\n{self.log_tail(j, 5)}" for j in self.procs if j != i)
        raise ClusterError(f"node {i + 1} not {what} after {timeout}s (last status {last}):\n"
                           f"{self.log_tail(i)}{others}")

    def wait_converged(self, timeout: float = 20.0) -> None:
        """Every running node knows a route to every other running node."""
        peers = len(self.procs) - 1
        for i in sorted(self.procs):
            self.wait_status(i, lambda st: st.dataplane.peers >= peers, timeout, f"routing to {peers} peers")
