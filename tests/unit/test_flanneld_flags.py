"""Every flag of flanneld and every FLANNELD_* variable, honoured or refused by name.

The tables below are taken from flannel v0.28.9's main.go (init(): the flags registered
on flannelFlags, plus klog's v, vmodule and log_backtrace_at copied in by copyFlag) and
coreos/pkg flagutil.SetFlagsFromEnv (FLANNELD_<FLAG> for every one of them). A test
checks the tables against that main.go: `make setup` builds the lab's flanneld from the
module peers/flannel/go.mod pins, so the Go module cache holds it.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from udpflannel import cli, flanneld_cli
from udpflannel.flanneld_cli import env_name

FLANNEL_GO_MOD = Path(__file__).resolve().parents[2] / "peers" / "flannel" / "go.mod"
FLANNELD_DEFAULT_ENDPOINTS = ("http://127.0.0.1:4001", "http://127.0.0.1:2379")

# flag -> (a value to give it (None: a boolean given bare), RunOptions field, what that
# value becomes, the field's value when the flag is not given)
HONOURED = {
    "etcd-endpoints": ("http://10.0.0.5:2379,https://10.0.0.6:2379", "etcd_endpoints",
                       ("http://10.0.0.5:2379", "https://10.0.0.6:2379"), FLANNELD_DEFAULT_ENDPOINTS),
    "etcd-prefix": ("/x/network", "etcd_prefix", "/x/network", "/coreos.com/network"),
    "etcd-keyfile": ("/etc/k.pem", "etcd_keyfile", "/etc/k.pem", None),
    "etcd-certfile": ("/etc/c.pem", "etcd_certfile", "/etc/c.pem", None),
    "etcd-cafile": ("/etc/ca.pem", "etcd_cafile", "/etc/ca.pem", None),
    "etcd-username": ("flannel", "etcd_username", "flannel", None),
    "etcd-password": ("s3cret", "etcd_password", "s3cret", None),
    "iface": ("eth1", "ifaces", ("eth1",), ()),
    "iface-regex": ("^en", "iface_regex", ("^en",), ()),
    "iface-can-reach": ("10.1.2.3", "iface_can_reach", "10.1.2.3", None),
    "subnet-file": ("/tmp/s.env", "subnet_file", "/tmp/s.env", "/run/flannel/subnet.env"),
    "public-ip": ("10.0.0.9", "public_ip", "10.0.0.9", None),
    "public-ipv6": ("fd00::9", "public_ipv6", "fd00::9", None),
    "subnet-lease-renew-margin": ("30", "renew_margin", 1800.0, 3600.0),
    "ip-masq": (None, "ip_masq", True, False),
    "ip-masq-fully-random-disable": (None, "ip_masq_fully_random", False, True),
    "healthz-ip": ("127.0.0.1", "healthz_ip", "127.0.0.1", "0.0.0.0"),
    "healthz-port": ("10256", "healthz_port", 10256, 0),
    "iptables-resync": ("9", "rules_resync", 9.0, 5.0),
    "iptables-forward-rules": ("false", "forward_rules", False, True),
    "ip-blackhole-route": (None, "ip_blackhole_route", True, False),
    # flanneld reads it only with --kube-subnet-mgr (default /etc/kube-flannel/net-conf.json, see
    # test_kube_mode_defaults); udpflannel stores this config in etcd when etcd has none, and
    # reads no file unless asked
    "net-config-path": ("/etc/net.json", "net_config", "/etc/net.json", None),
    "kube-subnet-mgr": (None, "kube_subnet_mgr", True, False),
    "kube-api-url": ("https://10.0.0.1:6443", "kube_api_url", "https://10.0.0.1:6443", None),
    "kubeconfig-file": ("/etc/kube.conf", "kubeconfig_file", "/etc/kube.conf", None),
    "kube-annotation-prefix": ("example.com/x", "kube_annotation_prefix", "example.com/x",
                               "flannel.alpha.coreos.com"),
    "set-node-network-unavailable": ("false", "set_node_network_unavailable", False, True),
}
# flags that are not options of the node: -v is the log level, -version prints and exits
OTHER = {"v", "version"}
# flag -> the start of the reason given (the whole message is asserted against cli.REFUSED)
REFUSED = {
    "vmodule": "klog's per-Go-file verbosity", "log_backtrace_at": "klog's stack trace",
}
BOOLEAN_REFUSED: set[str] = set()


def options(argv, env=None):
    ns, _ = flanneld_cli.parse(argv, env or {})
    return cli._run_options(ns, env or {})


def test_the_table_is_flanneld_s_flag_set():
    assert set(HONOURED) | OTHER | set(REFUSED) == set(flanneld_cli.FLANNELD_FLAGS)
    assert not set(HONOURED) & set(REFUSED)
    assert {f"--{name}" for name in REFUSED} <= set(cli.REFUSED)  # one table of refusals


def flannel_main_go() -> str:
    """main.go of the flannel release the lab's flanneld is built from, in the Go module
    cache: `go env GOMODCACHE`, or Go's default ($GOPATH or ~/go, then pkg/mod) when go
    is not on this PATH (sudo's, say)."""
    pinned = re.search(r"^require github\.com/flannel-io/flannel (v\S+)$", FLANNEL_GO_MOD.read_text(), re.M)
    assert pinned, f"{FLANNEL_GO_MOD} does not pin github.com/flannel-io/flannel"
    try:
        cache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        cache = os.path.join(os.environ.get("GOPATH") or os.path.expanduser("~/go"), "pkg", "mod")
    path = os.path.join(cache, f"github.com/flannel-io/flannel@{pinned[1]}", "main.go")
    assert os.path.exists(path), (f"{path} is missing: make setup builds flanneld from that module "
                                  "(or: cd peers/flannel && go mod download github.com/flannel-io/flannel)")
    return path


def test_the_table_matches_flannel_s_main_go():
    with open(flannel_main_go()) as f:
        source = f.read()
    registered = set(re.findall(r'flannelFlags\.\w*Var\(&opts\.\w+, "([^"]+)"', source))
    registered |= set(re.findall(r'flannelFlags\.Var\(&opts\.\w+, "([^"]+)"', source))
    registered |= set(re.findall(r'copyFlag\("([^"]+)"\)', source))
    assert registered == set(HONOURED) | OTHER | set(REFUSED)
    defaults = re.findall(r'flannelFlags\.\w+Var\(&opts\.\w+, "([^"]+)", (?:"([^"]*)"|([\w.]+)),', source)
    assert len(defaults) == len(registered) - 2 - 3  # all but the two lists and klog's three
    for name, quoted, bare in defaults:
        assert flanneld_cli.FLANNELD_FLAGS[name][1] == (quoted or bare), name


@pytest.mark.parametrize("flag", sorted(HONOURED))
def test_each_honoured_flag(flag):
    value, field, want, default = HONOURED[flag]
    assert getattr(options([]), field) == default
    if value is None:
        forms = [[f"-{flag}"], [f"--{flag}"], [f"-{flag}=true"]]
    elif flanneld_cli.FLANNELD_FLAGS[flag][0] == "bool":  # never `-flag false`
        forms = [[f"-{flag}={value}"], [f"--{flag}={value}"]]
    else:
        forms = [[f"-{flag}", value], [f"--{flag}", value], [f"-{flag}={value}"], [f"--{flag}={value}"]]
    for argv in forms:
        assert getattr(options(argv), field) == want, argv
    env = {env_name(flag): "true" if value is None else value}
    assert getattr(options([], env), field) == want


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_each_refused_flag(flag, capsys):
    reason = cli.REFUSED[f"--{flag}"]
    assert reason.startswith(REFUSED[flag]) and "; use " in reason
    value = [] if flag in BOOLEAN_REFUSED else ["x"]
    assert cli.main(["flanneld", f"-{flag}", *value]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == f"udpflannel: error: --{flag} is not supported: {reason}\n"
    with pytest.raises(flanneld_cli.FlanneldUsage) as e:
        options([], {env_name(flag): "true"})
    assert str(e.value) == f"environment {env_name(flag)}: --{flag} is not supported: {reason}"


def test_a_refused_flag_asking_for_nothing_passes():
    assert options(["-kube-subnet-mgr=false", "-vmodule="]).ip_masq is False
    assert options([], {"FLANNELD_KUBE_SUBNET_MGR": "false"}).etcd_endpoints == FLANNELD_DEFAULT_ENDPOINTS


def test_refused_booleans_take_no_value_argument():
    # -auto-detect-ipv6 was a boolean in flanneld: the next argument is not its value
    with pytest.raises(flanneld_cli.FlanneldUsage, match="--auto-detect-ipv6 is not supported"):
        options(["-auto-detect-ipv6", "-ip-masq"])


def test_kube_manager_variables_alone_change_nothing():
    """NODE_NAME, POD_NAME, ... are read by flanneld's Kubernetes subnet manager only:
    without --kube-subnet-mgr they change nothing, in flanneld or here."""
    env = dict.fromkeys(flanneld_cli.KUBE_ENV, "x")
    assert options([], env) == options([])


def test_kube_mode_reads_the_pod_s_identity_and_flanneld_s_variables():
    env = {"POD_NAME": "kube-flannel-ds-x", "POD_NAMESPACE": "kube-flannel", "EVENT_QUEUE_DEPTH": "5000",
           "CONT_WHEN_CACHE_NOT_READY": "false"}
    got = options(["-ip-masq", "-kube-subnet-mgr"], env)  # kube-flannel.yml's command line and env
    assert (got.kube_subnet_mgr, got.pod_name, got.pod_namespace, got.node_name) == \
        (True, "kube-flannel-ds-x", "kube-flannel", None)
    assert (got.event_queue_depth, got.cont_when_cache_not_ready) == (5000, False)
    assert got.registry_kind == "kube" and got.etcd_endpoints == ()
    assert options(["-kube-subnet-mgr"], {"NODE_NAME": "n1"}).node_name == "n1"
    assert options(["-kube-subnet-mgr"], {"CONT_WHEN_CACHE_NOT_READY": "true"}).cont_when_cache_not_ready
    assert not options(["-kube-subnet-mgr"], {"CONT_WHEN_CACHE_NOT_READY": "True"}).cont_when_cache_not_ready
    # EVENT_QUEUE_DEPTH: strconv.Atoi, and only a positive depth replaces flanneld's 5000
    for text, depth in (("7", 7), ("+12", 12), ("0", 5000), ("-3", 5000), ("", 5000)):
        assert options(["-kube-subnet-mgr"], {"EVENT_QUEUE_DEPTH": text}).event_queue_depth == depth, text
    for bad in ("x", "1e3", " 5", "5_000"):
        with pytest.raises(cli.BadInput, match="EVENT_QUEUE_DEPTH"):
            options(["-kube-subnet-mgr"], {"EVENT_QUEUE_DEPTH": bad})


def test_kube_mode_defaults():
    got = options(["-kube-subnet-mgr"], {"NODE_NAME": "n1"})
    assert got.net_config == "/etc/kube-flannel/net-conf.json"  # flanneld's -net-config-path default
    assert got.kube_annotation_prefix == "flannel.alpha.coreos.com" and got.set_node_network_unavailable
    assert options(["-kube-subnet-mgr", "-net-config-path=/x.json"], {}).net_config == "/x.json"


def test_kube_mode_ignores_the_etcd_flags_as_flanneld_does():
    ns, warnings = flanneld_cli.parse(["-kube-subnet-mgr", "-etcd-endpoints=http://10.0.0.1:2379"], {})
    assert cli._run_options(ns, {}).etcd_endpoints == ()
    assert warnings == ["-etcd-endpoints ignored: with -kube-subnet-mgr Kubernetes gives the subnet (as in "
                        "flanneld)"]
    with pytest.raises(flanneld_cli.FlanneldUsage, match="exclude each other"):
        flanneld_cli.parse(["-kube-subnet-mgr", "-registry-file=/x.db"], {})


def test_a_bad_annotation_prefix_is_one_line(capsys):
    assert cli.main(["flanneld", "-kube-annotation-prefix=a/b/c"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "-kube-annotation-prefix" in err and "at most one '/'" in err, err


@pytest.mark.parametrize("argv, level", [([], 0), (["-v=2"], 2), (["-v", "3"], 3), (["--v=1"], 1)])
def test_v_is_the_log_level(argv, level):
    ns, _ = flanneld_cli.parse(argv, {})
    assert ns.verbose == level
    assert flanneld_cli.parse([], {"FLANNELD_V": "4"})[0].verbose == 4


def test_version_prints_the_version_alone_on_stderr(capsys):
    from udpflannel.version import __version__
    for argv in (["-version"], ["--version"], ["-version=true", "-ip-masq"]):
        assert cli.main(["flanneld", *argv]) == cli.EXIT_OK
        assert capsys.readouterr() == ("", f"v{__version__}\n")


def test_flanneld_version_variable_has_no_effect_as_in_flanneld():
    ns, warnings = flanneld_cli.parse([], {"FLANNELD_VERSION": "true"})
    assert warnings == ["FLANNELD_VERSION=true has no effect: flanneld reads -version before the environment"]


def test_every_flag_has_its_variable():
    """flagutil.SetFlagsFromEnv: FLANNELD_ + the name upper-cased, dashes as underscores."""
    assert env_name("subnet-lease-renew-margin") == "FLANNELD_SUBNET_LEASE_RENEW_MARGIN"
    assert env_name("log_backtrace_at") == "FLANNELD_LOG_BACKTRACE_AT"
    assert env_name("v") == "FLANNELD_V"
