"""The Kubernetes subnet manager (--kube-subnet-mgr) against a real kube-apiserver.

One lab for the module: etcd, kube-apiserver and kube-controller-manager (node IPAM) run
in the lab's hub namespace, the API server on the hub's bridge address, where the
daemons in node namespaces reach it as nodes reach a real one (lab/kubeapi.py). Each
lab node acts as a host whose kubelet registered it (a Node with InternalIP = its
underlay address); node IPAM gives it a podCIDR, subnet zero included. Every daemon
runs with credentials bound to exactly kube-flannel.yml's ClusterRole (a token of its
ServiceAccount), so anything flannel's role does not allow fails here as in a cluster.

- vxlan: a udpflannel engine node, a kernel-plane node and the real flanneld v0.28.9 in
  kube mode, as kube-flannel.yml runs it: every pair pings and carries TCP; the node
  annotations and the NetworkUnavailable condition are flanneld's, byte for byte;
  pods through udpflannel-cni; a restart keeps the subnet and the MAC (also with the
  state dir gone: the MAC comes back from backend-data); bad annotations on a peer are
  ignored and counted; the API server stopped 10 s loses no ping, and a node added
  meanwhile is reached once it is back; a deleted Node loses its route.
- udp: flanneld's udp backend in kube mode beside two udpflannel engine nodes, under
  its own annotation prefix (so the vxlan nodes are not its peers).
- in a pod's shoes: kube-flannel.yml's exact command line (`flanneld --ip-masq
  --kube-subnet-mgr`), in-cluster credentials, the node found through POD_NAME.
- a podCIDR outside Network: one line naming both, exit 1.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from support.http import http_get
from support.waiting import wait_until

from udpflannel import warmstart
from udpflannel.core import kubenode
from udpflannel.core.lease import Lease
from udpflannel.host import localstate
from udpflannel.lab import probe, procs
from udpflannel.lab.benchlib import tools
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.flanneld import Flanneld
from udpflannel.lab.kubeapi import CLUSTER_CIDR, FLANNEL_NAMESPACE, KubeAPILab, KubeHTTPError
from udpflannel.lab.netns import Lab, Namespace

try:
    from .test_cni import cni_call, link, pod_address, pod_netconf
except ImportError:
    from test_cni import cni_call, link, pod_address, pod_netconf

HUB_ADDR = "192.168.250.2"  # the hub's address on the lab's underlay: the API server's
ENGINE = os.environ.get("UDPFLANNEL_TEST_ENGINE", "compiled")
HEALTHZ_PORT = 9402
NAMES = kubenode.annotation_names()
P = "flannel.alpha.coreos.com/"
UDP_PREFIX = "udp.flannel.example.com"  # the udp cluster's own annotation prefix
TCP_BYTES = (1 << 20) + 77


# -- the module's lab ------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab():
    with Lab(0, tag="ufk") as lab:
        lab.hub.link_up("br0", f"{HUB_ADDR}/24")
        yield lab


@pytest.fixture(scope="module")
def kube(lab, tmp_path_factory):
    base = tmp_path_factory.mktemp("kube")
    api = KubeAPILab(base, host=HUB_ADDR, netns=lab.hub)
    try:
        api.start()
        print(f"\nkube lab in the hub namespace, started in {api.start_seconds:.1f} s", file=sys.stderr)
        api.apply_flannel_rbac()
        yield api
    finally:
        api.stop()


@pytest.fixture(scope="module")
def kubeconfig(kube):
    """Credentials bound to exactly flannel's ClusterRole: its ServiceAccount's token."""
    return kube.flannel_kubeconfig("token")


def net_conf(directory, backend: str, network: str = CLUSTER_CIDR, **extra) -> str:
    path = os.path.join(str(directory), f"net-conf-{backend}-{network.replace('/', '_')}.json")
    with open(path, "w") as f:
        json.dump({"Network": network, "Backend": {"Type": backend}, **extra}, f)
    return path


def register(kube: KubeAPILab, lab: Lab, i: int, name: str) -> ipaddress.IPv4Network:
    """Node ``name`` as lab node i's kubelet registers it; its podCIDR once assigned."""
    kube.register_node(name, lab.addresses[i])
    return ipaddress.IPv4Network(kube.wait_pod_cidr(name, timeout=30))


def annotations(kube: KubeAPILab, name: str, prefix: str = P) -> dict[str, str]:
    got = kube.api.get(f"/api/v1/nodes/{name}")["metadata"].get("annotations", {})
    return {k: v for k, v in got.items() if k.startswith(prefix)}


def condition(kube: KubeAPILab, name: str) -> dict | None:
    node = kube.api.get(f"/api/v1/nodes/{name}")
    found = [c for c in node["status"].get("conditions", []) if c["type"] == "NetworkUnavailable"]
    return found[0] if found else None


def answer(ns: Namespace, path: str) -> tuple[int, str] | None:
    """http_get, or None while nothing listens yet."""
    try:
        return http_get(ns, HEALTHZ_PORT, path)
    except OSError:
        return None


def forget_node(kube: KubeAPILab, name: str) -> None:
    try:
        kube.delete_node(name, wait=False)
    except KubeHTTPError as e:
        if e.status != 404:
            raise


def metric(ns: Namespace, name: str) -> float:
    status, body = http_get(ns, HEALTHZ_PORT, "/metrics")
    assert status == 200, body
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def reachable(src: Namespace, addr: str, timeout: float = 30.0) -> None:
    """Until ``addr`` answers an echo from ``src`` (no route yet counts as no answer:
    flanneld routes peer by peer, so a peer it has not learnt yet is unreachable)."""
    def answered() -> bool:
        try:
            return probe.ping(src, addr, count=1, timeout=0.5)[0] is not None
        except OSError:  # ENETUNREACH
            return False
    wait_until(answered, timeout, f"{addr} answering {src.name}", interval=0.2)


def all_pairs_ping(lab: Lab, addrs: dict[int, str]) -> list[tuple[int, int]]:
    """The pairs (lab node, lab node) with a lost echo among three."""
    return [(a, b) for a in addrs for b in addrs
            if a != b and not all(probe.ping(lab.nodes[a], addrs[b], count=3, timeout=2.0))]


# -- the vxlan cluster: engine, kernel plane, flanneld ----------------------------------

class Mixed:
    def __init__(self, lab: Lab, kube: KubeAPILab, cluster: Cluster, fl: Flanneld, ours: dict[int, str], f: int):
        self.lab, self.kube, self.cluster, self.flanneld, self.ours, self.f = lab, kube, cluster, fl, ours, f
        self.subnets: dict[int, ipaddress.IPv4Network] = {}

    @property
    def nodes(self) -> list[int]:
        return [*self.ours, self.f]

    def name(self, i: int) -> str:
        return self.cluster.node_name(i)

    def addr(self, i: int) -> str:
        return str(self.subnets[i].network_address)


@pytest.fixture(scope="module")
def vx(lab, kube, kubeconfig, tmp_path_factory):
    work = tmp_path_factory.mktemp("vx")
    conf = net_conf(work, "vxlan")
    first = len(lab.nodes)
    for _ in range(3):
        lab.add_node()
    ours = {first: "engine", first + 1: "kernel"}
    f = first + 2
    cluster = Cluster(lab, str(work), engine=ENGINE, kubeconfig=kubeconfig, net_config=conf, node_prefix="k",
                      extra_args=["--healthz-port", str(HEALTHZ_PORT), "--metrics-port", str(HEALTHZ_PORT)])
    fl = Flanneld(lab.nodes[f], os.path.join(str(work), "flanneld"), kubeconfig=kubeconfig,
                  node_name=cluster.node_name(f), net_config=conf, healthz_port=HEALTHZ_PORT)
    m = Mixed(lab, kube, cluster, fl, ours, f)
    try:
        for i in m.nodes:
            m.subnets[i] = register(kube, lab, i, m.name(i))
        fl.start()
        for i, plane in ours.items():
            cluster.start(i, ["--dataplane", plane])
        env = fl.wait_ready(timeout=60)
        assert env.subnet_network == m.subnets[f]
        for i in ours:
            cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 2, 60, "routing to both others")
        for a in m.nodes:
            for b in m.nodes:
                if a != b:
                    reachable(lab.nodes[a], m.addr(b))
        yield m
    finally:
        fl.stop()
        cluster.stop_all()


def test_leases_are_the_pod_cidrs_subnet_zero_included(vx):
    for i in vx.ours:
        st = vx.cluster.status(i)
        assert ipaddress.IPv4Network(st.lease.subnet) == vx.subnets[i]
        assert (st.registry.kind, st.registry.where, st.registry.reachable) == ("kube", vx.kube.server, True)
    assert all(s.subnet_of(ipaddress.IPv4Network(CLUSTER_CIDR)) for s in vx.subnets.values())
    assert ipaddress.IPv4Network("10.244.0.0/24") in vx.subnets.values()  # the module's first node


def test_every_pair_pings_and_carries_tcp(vx):
    addrs = {i: vx.addr(i) for i in vx.nodes}
    assert all_pairs_ping(vx.lab, addrs) == []
    for port, (a, b) in enumerate(((a, b) for a in vx.nodes for b in vx.nodes if a != b), start=5611):
        got = probe.tcp_stream(vx.lab.nodes[a], vx.lab.nodes[b], addrs[b], nbytes=TCP_BYTES, port=port, timeout=20)
        assert got.bytes == TCP_BYTES, (a, b)
    assert vx.flanneld.running(), vx.flanneld.log_tail()


def test_annotations_are_flanneld_s_byte_for_byte(vx):
    """What the real flanneld wrote on its Node is what our encoder writes for its
    MAC and address; ours have the same keys and the same form."""
    f = vx.f
    theirs = annotations(vx.kube, vx.name(f))
    with vx.lab.nodes[f].ipr() as ipr:
        mac = ipr.link("get", index=ipr.link_lookup(ifname="flannel.1")[0])[0].get_attr("IFLA_ADDRESS")
    as_ours = Lease(vx.subnets[f], ipaddress.IPv4Address(vx.lab.addresses[f]), "vxlan", 1, mac)
    assert theirs == kubenode.publish(NAMES, as_ours, {}).changes
    assert theirs[P + "backend-data"] == f'{{"VNI":1,"VtepMAC":"{mac}"}}'
    for i in vx.ours:
        st = vx.cluster.status(i)
        mine = annotations(vx.kube, vx.name(i))
        assert set(mine) == set(theirs)
        assert mine == {P + "backend-type": "vxlan", P + "backend-data": f'{{"VNI":1,"VtepMAC":"{st.lease.vtep_mac}"}}',
                        P + "public-ip": vx.lab.addresses[i], P + "kube-subnet-manager": "true"}
        # and flanneld reads ours as its own kind: it routes to us (the pings above), here by its fdb
    cond = {i: condition(vx.kube, vx.name(i)) for i in vx.nodes}
    for i in vx.nodes:
        assert {k: cond[i][k] for k in ("status", "reason", "message")} == \
            {"status": "False", "reason": "FlannelIsUp", "message": "Flannel is running on this node"}, i


def test_health_status_and_metrics_name_the_api_server(vx):
    for i in vx.nodes:
        assert http_get(vx.lab.nodes[i], HEALTHZ_PORT, "/readyz")[0] == 200
    i = next(iter(vx.ours))
    assert metric(vx.lab.nodes[i], "udpflannel_registry_up") == 1
    out = vx.lab.nodes[i].run([sys.executable, "-m", "udpflannel", "status", "--admin-socket",
                               vx.cluster.admin_path(i)], 20)
    assert out.returncode == 0, out.stderr
    assert f"kube {vx.kube.server}, reachable" in out.stdout
    assert "the node's podCIDR (no expiry)" in out.stdout


def test_pods_on_kube_nodes_through_udpflannel_cni(vx, tmp_path):
    pods, ips, confs = {}, {}, {}
    nodes = [*vx.ours, vx.f]  # flanneld's node too: the plugin reads its subnet.env the same way
    try:
        for i in nodes:
            pod = vx.lab.add_namespace(f"kpod{i}")
            subnet_file = vx.flanneld.subnet_file if i == vx.f else os.path.join(vx.cluster.node_dir(i), "subnet.env")
            conf = pod_netconf(str(tmp_path), subnet_file, f"cni{i}")
            add = cni_call(vx.lab.nodes[i], "ADD", conf, f"kpod-{i}", pod.path)
            assert add.rc == 0, add
            ip = pod_address(add.out)
            assert ip.network == vx.subnets[i]
            pods[i], ips[i], confs[i] = pod, str(ip.ip), conf
        for a in nodes:
            for b in nodes:
                if a != b:
                    assert all(probe.ping(pods[a], ips[b], count=3, timeout=2.0)), (a, b)
        got = probe.tcp_stream(pods[nodes[0]], pods[nodes[1]], ips[nodes[1]], nbytes=TCP_BYTES, port=5700)
        assert got.bytes == TCP_BYTES
    finally:
        for i, pod in pods.items():
            cni_call(vx.lab.nodes[i], "DEL", confs[i], f"kpod-{i}", pod.path)
            assert link(pod, "eth0") is None


def test_a_restart_keeps_the_subnet_and_the_mac_even_without_the_state_dir(vx):
    i = next(i for i, plane in vx.ours.items() if plane == "engine")
    before = vx.cluster.status(i).lease
    for wipe in (False, True):
        assert vx.cluster.stop(i) == 0
        if wipe:  # a reinstalled host: the MAC comes back from the Node's backend-data
            d = vx.cluster.node_dir(i)
            for path in (localstate.mac_path(d, "flannel0"), localstate.subnet_path(d, "flannel0"),
                         warmstart.path(d, "flannel0")):
                os.unlink(path)
        vx.cluster.start(i, ["--dataplane", "engine"])
        st = vx.cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 2, 60, "ready again")
        assert (st.lease.subnet, st.lease.vtep_mac) == (before.subnet, before.vtep_mac), wipe
        if wipe:
            vx.cluster.wait_log(i, "taken from our Node's backend-data annotation")
        for b in vx.nodes:
            if b != i:
                reachable(vx.lab.nodes[b], vx.addr(i))
    assert annotations(vx.kube, vx.name(i))[P + "backend-data"] == f'{{"VNI":1,"VtepMAC":"{before.vtep_mac}"}}'


def test_our_annotations_are_put_back_when_someone_changes_them(vx):
    i = next(iter(vx.ours))
    name = vx.name(i)
    right = annotations(vx.kube, name)
    vx.kube.api.request("PATCH", f"/api/v1/nodes/{name}/status",
                        {"metadata": {"annotations": {P + "public-ip": "192.168.250.250",
                                                      P + "kube-subnet-manager": None}}},
                        content_type="application/strategic-merge-patch+json")
    wait_until(lambda: annotations(vx.kube, name) == right, 20, "our annotations put back")
    vx.cluster.wait_log(i, "someone changed our annotations: republished")


def test_malformed_annotations_on_a_peer_are_ignored_and_counted(vx):
    i = next(iter(vx.ours))
    name = "k-bogus"
    vx.kube.register_node(name, "192.168.250.99")
    vx.kube.wait_pod_cidr(name)
    before = metric(vx.lab.nodes[i], "udpflannel_registry_ignored_entries_total")
    peers = vx.cluster.status(i).dataplane.peers
    try:
        bad = {P + "kube-subnet-manager": "true", P + "backend-type": "vxlan",
               P + "backend-data": '{"VNI":1,"VtepMAC":"not-a-mac"}', P + "public-ip": "192.168.250.99"}
        vx.kube.api.request("PATCH", f"/api/v1/nodes/{name}/status", {"metadata": {"annotations": bad}},
                            content_type="application/strategic-merge-patch+json")
        wait_until(lambda: metric(vx.lab.nodes[i], "udpflannel_registry_ignored_entries_total") > before, 20,
                 "the bad node counted")
        vx.cluster.wait_log(i, f"ignoring node '{name}': annotation {P}backend-data: not a MAC address")
        assert vx.cluster.status(i).dataplane.peers == peers
        # readable but not routable (a loopback PublicIP): core.peers refuses it, as an etcd lease
        fixed = {**bad, P + "backend-data": '{"VNI":1,"VtepMAC":"0e:00:00:00:00:99"}', P + "public-ip": "127.0.0.1"}
        vx.kube.api.request("PATCH", f"/api/v1/nodes/{name}/status", {"metadata": {"annotations": fixed}},
                            content_type="application/strategic-merge-patch+json")
        vx.cluster.wait_log(i, "PublicIP 127.0.0.1 is a loopback address")
        assert vx.cluster.status(i).dataplane.peers == peers
        assert vx.flanneld.running() and vx.cluster.status(i).ready
    finally:
        vx.kube.delete_node(name)


def test_an_api_server_outage_loses_no_ping_and_a_node_added_meanwhile_is_reached(vx, lab, kube):
    """The API server stopped for 10 s: the nodes keep forwarding between them (no echo
    lost), stay ready; a node started meanwhile (its kubelet registered it before) waits,
    and once the API server is back everyone reaches it. (Its Node is made before the
    outage: after an API server restart the lab's node IPAM takes some 20 s to come
    back, which is the controller manager's business, not ours.)"""
    pairs = [(a, b) for a in vx.nodes for b in vx.nodes if a != b]
    new = len(lab.nodes)
    lab.add_node()
    vx.subnets[new] = register(kube, lab, new, vx.name(new))
    results: dict[tuple[int, int], str] = {}

    def pinger(a: int, b: int) -> None:
        results[(a, b)] = tools.ping(vx.lab.nodes[a], vx.addr(b), count=80, interval=0.2)

    threads = [threading.Thread(target=pinger, args=pair, daemon=True) for pair in pairs]
    for t in threads:
        t.start()
    time.sleep(1.0)
    assert kube.stop_apiserver() == 0
    stopped = time.monotonic()
    vx.cluster.start(new, ["--dataplane", "engine"])
    # our nodes see the outage and stay ready (forwarding)
    i = next(iter(vx.ours))
    wait_until(lambda: not vx.cluster.status(i).registry.reachable, 20, "the outage seen")
    assert vx.cluster.status(i).ready and http_get(vx.lab.nodes[i], HEALTHZ_PORT, "/readyz")[0] == 200
    time.sleep(max(0.0, 10.0 - (time.monotonic() - stopped)))
    def new_waits_for_the_api() -> bool:
        got = answer(lab.nodes[new], "/readyz")
        return got is not None and got[0] == 503 and "waiting for the Kubernetes API server" in got[1]
    wait_until(new_waits_for_the_api, 10, "the new node saying what it waits for")
    kube.start_apiserver()
    for t in threads:
        t.join(60)
    lost = {pair: out.splitlines()[-2] for pair, out in results.items() if " 0% packet loss" not in out}
    assert lost == {}, lost
    vx.cluster.wait_status(new, lambda s: s.ready and s.dataplane.peers == 3, 60, "the new node ready")
    for a in vx.nodes:
        # flanneld's informer comes back on client-go's reflector backoff (0.8 s doubling
        # to 30 s, each wait up to twice that with jitter): after a 10 s outage its next
        # list can be a minute away, so a pair with flanneld gets that long
        timeout = 90.0 if a == vx.f else 30.0
        reachable(vx.lab.nodes[a], vx.addr(new), timeout)
        reachable(vx.lab.nodes[new], vx.addr(a), timeout)
    wait_until(lambda: vx.cluster.status(i).registry.reachable, 30, "the API server reachable again")
    vx.ours[new] = "engine"


def test_a_deleted_node_loses_its_route(vx, kube):
    gone = max(vx.ours)  # the node the outage test added
    assert vx.ours[gone] == "engine"
    vx.cluster.stop(gone)
    kube.delete_node(vx.name(gone))
    del vx.ours[gone]
    for i in vx.ours:
        vx.cluster.wait_status(i, lambda s: s.dataplane.peers == 2, 30, "the deleted node's route removed")
    a = next(iter(vx.ours))
    assert probe.ping(vx.lab.nodes[a], vx.addr(gone), count=1, timeout=1.0) == [None]
    # flanneld drops it too: its route through flannel.1 is gone
    with vx.lab.nodes[vx.f].ipr() as ipr:
        wait_until(lambda: not [r for r in ipr.route("dump", family=2, table=254)
                              if r.get_attr("RTA_DST") == str(vx.subnets[gone].network_address)
                              and r["dst_len"] == vx.subnets[gone].prefixlen], 30, "flanneld's route removed")


# -- the manifests -------------------------------------------------------------------------

PACKAGING = os.path.join(os.path.dirname(__file__), "..", "..", "packaging", "kubernetes")


def test_both_manifests_are_accepted_by_the_api_server(kube):
    """Server-side apply of packaging/kubernetes (kubectl from the peers cache): every
    object admitted as written; the kube manifest's role, account and namespace are
    kube-flannel.yml's (no conflict with the lab's copies of them). No kubelet and no
    DaemonSet controller run here: no pod is started."""
    kube_yaml = os.path.abspath(os.path.join(PACKAGING, "udpflannel-kube.yaml"))
    etcd_yaml = os.path.abspath(os.path.join(PACKAGING, "udpflannel.yaml"))
    try:
        for path in (kube_yaml, etcd_yaml):
            out = kube.kubectl("apply", "--server-side", "--field-manager=udpflannel-manifest", "-f", path)
            assert "serverside-applied" in out.stdout, out.stdout
        ds = kube.api.get(f"/apis/apps/v1/namespaces/{FLANNEL_NAMESPACE}/daemonsets/kube-flannel-ds")
        c = ds["spec"]["template"]["spec"]["containers"][0]
        assert c["command"] == ["flanneld"] and c["args"][:2] == ["--ip-masq", "--kube-subnet-mgr"]
        assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
        cfg = kube.api.get(f"/api/v1/namespaces/{FLANNEL_NAMESPACE}/configmaps/kube-flannel-cfg")
        assert json.loads(cfg["data"]["net-conf.json"])["Network"] == CLUSTER_CIDR
        role = kube.api.get("/apis/rbac.authorization.k8s.io/v1/clusterroles/flannel")
        assert {(tuple(r["resources"]), tuple(r["verbs"])) for r in role["rules"]} == {
            (("pods",), ("get",)), (("nodes",), ("get", "list", "watch")), (("nodes/status",), ("patch",))}
        etcd_ds = kube.api.get("/apis/apps/v1/namespaces/kube-udpflannel/daemonsets/udpflannel")
        assert etcd_ds["spec"]["template"]["spec"]["containers"][0]["args"][0] == "run"
    finally:
        for path in (f"/apis/apps/v1/namespaces/{FLANNEL_NAMESPACE}/daemonsets/kube-flannel-ds",
                     f"/api/v1/namespaces/{FLANNEL_NAMESPACE}/configmaps/kube-flannel-cfg",
                     "/apis/apps/v1/namespaces/kube-udpflannel/daemonsets/udpflannel"):
            try:
                kube.api.request("DELETE", path)
            except KubeHTTPError as e:
                if e.status != 404:
                    raise


# -- the udp backend --------------------------------------------------------------------

def test_a_udp_backend_cluster_with_flanneld_udp(lab, kube, kubeconfig, tmp_path):
    conf = net_conf(tmp_path, "udp")
    first = len(lab.nodes)
    for _ in range(3):
        lab.add_node()
    ours, f = (first, first + 1), first + 2
    prefix = ["--kube-annotation-prefix", UDP_PREFIX]
    cluster = Cluster(lab, str(tmp_path), engine=ENGINE, kubeconfig=kubeconfig, net_config=conf, node_prefix="u",
                      extra_args=prefix)
    fl = Flanneld(lab.nodes[f], str(tmp_path / "flanneld"), kubeconfig=kubeconfig, node_name=cluster.node_name(f),
                  net_config=conf, extra_args=prefix)
    names = [cluster.node_name(i) for i in (*ours, f)]
    try:
        subnets = {i: register(kube, lab, i, cluster.node_name(i)) for i in (*ours, f)}
        fl.start()
        for i in ours:
            cluster.start(i)
        fl.wait_ready(timeout=60)
        for i in ours:
            cluster.wait_status(i, lambda s: s.ready and s.dataplane.peers == 2, 60, "routing to both others")
        addrs = {i: str(s.network_address) for i, s in subnets.items()}
        for a in addrs:
            for b in addrs:
                if a != b:
                    reachable(lab.nodes[a], addrs[b])
        assert all_pairs_ping(lab, addrs) == []
        for port, (a, b) in enumerate(((a, b) for a in addrs for b in addrs if a != b), start=5811):
            got = probe.tcp_stream(lab.nodes[a], lab.nodes[b], addrs[b], nbytes=TCP_BYTES, port=port, timeout=20)
            assert got.bytes == TCP_BYTES, (a, b)
        # flanneld udp's annotations, and ours, byte for byte
        udp_names = kubenode.annotation_names(UDP_PREFIX)
        pre = UDP_PREFIX + "/"
        for i in (*ours, f):
            got = annotations(kube, cluster.node_name(i), pre)
            lease = Lease(subnets[i], ipaddress.IPv4Address(lab.addresses[i]), "", None, None)
            assert got == kubenode.publish(udp_names, lease, {}).changes, i
            assert got[pre + "backend-type"] == "" and got[pre + "backend-data"] == "null"
        # the vxlan cluster's nodes (the other prefix) are no peers of these
        assert cluster.status(ours[0]).dataplane.peers == 2
    finally:
        fl.stop()
        cluster.stop_all()
        for name in names:
            forget_node(kube, name)


# -- as kube-flannel.yml runs it --------------------------------------------------------

def test_kube_flannel_yml_s_command_line_with_in_cluster_credentials(lab, kube, tmp_path):
    """`flanneld --ip-masq --kube-subnet-mgr --healthz-port=...` with POD_NAME and
    POD_NAMESPACE, no kubeconfig: the service account's token and CA where a pod has
    them (a private mount namespace puts them at /var/run/secrets/...), the API server
    from KUBERNETES_SERVICE_HOST/PORT, the node from the pod's spec.nodeName."""
    i = len(lab.nodes)
    lab.add_node()
    node, pod = "kf-node", "kube-flannel-ds-test"
    register(kube, lab, i, node)
    kube.api.request("POST", f"/api/v1/namespaces/{FLANNEL_NAMESPACE}/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": FLANNEL_NAMESPACE},
        "spec": {"nodeName": node, "serviceAccountName": "flannel",
                 "containers": [{"name": "kube-flannel", "image": "udpflannel:test"}]}})
    secrets = tmp_path / "serviceaccount"
    secrets.mkdir()
    (secrets / "token").write_text(kube.flannel_token())
    shutil.copy(kube.pki.ca, secrets / "ca.crt")
    (tmp_path / "etc").mkdir()
    conf = net_conf(tmp_path / "etc", "vxlan")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("FLANNELD_", "KUBERNETES_", "NODE_"))},
           "POD_NAME": pod, "POD_NAMESPACE": FLANNEL_NAMESPACE, "KUBERNETES_SERVICE_HOST": HUB_ADDR,
           "KUBERNETES_SERVICE_PORT": str(kube.port), "EVENT_QUEUE_DEPTH": "5000",
           "CONT_WHEN_CACHE_NOT_READY": "false",
           # udpflannel's own paths (kube-flannel.yml's are the host's /run/flannel, and ours /var/lib/udpflannel)
           "FLANNELD_STATE_DIR": str(tmp_path / "state"), "FLANNELD_NET_CONFIG_PATH": conf,
           "FLANNELD_IFACE": "eth0"}
    script = ('mount -t tmpfs tmpfs /run && mkdir -p /run/secrets/kubernetes.io/serviceaccount && '
              'cp "$1"/token "$1"/ca.crt /run/secrets/kubernetes.io/serviceaccount/ && shift && exec "$@"')
    argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", str(secrets),
            sys.executable, "-m", "udpflannel", "flanneld", "--ip-masq", "--kube-subnet-mgr",
            f"--healthz-port={HEALTHZ_PORT}"]
    with open(tmp_path / "daemon.log", "wb") as log:
        proc = lab.nodes[i].popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            try:
                return http_get(lab.nodes[i], HEALTHZ_PORT, "/readyz")[0] == 200
            except OSError:
                return False
        wait_until(ready, 60, "kube-flannel.yml's udpflannel ready")
        text = (tmp_path / "daemon.log").read_text()
        assert f"node {node} (pod {FLANNEL_NAMESPACE}/{pod}'s spec.nodeName)" in text
        assert f"Kubernetes API server https://{HUB_ADDR}:{kube.port}" in text
        assert annotations(kube, node)[P + "kube-subnet-manager"] == "true"
        assert condition(kube, node)["reason"] == "FlannelIsUp"
    finally:
        assert procs.terminate(proc, 10) == 0
        kube.api.request("DELETE", f"/api/v1/namespaces/{FLANNEL_NAMESPACE}/pods/{pod}")
        kube.delete_node(node, wait=False)


def test_a_node_not_registered_yet_is_waited_for_and_readyz_says_why(lab, kube, kubeconfig, tmp_path):
    i = len(lab.nodes)
    lab.add_node()
    cluster = Cluster(lab, str(tmp_path), engine=ENGINE, kubeconfig=kubeconfig, node_prefix="late",
                      net_config=net_conf(tmp_path, "vxlan"), extra_args=["--healthz-port", str(HEALTHZ_PORT)])
    name = cluster.node_name(i)
    try:
        cluster.start(i)
        why = f"waiting: node {name} does not exist yet (its kubelet registers it)"
        wait_until(lambda: answer(lab.nodes[i], "/readyz") == (503, why + "\n"), 30, "/readyz saying why")
        cluster.wait_log(i, f"node {name} does not exist yet (its kubelet registers it); waiting")
        subnet = register(kube, lab, i, name)
        st = cluster.wait_status(i, lambda s: s.ready, 30, "ready once registered")
        assert ipaddress.IPv4Network(st.lease.subnet) == subnet
        assert http_get(lab.nodes[i], HEALTHZ_PORT, "/readyz")[0] == 200
    finally:
        cluster.stop_all()
        forget_node(kube, name)


def test_a_pod_cidr_outside_the_network_is_one_line_naming_both(lab, kube, kubeconfig, tmp_path):
    i = len(lab.nodes)
    lab.add_node()
    cluster = Cluster(lab, str(tmp_path), engine=ENGINE, kubeconfig=kubeconfig, node_prefix="out",
                      net_config=net_conf(tmp_path, "vxlan", network="10.99.0.0/16"))
    subnet = register(kube, lab, i, cluster.node_name(i))
    try:
        res = lab.nodes[i].run(cluster.argv(i), 60, env={**os.environ, "NODE_NAME": cluster.node_name(i)})
        last = res.stderr.strip().splitlines()[-1]
        assert res.returncode == 1, res.stderr
        assert last == (f"udpflannel: error: node {cluster.node_name(i)}'s podCIDR {subnet} is not inside the "
                        f"Network 10.99.0.0/16 of {cluster.net_config}: Kubernetes' cluster CIDR "
                        "(kube-controller-manager --cluster-cidr) and net-conf.json must agree")
    finally:
        forget_node(kube, cluster.node_name(i))
