"""A pod through what `udpflannel install-cni` installed, and nothing else.

install-cni runs as a command into a temporary bin and conf dir, copying Debian's real
plugins from /usr/lib/cni, once per plugin form. The runtime's part is then played with
only those two dirs: the netconf is built from the installed conflist, CNI_PATH is the
installed bin dir, and the installed plugin is exec'd: the frozen executable as it is,
the zipapp through its `#!/usr/bin/env python3` with a PATH that finds the system
python3 (which has no udpflannel installed). test_cni_no_python.py takes Python away.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

import pytest

from udpflannel.lab import probe

try:
    from .test_cni import addresses, cni_call, link, pod_address, reservation, write_subnet_env
except ImportError:
    from test_cni import addresses, cni_call, link, pod_address, reservation, write_subnet_env

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def run_install(workdir: str, form: str = "frozen") -> tuple[str, str]:
    bin_dir, conf_dir = os.path.join(workdir, "opt-cni-bin"), os.path.join(workdir, "etc-cni-net.d")
    proc = subprocess.run([sys.executable, "-m", "udpflannel", "install-cni", "--bin-dir", bin_dir,
                           "--conf-dir", conf_dir, "--plugins-from", "/usr/lib/cni", f"--plugin-form={form}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return bin_dir, conf_dir


@pytest.mark.parametrize("form", ["frozen", "zipapp"])
def test_a_pod_through_the_installed_plugins(make_lab, workdir, monkeypatch, form):
    for name in ("bridge", "host-local"):
        if not os.path.exists(os.path.join("/usr/lib/cni", name)):
            pytest.skip(f"/usr/lib/cni/{name} missing: install containernetworking-plugins")
    bin_dir, conf_dir = run_install(workdir, form)
    assert {"udpflannel-cni", "bridge", "host-local", "portmap", "loopback"} <= set(os.listdir(bin_dir))
    plugin = os.path.join(bin_dir, "udpflannel-cni")
    with open(plugin, "rb") as f:
        assert f.read(4) == (b"\x7fELF" if form == "frozen" else b"#!/u")

    # the runtime's view: the installed conflist, our entry with the list's name and version
    with open(os.path.join(conf_dir, "10-udpflannel.conflist")) as f:
        conflist = json.load(f)
    conf = dict(conflist["plugins"][0], name=conflist["name"], cniVersion=conflist["cniVersion"])
    subnet_file = write_subnet_env(os.path.join(workdir, "subnet.env"), "10.251.0.0/16", "10.251.4.1/24",
                                   1450, ipmasq=True)
    conf.update(subnetFile=subnet_file, dataDir=os.path.join(workdir, "flannel"),
                ipam={"dataDir": os.path.join(workdir, "ipam")})

    monkeypatch.setenv("PATH", SYSTEM_PATH)  # `env python3` finds the system's, not this venv's
    lab = make_lab(1)
    node, pod = lab.nodes[0], lab.add_namespace("pod")
    version = cni_call(node, "VERSION", {}, "v", plugin=plugin, cni_path=bin_dir)
    assert version.rc == 0 and "1.0.0" in version.out["supportedVersions"], version

    add = cni_call(node, "ADD", conf, "pod-i", pod.path, plugin=plugin, cni_path=bin_dir)
    assert add.rc == 0, add
    ip = pod_address(add.out)
    assert ip.network == ipaddress.IPv4Network("10.251.4.0/24")
    assert addresses(pod, "eth0") == [str(ip)] and addresses(node, "cni0") == ["10.251.4.1/24"]
    assert link(pod, "eth0").get_attr("IFLA_MTU") == 1450
    assert any(probe.ping(pod, "10.251.4.1", count=3, timeout=1.0))
    with open(os.path.join(conf["dataDir"], "pod-i")) as f:
        assert json.load(f)["ipMasq"] is False  # FLANNEL_IPMASQ=true: the bridge leaves NAT to the daemon

    delete = cni_call(node, "DEL", conf, "pod-i", pod.path, plugin=plugin, cni_path=bin_dir)
    assert delete.rc == 0 and delete.out is None, delete
    assert link(pod, "eth0") is None and not os.path.exists(reservation(conf, str(ip.ip)))
    again = cni_call(node, "DEL", conf, "pod-i", pod.path, plugin=plugin, cni_path=bin_dir)
    assert again.rc == 0, again

    # the plugin really came from what was installed: a failing delegate search names its bin dir only
    missing = cni_call(node, "ADD", dict(conf, delegate={"type": "no-such-plugin"}), "pod-j", pod.path,
                       plugin=plugin, cni_path=bin_dir)
    assert missing.rc == 1 and bin_dir in missing.out["msg"] and "/usr/lib/cni" not in missing.out["msg"]
    # (run from /: `-c` puts the working directory, maybe a checkout, on sys.path; a script does not)
    proc = subprocess.run(["env", "python3", "-c", "import udpflannel"], capture_output=True,
                          env={"PATH": SYSTEM_PATH}, cwd="/", timeout=30)
    assert proc.returncode != 0, "the system python3 has udpflannel installed: this test would prove nothing"
