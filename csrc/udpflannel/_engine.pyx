# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The compiled data path. Theory of operation:

The event loop calls drain_tun() when the TUN fd is readable, drain_udp() when the
VXLAN socket is and drain_bare() when the flanneld-udp socket is. Each drains its fd
until EAGAIN or `budget` packets, with the GIL released, into preallocated buffers
that keep HEADROOM bytes in front of each packet read from the TUN, so the VXLAN and
inner Ethernet headers are written in place (no copy). Every per-packet outcome is a
counter bump, never a Python object or exception.

Framing is a property of each route: FRAME_VXLAN (RFC 7348, as Linux and flanneld's
vxlan backend) or FRAME_UDP (flanneld's udp backend: the bare IPv4 packet is the
datagram, its TTL decremented on each side as flannel's proxy does). VXLAN frames
leave from one of `tx_fds`, picked by a hash of the inner flow, so each flow has its
own outer source port (RFC 7348 section 5: receivers' RSS and ECMP fabrics spread
flows); udp frames leave from `bare_fd`, flanneld's port, as flanneld sends them.

Route changes (set_route/del_route) run on the loop thread between drains, so the
tables need no lock. The decisions mirror udpflannel.core.frame.PyEngine exactly; tests
compare the two byte for byte.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t
from libc.string cimport memcpy, memset, memcmp, memmove
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.errno cimport errno, EAGAIN, EINTR
from posix.unistd cimport read

cdef extern from "<sys/uio.h>" nogil:
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

import ipaddress
from udpflannel.core.frame import (COUNTERS, SEND, ICMP, DELIVER, DROP, TX_DROPS, RX_DROPS,
                                   FRAMINGS)

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    ssize_t sendto(int, const void *, size_t, int, const sockaddr *, socklen_t)
    int AF_INET

cdef extern from "netio.h" nogil:
    uint64_t uf_csum_partial(const uint8_t *p, size_t n, uint64_t sum)
    uint16_t uf_csum_fold(uint64_t sum)
    uint64_t uf_pseudo4(const uint8_t *iphdr, uint8_t proto, uint16_t len)
    long uf_send_gso_iov(int fd, iovec *iov, int iovcnt, uint16_t segsize,
                         const sockaddr_in *dst)
    long uf_send_many_iov(int fd, iovec *iov, int count, const sockaddr_in *dst)
    long uf_recvmsg(int fd, uint8_t *buf, size_t cap, sockaddr_in *src, int *segsize,
                    uint32_t *ovfl)
    int EIO

cdef enum:
    VNET = 10                # sizeof(struct virtio_net_hdr)
    NEEDS_CSUM = 1
    GSO_TCPV4 = 1
    GSO_UDP_L4 = 5
    OBUF_SIZE = 64 * 256     # one window of segment headers (payloads stay in place)
    BBUF_SIZE = 4 * 65536    # the send batch: frames read and framed in place
    MAX_WINDOW = 64          # UDP_SEGMENT's limit on segments per send
    MAX_TX = 64              # outer source ports (sockets) a node sends VXLAN from
    UDP_GSO_MAX = 65507      # payload bytes one UDP_SEGMENT send may carry
    TCP_PSH = 0x08
    TCP_FIN = 0x01
    TCP_ACK = 0x10

cdef enum:
    HEADROOM = 22            # VXLAN header + inner Ethernet header
    BUFSIZE = 65536 + 64

cdef enum:
    FRAME_VXLAN = 0
    FRAME_UDP = 1

cdef enum:
    ACT_SEND = 0
    ACT_ICMP = 1
    ACT_DELIVER = 2
    ACT_DROP = 3

# Counter slots, in udpflannel.core.frame.COUNTERS order.
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
    D_UNKNOWN_SENDER
    D_SPOOFED
    D_TRUNCATED
    D_TUN_WRITE_ERROR
    N_COUNTERS

_ACTIONS = {ACT_SEND: SEND, ACT_ICMP: ICMP, ACT_DELIVER: DELIVER, ACT_DROP: DROP}
_REASONS = {D_BAD_PACKET + i: r for i, r in enumerate(TX_DROPS + RX_DROPS)}
assert len(COUNTERS) == N_COUNTERS
assert FRAMINGS == ("vxlan", "udp")  # FRAME_VXLAN, FRAME_UDP

include "_tables.pxi"


cdef uint32_t _ip(object text) except? 0:
    return int(ipaddress.IPv4Address(text))


cdef inline Py_ssize_t _framing_bytes(const route_t *r) noexcept nogil:
    return HEADROOM if r.framing == FRAME_VXLAN else 0


cdef class Engine:
    def __cinit__(self):
        self.routes = NULL
        self.buf = NULL
        self.icmp = NULL
        self.icmp_mem = NULL
        self.obuf = NULL
        self.cbuf = NULL
        self.bbuf = NULL
        self.tun_fd = -1
        self.udp_fd = -1
        self.bare_fd = -1
        self.ntx = 0

    def __init__(self, *, int vni, bytes vtep_mac, str network, int subnet_len,
                 bint strict_source=False):
        net = ipaddress.IPv4Network(network)
        if not 0 < vni < (1 << 24):
            raise ValueError(f"VNI {vni} out of range")
        if len(vtep_mac) != 6:
            raise ValueError("vtep_mac must be 6 bytes")
        if not net.prefixlen < subnet_len <= 30:
            raise ValueError(f"subnet length /{subnet_len} does not fit {net}")
        self.vni = vni
        memcpy(self.own_mac, <const char *>vtep_mac, 6)
        memset(self.vxlan_hdr, 0, 8)
        self.vxlan_hdr[0] = 0x08
        self.vxlan_hdr[4] = (vni >> 16) & 0xFF
        self.vxlan_hdr[5] = (vni >> 8) & 0xFF
        self.vxlan_hdr[6] = vni & 0xFF
        self.net = int(net.network_address)
        self.netmask = int(net.netmask)
        self.subnet_len = subnet_len
        self.shift = 32 - subnet_len
        self.strict_source = strict_source
        htab_init(&self.by_subnet, 4)
        htab_init(&self.by_sender, 4)
        self.route_cap = 16
        self.nroutes = 0
        self.routes = <route_t *>calloc(self.route_cap, sizeof(route_t))
        self.buf = <uint8_t *>malloc(BUFSIZE)
        self.icmp_mem = <uint8_t *>malloc(VNET + 128)
        self.obuf = <uint8_t *>malloc(OBUF_SIZE)
        self.cbuf = <uint8_t *>malloc(VNET + BUFSIZE)
        self.bbuf = <uint8_t *>malloc(BBUF_SIZE)
        if (self.routes == NULL or self.buf == NULL or self.icmp_mem == NULL or self.obuf == NULL
                or self.cbuf == NULL or self.bbuf == NULL):
            raise MemoryError()
        self.icmp = self.icmp_mem + VNET  # room for a virtio header in front of the ICMP reply
        memset(self.zero_vnet, 0, VNET)
        self.co_count = 0
        self.b_count = 0
        self.b_off = 0
        self.rx_ovfl = 0
        self.captured = None
        memset(self.ctr, 0, sizeof(self.ctr))

    def __dealloc__(self):
        htab_free(&self.by_subnet)
        htab_free(&self.by_sender)
        free(self.routes)
        free(self.buf)
        free(self.icmp_mem)
        free(self.obuf)
        free(self.cbuf)
        free(self.bbuf)

    # ---- control path (Python objects are fine here) ------------------------------

    cdef uint32_t _subnet_base(self, str subnet) except? 0:
        s = ipaddress.IPv4Network(subnet)
        cdef uint32_t base = int(s.network_address)
        if s.prefixlen != self.subnet_len or (base & self.netmask) != self.net:
            raise ValueError(f"{subnet} is not a /{self.subnet_len} inside the overlay network")
        return base

    def set_route(self, str subnet, str public_ip, int port, bytes vtep_mac=None,
                  str framing="vxlan"):
        """Route `subnet` to the node at public_ip:port. framing "vxlan" needs the
        node's VtepMAC; "udp" (flanneld's udp backend) takes none."""
        cdef uint32_t base = self._subnet_base(subnet)
        cdef uint32_t ip = _ip(public_ip)
        cdef route_t *r
        cdef int32_t n
        if framing not in FRAMINGS:
            raise ValueError(f"framing {framing!r} is not one of {FRAMINGS}")
        if framing == "vxlan" and (vtep_mac is None or len(vtep_mac) != 6):
            raise ValueError("VXLAN framing needs a 6-byte VtepMAC")
        if not 0 < port < 65536:
            raise ValueError("bad port")
        if ip == 0 or ip == EMPTY:  # also keeps EMPTY free as the hash maps' slot marker
            raise ValueError(f"{public_ip} cannot be a peer's address")
        self.del_route(subnet)
        if self.nroutes == self.route_cap:
            r = <route_t *>realloc(self.routes, 2 * self.route_cap * sizeof(route_t))
            if r == NULL:
                raise MemoryError()
            self.routes = r
            self.route_cap *= 2
        r = &self.routes[self.nroutes]
        memset(r, 0, sizeof(route_t))
        r.subnet = base
        r.public_ip = ip
        r.port = port
        r.framing = FRAME_VXLAN if framing == "vxlan" else FRAME_UDP
        if r.framing == FRAME_VXLAN:
            memcpy(r.mac, <const char *>vtep_mac, 6)
        r.addr.sin_family = AF_INET
        r.addr.sin_port = htons(port)
        r.addr.sin_addr.s_addr = htonl(ip)
        htab_put(&self.by_subnet, base, self.nroutes)
        n = htab_get(&self.by_sender, ip)
        htab_put(&self.by_sender, ip, (n if n > 0 else 0) + 1)
        self.nroutes += 1

    def del_route(self, str subnet):
        cdef uint32_t base = self._subnet_base(subnet)
        cdef int32_t i = htab_get(&self.by_subnet, base), n
        cdef uint32_t ip
        if i < 0:
            return False
        ip = self.routes[i].public_ip
        htab_del(&self.by_subnet, base)
        self.nroutes -= 1
        if i != self.nroutes:  # keep the array dense: move the last route into the hole
            self.routes[i] = self.routes[self.nroutes]
            htab_put(&self.by_subnet, self.routes[i].subnet, i)
        n = htab_get(&self.by_sender, ip)
        if n > 1:
            htab_put(&self.by_sender, ip, n - 1)
        else:
            htab_del(&self.by_sender, ip)
        return True

    def lookup(self, str address):
        """(public IP, port, VtepMAC or None for udp framing), or None."""
        cdef route_t *r = self.find(_ip(address))
        if r == NULL:
            return None
        mac = (<char *>r.mac)[:6] if r.framing == FRAME_VXLAN else None
        return (str(ipaddress.IPv4Address(r.public_ip)), r.port, mac)

    def route_count(self):
        return self.nroutes

    def counters(self):
        return {name: self.ctr[i] for i, name in enumerate(COUNTERS)}

    # ---- the rules (C, no GIL) ------------------------------------------------------

    cdef int drop(self, int reason) noexcept nogil:
        self.ctr[reason] += 1
        self.last_drop = reason
        return ACT_DROP

    cdef route_t *find(self, uint32_t addr) noexcept nogil:
        cdef int32_t i
        if (addr & self.netmask) != self.net:
            return NULL
        i = htab_get(&self.by_subnet, (addr >> self.shift) << self.shift)
        return NULL if i < 0 else &self.routes[i]

    cdef int tx_fd(self, route_t *r, const uint8_t *pkt, Py_ssize_t n) noexcept nogil:
        """The socket a packet to r leaves by (its outer source port)."""
        if r.framing == FRAME_UDP:
            return self.bare_fd
        if self.ntx == 0:
            return self.udp_fd
        return self.tx_fds[(<uint64_t>flow_hash(pkt, n) * <uint64_t>self.ntx) >> 32]

    cdef int ttl_expired(self, uint8_t *ip) noexcept nogil:
        """flanneld udp framing: the TTL goes down by one on each side, and a packet
        whose TTL would reach 0 is dropped (as flannel's proxy does). Returns 1 when
        dropped; otherwise the header is updated, checksum included."""
        if ip[8] <= 1:
            self.drop(D_TTL_EXPIRED)
            return 1
        ip[8] -= 1
        _ip_checksum(ip, (ip[0] & 0x0F) * 4)
        return 0

    cdef int encap_c(self, uint8_t *pkt, Py_ssize_t n, route_t **out) noexcept nogil:
        """pkt has HEADROOM writable bytes before it. On ACT_SEND the frame starts at
        pkt - _framing_bytes(route); on ACT_ICMP the reply is in self.icmp."""
        cdef uint8_t version = pkt[0] >> 4 if n > 0 else 0
        cdef uint32_t dst
        cdef route_t *r
        cdef uint8_t *h
        if version == 4 and n >= 20 and (pkt[0] & 0x0F) >= 5:
            dst = _be32(pkt + 16)
            r = self.find(dst)
            if r == NULL:
                return self.unroutable(pkt, n, dst)
        elif version == 6 and n >= 40:
            return self.drop(D_NO_ROUTE)  # the overlay carries IPv4 subnets only
        else:
            return self.drop(D_BAD_PACKET)
        if r.framing == FRAME_UDP:
            if self.ttl_expired(pkt):
                return ACT_DROP
        else:
            h = pkt - HEADROOM
            memcpy(h, self.vxlan_hdr, 8)
            memcpy(h + 8, r.mac, 6)
            memcpy(h + 14, self.own_mac, 6)
            h[20] = 0x08
            h[21] = 0x00
        out[0] = r
        self.ctr[C_TX_PACKETS] += 1
        self.ctr[C_TX_BYTES] += n
        return ACT_SEND

    cdef int unroutable(self, const uint8_t *pkt, Py_ssize_t n, uint32_t dst) noexcept nogil:
        cdef Py_ssize_t ihl = (pkt[0] & 0x0F) * 4, quoted
        cdef uint16_t frag = _be16(pkt + 6) & 0x1FFF
        cdef bint icmp_error = False
        cdef uint8_t *o = self.icmp
        if pkt[9] == 1 and n > ihl:
            icmp_error = pkt[ihl] in (3, 4, 5, 11, 12)
        if ((dst & self.netmask) != self.net or ihl < 20 or n < ihl or frag != 0
                or icmp_error):
            return self.drop(D_NO_ROUTE)
        quoted = ihl + 8 if n >= ihl + 8 else n
        memset(o, 0, 28)
        o[0] = 0x45
        _put16(o + 2, <uint16_t>(28 + quoted))
        o[8] = 64
        o[9] = 1
        # From the unreachable address itself: a local source (the TUN's own address,
        # flannel's choice) is dropped by the kernel as a martian, so the sender would
        # never learn; an address of an unleased subnet is never local and routes back
        # through the TUN, so reverse-path filtering accepts it too.
        _put32(o + 12, dst)
        memcpy(o + 16, pkt + 12, 4)
        o[20] = 3  # destination unreachable, code 0: net unreachable
        memcpy(o + 28, pkt, quoted)
        _store_native16(o + 22, ~uf_csum_fold(uf_csum_partial(o + 20, 8 + quoted, 0)))
        _store_native16(o + 10, ~uf_csum_fold(uf_csum_partial(o, 20, 0)))
        self.icmp_len = <int>(28 + quoted)
        self.ctr[C_ICMP] += 1
        return ACT_ICMP

    cdef int decap_c(self, uint8_t *d, Py_ssize_t n, uint32_t source,
                     Py_ssize_t *plen) noexcept nogil:
        """A VXLAN datagram. On ACT_DELIVER the packet is d[HEADROOM : HEADROOM + plen]."""
        cdef uint16_t ethertype
        if n < HEADROOM + 20:
            return self.drop(D_SHORT)
        if d[0] != 0x08 or d[1] != 0 or d[2] != 0 or d[3] != 0 or d[7] != 0:
            return self.drop(D_BAD_FLAGS)
        if ((<uint32_t>d[4] << 16) | (<uint32_t>d[5] << 8) | d[6]) != self.vni:
            return self.drop(D_BAD_VNI)
        if memcmp(d + 8, self.own_mac, 6) != 0:
            return self.drop(D_BAD_MAC)
        ethertype = _be16(d + 20)
        if ethertype == 0x0800:
            return self.accept_inner(d + HEADROOM, n - HEADROOM, 4, source, False, plen)
        if ethertype == 0x86DD:
            return self.accept_inner(d + HEADROOM, n - HEADROOM, 6, source, False, plen)
        return self.drop(D_BAD_ETHERTYPE)

    cdef int decap_bare_c(self, uint8_t *d, Py_ssize_t n, uint32_t source,
                          Py_ssize_t *plen) noexcept nogil:
        """A flanneld-udp datagram: the bare IP packet. On ACT_DELIVER it is d[:plen]."""
        if n < 20:
            return self.drop(D_SHORT)
        return self.accept_inner(d, n, d[0] >> 4, source, True, plen)

    cdef int accept_inner(self, uint8_t *p, Py_ssize_t avail, int family, uint32_t source,
                          bint bare, Py_ssize_t *plen) noexcept nogil:
        """The inner packet's rules, whatever the framing: a well-formed IP header that
        fits, a known sender, IPv4, and an inner source that the sender may use."""
        cdef Py_ssize_t ihl, total
        cdef uint32_t inner_src
        cdef route_t *owner
        if family == 4:
            ihl = (p[0] & 0x0F) * 4
            total = _be16(p + 2)
            if (p[0] >> 4) != 4 or ihl < 20 or total < ihl or total > avail:
                return self.drop(D_BAD_IP)
        elif family == 6:
            if avail < 40 or (p[0] >> 4) != 6 or 40 + _be16(p + 4) > avail:
                return self.drop(D_BAD_IP)
        else:
            return self.drop(D_BAD_IP)
        if htab_get(&self.by_sender, source) <= 0:
            return self.drop(D_UNKNOWN_SENDER)
        if family != 4:
            return self.drop(D_IPV6)  # the overlay carries IPv4 only
        inner_src = _be32(p + 12)
        # A source inside the overlay must be the sender's own subnet (no node may
        # speak for another's pods); one outside it is routed traffic (a host
        # address, an ICMP error from a router), delivered unless strict_source.
        if self.strict_source or (inner_src & self.netmask) == self.net:
            owner = self.find(inner_src)
            if owner == NULL or owner.public_ip != source:
                return self.drop(D_SPOOFED)
        if bare and self.ttl_expired(p):
            return ACT_DROP
        self.complete_partial_csum(p, total)
        plen[0] = total
        self.ctr[C_RX_PACKETS] += 1
        self.ctr[C_RX_BYTES] += total
        return ACT_DELIVER

    cdef void complete_partial_csum(self, uint8_t *p, Py_ssize_t total) noexcept nogil:
        """A kernel VXLAN sender on the same host (bridge, veth, hypervisor) hands over
        TCP/UDP packets whose checksum was never finished: CHECKSUM_PARTIAL travels
        with the buffer and the field holds only the pseudo-header sum, which a real
        NIC would have completed. Such a packet is finished here and counted; any other
        bad checksum is left for the kernel to drop (real corruption stays dropped)."""
        cdef Py_ssize_t ihl = (p[0] & 0x0F) * 4, l4 = total - ihl, off
        cdef uint8_t proto = p[9]
        cdef uint16_t field, pseudo, csum
        cdef uint64_t psum
        if (_be16(p + 6) & 0x3FFF) != 0:
            return  # a fragment: its L4 checksum covers the whole datagram
        if proto == 6 and l4 >= 20:
            off = 16
        elif proto == 17 and l4 >= 8:
            off = 6
        else:
            return
        field = _load_native16(p + ihl + off)
        psum = uf_pseudo4(p, proto, <uint16_t>l4)
        pseudo = uf_csum_fold(psum)
        if not (field == pseudo or (field == 0 and pseudo == 0xFFFF)
                or (field == 0xFFFF and pseudo == 0)):
            return
        if uf_csum_fold(uf_csum_partial(p + ihl, l4, psum)) == 0xFFFF:
            return  # the field happens to be right as it is
        # The field holds the pseudo-header sum: summing the L4 bytes completes it.
        csum = ~uf_csum_fold(uf_csum_partial(p + ihl, l4, 0))
        if csum == 0 and proto == 17:
            csum = 0xFFFF  # a UDP checksum of 0 means "none"
        _store_native16(p + ihl + off, csum)
        self.ctr[C_RX_CSUM_COMPLETED] += 1

    # ---- one packet at a time, for tests and tools ----------------------------------

    def encap(self, bytes packet):
        cdef Py_ssize_t n = len(packet)
        cdef route_t *r = NULL
        cdef int act
        cdef Py_ssize_t fb
        if n > BUFSIZE - HEADROOM:
            raise ValueError("packet too long")
        memcpy(self.buf + HEADROOM, <const char *>packet, n)
        act = self.encap_c(self.buf + HEADROOM, n, &r)
        if act == ACT_SEND:
            fb = _framing_bytes(r)
            return (SEND, bytes(self.buf[HEADROOM - fb:HEADROOM + n]),
                    (str(ipaddress.IPv4Address(r.public_ip)), r.port))
        if act == ACT_ICMP:
            return ICMP, bytes(self.icmp[:self.icmp_len]), None
        return DROP, self._last_drop(), None

    def decap(self, bytes datagram, str source):
        cdef Py_ssize_t n = len(datagram), plen = 0
        cdef uint32_t src = _ip(source)
        if n > BUFSIZE:
            raise ValueError("datagram too long")
        memcpy(self.buf, <const char *>datagram, n)
        if self.decap_c(self.buf, n, src, &plen) == ACT_DELIVER:
            return DELIVER, bytes(self.buf[HEADROOM:HEADROOM + plen]), None
        return DROP, self._last_drop(), None

    def decap_bare(self, bytes datagram, str source):
        cdef Py_ssize_t n = len(datagram), plen = 0
        cdef uint32_t src = _ip(source)
        if n > BUFSIZE:
            raise ValueError("datagram too long")
        memcpy(self.buf, <const char *>datagram, n)
        if self.decap_bare_c(self.buf, n, src, &plen) == ACT_DELIVER:
            return DELIVER, bytes(self.buf[:plen]), None
        return DROP, self._last_drop(), None

    def flow_index(self, bytes packet, int ways):
        """Which of `ways` source-port sockets a packet's flow takes (tests)."""
        if len(packet) < 20:
            raise ValueError("not an IPv4 packet")
        return (<uint64_t>flow_hash(<const uint8_t *><const char *>packet, len(packet))
                * <uint64_t>ways) >> 32

    def _last_drop(self):
        return _REASONS[self.last_drop]

    # ---- the hot path ---------------------------------------------------------------

    def attach(self, int tun_fd, int udp_fd, *, int bare_fd=-1, tx_fds=(), bint vnet_hdr=False,
               bint gso=False, bint gro=False):
        """Give the engine the non-blocking fds it drains and sends by: the TUN, the
        VXLAN socket (udp_fd), flanneld udp framing's socket (bare_fd, -1: none), and
        the VXLAN source-port sockets (tx_fds; empty: send from udp_fd). Say which
        offloads they were set up with: vnet_hdr (the TUN was opened with
        IFF_VNET_HDR), gso (UDP_SEGMENT may be used), gro (UDP_GRO is on)."""
        cdef int k
        if len(tx_fds) > MAX_TX:
            raise ValueError(f"at most {MAX_TX} source-port sockets")
        self.tun_fd = tun_fd
        self.udp_fd = udp_fd
        self.bare_fd = bare_fd
        self.ntx = len(tx_fds)
        for k in range(self.ntx):
            self.tx_fds[k] = tx_fds[k]
        self.vnet = vnet_hdr
        self.gso = gso
        self.gro = gro

    def offloads(self):
        """What is in use now (gso turns itself off if the kernel refuses it)."""
        return {"vnet_hdr": bool(self.vnet), "gso": bool(self.gso), "gro": bool(self.gro)}

    def kernel_drops(self):
        """Datagrams the kernel dropped on the receiving sockets (their queues were
        full), as last reported by SO_RXQ_OVFL; 0 until a read saw it."""
        return self.rx_ovfl

    def drain_tun(self, int budget):
        """Read the TUN until EAGAIN or budget reads; returns reads done,
        or -errno if the TUN itself failed."""
        cdef int r
        if self.tun_fd < 0:
            raise RuntimeError("attach() first")
        with nogil:
            r = self.tun_drain_c(budget)
        return r

    def drain_udp(self, int budget):
        """Receive VXLAN until EAGAIN or budget reads; returns reads done,
        or -errno if the socket itself failed."""
        cdef int r
        if self.udp_fd < 0:
            raise RuntimeError("attach() first")
        with nogil:
            r = self.udp_drain_c(budget, self.udp_fd, False)
        return r

    def drain_bare(self, int budget):
        """Receive flanneld udp framing until EAGAIN or budget reads (as drain_udp)."""
        cdef int r
        if self.bare_fd < 0:
            raise RuntimeError("attach() with a bare_fd first")
        with nogil:
            r = self.udp_drain_c(budget, self.bare_fd, True)
        return r

    cdef int tun_drain_c(self, int budget) noexcept nogil:
        """Each packet is read straight into the send batch (bbuf), framed in place,
        and queued; consecutive frames to one peer and socket leave together (one
        UDP_SEGMENT send when their sizes allow, else sendmmsg). The batch is flushed
        before this returns, so batching never delays a packet past the end of a drain."""
        cdef int done = 0, err
        cdef ssize_t n
        cdef uint8_t *slot
        while done < budget:
            slot = self.batch_slot()
            if self.vnet:  # the virtio header lands just before the packet
                n = read(self.tun_fd, slot - VNET, BUFSIZE - HEADROOM + VNET)
            else:
                n = read(self.tun_fd, slot, BUFSIZE - HEADROOM)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno != EAGAIN:  # EWOULDBLOCK == EAGAIN on Linux
                    err = errno  # before the flush's own syscalls touch errno
                    self.flush_batch()
                    return -err
                break
            done += 1
            if self.vnet:
                self.tun_read_vnet(slot, n)
            else:
                self.queue_packet(slot, n)
        self.flush_batch()
        return done

    cdef uint8_t *batch_slot(self) noexcept nogil:
        """Where the next packet goes: after the queued frames, HEADROOM bytes in."""
        if BBUF_SIZE - self.b_off < BUFSIZE + HEADROOM:
            self.flush_batch()
        return self.bbuf + self.b_off + HEADROOM

    cdef void queue_packet(self, uint8_t *pkt, Py_ssize_t n) noexcept nogil:
        """Frame the packet at the batch slot in place and queue it (or answer ICMP)."""
        cdef route_t *r = NULL
        cdef int act = self.encap_c(pkt, n, &r), fd
        cdef uint8_t *frame
        cdef Py_ssize_t flen, fb
        if act == ACT_ICMP:
            self.emit_plain(self.icmp, self.icmp_len, 0)
            return
        if act != ACT_SEND:
            return
        fb = _framing_bytes(r)
        frame = pkt - fb
        flen = n + fb
        fd = self.tx_fd(r, pkt, n)
        if self.b_count and (r != self.b_route or fd != self.b_fd
                             or (self.gso and (flen > self.b_seg or self.b_closed))):
            self.flush_batch()  # the frame cannot join: send the others, then start anew
            memmove(self.bbuf, frame, flen)
            frame = self.bbuf
        if self.b_count == 0:
            self.b_route = r
            self.b_fd = fd
            self.b_hdr = fb
            self.b_seg = flen
            self.b_closed = False
        self.b_iov[self.b_count].iov_base = frame
        self.b_iov[self.b_count].iov_len = flen
        self.b_count += 1
        self.b_off = (frame - self.bbuf) + flen
        if flen < self.b_seg:
            self.b_closed = True  # UDP_SEGMENT: only the last datagram may be shorter
        if self.b_count == MAX_WINDOW or self.b_off + self.b_seg > UDP_GSO_MAX:
            self.flush_batch()

    cdef void flush_batch(self) noexcept nogil:
        cdef int count = self.b_count, sent = 0, k
        cdef long rc
        if count == 0:
            return
        self.b_count = 0
        self.b_off = 0
        if self.captured is not None:
            with gil:
                for k in range(count):
                    self.captured.append(
                        (<uint8_t *>self.b_iov[k].iov_base)[:self.b_iov[k].iov_len])
            return
        if count == 1:
            sent = 1 if sendto(self.b_fd, self.b_iov[0].iov_base, self.b_iov[0].iov_len, 0,
                               <sockaddr *>&self.b_route.addr, sizeof(sockaddr_in)) >= 0 else 0
        else:
            if self.gso:  # queue_packet kept the sizes UDP_SEGMENT needs
                rc = uf_send_gso_iov(self.b_fd, self.b_iov, count, <uint16_t>self.b_seg,
                                     &self.b_route.addr)
                if rc >= 0:
                    sent = count
                else:
                    self.gso_failed(rc)
            if sent == 0:
                for k in range(count):
                    self.tx_iov[2 * k] = self.b_iov[k]
                    self.tx_iov[2 * k + 1].iov_base = NULL
                    self.tx_iov[2 * k + 1].iov_len = 0
                rc = uf_send_many_iov(self.b_fd, self.tx_iov, count, &self.b_route.addr)
                sent = <int>rc if rc > 0 else 0
        for k in range(sent, count):  # exact counters: undo what did not leave
            self.ctr[C_TX_PACKETS] -= 1
            self.ctr[C_TX_BYTES] -= self.b_iov[k].iov_len - self.b_hdr
            self.ctr[D_SEND_ERROR] += 1

    cdef void tun_read_vnet(self, uint8_t *pkt, Py_ssize_t n) noexcept nogil:
        """One read: virtio header at pkt - VNET, then the packet (at a batch slot)."""
        cdef uint8_t *v = pkt - VNET
        cdef Py_ssize_t plen = n - VNET
        cdef uint16_t gso_size, cstart, coff, csum
        if n < VNET:
            self.drop(D_BAD_OFFLOAD)
            return
        memcpy(&gso_size, v + 4, 2)
        memcpy(&cstart, v + 6, 2)
        memcpy(&coff, v + 8, 2)
        if v[1] != 0:
            if v[1] != GSO_TCPV4 and v[1] != GSO_UDP_L4:  # ECN (0x80): TSO_ECN is not asked for
                self.drop(D_BAD_OFFLOAD)
                return
            self.flush_batch()  # keep the order of packets on the wire
            self.send_segments(pkt, plen, gso_size, 6 if v[1] == GSO_TCPV4 else 17)
            return
        if v[0] & NEEDS_CSUM:
            if cstart >= plen or cstart + coff + 2 > plen:
                self.drop(D_BAD_OFFLOAD)
                return
            # The field already holds the pseudo-header sum, so summing from
            # csum_start to the end and inverting gives the full checksum. A UDP
            # checksum of 0 means "none": its ones' complement twin FFFF is sent.
            csum = ~uf_csum_fold(uf_csum_partial(pkt + cstart, plen - cstart, 0))
            if csum == 0 and plen >= 20 and (pkt[0] >> 4) == 4 and pkt[9] == 17:
                csum = 0xFFFF
            _store_native16(pkt + cstart + coff, csum)
        self.queue_packet(pkt, plen)

    cdef void send_segments(self, uint8_t *pkt, Py_ssize_t n, uint16_t mss,
                            uint8_t proto) noexcept nogil:
        """Cut a TCPv4 (proto 6) or UDPv4 (proto 17) super-packet into MSS-sized
        segments, each its own frame (VXLAN, or bare for udp framing) with fresh IPv4
        id/length/checksum and TCP seq/flags/checksum or UDP length/checksum, and send
        them a window at a time (one UDP_SEGMENT call, or sendmmsg). Only the headers
        are written (into obuf); each frame's payload is an iovec into the read buffer."""
        cdef Py_ssize_t ihl, thl, hlen, payload, stride, off, chunk, window_bytes, fb
        cdef uint16_t csum
        cdef uint32_t seq
        cdef uint16_t ident
        cdef uint8_t flags
        cdef route_t *r
        cdef int i, k, count, window, sent, built, fd
        cdef uint8_t *f
        cdef uint8_t *ip
        cdef uint8_t *tcp
        if n < 28 or (pkt[0] >> 4) != 4:
            self.drop(D_BAD_OFFLOAD)
            return
        ihl = (pkt[0] & 0x0F) * 4
        if ihl < 20 or n < ihl + (20 if proto == 6 else 8) or pkt[9] != proto:
            self.drop(D_BAD_OFFLOAD)
            return
        thl = (pkt[ihl + 12] >> 4) * 4 if proto == 6 else 8
        hlen = ihl + thl
        if (thl < (20 if proto == 6 else 8) or n < hlen or mss == 0
                or HEADROOM + hlen + mss > UDP_GSO_MAX):
            self.drop(D_BAD_OFFLOAD)  # (a segment must fit one UDP datagram)
            return
        r = self.find(_be32(pkt + 16))
        if r == NULL:
            if self.unroutable(pkt, n, _be32(pkt + 16)) == ACT_ICMP:
                self.emit_plain(self.icmp, self.icmp_len, 0)
            return
        fb = _framing_bytes(r)
        if r.framing == FRAME_UDP and self.ttl_expired(pkt):
            return  # every segment carries the super-packet's (decremented) TTL
        fd = self.tx_fd(r, pkt, n)
        self.ctr[C_TX_SUPER] += 1
        payload = n - hlen
        count = <int>((payload + mss - 1) // mss) if payload > 0 else 1
        stride = fb + hlen + mss
        window = MAX_WINDOW
        if self.gso and window > UDP_GSO_MAX // stride:
            window = <int>(UDP_GSO_MAX // stride)
        ident = _be16(pkt + 4)
        seq = _be32(pkt + ihl + 4) if proto == 6 else 0
        flags = pkt[ihl + 13] if proto == 6 else 0
        i = 0
        while i < count:
            k = 0
            window_bytes = 0
            while k < window and i + k < count:
                off = (i + k) * mss
                chunk = payload - off if payload - off < mss else mss
                if chunk < 0:
                    chunk = 0
                f = self.obuf + k * (fb + hlen)
                if fb:
                    memcpy(f, self.vxlan_hdr, 8)
                    memcpy(f + 8, r.mac, 6)
                    memcpy(f + 14, self.own_mac, 6)
                    f[20] = 0x08
                    f[21] = 0x00
                ip = f + fb
                tcp = ip + ihl
                memcpy(ip, pkt, hlen)
                _put16(ip + 2, <uint16_t>(hlen + chunk))
                _put16(ip + 4, <uint16_t>(ident + i + k))
                _ip_checksum(ip, ihl)
                if proto == 6:
                    _put32(tcp + 4, seq + <uint32_t>off)
                    if i + k != count - 1:
                        tcp[13] = flags & ~(TCP_FIN | TCP_PSH)
                    _store_native16(tcp + 16, 0)
                    _store_native16(tcp + 16, ~uf_csum_fold(uf_csum_partial(
                        pkt + hlen + off, chunk,
                        uf_csum_partial(tcp, thl, uf_pseudo4(ip, 6, <uint16_t>(thl + chunk))))))
                else:  # UDP: each datagram its own length and checksum (0 is sent as FFFF)
                    _put16(tcp + 4, <uint16_t>(8 + chunk))
                    _store_native16(tcp + 6, 0)
                    csum = ~uf_csum_fold(uf_csum_partial(
                        pkt + hlen + off, chunk,
                        uf_csum_partial(tcp, 8, uf_pseudo4(ip, 17, <uint16_t>(8 + chunk)))))
                    _store_native16(tcp + 6, csum if csum != 0 else 0xFFFF)
                self.tx_iov[2 * k].iov_base = f
                self.tx_iov[2 * k].iov_len = fb + hlen
                self.tx_iov[2 * k + 1].iov_base = pkt + hlen + off
                self.tx_iov[2 * k + 1].iov_len = chunk
                window_bytes += hlen + chunk
                k += 1
            built = k
            sent = self.send_window(r, fd, built, stride)
            self.ctr[C_TX_PACKETS] += sent
            if sent == built:
                self.ctr[C_TX_BYTES] += window_bytes
            else:  # count exactly what left: the first `sent` frames of the window
                for k in range(sent):
                    self.ctr[C_TX_BYTES] += (self.tx_iov[2 * k].iov_len - fb
                                             + self.tx_iov[2 * k + 1].iov_len)
                self.ctr[D_SEND_ERROR] += built - sent
            i += built

    cdef int send_window(self, route_t *r, int fd, int count, Py_ssize_t stride) noexcept nogil:
        """Send the `count` frames described by tx_iov; returns how many left."""
        cdef long rc
        cdef int k
        if self.captured is not None:
            with gil:
                for k in range(count):
                    self.captured.append(
                        (<uint8_t *>self.tx_iov[2 * k].iov_base)[:self.tx_iov[2 * k].iov_len]
                        + (<uint8_t *>self.tx_iov[2 * k + 1].iov_base)[:self.tx_iov[2 * k + 1].iov_len])
            return count
        if self.gso and count > 1:
            rc = uf_send_gso_iov(fd, self.tx_iov, 2 * count, <uint16_t>stride, &r.addr)
            if rc >= 0:
                return count
            self.gso_failed(rc)
        rc = uf_send_many_iov(fd, self.tx_iov, count, &r.addr)
        return <int>rc if rc > 0 else 0

    cdef void gso_failed(self, long rc) noexcept nogil:
        """A UDP_SEGMENT send failed: the caller retries it as single datagrams. Only
        EIO means the kernel cannot segment here (wireguard-go's rule): then GSO is off
        for good (the daemon logs it). Anything else (EMSGSIZE or EINVAL when a path is
        narrower than a segment, a full buffer) concerns this send alone."""
        self.ctr[C_GSO_FALLBACK] += 1
        if rc == -EIO:
            self.gso = False

    cdef int udp_drain_c(self, int budget, int fd, bint bare) noexcept nogil:
        """Receive on `fd` (VXLAN, or flanneld udp framing when `bare`): each read may
        hold several same-size datagrams (UDP_GRO), split by the reported size."""
        cdef int done = 0, segsize = 0
        cdef long n
        cdef Py_ssize_t plen = 0, off, dl
        cdef sockaddr_in src
        cdef uint32_t source
        cdef int act
        while done < budget:
            n = uf_recvmsg(fd, self.buf, BUFSIZE, &src, &segsize, &self.rx_ovfl)
            if n < 0:
                if n == -EINTR:
                    continue
                if n != -EAGAIN:
                    return <int>n
                break
            done += 1
            if segsize < 0:  # control data cut short: the GRO segment size is unknown
                self.drop(D_TRUNCATED)
                continue
            if n == 0:
                self.drop(D_SHORT)
                continue
            source = ntohl(src.sin_addr.s_addr)
            if segsize == 0 or segsize >= n:
                segsize = <int>n
            off = 0
            while off < n:
                dl = n - off if n - off < segsize else segsize
                if bare:
                    if self.decap_bare_c(self.buf + off, dl, source, &plen) == ACT_DELIVER:
                        self.deliver(self.buf + off, plen)
                elif self.decap_c(self.buf + off, dl, source, &plen) == ACT_DELIVER:
                    self.deliver(self.buf + off + HEADROOM, plen)
                off += segsize
            self.co_flush()
        return done

    cdef void deliver(self, uint8_t *p, Py_ssize_t n) noexcept nogil:
        """A validated inner packet, still in the receive buffer."""
        if self.vnet:
            self.co_add(p, n)
        else:
            self.emit(p, n, 1, n)

    # ---- receive coalescing (rules: udpflannel/core/offload.py) ---------------------

    cdef void co_add(self, uint8_t *p, Py_ssize_t n) noexcept nogil:
        """Merge p into the current run if it extends it, else flush and start anew.
        The run is kept as pointers into the receive buffer (no copy): its first
        packet, whose headers become the super-packet's, and one iovec per payload."""
        cdef uint8_t *g = self.co_first
        cdef Py_ssize_t thl, size
        cdef bint ok = (n >= 40 and p[0] == 0x45 and p[9] == 6 and (_be16(p + 6) & 0x3FFF) == 0
                        and _be16(p + 2) == n)
        if ok:
            thl = (p[32] >> 4) * 4
            ok = (thl >= 20 and 20 + thl < n and (p[33] & ~(TCP_ACK | TCP_PSH)) == 0
                  and (p[33] & TCP_ACK) != 0
                  and uf_csum_fold(uf_csum_partial(p + 20, n - 20,
                                                   uf_pseudo4(p, 6, <uint16_t>(n - 20)))) == 0xFFFF)
        if not ok:
            self.co_flush()
            self.emit_plain(p, n, 1)
            return
        size = n - 20 - thl
        if (self.co_count and not self.co_closed and size <= self.co_mss
                and self.co_count < MAX_WINDOW
                and p[1] == g[1] and p[8] == g[8] and (p[6] & 0x40) == (g[6] & 0x40)
                and memcmp(p + 12, g + 12, 12) == 0 and ((g[32] >> 4) * 4) == thl
                and memcmp(p + 40, g + 40, thl - 20) == 0
                and memcmp(p + 28, g + 28, 4) == 0
                and _be32(p + 24) == self.co_next_seq
                and self.co_len + size <= 65535):
            self.co_count += 1
            self.rx_iov[self.co_count].iov_base = p + 20 + thl
            self.rx_iov[self.co_count].iov_len = size
            self.co_len += size
            self.co_next_seq += <uint32_t>size
            self.co_psh = (p[33] & TCP_PSH) != 0
            if size < self.co_mss or self.co_psh:
                self.co_closed = True
            return
        self.co_flush()
        self.co_first = p
        self.co_len = n
        self.co_count = 1
        self.rx_iov[1].iov_base = p + 20 + thl
        self.rx_iov[1].iov_len = size
        self.co_mss = <uint16_t>size
        self.co_next_seq = _be32(p + 24) + <uint32_t>size
        self.co_psh = (p[33] & TCP_PSH) != 0
        self.co_closed = self.co_psh

    cdef void co_flush(self) noexcept nogil:
        """Write the run: alone as it came, or as one GSO super-packet whose headers
        (virtio + IP + TCP, in cbuf) precede the payload iovecs."""
        cdef uint8_t *v = self.cbuf
        cdef uint8_t *g = self.cbuf + VNET
        cdef uint16_t hlen, x
        if self.co_count == 0:
            return
        if self.co_count == 1:
            self.emit_plain(self.co_first, self.co_len, 1)
            self.co_count = 0
            return
        hlen = <uint16_t>(20 + (self.co_first[32] >> 4) * 4)
        memcpy(g, self.co_first, hlen)
        _put16(g + 2, <uint16_t>self.co_len)
        _ip_checksum(g, 20)
        if self.co_psh:
            g[33] |= TCP_PSH
        # NEEDS_CSUM: the TCP field holds the folded pseudo-header sum
        _store_native16(g + 36, uf_csum_fold(uf_pseudo4(g, 6, <uint16_t>(self.co_len - 20))))
        v[0] = NEEDS_CSUM
        v[1] = GSO_TCPV4
        memcpy(v + 2, &hlen, 2)
        memcpy(v + 4, &self.co_mss, 2)
        x = 20
        memcpy(v + 6, &x, 2)
        x = 16
        memcpy(v + 8, &x, 2)
        self.rx_iov[0].iov_base = self.cbuf
        self.rx_iov[0].iov_len = VNET + hlen
        self.ctr[C_RX_MERGED] += 1
        self.emitv(self.rx_iov, self.co_count + 1, self.co_count,
                   self.co_len + (self.co_count - 1) * hlen)  # what rx_bytes counted
        self.co_count = 0

    cdef int emitv(self, iovec *iov, int iovcnt, int packets, Py_ssize_t nbytes) noexcept nogil:
        """writev to the TUN (or join into `captured` in tests); it carries `packets`
        delivered packets of `nbytes` bytes in all (undone from rx_* if it fails)."""
        if self.write_tun(iov, iovcnt) < 0:
            self.ctr[C_RX_PACKETS] -= packets
            self.ctr[C_RX_BYTES] -= nbytes
            self.ctr[D_TUN_WRITE_ERROR] += packets
            return -1
        return 0

    cdef void emit_plain(self, uint8_t *p, Py_ssize_t n, int packets) noexcept nogil:
        """Write one packet as is (packets: 1 for a delivered packet of n bytes, 0 for
        our own ICMP replies); with vnet_hdr behind an all-zero virtio header, gathered
        from its own buffer, so nothing in front of p is touched."""
        if self.vnet:
            self.plain_iov[0].iov_base = self.zero_vnet
            self.plain_iov[0].iov_len = VNET
            self.plain_iov[1].iov_base = p
            self.plain_iov[1].iov_len = n
            self.emitv(self.plain_iov, 2, packets, n * packets)
        else:
            self.emit(p, n, packets, n * packets)

    cdef int emit(self, uint8_t *p, Py_ssize_t n, int packets, Py_ssize_t nbytes) noexcept nogil:
        self.plain_iov[0].iov_base = p
        self.plain_iov[0].iov_len = n
        return self.emitv(self.plain_iov, 1, packets, nbytes)

    cdef int write_tun(self, iovec *iov, int iovcnt) noexcept nogil:
        """The one place that writes to the TUN (tests: `captured` instead)."""
        cdef int k
        if self.captured is not None:
            with gil:
                self.captured.append(b"".join(
                    [(<uint8_t *>iov[k].iov_base)[:iov[k].iov_len] for k in range(iovcnt)]))
            return 0
        return <int>writev(self.tun_fd, iov, iovcnt)

    # ---- the offload rules one call at a time, for tests ----------------------------

    def segment(self, bytes data):
        """virtio header + packet (one TUN read) -> the datagrams it becomes."""
        cdef Py_ssize_t n = len(data)
        if n > BUFSIZE - HEADROOM + VNET:
            raise ValueError("read too long")
        self.flush_batch()
        cdef uint8_t *slot = self.batch_slot()
        memcpy(slot - VNET, <const char *>data, n)
        self.captured = []
        saved, self.vnet = self.vnet, True
        try:
            self.tun_read_vnet(slot, n)
            self.flush_batch()
            return self.captured
        finally:
            self.captured = None
            self.vnet = saved

    def coalesce(self, list packets):
        """Inner packets of consecutive datagrams -> TUN writes (virtio header + packet)."""
        cdef bytes p
        cdef Py_ssize_t n, total = 0, at = 0
        cdef uint8_t *scratch
        for p in packets:
            total += HEADROOM + len(p)
        scratch = <uint8_t *>malloc(total + 1)
        if scratch == NULL:
            raise MemoryError()
        self.captured = []
        saved, self.vnet = self.vnet, True
        try:
            for p in packets:  # laid out like a GRO read: each packet after its headers
                n = len(p)
                if n > BUFSIZE - HEADROOM:
                    raise ValueError("packet too long")
                memcpy(scratch + at + HEADROOM, <const char *>p, n)
                self.co_add(scratch + at + HEADROOM, n)
                at += HEADROOM + n
            self.co_flush()
            return self.captured
        finally:
            self.co_count = 0
            free(scratch)
            self.captured = None
            self.vnet = saved
