"""udpflannel daemons on a secured etcd: client-certificate TLS and etcd auth.

As in test_etcd_cluster.py, etcd runs in the Lab's hub namespace on the underlay
address HUB_ADDR, and the daemons reach it from the node namespaces. Each test gets
an etcd of its own (started with --client-cert-auth), so none depends on another's
auth state.

The certificates are made here, not by TLSFiles.generate: the server certificate must
name HUB_ADDR, and the daemons get a client certificate whose CN ("udpflannel-node")
is not an etcd user. With auth enabled, etcd takes a client certificate's CN as the
user when a request carries no token; with a CN that is nobody, a daemon that works
must have authenticated with the username and password it was given.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support.waiting import wait_until

from udpflannel.lab import probe
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.netns import Lab

try:
    from .etcd_server import EtcdServer, TLSFiles, require_etcd
except ImportError:
    from etcd_server import EtcdServer, TLSFiles, require_etcd

ENGINE = os.environ.get("UDPFLANNEL_TEST_ENGINE", "compiled")
HUB_ADDR = "192.168.250.2"
PREFIX = "/coreos.com/network"  # flannel's default: the role below grants exactly this
CONFIG = '{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}'
ROOT_PW = "rootpw"
USER, USER_PW = "flannel", "s3cret-flannel"


# -- certificates -------------------------------------------------------------------

def make_pki(directory: Path, host: str) -> tuple[TLSFiles, str, str]:
    """A CA, a server certificate for ``host``, a client certificate CN=root (for
    etcdctl) and one CN=udpflannel-node (for the daemons): (files, node cert, node key)."""
    files = TLSFiles.generate(directory, host, more_clients=("udpflannel-node",))
    return files, str(Path(directory) / "udpflannel-node.crt"), str(Path(directory) / "udpflannel-node.key")


# -- fixtures -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab():
    with Lab(2, tag="ufs") as lab:
        lab.hub.link_up("br0", f"{HUB_ADDR}/24")
        yield lab


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), HUB_ADDR)


@pytest.fixture
def etcd(lab, pki, tmp_path):
    """A TLS etcd (client certificates required) of this test's own, in the hub."""
    require_etcd()
    tls, _, _ = pki
    server = EtcdServer(tmp_path / "etcd", tls=tls, host=HUB_ADDR, popen=lab.hub.popen)
    try:
        server.start()
        assert server.endpoint.startswith("https://")
        yield server
    finally:
        server.__exit__()


@pytest.fixture
def tls_flags(pki):
    tls, node_cert, node_key = pki
    return ["--etcd-cafile", tls.ca, "--etcd-certfile", node_cert, "--etcd-keyfile", node_key]


def enable_auth(etcd: EtcdServer) -> None:
    """root, and a user whose role may read and write only under flannel's prefix."""
    etcd.etcdctl("put", f"{PREFIX}/config", CONFIG)
    etcd.etcdctl("user", "add", f"root:{ROOT_PW}")
    etcd.etcdctl("role", "add", USER)
    etcd.etcdctl("role", "grant-permission", USER, "--prefix=true", "readwrite", PREFIX)
    etcd.etcdctl("user", "add", f"{USER}:{USER_PW}")
    etcd.etcdctl("user", "grant-role", USER, USER)
    etcd.etcdctl("auth", "enable")


# -- helpers ------------------------------------------------------------------------

def refused_logins(etcd: EtcdServer, user: str) -> int:
    """How many times etcd refused ``user``'s password (one warning line each)."""
    return sum(f'"user":"{user}"' in line and "authentication failed" in line
               for line in etcd.log_path.read_text(errors="replace").splitlines())


def assert_pings_both_ways(cluster: Cluster) -> None:
    addrs = [cluster.overlay_addr(i) for i in (0, 1)]
    for src, dst in ((0, 1), (1, 0)):
        rtts = probe.ping(cluster.lab.nodes[src], addrs[dst], count=3, timeout=1.0)
        assert any(rtts), f"node {src + 1} cannot ping node {dst + 1} ({addrs[dst]}): {rtts}"


def stored_public_ips(etcd: EtcdServer, user: str | None = None) -> list[str]:
    doc = etcd.etcdctl("get", f"{PREFIX}/subnets/", "--prefix", "--print-value-only", user=user)
    return sorted(json.loads(line)["PublicIP"] for line in doc.splitlines() if line.strip())


def stop_in_time(cluster: Cluster, i: int, limit: float = 10.0) -> tuple[int | None, float]:
    """SIGTERM node i's daemon: (exit code or None if still running after ``limit``, seconds)."""
    proc = cluster.procs[i]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(limit)
    except subprocess.TimeoutExpired:
        code = None  # cluster.stop_all (make_cluster's finally) kills it by pid
    else:
        cluster.procs.pop(i)
    return code, time.monotonic() - t0


# -- tests --------------------------------------------------------------------------

def test_client_certificate_tls(lab, etcd, make_cluster, tls_flags):
    etcd.etcdctl("put", f"{PREFIX}/config", CONFIG)
    cluster = make_cluster(lab, engine=ENGINE, etcd_endpoints=etcd.endpoint, extra_args=tls_flags)
    cluster.start(0)
    cluster.start(1)
    cluster.wait_converged(timeout=15)
    assert_pings_both_ways(cluster)
    assert stored_public_ips(etcd) == sorted(lab.addresses)
    for i in (0, 1):
        assert cluster.stop(i) == 0
        assert "Traceback" not in cluster.log(i)


def test_password_auth_from_environment(lab, etcd, pki, make_cluster, tls_flags, monkeypatch):
    enable_auth(etcd)
    # the role really is limited: the user cannot write outside flannel's prefix
    with pytest.raises(RuntimeError, match="permission denied"):
        etcd.etcdctl("put", "/elsewhere", "x", user=f"{USER}:{USER_PW}")
    # and the daemons' certificate alone is nobody: a working daemon used the password
    _, node_cert, node_key = pki
    alone = etcd._ctl([a for a in etcd.ctl_args() if not a.startswith(("--cert=", "--key="))]
                      + [f"--cert={node_cert}", f"--key={node_key}", "get", f"{PREFIX}/config"])
    assert alone.returncode != 0 and "permission denied" in alone.stderr, alone.stderr
    monkeypatch.setenv("FLANNELD_ETCD_USERNAME", USER)  # inherited by the daemons
    monkeypatch.setenv("FLANNELD_ETCD_PASSWORD", USER_PW)
    cluster = make_cluster(lab, engine=ENGINE, etcd_endpoints=etcd.endpoint, extra_args=tls_flags)
    for i in (0, 1):
        assert "--etcd-username" not in cluster.argv(i) and "--etcd-password" not in cluster.argv(i)
    cluster.start(0)
    cluster.start(1)
    cluster.wait_converged(timeout=15)
    assert_pings_both_ways(cluster)
    assert stored_public_ips(etcd, user=f"{USER}:{USER_PW}") == sorted(lab.addresses)
    for i in (0, 1):
        assert cluster.stop(i) == 0
        text = cluster.log(i)
        assert "Traceback" not in text and "registry unreachable" not in text, text


def test_wrong_password_retries_quietly_and_stops_on_sigterm(lab, etcd, make_cluster, tls_flags, monkeypatch):
    enable_auth(etcd)
    monkeypatch.setenv("FLANNELD_ETCD_USERNAME", USER)
    monkeypatch.setenv("FLANNELD_ETCD_PASSWORD", "wrong")
    cluster = make_cluster(lab, engine=ENGINE, etcd_endpoints=etcd.endpoint, extra_args=tls_flags)
    proc = cluster.start(0)
    wait_until(lambda: "registry unreachable" in cluster.log(0), 10, "the registry-unreachable line")
    # several retries (backoff from 0.5 s) happen meanwhile: etcd logs each refused login
    wait_until(lambda: refused_logins(etcd, USER) >= 4, 20, "three retries refused by etcd",
               detail=lambda: etcd.log_tail())
    assert proc.poll() is None, f"exited with {proc.returncode}:\n{cluster.log(0)}"
    text = cluster.log(0)
    assert "Traceback" not in text, text
    failures = [line for line in text.splitlines() if "registry unreachable" in line]
    assert len(failures) == 1, text  # once, not once per retry
    assert re.search(r"authentication failed|invalid user ID or password", failures[0]), failures[0]
    st = cluster.status(0)  # the admin socket answers from the start, and says why
    assert not st.ready and st.lease is None and st.registry.reachable is False

    code, took = stop_in_time(cluster, 0)
    assert code == 0 and took < 10, f"exit {code} after {took:.1f}s:\n{cluster.log(0)}"
    assert "Traceback" not in cluster.log(0)
    assert stored_public_ips(etcd, user=f"root:{ROOT_PW}") == []  # nothing was leased
