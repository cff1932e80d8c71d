"""udpflannel daemons on a real etcd, as nodes of a flannel cluster.

etcd runs inside the test's own namespaces: the Lab's hub namespace gives its bridge
an underlay address (HUB_ADDR) and etcd listens there, so the daemons in the node
namespaces reach it over the same underlay they tunnel over. Everything the tests do
to etcd by hand goes through etcdctl run in the hub namespace, as an operator would.

Each test works under its own key prefix (``--etcd-prefix``); one test uses flannel's
default prefix with the endpoint given as FLANNELD_ETCD_ENDPOINTS.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid

import pytest
from support.waiting import wait_until

from udpflannel.lab import probe
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.netns import Lab

try:
    from .etcd_server import FLANNEL_UDP_LEASE, FLANNEL_VXLAN_LEASE, HUB_ADDR, EtcdServer, etcd_in_hub
    from .etcd_server import subnet_leases as leases
except ImportError:
    from etcd_server import FLANNEL_UDP_LEASE, FLANNEL_VXLAN_LEASE, HUB_ADDR, EtcdServer, etcd_in_hub
    from etcd_server import subnet_leases as leases

ENGINE = os.environ.get("UDPFLANNEL_TEST_ENGINE", "compiled")
NODES = 5
DEFAULT_PREFIX = "/coreos.com/network"
CONFIG = '{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}'
SHORT_TTL = ["--subnet-lease-ttl", "0.05", "--subnet-lease-renew-margin", "1"]  # 3 s, renewed at 1.5 s
NET = ipaddress.IPv4Network


# -- fixtures -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab():
    with Lab(NODES, tag="ufe") as lab:
        yield lab


@pytest.fixture(scope="module")
def etcd(lab, tmp_path_factory):
    with etcd_in_hub(lab, tmp_path_factory.mktemp("etcd")) as server:
        yield server


@pytest.fixture
def make(lab, etcd, make_cluster, workdir):
    """make(config) -> a Cluster on etcd under a fresh prefix holding ``config``."""
    count = iter(range(100))

    def make_one(config: str | None = CONFIG, extra: list[str] | None = None) -> Cluster:
        prefix = f"/t-{uuid.uuid4().hex[:8]}/network"
        if config is not None:
            etcd.etcdctl("put", f"{prefix}/config", config)
        cluster = make_cluster(lab, engine=ENGINE, etcd_endpoints=etcd.endpoint,
                               extra_args=["--etcd-prefix", prefix] + (extra or []))
        cluster.workdir = os.path.join(workdir, f"c{next(count)}")  # own state per cluster
        cluster.prefix = prefix
        return cluster
    return make_one


# -- helpers ------------------------------------------------------------------------

def key_of(subnet: str) -> str:
    net = NET(subnet)
    return f"{net.network_address}-{net.prefixlen}"


def connected_to(etcd: EtcdServer, lab: Lab) -> set[str]:
    """The addresses holding an established TCP connection to etcd's client port, as
    seen in the hub where etcd listens (a frozen etcd's kernel still completes them)."""
    out = lab.hub.run(["ss", "-tnH", "state", "established", f"( sport = :{etcd.client_port} )"], 15).stdout
    return {line.split()[-1].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}


def unreachable_pairs(cluster: Cluster) -> list[tuple[int, int]]:
    running = sorted(cluster.procs)
    addrs = {j: cluster.overlay_addr(j) for j in running}
    return [(i, j) for i in running for j in running
            if i != j and not any(probe.ping(cluster.lab.nodes[i], addrs[j], count=3, timeout=1.0))]


def run_to_exit(lab: Lab, workdir: str, argv: list[str], env: dict | None = None,
                timeout: float = 30.0) -> subprocess.CompletedProcess:
    """`udpflannel run` in node 1's namespace, expected to exit by itself."""
    os.makedirs(workdir, exist_ok=True)
    full = [sys.executable, "-m", "udpflannel", "run", "--iface", "eth0", "--engine", ENGINE,
            "--state-dir", workdir, "--subnet-file", f"{workdir}/subnet.env",
            "--admin-socket", f"{workdir}/admin.sock"] + argv
    return lab.nodes[0].run(full, timeout, env=env)


# -- config -------------------------------------------------------------------------

def test_hand_written_config_is_used_and_lease_has_flannels_bytes(etcd, make):
    # written by hand as an operator would, with Go-style case-insensitive field names
    cluster = make('{"network": "10.50.0.0/16", "subnetLen": 25, "SubnetMin": "10.50.8.0", '
                   '"SubnetMax": "10.50.9.128", "backend": {"type": "vxlan", "vni": 1}}')
    cluster.start(0)
    st = cluster.wait_status(0, lambda s: s.ready)
    subnet = NET(st.lease.subnet)
    assert subnet.prefixlen == 25 and NET("10.50.8.0/23").supernet_of(subnet)
    with open(os.path.join(cluster.node_dir(0), "subnet.env")) as f:
        env = dict(line.strip().split("=", 1) for line in f if line.strip())
    assert env["FLANNEL_NETWORK"] == "10.50.0.0/16"
    assert env["FLANNEL_SUBNET"] == f"{subnet.network_address + 1}/25"

    stored = leases(etcd, cluster.prefix)
    assert list(stored) == [key_of(st.lease.subnet)]
    assert stored[key_of(st.lease.subnet)]["value"] == FLANNEL_VXLAN_LEASE.format(
        ip=cluster.lab.addresses[0], mac=st.lease.vtep_mac)
    ttl = etcd.etcdctl("lease", "timetolive", f"{stored[key_of(st.lease.subnet)]['lease']:x}")
    assert "granted with TTL(86400s)" in ttl, ttl  # flannel's 24 h

    # a restart finds its own lease by PublicIP and renews it: same subnet, same bytes
    assert cluster.stop(0) == 0
    os.unlink(os.path.join(cluster.node_dir(0), "subnet.env"))  # not from subnet.env, from etcd
    cluster.start(0)
    assert cluster.wait_status(0, lambda s: s.ready).lease.subnet == st.lease.subnet
    again = leases(etcd, cluster.prefix)
    assert list(again) == list(stored) and again[key_of(st.lease.subnet)]["value"] == \
        stored[key_of(st.lease.subnet)]["value"]
    assert "reusing our lease" in cluster.log(0)


@pytest.mark.parametrize("config, words", [
    ('{"Network": "10.50.0.0/29"}', ["{prefix}/config", "/29"]),
    ("not json", ["{prefix}/config", "JSON"]),
])
def test_bad_config_is_one_clear_line(lab, etcd, workdir, config, words):
    prefix = f"/t-{uuid.uuid4().hex[:8]}/network"
    etcd.etcdctl("put", f"{prefix}/config", config)
    res = run_to_exit(lab, workdir, ["--etcd-endpoints", etcd.endpoint, "--etcd-prefix", prefix])
    assert res.returncode == 1, res.stderr
    errors = [line for line in res.stderr.strip().splitlines() if " INFO " not in line]
    assert len(errors) == 1 and errors[0].startswith("udpflannel: error: "), res.stderr
    assert "Traceback" not in res.stderr
    for word in words:
        assert word.format(prefix=prefix) in errors[0], errors[0]
    assert leases(etcd, prefix) == {}  # nothing was leased


def test_missing_config_is_waited_for_like_flanneld(etcd, make):
    """etcd up but no config yet: the node waits, saying so (under a DaemonSet an exit
    would be a crash loop), invents nothing, and starts once the operator writes one."""
    cluster = make(None)
    prefix = cluster.prefix
    cluster.start(0)
    wait_until(lambda: f"no network config at {prefix}/config yet; waiting" in cluster.log(0), 10,
             "the waiting line")
    assert cluster.procs[0].poll() is None and leases(etcd, prefix) == {}
    assert etcd.etcdctl("get", f"{prefix}/config") == ""  # nothing invented
    etcd.etcdctl("put", f"{prefix}/config", CONFIG)
    st = cluster.wait_status(0, lambda s: s.ready, 15, "ready once the config is there")
    assert list(leases(etcd, prefix)) == [key_of(st.lease.subnet)]


def test_endpoints_from_environment_and_default_prefix(etcd, lab, make_cluster, workdir, monkeypatch):
    etcd.etcdctl("put", f"{DEFAULT_PREFIX}/config", CONFIG)
    try:
        # no --etcd-endpoints flag; the first endpoint is dead, as after a member failed
        monkeypatch.setenv("FLANNELD_ETCD_ENDPOINTS", f"http://{HUB_ADDR}:1,{etcd.endpoint}")
        cluster = make_cluster(lab, engine=ENGINE)
        cluster.start(0)
        st = cluster.wait_status(0, lambda s: s.ready)
        stored = leases(etcd, DEFAULT_PREFIX)
        assert json.loads(stored[key_of(st.lease.subnet)]["value"])["PublicIP"] == lab.addresses[0]
        assert not os.path.exists(cluster.registry_file)  # the embedded registry was not used
    finally:
        etcd.etcdctl("del", f"{DEFAULT_PREFIX}/", "--prefix")


# -- membership ---------------------------------------------------------------------

def test_nodes_reach_each_other_leave_by_delete_or_expiry_and_join(etcd, make):
    cluster = make()
    for i in range(3):
        cluster.start(i)
    cluster.start(3, SHORT_TTL)  # node 4 renews every 1.8 s: its lease dies soon after it does
    cluster.wait_converged()
    assert unreachable_pairs(cluster) == []
    subnets = {i: cluster.status(i).lease.subnet for i in range(4)}
    assert len(set(subnets.values())) == 4
    assert len(leases(etcd, cluster.prefix)) == 4

    # node 3 stops cleanly (its lease stays, for reuse) and the operator deletes the lease
    assert cluster.stop(2) == 0
    assert key_of(subnets[2]) in leases(etcd, cluster.prefix)
    etcd.etcdctl("del", f"{cluster.prefix}/subnets/{key_of(subnets[2])}")
    for i in (0, 1, 3):
        cluster.wait_status(i, lambda s: s.dataplane.peers == 2, 10, "dropping node 3 (deleted)")

    # node 4 dies without a word: its 3 s lease expires and the others drop it
    cluster.procs[3].kill()
    cluster.procs.pop(3).wait(5)
    for i in (0, 1):
        cluster.wait_status(i, lambda s: s.dataplane.peers == 1, 10, "dropping node 4 (expired)")
    assert set(leases(etcd, cluster.prefix)) == {key_of(subnets[0]), key_of(subnets[1])}

    # node 3 comes back first: its lease is gone, the subnet in its subnet.env is still
    # free (a new node starting before it may pick that subnet at random: ~1 % flake)
    cluster.start(2)
    assert cluster.wait_status(2, lambda s: s.ready).lease.subnet == subnets[2]
    # node 5 joins; everyone reaches everyone
    cluster.start(4)
    cluster.wait_converged()
    assert unreachable_pairs(cluster) == []
    assert cluster.status(4).lease.subnet not in (subnets[0], subnets[1], subnets[2])


def test_simultaneous_starts_never_share_a_subnet(etcd, make):
    """Three daemons, three free subnets, released at the same instant: etcd is frozen
    while they start, so their first requests are all answered together and their
    choices race. Every round each must end with its own subnet."""
    config = ('{"Network": "10.60.0.0/16", "SubnetMin": "10.60.1.0", "SubnetMax": "10.60.3.0", '
              '"Backend": {"Type": "vxlan"}}')
    races = 0
    for _ in range(4):
        cluster = make(config)
        etcd.pause()
        try:
            for i in range(3):
                cluster.start(i)
            wait_until(lambda lab=cluster.lab: connected_to(etcd, lab) >= set(lab.addresses[:3]), 15,
                       "all three connected to etcd and waiting on it")
        finally:
            etcd.resume()
        try:
            cluster.wait_converged()
            got = [cluster.status(i).lease.subnet for i in range(3)]
            assert sorted(got) == ["10.60.1.0/24", "10.60.2.0/24", "10.60.3.0/24"]
            stored = leases(etcd, cluster.prefix)
            assert sorted(json.loads(v["value"])["PublicIP"] for v in stored.values()) == \
                sorted(cluster.lab.addresses[:3])
            races += sum(cluster.log(i).count("taken by a racing node") for i in range(3))
        finally:
            cluster.stop_all()
    print(f"lost creation races retried: {races}")


# -- outages ------------------------------------------------------------------------

def test_etcd_outage_keeps_traffic_flowing_and_a_node_joins_after(etcd, make):
    """etcd down for ~5 s under a TCP stream: packets keep crossing, each daemon logs the
    outage once, node 2's 3 s lease is renewed again afterwards, changes made right after
    the restart (before the daemons' watches are back, history compacted) are applied, a
    node started during the outage joins when etcd is back, and so does one started after."""
    cluster = make()
    subnets = f"{cluster.prefix}/subnets"
    cluster.start(0)
    cluster.start(1, SHORT_TTL)
    etcd.etcdctl("put", f"{subnets}/10.244.210.0-24",  # a flanneld node that will leave
                 FLANNEL_VXLAN_LEASE.format(ip="192.168.250.210", mac="c6:d2:32:6f:8f:10"))
    cluster.wait_converged()
    for i in (0, 1):
        cluster.wait_status(i, lambda s: s.dataplane.peers == 2, 10, "routing to the flanneld node")
    addr1 = cluster.overlay_addr(1)
    subnet1 = cluster.status(1).lease.subnet
    box: dict = {}

    def stream() -> None:
        try:
            box["result"] = probe.tcp_stream(cluster.lab.nodes[0], cluster.lab.nodes[1], addr1,
                                             seconds=6.0, port=5202)
        except BaseException as e:  # handed to the test below
            box["error"] = e

    sender = threading.Thread(target=stream, daemon=True)
    sender.start()
    try:
        time.sleep(0.5)
        etcd.stop()
        try:
            before = cluster.status(1).dataplane.counters["rx_packets"]
            for i in (0, 1):
                cluster.wait_status(i, lambda s: not s.registry.reachable, 5, "noticing the outage")
            cluster.start(2)  # cannot read its config yet: waits for etcd
            time.sleep(0.5)  # the stream goes on meanwhile
            # node 2's 3 s lease falls due for renewal, and then expires as far as it knows
            wait_until(lambda: time.time() > cluster.status(1).lease.expiration, 10, "node 2's lease overdue")
            during = cluster.status(1).dataplane.counters["rx_packets"] - before
        finally:
            etcd.start()
        # changed while the daemons are still backing off, and the history compacted:
        # they must catch up by re-listing
        etcd.etcdctl("del", f"{subnets}/10.244.210.0-24")
        etcd.etcdctl("put", f"{subnets}/10.244.211.0-24",
                     FLANNEL_VXLAN_LEASE.format(ip="192.168.250.211", mac="c6:d2:32:6f:8f:11"))
        etcd.etcdctl("compact", str(etcd.revision()))
    finally:
        sender.join(20)
    assert "error" not in box, box.get("error")
    assert box["result"].bytes > 1_000_000
    assert during > 500, f"only {during} packets arrived while etcd was down"
    assert all(p.poll() is None for p in cluster.procs.values())

    cluster.start(3)  # joins after etcd is back; the others' watches have resumed
    cluster.wait_converged(timeout=20)
    for i in range(4):  # 3 udpflannel peers + the flanneld node 10.244.211.0
        cluster.wait_status(i, lambda s: s.dataplane.peers == 4, 10, "catching up with missed changes")
    assert unreachable_pairs(cluster) == []
    for i in (0, 1):
        cluster.wait_status(i, lambda s: s.registry.reachable, 10, "registry_ok again")
        text = cluster.log(i)
        assert text.count("registry unreachable") == 1, text  # once per change of state
        assert "registry reachable again" in text, text
    # renewed as soon as the watch found etcd again, not after a long backoff: never lapsed
    assert "had vanished" not in cluster.log(1)
    # renewals have resumed: each one moves node 2's key to a new etcd lease (every 1.5 s)
    etcd_leases = [leases(etcd, cluster.prefix)[key_of(subnet1)]["lease"]]

    def renewed_twice() -> bool:
        held = leases(etcd, cluster.prefix).get(key_of(subnet1))
        assert held is not None, f"node 2's lease lapsed:\n{cluster.log_tail(1)}"
        if held["lease"] != etcd_leases[-1]:
            etcd_leases.append(held["lease"])
        return len(etcd_leases) >= 3
    wait_until(renewed_twice, 10, "two renewals of node 2's lease", detail=lambda: cluster.log_tail(1))
    assert json.loads(leases(etcd, cluster.prefix)[key_of(subnet1)]["value"])["PublicIP"] == \
        cluster.lab.addresses[1]
    assert cluster.status(1).lease.subnet == subnet1


def test_own_lease_deleted_from_outside_is_recreated(etcd, make):
    cluster = make()
    cluster.start(0)
    cluster.start(1)
    cluster.wait_converged()
    st = cluster.status(0)
    key = f"{cluster.prefix}/subnets/{key_of(st.lease.subnet)}"
    before = leases(etcd, cluster.prefix)[key_of(st.lease.subnet)]

    etcd.etcdctl("del", key)
    after = wait_until(lambda: leases(etcd, cluster.prefix).get(key_of(st.lease.subnet)), 10, "the lease back")
    assert json.loads(after["value"])["PublicIP"] == cluster.lab.addresses[0]
    assert after["value"] == before["value"]
    assert after["lease"] != 0  # attached to an etcd lease again: it can still expire
    assert cluster.procs[0].poll() is None and cluster.status(0).lease.subnet == st.lease.subnet
    assert re.search(r"lease .* re-created", cluster.log(0))
    # the other node may have dropped the route for a moment; it is back
    cluster.wait_converged(timeout=10)
    assert unreachable_pairs(cluster) == []


def test_own_subnet_taken_by_another_node_is_a_clear_exit(etcd, make):
    cluster = make()
    cluster.start(0)
    st = cluster.wait_status(0, lambda s: s.ready)
    etcd.etcdctl("put", f"{cluster.prefix}/subnets/{key_of(st.lease.subnet)}",
                 FLANNEL_VXLAN_LEASE.format(ip="192.168.250.99", mac="c6:d2:32:6f:8f:99"))
    assert cluster.procs[0].wait(10) == 1
    last = cluster.log(0).strip().splitlines()[-1]
    assert last.startswith("udpflannel: error: ") and st.lease.subnet in last and "192.168.250.99" in last, last
    cluster.procs.pop(0)


# -- other writers ------------------------------------------------------------------

def test_leases_written_by_flanneld_by_hand(etcd, make):
    """A flanneld vxlan lease is routed by VXLAN, a flanneld udp-backend lease (no
    BackendType) by flanneld's udp framing, in the snapshot and when watched; with
    --udp-port 0 the udp lease is ignored with a log line."""
    cluster = make()
    subnets = f"{cluster.prefix}/subnets"
    etcd.etcdctl("put", f"{subnets}/10.244.201.0-24",
                 FLANNEL_VXLAN_LEASE.format(ip="192.168.250.201", mac="c6:d2:32:6f:8f:44"))
    etcd.etcdctl("put", f"{subnets}/10.244.202.0-24", FLANNEL_UDP_LEASE.format(ip="192.168.250.202"))
    cluster.start(0)
    cluster.wait_status(0, lambda s: s.dataplane.peers == 2, 10, "routing to both flanneld nodes")
    assert re.search(r"peer added: 10\.244\.202\.0/24 via 192\.168\.250\.202 \(flanneld udp framing",
                     cluster.log(0))

    etcd.etcdctl("put", f"{subnets}/10.244.203.0-24", FLANNEL_UDP_LEASE.format(ip="192.168.250.203"))
    etcd.etcdctl("put", f"{subnets}/10.244.204.0-24",
                 FLANNEL_VXLAN_LEASE.format(ip="192.168.250.204", mac="c6:d2:32:6f:8f:45"))
    cluster.wait_status(0, lambda s: s.dataplane.peers == 4, 10, "routing to the watched nodes")
    etcd.etcdctl("del", f"{subnets}/10.244.201.0-24")
    cluster.wait_status(0, lambda s: s.dataplane.peers == 3, 10, "dropping the deleted vxlan node")

    cluster.stop(0)
    cluster.start(0, ["--udp-port", "0"])
    cluster.wait_status(0, lambda s: s.dataplane.peers == 1, 10, "routing to the vxlan node only")
    wait_until(lambda: re.search(r"ignoring lease 10\.244\.203\.0/24 .*udp", cluster.log(0)), 5,
             "the udp lease to be ignored with a log line")
