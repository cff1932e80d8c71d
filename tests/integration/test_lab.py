"""The lab tools start processes and namespaces without running Python in a fork.

A copy of a threaded process (the test runner holds gRPC and pyroute2 threads) that
runs Python before exec can deadlock or run gRPC's fork handlers; those aborted the
daemons of later tests. Python's fork hooks run for every fork that
runs Python in the child (os.fork, preexec_fn), and for no fork+exec done in C.
"""

from __future__ import annotations

import os
import subprocess

FORKS: list[int] = []
os.register_at_fork(before=lambda: FORKS.append(os.getpid()))


def test_lab_popen_and_netlink_never_fork_python(make_lab):
    before = len(FORKS)
    lab = make_lab(2)
    with lab.nodes[0].ipr() as ipr:
        names = {link.get("ifname") for link in ipr.get_links()}
    assert names == {"lo", "eth0"}
    res = lab.nodes[1].run(["cat", "/proc/self/net/dev"], 10)
    out = res.stdout
    assert res.returncode == 0 and "eth0" in out and "br0" not in out  # ran inside node 2
    assert len(FORKS) == before, "a lab tool forked a Python copy of the test process"


def test_lab_removes_its_namespaces(make_lab):
    lab = make_lab(1)
    extra = lab.add_namespace("pod1")
    names = [lab.hub.name, extra.name] + [n.name for n in lab.nodes]
    assert all(os.path.exists(f"/var/run/netns/{n}") for n in names)
    lab.close()
    assert not any(os.path.exists(f"/var/run/netns/{n}") for n in names)
