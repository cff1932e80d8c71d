"""The lab's flannel udp proxy (csrc/lab/udpproxy.c), run for real without privileges.

A Unix datagram socket pair stands in for the TUN (one packet per read/write, like
a TUN fd), the UDP sides are sockets on 127.0.0.1. What the proxy emits is parsed
with scapy, which recomputes every checksum independently.

The proxy applies a command when its loop next reads the control socket, so a test
never relies on timing: after a route change it retries until the change shows, and
"nothing came out" is proved by a barrier packet sent afterwards arriving first (the
proxy is one thread and keeps order).
"""

from __future__ import annotations

import ipaddress
import random
import socket
import subprocess
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw

from udpflannel.core.lease import EventType, LeaseEvent, encode_value
from udpflannel.lab import udpproxy
from udpflannel.lab.flanneld_udp import route_commands, udp_lease

TUN_ADDR = "10.5.1.0"
POD = "10.5.1.5"
REMOTE = ipaddress.IPv4Network("10.5.2.0/24")
MTU = 1472
TIMEOUT = 2.0


class Harness:
    def __init__(self) -> None:
        self.tun, tun_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the proxy's
        self.udp.bind(("127.0.0.1", 0))
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a remote node
        self.peer.bind(("127.0.0.1", 0))
        ours, theirs = udpproxy.control_pair()
        self.control = udpproxy.ProxyControl(ours)
        fds = (tun_theirs.fileno(), self.udp.fileno(), theirs.fileno())
        self.proc = subprocess.Popen([udpproxy.build(), *map(str, fds), TUN_ADDR, str(MTU)],
                                     pass_fds=fds, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        tun_theirs.close()
        theirs.close()
        for s in (self.tun, self.peer):
            s.settimeout(TIMEOUT)

    @property
    def proxy_addr(self) -> tuple[str, int]:
        return self.udp.getsockname()

    @property
    def peer_port(self) -> int:
        return self.peer.getsockname()[1]

    def to_tun(self, pkt) -> None:
        self.tun.send(bytes(pkt))

    def from_peer(self) -> tuple[bytes, tuple[str, int]]:
        return self.peer.recvfrom(65536)

    def route(self, subnet=REMOTE, port: int | None = None) -> None:
        """Set a route and wait until a probe packet takes it."""
        self.control.set_route(subnet, ipaddress.IPv4Address("127.0.0.1"), port or self.peer_port)
        probe = IP(src=POD, dst=str(subnet.network_address + 9), ttl=64) / UDP(dport=1) / b"probe"
        deadline = time.monotonic() + TIMEOUT
        self.peer.settimeout(0.05)
        try:
            while time.monotonic() < deadline:
                self.to_tun(probe)
                try:
                    data, _ = self.from_peer()
                    if IP(data).haslayer(Raw) and IP(data)[Raw].load == b"probe":
                        self.drain()
                        return
                except socket.timeout:
                    self.drain_tun()
        finally:
            self.peer.settimeout(TIMEOUT)
        raise AssertionError("route never took effect")

    def drain(self) -> None:
        self.peer.settimeout(0.05)
        try:
            while True:
                self.from_peer()
        except socket.timeout:
            pass
        finally:
            self.peer.settimeout(TIMEOUT)
        self.drain_tun()

    def drain_tun(self) -> None:
        self.tun.setblocking(False)
        try:
            while True:
                self.tun.recv(65536)
        except BlockingIOError:
            pass
        finally:
            self.tun.settimeout(TIMEOUT)

    def close(self) -> str:
        self.control.stop()
        try:
            _, err = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        for s in (self.tun, self.udp, self.peer):
            s.close()
        self.control.close()
        return err


@pytest.fixture
def proxy():
    h = Harness()
    try:
        yield h
    finally:
        if h.proc.poll() is None:
            h.close()


def raw_without_checksum(pkt: IP) -> bytes:
    clone = IP(bytes(pkt))
    del clone.chksum
    return bytes(clone)


def valid_ip_checksum(data: bytes) -> bool:
    pkt = IP(data)
    return pkt.chksum == IP(raw_without_checksum(pkt)).chksum


def test_tun_to_udp_sends_the_bare_packet_with_ttl_decremented(proxy):
    proxy.route()
    sent = IP(src=POD, dst="10.5.2.7", ttl=17, id=4321) / UDP(sport=1000, dport=2000) / b"hello"
    proxy.to_tun(sent)
    data, source = proxy.from_peer()
    assert source == proxy.proxy_addr
    got = IP(data)
    assert got.ttl == 16 and valid_ip_checksum(data)
    assert (got.src, got.dst, got.id, got[UDP].dport, got[Raw].load) == (POD, "10.5.2.7", 4321, 2000, b"hello")
    assert data[:8] == bytes(sent)[:8] and data[9:10] == bytes(sent)[9:10] and data[12:] == bytes(sent)[12:]


def test_udp_to_tun_writes_the_packet_with_ttl_decremented(proxy):
    sent = IP(src="10.5.2.7", dst=POD, ttl=5) / TCP(sport=80, dport=3333, flags="SA") / (b"x" * 100)
    proxy.peer.sendto(bytes(sent), proxy.proxy_addr)
    data = proxy.tun.recv(65536)
    assert IP(data).ttl == 4 and valid_ip_checksum(data)
    assert data[12:] == bytes(sent)[12:] and len(data) == len(sent)


def test_ttl_checksum_patch_matches_scapy_for_random_headers(proxy):
    proxy.route()
    rng = random.Random(9)
    for _ in range(300):
        dst = str(REMOTE.network_address + rng.randrange(1, 255))
        pkt = IP(src=f"10.5.1.{rng.randrange(1, 255)}", dst=dst, ttl=rng.randrange(2, 256),
                 id=rng.randrange(65536), tos=rng.randrange(256), flags=rng.choice([0, 2])) / \
            UDP(sport=rng.randrange(65536), dport=rng.randrange(65536)) / bytes(rng.randrange(40))
        proxy.to_tun(pkt)
        data, _ = proxy.from_peer()
        assert IP(data).ttl == pkt.ttl - 1
        assert valid_ip_checksum(data), IP(data).show(dump=True)


def test_ttl_one_is_dropped_both_ways(proxy):
    proxy.route()
    proxy.to_tun(IP(src=POD, dst="10.5.2.7", ttl=1) / UDP() / b"dies")
    proxy.to_tun(IP(src=POD, dst="10.5.2.7", ttl=2) / UDP() / b"barrier")
    assert IP(proxy.from_peer()[0])[Raw].load == b"barrier"
    proxy.peer.sendto(bytes(IP(src="10.5.2.7", dst=POD, ttl=1) / UDP() / b"dies"), proxy.proxy_addr)
    proxy.peer.sendto(bytes(IP(src="10.5.2.7", dst=POD, ttl=2) / UDP() / b"barrier"), proxy.proxy_addr)
    assert IP(proxy.tun.recv(65536))[Raw].load == b"barrier"


def test_no_route_answers_icmp_net_unreachable_from_the_tun_address(proxy):
    syn = IP(src=POD, dst="10.5.9.9", ttl=64, id=77) / TCP(sport=40000, dport=80, flags="S", seq=123)
    proxy.to_tun(syn)
    data = proxy.tun.recv(65536)
    reply = IP(data)
    assert (reply.src, reply.dst, reply.ttl, reply.proto) == (TUN_ADDR, POD, 8, 1)
    assert valid_ip_checksum(data)
    icmp = reply[ICMP]
    assert (icmp.type, icmp.code) == (3, 0)
    raw_icmp = data[20:]
    clone = ICMP(raw_icmp)
    del clone.chksum
    assert ICMP(bytes(clone)).chksum == icmp.chksum
    assert raw_icmp[8:] == bytes(syn)[:28]  # the offender's header and 8 bytes of TCP


def test_no_icmp_about_icmp_or_later_fragments(proxy):
    for quiet in (IP(src=POD, dst="10.5.9.9") / ICMP(type=8) / b"ping",
                  IP(src=POD, dst="10.5.9.9") / ICMP(type=3, code=1) / bytes(28),
                  IP(src=POD, dst="10.5.9.9", frag=10, proto=17) / b"later fragment"):
        proxy.to_tun(quiet)
    first_fragment = IP(src=POD, dst="10.5.9.8", flags="MF", frag=0) / UDP(dport=53) / b"first"
    proxy.to_tun(first_fragment)
    reply = IP(proxy.tun.recv(65536))
    assert reply[ICMP].type == 3 and reply[ICMP].payload.dst == "10.5.9.8"  # the barrier's, only


def test_route_delete_and_replace(proxy):
    proxy.route()
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.1", 0))
    other.settimeout(TIMEOUT)
    with other:
        proxy.control.set_route(REMOTE, ipaddress.IPv4Address("127.0.0.1"), other.getsockname()[1])
        pkt = IP(src=POD, dst="10.5.2.7") / UDP() / b"moved"
        deadline = time.monotonic() + TIMEOUT
        other.settimeout(0.05)
        while True:  # until the replaced route shows
            proxy.to_tun(pkt)
            try:
                if IP(other.recv(65536))[Raw].load == b"moved":
                    break
            except socket.timeout:
                assert time.monotonic() < deadline, "replaced route never took effect"
    proxy.control.del_route(REMOTE)
    deadline = time.monotonic() + TIMEOUT
    proxy.tun.settimeout(0.05)
    while True:  # until the deleted route gives net unreachable
        # A packet the proxy reads before the command is still forwarded (to the closed
        # port): no answer on the TUN for it, so each wait is short and retried.
        proxy.to_tun(IP(src=POD, dst="10.5.2.7") / UDP() / b"gone")
        try:
            reply = IP(proxy.tun.recv(65536))
        except socket.timeout:
            reply = None
        if reply is not None and reply.haslayer(ICMP):
            assert reply[ICMP].type == 3 and reply[ICMP].code == 0
            break
        assert time.monotonic() < deadline, "deleted route never took effect"


def test_stop_command_and_closed_control_end_the_proxy(proxy):
    proxy.route()
    err = proxy.close()
    assert proxy.proc.returncode == 0
    assert "udpproxy: stopped: tx" in err and "routes 1" in err
    again = Harness()
    again.control.close()  # the agent vanished
    assert again.proc.wait(5) == 0


def test_bad_arguments_are_one_line():
    done = subprocess.run([udpproxy.build(), "x", "1", "2", TUN_ADDR, "1472"], capture_output=True,
                          text=True, timeout=5)
    assert done.returncode == 2 and done.stderr.strip() == "udpproxy: x is not a file descriptor number"


def test_commands_and_lease_are_flannels():
    net = ipaddress.IPv4Network("10.5.2.0/24")
    hop = ipaddress.IPv4Address("192.168.250.12")
    assert udpproxy.encode(udpproxy.CMD_SET_ROUTE, net, hop, 8285) == \
        bytes([1, 24]) + (8285).to_bytes(2, "big") + bytes([10, 5, 2, 0, 192, 168, 250, 12])
    assert udpproxy.encode(udpproxy.CMD_STOP) == bytes([3]) + bytes(11)
    # flannel's udp backend: LeaseAttrs{PublicIP} only
    assert encode_value(udp_lease(hop, net)) == b'{"PublicIP":"192.168.250.12","PublicIPv6":null}'
    vxlan = udp_lease(hop, net).__class__(net, hop, "vxlan", 1, "02:00:00:00:00:01")
    events = [LeaseEvent(EventType.ADDED, vxlan), LeaseEvent(EventType.REMOVED, vxlan)]
    # every lease is routed, whatever its BackendType, to our own port
    assert route_commands(events, 8285) == [("set_route", (net, hop, 8285)), ("del_route", (net,))]


def test_a_peer_beside_a_cluster_shares_its_registry(tmp_path):
    from udpflannel.lab.cluster import Cluster
    from udpflannel.lab.flanneld_udp import FlanneldUdpPeer
    from udpflannel.lab.netns import Namespace

    ns = Namespace("not-created")  # nothing here touches it
    on_file = FlanneldUdpPeer.beside(Cluster(None, str(tmp_path)), ns)
    argv = on_file.argv()
    assert argv[argv.index("--registry-file") + 1] == str(tmp_path / "registry.db")
    assert on_file.workdir == str(tmp_path / "fu")
    on_etcd = FlanneldUdpPeer.beside(
        Cluster(None, str(tmp_path), etcd_endpoints="http://192.168.250.2:2379",
                extra_args=["--etcd-prefix", "/t-1/network"]), ns, name="fu2", port=8300)
    argv = on_etcd.argv()
    assert "--registry-file" not in argv
    assert argv[argv.index("--etcd-endpoints") + 1] == "http://192.168.250.2:2379"
    assert argv[argv.index("--etcd-prefix") + 1] == "/t-1/network"
    assert argv[argv.index("--port") + 1] == "8300"
