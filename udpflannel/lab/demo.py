"""`udpflannel demo`: a whole overlay on one machine, shown working, then removed.

N namespaces on a private bridge underlay, one `udpflannel run` per namespace, all
sharing one embedded registry file. It pings every ordered pair over the overlay,
streams TCP between the first two nodes, prints the data plane's counters, and
removes every namespace, process and file it made, also on Ctrl-C or failure.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile

from udpflannel.core.errors import UdpflannelError
from udpflannel.lab import probe
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.netns import Lab, interrupt_on_sigterm

LAB_TAG = "ufd"  # the demo's namespaces: netns.lab_prefix(LAB_TAG, pid)


class DemoFailed(UdpflannelError):
    pass


def _say(text: str = "") -> None:
    print(text, flush=True)


def main(nodes: int, seconds: float, engine: str) -> int:
    interrupt_on_sigterm()
    workdir = tempfile.mkdtemp(prefix="udpflannel-demo-")
    try:
        with Lab(nodes, tag=LAB_TAG) as lab, Cluster(lab, workdir, engine=engine) as cluster:
            _say(f"underlay: {nodes} namespaces on bridge {lab.hub.name}/br0 "
                 f"({lab.underlay}), registry {cluster.registry_file}")
            cluster.start_all()
            cluster.wait_converged(timeout=30)
            for i, st in enumerate(cluster.statuses()):
                assert st.lease is not None and st.dataplane is not None  # (converged)
                _say(f"  node {i + 1}  ns {lab.nodes[i].name:<16} underlay {lab.addresses[i]:<15} "
                     f"leased {st.lease.subnet:<16} VTEP {st.lease.vtep_mac}  "
                     f"{st.dataplane.kind} plane, peers {st.dataplane.peers}")
            _say()
            failures = _ping_all(cluster)
            _say()
            result = probe.tcp_stream(lab.nodes[0], lab.nodes[1], cluster.overlay_addr(1), seconds)
            _say(f"TCP node 1 -> node 2 over the overlay: {result.bytes / 1e6:.0f} MB in "
                 f"{result.seconds:.1f} s = {result.gbps:.2f} Gbit/s")
            _say()
            for i, st in enumerate(cluster.statuses()):
                assert st.dataplane is not None
                c = st.dataplane.counters
                drops = {k[5:]: v for k, v in c.items() if k.startswith("drop_") and v}
                _say(f"  node {i + 1} counters: tx {c['tx_packets']} pkts, rx {c['rx_packets']} pkts, "
                     f"drops {drops or 'none'}")
            if failures:
                raise DemoFailed(f"{failures} ping pair(s) failed")
            _say("\noverlay works: every pair reachable. Cleaning up.")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _ping_all(cluster: Cluster) -> int:
    failures = 0
    lab = cluster.lab
    for i, src in enumerate(lab.nodes):
        for j in range(len(lab.nodes)):
            if i == j:
                continue
            dst = cluster.overlay_addr(j)
            rtts = probe.ping(src, dst, count=3, timeout=1.0)
            ok = [r for r in rtts if r is not None]
            if ok:
                _say(f"  ping node {i + 1} -> node {j + 1} ({dst}): {len(ok)}/3 replies, "
                     f"median {statistics.median(ok) * 1e3:.3f} ms")
            else:
                failures += 1
                _say(f"  ping node {i + 1} -> node {j + 1} ({dst}): NO REPLY")
    return failures
