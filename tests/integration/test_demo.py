"""The main job, `udpflannel demo`, runs end to end and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys


def _netns_names() -> set[str]:
    try:
        return set(os.listdir("/var/run/netns"))
    except FileNotFoundError:
        return set()


def test_demo_shows_a_working_overlay_and_cleans_up():
    before = _netns_names()
    proc = subprocess.run([sys.executable, "-m", "udpflannel", "demo", "--nodes", "3",
                           "--seconds", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.count("3/3 replies") == 6  # every ordered pair of 3 nodes
    assert "overlay works: every pair reachable" in out and "Gbit/s" in out
    assert "Traceback" not in proc.stderr
    assert not {n for n in _netns_names() - before if n.startswith("ufd")}
