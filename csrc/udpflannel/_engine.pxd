# The compiled data path: its C-level layout at a glance.
#
# Python API (same as udpflannel.dataplane.pyengine.PyEngine where the twin has it):
#   Engine(vni=, vtep_mac=, network=, subnet_len=, strict_source=False,
#          network6=None, subnet_len6=0, vtep_mac6=None)     (network None: IPv6 only)
#   set_route(subnet, public_ip, port, vtep_mac, framing="vxlan"|"udp") / del_route(subnet)
#                                 (either family, inside and outside: an IPv6 peer address
#                                 is reached from the IPv6 sockets)
#   publish() / reclaim()         make route changes visible to running threads
#   lookup(addr) / route_count() / counters() / kernel_drops() / offloads()   (offloads():
#                                 also sendmmsg / recvmmsg, the batching used where they miss)
#   encap(packet) / decap(datagram, source) / decap_bare(datagram, source)
#   segment(read) / coalesce(packets) / flow_index(packet, ways)     one at a time
#   attach(tun_fd, udp_fd, bare_fd=-1, tx_fds=(), udp6_fd=-1, tx6_fds=(), vnet_hdr=, gso=,
#          gro=, mmsg=) / add_queue(tun_fd, udp_fd, udp6_fd=-1)
#   drain_tun(budget) / drain_udp(budget) / drain_udp6(budget) / drain_bare(budget)  --io loop
#   start_threads(notify_fd) / stop_threads() / thread_errors() / restart_tx(q, tun_fd)
#   set_tun_fd(q, tun_fd) / set_cpus(cpus) / get_cpus()              --io threads
#
# C layout: eng_t holds what every data path reads (config, fds, offload flags, the
# published route table); txctx_t / rxctx_t hold one direction's buffers, batch and
# coalescing state, counters and thread state. The loop mode uses queue 0's contexts;
# the threaded mode runs one thread per context.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr
    struct in6_addr:
        uint8_t s6_addr[16]
    struct sockaddr_in:
        uint16_t sin_family
        uint16_t sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        uint16_t sin6_family
        uint16_t sin6_port
        in6_addr sin6_addr
    uint16_t htons(uint16_t)
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)


cdef extern from "netio.h" nogil:
    # 128 bits in C (unsigned __int128): addresses of either family as route-table keys.
    # Cython believes it a 64-bit integer, so it never crosses into Python directly
    # (the engine converts through two 64-bit halves).
    ctypedef unsigned long long uf_u128
    union uf_sockaddr:
        sockaddr_in in4
        sockaddr_in6 in6
    # recvmmsg's arrays for one socket; only the fields the data path reads.
    struct uf_rxbatch:
        uf_sockaddr src[64]      # UF_RX_BATCH (RX_BATCH in _engine.pyx)
        int segsize[64]
        long len[64]


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t

ctypedef void *(*uf_thread_fn)(void *) noexcept nogil


# Open-addressing hash map uf_u128 -> int32 (linear probing, backward-shift delete).
cdef struct htab:
    uf_u128 *keys
    int32_t *vals
    uint32_t bits
    uint32_t count


cdef struct route_t:
    uf_u128 subnet           # key of the peer's subnet's network address (netio.h: uf_key4
                             # for IPv4, the IPv6 address as is)
    uf_u128 public_ip        # key of its outer address (either family)
    uint16_t port
    uint8_t framing          # FRAME_VXLAN, or FRAME_UDP (flanneld's udp backend: bare IPv4)
    uint8_t family           # the subnet's (inner) family: 4 or 6
    bint outer6              # sent over IPv6 (from the IPv6 sockets)
    uint8_t mac[6]           # the peer's VtepMAC (its IPv6 one on an IPv6 route)
    uf_sockaddr addr         # prebuilt destination for sendto


# A route table. Published tables are never changed: the control thread edits a
# copy and swaps it in (publish), so running threads read without a lock.
cdef struct rtab_t:
    htab by_subnet           # subnet key -> index into routes (both families)
    htab by_sender           # public IP key -> number of subnets it owns
    route_t *routes
    int32_t n, cap


cdef struct eng_t:
    uint32_t vni
    uint8_t own_mac[6]
    uint8_t own_mac6[6]      # the MAC IPv6 frames go to and come from (flannel-v6's)
    uint8_t vxlan_hdr[8]
    bint has4                # the network carries IPv4 (no: IPv6 only)
    uint32_t net, netmask, shift, subnet_len
    uint32_t own_net, own_mask  # this node's subnet (set_subnet); own_mask 0: not set yet
    bint has6                # the network carries IPv6
    uf_u128 net6, mask6      # the IPv6 network
    uint32_t shift6          # 128 - the IPv6 subnet length
    uf_u128 own_net6, own_mask6  # this node's IPv6 subnet; own_mask6 0: not set yet
    bint strict_source       # every inner source must lie in its sender's subnet
    int udp_fd               # the VXLAN port of queue 0 (single-packet sends, no tx_fds)
    int udp6_fd              # the same over IPv6, or -1
    int bare_fd              # flanneld udp framing: its port (receives and sends), or -1
    int tx_fds[64]           # VXLAN sends: one socket per outer source port
    int ntx                  # (a flow's hash picks one; 0: send from udp_fd)
    int tx6_fds[64]          # the same over IPv6
    int ntx6
    int vnet                 # TUN speaks virtio_net_hdr: TSO reads, GSO writes
    int gso                  # UDP_SEGMENT sends (off for good on EIO; read atomically)
    int gro                  # UDP_GRO receives
    int mmsg_tx              # sendmmsg for several datagrams (off for good on ENOSYS; atomic)
    int mmsg_rx              # recvmmsg: a batch of datagrams per receive call (same)
    rtab_t *rt               # the published table (atomic pointer)
    uint64_t gen             # bumped at each publish (atomic)
    int notify_fd            # eventfd: a thread ended (threads mode)


# Thread state, shared by both kinds of context.
cdef struct thr_t:
    pthread_t tid
    int running              # set while the thread runs (atomic)
    int stop                 # asks it to return (atomic)
    int error                # errno it ended with, 0 when stopped on request
    int active               # inside a burst, holding a route table (atomic)
    uint64_t seen            # generation it saw when it last went idle (atomic)


cdef struct rxctx_t

cdef struct txgroup_t:       # the frames of a send batch that leave by one call
    route_t *route
    int fd
    int count
    Py_ssize_t seg           # the first frame's size (UDP_SEGMENT's segment size)
    Py_ssize_t hdr           # framing bytes in front of each queued packet
    Py_ssize_t nbytes        # the frames' total size (UDP_SEGMENT's 64 KiB limit)
    bint closed
    iovec iov[64]


cdef struct txctx_t:         # TUN -> UDP, one queue
    eng_t *e
    rxctx_t *polled[3]       # --io poll: the sockets its thread also drains (NULL: none)
    int queue
    int tun_fd
    rtab_t *rt               # the table this burst uses
    uint64_t ctr[32]
    int last_drop
    bint capture             # tests: frames go to Engine.captured
    void *owner              # the Engine (for `capture`; only touched with the GIL)
    uint8_t *bbuf            # the send batch: frames read and framed in place
    Py_ssize_t b_off         # the end of the last frame in bbuf
    int b_groups             # groups in use, one per (peer, socket) of the batch
    txgroup_t groups[16]     # TX_GROUPS
    uint8_t *obuf            # segmentation: a window of frame headers
    iovec tx_iov[128]        # frame k = tx_iov[2k] (headers) + tx_iov[2k+1] (payload)
    uint8_t *icmp            # an ICMP (ICMPv6) reply, destination unreachable, for the TUN
    int icmp_len
    iovec plain_iov[2]
    thr_t t


cdef struct rxctx_t:         # UDP -> TUN, one socket
    eng_t *e
    int queue
    int fd
    bint bare
    bint six                 # an IPv6 socket (VXLAN over IPv6)
    int tun_fd               # where packets go (atomic: a re-created TUN swaps it)
    rtab_t *rt
    uint64_t ctr[32]
    int last_drop
    bint capture
    void *owner
    uint8_t *buf             # RX_BATCH slots of RX_SLOT bytes: one read each (several GRO
                             # datagrams, or one of recvmmsg's batch); single reads use slot 0
    uf_rxbatch *batch        # recvmmsg's messages, one per slot
    uint8_t *cbuf            # coalescing: virtio + IP + TCP headers of the super-packet
    uint8_t *co_first
    iovec rx_iov[66]         # [headers in cbuf] + one payload per merged segment
    Py_ssize_t co_len
    int co_count
    uint16_t co_mss
    uint32_t co_next_seq
    bint co_psh
    bint co_closed
    iovec plain_iov[2]       # [virtio header] + one packet, for single TUN writes
    uint32_t rx_ovfl         # the socket's kernel drop count (SO_RXQ_OVFL)
    int poller               # --io poll: the queue whose thread drains it; -1: its own thread
    thr_t t


cdef class Engine:
    cdef eng_t e
    cdef rtab_t *w           # the table the control thread edits (== e.rt unless threads run)
    cdef list retired        # [(generation, table address)] waiting for readers to move on
    cdef txctx_t *tx[16]
    cdef rxctx_t *rx[33]     # per queue its VXLAN socket's (then its IPv6 one's), last the
                             # flanneld-udp socket's
    cdef int nq, nrx
    cdef bint threads
    cdef tuple cpus          # set_cpus(): queue q's threads on cpus[q % len]
    cdef rxctx_t *probe_rx   # single-packet decap
    cdef txctx_t *probe_tx   # single-packet encap / segment
    cdef list captured       # tests: TUN writes / datagrams land here instead of the fds
    cdef dict pools          # family -> (network, subnet length): the control path's checks

    cdef uf_u128 _subnet_key(self, str subnet) except? 0
    cdef rtab_t *_writable(self) except NULL
    cdef _decap(self, bytes datagram, str source, bint bare)
    cdef _bare_context(self, int tun_fd)
    cdef _socket_context(self, int queue, int udp6_fd, int tun_fd)
    cdef _add_rx(self, rxctx_t *c)
    cdef rxctx_t *_rx_of(self, int queue, bint six, bint bare)
    cdef int _drain_rx(self, rxctx_t *c, int budget)
    cdef _start(self, thr_t *t, uf_thread_fn fn, void *arg, int queue, str name)
    cdef _start_tx(self, int queue)
    cdef thr_t *_state(self, int i) noexcept nogil
    cdef thr_t *_runner(self, int i)
    cdef void _join_all(self)
