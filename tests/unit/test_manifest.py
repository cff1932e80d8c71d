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
    assert args.plugin_form == "frozen"  # the host may have no Python: never the zipapp
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


# -- the kube-mode manifest (udpflannel-kube.yaml: kube-flannel.yml with flanneld swapped) --

KUBE_MANIFEST = os.path.join(os.path.dirname(MANIFEST), "udpflannel-kube.yaml")
POD_ENV = {"POD_NAME": "kube-flannel-ds-x7k2p", "POD_NAMESPACE": "kube-flannel"}  # the downward API's


@pytest.fixture(scope="module")
def kube_docs() -> list[dict]:
    with open(KUBE_MANIFEST) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kube_run_options(docs):
    """The main container's options as the daemon would read them: flanneld's command
    line and the container's environment (fieldRefs resolved as the kubelet would)."""
    from udpflannel import flanneld_cli
    c = container(docs, "kube-flannel")
    assert c["command"] == ["flanneld"]
    env = {}
    for item in c["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            field = item["valueFrom"]["fieldRef"]["fieldPath"]
            env[item["name"]] = {"metadata.name": POD_ENV["POD_NAME"],
                                 "metadata.namespace": POD_ENV["POD_NAMESPACE"]}[field]
    ns, warnings = flanneld_cli.parse(c["args"], env)
    assert warnings == []
    return cli._run_options(ns, env)


def test_kube_manifest_has_kube_flannel_yml_s_objects_and_role(kube_docs):
    from udpflannel.lab.kubeapi import FLANNEL_RBAC_YAML
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in kube_docs)
    assert kinds == [("ClusterRole", "flannel"), ("ClusterRoleBinding", "flannel"), ("ConfigMap", "kube-flannel-cfg"),
                     ("DaemonSet", "kube-flannel-ds"), ("Namespace", "kube-flannel"), ("ServiceAccount", "flannel")]
    # kube-flannel.yml's Namespace, role, binding and account, exactly (the lab applies those)
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(FLANNEL_RBAC_YAML)}
    for key, doc in theirs.items():
        assert one(kube_docs, *key) == doc, key
    ds = one(kube_docs, "DaemonSet")
    assert ds["spec"]["selector"] == {"matchLabels": {"app": "flannel"}}  # kube-flannel-ds's, immutable
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    spec = pod_spec(kube_docs)
    assert spec["serviceAccountName"] == "flannel" and spec.get("automountServiceAccountToken", True)
    assert spec["hostNetwork"] is True and spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    names = [v["name"] for v in spec["volumes"]]
    assert len(names) == len(set(names))
    for c in spec["initContainers"] + spec["containers"]:
        assert {m["name"] for m in c["volumeMounts"]} <= set(names), c["name"]


def test_kube_manifest_runs_flanneld_s_command_line_in_kube_mode(kube_docs):
    opts = kube_run_options(kube_docs)
    assert opts.kube_subnet_mgr and opts.ip_masq and opts.etcd_endpoints == ()
    assert (opts.pod_name, opts.pod_namespace, opts.node_name) == (POD_ENV["POD_NAME"], POD_ENV["POD_NAMESPACE"], None)
    assert (opts.event_queue_depth, opts.cont_when_cache_not_ready) == (5000, False)
    assert opts.kube_api_url is None and opts.kubeconfig_file is None  # the pod's in-cluster credentials
    assert opts.set_node_network_unavailable and opts.kube_annotation_prefix == "flannel.alpha.coreos.com"
    c = container(kube_docs, "kube-flannel")
    sc = c["securityContext"]
    assert sc.get("privileged", False) is False and set(sc["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        assert (get["path"], get["port"], get.get("host", "0.0.0.0")) == (path, opts.healthz_port, opts.healthz_ip)


def test_kube_manifest_upgrades_by_takeover(kube_docs):
    rolling = one(kube_docs, "DaemonSet")["spec"]["updateStrategy"]
    assert rolling == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    opts = kube_run_options(kube_docs)
    assert opts.takeover == "wait"  # the old pod idles until deleted: an exit would be restarted
    c = container(kube_docs, "kube-flannel")
    # the admin socket the new pod hands over through is the host's, shared by both pods
    assert host_path(kube_docs, c, os.path.dirname(opts.admin_path))[0] == os.path.dirname(opts.admin_path)


def test_kube_manifest_paths_are_the_hosts(kube_docs):
    c = container(kube_docs, "kube-flannel")
    opts = kube_run_options(kube_docs)
    for path, kind in {os.path.dirname(opts.subnet_file): "DirectoryOrCreate", opts.state_dir: "DirectoryOrCreate",
                       os.path.dirname(opts.admin_path): "DirectoryOrCreate", "/dev/net/tun": "CharDevice",
                       "/run/xtables.lock": "FileOrCreate"}.items():
        found = host_path(kube_docs, c, path)
        assert found is not None and found[0] == path and found[1]["hostPath"]["type"] == kind, path
    assert host_path(kube_docs, c, opts.subnet_file)[0] == cni.DEFAULT_SUBNET_FILE


def test_kube_manifest_configs_are_the_configmap_s(kube_docs):
    c = container(kube_docs, "kube-flannel")
    opts = kube_run_options(kube_docs)
    cfg_map = one(kube_docs, "ConfigMap", "kube-flannel-cfg")["data"]
    directory, name = posixpath.split(opts.net_config)  # flanneld's default, /etc/kube-flannel/net-conf.json
    mount = next(m for m in c["volumeMounts"] if m["mountPath"].rstrip("/") == directory)
    assert mount["name"] == "flannel-cfg" and mount.get("readOnly") is True
    cfg = netconfig.parse(cfg_map[name])
    assert (str(cfg.network), cfg.backend_type) == ("10.244.0.0/16", "vxlan")
    # cni-conf.json is kube-flannel.yml's list with flannel's plugin swapped for ours: the shipped one
    assert json.loads(cfg_map["cni-conf.json"]) == json.loads(install.shipped_conflist())


def test_kube_manifest_installs_the_cni_plugin_and_the_configmap_s_list(kube_docs):
    c = container(kube_docs, "install-cni", init=True)
    assert c["command"][:2] == ["sh", "-c"] and len(c["command"]) == 3
    steps = [s.strip().split() for s in c["command"][2].split("&&")]
    assert steps[0][:2] == ["udpflannel", "install-cni"]
    args = cli.build_parser().parse_args(steps[0][1:])
    for path, default in ((args.bin_dir, install.DEFAULT_BIN_DIR), (args.conf_dir, install.DEFAULT_CONF_DIR)):
        assert host_path(kube_docs, c, path)[0] == default, path
    assert host_path(kube_docs, c, args.plugins_from) is None  # the image's plugins
    assert args.plugin_form == "frozen"  # the host may have no Python: never the zipapp
    final = os.path.join(args.conf_dir, install.CONFLIST_NAME)
    temp = os.path.join(args.conf_dir, "." + install.CONFLIST_NAME + ".new")
    assert steps[1] == ["cp", "/etc/kube-flannel/cni-conf.json", temp]
    assert steps[2] == ["mv", temp, final]  # a rename: the runtime reads the old list or the new one
    assert next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/kube-flannel/")["name"] == "flannel-cfg"
