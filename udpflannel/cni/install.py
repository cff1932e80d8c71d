"""`udpflannel install-cni`: put the CNI plugin, the standard plugins and the conflist on a host.

Theory of operation. The container runtime execs CNI plugins on the host, outside any
container and outside udpflannel's virtualenv, and the host may have no Python at all.
So the plugin is installed as one self-contained file, in one of two forms
(``--plugin-form``):

- **frozen** (what ``auto`` takes when it is there): one static executable built by
  ``make setup`` with Nuitka (packaging/cni/freeze.py) into FROZEN_PATH beside this
  module: the plugin's modules compiled, the standard-library modules they import,
  libpython and libc, all linked in. The host needs nothing. It is used only while its
  sidecar ``.sources`` names the digest of the current plugin sources
  (sources_digest): a binary built from other sources is stale and never installed.
- **zipapp** (``auto``'s fallback where no fresh frozen plugin was built, say a checkout
  without ``make setup``; or asked for): a zip (PEP 441) of the modules udpflannel-cni
  imports (PLUGIN_MODULES, all standard-library-only) behind ``#!/usr/bin/env
  python3``. The host needs a python3. ``auto`` says so with a warning.

Both are deterministic: the zip has sorted entries, fixed timestamps and modes; the
freezer's output is byte-identical for the same sources and toolchain. Every target is
compared with what would be written first: an identical file is left alone (idempotent:
a re-run, e.g. an init container after a pod restart, changes nothing, not even the
inode). A file that must change is written next to its target as a dot-temp, fsynced,
given its mode, and renamed over the target: the runtime, which may exec the plugin or
read the conflist at any moment, sees the old file or the new one, never half of one.

The standard plugins the default delegate needs (bridge, host-local; portmap and loopback
are for the conflist and the runtime) are copied from --plugins-from when they are there
and missing at the target. A target that differs (the host's own, maybe newer, build) is
kept unless --replace-plugins: replacing another CNI user's plugins is the operator's call.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
from dataclasses import dataclass, replace
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
FROZEN_PATH = "frozen/udpflannel-cni"  # under udpflannel/cni; packaging/cni/freeze.py writes it
PLUGIN_FORMS = ("auto", "frozen", "zipapp")

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
    warn: bool = False  # the operator should act (logged as a warning)

    def line(self) -> str:
        return f"{self.action} {self.path}" + (f" ({self.note})" if self.note else "")


def module_source(relpath: str) -> bytes:
    return resources.files("udpflannel").joinpath(relpath.removeprefix("udpflannel/")).read_bytes()


def sources_digest() -> str:
    """sha256 of what the plugin runs (its modules and __main__): names the sources a
    frozen plugin was built from."""
    h = hashlib.sha256()
    for name, data in (("__main__.py", MAIN), *((m, module_source(m)) for m in PLUGIN_MODULES)):
        h.update(f"{name}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def plugin_zipapp() -> bytes:
    """The plugin as one executable file: shebang + a deterministic zip."""
    buf = io.BytesIO()
    buf.write(SHEBANG)
    with zipfile.ZipFile(buf, "w") as z:  # offsets relative to the zip: the shebang is allowed
        for name, data in sorted([("__main__.py", MAIN), *((m, module_source(m)) for m in PLUGIN_MODULES)]):
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, data)
    return buf.getvalue()


def frozen_path() -> str:
    """Where the frozen plugin is, or would be, in this installation of udpflannel."""
    return str(resources.files("udpflannel.cni").joinpath(FROZEN_PATH))


def frozen_plugin() -> tuple[bytes | None, str]:
    """The frozen plugin's bytes, or None and why there is none to install."""
    here = resources.files("udpflannel.cni")
    try:
        data = here.joinpath(FROZEN_PATH).read_bytes()
        built_from = here.joinpath(FROZEN_PATH + ".sources").read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None, "not built (`make setup` builds it: packaging/cni/freeze.py)"
    if built_from != sources_digest():
        return None, "stale: built from other plugin sources (`make setup` rebuilds it)"
    return data, ""


def plugin_executable(form: str = "auto") -> tuple[bytes, str, bool]:
    """The plugin file for ``--plugin-form``: its bytes, a note on what it is, and
    whether the operator should hear about it (a zipapp the form did not ask for)."""
    if form not in PLUGIN_FORMS:
        raise InstallError(f"--plugin-form {form!r}: one of {', '.join(PLUGIN_FORMS)}")
    if form == "zipapp":
        return plugin_zipapp(), "zipapp, as asked: the host needs python3", False
    data, why = frozen_plugin()
    if data is not None:
        return data, "frozen: one static executable, the host needs no Python", False
    if form == "frozen":
        raise InstallError(f"--plugin-form=frozen: the frozen plugin is {why}")
    return plugin_zipapp(), f"zipapp: the frozen plugin is {why}; the host needs python3", True


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
            plugins_from: str | None = DEFAULT_PLUGINS_FROM, replace_plugins: bool = False,
            plugin_form: str = "auto") -> list[Outcome]:
    """Install udpflannel-cni (in ``plugin_form``), the standard plugins (when
    ``plugins_from`` has them) and the conflist; one Outcome per target, in that order."""
    data, note, warn = plugin_executable(plugin_form)
    outcomes = [replace(write_if_changed(os.path.join(bin_dir, PLUGIN_NAME), data, 0o755), note=note, warn=warn)]
    if plugins_from:
        outcomes += [_copy_plugin(name, plugins_from, bin_dir, replace_plugins) for name in STANDARD_PLUGINS]
    outcomes.append(write_if_changed(os.path.join(conf_dir, CONFLIST_NAME), shipped_conflist(), 0o644))
    return outcomes


def run(bin_dir: str, conf_dir: str, plugins_from: str | None, replace_plugins: bool,
        plugin_form: str = "auto") -> None:
    """The command: install and say what happened to each file."""
    for outcome in install(bin_dir, conf_dir, plugins_from, replace_plugins, plugin_form):
        (log.warning if outcome.action == "absent" or outcome.warn else log.info)("install-cni: %s", outcome.line())
