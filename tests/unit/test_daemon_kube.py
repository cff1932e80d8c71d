"""The daemon in kube mode without root: test_daemon_order's harness (a fake data plane,
a fixed underlay) with the Kubernetes source over the in-memory API (kubefake). What
the daemon's kube hooks do: the VTEP MAC from the Node's backend-data when the state
dir has none, node-public-ip as the public IP, the status naming the API server, and
/readyz saying what start-up waits for."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress

from kubefake import FakeKube, P, make_node
from test_daemon_order import Harness

from udpflannel.host import localstate
from udpflannel.subnets.kube import KubeSource


class KubeHarness(Harness):
    def __init__(self, tmp_path, api: FakeKube, **opts) -> None:
        conf = tmp_path / "net-conf.json"
        conf.write_text('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
        super().__init__(tmp_path, kube_subnet_mgr=True, node_name="me", net_config=str(conf), **opts)
        self.api = api

    def outside(self):
        async def connect(url, kubeconfig):
            return self.api
        return dataclasses.replace(super().outside(), open_kube=lambda opts: KubeSource(opts, connect=connect))


def test_kube_mode_through_the_daemon(tmp_path, monkeypatch):
    from udpflannel.subnets import kube as kubemgr
    monkeypatch.setattr(kubemgr, "NODE_POLL", 0.02)
    api = FakeKube()
    h = KubeHarness(tmp_path, api)

    async def body():
        task = h.start()
        await h.until(lambda: _has(h.http("/readyz"), "node me does not exist yet"), what="waiting for the Node")
        await api.put(make_node("me", "10.244.0.0/24", {
            P + "backend-data": '{"VNI":1,"VtepMAC":"0e:11:22:33:44:55"}',  # a reinstalled host's Node
            P + "node-public-ip": "198.51.100.7"}))
        await h.until(h.ready, what="ready")
        st = await h.status()
        h.stop.set()
        await asyncio.wait_for(task, 10)
        return st
    st = asyncio.run(body())
    assert st["registry"]["kind"] == "kube" and st["registry"]["where"] == FakeKube.server
    assert st["lease"]["subnet"] == "10.244.0.0/24"
    assert st["lease"]["vtep_mac"] == "0e:11:22:33:44:55"  # from backend-data: the state dir had none
    assert localstate.load_mac(h.opts.state_dir, h.opts.tun) == "0e:11:22:33:44:55"
    assert st["lease"]["public_ip"] == "198.51.100.7"  # node-public-ip stands for --public-ip
    ann = api.nodes["me"]["metadata"]["annotations"]
    assert ann[P + "public-ip"] == "198.51.100.7" and ann[P + "kube-subnet-manager"] == "true"
    assert ipaddress.IPv4Network(st["lease"]["subnet"]).prefixlen == 24


async def _has(answer, text: str) -> bool:
    status, body = await answer
    return status == 503 and text in body
