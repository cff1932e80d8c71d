"""`udpflannel install-cni`: put the CNI plugin, the standard plugins and the conflist on a host.

Theory of operation. The container runtime execs CNI plugins on the host, outside any
container and outside udpflannel's virtualenv. So the plugin is installed as one
self-contained file: a zipapp (PEP 441) holding only the modules udpflannel-cni imports
(PLUGIN_MODULES, all standard-library-only) behind `#!/usr/bin/env python3`. The host
needs a python3 and nothing else.

The zip is built deterministically (sorted entries, fixed timestamps and modes), so one
udpflannel version always gives the same bytes. Every target is compared with what would
be written first: an identical file is left alone (idempotent: a re-run, e.g. an init
container after a pod restart, changes nothing, not even the inode). A file that must
change is written next to its target as a dot-temp, fsynced, given its mode, and renamed
over the target: the runtime, which may exec the plugin or read the conflist at any
moment, sees the old file or the new one, never half of one.

The standard plugins the default delegate needs (bridge, host-local; portmap and loopback
are for the conflist and the runtime) are copied from --plugins-from when they are there
and missing at the target. A target that differs (the host's own, maybe newer, build) is
kept unless --replace-plugins: replacing another CNI user's plugins is the operator's call.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from dataclasses import dataclass
from importlib import resources

from udpflannel.core.errors import UdpflannelError
from udpflannel.host import localstate

log = logging.getLogger("udpflannel")

PLUGIN_NAME = "udpflannel-cni"
CONFLIST_NAME = "10-udpflannel.conflist"
STANDARD_PLUGINS = ("bridge", "host-local", "portmap", "loopback")
DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_PLUGINS_FROM = "/usr/lib/cni"  # Debian's containernetworking-plugins

# Everything udpflannel-cni imports (its own modules use the standard library only).
PLUGIN_MODULES = (
    "udpflannel/__init__.py",
    "udpflannel/cni/__init__.py",
    "udpflannel/cni/delegate.py",
    "udpflannel/cni/plugin.py",
    "udpflannel/core/__init__.py",
    "udpflannel/core/errors.py",
    "udpflannel/core/subnetenv.py",
)
SHEBANG = b"#!/usr/bin/env python3\n"
MAIN = b"import sys\n\nfrom udpflannel.cni.plugin import main\n\nsys.exit(main())\n"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold: no build time inside


class InstallError(UdpflannelError):
    """A target cannot be written; the message is one line."""


@dataclass(frozen=True)
class Outcome:
    path: str
    action: str  # "written", "unchanged", "kept" (differs, not replaced), "absent" (no source)
    note: str = ""

    def line(self) -> str:
        return f"{self.action} {self.path}" + (f" ({self.note})" if self.note else "")


def _module_source(relpath: str) -> bytes:
    return resources.files("udpflannel").joinpath(relpath.removeprefix("udpflannel/")).read_bytes()


def plugin_zipapp() -> bytes:
    """The plugin as one executable file: shebang + a deterministic zip."""
    buf = io.BytesIO()
    buf.write(SHEBANG)
    with zipfile.ZipFile(buf, "w") as z:  # offsets relative to the zip: the shebang is allowed
        for name, data in sorted([("__main__.py", MAIN), *((m, _module_source(m)) for m in PLUGIN_MODULES)]):
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, data)
    return buf.getvalue()


def shipped_conflist() -> bytes:
    return resources.files("udpflannel.cni").joinpath(CONFLIST_NAME).read_bytes()


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InstallError(f"cannot read {path}: {e.strerror}") from None


def write_if_changed(path: str, data: bytes, mode: int) -> Outcome:
    """``data`` at ``path`` with ``mode``, atomically; nothing done if already so."""
    try:
        written = localstate.write_if_changed(path, data, mode)
    except OSError as e:
        raise InstallError(f"cannot write {path}: {e.strerror}") from None
    return Outcome(path, "written" if written else "unchanged")


def _copy_plugin(name: str, plugins_from: str, bin_dir: str, replace: bool) -> Outcome:
    target = os.path.join(bin_dir, name)
    source = os.path.join(plugins_from, name)
    data = _read(source) if os.path.isfile(source) else None
    if data is None:
        present = os.path.exists(target)
        return Outcome(target, "kept" if present else "absent",
                       f"no {source}" + ("" if present else "; the runtime must find it elsewhere on its CNI path"))
    existing = _read(target)
    if existing is not None and existing != data and not replace:
        return Outcome(target, "kept", f"differs from {source}; --replace-plugins replaces it")
    return write_if_changed(target, data, 0o755)


def install(bin_dir: str = DEFAULT_BIN_DIR, conf_dir: str = DEFAULT_CONF_DIR,
            plugins_from: str | None = DEFAULT_PLUGINS_FROM, replace_plugins: bool = False) -> list[Outcome]:
    """Install udpflannel-cni, the standard plugins (when ``plugins_from`` has them) and
    the conflist; one Outcome per target, in that order."""
    outcomes = [write_if_changed(os.path.join(bin_dir, PLUGIN_NAME), plugin_zipapp(), 0o755)]
    if plugins_from:
        outcomes += [_copy_plugin(name, plugins_from, bin_dir, replace_plugins) for name in STANDARD_PLUGINS]
    outcomes.append(write_if_changed(os.path.join(conf_dir, CONFLIST_NAME), shipped_conflist(), 0o644))
    return outcomes


def run(bin_dir: str, conf_dir: str, plugins_from: str | None, replace_plugins: bool) -> None:
    """The command: install and say what happened to each file."""
    for outcome in install(bin_dir, conf_dir, plugins_from, replace_plugins):
        (log.warning if outcome.action == "absent" else log.info)("install-cni: %s", outcome.line())
