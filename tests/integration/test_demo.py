"""The main job, `udpflannel demo`, runs end to end and leaves nothing behind (of the
namespaces on the machine it looks only at the demo's own: other tests may make and
remove namespaces meanwhile)."""

from __future__ import annotations

import subprocess
import sys

from support.namespaces import NamespaceWatch

from udpflannel.lab import procs
from udpflannel.lab.demo import LAB_TAG


def test_demo_shows_a_working_overlay_and_cleans_up():
    popen = subprocess.Popen([sys.executable, "-m", "udpflannel", "demo", "--nodes", "3", "--seconds", "1"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with NamespaceWatch(LAB_TAG, popen.pid) as made:
        out, err = procs.communicate(popen, timeout=120)
    assert popen.returncode == 0, out + err
    assert out.count("3/3 replies") == 6  # every ordered pair of 3 nodes
    assert "overlay works: every pair reachable" in out and "Gbit/s" in out
    assert "Traceback" not in err
    made.assert_all_removed()
