"""The shipped systemd unit: Type=notify, and nothing in it tears the data plane down
on stop (restarts must be outage-free)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "systemd" / "udpflannel.service"


def settings() -> dict[str, list[str]]:
    """key -> values (systemd allows a key more than once), comments skipped."""
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_notify_restart_and_settings_file():
    s = settings()
    assert s["Type"] == ["notify"]
    assert s["ExecStart"][0].split()[:4] == ["/usr/local/bin/udpflannel", "run", "--tun", "flannel0"]
    assert s["EnvironmentFile"] == ["-/etc/default/udpflannel"]
    assert s["Restart"] == ["on-failure"]
    assert s["RestartSec"] == ["100ms"]  # a crash's silence is this plus a warm start
    assert "network-online.target" in s["Wants"][0] and "network-online.target" in s["After"][0]


def test_stop_leaves_the_data_plane_in_place():
    s = settings()
    assert s["KillMode"] in (["mixed"], ["process"])  # SIGTERM to the daemon only
    assert not {"ExecStop", "ExecStopPost"} & set(s)  # no teardown hook on stop/restart
    assert "RuntimeDirectory" not in s  # systemd would delete /run/flannel/subnet.env on stop
    assert "CAP_NET_ADMIN" in s["CapabilityBoundingSet"][0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_every_line(tmp_path):
    # verify insists the binary exists; check the unit's syntax with one that does
    copy = tmp_path / "udpflannel.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/udpflannel", "/bin/true"))
    r = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_open_files_limit_leaves_headroom():
    """systemd's default soft limit is 1,024; an HTTP flood once exhausted it."""
    assert int(settings()["LimitNOFILE"][0]) >= 65536


def test_reload_is_an_upgrade_by_takeover():
    """`systemctl reload`: SIGUSR2 makes the daemon start its successor with
    --takeover=exit (tests/integration/test_takeover.py), which must be allowed to
    notify systemd (MAINPID=, READY=1) though it is not the unit's first process."""
    s = settings()
    assert s["ExecReload"] == ["/bin/kill -USR2 $MAINPID"]
    assert s["NotifyAccess"] == ["all"]
