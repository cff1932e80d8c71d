"""udpflannel-cni as a process, with a fake delegate (a shell script on CNI_PATH that
logs what it was given). The real bridge/host-local run in tests/integration/test_cni.py.

Every test runs against both forms install-cni installs: the zipapp (run by this
Python) and the frozen executable `make setup` builds (packaging/cni/freeze.py); a
missing or stale frozen plugin fails the test, saying how to build it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from udpflannel.cni import delegate as cni
from udpflannel.cni import install

FORMS = ("zipapp", "frozen")

FAKE_DELEGATE = """#!/bin/sh
input=$(cat)
if [ "$CNI_COMMAND" = VERSION ]; then  # Debian's bridge (plugins 1.1.1) unless told otherwise
  echo "{\\"cniVersion\\":\\"1.0.0\\",\\"supportedVersions\\":${FAKE_VERSIONS:-$DEBIAN_VERSIONS}}"
  exit 0
fi
printf '%s %s\\n' "$CNI_COMMAND" "$input" >> "$FAKE_LOG"
case "$FAKE_MODE" in
  fail) echo '{"cniVersion":"1.0.0","code":7,"msg":"fake says no","details":"d"}'; exit 1;;
  crash) echo 'panic: something'; exit 2;;
esac
if [ "$CNI_COMMAND" = ADD ]; then
  echo "${FAKE_RESULT:-$RESULT_040}"
fi
"""

DEBIAN_VERSIONS = '["0.1.0","0.2.0","0.3.0","0.3.1","0.4.0","1.0.0"]'
RESULT_040 = '{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.1.17.2/24","gateway":"10.1.17.1"}]}'
SUBNET_ENV = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"


def plugin_argv(form: str, tmp: str) -> list[str]:
    """How to run udpflannel-cni in ``form``, as install-cni would install it."""
    if form == "frozen":
        data, why = install.frozen_plugin()
        if data is None:
            pytest.fail(f"the frozen plugin {install.frozen_path()} is {why}")
        return [install.frozen_path()]
    zipapp = os.path.join(tmp, "udpflannel-cni.pyz")
    with open(zipapp, "wb") as f:
        f.write(install.plugin_zipapp())
    return [sys.executable, zipapp]


class Rig:
    def __init__(self, tmp: str, form: str) -> None:
        self.argv = plugin_argv(form, tmp)
        self.bin = os.path.join(tmp, "bin")
        os.mkdir(self.bin)
        fake = os.path.join(self.bin, "bridge")
        with open(fake, "w") as f:
            f.write(FAKE_DELEGATE)
        os.chmod(fake, 0o755)
        self.log = os.path.join(tmp, "delegate.log")
        self.subnet_file = os.path.join(tmp, "subnet.env")
        with open(self.subnet_file, "w") as f:
            f.write(SUBNET_ENV)
        self.data_dir = os.path.join(tmp, "state", "flannel")
        self.conf = {"cniVersion": "1.0.0", "name": "cbr0", "type": "udpflannel-cni",
                     "subnetFile": self.subnet_file, "dataDir": self.data_dir}

    def run(self, command: str, conf: dict | None = None, mode: str = "", cid: str = "c1",
            **env: str) -> tuple[int, dict | None, str]:
        full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
                "CNI_CONTAINERID": cid, "CNI_NETNS": "/var/run/netns/nowhere", "CNI_IFNAME": "eth0",
                "CNI_PATH": f"/nonexistent:{self.bin}", "FAKE_LOG": self.log, "FAKE_MODE": mode,
                "DEBIAN_VERSIONS": DEBIAN_VERSIONS, "RESULT_040": RESULT_040}
        full.update(env)
        full = {k: v for k, v in full.items() if v is not None}
        proc = subprocess.run(self.argv, input=json.dumps(conf if conf is not None else self.conf).encode(),
                              capture_output=True, env=full, timeout=30)
        assert b"Traceback" not in proc.stderr, proc.stderr
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
        return proc.returncode, out, proc.stderr.decode()

    def calls(self) -> list[tuple[str, dict]]:
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return [(cmd, json.loads(data)) for cmd, data in (line.rstrip("\n").split(" ", 1) for line in f)]

    def saved(self, cid: str = "c1") -> str:
        return os.path.join(self.data_dir, cid)


@pytest.fixture(params=FORMS)
def rig(tmp_path, request):
    return Rig(str(tmp_path), request.param)


def test_add_saves_the_delegate_runs_it_and_converts_its_result(rig):
    rc, out, _ = rig.run("ADD")
    assert rc == 0
    # the fake answered 0.4.0; the runtime asked for 1.0.0
    assert out == {"cniVersion": "1.0.0", "ips": [{"address": "10.1.17.2/24", "gateway": "10.1.17.1"}]}
    expected = cni.render_delegate(cni.load_netconf(rig.conf), cni.load_subnet_env(SUBNET_ENV, "x"))
    assert rig.calls() == [("ADD", expected)]
    with open(rig.saved()) as f:
        assert json.load(f) == expected
    assert stat.S_IMODE(os.stat(rig.saved()).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(rig.data_dir).st_mode) == 0o700
    assert os.listdir(rig.data_dir) == ["c1"]  # no temp file left


def test_del_replays_the_saved_delegate_then_forgets_it(rig):
    assert rig.run("ADD")[0] == 0
    os.unlink(rig.subnet_file)  # DEL must not need the daemon's file
    rc, out, _ = rig.run("DEL", CNI_NETNS=None)
    assert (rc, out) == (0, None)
    (add, added), (dele, deleted) = rig.calls()
    assert (add, dele) == ("ADD", "DEL") and deleted == added
    assert not os.path.exists(rig.saved())
    assert rig.run("DEL")[:2] == (0, None)  # again: nothing to do, still success
    assert len(rig.calls()) == 2


def test_failed_delegate_del_keeps_the_file_for_the_retry(rig):
    assert rig.run("ADD")[0] == 0
    rc, out, _ = rig.run("DEL", mode="fail")
    assert rc == 1
    assert out == {"cniVersion": "1.0.0", "code": 7, "msg": "fake says no", "details": "d"}  # passed through
    assert os.path.exists(rig.saved())
    assert rig.run("DEL")[0] == 0 and not os.path.exists(rig.saved())


def test_unreadable_saved_file_is_dropped_on_del(rig):
    os.makedirs(rig.data_dir)
    with open(rig.saved(), "w") as f:
        f.write("{garbage")
    rc, _, err = rig.run("DEL")
    assert rc == 0 and "unreadable" in err
    assert not os.path.exists(rig.saved()) and rig.calls() == []


def test_check_replays_with_the_runtimes_prev_result(rig):
    rc, result, _ = rig.run("ADD")
    assert rc == 0
    assert rig.run("CHECK", dict(rig.conf, prevResult=result))[:2] == (0, None)
    (_, added), (cmd, checked) = rig.calls()
    assert cmd == "CHECK" and checked == dict(added, prevResult=result)


def test_check_failure_is_reported(rig):
    assert rig.run("ADD")[0] == 0
    rc, out, _ = rig.run("CHECK", mode="fail")
    assert rc == 1 and out["msg"] == "fake says no"


def test_check_without_add_fails(rig):
    rc, out, _ = rig.run("CHECK")
    assert rc == 1 and out["code"] == cni.NO_SAVED_DELEGATE


def test_delegate_that_crashes_without_json(rig):
    rc, out, _ = rig.run("ADD", mode="crash")
    assert rc == 1
    assert out["code"] == cni.DELEGATE_FAILED
    assert "exit status 2" in out["msg"] and "panic" in out["details"]


def test_delegate_not_on_cni_path(rig):
    rc, out, _ = rig.run("ADD", dict(rig.conf, delegate={"type": "macvlan"}))
    assert rc == 1 and out["code"] == cni.DELEGATE_FAILED
    assert 'failed to find plugin "macvlan"' in out["msg"]
    rc, out, _ = rig.run("ADD", dict(rig.conf, delegate={"type": "../bin/bridge"}))
    assert rc == 1 and out["code"] == cni.INVALID_NETWORK_CONFIG


@pytest.mark.parametrize("command, conf_change, env, code", [
    ("ADD", {"subnetFile": "/nonexistent/subnet.env"}, {}, cni.TRY_AGAIN_LATER),
    ("ADD", {"cniVersion": "2.0.0"}, {}, cni.INCOMPATIBLE_VERSION),
    ("GC", {"cniVersion": "1.0.0"}, {}, cni.INCOMPATIBLE_VERSION),  # GC and STATUS came with 1.1.0
    ("STATUS", {"cniVersion": "1.0.0"}, {}, cni.INCOMPATIBLE_VERSION),
    ("CHECK", {"cniVersion": "0.3.1"}, {}, cni.INCOMPATIBLE_VERSION),
    ("ADD", {"delegate": {"name": "x"}}, {}, cni.UNSUPPORTED_FIELD),
    ("ADD", {}, {"CNI_PATH": ""}, cni.INVALID_ENVIRONMENT),
    ("ADD", {}, {"CNI_CONTAINERID": "../escape"}, cni.INVALID_ENVIRONMENT),
    ("ADD", {}, {"CNI_CONTAINERID": "c1\n"}, cni.INVALID_ENVIRONMENT),  # `$` would let a newline by
    ("GC", {"cniVersion": "1.1.0"}, {"CNI_PATH": ""}, cni.INVALID_ENVIRONMENT),
    ("NOSUCH", {}, {}, cni.INVALID_ENVIRONMENT),
])
def test_errors_are_cni_json(rig, command, conf_change, env, code):
    rc, out, _ = rig.run(command, dict(rig.conf, **conf_change), **env)
    assert rc == 1
    assert set(out) == {"cniVersion", "code", "msg", "details"} and out["code"] == code
    assert rig.calls() == [] and not os.path.exists(rig.saved())


def test_not_json_on_stdin(rig):
    proc = subprocess.run(rig.argv, input=b"\xff{", capture_output=True, timeout=30,
                          env={"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0", "CNI_PATH": "/x"})
    assert proc.returncode == 1 and json.loads(proc.stdout)["code"] == cni.DECODING_FAILURE


def test_version_and_no_command(rig):
    rc, out, _ = rig.run("VERSION")
    assert (rc, out) == (0, cni.version_info())
    rc, out, err = rig.run("", CNI_COMMAND=None)
    assert (rc, out) == (0, None) and "0.1.0, 0.2.0, 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0" in err


def test_concurrent_adds_for_one_container_each_save_whole(rig):
    """Runtimes may retry an ADD while the first still runs: each writes a temp file of
    its own, so every one succeeds and the saved file is one whole delegate config."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: rig.run("ADD"), range(10)))
    assert [rc for rc, _, _ in results] == [0] * 10, results
    with open(rig.saved()) as f:
        assert json.load(f)["type"] == "bridge"
    assert os.listdir(rig.data_dir) == ["c1"]  # no temp file left behind


# --- versions: every one flannel's plugin takes, and one the delegate speaks ------------

@pytest.mark.parametrize("version, delegate_gets, answer_has_ip_version", [
    ("0.3.1", "0.3.1", True), ("0.4.0", "0.4.0", True), ("1.0.0", "1.0.0", False),
    ("1.1.0", "1.0.0", False),  # Debian's bridge stops at 1.0.0: same result format
])
def test_add_gives_the_delegate_a_version_it_speaks(rig, version, delegate_gets, answer_has_ip_version):
    rc, out, _ = rig.run("ADD", dict(rig.conf, cniVersion=version))
    assert rc == 0, out
    ((cmd, rendered),) = rig.calls()
    assert (cmd, rendered["cniVersion"]) == ("ADD", delegate_gets)
    assert out["cniVersion"] == version and ("version" in out["ips"][0]) is answer_has_ip_version
    with open(rig.saved()) as f:  # DEL and CHECK replay what the delegate was given
        assert json.load(f)["cniVersion"] == delegate_gets


def test_a_delegate_that_speaks_1_1_0_gets_it(rig):
    rc, out, _ = rig.run("ADD", dict(rig.conf, cniVersion="1.1.0"), FAKE_VERSIONS='["1.0.0","1.1.0"]')
    assert rc == 0 and rig.calls()[0][1]["cniVersion"] == "1.1.0" and out["cniVersion"] == "1.1.0"


def test_legacy_versions_go_through_in_their_own_format(rig):
    conf = {k: v for k, v in rig.conf.items() if k != "cniVersion"}  # none: 0.1.0
    legacy = '{"cniVersion":"0.1.0","ip4":{"ip":"10.1.17.2/24","gateway":"10.1.17.1"}}'
    rc, out, _ = rig.run("ADD", conf, FAKE_RESULT=legacy)
    assert rc == 0 and rig.calls()[0][1]["cniVersion"] == "0.1.0"
    assert out == json.loads(legacy)
    rc, out, _ = rig.run("ADD", dict(conf, cniVersion="0.2.0"), FAKE_RESULT=legacy, cid="c2")
    assert rc == 0 and out == dict(json.loads(legacy), cniVersion="0.2.0")


def test_a_delegate_without_a_usable_version_is_refused_with_its_list(rig):
    rc, out, _ = rig.run("ADD", dict(rig.conf, cniVersion="1.1.0"), FAKE_VERSIONS='["0.1.0","0.2.0"]')
    assert rc == 1 and out["code"] == cni.INCOMPATIBLE_VERSION
    assert "bridge cannot serve cniVersion 1.1.0" in out["msg"] and "0.2.0" in out["details"]
    assert rig.calls() == []


def test_check_after_a_downgraded_add_gives_the_delegate_its_own_version(rig):
    conf = dict(rig.conf, cniVersion="1.1.0")
    rc, result, _ = rig.run("ADD", conf)
    assert rc == 0
    assert rig.run("CHECK", dict(conf, prevResult=result))[:2] == (0, None)
    (_, added), (cmd, checked) = rig.calls()
    assert checked["cniVersion"] == "1.0.0" and checked["prevResult"]["cniVersion"] == "1.0.0"


# --- a dual-stack node --------------------------------------------------------------------

def test_a_dual_stack_subnet_env_is_served_with_both_families(rig):
    with open(rig.subnet_file, "a") as f:
        f.write("FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:7::1/64\n")
    rc, _, _ = rig.run("ADD")
    assert rc == 0
    (cmd, added), = rig.calls()
    assert cmd == "ADD" and added["ipam"]["ranges"][1] == [{"subnet": "fc00:0:0:7::/64"}]
    assert added["ipam"]["routes"][-1] == {"dst": "fc00::/48"} and os.path.exists(rig.saved())
    rc, _, _ = rig.run("STATUS", dict(rig.conf, cniVersion="1.1.0"))
    assert rc == 0


# --- CNI 1.1: STATUS and GC ----------------------------------------------------------------

def test_status_is_ready_only_with_a_usable_subnet_env(rig):
    conf = dict(rig.conf, cniVersion="1.1.0")
    assert rig.run("STATUS", conf, CNI_CONTAINERID=None, CNI_NETNS=None, CNI_IFNAME=None)[:2] == (0, None)
    assert rig.calls() == []  # Debian's bridge has no STATUS (it stops at 1.0.0): not asked
    os.unlink(rig.subnet_file)
    rc, out, _ = rig.run("STATUS", conf)
    assert rc == 1 and out["code"] == cni.NOT_AVAILABLE
    assert "does not exist yet" in out["msg"] and "udpflannel running" in out["msg"]
    with open(rig.subnet_file, "w") as f:
        f.write("FLANNEL_NETWORK=10.1.0.0/16\n")
    rc, out, _ = rig.run("STATUS", conf)
    assert rc == 1 and out["code"] == cni.NOT_AVAILABLE and "missing FLANNEL_SUBNET" in out["msg"]


def test_status_asks_a_delegate_that_speaks_1_1_0(rig):
    conf = dict(rig.conf, cniVersion="1.1.0")
    versions = '["1.0.0","1.1.0"]'
    assert rig.run("STATUS", conf, FAKE_VERSIONS=versions)[:2] == (0, None)
    ((cmd, sent),) = rig.calls()
    assert cmd == "STATUS" and sent["cniVersion"] == "1.1.0" and sent["type"] == "bridge"
    rc, out, _ = rig.run("STATUS", conf, FAKE_VERSIONS=versions, mode="fail")
    assert rc == 1 and out["msg"] == "fake says no"  # the delegate's error is ours


def test_gc_forgets_the_saved_delegates_of_containers_no_longer_attached(rig):
    for cid in ("keep1", "gone1", "gone2", "keep2"):
        assert rig.run("ADD", cid=cid)[0] == 0
    other = os.path.join(rig.data_dir, "othernet1")  # another network sharing dataDir
    with open(other, "w") as f:
        json.dump({"name": "othernet", "type": "bridge"}, f)
    gc = dict(rig.conf, cniVersion="1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": "keep1", "ifname": "eth0"}, {"containerID": "keep2", "ifname": "eth1"}]})
    rc, out, _ = rig.run("GC", gc, CNI_CONTAINERID=None, CNI_NETNS=None, CNI_IFNAME=None)
    assert (rc, out) == (0, None)
    assert sorted(os.listdir(rig.data_dir)) == ["keep1", "keep2", "othernet1"]
    assert [cmd for cmd, _ in rig.calls()] == ["ADD"] * 4  # this bridge has no GC: not asked
    assert rig.run("GC", gc)[:2] == (0, None)  # again: nothing left to do


def test_gc_is_passed_on_to_a_delegate_that_speaks_1_1_0(rig):
    attached = [{"containerID": "keep1", "ifname": "eth0"}]
    gc = dict(rig.conf, cniVersion="1.1.0", **{"cni.dev/valid-attachments": attached})
    assert rig.run("GC", gc, FAKE_VERSIONS='["1.0.0","1.1.0"]')[:2] == (0, None)
    ((cmd, sent),) = rig.calls()
    assert cmd == "GC" and sent["cni.dev/valid-attachments"] == attached
    assert sent["ipam"]["type"] == "host-local" and sent["cniVersion"] == "1.1.0"
    rc, out, _ = rig.run("GC", gc, FAKE_VERSIONS='["1.1.0"]', mode="fail")
    assert rc == 1 and "fake says no" in out["details"]


def test_gc_with_a_bad_attachment_list_is_refused(rig):
    gc = dict(rig.conf, cniVersion="1.1.0", **{"cni.dev/valid-attachments": "all"})
    rc, out, _ = rig.run("GC", gc)
    assert rc == 1 and out["code"] == cni.INVALID_NETWORK_CONFIG
