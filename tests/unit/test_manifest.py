"""packaging/kubernetes/udpflannel.yaml, checked without a cluster.

No cluster is available to these tests, so they check what can be known from the file
and the code: it parses; every container's arguments and every FLANNELD_* name are
accepted by udpflannel's own parser (a typo in a variable name would otherwise be
silently ignored by the daemon); the probes ask the port and address the daemon serves
health on; the hostPath mounts put every path the daemon and install-cni write where the
host (the runtime, the CNI plugin, an operator) expects it. Whether a cluster admits and
runs the pods is NOT checked here.
"""

from __future__ import annotations

import json
import os
import posixpath

import pytest
import yaml

from udpflannel import cli
from udpflannel.cni import delegate as cni
from udpflannel.cni import install
from udpflannel.core import config as netconfig

MANIFEST = os.path.join(os.path.dirname(__file__), "..", "..", "packaging", "kubernetes", "udpflannel.yaml")
SECRET_PLACEHOLDER = {"endpoints": "https://10.0.0.5:2379"}  # what the operator's Secret holds


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    with open(MANIFEST) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in docs if d["kind"] == kind])
    return found[0]


def pod_spec(docs) -> dict:
    return one(docs, "DaemonSet")["spec"]["template"]["spec"]


def container(docs, name: str, init: bool = False) -> dict:
    key = "initContainers" if init else "containers"
    return next(c for c in pod_spec(docs)[key] if c["name"] == name)


def container_env(docs, c: dict) -> dict[str, str]:
    """The container's environment as the kubelet would build it: envFrom ConfigMaps
    first, then env (secret references resolved to a placeholder)."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "udpflannel-etcd"
            env[item["name"]] = SECRET_PLACEHOLDER[ref["key"]]
    return env


def run_args(docs):
    """The main container's `udpflannel run` as it would start: FLANNELD_* first, then args."""
    c = container(docs, "udpflannel")
    assert c["command"] == ["udpflannel"] and c["args"][0] == "run"
    argv = ["run", *cli.env_flags(container_env(docs, c), c["args"][1:]), *c["args"][1:]]
    return cli.build_parser().parse_args(argv)


def host_path(docs, c: dict, path: str) -> tuple[str, dict] | None:
    """Where ``path`` inside container ``c`` lives on the host, and the volume; None if
    it is not on a hostPath volume (the image's own file system, or a ConfigMap)."""
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    best = None
    for m in c.get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/")
        if path == mount or path.startswith(mount + "/"):
            if best is None or len(mount) > len(best[0]["mountPath"].rstrip("/")):
                best = (m, volumes[m["name"]])
    if best is None or "hostPath" not in best[1]:
        return None
    m, volume = best
    rest = posixpath.relpath(path, m["mountPath"])
    return posixpath.normpath(posixpath.join(volume["hostPath"]["path"], rest)), volume


def test_it_parses_into_the_expected_objects(docs):
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "ConfigMap", "DaemonSet", "Namespace"]
    ns = one(docs, "Namespace")["metadata"]["name"]
    assert all(d["metadata"]["namespace"] == ns for d in docs if d["kind"] != "Namespace")
    assert one(docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    ds = one(docs, "DaemonSet")
    assert ds["apiVersion"] == "apps/v1"
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    spec = pod_spec(docs)
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    names = [v["name"] for v in spec["volumes"]]
    assert len(names) == len(set(names))
    for c in spec["initContainers"] + spec["containers"]:
        assert {m["name"] for m in c["volumeMounts"]} <= set(names), c["name"]


def test_the_daemon_runs_with_ip_masq_and_only_the_capabilities_it_needs(docs):
    c = container(docs, "udpflannel")
    sc = c["securityContext"]
    assert sc.get("privileged", False) is False
    assert set(sc["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    args = run_args(docs)
    assert args.ip_masq is True
    assert args.etcd_endpoints == SECRET_PLACEHOLDER["endpoints"]  # etcd mode, from the Secret
    assert args.healthz_port != 0


def test_every_flanneld_variable_is_a_real_flag(docs):
    c = container(docs, "udpflannel")
    env = container_env(docs, c)
    names = [n for n in env if n.startswith("FLANNELD_")]
    assert len(names) >= 5
    for name in names:
        assert cli.env_flags({name: env[name]}), f"{name} is not a udpflannel flag: the daemon would ignore it"
    assert set(env) == set(names)  # nothing else is set that could be a misspelling


def test_every_container_parses(docs):
    spec = pod_spec(docs)
    commands = {}
    for c in spec["initContainers"] + spec["containers"]:
        assert c["command"] == ["udpflannel"], c["name"]
        commands[c["name"]] = cli.build_parser().parse_args(c["args"]).command
    assert commands == {"install-cni": "install-cni", "udpflannel": "run"}
    run_args(docs)  # with the ConfigMap's variables in front, as the daemon reads them


def test_probes_ask_the_health_port(docs):
    c = container(docs, "udpflannel")
    args = run_args(docs)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] == args.healthz_port
        if args.healthz_ip != "0.0.0.0":  # bound to one address: the probe must go there
            assert get.get("host") == args.healthz_ip


def test_the_daemons_paths_are_the_hosts(docs):
    c = container(docs, "udpflannel")
    opts = cli._run_options(run_args(docs))
    wanted = {
        os.path.dirname(opts.subnet_file): "DirectoryOrCreate",  # CNI on the host reads subnet.env
        opts.state_dir: "DirectoryOrCreate",  # the VTEP MAC and subnet survive a new pod
        os.path.dirname(opts.admin_path): "DirectoryOrCreate",  # `udpflannel status|cleanup` on the host
        "/dev/net/tun": "CharDevice",
        "/run/xtables.lock": "FileOrCreate",  # one lock with kube-proxy and the host's iptables
    }
    for path, kind in wanted.items():
        found = host_path(docs, c, path)
        assert found is not None, f"{path} is not on a hostPath volume"
        on_host, volume = found
        assert on_host == path, f"{path} lands on the host at {on_host}"
        assert volume["hostPath"]["type"] == kind, path
    # the plugin's default subnet file is where the daemon writes it
    assert host_path(docs, c, opts.subnet_file)[0] == cni.DEFAULT_SUBNET_FILE


def test_install_cni_writes_where_the_runtime_looks(docs):
    c = container(docs, "install-cni", init=True)
    args = cli.build_parser().parse_args(c["args"])
    for path, host_default in ((args.bin_dir, install.DEFAULT_BIN_DIR), (args.conf_dir, install.DEFAULT_CONF_DIR)):
        found = host_path(docs, c, path)
        assert found is not None and found[0] == host_default, path
    # the standard plugins come from the image, not from a host directory mounted over them
    assert host_path(docs, c, args.plugins_from) is None
    assert not any(args.plugins_from.startswith(m["mountPath"]) for m in c["volumeMounts"])


def test_config_files_come_from_mounted_objects(docs):
    c = container(docs, "udpflannel")
    env = container_env(docs, c)
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}

    def source(path: str) -> tuple[dict, str]:
        directory, name = posixpath.split(path)
        assert directory in mounts, f"{path}: nothing mounted at {directory}"
        assert mounts[directory].get("readOnly") is True
        return volumes[mounts[directory]["name"]], name

    volume, name = source(env["FLANNELD_NET_CONFIG"])
    text = one(docs, "ConfigMap", volume["configMap"]["name"])["data"][name]
    cfg = netconfig.parse(text)  # the config the first daemon stores in etcd
    assert (cfg.backend_type, str(cfg.network)) == ("vxlan", json.loads(text)["Network"])
    for key in ("FLANNELD_ETCD_CAFILE", "FLANNELD_ETCD_CERTFILE", "FLANNELD_ETCD_KEYFILE"):
        volume, name = source(env[key])
        assert volume["secret"]["secretName"] == "udpflannel-etcd"
        assert name in {item["path"] for item in volume["secret"]["items"]}, key
