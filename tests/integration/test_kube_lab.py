"""The Kubernetes lab against the real thing: kube-apiserver and kube-controller-manager
built by `make setup` (peers/kube), on their own etcd.

What the kube subnet manager will rely on, checked here on the real server: node IPAM
gives registered nodes podCIDRs inside the cluster CIDR; kube-flannel.yml's role can
read and watch nodes and patch nodes/status (annotations as flanneld sets them, and the
NetworkUnavailable condition) and nothing more; the asyncio client the daemon will use
works with that role's kubeconfig; the nodes survive an API server restart.

One lab for the module (its start time is printed: run with -s to see it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from udpflannel.lab.kubeapi import (
    CLUSTER_CIDR,
    FLANNEL_USER,
    NODE_CIDR_MASK_SIZE,
    KubeAPILab,
    KubeHTTPError,
)

ANNOTATION = "flannel.alpha.coreos.com/"
SMP = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
JSONPATCH = "application/json-patch+json"
APPLY = "application/apply-patch+yaml"


@pytest.fixture(scope="module")
def kube():
    base = Path(tempfile.mkdtemp(prefix="uft-kube-"))
    lab = KubeAPILab(base)
    try:
        lab.start()
        print(f"\nkube lab (etcd, kube-apiserver, kube-controller-manager) started in {lab.start_seconds:.1f} s",
              file=sys.stderr)
        lab.apply_flannel_rbac()
        yield lab
    finally:
        lab.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def nodes(kube):
    """Registers nodes with unique names; deletes whichever are left at the end."""
    made: list[str] = []

    def register(ip: str) -> str:
        name = f"n-{uuid.uuid4().hex[:8]}"
        kube.register_node(name, ip)
        made.append(name)
        return name
    try:
        yield register
    finally:
        for name in made:
            try:
                kube.delete_node(name, wait=False)
            except KubeHTTPError as e:
                if e.status != 404:
                    raise


def test_binaries_report_the_pinned_release(kube):
    gomod = (Path(__file__).parents[2] / "peers" / "kube" / "go.mod").read_text()
    pinned = next(line.split()[1] for line in gomod.splitlines()
                  if line.split()[:1] in (["k8s.io/kubernetes"], ["require"]) and "k8s.io/kubernetes" in line)
    version = kube.api.get("/version")
    assert version["gitVersion"] == pinned
    assert (version["major"], version["minor"]) == tuple(pinned[1:].split(".")[:2])
    assert version["goVersion"].startswith("go1.")
    client = json.loads(kube.kubectl("version", "-o", "json").stdout)
    assert client["clientVersion"]["gitVersion"] == pinned
    assert client["serverVersion"]["gitVersion"] == pinned


def test_registered_nodes_get_pod_cidrs_from_node_ipam(kube, nodes):
    a, b = nodes("192.168.10.1"), nodes("192.168.10.2")
    cidrs = {name: kube.wait_pod_cidr(name, timeout=30) for name in (a, b)}
    network = ipaddress.ip_network(CLUSTER_CIDR)
    subnets = {name: ipaddress.ip_network(c) for name, c in cidrs.items()}
    for name, subnet in subnets.items():
        assert subnet.subnet_of(network), (name, subnet)
        assert subnet.prefixlen == NODE_CIDR_MASK_SIZE
        node = kube.api.get(f"/api/v1/nodes/{name}")
        assert node["spec"]["podCIDRs"] == [cidrs[name]]
        assert {"type": "InternalIP", "address": "192.168.10.1" if name == a else "192.168.10.2"} \
            in node["status"]["addresses"]
    assert subnets[a] != subnets[b]


def test_flannel_rbac_is_kube_flannel_yml(kube):
    role = kube.api.get("/apis/rbac.authorization.k8s.io/v1/clusterroles/flannel")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["verbs"])) for r in role["rules"]}
    assert rules == {(("",), ("pods",), ("get",)), (("",), ("nodes",), ("get", "list", "watch")),
                     (("",), ("nodes/status",), ("patch",))}
    binding = kube.api.get("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/flannel")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "flannel", "namespace": "kube-flannel"}]
    assert binding["roleRef"]["name"] == "flannel"


@pytest.mark.parametrize("how", ["token", "cert"])
def test_flannel_role_reads_and_watches_nodes(kube, nodes, how):
    name = nodes("192.168.11.1")
    flannel = kube.flannel_api(how)
    review = flannel.request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                             {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    assert review["status"]["userInfo"]["username"] == FLANNEL_USER
    assert flannel.get(f"/api/v1/nodes/{name}")["metadata"]["name"] == name
    listing = flannel.get("/api/v1/nodes")
    assert name in {n["metadata"]["name"] for n in listing["items"]}
    # A watch from the list's version sees the admin's change to the node.
    kube.api.request("PATCH", f"/api/v1/nodes/{name}", {"metadata": {"labels": {"lab/seen": how}}},
                     content_type=MERGE)
    for ev in flannel.watch("/api/v1/nodes", listing["metadata"]["resourceVersion"], 20):
        if ev["object"]["metadata"]["name"] == name and \
                ev["object"]["metadata"].get("labels", {}).get("lab/seen") == how:
            assert ev["type"] == "MODIFIED"
            break
    else:
        pytest.fail("the watch ended without the node's change")
    # pods: get only (a missing pod is 404, not 403: the read was allowed)
    with pytest.raises(KubeHTTPError) as e:
        flannel.get("/api/v1/namespaces/kube-flannel/pods/no-such-pod")
    assert e.value.status == 404


def test_flannel_role_patches_node_status_as_flanneld_does(kube, nodes):
    name = nodes("192.168.12.1")
    kube.wait_pod_cidr(name)
    flannel = kube.flannel_api("token")
    status = f"/api/v1/nodes/{name}/status"
    # flanneld (kube.go): a two-way strategic merge patch of the annotations, sent to nodes/status.
    backend_data = '{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}'
    annotations = {ANNOTATION + "backend-type": "vxlan", ANNOTATION + "backend-data": backend_data,
                   ANNOTATION + "public-ip": "192.168.12.1", ANNOTATION + "kube-subnet-manager": "true"}
    out = flannel.request("PATCH", status, {"metadata": {"annotations": annotations}}, content_type=SMP)
    assert all(out["metadata"]["annotations"][k] == v for k, v in annotations.items())
    # flanneld's PatchStatus: NetworkUnavailable=False, strategic merge (conditions merge by type).
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    condition = {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp",
                 "message": "Flannel is running on this node", "lastTransitionTime": now, "lastHeartbeatTime": now}
    flannel.request("PATCH", status, {"status": {"conditions": [condition]}}, content_type=SMP)
    # The other patch types work on nodes/status too.
    flannel.request("PATCH", status, {"metadata": {"annotations": {ANNOTATION + "public-ip": "192.168.12.9"}}},
                    content_type=MERGE)
    flannel.request("PATCH", status, [{"op": "add", "path": "/metadata/annotations/lab~1json-patch",
                                       "value": "yes"}], content_type=JSONPATCH)
    apply = (f"apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  annotations:\n"
             f"    lab/server-side-apply: \"yes\"\n")
    flannel.request("PATCH", f"{status}?fieldManager=lab&force=true", apply, content_type=APPLY)

    node = kube.api.get(f"/api/v1/nodes/{name}")
    got = node["metadata"]["annotations"]
    assert got[ANNOTATION + "backend-data"] == backend_data
    assert got[ANNOTATION + "kube-subnet-manager"] == "true"
    assert got[ANNOTATION + "public-ip"] == "192.168.12.9"
    assert got["lab/json-patch"] == "yes" and got["lab/server-side-apply"] == "yes"
    conditions = [c for c in node["status"].get("conditions", []) if c["type"] == "NetworkUnavailable"]
    assert [(c["status"], c["reason"]) for c in conditions] == [("False", "FlannelIsUp")]
    assert node["spec"]["podCIDR"], "a status patch left the spec alone"


@pytest.mark.parametrize("how", ["token", "cert"])
def test_flannel_role_is_refused_everything_else(kube, nodes, how):
    name = nodes("192.168.13.1")
    flannel = kube.flannel_api(how)
    refused = [
        ("DELETE", f"/api/v1/nodes/{name}", None, "application/json"),
        ("PATCH", f"/api/v1/nodes/{name}", {"metadata": {"annotations": {"x": "y"}}}, SMP),  # the node, not status
        ("PUT", f"/api/v1/nodes/{name}/status", kube.api.get(f"/api/v1/nodes/{name}"), "application/json"),
        ("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name + "-x"}},
         "application/json"),
        ("GET", "/api/v1/secrets", None, "application/json"),
        ("GET", "/api/v1/namespaces/kube-system/secrets", None, "application/json"),
        ("GET", "/api/v1/pods", None, "application/json"),
        ("GET", "/api/v1/namespaces/kube-flannel/configmaps", None, "application/json"),
    ]
    for method, path, body, ctype in refused:
        with pytest.raises(KubeHTTPError) as e:
            flannel.request(method, path, body, content_type=ctype)
        assert e.value.status == 403, (method, path, e.value)
    assert flannel.can("patch", "nodes", subresource="status")
    assert not flannel.can("patch", "nodes")
    assert not flannel.can("update", "nodes", subresource="status")
    assert not flannel.can("list", "secrets")
    kube.api.get(f"/api/v1/nodes/{name}")  # still there


def test_kubernetes_asyncio_with_the_flannel_kubeconfig(kube, nodes):
    """The client the daemon will use, with kube-flannel's kubeconfig: list, watch,
    and patch_node_status with a dict (which the client sends as a strategic merge)."""
    from kubernetes_asyncio import client, config, watch

    name = nodes("192.168.14.1")
    kubeconfig = kube.flannel_kubeconfig("token")

    async def scenario() -> tuple[str, dict]:
        api_client = await config.new_client_from_config(config_file=kubeconfig)
        async with api_client:
            v1 = client.CoreV1Api(api_client)
            listing = await v1.list_node()
            assert name in {n.metadata.name for n in listing.items}
            w = watch.Watch()
            stream = w.stream(v1.list_node, resource_version=listing.metadata.resource_version,
                              field_selector=f"metadata.name={name}", timeout_seconds=20)
            await v1.patch_node_status(name, {"metadata": {"annotations": {ANNOTATION + "public-ip": "1.2.3.4"}}})
            async with asyncio.timeout(25):
                async for ev in stream:
                    annotations = ev["object"].metadata.annotations or {}
                    if annotations.get(ANNOTATION + "public-ip") == "1.2.3.4":
                        w.stop()
                        return ev["type"], annotations
            raise AssertionError("the watch ended without the patch")

    kind, annotations = asyncio.run(scenario())
    assert kind == "MODIFIED"
    assert kube.api.get(f"/api/v1/nodes/{name}")["metadata"]["annotations"][ANNOTATION + "public-ip"] == "1.2.3.4"


def test_lists_at_a_recent_resource_version_are_answered(kube, nodes):
    """The watch cache keeps up with etcd: a list of another resource at a version just
    written (served from the cache) is answered at once. With an etcd lacking on-demand
    progress notifications (Debian's 3.4.23) this fails after 3 s with 504."""
    nodes("192.168.17.1")
    rv = kube.api.get("/api/v1/nodes")["metadata"]["resourceVersion"]
    for resource in ("namespaces", "serviceaccounts", "nodes"):
        out = kube.api.get(f"/api/v1/{resource}?resourceVersion={rv}&resourceVersionMatch=NotOlderThan", timeout=10)
        assert int(out["metadata"]["resourceVersion"]) >= int(rv)


def test_deleted_node_is_gone_for_its_watchers(kube, nodes):
    name = nodes("192.168.15.1")
    kube.wait_pod_cidr(name)
    kube.delete_node(name, wait=True, timeout=20)
    with pytest.raises(KubeHTTPError) as e:
        kube.api.get(f"/api/v1/nodes/{name}")
    assert e.value.status == 404


def test_apiserver_restart_keeps_the_nodes(kube, nodes):
    """Last in the module: an outage of the API server; etcd and the controller manager
    stay up, and everything carries on once it is back."""
    name = nodes("192.168.16.1")
    before = kube.api.get(f"/api/v1/nodes/{name}")
    cidr = kube.wait_pod_cidr(name)
    old_pid = kube.apiserver.pid
    flannel = kube.flannel_api("token")
    assert kube.stop_apiserver() == 0, "kube-apiserver did not shut down cleanly within its grace"
    with pytest.raises(OSError):
        kube.api.get("/readyz", timeout=3)
    kube.start_apiserver()
    assert kube.apiserver.pid != old_pid
    after = kube.api.get(f"/api/v1/nodes/{name}")
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["spec"]["podCIDR"] == cidr
    # The controller manager reconnected: a node registered now gets a podCIDR too.
    late = nodes("192.168.16.2")
    assert ipaddress.ip_network(kube.wait_pod_cidr(late, timeout=60)) != ipaddress.ip_network(cidr)
    # And flannel's token from before the restart still works.
    assert flannel.get(f"/api/v1/nodes/{name}")["spec"]["podCIDR"] == cidr


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline[:120]}")
    return found


def test_a_lab_that_fails_to_start_leaves_nothing_running():
    """The controller manager refuses a bad cluster CIDR after etcd and the API server
    are up: start() raises with its log and stops both."""
    base = Path(tempfile.mkdtemp(prefix="uft-kube-bad-"))
    try:
        lab = KubeAPILab(base, cluster_cidr="not-a-cidr")
        with pytest.raises(RuntimeError, match="(?s)kube-controller-manager exited.*invalid CIDR"):
            lab.start(timeout=60)
        assert (lab.apiserver, lab.controller_manager, lab.etcd.proc) == (None, None, None)
        assert _processes_mentioning(str(base)) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)
