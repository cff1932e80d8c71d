"""What `udpflannel run` (and `cleanup`) is asked to do: the flags, resolved.

cli.py turns flags and FLANNELD_* variables into a RunOptions; the daemon reads
nothing else. Defaults are flanneld's where flanneld has the flag.
"""

from __future__ import annotations

from dataclasses import dataclass

from udpflannel.core.wire import UDP_PORT

EMBEDDED_SCOPE = "single host only"  # what the embedded registry is good for, said wherever it is named
KUBE_NET_CONF = "/etc/kube-flannel/net-conf.json"  # flanneld's --net-config-path default (kube mode)
KUBE_ANNOTATION_PREFIX = "flannel.alpha.coreos.com"
EVENT_QUEUE_DEPTH = 5000  # flanneld's default depth of its node event channel


@dataclass(frozen=True)
class RunOptions:
    tun: str = "flannel0"
    ifaces: tuple[str, ...] = ()  # --iface, repeatable: names or addresses, first usable wins
    iface_regex: tuple[str, ...] = ()
    iface_can_reach: str | None = None
    public_ip: str | None = None
    public_ipv6: str | None = None  # --public-ipv6 (with EnableIPv6)
    registry_file: str = "/var/lib/udpflannel/registry.db"
    net_config: str | None = None
    subnet_file: str = "/run/flannel/subnet.env"
    state_dir: str = "/var/lib/udpflannel"
    admin_socket: str | None = None  # default: /run/udpflannel/<tun>.sock
    port: int | None = None
    vni: int | None = None
    dataplane: str = "engine"  # engine | kernel | auto
    engine: str = "compiled"
    io: str = "loop"  # the engine's I/O: "loop" (the event loop), "threads" or "poll"; see default_io
    queues: int = 1  # --io threads/poll: TUN queues / VXLAN sockets, their threads each
    cpus: tuple[int, ...] = ()  # the data path's CPUs (--cpus); () the scheduler decides
    offload: str = "auto"  # see dataplane.sockets.parse_offloads
    udp_port: int = UDP_PORT  # flanneld udp framing towards udp peers (0: off)
    source_ports: int = 16  # VXLAN outer source ports (sockets) of the engine
    strict_source: bool = False  # every inner source must lie in its sender's subnet
    lease_ttl: float = 24 * 3600.0
    renew_margin: float = 3600.0
    etcd_endpoints: tuple[str, ...] = ()
    etcd_prefix: str = "/coreos.com/network"
    etcd_cafile: str | None = None
    etcd_certfile: str | None = None
    etcd_keyfile: str | None = None
    etcd_username: str | None = None
    etcd_password: str | None = None
    ip_masq: bool = False
    ip_masq_fully_random: bool = True  # off with --ip-masq-fully-random-disable
    forward_rules: bool = True  # --iptables-forward-rules
    rules_resync: float = 5.0  # --iptables-resync, seconds
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0  # 0: off
    metrics_port: int = 0  # 0: off; may equal healthz_port
    metrics_peers: bool = False  # per-peer series (cardinality!)
    takeover: str | None = None  # --takeover: take a running daemon's data plane; it then "exit"s or "wait"s
    # flanneld's --ip-blackhole-route: keep a blackhole route for the leased subnet in the
    # main table (host.netconf.ensure_blackhole_route), checked every rules_resync seconds
    ip_blackhole_route: bool = False
    # flanneld's Kubernetes subnet manager (--kube-subnet-mgr): the subnet is the node's
    # spec.podCIDR, peers are the nodes' flannel annotations (subnets/kube.py)
    kube_subnet_mgr: bool = False
    kube_api_url: str | None = None  # --kube-api-url: overrides the kubeconfig's server
    kubeconfig_file: str | None = None  # --kubeconfig-file; neither: in-cluster credentials
    kube_annotation_prefix: str = KUBE_ANNOTATION_PREFIX
    set_node_network_unavailable: bool = True  # NetworkUnavailable=False once forwarding
    node_name: str | None = None  # NODE_NAME; else the pod POD_NAMESPACE/POD_NAME's spec.nodeName
    pod_name: str | None = None
    pod_namespace: str | None = None
    event_queue_depth: int = EVENT_QUEUE_DEPTH  # EVENT_QUEUE_DEPTH: node events held for the plane
    cont_when_cache_not_ready: bool = False  # CONT_WHEN_CACHE_NOT_READY=true: no 10 min start limit

    @property
    def admin_path(self) -> str:
        return self.admin_socket or default_admin_socket(self.tun)

    @property
    def registry_kind(self) -> str:
        if self.kube_subnet_mgr:
            return "kube"
        return "etcd" if self.etcd_endpoints else "embedded"

    @property
    def registry_where(self) -> str:
        """Where the registry is, as the start-up log, `udpflannel status` and /readyz
        say it: the embedded one says that it cannot span hosts. (Kubernetes: the API
        server's URL, once the source has read the credentials; this is what the
        options alone say.)"""
        if self.kube_subnet_mgr:
            return self.kube_api_url or (f"kubeconfig {self.kubeconfig_file}" if self.kubeconfig_file
                                         else "in-cluster credentials")
        if self.etcd_endpoints:
            return f"{','.join(self.etcd_endpoints)} prefix {self.etcd_prefix}"
        return f"{self.registry_file}: {EMBEDDED_SCOPE}"


def default_admin_socket(tun: str) -> str:
    return f"/run/udpflannel/{tun}.sock"


def default_io(engine: str) -> str:
    """--io when none is given: the compiled engine on its own thread per queue (`poll`:
    in the bench it answers pings faster than the loop without carrying less; figures
    in bench/RESULTS.md), the Python twin in the event loop, its only mode."""
    return "poll" if engine == "compiled" else "loop"
