"""--dataplane engine|kernel|auto: which plane forwards for this node, and why.

``auto`` takes the kernel where a VXLAN device can be made and brought up here (its
prepare() creates the real flannel.<VNI>, so the probe is the real thing), and the
engine otherwise, saying why in one line: no VXLAN in the kernel, no permission in a
container, the port held by someone else, a VXLAN device of that VNI already there.
The config's udp backend always means the engine (the kernel speaks VXLAN only).
IPv6 (EnableIPv6, dual stack or IPv6-only) changes nothing here: both planes carry it.
"""

from __future__ import annotations

import errno
import logging
import os

from pyroute2.netlink.exceptions import NetlinkError

from udpflannel.dataplane.base import AUTO, ENGINE, KERNEL, DataPlane, DataplaneError, PlaneOptions
from udpflannel.dataplane.kernel import KernelPlane
from udpflannel.dataplane.userspace import EnginePlane

log = logging.getLogger(__name__)

_WHY = {
    errno.EOPNOTSUPP: "the kernel has no VXLAN (vxlan module missing?)",
    errno.EAFNOSUPPORT: "the kernel has no VXLAN (vxlan module missing?)",
    errno.EPERM: "not permitted to create VXLAN devices (a container without CAP_NET_ADMIN "
                 "in the host's network namespace?)",
    errno.EACCES: "not permitted to create VXLAN devices",
    errno.EADDRINUSE: "the VXLAN port is held by another process",
    errno.EEXIST: "another VXLAN device already uses this VNI and port",
}


def why_not(error: BaseException) -> str:
    code: int | None = getattr(error, "code", None) or getattr(error, "errno", None)
    text = _WHY.get(code) if code is not None else None
    if text is None:
        text = os.strerror(code) if code else str(error)
    return text


async def prepare_plane(mode: str, opts: PlaneOptions) -> DataPlane:
    """The chosen plane, prepared (ports bound, kernel device up): one log line."""
    if mode == ENGINE:
        plane: DataPlane = EnginePlane(opts, "--dataplane engine")
    elif mode == KERNEL:
        if opts.config.backend_type != "vxlan":
            raise DataplaneError("--dataplane kernel needs a vxlan backend; the config's "
                                 f"is {opts.config.backend_type!r} (use engine or auto)")
        plane = KernelPlane(opts, "--dataplane kernel")
        try:
            await plane.prepare()
        except (NetlinkError, OSError) as e:
            raise DataplaneError(f"cannot set up kernel VXLAN: {why_not(e)}") from None
        log.info("data plane: kernel VXLAN (%s)", ", ".join(spec.name for spec in plane.specs.values()))
        return plane
    elif mode == AUTO:
        plane = await _auto(opts)
    else:
        raise DataplaneError(f"unknown data plane {mode!r}")
    if plane.kind == ENGINE:
        await plane.prepare()
    log.info("data plane: %s (%s)", plane.kind, plane.reason)
    return plane


async def _auto(opts: PlaneOptions) -> DataPlane:
    if opts.config.backend_type != "vxlan":
        return EnginePlane(opts, f"auto: the config's {opts.config.backend_type} backend "
                                 "is spoken by the engine only")
    kernel = KernelPlane(opts, "auto: kernel VXLAN works here")
    try:
        await kernel.prepare()
        return kernel
    except (NetlinkError, OSError) as e:
        reason = why_not(e)
    await _remove_half_made(kernel)
    return EnginePlane(opts, f"auto: kernel VXLAN unavailable: {reason}")


async def _remove_half_made(kernel: KernelPlane) -> None:
    """A device the probe created but could not bring up must not hold the port."""
    from pyroute2 import IPRoute

    from udpflannel.host import vxlandev

    def delete() -> None:
        with IPRoute() as ipr:
            for spec in kernel.specs.values():
                index = vxlandev.find(ipr, spec.name)
                if index is not None:
                    link = ipr.link("get", index=index)[0]
                    if link.get("address") == spec.mac:  # ours, not a stranger's
                        ipr.link("del", index=index)
    try:
        import asyncio
        await asyncio.to_thread(delete)
    except (NetlinkError, OSError):
        pass
