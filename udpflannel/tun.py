"""The TUN device: created through python-pytun, then used only as a raw fd.

pytun's read()/write() allocate per packet, so the compiled engine does all I/O on
``fileno()``; this module keeps the pytun object alive (its destructor closes the fd,
and closing the last fd of a non-persistent TUN removes the device).
"""

from __future__ import annotations

import os

import pytun

IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


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
    def __init__(self, name: str) -> None:
        preflight()
        try:
            self._dev = pytun.TunTapDevice(name=name, flags=IFF_TUN | IFF_NO_PI)
        except pytun.Error as e:
            text = str(e)
            if "Operation not permitted" in text or "Permission denied" in text:
                raise TunError(f"cannot create TUN {name}: need root or CAP_NET_ADMIN") from None
            if "busy" in text.lower():
                raise TunError(f"cannot create TUN {name}: a device of that name is in use") from None
            raise TunError(f"cannot create TUN {name}: {text}") from None
        self.name = self._dev.name
        self.fd = self._dev.fileno()
        os.set_blocking(self.fd, False)

    def close(self) -> None:
        """Close the fd; the (non-persistent) device disappears with it."""
        if self._dev is not None:
            self._dev.close()
            self._dev = None
