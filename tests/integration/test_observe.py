"""Health, readiness, metrics, systemd's notify protocol, --version and `status`, all
against real daemons in namespaces.

HTTP requests are made from inside the node's namespace (its loopback), /metrics is
read with prometheus_client's own text parser, and the notify socket is an AF_UNIX
datagram socket bound in the test's work dir and named by NOTIFY_SOCKET in the
daemon's environment, as systemd does for a Type=notify unit. The etcd test runs etcd
in the Lab's hub namespace so that stopping it is a real registry outage.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from udpflannel.core.status import DROP_REASONS
from udpflannel.observe import admin
from udpflannel.version import __version__

try:
    from .etcd_server import etcd_in_hub
except ImportError:
    from etcd_server import etcd_in_hub

PLANES = {"engine": [], "kernel": ["--dataplane", "kernel"]}
HEALTHZ_PORT = 10256
METRICS_PORT = 10257
CONFIG = '{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}'


# -- helpers ------------------------------------------------------------------------

def http_get(ns, port: int, path: str, timeout: float = 3.0) -> tuple[int, str]:
    """(status, body) of GET path on the node's loopback, asked from inside its namespace."""
    def get() -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()
    return ns.call(get, timeout=timeout + 2)


def wait_http(ns, port: int, path: str, status: int, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            got, body = http_get(ns, port, path)
            if got == status:
                return body
            last = (got, body)
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise AssertionError(f"GET {path} never answered {status} in {timeout}s (last: {last!r})")


class Scrape:
    """One /metrics response, parsed by prometheus_client."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(self, name: str) -> list:
        family = name.removesuffix("_total")
        return [s for s in self.families[family].samples if s.name == name]

    def value(self, name: str, **labels: str) -> float:
        found = [s.value for s in self.samples(name) if all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) == 1, f"{name}{labels}: {found}"
        return found[0]


def scrape(ns, port: int = METRICS_PORT) -> Scrape:
    status, body = http_get(ns, port, "/metrics")
    assert status == 200, body
    return Scrape(body)


class NotifySocket:
    """What systemd listens on for a Type=notify unit: datagrams of KEY=VALUE lines."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)

    def next(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            return None
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    def until(self, key: str, timeout: float, on_message=None) -> list[dict[str, str]]:
        """Messages up to and including the first carrying ``key``; on_message(msg) is
        called the moment each one arrives (to look at the world right then)."""
        seen, deadline = [], time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.next(left)
            if msg is None:
                break
            if on_message is not None:
                on_message(msg)
            seen.append(msg)
            if key in msg:
                return seen
        raise AssertionError(f"no {key} within {timeout}s; got {seen}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(workdir):
    sock = NotifySocket(os.path.join(workdir, "notify.sock"))
    try:
        yield sock
    finally:
        sock.close()


def start_notifying(cluster, i: int, notify: NotifySocket, monkeypatch, extra=()) -> subprocess.Popen:
    with monkeypatch.context() as m:  # the daemon's environment only
        m.setenv("NOTIFY_SOCKET", notify.path)
        return cluster.start(i, list(extra))



def http_flags(metrics_port: int = METRICS_PORT) -> list[str]:
    return ["--healthz-ip", "127.0.0.1", "--healthz-port", str(HEALTHZ_PORT),
            "--metrics-port", str(metrics_port)]


# -- 5 + 6: health, readiness and notify through a config wait and a registry outage ---

def test_health_readiness_notify_through_config_wait_and_registry_outage(
        make_lab, make_cluster, notify, monkeypatch, workdir):
    lab = make_lab(1)
    with etcd_in_hub(lab, os.path.join(workdir, "etcd")) as etcd:
        prefix = f"/t-{uuid.uuid4().hex[:8]}/network"  # no config there yet
        cluster = make_cluster(lab, etcd_endpoints=etcd.endpoint,
                               extra_args=["--etcd-prefix", prefix, *http_flags(HEALTHZ_PORT)])
        ns, subnet_env = lab.nodes[0], os.path.join(cluster.node_dir(0), "subnet.env")
        proc = start_notifying(cluster, 0, notify, monkeypatch)

        # waiting for a config: alive, not ready, says so (log, STATUS=), nothing written
        assert wait_http(ns, HEALTHZ_PORT, "/healthz", 200).strip() == "ok"
        cluster.wait_log(0, f"no network config at {prefix}/config yet; waiting")
        waiting = notify.until("STATUS", 10)
        assert "waiting for the network config" in waiting[-1]["STATUS"]
        assert not any("READY" in m for m in waiting)
        status, body = http_get(ns, HEALTHZ_PORT, "/readyz")
        assert status == 503 and "no subnet lease" in body
        assert scrape(ns, HEALTHZ_PORT).value("udpflannel_ready") == 0
        assert not os.path.exists(subnet_env) and proc.poll() is None

        # the config arrives: READY=1, and only once subnet.env is there
        etcd.etcdctl("put", f"{prefix}/config", CONFIG)
        env_at_ready: list[bool] = []
        notify.until("READY", 20, lambda m: "READY" in m and env_at_ready.append(os.path.exists(subnet_env)))
        assert env_at_ready == [True]
        assert http_get(ns, HEALTHZ_PORT, "/readyz") == (200, "ready\n")
        assert scrape(ns, HEALTHZ_PORT).value("udpflannel_registry_up") == 1

        # etcd goes away: still ready (it forwards), the outage shows in /metrics
        etcd.stop()
        deadline = time.monotonic() + 30
        while scrape(ns, HEALTHZ_PORT).value("udpflannel_registry_up") != 0:
            assert http_get(ns, HEALTHZ_PORT, "/readyz")[0] == 200
            assert time.monotonic() < deadline, f"registry_up still 1:\n{cluster.log_tail(0)}"
            time.sleep(0.2)
        status, body = http_get(ns, HEALTHZ_PORT, "/readyz")
        assert status == 200 and "unreachable" in body
        assert http_get(ns, HEALTHZ_PORT, "/healthz")[0] == 200
        assert scrape(ns, HEALTHZ_PORT).value("udpflannel_ready") == 1

        # SIGTERM: STOPPING=1, then a clean exit
        proc.send_signal(signal.SIGTERM)
        notify.until("STOPPING", 10)
        assert proc.wait(15) == 0  # one SIGTERM: a second one could land after the loop's handler is gone


@pytest.mark.parametrize("plane", ["engine", "kernel"])
def test_notify_ready_after_subnet_env_and_stopping_on_sigterm(make_lab, make_cluster, notify,
                                                               monkeypatch, plane):
    lab = make_lab(1)
    cluster = make_cluster(lab)
    subnet_env = os.path.join(cluster.node_dir(0), "subnet.env")
    env_at_ready: list[bool] = []
    proc = start_notifying(cluster, 0, notify, monkeypatch, PLANES[plane])
    messages = notify.until("READY", 20, lambda m: "READY" in m and env_at_ready.append(os.path.exists(subnet_env)))
    assert env_at_ready == [True], messages
    assert messages[-1]["READY"] == "1"
    st = cluster.wait_status(0, lambda s: s.ready)
    assert st.lease.subnet in messages[-1]["STATUS"] and plane in messages[-1]["STATUS"]
    assert notify.next(0.3) is None  # one READY=1, nothing else while running
    proc.send_signal(signal.SIGTERM)
    stopping = notify.until("STOPPING", 10)
    assert stopping[-1]["STOPPING"] == "1" and not any("READY" in m for m in stopping)
    assert proc.wait(15) == 0


# -- 5: /metrics counts exactly the traffic sent ---------------------------------------

DATAGRAMS = 40
PAYLOAD = 1000
INNER = PAYLOAD + 8 + 20  # the inner IPv4 packet


def send_datagrams(src, dst, address: str) -> int:
    """DATAGRAMS datagrams of PAYLOAD bytes from src to address (bound in dst); returns
    how many arrived."""
    rx = dst.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    tx = src.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((address, 5555))
        rx.settimeout(3.0)
        for k in range(DATAGRAMS):
            tx.sendto(bytes([k]) * PAYLOAD, (address, 5555))
            time.sleep(0.002)
        got = 0
        try:
            while got < DATAGRAMS:
                assert len(rx.recv(65535)) == PAYLOAD
                got += 1
        except socket.timeout:
            pass
        return got


def counters(s: Scrape) -> dict[str, float]:
    return {f"{what}_{d}": s.value(f"udpflannel_{what}_total", direction=d)
            for what in ("packets", "bytes") for d in ("tx", "rx")}


@pytest.mark.parametrize("plane", ["engine", "kernel"])
def test_metrics_count_exactly_the_traffic_sent(make_lab, make_cluster, plane):
    lab = make_lab(2)
    cluster = make_cluster(lab, extra_args=http_flags())
    cluster.start(0, PLANES[plane])
    cluster.start(1)
    cluster.wait_converged()
    a, b = lab.nodes
    wait_http(a, HEALTHZ_PORT, "/readyz", 200)
    wait_http(b, HEALTHZ_PORT, "/readyz", 200)
    if plane == "kernel":
        time.sleep(2.1)  # its device counters are read every 2 s: let "before" be current
    before = counters(scrape(a)), counters(scrape(b))

    assert send_datagrams(a, b, cluster.overlay_addr(1)) == DATAGRAMS
    want_a = {"packets_tx": DATAGRAMS, "bytes_tx": DATAGRAMS * INNER, "packets_rx": 0, "bytes_rx": 0}
    want_b = {"packets_tx": 0, "bytes_tx": 0, "packets_rx": DATAGRAMS, "bytes_rx": DATAGRAMS * INNER}
    deadline = time.monotonic() + 6
    while True:
        sa, sb = scrape(a), scrape(b)
        delta_a = {k: v - before[0][k] for k, v in counters(sa).items()}
        delta_b = {k: v - before[1][k] for k, v in counters(sb).items()}
        if delta_a["packets_tx"] >= DATAGRAMS or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (delta_a, delta_b) == (want_a, want_b)

    for s, st, kind in ((sa, cluster.status(0), plane), (sb, cluster.status(1), "engine")):
        drops = {x.labels["reason"]: x.value for x in s.samples("udpflannel_drops_total")}
        assert drops == dict.fromkeys(DROP_REASONS, 0)  # every reason, and clean traffic drops nothing
        info = s.samples("udpflannel_info")
        assert len(info) == 1 and info[0].value == 1
        assert info[0].labels == {"dataplane": kind, "version": __version__,
                                  "offloads": ",".join(st.dataplane.offloads)}
        assert s.value("udpflannel_peers") == 1
        assert s.value("udpflannel_registry_up") == 1
        assert s.value("udpflannel_ready") == 1
        assert s.value("udpflannel_lease_expiry_timestamp_seconds") == pytest.approx(st.lease.expiration)
    assert http_get(a, HEALTHZ_PORT, "/metrics")[0] == 404  # /metrics has its own port here
    assert http_get(a, METRICS_PORT, "/healthz")[0] == 404


# -- 7: --version, and `status` finding the daemon by --tun / FLANNELD_TUN --------------

def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}
    return subprocess.run([sys.executable, "-m", "udpflannel", *args], capture_output=True, text=True,
                          timeout=30, env={**clean, **(env or {})}, stdin=subprocess.DEVNULL)


def test_version_and_status_socket_follow_tun(make_lab, make_cluster):
    done = cli("--version")
    assert (done.returncode, done.stdout) == (0, f"udpflannel {__version__}\n")
    assert __version__ != "0+unknown"

    lab = make_lab(1)
    cluster = make_cluster(lab)
    tun = f"uft{secrets.token_hex(3)}"
    sock = f"/run/udpflannel/{tun}.sock"
    argv = cluster.argv(0)
    del argv[argv.index("--admin-socket"):argv.index("--admin-socket") + 2]
    argv[argv.index("--tun") + 1] = tun
    log = open(os.path.join(cluster.node_dir(0), "daemon.log"), "ab")
    cluster.procs[0] = lab.nodes[0].popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)  # stopped by the fixture
    log.close()
    deadline = time.monotonic() + 15
    while True:
        assert cluster.procs[0].poll() is None, cluster.log_tail(0)
        try:
            if admin.query(sock, timeout=1.0)["ready"]:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, cluster.log_tail(0)
        time.sleep(0.1)
    subnet = admin.query(sock)["lease"]["subnet"]

    table = cli("status", "--tun", tun)
    assert table.returncode == 0, table.stderr
    assert subnet in table.stdout and tun in table.stdout
    as_json = cli("status", "--json", env={"FLANNELD_TUN": tun})
    assert as_json.returncode == 0, as_json.stderr
    reply = json.loads(as_json.stdout)
    assert reply["lease"]["subnet"] == subnet and reply["dataplane"]["device"] == tun
    assert ipaddress.IPv4Network(subnet).subnet_of(ipaddress.IPv4Network("10.244.0.0/16"))

    other = f"uft{secrets.token_hex(3)}"
    missing = cli("status", env={"FLANNELD_TUN": other})
    assert missing.returncode == 1 and f"/run/udpflannel/{other}.sock" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    wins = cli("status", "--tun", tun, env={"FLANNELD_TUN": other})  # the flag wins
    assert wins.returncode == 0 and subnet in wins.stdout
    assert cluster.stop(0, grace=10) == 0
    assert not os.path.exists(sock)
