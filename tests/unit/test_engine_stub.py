"""udpflannel/_engine.pyi says what the compiled engine really has: mypy's stubtest
holds the stub to the built module (names, parameters, defaults, keyword-only)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import udpflannel

ALLOWLIST = pathlib.Path(__file__).with_name("engine_stubtest_allowlist.txt")


def test_stub_matches_the_compiled_engine(tmp_path):
    root = str(pathlib.Path(udpflannel.__file__).parent.parent)  # the .pyi and the .so
    env = dict(os.environ, MYPYPATH=root, PYTHONPATH=root)
    r = subprocess.run([sys.executable, "-m", "mypy.stubtest", "--concise", "--allowlist", str(ALLOWLIST),
                        "udpflannel._engine"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
