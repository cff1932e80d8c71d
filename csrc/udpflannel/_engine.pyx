# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The compiled data path. Theory of operation:

Packets move in bursts through two kinds of context: TUN -> UDP (txctx_t: read each
packet into a send batch with HEADROOM bytes in front, frame it in place, send frames
to one peer and socket together with UDP_SEGMENT or sendmmsg) and UDP -> TUN (rxctx_t:
receive a batch of reads per call with recvmmsg, each read often several GRO
datagrams, validate, coalesce TCP segments back into super-packets across the batch,
write them to the TUN). Where the kernel lacks UDP GSO (Linux < 4.18) or GRO (< 5.0)
the batched calls keep the syscalls per packet low and the TUN writes as large as
with them; where it lacks sendmmsg/recvmmsg too (ENOSYS), one datagram per call. Every per-packet outcome is a counter bump
in the context, never a Python object or exception. The data path is C functions:
_tx.pxi (TUN -> UDP), _rx.pxi (UDP -> TUN), _datapath.pxi (what both share: drops,
framing, TUN writes, the threads); _tables.pxi holds the route tables, byte accessors
and flow hash. This file is the Python API around them.

Framing is a property of each route: FRAME_VXLAN (RFC 7348, as Linux and flanneld's
vxlan backend) or FRAME_UDP (flanneld's udp backend: the bare IPv4 packet is the
datagram, its TTL decremented on each side as flannel's proxy does). VXLAN frames
leave from one of `tx_fds`, picked by a hash of the inner flow, so each flow has its
own outer source port (RFC 7348 section 5); udp frames leave from `bare_fd`.

Dual stack, as flanneld's vxlan backend: a route's subnet is IPv4 or IPv6 (the inner
family: IPv6 frames carry ethertype 86DD and the flannel-v6 VTEP MACs), and its peer
address is IPv4 or IPv6 (the outer family: IPv6 peers are sent to from `udp6_fd` /
`tx6_fds` and received on the IPv6 sockets). One route table holds both: keys are
128-bit addresses, IPv4 in its mapped form (netio.h).

Three ways to run (--io):
* loop: the event loop calls drain_tun/drain_udp/drain_bare when an fd is readable;
  each drains with the GIL released, in queue 0's contexts. Route changes happen on
  the loop thread between drains, in place: no locks.
* threads: start_threads() runs one thread per context, blocking in the kernel (read on
  the TUN, recvmsg on the socket), holding no GIL. Route changes are made on a copy of
  the table and published with one atomic pointer store (publish()); a replaced table
  is freed once every thread has been quiet since (quiescent-state reclamation:
  reclaim()). Counters are per context and summed when read.
* poll: start_threads(poll=True) runs one thread per queue that waits (epoll) for
  the queue's TUN or sockets and drains them: a burst written to the TUN and the
  answers it provokes are handled in one wake-up, as in the loop, without Python.
  Tables and counters as with threads; the queue's TUN context holds the thread
  state (its sockets' contexts point to it through `poller`).

The decisions mirror udpflannel.core.frame.Forwarder exactly; tests compare the two
byte for byte.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, uintptr_t
from libc.string cimport memcpy, memset, memcmp, memmove
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.errno cimport errno, EAGAIN, EINTR
from posix.unistd cimport read, close

cdef extern from "<sys/uio.h>" nogil:
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

import ipaddress
import os
from udpflannel.core.frame import SEND, ICMP, DELIVER, DROP

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    ssize_t sendto(int, const void *, size_t, int, const sockaddr *, socklen_t)
    int AF_INET
    int AF_INET6
    int MSG_DONTWAIT
    int MSG_WAITFORONE

cdef extern from "netio.h" nogil:
    uint64_t uf_csum_partial(const uint8_t *p, size_t n, uint64_t sum)
    uint16_t uf_csum_fold(uint64_t sum)
    uint64_t uf_pseudo4(const uint8_t *iphdr, uint8_t proto, uint16_t len)
    uint64_t uf_pseudo6(const uint8_t *ip6, uint8_t proto, uint32_t len)
    long uf_send_gso_iov(int fd, iovec *iov, int iovcnt, uint16_t segsize,
                         const uf_sockaddr *dst)
    long uf_send_many_iov(int fd, iovec *iov, int count, const uf_sockaddr *dst, int *mmsg,
                          uint64_t *calls)
    long uf_recvmsg(int fd, uint8_t *buf, size_t cap, uf_sockaddr *src, int *segsize,
                    uint32_t *ovfl, int flags)
    socklen_t uf_sockaddr_len(const uf_sockaddr *a)
    uf_u128 uf_key4(uint32_t host_order)
    uf_u128 uf_load128(const uint8_t *p)
    uf_u128 uf_addr_key(const uf_sockaddr *a)
    uint32_t uf_slot(uf_u128 key, uint32_t bits)
    uf_u128 UF_EMPTY
    int uf_have_mmsg(int fd)
    void uf_rxbatch_init(uf_rxbatch *b, uint8_t *base, size_t stride, size_t cap)
    int uf_recvmmsg(int fd, uf_rxbatch *b, int vlen, uint32_t *ovfl, int flags)
    int UF_RX_BATCH
    int EIO
    int ENOSYS
    int SO_RXQ_OVFL

cdef extern from "threads.h" nogil:
    int uf_wake_install()
    int uf_thread_start(pthread_t *tid, uf_thread_fn fn, void *arg, int cpu, const char *name)
    void uf_thread_stop(pthread_t tid, int *running)
    long uf_read_nowait(int fd, void *buf, size_t len)
    void *uf_load_ptr(void **p)
    void uf_store_ptr(void **p, void *v)
    uint64_t uf_load_u64(uint64_t *p)
    void uf_store_u64(uint64_t *p, uint64_t v)
    int uf_load_int(int *p)
    void uf_store_int(int *p, int v)
    void uf_notify(int efd)
    int uf_waiter_open(const int *fds, int n)
    int uf_waiter_wait(int ep, int *ready)

# The wire's numbers (udpflannel/core/wire.py) and the virtio header's
# (udpflannel/core/offload.py), mirrored: tests/unit/test_wire.py compares them.
cdef enum:
    IPV4_HLEN = 20
    IPV6_HLEN = 40
    VXLAN_HLEN = 8
    ETH_HLEN = 14
    HEADROOM = 22            # VXLAN header + inner Ethernet header
    ETH_P_IP = 0x0800
    ETH_P_IPV6 = 0x86DD
    UDP_MAX_PAYLOAD = 65507  # one IPv4 UDP datagram: what one UDP_SEGMENT send may carry
    ICMP_DEST_UNREACH = 3    # ICMP error types (never answered with an ICMP error)
    ICMP_SOURCE_QUENCH = 4
    ICMP_REDIRECT = 5
    ICMP_TIME_EXCEEDED = 11
    ICMP_PARAMETERPROB = 12
    VNET = 10                # sizeof(struct virtio_net_hdr)
    NEEDS_CSUM = 1
    GSO_TCPV4 = 1
    GSO_TCPV6 = 4
    GSO_UDP_L4 = 5
    MAX_MERGE = 64           # segments per coalesced TUN write
    MAX_PACKET = 65535       # bytes per coalesced TUN write
    TCP_FIN = 0x01
    TCP_PSH = 0x08
    TCP_ACK = 0x10

cdef enum:
    OBUF_SIZE = 64 * 256     # one window of segment headers (payloads stay in place)
    BBUF_SIZE = 4 * 65536    # the send batch: frames read and framed in place
    MAX_WINDOW = 64          # UDP_SEGMENT's limit on segments per send
    TX_GROUPS = 16           # (peer, socket) groups a send batch fills at once (the default --source-ports)
    MAX_TX = 64              # outer source ports (sockets) a node sends VXLAN from
    MAX_QUEUES = 16
    BUDGET = 256             # packets per burst in a thread
    ICMP_REPLY_MAX = 1280    # ICMPv6: the minimum IPv6 MTU (ICMP: 28 + <= 68 quoted)
    ICMP6_QUOTE_MAX = 1232   # of the packet quoted in ICMPv6 (1280 - its 48 bytes of headers)
    BUFSIZE = 65536 + 64
    RX_BATCH = 64            # datagrams (or GRO reads) per recvmmsg: netio.h's UF_RX_BATCH
    RX_SLOT = 65536 + 4096   # one read's room in the receive buffer (BUFSIZE, whole pages)

cdef enum:
    FRAME_VXLAN = 0
    FRAME_UDP = 1

cdef enum:
    ACT_SEND = 0
    ACT_ICMP = 1
    ACT_DELIVER = 2
    ACT_DROP = 3

# Counter slots, in udpflannel.core.wire.COUNTERS order.
cdef enum:
    C_TX_PACKETS = 0
    C_TX_BYTES
    C_RX_PACKETS
    C_RX_BYTES
    C_ICMP
    C_TX_SUPER
    C_RX_MERGED
    C_GSO_FALLBACK
    C_RX_CSUM_COMPLETED
    C_TX_CALLS
    C_RX_CALLS
    D_BAD_PACKET
    D_NO_ROUTE
    D_SEND_ERROR
    D_BAD_OFFLOAD
    D_TTL_EXPIRED
    D_SHORT
    D_BAD_FLAGS
    D_BAD_VNI
    D_BAD_MAC
    D_BAD_ETHERTYPE
    D_BAD_IP
    D_IPV6
    D_IPV4
    D_UNKNOWN_SENDER
    D_SPOOFED
    D_BAD_DESTINATION
    D_TRUNCATED
    D_TUN_WRITE_ERROR
    N_COUNTERS

# The C side's names, for counters(), errors and tests/unit/test_wire.py (which holds
# them to udpflannel/core/wire.py). Python objects: the data path never reads them.
_SLOT_NAMES = {
    C_TX_PACKETS: "tx_packets", C_TX_BYTES: "tx_bytes", C_RX_PACKETS: "rx_packets",
    C_RX_BYTES: "rx_bytes", C_ICMP: "icmp_unreachable", C_TX_SUPER: "tx_super_packets",
    C_RX_MERGED: "rx_merged_writes", C_GSO_FALLBACK: "gso_fallbacks",
    C_RX_CSUM_COMPLETED: "rx_csum_completed", C_TX_CALLS: "tx_send_calls",
    C_RX_CALLS: "rx_recv_calls",
    D_BAD_PACKET: "drop_bad_packet", D_NO_ROUTE: "drop_no_route",
    D_SEND_ERROR: "drop_send_error", D_BAD_OFFLOAD: "drop_bad_offload",
    D_TTL_EXPIRED: "drop_ttl_expired", D_SHORT: "drop_short", D_BAD_FLAGS: "drop_bad_flags",
    D_BAD_VNI: "drop_bad_vni", D_BAD_MAC: "drop_bad_mac",
    D_BAD_ETHERTYPE: "drop_bad_ethertype", D_BAD_IP: "drop_bad_ip", D_IPV6: "drop_ipv6", D_IPV4: "drop_ipv4",
    D_UNKNOWN_SENDER: "drop_unknown_sender", D_SPOOFED: "drop_spoofed",
    D_BAD_DESTINATION: "drop_bad_destination",
    D_TRUNCATED: "drop_truncated", D_TUN_WRITE_ERROR: "drop_tun_write_error",
}
COUNTERS = tuple(_SLOT_NAMES[i] for i in range(N_COUNTERS))
_REASONS = {i: name[len("drop_"):] for i, name in enumerate(COUNTERS) if name.startswith("drop_")}
FRAMINGS = tuple({FRAME_VXLAN: "vxlan", FRAME_UDP: "udp"}[i] for i in range(2))
CONSTANTS = {
    "IPV4_HLEN": IPV4_HLEN, "IPV6_HLEN": IPV6_HLEN, "VXLAN_HLEN": VXLAN_HLEN, "ETH_HLEN": ETH_HLEN,
    "HEADROOM": HEADROOM, "ETH_P_IP": ETH_P_IP, "ETH_P_IPV6": ETH_P_IPV6,
    "UDP_MAX_PAYLOAD": UDP_MAX_PAYLOAD, "SO_RXQ_OVFL": SO_RXQ_OVFL,
    "ICMP_ERROR_TYPES": frozenset((ICMP_DEST_UNREACH, ICMP_SOURCE_QUENCH, ICMP_REDIRECT,
                                   ICMP_TIME_EXCEEDED, ICMP_PARAMETERPROB)),
    "VNET_HLEN": VNET, "NEEDS_CSUM": NEEDS_CSUM, "GSO_TCPV4": GSO_TCPV4, "GSO_TCPV6": GSO_TCPV6,
    "GSO_UDP_L4": GSO_UDP_L4, "MAX_MERGE": MAX_MERGE, "MAX_PACKET": MAX_PACKET,
    "TCP_FIN": TCP_FIN, "TCP_PSH": TCP_PSH, "TCP_ACK": TCP_ACK,
}

cdef uint8_t ZERO_VNET[10]  # zero-initialized: the virtio header of a plain packet

include "_tables.pxi"
include "_datapath.pxi"
include "_tx.pxi"
include "_rx.pxi"


cdef uf_u128 _u128(object value) except? 0:
    """A Python int of up to 128 bits in C (through two 64-bit halves: Cython takes
    uf_u128 for a 64-bit type, see _engine.pxd)."""
    return (<uf_u128><uint64_t>(value >> 64) << 64) | <uint64_t>(value & 0xFFFFFFFFFFFFFFFF)


cdef uf_u128 _key(object address) except? 0:
    """An ipaddress address as its route-table key (IPv4 in its mapped form)."""
    if address.version == 4:
        return uf_key4(int(address))
    return _u128(int(address))


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _peer_address(ip):
    """Whether a node can have this address: not unspecified, not the all-ones address
    of its family (the tables' free-slot marker, and IPv4's limited broadcast), not an
    IPv4-mapped IPv6 address (its key is the IPv4 address's)."""
    top = (1 << ip.max_prefixlen) - 1
    return int(ip) not in (0, top) and not (ip.version == 6 and ip in _MAPPED)


cdef object _address(uf_u128 key):
    """A route-table key as the address it stands for."""
    cdef object value = (<object><uint64_t>(key >> 64) << 64) | <object><uint64_t>key
    if value >> 32 == 0xFFFF:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return ipaddress.IPv6Address(value)


cdef txctx_t *tx_new(eng_t *e, int queue, void *owner) except NULL:
    cdef txctx_t *c = <txctx_t *>calloc(1, sizeof(txctx_t))
    if c == NULL:
        raise MemoryError()
    c.e, c.queue, c.owner, c.tun_fd = e, queue, owner, -1
    c.bbuf = <uint8_t *>malloc(BBUF_SIZE)
    c.obuf = <uint8_t *>malloc(OBUF_SIZE)
    c.icmp = <uint8_t *>malloc(ICMP_REPLY_MAX)
    if c.bbuf == NULL or c.obuf == NULL or c.icmp == NULL:
        tx_free(c)
        raise MemoryError()
    return c


cdef void tx_free(txctx_t *c) noexcept:
    if c != NULL:
        free(c.bbuf)
        free(c.obuf)
        free(c.icmp)
        free(c)


cdef rxctx_t *rx_new(eng_t *e, int queue, int fd, bint bare, void *owner) except NULL:
    cdef rxctx_t *c = <rxctx_t *>calloc(1, sizeof(rxctx_t))
    if c == NULL:
        raise MemoryError()
    c.e, c.queue, c.fd, c.bare, c.owner, c.tun_fd, c.poller = e, queue, fd, bare, owner, -1, -1
    # address space for a whole batch; only the pages datagrams land in become memory
    c.buf = <uint8_t *>malloc(RX_BATCH * RX_SLOT)
    c.cbuf = <uint8_t *>malloc(VNET + BUFSIZE)
    c.batch = <uf_rxbatch *>malloc(sizeof(uf_rxbatch))
    if c.buf == NULL or c.cbuf == NULL or c.batch == NULL:
        rx_free(c)
        raise MemoryError()
    uf_rxbatch_init(c.batch, c.buf, RX_SLOT, BUFSIZE)
    return c


cdef void rx_free(rxctx_t *c) noexcept:
    if c != NULL:
        free(c.buf)
        free(c.cbuf)
        free(c.batch)
        free(c)


cdef class Engine:
    def __cinit__(self):
        memset(&self.e, 0, sizeof(eng_t))
        self.e.udp_fd = -1
        self.e.udp6_fd = -1
        self.e.bare_fd = -1
        self.e.notify_fd = -1
        self.nq = 0
        self.nrx = 0
        self.w = NULL
        self.probe_rx = NULL
        self.probe_tx = NULL
        self.threads = False
        self.cpus = ()

    def __init__(self, *, int vni, bytes vtep_mac, network, int subnet_len,
                 bint strict_source=False, network6=None, int subnet_len6=0, bytes vtep_mac6=None):
        if UF_RX_BATCH != RX_BATCH:
            raise RuntimeError("netio.h's UF_RX_BATCH and the engine's RX_BATCH differ")
        if network is None and network6 is None:
            raise ValueError("no network: give network, network6 or both")
        if not 0 < vni < (1 << 24):
            raise ValueError(f"VNI {vni} out of range")
        if vtep_mac6 is None:
            vtep_mac6 = vtep_mac
        if len(vtep_mac) != 6 or len(vtep_mac6) != 6:
            raise ValueError("vtep_mac and vtep_mac6 must be 6 bytes")
        cdef eng_t *e = &self.e
        self.pools = {}
        if network is not None:
            net = ipaddress.IPv4Network(network)
            if not net.prefixlen < subnet_len <= 30:
                raise ValueError(f"subnet length /{subnet_len} does not fit {net}")
            self.pools[4] = (net, subnet_len)
            e.has4 = True
            e.net = int(net.network_address)
            e.netmask = int(net.netmask)
            e.subnet_len = subnet_len
            e.shift = 32 - subnet_len
        if network6 is not None:
            net6 = ipaddress.IPv6Network(network6)
            if not net6.prefixlen < subnet_len6 <= 126:
                raise ValueError(f"IPv6 subnet length /{subnet_len6} does not fit {net6}")
            if net6.overlaps(_MAPPED):  # their keys are the IPv4 routes'
                raise ValueError(f"{net6} overlaps the IPv4-mapped addresses {_MAPPED}")
            self.pools[6] = (net6, subnet_len6)
            e.has6 = True
            e.net6 = _u128(int(net6.network_address))
            e.mask6 = _u128(int(net6.netmask))
            e.shift6 = 128 - subnet_len6
        e.vni = vni
        memcpy(e.own_mac, <const char *>vtep_mac, 6)
        memcpy(e.own_mac6, <const char *>vtep_mac6, 6)
        memset(e.vxlan_hdr, 0, 8)
        e.vxlan_hdr[0] = 0x08
        e.vxlan_hdr[4] = (vni >> 16) & 0xFF
        e.vxlan_hdr[5] = (vni >> 8) & 0xFF
        e.vxlan_hdr[6] = vni & 0xFF
        e.strict_source = strict_source
        e.rt = rtab_new()
        self.w = e.rt
        self.retired = []
        self.captured = None
        self.probe_tx = tx_new(e, 0, <void *>self)
        self.probe_rx = rx_new(e, 0, -1, False, <void *>self)

    def __dealloc__(self):
        cdef int i
        if self.threads:
            self._join_all()
        for i in range(self.nq):
            tx_free(self.tx[i])
        for i in range(self.nrx):
            rx_free(self.rx[i])
        tx_free(self.probe_tx)
        rx_free(self.probe_rx)
        if self.w != NULL and self.w != self.e.rt:
            rtab_free(self.w)
        rtab_free(self.e.rt)
        for _gen, address in self.retired or ():
            rtab_free(<rtab_t *><uintptr_t>address)

    # ---- control path: routes (Python objects are fine here) ----------------------

    cdef uf_u128 _subnet_key(self, str subnet) except? 0:
        """A subnet of either family as its route-table key; ValueError unless it is a
        /SubnetLen (IPv6: /IPv6SubnetLen) of the network of its family."""
        s = ipaddress.ip_network(subnet)
        pool = self.pools.get(s.version)
        if pool is None or s.prefixlen != pool[1] or not s.subnet_of(pool[0]):
            length = f"/{pool[1]}" if pool else f"IPv{s.version}"
            raise ValueError(f"{subnet} is not a {length} inside the overlay network")
        return _key(s.network_address)

    cdef rtab_t *_writable(self) except NULL:
        """The table to edit: the published one in place while no thread reads it,
        else a private copy that publish() swaps in."""
        if self.threads and self.w == self.e.rt:
            self.w = rtab_clone(self.e.rt)
        return self.w

    def set_route(self, str subnet, str public_ip, int port, bytes vtep_mac=None,
                  str framing="vxlan"):
        """Route `subnet` (either family) to the node at public_ip:port (either family:
        an IPv6 address is sent to from the IPv6 sockets). framing "vxlan" needs the
        node's VtepMAC (for an IPv6 subnet its flannel-v6 one); "udp" (flanneld's udp
        backend, IPv4 only) takes none."""
        cdef route_t r
        ip = ipaddress.ip_address(public_ip)
        family = ipaddress.ip_network(subnet).version
        if framing not in FRAMINGS:
            raise ValueError(f"framing {framing!r} is not one of {FRAMINGS}")
        if framing == "vxlan" and (vtep_mac is None or len(vtep_mac) != 6):
            raise ValueError("VXLAN framing needs a 6-byte VtepMAC")
        if framing == "udp" and (family == 6 or ip.version == 6):
            raise ValueError("flanneld's udp framing carries IPv4 only")
        if not 0 < port < 65536:
            raise ValueError("bad port")
        if not _peer_address(ip):  # also keeps UF_EMPTY free as the tables' slot marker
            raise ValueError(f"{public_ip} cannot be a peer's address")
        memset(&r, 0, sizeof(route_t))
        r.subnet = self._subnet_key(subnet)
        r.public_ip = _key(ip)
        r.port = port
        r.family = family
        r.outer6 = ip.version == 6
        r.framing = FRAME_VXLAN if framing == "vxlan" else FRAME_UDP
        if r.framing == FRAME_VXLAN:
            memcpy(r.mac, <const char *>vtep_mac, 6)
        if r.outer6:
            r.addr.in6.sin6_family = AF_INET6
            r.addr.in6.sin6_port = htons(port)
            memcpy(r.addr.in6.sin6_addr.s6_addr, <const char *>ip.packed, 16)
        else:
            r.addr.in4.sin_family = AF_INET
            r.addr.in4.sin_port = htons(port)
            r.addr.in4.sin_addr.s_addr = htonl(int(ip))
        rtab_put(self._writable(), &r)

    def del_route(self, str subnet):
        cdef uf_u128 base = self._subnet_key(subnet)
        if htab_get(&self.w.by_subnet, base) < 0:
            return False
        return rtab_del(self._writable(), base)

    def publish(self):
        """Make the route changes since the last publish visible to running threads,
        in one atomic store; the replaced table waits for reclaim(). Returns whether
        anything was published (nothing to do while no thread runs)."""
        cdef rtab_t *old = self.e.rt
        if self.w == old:
            return False
        uf_store_ptr(<void **>&self.e.rt, <void *>self.w)
        gen = uf_load_u64(&self.e.gen) + 1
        uf_store_u64(&self.e.gen, gen)
        self.retired.append((gen, <uintptr_t>old))
        self.reclaim()
        return True

    def reclaim(self):
        """Free replaced tables that no thread can still hold: every thread has been
        quiet (between bursts, or blocked in the kernel) since their replacement.
        Returns how many are still waiting."""
        cdef int i
        cdef uint64_t floor = <uint64_t>-1, seen
        cdef thr_t *t
        for i in range(self.nq + self.nrx):
            t = self._state(i)
            if uf_load_int(&t.running) and uf_load_int(&t.active):
                seen = uf_load_u64(&t.seen)
                if seen < floor:
                    floor = seen
        keep = []
        for gen, address in self.retired:
            if gen <= floor:
                rtab_free(<rtab_t *><uintptr_t>address)
            else:
                keep.append((gen, address))
        self.retired = keep
        return len(keep)

    def lookup(self, str address):
        """(public IP, port, VtepMAC or None for udp framing), or None: the route to
        the subnet holding `address` (either family)."""
        cdef route_t *r
        ip = ipaddress.ip_address(address)
        r = find(&self.e, self.w, int(ip)) if ip.version == 4 else find6(&self.e, self.w, _key(ip))
        if r == NULL:
            return None
        mac = (<char *>r.mac)[:6] if r.framing == FRAME_VXLAN else None
        return (str(_address(r.public_ip)), r.port, mac)

    def route_count(self):
        return self.w.n

    def counters(self):
        """Every counter, summed over the contexts (threads write their own)."""
        cdef uint64_t total[32]
        cdef int i, k
        memset(total, 0, sizeof(total))
        for k in range(N_COUNTERS):
            total[k] = self.probe_tx.ctr[k] + self.probe_rx.ctr[k]
            for i in range(self.nq):
                total[k] += self.tx[i].ctr[k]
            for i in range(self.nrx):
                total[k] += self.rx[i].ctr[k]
        return {name: total[i] for i, name in enumerate(COUNTERS)}

    def kernel_drops(self):
        """Datagrams the kernel dropped on the receiving sockets (their queues were
        full), as last reported by SO_RXQ_OVFL; 0 until a read saw it."""
        cdef uint64_t total = 0
        cdef int i
        for i in range(self.nrx):
            total += self.rx[i].rx_ovfl
        return total

    def offloads(self):
        """What is in use now (gso, sendmmsg and recvmmsg turn themselves off if the
        kernel refuses them)."""
        return {"vnet_hdr": bool(self.e.vnet), "gso": bool(uf_load_int(&self.e.gso)),
                "gro": bool(self.e.gro), "sendmmsg": bool(uf_load_int(&self.e.mmsg_tx)),
                "recvmmsg": bool(uf_load_int(&self.e.mmsg_rx))}

    # ---- one packet at a time, for tests and tools ----------------------------------

    def encap(self, bytes packet):
        cdef Py_ssize_t n = len(packet)
        cdef route_t *r = NULL
        cdef txctx_t *c = self.probe_tx
        cdef int act
        cdef Py_ssize_t fb
        cdef uint8_t *slot = c.bbuf + HEADROOM
        if n > BUFSIZE - HEADROOM:
            raise ValueError("packet too long")
        c.rt = self.w
        memcpy(slot, <const char *>packet, n)
        act = encap_c(c, slot, n, &r)
        if act == ACT_SEND:
            fb = framing_bytes(r)
            return (SEND, bytes((slot - fb)[:n + fb]), (str(_address(r.public_ip)), r.port))
        if act == ACT_ICMP:
            return ICMP, bytes(c.icmp[:c.icmp_len]), None
        return DROP, _REASONS[c.last_drop], None

    def decap(self, bytes datagram, str source):
        return self._decap(datagram, source, False)

    def decap_bare(self, bytes datagram, str source):
        return self._decap(datagram, source, True)

    cdef _decap(self, bytes datagram, str source, bint bare):
        cdef Py_ssize_t n = len(datagram), plen = 0
        cdef uf_u128 src = _key(ipaddress.ip_address(source))
        cdef rxctx_t *c = self.probe_rx
        if n > BUFSIZE:
            raise ValueError("datagram too long")
        c.rt = self.w
        memcpy(c.buf, <const char *>datagram, n)
        if bare:
            if decap_bare_c(c, c.buf, n, src, &plen) == ACT_DELIVER:
                return DELIVER, bytes(c.buf[:plen]), None
        elif decap_c(c, c.buf, n, src, &plen) == ACT_DELIVER:
            return DELIVER, bytes(c.buf[HEADROOM:HEADROOM + plen]), None
        return DROP, _REASONS[c.last_drop], None

    def flow_index(self, bytes packet, int ways):
        """Which of `ways` source-port sockets a packet's flow takes (tests)."""
        if len(packet) < 20 or (packet[0] >> 4 == 6 and len(packet) < 40):
            raise ValueError("not an IP packet")
        return (<uint64_t>flow_hash(<const uint8_t *><const char *>packet, len(packet))
                * <uint64_t>ways) >> 32

    def segment(self, bytes data):
        """virtio header + packet (one TUN read) -> the datagrams it becomes."""
        cdef Py_ssize_t n = len(data)
        cdef txctx_t *c = self.probe_tx
        cdef int saved = self.e.vnet
        if n > BUFSIZE - HEADROOM + VNET:
            raise ValueError("read too long")
        c.rt = self.w
        flush_batch(c)
        cdef uint8_t *slot = batch_slot(c)
        memcpy(slot - VNET, <const char *>data, n)
        self.captured = []
        c.capture = True
        self.e.vnet = True
        try:
            tun_read_vnet(c, slot, n)
            flush_batch(c)
            return self.captured
        finally:
            c.capture = False
            self.captured = None
            self.e.vnet = saved

    def coalesce(self, list packets):
        """Inner packets of consecutive datagrams -> TUN writes (virtio header + packet)."""
        cdef bytes p
        cdef Py_ssize_t n, total = 0, at = 0
        cdef uint8_t *scratch
        cdef rxctx_t *c = self.probe_rx
        cdef int saved = self.e.vnet
        for p in packets:
            total += HEADROOM + len(p)
        scratch = <uint8_t *>malloc(total + 1)
        if scratch == NULL:
            raise MemoryError()
        self.captured = []
        c.capture = True
        self.e.vnet = True
        try:
            for p in packets:  # laid out like a GRO read: each packet after its headers
                n = len(p)
                if n > BUFSIZE - HEADROOM:
                    raise ValueError("packet too long")
                memcpy(scratch + at + HEADROOM, <const char *>p, n)
                co_add(c, scratch + at + HEADROOM, n)
                at += HEADROOM + n
            co_flush(c)
            return self.captured
        finally:
            c.co_count = 0
            c.capture = False
            free(scratch)
            self.captured = None
            self.e.vnet = saved

    # ---- attaching to the fds -------------------------------------------------------

    def set_subnet(self, str subnet):
        """This node's subnet of one family (call once per family): received packets
        must be for one of its hosts (IPv4: not its broadcast address); the rest are
        dropped as bad_destination."""
        self._subnet_key(subnet)
        own = ipaddress.ip_network(subnet)
        if own.version == 4:
            self.e.own_net = int(own.network_address)
            self.e.own_mask = int(own.netmask)
        else:
            self.e.own_net6 = _u128(int(own.network_address))
            self.e.own_mask6 = _u128(int(own.netmask))

    def set_bare_fd(self, int bare_fd):
        """Start (fd >= 0) or stop (-1) speaking flanneld's udp framing on ``bare_fd``:
        the socket is open only while a peer needs it. Threads must be stopped."""
        cdef int i
        if self.threads:
            raise RuntimeError("stop_threads() first")
        if self.nrx and self.rx[self.nrx - 1].bare:
            if bare_fd >= 0:
                self.rx[self.nrx - 1].fd = bare_fd
            else:
                self.nrx -= 1
                rx_free(self.rx[self.nrx])
                self.rx[self.nrx] = NULL
        self.e.bare_fd = bare_fd
        if bare_fd >= 0 and self.nq:
            self._bare_context(self.tx[0].tun_fd)

    def attach(self, int tun_fd, int udp_fd, *, int bare_fd=-1, tx_fds=(), int udp6_fd=-1,
               tx6_fds=(), bint vnet_hdr=False, bint gso=False, bint gro=False, bint mmsg=True):
        """Give the engine queue 0's fds and the shared ones: the TUN, the VXLAN socket
        (udp_fd; -1 in an IPv6-only network), flanneld udp framing's socket (bare_fd,
        -1: none), the VXLAN source-port sockets (tx_fds; empty: send from udp_fd) and
        their IPv6 twins for peers with IPv6 addresses (udp6_fd, -1: none; tx6_fds:
        the IPv6 source ports, empty: send from udp6_fd). Say which offloads they
        were set up with: vnet_hdr (the TUN was opened with IFF_VNET_HDR), gso
        (UDP_SEGMENT may be used), gro (UDP_GRO is on). mmsg: batch with sendmmsg
        (several datagrams that UDP_SEGMENT cannot carry) and recvmmsg (a batch of
        datagrams per receive) where the kernel has them, which is asked here, once."""
        cdef int k
        if self.threads:
            raise RuntimeError("stop_threads() first")
        if len(tx_fds) > MAX_TX or len(tx6_fds) > MAX_TX:
            raise ValueError(f"at most {MAX_TX} source-port sockets per family")
        self.e.udp_fd = udp_fd
        self.e.udp6_fd = udp6_fd
        self.e.bare_fd = bare_fd
        self.e.ntx = len(tx_fds)
        for k in range(self.e.ntx):
            self.e.tx_fds[k] = tx_fds[k]
        self.e.ntx6 = len(tx6_fds)
        for k in range(self.e.ntx6):
            self.e.tx6_fds[k] = tx6_fds[k]
        self.e.vnet = vnet_hdr
        self.e.gso = gso
        self.e.gro = gro
        probe = next((fd for fd in (udp_fd, udp6_fd, bare_fd) if fd >= 0), -1)
        self.e.mmsg_tx = self.e.mmsg_rx = mmsg and probe >= 0 and uf_have_mmsg(probe)
        if self.nq == 0:
            self.tx[0] = tx_new(&self.e, 0, <void *>self)
            self.nq = 1
        if self.nrx == 0:
            self.rx[0] = rx_new(&self.e, 0, udp_fd, False, <void *>self)
            self.nrx = 1
        self.tx[0].tun_fd = tun_fd
        self.rx[0].fd = udp_fd
        self.rx[0].tun_fd = tun_fd
        self._socket_context(0, udp6_fd, tun_fd)
        self._bare_context(tun_fd)

    cdef _socket_context(self, int queue, int udp6_fd, int tun_fd):
        """Queue `queue`'s IPv6 socket's receive context: made when it first has a fd
        (an unused one keeps fd -1: no thread reads it)."""
        cdef rxctx_t *c = self._rx_of(queue, True, False)
        if c == NULL and udp6_fd < 0:
            return
        if c == NULL:
            c = rx_new(&self.e, queue, udp6_fd, False, <void *>self)
            c.six = True
            self._add_rx(c)
        c.fd = udp6_fd
        c.tun_fd = tun_fd

    cdef _add_rx(self, rxctx_t *c):
        """Add a receive context; the flanneld-udp socket's stays last."""
        if self.nrx and self.rx[self.nrx - 1].bare and not c.bare:
            self.rx[self.nrx] = self.rx[self.nrx - 1]
            self.rx[self.nrx - 1] = c
        else:
            self.rx[self.nrx] = c
        self.nrx += 1

    cdef rxctx_t *_rx_of(self, int queue, bint six, bint bare):
        cdef int i
        for i in range(self.nrx):
            if self.rx[i].queue == queue and self.rx[i].six == six and self.rx[i].bare == bare:
                return self.rx[i]
        return NULL

    cdef _bare_context(self, int tun_fd):
        """The flanneld-udp socket's receive context: the last one, after the queues."""
        cdef rxctx_t *last = self.rx[self.nrx - 1] if self.nrx else NULL
        if self.e.bare_fd < 0:
            return
        if last != NULL and last.bare:
            last.fd = self.e.bare_fd
            return
        last = rx_new(&self.e, 0, self.e.bare_fd, True, <void *>self)
        last.tun_fd = tun_fd
        self._add_rx(last)

    def add_queue(self, int tun_fd, int udp_fd, int udp6_fd=-1):
        """Another TUN queue and VXLAN socket (IFF_MULTI_QUEUE, SO_REUSEPORT; with IPv6
        peers its IPv6 socket too): one more thread per fd with start_threads()."""
        cdef int q = self.nq
        cdef rxctx_t *c
        if self.threads:
            raise RuntimeError("stop_threads() first")
        if self.nq == 0:
            raise RuntimeError("attach() first")
        if self.nq >= MAX_QUEUES:
            raise ValueError(f"at most {MAX_QUEUES} queues")
        self.tx[q] = tx_new(&self.e, q, <void *>self)
        self.tx[q].tun_fd = tun_fd
        c = rx_new(&self.e, q, udp_fd, False, <void *>self)
        c.tun_fd = tun_fd
        self._add_rx(c)
        self.nq += 1
        self._socket_context(q, udp6_fd, tun_fd)

    def set_tun_fd(self, int queue, int tun_fd):
        """A re-created TUN: its queue's new fd, for writers and the reader to use."""
        cdef int i
        uf_store_int(&self.tx[queue].tun_fd, tun_fd)
        for i in range(self.nrx):
            if self.rx[i].queue == queue:
                uf_store_int(&self.rx[i].tun_fd, tun_fd)

    def queues(self):
        return self.nq

    # ---- --io loop --------------------------------------------------------------------

    def drain_tun(self, int budget):
        """Read the TUN until EAGAIN or budget reads; returns reads done,
        or -errno if the TUN itself failed."""
        cdef int r
        cdef txctx_t *c
        if self.nq == 0:
            raise RuntimeError("attach() first")
        c = self.tx[0]
        c.rt = self.e.rt
        with nogil:
            r = tun_burst(c, budget, False)
        return r

    def drain_udp(self, int budget):
        """Receive VXLAN until EAGAIN or budget reads; returns reads done,
        or -errno if the socket itself failed."""
        if self.nrx == 0:
            raise RuntimeError("attach() first")
        return self._drain_rx(self.rx[0], budget)

    def drain_udp6(self, int budget):
        """Receive VXLAN over IPv6 (queue 0's IPv6 socket), as drain_udp."""
        cdef rxctx_t *c = self._rx_of(0, True, False)
        if c == NULL or c.fd < 0:
            raise RuntimeError("attach() with a udp6_fd first")
        return self._drain_rx(c, budget)

    def drain_bare(self, int budget):
        """Receive flanneld udp framing until EAGAIN or budget reads (as drain_udp)."""
        if self.nrx == 0 or not self.rx[self.nrx - 1].bare:
            raise RuntimeError("attach() with a bare_fd first")
        return self._drain_rx(self.rx[self.nrx - 1], budget)

    cdef int _drain_rx(self, rxctx_t *c, int budget):
        cdef int r
        c.rt = self.e.rt
        with nogil:
            r = udp_burst(c, budget, False)
        return r

    # ---- --io threads -----------------------------------------------------------------

    def start_threads(self, int notify_fd=-1, bint poll=False):
        """Start the data-path threads; the fds must be blocking. Without `poll` one
        thread per context: TUN -> UDP per queue, UDP -> TUN per socket. With `poll` one
        thread per queue drains the TUN and that queue's sockets (flanneld udp's too, on
        queue 0), waiting (epoll) for any of them. notify_fd (an eventfd) is written
        when a thread ends."""
        cdef int i, k, rc
        cdef rxctx_t *r
        if self.threads:
            raise RuntimeError("threads already run")
        if self.nq == 0:
            raise RuntimeError("attach() first")
        rc = uf_wake_install()
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        self.e.notify_fd = notify_fd
        for i in range(self.nq):
            self.tx[i].polled[0] = self.tx[i].polled[1] = self.tx[i].polled[2] = NULL
        for i in range(self.nrx):
            r = self.rx[i]
            r.poller = -1
            if poll and r.fd >= 0 and self.tx[r.queue].tun_fd >= 0:
                k = 0
                while self.tx[r.queue].polled[k] != NULL:  # (3: the queue's two and bare)
                    k += 1
                self.tx[r.queue].polled[k] = r
                r.poller = r.queue
        self.threads = True
        for i in range(self.nq):
            if self.tx[i].tun_fd >= 0:
                self._start_tx(i)
        for i in range(self.nrx):
            r = self.rx[i]
            if r.fd >= 0 and r.poller < 0:  # (no fd: a udp node whose 8472 was taken)
                self._start(&r.t, <uf_thread_fn>rx_thread, <void *>r, r.queue,
                            "uf-bare" if r.bare else f"uf-vxlan{'6' if r.six else ''}{r.queue}")

    cdef _start_tx(self, int queue):
        cdef txctx_t *c = self.tx[queue]
        if c.polled[0] != NULL:
            self._start(&c.t, <uf_thread_fn>poll_thread, <void *>c, queue, f"uf-poll{queue}")
        else:
            self._start(&c.t, <uf_thread_fn>tx_thread, <void *>c, queue, f"uf-tun{queue}")

    cdef thr_t *_state(self, int i) noexcept nogil:
        """Context i's thread state: the TUN contexts first, then the sockets'."""
        return &self.tx[i].t if i < self.nq else &self.rx[i - self.nq].t

    cdef thr_t *_runner(self, int i):
        """The thread state of whichever thread drains context i (under --io poll a
        socket's is its queue's TUN context's)."""
        if i >= self.nq and self.rx[i - self.nq].poller >= 0:
            return &self.tx[self.rx[i - self.nq].poller].t
        return self._state(i)

    def set_cpus(self, cpus):
        """Pin the threads started from now on: queue q's pair (its TUN reader and its
        socket readers) runs on cpus[q % len(cpus)]; () lets the scheduler place them.
        Why pin: a wakeup on the CPU that is already running costs a context switch;
        one that must bring another, idle CPU out of its idle state costs many times
        that on a VM, several times per round trip (wx in bench/RESULTS.md)."""
        cpus = tuple(int(c) for c in cpus)
        if any(not 0 <= c < 1024 for c in cpus):  # CPU_SETSIZE
            raise ValueError(f"CPU numbers must be 0-1023: {cpus}")
        self.cpus = cpus

    def get_cpus(self):
        return self.cpus

    cdef _start(self, thr_t *t, uf_thread_fn fn, void *arg, int queue, str name):
        cdef int rc
        cdef int cpu = self.cpus[queue % len(self.cpus)] if self.cpus else -1
        cdef bytes label = name.encode()[:15]
        t.error = 0
        uf_store_int(&t.stop, 0)
        uf_store_int(&t.active, 0)
        uf_store_int(&t.running, 1)
        rc = uf_thread_start(&t.tid, fn, arg, cpu, label)
        if rc < 0:
            uf_store_int(&t.running, 0)
            self.stop_threads()
            raise OSError(-rc, f"cannot start a data-path thread: {os.strerror(-rc)}")

    def stop_threads(self):
        """Ask every thread to return, wake it out of the kernel, and join it."""
        if not self.threads:
            return
        self._join_all()
        self.threads = False
        self.publish()  # nothing reads the old tables any more
        self.reclaim()

    cdef void _join_all(self):
        cdef int i
        cdef thr_t *t
        for i in range(self.nq + self.nrx):
            t = self._state(i)
            uf_store_int(&t.stop, 1)
        with nogil:
            for i in range(self.nq + self.nrx):
                t = self._state(i)
                if t.tid:
                    uf_thread_stop(t.tid, &t.running)
                    t.tid = 0

    def thread_errors(self):
        """[(role, queue, errno)] of threads that ended on an error (role "tun" for a
        TUN reader, "udp" for a socket reader, by which fd failed under --io poll);
        each is reported once."""
        cdef int i
        cdef thr_t *t
        cdef thr_t *runner
        out = []
        for i in range(self.nq + self.nrx):
            t = self._state(i)
            runner = self._runner(i)
            if runner.tid and not uf_load_int(&runner.running) and t.error:
                role = "tun" if i < self.nq else "udp"
                queue = self.tx[i].queue if i < self.nq else self.rx[i - self.nq].queue
                out.append((role, queue, t.error))
                t.error = 0
        return out

    def restart_tx(self, int queue, int tun_fd):
        """After a TUN reader ended (its device was deleted and has been re-created):
        join it and start a new one on the new fd."""
        cdef thr_t *t = &self.tx[queue].t
        if t.tid:
            with nogil:
                uf_thread_stop(t.tid, &t.running)
            t.tid = 0
        self.set_tun_fd(queue, tun_fd)
        self._start_tx(queue)

    def running_threads(self):
        cdef int i, n = 0
        cdef thr_t *t
        for i in range(self.nq + self.nrx):
            t = self._state(i)
            n += uf_load_int(&t.running)
        return n
