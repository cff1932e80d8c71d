"""Command line: parse flags into options, run, map failures to one line + exit code.

Every flag of `run` can also come from the environment as FLANNELD_<FLAG> (dashes as
underscores, upper case), as with flanneld; a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from typing import Callable, NoReturn, Sequence

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        self.exit(EXIT_USAGE, f"udpflannel: error: {message} (see --help)\n")


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"{text} is not a UDP port (1-65535)")
    return value


def _vni(text: str) -> int:
    value = int(text)
    if not 0 < value < 1 << 24:
        raise argparse.ArgumentTypeError(f"{text} is not a VNI (1-16777215)")
    return value


def _ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from None


def _offloads(text: str) -> str:
    from udpflannel.dataplane.userspace import parse_offloads
    try:
        parse_offloads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def _bool(text: str) -> bool:
    """Go's flag package spelling of booleans, as flanneld accepts them."""
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    def flag(name: str, **kw) -> None:
        p.add_argument(name, **kw)

    def switch(name: str, default: bool, help: str) -> None:  # --x, --x=true, --x=false
        p.add_argument(name, type=_bool, nargs="?", const=True, default=default, metavar="BOOL",
                       help=help)

    flag("--tun", default="flannel0", help="TUN device name (default flannel0)")
    flag("--iface", help="underlay interface (default: the default route's)")
    flag("--public-ip", type=_ipv4, help="IP advertised to other nodes (default: --iface's)")
    flag("--registry-file", default="/var/lib/udpflannel/registry.db",
         help="embedded registry (SQLite) shared by daemons on this host")
    flag("--net-config", help="network config JSON used when the registry has none")
    flag("--subnet-file", default="/run/flannel/subnet.env", help="where to write subnet.env")
    flag("--state-dir", default="/var/lib/udpflannel", help="keeps the VTEP MAC across restarts")
    flag("--admin-socket", help="msgpack admin socket (default /run/udpflannel/<tun>.sock)")
    flag("--port", type=_port, help="VXLAN UDP port (default: the config's Backend.Port, 8472)")
    flag("--vni", type=_vni, help="VXLAN network identifier (default: the config's Backend.VNI, 1)")
    flag("--engine", choices=("compiled", "python"), default="compiled",
         help="data path: the compiled engine or its pure-Python reference twin")
    switch("--strict-source", False,
           "drop every received packet whose inner source is outside its sender's subnet "
           "(default: only sources inside the overlay network must match; routed sources "
           "such as host addresses are delivered)")
    flag("--offload", type=_offloads, default="auto",
         help="auto (default: all the kernel allows), off, or a comma list of tso,gso,gro")
    flag("--subnet-lease-ttl", type=_positive, default=24 * 60.0,
         help="lease lifetime in minutes (default 1440)")
    flag("--subnet-lease-renew-margin", type=_positive, default=60.0,
         help="renew this many minutes before expiry (default 60)")
    flag("--etcd-endpoints", help="comma-separated etcd v3 URLs; selects the etcd registry")
    flag("--etcd-prefix", default="/coreos.com/network")
    flag("--etcd-cafile")
    flag("--etcd-certfile")
    flag("--etcd-keyfile")
    flag("--etcd-username")
    flag("--etcd-password")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


class _EnvError(Exception):
    pass


class _EnvParser(Parser):
    def error(self, message: str) -> NoReturn:
        raise _EnvError(message)


def env_flags(environ: dict[str, str] | None = None) -> list[str]:
    """FLANNELD_<FLAG> environment values as `--flag=value` arguments for `run`, each
    checked by the same parser as the flag itself (one clear line naming the variable
    when it is bad). They go before the command line's flags, which therefore win."""
    environ = os.environ if environ is None else environ
    checker = _EnvParser(prog="udpflannel run", add_help=False)
    _add_run_flags(checker)
    out = []
    for action in checker._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or longs[0] == "--verbose":
            continue
        name = "FLANNELD_" + longs[0][2:].upper().replace("-", "_")
        if name not in environ:
            continue
        arg = f"{longs[0]}={environ[name]}"
        try:
            checker.parse_args([arg])
        except _EnvError as e:
            raise _EnvError(f"environment {name}: {e}") from None
        out.append(arg)
    return out


def build_parser() -> Parser:
    parser = Parser(prog="udpflannel", description="flannel's userspace overlay, speaking VXLAN")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _add_run_flags(sub.add_parser("run", help="run the node daemon"))

    demo = sub.add_parser("demo", help="a whole overlay in network namespaces on this machine")
    demo.add_argument("--nodes", type=int, default=2, help="number of nodes (2-16, default 2)")
    demo.add_argument("--seconds", type=float, default=3.0, help="TCP transfer duration")
    demo.add_argument("--engine", choices=("compiled", "python"), default="compiled")
    demo.add_argument("-v", "--verbose", action="store_true")

    bench = sub.add_parser("bench", help="throughput and latency: veth vs kernel VXLAN vs udpflannel")
    bench.add_argument("--seconds", type=_positive, default=5.0, help="duration of each iperf3 run")
    bench.add_argument("--repeat", type=int, default=3, help="repetitions; the table shows medians")
    bench.add_argument("--out", default="bench/results", help="directory for the JSON and PNG")
    bench.add_argument("--only", help="comma-separated subset of cases to run")
    bench.add_argument("-v", "--verbose", action="store_true")

    status = sub.add_parser("status", help="ask a running daemon for its lease and counters")
    status.add_argument("--admin-socket", default="/run/udpflannel/flannel0.sock")
    return parser


def _run_options(a: argparse.Namespace):
    from udpflannel.daemon import RunOptions
    endpoints = tuple(e.strip() for e in (a.etcd_endpoints or "").split(",") if e.strip())
    return RunOptions(
        tun=a.tun, iface=a.iface, public_ip=a.public_ip, registry_file=a.registry_file,
        net_config=a.net_config, subnet_file=a.subnet_file, state_dir=a.state_dir,
        admin_socket=a.admin_socket, port=a.port, vni=a.vni, engine=a.engine, offload=a.offload,
        strict_source=a.strict_source,
        lease_ttl=a.subnet_lease_ttl * 60, renew_margin=a.subnet_lease_renew_margin * 60,
        etcd_endpoints=endpoints, etcd_prefix=a.etcd_prefix.rstrip("/"),
        etcd_cafile=a.etcd_cafile, etcd_certfile=a.etcd_certfile, etcd_keyfile=a.etcd_keyfile,
        etcd_username=a.etcd_username, etcd_password=a.etcd_password)


def _cmd_run(a: argparse.Namespace) -> int:
    import uvloop

    from udpflannel import daemon
    uvloop.run(daemon.run(_run_options(a)))
    return EXIT_OK


def _cmd_demo(a: argparse.Namespace) -> int:
    from udpflannel.lab import demo
    if not 2 <= a.nodes <= 16:
        raise ValueError(f"--nodes {a.nodes}: choose 2 to 16")
    if os.geteuid() != 0:
        raise PermissionError("udpflannel demo needs root to create network namespaces")
    return demo.main(a.nodes, a.seconds, a.engine)


def _cmd_bench(a: argparse.Namespace) -> int:
    from udpflannel.lab import bench
    if os.geteuid() != 0:
        raise PermissionError("udpflannel bench needs root to create network namespaces")
    if a.repeat < 1:
        raise ValueError(f"--repeat {a.repeat}: must be at least 1")
    return bench.main(a)


def _cmd_status(a: argparse.Namespace) -> int:
    import json

    from udpflannel.observe import admin
    try:
        reply = admin.query(a.admin_socket)
    except OSError as e:
        raise ConnectionError(f"no daemon answers at {a.admin_socket}: "
                              f"{e.strerror or e} (is `udpflannel run` running? see --admin-socket)") from None
    print(json.dumps(reply, indent=2, sort_keys=True))
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run, "demo": _cmd_demo, "bench": _cmd_bench, "status": _cmd_status}


def _expected_errors() -> tuple[type[BaseException], ...]:
    from udpflannel.core.config import ConfigError
    from udpflannel.daemon import FatalError
    from udpflannel.dataplane.userspace import DataplaneError
    from udpflannel.host.netconf import NetconfError
    from udpflannel.host.tun import TunError
    from udpflannel.lab.demo import DemoFailed
    from udpflannel.observe.admin import AdminSocketBusy
    from udpflannel.registry.base import RegistryError
    from udpflannel.subnet import NoFreeSubnet, SubnetLost
    return (FatalError, DemoFailed, AdminSocketBusy, ConfigError, DataplaneError, NetconfError,
            RegistryError, NoFreeSubnet, SubnetLost, TunError, PermissionError, FileNotFoundError,
            ConnectionError, ValueError)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"] and not ({"-h", "--help"} & set(argv)):
        try:
            argv = ["run", *env_flags(), *argv[1:]]
        except _EnvError as e:
            print(f"udpflannel: error: {e}", file=sys.stderr)
            return EXIT_USAGE
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except _expected_errors() as e:
        print(f"udpflannel: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug: still one line, details only with -v
        logging.getLogger("udpflannel").debug("internal error", exc_info=True)
        print(f"udpflannel: internal error: {type(e).__name__}: {e} (rerun with -v for details)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
