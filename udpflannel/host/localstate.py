"""Files a node keeps locally: subnet.env (flannel's format), its VTEP MACs (flannel.<VNI>'s,
and flannel-v6.<VNI>'s with dual stack) and the subnets it leased."""

from __future__ import annotations

import ipaddress
import os
import secrets
import tempfile

from udpflannel.core import subnetenv
from udpflannel.core.lease import normalize_mac


def ensure_dir(path: str, mode: int) -> None:
    """Create a missing directory (and parents) with exactly ``mode``, whatever the
    umask: under umask 000 a plain makedirs gives 0777, and anyone could then swap
    subnet.env or the VTEP MAC. An existing directory is the operator's and left alone."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    if parent != path:
        ensure_dir(parent, 0o755)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    os.chmod(path, mode)


def write_atomically(path: str, data: str | bytes, mode: int = 0o644, dir_mode: int = 0o755) -> None:
    """``data`` at ``path`` with exactly ``mode``, or the old file untouched: a reader
    (flannel's CNI reading subnet.env, a runtime exec'ing the CNI plugin) sees the old
    file or the new one, never half of one. Written to a temporary file beside it,
    synced, renamed over it, and the directory synced so the rename survives a crash.
    A missing directory is created with ``dir_mode``."""
    directory = os.path.dirname(os.path.abspath(path))
    ensure_dir(directory, dir_mode)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fchmod(f.fileno(), mode)  # not left to the umask
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def holds(path: str, data: str | bytes, mode: int = 0o644) -> bool:
    """Whether ``path`` already holds exactly ``data`` with ``mode`` (so a write would
    change nothing: a restart onto a full disk need not write subnet.env again)."""
    want = data.encode() if isinstance(data, str) else data
    try:
        with open(path, "rb") as f:
            return f.read() == want and os.fstat(f.fileno()).st_mode & 0o7777 == mode
    except OSError:
        return False


def write_if_changed(path: str, data: str | bytes, mode: int = 0o644, dir_mode: int = 0o755) -> bool:
    """write_atomically unless the file already holds it; True when it wrote."""
    if holds(path, data, mode):
        return False
    write_atomically(path, data, mode, dir_mode)
    return True


def previous_subnet(path: str) -> ipaddress.IPv4Network | None:
    """The subnet recorded in an existing subnet.env, so a restart keeps it."""
    try:
        with open(path) as f:
            return subnetenv.previous_subnet(f.read())
    except (OSError, UnicodeDecodeError):
        return None


def previous_ipv6_subnet(path: str) -> ipaddress.IPv6Network | None:
    """The IPv6 subnet recorded in an existing subnet.env (FLANNEL_IPV6_SUBNET)."""
    try:
        with open(path) as f:
            return subnetenv.previous_ipv6_subnet(f.read())
    except (OSError, UnicodeDecodeError):
        return None


def recorded_subnet(state_dir: str, name: str, version: int = 4):
    """The subnet (``version`` 6: the IPv6 subnet) this node last leased, kept in the
    state dir: it survives a reboot that empties /run (and subnet.env with it)."""
    try:
        with open(subnet_path(state_dir, name, version)) as f:
            return ipaddress.ip_network(f.read().strip()) if version == 6 else ipaddress.IPv4Network(f.read().strip())
    except (OSError, ValueError):
        return None


def record_subnet(state_dir: str, name: str, subnet) -> None:
    if subnet is not None and recorded_subnet(state_dir, name, subnet.version) != subnet:
        write_atomically(subnet_path(state_dir, name, subnet.version), f"{subnet}\n", dir_mode=0o700)


def record_lease(state_dir: str, name: str, lease) -> None:
    """Both subnets of ``lease`` (core.lease.Lease) that it holds."""
    for subnet in lease.subnets:
        record_subnet(state_dir, name, subnet)


def mac_path(state_dir: str, name: str, version: int = 4) -> str:
    return os.path.join(state_dir, f"{name}.vtep-mac" if version == 4 else f"{name}.vtep-mac6")


def subnet_path(state_dir: str, name: str, version: int = 4) -> str:
    return os.path.join(state_dir, f"{name}.subnet" if version == 4 else f"{name}.subnet6")


def load_mac(state_dir: str, name: str, version: int = 4) -> str | None:
    """The VTEP MAC kept for device ``name`` (``version`` 6: for flannel-v6), or None
    (none yet, or unreadable)."""
    try:
        with open(mac_path(state_dir, name, version)) as f:
            return normalize_mac(f.read().strip())
    except (OSError, ValueError):
        return None


def new_mac() -> str:
    """A random, locally administered unicast MAC."""
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] & 0xFC) | 0x02  # locally administered, unicast
    return ":".join(f"{b:02x}" for b in raw)


def write_mac(state_dir: str, name: str, mac: str, version: int = 4) -> None:
    write_atomically(mac_path(state_dir, name, version), mac + "\n", dir_mode=0o700)


def load_or_create_mac(state_dir: str, name: str) -> str:
    """The kept MAC, or a new one, kept (raises OSError when it cannot be kept)."""
    mac = load_mac(state_dir, name)
    if mac is None:
        mac = new_mac()
        write_mac(state_dir, name, mac)
    return mac
