"""A rolling replacement, node by node, from the real flanneld to udpflannel, under a
TCP stream that never breaks.

Three nodes on one etcd run flanneld v0.28.9 (the vxlan backend, then the udp
backend). A paced TCP stream runs from node 1 to node 3 for the whole test; the nodes
are replaced one at a time as an operator would (stop flanneld, start udpflannel with
the same subnet file): node 2 first (off the stream's path), then node 3 (the
receiver), then node 1 (the sender). Every replaced node keeps its subnet (flanneld's
lease is provably its own: a vxlan node takes flannel.1's MAC), the stream delivers
every byte in order, and afterwards every pair pings. The longest silence the
receiver's underlay saw is printed (not asserted: TCP retransmits through a gap).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import pytest

from udpflannel.lab import probe
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.flanneld import Flanneld
from udpflannel.lab.netns import Lab

try:
    from .etcd_server import etcd_in_hub
    from .test_restarts import UnderlaySilence, shape
except ImportError:
    from etcd_server import etcd_in_hub
    from test_restarts import UnderlaySilence, shape

NETWORK = "10.244.0.0/16"
RATE = "10mbit"
# the plane each node gets, in replacement order (node index -> udpflannel's flags)
ORDER = {"vxlan": [(1, ["--dataplane", "engine"]), (2, ["--dataplane", "kernel"]), (0, ["--dataplane", "engine"])],
         "udp": [(1, []), (2, []), (0, [])]}


@pytest.fixture
def lab():
    with Lab(3, tag="ufroll") as lab:
        yield lab


@pytest.mark.parametrize("backend", ["vxlan", "udp"])
def test_replacing_every_flanneld_node_under_a_stream(lab, tmp_path, backend, capsys, record_property):
    with etcd_in_hub(lab, tmp_path / "etcd") as etcd:
        prefix = f"/t-{uuid.uuid4().hex[:8]}/network"
        etcd.etcdctl("put", f"{prefix}/config", json.dumps({"Network": NETWORK, "Backend": {"Type": backend}}))
        flannelds = [Flanneld(lab.nodes[i], str(tmp_path / f"fl{i}"), etcd_endpoints=etcd.endpoint,
                              etcd_prefix=prefix) for i in range(3)]
        cluster = Cluster(lab, str(tmp_path / "uf"), etcd_endpoints=etcd.endpoint,
                          extra_args=["--etcd-prefix", prefix])
        try:
            for fl in flannelds:
                fl.start()
            for fl in flannelds:
                fl.wait_ready()
            subnets = [fl.subnet for fl in flannelds]
            addr = [str(s.network_address) for s in subnets]
            for a in range(3):
                for b in range(3):
                    if a != b:
                        probe_until(lab.nodes[a], addr[b])
            shape(lab.nodes[0], "eth0", RATE)
            with Stream(lab.nodes[0], lab.nodes[2], addr[2]) as stream, UnderlaySilence(lab.nodes[2]) as silence:
                time.sleep(2.0)
                for i, flags in ORDER[backend]:
                    flannelds[i].stop()
                    cluster.start(i, ["--subnet-file", flannelds[i].subnet_file, *flags])
                    st = cluster.wait_status(i, lambda s: s.ready, 30, "replaced and ready")
                    assert st.lease.subnet == str(subnets[i]), (i, st.lease.subnet, subnets[i])
                    assert stream.alive(), f"the stream broke while node {i + 1} was replaced: {stream.error!r}"
                    time.sleep(1.0)
            assert stream.error is None, f"the stream broke: {stream.error!r}"
            assert stream.received > 1_000_000 and stream.received == stream.sent  # every byte, in order
            for a in range(3):
                for b in range(3):
                    if a != b:
                        probe_until(lab.nodes[a], addr[b])
            record_property("silent_seconds", round(silence.longest, 3))
            with capsys.disabled():
                print(f"\n[rolling {backend}] {stream.received} B from node 1 to node 3 while each node was replaced; "
                      f"longest silence at node 3's eth0 {silence.longest:.2f} s")
        finally:
            cluster.stop_all()
            for fl in flannelds:
                fl.stop()


class Stream:
    """One TCP connection from ``src`` to ``addr`` (in ``dst``) that sends a counting
    pattern until the ``with`` block ends, then closes; the receiver checks every byte.
    It runs as long as the replacements take, however slow the machine."""

    BLOCK = bytes(range(256)) * 256

    def __init__(self, src, dst, addr: str, port: int = 5202, timeout: float = 30.0) -> None:
        self.sent = self.received = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._listener = dst.call(socket.create_server, ("0.0.0.0", port))
        self._listener.settimeout(timeout)
        self._client = src.call(socket.socket)
        self._client.settimeout(timeout)
        self._addr, self._port = addr, port
        self._threads = [threading.Thread(target=self._receive, daemon=True),
                         threading.Thread(target=self._send, daemon=True)]

    def _send(self) -> None:
        try:
            self._client.connect((self._addr, self._port))
            while not self._stop.is_set():
                self._client.sendall(self.BLOCK)
                self.sent += len(self.BLOCK)
            self._client.shutdown(socket.SHUT_WR)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = self.error or e

    def _receive(self) -> None:
        try:
            conn, _ = self._listener.accept()
            conn.settimeout(self._listener.gettimeout())
            with conn:
                while chunk := conn.recv(1 << 20):
                    if chunk[0] != self.received % 256 or chunk[-1] != (self.received + len(chunk) - 1) % 256:
                        raise ValueError(f"corrupt stream near byte {self.received}")
                    self.received += len(chunk)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = self.error or e

    def alive(self) -> bool:
        return self.error is None and all(t.is_alive() for t in self._threads)

    def __enter__(self) -> "Stream":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        self._client.close()
        self._listener.close()


def probe_until(ns, address: str, timeout: float = 15.0) -> None:
    """Until an echo comes back (a flanneld still adding the route: unreachable meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(probe.ping(ns, address, count=1, timeout=0.5)):
                return
        except OSError:
            time.sleep(0.1)
        assert time.monotonic() < deadline, f"no echo reply from {address}"


