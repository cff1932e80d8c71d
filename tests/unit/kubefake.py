"""An in-memory stand-in for registry/kubeapi.KubeAPI: Nodes and Pods, versions, a
watch that can be broken or expired (410), strategic merge patches of nodes/status as
the API server applies them to annotations and conditions. For the kube subnet
manager's unit tests; the real API server judges it in tests/integration/test_kube_mode.py.
"""

from __future__ import annotations

import asyncio
import copy
import json

from udpflannel.registry.kubeapi import KubeError, KubeGone, KubeNotFound

P = "flannel.alpha.coreos.com/"


def make_node(name: str, pod_cidr: str | None = None, annotations: dict | None = None) -> dict:
    spec = {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]} if pod_cidr else {}
    return {"metadata": {"name": name, "annotations": dict(annotations or {})}, "spec": spec,
            "status": {"conditions": []}}


def flannel_annotations(ip: str, mac: str | None = "0e:00:00:00:00:01", vni: int = 1) -> dict:
    if mac is None:
        return {P + "backend-type": "", P + "backend-data": "null", P + "public-ip": ip,
                P + "kube-subnet-manager": "true"}
    return {P + "backend-type": "vxlan", P + "backend-data": json.dumps({"VNI": vni, "VtepMAC": mac},
                                                                        separators=(",", ":")),
            P + "public-ip": ip, P + "kube-subnet-manager": "true"}


class FakeKube:
    server = "https://fake-apiserver:6443"

    def __init__(self) -> None:
        self.nodes: dict[str, dict] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.rv = 100
        self.history: list[tuple[int, str, dict]] = []  # (version, type, object)
        self.oldest = 0  # a watch from a version before this one gets 410 Gone
        self.down = False  # every call fails as if the server were away
        self.patches: list[tuple[str, bytes]] = []
        self.lists = 0
        self.watches = 0
        self.changed = asyncio.Condition()
        self._break = 0  # open watches end with an error this many times

    # -- what a test does to the "cluster" --------------------------------------------

    async def put(self, node: dict) -> None:
        name = node["metadata"]["name"]
        kind = "MODIFIED" if name in self.nodes else "ADDED"
        await self._record(kind, copy.deepcopy(node))

    async def delete(self, name: str) -> None:
        node = self.nodes[name]
        await self._record("DELETED", node)

    async def _record(self, kind: str, node: dict) -> None:
        self.rv += 1
        node["metadata"]["resourceVersion"] = str(self.rv)
        name = node["metadata"]["name"]
        if kind == "DELETED":
            del self.nodes[name]
        else:
            self.nodes[name] = node
        self.history.append((self.rv, kind, copy.deepcopy(node)))
        async with self.changed:
            self.changed.notify_all()

    async def compact(self) -> None:
        """Forget the history, as an API server restart does: every watch open or asked
        for from a version before now gets 410 Gone; a new list gives a version to watch from."""
        self.rv += 1
        self.oldest = self.rv
        async with self.changed:
            self.changed.notify_all()

    async def break_watches(self) -> None:
        self._break += 1
        async with self.changed:
            self.changed.notify_all()

    # -- the KubeAPI interface -----------------------------------------------------------

    def _check(self) -> None:
        if self.down:
            raise KubeError("cannot reach the API server at https://fake-apiserver:6443: connection refused")

    async def get_node(self, name: str) -> dict:
        self._check()
        if name not in self.nodes:
            raise KubeNotFound(f"GET /api/v1/nodes/{name}: 404 NotFound", 404, "NotFound")
        return copy.deepcopy(self.nodes[name])

    async def get_pod(self, namespace: str, name: str) -> dict:
        self._check()
        if (namespace, name) not in self.pods:
            raise KubeNotFound("pod: 404 NotFound", 404, "NotFound")
        return copy.deepcopy(self.pods[(namespace, name)])

    async def list_nodes(self, keep, page: int = 500):
        self._check()
        self.lists += 1
        return [keep(copy.deepcopy(n)) for n in self.nodes.values()], str(self.rv)

    async def watch_nodes(self, resource_version: str):
        self._check()
        self.watches += 1
        at = int(resource_version)
        if at < self.oldest:
            raise KubeGone(f"watch: 410 Expired: too old resource version: {at}", 410, "Expired")
        breaks = self._break
        while True:
            for rv, kind, obj in list(self.history):
                if rv > at:
                    at = rv
                    yield kind, copy.deepcopy(obj)
            async with self.changed:
                if self.down or self._break != breaks:
                    raise KubeError("watch of the nodes broke off: connection reset")
                if at < self.oldest:
                    raise KubeGone("410 Gone", 410, "Expired")
                if not any(rv > at for rv, _, _ in self.history):
                    await self.changed.wait()

    async def patch_node_status(self, name: str, patch: bytes) -> dict:
        self._check()
        self.patches.append((name, patch))
        if name not in self.nodes:
            raise KubeNotFound("404", 404, "NotFound")
        doc = json.loads(patch)
        node = copy.deepcopy(self.nodes[name])
        node["metadata"]["annotations"].update(doc.get("metadata", {}).get("annotations", {}))
        for cond in doc.get("status", {}).get("conditions", []):
            conds = [c for c in node["status"]["conditions"] if c["type"] != cond["type"]]
            node["status"]["conditions"] = conds + [cond]
        await self._record("MODIFIED", node)
        return node

    async def close(self) -> None:
        pass
