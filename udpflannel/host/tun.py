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

from udpflannel.core.errors import UdpflannelError

log = logging.getLogger(__name__)

IFF_TUN = 0x0001
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_USO4, TUN_F_USO6 = 0x01, 0x02, 0x04, 0x20, 0x40


class TunError(UdpflannelError):
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
    whether the kernel agreed to hand them out; the header is there either way).
    ``queues > 1`` makes it IFF_MULTI_QUEUE with one fd per queue (``fds``); a
    persistent device left with the other queue setting is replaced (the kernel
    refuses to attach across it). Fds are non-blocking unless ``blocking``."""

    def __init__(self, name: str, vnet_hdr: bool = False, persist: bool = True,
                 queues: int = 1, blocking: bool = False) -> None:
        preflight()
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        if queues > 1:
            flags |= IFF_MULTI_QUEUE
        self.existed = exists(name)
        self._raw: list[int] = []  # fds handed over by another daemon (adopt), closed by us
        self._devs: list[pytun.TunTapDevice] = []
        try:
            self._open_queues(name, flags, queues)
        except TunError:
            # The kernel refuses (EINVAL) to attach across a persistent device's other
            # queue setting; only then ask netlink (a cost a restart need not pay).
            if not (self.existed and _tun_info(name).get("IFLA_TUN_MULTI_QUEUE", 0) != (queues > 1)):
                raise
            log.info("replacing %s: it was made with %s queue", name, "a multi" if queues == 1 else "a single")
            _remove_device(name)
            self.existed = False
            self._open_queues(name, flags, queues)
        self.name = self._devs[0].name
        self.fds = [d.fileno() for d in self._devs]
        self.fd = self.fds[0]
        self._devs[0].persist(persist)
        self.vnet_hdr = vnet_hdr
        self.tso = False
        self.offloads = "none"
        if vnet_hdr:
            self.tso = self._ask_offloads()
        for fd in self.fds:
            os.set_blocking(fd, blocking)

    @classmethod
    def adopt(cls, name: str, fds: list[int], *, vnet_hdr: bool, tso: bool, offloads: str) -> "Tun":
        """The TUN ``name`` through queue fds another daemon opened and handed over
        (dataplane/handoff.py): the same device, queues and offload settings."""
        tun = cls.__new__(cls)
        tun.existed = True
        tun._devs = []
        tun._raw = list(fds)
        tun.name, tun.fds, tun.fd = name, list(fds), fds[0]
        tun.vnet_hdr, tun.tso, tun.offloads = vnet_hdr, tso, offloads
        return tun

    def _open_queues(self, name: str, flags: int, queues: int) -> None:
        try:
            for _ in range(queues):
                self._devs.append(self._open(name, flags))
        except TunError:
            self.close()
            raise

    @staticmethod
    def _open(name: str, flags: int):
        try:
            return pytun.TunTapDevice(name=name, flags=flags)
        except pytun.Error as e:
            text = str(e)
            if "Operation not permitted" in text or "Permission denied" in text:
                raise TunError(f"cannot create TUN {name}: need root or CAP_NET_ADMIN") from None
            if "busy" in text.lower():
                raise TunError(f"cannot create TUN {name}: a device of that name is in use") from None
            raise TunError(f"cannot create TUN {name}: {text}") from None

    def _ask_offloads(self) -> bool:
        """TCP super-packets of both families (TSO4, TSO6), and UDP ones too (USO,
        Linux >= 6.2) where the kernel accepts it. Checksum offload is part of each
        request: the kernel refuses segmentation without it, and USO only as USO4 and
        USO6 together."""
        error = None
        tso = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        for flags, what in ((tso | TUN_F_USO4 | TUN_F_USO6, "TSO + USO"), (tso, "TSO")):
            try:
                for fd in self.fds:
                    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
                self.offloads = what
                return True
            except OSError as e:
                error = e
        assert error is not None  # every request failed
        log.warning("TUN offloads refused (%s); reading one packet at a time", error.strerror)
        return False

    def close(self) -> None:
        """Close the fds; the persistent device stays, with its address and routes."""
        for dev in self._devs:
            dev.close()
        self._devs = []
        for fd in self._raw:
            os.close(fd)
        self._raw = []

    def delete(self) -> None:
        """Make the device non-persistent and close it: it disappears."""
        if self._devs:
            self._devs[0].persist(False)
            self.close()


def exists(name: str) -> bool:
    """Whether a device ``name`` exists in our network namespace. Not by /sys/class/net:
    sysfs shows the namespace it was mounted in, another one when only the network
    namespace was entered (`nsenter --net`, a container sharing the host's /sys)."""
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


def _tun_info(name: str) -> dict:
    """The TUN's own attributes (IFLA_TUN_*) over netlink; {} if ``name`` is no TUN."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return {}
        info = ipr.link("get", index=found[0])[0].get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "tun":
            return {}
        data = info.get_attr("IFLA_INFO_DATA")
        return dict(data["attrs"]) if data else {"IFLA_TUN_TYPE": 1}


def _is_tun(name: str) -> bool:
    return bool(_tun_info(name))


def _remove_device(name: str) -> None:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            ipr.link("del", index=found[0])


def delete(name: str) -> bool:
    """Remove a persistent TUN of ours by name (cleanup); False if there is none.
    Blocking netlink: call it from a worker thread in the daemon."""
    if not _is_tun(name):
        return False
    _remove_device(name)
    return True
