"""A real, throwaway etcd for integration tests.

``EtcdServer`` (defined in udpflannel.lab.etcd, shared with the bench scripts) runs
/usr/bin/etcd on 127.0.0.1 with free random client and peer ports and its own data
directory, or on ``host``, an address inside a test's own network
namespace, with ``popen`` (e.g. Namespace.popen) starting etcd and every etcdctl call
there. It can be stopped and started again on the same ports and data (outage tests)
or frozen with SIGSTOP (hang tests). The process is always ended by its pid:
terminate, wait 5 s, kill. As a last resort it is started under ``setpriv --pdeathsig
TERM`` so it dies with the test process, and an atexit hook stops any server a crashed
test left behind.

Fixtures: ``etcd_server`` (one server per test module) and ``fresh_etcd`` (one per
test, for tests that stop, freeze or reconfigure it). Import them into a test module:
``from etcd_server import etcd_server, fresh_etcd``. ``etcd_in_hub(lab, dir)`` runs
one inside a lab's hub namespace, on the underlay the daemons use; ``subnet_leases``
reads what etcd holds under a prefix; FLANNEL_*_LEASE are flanneld's lease values.

A missing etcd fails the test, saying what to install: the test command installs it.
"""

from __future__ import annotations

import base64
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from udpflannel.lab.etcd import (  # noqa: F401 - re-exported: tests import them from here
    ETCD,
    ETCDCTL,
    START_TIMEOUT,
    EtcdServer,
    TLSFiles,
    _all_threads_stopped,
    _running,
    free_port,
)


def require_etcd() -> None:
    """Fail, saying what to install, when etcd or etcdctl is absent (make setup installs both)."""
    missing = [p for p in (ETCD, ETCDCTL) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: apt-get install etcd-server etcd-client "
                    "(make setup does)")


HUB_ADDR = "192.168.250.2"  # a lab hub's address on the underlay: where etcd listens

# The values flanneld writes (pkg/lease): a vxlan node's, and a udp node's (no BackendType).
FLANNEL_VXLAN_LEASE = ('{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan",'
                       '"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}')
FLANNEL_UDP_LEASE = '{{"PublicIP":"{ip}","PublicIPv6":null}}'


@contextmanager
def etcd_in_hub(lab, base_dir) -> Iterator[EtcdServer]:
    """A real etcd inside ``lab``'s hub namespace, listening on the underlay (HUB_ADDR),
    so the daemons in node namespaces reach it as they would a real cluster's."""
    require_etcd()
    lab.hub.link_up("br0", f"{HUB_ADDR}/24")
    server = EtcdServer(base_dir, host=HUB_ADDR, popen=lab.hub.popen)
    try:
        server.start()
        yield server
    finally:
        server.__exit__()


def subnet_leases(etcd: EtcdServer, prefix: str) -> dict[str, dict]:
    """{key name: {"value": text, "lease": etcd lease id}} under <prefix>/subnets/."""
    doc = etcd.etcdctl_json("get", f"{prefix}/subnets/", "--prefix")
    out = {}
    for kv in doc.get("kvs", []):
        key = base64.b64decode(kv["key"]).decode()
        out[key.rsplit("/", 1)[-1]] = {"value": base64.b64decode(kv["value"]).decode(),
                                       "lease": int(kv.get("lease", 0))}
    return out


def _serve(base_dir: Path, **kwargs) -> Iterator[EtcdServer]:
    require_etcd()
    server = EtcdServer(base_dir, **kwargs)
    try:
        server.start()
        yield server
    finally:
        server.__exit__()


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd shared by a test module (tests use their own key prefixes)."""
    yield from _serve(tmp_path_factory.mktemp("etcd"))


@pytest.fixture
def fresh_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd of this test's own, which it may stop, start, pause and resume."""
    yield from _serve(tmp_path / "etcd")


async def until_tokens_expire(server: EtcdServer, user: str, password: str, timeout: float = 15.0) -> None:
    """Returns once etcd (run with --auth-token-ttl) has expired every auth token that
    was last used before the call; AssertionError after ``timeout`` seconds.

    A simple token lives until TTL after its last use and is dropped at etcd's next
    once-a-second sweep, and any use renews it, so expiry can only be seen with a
    token never used before: probe tokens are all issued now, and each is used once,
    later and later, until etcd calls one invalid. Any token last used before they
    were issued expired no later, in the same sweep or an earlier one."""
    import asyncio

    import grpc
    from aetcd import rpc

    tls = server.tls
    target = server.endpoint.split("://", 1)[1]
    if tls is not None:
        creds = grpc.ssl_channel_credentials(Path(tls.ca).read_bytes(), Path(tls.client_key).read_bytes(),
                                             Path(tls.client_cert).read_bytes())
        channel = grpc.aio.secure_channel(target, creds)
    else:
        channel = grpc.aio.insecure_channel(target)
    async with channel:
        auth, kv = rpc.AuthStub(channel), rpc.KVStub(channel)
        loop = asyncio.get_running_loop()
        started = loop.time()
        probes = [offset for offset in TOKEN_PROBES if offset <= timeout]
        tokens = [(await auth.Authenticate(rpc.AuthenticateRequest(name=user, password=password), timeout=5)).token
                  for _ in probes]
        issued = loop.time()  # the last one: every probe is older than this when used
        for offset, token in zip(probes, tokens):
            await asyncio.sleep(max(0.0, issued + offset - loop.time()))
            try:
                await kv.Range(rpc.RangeRequest(key=b"\0"), metadata=(("token", token),), timeout=5)
            except grpc.aio.AioRpcError as e:
                if "invalid auth token" in (e.details() or ""):
                    return
                raise
    raise AssertionError(f"etcd still takes auth tokens {loop.time() - started:.1f}s after they were issued")


# When each probe token of until_tokens_expire is used, in seconds after they were issued.
TOKEN_PROBES = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.5, 7.5, 10.0, 13.0)
