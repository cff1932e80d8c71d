"""Which registry a node uses, from its options: etcd v3 when endpoints are given,
else the embedded SQLite file. The client libraries load only for the one chosen."""

from __future__ import annotations

from udpflannel.options import RunOptions
from udpflannel.registry.base import Registry


def open_registry(opts: RunOptions) -> Registry:
    if opts.etcd_endpoints:
        from udpflannel.registry.etcd import EtcdRegistry
        return EtcdRegistry(list(opts.etcd_endpoints), prefix=opts.etcd_prefix,
                            cafile=opts.etcd_cafile, certfile=opts.etcd_certfile,
                            keyfile=opts.etcd_keyfile, username=opts.etcd_username,
                            password=opts.etcd_password)
    from udpflannel.registry.embedded import EmbeddedRegistry
    return EmbeddedRegistry(opts.registry_file)
