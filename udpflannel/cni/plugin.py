"""udpflannel-cni: flannel's CNI meta-plugin, for nodes without flannel's own binary.

The runtime execs this once per pod and command, so it imports only the standard
library and the pure rendering module (no uvloop, grpc, pyroute2), and of the standard
library not even typing or tempfile (a few milliseconds each at every start):
start-up is the interpreter's plus the imports of json, subprocess, ipaddress and
dataclasses (bench/cni_plugin.py measures it, frozen and as a zipapp).

    ADD    render the delegate (delegate.render_delegate) from the netconf and
           subnet.env, save it as <dataDir>/<container id> (dir 0700, file 0600),
           exec the delegate plugin from CNI_PATH with it, print its result.
    DEL    replay DEL with the saved delegate, then remove the file. No file means
           nothing to undo: success (the spec wants DEL idempotent). The daemon and
           subnet.env are not needed, so pods can be torn down after flannel left.
    CHECK  replay CHECK with the saved delegate plus the runtime's prevResult
           (flannel's plugin answers CHECK with success without looking).
    GC     (CNI 1.1) forget the saved delegate of every container of this network
           that is not in ``cni.dev/valid-attachments`` (the runtime says it is gone;
           files of other networks sharing dataDir are left), and pass GC on to the
           delegate when it speaks 1.1.0 (bridge passes it to host-local, which frees
           the addresses). Debian's bridge stops at 1.0.0: then GC stays ours alone.
    STATUS (CNI 1.1) ready when subnet.env is there and usable (the node forwards),
           else code 50 with the reason; then the delegate's STATUS if it speaks 1.1.0.
    VERSION  the versions we speak (0.1.0 to 1.1.0, as flannel's plugin).

ADD asks the delegate which versions it speaks (delegate.py, "Versions") and gives it
one it has, converting its result back to the runtime's version.

The saved file has flannel's name and content, so pods added by flannel's plugin are
deleted correctly by this one and the other way round. Every failure is CNI error JSON
on stdout and exit status 1; a delegate's own error JSON is passed through unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping

from udpflannel.cni import delegate as cni
from udpflannel.cni.delegate import CniError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is for the type checker only: the plugin starts once per pod
    from typing import Any


def main() -> int:
    env = dict(os.environ)
    command = env.get("CNI_COMMAND", "")
    version: str | None = None
    try:
        if not command:  # a human ran us: say what we are, as libcni plugins do
            print("CNI plugin udpflannel-cni (flannel-compatible meta-plugin)\n"
                  f"CNI protocol versions supported: {', '.join(cni.SUPPORTED_VERSIONS)}", file=sys.stderr)
            return 0
        if command == "VERSION":
            _print_json(cni.version_info())
            return 0
        if command not in ("ADD", "DEL", "CHECK", "GC", "STATUS"):
            raise CniError(cni.INVALID_ENVIRONMENT, f"unknown CNI_COMMAND: {command}")
        cni.check_environment(command, env)
        conf = cni.load_netconf(_read_stdin_json())
        version = conf.cni_version
        cni.check_version(version, command)
        if command == "ADD":
            _print_json(add(conf, env))
        elif command == "DEL":
            delete(conf, env)
        elif command == "CHECK":
            check(conf, env)
        elif command == "GC":
            gc(conf, env)
        else:
            status(conf, env)
        return 0
    except CniError as e:
        _print_json(e.to_json(version))
        return 1
    except Exception as e:  # a bug or an unforeseen OS error: still JSON, never a traceback
        _print_json(CniError(cni.INTERNAL, f"{type(e).__name__}: {e}").to_json(version))
        return 1


def add(conf: cni.NetConf, env: Mapping[str, str]) -> dict[str, Any]:
    subnet = cni.load_subnet_env(_read_subnet_file(conf.subnet_file), conf.subnet_file)
    rendered = cni.render_delegate(conf, subnet)
    supported = _delegate_versions(rendered["type"], env)
    if supported is not None:
        rendered["cniVersion"] = cni.delegate_version(conf.cni_version, supported, rendered["type"])
    data = json.dumps(rendered, sort_keys=True, separators=(",", ":")).encode()  # as Go writes it
    _save(conf.data_dir, env["CNI_CONTAINERID"], data)
    out = _exec_delegate(rendered["type"], "ADD", data, env)
    try:
        result = json.loads(out)
    except ValueError:
        raise CniError(cni.DECODING_FAILURE, f"delegate {rendered['type']} returned a result that is not JSON",
                       out.decode(errors="replace")) from None
    if not isinstance(result, dict):
        raise CniError(cni.DECODING_FAILURE, f"delegate {rendered['type']} returned a result that is not an object")
    return cni.convert_result(result, conf.cni_version)


def delete(conf: cni.NetConf, env: Mapping[str, str]) -> None:
    path = os.path.join(conf.data_dir, env["CNI_CONTAINERID"])
    data = _load_saved(path)
    if data is None:
        return  # never added, or already deleted
    try:
        plugin_type = json.loads(data)["type"]
        if not isinstance(plugin_type, str):
            raise TypeError("type is not a string")
    except (ValueError, KeyError, TypeError) as e:
        # Nothing to replay with; as flannel does, drop it (the host keeps a stray veth
        # until reboot) rather than fail every DEL of this pod forever.
        print(f"udpflannel-cni: saved delegate {path} unreadable ({e}); removing it", file=sys.stderr)
        _remove(path)
        return
    _exec_delegate(plugin_type, "DEL", data, env)
    _remove(path)  # only after the delegate succeeded: a failed DEL is retried with it


def check(conf: cni.NetConf, env: Mapping[str, str]) -> None:
    path = os.path.join(conf.data_dir, env["CNI_CONTAINERID"])
    data = _load_saved(path)
    if data is None:
        raise CniError(cni.NO_SAVED_DELEGATE, f"no saved delegate config {path}: ADD never ran for this container "
                       "or DEL already did")
    try:
        saved = json.loads(data)
        plugin_type = saved["type"]
    except (ValueError, KeyError, TypeError):
        raise CniError(cni.DECODING_FAILURE, f"saved delegate config {path} is unreadable") from None
    if conf.prev_result is not None:  # the delegate checks the interfaces and IPs ADD reported
        prev = dict(conf.prev_result)
        saved_version = saved.get("cniVersion")
        if saved_version != conf.cni_version and saved_version in cni.CONVERTIBLE:
            # ADD gave the delegate an older version than the runtime's: so is its prevResult
            prev = cni.convert_result(dict(prev, cniVersion=conf.cni_version), saved_version)
        saved["prevResult"] = prev
    _exec_delegate(plugin_type, "CHECK", json.dumps(saved, sort_keys=True, separators=(",", ":")).encode(), env)


def gc(conf: cni.NetConf, env: Mapping[str, str]) -> None:
    """See the module docstring. Goes on past failures and reports them all at the
    end, as the spec asks."""
    valid = cni.valid_attachments(conf)
    problems = []
    try:
        names = os.listdir(conf.data_dir)
    except FileNotFoundError:
        names = []
    except OSError as e:
        names = []
        problems.append(f"cannot list {conf.data_dir}: {e}")
    for name in names:
        if name in valid or not cni.is_container_id(name):  # also our temp files (".<id>.")
            continue
        path = os.path.join(conf.data_dir, name)
        try:
            with open(path, "rb") as f:
                saved = json.loads(f.read())
            if not isinstance(saved, dict) or saved.get("name") != conf.name:
                continue  # another network's (or unreadable: DEL deals with those)
            _remove(path)
        except (OSError, ValueError) as e:
            problems.append(f"{path}: {e}")
    try:
        _pass_on("GC", conf, env, conf.raw.get("cni.dev/valid-attachments", []))
    except CniError as e:
        problems.append(f"delegate GC: {e.msg}{f' ({e.details})' if e.details else ''}")
    if problems:
        raise CniError(cni.IO_FAILURE, "GC left stale state behind", "; ".join(problems))


def status(conf: cni.NetConf, env: Mapping[str, str]) -> None:
    try:
        cni.load_subnet_env(_read_subnet_file(conf.subnet_file), conf.subnet_file)
    except CniError as e:
        raise CniError(cni.NOT_AVAILABLE, f"not ready: {e.msg}", e.details) from None
    _pass_on("STATUS", conf, env, None)


def _pass_on(command: str, conf: cni.NetConf, env: Mapping[str, str], attachments: Any) -> None:
    """GC or STATUS to the delegate, rendered as ADD would render it now, if it speaks
    1.1.0 (older delegates know neither). Without a usable subnet.env there is no
    delegate config to give (STATUS has already said so; GC only skips this)."""
    try:
        subnet = cni.load_subnet_env(_read_subnet_file(conf.subnet_file), conf.subnet_file)
    except CniError:
        return
    rendered = cni.render_delegate(conf, subnet, "1.1.0")
    if "1.1.0" not in (_delegate_versions(rendered["type"], env) or ()):
        return
    if attachments is not None:
        rendered["cni.dev/valid-attachments"] = attachments
    _exec_delegate(rendered["type"], command, json.dumps(rendered, sort_keys=True, separators=(",", ":")).encode(),
                   env)


# --- I/O helpers --------------------------------------------------------------------

def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=4) + "\n")
    sys.stdout.flush()


def _read_stdin_json() -> Any:
    try:
        data = sys.stdin.buffer.read()
    except OSError as e:
        raise CniError(cni.IO_FAILURE, f"error reading from stdin: {e}") from None
    try:
        return json.loads(data)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise CniError(cni.DECODING_FAILURE, f"error unmarshalling network config: {e}") from None


def _read_subnet_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        # udpflannel writes it once the node forwards: until then pods must wait.
        raise CniError(cni.TRY_AGAIN_LATER, f"{path} does not exist yet: is udpflannel running on this node?") \
            from None
    except (OSError, UnicodeDecodeError) as e:
        raise CniError(cni.IO_FAILURE, f"cannot read {path}: {e}") from None


def _save(data_dir: str, container_id: str, data: bytes) -> None:
    """<dataDir>/<container id>, 0600, written whole or not at all (temp + fsync +
    rename; the temp name starts with '.', which no container ID may)."""
    path = os.path.join(data_dir, container_id)
    tmp = None
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        # a temp file of its own (0600, created exclusively, a random name): runtimes may
        # run two ADDs for one container at once, and a shared name would let one rename
        # the other's
        fd, tmp = _create_temp(data_dir, f".{container_id}.")
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise CniError(cni.IO_FAILURE, f"cannot save the delegate config {path}: {e}") from None


def _create_temp(folder: str, prefix: str) -> tuple[int, str]:
    """tempfile.mkstemp without importing tempfile (shutil, random...): a new file,
    0600, never an existing one or a symlink's target."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        path = os.path.join(folder, f"{prefix}{os.urandom(6).hex()}")
        try:
            return os.open(path, flags, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused temporary name in {folder}")


def _load_saved(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CniError(cni.IO_FAILURE, f"cannot read the saved delegate config {path}: {e}") from None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def find_plugin(plugin_type: str, cni_path: str) -> str:
    """The executable named ``plugin_type`` in the first CNI_PATH directory holding one."""
    dirs = [d for d in cni_path.split(os.pathsep) if d]
    if "/" in plugin_type or plugin_type in ("", ".", ".."):
        raise CniError(cni.INVALID_NETWORK_CONFIG, f"invalid delegate plugin type {plugin_type!r}")
    for d in dirs:
        candidate = os.path.join(d, plugin_type)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(cni.DELEGATE_FAILED, f'failed to find plugin "{plugin_type}" in path {dirs}')


def _delegate_versions(plugin_type: str, env: Mapping[str, str]) -> tuple[str, ...] | None:
    """The versions the delegate says it speaks (its VERSION answer); None if it gives
    no usable answer (then it gets the netconf's version and answers for itself). A
    delegate that is not on CNI_PATH is an error here already."""
    find_plugin(plugin_type, env["CNI_PATH"])
    try:
        out = _exec_delegate(plugin_type, "VERSION", json.dumps({"cniVersion": cni.LATEST_VERSION}).encode(), env)
        return cni.parse_version_info(out)
    except CniError:
        return None


def _exec_delegate(plugin_type: str, command: str, data: bytes, env: Mapping[str, str]) -> bytes:
    """Run the delegate with our environment but its own CNI_COMMAND; its stderr is ours."""
    path = find_plugin(plugin_type, env["CNI_PATH"])
    try:
        proc = subprocess.run([path], input=data, stdout=subprocess.PIPE, env=dict(env, CNI_COMMAND=command),
                              check=False)
    except OSError as e:
        raise CniError(cni.DELEGATE_FAILED, f"cannot run delegate {path}: {e}") from None
    if proc.returncode == 0:
        return proc.stdout
    try:
        err = json.loads(proc.stdout)
        raise CniError(int(err["code"]), str(err["msg"]), str(err.get("details") or ""))
    except (ValueError, KeyError, TypeError):
        raise CniError(cni.DELEGATE_FAILED, f"delegate {plugin_type} {command} failed with exit status "
                       f"{proc.returncode}", proc.stdout.decode(errors="replace").strip()) from None


if __name__ == "__main__":
    sys.exit(main())
