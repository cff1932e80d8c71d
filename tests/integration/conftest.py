"""Fixtures for root-only tests in throwaway network namespaces.

Every namespace is created with a unique name and removed in `finally`, every daemon
is stopped by pid, even when the test fails. Without root these tests skip, saying
why; in CI (root) they run.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from udpflannel.lab import oldkernel
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.netns import Lab

ROOT = os.geteuid() == 0

# Tests that only need an etcd binary on loopback, not root.
NO_ROOT_NEEDED = ("test_etcd_registry.py",)


def pytest_collection_modifyitems(config, items):
    if ROOT:
        return
    skip = pytest.mark.skip(reason="needs root: creates network namespaces, TUN and VXLAN devices")
    for item in items:
        if "integration" in str(item.fspath) and item.fspath.basename not in NO_ROOT_NEEDED:
            item.add_marker(skip)


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix="uft-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_lab():
    labs: list[Lab] = []

    def make(count: int, **kw) -> Lab:
        lab = Lab(count, tag="uft", **kw)
        labs.append(lab)
        return lab.__enter__()
    try:
        yield make
    finally:
        for lab in labs:
            lab.close()


@pytest.fixture
def make_cluster(workdir):
    """Cluster(lab, ...) whose daemons are stopped at the end; kernel="no-gro" (a
    udpflannel.lab.oldkernel profile) runs them as on an older kernel."""
    clusters: list[Cluster] = []

    def make(lab: Lab, kernel: str | None = None, **kw) -> Cluster:
        if kernel:
            kw["wrapper"] = oldkernel.wrap(kernel)
        cluster = Cluster(lab, workdir, **kw)
        clusters.append(cluster)
        return cluster
    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.stop_all()
