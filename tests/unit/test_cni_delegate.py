"""The CNI plugin's pure part against flannel's own plugin.

Golden cases are taken from flannel-io/cni-plugin: flannel_linux_test.go ("uses dataDir
for storing network configuration with ipv4 stack": the saved delegate; "getDelegateIPAM":
the IPAM section), and the rules from flannel.go (cmdAdd: delegate checks) and
flannel_linux.go (doCmdAdd, getDelegateIPAM). Versions and error codes follow libcni's
pkg/skel/skel.go and the spec's well-known codes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from udpflannel.cni import delegate as cni
from udpflannel.cni.delegate import CniError
from udpflannel.core import subnetenv

# flannel_linux_test.go: onlyIpv4FlannelSubnetEnv
FLANNEL_TEST_ENV = """
FLANNEL_NETWORK=10.1.0.0/16
FLANNEL_SUBNET=10.1.17.1/24
FLANNEL_MTU=1472
FLANNEL_IPMASQ=true
"""


def env(text: str = FLANNEL_TEST_ENV) -> subnetenv.SubnetEnv:
    return cni.load_subnet_env(text, "subnet.env")


def netconf(**extra) -> cni.NetConf:
    return cni.load_netconf({"cniVersion": "1.0.0", "name": "cni-flannel", "type": "udpflannel-cni", **extra})


def test_render_matches_flannels_saved_delegate():
    # flannel_linux_test.go's expected file, plus cniVersion (flannel copies the
    # netconf's; its test netconf has none, ours must have one).
    assert cni.render_delegate(netconf(), env()) == {
        "cniVersion": "1.0.0",
        "ipMasq": False,
        "ipam": {"routes": [{"dst": "10.1.0.0/16"}], "ranges": [[{"subnet": "10.1.17.0/24"}]],
                 "type": "host-local"},
        "isGateway": True,
        "mtu": 1472,
        "name": "cni-flannel",
        "type": "bridge",
    }


@pytest.mark.parametrize("flannel_masq, bridge_masq", [("true", False), ("false", True)])
def test_ipmasq_is_the_inverse_of_flannels(flannel_masq, bridge_masq):
    # flannel_linux.go doCmdAdd: "if flannel is not doing ipmasq, we should"
    text = FLANNEL_TEST_ENV.replace("FLANNEL_IPMASQ=true", f"FLANNEL_IPMASQ={flannel_masq}")
    assert cni.render_delegate(netconf(), env(text))["ipMasq"] is bridge_masq


def test_mtu_comes_from_subnet_env():
    text = FLANNEL_TEST_ENV.replace("1472", "1400")
    assert cni.render_delegate(netconf(), env(text))["mtu"] == 1400


def test_given_ipam_keeps_its_keys_and_routes_network_route_last():
    # flannel_linux_test.go "when input IPAM is provided with ipv4 stack"
    ipam = {"type": "my-ipam", "unknown-param": "unknown-value",
            "routes": [{"dst": "10.96.0.0/12"}, {"dst": "192.168.244.0/24", "gw": "10.1.17.20"}],
            "ranges": [[{"subnet": "172.16.0.0/24"}]]}  # ranges always replaced
    assert cni.render_delegate(netconf(ipam=ipam), env())["ipam"] == {
        "type": "my-ipam", "unknown-param": "unknown-value",
        "routes": [{"dst": "10.96.0.0/12"}, {"dst": "192.168.244.0/24", "gw": "10.1.17.20"},
                   {"dst": "10.1.0.0/16"}],
        "ranges": [[{"subnet": "10.1.17.0/24"}]],
    }


def test_given_ipam_without_type_gets_host_local():
    # flannel_linux_test.go "when input IPAM is provided without 'type'"
    rendered = cni.render_delegate(netconf(ipam={"dataDir": "/tmp/x"}), env())
    assert rendered["ipam"]["type"] == "host-local"
    assert rendered["ipam"]["dataDir"] == "/tmp/x"


def test_rendering_does_not_change_the_netconf():
    conf = netconf(ipam={"routes": [{"dst": "10.96.0.0/12"}]}, delegate={"hairpinMode": True})
    cni.render_delegate(conf, env())
    assert conf.raw["ipam"] == {"routes": [{"dst": "10.96.0.0/12"}]}
    assert conf.raw["delegate"] == {"hairpinMode": True}


def test_delegate_keys_win_over_defaults():
    # flannel_linux.go doCmdAdd: type, ipMasq, mtu, isGateway only set when absent
    delegate = {"type": "bridge", "ipMasq": True, "mtu": 1300, "isGateway": False,
                "hairpinMode": True, "isDefaultGateway": True, "bridge": "kbr0"}
    rendered = cni.render_delegate(netconf(delegate=delegate), env())
    for key, value in delegate.items():
        assert rendered[key] == value


def test_non_bridge_delegate_gets_no_is_gateway():
    rendered = cni.render_delegate(netconf(delegate={"type": "ipvlan", "master": "eth0"}), env())
    assert rendered["type"] == "ipvlan" and rendered["master"] == "eth0"
    assert "isGateway" not in rendered


def test_name_and_cni_version_always_come_from_the_netconf():
    rendered = cni.render_delegate(netconf(delegate={"cniVersion": "0.3.0"}), env())
    assert rendered["cniVersion"] == "1.0.0" and rendered["name"] == "cni-flannel"


def test_runtime_config_reaches_the_delegate():
    rc = {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}
    assert cni.render_delegate(netconf(runtimeConfig=rc), env())["runtimeConfig"] == rc


@pytest.mark.parametrize("delegate, code, words", [
    ({"name": "other"}, cni.UNSUPPORTED_FIELD, ["name", "other"]),
    ({"ipam": {"type": "dhcp"}}, cni.UNSUPPORTED_FIELD, ["ipam", "dhcp"]),
    ({"type": 7}, cni.INVALID_NETWORK_CONFIG, ["(string) 'type'"]),
])
def test_delegate_fields_flannel_refuses(delegate, code, words):
    # flannel.go cmdAdd refuses the same three
    with pytest.raises(CniError) as e:
        cni.render_delegate(netconf(delegate=delegate), env())
    assert e.value.code == code
    assert all(w in e.value.msg for w in words)


@pytest.mark.parametrize("routes", ["10.0.0.0/8", [{"gw": "10.0.0.1"}], [{"dst": "not-a-cidr"}],
                                    [{"dst": "10.0.0.0/8", "gw": "nope"}], ["10.0.0.0/8"]])
def test_bad_ipam_routes_are_refused(routes):
    with pytest.raises(CniError) as e:
        cni.render_delegate(netconf(ipam={"routes": routes}), env())
    assert e.value.code == cni.INVALID_NETWORK_CONFIG


# --- netconf and subnet.env ---------------------------------------------------------

def test_netconf_defaults_are_flannels():
    conf = netconf()
    assert conf.subnet_file == "/run/flannel/subnet.env"
    assert conf.data_dir == "/var/lib/cni/flannel"
    assert conf.delegate is None and conf.ipam is None and conf.prev_result is None


@pytest.mark.parametrize("raw, code", [
    ([], cni.DECODING_FAILURE),
    ({"cniVersion": "1.0.0"}, cni.INVALID_NETWORK_CONFIG),                      # no name
    ({"cniVersion": "1.0.0", "name": "../x"}, cni.INVALID_NETWORK_CONFIG),
    ({"cniVersion": "1.0.0", "name": "n", "delegate": "bridge"}, cni.INVALID_NETWORK_CONFIG),
    ({"cniVersion": "1.0.0", "name": "n", "ipam": []}, cni.INVALID_NETWORK_CONFIG),
    ({"cniVersion": "1.0.0", "name": "n", "dataDir": ""}, cni.INVALID_NETWORK_CONFIG),
    ({"cniVersion": "1.0.0", "name": "n", "subnetFile": 3}, cni.INVALID_NETWORK_CONFIG),
    ({"cniVersion": 1, "name": "n"}, cni.DECODING_FAILURE),
])
def test_bad_netconf(raw, code):
    with pytest.raises(CniError) as e:
        cni.load_netconf(raw)
    assert e.value.code == code


def test_subnet_env_needs_mtu_and_ipmasq_like_flannel():
    # flannel.go loadFlannelSubnetEnv: "... is missing FLANNEL_MTU, FLANNEL_IPMASQ"
    with pytest.raises(CniError) as e:
        env("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\n")
    assert e.value.code == cni.BAD_SUBNET_ENV
    assert e.value.msg == "subnet.env is missing FLANNEL_MTU, FLANNEL_IPMASQ"


def test_subnet_env_bad_value():
    with pytest.raises(CniError) as e:
        env(FLANNEL_TEST_ENV.replace("1472", "big"))
    assert e.value.code == cni.BAD_SUBNET_ENV and "FLANNEL_MTU" in e.value.msg


# --- versions -------------------------------------------------------------------------

def test_version_answer():
    # flannel's plugin: libcni's version.All (0.1.0 to 1.1.0, CNI library 1.x)
    assert cni.version_info() == {"cniVersion": "1.1.0", "supportedVersions": [
        "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_supported_versions_pass(version):
    cni.check_version(version, "ADD")
    cni.check_version(version, "DEL")


@pytest.mark.parametrize("version", ["0.2.1", "1.2.0", "2.0.0"])
def test_unsupported_versions_are_code_1(version):
    with pytest.raises(CniError) as e:
        cni.check_version(version, "ADD")
    assert e.value.code == cni.INCOMPATIBLE_VERSION
    assert version in e.value.details


def test_missing_version_means_0_1_0():
    # libcni ConfigDecoder: no cniVersion is 0.1.0, which flannel's plugin takes
    assert cni.config_version({"name": "n"}) == "0.1.0"
    cni.check_version("0.1.0", "ADD")


@pytest.mark.parametrize("command", ["GC", "STATUS"])
def test_gc_and_status_need_1_1_0(command):
    with pytest.raises(CniError) as e:
        cni.check_version("1.0.0", command)
    assert e.value.code == cni.INCOMPATIBLE_VERSION and e.value.msg == f"config version does not allow {command}"
    cni.check_version("1.1.0", command)


@pytest.mark.parametrize("wanted, supported, gets", [
    ("1.1.0", ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"], "1.0.0"),  # Debian's bridge
    ("1.1.0", ["1.0.0", "1.1.0"], "1.1.0"),
    ("1.0.0", ["0.3.1", "0.4.0"], "0.4.0"),
    ("0.4.0", ["0.3.0", "0.3.1", "1.0.0"], "0.3.1"),  # never a newer one
    ("0.2.0", ["0.1.0", "0.2.0", "1.0.0"], "0.2.0"),
])
def test_the_delegate_gets_the_netconf_version_or_the_highest_below_that_converts(wanted, supported, gets):
    assert cni.delegate_version(wanted, supported, "bridge") == gets


@pytest.mark.parametrize("wanted, supported", [("0.2.0", ["0.3.0", "1.0.0"]), ("1.0.0", ["0.1.0", "0.2.0"]),
                                               ("0.3.0", ["0.4.0", "1.0.0"])])
def test_no_usable_delegate_version_is_code_1(wanted, supported):
    with pytest.raises(CniError) as e:
        cni.delegate_version(wanted, supported, "bridge")
    assert e.value.code == cni.INCOMPATIBLE_VERSION and f"cniVersion {wanted}" in e.value.msg


def test_version_answers_are_read_as_libcni_reads_them():
    assert cni.parse_version_info(b'{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0"]}') == \
        ("0.4.0", "1.0.0")
    assert cni.parse_version_info(b'{"cniVersion":"0.2.0"}') == ("0.1.0", "0.2.0")  # legacy
    for bad in (b"nope", b"[]", b'{"supportedVersions": "1.0.0"}'):
        with pytest.raises(CniError):
            cni.parse_version_info(bad)


def test_garbage_version_is_a_decoding_failure():
    with pytest.raises(CniError) as e:
        cni.check_version("one", "ADD")
    assert e.value.code == cni.DECODING_FAILURE


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1"])
def test_check_needs_0_4_0(version):
    # skel.go: "config version does not allow CHECK"
    with pytest.raises(CniError) as e:
        cni.check_version(version, "CHECK")
    assert e.value.code == cni.INCOMPATIBLE_VERSION
    cni.check_version("0.4.0", "CHECK")


RESULT_040 = {"cniVersion": "0.4.0",
              "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/var/run/netns/p"}],
              "ips": [{"version": "4", "address": "10.1.17.2/24", "gateway": "10.1.17.1", "interface": 0}],
              "routes": [{"dst": "10.1.0.0/16", "gw": "10.1.17.1"}],
              "dns": {}}


def test_result_passes_through_when_versions_match():
    assert cni.convert_result(RESULT_040, "0.4.0") is RESULT_040


def test_result_up_to_1_0_0_drops_ip_version_and_back():
    up = cni.convert_result(RESULT_040, "1.0.0")
    assert up["cniVersion"] == "1.0.0"
    assert up["ips"] == [{"address": "10.1.17.2/24", "gateway": "10.1.17.1", "interface": 0}]
    assert up["interfaces"] == RESULT_040["interfaces"] and up["routes"] == RESULT_040["routes"]
    down = cni.convert_result(up, "0.3.1")
    assert down == dict(RESULT_040, cniVersion="0.3.1")
    v6 = cni.convert_result({"cniVersion": "1.0.0", "ips": [{"address": "fc00::2/64"}]}, "0.4.0")
    assert v6["ips"] == [{"address": "fc00::2/64", "version": "6"}]


def test_results_of_1_0_0_and_1_1_0_are_one_format():
    up = cni.convert_result(RESULT_040, "1.1.0")
    assert up["cniVersion"] == "1.1.0" and "version" not in up["ips"][0]
    assert cni.convert_result(dict(up, cniVersion="1.0.0"), "1.1.0") == up


def test_result_from_an_unknown_version_is_refused():
    with pytest.raises(CniError) as e:
        cni.convert_result({"cniVersion": "0.2.0", "ip4": {}}, "1.0.0")
    assert e.value.code == cni.INCOMPATIBLE_VERSION


# --- environment and errors ----------------------------------------------------------

GOOD_ENV = {"CNI_CONTAINERID": "abc123", "CNI_NETNS": "/var/run/netns/p", "CNI_IFNAME": "eth0",
            "CNI_PATH": "/usr/lib/cni"}


def test_environment_complete():
    cni.check_environment("ADD", GOOD_ENV)
    cni.check_environment("DEL", {k: v for k, v in GOOD_ENV.items() if k != "CNI_NETNS"})  # optional for DEL


def test_environment_missing_names_every_variable():
    with pytest.raises(CniError) as e:
        cni.check_environment("ADD", {"CNI_IFNAME": "eth0"})
    assert e.value.code == cni.INVALID_ENVIRONMENT
    assert e.value.msg == "required env variables [CNI_CONTAINERID,CNI_NETNS,CNI_PATH] missing"


@pytest.mark.parametrize("key, value", [("CNI_CONTAINERID", "../../etc/passwd"), ("CNI_CONTAINERID", ".hidden"),
                                        ("CNI_IFNAME", "a" * 16), ("CNI_IFNAME", "eth/0"), ("CNI_IFNAME", "..")])
def test_environment_values_that_are_unsafe(key, value):
    with pytest.raises(CniError) as e:
        cni.check_environment("ADD", dict(GOOD_ENV, **{key: value}))
    assert e.value.code == cni.INVALID_ENVIRONMENT


def test_error_json_has_the_spec_fields():
    err = CniError(cni.TRY_AGAIN_LATER, "not yet", "details here")
    assert err.to_json("0.3.1") == {"cniVersion": "0.3.1", "code": 11, "msg": "not yet", "details": "details here"}
    # an unknown or unsupported version is not echoed back: the error speaks ours
    assert err.to_json(None)["cniVersion"] == "1.1.0"
    assert err.to_json("0.1.0")["cniVersion"] == "0.1.0"
    assert err.to_json("9.9.9")["cniVersion"] == "1.1.0"


def test_shipped_conflist_is_flannels_with_our_type():
    # kube-flannel.yml's cni-conf.json with "flannel" replaced by "udpflannel-cni"
    path = os.path.join(os.path.dirname(cni.__file__), "10-udpflannel.conflist")
    with open(path) as f:
        conflist = json.load(f)
    assert conflist["name"] == "cbr0" and conflist["cniVersion"] in cni.SUPPORTED_VERSIONS
    ours, portmap = conflist["plugins"]
    assert ours == {"type": "udpflannel-cni", "delegate": {"hairpinMode": True, "isDefaultGateway": True}}
    assert portmap == {"type": "portmap", "capabilities": {"portMappings": True}}


def test_plugin_imports_nothing_heavy():
    # The runtime starts the plugin once per pod: no event loop, gRPC or netlink stack.
    code = ("import sys, udpflannel.cni.plugin; "
            "print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True, timeout=30).stdout.split())
    assert not loaded & {"uvloop", "grpc", "pyroute2", "aetcd", "asyncio", "aiohttp", "msgpack",
                         "prometheus_client", "pytun", "sqlite3",
                         "typing", "tempfile", "shutil", "random"}  # a few ms each, at every start
    ours = subprocess.run([sys.executable, "-c", code.replace("m.split('.')[0] ", "m ")], capture_output=True,
                          text=True, check=True, timeout=30).stdout.split()
    assert sorted(m for m in ours if m.startswith("udpflannel")) == [
        "udpflannel", "udpflannel.cni", "udpflannel.cni.delegate", "udpflannel.cni.plugin",
        "udpflannel.core", "udpflannel.core.errors", "udpflannel.core.subnetenv"]


def test_valid_attachments_are_container_ids():
    conf = cni.load_netconf({"name": "n", "cni.dev/valid-attachments": [
        {"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "net1"}]})
    assert cni.valid_attachments(conf) == {"a", "b"}
    assert cni.valid_attachments(cni.load_netconf({"name": "n"})) == set()
    for bad in ("x", [{"ifname": "eth0"}], ["a"]):
        with pytest.raises(CniError) as e:
            cni.valid_attachments(cni.load_netconf({"name": "n", "cni.dev/valid-attachments": bad}))
        assert e.value.code == cni.INVALID_NETWORK_CONFIG
