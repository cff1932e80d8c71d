"""Command line: parse flags into options, run, map failures to one line + exit code.

Every flag of `run` (and `cleanup`) can also come from the environment as
FLANNELD_<FLAG> (dashes as underscores, upper case), by flanneld's rules; a flag on
the command line wins. Flags flanneld has and udpflannel does not are refused by name
with what to use instead (REFUSED, the one table), never with argparse's
"unrecognized arguments". `udpflannel flanneld ARGS`, or this program under the name
`flanneld`, takes flanneld's own command line in Go's syntax (flanneld_cli.py) and
runs the same node.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from typing import Callable, Mapping, NoReturn, Sequence

from udpflannel.core.errors import BadInput

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
LIBRARY_DEBUG = 4  # -v level from which the libraries' debug lines are logged too


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        self.exit(EXIT_USAGE, f"udpflannel: error: {message} (see --help)\n")


def _port(text: str, allow_zero: bool = False) -> int:
    value = int(text)
    if not (0 if allow_zero else 1) <= value < 65536:
        raise argparse.ArgumentTypeError(
            f"{text} is not a port ({'0' if allow_zero else '1'}-65535)")
    return value


def _port_or_off(text: str) -> int:
    return _port(text, allow_zero=True)


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


def _ipv6(text: str) -> str:
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv6 address") from None


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _offloads(text: str) -> str:
    from udpflannel.dataplane.sockets import parse_offloads
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


def _renew_margin(text: str) -> float:
    value = float(text)
    if not 1 <= value <= 1439:  # flanneld's range: within the 24 h lease
        raise argparse.ArgumentTypeError(f"{text} minutes is outside 1-1439")
    return value


def _source_ports(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{text} is not 0-64")
    return value


def _queues(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 16:
        raise argparse.ArgumentTypeError(f"{text} is not 1-16")
    return value


def _cpus(text: str) -> tuple[int, ...]:
    """A CPU list as Linux writes one (taskset -c, cpuset): "0", "2-3,6"; in order, no repeats."""
    cpus: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a CPU list such as 0 or 2-3,6") from None
        if not 0 <= first <= last < 1024:
            raise argparse.ArgumentTypeError(f"{part.strip()!r}: CPUs are 0-1023, low-high")
        cpus.extend(c for c in range(first, last + 1) if c not in cpus)
    return tuple(cpus)


def _level(text: str) -> int:
    """klog's -v as flanneld takes it: a base-10 integer."""
    from udpflannel.goflag import parse_int
    try:
        return parse_int(text, bits=32, base0=False)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}, want a level such as 2") from None


def _annotation_prefix(text: str) -> str:
    """--kube-annotation-prefix, checked by flanneld's rules (core/kubenode.py)."""
    from udpflannel.core.kubenode import NodeError, annotation_names
    try:
        annotation_names(text)
    except NodeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _bool(text: str) -> bool:
    """`udpflannel run`'s booleans: Go's spellings in any case, and yes/no, on/off
    (flanneld's form takes Go's alone: goflag.parse_bool)."""
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


# flanneld flags udpflannel does not implement, and what to use instead.
REFUSED = {
    "--auto-detect-ipv6": "an older flanneld's flag: IPv6 is EnableIPv6 in the network config; use --iface "
                          "or --public-ipv6",
    "--iface-ipv6": "an older flanneld's flag: IPv6 is EnableIPv6 in the network config; use --iface",
    "--charon-executable-path": "the ipsec backend is not implemented; use the vxlan backend",
    "--charon-viciurl": "the ipsec backend is not implemented; use the vxlan backend",
    "--use-multi-cluster-cidr": "multiple cluster CIDRs are not implemented; use one Network in the config",
    "--vmodule": "klog's per-Go-file verbosity has no meaning here; use -v=N",
    "--log_backtrace_at": "klog's stack trace at a Go source line has no meaning here; use -v=N",
}


_OFF = ("", "0", "f", "false", "no", "off")  # a refused flag set to one of these asks for nothing


class _Refuse(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if isinstance(values, str) and values.strip().lower() in _OFF:
            return
        parser.error(f"{option_string} is not supported: {REFUSED[option_string]}")


def _add_node_flags(p: argparse.ArgumentParser) -> None:
    """The flags that say what a node is: shared by `run` and `cleanup`."""
    def switch(name: str, default: bool, help: str) -> None:  # --x, --x=true, --x=false
        p.add_argument(name, type=_bool, nargs="?", const=True, default=default, metavar="BOOL",
                       help=help)

    p.add_argument("--tun", default="flannel0", help="TUN device name (default flannel0)")
    p.add_argument("--iface", action="append", default=[],
                   help="underlay interface name or address; repeat: the first usable wins "
                        "(default: the default route's)")
    p.add_argument("--iface-regex", action="append", default=[],
                   help="pick the underlay by a regex on interface names or addresses")
    p.add_argument("--iface-can-reach", type=_ip,
                   help="pick the underlay the kernel would use to reach this address")
    p.add_argument("--public-ip", type=_ipv4, help="IP advertised to other nodes (default: --iface's)")
    p.add_argument("--public-ipv6", type=_ipv6, help="IPv6 address advertised to other nodes when the network "
                   "config has EnableIPv6 (default: --iface's)")
    p.add_argument("--registry-file", default="/var/lib/udpflannel/registry.db",
                   help="embedded registry (SQLite) shared by daemons on this host, used without "
                        "--etcd-endpoints (in flanneld's form: given instead of -etcd-endpoints)")
    p.add_argument("--net-config", "--net-config-path", dest="net_config",
                   help="network config JSON used when the registry has none")
    p.add_argument("--subnet-file", default="/run/flannel/subnet.env", help="where to write subnet.env")
    p.add_argument("--state-dir", default="/var/lib/udpflannel", help="keeps the VTEP MAC across restarts")
    p.add_argument("--admin-socket", help="msgpack admin socket (default /run/udpflannel/<tun>.sock)")
    p.add_argument("--port", type=_port, help="the backend's UDP port (default: the config's "
                   "Backend.Port: 8472 for vxlan, 8285 for udp)")
    p.add_argument("--vni", type=_vni, help="VXLAN network identifier (default: the config's, 1)")
    p.add_argument("--dataplane", choices=("engine", "kernel", "auto"), default="engine",
                   help="engine (default: TUN + the compiled engine), kernel (flanneld's vxlan "
                        "backend: flannel.<VNI>), or auto (kernel where VXLAN works, else engine)")
    p.add_argument("--engine", choices=("compiled", "python"), default="compiled",
                   help="the engine: compiled, or its pure-Python reference twin")
    p.add_argument("--io", choices=("loop", "threads", "poll"), default=None,
                   help="how the engine is driven: poll (the default with the compiled engine: "
                        "one thread per queue for both directions, waiting in epoll), threads (a "
                        "thread per direction, blocking in the kernel) or loop (the event loop "
                        "drains the fds; the Python twin's only mode); see bench/RESULTS.md")
    p.add_argument("--queues", type=_queues, default=1,
                   help="with --io threads or poll: TUN queues and VXLAN sockets, their own "
                        "threads each (default 1; more spreads flows over cores)")
    p.add_argument("--cpus", type=_cpus, default=(),
                   help="pin the engine's data path to these CPUs (e.g. 0 or 2-3): with --io "
                        "threads or poll queue q's threads run on the list's q-th CPU (wrapping), "
                        "with --io loop the event loop thread (default: the scheduler decides; "
                        "pinning trades small-packet throughput for latency, see bench/RESULTS.md)")
    p.add_argument("--udp-port", type=_port_or_off, default=8285,
                   help="flanneld udp framing towards udp peers (a cluster migrating from the "
                        "udp backend), on this port (default 8285; 0: off)")
    p.add_argument("--source-ports", type=_source_ports, default=16,
                   help="VXLAN outer source ports the engine spreads flows over (default 16; "
                        "0: send from the VXLAN port)")
    switch("--strict-source", False,
           "drop every received packet whose inner source is outside its sender's subnet "
           "(default: only sources inside the overlay network must match; routed sources "
           "such as host addresses are delivered)")
    p.add_argument("--offload", type=_offloads, default="auto",
                   help="auto (default: all the kernel allows), off, or a comma list of tso,gso,gro")
    p.add_argument("--subnet-lease-ttl", type=_positive, default=24 * 60.0,
                   help="lease lifetime in minutes (default 1440)")
    p.add_argument("--subnet-lease-renew-margin", type=_renew_margin, default=60.0,
                   help="renew this many minutes before expiry (1-1439, default 60)")
    p.add_argument("--etcd-endpoints", help="comma-separated etcd v3 URLs; selects the etcd registry")
    p.add_argument("--etcd-prefix", default="/coreos.com/network", help="etcd prefix")
    p.add_argument("--etcd-cafile", help="CA certificate of etcd's TLS")
    p.add_argument("--etcd-certfile", help="client certificate for etcd")
    p.add_argument("--etcd-keyfile", help="client key for etcd")
    p.add_argument("--etcd-username", help="etcd user")
    p.add_argument("--etcd-password", help="etcd user's password")
    switch("--ip-masq", False, "masquerade traffic leaving the cluster network, as flanneld")
    switch("--ip-masq-fully-random-disable", False, "masquerade without --random-fully")
    switch("--iptables-forward-rules", True, "accept the cluster network in FORWARD (default true)")
    p.add_argument("--iptables-resync", type=_positive, default=5.0,
                   help="seconds between checks that the rules are still in place (default 5)")
    p.add_argument("--healthz-ip", type=_ipv4, default="0.0.0.0",
                   help="address of /healthz, /readyz (and /metrics) (default 0.0.0.0)")
    p.add_argument("--healthz-port", type=_port_or_off, default=0,
                   help="port of /healthz and /readyz (default 0: off)")
    p.add_argument("--metrics-port", type=_port_or_off, default=0,
                   help="port of /metrics, Prometheus text format (default 0: off; may equal "
                        "--healthz-port)")
    switch("--metrics-peers", False, "per-peer series in /metrics and the status (big clusters: "
                                     "many series)")
    switch("--ip-blackhole-route", False, "a blackhole route for this node's subnet, as flanneld "
                                          "(for CNI setups without a bridge route for it)")
    switch("--kube-subnet-mgr", False,
           "take the subnet from Kubernetes (the node's spec.podCIDR) and the peers from the nodes' "
           "flannel annotations instead of etcd, as flanneld --kube-subnet-mgr; the node is NODE_NAME, or "
           "the pod POD_NAMESPACE/POD_NAME's node; the network config is --net-config-path (default "
           "/etc/kube-flannel/net-conf.json)")
    p.add_argument("--kube-api-url", help="the Kubernetes API server's URL (default: the kubeconfig's, "
                   "or in a pod the in-cluster one)")
    p.add_argument("--kubeconfig-file", help="kubeconfig to reach the API server with (default: none; in a "
                   "pod, the service account's in-cluster credentials)")
    p.add_argument("--kube-annotation-prefix", type=_annotation_prefix, default="flannel.alpha.coreos.com",
                   help="prefix of the node annotations (default flannel.alpha.coreos.com)")
    switch("--set-node-network-unavailable", True,
           "with --kube-subnet-mgr: set the node's NetworkUnavailable condition to False once it forwards "
           "(default true)")
    p.add_argument("--takeover", nargs="?", const="exit", choices=("exit", "wait"), default=None,
                   help="upgrade without a gap: take the data plane of the daemon running for this "
                        "--tun over (its TUN queues and sockets, passed over the admin socket); it "
                        "then exits 0 (exit, the default) or idles until stopped (wait: a DaemonSet "
                        "surge). Without a running daemon: simply start")
    for name in REFUSED:
        p.add_argument(name, nargs="?", action=_Refuse, help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", type=_level, nargs="?", const=1, default=0, metavar="N",
                   help="log level as flanneld's -v: 0 info (default), 1-3 udpflannel's debug lines, "
                        f"{LIBRARY_DEBUG} or more also its libraries'; -v alone is 1")


class _EnvError(Exception):
    pass


class _EnvParser(Parser):
    def error(self, message: str) -> NoReturn:
        raise _EnvError(message)


def env_flags(environ: Mapping[str, str] | None = None, command_line: Sequence[str] = ()) -> list[str]:
    """FLANNELD_<FLAG> environment values as `--flag=value` arguments, by flanneld's
    rules (coreos/pkg flagutil.SetFlagsFromEnv): a variable is used only when its flag
    is not on ``command_line`` (so the command line wins whole: FLANNELD_IFACE=eth0
    with --iface eth1 is eth1 alone), only when not empty, and as one value (no comma
    splitting: FLANNELD_IFACE="eth0,eth1" names one interface, as in flanneld). Each
    is checked by the same parser as the flag (one clear line naming the variable when
    it is bad). -v's variable is flanneld's FLANNELD_V."""
    environ = os.environ if environ is None else environ
    given = {arg.split("=", 1)[0] for arg in command_line if arg.startswith("--")}
    given |= {"-v" for arg in command_line if arg.startswith("-v") and not arg.startswith("--")}
    checker = node_parser(_EnvParser)
    out = []
    for action in checker._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or longs == ["--help"] or given & set(action.option_strings):
            continue
        names = ["FLANNELD_V"] if action.dest == "verbose" else [
            "FLANNELD_" + o[2:].upper().replace("-", "_") for o in longs]
        found = [(n, environ[n]) for n in names if environ.get(n, "") != ""]
        if not found:
            continue
        if len({v for _, v in found}) > 1:
            raise _EnvError(f"environment {found[0][0]} and {found[1][0]} disagree; set one of them")
        name, value = found[0]
        if isinstance(action, _Refuse):  # set to anything but empty or false: refused, not ignored
            if value.strip().lower() not in _OFF:
                raise _EnvError(f"environment {name}: {longs[0]} is not supported: {REFUSED[longs[0]]}")
            continue
        args = [f"{longs[0]}={value}"]
        try:
            checker.parse_args(args)
        except _EnvError as e:
            raise _EnvError(f"environment {name}: {e}") from None
        out += args
    return out


def node_parser(kind: type[Parser] = Parser) -> Parser:
    """A parser of the node flags alone (`run`'s): for the environment and for
    flanneld's command line, which read the same definitions."""
    p = kind(prog="udpflannel run", add_help=False)
    _add_node_flags(p)
    return p


class _Version(argparse.Action):
    """--version, reading the package metadata only when asked (importlib.metadata
    costs tens of ms at every start, and a restart's first packet waits for them)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from udpflannel.version import __version__
        print(f"udpflannel {__version__}")  # on stdout, as argparse's own version action
        parser.exit()


def build_parser() -> Parser:
    parser = Parser(prog="udpflannel", description="flannel's node agent with a userspace data plane")
    parser.add_argument("--version", action=_Version, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _add_node_flags(sub.add_parser("run", help="run the node daemon"))
    sub.add_parser("flanneld", add_help=False, help="run the node daemon from flanneld's command line "
                   "and FLANNELD_* environment, in Go's flag syntax (as a binary named flanneld does)")
    cleanup = sub.add_parser("cleanup", help="remove what `run` leaves in place on purpose: "
                             "devices, routes, rules, subnet.env (and the lease, if asked)")
    _add_node_flags(cleanup)
    cleanup.add_argument("--release-lease", action="store_true",
                         help="also delete this node's lease from the registry")

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

    cni = sub.add_parser("install-cni", help="install udpflannel-cni, the standard CNI plugins and "
                         "the conflist on this host (idempotent; for an init container)")
    cni.add_argument("--bin-dir", default="/opt/cni/bin", help="where the runtime finds CNI plugins "
                     "(default /opt/cni/bin)")
    cni.add_argument("--conf-dir", default="/etc/cni/net.d", help="where the runtime finds network "
                     "configs (default /etc/cni/net.d)")
    cni.add_argument("--plugins-from", default="/usr/lib/cni", help="copy bridge, host-local, portmap "
                     "and loopback from here when missing in --bin-dir (default /usr/lib/cni; '': none)")
    cni.add_argument("--replace-plugins", action="store_true",
                     help="also replace standard plugins in --bin-dir that differ from --plugins-from")
    cni.add_argument("--plugin-form", choices=("auto", "frozen", "zipapp"), default="auto",
                     help="udpflannel-cni as one static executable that needs no Python on the host "
                     "(frozen: built by `make setup`), as a zipapp that needs python3 there, or auto "
                     "(default): frozen if built for these sources, else the zipapp with a warning")
    cni.add_argument("-v", "--verbose", action="store_true")

    status = sub.add_parser("status", help="ask a running daemon for its lease, data plane and counters")
    status.add_argument("--admin-socket", help="default: FLANNELD_ADMIN_SOCKET, else "
                        "/run/udpflannel/<tun>.sock with --tun or FLANNELD_TUN (flannel0)")
    status.add_argument("--tun", help="the daemon's --tun, to find its socket")
    status.add_argument("--json", action="store_true", help="the status as JSON, for machines")
    return parser


def _io(a: argparse.Namespace) -> str:
    from udpflannel.options import default_io
    return a.io or default_io(a.engine)


def _atoi(text: str, name: str) -> int:
    """Go's strconv.Atoi, as flanneld reads EVENT_QUEUE_DEPTH."""
    import re
    if not re.fullmatch(r"[+-]?[0-9]+", text, re.ASCII) or not -(1 << 63) <= int(text) < 1 << 63:
        raise BadInput(f"environment {name}={text!r}: not an integer")
    return int(text)


def kube_env(environ) -> dict:
    """What flanneld's Kubernetes subnet manager reads from its environment (and
    main.go's CONT_WHEN_CACHE_NOT_READY), as RunOptions fields. Read only with
    --kube-subnet-mgr, as flanneld reads them only then."""
    from udpflannel.options import EVENT_QUEUE_DEPTH
    depth = EVENT_QUEUE_DEPTH
    if environ.get("EVENT_QUEUE_DEPTH", "") != "":
        n = _atoi(environ["EVENT_QUEUE_DEPTH"], "EVENT_QUEUE_DEPTH")
        depth = n if n > 0 else EVENT_QUEUE_DEPTH  # flanneld: only a positive depth counts
    return {"node_name": environ.get("NODE_NAME") or None, "pod_name": environ.get("POD_NAME") or None,
            "pod_namespace": environ.get("POD_NAMESPACE") or None, "event_queue_depth": depth,
            "cont_when_cache_not_ready": environ.get("CONT_WHEN_CACHE_NOT_READY") == "true"}


def _run_options(a: argparse.Namespace, environ=None):
    from udpflannel.options import KUBE_NET_CONF, RunOptions
    endpoints = tuple(e.strip() for e in (a.etcd_endpoints or "").split(",") if e.strip())
    kube = kube_env(os.environ if environ is None else environ) if a.kube_subnet_mgr else {}
    return RunOptions(
        tun=a.tun, ifaces=tuple(a.iface), iface_regex=tuple(a.iface_regex),
        iface_can_reach=a.iface_can_reach, public_ip=a.public_ip, public_ipv6=a.public_ipv6,
        registry_file=a.registry_file,
        net_config=a.net_config or (KUBE_NET_CONF if a.kube_subnet_mgr else None),
        subnet_file=a.subnet_file, state_dir=a.state_dir,
        admin_socket=a.admin_socket, port=a.port, vni=a.vni, dataplane=a.dataplane,
        engine=a.engine, io=_io(a), queues=a.queues, cpus=a.cpus, offload=a.offload, udp_port=a.udp_port,
        source_ports=a.source_ports,
        strict_source=a.strict_source,
        lease_ttl=a.subnet_lease_ttl * 60, renew_margin=a.subnet_lease_renew_margin * 60,
        etcd_endpoints=endpoints, etcd_prefix=a.etcd_prefix.rstrip("/"),
        etcd_cafile=a.etcd_cafile, etcd_certfile=a.etcd_certfile, etcd_keyfile=a.etcd_keyfile,
        etcd_username=a.etcd_username, etcd_password=a.etcd_password,
        ip_masq=a.ip_masq, ip_masq_fully_random=not a.ip_masq_fully_random_disable,
        forward_rules=a.iptables_forward_rules, rules_resync=a.iptables_resync,
        healthz_ip=a.healthz_ip, healthz_port=a.healthz_port, metrics_port=a.metrics_port,
        metrics_peers=a.metrics_peers, ip_blackhole_route=a.ip_blackhole_route, takeover=a.takeover,
        kube_subnet_mgr=a.kube_subnet_mgr, kube_api_url=a.kube_api_url or None,
        kubeconfig_file=a.kubeconfig_file or None, kube_annotation_prefix=a.kube_annotation_prefix,
        set_node_network_unavailable=a.set_node_network_unavailable, **kube)


def _cmd_run(a: argparse.Namespace) -> int:
    io = _io(a)
    if a.queues > 1 and io == "loop":
        raise BadInput(f"--queues {a.queues} needs --io threads or --io poll")
    if io != "loop" and a.engine != "compiled":
        raise BadInput(f"--io {io} runs the compiled engine (the Python twin runs in the loop)")
    if a.cpus and a.dataplane == "kernel":
        raise BadInput("--cpus pins the engine's data path; with --dataplane kernel the kernel forwards")
    allowed = os.sched_getaffinity(0)
    if set(a.cpus) - allowed:
        raise BadInput(f"--cpus: CPU {min(set(a.cpus) - allowed)} is not one this process may run on "
                         f"({format_cpus(allowed)})")

    opts = _run_options(a)
    if opts.kube_subnet_mgr:
        if opts.etcd_endpoints:
            raise BadInput("--kube-subnet-mgr and --etcd-endpoints exclude each other: in kube mode "
                           "Kubernetes gives the subnet")
        if not opts.node_name and not (opts.pod_name and opts.pod_namespace):
            raise BadInput("--kube-subnet-mgr needs the node's name: NODE_NAME, or POD_NAME and POD_NAMESPACE "
                           "(the pod's own, whose spec.nodeName is read; a DaemonSet sets them with the "
                           "downward API)")
    warm = None
    if not opts.takeover:  # before the event loop: forwarding before anything else loads
        from udpflannel import warmstart
        warm = warmstart.begin(opts)
    import uvloop
    uvloop.run(_node(opts, warm))
    _exit_at_once(EXIT_OK)


def _exit_at_once(code: int) -> NoReturn:
    """Gone without the interpreter's orderly finalization (60-110 ms of module teardown
    and garbage collection, measured): the data plane has stopped, so until the next
    daemon forwards, every moment left is silence on the wire. Nothing left needs it:
    state files are written, the registry client closed, the fds are the kernel's to close."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _node(opts, warm) -> None:
    """The daemon, with the plane a warm start already has forwarding (warmstart.py)
    joining its loop; the daemon's own imports (netlink, the registry client, HTTP)
    come only now."""
    if warm is not None:
        warm.plane.activate()
    from udpflannel import daemon
    await daemon.run(opts, warm=warm)


def format_cpus(cpus) -> str:
    """{0, 1, 2, 5} -> "0-2,5": a CPU list as Linux writes one (the reverse of _cpus)."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(cpus):
        if run and c != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(c)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def _cmd_cleanup(a: argparse.Namespace) -> int:
    import asyncio

    from udpflannel import cleanup
    if a.release_lease and a.kube_subnet_mgr:
        raise BadInput("--release-lease with --kube-subnet-mgr: the subnet is the node's podCIDR, which "
                       "Kubernetes gives and takes back (with the Node)")
    asyncio.run(cleanup.run(_run_options(a), release_lease=a.release_lease))
    return EXIT_OK


def _cmd_demo(a: argparse.Namespace) -> int:
    from udpflannel.lab import demo
    if not 2 <= a.nodes <= 16:
        raise BadInput(f"--nodes {a.nodes}: choose 2 to 16")
    if os.geteuid() != 0:
        raise PermissionError("udpflannel demo needs root to create network namespaces")
    return demo.main(a.nodes, a.seconds, a.engine)


def _cmd_bench(a: argparse.Namespace) -> int:
    from udpflannel.lab import bench
    if os.geteuid() != 0:
        raise PermissionError("udpflannel bench needs root to create network namespaces")
    if a.repeat < 1:
        raise BadInput(f"--repeat {a.repeat}: must be at least 1")
    return bench.main(a)


def _cmd_install_cni(a: argparse.Namespace) -> int:
    from udpflannel.cni import install
    install.run(a.bin_dir, a.conf_dir, a.plugins_from or None, a.replace_plugins, a.plugin_form)
    return EXIT_OK


def _cmd_status(a: argparse.Namespace) -> int:
    from udpflannel.core.status import NodeStatus
    from udpflannel.observe import admin, statusview
    from udpflannel.options import default_admin_socket
    path = (a.admin_socket or os.environ.get("FLANNELD_ADMIN_SOCKET")
            or default_admin_socket(a.tun or os.environ.get("FLANNELD_TUN") or "flannel0"))
    try:
        reply = admin.query(path)
    except OSError as e:
        raise ConnectionError(f"no daemon answers at {path}: {e.strerror or e} "
                              "(is `udpflannel run` running? see --admin-socket, --tun)") from None
    try:
        st = NodeStatus.from_dict(reply)
    except (KeyError, TypeError) as e:
        raise ConnectionError(f"the daemon at {path} answered in a format this version does not "
                              f"read ({e}); is it an older udpflannel?") from None
    print(statusview.to_json(st) if a.json else statusview.render(st))
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run, "cleanup": _cmd_cleanup, "demo": _cmd_demo, "bench": _cmd_bench,
    "status": _cmd_status, "install-cni": _cmd_install_cni}


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What ends a command with one line: the project's own root (core/errors.py) and
    what the host itself refused (no such file, no permission, nobody listening)."""
    from udpflannel.core.errors import UdpflannelError
    return (UdpflannelError, PermissionError, FileNotFoundError, ConnectionError)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        if os.path.basename(sys.argv[0]) == "flanneld":  # a symlink or the console script
            return flanneld_main(argv)
    argv = list(argv)
    if argv[:1] == ["flanneld"]:
        return flanneld_main(argv[1:])
    if argv[:1] in (["run"], ["cleanup"]) and not ({"-h", "--help"} & set(argv)):
        try:
            argv = [argv[0], *env_flags(command_line=argv[1:]), *argv[1:]]
        except _EnvError as e:
            print(f"udpflannel: error: {e}", file=sys.stderr)
            return EXIT_USAGE
    args = build_parser().parse_args(argv)
    return _execute(COMMANDS[args.command], args)


def flanneld_main(argv: Sequence[str] | None = None) -> int:
    """`flanneld ARGS`: flanneld's command line and FLANNELD_* environment, exactly
    (see flanneld_cli), then the same node as `udpflannel run`."""
    from udpflannel import flanneld_cli
    from udpflannel.version import __version__
    try:
        args, warnings = flanneld_cli.parse(sys.argv[1:] if argv is None else argv)
    except flanneld_cli.FlanneldHelp as e:
        sys.stderr.write(e.text)
        return EXIT_OK
    except flanneld_cli.FlanneldVersion:
        # flanneld: fmt.Fprintln(os.Stderr, version.Version), its release tag ("v0.28.9"); ours the same way
        print(f"v{__version__}", file=sys.stderr)
        return EXIT_OK
    except flanneld_cli.FlanneldUsage as e:
        print(f"udpflannel: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return _execute(_cmd_run, args, warnings)


def _execute(command: Callable[[argparse.Namespace], int], args: argparse.Namespace,
             warnings: Sequence[str] = ()) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    level = int(getattr(args, "verbose", 0) or 0)
    if level >= 1:  # klog's -v: 1-3 our own debug lines; from 4 on, also the libraries' (netlink, gRPC, ...)
        logging.getLogger("udpflannel").setLevel(logging.DEBUG)
    if level >= LIBRARY_DEBUG:
        logging.getLogger().setLevel(logging.DEBUG)
    for text in warnings:
        logging.getLogger("udpflannel").warning("%s", text)
    try:
        return command(args)
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
