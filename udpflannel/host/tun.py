"""The TUN device: created through python-pytun, then used only as a raw fd.

pytun's read()/write() allocate per packet, so the compiled engine does all I/O on
``fileno()``; this module keeps the pytun object alive (its destructor closes the fd).

The device is persistent (TUNSETPERSIST): it outlives the daemon with its address and
routes, so a restart or an upgrade re-attaches to it instead of tearing down every
connection through the node, and while no daemon runs, overlay traffic is dropped by
the TUN rather than leaking out of another interface by the default route. Only
``delete`` (`udpflannel cleanup`) removes it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket

import pytun

log = logging.getLogger(__name__)

IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_USO4, TUN_F_USO6 = 0x01, 0x02, 0x20, 0x40


class TunError(Exception):
    """The TUN device cannot be created; the message says why in one line."""


CAP_NET_ADMIN = 12


def has_net_admin() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return os.geteuid() == 0


def preflight() -> None:
    """Fail early, before a lease is taken, if no TUN device can be made here."""
    if not has_net_admin():
        raise TunError("need root or CAP_NET_ADMIN to create the TUN device and its routes")
    if not os.path.exists("/dev/net/tun"):
        raise TunError("/dev/net/tun does not exist (load the tun module: modprobe tun)")
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        raise TunError("cannot open /dev/net/tun: permission denied")


class Tun:
    """Create the TUN ``name``, or attach to it when it exists (a previous run's
    persistent device: ``existed``). ``vnet_hdr=True`` asks for IFF_VNET_HDR and TSO:
    reads may then be 64 KB TCP super-packets with a virtio header (``self.tso`` says
    whether the kernel agreed to hand them out; the header is there either way)."""

    def __init__(self, name: str, vnet_hdr: bool = False, persist: bool = True) -> None:
        preflight()
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        self.existed = _exists(name)
        try:
            self._dev = pytun.TunTapDevice(name=name, flags=flags)
        except pytun.Error as e:
            text = str(e)
            if "Operation not permitted" in text or "Permission denied" in text:
                raise TunError(f"cannot create TUN {name}: need root or CAP_NET_ADMIN") from None
            if "busy" in text.lower():
                raise TunError(f"cannot create TUN {name}: a device of that name is in use") from None
            raise TunError(f"cannot create TUN {name}: {text}") from None
        self.name = self._dev.name
        self.fd = self._dev.fileno()
        self._dev.persist(persist)
        self.vnet_hdr = vnet_hdr
        self.tso = False
        self.offloads = "none"
        if vnet_hdr:
            self.tso = self._ask_offloads()
        os.set_blocking(self.fd, False)

    def _ask_offloads(self) -> bool:
        """TCP super-packets (TSO4), and UDP ones too (USO, Linux >= 6.2) where the
        kernel accepts it. Checksum offload is part of each request: the kernel
        refuses segmentation without it, and USO only as USO4 and USO6 together
        (IPv6 super-packets are dropped like every IPv6 packet: the overlay is IPv4)."""
        error = None
        for flags, what in ((TUN_F_CSUM | TUN_F_TSO4 | TUN_F_USO4 | TUN_F_USO6, "TSO + USO"),
                            (TUN_F_CSUM | TUN_F_TSO4, "TSO")):
            try:
                fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
                self.offloads = what
                return True
            except OSError as e:
                error = e
        log.warning("TUN offloads refused (%s); reading one packet at a time", error.strerror)
        return False

    def close(self) -> None:
        """Close the fd; the persistent device stays, with its address and routes."""
        if self._dev is not None:
            self._dev.close()
            self._dev = None

    def delete(self) -> None:
        """Make the device non-persistent and close it: it disappears."""
        if self._dev is not None:
            self._dev.persist(False)
            self.close()


def _exists(name: str) -> bool:
    """Is there a device ``name`` in our network namespace? Asked of the kernel through
    a socket of ours, not read from /sys/class/net: sysfs shows the namespace it was
    mounted in, which is not ours under `nsenter --net` (the lab, a debug shell)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _is_tun(name: str) -> bool:
    """Netlink's word on the device's kind (blocking: callers run it on a thread)."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        info = ipr.link("get", index=found[0])[0].get_attr("IFLA_LINKINFO")
        return info is not None and info.get_attr("IFLA_INFO_KIND") == "tun"


def delete(name: str) -> bool:
    """Remove a persistent TUN of ours by name (cleanup); False if there is none."""
    if not _is_tun(name):
        return False
    Tun(name, persist=False).close()
    return True
