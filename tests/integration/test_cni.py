"""udpflannel-cni with the real bridge, host-local and portmap plugins (/usr/lib/cni).

The plugin runs as the runtime would run it: a process inside a node namespace with
CNI_* in its environment and the netconf on stdin (built from the shipped conflist, as
a runtime builds it from a list). Pods are extra namespaces of the lab. The delegate's
state (saved netconf, host-local's reservations) lives in the test's workdir. Every
test runs twice: with the plugin as Python runs it (the virtualenv's entry point) and
with the frozen executable `make setup` builds (what install-cni installs).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest
from pyroute2 import netns

from udpflannel.cni import delegate as cni
from udpflannel.cni import install
from udpflannel.lab import probe
from udpflannel.lab.netns import Namespace

CNI_BIN = "/usr/lib/cni"
PLUGIN = os.path.join(os.path.dirname(sys.executable), "udpflannel-cni")  # the installed entry point
CONFLIST = os.path.join(os.path.dirname(cni.__file__), "10-udpflannel.conflist")


@pytest.fixture(params=["python", "frozen"])
def plugin(request) -> str:
    """udpflannel-cni in each form: the entry point, then the frozen executable."""
    if request.param == "python":
        return PLUGIN
    data, why = install.frozen_plugin()
    if data is None:
        pytest.fail(f"the frozen plugin {install.frozen_path()} is {why}")
    return install.frozen_path()


@dataclass(frozen=True)
class CniRun:
    rc: int
    out: Any
    err: str


def cni_call(node: Namespace, command: str, conf: dict, cid: str, netns_path: str = "",
             plugin: str = PLUGIN, stdin: bytes | None = None, timeout: float = 30.0,
             cni_path: str = CNI_BIN) -> CniRun:
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command,
           "CNI_CONTAINERID": cid, "CNI_NETNS": netns_path, "CNI_IFNAME": "eth0", "CNI_PATH": cni_path}
    proc = node.popen([plugin], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out, err = proc.communicate(stdin if stdin is not None else json.dumps(conf).encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    assert b"Traceback" not in err, err.decode()
    return CniRun(proc.returncode, json.loads(out) if out.strip() else None, err.decode())


def write_subnet_env(path: str, network: str, subnet: str, mtu: int, ipmasq: bool) -> str:
    with open(path, "w") as f:
        f.write(f"FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={subnet}\nFLANNEL_MTU={mtu}\n"
                f"FLANNEL_IPMASQ={'true' if ipmasq else 'false'}\n")
    return path


def pod_netconf(workdir: str, subnet_file: str, tag: str, cni_version: str | None = None) -> dict:
    """Our entry of the shipped conflist as a runtime hands it over (name and cniVersion
    from the list), with all state under the workdir instead of /var/lib/cni."""
    with open(CONFLIST) as f:
        conflist = json.load(f)
    conf = dict(conflist["plugins"][0], name=conflist["name"], cniVersion=cni_version or conflist["cniVersion"])
    conf.update(subnetFile=subnet_file, dataDir=os.path.join(workdir, tag, "flannel"),
                ipam={"dataDir": os.path.join(workdir, tag, "ipam")})
    return conf


def reservation(conf: dict, ip: str) -> str:
    """host-local's file for a reserved address."""
    return os.path.join(conf["ipam"]["dataDir"], conf["name"], ip)


def addresses(ns: Namespace, ifname: str) -> list[str]:
    with ns.ipr() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return []
        return [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                for a in ipr.get_addr(index=found[0], family=socket.AF_INET)]


def link(ns: Namespace, ifname: str) -> Any:
    with ns.ipr() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        return ipr.get_links(found[0])[0] if found else None


def routes(ns: Namespace) -> set[tuple[str, str | None]]:
    with ns.ipr() as ipr:
        return {(f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']}", r.get_attr("RTA_GATEWAY"))
                for r in ipr.get_routes(family=socket.AF_INET, table=254)}


def bridge_check_route_bug(run: CniRun) -> bool:
    """The bridge plugin before containernetworking/plugins v1.3.0 (Debian bookworm ships
    1.1.1) fails CHECK on any result route without a gateway, such as flannel's route to
    the network: it looks for a kernel route with no gateway, but the bridge installed it
    via the gateway (plugins issue #886, fixed by PR #887). A healthy pod then fails CHECK
    with exactly this message, which comes from the bridge, not from us."""
    return (run.rc == 1 and run.out["msg"].startswith("Expected Route {Dst:")
            and run.out["msg"].endswith("GW:<nil>} not found in routing table"))


def pod_address(result: dict) -> ipaddress.IPv4Interface:
    ips = [ipaddress.IPv4Interface(ip["address"]) for ip in result["ips"]]
    assert len(ips) == 1, result
    return ips[0]


# --- one node -----------------------------------------------------------------------

# the shipped conflist's, the newest Debian's bridge speaks, and CNI 1.1 (the bridge gets 1.0.0)
@pytest.mark.parametrize("cni_version", ["0.3.1", "1.0.0", "1.1.0"])
def test_add_check_del_on_one_node(make_lab, workdir, cni_version, plugin):
    lab = make_lab(1)
    node, pod = lab.nodes[0], lab.add_namespace("podA")
    subnet_file = write_subnet_env(os.path.join(workdir, "subnet.env"), "10.250.0.0/16", "10.250.7.1/24",
                                   1400, ipmasq=False)
    conf = pod_netconf(workdir, subnet_file, "n1", cni_version)

    add = cni_call(node, "ADD", conf, "pod-a", pod.path, plugin=plugin)
    assert add.rc == 0, add
    result = add.out
    assert result["cniVersion"] == cni_version
    ip = pod_address(result)
    assert ip.network == ipaddress.IPv4Network("10.250.7.0/24") and str(ip.ip) != "10.250.7.1"

    # the pod: its address, the MTU from subnet.env, the route to the network via the bridge
    assert addresses(pod, "eth0") == [str(ip)]
    assert link(pod, "eth0").get_attr("IFLA_MTU") == 1400
    assert ("10.250.0.0/16", "10.250.7.1") in routes(pod)
    assert ("0.0.0.0/0", "10.250.7.1") in routes(pod)  # the conflist's isDefaultGateway
    # the node: cni0 holds the gateway address
    assert addresses(node, "cni0") == ["10.250.7.1/24"]
    assert any(probe.ping(pod, "10.250.7.1", count=3, timeout=1.0))

    saved = os.path.join(conf["dataDir"], "pod-a")
    assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(conf["dataDir"]).st_mode) == 0o700
    with open(saved) as f:
        delegate = json.load(f)
    bridge_version = "1.0.0" if cni_version == "1.1.0" else cni_version  # Debian's stops at 1.0.0
    assert {k: delegate[k] for k in ("type", "ipMasq", "mtu", "isGateway", "hairpinMode", "cniVersion")} == {
        "type": "bridge", "ipMasq": True, "mtu": 1400, "isGateway": True, "hairpinMode": True,
        "cniVersion": bridge_version}
    assert os.path.exists(reservation(conf, str(ip.ip)))

    # the conflist's next plugin takes our result as its prevResult (Debian's portmap, like
    # its bridge, has no 1.1.0: a runtime could not chain it at 1.1.0 either)
    if cni_version != "1.1.0":
        portmap = {"cniVersion": cni_version, "name": conf["name"], "type": "portmap",
                   "capabilities": {"portMappings": True}, "prevResult": result}
        chained = cni_call(node, "ADD", portmap, "pod-a", pod.path, plugin=os.path.join(CNI_BIN, "portmap"))
        assert chained.rc == 0, chained
        assert chained.out["ips"] == result["ips"] and chained.out["interfaces"] == result["interfaces"]

    check_conf = dict(conf, prevResult=result)
    check = cni_call(node, "CHECK", check_conf, "pod-a", pod.path, plugin=plugin)
    if cni_version == "0.3.1":
        # CHECK came with 0.4.0: refused as libcni's skel does (runtimes do not send it)
        assert check.rc == 1 and check.out["code"] == cni.INCOMPATIBLE_VERSION
    else:
        assert check.rc == 0 or bridge_check_route_bug(check), check
        # CHECK really asks the bridge plugin: without the address the pod is not as ADD left it
        with pod.ipr() as ipr:
            ipr.addr("del", index=ipr.link_lookup(ifname="eth0")[0], address=str(ip.ip), prefixlen=24)
        broken = cni_call(node, "CHECK", check_conf, "pod-a", pod.path, plugin=plugin)
        assert broken.rc == 1 and set(broken.out) == {"cniVersion", "code", "msg", "details"}, broken
        assert str(ip) in broken.out["msg"], broken  # the bridge looked for the pod's address

    delete = cni_call(node, "DEL", conf, "pod-a", pod.path, plugin=plugin)
    assert delete.rc == 0 and delete.out is None, delete
    assert link(pod, "eth0") is None and addresses(pod, "eth0") == []
    assert not os.path.exists(saved)
    assert not os.path.exists(reservation(conf, str(ip.ip)))
    again = cni_call(node, "DEL", conf, "pod-a", pod.path, plugin=plugin)
    assert again.rc == 0 and again.out is None, again


def test_del_after_the_pod_namespace_is_gone(make_lab, workdir, plugin):
    lab = make_lab(1)
    node, pod = lab.nodes[0], lab.add_namespace("podB")
    subnet_file = write_subnet_env(os.path.join(workdir, "subnet.env"), "10.250.0.0/16", "10.250.9.1/24",
                                   1450, ipmasq=False)
    conf = pod_netconf(workdir, subnet_file, "n1")
    add = cni_call(node, "ADD", conf, "pod-b", pod.path, plugin=plugin)
    assert add.rc == 0, add
    ip = str(pod_address(add.out).ip)
    netns.remove(pod.name)  # the sandbox died first (it takes its end of the veth along)
    assert not os.path.exists(pod.path)

    delete = cni_call(node, "DEL", conf, "pod-b", pod.path, plugin=plugin)
    assert delete.rc == 0 and delete.out is None, delete
    assert not os.path.exists(os.path.join(conf["dataDir"], "pod-b"))
    assert not os.path.exists(reservation(conf, ip))  # the address is free for the next pod
    assert cni_call(node, "DEL", conf, "pod-b", "", plugin=plugin).rc == 0  # and once more, without a netns at all


def test_errors_are_cni_json_and_leave_nothing(make_lab, workdir, plugin):
    lab = make_lab(1)
    node, pod = lab.nodes[0], lab.add_namespace("podC")
    subnet_file = write_subnet_env(os.path.join(workdir, "subnet.env"), "10.250.0.0/16", "10.250.8.1/24",
                                   1450, ipmasq=False)
    good = pod_netconf(workdir, subnet_file, "n1")
    cases = [
        ("not JSON", good, b"{not json", cni.DECODING_FAILURE),
        ("no name", {k: v for k, v in good.items() if k != "name"}, None, cni.INVALID_NETWORK_CONFIG),
        ("subnet.env missing", dict(good, subnetFile=os.path.join(workdir, "absent.env")), None,
         cni.TRY_AGAIN_LATER),
        ("unknown version", dict(good, cniVersion="2.0.0"), None, cni.INCOMPATIBLE_VERSION),
    ]  # (a dual-stack subnet.env is served since dual stack: test_pods_dual_stack.py)
    for what, conf, stdin, code in cases:
        run = cni_call(node, "ADD", conf, "pod-c", pod.path, stdin=stdin, plugin=plugin)
        assert run.rc != 0, what
        assert set(run.out) == {"cniVersion", "code", "msg", "details"} and run.out["code"] == code, (what, run)
    assert not os.path.exists(good["dataDir"])
    assert link(pod, "eth0") is None and link(node, "cni0") is None

    # the bridge plugin's own error comes back as it said it
    failing = dict(good, ipam=dict(good["ipam"], type="no-such-ipam"))
    run = cni_call(node, "ADD", failing, "pod-c", pod.path, plugin=plugin)
    assert run.rc != 0 and "no-such-ipam" in run.out["msg"], run
    # saved before the delegate ran: the runtime's DEL after a failed ADD replays it
    assert os.path.exists(os.path.join(good["dataDir"], "pod-c"))


def test_status_and_gc_at_cni_1_1(make_lab, workdir, plugin):
    """STATUS: ready with a usable subnet.env, code 50 without. GC: the saved delegates
    of pods the runtime no longer lists are forgotten, the listed ones kept. Debian's
    bridge (1.0.0 at most) gets neither call, so host-local keeps a gone pod's address
    until its DEL: GC is not DEL (the spec says runtimes must not use it as one)."""
    lab = make_lab(1)
    node = lab.nodes[0]
    pods = {cid: lab.add_namespace(cid) for cid in ("pod-s1", "pod-s2")}
    subnet_file = write_subnet_env(os.path.join(workdir, "subnet.env"), "10.250.0.0/16", "10.250.11.1/24",
                                   1450, ipmasq=False)
    conf = pod_netconf(workdir, subnet_file, "n1", "1.1.0")
    status = cni_call(node, "STATUS", conf, "", plugin=plugin)
    assert (status.rc, status.out) == (0, None), status
    ips = {}
    for cid, pod in pods.items():
        add = cni_call(node, "ADD", conf, cid, pod.path, plugin=plugin)
        assert add.rc == 0, add
        ips[cid] = str(pod_address(add.out).ip)

    gc = dict(conf, **{"cni.dev/valid-attachments": [{"containerID": "pod-s1", "ifname": "eth0"}]})
    run = cni_call(node, "GC", gc, "", plugin=plugin)
    assert (run.rc, run.out) == (0, None), run
    assert os.listdir(conf["dataDir"]) == ["pod-s1"]
    assert os.path.exists(reservation(conf, ips["pod-s1"]))
    delete = cni_call(node, "DEL", conf, "pod-s1", pods["pod-s1"].path, plugin=plugin)
    assert delete.rc == 0 and not os.path.exists(reservation(conf, ips["pod-s1"])), delete

    os.unlink(subnet_file)
    status = cni_call(node, "STATUS", conf, "", plugin=plugin)
    assert status.rc == 1 and status.out["code"] == cni.NOT_AVAILABLE, status
    old = cni_call(node, "STATUS", dict(conf, cniVersion="1.0.0"), "", plugin=plugin)
    assert old.rc == 1 and old.out["code"] == cni.INCOMPATIBLE_VERSION


# --- two nodes, real daemons -----------------------------------------------------------

def expected_source_seen_by_remote_pod(node_subnet_env: str, sender_overlay_addr: str, sender_pod_ip: str) -> str:
    """The source address a pod sees on a connection from a pod on another node.

    Without --ip-masq the daemon writes FLANNEL_IPMASQ=false, so the plugin renders
    ipMasq=true and the bridge plugin masquerades pod traffic leaving the node's subnet:
    it leaves via the TUN with the sender node's overlay address (<subnet .0>). With
    --ip-masq (FLANNEL_IPMASQ=true) the bridge does not masquerade and the daemon's rules
    leave pod-to-pod traffic alone: the remote pod sees the sender pod itself
    (test_pods.py runs that case).
    """
    with open(node_subnet_env) as f:
        masq_by_daemon = "FLANNEL_IPMASQ=true" in f.read().split()
    return sender_pod_ip if masq_by_daemon else sender_overlay_addr


def test_pods_on_two_nodes_talk_over_the_overlay(make_lab, make_cluster, workdir, plugin):
    lab = make_lab(2)
    cluster = make_cluster(lab)
    cluster.start_all()
    cluster.wait_converged()

    pods, ips, confs = [], [], []
    for i, node in enumerate(lab.nodes):
        pod = lab.add_namespace(f"pod{i + 1}")
        conf = pod_netconf(workdir, os.path.join(cluster.node_dir(i), "subnet.env"), f"cni{i + 1}")
        add = cni_call(node, "ADD", conf, f"pod-{i + 1}", pod.path, plugin=plugin)
        assert add.rc == 0, add
        ip = pod_address(add.out)
        assert ip.network == ipaddress.IPv4Network(cluster.status(i).lease.subnet)  # from its node's lease
        assert link(pod, "eth0").get_attr("IFLA_MTU") == 1450  # the daemon's MTU, via subnet.env
        pods.append(pod)
        ips.append(str(ip.ip))
        confs.append(conf)
    assert ips[0] != ips[1]

    for a, b in ((0, 1), (1, 0)):
        assert all(probe.ping(pods[a], ips[b], count=3, timeout=2.0)), f"pod{a + 1} -> pod{b + 1}"
        payload = os.urandom(200_000)  # many segments, each at the overlay MTU
        answer, peer = probe.tcp_exchange(pods[a], pods[b], ips[b], 7000 + a, payload)
        assert answer == payload[::-1]
        node_env = os.path.join(cluster.node_dir(a), "subnet.env")
        assert peer == expected_source_seen_by_remote_pod(node_env, cluster.overlay_addr(a), ips[a])
        stream = probe.tcp_stream(pods[a], pods[b], ips[b], seconds=0.5, port=7100 + a)
        assert stream.bytes > 1_000_000

    for i, node in enumerate(lab.nodes):
        delete = cni_call(node, "DEL", confs[i], f"pod-{i + 1}", pods[i].path, plugin=plugin)
        assert delete.rc == 0, delete
        assert link(pods[i], "eth0") is None
