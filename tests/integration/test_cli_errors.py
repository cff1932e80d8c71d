"""Bad input gets one clear line and a non-zero exit, never a traceback, and loses
nothing (no lease taken, no config stored)."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys

import pytest
from support.waiting import wait_until

RUN = [sys.executable, "-m", "udpflannel", "run"]


def _check_one_line_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    last = err[-1]
    assert last.startswith("udpflannel: error:"), last
    for word in words:
        assert word in last, last
    return last


def _registry_rows(path: str, table: str) -> int:
    if not os.path.exists(path):
        return 0
    with sqlite3.connect(path) as db:
        try:
            return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


@pytest.mark.parametrize("argv, words", [
    (["--port", "0"], ["--port", "not a port"]),
    (["--vni", "16777216"], ["VNI"]),
    (["--public-ip", "10.1.2"], ["not an IPv4 address"]),
    (["--no-such-flag"], ["unrecognized"]),
    (["--engine", "turbo"], ["invalid choice"]),
    (["--cpus", "0-x"], ["--cpus", "not a CPU list"]),
    (["--cpus", "3-1"], ["--cpus", "0-1023, low-high"]),
])
def test_bad_flags(argv, words):
    proc = subprocess.run(RUN + argv, capture_output=True, text=True, timeout=30)
    _check_one_line_error(proc, 2, *words)


def test_a_cpu_this_process_may_not_use_is_refused_before_anything_starts(tmp_path):
    proc = subprocess.run(RUN + ["--cpus", "1023", "--registry-file", f"{tmp_path}/reg.db"],
                          capture_output=True, text=True, timeout=30)
    _check_one_line_error(proc, 1, "--cpus: CPU 1023 is not one this process may run on")
    assert not os.path.exists(f"{tmp_path}/reg.db")
    proc = subprocess.run(RUN + ["--cpus", "0", "--dataplane", "kernel", "--registry-file", f"{tmp_path}/reg.db"],
                          capture_output=True, text=True, timeout=30)
    _check_one_line_error(proc, 1, "--cpus pins the engine's data path")
    assert not os.path.exists(f"{tmp_path}/reg.db")


@pytest.mark.parametrize("args, words", [
    (["--queues", "2", "--io", "loop"], "--queues 2 needs --io threads or --io poll"),
    (["--queues", "2", "--engine", "python"], "--queues 2 needs --io threads or --io poll"),
    (["--io", "poll", "--engine", "python"], "--io poll runs the compiled engine"),
    (["--io", "threads", "--engine", "python"], "--io threads runs the compiled engine"),
])
def test_an_io_mode_the_engine_cannot_run_is_refused(tmp_path, args, words):
    proc = subprocess.run(RUN + args + ["--registry-file", f"{tmp_path}/reg.db"],
                          capture_output=True, text=True, timeout=30)
    _check_one_line_error(proc, 1, words)
    assert not os.path.exists(f"{tmp_path}/reg.db")


def test_bad_environment_flag():
    env = dict(os.environ, FLANNELD_PORT="eighty")
    proc = subprocess.run(RUN, capture_output=True, text=True, timeout=30, env=env)
    _check_one_line_error(proc, 2, "FLANNELD_PORT")


def _node_run(lab, workdir, extra):
    d = workdir
    argv = RUN + ["--iface", "eth0", "--registry-file", f"{d}/reg.db", "--state-dir", d,
                  "--subnet-file", f"{d}/subnet.env", "--admin-socket", f"{d}/a.sock"] + extra
    return _finish(lab.nodes[0], argv)


def _finish(ns, argv) -> subprocess.CompletedProcess:
    """Run argv inside namespace ns with a timeout; killed by pid if it overruns."""
    return ns.run(argv, 30)


@pytest.mark.parametrize("config, words", [
    ("{not json", ["not valid JSON"]),
    ('{"Network": "10.244.0.0/29"}', ["smaller than /28"]),
    ('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}', ["not supported"]),
    ('{"Network": "10.244.0.0/16", "SubnetLen": 31}', ["SubnetLen"]),
])
def test_bad_network_config_stores_nothing(make_lab, workdir, config, words):
    lab = make_lab(1)
    path = f"{workdir}/net.json"
    with open(path, "w") as f:
        f.write(config)
    proc = _node_run(lab, workdir, ["--net-config", path])
    _check_one_line_error(proc, 1, path, *words)
    assert _registry_rows(f"{workdir}/reg.db", "config") == 0
    assert _registry_rows(f"{workdir}/reg.db", "leases") == 0


def test_missing_net_config_file(make_lab, workdir):
    proc = _node_run(make_lab(1), workdir, ["--net-config", f"{workdir}/absent.json"])
    _check_one_line_error(proc, 1, "absent.json")


def test_port_in_use_takes_no_lease(make_lab, workdir):
    lab = make_lab(1)
    blocker = lab.nodes[0].call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    with blocker:
        blocker.bind((lab.addresses[0], 8472))
        proc = _node_run(lab, workdir, [])
    _check_one_line_error(proc, 1, "8472", "in use")
    assert _registry_rows(f"{workdir}/reg.db", "leases") == 0


def test_without_net_admin_takes_no_lease(make_lab, workdir):
    # root, but with CAP_NET_ADMIN dropped from the bounding set (util-linux setpriv)
    argv = ["setpriv", "--bounding-set", "-net_admin"] + RUN + [
        "--iface", "eth0", "--registry-file", f"{workdir}/reg.db", "--state-dir", workdir,
        "--subnet-file", f"{workdir}/subnet.env"]
    _check_one_line_error(_finish(make_lab(1).nodes[0], argv), 1, "CAP_NET_ADMIN")
    assert _registry_rows(f"{workdir}/reg.db", "leases") == 0


def test_no_dev_net_tun_takes_no_lease(make_lab, workdir):
    # a private mount namespace with an empty tmpfs over /dev/net (util-linux unshare)
    argv = RUN + ["--iface", "eth0", "--registry-file", f"{workdir}/reg.db", "--state-dir", workdir,
                  "--subnet-file", f"{workdir}/subnet.env"]
    hidden = ["unshare", "--mount", "--", "sh", "-c", 'mount -t tmpfs tmpfs /dev/net && exec "$@"',
              "sh", *argv]
    _check_one_line_error(_finish(make_lab(1).nodes[0], hidden), 1, "/dev/net/tun")
    assert _registry_rows(f"{workdir}/reg.db", "leases") == 0


def test_sigterm_while_waiting_for_an_unreachable_etcd(make_lab, workdir):
    """Start-up keeps retrying an unreachable etcd (as flanneld does), but a stop
    request ends it promptly and cleanly."""
    import signal
    import time
    lab = make_lab(1)
    argv = RUN + ["--iface", "eth0", "--etcd-endpoints", "http://127.0.0.1:1", "--state-dir", workdir,
                  "--subnet-file", f"{workdir}/subnet.env", "--admin-socket", f"{workdir}/a.sock"]
    stderr = os.path.join(workdir, "stderr")
    with open(stderr, "w") as f:
        proc = lab.nodes[0].popen(argv, stdout=subprocess.DEVNULL, stderr=f, text=True)

    def said() -> str:
        with open(stderr) as f:
            return f.read()
    try:
        wait_until(lambda: "unreachable" in said() or proc.poll() is not None, 30, "the daemon retrying etcd")
        time.sleep(1.0)  # not a wait for anything: it must simply still be running a while later
        assert proc.poll() is None  # still retrying
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        err = said()
        assert proc.returncode == 0, err
        assert time.monotonic() - started < 10
        assert "unreachable" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
