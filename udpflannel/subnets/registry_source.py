"""The network config and leases from a registry: etcd v3 with flannel's key layout,
or the embedded SQLite file (subnets/source.py's contract).

The config is the stored one; --net-config's (or, embedded, the default) is stored
when there is none. Under etcd with neither, the node waits for one like flanneld (an
exit would be a crash loop under a DaemonSet), saying so every CONFIG_WAIT_LOG seconds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import replace

from udpflannel.core import config as netconfig
from udpflannel.core.errors import BadInput
from udpflannel.host import localstate
from udpflannel.observe import sdnotify
from udpflannel.options import RunOptions
from udpflannel.registry.base import Registry
from udpflannel.subnets.base import RegistryHealth, SubnetManager
from udpflannel.subnets.leasing import LeaseManager
from udpflannel.subnets.source import Kept, Stopped, pause, until_reachable

log = logging.getLogger("udpflannel")

CONFIG_WAIT_LOG = 30.0  # seconds between "still waiting for the network config" lines


class RegistrySource:
    def __init__(self, opts: RunOptions, registry: Registry) -> None:
        self.opts = opts
        self.registry = registry
        self.kind = opts.registry_kind
        self.where = opts.registry_where
        self.retry = bool(opts.etcd_endpoints)
        self.kept = Kept()

    async def network_config(self, stop: asyncio.Event, health: RegistryHealth) -> netconfig.NetworkConfig:
        opts, registry, retry = self.opts, self.registry, self.retry
        key = f"{opts.etcd_prefix}/config" if opts.etcd_endpoints else f"config in {opts.registry_file}"
        waited_since = None
        while True:
            stored = await until_reachable("reading config", registry.get_config, retry, stop, health)
            if stored is not None:
                break
            if opts.net_config or not opts.etcd_endpoints:
                text = read_net_config(opts.net_config) if opts.net_config else netconfig.default_config().to_json()
                stored = await until_reachable(
                    "writing config", functools.partial(registry.put_config_if_absent, text), retry, stop, health)
                break
            now = time.monotonic()
            if waited_since is None or now - waited_since >= CONFIG_WAIT_LOG:
                waited_since = now
                log.warning("no network config at %s yet; waiting for one (e.g. etcdctl put %s "
                            "'{\"Network\": \"10.244.0.0/16\", \"Backend\": {\"Type\": \"vxlan\"}}')",
                            key, key)
                sdnotify.status(f"waiting for the network config at {key}")
            await pause(stop, 1.0)
            if stop.is_set():
                raise Stopped("waiting for the network config")
        return with_overrides(parse(stored, key), opts)

    def manager(self, cfg: netconfig.NetworkConfig, health: RegistryHealth) -> SubnetManager:
        """The IPv6 subnet the node had (subnet.env's, else the state dir's) is handed over
        here, as flanneld hands it to its etcd manager (the daemon hands the IPv4 one to
        acquire)."""
        opts = self.opts
        previous_v6 = (localstate.previous_ipv6_subnet(opts.subnet_file)
                       or localstate.recorded_subnet(opts.state_dir, opts.tun, 6))
        return LeaseManager(self.registry, cfg, ttl=opts.lease_ttl, renew_margin=opts.renew_margin,
                            health=health, previous_v6=previous_v6)

    async def close(self) -> None:
        await self.registry.close()


def read_net_config(path: str) -> str:
    """A network config file's text, refused (one line) if it does not parse."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise BadInput(f"--net-config {path}: {e.strerror}") from None
    parse(text, path)
    return text


def parse(text: str, where: str) -> netconfig.NetworkConfig:
    try:
        return netconfig.parse(text)
    except netconfig.ConfigError as e:
        raise BadInput(f"{where}: {e}") from None


def with_overrides(cfg: netconfig.NetworkConfig, opts: RunOptions) -> netconfig.NetworkConfig:
    """--vni and --port over the config's Backend.VNI and Backend.Port."""
    if opts.vni is not None or opts.port is not None:
        cfg = replace(cfg, vni=opts.vni or cfg.vni, port=opts.port or cfg.port)
    return cfg
