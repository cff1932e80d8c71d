"""A full disk under subnet.env: the node forwards anyway, says why it is not ready,
and writes the file once there is room, whether it was running or starting.

The folder is a tiny tmpfs this test mounts in a directory it made (and unmounts),
filled to the last byte.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest
from support.http import http_get, wait_http
from support.waiting import wait_until

from udpflannel.lab.probe import ping

HEALTHZ_PORT = 10256


@pytest.fixture
def tiny_tmpfs(workdir):
    path = os.path.join(workdir, "run")
    os.makedirs(path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", path], check=True, timeout=10)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False, timeout=10)


def readyz_until(ns, predicate, timeout: float = 20.0) -> tuple[int, str]:
    def answer() -> tuple[int, str] | None:
        try:
            got = http_get(ns, HEALTHZ_PORT, "/readyz")
        except OSError:
            return None
        return got if predicate(got[1]) else None
    return wait_until(answer, timeout, "the awaited /readyz answer")


def fill(path: str) -> str:
    filler = os.path.join(path, "filler")
    with contextlib.suppress(OSError), open(filler, "wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    with contextlib.suppress(OSError):  # and the last inodes' worth of small files
        for i in range(10_000):
            open(os.path.join(path, f"f{i}"), "w").close()
    return filler


def empty(path: str) -> None:
    for name in os.listdir(path):
        if name != "subnet.env":
            os.unlink(os.path.join(path, name))


def test_a_full_disk_keeps_the_node_forwarding_and_unready_until_there_is_room(make_lab, make_cluster,
                                                                                 tiny_tmpfs):
    lab = make_lab(2)
    subnet_env = os.path.join(tiny_tmpfs, "subnet.env")
    cluster = make_cluster(lab, extra_args=["--healthz-port", str(HEALTHZ_PORT)])
    ready = f"ready (embedded registry {cluster.registry_file}: single host only)\n"
    cluster.start(1)
    fill(tiny_tmpfs)
    cluster.start(0, extra=["--subnet-file", subnet_env])
    victim = lab.nodes[0]

    # starting onto a full disk: it leases, forwards, and says why it is not ready
    want = f"cannot write {subnet_env}: No space left on device (ENOSPC); retrying every 5 s\n"
    assert readyz_until(victim, lambda body: "cannot write" in body) == (503, want)
    st = cluster.wait_status(0, lambda s: s.lease is not None and s.dataplane is not None
                             and s.dataplane.forwarding and s.dataplane.peers == 1, what="forwarding")
    cluster.wait_status(1, lambda s: s.dataplane is not None and s.dataplane.peers == 1, what="peer route")
    assert not st.ready and st.problems == (want.strip(),)
    assert all(ping(lab.nodes[1], cluster.overlay_addr(0), count=5))
    assert not os.path.exists(subnet_env) and cluster.procs[0].poll() is None

    # room again: written at the next retry, and ready
    empty(tiny_tmpfs)
    assert wait_http(victim, HEALTHZ_PORT, "/readyz", 200, timeout=15) == ready
    assert open(subnet_env).read().startswith("FLANNEL_NETWORK=")

    # a restart onto a full disk: subnet.env already says what it would write, so
    # nothing needs room and the node is ready at once
    fill(tiny_tmpfs)
    cluster.stop(0)
    cluster.start(0, extra=["--subnet-file", subnet_env])
    assert wait_http(victim, HEALTHZ_PORT, "/readyz", 200, timeout=15) == ready
    assert all(ping(lab.nodes[1], cluster.overlay_addr(0), count=5))
    # one that must change it (now FLANNEL_IPMASQ=true) cannot: forwarding, unready, retried
    cluster.stop(0)
    cluster.start(0, extra=["--subnet-file", subnet_env, "--ip-masq"])
    assert readyz_until(victim, lambda body: "cannot write" in body) == (503, want)
    assert all(ping(lab.nodes[1], cluster.overlay_addr(0), count=5))
    assert "FLANNEL_IPMASQ=false" in open(subnet_env).read()  # the old file, whole
    empty(tiny_tmpfs)
    assert wait_http(victim, HEALTHZ_PORT, "/readyz", 200, timeout=15) == ready
    assert "FLANNEL_IPMASQ=true" in open(subnet_env).read()
