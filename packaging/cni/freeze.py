"""Build udpflannel-cni as one static executable with Nuitka (`make setup` runs this).

Theory of operation. The container runtime execs CNI plugins on the host, where there
may be no Python at all (Flatcar, Bottlerocket, Talos, Fedora CoreOS...). So the plugin
is frozen into one ELF file that needs nothing from the host: no interpreter, no
standard library, no shared library (not even libc), no folder to unpack into.

- Nuitka's standalone mode compiles the plugin's own modules to C and carries the
  standard-library modules they import as bytecode inside the executable, which is
  linked against a *static* libpython. The build Python is Debian's python3: its
  libpython3.X-pic.a has every extension module the plugin needs built in (select,
  _posixsubprocess, math, _random, _sha512, fcntl, zlib...), so nothing is left to
  load from a file. The few Debian builds as shared modules have pure-Python fallbacks
  the plugin is happy with (_json: json's pure scanner; _bz2, _lzma: shutil without
  those archive formats; _typing) and are left out. A build Python that has a needed
  one only as a shared module (pyenv's builds them all shared) is refused, by name.
- LDFLAGS=-static links glibc in too: the file runs on any x86-64 Linux, musl hosts
  included. glibc's NSS functions (getpwnam, getaddrinfo) would need the host's glibc
  at run time; the plugin calls none of them.
- Only the standard-library modules the plugin imports are followed: every other name
  in sys.stdlib_module_names goes to --nofollow-import-to (computed by importing the
  plugin in the build Python): a smaller file and a shorter build.
- Debian's libpython also has modules built in that the plugin never imports
  (unicodedata alone is 1.1 MB; _pickle, _socket, _datetime, pyexpat with libexpat,
  the hashes...). They are linked only because the table of built-in modules,
  _PyImport_Inittab in libpython's config.o, names them: the build links its own copy
  of that table (Debian's config.c without DROPPED_BUILTINS) ahead of libpython, so
  the linker never takes config.o nor what only it refers to. 11.1 MB becomes 9.3 MB.
  A dropped module the plugin does import is refused at build time, by name.
- Nuitka's dist folder also gets the CJK codec modules (it takes every encoding); a
  static executable could not load them anyway, and only the executable is kept.
- The result is checked before it is kept: an ELF without PT_INTERP (static) that
  answers VERSION alone in an empty folder with an empty environment.

Caching. Builds are kept in a cache shared by every clone on the machine
($UDPFLANNEL_CNI_CACHE, default /var/cache/udpflannel-cni), keyed by the plugin's
sources (install.sources_digest), this script, requirements.txt, the build Python's
version (Debian's build date included), gcc's and glibc's; a hit costs a file copy.
For one key the output is byte-identical (built twice, from different folders and a
fresh cache, it is), so install-cni's compare-before-write keeps a re-install a no-op.

Output: --out (default udpflannel/cni/frozen/udpflannel-cni) and beside it
udpflannel-cni.sources, the digest of the sources it was built from: install-cni takes
the frozen plugin only while that is the current sources' digest.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)  # this checkout's udpflannel, whatever else is installed

from udpflannel.cni import install  # noqa: E402
from udpflannel.cni.delegate import version_info  # noqa: E402

CACHE = os.environ.get("UDPFLANNEL_CNI_CACHE", "/var/cache/udpflannel-cni")
BUILD_PYTHON = os.environ.get("UDPFLANNEL_CNI_PYTHON", "/usr/bin/python3")
REQUIREMENTS = os.path.join(HERE, "requirements.txt")
DEFAULT_OUT = os.path.join(ROOT, "udpflannel", "cni", *install.FROZEN_PATH.split("/"))
ENTRY = "udpflannel_cni.py"
# Shared modules of Debian's Python the plugin does without (pure-Python fallbacks).
OPTIONAL = ("_json", "_bz2", "_lzma", "_typing", "bz2", "lzma")
KEEP_BUILDS = 8  # plugins kept in the cache (9 MB each)
# Built-in modules of Debian's libpython the plugin never imports: left out of the link.
DROPPED_BUILTINS = ("_blake2", "_csv", "_datetime", "_elementtree", "_md5", "_pickle", "_sha1", "_sha256",
                    "_sha3", "_socket", "_statistics", "array", "cmath", "grp", "pyexpat", "spwd", "syslog",
                    "unicodedata", "xxsubtype")

# Run by the build Python in the staged tree: what importing the plugin loads, and which
# of those are shared-library modules (a static executable cannot load them).
PROBE = r"""
import json, sys, sysconfig
sys.path.insert(0, sys.argv[1])
import inspect  # Nuitka's runtime imports it at every start
import udpflannel.cni.plugin
optional = set(sys.argv[2].split(","))
loaded = sorted({m.split(".")[0] for m in list(sys.modules)})
shared = [f"{n} ({getattr(sys.modules[n], '__file__', '')})" for n in loaded
          if n not in sys.builtin_module_names and n not in optional
          and str(getattr(sys.modules[n], "__file__", "")).endswith(".so")]
print(json.dumps({"loaded": loaded, "shared": shared, "stdlib": sorted(sys.stdlib_module_names),
                  "libpl": sysconfig.get_config_var("LIBPL"), "include": sysconfig.get_config_var("INCLUDEPY")}))
"""


class FreezeError(Exception):
    pass


def say(msg: str) -> None:
    print(f"cni-freeze: {msg}", file=sys.stderr, flush=True)


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "big") + p)
    return h.hexdigest()


def _output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        raise FreezeError(f"{argv[0]}: {e}") from None


def build_key(python_version: str) -> str:
    with open(__file__, "rb") as f, open(REQUIREMENTS, "rb") as r:
        script, reqs = f.read(), r.read()
    gcc = _output(["gcc", "--version"]).splitlines()[0]
    libc = _output(["ldd", "--version"]).splitlines()[0]  # glibc is linked in: a security update rebuilds
    return _sha(install.sources_digest().encode(), script, reqs, python_version.encode(), gcc.encode(),
                libc.encode())[:24]


def elf_is_static(path: str) -> bool:
    """A 64-bit little-endian ELF executable without a PT_INTERP program header (no
    dynamic loader)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:5] != b"\x7fELF\x02":
            raise FreezeError(f"{path} is not a 64-bit ELF file")
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))  # 3: PT_INTERP


def stage(folder: str) -> str:
    """The plugin's modules (exactly the zipapp's) and an entry script, in ``folder``."""
    for name in install.PLUGIN_MODULES:
        target = os.path.join(folder, *name.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(install.module_source(name))
    entry = os.path.join(folder, ENTRY)
    with open(entry, "wb") as f:
        f.write(install.MAIN)
    return entry


def inittab(found: dict, workdir: str) -> str:
    """An object file holding _PyImport_Inittab without DROPPED_BUILTINS (see the module
    docstring), compiled from the build Python's own config.c; "" if it has none."""
    config_c = os.path.join(found["libpl"] or "", "config.c")
    if not os.path.isfile(config_c):
        say(f"no {config_c}: every built-in module of libpython is linked in")
        return ""
    needed = sorted(set(DROPPED_BUILTINS) & set(found["loaded"]))
    if needed:
        raise FreezeError(f"the plugin imports {', '.join(needed)}: take it out of DROPPED_BUILTINS")
    with open(config_c) as f:
        lines = f.read().splitlines()
    entries = {f'{{"{name}",' for name in DROPPED_BUILTINS}
    kept = [line for line in lines if not any(line.strip().startswith(e) for e in entries)]
    if len(lines) - len(kept) != len(DROPPED_BUILTINS):
        raise FreezeError(f"{config_c} does not list every one of DROPPED_BUILTINS as built in")
    source, obj = os.path.join(workdir, "inittab.c"), os.path.join(workdir, "inittab.o")
    with open(source, "w") as f:
        f.write("\n".join(kept) + "\n")
    subprocess.run(["gcc", "-O2", "-fPIC", "-c", f"-I{found['include']}", source, "-o", obj], check=True,
                   timeout=120)
    return obj


def build_venv(python_version: str) -> str:
    """A virtualenv of the build Python with the pinned freezer, kept in the cache."""
    with open(REQUIREMENTS, "rb") as r:
        venv = os.path.join(CACHE, "venv-" + _sha(r.read(), python_version.encode())[:12])
    py = os.path.join(venv, "bin", "python")
    if os.path.exists(os.path.join(venv, ".installed")):
        return py
    shutil.rmtree(venv, ignore_errors=True)
    say(f"installing the freezer ({REQUIREMENTS}) into {venv}")
    subprocess.run([BUILD_PYTHON, "-m", "venv", venv], check=True, timeout=300)
    subprocess.run([py, "-m", "pip", "install", "-q", "-r", REQUIREMENTS], check=True, timeout=900)
    open(os.path.join(venv, ".installed"), "w").close()
    return py


def check_alone(binary: str, workdir: str) -> None:
    """The executable by itself in an empty folder, with an empty environment."""
    alone = os.path.join(workdir, "alone")
    os.mkdir(alone)
    path = shutil.copy(binary, os.path.join(alone, install.PLUGIN_NAME))
    proc = subprocess.run([path], env={"CNI_COMMAND": "VERSION"}, stdin=subprocess.DEVNULL,
                          capture_output=True, cwd=alone, timeout=60)
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        answer = None
    if proc.returncode != 0 or answer != version_info():
        raise FreezeError(f"the frozen plugin does not answer VERSION alone (exit {proc.returncode}): "
                          f"{proc.stdout[:300]!r} {proc.stderr[-500:]!r}")


def freeze(workdir: str, python_version: str) -> str:
    """Build in ``workdir``; the path of the checked executable."""
    src = os.path.join(workdir, "src")
    entry = stage(src)
    probe = subprocess.run([BUILD_PYTHON, "-S", "-c", PROBE, src, ",".join(OPTIONAL)], capture_output=True,
                           text=True, timeout=120)
    if probe.returncode != 0:
        raise FreezeError(f"{BUILD_PYTHON} cannot import the plugin: {probe.stderr.strip()}")
    found = json.loads(probe.stdout)
    if found["shared"]:
        raise FreezeError(f"{BUILD_PYTHON} has modules the plugin needs only as shared libraries, which a "
                          f"static executable cannot load: {', '.join(found['shared'])}. Use Debian's python3 "
                          "(UDPFLANNEL_CNI_PYTHON=/usr/bin/python3).")
    exclude = sorted((set(found["stdlib"]) - set(found["loaded"])) | set(OPTIONAL))
    table = inittab(found, workdir)
    py = build_venv(python_version)
    out = os.path.join(workdir, "out")
    log = os.path.join(workdir, "nuitka.log")
    argv = [py, "-m", "nuitka", "--mode=standalone", "--static-libpython=yes",
            "--python-flag=no_site,isolated,safe_path", f"--nofollow-import-to={','.join(exclude)}",
            f"--output-dir={out}", f"--output-filename={install.PLUGIN_NAME}", "--remove-output", "--quiet",
            entry]
    with open(log, "wb") as f:
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=workdir, timeout=3600,
                              env=dict(os.environ, LDFLAGS=f"-static {table}".strip()))
    binary = os.path.join(out, ENTRY.removesuffix(".py") + ".dist", install.PLUGIN_NAME)
    if proc.returncode != 0 or not os.path.isfile(binary):
        with open(log, errors="replace") as f:
            tail = "".join(f.readlines()[-30:])
        raise FreezeError(f"nuitka failed (exit {proc.returncode}); the end of its log:\n{tail}")
    if not elf_is_static(binary):
        raise FreezeError(f"{binary} is dynamically linked")
    check_alone(binary, workdir)
    return binary


def prune(keep: int = KEEP_BUILDS) -> None:
    """Only the ``keep`` most recently built plugins stay in the cache (clones that
    still use an older one rebuild it, once)."""
    builds = [e for e in os.scandir(CACHE) if e.is_dir() and len(e.name) == 24 and not e.name.startswith("venv-")]
    for old in sorted(builds, key=lambda e: e.stat().st_mtime, reverse=True)[keep:]:
        shutil.rmtree(old.path, ignore_errors=True)


def place(data: bytes, out: str) -> None:
    """The executable at ``out`` and its sources digest beside it, each written only if
    it changed (atomically, as install-cni writes)."""
    install.write_if_changed(out, data, 0o755)
    install.write_if_changed(out + ".sources", (install.sources_digest() + "\n").encode(), 0o644)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"where the executable goes (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        python_version = _output([BUILD_PYTHON, "-c", "import sys; print(sys.version)"])
        key = build_key(python_version)
        cached = os.path.join(CACHE, key, install.PLUGIN_NAME)
        os.makedirs(CACHE, exist_ok=True)
        with open(os.path.join(CACHE, "lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another clone may be building it right now
            if not os.path.isfile(cached):
                say(f"building {install.PLUGIN_NAME} with Nuitka (a minute or two, once per plugin change)")
                start = time.monotonic()
                with tempfile.TemporaryDirectory(prefix="cni-freeze-") as workdir:
                    binary = freeze(workdir, python_version)
                    os.makedirs(os.path.dirname(cached), exist_ok=True)
                    tmp = cached + ".tmp"
                    shutil.copyfile(binary, tmp)
                    os.chmod(tmp, 0o755)
                    os.replace(tmp, cached)
                say(f"built in {time.monotonic() - start:.0f} s: {os.path.getsize(cached) / 1e6:.1f} MB, {cached}")
                prune()
        with open(cached, "rb") as f:
            place(f.read(), args.out)
        say(f"{args.out} (cache {key})")
        return 0
    except (FreezeError, install.InstallError, subprocess.SubprocessError, OSError) as e:
        say(f"FAILED: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
