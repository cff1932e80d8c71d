"""Files a node keeps locally: subnet.env (flannel's format) and its VTEP MAC."""

from __future__ import annotations

import ipaddress
import os
import secrets
import tempfile

from udpflannel.core import subnetenv
from udpflannel.core.lease import normalize_mac


def write_atomically(path: str, text: str, mode: int = 0o644) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def previous_subnet(path: str) -> ipaddress.IPv4Network | None:
    """The subnet recorded in an existing subnet.env, so a restart keeps it."""
    try:
        with open(path) as f:
            return subnetenv.previous_subnet(f.read())
    except (OSError, UnicodeDecodeError):
        return None


def load_or_create_mac(state_dir: str, name: str) -> str:
    """A random, locally administered unicast MAC, generated once and kept."""
    path = os.path.join(state_dir, f"{name}.vtep-mac")
    try:
        with open(path) as f:
            return normalize_mac(f.read().strip())
    except (OSError, ValueError):
        pass
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] & 0xFC) | 0x02  # locally administered, unicast
    mac = ":".join(f"{b:02x}" for b in raw)
    write_atomically(path, mac + "\n")
    return mac
