"""A TUN whose kernel refuses TSO (TUNSETOFFLOAD): the device keeps its virtio
header, the engine reads plain packets behind it and forwards them."""

from __future__ import annotations

import errno
import ipaddress
import select
import socket

from scapy.layers.inet import IP, UDP
from scapy.layers.vxlan import VXLAN

from udpflannel._engine import Engine
from udpflannel.host import netconf
from udpflannel.host import tun as tunmod


def test_tso_refused_falls_back_to_plain_reads(make_lab, monkeypatch):
    ns = make_lab(1).nodes[0]
    real_ioctl = tunmod.fcntl.ioctl

    def refusing_ioctl(fd, request, *args):
        if request == tunmod.TUNSETOFFLOAD:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_ioctl(fd, request, *args)
    monkeypatch.setattr(tunmod.fcntl, "ioctl", refusing_ioctl)

    dev = ns.call(tunmod.Tun, "uftun0", True)
    try:
        assert (dev.vnet_hdr, dev.tso) == (True, False)
        ns.call(netconf.configure_tun, "uftun0", ipaddress.IPv4Network("10.244.1.0/24"),
                ipaddress.IPv4Network("10.244.0.0/16"), 1450, dev.tso)
        peer = ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        out = ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        app = ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        with peer, out, app:
            peer.bind(("127.0.0.1", 0))
            peer.settimeout(2)
            out.bind(("127.0.0.1", 0))
            out.setblocking(False)
            engine = Engine(vni=1, vtep_mac=b"\x02\0\0\0\0\x01", network="10.244.0.0/16",
                            subnet_len=24)
            engine.set_route("10.244.2.0/24", "127.0.0.1", peer.getsockname()[1], b"\x02\0\0\0\0\x02")
            engine.attach(dev.fd, out.fileno(), vnet_hdr=True, gso=False, gro=False)
            app.sendto(b"through a TUN without TSO", ("10.244.2.9", 9999))
            for _ in range(20):  # the kernel may first send its own packets (IPv6 MLD)
                if engine.counters()["tx_packets"]:
                    break
                select.select([dev.fd], [], [], 0.5)
                engine.drain_tun(16)
            frame = VXLAN(peer.recv(65535))
            inner = frame[IP]
            assert inner.dst == "10.244.2.9" and inner[UDP].dport == 9999
            assert bytes(inner[UDP].payload) == b"through a TUN without TSO"
            resent = IP(bytes(inner))
            del resent.chksum, resent[UDP].chksum
            assert bytes(IP(bytes(resent))) == bytes(inner)  # checksums complete
            assert engine.counters()["drop_bad_offload"] == 0
    finally:
        dev.close()
