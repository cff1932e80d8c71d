"""The lab's small C programs (csrc/lab/): compiled on first use, cached by content.

Each source is compiled with gcc -O2 into a cache directory, named by the source's
hash, so tests and the benchmark need no build step and an edited source is rebuilt.
Two builders racing is harmless: each compiles to a private file and renames it into
place.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

LAB_SOURCES = Path(__file__).resolve().parents[2] / "csrc" / "lab"
CACHE_DIRS = ("/var/cache/udpflannel-lab", os.path.join(tempfile.gettempdir(), "udpflannel-lab"))
COMPILE_TIMEOUT = 120.0


class BuildError(Exception):
    """A lab program's source is missing or does not compile; the message says which."""


def build(source: Path, libs: tuple[str, ...] = ()) -> str:
    """Path of the compiled program, compiling it if this source was never built;
    ``libs`` are linked in (``("seccomp",)``: -lseccomp)."""
    try:
        text = source.read_bytes()
    except OSError as e:
        raise BuildError(f"{source.name} source {source}: {e.strerror} (the lab tools need "
                         "udpflannel installed from its source tree)") from None
    name = f"{source.stem}-{hashlib.sha256(text).hexdigest()[:16]}"
    for directory in CACHE_DIRS:
        binary = os.path.join(directory, name)
        if os.access(binary, os.X_OK):
            return binary
    last: OSError | None = None
    for directory in CACHE_DIRS:
        try:
            os.makedirs(directory, exist_ok=True)
            return _compile(source, directory, name, libs)
        except OSError as e:  # not writable: try the next place
            last = e
    raise BuildError(f"no writable cache directory for {source.name} ({last})")


def _compile(source: Path, directory: str, name: str, libs: tuple[str, ...]) -> str:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}-")
    os.close(fd)
    try:
        try:
            done = subprocess.run(["gcc", "-O2", "-Wall", "-o", tmp, str(source),
                                   *(f"-l{lib}" for lib in libs)], capture_output=True,
                                  text=True, timeout=COMPILE_TIMEOUT, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise BuildError(f"gcc not found: install gcc to build {source.name}") from None
        except subprocess.TimeoutExpired:
            raise BuildError(f"gcc did not finish in {COMPILE_TIMEOUT:.0f} s") from None
        if done.returncode != 0:
            raise BuildError(f"gcc failed on {source}: {done.stderr.strip()[:500]}")
        binary = os.path.join(directory, name)
        os.replace(tmp, binary)
        return binary
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
