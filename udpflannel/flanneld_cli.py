"""`flanneld ARGS`: flanneld's own command line, for a node that swaps the binary.

udpflannel takes this form when called as `udpflannel flanneld ARGS` or through a
file named `flanneld` (a symlink, or the `flanneld` console script). The authority is
flannel v0.28.9's main.go and the coreos/pkg flagutil it calls:

- Syntax: Go's flag package (udpflannel.goflag). An unknown flag, a bad value or a
  missing one ends with one line in Go's words and exit 2. flanneld itself ignores
  the arguments after the first non-flag one; here they are an error, because
  `-ip-masq false` would otherwise turn masquerading on and ignore every later flag.
- Flags: flanneld's (FLANNELD_FLAGS), with its defaults: `-etcd-endpoints` defaults
  to http://127.0.0.1:4001,http://127.0.0.1:2379, so a node started with no registry
  flag uses etcd, never the embedded registry (that needs `-registry-file`, which
  then excludes `-etcd-endpoints`). udpflannel's own flags (-dataplane, -io,
  -metrics-port, ...) are taken in the same syntax. The flags udpflannel does not
  implement are refused by name, with the one table cli.REFUSED.
- klog: flanneld copies only -v, -vmodule and -log_backtrace_at from klog; its other
  flags (-logtostderr, ...) are not defined for flanneld either. -v=N >= 1 is debug
  logging (from 4 on, the libraries' too); -vmodule and -log_backtrace_at (Go source
  locations) are refused.
- Environment (flagutil.SetFlagsFromEnv, called after the command line): every flag,
  FLANNELD_<NAME> (upper case, `-` as `_`), only for flags not given on the command
  line, and only when the value is not empty. The value is one value: FLANNELD_IFACE=
  "eth0,eth1" is one interface named "eth0,eth1" (flanneld's flagSlice appends it
  whole), which no interface matches. A bad value is one line naming the variable
  (flanneld logs it and starts with the flag's default). FLANNELD_VERSION has no
  effect (flanneld checks -version before it reads the environment).
- `-version` prints the version alone on stderr, as a release tag ("v0.1.0"; flanneld
  v0.28.9 prints "v0.28.9"), and exits 0.
- Errors exit 2, as Go's flag package does by default; flanneld's own usage function
  exits 0 after an unknown flag, which a supervisor would take for a clean stop.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, cast

from udpflannel import goflag

FLANNELD_SOURCE = "flannel v0.28.9 main.go"
FLANNELD_ETCD_ENDPOINTS = "http://127.0.0.1:4001,http://127.0.0.1:2379"

# Every flag of flanneld (FLANNELD_SOURCE: init() registers them on flannelFlags, then
# copyFlag() adds klog's v, vmodule and log_backtrace_at): name -> (Go type, default).
FLANNELD_FLAGS: dict[str, tuple[str, str]] = {
    "etcd-endpoints": ("string", FLANNELD_ETCD_ENDPOINTS),
    "etcd-prefix": ("string", "/coreos.com/network"),
    "etcd-keyfile": ("string", ""),
    "etcd-certfile": ("string", ""),
    "etcd-cafile": ("string", ""),
    "etcd-username": ("string", ""),
    "etcd-password": ("string", ""),
    "iface": ("list", ""),
    "iface-regex": ("list", ""),
    "iface-can-reach": ("string", ""),
    "subnet-file": ("string", "/run/flannel/subnet.env"),
    "public-ip": ("string", ""),
    "public-ipv6": ("string", ""),
    "subnet-lease-renew-margin": ("int", "60"),
    "ip-masq": ("bool", "false"),
    "ip-masq-fully-random-disable": ("bool", "false"),
    "kube-subnet-mgr": ("bool", "false"),
    "kube-api-url": ("string", ""),
    "kube-annotation-prefix": ("string", "flannel.alpha.coreos.com"),
    "kubeconfig-file": ("string", ""),
    "version": ("bool", "false"),
    "healthz-ip": ("string", "0.0.0.0"),
    "healthz-port": ("int", "0"),
    "iptables-resync": ("int", "5"),
    "iptables-forward-rules": ("bool", "true"),
    "ip-blackhole-route": ("bool", "false"),
    "net-config-path": ("string", "/etc/kube-flannel/net-conf.json"),
    "set-node-network-unavailable": ("bool", "true"),
    "v": ("level", "0"),
    "vmodule": ("string", ""),
    "log_backtrace_at": ("string", ""),
}

# Refused names of older flanneld releases that were booleans (the rest took a value):
# a boolean must not swallow the next argument.
_OLD_BOOLS = ("auto-detect-ipv6", "use-multi-cluster-cidr")

# Read by flanneld's Kubernetes subnet manager only (pkg/subnet/kube, and main.go's
# CONT_WHEN_CACHE_NOT_READY when that manager fails to start), so only with
# -kube-subnet-mgr, here as there (cli.kube_env reads them).
KUBE_ENV = ("NODE_NAME", "POD_NAME", "POD_NAMESPACE", "EVENT_QUEUE_DEPTH", "CONT_WHEN_CACHE_NOT_READY")


class FlanneldUsage(Exception):
    """A command line or environment flanneld's rules refuse: one line, exit 2."""


class FlanneldHelp(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class FlanneldVersion(Exception):
    pass


@dataclass(frozen=True)
class Spec:
    """One flag as the Go parser sees it."""
    name: str  # without dashes
    dest: str  # the attribute of cli's namespace
    kind: str  # "bool", "list", "value" or "refused"
    convert: Callable[[str], object]
    boolean: bool  # takes no separate value argument
    help: str = ""


def env_name(name: str) -> str:
    """flagutil.SetFlagsFromEnv's variable for a flag."""
    return "FLANNELD_" + name.upper().replace("-", "_")


def _go_int(then: Callable[[str], object] | None, bits: int = 64, base0: bool = True) -> Callable[[str], object]:
    def convert(text: str) -> object:
        value = goflag.parse_int(text, bits, base0)
        return then(str(value)) if then else value
    return convert


def _go_float(then: Callable[[str], object]) -> Callable[[str], object]:
    def convert(text: str) -> object:
        try:
            float(text)
        except ValueError:
            raise ValueError("parse error") from None
        return then(text)
    return convert


def _choices(then: Callable[[str], object], choices: Sequence[str]) -> Callable[[str], object]:
    def convert(text: str) -> object:
        value = then(text)
        if value not in choices:
            raise ValueError(f"choose {', '.join(choices[:-1])} or {choices[-1]}")
        return value
    return convert


def specs() -> dict[str, Spec]:
    """name -> Spec: udpflannel's node flags (cli's own definitions, so the checks are
    the same as `udpflannel run`'s), read with flanneld's Go types where flanneld has
    the flag, plus -v and -version."""
    from udpflannel import cli
    ints = (cli._port, cli._port_or_off, cli._vni, cli._source_ports, cli._queues)
    floats = (cli._positive, cli._renew_margin)
    out: dict[str, Spec] = {}
    for action in cli.node_parser()._actions:
        for option in action.option_strings:
            if not option.startswith("--") or option in ("--help", "--verbose"):
                continue
            name = option[2:]
            go_type = FLANNELD_FLAGS.get(name, ("", ""))[0]
            if isinstance(action, cli._Refuse):
                boolean = go_type == "bool" or name in _OLD_BOOLS
                out[name] = Spec(name, action.dest, "refused", str, boolean)
                continue
            given = action.type if callable(action.type) else None  # (no FileType or names here)
            convert: Callable[[str], object] = given or str
            if action.type is cli._bool:
                out[name] = Spec(name, action.dest, "bool", goflag.parse_bool, True, action.help or "")
                continue
            if go_type == "int" or action.type in ints:
                convert = _go_int(given)
            elif action.type in floats:
                convert = _go_float(action.type)
            if action.choices:
                convert = _choices(convert, tuple(action.choices))
            kind = "list" if isinstance(action, argparse._AppendAction) else "value"
            out[name] = Spec(name, action.dest, kind, convert, False, action.help or "")
    out["v"] = Spec("v", "verbose", "value", _go_int(None, bits=32, base0=False), False,
                    f"log level: 0 info, 1-3 udpflannel's debug lines, {cli.LIBRARY_DEBUG} or more also its "
                    "libraries'")
    out["version"] = Spec("version", "version", "bool", goflag.parse_bool, True, "print version and exit")
    return out


def _set(spec: Spec, raw: str | None, values: dict[str, object], where: str) -> None:
    """Put one flag's value into ``values`` (dest -> value); ``where`` is "-name" on the
    command line or the variable's name."""
    from udpflannel import cli
    if spec.kind == "refused":
        asked = raw is None or raw.strip().lower() not in cli._OFF
        if asked:
            key = f"--{spec.name}"
            text = f"{key} is not supported: {cli.REFUSED[key]}"
            raise FlanneldUsage(text if where.startswith("-") else f"environment {where}: {text}")
        return
    text = "true" if raw is None else raw
    try:
        value = spec.convert(text)
    except (ValueError, argparse.ArgumentTypeError) as e:
        if not where.startswith("-"):  # flagutil's wording
            raise FlanneldUsage(f"invalid value {_go_quote(text)} for {where}: {e}") from None
        if spec.kind == "bool":
            raise FlanneldUsage(f"invalid boolean value {_go_quote(text)} for {where}: {e}") from None
        raise FlanneldUsage(f"invalid value {_go_quote(text)} for flag {where}: {e}") from None
    if spec.kind == "list":
        cast("list[object]", values.setdefault(spec.dest, [])).append(value)
    else:
        values[spec.dest] = value


def _go_quote(text: str) -> str:
    """%q as Go prints a string (close enough for one line: escapes and quotes)."""
    return '"' + text.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


def parse(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(cli's `run` namespace, warnings to log) from flanneld's arguments and
    environment. Raises FlanneldUsage, FlanneldHelp or FlanneldVersion."""
    from udpflannel import cli
    environ = os.environ if environ is None else environ
    table = specs()
    try:
        given, rest = goflag.parse(argv, lambda n: table[n].boolean if n in table else None)
    except goflag.GoFlagHelp:
        raise FlanneldHelp(usage(table)) from None
    except goflag.GoFlagError as e:
        raise FlanneldUsage(str(e)) from None
    if rest:
        last = given[-1][0] if given else None
        hint = ""
        if last is not None and table[last].boolean and given[-1][1] is None:
            hint = f"; a boolean takes its value as -{last}={rest[0]}"
        raise FlanneldUsage(f"unexpected argument {_go_quote(rest[0])}: flanneld takes flags only, and "
                            f"would ignore it and all that follows{hint}")

    values: dict[str, object] = {}
    for name, raw in given:
        _set(table[name], raw, values, f"-{name}")
    if values.get("version"):
        raise FlanneldVersion()

    warnings = []
    on_command_line = set(values)
    from_env: dict[str, str] = {}  # dest -> the variable that set it
    for name in sorted(table):  # flag.VisitAll's order
        spec = table[name]
        key = env_name(name)
        raw = environ.get(key, "")
        if spec.dest in on_command_line or raw == "":
            continue
        if name == "version":
            warnings.append(f"{key}={raw} has no effect: flanneld reads -version before the environment")
            continue
        if spec.dest in from_env:  # two names of one udpflannel flag (--net-config, --net-config-path)
            if environ[from_env[spec.dest]] != raw:
                raise FlanneldUsage(f"environment {from_env[spec.dest]} and {key} disagree; set one of them")
            continue
        _set(spec, raw, values, key)
        from_env[spec.dest] = key

    ns = cli.node_parser().parse_args([])
    ns.etcd_endpoints = FLANNELD_ETCD_ENDPOINTS
    for dest, value in values.items():
        if dest != "version":
            setattr(ns, dest, value)
    _choose_registry(ns, values, warnings)
    return ns, warnings


def _choose_registry(ns: argparse.Namespace, values: Mapping[str, object], warnings: list[str]) -> None:
    """etcd, as flanneld, unless -registry-file asks for udpflannel's embedded one, or
    -kube-subnet-mgr for Kubernetes (flanneld then ignores the etcd flags; so do we,
    saying so if one was given)."""
    if ns.kube_subnet_mgr:
        if "registry_file" in values:
            raise FlanneldUsage("-registry-file (the embedded registry) and -kube-subnet-mgr exclude each other")
        given = sorted(f"-{n.replace('_', '-')}" for n in values if n.startswith("etcd_"))
        if given:
            warnings.append(f"{', '.join(given)} ignored: with -kube-subnet-mgr Kubernetes gives the subnet "
                            "(as in flanneld)")
        ns.etcd_endpoints = ""
        return
    if "registry_file" in values:
        if "etcd_endpoints" in values:
            raise FlanneldUsage("-registry-file (the embedded registry) and -etcd-endpoints exclude "
                                "each other; give one")
        ns.etcd_endpoints = ""
    elif not str(ns.etcd_endpoints).replace(",", "").strip():
        raise FlanneldUsage("-etcd-endpoints is empty: give etcd URLs (or -registry-file for the "
                            "embedded registry, single host only)")


def usage(table: Mapping[str, Spec] | None = None) -> str:
    """Go's PrintDefaults, roughly: each flag, its default, one line of help."""
    from udpflannel import cli
    table = table or specs()
    ns = cli.node_parser().parse_args([])
    ns.etcd_endpoints = FLANNELD_ETCD_ENDPOINTS
    prog = "flanneld" if os.path.basename(sys.argv[0]) == "flanneld" else "udpflannel flanneld"
    lines = [f"Usage: {prog} [OPTION]...",
             "flanneld's flags (and udpflannel's own) in Go's syntax: -flag=value, -flag value; "
             "booleans -flag or -flag=false; each also from FLANNELD_<FLAG>."]
    for name in sorted(table):
        spec = table[name]
        if spec.kind == "refused":
            continue
        default = getattr(ns, spec.dest, None)
        shown = f" (default {default!r})" if default not in (None, "", [], (), False) else ""
        lines.append(f"  -{name}{shown}" + (f"\n    \t{' '.join(spec.help.split())}" if spec.help else ""))
    refused = ", ".join(k[2:] for k in cli.REFUSED)
    lines.append(f"Refused, each with what to use instead: {refused}.")
    return "\n".join(lines) + "\n"
