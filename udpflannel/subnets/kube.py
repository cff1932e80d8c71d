"""The Kubernetes subnet manager: flanneld --kube-subnet-mgr (flannel v0.28.9
pkg/subnet/kube/kube.go), one of the two SubnetManagers (base.py), and its Source.

Theory of operation. Nobody leases anything: Kubernetes gives each Node a
``spec.podCIDR`` (node IPAM in kube-controller-manager), and that is the node's subnet.
What an etcd lease would say besides (backend type, VTEP MAC, public IP) each node
publishes as annotations on its own Node (core/kubenode.py: the names and values,
byte for byte flanneld's). Peers are the Nodes whose kube-subnet-manager annotation
is "true". So:

- ``KubeSource.network_config`` reads net-conf.json (--net-config-path; no registry,
  no default: the kube-flannel-cfg ConfigMap), finds the API server (registry/kubeapi),
  our node's name (NODE_NAME, else the pod POD_NAMESPACE/POD_NAME's spec.nodeName, as
  flanneld), and waits for our Node and its podCIDR: while there is none yet it says
  so every NODE_WAIT_LOG seconds and /readyz says why (flanneld exits after 30 s, a
  crash loop). A podCIDR outside Network is one line and an exit (flanneld's error,
  naming both). SubnetLen becomes the podCIDR's length: Kubernetes decides it (its
  --node-cidr-mask-size), and both planes route /SubnetLen subnets. It also reads what
  the Node keeps for a restart (``kept``): node-public-ip (flanneld's
  GetStoredPublicIP: it stands for --public-ip) and the VTEP MAC of backend-data
  (GetStoredMacAddresses), which the daemon takes when the state dir has none.
- Dual stack (EnableIPv6): the IPv6 subnet is the IPv6 entry of spec.podCIDRs, inside
  IPv6Network (IPv6SubnetLen becomes its length); IPv6-only (EnableIPv4 false) takes
  that entry alone (node_subnets). The v6 annotations (backend-v6-data, public-ipv6)
  are published beside the v4 ones, node-public-ipv6 and backend-v6-data's MAC are
  kept as their v4 forms, and a peer's v6 annotations make its lease's IPv6 side.
  Peers are known by their IPv4 podCIDR (an IPv6-only node's: its IPv6 one).
- ``KubeManager.acquire`` is AcquireLease: the lease is the podCIDR with our PublicIP
  and MAC, and our annotations are patched (nodes/status, a strategic merge) unless
  they already say so; public-ip-overwrite is honoured as flanneld does.
- ``keep_renewed`` is what flanneld does once and udpflannel keeps doing: after the
  first snapshot of peers is applied (so pods land on a node that routes to every
  peer), CompleteLease's NetworkUnavailable=False/FlannelIsUp (with
  --set-node-network-unavailable); then, whenever our Node changes, our annotations
  are put right again if someone changed them (at most every REPUBLISH_INTERVAL
  seconds: two writers must not fight at API speed). Our Node deleted: wait for it to
  come back and publish again. It gives up (SubnetLost) only if our Node comes back
  with another podCIDR: our pods' addresses would then be routed to us by nobody;
  a restart takes the new one. (flanneld never gives up after start.)
- ``watch`` is the node informer: list (paged) then watch from that version, with
  bookmarks; a watch the server ends is resumed from the last version seen, a broken
  one after a backoff (100 ms doubling to 5 s, flannel's), a 410 Gone (an API server
  restart, a compacted etcd) re-lists and diffs, so nothing missed is lost. Events
  pass through a queue of EVENT_QUEUE_DEPTH entries, as flanneld's channel; a batch
  holds what is queued. A Node that cannot be read as a lease (core/kubenode.py says
  why) is ignored, logged at a bounded rate (registry/badkeys.py) and counted; what
  may be routed is then core.peers' decision, as for etcd leases. Two nodes claiming
  one podCIDR: the first keeps it; a node claiming ours is ignored.

The API server away keeps the data plane as it is (its routes stay); every call is
retried with backoff and the registry shows as unreachable. At start, before the API
answered once, flanneld's 10 minute limit applies unless CONT_WHEN_CACHE_NOT_READY=true.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import replace
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

from udpflannel.core import config as netconfig
from udpflannel.core import kubenode
from udpflannel.core.errors import BadInput, UdpflannelError
from udpflannel.core.lease import EventType, Lease, LeaseEvent, diff
from udpflannel.observe import sdnotify
from udpflannel.options import RunOptions
from udpflannel.registry.badkeys import BadKeyLog
from udpflannel.registry.kubeapi import KubeAPI, KubeError, KubeGone, KubeNotFound
from udpflannel.subnets.base import Backoff, RegistryHealth, SubnetLost
from udpflannel.subnets.registry_source import parse, read_net_config, with_overrides
from udpflannel.subnets.source import Kept, Stopped, pause

log = logging.getLogger("udpflannel.kube")

NODE_WAIT_LOG = 30.0  # seconds between "still waiting for our node / its podCIDR" lines
NODE_POLL = 1.0  # seconds between reads of our node while it has no podCIDR
START_LIMIT = 600.0  # flanneld's nodeControllerSyncTimeout: the API must answer within this at start
REPUBLISH_INTERVAL = 5.0  # at least this long between two republications of our annotations


class KubeStartTimeout(UdpflannelError):
    """The API server did not answer within START_LIMIT at start (flanneld's limit)."""


def open_kube_source(opts: RunOptions) -> "KubeSource":
    return KubeSource(opts)


class KubeSource:
    """Config from net-conf.json, the subnet from our Node (see the module docstring)."""

    kind = "kube"
    retry = True

    def __init__(self, opts: RunOptions, connect: Callable[[str | None, str | None], Awaitable[Any]] = KubeAPI.connect,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.opts = opts
        self.names = kubenode.annotation_names(opts.kube_annotation_prefix)
        self.kept = Kept()
        self.api: Any = None
        self.node_name = opts.node_name
        self._connect = connect
        self._clock = clock
        self._deadline: float | None = None  # until the API first answers (START_LIMIT)

    @property
    def where(self) -> str:
        return self.api.server if self.api is not None else self.opts.registry_where

    async def network_config(self, stop: asyncio.Event, health: RegistryHealth) -> netconfig.NetworkConfig:
        path = self.opts.net_config or "/etc/kube-flannel/net-conf.json"
        cfg = with_overrides(parse(read_net_config(path), path), self.opts)
        if self.api is None:
            self.api = await self._connect(self.opts.kube_api_url, self.opts.kubeconfig_file)
            log.info("Kubernetes API server %s (annotations %s*)", self.api.server,
                     self.names.public_ip[:-len("public-ip")])
        if not self.opts.cont_when_cache_not_ready:
            self._deadline = self._clock() + START_LIMIT
        if self.node_name is None:
            self.node_name = await self._name_from_pod(stop, health)
        node = await self._node_with_pod_cidr(stop, health)
        subnet, subnet6 = node_subnets(self.node_name, node, cfg, path)
        if subnet is not None:
            network = cfg.network
            assert network is not None
            if subnet.prefixlen != cfg.subnet_len:
                log.info("subnets are /%d, the length of node %s's podCIDR %s (Kubernetes decides it; %s says /%d)",
                         subnet.prefixlen, self.node_name, subnet, path, cfg.subnet_len)
                last = network.broadcast_address + 1 - (1 << (32 - subnet.prefixlen))
                cfg = replace(cfg, subnet_len=subnet.prefixlen, subnet_min=network.network_address,
                              subnet_max=ipaddress.IPv4Address(last))
        if subnet6 is not None:  # dual stack: the IPv6 podCIDR's length, as the IPv4 one's
            network6 = cfg.ipv6_network
            assert network6 is not None
            if subnet6.prefixlen != cfg.ipv6_subnet_len:
                log.info("IPv6 subnets are /%d, the length of node %s's IPv6 podCIDR %s (%s says /%d)",
                         subnet6.prefixlen, self.node_name, subnet6, path, cfg.ipv6_subnet_len)
                last6 = int(network6.broadcast_address) + 1 - (1 << (128 - subnet6.prefixlen))
                cfg = replace(cfg, ipv6_subnet_len=subnet6.prefixlen, ipv6_subnet_min=network6.network_address,
                              ipv6_subnet_max=ipaddress.IPv6Address(last6))
        try:
            public_ip = kubenode.stored_public_ip(self.names, node)
            public_ipv6 = kubenode.stored_public_ipv6(self.names, node) if cfg.enable_ipv6 else None
        except kubenode.NodeError as e:
            raise BadInput(f"node {self.node_name}: {e}") from None
        mac = kubenode.stored_vtep_mac(self.names, node)
        mac6 = kubenode.stored_vtep_mac(self.names, node, 6) if cfg.enable_ipv6 else None
        self.kept = Kept(public_ip, mac, public_ipv6, mac6)
        if public_ip is not None:
            log.info("public IP %s from node %s's annotation %s (flanneld's node-public-ip)", public_ip,
                     self.node_name, self.names.node_public_ip)
        if public_ipv6 is not None:
            log.info("public IPv6 %s from node %s's annotation %s (flanneld's node-public-ipv6)", public_ipv6,
                     self.node_name, self.names.node_public_ipv6)
        return cfg

    def manager(self, cfg: netconfig.NetworkConfig, health: RegistryHealth) -> "KubeManager":
        assert self.api is not None and self.node_name is not None, "network_config() first"
        return KubeManager(self.api, self.names, self.node_name, cfg, health,
                           set_network_unavailable=self.opts.set_node_network_unavailable,
                           queue_depth=self.opts.event_queue_depth)

    async def close(self) -> None:
        if self.api is not None:
            await self.api.close()

    # -- start-up -------------------------------------------------------------------

    async def _answer(self, what: str, call: Callable[[], Awaitable[Any]], stop: asyncio.Event,
                      health: RegistryHealth) -> Any:
        """``call()`` retried while the API server is away (KubeNotFound is an answer:
        raised); Stopped on a stop request; KubeStartTimeout past flanneld's limit."""
        backoff = Backoff(0.5, 10.0)
        while not stop.is_set():
            try:
                result = await call()
            except KubeNotFound:
                self._deadline = None
                health.succeeded()
                health.waiting = None
                raise
            except KubeError as e:
                health.failed(what, e)
                health.waiting = f"waiting for the Kubernetes API server ({what}): {e}"
                if self._deadline is not None and self._clock() > self._deadline:
                    raise KubeStartTimeout(
                        f"the Kubernetes API server at {self.api.server} did not answer in {START_LIMIT / 60:.0f} "
                        f"minutes ({what}: {e}); flanneld's limit at start (CONT_WHEN_CACHE_NOT_READY=true "
                        "waits on)") from None
                await pause(stop, backoff.delay())
                continue
            self._deadline = None
            health.succeeded()
            health.waiting = None
            return result
        raise Stopped(what)

    async def _name_from_pod(self, stop: asyncio.Event, health: RegistryHealth) -> str:
        ns, name = self.opts.pod_namespace, self.opts.pod_name
        if not ns or not name:
            raise BadInput("--kube-subnet-mgr needs NODE_NAME, or POD_NAME and POD_NAMESPACE")
        try:
            pod = await self._answer(f"reading pod {ns}/{name}", lambda: self.api.get_pod(ns, name), stop, health)
        except KubeNotFound:
            raise BadInput(f"pod {ns}/{name} (POD_NAMESPACE/POD_NAME) does not exist: they must name this "
                           "pod, to read its spec.nodeName") from None
        spec = pod.get("spec")
        node = spec.get("nodeName") if isinstance(spec, dict) else None
        if not isinstance(node, str) or not node:
            raise BadInput(f"pod {ns}/{name} has no spec.nodeName")
        log.info("node %s (pod %s/%s's spec.nodeName)", node, ns, name)
        return node

    async def _node_with_pod_cidr(self, stop: asyncio.Event, health: RegistryHealth) -> dict:
        """Our Node once it has a podCIDR, waiting as long as it takes (module docstring)."""
        name = self.node_name
        assert name is not None
        said = None
        try:
            while True:
                try:
                    node = await self._answer(f"reading node {name}", lambda: self.api.get_node(name), stop, health)
                except KubeNotFound:
                    node = None
                if node is not None:
                    try:
                        if kubenode.pod_cidrs(node) != (None, None):
                            return node
                    except kubenode.NodeError as e:
                        raise BadInput(f"node {name}: {e}") from None
                    why = (f"node {name} has no podCIDR yet (Kubernetes' node IPAM gives one: "
                           "kube-controller-manager --allocate-node-cidrs)")
                else:
                    why = f"node {name} does not exist yet (its kubelet registers it)"
                health.waiting = f"waiting: {why}"
                now = self._clock()
                if said is None or now - said >= NODE_WAIT_LOG:
                    said = now
                    log.warning("%s; waiting", why)
                    sdnotify.status(f"waiting: {why}")
                await pause(stop, NODE_POLL)
                if stop.is_set():
                    raise Stopped(f"waiting for node {name}'s podCIDR")
        finally:
            health.waiting = None


class KubeManager:
    """AcquireLease, the annotations kept right, the node informer (module docstring)."""

    def __init__(self, api: Any, names: kubenode.Annotations, node_name: str, config: netconfig.NetworkConfig,
                 health: RegistryHealth | None = None, *, set_network_unavailable: bool = True,
                 queue_depth: int = 5000, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic, utcnow: Callable[[], str] | None = None) -> None:
        self.api = api
        self.names = names
        self.node_name = node_name
        self.config = config
        self.health = health or RegistryHealth()
        self.set_network_unavailable = set_network_unavailable
        self.queue_depth = max(1, queue_depth)
        self._sleep = sleep
        self._clock = clock
        self._utcnow = utcnow or (lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.lease: Lease | None = None
        self.bad_nodes = BadKeyLog(log, "ignoring node")
        # the other nodes: name -> lease; subnet -> claimants in order; what the plane was told
        self._leases: dict[str, Lease] = {}
        self._claims: dict[_Subnet, dict[str, None]] = {}
        self._routed: dict[_Subnet, Lease] = {}
        # our own Node as last seen: its annotations and podCIDRs (IPv4, IPv6); None while deleted
        self._own: tuple[Mapping[str, str], tuple | None] | None = None
        self._own_seen = asyncio.Event()  # set on every sighting of our Node (or its deletion)
        self._snapshot_applied = asyncio.Event()

    # -- acquire ----------------------------------------------------------------------

    async def acquire(self, wanted: Lease, previous: ipaddress.IPv4Network | None = None) -> Lease:
        """Our podCIDR as the lease, our annotations published (AcquireLease)."""
        node = await self.api.get_node(self.node_name)
        subnet, subnet6 = node_subnets(self.node_name, node, self.config, "the network config")
        lease = replace(wanted, subnet=subnet, ipv6_subnet=subnet6, expiration=0.0)
        await self._publish(lease, kubenode.node_annotations(node), "published")
        if previous is not None and subnet is not None and previous != subnet:
            log.warning("subnet.env said %s; node %s's podCIDR is %s: Kubernetes decides, %s it is",
                        previous, self.node_name, subnet, subnet)
        self.lease = lease
        return lease

    async def _publish(self, lease: Lease, current: Mapping[str, str], verb: str) -> bool:
        """Patch our annotations where they differ from what flanneld would write; True
        if anything was sent."""
        got = kubenode.publish(self.names, lease, current)
        if got.overwritten is not None:
            log.info("public IP published as %s: the annotation %s overrides ours (%s)", got.overwritten,
                     self.names.public_ip_overwrite, lease.public_ip)
        if got.overwritten6 is not None:
            log.info("public IPv6 published as %s: the annotation %s overrides ours (%s)", got.overwritten6,
                     self.names.public_ipv6_overwrite, lease.public_ipv6)
        if not got.changes:
            return False
        await self.api.patch_node_status(self.node_name, kubenode.annotations_patch(got.changes))
        log.info("node %s: %s %s", self.node_name, verb,
                 ", ".join(f"{k}={v}" for k, v in sorted(got.changes.items())))
        return True

    # -- keep -------------------------------------------------------------------------

    async def keep_renewed(self) -> None:
        """Runs for the daemon's life (module docstring); SubnetLost if our Node came
        back with another podCIDR."""
        assert self.lease is not None
        if self.set_network_unavailable:
            await self._snapshot_applied.wait()
            await self._mark_available()
        backoff = Backoff(1.0, 60.0)
        last_publish = -1e18
        gone = False
        while True:
            await self._own_seen.wait()
            self._own_seen.clear()
            own = self._own
            if own is None:
                if not gone:
                    log.warning("node %s was deleted; forwarding goes on, waiting for it to return", self.node_name)
                gone = True
                continue
            annotations, cidrs = own
            if cidrs is None:  # back, without its podCIDR yet: wait for node IPAM
                continue
            ours = (self.lease.subnet, self.lease.ipv6_subnet)
            if any(mine is not None and now != mine for now, mine in zip(cidrs, ours)):
                now_text = " + ".join(str(c) for c in cidrs if c is not None)
                raise SubnetLost(f"node {self.node_name} now has podCIDR {now_text}, this node runs "
                                 f"{self.lease.describe()}: restart to take the new one (the pods' addresses "
                                 "change with it)")
            if not gone and not kubenode.publish(self.names, self.lease, annotations).changes:
                continue
            wait = last_publish + REPUBLISH_INTERVAL - self._clock()
            if wait > 0:
                await self._sleep(wait)
                if self._own is not own:
                    self._own_seen.set()  # look again, at the newest sighting
                    continue
            try:
                last_publish = self._clock()
                await self._publish(self.lease, annotations, "is back: published" if gone
                                    else "someone changed our annotations: republished")
                if gone and self.set_network_unavailable:
                    await self._mark_available()
                gone = False
                backoff.reset()
            except KubeError as e:
                self.health.failed("republishing our annotations", e)
                await self._sleep(backoff.delay())
                self._own_seen.set()

    async def _mark_available(self) -> None:
        """CompleteLease: NetworkUnavailable=False, reason FlannelIsUp (retried until
        the API server takes it)."""
        backoff = Backoff(1.0, 60.0)
        while True:
            try:
                await self.api.patch_node_status(self.node_name, kubenode.network_available_patch(self._utcnow()))
                self.health.succeeded()
                log.info("node %s: condition NetworkUnavailable=False (FlannelIsUp)", self.node_name)
                return
            except KubeError as e:
                self.health.failed("setting NetworkUnavailable=False", e)
                await self._sleep(backoff.delay())

    # -- watch ------------------------------------------------------------------------

    async def watch(self) -> AsyncIterator[list[LeaseEvent]]:
        """The other nodes' leases: first a snapshot batch (even empty), then changes."""
        queue: asyncio.Queue[list[LeaseEvent]] = asyncio.Queue(maxsize=self.queue_depth)
        reader = asyncio.create_task(self._read(queue), name="kube node informer")
        try:
            yield await self._next(queue, reader)  # the snapshot
            self._snapshot_applied.set()
            while True:
                batch = list(await self._next(queue, reader))
                while not queue.empty() and len(batch) < self.queue_depth:
                    batch.extend(queue.get_nowait())
                yield batch
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    @staticmethod
    async def _next(queue: asyncio.Queue, reader: asyncio.Task) -> list[LeaseEvent]:
        getter = asyncio.ensure_future(queue.get())
        try:
            await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        reader.result()  # the reader ended: its error (it never ends otherwise)
        raise AssertionError("the node informer ended")

    async def _read(self, queue: asyncio.Queue) -> None:
        backoff = Backoff()  # 100 ms -> 5 s, flannel's watch backoff
        version: str | None = None
        listed = False
        while True:
            try:
                if version is None:
                    seen, version = await self.api.list_nodes(self._sight)
                    events = self._reset(seen)
                    self.health.succeeded()
                    self.health.waiting = None
                    if events or not listed:
                        await queue.put(events)
                    listed = True
                    backoff.reset()
                began = self._clock()
                async for kind, obj in self.api.watch_nodes(version):
                    self.health.succeeded()
                    backoff.reset()
                    meta = obj.get("metadata")
                    if isinstance(meta, dict) and meta.get("resourceVersion"):
                        version = str(meta["resourceVersion"])
                    if kind == "BOOKMARK":
                        continue
                    if kind == "DELETED":
                        events = self._deleted(kubenode.node_name(obj))
                    elif kind in ("ADDED", "MODIFIED"):
                        events = self._update(*self._sight(obj))
                    else:
                        continue
                    if events:
                        await queue.put(events)
                if self._clock() - began < 1.0:  # the server ended it at once: not again at once
                    await self._sleep(backoff.delay())
            except KubeGone as e:
                log.info("node watch: %s; listing the nodes again", e)
                version = None
            except KubeError as e:
                self.health.failed("listing the nodes" if version is None else "watching the nodes", e)
                if not listed:
                    self.health.waiting = f"waiting for the list of nodes: {e}"
                await self._sleep(backoff.delay())

    def _sight(self, node: dict) -> tuple[str, Lease | None]:
        """One Node as read: ours is remembered (never a peer); another is (name, its
        lease) if it is a flannel node that can be read as one, else (name, None)."""
        name = kubenode.node_name(node)
        if name == self.node_name:
            cidrs: tuple | None
            try:
                cidrs = kubenode.pod_cidrs(node)
            except kubenode.NodeError:
                cidrs = None
            if cidrs == (None, None):
                cidrs = None
            self._own = (dict(kubenode.node_annotations(node)), cidrs)
            self._own_seen.set()
            return name, None
        if not kubenode.is_flannel_node(self.names, node):
            self.bad_nodes.good(name)
            return name, None
        try:
            lease = kubenode.node_lease(self.names, node, ipv4=self.config.enable_ipv4,
                                        ipv6=self.config.enable_ipv6)  # dual stack
        except kubenode.NodeError as e:
            self.health.ignored += 1
            self.bad_nodes.skipped(name, f"{name[:80]!r}: {e}")
            return name, None
        self.bad_nodes.good(name)
        return name, lease

    def _effective(self, subnet: "_Subnet") -> Lease | None:
        """The lease routed for ``subnet``: its first claimant's; never our own subnet."""
        if self.lease is not None and subnet == _pod_cidr(self.lease):
            return None
        for name in self._claims.get(subnet, ()):
            return self._leases[name]
        return None

    def _claim(self, name: str, lease: Lease) -> None:
        claimants = self._claims.setdefault(_pod_cidr(lease), {})
        claimants[name] = None
        if self.lease is not None and _pod_cidr(lease) == _pod_cidr(self.lease):
            self.health.ignored += 1
            self.bad_nodes.skipped(f"{name}\0ours", f"{name[:80]!r}: its podCIDR {_pod_cidr(lease)} is ours")
        elif len(claimants) > 1:
            first = next(iter(claimants))
            self.health.ignored += 1
            self.bad_nodes.skipped(f"{name}\0dup", f"{name[:80]!r}: podCIDR {_pod_cidr(lease)} is node "
                                   f"{first[:80]!r}'s too; the first keeps the route")

    def _unclaim(self, name: str) -> "_Subnet | None":
        old = self._leases.pop(name, None)
        if old is None:
            return None
        subnet = _pod_cidr(old)
        claimants = self._claims.get(subnet, {})
        claimants.pop(name, None)
        if not claimants:
            self._claims.pop(subnet, None)
        return subnet

    def _update(self, name: str, lease: Lease | None) -> list[LeaseEvent]:
        """The events one node's new state makes (a watch event)."""
        if name == self.node_name:
            return []
        touched = {s for s in (self._unclaim(name),) if s is not None}
        if lease is not None:
            self._leases[name] = lease
            self._claim(name, lease)
            touched.add(_pod_cidr(lease))
        events = []
        for subnet in touched:
            now, before = self._effective(subnet), self._routed.get(subnet)
            if now is None:
                if before is not None:
                    del self._routed[subnet]
                    events.append(LeaseEvent(EventType.REMOVED, before))
            elif before is None or not before.same_route(now):
                self._routed[subnet] = now
                events.append(LeaseEvent(EventType.ADDED, now))
        return events

    def _deleted(self, name: str) -> list[LeaseEvent]:
        if name == self.node_name:
            self._own = None
            self._own_seen.set()
            return []
        return self._update(name, None)

    def _reset(self, seen: list[tuple[str, Lease | None]]) -> list[LeaseEvent]:
        """A full listing: the state rebuilt from it, the changes to what the plane has."""
        if not any(name == self.node_name for name, _ in seen):
            self._own = None
            self._own_seen.set()
        self._leases, self._claims = {}, {}
        for name, lease in seen:
            if lease is not None and name != self.node_name:
                self._leases[name] = lease
                self._claim(name, lease)
        fresh = {s: lease for s in self._claims if (lease := self._effective(s)) is not None}
        events = diff(self._routed, fresh)
        self._routed = fresh
        return events


_Subnet = ipaddress.IPv4Network | ipaddress.IPv6Network


def _pod_cidr(lease: Lease) -> _Subnet:
    """What a node's lease is known by here: its IPv4 podCIDR, an IPv6-only node's
    IPv6 one (kubenode.node_lease)."""
    subnet = lease.subnet or lease.ipv6_subnet
    assert subnet is not None
    return subnet


def node_subnets(name: str, node: Mapping[str, Any], cfg: netconfig.NetworkConfig,
                 where: str) -> tuple[ipaddress.IPv4Network | None, ipaddress.IPv6Network | None]:
    """Our node's subnets as AcquireLease takes them from spec.podCIDRs: the IPv4 one
    with EnableIPv4, inside Network; the IPv6 one with EnableIPv6, inside IPv6Network.
    One missing or outside its network is one line (BadInput) naming both."""
    try:
        v4, v6 = kubenode.pod_cidrs(node)
    except kubenode.NodeError as e:
        raise BadInput(f"node {name}: {e}") from None
    got = " + ".join(str(c) for c in (v4, v6) if c is not None) or "none"
    agree = ("Kubernetes' cluster CIDR (kube-controller-manager --cluster-cidr) and net-conf.json must agree")
    subnet = subnet6 = None
    if cfg.enable_ipv4:
        network = cfg.network
        assert network is not None
        if v4 is None:
            raise BadInput(f"node {name}'s podCIDRs ({got}) have no IPv4 one for the Network {network} of {where}: "
                           f"{agree}")
        if not kubenode.contains(network, v4):
            raise BadInput(f"node {name}'s podCIDR {v4} is not inside the Network {network} of {where}: {agree}")
        if v4.prefixlen > 30:
            raise BadInput(f"node {name}'s podCIDR {v4} is smaller than a /30: no room for pods")
        subnet = v4
    if cfg.enable_ipv6:
        network6 = cfg.ipv6_network
        assert network6 is not None
        if v6 is None:
            raise BadInput(f"node {name}'s podCIDRs ({got}) have no IPv6 one for the IPv6Network {network6} of "
                           f"{where} (EnableIPv6): {agree}, dual-stack (--cluster-cidr=<IPv4>,<IPv6>)")
        if not kubenode.contains(network6, v6):
            raise BadInput(f"node {name}'s IPv6 podCIDR {v6} is not inside the IPv6Network {network6} of {where}: "
                           f"{agree}")
        if v6.prefixlen > 126:
            raise BadInput(f"node {name}'s IPv6 podCIDR {v6} is smaller than a /126: no room for pods")
        subnet6 = v6
    return subnet, subnet6
