"""Kube mode with EnableIPv6 (subnets/kube.py, dual stack and IPv6-only) against the
in-memory API (kubefake): the node's subnets from spec.podCIDRs, flanneld's v6
annotations, peers' v6 sides as leases, and the source's start-up."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from dataclasses import replace

import pytest
from kubefake import FakeKube, P, flannel_annotations
from test_kube_manager import ME, Follower, run, source

from udpflannel.core import config as netconfig
from udpflannel.core import kubenode
from udpflannel.core.errors import BadInput
from udpflannel.core.lease import UNSPECIFIED, Lease
from udpflannel.subnets.base import RegistryHealth
from udpflannel.subnets.kube import KubeManager

A = ipaddress.IPv4Address
A6 = ipaddress.IPv6Address
N = ipaddress.IPv4Network
N6 = ipaddress.IPv6Network
DUAL = ('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", '
        '"Backend": {"Type": "vxlan"}}')
V6ONLY = ('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", '
          '"Backend": {"Type": "vxlan"}}')
NAMES = kubenode.annotation_names()
MAC, MAC6 = "0e:00:00:00:00:aa", "0e:00:00:00:00:ab"


def node(name, cidrs, ann=None):
    return {"metadata": {"name": name, "annotations": dict(ann or {})},
            "spec": {"podCIDR": cidrs[0], "podCIDRs": list(cidrs)} if cidrs else {}, "status": {"conditions": []}}


def v6_annotations(ip6, mac6="0e:00:00:00:00:02", vni=1):
    return {P + "backend-v6-data": json.dumps({"VNI": vni, "VtepMAC": mac6}, separators=(",", ":")),
            P + "public-ipv6": ip6}


def manager(api, cfg):
    async def no_sleep(_seconds):
        await asyncio.sleep(0)
    return KubeManager(api, NAMES, ME, cfg, RegistryHealth(), sleep=no_sleep, utcnow=lambda: "2026-01-02T03:04:05Z")


def test_dual_stack_acquire_publishes_both_sides_and_peers_carry_their_v6_side():
    cfg = netconfig.parse(DUAL)
    wanted = Lease(None, A("192.168.1.10"), "vxlan", 1, MAC, public_ipv6=A6("fd00:64::10"), vni6=1, vtep_mac6=MAC6)

    async def go():
        api = FakeKube()
        await api.put(node(ME, ["10.244.0.0/24", "fd00:10:244::/64"]))
        await api.put(node("a", ["10.244.1.0/24", "fd00:10:244:1::/64"],
                           {**flannel_annotations("192.168.1.11"), **v6_annotations("fd00:64::11")}))
        await api.put(node("old", ["10.244.2.0/24", "fd00:10:244:2::/64"], flannel_annotations("192.168.1.12")))
        await api.put(node("bad", ["10.244.3.0/24", "fd00:10:244:3::/64"],
                           {**flannel_annotations("192.168.1.13"), P + "public-ipv6": "192.168.1.13"}))
        mgr = manager(api, cfg)
        lease = await mgr.acquire(wanted)
        f = Follower(mgr)
        await f.until(lambda: f.batches, "the snapshot")
        await api.put(node("a", ["10.244.1.0/24", "fd00:10:244:1::/64"],
                           {**flannel_annotations("192.168.1.11"), **v6_annotations("fd00:64::99")}))
        await f.until(lambda: f.routes[N("10.244.1.0/24")].public_ipv6 == A6("fd00:64::99"), "a's v6 moved")
        await f.stop()
        return api, lease, f, mgr
    api, lease, f, mgr = run(go())
    assert lease == replace(wanted, subnet=N("10.244.0.0/24"), ipv6_subnet=N6("fd00:10:244::/64"))
    ann = api.nodes[ME]["metadata"]["annotations"]
    assert ann[P + "backend-v6-data"] == '{"VNI":1,"VtepMAC":"0e:00:00:00:00:ab"}'
    assert ann[P + "public-ipv6"] == "fd00:64::10" and ann[P + "public-ip"] == "192.168.1.10"
    a = f.routes[N("10.244.1.0/24")]
    assert (a.ipv6_subnet, a.vni6, a.vtep_mac6) == (N6("fd00:10:244:1::/64"), 1, "0e:00:00:00:00:02")
    old = f.routes[N("10.244.2.0/24")]  # no v6 annotations yet: routed over IPv4 alone
    assert old.ipv6_subnet is None and old.public_ipv6 is None
    assert N("10.244.3.0/24") not in f.routes and mgr.health.ignored == 1


def test_ipv6_only_acquire_and_peers():
    cfg = netconfig.parse(V6ONLY)
    wanted = Lease(None, UNSPECIFIED, "vxlan", None, None, public_ipv6=A6("fd00:64::10"), vni6=1, vtep_mac6=MAC6)

    async def go():
        api = FakeKube()
        await api.put(node(ME, ["fd00:10:244::/64"]))
        await api.put(node("a", ["fd00:10:244:1::/64"], {P + "backend-type": "vxlan",
                                                           P + "kube-subnet-manager": "true",
                                                           **v6_annotations("fd00:64::11")}))
        mgr = manager(api, cfg)
        lease = await mgr.acquire(wanted)
        f = Follower(mgr)
        await f.until(lambda: f.batches, "the snapshot")
        await f.stop()
        return api, lease, f
    api, lease, f = run(go())
    assert lease.subnet is None and lease.ipv6_subnet == N6("fd00:10:244::/64")
    ann = api.nodes[ME]["metadata"]["annotations"]
    assert P + "public-ip" not in ann and P + "backend-data" not in ann and ann[P + "public-ipv6"] == "fd00:64::10"
    (peer,) = f.routes.values()
    assert (peer.subnet, peer.ipv6_subnet, peer.public_ipv6) == (None, N6("fd00:10:244:1::/64"), A6("fd00:64::11"))


def test_source_reads_both_pod_cidrs_lengths_and_kept_v6(tmp_path):
    (tmp_path / "net-conf.json").write_text(DUAL)

    async def go():
        api = FakeKube()
        await api.put(node(ME, ["10.244.3.0/24", "fd00:10:244:0:30::/80"],
                           {**v6_annotations("fd00:64::3", "0e:00:00:00:00:66"),
                            P + "node-public-ipv6": "fd00:64::77"}))
        src = source(tmp_path, api)
        return await src.network_config(asyncio.Event(), RegistryHealth()), src
    cfg, src = run(go())
    assert cfg.ipv6_subnet_len == 80 and cfg.v6 is not None and cfg.v6.contains_subnet(N6("fd00:10:244:0:30::/80"))
    assert (src.kept.public_ipv6, src.kept.vtep_mac6) == (A6("fd00:64::77"), "0e:00:00:00:00:66")


@pytest.mark.parametrize("cidrs, words", [
    (["10.244.3.0/24"], r"node me's podCIDRs \(10\.244\.3\.0/24\) have no IPv6 one for the IPv6Network "
                        r"fd00:10:244::/56 .*--cluster-cidr=<IPv4>,<IPv6>"),
    (["10.244.3.0/24", "fd00:99::/64"], r"node me's IPv6 podCIDR fd00:99::/64 is not inside the IPv6Network "
                                        r"fd00:10:244::/56"),
    (["fd00:10:244::/64"], r"have no IPv4 one for the Network 10\.244\.0\.0/16"),
])
def test_source_refuses_pod_cidrs_that_do_not_fit_in_one_line(tmp_path, cidrs, words):
    (tmp_path / "net-conf.json").write_text(DUAL)

    async def go():
        api = FakeKube()
        await api.put(node(ME, cidrs))
        return await source(tmp_path, api).network_config(asyncio.Event(), RegistryHealth())
    with pytest.raises(BadInput, match=words):
        run(go())
