"""lab/flanneld: the handle on a real flanneld, driven here by a stand-in script (no
root, no namespace): its command line, its environment, what counts as ready, and
how a failure reads. The real binary is exercised by tests/integration/test_real_flanneld.py."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import textwrap
import time

import pytest

from udpflannel.lab.flanneld import Flanneld, FlanneldError

# Takes flanneld's flags, logs what it was given, then writes subnet.env as flanneld
# does (a new file renamed over the old one) after a pause, unless told to fail.
FAKE = textwrap.dedent("""\
    #!/bin/sh
    for a in "$@"; do echo "arg $a"; done
    while [ $# -gt 0 ]; do case "$1" in --subnet-file) f="$2"; shift;; esac; shift; done
    env | grep '^FLANNELD_' || echo "no FLANNELD_ variables"
    if [ -n "$FAKE_FAIL" ]; then
        echo "E1204 main.go:367] Failed to find interface to use that matches the interfaces"
        exit 1
    fi
    sleep "${FAKE_DELAY:-0.3}"
    printf 'FLANNEL_NETWORK=10.244.0.0/16\\nFLANNEL_SUBNET=10.244.9.1/24\\n' > "$f.new"
    printf 'FLANNEL_MTU=1450\\nFLANNEL_IPMASQ=false\\n' >> "$f.new"
    mv "$f.new" "$f"
    echo "flannel is ready"
    exec sleep 60
    """)


class HereNamespace:
    """A Namespace that runs its commands right here."""
    name = "here"

    def popen(self, argv, **kw) -> subprocess.Popen:
        return subprocess.Popen(argv, **kw)


@pytest.fixture
def fake(tmp_path):
    path = tmp_path / "flanneld"
    path.write_text(FAKE)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def node(fake, tmp_path):
    fl = Flanneld(HereNamespace(), str(tmp_path / "node"), etcd_endpoints="http://192.0.2.1:2379",
                  etcd_prefix="/t/network", ip_masq=True, healthz_port=9402, extra_args=["--public-ip", "192.0.2.7"],
                  binary=fake)
    yield fl
    fl.stop(grace=1)


def test_flanneld_gets_its_own_flags_and_none_of_our_environment(node, monkeypatch):
    monkeypatch.setenv("FLANNELD_IO", "threads")  # udpflannel's, set by `make test`
    monkeypatch.setenv("FLANNELD_IFACE", "eth9")
    node.start().wait_ready(timeout=10)
    argv = node.argv()
    assert argv[argv.index(node.binary):] == [
        node.binary, "--etcd-endpoints", "http://192.0.2.1:2379", "--etcd-prefix", "/t/network",
        "--iface", "eth0", "--subnet-file", node.subnet_file, "--ip-masq", "--healthz-port", "9402",
        "--public-ip", "192.0.2.7"]
    log = node.log()
    assert "no FLANNELD_ variables" in log and "eth9" not in log
    assert f"arg {node.subnet_file}" in log


def test_ready_means_a_new_subnet_env_not_the_one_left_from_before(node):
    os.makedirs(node.workdir)
    with open(node.subnet_file, "w") as f:  # a previous run's: flanneld reads it, keeps it until ready
        f.write("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\n"
                "FLANNEL_IPMASQ=false\n")
    started = time.monotonic()
    env = node.start().wait_ready(timeout=10)
    assert time.monotonic() - started >= 0.25
    assert env.subnet_network == ipaddress.IPv4Network("10.244.9.0/24")
    assert (node.subnet, node.overlay_addr, node.lease_key) == (
        ipaddress.IPv4Network("10.244.9.0/24"), "10.244.9.0", "/t/network/subnets/10.244.9.0-24")
    assert node.running()
    assert node.stop(grace=1) is not None and not node.running()


def test_an_exit_reads_as_flanneld_s_own_error(node, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "1")
    with pytest.raises(FlanneldError, match=r"(?s)exited with 1:.*Failed to find interface"):
        node.start().wait_ready(timeout=10)


def test_no_subnet_env_in_time_is_an_error_with_the_log(node, monkeypatch):
    monkeypatch.setenv("FAKE_DELAY", "30")
    with pytest.raises(FlanneldError, match=r"(?s)wrote no subnet.env in 1s:.*arg --ip-masq"):
        node.start().wait_ready(timeout=1)
    assert node.stop(grace=1) is not None
