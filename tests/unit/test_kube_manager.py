"""The Kubernetes subnet manager (subnets/kube.py) against an in-memory API (kubefake):
acquire and its annotations, the node informer (list, watch, 410, breaks, bad and
duplicate nodes), keeping the annotations right, NetworkUnavailable, and the source's
start-up (net-conf.json, the node's name, waiting for the podCIDR)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from dataclasses import replace

import pytest
from kubefake import FakeKube, P, flannel_annotations, make_node

from udpflannel.core import config as netconfig
from udpflannel.core import kubenode
from udpflannel.core.errors import BadInput
from udpflannel.core.lease import EventType, Lease
from udpflannel.options import RunOptions
from udpflannel.subnets import kube as kubemgr
from udpflannel.subnets.base import RegistryHealth, SubnetLost
from udpflannel.subnets.kube import KubeManager, KubeSource, KubeStartTimeout
from udpflannel.subnets.source import Stopped

A = ipaddress.IPv4Address
N = ipaddress.IPv4Network
CFG = netconfig.parse('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
NAMES = kubenode.annotation_names()
ME = "me"
MAC = "0e:00:00:00:00:aa"
WANTED = Lease(CFG.network, A("192.168.1.10"), "vxlan", 1, MAC)
WAIT = 5.0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def manager(api, **kw) -> KubeManager:
    async def no_sleep(_seconds):
        await asyncio.sleep(0)
    return KubeManager(api, NAMES, ME, CFG, RegistryHealth(), sleep=kw.pop("sleep", no_sleep),
                       utcnow=lambda: "2026-01-02T03:04:05Z", **kw)


async def cluster(*peers: tuple[str, str, dict]) -> FakeKube:
    api = FakeKube()
    await api.put(make_node(ME, "10.244.0.0/24", {"node.alpha.kubernetes.io/ttl": "0"}))
    for name, cidr, ann in peers:
        await api.put(make_node(name, cidr, ann))
    return api


class Follower:
    """Runs a manager's watch in a task and collects its batches."""

    def __init__(self, mgr: KubeManager) -> None:
        self.mgr = mgr
        self.batches: list[list] = []
        self.routes: dict[N, Lease] = {}
        self.new = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for batch in self.mgr.watch():
            self.batches.append(batch)
            for ev in batch:
                if ev.type is EventType.ADDED:
                    self.routes[ev.lease.subnet] = ev.lease
                else:
                    self.routes.pop(ev.lease.subnet, None)
            self.new.set()

    async def until(self, predicate, what: str):
        async def wait():
            while not predicate():
                self.new.clear()
                await self.new.wait()
        try:
            await asyncio.wait_for(wait(), WAIT)
        except asyncio.TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; routes {sorted(map(str, self.routes))}") from None

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def subnets(routes) -> set[str]:
    return {str(s) for s in routes}


# -- acquire --------------------------------------------------------------------------

def test_acquire_is_the_pod_cidr_and_publishes_flanneld_s_annotations():
    async def go():
        api = await cluster()
        mgr = manager(api)
        lease = await mgr.acquire(WANTED, previous=N("10.244.9.0/24"))
        again = await manager(api).acquire(WANTED)
        return api, lease, again
    api, lease, again = run(go())
    assert lease == replace(WANTED, subnet=N("10.244.0.0/24"), expiration=0.0) == again
    assert api.patches == [(ME, kubenode.annotations_patch({
        P + "backend-type": "vxlan", P + "backend-data": '{"VNI":1,"VtepMAC":"0e:00:00:00:00:aa"}',
        P + "public-ip": "192.168.1.10", P + "kube-subnet-manager": "true"}))]  # the second sent nothing
    assert api.nodes[ME]["metadata"]["annotations"]["node.alpha.kubernetes.io/ttl"] == "0"


def test_acquire_honours_public_ip_overwrite(caplog):
    async def go():
        api = await cluster()
        node = api.nodes[ME]
        node["metadata"]["annotations"][P + "public-ip-overwrite"] = "203.0.113.9"
        await api.put(node)
        with caplog.at_level(logging.INFO, "udpflannel.kube"):
            lease = await manager(api).acquire(WANTED)
        return api, lease
    api, lease = run(go())
    assert api.nodes[ME]["metadata"]["annotations"][P + "public-ip"] == "203.0.113.9"
    assert lease.public_ip == WANTED.public_ip  # our own address stays ours; peers use the overwrite
    assert "public IP published as 203.0.113.9" in caplog.text


def test_acquire_a_udp_lease():
    async def go():
        api = await cluster()
        await manager(api).acquire(Lease(CFG.network, A("192.168.1.10"), "", None, None))
        return api
    ann = run(go()).nodes[ME]["metadata"]["annotations"]
    assert (ann[P + "backend-type"], ann[P + "backend-data"]) == ("", "null")


# -- the informer -----------------------------------------------------------------------

def test_snapshot_then_changes_only_flannel_nodes():
    async def go():
        api = await cluster(("a", "10.244.1.0/24", flannel_annotations("192.168.1.11", "0e:00:00:00:00:01")),
                            ("plain", "10.244.2.0/24", {}),
                            ("u", "10.244.3.0/24", flannel_annotations("192.168.1.13", None)))
        mgr = manager(api)
        await mgr.acquire(WANTED)
        f = Follower(mgr)
        await f.until(lambda: f.batches, "the snapshot")
        snapshot = list(f.batches[0])
        await api.put(make_node("b", "10.244.4.0/24", flannel_annotations("192.168.1.14", "0e:00:00:00:00:04")))
        await f.until(lambda: "10.244.4.0/24" in subnets(f.routes), "b")
        await api.put(make_node("b", "10.244.4.0/24", flannel_annotations("192.168.1.15", "0e:00:00:00:00:04")))
        await f.until(lambda: f.routes[N("10.244.4.0/24")].public_ip == A("192.168.1.15"), "b moved")
        await api.delete("a")
        await f.until(lambda: "10.244.1.0/24" not in subnets(f.routes), "a deleted")
        await api.put(make_node("u", "10.244.3.0/24", {}))  # no longer flannel's
        await f.until(lambda: "10.244.3.0/24" not in subnets(f.routes), "u unmarked")
        await f.stop()
        return snapshot, f, mgr
    snapshot, f, mgr = run(go())
    assert {(e.type, str(e.lease.subnet)) for e in snapshot} == {(EventType.ADDED, "10.244.1.0/24"),
                                                                (EventType.ADDED, "10.244.3.0/24")}
    assert {str(e.lease.subnet): e.lease for e in snapshot}["10.244.3.0/24"].backend_type == ""
    assert subnets(f.routes) == {"10.244.4.0/24"}
    assert mgr.health.ignored == 0


def test_the_first_batch_comes_even_when_empty_and_marks_the_snapshot_applied():
    async def go():
        api = await cluster()
        mgr = manager(api)
        await mgr.acquire(WANTED)
        gen = mgr.watch()
        first = await gen.__anext__()
        assert not mgr._snapshot_applied.is_set()  # not until the caller asks for more
        nxt = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.05)
        applied = mgr._snapshot_applied.is_set()
        nxt.cancel()
        await asyncio.gather(nxt, return_exceptions=True)
        await gen.aclose()
        return first, applied
    assert run(go()) == ([], True)


def test_bad_annotations_are_ignored_counted_and_logged_once(caplog):
    bad = {**flannel_annotations("192.168.1.11"), P + "public-ip": "not-an-ip"}

    async def go():
        api = await cluster(("bad", "10.244.1.0/24", bad),
                            ("good", "10.244.2.0/24", flannel_annotations("192.168.1.12")))
        mgr = manager(api)
        await mgr.acquire(WANTED)
        f = Follower(mgr)
        await f.until(lambda: f.batches, "the snapshot")
        node = api.nodes["bad"]
        node["metadata"]["labels"] = {"x": "y"}  # another event of the same bad node
        await api.put(node)
        await api.put(make_node("good", "10.244.2.0/24", {**flannel_annotations("192.168.1.12"),
                                                          P + "backend-data": "{"}))  # good turns bad
        await f.until(lambda: not f.routes, "good's route gone")
        await api.put(make_node("bad", "10.244.1.0/24", flannel_annotations("192.168.1.11")))  # fixed
        await f.until(lambda: "10.244.1.0/24" in subnets(f.routes), "bad fixed")
        await f.stop()
        return mgr
    with caplog.at_level(logging.WARNING, "udpflannel.kube"):
        mgr = run(go())
    assert mgr.health.ignored == 3
    lines = [r.getMessage() for r in caplog.records if "ignoring node" in r.getMessage()]
    assert len(lines) == 2, lines  # once per bad state, not once per event
    assert "'bad': annotation flannel.alpha.coreos.com/public-ip 'not-an-ip' is not an IPv4 address" in lines[0]
    assert "'good': annotation flannel.alpha.coreos.com/backend-data '{' is not JSON" in lines[1]


def test_a_410_relists_and_diffs_what_was_missed():
    async def go():
        api = await cluster(("a", "10.244.1.0/24", flannel_annotations("192.168.1.11")),
                            ("b", "10.244.2.0/24", flannel_annotations("192.168.1.12")))
        mgr = manager(api)
        await mgr.acquire(WANTED)
        f = Follower(mgr)
        await f.until(lambda: len(f.routes) == 2, "a and b")
        api.down = True  # the API server goes away; meanwhile b goes, c comes
        await api.break_watches()
        await asyncio.sleep(0.05)
        assert mgr.health.ok is False
        del api.nodes["b"]
        api.nodes["c"] = make_node("c", "10.244.3.0/24", flannel_annotations("192.168.1.13"))
        await api.compact()  # it comes back with a fresh watch cache: 410 for the old version
        api.down = False
        await f.until(lambda: subnets(f.routes) == {"10.244.1.0/24", "10.244.3.0/24"}, "the re-list")
        await f.stop()
        return api, mgr, f
    api, mgr, f = run(go())
    assert api.lists == 2 and mgr.health.ok
    last = [(e.type.value, str(e.lease.subnet)) for e in f.batches[-1]]
    assert sorted(last) == [("added", "10.244.3.0/24"), ("removed", "10.244.2.0/24")]


def test_a_broken_watch_resumes_from_the_last_version_without_listing_again():
    async def go():
        api = await cluster(("a", "10.244.1.0/24", flannel_annotations("192.168.1.11")))
        mgr = manager(api)
        await mgr.acquire(WANTED)
        f = Follower(mgr)
        await f.until(lambda: len(f.routes) == 1, "a")
        await api.break_watches()
        await api.put(make_node("b", "10.244.2.0/24", flannel_annotations("192.168.1.12")))
        await f.until(lambda: len(f.routes) == 2, "b after the break")
        await f.stop()
        return api
    api = run(go())
    assert api.lists == 1 and api.watches >= 2


def test_two_nodes_one_pod_cidr_the_first_keeps_it_and_ours_is_never_routed():
    async def go():
        api = await cluster(("a", "10.244.1.0/24", flannel_annotations("192.168.1.11")),
                            ("thief", "10.244.0.0/24", flannel_annotations("192.168.1.66")))
        mgr = manager(api)
        await mgr.acquire(WANTED)
        f = Follower(mgr)
        await f.until(lambda: f.batches, "snapshot")
        await api.put(make_node("b", "10.244.1.0/24", flannel_annotations("192.168.1.12")))
        await api.put(make_node("c", "10.244.5.0/24", flannel_annotations("192.168.1.15")))
        await f.until(lambda: "10.244.5.0/24" in subnets(f.routes), "c")
        before = f.routes[N("10.244.1.0/24")].public_ip
        await api.delete("a")
        await f.until(lambda: f.routes[N("10.244.1.0/24")].public_ip == A("192.168.1.12"), "b takes over")
        await f.stop()
        return mgr, before, f
    mgr, before, f = run(go())
    assert before == A("192.168.1.11")
    assert "10.244.0.0/24" not in subnets(f.routes)
    assert mgr.health.ignored == 2  # the thief, and b while a held its podCIDR


def test_batches_are_at_most_event_queue_depth():
    async def go():
        api = await cluster()
        mgr = manager(api, queue_depth=3)
        await mgr.acquire(WANTED)
        gen = mgr.watch()
        await gen.__anext__()
        for i in range(1, 11):
            await api.put(make_node(f"n{i}", f"10.244.{i}.0/24", flannel_annotations(f"192.168.2.{i}")))
        await asyncio.sleep(0.1)  # let the informer queue up what it can
        sizes, seen = [], 0
        while seen < 10:
            batch = await asyncio.wait_for(gen.__anext__(), WAIT)
            sizes.append(len(batch))
            seen += len(batch)
        await gen.aclose()
        return sizes
    sizes = run(go())
    assert sum(sizes) == 10 and max(sizes) <= 3 and len(sizes) >= 4


# -- keeping our annotations right --------------------------------------------------------

async def keeping(api, mgr):
    f = Follower(mgr)
    keeper = asyncio.create_task(mgr.keep_renewed())
    return f, keeper


def conditions(api) -> list[tuple[str, str, str]]:
    return [(c["type"], c["status"], c["reason"]) for c in api.nodes[ME]["status"]["conditions"]]


def test_network_available_after_the_snapshot_then_annotations_kept_right():
    async def go():
        api = await cluster()
        mgr = manager(api)
        await mgr.acquire(WANTED)
        assert conditions(api) == []
        f, keeper = await keeping(api, mgr)
        await f.until(lambda: f.batches, "snapshot")
        for _ in range(100):
            if conditions(api):
                break
            await asyncio.sleep(0.01)
        patches = len(api.patches)
        node = api.nodes[ME]
        node["metadata"]["annotations"][P + "public-ip"] = "10.99.99.99"  # someone's edit
        del node["metadata"]["annotations"][P + "kube-subnet-manager"]
        await api.put(node)
        for _ in range(200):
            ann = api.nodes[ME]["metadata"]["annotations"]
            if ann.get(P + "public-ip") == "192.168.1.10" and ann.get(P + "kube-subnet-manager") == "true":
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        keeper.cancel()
        await f.stop()
        return api, patches
    api, patches = run(go())
    assert conditions(api) == [("NetworkUnavailable", "False", "FlannelIsUp")]
    cond = api.nodes[ME]["status"]["conditions"][0]
    assert cond["message"] == "Flannel is running on this node" and cond["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    ann = api.nodes[ME]["metadata"]["annotations"]
    assert ann[P + "public-ip"] == "192.168.1.10" and ann[P + "kube-subnet-manager"] == "true"
    assert len(api.patches) == patches + 1  # one republication, not a fight with our own echo


def test_without_set_node_network_unavailable_no_condition_is_written():
    async def go():
        api = await cluster()
        mgr = manager(api, set_network_unavailable=False)
        await mgr.acquire(WANTED)
        f, keeper = await keeping(api, mgr)
        await f.until(lambda: f.batches, "snapshot")
        await asyncio.sleep(0.1)
        keeper.cancel()
        await f.stop()
        return api
    assert conditions(run(go())) == []


def test_our_node_deleted_and_back_is_published_again_or_lost_with_another_cidr():
    async def go(new_cidr):
        api = await cluster()
        mgr = manager(api)
        await mgr.acquire(WANTED)
        f, keeper = await keeping(api, mgr)
        await f.until(lambda: f.batches, "snapshot")
        await asyncio.sleep(0.05)
        await api.delete(ME)
        await asyncio.sleep(0.05)
        assert not keeper.done()
        await api.put(make_node(ME, None))  # re-registered, no podCIDR yet
        await asyncio.sleep(0.05)
        assert not keeper.done()
        await api.put(make_node(ME, new_cidr))  # node IPAM's answer
        await asyncio.wait({keeper}, timeout=1.0)
        done = keeper.done()
        keeper.cancel()
        await f.stop()
        return api, done, (keeper.exception() if done and not keeper.cancelled() else None)
    api, done, exc = run(go("10.244.0.0/24"))
    assert not done
    assert api.nodes[ME]["metadata"]["annotations"][P + "kube-subnet-manager"] == "true"
    assert conditions(api) == [("NetworkUnavailable", "False", "FlannelIsUp")]
    api, done, exc = run(go("10.244.77.0/24"))
    assert done and isinstance(exc, SubnetLost)
    assert "now has podCIDR 10.244.77.0/24, this node runs 10.244.0.0/24" in str(exc)


# -- the source -----------------------------------------------------------------------

def source(tmp_path, api, clock=None, **opts) -> KubeSource:
    conf = tmp_path / "net-conf.json"
    if not conf.exists():
        conf.write_text('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')

    async def connect(url, kubeconfig):
        return api
    kw = {"node_name": ME, **opts}
    return KubeSource(RunOptions(kube_subnet_mgr=True, net_config=str(conf), **kw), connect=connect,
                      **({"clock": clock} if clock else {}))


def test_source_waits_for_the_pod_cidr_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(kubemgr, "NODE_POLL", 0.01)

    async def go():
        api = FakeKube()
        src = source(tmp_path, api)
        health = RegistryHealth(starting=True)
        task = asyncio.create_task(src.network_config(asyncio.Event(), health))
        await asyncio.sleep(0.1)
        missing = health.waiting
        await api.put(make_node(ME, None, {P + "backend-data": '{"VNI":1,"VtepMAC":"0e:00:00:00:00:77"}',
                                           P + "node-public-ip": "192.168.7.7"}))
        await asyncio.sleep(0.1)
        unassigned = health.waiting
        node = api.nodes[ME]
        node["spec"] = {"podCIDR": "10.244.5.0/24", "podCIDRs": ["10.244.5.0/24"]}
        await api.put(node)
        cfg = await asyncio.wait_for(task, WAIT)
        return cfg, missing, unassigned, health, src
    cfg, missing, unassigned, health, src = run(go())
    assert missing == "waiting: node me does not exist yet (its kubelet registers it)"
    assert unassigned.startswith("waiting: node me has no podCIDR yet")
    assert health.waiting is None
    assert cfg == CFG and src.where == FakeKube.server
    assert (src.kept.public_ip, src.kept.vtep_mac) == (A("192.168.7.7"), "0e:00:00:00:00:77")


def test_source_refuses_a_pod_cidr_outside_the_network_naming_both(tmp_path):
    async def go():
        api = FakeKube()
        await api.put(make_node(ME, "10.99.1.0/24"))
        return await source(tmp_path, api).network_config(asyncio.Event(), RegistryHealth())
    with pytest.raises(BadInput, match=r"node me's podCIDR 10\.99\.1\.0/24 is not inside the Network "
                                       r"10\.244\.0\.0/16 of .*net-conf\.json"):
        run(go())


def test_source_takes_the_subnet_length_from_the_pod_cidr(tmp_path):
    async def go():
        api = FakeKube()
        await api.put(make_node(ME, "10.244.3.128/25"))
        return await source(tmp_path, api).network_config(asyncio.Event(), RegistryHealth())
    cfg = run(go())
    assert cfg.subnet_len == 25 and cfg.contains_subnet(N("10.244.3.128/25"))


def test_source_finds_the_node_through_the_pod(tmp_path):
    async def go(pods):
        api = FakeKube()
        api.pods.update(pods)
        await api.put(make_node("worker-7", "10.244.7.0/24"))
        src = source(tmp_path, api, node_name=None, pod_name="kube-flannel-ds-x", pod_namespace="kube-flannel")
        await src.network_config(asyncio.Event(), RegistryHealth())
        return src
    pod = {"metadata": {"name": "kube-flannel-ds-x"}, "spec": {"nodeName": "worker-7"}}
    assert run(go({("kube-flannel", "kube-flannel-ds-x"): pod})).node_name == "worker-7"
    with pytest.raises(BadInput, match="pod kube-flannel/kube-flannel-ds-x .* does not exist"):
        run(go({}))


def test_source_gives_up_after_flanneld_s_start_limit_unless_told_to_wait(tmp_path):
    class Clock:
        now = 0.0

        def __call__(self):
            self.now += 400.0  # every look at the clock: 400 s later
            return self.now

    async def go(**opts):
        api = FakeKube()
        api.down = True
        src = source(tmp_path, api, clock=Clock(), **opts)
        stop = asyncio.Event()
        task = asyncio.create_task(src.network_config(stop, RegistryHealth()))
        await asyncio.wait({task}, timeout=2.0)  # 1.5 s of backoff is 2,400 s of this clock
        stop.set()
        return await asyncio.wait_for(task, WAIT)
    with pytest.raises(KubeStartTimeout, match="did not answer in 10 minutes"):
        run(go())
    with pytest.raises(Stopped):
        run(go(cont_when_cache_not_ready=True))


def test_source_reads_a_bad_net_conf_as_one_line(tmp_path):
    (tmp_path / "net-conf.json").write_text('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}')
    with pytest.raises(BadInput, match="net-conf.json"):
        run(source(tmp_path, FakeKube()).network_config(asyncio.Event(), RegistryHealth()))


def test_the_annotations_patch_is_json_the_fake_and_the_server_read():
    assert json.loads(kubenode.annotations_patch({"a/b": "c"})) == {"metadata": {"annotations": {"a/b": "c"}}}
