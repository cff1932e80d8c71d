"""Pods on a host without Python: the installed frozen plugin, and flannel's own.

The container runtime execs CNI plugins on the host, and many nodes have no Python
(Flatcar, Bottlerocket, Talos...). Here every plugin call runs in a mount namespace of
its own where Python is gone: an empty read-only tmpfs over every Python library folder
(/usr/lib/python3*, /usr/local/lib/python3*), this virtualenv, the base Python's prefix
and pyenv's root, and /dev/null bound over every python* executable on the PATH and in
the usual bin folders and over every libpython. The runtime's PATH is kept, venv and
shims included: they lead nowhere. The namespace goes with the plugin's process (and
its delegates'), which is stopped by pid on a timeout like every cni_call.

In there, on two nodes running udpflannel (real daemons, one overlay):
- the frozen udpflannel-cni that `install-cni --plugin-form=frozen` installed answers
  VERSION and serves ADD, CHECK and DEL, and a pod on one node reaches a pod on the
  other; the zipapp, installed beside it, cannot even start (the issue's
  "/usr/bin/env: 'python3': Permission denied"): the namespace really has no Python;
- flannel's CNI plugin (peers/flannel-cni: containernetworking/plugins v0.9.1, Go)
  does the same from the same subnet.env: the alternative for operators who ship it.
  A pod it added is deleted by udpflannel-cni (they share the saved delegate's format).
"""

from __future__ import annotations

import glob
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import sys
import zlib

from udpflannel.lab import peers, probe

try:
    from .test_cni import bridge_check_route_bug, cni_call, link, pod_address, reservation
    from .test_install_cni import run_install
except ImportError:
    from test_cni import bridge_check_route_bug, cni_call, link, pod_address, reservation
    from test_install_cni import run_install

SYSTEM_PREFIXES = ("/", "/usr", "/usr/local")


def python_paths() -> tuple[list[str], list[str]]:
    """(folders, files) that make up every Python on this machine."""
    def under(path: str, folders: set[str]) -> bool:
        return any(path == d or path.startswith(d + "/") for d in folders)

    folders: set[str] = set()
    for pattern in ("/usr/lib/python3*", "/usr/local/lib/python3*", "/usr/lib64/python3*"):
        folders.update(os.path.realpath(p) for p in glob.glob(pattern) if os.path.isdir(p))
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        if os.path.realpath(prefix) not in SYSTEM_PREFIXES:  # a venv, pyenv's version folder
            folders.add(os.path.realpath(prefix))
    pyenv = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    if os.path.isdir(pyenv):
        folders.add(os.path.realpath(pyenv))
    files: set[str] = set()
    bin_dirs = {d for d in os.environ.get("PATH", "").split(os.pathsep) if d}
    bin_dirs |= {"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"}
    patterns = [os.path.join(d, "python*") for d in bin_dirs]
    patterns += ["/usr/lib/*/libpython3*", "/usr/lib/libpython3*", "/usr/local/lib/libpython3*"]
    for pattern in patterns:
        for path in glob.glob(pattern):
            real = os.path.realpath(path)
            if os.path.isfile(real) and not under(real, folders):
                files.add(real)
    outer = {d for d in folders if not under(os.path.dirname(d), folders)}  # one mount hides what is inside
    return sorted(outer), sorted(files)


def without_python(workdir: str, target: str) -> str:
    """A script that runs ``target`` in a mount namespace without Python (the host of
    a node that has none), for cni_call's ``plugin``."""
    folders, files = python_paths()
    assert files and folders, (folders, files)
    hide = [f"mount -t tmpfs -o ro,mode=0755,size=4k nopython {shlex.quote(d)}" for d in folders]
    hide += [f"mount --bind /dev/null {shlex.quote(f)}" for f in files]
    inner = "set -e\n" + "\n".join(hide) + f"\nexec {shlex.quote(target)}\n"
    path = os.path.join(workdir, f"nopython-{os.path.basename(target)}-{zlib.crc32(target.encode()):08x}")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n# runs the plugin as a host without Python would\n"
                f"exec unshare --mount --propagation private -- /bin/sh -c {shlex.quote(inner)}\n")
    os.chmod(path, 0o755)
    return path


def run_there(workdir: str, target: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``target`` run without Python (killed by its pid if it outlives 30 s)."""
    return subprocess.run([without_python(workdir, target)], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=30)


def assert_no_python_in_there(workdir: str) -> None:
    """No python runs there, every hidden folder is empty, and the zipapp form of the
    plugin fails as the issue reported it."""
    folders, _ = python_paths()
    probe_script = os.path.join(workdir, "probe.sh")
    with open(probe_script, "w") as f:
        f.write("#!/bin/sh\nfor p in python3 python; do command -v $p >/dev/null && $p -c pass && exit 1; done\n"
                + "".join(f'[ -z "$(ls -A {shlex.quote(d)})" ] || exit 2\n' for d in folders) + "exit 0\n")
    os.chmod(probe_script, 0o755)
    res = run_there(workdir, probe_script, dict(os.environ))
    assert res.returncode == 0, (res.returncode, res.stderr)

    zip_workdir = os.path.join(workdir, "zipapp")
    os.mkdir(zip_workdir)
    zip_bin, _ = run_install(zip_workdir, "zipapp")
    res = run_there(workdir, os.path.join(zip_bin, "udpflannel-cni"), dict(os.environ, CNI_COMMAND="VERSION"))
    assert res.returncode != 0 and res.stdout == "", res
    assert "python3" in res.stderr and ("Permission denied" in res.stderr or "No such file" in res.stderr), res


def serve_pods_on_two_nodes(make_lab, make_cluster, workdir: str, bin_dir: str, plugin_type: str,
                            cni_version: str, deleter_type: str) -> None:
    """Through ``plugin_type`` (in ``bin_dir``, run without Python): a pod on each of two
    udpflannel nodes (ADD, CHECK), pings across the overlay both ways, DEL. The second
    pod is deleted by ``deleter_type``."""
    lab = make_lab(2)
    cluster = make_cluster(lab)
    cluster.start_all()
    cluster.wait_converged()
    plugins = {t: without_python(workdir, os.path.join(bin_dir, t)) for t in {plugin_type, deleter_type}}
    assert_no_python_in_there(workdir)

    version = cni_call(lab.nodes[0], "VERSION", {"cniVersion": cni_version}, "v", plugin=plugins[plugin_type],
                       cni_path=bin_dir)
    assert version.rc == 0 and cni_version in version.out["supportedVersions"], version

    pods, ips, confs = [], [], []
    for i, node in enumerate(lab.nodes):
        pod = lab.add_namespace(f"pod{i + 1}")
        conf = {"cniVersion": cni_version, "name": "cbr0", "type": plugin_type,
                "delegate": {"hairpinMode": True, "isDefaultGateway": True},
                "subnetFile": os.path.join(cluster.node_dir(i), "subnet.env"),
                "dataDir": os.path.join(workdir, f"n{i}", "flannel"),
                "ipam": {"dataDir": os.path.join(workdir, f"n{i}", "ipam")}}
        add = cni_call(node, "ADD", conf, f"pod-{i + 1}", pod.path, plugin=plugins[plugin_type], cni_path=bin_dir)
        assert add.rc == 0, add
        ip = pod_address(add.out)
        assert ip.network == ipaddress.IPv4Network(cluster.status(i).lease.subnet)  # its node's lease
        assert link(pod, "eth0").get_attr("IFLA_MTU") == 1450  # the daemon's MTU, from subnet.env
        check = cni_call(node, "CHECK", dict(conf, prevResult=add.out), f"pod-{i + 1}", pod.path,
                         plugin=plugins[plugin_type], cni_path=bin_dir)
        assert check.rc == 0 or bridge_check_route_bug(check), check
        pods.append(pod)
        ips.append(ip)
        confs.append(conf)

    for a, b in ((0, 1), (1, 0)):
        assert all(probe.ping(pods[a], str(ips[b].ip), count=3, timeout=2.0)), f"pod{a + 1} -> pod{b + 1}"

    for i, node in enumerate(lab.nodes):
        deleter = plugin_type if i == 0 else deleter_type
        delete = cni_call(node, "DEL", dict(confs[i], type=deleter), f"pod-{i + 1}", pods[i].path,
                          plugin=plugins[deleter], cni_path=bin_dir)
        assert delete.rc == 0 and delete.out is None, delete
        assert link(pods[i], "eth0") is None
        assert not os.path.exists(os.path.join(confs[i]["dataDir"], f"pod-{i + 1}"))
        assert not os.path.exists(reservation(confs[i], str(ips[i].ip)))


def test_the_frozen_plugin_serves_pods_on_a_host_without_python(make_lab, make_cluster, workdir):
    bin_dir, conf_dir = run_install(workdir, "frozen")
    with open(os.path.join(conf_dir, "10-udpflannel.conflist")) as f:
        assert json.load(f)["plugins"][0]["type"] == "udpflannel-cni"
    serve_pods_on_two_nodes(make_lab, make_cluster, workdir, bin_dir, "udpflannel-cni", "1.0.0",
                            deleter_type="udpflannel-cni")


def test_flannels_plugin_serves_pods_on_udpflannel_nodes_without_python(make_lab, make_cluster, workdir):
    bin_dir, _ = run_install(workdir, "frozen")
    shutil.copy(peers.binary("flannel"), os.path.join(bin_dir, "flannel"))
    # v0.9.1 speaks CNI 0.1.0 to 0.4.0 (CHECK needs 0.4.0); a pod it added is deleted by ours
    serve_pods_on_two_nodes(make_lab, make_cluster, workdir, bin_dir, "flannel", "0.4.0",
                            deleter_type="udpflannel-cni")
