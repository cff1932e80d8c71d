"""`udpflannel install-cni` into temporary directories (no root needed).

Standard plugins come from a made-up --plugins-from directory here (their bytes are all
that matters); tests/integration/test_install_cni.py installs the real ones and runs a
pod through what it installed. The plugin itself is the frozen executable `make setup`
builds (--plugin-form auto finds it) unless a test asks for the zipapp.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import stat
import struct
import subprocess
import zipfile

import pytest

from udpflannel import cli
from udpflannel.cni import install
from udpflannel.cni.delegate import SUPPORTED_VERSIONS

SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@pytest.fixture
def dirs(tmp_path):
    source = tmp_path / "lib-cni"
    source.mkdir()
    for name in ("bridge", "host-local", "portmap"):  # no loopback: a source may lack one
        (source / name).write_bytes(f"#!/bin/sh\n# {name} v1\n".encode())
        (source / name).chmod(0o755)
    return {"bin_dir": str(tmp_path / "opt-cni-bin"), "conf_dir": str(tmp_path / "etc-cni-net.d"),
            "plugins_from": str(source)}


def actions(outcomes) -> dict[str, str]:
    return {os.path.basename(o.path): o.action for o in outcomes}


def test_first_install_writes_everything_with_its_mode(dirs):
    outcomes = install.install(**dirs)
    assert actions(outcomes) == {"udpflannel-cni": "written", "bridge": "written", "host-local": "written",
                                 "portmap": "written", "loopback": "absent", "10-udpflannel.conflist": "written"}
    bin_dir, conf_dir = dirs["bin_dir"], dirs["conf_dir"]
    assert sorted(os.listdir(bin_dir)) == ["bridge", "host-local", "portmap", "udpflannel-cni"]  # no temp left
    assert os.listdir(conf_dir) == ["10-udpflannel.conflist"]
    for name in os.listdir(bin_dir):
        assert stat.S_IMODE(os.stat(os.path.join(bin_dir, name)).st_mode) == 0o755, name
    conflist = os.path.join(conf_dir, "10-udpflannel.conflist")
    assert stat.S_IMODE(os.stat(conflist).st_mode) == 0o644
    with open(os.path.join(bin_dir, "bridge"), "rb") as f:
        assert f.read() == b"#!/bin/sh\n# bridge v1\n"
    with open(conflist) as f:
        conf = json.load(f)
    assert conf["plugins"][0]["type"] == install.PLUGIN_NAME  # the conflist names what was installed
    assert [p["type"] for p in conf["plugins"][1:]] == ["portmap"]


def test_second_install_changes_nothing(dirs):
    install.install(**dirs)
    paths = [os.path.join(dirs["bin_dir"], n) for n in os.listdir(dirs["bin_dir"])]
    paths.append(os.path.join(dirs["conf_dir"], "10-udpflannel.conflist"))
    before = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in paths}
    again = install.install(**dirs)
    assert set(actions(again).values()) == {"unchanged", "absent"}
    assert {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in paths} == before


def test_a_changed_file_is_replaced_by_rename(dirs):
    install.install(**dirs)
    target = os.path.join(dirs["bin_dir"], "udpflannel-cni")
    with open(target, "ab") as f:
        f.write(b"damaged")
    os.chmod(target, 0o700)
    plugin, _, _ = install.plugin_executable()
    with open(target, "rb") as reader:  # a runtime exec'ing the plugin at that moment
        outcome = install.write_if_changed(target, plugin, 0o755)
        assert outcome.action == "written"
        assert reader.read().endswith(b"damaged")  # it keeps the whole old file: a new inode replaced it
    with open(target, "rb") as f:
        assert f.read() == plugin
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755
    # a mode change alone is repaired too
    os.chmod(target, 0o600)
    assert install.write_if_changed(target, plugin, 0o755).action == "written"


def test_a_different_host_plugin_is_kept_unless_asked(dirs):
    os.makedirs(dirs["bin_dir"])
    host_bridge = os.path.join(dirs["bin_dir"], "bridge")
    with open(host_bridge, "wb") as f:
        f.write(b"#!/bin/sh\n# the host's bridge v2\n")
    outcomes = install.install(**dirs)
    kept = next(o for o in outcomes if o.path == host_bridge)
    assert kept.action == "kept" and "--replace-plugins" in kept.line()
    with open(host_bridge, "rb") as f:
        assert b"v2" in f.read()
    replaced = install.install(**dirs, replace_plugins=True)
    assert actions(replaced)["bridge"] == "written"
    with open(host_bridge, "rb") as f:
        assert f.read() == b"#!/bin/sh\n# bridge v1\n"


def test_without_plugins_from_only_ours_is_installed(dirs):
    outcomes = install.install(dirs["bin_dir"], dirs["conf_dir"], plugins_from=None)
    assert actions(outcomes) == {"udpflannel-cni": "written", "10-udpflannel.conflist": "written"}


def test_the_zipapp_holds_exactly_the_plugin_modules():
    data = install.plugin_zipapp()
    assert data.startswith(b"#!/usr/bin/env python3\n")
    assert data == install.plugin_zipapp()  # deterministic: the same bytes every build
    source_root = os.path.dirname(os.path.dirname(os.path.dirname(install.__file__)))
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = sorted(z.namelist())
        assert names == sorted(["__main__.py", "udpflannel/__init__.py", "udpflannel/cni/__init__.py",
                                "udpflannel/cni/delegate.py", "udpflannel/cni/plugin.py",
                                "udpflannel/core/__init__.py", "udpflannel/core/errors.py",
                                "udpflannel/core/subnetenv.py"])
        for name in names[1:]:
            with open(os.path.join(source_root, name), "rb") as f:
                assert z.read(name) == f.read(), name
        assert {i.date_time for i in z.infolist()} == {install.ZIP_EPOCH}


@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="no python3 in /usr/bin or /bin to run the zipapp with")
def test_the_installed_zipapp_runs_on_the_bare_standard_library(dirs):
    install.install(**dirs, plugin_form="zipapp")
    plugin = os.path.join(dirs["bin_dir"], "udpflannel-cni")
    env = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": "VERSION"}
    # -S -I: no site-packages, no user paths, no PYTHON* variables: only the stdlib and the zip
    proc = subprocess.run([SYSTEM_PYTHON, "-S", "-I", plugin], input=b"{}", capture_output=True, env=env,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["supportedVersions"] == list(SUPPORTED_VERSIONS)
    # and through its own first line, as a runtime execs it
    proc = subprocess.run([plugin], input=b"{}", capture_output=True, env=env, timeout=30)
    assert proc.returncode == 0 and json.loads(proc.stdout)["cniVersion"] == SUPPORTED_VERSIONS[-1], proc.stderr


# --- the plugin's two forms ------------------------------------------------------------

def elf_interpreter(data: bytes) -> bytes | None:
    """The PT_INTERP of an x86-64 ELF executable (its dynamic loader); None if static."""
    assert data[:5] == b"\x7fELF\x02", data[:16]
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return data[p_offset:p_offset + p_filesz]
    return None


def test_auto_installs_the_frozen_plugin_a_static_executable(dirs, tmp_path):
    data, why = install.frozen_plugin()
    assert data is not None, f"the frozen plugin {install.frozen_path()} is {why}"
    outcome = install.install(**dirs)[0]
    assert outcome.note.startswith("frozen") and not outcome.warn
    target = os.path.join(dirs["bin_dir"], "udpflannel-cni")
    with open(target, "rb") as f:
        installed = f.read()
    assert installed == data
    assert elf_interpreter(installed) is None  # no dynamic loader, so no libc, no libpython from the host
    assert len(installed) < 12_000_000, len(installed)  # flannel's own plugin is 2.8 MB; ours carries Python
    # alone in an empty folder, with an empty environment: what it needs, it carries
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(target, alone / "udpflannel-cni")
    proc = subprocess.run([str(alone / "udpflannel-cni")], env={"CNI_COMMAND": "VERSION"}, input=b"{}",
                          capture_output=True, cwd=str(alone), timeout=30)
    assert proc.returncode == 0 and json.loads(proc.stdout)["supportedVersions"] == list(SUPPORTED_VERSIONS)
    assert os.listdir(alone) == ["udpflannel-cni"]  # nothing unpacked beside it


def test_zipapp_when_asked(dirs):
    outcome = install.install(**dirs, plugin_form="zipapp")[0]
    assert (outcome.action, outcome.warn) == ("written", False) and "python3" in outcome.note
    with open(outcome.path, "rb") as f:
        assert f.read() == install.plugin_zipapp()
    # back to auto: the frozen one replaces it, by rename
    assert install.install(**dirs)[0].action == "written"


@pytest.mark.parametrize("broken, why", [("missing", "not built"), ("stale", "stale")])
def test_without_a_fresh_frozen_plugin(dirs, monkeypatch, caplog, broken, why):
    if broken == "missing":
        monkeypatch.setattr(install, "FROZEN_PATH", "frozen/nothing-here")
    else:  # built from other sources: never installed, it would run old code
        monkeypatch.setattr(install, "sources_digest", lambda: "0" * 64)
    assert install.frozen_plugin()[0] is None and why in install.frozen_plugin()[1]
    with caplog.at_level(logging.INFO, logger="udpflannel"):
        install.run(dirs["bin_dir"], dirs["conf_dir"], None, False)  # auto: the zipapp, loudly
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and why in warned[0] and "python3" in warned[0], warned
    with open(os.path.join(dirs["bin_dir"], "udpflannel-cni"), "rb") as f:
        assert f.read() == install.plugin_zipapp()
    with pytest.raises(install.InstallError, match=f"--plugin-form=frozen: the frozen plugin is {why}"):
        install.install(**dirs, plugin_form="frozen")


def test_command_line(dirs, capsys, caplog):
    argv = ["install-cni", "--bin-dir", dirs["bin_dir"], "--conf-dir", dirs["conf_dir"],
            "--plugins-from", dirs["plugins_from"]]
    assert cli.main(argv) == cli.EXIT_OK
    assert os.path.exists(os.path.join(dirs["bin_dir"], "udpflannel-cni"))
    args = cli.build_parser().parse_args(["install-cni"])
    assert (args.bin_dir, args.conf_dir, args.plugins_from) == (
        install.DEFAULT_BIN_DIR, install.DEFAULT_CONF_DIR, install.DEFAULT_PLUGINS_FROM)
    assert args.plugin_form == "auto"
    # --plugins-from '': ours only
    assert cli.main([*argv[:5], "--plugins-from", ""]) == cli.EXIT_OK
    assert cli.main([*argv, "--plugin-form", "zipapp"]) == cli.EXIT_OK
    with open(os.path.join(dirs["bin_dir"], "udpflannel-cni"), "rb") as f:
        assert f.read().startswith(b"#!/usr/bin/env python3\n")


def test_an_unwritable_target_is_one_line(dirs, capsys):
    blocker = os.path.join(os.path.dirname(dirs["bin_dir"]), "a-file")
    with open(blocker, "w") as f:
        f.write("not a directory\n")
    code = cli.main(["install-cni", "--bin-dir", os.path.join(blocker, "bin"), "--conf-dir", dirs["conf_dir"]])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ERROR
    assert err.count("\n") == 1 and err.startswith("udpflannel: error: cannot write ") and "a-file/bin" in err
    assert not os.path.exists(dirs["conf_dir"])  # stopped at the first failure
