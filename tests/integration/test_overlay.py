"""Real udpflannel daemons in namespaces: reachability, joins and leaves."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from support.waiting import wait_until

from udpflannel.lab import probe
from udpflannel.registry.embedded import EmbeddedRegistry


def _all_pairs_ping(cluster) -> list[tuple[int, int]]:
    failed = []
    for i, src in enumerate(cluster.lab.nodes):
        if i not in cluster.procs:
            continue
        for j in cluster.procs:
            if i != j and not any(probe.ping(src, cluster.overlay_addr(j), count=3, timeout=1.0)):
                failed.append((i, j))
    return failed


@pytest.mark.parametrize("engine", ["compiled", "python"])
def test_two_nodes_ping_and_tcp_both_ways(make_lab, make_cluster, engine):
    lab = make_lab(2)
    cluster = make_cluster(lab, engine=engine)
    cluster.start_all()
    cluster.wait_converged()
    a, b = cluster.statuses()
    assert ipaddress.IPv4Network(a.lease.subnet) != ipaddress.IPv4Network(b.lease.subnet)
    assert a.dataplane.mtu == 1500 - 50
    assert _all_pairs_ping(cluster) == []
    seconds = 1.0 if engine == "compiled" else 0.5
    there = probe.tcp_stream(lab.nodes[0], lab.nodes[1], cluster.overlay_addr(1), seconds)
    back = probe.tcp_stream(lab.nodes[1], lab.nodes[0], cluster.overlay_addr(0), seconds)
    assert there.bytes > 1_000_000 and back.bytes > 1_000_000
    a, b = cluster.statuses()
    # every segment of both streams crossed the engines: counters agree across nodes
    assert a.dataplane.counters["tx_packets"] > 1000 and b.dataplane.counters["rx_packets"] > 1000
    assert a.dataplane.counters["rx_packets"] <= b.dataplane.counters["tx_packets"]
    for st in (a, b):
        bad = {k: v for k, v in st.dataplane.counters.items()
               if k.startswith("drop_") and k not in ("drop_no_route",) and v}
        assert bad == {}


def test_subnet_env_written_in_flannel_format(make_lab, make_cluster):
    lab = make_lab(1)
    cluster = make_cluster(lab)
    cluster.start(0)
    st = cluster.wait_status(0, lambda s: s.ready)
    with open(f"{cluster.node_dir(0)}/subnet.env") as f:
        env = dict(line.strip().split("=", 1) for line in f if line.strip())
    subnet = ipaddress.IPv4Network(st.lease.subnet)
    assert env == {"FLANNEL_NETWORK": "10.244.0.0/16",
                   "FLANNEL_SUBNET": f"{subnet.network_address + 1}/24",
                   "FLANNEL_MTU": "1450", "FLANNEL_IPMASQ": "false"}


def test_restart_keeps_subnet_and_mac(make_lab, make_cluster):
    lab = make_lab(1)
    cluster = make_cluster(lab)
    cluster.start(0)
    first = cluster.wait_status(0, lambda s: s.ready)
    assert cluster.stop(0) == 0  # SIGTERM is a clean stop
    with lab.nodes[0].ipr() as ipr:  # the device stays for the next daemon, address and all
        index = ipr.link_lookup(ifname="flannel0")[0]
        own = str(ipaddress.IPv4Network(first.lease.subnet).network_address)
        assert [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)] == [own]
    cluster.start(0)
    second = cluster.wait_status(0, lambda s: s.ready)
    assert (second.lease.subnet, second.lease.vtep_mac) == (first.lease.subnet, first.lease.vtep_mac)


def test_third_node_joins_and_leaving_node_route_goes_away(make_lab, make_cluster):
    lab = make_lab(2)
    cluster = make_cluster(lab)
    cluster.start_all()
    cluster.wait_converged()
    pids = [p.pid for p in cluster.procs.values()]

    lab.add_node()
    # node 3 leases for 0.05 min (3 s): once it dies without renewing, the lease expires
    cluster.start(2, ["--subnet-lease-ttl", "0.05", "--subnet-lease-renew-margin", "1"])
    cluster.wait_converged()
    assert [p.pid for i, p in cluster.procs.items() if i < 2] == pids  # nobody restarted
    assert _all_pairs_ping(cluster) == []
    gone = ipaddress.IPv4Network(cluster.status(2).lease.subnet)

    cluster.procs[2].kill()  # dies: no clean stop, no renewals
    cluster.procs[2].wait(5)
    del cluster.procs[2]
    for i in (0, 1):
        cluster.wait_status(i, lambda s: s.dataplane.peers == 1, timeout=15, what="dropping node 3")
    # and the overlay address of node 3 is now unroutable -> ICMP net unreachable
    assert probe.ping(lab.nodes[0], str(gone.network_address + 1), count=1, timeout=0.5) == [None]
    assert cluster.status(0).dataplane.counters["icmp_unreachable"] >= 1


def test_deleted_lease_removes_route_and_owner_recreates_it(make_lab, make_cluster):
    lab = make_lab(2)
    cluster = make_cluster(lab)
    cluster.start_all()
    cluster.wait_converged()
    subnet = ipaddress.IPv4Network(cluster.status(1).lease.subnet)

    async def registry(call):
        reg = EmbeddedRegistry(cluster.registry_file)
        try:
            return await call(reg)
        finally:
            await reg.close()

    async def holders(reg):
        leases, _ = await reg.list_leases()
        return {x.subnet: str(x.public_ip) for x in leases}

    asyncio.run(registry(lambda reg: reg.delete_lease(subnet)))
    # the owner notices its key vanished and re-creates the same subnet
    wait_until(lambda: subnet in asyncio.run(registry(holders)), 5, "the lease re-created")
    assert asyncio.run(registry(holders)).get(subnet) == lab.addresses[1]
    assert cluster.status(1).lease.subnet == str(subnet)
    cluster.wait_converged()
    assert _all_pairs_ping(cluster) == []


def test_status_command_reports_the_running_daemon(make_lab, make_cluster):
    import json
    import subprocess
    import sys
    lab = make_lab(1)
    cluster = make_cluster(lab)
    cluster.start(0)
    st = cluster.wait_status(0, lambda s: s.ready)
    out = subprocess.run([sys.executable, "-m", "udpflannel", "status", "--json", "--admin-socket",
                          cluster.admin_path(0)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["lease"]["subnet"] == st.lease.subnet and "drop_spoofed" in doc["dataplane"]["counters"]
    table = subprocess.run([sys.executable, "-m", "udpflannel", "status", "--admin-socket",
                            cluster.admin_path(0)], capture_output=True, text=True, timeout=30)
    assert table.returncode == 0 and st.lease.subnet in table.stdout and "engine" in table.stdout
    gone = subprocess.run([sys.executable, "-m", "udpflannel", "status", "--admin-socket",
                           cluster.admin_path(0) + ".absent"], capture_output=True, text=True, timeout=30)
    assert gone.returncode == 1 and gone.stderr.startswith("udpflannel: error: no daemon answers")
