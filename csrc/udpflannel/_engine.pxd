# The compiled data path: its C-level layout at a glance.
# Python API (same as udpflannel.core.frame.PyEngine):
#   Engine(vni=, vtep_mac=, network=, subnet_len=, strict_source=False)
#   set_route(subnet, public_ip, port, vtep_mac, framing="vxlan"|"udp")
#   del_route(subnet) / lookup(addr) / route_count() / counters() / kernel_drops()
#   encap(packet) / decap(datagram, source) / decap_bare(datagram, source)
#       one packet at a time, for tests and tools
#   attach(tun_fd, udp_fd, bare_fd=-1, tx_fds=(), vnet_hdr=, gso=, gro=)
#   drain_tun(budget) / drain_udp(budget) / drain_bare(budget)      the hot path

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr
    struct sockaddr_in:
        uint16_t sin_family
        uint16_t sin_port
        in_addr sin_addr
    uint16_t htons(uint16_t)
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)


# Open-addressing hash map uint32 -> int32 (linear probing, backward-shift delete).
# Lookups cost the same with 1 or 100,000 peers.
cdef struct htab:
    uint32_t *keys
    int32_t *vals
    uint32_t bits
    uint32_t count


cdef struct route_t:
    uint32_t subnet          # host order, network address of the peer's subnet
    uint32_t public_ip       # host order
    uint16_t port
    uint8_t framing          # FRAME_VXLAN, or FRAME_UDP (flanneld's udp backend: bare IP)
    uint8_t mac[6]           # the peer's VtepMAC (VXLAN framing)
    sockaddr_in addr         # prebuilt destination for sendto


cdef class Engine:
    cdef uint32_t vni
    cdef uint8_t own_mac[6]
    cdef uint8_t vxlan_hdr[8]
    cdef uint32_t net, netmask, shift, subnet_len
    cdef bint strict_source  # every inner source must lie in its sender's subnet
    cdef htab by_subnet      # subnet -> index into routes
    cdef htab by_sender      # public IP -> number of subnets it owns
    cdef route_t *routes
    cdef int32_t nroutes, route_cap
    cdef uint64_t ctr[32]
    cdef int tun_fd, udp_fd  # udp_fd: the VXLAN port (receives; sends if no tx_fds)
    cdef int bare_fd         # flanneld udp framing: its port (receives and sends), or -1
    cdef int tx_fds[64]      # VXLAN sends: one socket per outer source port
    cdef int ntx             # (a flow's hash picks one; 0: send from udp_fd)
    cdef uint8_t *buf        # HEADROOM + 65536: one packet with room for headers
    cdef uint8_t *icmp       # scratch for ICMP errors (VNET bytes into icmp_mem)
    cdef uint8_t *icmp_mem
    cdef int icmp_len
    cdef int last_drop       # counter slot of the latest drop (single-packet API)

    # Offloads (see offload.py for the rules): which ones attach() turned on.
    cdef bint vnet           # TUN speaks virtio_net_hdr: TSO reads, GSO writes
    cdef bint gso            # UDP_SEGMENT sends (turned off for good on EIO)
    cdef bint gro            # UDP_GRO receives
    cdef uint32_t rx_ovfl    # the socket's kernel drop count (SO_RXQ_OVFL), latest seen
    cdef uint8_t *obuf       # segmentation: a window of frame headers
    cdef iovec tx_iov[128]   # frame k = tx_iov[2k] (headers) + tx_iov[2k+1] (payload)
    cdef uint8_t *cbuf       # coalescing: virtio + IP + TCP headers of the super-packet
    cdef uint8_t *co_first   # the run's first packet (in the receive buffer)
    cdef iovec rx_iov[66]    # [headers in cbuf] + one payload per merged segment
    cdef Py_ssize_t co_len   # IP length of the run so far
    cdef int co_count        # segments in the run (0: none)
    cdef uint16_t co_mss
    cdef uint32_t co_next_seq
    cdef bint co_psh         # the last segment carried PSH
    cdef bint co_closed      # PSH or a short segment ended the run
    cdef list captured       # tests: TUN writes land here instead of the fd
    # The send batch: frames to one peer, read and framed in place in bbuf.
    cdef uint8_t *bbuf
    cdef Py_ssize_t b_off    # bytes queued
    cdef int b_count
    cdef iovec b_iov[64]     # one per queued frame
    cdef int b_fd            # the socket the queued frames leave by
    cdef Py_ssize_t b_hdr    # framing bytes in front of each queued packet
    cdef uint8_t zero_vnet[10]  # the virtio header of a packet written as it came
    cdef iovec plain_iov[2]  # [virtio header] + one packet, for single TUN writes
    cdef Py_ssize_t b_seg    # the first frame's size (UDP_SEGMENT's segment size)
    cdef bint b_closed       # a shorter frame was queued: it must be the last
    cdef route_t *b_route

    cdef uint32_t _subnet_base(self, str subnet) except? 0
    cdef int drop(self, int reason) noexcept nogil
    cdef int unroutable(self, const uint8_t *pkt, Py_ssize_t n, uint32_t dst) noexcept nogil

    cdef route_t *find(self, uint32_t addr) noexcept nogil
    cdef int tx_fd(self, route_t *r, const uint8_t *pkt, Py_ssize_t n) noexcept nogil
    cdef int encap_c(self, uint8_t *pkt, Py_ssize_t n, route_t **out) noexcept nogil
    cdef int ttl_expired(self, uint8_t *ip) noexcept nogil
    cdef int decap_c(self, uint8_t *d, Py_ssize_t n, uint32_t source,
                     Py_ssize_t *plen) noexcept nogil
    cdef int decap_bare_c(self, uint8_t *d, Py_ssize_t n, uint32_t source,
                          Py_ssize_t *plen) noexcept nogil
    cdef int accept_inner(self, uint8_t *p, Py_ssize_t avail, int family, uint32_t source,
                          bint bare, Py_ssize_t *plen) noexcept nogil
    cdef void complete_partial_csum(self, uint8_t *p, Py_ssize_t total) noexcept nogil
    cdef int tun_drain_c(self, int budget) noexcept nogil
    cdef int udp_drain_c(self, int budget, int fd, bint bare) noexcept nogil
    cdef void tun_read_vnet(self, uint8_t *pkt, Py_ssize_t n) noexcept nogil
    cdef uint8_t *batch_slot(self) noexcept nogil
    cdef void queue_packet(self, uint8_t *pkt, Py_ssize_t n) noexcept nogil
    cdef void flush_batch(self) noexcept nogil
    cdef void send_segments(self, uint8_t *pkt, Py_ssize_t n, uint16_t mss,
                            uint8_t proto) noexcept nogil
    cdef int send_window(self, route_t *r, int fd, int count, Py_ssize_t stride) noexcept nogil
    cdef void gso_failed(self, long rc) noexcept nogil
    cdef void deliver(self, uint8_t *p, Py_ssize_t n) noexcept nogil
    cdef void co_add(self, uint8_t *p, Py_ssize_t n) noexcept nogil
    cdef void co_flush(self) noexcept nogil
    cdef int emit(self, uint8_t *p, Py_ssize_t n, int packets, Py_ssize_t nbytes) noexcept nogil
    cdef int emitv(self, iovec *iov, int iovcnt, int packets, Py_ssize_t nbytes) noexcept nogil
    cdef void emit_plain(self, uint8_t *p, Py_ssize_t n, int packets) noexcept nogil
    cdef int write_tun(self, iovec *iov, int iovcnt) noexcept nogil
