"""`flanneld ARGS` end to end through cli.main: Go's syntax and errors, flanneld's
environment rules (flagutil.SetFlagsFromEnv), the registry it picks, and `udpflannel
run`'s -v."""

from __future__ import annotations

import sys

import pytest

from udpflannel import cli, flanneld_cli

ETCD_DEFAULT = ("http://127.0.0.1:4001", "http://127.0.0.1:2379")


def options(argv, env=None):
    ns, _ = flanneld_cli.parse(argv, env or {})
    return cli._run_options(ns)


def refused(argv, env=None) -> str:
    with pytest.raises(flanneld_cli.FlanneldUsage) as e:
        flanneld_cli.parse(argv, env or {})
    return str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--etcd-end=http://x:2379"], "flag provided but not defined: -etcd-end"),
    (["-logtostderr"], "flag provided but not defined: -logtostderr"),  # not copied from klog by flanneld
    (["-healthz-port=x"], 'invalid value "x" for flag -healthz-port: parse error'),
    (["-healthz-port", "99999"], 'invalid value "99999" for flag -healthz-port: 99999 is not a port (0-65535)'),
    (["-subnet-lease-renew-margin=1.5"], 'invalid value "1.5" for flag -subnet-lease-renew-margin: parse error'),
    (["-subnet-lease-renew-margin=1440"],
     'invalid value "1440" for flag -subnet-lease-renew-margin: 1440 minutes is outside 1-1439'),
    (["-ip-masq=yes"], 'invalid boolean value "yes" for -ip-masq: parse error'),
    (["-v=x"], 'invalid value "x" for flag -v: parse error'),
    (["-dataplane", "turbo"], 'invalid value "turbo" for flag -dataplane: choose engine, kernel or auto'),
    (["-public-ip=10.1.2"], "invalid value \"10.1.2\" for flag -public-ip: '10.1.2' is not an IPv4 address"),
    (["-iface"], "flag needs an argument: -iface"),
    (["-ip-masq", "false"], 'unexpected argument "false": flanneld takes flags only, and would ignore it and '
                            "all that follows; a boolean takes its value as -ip-masq=false"),
    (["-iface", "eth0", "extra", "-ip-masq"], 'unexpected argument "extra": flanneld takes flags only, and '
                                              "would ignore it and all that follows"),
    (["--", "-ip-masq"], 'unexpected argument "-ip-masq": flanneld takes flags only, and would ignore it and '
                         "all that follows"),
])
def test_errors_are_one_line_exit_2(argv, message, capsys):
    assert refused(argv) == message
    assert cli.main(["flanneld", *argv]) == cli.EXIT_USAGE
    assert capsys.readouterr() == ("", f"udpflannel: error: {message}\n")


def test_go_values():
    opts = options(["-healthz-port=0x50", "--iptables-resync", "010", "-ip-masq", "-iface", "a", "-iface=b",
                    "--iface-regex", "^en", "-subnet-lease-renew-margin=+30", "--"])
    assert (opts.healthz_port, opts.rules_resync, opts.ip_masq) == (80, 8.0, True)
    assert (opts.ifaces, opts.iface_regex, opts.renew_margin) == (("a", "b"), ("^en",), 1800.0)


def test_udpflannel_s_own_flags_in_go_syntax():
    opts = options(["-dataplane=kernel", "--io", "threads", "-queues", "2", "-metrics-port=9100",
                    "-healthz-port", "10256", "-strict-source", "-subnet-lease-ttl=0.5", "-tun", "uf0",
                    "-net-config", "/etc/n.json"])
    assert (opts.dataplane, opts.io, opts.queues, opts.metrics_port) == ("kernel", "threads", 2, 9100)
    assert (opts.healthz_port, opts.strict_source, opts.lease_ttl, opts.tun) == (10256, True, 30.0, "uf0")
    assert opts.net_config == "/etc/n.json"
    env = {"FLANNELD_DATAPLANE": "auto", "FLANNELD_METRICS_PEERS": "true", "FLANNELD_CPUS": "0-1"}
    opts = options([], env)
    assert (opts.dataplane, opts.metrics_peers, opts.cpus) == ("auto", True, (0, 1))


def test_no_registry_flag_means_etcd_at_flanneld_s_default():
    opts = options([])
    assert opts.registry_kind == "etcd" and opts.etcd_endpoints == ETCD_DEFAULT
    assert options([], {"FLANNELD_ETCD_ENDPOINTS": ""}).etcd_endpoints == ETCD_DEFAULT  # empty is unset
    assert options([], {"FLANNELD_ETCD_ENDPOINTS": "http://10.0.0.1:2379"}).etcd_endpoints == (
        "http://10.0.0.1:2379",)


def test_the_embedded_registry_only_when_asked_for_and_alone():
    opts = options(["-registry-file", "/tmp/r.db"])
    assert opts.registry_kind == "embedded" and opts.registry_where == "/tmp/r.db: single host only"
    assert options([], {"FLANNELD_REGISTRY_FILE": "/tmp/r.db"}).registry_kind == "embedded"
    both = "-registry-file (the embedded registry) and -etcd-endpoints exclude each other; give one"
    assert refused(["-registry-file=/tmp/r.db", "-etcd-endpoints=http://a:2379"]) == both
    assert refused(["-registry-file=/tmp/r.db"], {"FLANNELD_ETCD_ENDPOINTS": "http://a:2379"}) == both
    assert refused(["-etcd-endpoints="]).startswith("-etcd-endpoints is empty")
    assert refused(["-etcd-endpoints", ","]).startswith("-etcd-endpoints is empty")


def test_environment_precedence_and_values_as_flanneld():
    # the command line wins, flag by flag; a list flag given on the command line ignores
    # its variable whole
    env = {"FLANNELD_IFACE": "eth9", "FLANNELD_IP_MASQ": "true", "FLANNELD_HEALTHZ_PORT": "8471",
           "FLANNELD_ETCD_PREFIX": "/env/network"}
    opts = options(["-iface", "eth1", "-ip-masq=false"], env)
    assert (opts.ifaces, opts.ip_masq, opts.healthz_port, opts.etcd_prefix) == (("eth1",), False, 8471,
                                                                                 "/env/network")
    # one value, commas and all: flanneld's flagSlice appends the variable whole
    assert options([], {"FLANNELD_IFACE": "eth0,eth1"}).ifaces == ("eth0,eth1",)
    # an empty variable is no variable
    assert options([], {"FLANNELD_IPTABLES_FORWARD_RULES": "", "FLANNELD_PUBLIC_IP": ""}).forward_rules is True
    # Go's values through the environment too
    assert options([], {"FLANNELD_HEALTHZ_PORT": "0x50", "FLANNELD_IP_MASQ": "T"}).healthz_port == 80


@pytest.mark.parametrize("env, message", [
    ({"FLANNELD_IP_MASQ": "yes"}, 'invalid value "yes" for FLANNELD_IP_MASQ: parse error'),
    ({"FLANNELD_HEALTHZ_PORT": "http"}, 'invalid value "http" for FLANNELD_HEALTHZ_PORT: parse error'),
    ({"FLANNELD_ENGINE": "bogus"}, 'invalid value "bogus" for FLANNELD_ENGINE: choose compiled or python'),
    ({"FLANNELD_NET_CONFIG": "/a", "FLANNELD_NET_CONFIG_PATH": "/b"},
     "environment FLANNELD_NET_CONFIG and FLANNELD_NET_CONFIG_PATH disagree; set one of them"),
])
def test_a_bad_variable_is_one_line_naming_it(env, message, monkeypatch, capsys):
    assert refused([], env) == message
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["flanneld"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == f"udpflannel: error: {message}\n"


def test_a_variable_whose_flag_is_on_the_command_line_is_not_even_checked():
    assert options(["-ip-masq"], {"FLANNELD_IP_MASQ": "yes"}).ip_masq is True


def test_help_lists_the_flags_and_exits_0(capsys):
    for argv in (["-h"], ["--help"], ["-ip-masq", "-help"]):
        assert cli.main(["flanneld", *argv]) == cli.EXIT_OK
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("Usage: udpflannel flanneld [OPTION]...")
        assert "\n  -etcd-endpoints (default 'http://127.0.0.1:4001,http://127.0.0.1:2379')\n" in err
        assert "\n  -ip-blackhole-route\n" in err


def test_a_file_named_flanneld_is_flanneld(monkeypatch, capsys):
    from udpflannel.version import __version__
    monkeypatch.setattr(sys, "argv", ["/opt/bin/flanneld", "--version"])
    assert cli.main() == cli.EXIT_OK
    assert capsys.readouterr().err == f"v{__version__}\n"
    monkeypatch.setattr(sys, "argv", ["/opt/bin/flanneld", "--etcd-end=x"])
    assert cli.main() == cli.EXIT_USAGE
    monkeypatch.setattr(sys, "argv", ["/usr/bin/udpflannel", "flanneld", "--etcd-end=x"])
    assert cli.main() == cli.EXIT_USAGE
    assert capsys.readouterr().err.count("flag provided but not defined: -etcd-end\n") == 2


# -- `udpflannel run` keeps argparse, and takes flanneld's -v ----------------------------

@pytest.mark.parametrize("argv, level", [
    ([], 0), (["-v"], 1), (["-v=2"], 2), (["-v", "3"], 3), (["--verbose"], 1), (["--verbose=4"], 4),
    (["-v", "--ip-masq"], 1)])
def test_run_takes_v_levels(argv, level):
    assert cli.build_parser().parse_args(["run", *argv]).verbose == level


def test_run_reads_the_environment_by_flanneld_s_rules():
    assert cli.env_flags({"FLANNELD_V": "2"}) == ["--verbose=2"]
    assert cli.env_flags({"FLANNELD_V": "2"}, ["-v=1"]) == []
    assert cli.env_flags({"FLANNELD_IFACE": "eth0,eth1"}) == ["--iface=eth0,eth1"]  # one value
    assert cli.env_flags({"FLANNELD_PUBLIC_IP": ""}) == []  # empty: unset
    assert cli.env_flags({"FLANNELD_NET_CONFIG_PATH": "/n.json"}) == ["--net-config=/n.json"]


def test_run_keeps_the_embedded_registry_and_says_what_it_is():
    args = cli.build_parser().parse_args(["run"])
    opts = cli._run_options(args)
    assert opts.registry_kind == "embedded"
    assert opts.registry_where == "/var/lib/udpflannel/registry.db: single host only"
    from udpflannel.core.status import NodeStatus, RegistryStatus
    from udpflannel.observe.statusview import render
    st = NodeStatus(version="0", started=0.0, ready=False,
                    registry=RegistryStatus(opts.registry_kind, opts.registry_where))
    assert "embedded /var/lib/udpflannel/registry.db: single host only, reachable" in render(st, now=0.0)
